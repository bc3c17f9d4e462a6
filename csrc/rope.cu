// Rotary position embedding in place, both layouts (see RopeParams). One thread per
// (row, head, pair). Angles in f32 from exp2 of the log2-scaled frequency.
#include "common.cuh"

extern "C" __global__ void rope_bf16(RopeParams p, __nv_bfloat16* __restrict__ x) {
  const int half = p.head_dim / 2;
  const long total = (long)p.t * p.heads * half;
  const long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= total) return;
  const int i = id % half;
  const int h = (id / half) % p.heads;
  const int r = id / ((long)half * p.heads);
  const float freq = exp2f(-2.0f * (float)i / (float)p.head_dim * log2f(p.theta));
  float s, c;
  sincosf((float)(p.pos0 + r) * freq, &s, &c);
  __nv_bfloat16* v = x + (size_t)r * p.stride + (size_t)h * p.head_dim;
  const int a = p.style == 0 ? 2 * i : i;
  const int b = p.style == 0 ? 2 * i + 1 : i + half;
  const float va = to_f32(v[a]), vb = to_f32(v[b]);
  v[a] = to_bf16(va * c - vb * s);
  v[b] = to_bf16(va * s + vb * c);
}
