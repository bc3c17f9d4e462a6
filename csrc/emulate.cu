// Link emulation for one-GPU measurements (ISO with virtual or single ranks): a kernel that
// holds `cycles` of clock64() on `gridDim.x` CTAs, standing in for the time a modelled
// inter-GPU all-reduce takes while occupying the SMs a real P2P kernel would (DESIGN.md
// section 4: overlap systems give communication 2-8 CTAs). One warp per CTA spins with
// __nanosleep so the hold costs SM slots, not issue bandwidth; numbers measured with it are
// labelled emulated.
#include "common.cuh"

extern "C" __global__ void hold_link(int64_t cycles) {
  if (threadIdx.x != 0) return;
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) __nanosleep(200);
}
