// Embedding lookup: out (t, d) f32 = bf16 table rows ids[0..t]. The host checks ids < vocab.
#include "common.cuh"

extern "C" __global__ void embedding_f32(EmbedParams p, const uint32_t* __restrict__ ids,
                                         const __nv_bfloat16* __restrict__ table,
                                         float* __restrict__ out) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long)p.t * p.d) return;
  const long r = i / p.d, c = i % p.d;
  out[i] = to_f32(table[(size_t)ids[r] * p.d + c]);
}
