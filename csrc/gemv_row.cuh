// One warp's dot product of a bf16 weight row with an f32 vector: the inner loop of the
// decode GEMV (csrc/gemv.cu), shared with the fused o_proj + all-reduce (csrc/allreduce.cu).
#pragma once
#include "common.cuh"

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

// Sum over k of w[c] * x[c] for one row, lane-strided in 16-byte packets with four packets
// in flight per lane (k % 8 == 0 and both rows 16-byte aligned, which every view the backend
// passes is), else scalar; reduced over the warp (every lane gets it). The alignment test
// keeps a misaligned view from faulting (a sticky error that would end the context).
__device__ __forceinline__ float warp_row_dot(const __nv_bfloat16* __restrict__ wr,
                                              const float* __restrict__ xr, int k, int lane) {
  float acc = 0.f;
  if (k % 8 == 0 &&
      ((reinterpret_cast<uintptr_t>(wr) | reinterpret_cast<uintptr_t>(xr)) & 15) == 0) {
    constexpr int STEP = 32 * 8;
    int c = lane * 8;
    for (; c + 3 * STEP < k; c += 4 * STEP) {
      const uint4 w0 = __ldg(reinterpret_cast<const uint4*>(wr + c));
      const uint4 w1 = __ldg(reinterpret_cast<const uint4*>(wr + c + STEP));
      const uint4 w2 = __ldg(reinterpret_cast<const uint4*>(wr + c + 2 * STEP));
      const uint4 w3 = __ldg(reinterpret_cast<const uint4*>(wr + c + 3 * STEP));
      acc += dot8(w0, xr + c);
      acc += dot8(w1, xr + c + STEP);
      acc += dot8(w2, xr + c + 2 * STEP);
      acc += dot8(w3, xr + c + 3 * STEP);
    }
    for (; c < k; c += STEP) acc += dot8(__ldg(reinterpret_cast<const uint4*>(wr + c)), xr + c);
  } else {
    for (int c = lane; c < k; c += 32) acc = fmaf(to_f32(wr[c]), xr[c], acc);
  }
  return warp_sum(acc);
}
