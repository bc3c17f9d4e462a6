#!/usr/bin/env bash
# Run the GPU test suites on a machine without a GPU, against the simulated CUDA driver
# (csrc/host_sim/fake_cuda.cpp): cudarc loads it as libcuda/libcublas, every kernel runs in
# the host simulator, and the CUDA backend's own host code (contexts, streams, events,
# launches, graph capture, peer pointers between virtual ranks, cuBLAS) runs end to end.
# Timings mean nothing here; correctness does.
#
#   scripts/sim-gpu.sh                      # the default suites (below)
#   scripts/sim-gpu.sh cuda_backend -- smollm2   # one suite, extra test-binary arguments
#   scripts/sim-gpu.sh --lib                # build, print the simulated driver's folder: a
#       rehearsal of gpu-check.sh's stages (the very executables --build packs) without a GPU:
#       LD_LIBRARY_PATH=$(scripts/sim-gpu.sh --lib) OUT=/tmp/r STAGE_BUDGET=1500 \
#         CMD_BUDGET=900 scripts/gpu-check.sh --stage1   (then --stage2; the sanitizers, NCCL
#       and PyTorch are missing here, and the benches' timings mean nothing)
#
# Environment: CARGO_TARGET_DIR as usual; SYNCDROP_SIM_SMS (default 16) is the simulated
# device's SM count, SYNCDROP_SIM_DEVICES (default 1) its device count; SYNCDROP_SIM_PROFILE=1
# prints each suite's host seconds per kernel (and cuBLAS) at exit. SYNCDROP_SIM_MEMPOOLS=0 plays
# a GPU without memory pools (cudarc then frees with cuMemFree, which waits for the whole
# device); SYNCDROP_SIM_SYNC_WARN_S (default 5) is how long such a wait runs before stderr
# says so. SYNCDROP_SIM_JITTER_US=N makes each stream sleep a random 0..N us before each op:
# streams run asynchronously here, so a missing event wait shows up as a wrong result.
set -euo pipefail
cd "$(dirname "$0")/.."

print_lib=0
[ "${1:-}" = "--lib" ] && { print_lib=1; shift; }
suites=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  suites+=("$1")
  shift
done
[ "${1:-}" = "--" ] && shift
[ ${#suites[@]} -eq 0 ] && suites=(cuda_kernels cuda_allreduce cuda_backend)

args=()
for s in "${suites[@]}"; do args+=(--test "$s"); done
json=$(cargo test --release --features cuda,host-sim "${args[@]}" --no-run --message-format=json)
# the simulated driver is built by build.rs into this build's OUT_DIR
out_dir=$(printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "build-script-executed" and m["package_id"].find("syncdrop") >= 0:
        print(m["out_dir"])
' | tail -1)
lib="$out_dir/fake-cuda"
[ -e "$lib/libcuda.so" ] || { echo "sim-gpu: no simulated driver in $lib" >&2; exit 1; }
[ $print_lib = 1 ] && { echo "$lib"; exit 0; }
bins=$(printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
')
rc=0
for s in "${suites[@]}"; do
  bin=$(printf '%s\n' "$bins" | awk -v s="$s" '$1 == s {print $2}')
  echo "== $s (simulated GPU)"
  # SYNCDROP_REQUIRE_GPU: a test that cannot find the (simulated) GPU fails instead of skipping
  LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" SYNCDROP_REQUIRE_GPU=1 \
    "$bin" --test-threads 1 "$@" || rc=1
done
exit $rc
