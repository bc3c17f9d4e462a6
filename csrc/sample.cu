// Sampling on device (see SampleParams): one block of SAMPLE_THREADS per row.
//   1. max logit, 2. e_i = exp((x_i - max) / T) and Z = sum e_i,
//   3. nucleus threshold tau: the largest tau with sum_{e_i >= tau} e_i >= top_p * Z, by
//      bisection on tau in [0, 1] (e_max = 1) -- no sort needed,
//   4. inverse CDF over the kept tokens in token order: each thread owns a contiguous range,
//      thread 0 scans the range sums, the owner of the target walks its range.
// The kept set is exactly the CPU sampler's nucleus up to ties at tau; the draw differs from
// the CPU's for the same seed (different order of the CDF), the distribution does not.
#include "common.cuh"

constexpr int SAMPLE_THREADS = 1024;

__device__ float block_max(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : -INFINITY;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  if (threadIdx.x == 0) part[0] = v;
  __syncthreads();
  v = part[0];
  __syncthreads();
  return v;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_f32(SampleParams p, const float* __restrict__ logits, const float* __restrict__ u,
           uint32_t* __restrict__ out) {
  const int r = blockIdx.x;
  if (r >= p.rows) return;
  const float* x = logits + (size_t)r * p.n;
  // capped at FLT_MAX: 1 / T of a subnormal T is +inf, and 0 * inf would make the largest
  // logit's weight NaN (no token kept) where the limit is greedy
  const float inv_t = fminf(1.f / p.temperature, 3.40282347e38f);
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < p.n; i += blockDim.x) mx = fmaxf(mx, x[i]);
  mx = block_max(mx);
  if (!isfinite(mx)) {
    // a +inf logit, or none above -inf: the CPU sampler's answer, the argmax (the first token
    // equal to the max; 0 when every logit is NaN). exp((x - mx) / T) would weigh a +inf
    // logit exp(NaN), so no token would be kept. `mx` is the block's, so all threads return.
    float first = -INFINITY;  // minus the first matching index this thread saw
    for (int i = threadIdx.x; i < p.n; i += blockDim.x) {
      if (x[i] == mx) {
        first = -(float)i;  // exact: vocabularies are far below 2^24
        break;
      }
    }
    first = block_max(first);
    if (threadIdx.x == 0) out[r] = isfinite(first) ? (uint32_t)(-first) : 0u;
    return;
  }
  float z = 0.f;
  for (int i = threadIdx.x; i < p.n; i += blockDim.x) {
    const float e = __expf((x[i] - mx) * inv_t);
    if (e >= 0.f) z += e;  // a NaN logit weighs 0: a NaN z would keep every token (tau = 0)
  }
  z = block_sum(z);
  float tau = 0.f;
  if (p.top_p < 1.f) {
    float lo = 0.f, hi = 1.f;
    for (int it = 0; it < 40; ++it) {
      const float mid = 0.5f * (lo + hi);
      float mass = 0.f;
      for (int i = threadIdx.x; i < p.n; i += blockDim.x) {
        const float e = __expf((x[i] - mx) * inv_t);
        if (e >= mid) mass += e;
      }
      mass = block_sum(mass);
      if (mass >= p.top_p * z) lo = mid; else hi = mid;
    }
    tau = lo;
  }
  // contiguous range per thread
  const int per = (p.n + blockDim.x - 1) / blockDim.x;
  const int b = min(p.n, (int)threadIdx.x * per), e = min(p.n, b + per);
  float mine = 0.f;
  for (int i = b; i < e; ++i) {
    const float v = __expf((x[i] - mx) * inv_t);
    if (v >= tau) mine += v;
  }
  __shared__ float sums[SAMPLE_THREADS];
  __shared__ int owner;
  __shared__ float before;
  sums[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int i = 0; i < blockDim.x; ++i) total += sums[i];
    const float target = u[r] * total;
    float run = 0.f;
    int o = -1;
    for (int i = 0; i < blockDim.x; ++i) {
      if (sums[i] > 0.f) {
        o = i;  // last non-empty range: guards against rounding past the end
        if (run + sums[i] > target) break;
      }
      run += sums[i];
    }
    // `run` is the mass before range o when the loop broke there; recompute it to be exact
    float pre = 0.f;
    for (int i = 0; i < o; ++i) pre += sums[i];
    owner = o;
    before = pre;
    if (o < 0) out[r] = 0u;  // no weight above 0 left: a defined answer, not garbage
  }
  __syncthreads();
  if ((int)threadIdx.x == owner) {
    float total = 0.f;
    for (int i = 0; i < blockDim.x; ++i) total += sums[i];
    const float target = u[r] * total;
    float run = before;
    int pick = -1;
    for (int i = b; i < e; ++i) {
      const float v = __expf((x[i] - mx) * inv_t);
      if (v >= tau && v > 0.f) {
        pick = i;
        run += v;
        if (run > target) break;
      }
    }
    out[r] = (uint32_t)pick;
  }
}
