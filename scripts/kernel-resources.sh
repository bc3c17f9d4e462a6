#!/usr/bin/env bash
# What ptxas gives every kernel in csrc/: registers per thread, static shared memory, stack
# frame and spills, per architecture. Static facts from the compiler (no GPU needed), for
# kernel work and for docs/BENCHMARKS.md ("static, not measured").
#
#   scripts/kernel-resources.sh              # sm_90 (H100/H200)
#   ARCHS="80 90" scripts/kernel-resources.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(scripts/setup-nvcc.sh 2>/dev/null | tail -1)}"
ARCHS="${ARCHS:-90}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for a in $ARCHS; do
  for f in csrc/*.cu; do
    echo "@@ $f sm_$a"
    "$NVCC" -cubin -O3 -std=c++17 -Icsrc -arch="sm_$a" -Xptxas -v -o "$tmp/k.cubin" "$f" 2>&1
  done
done | python3 -c '
import re, sys
rows, cur, props = [], None, None
for line in sys.stdin:
    if line.startswith("@@ "):
        _, src, arch = line.split(); continue
    m = re.search(r"Compiling entry function .(\w+). for .(sm_\d+).", line)
    if m:
        cur = {"src": src, "kernel": m.group(1), "arch": m.group(2), "regs": 0, "smem": 0,
               "stack": 0, "spill_st": 0, "spill_ld": 0}
        rows.append(cur); props = None; continue
    m = re.search(r"Function properties for (\w+)", line)
    if m:
        props = m.group(1); continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and cur and props == cur["kernel"]:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups()); continue
    m = re.search(r"Used (\d+) registers", line)
    if m and cur:
        cur["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line)
        cur["smem"] = int(s.group(1)) if s else 0
print("| file | kernel | arch | registers | static smem B | stack B | spill stores / loads B |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    spill = "{} / {}".format(r["spill_st"], r["spill_ld"])
    if r["spill_st"] or r["spill_ld"]:
        spill = "**" + spill + "**"
    print("| {} | {} | {} | {} | {} | {} | {} |".format(r["src"].split("/")[-1], r["kernel"],
          r["arch"], r["regs"], r["smem"], r["stack"], spill))
if not rows:
    sys.exit("kernel-resources: ptxas reported no kernels")
'
