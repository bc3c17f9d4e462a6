#!/usr/bin/env python3
"""Markdown tables for docs/ACCURACY.md from the runner's `sweep` JSON, and one row per
planner result from `plan` files (their notes hold the planner's outcome).

    python3 scripts/accuracy_table.py docs/accuracy/sweep.json
    python3 scripts/accuracy_table.py --plans docs/accuracy/plan_tp*_acc1.json
    python3 scripts/accuracy_table.py --paired base.json plan_a.json plan_b.json   # eval --out
    python3 scripts/accuracy_table.py --paired a/base.json+b/base.json a/plan.json+b/plan.json
    python3 scripts/accuracy_table.py --paired --without lambada base.json plan.json  # 6-task average

In --paired, `x.json+y.json` is one run on the union of both files' documents (e.g. two
`eval --offset` ranges of the same shuffle): a task's documents are concatenated in file order,
a task missing from a later file keeps the earlier documents, and a document in both is an error.
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

def load_merged(spec):
    """`eval --out` JSON, or several joined by '+': one run on the union of their documents."""
    parts = [json.load(open(p)) for p in spec.split("+")]
    tasks = {}
    for part in parts:
        for t in part["tasks"]:
            if t["task"] not in tasks:
                tasks[t["task"]] = dict(t, docs=list(t["docs"]))
                continue
            m = tasks[t["task"]]
            seen = {d["id"] for d in m["docs"]}
            dup = [d["id"] for d in t["docs"] if d["id"] in seen]
            if dup:
                sys.exit(f"{spec}: {t['task']} document {dup[0]} appears twice")
            m["docs"] += t["docs"]
    for t in tasks.values():
        n = len(t["docs"])
        if n == 0:
            sys.exit(f"{spec}: {t['task']} has no documents")
        t["n"] = n
        t["acc"] = sum(d["acc"] for d in t["docs"]) / n
        t["acc_norm"] = sum(d["acc_norm"] for d in t["docs"]) / n
    return {"tasks": list(tasks.values())}

def paired(base_path, paths, without=()):
    """Per-task paired losses of `eval --out` scores against a baseline on the same documents
    (the same statistics as tasks::paired_difference)."""
    import math
    norm = {"hellaswag", "arc_easy", "arc_challenge", "piqa"}
    base = load_merged(base_path)
    runs = [load_merged(p) for p in paths]
    for d in [base] + runs:
        d["tasks"] = [t for t in d["tasks"] if t["task"] not in without]
    if without:
        print(f"(average over the tasks other than {', '.join(without)})\n")
    print("| task | n | baseline | " + " | ".join(paths) + " |")
    print("|---|---|---|" + "---|" * len(paths))
    means = [[] for _ in runs]  # per run: (task mean, task variance of the mean)
    base_sum = 0.0
    for i, tb in enumerate(base["tasks"]):
        k = "acc_norm" if tb["task"].split(":")[0] in norm else "acc"
        base_sum += tb[k]
        cells = []
        for j, r in enumerate(runs):
            tp = r["tasks"][i]
            if tp["task"] != tb["task"] or [d["id"] for d in tp["docs"]] != [d["id"] for d in tb["docs"]]:
                sys.exit(f"{tb['task']}: different documents, nothing to pair")
            d = [int(x[k]) - int(y[k]) for x, y in zip(tb["docs"], tp["docs"])]
            n = len(d)
            m = sum(d) / n
            s2 = sum((x - m) ** 2 for x in d) / max(n - 1, 1)
            cells.append(f"{100 * m:+.1f} +- {100 * math.sqrt(s2 / n):.1f}")
            means[j].append((m, s2 / n))
        print(f"| {tb['task']} | {tb['n']} | {100 * tb[k]:.1f}% | " + " | ".join(cells) + " |")
    # the task average, its paired s.e. = sqrt(sum of per-task variances) / tasks
    t = len(base["tasks"])
    cells = []
    for ms in means:
        m = sum(x for x, _ in ms) / t
        se = math.sqrt(sum(v for _, v in ms)) / t
        cells.append(f"**{100 * m:+.2f} +- {100 * se:.2f}** [{100 * (m - 1.96 * se):+.2f}, {100 * (m + 1.96 * se):+.2f}]")
    print(f"| average | | {100 * base_sum / t:.1f}% | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plans":
        plans(sys.argv[2:])
    elif len(sys.argv) > 4 and sys.argv[1:3] == ["--paired", "--without"]:
        paired(sys.argv[4], sys.argv[5:], sys.argv[3].split(","))
    elif len(sys.argv) > 2 and sys.argv[1] == "--paired":
        paired(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "docs/accuracy/sweep.json")
