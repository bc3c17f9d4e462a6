#!/usr/bin/env bash
# The main job on a fresh machine: fetch SmolLM2 + eval data (sha256-checked, cached outside
# the repo), build, generate with tensor parallelism over 3 ranks, print a LAMBADA perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo.sh: cargo not found; install Rust (rustup)" >&2; exit 1; }
scripts/fetch-assets.sh all
cargo build --release --example llama
./target/release/examples/llama generate --tp 3 --chat --prompt "What is the capital of France? Answer in one sentence." -n 48
./target/release/examples/llama generate --tp 3 --prompt "Tensor parallelism splits every layer" -n 32
./target/release/examples/llama perplexity --tp 3 --lambada 40
