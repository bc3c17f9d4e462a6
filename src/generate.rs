//! Token generation on an [`Engine`]: prefill, then decode one token at a time with greedy or
//! temperature / top-p sampling from a seeded RNG.

#![warn(missing_docs)]

use crate::comm::CommStats;
use crate::engine::Engine;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// How [`Sampler`] picks a token; the default is greedy.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// Softmax temperature, >= 0; 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables top-p.
    pub top_p: f32,
    /// Seed of the sampler's RNG: the same seed and logits give the same tokens.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks the next token from a row of logits under a [`SamplerConfig`], with its own seeded
/// RNG.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: rand::rngs::StdRng,
}

/// Index of the largest value (the first one on ties); NaNs are passed over (0 when every
/// value is NaN).
pub fn argmax(x: &[f32]) -> usize {
    let mut best: Option<usize> = None;
    for (i, v) in x.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|b| *v > x[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0)
}

impl Sampler {
    /// A sampler whose RNG is seeded from `cfg.seed`. `InvalidArgument` unless the
    /// temperature is >= 0 and top-p in (0, 1] (NaN fails both).
    pub fn new(cfg: SamplerConfig) -> Result<Sampler> {
        // written so that NaN fails too
        let ok = cfg.temperature >= 0.0 && cfg.top_p > 0.0 && cfg.top_p <= 1.0;
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "temperature must be >= 0 and top-p in (0, 1]; got {} and {}",
                cfg.temperature, cfg.top_p
            )));
        }
        let rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        Ok(Sampler { cfg, rng })
    }

    /// The next token id: the [`argmax`] at temperature 0; otherwise a draw from
    /// softmax(logits / temperature), restricted when top-p < 1 to the fewest most probable
    /// tokens whose mass reaches top-p. A NaN logit has probability 0; a token of probability
    /// 0 is never drawn; with a +inf logit (or none above -inf) this is the [`argmax`].
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits) as u32;
        }
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let p = ((l - max) / self.cfg.temperature).exp();
                (i as u32, if p.is_nan() { 0.0 } else { p })
            })
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.cfg.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut acc = 0.0;
            let cut = probs
                .iter()
                .position(|p| {
                    acc += p.1;
                    acc >= self.cfg.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(cut);
        }
        let mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (id, p) in &probs {
            // `<`, not `r - p <= 0`: a draw of exactly 0 must not pick a token of probability 0
            if r < *p {
                return *id;
            }
            r -= p;
        }
        // rounding left a remainder: the last token that has any probability
        probs.iter().rev().find(|p| p.1 > 0.0).map_or(0, |p| p.0)
    }
}

/// Token counts and wall-clock timings of one [`generate`] call.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    /// Prompt tokens prefilled.
    pub prefill_tokens: usize,
    /// Seconds of the prefill (which also yields the first new token's logits).
    pub prefill_secs: f64,
    /// Decode steps run: one fewer than the new tokens (the first comes from the prefill).
    pub decode_tokens: usize,
    /// Seconds of the `decode_tokens` steps: from after the first new token's `on_token`
    /// (that token comes from the prefill) to the end, each step's forward, sampling and the
    /// `on_token` of the token it made included.
    pub decode_secs: f64,
    /// Rank 0's communicator counters for the whole generation.
    pub comm: CommStats,
}

impl GenStats {
    /// Prefill throughput, tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_secs.max(1e-12)
    }
    /// Decode throughput, decode steps per second.
    pub fn decode_tps(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_secs.max(1e-12)
    }
}

/// Generate up to `max_new` tokens after `prompt`, calling `on_token` for each new token.
/// Stops early at `stop` (e.g. the EOS token). Returns the new tokens and timings.
pub fn generate(
    engine: &mut Engine,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop: Option<u32>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenStats)> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("empty prompt".into()));
    }
    engine.reset_comm_stats()?;
    let mut stats = GenStats {
        prefill_tokens: prompt.len(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let logits = engine.prefill(prompt, prompt.len() - 1..prompt.len())?;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let mut next = sampler.sample(logits.row(0));
    let mut out = Vec::new();
    let mut t1 = Instant::now();
    while out.len() < max_new {
        out.push(next);
        on_token(next)?;
        if out.len() == 1 {
            // the decode clock starts once the prefill's token is handed over
            t1 = Instant::now();
        }
        if Some(next) == stop || out.len() == max_new {
            break;
        }
        let pos = prompt.len() + out.len() - 1;
        let logits = engine.forward(&[next], pos, 0..1)?;
        stats.decode_tokens += 1;
        next = sampler.sample(logits.row(0));
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    stats.comm = engine.comm_stats()?.first().copied().unwrap_or_default();
    Ok((out, stats))
}
