// Causal attention over the bf16 KV cache, prefill and decode alike (see AttnParams).
//
// Grid (n_q, t, splits), 4 warps per block. A block owns one (query row, head, key chunk);
// its warps take every 4th key of the chunk and keep an online softmax (running max m, sum
// l, unnormalised output acc) in registers, lanes splitting the head dimension
// (d = lane + 32 e). The warps merge through shared memory; with one split the block writes
// the normalised output, otherwise (acc, m, l) go to `part` and attention_combine merges the
// chunks. Decode has t * n_q blocks of work only, so it splits the keys ("flash decoding");
// long prefills have enough rows and run unsplit. Sum orders are fixed per launch shape.
#include "common.cuh"

constexpr int ATT_WARPS = 4;
constexpr int ATT_MAXE = 8;  // head_dim <= 32 * ATT_MAXE

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_f32(AttnParams p, const int32_t* __restrict__ pos_ptr, const float* __restrict__ q,
              const __nv_bfloat16* __restrict__ kc, const __nv_bfloat16* __restrict__ vc,
              const int32_t* __restrict__ q_to_kv, float* __restrict__ out,
              float* __restrict__ part) {
  const int h = blockIdx.x, ti = blockIdx.y, s = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hd = p.head_dim;
  const int qn = p.n_q * hd;
  const int pos0 = pos_ptr ? *pos_ptr : p.pos0;
  const int len = pos0 + ti + 1;
  const int begin = s * p.chunk;
  const int end = min(begin + p.chunk, len);
  const size_t kv_base = (size_t)q_to_kv[h] * p.capacity * hd;
  const __nv_bfloat16* K = kc + kv_base;
  const __nv_bfloat16* V = vc + kv_base;

  float qv[ATT_MAXE], acc[ATT_MAXE];
#pragma unroll
  for (int e = 0; e < ATT_MAXE; ++e) {
    const int d = lane + 32 * e;
    qv[e] = d < hd ? q[(size_t)ti * qn + (size_t)h * hd + d] * p.scale : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = begin + warp; j < end; j += ATT_WARPS) {
    const __nv_bfloat16* kr = K + (size_t)j * hd;
    const __nv_bfloat16* vr = V + (size_t)j * hd;
    float sc = 0.f, vv[ATT_MAXE];
#pragma unroll
    for (int e = 0; e < ATT_MAXE; ++e) {
      const int d = lane + 32 * e;
      if (d < hd) {
        sc = fmaf(qv[e], to_f32(kr[d]), sc);
        vv[e] = to_f32(vr[d]);
      } else {
        vv[e] = 0.f;
      }
    }
    sc = warp_sum(sc);
    const float mn = fmaxf(m, sc);
    const float c = __expf(m - mn);  // m = -inf on the first key: c = 0
    const float pe = __expf(sc - mn);
    l = fmaf(l, c, pe);
#pragma unroll
    for (int e = 0; e < ATT_MAXE; ++e) acc[e] = fmaf(acc[e], c, pe * vv[e]);
    m = mn;
  }

  __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
  __shared__ float sacc[ATT_WARPS][32 * ATT_MAXE];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < ATT_MAXE; ++e) sacc[warp][lane + 32 * e] = acc[e];
  __syncthreads();
  if (warp != 0) return;
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < ATT_WARPS; ++w) M = fmaxf(M, sm[w]);
  float f[ATT_WARPS], L = 0.f;
#pragma unroll
  for (int w = 0; w < ATT_WARPS; ++w) {
    f[w] = sm[w] == -INFINITY ? 0.f : __expf(sm[w] - M);
    L = fmaf(sl[w], f[w], L);
  }
  const size_t row = (size_t)ti * p.n_q + h;
  float* dst = p.splits == 1 ? out + (size_t)ti * qn + (size_t)h * hd
                             : part + (row * p.splits + s) * (size_t)(hd + 2);
  for (int d = lane; d < hd; d += 32) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) o = fmaf(sacc[w][d], f[w], o);
    dst[d] = p.splits == 1 ? (L > 0.f ? o / L : 0.f) : o;
  }
  if (p.splits > 1 && lane == 0) {
    dst[hd] = M;
    dst[hd + 1] = L;
  }
}

// Merge the key chunks of attention_f32: grid (n_q, t), one thread per output dimension.
extern "C" __global__ void attention_combine_f32(AttnParams p, const float* __restrict__ part,
                                                 float* __restrict__ out) {
  const int h = blockIdx.x, ti = blockIdx.y, d = threadIdx.x;
  const int hd = p.head_dim;
  if (d >= hd) return;
  const float* base = part + ((size_t)ti * p.n_q + h) * p.splits * (size_t)(hd + 2);
  float M = -INFINITY;
  for (int s = 0; s < p.splits; ++s) M = fmaxf(M, base[(size_t)s * (hd + 2) + hd]);
  float L = 0.f, o = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const float* c = base + (size_t)s * (hd + 2);
    if (c[hd] == -INFINITY) continue;
    const float f = __expf(c[hd] - M);
    L = fmaf(c[hd + 1], f, L);
    o = fmaf(c[d], f, o);
  }
  out[(size_t)ti * p.n_q * hd + (size_t)h * hd + d] = L > 0.f ? o / L : 0.f;
}
