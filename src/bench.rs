//! Timing an engine end to end: prefill of a prompt of random tokens, then decode steps
//! over the growing KV cache. Used by the runner's `bench` subcommand and the GPU bench
//! binary (benches/cuda_rank.rs); numbers are wall-clock per call on the driver thread,
//! which includes the host embedding and the copy of the logits back.

#![warn(missing_docs)]

use crate::engine::Engine;
use crate::error::{Error, Result};
use std::time::Instant;

/// Result of [`bench_engine`]: raw timings and the work of one rank they cover.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EngineBench {
    /// Model label, as given by the caller.
    pub model: String,
    /// Backend label, as given by the caller.
    pub backend: String,
    /// Tensor-parallel degree of the engine.
    pub tp: usize,
    /// The one rank that ran (`only_rank`), or None when all ranks ran.
    pub rank: Option<usize>,
    /// Prompt length in tokens.
    pub prompt: usize,
    /// Timed decode steps (warm-up steps excluded).
    pub decode_steps: usize,
    /// Prefill seconds per repetition.
    pub prefill_s: Vec<f64>,
    /// Decode seconds per timed step.
    pub decode_s: Vec<f64>,
    /// Linear-layer weights one rank streams per decode step (parameters of its shard):
    /// [`rank_params`] of `rank`, or of rank 0 when all ran.
    pub rank_params: u64,
    /// FLOPs of that rank's prefill of `prompt` tokens (linear layers + causal attention).
    pub rank_prefill_flops: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

impl EngineBench {
    /// Median prefill seconds (NaN when there are none).
    pub fn prefill_median_s(&self) -> f64 {
        median(&self.prefill_s)
    }
    /// Median decode-step seconds (NaN when there are none).
    pub fn decode_median_s(&self) -> f64 {
        median(&self.decode_s)
    }
    /// Achieved weight-streaming bandwidth of a decode step at `bytes_per_param`, in GB/s
    /// (10^9 bytes), from the median step.
    pub fn decode_gbps(&self, bytes_per_param: f64) -> f64 {
        self.rank_params as f64 * bytes_per_param / self.decode_median_s() / 1e9
    }
    /// Achieved prefill throughput in TFLOP/s (10^12), from the median prefill.
    pub fn prefill_tflops(&self) -> f64 {
        self.rank_prefill_flops / self.prefill_median_s() / 1e12
    }
}

/// Parameters of rank `r`'s share of every block and its LM-head slice. Each block counts
/// the shards it runs with ([`Engine::block_shards`]: head grouping may give a rank other
/// heads, and with an uneven split another number of them, in some blocks).
pub fn rank_params(engine: &Engine, r: usize) -> u64 {
    let (blocks, head) = rank_block_and_head_params(engine, r);
    blocks + head
}

/// Rank `r`'s parameters of all blocks, and of its LM-head slice.
fn rank_block_and_head_params(engine: &Engine, r: usize) -> (u64, u64) {
    let c = &engine.cfg;
    let (d, hd) = (c.hidden as u64, c.head_dim as u64);
    let blocks: u64 = (0..c.n_layers)
        .map(|l| {
            let shards = engine.block_shards(l);
            let s = &shards[r];
            let (nq, nkv, f) = (
                s.q_heads.len() as u64,
                s.kv_heads.len() as u64,
                s.ffn.len() as u64,
            );
            (nq + 2 * nkv) * hd * d + d * nq * hd + 3 * d * f
        })
        .sum();
    let vocab = crate::layout::even_split(c.vocab, engine.tp())[r].len() as u64;
    (blocks, vocab * d)
}

/// FLOPs of rank `r` prefilling `t` tokens: 2 per multiply-add of every block's linear
/// layers for all `t` rows, of the LM-head slice for the last row only (the logits
/// [`bench_engine`] asks for; the engine runs the LM head on the requested rows alone), plus
/// QK^T and PV over the causal triangle (over each block's own query heads).
pub fn rank_prefill_flops(engine: &Engine, r: usize, t: usize) -> f64 {
    let c = &engine.cfg;
    let heads: f64 = (0..c.n_layers)
        .map(|l| engine.block_shards(l)[r].q_heads.len() as f64)
        .sum();
    let (blocks, head) = rank_block_and_head_params(engine, r);
    let logit_rows = t.min(1) as f64;
    let t = t as f64;
    let attn = 2.0 * 2.0 * (t * (t + 1.0) / 2.0) * c.head_dim as f64;
    2.0 * t * blocks as f64 + 2.0 * logit_rows * head as f64 + heads * attn
}

/// Prefill `prompt` random tokens `reps` times (each from position 0), then decode
/// `warmup + steps` tokens after the prompt, timing the last `steps`.
pub fn bench_engine(
    engine: &mut Engine,
    model: &str,
    backend: &str,
    rank: Option<usize>,
    (prompt, reps): (usize, usize),
    (warmup, steps): (usize, usize),
) -> Result<EngineBench> {
    let cap_needed = prompt + warmup + steps;
    if prompt == 0 || reps == 0 {
        return Err(Error::InvalidArgument(
            "bench needs a prompt of at least one token and one repetition".into(),
        ));
    }
    let vocab = engine.cfg.vocab as u64;
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % vocab) as u32
    };
    let ids: Vec<u32> = (0..prompt).map(|_| next()).collect();
    let mut prefill_s = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        engine.prefill(&ids, prompt - 1..prompt)?;
        prefill_s.push(t0.elapsed().as_secs_f64());
    }
    let mut decode_s = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let tok = [next()];
        let t0 = Instant::now();
        engine
            .forward(&tok, prompt + i, 0..1)
            .map_err(|e| match e {
                Error::ContextOverflow { .. } => Error::InvalidArgument(format!(
                    "bench needs a KV capacity of {cap_needed} tokens (--ctx)"
                )),
                e => e,
            })?;
        if i >= warmup {
            decode_s.push(t0.elapsed().as_secs_f64());
        }
    }
    let r = rank.unwrap_or(0);
    Ok(EngineBench {
        model: model.to_string(),
        backend: backend.to_string(),
        tp: engine.tp(),
        rank,
        prompt,
        decode_steps: steps,
        prefill_s,
        decode_s,
        rank_params: rank_params(engine, r),
        rank_prefill_flops: rank_prefill_flops(engine, r, prompt),
    })
}
