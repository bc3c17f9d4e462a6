// Elementwise helpers of the CUDA backend: residual adds, the f32 -> bf16 conversion that
// feeds cuBLAS (prefill GEMMs take bf16 activations, accumulate and write f32), and rounding
// f32 values to bf16 in place (a bf16 wire on a path that moves f32, e.g. NCCL).
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

extern "C" __global__ void round_bf16_f32(ElemParams p, float* __restrict__ x) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) x[i] = to_f32(__float2bfloat16_rn(x[i]));
}
