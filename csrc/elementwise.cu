// Elementwise helpers of the CUDA backend: residual adds and the f32 -> bf16 conversion that
// feeds cuBLAS (prefill GEMMs take bf16 activations, accumulate and write f32).
#include "common.cuh"

extern "C" __global__ void add_f32(ElemParams p, float* __restrict__ acc,
                                   const float* __restrict__ x) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) acc[i] += x[i];
}

extern "C" __global__ void f32_to_bf16(ElemParams p, const float* __restrict__ x,
                                       __nv_bfloat16* __restrict__ y) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) y[i] = to_bf16(x[i]);
}
