// RMSNorm with a fused residual add (bf16 storage, f32 accumulation).
// One block per row; each thread strides over the row. The sum of squares is reduced in a
// fixed order per block size, so results are deterministic for a given launch shape.
#include "common.cuh"

extern "C" __global__ void add_rmsnorm_bf16(RmsNormParams p, __nv_bfloat16* __restrict__ residual,
                                            const __nv_bfloat16* __restrict__ delta,
                                            const __nv_bfloat16* __restrict__ weight,
                                            __nv_bfloat16* __restrict__ out) {
  const int r = blockIdx.x;
  if (r >= p.rows) return;
  __nv_bfloat16* x = residual + (size_t)r * p.d;
  const __nv_bfloat16* dx = delta + (size_t)r * p.d;
  __nv_bfloat16* y = out + (size_t)r * p.d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
    float v = to_f32(x[i]);
    if (p.has_delta) {
      v += to_f32(dx[i]);
      x[i] = to_bf16(v);
      v = to_f32(x[i]);  // normalise what is stored, so the residual stream stays consistent
    }
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss) / (float)p.d + p.eps);
  for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
    y[i] = to_bf16(to_f32(x[i]) * inv * to_f32(weight[i]));
  }
}

// The same with f32 activations and f32 norm weights (the CUDA backend's residual stream is
// f32; weights of the linear layers are bf16).
extern "C" __global__ void add_rmsnorm_f32(RmsNormParams p, float* __restrict__ residual,
                                           const float* __restrict__ delta,
                                           const float* __restrict__ weight,
                                           float* __restrict__ out) {
  const int r = blockIdx.x;
  if (r >= p.rows) return;
  float* x = residual + (size_t)r * p.d;
  const float* dx = delta + (size_t)r * p.d;
  float* y = out + (size_t)r * p.d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
    float v = x[i];
    if (p.has_delta) {
      v += dx[i];
      x[i] = v;
    }
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss) / (float)p.d + p.eps);
  for (int i = threadIdx.x; i < p.d; i += blockDim.x) y[i] = x[i] * inv * weight[i];
}

// Plain RMSNorm of f32 rows that leaves its input alone (attention input, LM head).
extern "C" __global__ void rmsnorm_f32(RmsNormParams p, const float* __restrict__ x,
                                       const float* __restrict__ weight,
                                       float* __restrict__ out) {
  const int r = blockIdx.x;
  if (r >= p.rows) return;
  const float* xr = x + (size_t)r * p.d;
  float* y = out + (size_t)r * p.d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < p.d; i += blockDim.x) ss += xr[i] * xr[i];
  const float inv = rsqrtf(block_sum(ss) / (float)p.d + p.eps);
  for (int i = threadIdx.x; i < p.d; i += blockDim.x) y[i] = xr[i] * inv * weight[i];
}
