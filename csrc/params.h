// Kernel parameter structs shared with Rust (each kernel family's module in src/backend/cuda/
// mirrors its structs with #[repr(C)] and asserts size and field offsets at compile time).
#pragma once
#include <stdint.h>

// Fused residual add + RMSNorm over `rows` rows of `d` elements:
//   residual[r] += delta[r];  out[r] = residual[r] * rsqrt(mean(residual[r]^2) + eps) * weight
typedef struct {
  int32_t rows;
  int32_t d;
  float eps;
  int32_t has_delta;  // 0: plain RMSNorm of `residual` (delta ignored, residual untouched)
} RmsNormParams;

// Decode GEMV: y (t, n) = x (t, k) @ W (n, k)^T with bf16 W and x, f32 accumulation, bf16 y.
// One warp per output row; lanes read 16-byte packets of W (k % 8 == 0 takes the vector
// path, any k works).
typedef struct {
  int32_t t;
  int32_t n;
  int32_t k;
  int32_t pad;
} GemvParams;

// RoPE in place on the first `heads` head vectors of each of `t` rows (row stride `stride`
// elements), positions pos0..pos0+t. style 0: interleaved pairs (2i, 2i+1); 1: halves.
typedef struct {
  int32_t t;
  int32_t heads;
  int32_t head_dim;
  int32_t stride;
  int32_t pos0;
  int32_t style;
  float theta;
  int32_t pad;
} RopeParams;

// SwiGLU: h (t, f) = silu(gu[:, :f]) * gu[:, f:2f] for gu (t, 2f).
typedef struct {
  int32_t t;
  int32_t f;
} SwigluParams;

// Row-wise argmax of f32 logits (rows, n); ties go to the lowest index.
typedef struct {
  int32_t rows;
  int32_t n;
} ArgmaxParams;

// Elementwise ops over n elements (add, f32 -> bf16 conversion).
typedef struct {
  int64_t n;
} ElemParams;

// Embedding lookup: out (t, d) f32 = table[ids[i]] (bf16 rows of d); ids >= vocab are an
// error the host checks before the launch.
typedef struct {
  int32_t t;
  int32_t d;
} EmbedParams;

// Fused QKV epilogue: for qkv (t, (n_q + 2 n_kv) * head_dim) f32 rows, add the bias (if
// has_bias), rotate the Q and K heads (RoPE, style as RopeParams), write Q to q_out (t, n_q *
// head_dim) f32 and K, V to the bf16 caches (n_kv, capacity, head_dim) at positions
// pos0..pos0+t. pos0 comes from *pos_ptr when the pointer is not null (CUDA-graph replay).
typedef struct {
  int32_t t;
  int32_t n_q;
  int32_t n_kv;
  int32_t head_dim;
  int32_t capacity;
  int32_t pos0;
  int32_t style;
  int32_t has_bias;
  float theta;
  int32_t pad[3];
} QkvRopeParams;

// Causal attention of t query rows at positions pos0.. (row i sees cache positions
// 0..=pos0+i: a query offset and a KV length, so a second chunk attends to a prefix) over
// bf16 K/V caches (n_kv, capacity, head_dim); q_to_kv[h] maps local query head -> KV head.
// Keys are cut into `splits` chunks of `chunk` positions (grid z); with splits > 1 each
// chunk writes (unnormalised acc[head_dim], max, sum) to a partial buffer and a combine
// kernel merges them (split-K "flash decoding"). head_dim <= 256.
typedef struct {
  int32_t t;
  int32_t n_q;
  int32_t head_dim;
  int32_t capacity;
  int32_t pos0;
  int32_t splits;
  int32_t chunk;
  float scale;
} AttnParams;

// Sampling from f32 logits (rows, n): softmax at `temperature`, nucleus of mass `top_p`
// (the smallest set of most probable tokens whose mass reaches top_p), then inverse CDF in
// token order with one uniform u[row] in [0, 1) per row.
typedef struct {
  int32_t rows;
  int32_t n;
  float temperature;
  float top_p;
} SampleParams;

// P2P all-reduce (csrc/allreduce.cu). Up to AR_MAX_WORLD ranks; peer pointers by value.
#define AR_MAX_WORLD 8
#define AR_MAX_BLOCKS 256
// Rows the fused all-reduce + residual add + RMSNorm takes (decode-sized messages).
#define AR_NORM_MAX_ROWS 16
typedef struct {
  uint64_t p[AR_MAX_WORLD];
} PeerPtrs;

// Per-rank registered memory (allocated by the host, peers get its address):
//   data  f32 [2 slots][2 regions][capacity]   region 0: the wire values (f32, or bf16 in its
//                                              first half), region 1: two-shot f32 partials
//   flags u32 [2 phases][2 slots][AR_MAX_BLOCKS][AR_MAX_WORLD]   written by peers only
//   ctr   u32 [AR_MAX_BLOCKS]                  this rank's round counter per block
//   err   u32 [5]                              {set, rank, peer, seen, expected} on timeout
typedef struct {
  int32_t rank;
  int32_t world;
  int64_t n;
  int64_t capacity;  // width of each data region in f32 (a multiple of 8: 16-byte aligned)
  int64_t budget;  // spin budget in nanoseconds of %globaltimer
  int32_t two_shot;
  int32_t has_residual;  // 1: out = residual + sum (fused residual add; residual may be out)
} ArParams;

// Block-to-block distillation on the GPU (csrc/distill.cu): RMSNorm forward and backward of
// `rows` rows of d.
typedef struct {
  int32_t rows;
  int32_t d;
  float eps;
} DistillNormParams;

// MSE over n elements: dout = scale * (out - target), scale = 2 / n; each block of the fixed
// grid writes its sum of squared errors (f64) to partial[blockIdx.x].
#define DISTILL_MSE_BLOCKS 128
typedef struct {
  int64_t n;
  float scale;
  int32_t pad;
} MseParams;

// One Adam step over n parameters; c1, c2 = the bias corrections 1 - b1^step, 1 - b2^step.
typedef struct {
  int64_t n;
  float lr;
  float b1;
  float b2;
  float eps;
  float c1;
  float c2;
} AdamParams;
