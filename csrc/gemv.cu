// Decode GEMV for memory bandwidth: y (t, n) = x (t, k) @ W (n, k)^T, W and x bf16, f32
// accumulation. One warp per output row; each lane streams 16-byte packets (8 bf16) of the
// row, so a warp reads 512 contiguous bytes per step. The k-sum order is fixed per (k, lane
// count), so results do not depend on t.
#include "common.cuh"
#include "gemv_row.cuh"

constexpr int WARPS_PER_BLOCK = 8;

extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
gemv_bf16(GemvParams p, const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
          __nv_bfloat16* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= p.n) return;
  const __nv_bfloat16* wr = w + (size_t)row * p.k;
  const bool vec =
      p.k % 8 == 0 && ((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(x)) & 15) == 0;
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
extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
gemv_bf16_f32(GemvParams p, const __nv_bfloat16* __restrict__ w, const float* __restrict__ x,
              float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= p.n) return;
  const __nv_bfloat16* wr = w + (size_t)row * p.k;
  for (int ti = 0; ti < p.t; ++ti) {
    const float acc = warp_row_dot(wr, x + (size_t)ti * p.k, p.k, lane);
    if (lane == 0) y[(size_t)ti * p.n + row] = acc;
  }
}
