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
