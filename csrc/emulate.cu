// Link emulation for one-GPU measurements (ISO with virtual or single ranks): a kernel that
// holds `ns` nanoseconds on `gridDim.x` CTAs, standing in for the time a modelled
// inter-GPU all-reduce takes while occupying the SMs a real P2P kernel would (DESIGN.md
// section 4: overlap systems give communication 2-8 CTAs). One warp per CTA spins with
// __nanosleep: the hold takes CTA slots but almost no issue slots or memory bandwidth, which
// a real P2P kernel would use, so overlap measured with it is an upper bound. Numbers
// measured with it are labelled emulated.
#include "common.cuh"

// Wall time (%globaltimer, ns), not SM cycles: clocks drop under load, and a cycle count
// would hold longer exactly when ISO overlaps it with GEMMs. A hold is at most one second
// (no modelled all-reduce comes near it; the host clamps too): a negative or absurd `ns`
// must not spin forever.
extern "C" __global__ void hold_link(int64_t ns) {
  if (threadIdx.x != 0 || ns <= 0) return;
  const uint64_t hold = (uint64_t)(ns < 1000000000 ? ns : 1000000000);
  const uint64_t t0 = globaltimer_ns();
  while (globaltimer_ns() - t0 < hold) __nanosleep(200);
}
