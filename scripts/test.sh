#!/usr/bin/env bash
# The project's one test command (README, .ci/run): fetch the registry assets (sha256-checked,
# cached outside the repo), then build and run every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test.sh: cargo not found; install Rust (rustup)" >&2; exit 1; }
scripts/fetch-assets.sh all
# The CLI tests (tests/cli.rs, review_cli.rs, ...) run target/release/examples/llama, which
# `cargo test --all-targets` does not produce by itself: build it, and make its absence a
# failure rather than a skip.
cargo build --release --example llama
export SYNCDROP_REQUIRE_RUNNER=1
cargo test --release --all-targets "$@"
# the usage examples in the API docs compile (they name files a test machine lacks: no_run)
cargo test --release --doc
# The CUDA code and every kernel must keep compiling on machines without a GPU: nvcc comes
# from PyPI wheels, cudarc loads the driver at run time, GPU tests report "skipped: no GPU".
NVCC="${NVCC:-$(scripts/setup-nvcc.sh | tail -n 1)}"
export NVCC SYNCDROP_REQUIRE_NVCC=1
# `host-sim` (implies `cuda`) adds the kernels compiled for the host (csrc/host_sim): the
# host_sim_* tests run the kernels' own source on CPU threads against the CPU reference.
cargo test --release --features cuda,host-sim --all-targets --no-run
cargo test --release --features cuda,host-sim --lib --test cuda_kernels --test cuda_allreduce --test cuda_backend --test synthetic -- --nocapture --test-threads=1 2>&1 | grep -E "skipped|test result|FAILED|panicked"
cargo test --release --features cuda,host-sim --test 'host_sim*'
# The same feature builds a simulated CUDA driver (csrc/host_sim/fake_cuda.cpp); GPU suites
# run against it here: the P2P all-reduce (virtual ranks, graphs, timeouts; ~15 s), the
# kernels through the backend's launchers (~80 s, most of it the sampler's 4,000-row
# chi-square test), and the CUDA backend's quicker end-to-end tests (~2 min: communication
# counters, graphs on/off step by step, ISO+SPD against the CPU, one LLaMA2-70B-shaped rank).
# SmolLM2 at TP 1/3/8 and the fused-kernel variants take 5 more minutes: `scripts/sim-gpu.sh`
# runs every suite in full. Streams run asynchronously in the simulated driver; the jitter (a
# random sleep of up to 100 us before each stream op) varies their interleaving run to run,
# so a missing event wait between a rank's compute and communication streams shows.
SYNCDROP_SIM_JITTER_US=100 scripts/sim-gpu.sh cuda_allreduce
scripts/sim-gpu.sh cuda_kernels
SYNCDROP_SIM_JITTER_US=100 scripts/sim-gpu.sh cuda_backend -- comm_counters_ cuda_graphs_on_and_off iso_and_spd_on_cuda one_rank_of_a_llama2_70b
# examples/p2p_allreduce (the all-reduce used on its own, as an engine would link it) on the
# simulated driver: exact sums on every rank, one-shot and two-shot, f32 and bf16 wire
lib=$(scripts/sim-gpu.sh --lib)
for a in "--ranks 3 --elems 1000" "--ranks 8 --elems 70001 --wire bf16"; do
  LD_LIBRARY_PATH="$lib" cargo run -q --release --features cuda,host-sim --example p2p_allreduce -- $a --iters 2
done
SYNCDROP_ALLREDUCE=twoshot LD_LIBRARY_PATH="$lib" \
  cargo run -q --release --features cuda,host-sim --example p2p_allreduce -- --ranks 5 --elems 4099 --iters 2
# The GPU benchmark binary says "skipped: no GPU" here and exits 0.
cargo test --release --features cuda,host-sim --bench cuda_rank --bench cuda_allreduce --bench cuda_iso
# API docs build without warnings (broken intra-doc links are errors)
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --features cuda,host-sim
