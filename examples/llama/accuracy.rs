//! Zero-shot accuracy: `eval`, and `compare` for saved scores.

use crate::common::*;
use clap::Args;
use std::path::{Path, PathBuf};
use syncdrop::tasks::{self, evaluate_suite, SuiteScore};
use syncdrop::{assets, Error, Result};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// Comma-separated tasks (default: arc_easy,arc_challenge,hellaswag,lambada,piqa,sciq,winogrande).
    /// `arc_easy:test` and `arc_challenge:test` are ARC's test splits, prompted zero-shot
    /// like the validation splits the default scores: fresh documents for a confirmation.
    #[arg(long)]
    tasks: Option<String>,
    /// Documents per task (a fixed-seed sample).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Which half of a split sample: search (0) or held-out (1); default: no split.
    #[arg(long, conflicts_with = "offset")]
    split: Option<usize>,
    /// Skip the first K documents of the fixed-seed shuffle. With K = the `plan` run's
    /// --limit, every document evaluated is one its search split never saw: verify a plan
    /// on up to --limit documents per task instead of the held-out split's K.
    #[arg(long)]
    offset: Option<usize>,
    /// A previous `eval --out` JSON of the same documents (e.g. the TP baseline): print
    /// this run's loss against it with the paired standard error and 95% interval.
    #[arg(long)]
    paired_with: Option<PathBuf>,
    /// With --paired-with: the accuracy budget in points, for a within / over /
    /// inconclusive verdict.
    #[arg(long, requires = "paired_with", allow_negative_numbers = true)]
    budget_acc: Option<f64>,
    /// Write the scores as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run_eval(args: EvalArgs) -> Result<()> {
    let EvalArgs {
        common,
        tasks: names,
        limit,
        seed,
        split,
        offset,
        paired_with,
        budget_acc,
        out,
    } = args;
    at_least("limit", limit, 1)?;
    if let Some(k) = split.filter(|k| *k > 1) {
        return Err(bad(format!(
            "--split {k}: 0 (the search half) or 1 (the held-out half)"
        )));
    }
    if let Some(b) = budget_acc.filter(|b| b.is_nan() || *b < 0.0) {
        return Err(bad(format!(
            "--budget-acc {b}: a budget is 0 points or more"
        )));
    }
    if let (Some(out), Some(p)) = (&out, &paired_with) {
        if out == p || same_file(out, p) {
            return Err(bad(format!(
                "--out {} is the --paired-with file: this run's scores would replace \
                     the reference; write them to another file",
                out.display()
            )));
        }
    }
    if let Some(out) = &out {
        prepare_out(out)?;
    }
    // Read the reference first: a bad file should fail before an hour of evaluation.
    let reference: Option<SuiteScore> = paired_with.as_deref().map(read_json).transpose()?;
    // the documents (a misspelt --tasks) before the model loads
    let dir = assets::eval_dir()?;
    let sets = task_list(&names)
        .into_iter()
        .map(|t| {
            let task = tasks::load_task(&dir, &t)?;
            let docs = match offset {
                Some(k) => tasks::sample_after(&task, k, limit, seed),
                None => tasks::sample(&task, limit, seed, split),
            };
            if docs.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{t}: no documents left after skipping {} of {}",
                    offset.unwrap_or(0),
                    task.docs.len()
                )));
            }
            Ok((t, docs))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(r) = &reference {
        // Same tasks and documents, or the pairing is meaningless: check before running.
        let ours: Vec<(&str, Vec<u64>)> = sets
            .iter()
            .map(|(t, d)| (t.as_str(), d.iter().map(|d| d.id).collect()))
            .collect();
        let theirs: Vec<(&str, Vec<u64>)> = r
            .tasks
            .iter()
            .map(|t| (t.task.as_str(), t.docs.iter().map(|d| d.id).collect()))
            .collect();
        if ours != theirs {
            return Err(Error::InvalidArgument(format!(
                "--paired-with {}: its tasks or documents differ from this run's \
                     (evaluate both with the same --tasks, --limit, --seed, --split/--offset)",
                paired_with.as_deref().unwrap_or(Path::new("")).display()
            )));
        }
    }
    let Opened {
        mut engine, tok, ..
    } = open(&common)?;
    let s = evaluate_suite(&mut engine, &tok, &sets, true)?;
    print_suite(&s);
    if let Some(out) = out {
        write_json(&out, &s)?;
    }
    if let Some(r) = &reference {
        let d = tasks::paired_difference(r, &s)?;
        let (lo, hi) = d.ci95();
        println!(
            "loss against {}: {:+.2} +- {:.2} pt (paired s.e.; 95% interval [{:+.2}, {:+.2}]); \
                 {} of {} documents changed outcome",
            paired_with.as_deref().unwrap_or(Path::new("")).display(),
            100.0 * d.diff,
            100.0 * d.stderr,
            100.0 * lo,
            100.0 * hi,
            d.discordant,
            d.docs
        );
        if let Some(b) = budget_acc {
            let (_, text) = syncdrop::planner::verdict(d.diff, Some(d.stderr), b / 100.0, "pt");
            println!("budget {b} pt: {text}");
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct CompareArgs {
    /// The baseline's `eval --out` JSON. `a.json+b.json` is one run on the union of both
    /// files' documents (e.g. two --offset ranges, or --tasks halves, of one sample).
    #[arg(long, value_name = "FILE[+FILE...]")]
    base: String,
    /// The runs to compare, each `[LABEL=]FILE[+FILE...]` on the baseline's documents
    /// (the label defaults to the first file's name).
    #[arg(required = true, value_name = "RUN")]
    runs: Vec<String>,
    /// Comma-separated tasks to leave out of the average (e.g. `lambada`, whose gains can
    /// carry it); a name also matches its `:test` split.
    #[arg(long, value_name = "TASKS")]
    without: Option<String>,
    /// Accuracy budget in points: a within / over / not resolved verdict per run, and the
    /// budget line in the plot.
    #[arg(long, allow_negative_numbers = true)]
    budget_acc: Option<f64>,
    /// Write the comparisons as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw the forest plot (SVG): each run's average loss with its 95% interval, and
    /// each task's loss as a dot.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The plot's title (default: what the runs are compared against).
    #[arg(long, requires = "plot")]
    title: Option<String>,
}

pub fn run_compare(args: CompareArgs) -> Result<()> {
    let CompareArgs {
        base,
        runs,
        without,
        budget_acc,
        out,
        plot,
        title,
    } = args;
    if let Some(b) = budget_acc.filter(|b| b.is_nan() || *b < 0.0) {
        return Err(bad(format!(
            "--budget-acc {b}: a budget is 0 points or more"
        )));
    }
    let without: Vec<String> = without
        .as_deref()
        .map(|w| list("without", w))
        .transpose()?
        .unwrap_or_default();
    // each run as (argument, label, files): `LABEL=FILES`, or FILES labelled by the first
    // file's name
    let runs: Vec<(&str, String, &str)> = runs
        .iter()
        .map(|run| match run.split_once('=') {
            Some((l, f)) if !l.is_empty() => (run.as_str(), l.to_string(), f),
            _ => {
                let first = run.split('+').next().unwrap_or(run);
                let stem = Path::new(first)
                    .file_stem()
                    .map_or(first.into(), |s| s.to_string_lossy().into_owned());
                (run.as_str(), stem, run.as_str())
            }
        })
        .collect();
    // An output must not replace an input (or the other output).
    let inputs: Vec<&str> = std::iter::once(base.as_str())
        .chain(runs.iter().map(|(_, _, spec)| *spec))
        .flat_map(|spec| spec.split('+'))
        .collect();
    let outs: Vec<(&str, &Path)> = [("--out", &out), ("--plot", &plot)]
        .into_iter()
        .filter_map(|(f, p)| p.as_deref().map(|p| (f, p)))
        .collect();
    distinct_outputs(&outs)?;
    for (flag, o) in &outs {
        if let Some(f) = inputs.iter().find(|f| same_file(o, Path::new(f))) {
            return Err(bad(format!(
                "{flag} {} is the input {f}: writing it would replace a score; \
                     give another name",
                o.display()
            )));
        }
    }
    for p in out.iter().chain(&plot) {
        prepare_out(p)?;
    }
    let load = |spec: &str| -> Result<SuiteScore> {
        let parts = spec
            .split('+')
            .map(|f| read_json::<SuiteScore>(Path::new(f)))
            .collect::<Result<Vec<_>>>()?;
        let s = tasks::merge_suites(parts).map_err(|e| named(spec, e))?;
        if without.is_empty() {
            Ok(s)
        } else {
            tasks::without_tasks(s, &without).map_err(|e| named(spec, e))
        }
    };
    let base_score = load(&base)?;
    let mut rows = Vec::new();
    for (run, label, spec) in &runs {
        let score = load(spec)?;
        rows.push(tasks::compare(label, &base_score, &score).map_err(|e| {
            bad(format!(
                "{run} against --base {base}: {e} (compare runs on the same \
                     documents: the same --tasks, --limit, --seed, --split/--offset)"
            ))
        })?);
    }
    print_comparisons(&base_score, &rows, &without, budget_acc);
    if let Some(out) = &out {
        write_json(
            out,
            &serde_json::json!({
                "base": base,
                "without": without,
                "budget_acc": budget_acc,
                "base_accuracy": base_score.average,
                "runs": rows,
            }),
        )?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(p) = &plot {
        let title = title.unwrap_or_else(|| match budget_acc {
            Some(b) => format!("accuracy loss against {base} (budget {b} pt)"),
            None => format!("accuracy loss against {base}"),
        });
        syncdrop::spd::plot_comparisons(&rows, budget_acc, &title, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn task_list(s: &Option<String>) -> Vec<String> {
    match s {
        Some(s) => s.split(',').map(|t| t.trim().to_string()).collect(),
        None => tasks::PAPER_TASKS.iter().map(|s| s.to_string()).collect(),
    }
}

fn print_suite(s: &SuiteScore) {
    println!("| task | n | acc | +- s.e. | acc_norm | +- s.e. |");
    println!("|---|---|---|---|---|---|");
    for t in &s.tasks {
        println!(
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} |",
            t.task,
            t.n,
            t.acc,
            t.stderr(),
            t.acc_norm,
            t.stderr_norm()
        );
    }
    println!(
        "| **average** (acc_norm for arc/hellaswag/piqa) | | {:.4} | {:.4} | | |",
        s.average, s.average_stderr
    );
}

/// `compare`'s table: one column per run, each task's loss (baseline - run, points) with its
/// paired s.e., then the average with its 95% interval and, with a budget, each verdict.
fn print_comparisons(
    base: &SuiteScore,
    rows: &[tasks::Comparison],
    without: &[String],
    budget: Option<f64>,
) {
    if !without.is_empty() {
        println!(
            "(average over the tasks other than {}; loss = baseline - run, points)\n",
            without.join(", ")
        );
    } else {
        println!("(loss = baseline - run, points; +- paired standard error)\n");
    }
    let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
    println!("| task | n | baseline | {} |", labels.join(" | "));
    println!("|---|---|---|{}", "---|".repeat(rows.len()));
    for (i, t) in base.tasks.iter().enumerate() {
        let cells: Vec<String> = rows
            .iter()
            .map(|r| {
                let d = &r.per_task[i].1;
                format!("{:+.1} +- {:.1}", 100.0 * d.diff, 100.0 * d.stderr)
            })
            .collect();
        println!(
            "| {} | {} | {:.1}% | {} |",
            t.task,
            t.n,
            100.0 * tasks::headline(t),
            cells.join(" | ")
        );
    }
    let cells: Vec<String> = rows
        .iter()
        .map(|r| {
            let (lo, hi) = r.average.ci95();
            format!(
                "**{:+.2} +- {:.2}** [{:+.2}, {:+.2}]",
                100.0 * r.average.diff,
                100.0 * r.average.stderr,
                100.0 * lo,
                100.0 * hi
            )
        })
        .collect();
    println!(
        "| average | {} | {:.1}% | {} |",
        base.tasks.iter().map(|t| t.n).sum::<usize>(),
        100.0 * base.average,
        cells.join(" | ")
    );
    if let Some(b) = budget {
        println!();
        for r in rows {
            let (_, text) =
                syncdrop::planner::verdict(r.average.diff, Some(r.average.stderr), b / 100.0, "pt");
            println!("{}: {text}", r.label);
        }
    }
}
