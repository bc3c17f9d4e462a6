// Kernels that check the simulator itself (tests/host_sim_kernels.rs): shared memory per
// block, barriers with returned threads, __syncthreads_or, and the two misuses it must
// report instead of hanging.
#include "common.cuh"

// out[block] = sum of (thread index + 1) over the block, through common.cuh's block_sum
// (warp shuffles + __shared__): each block must see only its own shared memory.
extern "C" __global__ void sim_selftest_block_sum(float* out) {
  const float s = block_sum((float)(threadIdx.x + 1));
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// Threads at or above `live` return first; the rest meet at __syncthreads_or twice (any
// thread with index == `vote` says yes the first time, nobody the second).
extern "C" __global__ void sim_selftest_sync_or(int live, int vote, int* out) {
  if ((int)threadIdx.x >= live) return;
  const int a = __syncthreads_or((int)threadIdx.x == vote);
  const int b = __syncthreads_or(0);
  out[threadIdx.x] = a * 2 + b;
}

// Misuse: lane 0 returns, the other lanes shuffle with a full mask.
extern "C" __global__ void sim_selftest_shuffle_after_return(float* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
}

// Misuse: lane 0 waits at __syncthreads while lanes 1..31 wait for it in a shuffle.
extern "C" __global__ void sim_selftest_deadlock(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    __syncthreads();
  }
}
