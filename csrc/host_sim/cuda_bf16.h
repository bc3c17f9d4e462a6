// Host simulator of the CUDA subset csrc/ uses (feature `host-sim`; see sim.cpp).
//
// build.rs compiles every csrc/*.cu as C++ with this directory first on the include path, so
// `#include <cuda_bf16.h>` lands here instead of the CUDA header. Each thread of a block is
// a fiber; a block's fibers share one OS thread, which makes `__shared__` (a function-local
// `static thread_local`) exactly per block. Barriers, warp shuffles and exits follow the
// hardware's rules strictly enough to catch misuse: a full-mask shuffle with a lane missing,
// or a barrier that can never complete, is reported instead of hanging.
//
// Not simulated: timing, occupancy, the memory model beyond sequential consistency (every
// flag access is an atomic here), __expf's approximation (expf is used), and out-of-bounds
// accesses (they touch host memory, as they would fault or corrupt on a GPU).
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SYNCDROP_HOST_SIM 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static thread_local

// ---- the simulator's side (sim.cpp) ---------------------------------------------------------
struct SimDim3 {
  unsigned x, y, z;
};
extern thread_local SimDim3 sim_thread_idx;  // the running fiber's threadIdx
extern thread_local SimDim3 sim_block_idx;
extern thread_local SimDim3 sim_block_dim;
extern thread_local SimDim3 sim_grid_dim;
extern "C" {
void sim_syncthreads(void);
int sim_syncthreads_or(int pred);
uint64_t sim_shfl_xor(unsigned mask, uint64_t bits, int lane_mask);
void sim_yield(void);  // let the block's other threads run (spin loops poll through this)
long long sim_clock64(void);
uint64_t sim_globaltimer(void);
}
#define threadIdx sim_thread_idx
#define blockIdx sim_block_idx
#define blockDim sim_block_dim
#define gridDim sim_grid_dim

// ---- vector and bf16 types ------------------------------------------------------------------
struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.bits << 16); }
// round to nearest even; NaN stays a (quiet) NaN
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned u = __float_as_uint(f);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = (uint16_t)((u >> 16) | 0x40u);
  } else {
    h.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
  return float2{__bfloat162float(v.x), __bfloat162float(v.y)};
}

// ---- math -----------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
#define SIM_MINMAX(T)                               \
  inline T min(T a, T b) { return a < b ? a : b; } \
  inline T max(T a, T b) { return a > b ? a : b; }
SIM_MINMAX(int)
SIM_MINMAX(unsigned)
SIM_MINMAX(long)
SIM_MINMAX(unsigned long)
SIM_MINMAX(long long)
SIM_MINMAX(unsigned long long)
SIM_MINMAX(float)
SIM_MINMAX(double)
#undef SIM_MINMAX

// ---- loads, fences, atomics, time -------------------------------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline unsigned atomicCAS(unsigned* p, unsigned expected, unsigned desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;  // the old value either way
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned atomicExch(unsigned* p, unsigned v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
// clock64 and %globaltimer count nanoseconds here and let the block's other threads run:
// every spin loop in csrc/ reads one of them, so a spinning thread cannot starve the one it
// waits for
inline long long clock64() { return sim_clock64(); }
inline void __nanosleep(unsigned) { sim_yield(); }

// ---- block and warp synchronisation ----------------------------------------------------------
inline void __syncthreads() { sim_syncthreads(); }
inline int __syncthreads_or(int pred) { return sim_syncthreads_or(pred); }
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = sim_shfl_xor(mask, bits, lane_mask);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}
