#!/usr/bin/env bash
# Install a CUDA 13.0 nvcc from PyPI wheels (DESIGN.md section 6) into the syncdrop cache, so
# the `cuda` feature compiles every kernel on a machine with no GPU and no CUDA toolkit.
# Wheels pinned by sha256 (pip --require-hashes). Idempotent. Prints the nvcc path last.
#
#   scripts/setup-nvcc.sh            # then: export NVCC=$(scripts/setup-nvcc.sh | tail -1)
set -euo pipefail
CACHE="${SYNCDROP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/syncdrop}"
DEST="$CACHE/nvcc-13.0.88"
NVCC="$DEST/nvidia/cu13/bin/nvcc"
PY="${PYTHON:-python3}"
if [ -x "$NVCC" ] && "$NVCC" --version >/dev/null 2>&1; then
  echo "nvcc: ok" >&2; echo "$NVCC"; exit 0
fi
req=$(mktemp)
cat >"$req" <<'REQ'
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
REQ
rm -rf "$DEST.part"
"$PY" -m pip install --quiet --no-deps --only-binary=:all: --require-hashes --target "$DEST.part" \
  --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_12_x86_64 -r "$req" || { rm -f "$req"; echo "setup-nvcc: pip install failed" >&2; exit 1; }
rm -f "$req"
rm -rf "$DEST" && mv "$DEST.part" "$DEST"
"$NVCC" --version >&2 || { echo "setup-nvcc: $NVCC does not run" >&2; exit 1; }
echo "$NVCC"
