// SwiGLU of the fused gate|up projection: h (t, f) = silu(gate) * up.
#include "common.cuh"

extern "C" __global__ void swiglu_bf16(SwigluParams p, const __nv_bfloat16* __restrict__ gu,
                                       __nv_bfloat16* __restrict__ h) {
  const long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (long)p.t * p.f) return;
  const long r = id / p.f, j = id % p.f;
  const float g = to_f32(gu[r * 2 * p.f + j]);
  const float u = to_f32(gu[r * 2 * p.f + p.f + j]);
  h[id] = to_bf16(g / (1.f + __expf(-g)) * u);
}

// f32 activations: h (t, f) = silu(gu[:, :f]) * gu[:, f:2f].
extern "C" __global__ void swiglu_f32(SwigluParams p, const float* __restrict__ gu,
                                      float* __restrict__ h) {
  const long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (long)p.t * p.f) return;
  const long r = id / p.f, j = id % p.f;
  const float g = gu[r * 2 * p.f + j];
  const float u = gu[r * 2 * p.f + p.f + j];
  h[id] = g / (1.f + __expf(-g)) * u;
}
