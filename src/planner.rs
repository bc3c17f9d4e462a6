//! The SPD planner: given a TP degree and an accuracy budget, choose the largest set of SPD
//! blocks that stays within budget, verified on a held-out split. The SPD paper hand-sets its
//! thresholds t1, t2 and the SPD fraction; here they are outputs.
//!
//! 1. Sensitivity (Algorithm 1) orders the blocks from least to most sensitive.
//! 2. Zero-shot: binary search for the longest prefix of that order within budget on the
//!    search split (a handful of evaluations, not L); "within" is the point estimate, or,
//!    with `search_z` > 0, the loss plus that many paired standard errors.
//!    Once, at the first step whose 95% half-width (1.96 paired s.e.) is wider than the
//!    budget, the log warns that the split cannot resolve it ([`resolution_warning`]) and
//!    says what sample would.
//! 3. B2B: the next blocks in order are distilled one by one and kept while the budget holds.
//! 4. The final plan is scored on a held-out split disjoint from the search split.
//!
//! With linear compensation ([`Search::compensation`], ours, not the paper's) every SPD
//! block the search tries runs with its maps (SPD + LC), and B2B trains with them.

#![warn(missing_docs)]

use crate::distill::{
    compensated_weights, load_compensated, recover_layer, BlockCompensation, CompReport,
    DistillConfig,
};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::spd::{passage_nlls, Recovery, Sensitivity, SpdPlan};
use crate::tasks::{
    evaluate_suite, paired_difference, paired_difference_per_task, Doc, PairedDiff, SuiteScore,
};
use crate::tokenizer::Tokenizer;

/// What "within budget" means. Both compare against the same engine with no SPD block.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Budget {
    /// Relative perplexity increase, e.g. 0.01 = +1%.
    PplIncrease(f64),
    /// Absolute drop of average task accuracy, e.g. 0.01 = 1 point.
    AccDrop(f64),
}

/// A score and, where the metric has them, the per-document outcomes (accuracy suites) or
/// per-passage log-likelihoods (perplexity) behind it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Scored {
    /// The score: perplexity, or average accuracy in [0, 1].
    pub value: f64,
    /// Accuracy metrics: the suite with its per-document outcomes.
    pub suite: Option<SuiteScore>,
    /// Perplexity metrics: (summed NLL, tokens scored) per passage, in passage order.
    pub passages: Option<Vec<(f64, usize)>>,
}

impl Scored {
    /// A bare value, with nothing to pair.
    pub fn value(value: f64) -> Scored {
        Scored {
            value,
            suite: None,
            passages: None,
        }
    }
}

/// The relative perplexity increase `ppl(plan) / ppl(base) - 1` of two scorings of the same
/// passages, with a paired standard error: per passage i, the NLL difference d_i over n_i
/// tokens; the log-ratio is sum d_i / sum n_i (a ratio estimator, passages as clusters, so
/// tokens of one passage are not treated as independent), its s.e. is
/// sqrt(m / (m - 1) * sum (d_i - r n_i)^2) / sum n_i over m passages, and the delta method
/// carries it to the increase (s.e. times ppl ratio). `discordant` counts the passages whose
/// NLL rose.
pub fn paired_ppl_increase(base: &[(f64, usize)], plan: &[(f64, usize)]) -> Result<PairedDiff> {
    let bad = |m: String| Error::InvalidArgument(format!("paired perplexity: {m}"));
    if base.len() != plan.len() || base.is_empty() {
        return Err(bad(format!(
            "{} passages against {}",
            plan.len(),
            base.len()
        )));
    }
    if let Some(i) = (0..base.len()).find(|i| base[*i].1 != plan[*i].1) {
        return Err(bad(format!(
            "passage {i}: {} tokens scored against {}",
            plan[i].1, base[i].1
        )));
    }
    let tokens: usize = base.iter().map(|p| p.1).sum();
    if tokens == 0 {
        return Err(bad("no tokens scored".into()));
    }
    let n = tokens as f64;
    let d: Vec<(f64, f64)> = base
        .iter()
        .zip(plan)
        .map(|(b, p)| (p.0 - b.0, b.1 as f64))
        .collect();
    let r = d.iter().map(|x| x.0).sum::<f64>() / n;
    let m = d.len() as f64;
    let var = if d.len() > 1 {
        m / (m - 1.0) * d.iter().map(|(di, ni)| (di - r * ni).powi(2)).sum::<f64>() / (n * n)
    } else {
        0.0
    };
    Ok(PairedDiff {
        diff: r.exp() - 1.0,
        stderr: r.exp() * var.sqrt(),
        docs: d.len(),
        discordant: d.iter().filter(|x| x.0 > 0.0).count(),
    })
}

/// A quality metric on one data split: perplexity (lower is better) or accuracy (higher).
pub trait Metric {
    /// The score of `engine` as it is now on `split` (0: search, 1: held out).
    fn score(&mut self, engine: &mut Engine, split: usize) -> Result<f64>;

    /// The score with its per-document outcomes where the metric has them ([`SuiteMetric`]
    /// does: the planner then reports paired statistics); the default has none.
    fn score_detailed(&mut self, engine: &mut Engine, split: usize) -> Result<Scored> {
        Ok(Scored::value(self.score(engine, split)?))
    }

    /// The TP baseline's score on `split`: [`plan`] asks this, with no SPD block set, for
    /// the two baselines it pairs every step against, so that [`BaselineCache`] can serve
    /// them from disk. The default scores the engine.
    fn score_baseline(&mut self, engine: &mut Engine, split: usize) -> Result<Scored> {
        self.score_detailed(engine, split)
    }

    /// A digest (hex) of what this metric's scores on `split` depend on besides the engine:
    /// its documents or passages and how they become tokens. None (the default): unknown,
    /// and [`BaselineCache`] then never caches it.
    fn data_digest(&self, split: usize) -> Result<Option<String>> {
        let _ = split;
        Ok(None)
    }
}

/// sha256 (hex) of `parts`, each length-prefixed (no two lists of parts hash alike).
fn digest_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    crate::files::hex(&h.finalize())
}

/// What a [`BaselineCache`] file holds: the baseline's score and outcomes, with what they
/// were measured on (checked when read, besides the file's name).
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedScore {
    format: String,
    identity: String,
    split: usize,
    data: String,
    scored: Scored,
}

const BASELINE_FORMAT: &str = "syncdrop-baseline-1";

/// A [`Metric`] whose TP baselines are kept on disk and reused: a planning run spends two
/// whole evaluations (the search and held-out splits) on the TP model before its first
/// step, and a later run on the same engine and data needs the same two. A baseline is
/// reused only when `identity` (the caller's description of everything that decides the
/// engine's numerics: build, model bytes, TP layout, backend, wire, threads, ...) and the
/// metric's [`Metric::data_digest`] both match; a metric without a digest is never
/// cached. An unreadable or mismatched file is reported through `log` and replaced.
pub struct BaselineCache<'m> {
    /// The metric scored when nothing matches (and for every SPD step).
    pub inner: &'m mut dyn Metric,
    /// The folder of cached baselines (created on the first write).
    pub dir: std::path::PathBuf,
    /// Everything besides the data that decides the baseline's outcomes.
    pub identity: String,
    /// Where the cache says what it did (a hit, a write, a file it could not use).
    pub log: &'m mut dyn FnMut(&str),
}

impl BaselineCache<'_> {
    /// The file that holds (or would hold) the baseline on `split`, if the metric has a
    /// digest for it.
    pub fn path(&self, split: usize) -> Result<Option<(std::path::PathBuf, String)>> {
        let Some(data) = self.inner.data_digest(split)? else {
            return Ok(None);
        };
        let key = digest_parts([
            BASELINE_FORMAT.as_bytes(),
            self.identity.as_bytes(),
            split.to_string().as_bytes(),
            data.as_bytes(),
        ]);
        Ok(Some((self.dir.join(format!("{}.json", &key[..32])), data)))
    }
}

impl Metric for BaselineCache<'_> {
    fn score(&mut self, engine: &mut Engine, split: usize) -> Result<f64> {
        self.inner.score(engine, split)
    }
    fn score_detailed(&mut self, engine: &mut Engine, split: usize) -> Result<Scored> {
        self.inner.score_detailed(engine, split)
    }
    fn data_digest(&self, split: usize) -> Result<Option<String>> {
        self.inner.data_digest(split)
    }
    fn score_baseline(&mut self, engine: &mut Engine, split: usize) -> Result<Scored> {
        let Some((path, data)) = self.path(split)? else {
            return self.inner.score_baseline(engine, split);
        };
        let which = if split == 0 { "search" } else { "held-out" };
        if path.exists() {
            let read = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<CachedScore>(&t).map_err(|e| e.to_string()));
            match read {
                Ok(c)
                    if c.format == BASELINE_FORMAT
                        && c.identity == self.identity
                        && c.split == split
                        && c.data == data =>
                {
                    (self.log)(&format!(
                        "the TP baseline on the {which} split: reused {} (same engine and data)",
                        path.display()
                    ));
                    return Ok(c.scored);
                }
                Ok(_) => (self.log)(&format!(
                    "warning: {} was written for another engine or data: replacing it",
                    path.display()
                )),
                Err(e) => (self.log)(&format!(
                    "warning: cannot use {} ({e}): replacing it",
                    path.display()
                )),
            }
        }
        let scored = self.inner.score_baseline(engine, split)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let record = CachedScore {
            format: BASELINE_FORMAT.into(),
            identity: self.identity.clone(),
            split,
            data,
            scored,
        };
        crate::files::write_atomic(
            &path,
            crate::files::to_json_pretty_compact(&record).as_bytes(),
        )?;
        (self.log)(&format!(
            "the TP baseline on the {which} split: kept in {} for later plans",
            path.display()
        ));
        Ok(record.scored)
    }
}

impl<F: FnMut(&mut Engine, usize) -> Result<f64>> Metric for F {
    fn score(&mut self, engine: &mut Engine, split: usize) -> Result<f64> {
        self(engine, split)
    }
}

/// Average task accuracy on a search split (0) and a held-out split (1) of documents.
pub struct SuiteMetric {
    /// The model's tokenizer.
    pub tok: Tokenizer,
    /// Per split: (task, documents) as [`evaluate_suite`] takes them.
    pub splits: [Vec<(String, Vec<Doc>)>; 2],
}

impl Metric for SuiteMetric {
    fn score(&mut self, engine: &mut Engine, split: usize) -> Result<f64> {
        Ok(self.score_detailed(engine, split)?.value)
    }
    fn data_digest(&self, split: usize) -> Result<Option<String>> {
        let mut parts = vec![b"suite".to_vec(), self.tok.fingerprint()?.into_bytes()];
        for (task, docs) in &self.splits[split] {
            parts.push(task.clone().into_bytes());
            for d in docs {
                parts.push(format!("{} {} {}", d.id, d.gold, d.choices.len()).into_bytes());
                for (ctx, cont) in &d.choices {
                    parts.push(ctx.clone().into_bytes());
                    parts.push(cont.clone().into_bytes());
                }
            }
        }
        Ok(Some(digest_parts(parts.iter().map(Vec::as_slice))))
    }
    fn score_detailed(&mut self, engine: &mut Engine, split: usize) -> Result<Scored> {
        let s = evaluate_suite(engine, &self.tok, &self.splits[split], false)?;
        Ok(Scored {
            value: s.average,
            suite: Some(s),
            passages: None,
        })
    }
}

/// Perplexity over a search split (0) and a held-out split (1) of token sequences (e.g.
/// LAMBADA passages), each scored in non-overlapping windows of `window` tokens. It reports
/// per-passage log-likelihoods, so the planner gives a perplexity budget a paired standard
/// error ([`paired_ppl_increase`]).
pub struct PplMetric {
    /// Token sequences of the search split (0) and the held-out split (1).
    pub splits: [Vec<Vec<u32>>; 2],
    /// Window length in tokens.
    pub window: usize,
}

impl Metric for PplMetric {
    fn score(&mut self, engine: &mut Engine, split: usize) -> Result<f64> {
        Ok(self.score_detailed(engine, split)?.value)
    }
    fn data_digest(&self, split: usize) -> Result<Option<String>> {
        let mut parts = vec![b"perplexity".to_vec(), self.window.to_string().into_bytes()];
        for p in &self.splits[split] {
            parts.push(p.iter().flat_map(|t| t.to_le_bytes()).collect());
        }
        Ok(Some(digest_parts(parts.iter().map(Vec::as_slice))))
    }
    fn score_detailed(&mut self, engine: &mut Engine, split: usize) -> Result<Scored> {
        let passages = passage_nlls(engine, &self.splits[split], self.window)?;
        let (nll, n) = passages
            .iter()
            .fold((0.0, 0usize), |(a, b), p| (a + p.0, b + p.1));
        if n == 0 {
            return Err(Error::InvalidArgument(format!(
                "perplexity split {split}: no passage of 2 or more tokens"
            )));
        }
        Ok(Scored {
            value: (nll / n as f64).exp(),
            suite: None,
            passages: Some(passages),
        })
    }
}

/// Held-out verdict on the plan's loss against the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    /// The whole approximate 95% interval of the loss is within the budget (or, without a
    /// standard error, the point estimate is).
    WithinBudget,
    /// The whole interval is beyond the budget (or the point estimate, without one).
    OverBudget,
    /// The interval contains the budget: this sample cannot tell.
    Inconclusive,
}

/// The verdict on a loss with an optional paired standard error, and a sentence saying it;
/// values are printed in percent (points for an accuracy budget).
pub fn verdict(loss: f64, stderr: Option<f64>, limit: f64, unit: &str) -> (Verdict, String) {
    let pct = |x: f64| 100.0 * x;
    let Some(se) = stderr.filter(|s| s.is_finite()) else {
        return if loss <= limit {
            (
                Verdict::WithinBudget,
                format!(
                    "within budget: loss {:+.2} {unit} <= {:.2} {unit} (point estimate, no standard error)",
                    pct(loss),
                    pct(limit)
                ),
            )
        } else {
            (
                Verdict::OverBudget,
                format!(
                    "over budget: loss {:+.2} {unit} > {:.2} {unit} (point estimate, no standard error)",
                    pct(loss),
                    pct(limit)
                ),
            )
        };
    };
    let (lo, hi) = (loss - 1.96 * se, loss + 1.96 * se);
    let stat = format!(
        "loss {:+.2} +- {:.2} {unit} (paired s.e.; 95% interval [{:+.2}, {:+.2}]), budget {:.2} {unit}",
        pct(loss),
        pct(se),
        pct(lo),
        pct(hi),
        pct(limit)
    );
    if hi <= limit {
        (Verdict::WithinBudget, format!("within budget: {stat}"))
    } else if lo > limit {
        (Verdict::OverBudget, format!("over budget: {stat}"))
    } else {
        let side = if loss <= limit {
            "point estimate within budget"
        } else {
            "point estimate over budget"
        };
        (
            Verdict::Inconclusive,
            format!("inconclusive at this sample size ({side}): {stat}"),
        )
    }
}

/// How many times the current sample the interval needs to exclude the budget: the sample
/// for which 1.96 s.e. equals |loss - limit|, if the loss stayed where it is (s.e. falls as
/// 1/sqrt(n)). None when the loss sits on the budget or there is no s.e.
pub fn sample_factor_to_resolve(loss: f64, stderr: f64, limit: f64) -> Option<f64> {
    let gap = (loss - limit).abs();
    (gap > 0.0 && stderr.is_finite()).then(|| (1.96 * stderr / gap).powi(2))
}

/// The task whose paired drop + `z` s.e. is largest (the first of equals). `per_task` must
/// not be empty.
pub fn worst_task(per_task: &[(String, PairedDiff)], z: f64) -> (&str, PairedDiff) {
    let upper = |d: &PairedDiff| d.diff + z * d.stderr;
    let (task, d) = per_task
        .iter()
        .reduce(|a, b| if upper(&b.1) > upper(&a.1) { b } else { a })
        .expect("at least one task");
    (task, *d)
}

/// A warning when a search split is too small for its budget: the 95% half-width of a paired
/// loss (1.96 s.e.) is wider than the whole budget, so the search cannot tell "within" from
/// "over" and its binary search keeps whichever steps drew lucky samples (the winner's curse
/// that docs/ACCURACY.md measured: an 80-document search passed a TP 8 plan that loses 3.8
/// points on 3,209 unseen documents). `units` names what `samples` counts. The suggestion is
/// the sample at which 1.96 s.e. is half the budget, if the s.e. stayed as it is per sample.
pub fn resolution_warning(stderr: f64, limit: f64, samples: usize, units: &str) -> Option<String> {
    let half_width = 1.96 * stderr;
    if !(half_width > limit && limit > 0.0 && stderr.is_finite()) {
        return None;
    }
    let factor = (half_width / (limit / 2.0)).powi(2);
    Some(format!(
        "warning: the search split cannot resolve this budget: paired s.e. {stderr:.4} on \
         {samples} {units} gives a 95% half-width of {half_width:.4}, wider than the budget \
         {limit}; the search will keep lucky draws. About {factor:.0}x the sample ({} {units}) \
         would resolve a loss of half the budget",
        (samples as f64 * factor).ceil() as usize
    ))
}

impl Budget {
    /// Loss of quality relative to `base` (positive = worse), in the budget's units.
    pub fn loss(&self, base: f64, score: f64) -> f64 {
        match self {
            Budget::PplIncrease(_) => score / base - 1.0,
            Budget::AccDrop(_) => base - score,
        }
    }
    /// The budget, in its units (the largest loss allowed).
    pub fn limit(&self) -> f64 {
        match self {
            Budget::PplIncrease(x) | Budget::AccDrop(x) => *x,
        }
    }
}

/// What [`plan`] chose and how it checked it: the SPD blocks, their recovery, the implied
/// thresholds, and the scores on the search and held-out splits.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanOutcome {
    /// Which blocks are SPD, in layer order.
    pub spd: Vec<bool>,
    /// Per block: how an SPD block is recovered (None: standard block).
    pub recovery: Vec<Option<Recovery>>,
    /// SPD blocks switched as they are.
    pub zero_shot_blocks: usize,
    /// SPD blocks distilled.
    pub b2b_blocks: usize,
    /// SPD blocks head-grouped, then distilled.
    pub hg_b2b_blocks: usize,
    /// Head groupings applied (layer, grouping).
    pub groupings: Vec<(usize, crate::headgroup::Grouping)>,
    /// How each block the plan keeps distilled (B2B or HG+B2B) trained: (layer, report).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub distillation: Vec<(usize, crate::distill::DistillReport)>,
    /// Per block: SPD with linear compensation (empty without it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub compensated: Vec<bool>,
    /// How each SPD block's compensation was fitted: (layer, report); a zero-shot block's is
    /// the fit on the TP model's inputs, a distilled block's the refit before its B2B.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub compensation: Vec<(usize, CompReport)>,
    /// SPD blocks over all blocks.
    pub fraction: f64,
    /// Thresholds implied by the choice: every block of the zero-shot class has s <= t1
    /// (zero-shot, or B2B with [`Search::distill_zero_shot`]), every other B2B block
    /// t1 < s <= t2; the rest are beyond t2, except the blocks a search past the wall
    /// skipped (`skipped`), which can lie below t1.
    pub t1: f64,
    /// The upper threshold (see `t1`).
    pub t2: f64,
    /// The metric with no SPD block on the search split.
    pub search_base: f64,
    /// The chosen plan's metric on the search split.
    pub search_score: f64,
    /// The metric of the TP model (no SPD block, original weights) on the held-out split.
    pub heldout_base: f64,
    /// The chosen plan's metric on the held-out split.
    pub heldout_score: f64,
    /// The chosen plan's loss on the held-out split, in the budget's units.
    pub heldout_loss: f64,
    /// Point estimate only: `heldout_loss <= budget`. Read `verdict` for what the sample
    /// supports.
    pub within_budget_on_heldout: bool,
    /// Metric evaluations the search made (each a pass over a split; the two TP baselines
    /// count even when [`BaselineCache`] served them).
    pub evaluations: usize,
    /// The search's margin in paired standard errors (0: point estimates).
    pub search_z: f64,
    /// Blocks tried past the wall ([`Search::past_wall`]), and those of them that were over
    /// budget (the wall itself first).
    pub past_wall: usize,
    /// The blocks tried past the wall and left out (over budget).
    pub skipped: Vec<usize>,
    /// The chosen plan's loss on the search split, paired per document (accuracy) or per
    /// passage (perplexity); None for metrics without per-item outcomes.
    pub search_drop: Option<PairedDiff>,
    /// The same on the held-out split; `diff` equals `heldout_loss`.
    pub heldout_drop: Option<PairedDiff>,
    /// Approximate 95% interval of the held-out loss (loss +- 1.96 paired s.e.).
    pub heldout_loss_ci95: Option<(f64, f64)>,
    /// Documents per task in the held-out split (accuracy budgets; the first task's, where
    /// a task has fewer): the search split's is the runner's `--limit`, the held-out's
    /// `--heldout-limit`.
    pub docs_per_task: Option<usize>,
    /// Perplexity budget: passages in the held-out split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passages_per_split: Option<usize>,
    /// What the held-out sample supports (within, over, or not resolved), where the metric
    /// has per-item outcomes.
    pub verdict: Option<Verdict>,
    /// The verdict in words, with the loss, its paired s.e. and interval.
    pub verdict_text: String,
    /// Accuracy budgets: the held-out split's per-document outcomes, (TP baseline, plan), in
    /// `eval`'s format (the runner writes them beside the plan, so per-task drops can be
    /// tabulated without evaluating again). Not part of the plan file.
    #[serde(skip)]
    pub heldout_suites: Option<(SuiteScore, SuiteScore)>,
    /// Accuracy budgets: each task's paired drop on the held-out split (task order of the
    /// suite); the average hides a task that collapses while another gains.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heldout_task_drops: Vec<(String, PairedDiff)>,
    /// The search's cap on each task's drop, if any ([`Search::max_task_drop`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_task_drop: Option<f64>,
    /// With a cap: the margin in paired standard errors each task's drop needed
    /// ([`Search::task_z`]; `search_z` unless set apart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_z: Option<f64>,
}

/// How the planner's search decides, how far it looks and what it recovers blocks with. A
/// bare `f64` is the margin `z` with no look past the wall and no compensation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Search<'a> {
    /// A step fits when its loss + `z` paired standard errors is within budget (0: point
    /// estimates; 1.645: a one-sided 95% upper bound).
    pub z: f64,
    /// After the longest zero-shot prefix (in sensitivity order), try the next `past_wall`
    /// blocks one at a time, keeping each that still fits: the block that ends the prefix
    /// (the "wall") may cost far more than the ones after it. 0: the prefix only (the
    /// paper's classes).
    pub past_wall: usize,
    /// With B2B: once the zero-shot blocks are chosen, distil them too (in layer order, each
    /// on inputs from the model with the earlier ones distilled), and keep that when it
    /// lowers the loss. The budget it frees goes to more B2B blocks. (The paper leaves
    /// in-sensitive blocks zero-shot.)
    pub distill_zero_shot: bool,
    /// Linear compensation for every block ([`crate::distill::compensate_blocks`]): the
    /// planner loads it, so every SPD block it tries runs SPD + LC; B2B (and HG+B2B) refits
    /// the block's maps on the plan's inputs and trains with them. Measure the sensitivity
    /// with the maps loaded, so that the order is SPD + LC's.
    pub compensation: Option<&'a BlockCompensation>,
    /// Accuracy budgets: a step fits only if, besides the average, every task's own paired
    /// drop + `z` s.e. is within this cap (same units as the budget: 0.03 = 3 points). A
    /// suite's average can hide a task that collapses while another gains (with LC on TP 8,
    /// LAMBADA gains several points while the other tasks lose). None: the average only.
    pub max_task_drop: Option<f64>,
    /// The margin for the cap, in paired standard errors of each task's drop; None: `z`.
    /// One task's s.e. is about sqrt(tasks) times the average's, so the same z asks far
    /// more of each task than of the average (at TP 8, 200 documents a task, z 1 keeps each
    /// of seven tasks under about 1-1.6 points of a 3-point cap): 0 caps the point
    /// estimates.
    pub task_z: Option<f64>,
}

impl From<f64> for Search<'_> {
    fn from(z: f64) -> Self {
        Search {
            z,
            ..Search::default()
        }
    }
}

/// Distilled or compensated blocks: (layer, one shard per rank).
pub type DistilledBlocks = Vec<(usize, Vec<crate::backend::BlockWeights>)>;

/// Blocks from least to most sensitive (ties keep the later block first).
pub fn order_by_sensitivity(s: &Sensitivity) -> Vec<usize> {
    let mut order: Vec<usize> = (0..s.sensitivity.len()).collect();
    order.sort_by(|a, b| {
        s.sensitivity[*a]
            .total_cmp(&s.sensitivity[*b])
            .then(b.cmp(a))
    });
    order
}

fn mask_of(order: &[usize], k: usize, n: usize) -> Vec<bool> {
    let mut m = vec![false; n];
    order[..k].iter().for_each(|i| m[*i] = true);
    m
}

/// Back to the original weights and the default head assignment, with the block's
/// compensation maps if there are any.
fn restore_block(engine: &mut Engine, layer: usize, lc: Option<&BlockCompensation>) -> Result<()> {
    let shards = engine.layout.ranks.clone();
    let Some(c) = lc else {
        return engine.set_block_shards(layer, shards);
    };
    // load_compensated loads the original weights too: reassign heads only where they moved
    if engine.block_shards(layer) != shards {
        engine.set_block_shards(layer, shards)?;
    }
    load_compensated(engine, layer, &c.maps[layer]).map(drop)
}

/// Choose the plan. `metric` scores split 0 (search) and split 1 (held-out); `calib` feeds
/// distillation when `b2b` is Some. A step of the search fits when its loss on the search
/// split plus `search_z` paired standard errors is within the budget: 0 compares the point
/// estimate (the paper's way, and prone to the winner's curse on small samples: the search
/// keeps lucky draws), 1.645 asks for a one-sided 95% upper bound within budget (a step
/// without a standard error is judged by its point estimate). The baseline is the engine as
/// given: pass one with the original weights (not one that already holds distilled or
/// head-grouped blocks). The engine ends with the chosen plan (and distilled blocks) loaded.
/// Returns the outcome and the distilled blocks (with compensation: every SPD block, those
/// that keep the model's weights too).
#[allow(clippy::too_many_arguments)]
pub fn plan<'a>(
    engine: &mut Engine,
    sens: &Sensitivity,
    budget: Budget,
    search: impl Into<Search<'a>>,
    metric: &mut dyn Metric,
    calib: &[Vec<u32>],
    b2b: Option<&DistillConfig>,
    mut log: impl FnMut(&str),
) -> Result<(PlanOutcome, DistilledBlocks)> {
    let n = engine.cfg.n_layers;
    let Search {
        z: search_z,
        past_wall,
        distill_zero_shot,
        compensation: lc,
        max_task_drop,
        task_z,
    } = search.into();
    if let Some(cap) = max_task_drop {
        if !matches!(budget, Budget::AccDrop(_)) {
            return Err(Error::InvalidArgument(
                "a cap on each task's drop needs an accuracy budget (--budget-acc)".into(),
            ));
        }
        if !(cap >= 0.0 && cap.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "the cap on each task's drop must be a finite number >= 0, not {cap}"
            )));
        }
    }
    let check_z = |what: &str, z: f64| {
        if z >= 0.0 && z.is_finite() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{what} must be a finite z >= 0, not {z}"
            )))
        }
    };
    check_z("search confidence margin", search_z)?;
    if let Some(z) = task_z {
        check_z("the task cap's confidence margin", z)?;
    }
    let task_z = task_z.unwrap_or(search_z);
    if budget.limit().is_nan() {
        return Err(Error::InvalidArgument(format!(
            "budget {budget:?}: the largest loss allowed must be a number"
        )));
    }
    if let Some(d) = b2b {
        // checked now, not after the zero-shot search (distillation would refuse them then)
        d.validate()?;
        if calib.len() <= d.holdout {
            return Err(Error::InvalidArgument(format!(
                "B2B distillation needs calibration passages: {} given, {} held out",
                calib.len(),
                d.holdout
            )));
        }
    }
    if sens.sensitivity.len() != n {
        return Err(Error::InvalidArgument(
            "sensitivity does not match the model".into(),
        ));
    }
    if let Some(c) = lc {
        if c.maps.len() != n || c.maps.iter().any(|m| m.len() != engine.tp()) {
            return Err(Error::InvalidArgument(format!(
                "compensation for {} blocks of {} ranks; the model has {n} blocks at TP {}",
                c.maps.len(),
                c.maps.first().map_or(0, Vec::len),
                engine.tp()
            )));
        }
        // every block with its maps (they act only in SPD blocks: the baseline is unchanged)
        for l in 0..n {
            restore_block(engine, l, lc)?;
        }
    }
    // B2B of one block, with its compensation refitted on the plan's inputs when there is one
    let recover = |engine: &mut Engine,
                   layer: usize,
                   dcfg: &DistillConfig|
     -> Result<(
        Vec<crate::backend::BlockWeights>,
        crate::distill::DistillReport,
        Option<CompReport>,
    )> {
        let cc = lc.map(|c| &c.config);
        let (w, rep) = recover_layer(engine, calib, layer, Some(dcfg), cc, dcfg.threads)?;
        Ok((w, rep.b2b.expect("B2B was asked for"), rep.comp))
    };
    let zs = if lc.is_some() {
        "zero-shot+LC"
    } else {
        "zero-shot"
    };
    let order = order_by_sensitivity(sens);
    let mut evals = 0;
    engine.set_spd(&vec![false; n])?;
    let base_scored = metric.score_baseline(engine, 0)?;
    let base = base_scored.value;
    // the held-out baseline now, while every block has its original weights (distilled
    // blocks keep their weights with SPD off: that would not be the TP model)
    let held_base = metric.score_baseline(engine, 1)?;
    evals += 2;
    // paired drop (base - plan) when both scores carry per-document outcomes
    let paired = |b: &Scored, p: &Scored| -> Option<PairedDiff> {
        match (budget, &b.suite, &p.suite, &b.passages, &p.passages) {
            (Budget::AccDrop(_), Some(b), Some(p), ..) => paired_difference(b, p).ok(),
            (Budget::PplIncrease(_), .., Some(b), Some(p)) => paired_ppl_increase(b, p).ok(),
            _ => None,
        }
    };
    // with a cap on each task's drop: the last step's worst task (set by `ok`, shown in
    // every step's log line)
    let task_note = std::cell::RefCell::new(String::new());
    let se_text = |d: &Option<PairedDiff>| {
        let se = d.map_or(String::new(), |d| {
            format!(" +- {:.4} paired s.e.", d.stderr)
        });
        format!("{se}{}", task_note.borrow())
    };
    let mut ok = |engine: &mut Engine,
                  mask: &[bool],
                  evals: &mut usize|
     -> Result<(bool, f64, Option<PairedDiff>)> {
        engine.set_spd(mask)?;
        let s = metric.score_detailed(engine, 0)?;
        *evals += 1;
        let d = paired(&base_scored, &s);
        let margin = d.map_or(0.0, |d| search_z * d.stderr);
        let mut fits = budget.loss(base, s.value) + margin <= budget.limit();
        if let Some(cap) = max_task_drop {
            let (Some(b), Some(p)) = (&base_scored.suite, &s.suite) else {
                return Err(Error::InvalidArgument(
                    "a cap on each task's drop needs per-task outcomes from the metric".into(),
                ));
            };
            let per_task = paired_difference_per_task(b, p)?;
            let (task, worst) = worst_task(&per_task, task_z);
            let task_fits = worst.diff + task_z * worst.stderr <= cap;
            *task_note.borrow_mut() = format!(
                "; worst task {task} {:+.4} +- {:.4}{}",
                worst.diff,
                worst.stderr,
                if task_fits {
                    String::new()
                } else {
                    format!(", over the task cap {cap}")
                }
            );
            fits &= task_fits;
        }
        Ok((fits, s.value, d))
    };
    // zero-shot: longest prefix within budget (binary search; quality is close to monotone
    // in the prefix length because later blocks are the more sensitive ones)
    let (mut lo, mut hi) = (0usize, n);
    let mut best_score = base;
    let mut best_drop = paired(&base_scored, &base_scored);
    let mut warned = false;
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let (fits, s, d) = ok(engine, &mask_of(&order, mid, n), &mut evals)?;
        log(&format!(
            "{zs} {mid:2} blocks: score {s:.4} (loss {:+.4}{}, budget {})",
            budget.loss(base, s),
            se_text(&d),
            budget.limit()
        ));
        if let (false, Some(d)) = (warned, d) {
            let z_text = if search_z > 0.0 {
                format!(
                    "; this search already asks for loss + {search_z} s.e. within budget, \
                     which trades lucky draws for plans smaller than the budget allows"
                )
            } else {
                "; or use --search-z 1.645 (conservative)".into()
            };
            let (units, alternatives) = match budget {
                Budget::AccDrop(_) => (
                    "documents over all tasks",
                    format!(
                        "{z_text}; or search with --budget-ppl and verify the accuracy with \
                         `eval --offset`"
                    ),
                ),
                Budget::PplIncrease(_) => ("passages", z_text),
            };
            if let Some(w) = resolution_warning(d.stderr, budget.limit(), d.docs, units) {
                log(&format!("{w}{alternatives}"));
                warned = true;
            }
        }
        if fits {
            lo = mid;
            best_score = s;
            best_drop = d;
        } else {
            hi = mid - 1;
        }
    }
    let prefix = lo;
    let mut recovery: Vec<Option<Recovery>> = vec![None; n];
    order[..prefix]
        .iter()
        .for_each(|i| recovery[*i] = Some(Recovery::ZeroShot));
    let mut mask = mask_of(&order, prefix, n);
    // past the wall: the search above tried prefix + 1 blocks and found them over budget
    // (unless every block fit), so the wall is known; try the blocks after it one at a time
    let mut skipped = Vec::new();
    if past_wall > 0 && prefix < n {
        skipped.push(order[prefix]);
        for &layer in order[prefix + 1..].iter().take(past_wall) {
            mask[layer] = true;
            let (fits, s, d) = ok(engine, &mask, &mut evals)?;
            log(&format!(
                "past the wall (block {}): {zs} block {layer:2}: score {s:.4} (loss {:+.4}{}) {}",
                order[prefix],
                budget.loss(base, s),
                se_text(&d),
                if fits { "kept" } else { "over budget: skipped" }
            ));
            if fits {
                recovery[layer] = Some(Recovery::ZeroShot);
                best_score = s;
                best_drop = d;
            } else {
                mask[layer] = false;
                skipped.push(layer);
            }
        }
    }
    // the zero-shot class, whether or not it is distilled below (t1 is its edge)
    let zero_shot_class: Vec<usize> = (0..n)
        .filter(|l| recovery[*l] == Some(Recovery::ZeroShot))
        .collect();
    let mut distilled = Vec::new();
    let mut reports = Vec::new();
    let mut groupings = Vec::new();
    // refitted compensation of the blocks distilled (layer, report)
    let mut refits: Vec<(usize, CompReport)> = Vec::new();
    if let (Some(dcfg), true, false) = (b2b, distill_zero_shot, zero_shot_class.is_empty()) {
        engine.set_spd(&mask)?;
        let mut got = Vec::new();
        for &layer in &zero_shot_class {
            let (blocks, rep, comp) = recover(engine, layer, dcfg)?;
            log(&format!(
                "b2b {zs} block {layer:2}: block mse {:.3e} -> {:.3e}{}",
                rep.mse_before,
                rep.mse_after,
                rep.note()
            ));
            got.push((layer, blocks, rep, comp));
        }
        let (fits, s, d) = ok(engine, &mask, &mut evals)?;
        let better = fits && budget.loss(base, s) < budget.loss(base, best_score);
        log(&format!(
            "b2b on the {} {zs} blocks: score {s:.4} (loss {:+.4}{}, {zs} {:+.4}) {}",
            got.len(),
            budget.loss(base, s),
            se_text(&d),
            budget.loss(base, best_score),
            if better {
                "kept"
            } else {
                "no better: zero-shot kept"
            }
        ));
        if better {
            best_score = s;
            best_drop = d;
            for (layer, blocks, rep, comp) in got {
                recovery[layer] = Some(Recovery::B2b);
                distilled.push((layer, blocks));
                reports.push((layer, rep));
                refits.extend(comp.map(|c| (layer, c)));
            }
        } else {
            for &layer in &zero_shot_class {
                restore_block(engine, layer, lc)?;
            }
        }
    }
    // B2B: distil the next blocks in order (those not already SPD) while the budget holds
    if let Some(dcfg) = b2b {
        let rest: Vec<usize> = order.iter().copied().filter(|l| !mask[*l]).collect();
        for layer in rest {
            mask[layer] = true;
            engine.set_spd(&mask)?;
            let (blocks, rep, comp) = recover(engine, layer, dcfg)?;
            let (fits, s, d) = ok(engine, &mask, &mut evals)?;
            log(&format!(
                "b2b block {layer:2}: block mse {:.3e} -> {:.3e}{}; score {s:.4} (loss {:+.4}{}) {}",
                rep.mse_before,
                rep.mse_after,
                rep.note(),
                budget.loss(base, s),
                se_text(&d),
                if fits {
                    "kept"
                } else {
                    "over budget: try hg+b2b"
                }
            ));
            if fits {
                best_score = s;
                best_drop = d;
                recovery[layer] = Some(Recovery::B2b);
                distilled.push((layer, blocks));
                reports.push((layer, rep));
                refits.extend(comp.map(|c| (layer, c)));
                continue;
            }
            // head grouping, then B2B again from the original weights
            restore_block(engine, layer, lc)?;
            let g = crate::headgroup::group_block(engine, layer, calib)?;
            let (blocks, rep, comp) = recover(engine, layer, dcfg)?;
            let (fits, s, d) = ok(engine, &mask, &mut evals)?;
            log(&format!(
                "hg+b2b block {layer:2}: dissimilarity {:.3} -> {:.3}, MLP order {:?}; block mse {:.3e} -> {:.3e}{}; score {s:.4} (loss {:+.4}{}) {}",
                g.dissimilarity_before,
                g.dissimilarity_after,
                g.ffn_order,
                rep.mse_before,
                rep.mse_after,
                rep.note(),
                budget.loss(base, s),
                se_text(&d),
                if fits { "kept" } else { "over budget: stop" }
            ));
            if !fits {
                mask[layer] = false;
                restore_block(engine, layer, lc)?;
                break;
            }
            best_score = s;
            best_drop = d;
            recovery[layer] = Some(Recovery::HgB2b);
            groupings.push((layer, g));
            distilled.push((layer, blocks));
            reports.push((layer, rep));
            refits.extend(comp.map(|c| (layer, c)));
        }
    }
    let b2b_blocks = distilled.len() - groupings.len();
    // with compensation, every SPD block is a recovered block: the zero-shot ones keep the
    // model's weights with their maps from the up-front fit
    let mut compensated = Vec::new();
    let mut compensation = Vec::new();
    if let Some(c) = lc {
        compensated = mask.clone();
        for l in (0..n).filter(|l| mask[*l]) {
            match refits.iter().find(|r| r.0 == l) {
                Some((_, r)) => compensation.push((l, r.clone())),
                None => {
                    // loaded already (restore_block at the start, or after a dropped B2B)
                    compensation.push((l, c.reports[l].clone()));
                    distilled.push((l, compensated_weights(engine, l, &c.maps[l])?));
                }
            }
        }
        distilled.sort_by_key(|b| b.0);
    }
    engine.set_spd(&mask)?;
    let s_of = |r: Recovery| -> f64 {
        (0..n)
            .filter(|i| recovery[*i] == Some(r))
            .map(|i| sens.sensitivity[i])
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let t1 = zero_shot_class
        .iter()
        .map(|i| sens.sensitivity[*i])
        .fold(f64::NEG_INFINITY, f64::max);
    let t2 = s_of(Recovery::B2b).max(s_of(Recovery::HgB2b)).max(t1);
    // held-out verification
    let held_plan = metric.score_detailed(engine, 1)?;
    evals += 1;
    let (heldout_score, heldout_base) = (held_plan.value, held_base.value);
    let heldout_loss = budget.loss(heldout_base, heldout_score);
    let heldout_drop = paired(&held_base, &held_plan);
    let unit = match budget {
        Budget::AccDrop(_) => "pt",
        Budget::PplIncrease(_) => "%",
    };
    let se = heldout_drop.map(|d| d.stderr);
    let (v, mut verdict_text) = verdict(heldout_loss, se, budget.limit(), unit);
    if let (Verdict::Inconclusive, Some(se)) = (v, se) {
        if let Some(f) = sample_factor_to_resolve(heldout_loss, se, budget.limit()) {
            let per_task = held_base
                .suite
                .as_ref()
                .and_then(|s| s.tasks.first())
                .map(|t| (t.n, "documents per task"))
                .or_else(|| held_base.passages.as_ref().map(|p| (p.len(), "passages")));
            verdict_text += &match per_task {
                Some((m, what)) => format!(
                    "; resolving it needs about {:.0} {what} in the held-out split ({f:.1}x; \
                     the runner's --heldout-limit), if the loss stayed at this value",
                    (f * m as f64).ceil()
                ),
                None => format!("; resolving it needs about {f:.1}x the sample"),
            };
        }
    }
    log(&format!(
        "held-out split: {heldout_base:.4} -> {heldout_score:.4}: {verdict_text}"
    ));
    let heldout_task_drops = match (budget, &held_base.suite, &held_plan.suite) {
        (Budget::AccDrop(_), Some(b), Some(p)) => {
            paired_difference_per_task(b, p).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    if !heldout_task_drops.is_empty() {
        let parts: Vec<String> = heldout_task_drops
            .iter()
            .map(|(t, d)| format!("{t} {:+.2} +- {:.2}", 100.0 * d.diff, 100.0 * d.stderr))
            .collect();
        log(&format!(
            "held-out drop per task (points, paired s.e.): {}",
            parts.join(", ")
        ));
    }
    let k = mask.iter().filter(|m| **m).count();
    let zero_shot_blocks = recovery
        .iter()
        .filter(|r| **r == Some(Recovery::ZeroShot))
        .count();
    Ok((
        PlanOutcome {
            spd: mask,
            recovery,
            zero_shot_blocks,
            b2b_blocks,
            hg_b2b_blocks: groupings.len(),
            groupings,
            distillation: reports,
            compensated,
            compensation,
            fraction: k as f64 / n as f64,
            t1,
            t2,
            search_base: base,
            search_score: best_score,
            heldout_base,
            heldout_score,
            heldout_loss,
            within_budget_on_heldout: heldout_loss <= budget.limit(),
            evaluations: evals,
            search_z,
            past_wall,
            skipped,
            search_drop: best_drop,
            heldout_drop,
            heldout_loss_ci95: se.map(|se| (heldout_loss - 1.96 * se, heldout_loss + 1.96 * se)),
            docs_per_task: held_base
                .suite
                .as_ref()
                .and_then(|s| s.tasks.first())
                .map(|t| t.n),
            passages_per_split: held_base.passages.as_ref().map(Vec::len),
            verdict: Some(v),
            verdict_text,
            heldout_suites: held_base.suite.zip(held_plan.suite),
            heldout_task_drops,
            max_task_drop,
            task_z: max_task_drop.map(|_| task_z),
        },
        distilled,
    ))
}

/// Build the plan file for an outcome.
pub fn plan_file(
    engine: &Engine,
    sha: String,
    sens: &Sensitivity,
    o: &PlanOutcome,
    budget: Budget,
) -> SpdPlan {
    let mut p = SpdPlan::new(engine, sha, &o.spd, Recovery::ZeroShot);
    for (i, l) in p.layers.iter_mut().enumerate() {
        l.recovery = o.recovery[i];
        l.sensitivity = Some(sens.sensitivity[i]);
    }
    for (layer, g) in &o.groupings {
        p.layers[*layer].heads = Some(g.heads.clone());
        p.layers[*layer].ffn_order = Some(g.ffn_order.clone());
    }
    for (l, c) in o.compensated.iter().enumerate() {
        p.layers[l].compensated = *c;
    }
    p.notes = serde_json::json!({ "budget": budget, "outcome": o });
    p
}
