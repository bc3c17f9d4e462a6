// Rotary position embedding in place, both layouts (see RopeParams). One thread per
// (row, head, pair). Angles in f32 from exp2 of the log2-scaled frequency.
#include "common.cuh"

extern "C" __global__ void rope_bf16(RopeParams p, __nv_bfloat16* __restrict__ x) {
  const int half = p.head_dim / 2;
  const long total = (long)p.t * p.heads * half;
  const long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= total) return;
  const int i = id % half;
  const int h = (id / half) % p.heads;
  const int r = id / ((long)half * p.heads);
  const float freq = exp2f(-2.0f * (float)i / (float)p.head_dim * log2f(p.theta));
  float s, c;
  sincosf((float)(p.pos0 + r) * freq, &s, &c);
  __nv_bfloat16* v = x + (size_t)r * p.stride + (size_t)h * p.head_dim;
  const int a = p.style == 0 ? 2 * i : i;
  const int b = p.style == 0 ? 2 * i + 1 : i + half;
  const float va = to_f32(v[a]), vb = to_f32(v[b]);
  v[a] = to_bf16(va * c - vb * s);
  v[b] = to_bf16(va * s + vb * c);
}

// Fused QKV epilogue (see QkvRopeParams): bias, RoPE on Q and K, Q out, K/V into the bf16
// cache. One thread per (row, head, pair) over the n_q + 2 n_kv heads of a row. Angles in
// double precision from theta^(-2i/d), as the CPU reference's tables.
extern "C" __global__ void qkv_rope_cache(QkvRopeParams p, const int32_t* __restrict__ pos_ptr,
                                          const float* __restrict__ qkv,
                                          const float* __restrict__ bias,
                                          float* __restrict__ q_out,
                                          __nv_bfloat16* __restrict__ kc,
                                          __nv_bfloat16* __restrict__ vc) {
  const int half = p.head_dim / 2;
  const int heads = p.n_q + 2 * p.n_kv;
  const long total = (long)p.t * heads * half;
  const long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= total) return;
  const int i = id % half;
  const int h = (id / half) % heads;
  const int r = id / ((long)half * heads);
  const int pos = (pos_ptr ? *pos_ptr : p.pos0) + r;
  const int a = p.style == 0 ? 2 * i : i;
  const int b = p.style == 0 ? 2 * i + 1 : i + half;
  const float* row = qkv + (size_t)r * heads * p.head_dim + (size_t)h * p.head_dim;
  float va = row[a], vb = row[b];
  if (p.has_bias) {
    va += bias[h * p.head_dim + a];
    vb += bias[h * p.head_dim + b];
  }
  if (h < p.n_q + p.n_kv) {
    const double freq = pow((double)p.theta, -2.0 * (double)i / (double)p.head_dim);
    double s, c;
    sincos((double)pos * freq, &s, &c);
    const float fs = (float)s, fc = (float)c;
    const float ra = va * fc - vb * fs, rb = va * fs + vb * fc;
    va = ra;
    vb = rb;
  }
  if (h < p.n_q) {
    float* q = q_out + (size_t)r * p.n_q * p.head_dim + (size_t)h * p.head_dim;
    q[a] = va;
    q[b] = vb;
  } else {
    const bool is_k = h < p.n_q + p.n_kv;
    const int kh = is_k ? h - p.n_q : h - p.n_q - p.n_kv;
    __nv_bfloat16* dst =
        (is_k ? kc : vc) + ((size_t)kh * p.capacity + pos) * p.head_dim;
    dst[a] = to_bf16(va);
    dst[b] = to_bf16(vb);
  }
}
