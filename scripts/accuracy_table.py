#!/usr/bin/env python3
"""Markdown tables for docs/ACCURACY.md from the runner's `sweep` JSON, and one row per
planner result from `plan` files (their notes hold the planner's outcome).

    python3 scripts/accuracy_table.py docs/accuracy/sweep.json
    python3 scripts/accuracy_table.py --plans docs/accuracy/plan_tp*_acc1.json

Paired losses of `eval --out` scores against a baseline (per task, with a plot) are the
runner's `compare` subcommand: `cargo run --release --example llama -- compare --help`.
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

def plans(paths):
    """One row per plan file; accuracy budgets in points, perplexity budgets in percent."""
    print("| TP | budget | sample per split | chosen | zero-shot / B2B / HG+B2B | t1, t2 | "
          "search: base -> plan | held-out: base -> plan | held-out loss +- paired s.e. [95% interval] | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        d = json.load(open(path))
        o = d["notes"]["outcome"]
        budget = d["notes"].get("budget", {})
        ppl = "PplIncrease" in budget
        k, n = sum(o["spd"]), len(o["spd"])
        if ppl:
            limit = f"perplexity +{100 * budget['PplIncrease']:g}%"
            sample = f"{o.get('passages_per_split') or '?'} LAMBADA passages"
            val, unit = (lambda x: f"{x:.2f}"), "%"
        else:
            limit = f"accuracy -{100 * budget.get('AccDrop', float('nan')):g} pt"
            sample = f"{o.get('docs_per_task') or '?'} docs/task"
            val, unit = (lambda x: f"{100 * x:.1f}%"), "pt"
        drop = o.get("heldout_drop")
        if drop:
            lo, hi = o["heldout_loss_ci95"]
            stat = (f"{100 * drop['diff']:+.1f} +- {100 * drop['stderr']:.1f} {unit} "
                    f"[{100 * lo:+.1f}, {100 * hi:+.1f}]")
        else:
            stat = f"{100 * o['heldout_loss']:+.1f} {unit} (no per-document outcomes kept)"
        words = {"WithinBudget": "within budget", "OverBudget": "over budget",
                 "Inconclusive": "inconclusive at this sample size"}
        if o.get("verdict"):
            verdict = words[o["verdict"]]
        else:
            verdict = ("within" if o["within_budget_on_heldout"] else "over") + " budget (point estimate)"
        print(f"| {d['tp']} | {limit} | {sample} | {k} of {n} ({100 * k / n:.0f}%) | "
              f"{o['zero_shot_blocks']} / {o['b2b_blocks']} / {o['hg_b2b_blocks']} | "
              f"{o['t1']:.2f}, {o['t2']:.2f} | {val(o['search_base'])} -> {val(o['search_score'])} | "
              f"{val(o['heldout_base'])} -> {val(o['heldout_score'])} | {stat} | {verdict} |")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plans":
        plans(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--paired":
        sys.exit("--paired moved to the runner: cargo run --release --example llama -- compare --help")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "docs/accuracy/sweep.json")
