// P2P sum all-reduce over peer pointers (DESIGN.md section 5), one-shot and two-shot, the
// same protocol as src/comm/p2p_sim.rs (which property-tests it on CPU threads):
//   round c = ctr[block] + 1 (device memory, so CUDA-graph replays advance it), slot c & 1;
//   write the input into my data[slot] (region 0);
//   barrier: thread t < world release-stores c into peer t's flags[phase][slot][block][me],
//            then acquire-spins on my flags[phase][slot][block][t] == c under a clock budget;
//   one-shot: sum region 0 of every rank in rank order 0..world (bit-identical everywhere);
//   two-shot: sum only my chunk into my region 1, barrier again, gather every chunk from its
//             owner's region 1.
// Element i is handled by block (i / blockDim) % gridDim on every rank and in every phase,
// so a barrier per block is enough. Two data slots + equality on wrapping u32 counters make
// resets unnecessary. No peer atomics (PCIe has none): only stores and loads cross ranks.
// On a spin timeout the block records {1, rank, peer, seen, expected} in err and returns;
// every later launch returns at once while err is set, and the host turns it into
// Error::CommTimeout at its next synchronisation.
#include "common.cuh"
#include "gemv_row.cuh"

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ size_t flag_idx(int phase, int slot, int block, int rank) {
  return (((size_t)phase * 2 + slot) * AR_MAX_BLOCKS + block) * AR_MAX_WORLD + rank;
}

// Returns false (after recording the error) if a peer did not arrive within the budget.
__device__ bool ar_barrier(const ArParams& p, const PeerPtrs& flags, int phase, int slot,
                           uint32_t c, uint32_t* __restrict__ err) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();  // every thread's data stores precede the signal (and `failed` is reset)
  if (threadIdx.x < p.world) {
    const int peer = threadIdx.x;
    __threadfence_system();
    st_release_sys(reinterpret_cast<uint32_t*>(flags.p[peer]) + flag_idx(phase, slot, blockIdx.x, p.rank), c);
    const uint32_t* mine = reinterpret_cast<const uint32_t*>(flags.p[p.rank]) + flag_idx(phase, slot, blockIdx.x, peer);
    const long long t0 = clock64();
    uint32_t v;
    while ((v = ld_acquire_sys(mine)) != c) {
      if (clock64() - t0 > p.budget) {
        if (atomicCAS(err, 0u, 1u) == 0u) {
          err[1] = p.rank;
          err[2] = peer;
          err[3] = v;
          err[4] = c;
          __threadfence_system();
        }
        failed = 1;
        break;
      }
    }
  }
  __syncthreads();
  return !failed;
}

// Thread 0 reads the error flag and this block's round counter once; the whole block then
// proceeds or returns together (a per-thread read of `err` could split the block).
__device__ __forceinline__ bool ar_begin(const uint32_t* ctr, const uint32_t* err, uint32_t* c) {
  __shared__ uint32_t round;
  __shared__ int go;
  if (threadIdx.x == 0) {
    go = ld_acquire_sys(err) == 0u;
    round = ctr[blockIdx.x] + 1u;
  }
  __syncthreads();
  *c = round;
  return go;
}

extern "C" __global__ void __launch_bounds__(256)
allreduce_f32(ArParams p, PeerPtrs data, PeerPtrs flags, uint32_t* __restrict__ ctr,
              uint32_t* __restrict__ err, const float* in, float* out, const float* residual) {
  // `in`, `out` and `residual` may alias (in-place; x += sum): no __restrict__ on them
  uint32_t c;
  if (!ar_begin(ctr, err, &c)) return;  // an earlier all-reduce failed: do nothing
  const int slot = c & 1u;
  const size_t region = (size_t)p.capacity;
  const size_t slot_base = (size_t)slot * 2 * region;
  float* mine = reinterpret_cast<float*>(data.p[p.rank]) + slot_base;
  const long stride = (long)gridDim.x * blockDim.x;
  const long first = (long)blockIdx.x * blockDim.x + threadIdx.x;
  for (long i = first; i < p.n; i += stride) mine[i] = in[i];
  if (!ar_barrier(p, flags, 0, slot, c, err)) return;
  if (!p.two_shot) {
    for (long i = first; i < p.n; i += stride) {
      float acc = 0.f;
      for (int r = 0; r < p.world; ++r)
        acc += __ldcg(reinterpret_cast<const float*>(data.p[r]) + slot_base + i);
      out[i] = p.has_residual ? residual[i] + acc : acc;
    }
  } else {
    const long chunk = (p.n + p.world - 1) / p.world;
    for (long i = first; i < p.n; i += stride) {
      if (i / chunk != p.rank) continue;
      float acc = 0.f;
      for (int r = 0; r < p.world; ++r)
        acc += __ldcg(reinterpret_cast<const float*>(data.p[r]) + slot_base + i);
      mine[region + i] = acc;
    }
    if (!ar_barrier(p, flags, 1, slot, c, err)) return;
    for (long i = first; i < p.n; i += stride) {
      const int owner = (int)(i / chunk);
      const float v = __ldcg(reinterpret_cast<const float*>(data.p[owner]) + slot_base + region + i);
      out[i] = p.has_residual ? residual[i] + v : v;
    }
  }
  if (threadIdx.x == 0) ctr[blockIdx.x] = c;
}

// Fused attention output projection + one-shot all-reduce for a decode step (t = 1): out (n)
// = sum over ranks of W_r (n, k) @ x_r (k). Rows map to blocks exactly as allreduce_f32's
// elements do (chunks of 256, chunk c on block c % grid, the same grid for the same n), so
// the two kernels share round counters, flags and data slots safely. Block b computes its
// chunks' rows (a warp per row) into its registered buffer, meets its peers' block b at one
// barrier, and sums the same rows over ranks in rank order: one launch, no separate partial
// buffer. (The SPD block's "into the MLP reduce" mode is a plain GEMV: no kernel here.)
extern "C" __global__ void __launch_bounds__(256)
oproj_allreduce_f32(ArParams p, int32_t k, const __nv_bfloat16* __restrict__ w,
                    const float* __restrict__ x, PeerPtrs data, PeerPtrs flags,
                    uint32_t* __restrict__ ctr, uint32_t* __restrict__ err,
                    float* __restrict__ out) {
  uint32_t c;
  if (!ar_begin(ctr, err, &c)) return;
  const int slot = c & 1u;
  const size_t slot_base = (size_t)slot * 2 * (size_t)p.capacity;
  float* mine = reinterpret_cast<float*>(data.p[p.rank]) + slot_base;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long chunks = (p.n + 255) / 256;
  for (long ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
    for (int j = warp; j < 256; j += 8) {
      const long row = ch * 256 + j;
      if (row >= p.n) break;
      const float acc = warp_row_dot(w + (size_t)row * k, x, k, lane);
      if (lane == 0) mine[row] = acc;
    }
  }
  if (!ar_barrier(p, flags, 0, slot, c, err)) return;
  for (long ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
    const long row = ch * 256 + threadIdx.x;
    if (row < p.n) {
      float acc = 0.f;
      for (int r = 0; r < p.world; ++r)
        acc += __ldcg(reinterpret_cast<const float*>(data.p[r]) + slot_base + row);
      out[row] = acc;
    }
  }
  if (threadIdx.x == 0) ctr[blockIdx.x] = c;
}
