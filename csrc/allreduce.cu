// P2P sum all-reduce over peer pointers (DESIGN.md section 5), one-shot and two-shot, the
// same protocol as src/comm/p2p_sim.rs (which property-tests it on CPU threads):
//   round c = ctr[block] + 1 (device memory, so CUDA-graph replays advance it), slot c & 1;
//   write the input into my data[slot] (region 0);
//   barrier: thread t < world release-stores c into peer t's flags[phase][slot][block][me],
//            then acquire-spins on my flags[phase][slot][block][t] == c under a time budget;
//   one-shot: sum region 0 of every rank in rank order 0..world (bit-identical everywhere);
//   two-shot: sum only my chunk into my region 1, barrier again, gather every chunk from its
//             owner's region 1.
// Element i is handled by block (i / blockDim) % gridDim on every rank and in every phase,
// so a barrier per block is enough. Two data slots + equality on wrapping u32 counters make
// resets unnecessary. No peer atomics (PCIe has none): only stores and loads cross ranks.
// On a spin timeout the block records {1, rank, peer, seen, expected} in err and returns;
// every later launch returns at once while err is set, and the host turns it into
// Error::CommTimeout at its next synchronisation.
//
// Every kernel here needs one block per SM at most (the host caps each rank's grid at SMs /
// ranks on the device, for co-residency), so each declares __launch_bounds__(256, 1):
// with (256) alone ptxas aimed at higher occupancy and gave the bf16-wire all-reduces 48
// registers plus 24 B of spills (sm_90), and the fused f32 norm the same on sm_80.
#include "common.cuh"
#include "gemv_row.cuh"

// Kernel parameters read in place (__grid_constant__): no per-thread copy of the peer
// pointer arrays into local memory.
#define ArgParams const __grid_constant__ ArParams
#define ArgPeers const __grid_constant__ PeerPtrs

#ifdef SYNCDROP_HOST_SIM
// csrc/host_sim: host atomics; an acquire load lets the block's other threads run, since
// every one of them sits in a spin loop
__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
__device__ __forceinline__ void st_release_gpu(uint32_t* p, uint32_t v) { st_release_sys(p, v); }
__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) { return ld_acquire_sys(p); }
#else
// A u32 flag's release store and acquire load at a PTX scope: sys for flags peers on other
// GPUs read; gpu for flags no other device reads (the grid barrier among one rank's blocks),
// where a system-scope release would also wait for this GPU's outstanding peer writes.
#define FLAG_OPS(scope)                                                                  \
  __device__ __forceinline__ void st_release_##scope(uint32_t* p, uint32_t v) {          \
    asm volatile("st.release." #scope ".global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory"); \
  }                                                                                      \
  __device__ __forceinline__ uint32_t ld_acquire_##scope(const uint32_t* p) {            \
    uint32_t v;                                                                          \
    asm volatile("ld.acquire." #scope ".global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); \
    return v;                                                                            \
  }
FLAG_OPS(sys)
FLAG_OPS(gpu)
#undef FLAG_OPS
#endif

__device__ __forceinline__ size_t flag_idx(int phase, int slot, int block, int rank) {
  return (((size_t)phase * 2 + slot) * AR_MAX_BLOCKS + block) * AR_MAX_WORLD + rank;
}

// Returns false (after recording the error) if a peer did not arrive within the budget. The
// verdict is combined with __syncthreads_or, so every thread of the block returns the same.
__device__ bool ar_barrier(const ArParams& p, const PeerPtrs& flags, int phase, int slot,
                           uint32_t c, uint32_t* __restrict__ err) {
  __syncthreads();  // every thread's data stores precede the signal
  int failed = 0;
  if (threadIdx.x < p.world) {
    const int peer = threadIdx.x;
    // no fence before the release: with the __syncthreads above, st.release.sys orders every
    // thread's data stores of this block before the flag (PTX cumulativity; TensorRT-LLM's
    // block barrier is the same sequence)
    uint32_t* theirs = reinterpret_cast<uint32_t*>(flags.p[peer]);
    st_release_sys(theirs + flag_idx(phase, slot, blockIdx.x, p.rank), c);
    const uint32_t* mine =
        reinterpret_cast<const uint32_t*>(flags.p[p.rank]) + flag_idx(phase, slot, blockIdx.x, peer);
    const uint64_t t0 = globaltimer_ns();
    uint32_t v;
    while ((v = ld_acquire_sys(mine)) != c) {
      if (globaltimer_ns() - t0 > (uint64_t)p.budget) {
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
  return !__syncthreads_or(failed);
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

// What crosses ranks ("the wire") and what the caller holds. W = float moves 4-byte values;
// W = __nv_bfloat16 rounds each rank's contribution to bf16 (round to nearest even) as it
// is written to the registered buffer and halves the bytes every peer reads. Either way the
// sum is accumulated in f32 in rank order 0..world (two-shot partials stay f32 in region 1),
// so one-shot and two-shot agree bit for bit and the CPU mirror (comm::Wire::Bf16) is exact.
// Every sum starts from rank 0's value (not 0.f), as the CPU communicators' do.
__device__ __forceinline__ float ar_load(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float ar_load(const __nv_bfloat16* p) { return to_f32(__ldcg(p)); }
__device__ __forceinline__ float ar_f32(float v) { return v; }
__device__ __forceinline__ float ar_f32(__nv_bfloat16 v) { return to_f32(v); }
template <typename T> __device__ __forceinline__ T ar_from(float v);
template <> __device__ __forceinline__ float ar_from<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 ar_from<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Slot s of a rank's registered data: region 0 (wire values, W) then region 1 (two-shot
// partial sums, f32), each `capacity` f32 wide (the host keeps capacity a multiple of 8, so
// every region starts 16-byte aligned: cuMemAlloc bases are 256-byte aligned).
__device__ __forceinline__ char* ar_slot(const PeerPtrs& data, int r, int slot, int64_t cap) {
  return reinterpret_cast<char*>(data.p[r]) + (size_t)slot * 2 * (size_t)cap * sizeof(float);
}

// 16-byte packs for the reads that cross ranks: V elements of W per load (4 f32 or 8 bf16).
// A 256-element chunk holds 256 / V packs, so a pass of 256 threads covers V chunks, all of
// them this block's (chunk c belongs to block c % grid, as in every other loop here).
template <typename W> struct PackOf { static constexpr int V = 16 / sizeof(W); };

// acc[e] (=, or +=) element e of a 16-byte pack of W. Sums start from rank 0's value, as
// the CPU mirror's do (0.f + -0.f would turn an all-negative-zero sum into +0).
template <bool First>
__device__ __forceinline__ void acc_pack(float (&acc)[4], uint4 raw) {
  const float4 f = *reinterpret_cast<const float4*>(&raw);
  if (First) {
    acc[0] = f.x; acc[1] = f.y; acc[2] = f.z; acc[3] = f.w;
  } else {
    acc[0] += f.x; acc[1] += f.y; acc[2] += f.z; acc[3] += f.w;
  }
}
// 8 bf16 in four 32-bit words, element 2k in the low half of word k (little-endian). A bf16
// is the top half of its f32, so each converts exactly by a shift or a mask, straight from
// the registers (viewing `raw` through a bf16 pointer put it on the stack: 16 B of local
// memory and 24 B of spills per thread in ptxas's report).
template <bool First>
__device__ __forceinline__ void acc_pack(float (&acc)[8], uint4 raw) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float lo = __uint_as_float(w[k] << 16), hi = __uint_as_float(w[k] & 0xffff0000u);
    acc[2 * k] = First ? lo : acc[2 * k] + lo;
    acc[2 * k + 1] = First ? hi : acc[2 * k + 1] + hi;
  }
}
__device__ __forceinline__ uint4 ld16_cg(const void* p) {
  return __ldcg(reinterpret_cast<const uint4*>(p));
}

// Visit this block's elements pack by pack: f(i0, len) for packs starting at i0 with len
// valid elements (len < V only for the last pack of the message).
template <int V, typename F>
__device__ __forceinline__ void for_block_packs(long n, F f) {
  constexpr int PPC = 256 / V;  // packs per chunk
  const long chunks = (n + 255) / 256;
  const int sub = threadIdx.x / PPC, q = threadIdx.x % PPC;
  for (long base = blockIdx.x; base < chunks; base += (long)V * gridDim.x) {
    const long ch = base + (long)sub * gridDim.x;
    if (ch >= chunks) continue;
    const long i0 = ch * 256 + (long)q * V;
    if (i0 < n) f(i0, (int)min((long)V, n - i0));
  }
}

// acc[e] = sum over ranks, in rank order, of element i0 + e of every rank's wire region, for
// e < len (a full pack: 16-byte loads; a tail: one element at a time, static indices only).
template <typename W, int V>
__device__ __forceinline__ void sum_pack(float (&acc)[V], const PeerPtrs& data, int world,
                                         int slot, int64_t cap, long i0, int len) {
  auto wire = [&](int r) { return reinterpret_cast<const W*>(ar_slot(data, r, slot, cap)); };
  if (len == V) {
    acc_pack<true>(acc, ld16_cg(wire(0) + i0));
    for (int r = 1; r < world; ++r) acc_pack<false>(acc, ld16_cg(wire(r) + i0));
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < len) {
        float a = ar_load(wire(0) + i0 + e);
        for (int r = 1; r < world; ++r) a += ar_load(wire(r) + i0 + e);
        acc[e] = a;
      }
    }
  }
}

template <typename In, typename W, typename Out>
__device__ __forceinline__ bool allreduce_impl(const ArParams& p, const PeerPtrs& data,
                                               const PeerPtrs& flags, uint32_t* ctr,
                                               uint32_t* err, const In* in, Out* out,
                                               const Out* residual) {
  // `in`, `out` and `residual` may alias (in-place; x += sum): no __restrict__ on them. An
  // element is read from `in` and written to `out` by threads of the same block, and the
  // barrier between the two is also a __syncthreads.
  constexpr int V = PackOf<W>::V;
  uint32_t c;
  if (!ar_begin(ctr, err, &c)) return false;  // an earlier all-reduce failed: do nothing
  const int slot = c & 1u;
  const size_t region_bytes = (size_t)p.capacity * sizeof(float);
  W* mine = reinterpret_cast<W*>(ar_slot(data, p.rank, slot, p.capacity));
  const long stride = (long)gridDim.x * blockDim.x;
  const long first = (long)blockIdx.x * blockDim.x + threadIdx.x;
  for (long i = first; i < p.n; i += stride) mine[i] = ar_from<W>(ar_f32(in[i]));
  if (!ar_barrier(p, flags, 0, slot, c, err)) return false;
  auto emit = [&](long i, float v) {
    out[i] = ar_from<Out>(p.has_residual ? ar_f32(residual[i]) + v : v);
  };
  if (!p.two_shot) {
    for_block_packs<V>(p.n, [&](long i0, int len) {
      float acc[V];
      sum_pack<W, V>(acc, data, p.world, slot, p.capacity, i0, len);
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (e < len) emit(i0 + e, acc[e]);
    });
  } else {
    const long chunk = (p.n + p.world - 1) / p.world;
    const long lo = (long)p.rank * chunk, hi = min(lo + chunk, (long)p.n);
    float* sums = reinterpret_cast<float*>(reinterpret_cast<char*>(mine) + region_bytes);
    for_block_packs<V>(p.n, [&](long i0, int len) {
      if (i0 + len <= lo || i0 >= hi) return;  // no element of my share
      float acc[V];
      sum_pack<W, V>(acc, data, p.world, slot, p.capacity, i0, len);
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (e < len && i0 + e >= lo && i0 + e < hi) sums[i0 + e] = acc[e];
    });
    if (!ar_barrier(p, flags, 1, slot, c, err)) return false;
    auto partial = [&](int owner) {
      return reinterpret_cast<const float*>(ar_slot(data, owner, slot, p.capacity) + region_bytes);
    };
    for_block_packs<V>(p.n, [&](long i0, int len) {
      const int owner = (int)(i0 / chunk);
      if (len == V && (i0 + V - 1) / chunk == owner) {
        float v[V];
#pragma unroll
        for (int h = 0; h < V / 4; ++h) {
          const float4 f = __ldcg(reinterpret_cast<const float4*>(partial(owner) + i0) + h);
          v[4 * h] = f.x; v[4 * h + 1] = f.y; v[4 * h + 2] = f.z; v[4 * h + 3] = f.w;
        }
#pragma unroll
        for (int e = 0; e < V; ++e) emit(i0 + e, v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (e < len) emit(i0 + e, __ldcg(partial((int)((i0 + e) / chunk)) + i0 + e));
      }
    });
  }
  if (threadIdx.x == 0) ctr[blockIdx.x] = c;
  return true;
}

// f32 in and out, f32 on the wire (exact sums of the callers' values).
extern "C" __global__ void __launch_bounds__(256, 1)
allreduce_f32(ArgParams p, ArgPeers data, ArgPeers flags, uint32_t* __restrict__ ctr,
              uint32_t* __restrict__ err, const float* in, float* out, const float* residual) {
  allreduce_impl<float, float, float>(p, data, flags, ctr, err, in, out, residual);
}

// f32 in and out, bf16 on the wire: half the bytes, each contribution rounded once.
extern "C" __global__ void __launch_bounds__(256, 1)
allreduce_f32_bf16wire(ArgParams p, ArgPeers data, ArgPeers flags, uint32_t* __restrict__ ctr,
                       uint32_t* __restrict__ err, const float* in, float* out,
                       const float* residual) {
  allreduce_impl<float, __nv_bfloat16, float>(p, data, flags, ctr, err, in, out, residual);
}

// bf16 in and out (an engine's bf16 activations), f32 accumulation in rank order, the
// result (residual + sum when fused) rounded once to bf16.
extern "C" __global__ void __launch_bounds__(256, 1)
allreduce_bf16(ArgParams p, ArgPeers data, ArgPeers flags, uint32_t* __restrict__ ctr,
               uint32_t* __restrict__ err, const __nv_bfloat16* in, __nv_bfloat16* out,
               const __nv_bfloat16* residual) {
  allreduce_impl<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(p, data, flags, ctr, err, in, out,
                                                              residual);
}

// Fused attention output projection + one-shot all-reduce for t decode tokens (t small; the
// GEMV regime): out (t, rows) = sum over ranks of x_r (t, k) @ W_r (rows, k)^T. Element
// i = token * rows + row maps to blocks exactly as allreduce_impl's elements do (chunks of
// 256, chunk c on block c % grid, the same grid for the same n = t * rows), so the kernels
// share round counters, flags and data slots safely. Block b computes its chunks' elements
// (a warp per element, the decode GEMV's warp_row_dot: the same bits as gemv_bf16_f32) into
// its registered buffer (as W: the partial is this rank's contribution), meets its peers'
// block b at one barrier, and sums the same elements over ranks in rank order: one launch,
// no separate partial buffer. (The SPD block's "into the MLP reduce" mode is a plain GEMV:
// no kernel here.)
template <typename W>
__device__ __forceinline__ void oproj_impl(const ArParams& p, int32_t k, int32_t rows,
                                           const __nv_bfloat16* __restrict__ w,
                                           const float* __restrict__ x, const PeerPtrs& data,
                                           const PeerPtrs& flags, uint32_t* ctr, uint32_t* err,
                                           float* __restrict__ out) {
  uint32_t c;
  if (!ar_begin(ctr, err, &c)) return;
  const int slot = c & 1u;
  W* mine = reinterpret_cast<W*>(ar_slot(data, p.rank, slot, p.capacity));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long chunks = (p.n + 255) / 256;
  for (long ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
    for (int j = warp; j < 256; j += 8) {
      const long i = ch * 256 + j;
      if (i >= p.n) break;
      const long tok = i / rows, row = i % rows;
      const float acc = warp_row_dot(w + (size_t)row * k, x + (size_t)tok * k, k, lane);
      if (lane == 0) mine[i] = ar_from<W>(acc);
    }
  }
  if (!ar_barrier(p, flags, 0, slot, c, err)) return;
  for (long ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
    const long i = ch * 256 + threadIdx.x;
    if (i < p.n) {
      float acc = ar_load(reinterpret_cast<const W*>(ar_slot(data, 0, slot, p.capacity)) + i);
      for (int r = 1; r < p.world; ++r)
        acc += ar_load(reinterpret_cast<const W*>(ar_slot(data, r, slot, p.capacity)) + i);
      out[i] = acc;
    }
  }
  if (threadIdx.x == 0) ctr[blockIdx.x] = c;
}

extern "C" __global__ void __launch_bounds__(256, 1)
oproj_allreduce_f32(ArgParams p, int32_t k, int32_t rows, const __nv_bfloat16* __restrict__ w,
                    const float* __restrict__ x, ArgPeers data, ArgPeers flags,
                    uint32_t* __restrict__ ctr, uint32_t* __restrict__ err,
                    float* __restrict__ out) {
  oproj_impl<float>(p, k, rows, w, x, data, flags, ctr, err, out);
}

extern "C" __global__ void __launch_bounds__(256, 1)
oproj_allreduce_f32_bf16wire(ArgParams p, int32_t k, int32_t rows,
                             const __nv_bfloat16* __restrict__ w, const float* __restrict__ x,
                             ArgPeers data, ArgPeers flags, uint32_t* __restrict__ ctr,
                             uint32_t* __restrict__ err, float* __restrict__ out) {
  oproj_impl<__nv_bfloat16>(p, k, rows, w, x, data, flags, ctr, err, out);
}

// ---- all-reduce + residual add + RMSNorm in one launch -------------------------------------
// The standard block's attention output (DESIGN.md section 2): x += sum over ranks of
// delta, then normed = RMSNorm(x) * weight, for `rows` rows of d (rows <= AR_NORM_MAX_ROWS).
// The all-reduce is allreduce_impl's (same element-to-block mapping, counters, slots and
// wire); the epilogue needs every row's sum of squares, which spans blocks, so each block
// reduces its own elements per row (block_sum: a fixed order), writes one partial per row
// into this rank's scratch, meets its sibling blocks at a grid barrier, and sums the
// partials in block order. The same grid on every rank and bit-identical x make `normed`
// bit-identical across ranks too. Blocks are co-resident (the grid cap that the peer
// barrier already needs), so the grid barrier cannot deadlock; its spin is bounded like
// the peer barrier's and records {1, rank, rank, seen, expected} on a timeout.

// Grid barrier of this rank's blocks: an arrival counter the last block resets, and a
// generation it advances (gbar = {count, generation}, zero-initialised, this rank's only).
__device__ bool grid_barrier(const ArParams& p, uint32_t* gbar, uint32_t* __restrict__ err) {
  __syncthreads();  // this block's writes precede its arrival
  int failed = 0;
  if (threadIdx.x == 0) {
    const uint32_t gen = ld_acquire_gpu(gbar + 1);
    __threadfence();
    const uint32_t old = atomicAdd(gbar, 1u);
    if (old == gridDim.x - 1) {
      atomicExch(gbar, 0u);  // ready for the next launch (stream order keeps launches apart)
      __threadfence();
      st_release_gpu(gbar + 1, gen + 1u);
    } else {
      const uint64_t t0 = globaltimer_ns();
      uint32_t v;
      while ((v = ld_acquire_gpu(gbar + 1)) == gen) {
        if (globaltimer_ns() - t0 > (uint64_t)p.budget) {
          if (atomicCAS(err, 0u, 1u) == 0u) {
            err[1] = p.rank;
            err[2] = p.rank;
            err[3] = v;
            err[4] = gen + 1u;
            __threadfence_system();
          }
          failed = 1;
          break;
        }
      }
    }
  }
  // A timeout leaves gbar's count non-zero: safe only because `err` is sticky (every later
  // launch returns at once); whoever ever clears `err` must zero gbar with it.
  return !__syncthreads_or(failed);
}

template <typename W>
__device__ __forceinline__ void ar_add_rmsnorm_impl(const ArParams& p, int32_t rows, int32_t d,
                                                    float eps, const PeerPtrs& data,
                                                    const PeerPtrs& flags, uint32_t* ctr,
                                                    uint32_t* err, const float* delta, float* x,
                                                    const float* __restrict__ weight,
                                                    float* __restrict__ normed,
                                                    float* __restrict__ scratch,
                                                    uint32_t* gbar) {
  if (!allreduce_impl<float, W, float>(p, data, flags, ctr, err, delta, x, x)) return;
  // x = residual + sum on every element of this block, written by its threads pack by pack:
  // visible to the whole block after a __syncthreads
  __syncthreads();
  const long stride = (long)gridDim.x * blockDim.x;
  const long first = (long)blockIdx.x * blockDim.x + threadIdx.x;
  for (int j = 0; j < rows; ++j) {
    const long lo = (long)j * d, hi = lo + d;
    float ss = 0.f;
    long i = first;
    if (i < lo) i += (lo - i + stride - 1) / stride * stride;  // this thread's first in row j
    for (; i < hi; i += stride) ss += x[i] * x[i];
    ss = block_sum(ss);
    if (threadIdx.x == 0) scratch[j * AR_MAX_BLOCKS + blockIdx.x] = ss;
  }
  if (!grid_barrier(p, gbar, err)) return;
  __shared__ float inv[AR_NORM_MAX_ROWS];
  if (threadIdx.x < rows) {
    float s = 0.f;
    for (int b = 0; b < (int)gridDim.x; ++b) s += __ldcg(scratch + threadIdx.x * AR_MAX_BLOCKS + b);
    inv[threadIdx.x] = rsqrtf(s / (float)d + eps);
  }
  __syncthreads();
  for (long i = first; i < p.n; i += stride) normed[i] = x[i] * inv[i / d] * weight[i % d];
}

extern "C" __global__ void __launch_bounds__(256, 1)
allreduce_add_rmsnorm_f32(ArgParams p, int32_t rows, int32_t d, float eps, ArgPeers data,
                          ArgPeers flags, uint32_t* __restrict__ ctr, uint32_t* __restrict__ err,
                          const float* delta, float* x, const float* __restrict__ weight,
                          float* __restrict__ normed, float* __restrict__ scratch,
                          uint32_t* gbar) {
  ar_add_rmsnorm_impl<float>(p, rows, d, eps, data, flags, ctr, err, delta, x, weight, normed,
                             scratch, gbar);
}

extern "C" __global__ void __launch_bounds__(256, 1)
allreduce_add_rmsnorm_f32_bf16wire(ArgParams p, int32_t rows, int32_t d, float eps,
                                   ArgPeers data, ArgPeers flags, uint32_t* __restrict__ ctr,
                                   uint32_t* __restrict__ err, const float* delta, float* x,
                                   const float* __restrict__ weight,
                                   float* __restrict__ normed, float* __restrict__ scratch,
                                   uint32_t* gbar) {
  ar_add_rmsnorm_impl<__nv_bfloat16>(p, rows, d, eps, data, flags, ctr, err, delta, x, weight,
                                     normed, scratch, gbar);
}
