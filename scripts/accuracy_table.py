#!/usr/bin/env python3
"""Markdown tables for docs/ACCURACY.md from the runner's `sweep` JSON.

    python3 scripts/accuracy_table.py docs/accuracy/sweep.json
"""
import json, sys

def main(path):
    d = json.load(open(path))
    pts = d["points"]
    print(f"Samples: {d['limit_per_task']} documents per task x 7 tasks; LAMBADA perplexity over "
          f"{d['lambada_passages']} passages.\n")
    for tp in sorted({p["tp"] for p in pts}):
        rows = sorted((p for p in pts if p["tp"] == tp), key=lambda p: (p["spd_blocks"], p["method"]))
        base = next((p for p in rows if p["spd_blocks"] == 0), None)
        print(f"**TP {tp}**\n")
        print("| SPD blocks | fraction | method | LAMBADA ppl | avg accuracy | +- s.e. | drop vs TP baseline |")
        print("|---|---|---|---|---|---|---|")
        for p in rows:
            drop = f"{100 * (base['acc'] - p['acc']):+.1f} pt" if base else ""
            print(f"| {p['spd_blocks']} | {p['fraction']:.2f} | {p['method']} | {p['ppl']:.2f} | "
                  f"{100 * p['acc']:.1f}% | {100 * p['acc_stderr']:.1f} | {drop} |")
        print()
    for s in d.get("sensitivity", []):
        sens = s["sensitivity"]["sensitivity"]
        order = sorted(range(len(sens)), key=lambda i: (sens[i], -i))
        print(f"TP {s['tp']}: base calibration ppl {s['sensitivity']['base_ppl']:.3f}; blocks from least "
              f"to most sensitive: {order}")
        print()

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/accuracy/sweep.json")
