// Decode GEMV for memory bandwidth: y (t, n) = x (t, k) @ W (n, k)^T, W and x bf16, f32
// accumulation. One warp per output row; each lane streams 16-byte packets (8 bf16) of the
// row, so a warp reads 512 contiguous bytes per step. The k-sum order is fixed per (k, lane
// count), so results do not depend on t.
#include "common.cuh"

constexpr int WARPS_PER_BLOCK = 8;

extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
gemv_bf16(GemvParams p, const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
          __nv_bfloat16* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= p.n) return;
  const __nv_bfloat16* wr = w + (size_t)row * p.k;
  const bool vec = (p.k % 8 == 0);
  for (int ti = 0; ti < p.t; ++ti) {
    const __nv_bfloat16* xr = x + (size_t)ti * p.k;
    float acc = 0.f;
    if (vec) {
      for (int c = lane * 8; c < p.k; c += 32 * 8) {
        const uint4 wp = *reinterpret_cast<const uint4*>(wr + c);
        const uint4 xp = *reinterpret_cast<const uint4*>(xr + c);
        const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wp);
        const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&xp);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 a = __bfloat1622float2(w2[j]);
          const float2 b = __bfloat1622float2(x2[j]);
          acc = fmaf(a.x, b.x, acc);
          acc = fmaf(a.y, b.y, acc);
        }
      }
    } else {
      for (int c = lane; c < p.k; c += 32) acc = fmaf(to_f32(wr[c]), to_f32(xr[c]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)ti * p.n + row] = to_bf16(acc);
  }
}

// The backend's decode GEMV: bf16 W, f32 x and y (the activations stay f32). Each lane keeps
// four 16-byte packets of W in flight per step (a warp streams 2 KiB per step), which is
// what it takes to approach HBM bandwidth when n is only a few thousand rows: too few warps
// per SM to hide latency with one load each. Sum order: lane-strided packets in order, then
// the warp tree, fixed per k.
__device__ __forceinline__ float dot8(const uint4 wp, const float* __restrict__ xr) {
  const float4 x0 = __ldg(reinterpret_cast<const float4*>(xr));
  const float4 x1 = __ldg(reinterpret_cast<const float4*>(xr) + 1);
  const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wp);
  const float2 a = __bfloat1622float2(w2[0]), b = __bfloat1622float2(w2[1]);
  const float2 c = __bfloat1622float2(w2[2]), d = __bfloat1622float2(w2[3]);
  float s = a.x * x0.x;
  s = fmaf(a.y, x0.y, s);
  s = fmaf(b.x, x0.z, s);
  s = fmaf(b.y, x0.w, s);
  s = fmaf(c.x, x1.x, s);
  s = fmaf(c.y, x1.y, s);
  s = fmaf(d.x, x1.z, s);
  s = fmaf(d.y, x1.w, s);
  return s;
}

extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
gemv_bf16_f32(GemvParams p, const __nv_bfloat16* __restrict__ w, const float* __restrict__ x,
              float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= p.n) return;
  const __nv_bfloat16* wr = w + (size_t)row * p.k;
  if (p.k % 8 == 0) {
    constexpr int STEP = 32 * 8;  // elements per warp-wide packet row
    for (int ti = 0; ti < p.t; ++ti) {
      const float* xr = x + (size_t)ti * p.k;
      float acc = 0.f;
      int c = lane * 8;
      for (; c + 3 * STEP < p.k; c += 4 * STEP) {
        const uint4 w0 = __ldg(reinterpret_cast<const uint4*>(wr + c));
        const uint4 w1 = __ldg(reinterpret_cast<const uint4*>(wr + c + STEP));
        const uint4 w2 = __ldg(reinterpret_cast<const uint4*>(wr + c + 2 * STEP));
        const uint4 w3 = __ldg(reinterpret_cast<const uint4*>(wr + c + 3 * STEP));
        acc += dot8(w0, xr + c);
        acc += dot8(w1, xr + c + STEP);
        acc += dot8(w2, xr + c + 2 * STEP);
        acc += dot8(w3, xr + c + 3 * STEP);
      }
      for (; c < p.k; c += STEP) acc += dot8(__ldg(reinterpret_cast<const uint4*>(wr + c)), xr + c);
      acc = warp_sum(acc);
      if (lane == 0) y[(size_t)ti * p.n + row] = acc;
    }
  } else {
    for (int ti = 0; ti < p.t; ++ti) {
      const float* xr = x + (size_t)ti * p.k;
      float acc = 0.f;
      for (int c = lane; c < p.k; c += 32) acc = fmaf(to_f32(wr[c]), xr[c], acc);
      acc = warp_sum(acc);
      if (lane == 0) y[(size_t)ti * p.n + row] = acc;
    }
  }
}
