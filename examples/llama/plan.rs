//! SPD blocks: `sensitivity` (the SPD paper's Algorithm 1) and `plan` (the planner).

use crate::common::*;
use clap::Args;
use std::path::PathBuf;
use syncdrop::distill::{compensate_blocks, save_recovered, CompConfig};
use syncdrop::eval::lambada;
use syncdrop::planner::{self, Budget};
use syncdrop::spd::{self, model_sha256, Recovery, Sensitivity};
use syncdrop::tasks;
use syncdrop::{assets, Error, Result};

#[derive(Args)]
pub struct SensitivityArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    calib: Calib,
    /// In-sensitive threshold t1 for the plot (default: median sensitivity).
    #[arg(long, allow_negative_numbers = true)]
    t1: Option<f64>,
    /// Extremely-sensitive threshold t2 (default: 90th percentile).
    #[arg(long, allow_negative_numbers = true)]
    t2: Option<f64>,
    #[arg(long, default_value = "sensitivity.json")]
    out: PathBuf,
    #[arg(long, default_value = "sensitivity.svg")]
    plot: PathBuf,
    /// Re-plot and re-classify a saved sensitivity JSON instead of measuring.
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Overwrite an existing --out (without it a measured run refuses one).
    #[arg(long)]
    force: bool,
}

pub fn run_sensitivity(args: SensitivityArgs) -> Result<()> {
    let SensitivityArgs {
        common,
        calib,
        t1,
        t2,
        out,
        plot,
        from_json,
        force,
    } = args;
    if let (Some(a), Some(b)) = (t1, t2) {
        if a > b {
            return Err(bad(format!(
                    "--t1 {a} is above --t2 {b}: t1 separates in-sensitive from sensitive blocks, t2 sensitive from extremely sensitive"
                )));
        }
    }
    match &from_json {
        Some(p) => distinct_outputs(&[("--from-json", p), ("--plot", &plot)])?,
        None => distinct_outputs(&[("--out", &out), ("--plot", &plot)])?,
    }
    prepare_out(&plot)?;
    let (s, tp, n_calib): (Sensitivity, usize, String) = match from_json {
        Some(p) => {
            let s: Sensitivity = read_json(&p)?;
            if s.ppl_from.len() != s.sensitivity.len() {
                return Err(bad(format!(
                    "--from-json {}: {} sensitivities but {} perplexities (ppl_from): \
                         not a file as `sensitivity` writes it",
                    p.display(),
                    s.sensitivity.len(),
                    s.ppl_from.len()
                )));
            }
            let passages = match s.passages {
                Some(n) => format!("{n} calibration passages ({})", p.display()),
                None => format!("the calibration passages of {}", p.display()),
            };
            let tp = s.tp.unwrap_or(common.tp);
            (s, tp, passages)
        }
        None => {
            no_spd(&common, "sensitivity")?;
            check_calib(&calib)?;
            keep_existing(force, &[("--out", &out)])?;
            prepare_out(&out)?;
            let Opened {
                mut engine, tok, ..
            } = open(&common)?;
            let seqs = calibration(&tok, &calib, "calib")?;
            let s = spd::sensitivity(&mut engine, &seqs, calib.seq_len.max(2), true)?;
            write_json(&out, &s)?;
            eprintln!("wrote {}", out.display());
            (
                s,
                engine.tp(),
                format!("{} calibration passages", seqs.len()),
            )
        }
    };
    if s.sensitivity.is_empty() {
        return Err(bad("the sensitivity has no blocks"));
    }
    let mut sorted = s.sensitivity.clone();
    sorted.sort_by(f64::total_cmp);
    let t1 = t1.unwrap_or(sorted[sorted.len() / 2]);
    let t2 = t2.unwrap_or(sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)]);
    println!("base perplexity {:.4} on {n_calib}", s.base_ppl);
    println!("| block | ppl with blocks i.. SPD | sensitivity | class |");
    println!("|---|---|---|---|");
    for (i, v) in s.sensitivity.iter().enumerate() {
        println!(
            "| {i} | {:.4} | {v:+.4} | {:?} |",
            s.ppl_from[i],
            spd::classify(*v, t1, t2)
        );
    }
    spd::plot_sensitivity(&s, t1, t2, &format!("SPD sensitivity, TP {tp}"), &plot)?;
    eprintln!("wrote {}", plot.display());
    Ok(())
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    calib: Calib,
    /// Budget as a maximum relative perplexity increase in percent (LAMBADA passages).
    #[arg(long, conflicts_with = "budget_acc", allow_negative_numbers = true)]
    budget_ppl: Option<f64>,
    /// Budget as a maximum drop of average task accuracy, in points.
    #[arg(long, allow_negative_numbers = true)]
    budget_acc: Option<f64>,
    /// Documents per task (accuracy budget) or LAMBADA passages (perplexity budget) in
    /// each of the search and held-out splits.
    #[arg(long, default_value_t = 40)]
    limit: usize,
    /// Documents per task (accuracy) or LAMBADA passages (perplexity) in the held-out
    /// split, which checks the chosen plan (default: --limit). They follow the search
    /// split in the same fixed-seed order: with --limit 80 --heldout-limit 500 the check
    /// scores what `eval --offset 80 --limit 500` does. Two evaluations of this size; a
    /// 1-point accuracy budget takes several hundred documents per task to resolve.
    #[arg(long, value_name = "N")]
    heldout_limit: Option<usize>,
    /// Also distil (B2B) the blocks beyond the zero-shot set while the budget holds.
    #[arg(long)]
    b2b: bool,
    #[command(flatten)]
    train: Train,
    /// A search step fits when its loss + Z paired standard errors is within budget:
    /// 0 compares point estimates (prone to the winner's curse on small samples), 1.645
    /// asks for a one-sided 95% upper bound within budget (conservative).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "Z",
        allow_negative_numbers = true
    )]
    search_z: f64,
    /// With --budget-acc: a step also needs every task's own drop (+ Z s.e. with
    /// --search-z) within this many points. The seven-task average can hide a task that
    /// collapses while another gains (LC at TP 8 raises LAMBADA while the others lose)
    #[arg(long, value_name = "POINTS", allow_negative_numbers = true)]
    max_task_drop: Option<f64>,
    /// The margin for --max-task-drop in each task's own paired s.e. (default: --search-z).
    /// One task's s.e. is about sqrt(7) times the average's, so the same Z asks far more of
    /// each task than of the average; 0 caps the point estimates
    #[arg(
        long,
        value_name = "Z",
        requires = "max_task_drop",
        allow_negative_numbers = true
    )]
    task_z: Option<f64>,
    /// After the longest zero-shot prefix in sensitivity order, try the next N blocks one
    /// at a time and keep each that still fits: the block that ends the prefix (the
    /// "wall") can cost far more than those after it. One evaluation per block; 0 keeps
    /// the prefix only (the paper's classes).
    #[arg(long, default_value_t = 0, value_name = "N")]
    past_wall: usize,
    /// With --b2b: distil the zero-shot blocks too once they are chosen (kept when that
    /// lowers the loss), so that more blocks fit the budget. The paper leaves them
    /// zero-shot.
    #[arg(long, requires = "b2b")]
    distill_zero_shot: bool,
    /// Linear compensation of rank K (ours, not the paper's; see `distill --compensate`):
    /// fitted first for every block on the distillation passages, in closed form (a few
    /// seconds a block); the sensitivity is then measured and every search step scored
    /// with SPD + LC, and B2B trains with it. 0: none.
    #[arg(long, default_value_t = 0, value_name = "K")]
    compensate: usize,
    /// Reuse a sensitivity JSON (from `sensitivity`, or the one a previous `plan` saved
    /// beside its --out) instead of measuring it.
    #[arg(long)]
    sensitivity: Option<PathBuf>,
    /// Keep the TP baseline's outcomes on both splits in DIR (default: `baselines` in the
    /// asset cache, see scripts/fetch-assets.sh) and reuse them in a later plan on the same
    /// engine and data: it skips the two baseline evaluations (about a quarter of a TP 8
    /// accuracy plan on 2 cores). Reused only when the build, the model's sha256, the TP
    /// layout, backend, wire, threads, ISO mode, NCCL, the all-reduce variables and the data
    /// with its tokenizer all match.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "")]
    reuse_baseline: Option<PathBuf>,
    /// The plan (JSON). Beside it: its sensitivity plot (.svg), the measured sensitivity
    /// (.sensitivity.json, unless --sensitivity was given), any distilled weights
    /// (.safetensors), and with --budget-acc the held-out split's per-document outcomes
    /// (.heldout_base.json, .heldout_plan.json: `eval --out` files).
    #[arg(long, default_value = "plan.json")]
    out: PathBuf,
    /// Overwrite an existing --out and the distilled weights beside it (without it an
    /// existing one is refused: a plan can take an hour of distillation).
    #[arg(long)]
    force: bool,
}

pub fn run_plan(args: PlanArgs) -> Result<()> {
    let PlanArgs {
        common,
        calib,
        budget_ppl,
        budget_acc,
        limit,
        heldout_limit,
        b2b,
        train,
        search_z,
        max_task_drop,
        task_z,
        past_wall,
        distill_zero_shot,
        compensate,
        sensitivity,
        reuse_baseline,
        out,
        force,
    } = args;
    no_spd(&common, "plan")?;
    check_calib(&calib)?;
    at_least("limit", limit, 1)?;
    let heldout = heldout_limit.unwrap_or(limit);
    at_least("heldout-limit", heldout, 1)?;
    if common.tp < 2 {
        return Err(bad(format!(
                "--tp {}: SPD drops all-reduces between ranks, and one rank has none: plan for TP 2 or more",
                common.tp
            )));
    }
    if let Some(b) = budget_ppl.or(budget_acc).filter(|b| b.is_nan() || *b < 0.0) {
        return Err(bad(format!("budget {b}: a budget is 0 or more")));
    }
    let budget = match (budget_ppl, budget_acc) {
        (Some(p), None) => Budget::PplIncrease(p / 100.0),
        (None, Some(a)) => Budget::AccDrop(a / 100.0),
        _ => {
            return Err(Error::InvalidArgument(
                "give --budget-ppl PERCENT or --budget-acc POINTS".into(),
            ))
        }
    };
    match (max_task_drop, budget) {
        (Some(c), _) if c.is_nan() || c < 0.0 => {
            return Err(bad(format!(
                "--max-task-drop {c}: a cap on each task's drop is 0 points or more"
            )))
        }
        (Some(_), Budget::PplIncrease(_)) => {
            return Err(bad(
                "--max-task-drop caps each task's accuracy drop: it needs --budget-acc",
            ))
        }
        _ => {}
    }
    // checked now, not after the sensitivity pass
    if let Some(d) = reuse_baseline
        .as_ref()
        .filter(|d| d.exists() && !d.is_dir())
    {
        return Err(bad(format!(
            "--reuse-baseline {}: not a folder (it keeps one file per baseline)",
            d.display()
        )));
    }
    for (flag, z) in [("--search-z", Some(search_z)), ("--task-z", task_z)] {
        if let Some(z) = z.filter(|z| !(*z >= 0.0 && z.is_finite())) {
            return Err(bad(format!(
                "{flag} {z}: a margin in standard errors is a finite number >= 0"
            )));
        }
    }
    // linear compensation fits on the distillation passages with their hold-out
    let recovers = b2b || compensate > 0;
    let dcfg = distill_config(&train, recovers, &common)?;
    let ccfg = (compensate > 0).then(|| CompConfig {
        rank: compensate,
        holdout: train.holdout,
        ..CompConfig::default()
    });
    distinct_outputs(&[
        ("--out", &out),
        ("the plot beside --out", &sibling(&out, "svg")),
        (
            "the distilled weights beside --out",
            &sibling(&out, "safetensors"),
        ),
    ])?;
    let weights = sibling(&out, "safetensors");
    let mut kept = vec![("--out", out.as_path())];
    if recovers {
        kept.push(("the distilled weights beside --out", weights.as_path()));
    }
    // a measured sensitivity is saved beside the plan (minutes of work, and with
    // --compensate the only record of SPD + LC's block order): reuse it with
    // --sensitivity
    let sens_out = sibling(&out, "sensitivity.json");
    if sensitivity.is_none() {
        kept.push(("the sensitivity beside --out", sens_out.as_path()));
    }
    // an accuracy budget's held-out outcomes (two evaluations), in eval's format
    let held_out = [
        sibling(&out, "heldout_base.json"),
        sibling(&out, "heldout_plan.json"),
    ];
    if matches!(budget, Budget::AccDrop(_)) {
        for p in &held_out {
            kept.push(("the held-out outcomes beside --out", p.as_path()));
        }
    }
    keep_existing(force, &kept)?;
    prepare_out(&out)?;
    // the search and held-out data before the model loads and the sensitivity runs
    let dir = assets::eval_dir()?;
    enum Data {
        Passages([Vec<String>; 2]),
        Docs([Vec<(String, Vec<tasks::Doc>)>; 2]),
    }
    let data = match budget {
        Budget::PplIncrease(_) => {
            let texts: Vec<String> = lambada(&dir, limit + heldout)?
                .iter()
                .map(|p| p.text())
                .collect();
            if texts.len() < limit + heldout {
                return Err(bad(format!(
                    "--limit {limit}, --heldout-limit {heldout}: a perplexity budget \
                         scores {limit} LAMBADA passages in the search split and {heldout} \
                         in the held-out split, and LAMBADA has {}: give fewer",
                    texts.len(),
                )));
            }
            let held_out = texts[limit..].to_vec();
            let mut search = texts;
            search.truncate(limit);
            Data::Passages([search, held_out])
        }
        Budget::AccDrop(_) => {
            let mut splits = [Vec::new(), Vec::new()];
            for t in tasks::PAPER_TASKS {
                let task = tasks::load_task(&dir, t)?;
                let halves = tasks::plan_splits(&task, limit, heldout, 0);
                for (v, docs) in splits.iter_mut().zip(halves) {
                    v.push((t.to_string(), docs));
                }
            }
            Data::Docs(splits)
        }
    };
    let Opened {
        mut engine, tok, ..
    } = open(&common)?;
    if let Data::Passages(halves) = &data {
        ppl_fits_ctx(&tok, halves.iter().flatten(), common.ctx)?;
    }
    // the distillation's (and head grouping's and compensation's) calibration text,
    // none without them: read before the sensitivity, so that a bad --distill-calib
    // stops the run early
    let seqs = distill_data(&tok, &train, recovers)?;
    if let Some(c) = &ccfg {
        c.validate(engine.cfg.hidden, seqs.len())
            .map_err(|e| named("--compensate", e))?;
    }
    let saved = sensitivity
        .map(|p| saved_sensitivity(&p, &engine).map(|s| (p, s)))
        .transpose()?;
    if let Some((p, s)) = &saved {
        if s.compensation_rank != ccfg.map(|c| c.rank) {
            let how = |r: Option<usize>| {
                r.map_or("zero-shot SPD blocks".into(), |k| {
                    format!("SPD blocks compensated at rank {k}")
                })
            };
            eprintln!(
                "warning: --sensitivity {} was measured with {}, this plan searches \
                     {}: its block order may not be this search's",
                p.display(),
                how(s.compensation_rank),
                how(ccfg.map(|c| c.rank))
            );
        }
    }
    // linear compensation for every block, before the sensitivity (which then
    // measures SPD + LC)
    let lc = match &ccfg {
        Some(c) => {
            eprintln!(
                "fitting linear compensation of rank {} for every block on {} passages \
                     ({} held out)",
                c.rank,
                seqs.len(),
                c.holdout
            );
            Some(compensate_blocks(
                &mut engine,
                &seqs,
                c,
                dcfg.threads,
                true,
                |l, r| eprintln!("{}", comp_fit_line(l, r)),
            )?)
        }
        None => None,
    };
    let sens: Sensitivity = match saved {
        Some((_, s)) => s,
        None => {
            let seqs = calibration(&tok, &calib, "calib")?;
            let mut s = spd::sensitivity(&mut engine, &seqs, calib.seq_len.max(2), true)?;
            s.compensation_rank = ccfg.map(|c| c.rank);
            // written now: a search that fails later keeps it
            write_json(&sens_out, &s)?;
            eprintln!("wrote {} (reuse it with --sensitivity)", sens_out.display());
            s
        }
    };
    let mut metric: Box<dyn planner::Metric> = match data {
        Data::Passages(halves) => {
            let enc = |h: &[String]| {
                h.iter()
                    .map(|t| tok.encode_document(t))
                    .collect::<Result<Vec<_>>>()
            };
            Box::new(planner::PplMetric {
                splits: [enc(&halves[0])?, enc(&halves[1])?],
                window: PPL_WINDOW,
            })
        }
        // the planner gets per-document outcomes: paired s.e. of the drop; with the
        // model's own tokenizer (GGUF or a Hugging Face folder's tokenizer.json)
        Data::Docs(splits) => Box::new(planner::SuiteMetric { tok, splits }),
    };
    let sha = model_sha256(&engine.files)?;
    let mut say = |m: &str| eprintln!("{m}");
    let mut cached;
    let metric: &mut dyn planner::Metric = if let Some(dir) = reuse_baseline {
        cached = planner::BaselineCache {
            inner: metric.as_mut(),
            dir: if dir.as_os_str().is_empty() {
                assets::cache_dir().join("baselines")
            } else {
                dir
            },
            identity: baseline_identity(&common, &engine, &sha),
            log: &mut say,
        };
        &mut cached
    } else {
        metric.as_mut()
    };
    let (outcome, distilled) = planner::plan(
        &mut engine,
        &sens,
        budget,
        planner::Search {
            z: search_z,
            past_wall,
            distill_zero_shot,
            compensation: lc.as_ref(),
            max_task_drop: max_task_drop.map(|p| p / 100.0),
            task_z,
        },
        metric,
        &seqs,
        b2b.then_some(&dcfg),
        |m| eprintln!("{m}"),
    )?;
    let mut plan = planner::plan_file(&engine, sha, &sens, &outcome, budget);
    if !distilled.is_empty() {
        let w = sibling(&out, "safetensors");
        // zero-shot blocks with compensation keep the model's weights: only their
        // maps are written
        let original: Vec<usize> = distilled
            .iter()
            .map(|b| b.0)
            .filter(|l| outcome.recovery[*l] == Some(Recovery::ZeroShot))
            .collect();
        save_recovered(&w, &distilled, &original)?;
        plan.set_distilled(&w)?;
        // how the weights were made (the per-block reports are in the outcome)
        plan.notes["distillation_settings"] = distill_settings(&train, &dcfg);
        plan.notes["b2b"] = serde_json::json!(b2b);
        if let Some(c) = &ccfg {
            plan.notes["compensation"] = serde_json::json!({
                "rank": c.rank, "ridge": c.ridge, "holdout": c.holdout,
                "fitted": "every block up front, on the TP model's block inputs; \
                           refitted on the plan's inputs before a block's B2B",
            });
        }
    }
    plan.save(&out)?;
    if let Some((base, chosen)) = &outcome.heldout_suites {
        write_json(&held_out[0], base)?;
        write_json(&held_out[1], chosen)?;
        let (b, p) = (held_out[0].display(), held_out[1].display());
        eprintln!(
            "wrote the held-out split's outcomes: {b} (TP baseline) and {p} (the plan); \
                 per task, with a plot: `compare --base {b} {p} --plot held_out.svg`"
        );
    }
    spd::plot_sensitivity(
        &sens,
        outcome.t1,
        outcome.t2,
        &format!(
            "SPD sensitivity and the planner's thresholds, TP {}",
            engine.tp()
        ),
        &sibling(&out, "svg"),
    )?;
    println!(
            "plan: {} of {} blocks SPD ({:.0}%): {} zero-shot, {} B2B, {} HG+B2B; thresholds t1 = {}, t2 = {}",
            outcome.spd.iter().filter(|s| **s).count(),
            outcome.spd.len(),
            100.0 * outcome.fraction,
            outcome.zero_shot_blocks,
            outcome.b2b_blocks,
            outcome.hg_b2b_blocks,
            threshold(outcome.t1),
            threshold(outcome.t2)
        );
    println!(
        "search split: {:.4} -> {:.4}; held-out split: {:.4} -> {:.4} (loss {:+.4}, budget {}): {}",
        outcome.search_base,
        outcome.search_score,
        outcome.heldout_base,
        outcome.heldout_score,
        outcome.heldout_loss,
        budget.limit(),
        outcome.verdict_text
    );
    eprintln!(
        "wrote {} ({} evaluations)",
        out.display(),
        outcome.evaluations
    );
    Ok(())
}

/// A planner threshold for the log: -inf (no block in that class) reads "none".
fn threshold(t: f64) -> String {
    if t.is_finite() {
        format!("{t:.4}")
    } else {
        "none (no block in that class)".into()
    }
}

/// Everything besides the data that decides the TP baseline's per-document outcomes, for
/// `plan --reuse-baseline`: the build, the model bytes, the rank layout and every option
/// or variable that changes the numerics.
fn baseline_identity(common: &Common, engine: &syncdrop::Engine, model_sha256: &str) -> String {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let shards: Vec<String> = engine
        .layout
        .ranks
        .iter()
        .map(|r| format!("{:?}:{:?}", r.q_heads, r.ffn))
        .collect();
    format!(
        "build={} model_sha256={model_sha256} tp={} shards={} backend={:?} wire={} \
         threads={} iso={:?} row_invariant={} graphs={} rank={:?} nccl={} \
         SYNCDROP_ALLREDUCE={} SYNCDROP_FUSED_OPROJ={} SYNCDROP_FUSED_NORM={}",
        syncdrop::BUILD,
        common.tp,
        shards.join("/"),
        common.backend,
        common.wire,
        common
            .threads
            .unwrap_or(syncdrop::EngineOptions::default().threads),
        common.iso,
        common.row_invariant,
        !common.no_graphs,
        common.rank,
        // NCCL sums in its own order where the selection chain falls back to it
        common.nccl || common.nccl_id.is_some() || common.nccl_tcp.is_some(),
        env("SYNCDROP_ALLREDUCE"),
        env("SYNCDROP_FUSED_OPROJ"),
        env("SYNCDROP_FUSED_NORM"),
    )
}
