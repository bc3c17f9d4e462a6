// Kernel parameter structs shared with Rust (src/backend/cuda/kernels.rs mirrors them with
// #[repr(C)] and asserts size and field offsets at compile time).
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
