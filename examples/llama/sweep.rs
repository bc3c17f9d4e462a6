//! `sweep`: accuracy and perplexity versus SPD fraction (the SPD paper's main figure).

use crate::common::*;
use clap::Args;
use std::path::{Path, PathBuf};
use syncdrop::distill::{compensate_blocks, distill_layer, CompConfig};
use syncdrop::engine::Engine;
use syncdrop::eval::{lambada, perplexity_texts};
use syncdrop::planner;
use syncdrop::spd;
use syncdrop::tasks::{self, evaluate_suite};
use syncdrop::{assets, Error, Result};

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    calib: Calib,
    /// TP degrees to sweep.
    #[arg(long, default_value = "2,3,4,8")]
    tps: String,
    /// SPD fractions (blocks taken in order of increasing sensitivity).
    #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
    fractions: String,
    /// Fractions at which the B2B variant is also measured (empty: none).
    #[arg(long, default_value = "0.5,0.75,1")]
    b2b_fractions: String,
    /// Fractions at which the HG+B2B variant is measured (empty: none).
    #[arg(long, default_value = "")]
    hg_fractions: String,
    /// Fractions at which zero-shot SPD with linear compensation (ours, method "lc") is
    /// measured, on the zero-shot blocks: maps fitted for every block up front on the
    /// distillation passages, in closed form (empty: none).
    #[arg(long, default_value = "")]
    lc_fractions: String,
    /// Rank of the compensation for --lc-fractions.
    #[arg(long, default_value_t = 32, value_name = "K")]
    lc_rank: usize,
    /// Documents per task.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// LAMBADA passages for perplexity.
    #[arg(long, default_value_t = 40)]
    lambada: usize,
    #[command(flatten)]
    train: Train,
    /// Order the blocks by a sensitivity JSON from `sensitivity` (or `plan`'s) instead of
    /// measuring it on the calibration passages; needs a single TP degree in --tps.
    #[arg(long)]
    sensitivity: Option<PathBuf>,
    #[arg(long, default_value = "sweep.json")]
    out: PathBuf,
    /// Add to an existing --out: keep its points that this run does not measure again
    /// (other TP degrees, methods or fractions), if it was measured with the same
    /// settings. Without it an existing --out is refused, not overwritten.
    #[arg(long)]
    resume: bool,
    /// Only redraw the SVG from the JSON in --out.
    #[arg(long)]
    plot_only: bool,
}

pub fn run_sweep(args: SweepArgs) -> Result<()> {
    let SweepArgs {
        common,
        calib,
        tps,
        fractions,
        b2b_fractions,
        hg_fractions,
        lc_fractions,
        lc_rank,
        limit,
        lambada: n_lambada,
        train,
        sensitivity,
        out,
        resume,
        plot_only,
    } = args;
    if plot_only {
        let j: serde_json::Value = read_json(&out)?;
        let points: Vec<spd::SweepPoint> = serde_json::from_value(j["points"].clone())
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", out.display())))?;
        // files from before the model was recorded are SmolLM2's
        let model = j["model"].as_str().unwrap_or("SmolLM2-135M-Instruct.Q4_1");
        spd::plot_sweep(&points, &sweep_title(model), &sibling(&out, "svg"))?;
        eprintln!("wrote {}", sibling(&out, "svg").display());
        return Ok(());
    }
    let parse = |s: &str| -> Result<Vec<f64>> {
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| {
                x.trim()
                    .parse::<f64>()
                    .map_err(|e| Error::InvalidArgument(format!("'{x}': {e}")))
            })
            .collect()
    };
    no_spd(&common, "sweep")?;
    check_calib(&calib)?;
    at_least("limit", limit, 1)?;
    at_least("lambada", n_lambada, 1)?;
    let (fracs, b2b_fracs, hg_fracs, lc_fracs) = (
        parse(&fractions)?,
        parse(&b2b_fractions)?,
        parse(&hg_fractions)?,
        parse(&lc_fractions)?,
    );
    if let Some(f) = fracs
        .iter()
        .chain(&b2b_fracs)
        .chain(&hg_fracs)
        .chain(&lc_fracs)
        .find(|f| !(0.0..=1.0).contains(*f))
    {
        return Err(bad(format!("SPD fraction {f} is not in [0, 1]")));
    }
    if fracs.is_empty() && b2b_fracs.is_empty() && hg_fracs.is_empty() && lc_fracs.is_empty() {
        return Err(bad(
            "--fractions, --b2b-fractions, --hg-fractions and --lc-fractions are all \
                 empty: nothing to measure",
        ));
    }
    let distils = !b2b_fracs.is_empty() || !hg_fracs.is_empty();
    // linear compensation fits on the distillation passages, with their hold-out
    let uses_calib = distils || !lc_fracs.is_empty();
    let dcfg = distill_config(&train, uses_calib, &common)?;
    let ccfg = CompConfig {
        rank: lc_rank,
        holdout: train.holdout,
        ..CompConfig::default()
    };
    distinct_outputs(&[
        ("--out", &out),
        ("the plot beside --out", &sibling(&out, "svg")),
    ])?;
    prepare_out(&out)?;
    let dir = assets::eval_dir()?;
    let sets = tasks::PAPER_TASKS
        .iter()
        .map(|t| {
            Ok((
                t.to_string(),
                tasks::sample(&tasks::load_task(&dir, t)?, limit, 0, None),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let texts: Vec<String> = lambada(&dir, n_lambada)?.iter().map(|p| p.text()).collect();
    let tp_list = tps
        .split(',')
        .map(|t| t.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(format!("--tps: {e}")))?;
    // the settings every point of one file shares (--resume adds to a file only
    // when they agree)
    let mut settings = serde_json::json!({
        "limit_per_task": limit,
        "lambada_passages": texts.len(),
        "calib": calib.calib,
        "seq_len": calib.seq_len,
        "distill_calib": train.distill_calib,
        "distill_seq_len": train.distill_seq_len,
        "distill_text": train.distill_text,
        "epochs": train.epochs,
        "lr": train.lr,
        "holdout": train.holdout,
        "patience": train.patience,
    });
    if !lc_fracs.is_empty() {
        settings["lc_rank"] = lc_rank.into();
    }
    match &sensitivity {
        None => {}
        Some(_) if tp_list.len() != 1 => {
            return Err(bad(format!(
                "--sensitivity orders the blocks of one TP degree (SPD's error depends \
                     on it), but --tps lists {}: sweep one TP degree per run (--resume \
                     adds it to the same --out)",
                tp_list.len()
            )))
        }
        Some(p) => settings["sensitivity_file"] = p.display().to_string().into(),
    }
    if out.exists() && !resume {
        return Err(bad(format!(
            "{} exists: add --resume to keep its points that this run does not \
                 measure again, or choose another --out",
            out.display()
        )));
    }
    // the blocks each method measures here, so --resume keeps every other point
    let mfiles = model_files(&common)?;
    let mcfg = mfiles.config()?;
    let n_layers = mcfg.n_layers;
    // in the file (a --resume with another model is refused) and the plot's title
    settings["model"] = mfiles.name().into();
    // every TP degree before the first one's hours of work: a later one the model
    // cannot run (or one listed twice) would otherwise fail (or repeat) mid-sweep
    for (i, &tp) in tp_list.iter().enumerate() {
        if tp == 0 || tp > mcfg.n_heads {
            return Err(bad(format!(
                "--tps: TP {tp} is not within 1..={} (the model's query heads)",
                mcfg.n_heads
            )));
        }
        if tp_list[..i].contains(&tp) {
            return Err(bad(format!("--tps: TP {tp} is listed twice")));
        }
    }
    let blocks_at = |f: &[f64]| -> Vec<usize> {
        f.iter()
            .map(|f| (f * n_layers as f64).round() as usize)
            .collect()
    };
    let remeasured = [
        ("zero-shot", blocks_at(&fracs)),
        ("b2b", blocks_at(&b2b_fracs)),
        ("hg+b2b", blocks_at(&hg_fracs)),
        ("lc", blocks_at(&lc_fracs)),
    ];
    let (mut points, mut sens_all): (Vec<spd::SweepPoint>, Vec<serde_json::Value>) =
        if resume && out.exists() {
            let mut old: serde_json::Value = read_json(&out)?;
            // its points and sensitivities, or a refusal: a file whose points do not
            // parse (not a sweep's) would otherwise be replaced by this run's
            let not_sweep = |what: String| {
                bad(format!(
                    "--resume: {}: {what} (not a file from `sweep`?): this run would \
                         replace it; choose another --out",
                    out.display()
                ))
            };
            let pts: Vec<spd::SweepPoint> = match old.get("points") {
                Some(p) => serde_json::from_value(p.clone())
                    .map_err(|e| not_sweep(format!("its points: {e}")))?,
                None => return Err(not_sweep("no points".into())),
            };
            let sens: Vec<serde_json::Value> = match old.get("sensitivity") {
                None => Vec::new(),
                Some(s) => s
                    .as_array()
                    .cloned()
                    .ok_or_else(|| not_sweep("its sensitivity is not a list".into()))?,
            };
            // files from before the distillation had its own calibration text and
            // early stopping: what they distilled with
            for (key, was) in [
                ("distill_calib", old.get("calib").cloned()),
                ("distill_seq_len", old.get("seq_len").cloned()),
                ("holdout", old.get("epochs").map(|_| 0.into())),
                ("distill_text", Some("boolq".into())),
            ] {
                if let (None, Some(was)) = (old.get(key), was) {
                    old[key] = was;
                }
            }
            if !uses_calib {
                // nothing distilled or compensated here: the file's distillation
                // settings stand
                for key in [
                    "distill_calib",
                    "distill_seq_len",
                    "distill_text",
                    "epochs",
                    "lr",
                    "holdout",
                    "patience",
                ] {
                    match old.get(key) {
                        Some(v) => settings[key] = v.clone(),
                        None => {
                            settings.as_object_mut().expect("an object").remove(key);
                        }
                    }
                }
            }
            let differ: Vec<String> = settings
                .as_object()
                .expect("an object")
                .iter()
                .filter(|(k, v)| old.get(k.as_str()).is_some_and(|o| o != *v))
                .map(|(k, v)| format!("{k} {} there, {v} here", old[k.as_str()]))
                .collect();
            if !differ.is_empty() {
                return Err(bad(format!(
                    "--resume: {} was measured with other settings ({}): its points \
                         and this run's would not compare; use the same settings or \
                         another --out",
                    out.display(),
                    differ.join(", ")
                )));
            }
            // keep what this run does not re-measure
            let again = |p: &spd::SweepPoint| {
                tp_list.contains(&p.tp)
                    && remeasured
                        .iter()
                        .any(|(m, ks)| *m == p.method && ks.contains(&p.spd_blocks))
            };
            (
                pts.into_iter().filter(|p| !again(p)).collect(),
                sens.into_iter()
                    .filter(|s| {
                        s["tp"]
                            .as_u64()
                            .is_some_and(|t| !tp_list.contains(&(t as usize)))
                    })
                    .collect(),
            )
        } else {
            (Vec::new(), Vec::new())
        };
    for tp in tp_list.iter().copied() {
        let Opened {
            mut engine, tok, ..
        } = open(&Common {
            tp,
            ..common.clone()
        })?;
        let n = engine.cfg.n_layers;
        ppl_fits_ctx(&tok, texts.iter(), common.ctx)?;
        let seqs = distill_data(&tok, &train, uses_calib)?;
        if !lc_fracs.is_empty() {
            ccfg.validate(engine.cfg.hidden, seqs.len())
                .map_err(|e| named("--lc-rank", e))?;
        }
        let sens = match &sensitivity {
            Some(p) => saved_sensitivity(p, &engine)?,
            None => {
                let seqs = calibration(&tok, &calib, "calib")?;
                spd::sensitivity(&mut engine, &seqs, calib.seq_len.max(2), true)?
            }
        };
        let order = planner::order_by_sensitivity(&sens);
        sens_all.push(serde_json::json!({ "tp": tp, "sensitivity": &sens }));
        let measure = |engine: &mut Engine, method: &str, k: usize| -> Result<spd::SweepPoint> {
            let ppl = perplexity_texts(engine, &tok, &texts, PPL_WINDOW, 256, false)?.ppl();
            let s = evaluate_suite(engine, &tok, &sets, true)?;
            eprintln!(
                "TP {tp} {method:9} {k:2} blocks: ppl {ppl:.3}, avg acc {:.4} +- {:.4}",
                s.average, s.average_stderr
            );
            Ok(spd::SweepPoint {
                tp,
                method: method.into(),
                spd_blocks: k,
                fraction: k as f64 / n as f64,
                ppl,
                acc: s.average,
                acc_stderr: s.average_stderr,
            })
        };
        // zero-shot, then zero-shot + LC on the same blocks (maps for every block,
        // fitted once on the TP model's inputs: they act in SPD blocks only)
        for (method, fr) in [("zero-shot", &fracs), ("lc", &lc_fracs)] {
            if method == "lc" && !fr.is_empty() {
                compensate_blocks(&mut engine, &seqs, &ccfg, dcfg.threads, true, |l, r| {
                    eprintln!("TP {tp} lc {}", comp_fit_line(l, r))
                })?;
            }
            for f in fr {
                let k = (f * n as f64).round() as usize;
                let mut mask = vec![false; n];
                order[..k].iter().for_each(|i| mask[*i] = true);
                engine.set_spd(&mask)?;
                points.push(measure(&mut engine, method, k)?);
                save_sweep(&out, &settings, &sens_all, &mut points)?;
            }
        }
        // B2B (and HG+B2B): distil blocks in sensitivity order, each with the earlier
        // ones already SPD (and recovered); measure at the requested fractions.
        for (method, fr) in [("b2b", &b2b_fracs), ("hg+b2b", &hg_fracs)] {
            let targets: Vec<usize> = fr.iter().map(|f| (f * n as f64).round() as usize).collect();
            let last = targets.iter().copied().max().unwrap_or(0);
            let mut mask = vec![false; n];
            for l in 0..n {
                let default = engine.layout.ranks.clone();
                engine.set_block_shards(l, default)?; // original weights and heads
            }
            for (k, &layer) in order.iter().enumerate().take(last) {
                mask[layer] = true;
                engine.set_spd(&mask)?;
                if method == "hg+b2b" {
                    let g = syncdrop::headgroup::group_block(&mut engine, layer, &seqs)?;
                    eprintln!(
                        "TP {tp} hg block {layer:2}: heads {:?}, MLP order {:?}",
                        g.heads, g.ffn_order
                    );
                }
                let (_, rep) = distill_layer(&mut engine, &seqs, layer, &dcfg)?;
                eprintln!(
                    "TP {tp} {method} block {layer:2}: mse {:.3e} -> {:.3e} ({:.1}s on {}){}",
                    rep.mse_before,
                    rep.mse_after,
                    rep.secs,
                    rep.device,
                    rep.note()
                );
                if targets.contains(&(k + 1)) {
                    points.push(measure(&mut engine, method, k + 1)?);
                    save_sweep(&out, &settings, &sens_all, &mut points)?;
                }
            }
        }
    }
    eprintln!(
        "wrote {} and {}",
        out.display(),
        sibling(&out, "svg").display()
    );
    Ok(())
}

/// Writes a sweep's points so far (sorted) with its settings and sensitivities to `out`, and
/// redraws the SVG beside it: after every point, so that a run stopped after hours keeps
/// what it measured (`--resume` adds to it).
fn save_sweep(
    out: &Path,
    settings: &serde_json::Value,
    sens_all: &[serde_json::Value],
    points: &mut [spd::SweepPoint],
) -> Result<()> {
    points.sort_by(|a, b| (a.tp, &a.method, a.spd_blocks).cmp(&(b.tp, &b.method, b.spd_blocks)));
    let mut file = settings.clone();
    file["sensitivity"] = serde_json::json!(sens_all);
    file["points"] = serde_json::json!(points);
    write_json(out, &file)?;
    let model = settings["model"]
        .as_str()
        .unwrap_or("SmolLM2-135M-Instruct.Q4_1");
    spd::plot_sweep(points, &sweep_title(model), &sibling(out, "svg"))
}

/// The sweep plot's title for `model` ([`ModelFiles::name`]).
fn sweep_title(model: &str) -> String {
    format!("{model}: accuracy and perplexity vs SPD fraction")
}
