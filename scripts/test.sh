#!/usr/bin/env bash
# The project's one test command (README, .ci/run): fetch the registry assets (sha256-checked,
# cached outside the repo), then build and run every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test.sh: cargo not found; install Rust (rustup)" >&2; exit 1; }
scripts/fetch-assets.sh all
cargo test --release --all-targets "$@"
# The CUDA code must keep compiling on machines without a GPU (cudarc loads CUDA at run time).
cargo check --release --all-targets --features cuda
