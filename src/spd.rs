//! Sync-Point Drop: the plan file, sensitivity analysis (the SPD paper's Algorithm 1), the
//! sensitivity classes, and the plot. The planner lives in [`crate::planner`].
//!
//! Sensitivity of block i: the perplexity change on calibration text when block i is switched
//! to SPD with every later block already SPD, walking from the last block to the first (L+1
//! perplexity evaluations).

#![warn(missing_docs)]

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::eval::{score_tokens, PplResult};
use crate::weights::ModelFiles;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The plan file format this build reads and writes; [`SpdPlan::load`] refuses others.
pub const PLAN_VERSION: u32 = 1;

/// What an SPD choice (`--spd`: `none`, `all`, `layers:LIST` or a plan file) changes in the
/// collectives of a model of `n_layers` blocks, as rendezvous terms: the blocks that drop
/// their attention all-reduce (`spd`, one digit per block) and the head groups
/// (`head_groups`). A plan counts by what it switches, not by its file's name or bytes.
pub fn rank_terms(spec: &str, n_layers: usize) -> Result<crate::comm::rendezvous::Terms> {
    let (mask, groups) = match spec {
        "none" => (vec![false; n_layers], Vec::new()),
        "all" => (vec![true; n_layers], Vec::new()),
        s if s.starts_with("layers:") => (layer_mask(&s["layers:".len()..], n_layers)?, Vec::new()),
        plan => {
            let plan = SpdPlan::load(Path::new(plan))?;
            let groups = plan
                .layers
                .iter()
                .enumerate()
                .filter_map(|(l, lp)| {
                    Some(format!(
                        "{l}:{:?}:{:?}",
                        lp.heads.as_ref()?,
                        lp.ffn_order.as_ref()?
                    ))
                })
                .collect();
            (plan.spd_mask(), groups)
        }
    };
    let bits: String = mask.iter().map(|b| if *b { '1' } else { '0' }).collect();
    // a digest keeps the term short (a 64-head model's groups on 80 blocks run to kilobytes)
    let groups = if groups.is_empty() {
        "none".to_string()
    } else {
        let hex = crate::comm::rendezvous::short_digest(groups.join(";").as_bytes());
        format!("{}-blocks-sha256:{hex}", groups.len())
    };
    Ok(crate::comm::rendezvous::Terms::new()
        .with("spd", bits)
        .with("head_groups", groups))
}

/// A zero-shot SPD mask from a block list such as `5,8,20-28` (numbered from 0, ranges
/// inclusive): the runner's `--spd layers:...`, for evaluating any set of blocks without a
/// plan file. Errors name the offending item.
pub fn layer_mask(list: &str, n_layers: usize) -> Result<Vec<bool>> {
    let bad = |m: String| Error::InvalidArgument(format!("SPD block list `{list}`: {m}"));
    let num = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("`{}` is not a block number", x.trim())))
    };
    let mut mask = vec![false; n_layers];
    for part in list.split(',').filter(|p| !p.trim().is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b || b >= n_layers {
            return Err(bad(format!(
                "`{}` is not within blocks 0..={}",
                part.trim(),
                n_layers.saturating_sub(1)
            )));
        }
        mask[a..=b].iter_mut().for_each(|m| *m = true);
    }
    if !mask.contains(&true) {
        return Err(bad("no blocks (use --spd none for none)".into()));
    }
    Ok(mask)
}

/// How an SPD block keeps its accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recovery {
    /// Switch the block as it is.
    ZeroShot,
    /// Block-to-block distillation of the SPD block against the original TP block.
    B2b,
    /// Head grouping, then B2B.
    HgB2b,
}

/// One block's entry in a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerPlan {
    /// The block drops its attention all-reduce (SPD block).
    pub spd: bool,
    /// How an SPD block was recovered; None for a standard block.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recovery: Option<Recovery>,
    /// Head permutation of this block (head grouping); None = the default layout.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub heads: Option<Vec<Vec<usize>>>,
    /// With `heads`: which even FFN shard each rank gets.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ffn_order: Option<Vec<usize>>,
    /// Sensitivity measured for this block, for the record.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sensitivity: Option<f64>,
    /// The SPD block has linear compensation ([`crate::compensate`]; on top of its
    /// `recovery`), stored in the distilled weights file.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub compensated: bool,
}

/// A versioned SPD plan: which blocks drop their attention sync point, for which model and
/// TP layout, and how each was recovered.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpdPlan {
    /// [`PLAN_VERSION`] when written.
    pub version: u32,
    /// sha256 of the model file(s): the GGUF, or a HF folder's safetensors files and its
    /// config.json ([`model_sha256`]).
    pub model_sha256: String,
    /// The TP degree the plan was made for (SPD's error depends on it).
    pub tp: usize,
    /// Query heads per rank, e.g. "3/2/2/2" (the contiguous layout); an engine with another
    /// head assignment adds it, e.g. "2/2 (heads 0,2/1,3)".
    pub head_partition: String,
    /// One entry per block, in layer order.
    pub layers: Vec<LayerPlan>,
    /// safetensors file with distilled block weights, relative to the plan file.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub distilled: Option<PathBuf>,
    /// sha256 of that file when the plan was written: a plan refuses weights that are not
    /// the ones it was made with (a later run writing to the same name, a mix-up in copying).
    /// Absent in plans from before it was recorded; those load without the check.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub distilled_sha256: Option<String>,
    /// Free-form provenance: budget, thresholds, scores.
    #[serde(default)]
    pub notes: serde_json::Value,
}

/// sha256 of the model's file(s), hex: the GGUF (its config is in its metadata), or a HF
/// folder's `*.safetensors` in name order followed by its `config.json` (the same weights
/// under another config are another model: a plan made for one must not load on the other).
pub fn model_sha256(files: &ModelFiles) -> Result<String> {
    let mut paths: Vec<PathBuf> = match files {
        ModelFiles::Synthetic(m) => {
            let mut h = Sha256::new();
            h.update(format!("{}:{}", m.spec, m.seed));
            return Ok(crate::files::hex(&h.finalize()));
        }
        ModelFiles::Gguf(g) => vec![g.path.clone()],
        ModelFiles::SafeTensors(s) => std::fs::read_dir(&s.dir)
            .map_err(|e| Error::io(&s.dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect(),
    };
    paths.sort();
    if let ModelFiles::SafeTensors(s) = files {
        paths.push(s.dir.join("config.json"));
    }
    let mut h = Sha256::new();
    for p in paths {
        let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        std::io::copy(&mut f, &mut h).map_err(|e| Error::io(&p, e))?;
    }
    Ok(crate::files::hex(&h.finalize()))
}

impl SpdPlan {
    /// A plan with the given SPD blocks for `engine`'s model and layout.
    pub fn new(engine: &Engine, sha: String, spd: &[bool], recovery: Recovery) -> SpdPlan {
        SpdPlan {
            version: PLAN_VERSION,
            model_sha256: sha,
            tp: engine.tp(),
            head_partition: head_partition(engine),
            layers: spd
                .iter()
                .map(|s| LayerPlan {
                    spd: *s,
                    recovery: s.then_some(recovery),
                    heads: None,
                    ffn_order: None,
                    sensitivity: None,
                    compensated: false,
                })
                .collect(),
            distilled: None,
            distilled_sha256: None,
            notes: serde_json::Value::Null,
        }
    }

    /// Which blocks are SPD, in layer order (what [`Engine::set_spd`] takes).
    pub fn spd_mask(&self) -> Vec<bool> {
        self.layers.iter().map(|l| l.spd).collect()
    }

    /// The fraction of blocks that are SPD, in [0, 1].
    pub fn fraction(&self) -> f64 {
        self.layers.iter().filter(|l| l.spd).count() as f64 / self.layers.len().max(1) as f64
    }

    /// Read a plan file (refusing another format version). Not checked against a model:
    /// [`SpdPlan::validate`] or [`SpdPlan::load_into`] do that.
    pub fn load(path: &Path) -> Result<SpdPlan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad =
            |e: serde_json::Error| Error::InvalidArgument(format!("plan {}: {e}", path.display()));
        // the version first: a plan of another version may have other fields, and saying
        // "missing field" about it would hide what is wrong
        let value: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
        match value.get("version") {
            Some(v) if v.as_u64() == Some(PLAN_VERSION as u64) => {}
            v => {
                return Err(Error::InvalidArgument(format!(
                    "plan {}: version {} (this syncdrop reads version {PLAN_VERSION})",
                    path.display(),
                    v.map_or("missing".to_string(), |v| v.to_string())
                )))
            }
        }
        serde_json::from_value(value).map_err(bad)
    }

    /// Write the plan (atomically: an interrupted write leaves the previous file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = crate::files::to_json_pretty_compact(self);
        crate::files::write_atomic(path, text.as_bytes())
    }

    /// Name `weights` (written by [`crate::distill::save_distilled`] beside the plan's file)
    /// as this plan's distilled weights, with their sha256.
    pub fn set_distilled(&mut self, weights: &Path) -> Result<()> {
        let name = weights.file_name().ok_or_else(|| {
            Error::InvalidArgument(format!("{}: not a file name", weights.display()))
        })?;
        self.distilled_sha256 = Some(crate::files::sha256_file(weights)?);
        self.distilled = Some(PathBuf::from(name));
        Ok(())
    }

    /// The blocks whose weights come from the distilled file (recovery B2B or HG+B2B, or
    /// linear compensation).
    pub fn distilled_layers(&self) -> Vec<usize> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                l.spd
                    && (l.compensated
                        || matches!(l.recovery, Some(Recovery::B2b | Recovery::HgB2b)))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Load the plan at `path` and switch `engine` to it: checked against the model (`sha`,
    /// from [`model_sha256`]) and the layout, SPD blocks set, head groups applied, distilled
    /// weights (beside the plan) checked against the plan's sha256 and loaded. What an
    /// inference engine calls to run a plan the tools made.
    pub fn load_into(path: &Path, engine: &mut Engine, sha: &str) -> Result<SpdPlan> {
        let plan = SpdPlan::load(path)?;
        plan.validate(engine, sha)?;
        let weights = plan.distilled_path(path)?;
        // compensation flags against the file, before anything is switched
        let want: Vec<usize> = (0..plan.layers.len())
            .filter(|&l| plan.layers[l].spd && plan.layers[l].compensated)
            .collect();
        let loads = plan.distilled_layers();
        let has: Vec<usize> = match &weights {
            Some(w) => crate::distill::compensated_in(w)?
                .into_iter()
                .filter(|l| loads.contains(l))
                .collect(),
            None => Vec::new(),
        };
        if has != want {
            return Err(Error::InvalidArgument(format!(
                "plan {}: blocks {want:?} have linear compensation, but its distilled weights \
                 hold it for blocks {has:?}",
                path.display()
            )));
        }
        engine.set_spd(&plan.spd_mask())?;
        for (l, lp) in plan.layers.iter().enumerate() {
            if let (Some(h), Some(f)) = (&lp.heads, &lp.ffn_order) {
                crate::headgroup::apply(engine, l, h.clone(), f.clone())?;
            }
        }
        if let Some(w) = weights {
            let got = crate::distill::load_distilled(&w, engine, &loads)?;
            debug_assert_eq!(got, want, "checked against the header above");
        }
        Ok(plan)
    }

    /// The distilled weights file of the plan stored at `plan_path`, checked: present when a
    /// block needs it, and the bytes the plan was written with. None when no block needs it.
    pub fn distilled_path(&self, plan_path: &Path) -> Result<Option<PathBuf>> {
        let needs = self.distilled_layers();
        let Some(name) = &self.distilled else {
            if needs.is_empty() {
                return Ok(None);
            }
            return Err(Error::InvalidArgument(format!(
                "plan {}: blocks {needs:?} are distilled (B2B) or compensated but the plan names \
                 no distilled weights file; distil them again (`distill --spd {}`)",
                plan_path.display(),
                plan_path.display()
            )));
        };
        let w = plan_path.parent().unwrap_or(Path::new(".")).join(name);
        if !w.is_file() {
            return Err(Error::InvalidArgument(format!(
                "plan {}: its distilled weights {} are missing (they are written beside the \
                 plan; copy them with it)",
                plan_path.display(),
                w.display()
            )));
        }
        if let Some(want) = &self.distilled_sha256 {
            let got = crate::files::sha256_file(&w)?;
            if &got != want {
                return Err(Error::InvalidArgument(format!(
                    "plan {}: its distilled weights {} are not the ones it was written with \
                     (sha256 {}.., the plan expects {}..): another run wrote to that name, or \
                     the files were mixed up in copying",
                    plan_path.display(),
                    w.display(),
                    &got[..12],
                    want.get(..12).unwrap_or(want)
                )));
            }
        }
        Ok(Some(w))
    }

    /// Check the plan against a loaded engine: same model bytes, TP degree, head partition
    /// and layer count. Every mismatch is named.
    pub fn validate(&self, engine: &Engine, sha: &str) -> Result<()> {
        let mut bad = Vec::new();
        if self.model_sha256 != sha {
            bad.push(format!(
                "model sha256 {}.. but the loaded model is {}..",
                &self.model_sha256.get(..12).unwrap_or(&self.model_sha256),
                &sha[..12.min(sha.len())]
            ));
        }
        if self.tp != engine.tp() {
            bad.push(format!(
                "TP {} but the engine runs TP {}",
                self.tp,
                engine.tp()
            ));
        }
        let partition = head_partition(engine);
        if self.head_partition != partition {
            bad.push(format!(
                "head partition {} but the engine has {partition}",
                self.head_partition
            ));
        }
        if self.layers.len() != engine.cfg.n_layers {
            bad.push(format!(
                "{} layers but the model has {}",
                self.layers.len(),
                engine.cfg.n_layers
            ));
        }
        for (l, lp) in self.layers.iter().enumerate() {
            match (&lp.heads, &lp.ffn_order) {
                (Some(heads), Some(ffn_order)) => {
                    if let Err(e) = check_grouping(engine, heads, ffn_order) {
                        bad.push(format!("block {l}: {e}"));
                    }
                }
                (None, None) => {
                    if lp.spd && lp.recovery == Some(Recovery::HgB2b) {
                        bad.push(format!(
                            "block {l} is recovered by head grouping (hg-b2b) but has no \
                             head permutation"
                        ));
                    }
                }
                _ => bad.push(format!(
                    "block {l} has a head permutation or an MLP shard order, not both"
                )),
            }
            if lp.compensated && !lp.spd {
                bad.push(format!(
                    "block {l} has linear compensation but is not an SPD block"
                ));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "SPD plan does not match: {}",
                bad.join("; ")
            )))
        }
    }
}

/// The engine's head partition as a plan records it: the query heads of each rank
/// ("3/2/2/2"), which names the contiguous layout; any other assignment of heads to ranks (an
/// explicit `EngineOptions::layout`) is spelled out, since SPD's error and the distilled
/// weights depend on which heads share a rank, not only on how many.
fn head_partition(engine: &Engine) -> String {
    let counts = engine.layout.head_partition();
    let contiguous = crate::layout::TpLayout::new(&engine.cfg, engine.tp()).ok();
    if contiguous.as_ref() == Some(&engine.layout) {
        return counts;
    }
    let heads: Vec<String> = engine
        .layout
        .ranks
        .iter()
        .map(|r| {
            let h: Vec<String> = r.q_heads.iter().map(|h| h.to_string()).collect();
            h.join(",")
        })
        .collect();
    format!("{counts} (heads {})", heads.join("/"))
}

/// A block's recorded head grouping fits the engine's model and layout: every head once, an
/// MLP order that permutes the ranks, each rank keeping its number of query heads.
fn check_grouping(engine: &Engine, heads: &[Vec<usize>], ffn_order: &[usize]) -> Result<()> {
    let g = crate::headgroup::Grouping {
        heads: heads.to_vec(),
        ffn_order: ffn_order.to_vec(),
        dissimilarity_before: 0.0,
        dissimilarity_after: 0.0,
    };
    let shards = g.shards(&engine.cfg)?;
    let counts = |s: &[crate::layout::RankShard]| -> Vec<usize> {
        s.iter().map(|r| r.q_heads.len()).collect()
    };
    if counts(&shards) != counts(&engine.layout.ranks) {
        return Err(Error::InvalidArgument(format!(
            "head permutation {heads:?} gives the ranks {:?} query heads, the engine's \
             layout {:?}",
            counts(&shards),
            counts(&engine.layout.ranks)
        )));
    }
    Ok(())
}

/// Perplexity of several token sequences (each scored on its own).
pub fn perplexity_of(engine: &mut Engine, seqs: &[Vec<u32>], window: usize) -> Result<f64> {
    let mut total = PplResult::default();
    for (nll, n) in passage_nlls(engine, seqs, window)? {
        total.nll_sum += nll;
        total.tokens_scored += n;
    }
    if total.tokens_scored == 0 {
        // a perplexity of nothing would read 1.0, and every block's sensitivity 0
        return Err(Error::InvalidArgument(format!(
            "perplexity: none of the {} sequences has 2 or more tokens to score",
            seqs.len()
        )));
    }
    Ok(total.ppl())
}

/// (summed NLL, tokens scored) of every sequence of 2 or more tokens, each scored in windows
/// of `window` tokens that overlap by one (every token after the first scored once, see
/// [`score_tokens`]); shorter sequences are skipped.
pub fn passage_nlls(
    engine: &mut Engine,
    seqs: &[Vec<u32>],
    window: usize,
) -> Result<Vec<(f64, usize)>> {
    seqs.iter()
        .filter(|s| s.len() >= 2)
        .map(|s| score_tokens(engine, s, window, window).map(|r| (r.nll_sum, r.tokens_scored)))
        .collect()
}

/// Per-block SPD sensitivity (the paper's Algorithm 1), as [`sensitivity`] measures it and
/// `llama sensitivity` saves it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Sensitivity {
    /// Perplexity with no SPD block.
    pub base_ppl: f64,
    /// `ppl[i]`: perplexity with blocks i.. all SPD.
    pub ppl_from: Vec<f64>,
    /// `sensitivity[i] = ppl_from[i] - ppl_from[i + 1]` (`ppl_from[L]` = base).
    pub sensitivity: Vec<f64>,
    /// The TP degree it was measured at (absent in files from before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp: Option<usize>,
    /// Calibration passages scored (likewise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passages: Option<usize>,
    /// The rank of the linear compensation every SPD block ran with while it was measured
    /// (`plan --compensate`); None: zero-shot SPD blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_rank: Option<usize>,
}

impl Sensitivity {
    /// Refuses a sensitivity measured for another model depth or TP degree than `engine`'s.
    pub fn check_for(&self, engine: &Engine) -> Result<()> {
        let n = engine.cfg.n_layers;
        if self.sensitivity.len() != n || self.ppl_from.len() != n {
            return Err(Error::InvalidArgument(format!(
                "the sensitivity has {} blocks, the model {n}: it was measured on another model",
                self.sensitivity.len()
            )));
        }
        if let Some(tp) = self.tp.filter(|tp| *tp != engine.tp()) {
            return Err(Error::InvalidArgument(format!(
                "the sensitivity was measured at TP {tp}, this run is TP {}: SPD's error depends \
                 on the TP degree, measure it again at TP {}",
                engine.tp(),
                engine.tp()
            )));
        }
        Ok(())
    }
}

/// The SPD paper's Algorithm 1 on `calib` sequences. Leaves the engine's plan all-off.
pub fn sensitivity(
    engine: &mut Engine,
    calib: &[Vec<u32>],
    window: usize,
    progress: bool,
) -> Result<Sensitivity> {
    let l = engine.cfg.n_layers;
    let bar = crate::progress::bar(l as u64 + 1, "sensitivity", progress);
    let mut mask = vec![false; l];
    engine.set_spd(&mask)?;
    let base = perplexity_of(engine, calib, window)?;
    bar.inc(1);
    let mut ppl_from = vec![0.0; l];
    let mut prev = base;
    let mut sens = vec![0.0; l];
    for i in (0..l).rev() {
        mask[i] = true;
        engine.set_spd(&mask)?;
        let p = perplexity_of(engine, calib, window)?;
        ppl_from[i] = p;
        sens[i] = p - prev;
        prev = p;
        bar.inc(1);
        bar.set_message(format!("block {i}: {:+.3}", sens[i]));
    }
    bar.finish_and_clear();
    engine.set_spd(&vec![false; l])?;
    Ok(Sensitivity {
        base_ppl: base,
        ppl_from,
        sensitivity: sens,
        tp: Some(engine.tp()),
        passages: Some(calib.iter().filter(|s| s.len() >= 2).count()),
        compensation_rank: None,
    })
}

/// Sensitivity classes of the paper: in-sensitive (s <= t1), sensitive (t1 < s <= t2),
/// extremely sensitive (s > t2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Class {
    /// s <= t1: switched zero-shot.
    InSensitive,
    /// t1 < s <= t2: switched after distillation (B2B).
    Sensitive,
    /// s > t2: switched after head grouping and distillation (HG+B2B), or kept standard.
    ExtremelySensitive,
}

/// The class of a block of sensitivity `s` under thresholds `t1 <= t2`.
pub fn classify(s: f64, t1: f64, t2: f64) -> Class {
    if s <= t1 {
        Class::InSensitive
    } else if s <= t2 {
        Class::Sensitive
    } else {
        Class::ExtremelySensitive
    }
}

/// Bar chart of per-block sensitivity with the two thresholds, as SVG. A threshold that is not
/// finite (a plan with no block in that class has t = -inf) draws no line; its legend entry
/// says so.
pub fn plot_sensitivity(s: &Sensitivity, t1: f64, t2: f64, title: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: String| Error::InvalidArgument(format!("plot {}: {e}", path.display()));
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let n = s.sensitivity.len();
    // Clip the axis so a few extreme blocks do not flatten the rest; clipped bars are labelled.
    let mut sorted = s.sensitivity.clone();
    sorted.sort_by(f64::total_cmp);
    let p80 = sorted.get(sorted.len() * 4 / 5).copied().unwrap_or(0.0);
    let cap = (t2 * 2.0).max(p80 * 3.0).max(1e-3);
    let hi = s.sensitivity.iter().cloned().fold(1e-3, f64::max).min(cap) * 1.15;
    let lo = s.sensitivity.iter().cloned().fold(0.0, f64::min) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, lo..hi)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("block")
        .y_desc("perplexity change when switched to SPD")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(s.sensitivity.iter().enumerate().map(|(i, v)| {
            let color = match classify(*v, t1, t2) {
                Class::InSensitive => GREEN.mix(0.7),
                Class::Sensitive => RGBColor(230, 160, 0).mix(0.8),
                Class::ExtremelySensitive => RED.mix(0.8),
            };
            Rectangle::new(
                [(i as f64 - 0.4, 0.0), (i as f64 + 0.4, v.min(hi))],
                color.filled(),
            )
        }))
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(
            s.sensitivity
                .iter()
                .enumerate()
                .filter(|(_, v)| **v > hi)
                .map(|(i, v)| {
                    Text::new(
                        format!("{v:.0}"),
                        (i as f64 + 0.45, hi * 0.97),
                        ("sans-serif", 13),
                    )
                }),
        )
        .map_err(|e| err(e.to_string()))?;
    for (t, label) in [(t1, "t1"), (t2, "t2")] {
        if !t.is_finite() {
            // no line; an empty series keeps the legend entry
            chart
                .draw_series(LineSeries::new(Vec::<(f64, f64)>::new(), BLACK.mix(0.5)))
                .map_err(|e| err(e.to_string()))?
                .label(format!("{label}: none (no block in that class)"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.5)));
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                vec![(-0.5, t), (n as f64 - 0.5, t)],
                BLACK.mix(0.5),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(format!("{label} = {t:.3}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.5)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// One point of an accuracy-vs-SPD-fraction sweep.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SweepPoint {
    /// TP degree.
    pub tp: usize,
    /// "zero-shot", "b2b", "hg+b2b" or "lc" (zero-shot with linear compensation).
    pub method: String,
    /// Number of SPD blocks (the least sensitive ones).
    pub spd_blocks: usize,
    /// `spd_blocks` over the number of blocks.
    pub fraction: f64,
    /// LAMBADA perplexity.
    pub ppl: f64,
    /// Average zero-shot accuracy over the tasks, in [0, 1].
    pub acc: f64,
    /// Its standard error (unpaired), in [0, 1].
    pub acc_stderr: f64,
}

/// Two panels (average accuracy, perplexity) versus SPD fraction, one line per (TP, method).
pub fn plot_sweep(points: &[SweepPoint], title: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: String| Error::InvalidArgument(format!("plot {}: {e}", path.display()));
    let root = SVGBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 18))
        .map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(550);
    let mut keys: Vec<(usize, String)> = points.iter().map(|p| (p.tp, p.method.clone())).collect();
    keys.sort();
    keys.dedup();
    let palette = [
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(230, 140, 0),
        RGBColor(120, 60, 20),
    ];
    let mut tps: Vec<usize> = keys.iter().map(|k| k.0).collect();
    tps.dedup();
    for (panel, ylabel, get, clip) in [
        (
            &left,
            "average zero-shot accuracy",
            (|p: &SweepPoint| p.acc) as fn(&SweepPoint) -> f64,
            false,
        ),
        (
            &right,
            "LAMBADA perplexity (clipped at 2.5x the best; labels give the value)",
            |p: &SweepPoint| p.ppl,
            true,
        ),
    ] {
        let ys: Vec<f64> = points.iter().map(get).collect();
        let (lo, mut hi) = ys
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
        if clip {
            hi = hi.min(2.5 * lo);
        }
        let pad = (hi - lo).max(1e-3) * 0.08;
        let mut clipped = 0;
        let mut chart = ChartBuilder::on(panel)
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..1f64, (lo - pad)..(hi + pad))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("fraction of blocks with SPD")
            .y_desc(ylabel)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (tp, method) in keys.iter() {
            // colour per TP degree, line weight per method
            let color = palette[tps.iter().position(|t| t == tp).unwrap_or(0) % palette.len()];
            let mut line: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.tp == *tp && &p.method == method)
                .map(|p| (p.fraction, get(p)))
                .collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            let width = match method.as_str() {
                "zero-shot" => 1,
                "lc" => 2,
                "b2b" => 3,
                _ => 5,
            };
            let shown: Vec<(f64, f64)> = line.iter().map(|(x, y)| (*x, y.min(hi))).collect();
            chart
                .draw_series(LineSeries::new(shown.clone(), color.stroke_width(width)))
                .map_err(|e| err(e.to_string()))?
                .label(format!("TP {tp} {method}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(width))
                });
            chart
                .draw_series(
                    shown
                        .iter()
                        .map(|(x, y)| Circle::new((*x, *y), 3, color.filled())),
                )
                .map_err(|e| err(e.to_string()))?;
            for (x, y) in line.iter().filter(|(_, y)| *y > hi) {
                // clipped: write the value, stacked below the top edge
                clipped += 1;
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("TP {tp} {method}: {y:.0}"),
                        (*x - 0.33, hi - pad * (1.0 + 1.6 * clipped as f64)),
                        ("sans-serif", 12),
                    )))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// A forest plot of accuracy losses against a baseline (`runner compare --plot`): one row per
/// run, its average loss in points with the 95% interval as a bar, each task's own loss as a
/// coloured dot on the same row, and vertical lines at no loss and at `budget_points`.
pub fn plot_comparisons(
    rows: &[crate::tasks::Comparison],
    budget_points: Option<f64>,
    title: &str,
    path: &Path,
) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: String| Error::InvalidArgument(format!("plot {}: {e}", path.display()));
    if rows.is_empty() {
        return Err(err("no runs to plot".into()));
    }
    let pts = |d: &crate::tasks::PairedDiff| 100.0 * d.diff;
    let mut lo = budget_points.unwrap_or(0.0).min(0.0);
    let mut hi = budget_points.unwrap_or(0.0).max(0.0);
    for r in rows {
        let (a, b) = r.average.ci95();
        lo = lo.min(100.0 * a);
        hi = hi.max(100.0 * b);
        for (_, d) in &r.per_task {
            lo = lo.min(pts(d));
            hi = hi.max(pts(d));
        }
    }
    let pad = ((hi - lo) * 0.06).max(0.2);
    // room on the right for the legend
    let (lo, hi) = (lo - pad, hi + pad + 0.3 * (hi - lo + 2.0 * pad));
    let n = rows.len();
    let longest = rows
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0);
    let height = (110 + 70 * n).max(330) as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let y_of = |i: usize| (n - 1 - i) as f64; // first run on top
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size((7 * longest.min(60) + 16) as u32)
        .build_cartesian_2d(lo..hi, -0.6f64..n as f64 - 0.4)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() > 1e-6 || i < 0.0 || i >= n as f64 {
                return String::new();
            }
            rows[n - 1 - i as usize].label.clone()
        })
        .x_desc(
            "accuracy loss vs the baseline, points (dots: tasks; bar: 95% interval of the average)",
        )
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let mut refs = vec![(0.0, BLACK.mix(0.4), "no loss".to_string())];
    if let Some(b) = budget_points {
        refs.push((b, RED.mix(0.8), format!("budget {b} pt")));
    }
    for (x, color, label) in refs {
        chart
            .draw_series(LineSeries::new(
                vec![(x, -0.6), (x, n as f64 - 0.4)],
                color.stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    // task colours in order of first appearance
    let mut tasks: Vec<&str> = Vec::new();
    for r in rows {
        for (t, _) in &r.per_task {
            if !tasks.contains(&t.as_str()) {
                tasks.push(t);
            }
        }
    }
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    for (k, task) in tasks.iter().enumerate() {
        let color = palette[k % palette.len()];
        // spread the tasks a little in y so equal losses stay visible
        let dy = 0.24 * ((k as f64 + 0.5) / tasks.len() as f64 - 0.5);
        let dots: Vec<(f64, f64)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.per_task
                    .iter()
                    .find(|(t, _)| t == task)
                    .map(|(_, d)| (pts(d), y_of(i) + dy))
            })
            .collect();
        chart
            .draw_series(
                dots.into_iter()
                    .map(|p| Circle::new(p, 3, color.mix(0.75).filled())),
            )
            .map_err(|e| err(e.to_string()))?
            .label(task.to_string())
            .legend(move |(x, y)| Circle::new((x + 8, y), 3, color.filled()));
    }
    for (i, r) in rows.iter().enumerate() {
        let (a, b) = r.average.ci95();
        let y = y_of(i);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(100.0 * a, y), (100.0 * b, y)],
                BLACK.stroke_width(3),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Circle::new(
                (pts(&r.average), y),
                6,
                BLACK.filled(),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{:+.2} +- {:.2}", pts(&r.average), 100.0 * r.average.stderr),
                (pts(&r.average), y + 0.36),
                ("sans-serif", 12),
            )))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::layer_mask;

    #[test]
    fn layer_lists_parse_with_ranges_and_reject_bad_items() {
        let m = layer_mask("5, 8,20-22,29", 30).unwrap();
        let on: Vec<usize> = (0..30).filter(|i| m[*i]).collect();
        assert_eq!(on, vec![5, 8, 20, 21, 22, 29]);
        assert_eq!(
            layer_mask("3-3", 4).unwrap(),
            vec![false, false, false, true]
        );
        for bad in ["30", "2-40", "5-3", "x", "1,,a", "", " , "] {
            assert!(layer_mask(bad, 30).is_err(), "{bad:?} accepted");
        }
        let e = layer_mask("1,31", 30).unwrap_err().to_string();
        assert!(e.contains("`31`") && e.contains("0..=29"), "{e}");
    }
}
