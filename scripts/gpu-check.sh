#!/usr/bin/env bash
# Run every GPU test and benchmark in ONE call on a machine with an NVIDIA GPU, writing logs
# under $OUT (or ./gpu-logs). The test executables are built elsewhere (no Rust there):
#
#   here:   scripts/gpu-check.sh --build      # builds with --features cuda into .gpu/
#   there:  scripts/gpu-check.sh              # runs .gpu/* and compute-sanitizer
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--build" ]; then
  export NVCC="${NVCC:-$(scripts/setup-nvcc.sh | tail -1)}"
  export SYNCDROP_REQUIRE_NVCC=1
  rm -rf .gpu && mkdir -p .gpu
  cargo test --release --features cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cuda_kernels",):
        print(m["executable"])' | while read -r exe; do cp "$exe" .gpu/; done
  ls -la .gpu
  exit 0
fi
OUT="${OUT:-gpu-logs}"
mkdir -p "$OUT"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  ldconfig -p | grep -E 'libcuda|nvrtc|cublas|nccl' | head -20
} >"$OUT/machine.txt" 2>&1
status=0
for t in .gpu/cuda_kernels-*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  "$t" --test-threads=1 >"$OUT/$name.log" 2>&1 || status=1
  compute-sanitizer --tool memcheck "$t" --test-threads=1 >"$OUT/$name.memcheck.log" 2>&1 || status=1
  compute-sanitizer --tool racecheck "$t" --test-threads=1 >"$OUT/$name.racecheck.log" 2>&1 || status=1
  tail -3 "$OUT/$name.log"
done
exit $status
