//! `distill`: B2B and linear compensation for the SPD blocks of a plan.

use crate::common::*;
use clap::Args;
use std::path::PathBuf;
use syncdrop::distill::{recover_layer, save_recovered, CompConfig};
use syncdrop::spd::{Recovery, SpdPlan};
use syncdrop::{Error, Result};

#[derive(Args)]
pub struct DistillArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    train: Train,
    /// Linear compensation of rank K for every SPD block (ours, not the paper's): the
    /// local MLP input gets a rank-K linear estimate, from the block input, of the other
    /// ranks' attention partials, fitted in closed form on the distillation passages
    /// (their last --holdout measure it). B2B then trains with it. 0: none.
    #[arg(long, default_value_t = 0)]
    compensate: usize,
    /// With --compensate: fit only the compensation (no B2B); the blocks keep their
    /// original weights. Seconds per block instead of about a minute.
    #[arg(long, requires = "compensate")]
    no_b2b: bool,
    /// Output plan (the weights go beside it as <name>.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite an existing --out and the weights beside it (without it they are refused).
    #[arg(long)]
    force: bool,
}

pub fn run_distill(args: DistillArgs) -> Result<()> {
    let DistillArgs {
        common,
        train,
        compensate,
        no_b2b,
        out,
        force,
    } = args;
    let dcfg = distill_config(&train, true, &common)?;
    if no_b2b && compensate == 0 {
        return Err(bad("--no-b2b needs --compensate K (K >= 1)"));
    }
    let ccfg = (compensate > 0).then(|| CompConfig {
        rank: compensate,
        holdout: train.holdout,
        ..CompConfig::default()
    });
    let plan_path = PathBuf::from(&common.spd);
    if !plan_path.is_file() {
        return Err(bad(format!(
            "distill needs --spd PLAN.json, the plan whose SPD blocks it distils (not `{}`)",
            common.spd
        )));
    }
    if same_file(&out, &plan_path) {
        return Err(bad(format!(
            "--out {} is the input plan: write the distilled plan to another file",
            out.display()
        )));
    }
    distinct_outputs(&[
        ("--out", &out),
        (
            "the distilled weights beside --out",
            &sibling(&out, "safetensors"),
        ),
    ])?;
    keep_existing(
        force,
        &[
            ("--out", &out),
            (
                "the distilled weights beside --out",
                &sibling(&out, "safetensors"),
            ),
        ],
    )?;
    prepare_out(&out)?;
    let Opened {
        mut engine,
        tok,
        sha,
    } = open(&common)?;
    let mut plan = SpdPlan::load(&plan_path)?;
    let seqs = distill_data(&tok, &train, true)?;
    let mut blocks = Vec::new();
    let mut reports = Vec::new();
    for l in 0..engine.cfg.n_layers {
        if !plan.layers[l].spd {
            continue;
        }
        if no_b2b && plan.layers[l].recovery == Some(Recovery::HgB2b) {
            return Err(bad(format!(
                "block {l} is recovered by head grouping + B2B; --no-b2b would keep \
                     its grouped heads untrained: drop --no-b2b, or plan it without \
                     head grouping"
            )));
        }
        let b2b = (!no_b2b).then_some(&dcfg);
        let (w, rep) = recover_layer(&mut engine, &seqs, l, b2b, ccfg.as_ref(), dcfg.threads)?;
        reports.push((l, rep.clone()));
        if let Some(c) = &rep.comp {
            eprintln!("{}", comp_fit_line(l, c));
        }
        let lp = &mut plan.layers[l];
        lp.compensated = rep.comp.is_some();
        match &rep.b2b {
            Some(b) => {
                eprintln!(
                    "block {l}: mse {:.3e} -> {:.3e} in {:.1}s on {}{}",
                    b.mse_before,
                    b.mse_after,
                    b.secs,
                    b.device,
                    b.note()
                );
                if b.kept_original {
                    // its original weights (plus any compensation)
                    lp.recovery = Some(Recovery::ZeroShot);
                } else if lp.recovery != Some(Recovery::HgB2b) {
                    lp.recovery = Some(Recovery::B2b);
                }
            }
            None => lp.recovery = Some(Recovery::ZeroShot),
        }
        if lp.compensated || lp.recovery != Some(Recovery::ZeroShot) {
            blocks.push((l, w));
        }
    }
    if blocks.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "distillation improved no SPD block of {} (see above); nothing written",
            plan_path.display()
        )));
    }
    let w = sibling(&out, "safetensors");
    // blocks that kept the model's weights (LC only, or B2B that did not help) store
    // only their compensation
    let original: Vec<usize> = blocks
        .iter()
        .map(|(l, _)| *l)
        .filter(|l| plan.layers[*l].recovery == Some(Recovery::ZeroShot))
        .collect();
    save_recovered(&w, &blocks, &original)?;
    plan.set_distilled(&w)?;
    plan.model_sha256 = sha.unwrap_or(plan.model_sha256);
    if !plan.notes.is_object() {
        plan.notes = serde_json::json!({});
    }
    plan.notes["distillation_settings"] = distill_settings(&train, &dcfg);
    plan.notes["distillation"] = serde_json::json!(reports);
    plan.notes["b2b"] = serde_json::json!(!no_b2b);
    if let Some(c) = &ccfg {
        plan.notes["compensation"] = serde_json::json!({
            "rank": c.rank, "ridge": c.ridge, "holdout": c.holdout,
        });
    }
    plan.save(&out)?;
    eprintln!("wrote {} and {}", out.display(), w.display());
    Ok(())
}
