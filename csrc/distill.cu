// Block-to-block distillation of an SPD block on the GPU: the non-GEMM steps of one rank's
// student forward and backward, the MSE loss and Adam. The GEMMs are cuBLAS f32
// (src/backend/cuda/gemm.rs); the math, and the CPU reference the tests compare against, is
// src/distill.rs.
#include "common.cuh"

// u = x + a; rinv = 1 / sqrt(mean(u^2) + eps); n = u * rinv * w. One block per row; u, n and
// rinv are the tape of the backward pass.
extern "C" __global__ void __launch_bounds__(256)
    distill_norm_fwd(DistillNormParams p, const float* __restrict__ x,
                     const float* __restrict__ a, const float* __restrict__ w,
                     float* __restrict__ u, float* __restrict__ n, float* __restrict__ rinv) {
  const int r = blockIdx.x;
  if (r >= p.rows) return;
  const size_t o = (size_t)r * p.d;
  float ss = 0.f;
  for (int j = threadIdx.x; j < p.d; j += blockDim.x) {
    const float v = x[o + j] + a[o + j];
    u[o + j] = v;
    ss += v * v;
  }
  const float inv = 1.f / sqrtf(block_sum(ss) / (float)p.d + p.eps);
  if (threadIdx.x == 0) rinv[r] = inv;
  for (int j = threadIdx.x; j < p.d; j += blockDim.x) n[o + j] = u[o + j] * inv * w[j];
}

// s = silu(g) * up  =>  dg = ds * up * sig(g) * (1 + g * (1 - sig(g))), dup = ds * silu(g).
// gu and dgu are (t, 2f), gate columns then up columns; ds is (t, f).
extern "C" __global__ void distill_swiglu_bwd(SwigluParams p, const float* __restrict__ gu,
                                              const float* __restrict__ ds,
                                              float* __restrict__ dgu) {
  const long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (long)p.t * p.f) return;
  const long r = id / p.f, j = id % p.f;
  const float g = gu[r * 2 * p.f + j], up = gu[r * 2 * p.f + p.f + j];
  const float sg = 1.f / (1.f + expf(-g));
  const float d = ds[id];
  dgu[r * 2 * p.f + j] = d * up * sg * (1.f + g * (1.f - sg));
  dgu[r * 2 * p.f + p.f + j] = d * g * sg;
}

// The input gradient of n = u * rinv * w, plus the direct path out = a + m:
// da = dout + rinv * dn * w - u * rinv^3 * sum_j(dn * w * u) / d. One block per row.
extern "C" __global__ void __launch_bounds__(256)
    distill_norm_bwd(DistillNormParams p, const float* __restrict__ u,
                     const float* __restrict__ rinv, const float* __restrict__ w,
                     const float* __restrict__ dn, const float* __restrict__ dout,
                     float* __restrict__ da) {
  const int r = blockIdx.x;
  if (r >= p.rows) return;
  const size_t o = (size_t)r * p.d;
  float dot = 0.f;
  for (int j = threadIdx.x; j < p.d; j += blockDim.x) dot += dn[o + j] * w[j] * u[o + j];
  const float ri = rinv[r];
  const float c = ri * ri * ri * block_sum(dot) / (float)p.d;
  for (int j = threadIdx.x; j < p.d; j += blockDim.x)
    da[o + j] = dout[o + j] + ri * dn[o + j] * w[j] - u[o + j] * c;
}

// The weight gradient of the norm: dw[j] = sum_t dn[t, j] * u[t, j] * rinv[t]. One thread per
// column (coalesced across a warp), rows summed in order: deterministic.
extern "C" __global__ void distill_norm_wgrad(DistillNormParams p, const float* __restrict__ u,
                                              const float* __restrict__ rinv,
                                              const float* __restrict__ dn,
                                              float* __restrict__ dw) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= p.d) return;
  float acc = 0.f;
  for (int r = 0; r < p.rows; ++r) {
    const size_t o = (size_t)r * p.d + j;
    acc += dn[o] * u[o] * rinv[r];
  }
  dw[j] = acc;
}

// dout = scale * (out - target); partial[block] = that block's sum of (out - target)^2 in
// f64. Launched with DISTILL_MSE_BLOCKS blocks of 256 threads, grid-stride.
extern "C" __global__ void __launch_bounds__(256)
    distill_mse(MseParams p, const float* __restrict__ out, const float* __restrict__ target,
                float* __restrict__ dout, double* __restrict__ partial) {
  __shared__ double part[256];
  double acc = 0.0;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n;
       i += (long)gridDim.x * blockDim.x) {
    const float e = out[i] - target[i];
    dout[i] = p.scale * e;
    acc += (double)e * (double)e;
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}

// Adam, as the CPU loop writes it: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// param -= lr * (m / c1) / (sqrt(v / c2) + eps).
extern "C" __global__ void distill_adam(AdamParams p, float* __restrict__ param,
                                        const float* __restrict__ grad, float* __restrict__ m,
                                        float* __restrict__ v) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const float g = grad[i];
  const float mi = p.b1 * m[i] + (1.f - p.b1) * g;
  const float vi = p.b2 * v[i] + (1.f - p.b2) * g * g;
  m[i] = mi;
  v[i] = vi;
  param[i] -= p.lr * (mi / p.c1) / (sqrtf(vi / p.c2) + p.eps);
}
