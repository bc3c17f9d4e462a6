#!/usr/bin/env bash
# Every GPU test and benchmark, on a machine with an NVIDIA GPU, with logs under $OUT (or
# ./gpu-logs). The executables are built elsewhere (the GPU machine has no Rust), and the
# SmolLM2 model (98 MB) is larger than one transfer to the device machine may carry
# (64 MiB), so a session runs two calls back to back (the machine stays warm ~30 s):
#
#   here:   scripts/gpu-check.sh --build    # .gpu/  = executables + model part 1
#                                           # .gpu2/ = executables + model part 2
#   call 1: scripts/gpu-check.sh --stage1   # carry .gpu:  kernel + P2P tests, sanitizers;
#                                           #   keeps model part 1 and the executables in /tmp
#   call 2: scripts/gpu-check.sh --stage2   # carry .gpu2: joins the model (sha256 checked),
#                                           #   runs the end-to-end tests on SmolLM2
#   call 3: scripts/gpu-check.sh --bench    # carry .gpu: the benches + PyTorch baseline
#                                           #   (without it, the executables stage 1 left)
#
# Each call stays well inside the device tool's 10-minute limit, and returns at most two
# files (the device tool brings back at most 8): $OUT/<stage>-summary.txt and
# $OUT/<stage>-logs.tar.gz (every log and JSON). With no argument all stages run in a row
# (a machine where everything fits in one call). Each of the three calls ends by itself within
# STAGE_BUDGET seconds (default 470; each command at most CMD_BUDGET, default 300): a command
# that hangs is reported TIMED OUT and the rest still run; ONLY="name ..." re-runs just those
# commands of a stage (the names after "==" in its summary). 470 s because a developer
# session has 30 device minutes in all, machine start and transfers included: three calls of
# 470 s leave ~6 minutes for those. Issue call 2 right after call 1 returns, before reading
# its results: a machine idle ~30 s goes back, with model part 1 and the executables, and
# stage 2 then needs stage 1 again (a new machine start).
#
# Rehearsal without a GPU: with the simulated driver first on LD_LIBRARY_PATH (see
# scripts/sim-gpu.sh --lib) the stages run these same executables on CPU threads; stages 1
# and 2 pass that way (about 2 and 8 minutes: raise the budgets) apart from the sanitizers and
# the example's 16M-element two-shot run, whose CPU-thread peers can outlast its 1 s spin budget.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
STAGE=/tmp/syncdrop-gpu-stage
TESTS="cuda_kernels cuda_allreduce cuda_backend synthetic"
BENCHES="cuda_rank cuda_allreduce cuda_iso"
# Everything carried travels xz-compressed: 28% smaller executables and a 2.5% smaller model
# than gzip, which leaves the working tree (sent with every call, and growing with every
# committed result) room. The device machine may lack the xz tool: Python's lzma reads the
# same format.
xz_c() { if command -v xz >/dev/null; then xz -9 -c; else python3 -c 'import lzma,shutil,sys
with lzma.open(sys.stdout.buffer, "w", preset=9) as f: shutil.copyfileobj(sys.stdin.buffer, f)'; fi; }
xz_d() { if command -v xz >/dev/null; then xz -dc; else python3 -c 'import lzma,shutil,sys
shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'; fi; }

if [ "${1:-}" = "--build" ]; then
  export NVCC="${NVCC:-$(scripts/setup-nvcc.sh | tail -1)}"
  export SYNCDROP_REQUIRE_NVCC=1
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  grep -qx '/.gpu2/' .git/info/exclude 2>/dev/null || echo '/.gpu2/' >>.git/info/exclude
  rm -rf .gpu .gpu2 && mkdir -p .gpu/bin .gpu2/bin
  # tests keep their names, benches are bench_<name> (cuda_allreduce is both a test and a bench)
  cargo test --release --features cuda --all-targets --no-run --message-format=json \
    | TESTS="$TESTS" BENCHES="$BENCHES" python3 -c 'import json,os,sys
tests=os.environ["TESTS"].split(); benches=os.environ["BENCHES"].split()
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")!="compiler-artifact" or not m.get("executable"):
        continue
    name, kind = m["target"]["name"], m["target"]["kind"]
    if "test" in kind and name in tests: print(name, m["executable"])
    if "bench" in kind and name in benches: print("bench_" + name, m["executable"])' \
    | while read -r name exe; do
      cp "$exe" ".gpu/bin/$name" && strip ".gpu/bin/$name"
    done
  # the all-reduce used on its own (examples/p2p_allreduce.rs): a plain binary, not the test
  # harness `cargo test --all-targets` builds examples as
  cargo build --release --features cuda --example p2p_allreduce --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["example"]:
        print(m["executable"])' \
    | while read -r exe; do cp "$exe" .gpu/bin/example_p2p_allreduce && strip .gpu/bin/example_p2p_allreduce; done
  for name in $TESTS $(printf 'bench_%s ' $BENCHES) example_p2p_allreduce; do
    [ -x ".gpu/bin/$name" ] || { echo "gpu-check: the build made no $name" >&2; exit 1; }
  done
  for f in .gpu/bin/*; do # ~4x smaller: the executables and half the model share one transfer
    xz_c <"$f" >"$f.xz" && rm "$f"
  done
  cp scripts/torch_rank_decode.py .gpu/bin/
  rmdir .gpu2/bin
  model="$(scripts/fetch-assets.sh >/dev/null && echo "${SYNCDROP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/syncdrop}")/models/$MODEL"
  # .gpu (executables + part 1) and .gpu2 (part 2 only; stage 2 runs the executables stage 1
  # left in /tmp) must each fit one transfer with the working tree: 64 MiB in all. The model
  # travels xz-compressed (8% smaller: the working tree, sent twice, outgrew the plain split)
  # and stage 2 decompresses the joined parts and checks the sha256.
  tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  limit=$((64 * 1024 * 1024 - tree - (1 << 20)))
  bins=$(du -sb .gpu | cut -f1)
  packed=$(mktemp /tmp/syncdrop-model-XXXXXX.xz)
  xz_c <"$model" >"$packed" # about 100 s
  size=$(stat -c %s "$packed")
  part1=$(( (size - bins) / 2 )) # balance the two transfers
  [ "$part1" -gt $(( limit - bins )) ] && part1=$(( limit - bins ))
  head -c "$part1" "$packed" >.gpu/model.part1
  tail -c +"$((part1 + 1))" "$packed" >.gpu2/model.part2
  rm -f "$packed"
  for d in .gpu .gpu2; do
    total=$(( $(du -sb "$d" | cut -f1) + tree ))
    echo "$d + working tree: $total bytes (limit $((64 * 1024 * 1024)), $((64 * 1024 * 1024 - total)) to spare)"
    [ "$total" -le $((64 * 1024 * 1024)) ] || { echo "gpu-check: $d does not fit one transfer" >&2; exit 1; }
  done
  exit 0
fi

# On the GPU machine a GPU test must run or fail, never pass by saying "skipped: no GPU"
# (as it would if the driver failed to initialise): see backend::gpu_or_skip.
export SYNCDROP_REQUIRE_GPU=${SYNCDROP_REQUIRE_GPU:-1}
# Lazy module loading (the CUDA 12.2+ default) can make a rank's first launch of a kernel
# wait for a context-wide sync while its peers spin in an all-reduce: load everything eagerly.
export CUDA_MODULE_LOADING=EAGER
# cudarc opens libnccl by the names libnccl.so / libnccl.so.<CUDA major> (not the runtime's
# soname libnccl.so.2, which is all PyTorch's wheel and the libnccl2 package install): link
# what is there under a name it tries, so the NCCL tests run instead of skipping.
nccl_lib() {
  local so d=/tmp/syncdrop-nccl-lib
  local cache; cache=$(ldconfig -p 2>/dev/null)
  grep 'libnccl\.so ' >/dev/null <<<"$cache" && return 0
  so=$( (awk <<<"$cache"  '/libnccl\.so\.2 /{print $NF}';
         python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null) | head -1)
  [ -n "$so" ] && [ -f "$so" ] || { echo "gpu-check: no libnccl.so.2 found; the NCCL tests will skip"; return 0; }
  mkdir -p "$d" && ln -sf "$so" "$d/libnccl.so"
  export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-check: NCCL from $so"
}
nccl_lib
# cudarc opens cuBLAS by bare name (libcublas.so.13, .12, ...) and searches no folder: with
# no toolkit registered in ldconfig, PyTorch's CUDA wheels hold it (nvidia/cu13/lib or
# nvidia/cublas/lib), off the loader's path. Put the folder that has it first; libcublasLt
# beside it is found through libcublas's $ORIGIN run path.
cuda_libs() {
  grep -qE 'libcublas\.so(\.1[23])? ' <<<"$(ldconfig -p 2>/dev/null)" && { echo "gpu-check: cuBLAS from ldconfig"; return 0; }
  local so
  so=$( (ls /usr/local/cuda/lib64/libcublas.so.13 /usr/local/cuda/lib64/libcublas.so.12 2>/dev/null
         python3 - 2>/dev/null <<'PY'
import glob, os
import nvidia
for v in ("13", "12"):
    for p in nvidia.__path__:
        for f in sorted(glob.glob(os.path.join(p, "*", "lib", "libcublas.so." + v))):
            print(f)
PY
        ) | head -1)
  [ -n "$so" ] || { echo "gpu-check: no libcublas.so.13/.12 found: every CudaBackend test will fail"; return 0; }
  export LD_LIBRARY_PATH="$(dirname "$so")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-check: cuBLAS from $so"
}
cuda_libs
command -v compute-sanitizer >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"
OUT="${OUT:-gpu-logs}"
mkdir -p "$OUT"
LOGS=$(mktemp -d)
status=0
STAGE_NAME=all
# The device tool kills a call at 600 s and then only what is already under $OUT comes back.
# So every stage has a deadline (STAGE_BUDGET seconds, default 470), every command a cap
# (CMD_BUDGET, default 300) within what is left of it, and the logs are packed after each
# command: a hang costs one command's cap, never the logs of the others.
STAGE_BUDGET_SET=${STAGE_BUDGET:-}
STAGE_BUDGET=${STAGE_BUDGET:-470}
CMD_BUDGET=${CMD_BUDGET:-300}
pack() { tar czf "$OUT/$STAGE_NAME-logs.tar.gz" -C "$LOGS" . 2>/dev/null; }
# Under compute-sanitizer nothing spins on a peer (one rank, or the staged all-reduce), so
# lazy module loading is safe there, and it spares instrumenting all of cuBLAS up front.
SANITIZE="env CUDA_MODULE_LOADING=LAZY compute-sanitizer" # a command `timeout` can run
run() { # name, log, command...: run under the time caps, keep the log, remember failures
  local name=$1 log=$2; shift 2
  # ONLY="iso torch" runs just those commands of a stage (e.g. again after a TIMED OUT)
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  echo "== $name"
  local left=$((STAGE_BUDGET - SECONDS - 10))
  local cap=$((left < CMD_BUDGET ? left : CMD_BUDGET))
  if [ "$left" -lt 20 ]; then
    status=1; echo "SKIPPED: $name (the stage's $STAGE_BUDGET s are spent)"; return
  fi
  local t0=$SECONDS rc=0
  timeout --kill-after=5 "$cap" "$@" >"$LOGS/$log" 2>&1 || rc=$?
  case $rc in
    0) ;;
    124 | 137) status=1; echo "TIMED OUT: $name after $cap s (see $log)" ;;
    *) status=1; echo "FAILED: $name, exit $rc (see $log)" ;;
  esac
  tail -4 "$LOGS/$log"
  echo "   ($((SECONDS - t0)) s)"
  pack
}
finish() { # pack the logs into the second file that comes back
  pack && rm -rf "$LOGS"
}

unpack() { # the executables from the carried .gpu/bin (xz) into $STAGE/bin
  [ -d .gpu/bin ] || return 0
  mkdir -p "$STAGE/bin"
  local f to
  for f in .gpu/bin/*; do
    to="$STAGE/bin/$(basename "$f" .xz)"
    case $f in
      *.xz) xz_d <"$f" >"$to" && chmod +x "$to" ;;
      *) cp "$f" "$to" ;;
    esac
  done
}

stage1() {
  local B="$STAGE/bin"
  unpack
  {
    date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    ldconfig -p | grep -E 'libcuda|nvrtc|cublas|nccl' | head -20
    python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' 2>&1
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "compute-sanitizer: $(command -v compute-sanitizer || echo missing)"
  } >"$LOGS/machine.txt" 2>&1
  mkdir -p "$STAGE" && cp .gpu/model.part1 "$STAGE/" 2>/dev/null
  # fast and most telling first; the sanitizers (slow, and refused on some machines) last
  run kernels kernels.log "$B/cuda_kernels" --test-threads=1
  run allreduce allreduce.log "$B/cuda_allreduce" --test-threads=1 --nocapture --skip nccl_
  run synthetic synthetic.log "$B/synthetic" --test-threads=1
  # the all-reduce used on its own, as an engine links it: exact sums and a timing
  run example example.log sh -c "\"$B/example_p2p_allreduce\" --ranks 8 --elems 4096 && \
    \"$B/example_p2p_allreduce\" --ranks 3 --elems 1048576 --wire bf16 && \
    SYNCDROP_ALLREDUCE=twoshot \"$B/example_p2p_allreduce\" --ranks 4 --elems 16777216"
  # compute-sanitizer serialises kernel launches, so P2P ranks spinning on each other can
  # never meet under it: the sanitizers run every P2P kernel at one rank (its barriers meet
  # only itself), the multi-rank paths are checked by their oracles and the timeout test,
  # and the sanitizer runs of the backend use the staged all-reduce.
  local T=single_rank_runs_every_p2p_kernel_for_the_sanitizers
  for tool in memcheck racecheck synccheck; do
    run "allreduce-$tool" "allreduce-$tool.log" $SANITIZE --tool $tool --error-exitcode 1 \
      "$B/cuda_allreduce" --test-threads=1 $T
  done
  run memcheck memcheck.log $SANITIZE --tool memcheck --error-exitcode 1 "$B/cuda_kernels" --test-threads=1
  run racecheck racecheck.log $SANITIZE --tool racecheck --error-exitcode 1 "$B/cuda_kernels" --test-threads=1
  # NCCL last, on a short leash: its test provokes an abort during a non-blocking init that
  # never completes (a rank that never arrives), where NCCL itself has been known to hang.
  # One rank, nothing spins on a peer: lazy loading is safe, and keeps NCCL's kernel loads
  # out of the test's 3 s init window.
  CMD_BUDGET=60 run nccl nccl.log env CUDA_MODULE_LOADING=LAZY "$B/cuda_allreduce" --test-threads=1 --nocapture nccl_
}

bench() {
  local B="$STAGE/bin"
  unpack
  [ -x "$B/bench_cuda_rank" ] || { echo "no executables: carry .gpu or run --stage1 first"; return 1; }
  { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1; } \
    >"$LOGS/machine-bench.txt" 2>&1
  run bench bench.log "$B/bench_cuda_rank" --out "$LOGS"
  run allreduce-sweep allreduce-sweep.log "$B/bench_cuda_allreduce" --out "$LOGS"
  run iso iso.log "$B/bench_cuda_iso" --out "$LOGS"
  # PyTorch sets lazy loading only when the variable is unset: eager would load every
  # kernel of libtorch_cuda, cuBLAS and cuDNN first
  run torch torch.log env CUDA_MODULE_LOADING=LAZY python3 "$B/torch_rank_decode.py" --out "$LOGS/torch_rank.json"
}

stage2() {
  local B="$STAGE/bin"
  [ -f "$STAGE/model.part1" ] || { echo "model part 1 is not on this machine (it went cold?): run --stage1 again"; return 1; }
  mkdir -p "$STAGE/cache/models"
  cat "$STAGE/model.part1" .gpu2/model.part2 | xz_d >"$STAGE/cache/models/$MODEL" || return 1
  echo "$SHA  $STAGE/cache/models/$MODEL" | sha256sum -c - || return 1
  SYNCDROP_CACHE="$STAGE/cache" run backend backend.log "$B/cuda_backend" --test-threads=1 --nocapture
  SYNCDROP_ALLREDUCE=staged SYNCDROP_CACHE="$STAGE/cache" run backend-memcheck backend-memcheck.log \
    $SANITIZE --tool memcheck --error-exitcode 1 "$B/cuda_backend" --test-threads=1 iso_and_spd
}

stage() { # name, functions...: run them with the output also in <name>-summary.txt
  local name=$1; shift
  STAGE_NAME=$name
  SECONDS=0
  exec 3>&1 4>&2
  exec > >(tee "$OUT/$name-summary.txt") 2>&1
  local tee_pid=$!
  for f in "$@"; do "$f" || status=1; done
  exec 1>&3 2>&4
  wait "$tee_pid" 2>/dev/null || sleep 0.5 # let tee write the last lines
  finish
}
case "${1:-all}" in
  --stage1) stage stage1 stage1 ;;
  --stage2) stage stage2 stage2 ;;
  --bench) stage bench bench ;;
  all) # one call on a machine of one's own: no device-tool deadline, unless one is given
    [ -n "$STAGE_BUDGET_SET" ] || STAGE_BUDGET=100000
    stage all stage1 stage2 bench ;;
  *) echo "usage: $0 [--build | --stage1 | --stage2 | --bench]" >&2; exit 2 ;;
esac
exit $status
