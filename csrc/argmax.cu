// Row-wise argmax on device (greedy decoding without copying logits to the host).
// One block per row; ties resolve to the lowest index, as the CPU's argmax does.
#include "common.cuh"

extern "C" __global__ void argmax_f32(ArgmaxParams p, const float* __restrict__ logits,
                                      uint32_t* __restrict__ out) {
  const int r = blockIdx.x;
  if (r >= p.rows) return;
  const float* x = logits + (size_t)r * p.n;
  float best = -INFINITY;
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < p.n; i += blockDim.x) {
    const float v = x[i];
    if (v > best || (v == best && i < idx)) { best = v; idx = i; }
  }
  __shared__ float sv[1024];
  __shared__ int si[1024];
  sv[threadIdx.x] = best;
  si[threadIdx.x] = idx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = sv[threadIdx.x + s];
      const int oi = si[threadIdx.x + s];
      if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
        sv[threadIdx.x] = ov;
        si[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[r] = (uint32_t)(si[0] == 0x7fffffff ? 0 : si[0]);
}
