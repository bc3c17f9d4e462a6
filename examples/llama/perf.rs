//! Speed: `bench` (measured) and `latency` (the latency model).

use crate::common::*;
use clap::Args;
use std::path::PathBuf;
use syncdrop::Result;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Prompt length (tokens prefilled from position 0).
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Times the prefill is repeated (the median is reported).
    #[arg(long, default_value_t = 3)]
    prefill_reps: usize,
    /// Decode steps timed after the prompt.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Untimed decode steps first (CUDA-graph capture happens in the first one).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Write the result as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run_bench(args: BenchArgs) -> Result<()> {
    let BenchArgs {
        common,
        prompt,
        prefill_reps,
        steps,
        warmup,
        out,
    } = args;
    at_least("prompt", prompt, 1)?;
    at_least("prefill-reps", prefill_reps, 1)?;
    at_least("steps", steps, 1)?;
    // the KV cache holds the prompt and every decode step: refuse before the model
    // loads and the prefills run, not at the decode step that overflows it
    if prompt + warmup + steps > common.ctx {
        return Err(bad(format!(
                "--prompt {prompt} + --warmup {warmup} + --steps {steps} need a KV cache of {} tokens, more than --ctx {}: raise --ctx or lower them",
                prompt + warmup + steps,
                common.ctx
            )));
    }
    if let Some(out) = &out {
        prepare_out(out)?;
    }
    let files = model_files(&common)?;
    let model = files.path().display().to_string();
    let job = syncdrop::comm::rendezvous::Terms::new()
        .with("cmd", "bench")
        .with("prompt", prompt)
        .with("prefill_reps", prefill_reps)
        .with("warmup", warmup)
        .with("steps", steps);
    let (mut engine, _) = open_engine(&common, files, &job)?;
    let backend = format!("{:?}", common.backend).to_lowercase();
    let r = syncdrop::bench::bench_engine(
        &mut engine,
        &model,
        &backend,
        common.rank,
        (prompt, prefill_reps),
        (warmup, steps),
    )?;
    let bytes = if backend == "cuda" { 2.0 } else { 4.0 };
    println!(
            "{model} TP {} {} on {backend}: prefill {prompt} tokens {:.2} ms ({:.0} tok/s, {:.2} TFLOP/s of one rank) | decode {:.3} ms/step ({:.1} tok/s), one rank streams {:.2} GB/step = {:.0} GB/s",
            engine.tp(),
            match common.rank {
                Some(r) => format!("rank {r} only"),
                None => "all ranks".into(),
            },
            1e3 * r.prefill_median_s(),
            prompt as f64 / r.prefill_median_s(),
            r.prefill_tflops(),
            1e3 * r.decode_median_s(),
            1.0 / r.decode_median_s(),
            r.rank_params as f64 * bytes / 1e9,
            r.decode_gbps(bytes),
        );
    if let Some(out) = out {
        write_json(&out, &r)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct LatencyArgs {
    /// Comma list of llama2-7b, llama2-13b, llama2-70b, smollm2-135m.
    #[arg(long, default_value = "llama2-70b")]
    models: String,
    /// Comma list of TP degrees.
    #[arg(long, default_value = "8")]
    tps: String,
    /// Comma list of link profiles (default: all).
    #[arg(long, default_value = "")]
    profiles: String,
    /// Comma list of SPD fractions in [0, 1].
    #[arg(long, default_value = "0,0.5,0.7,1")]
    spd_fractions: String,
    /// Comma list of prompt lengths for prefill rows (empty: none).
    #[arg(long, default_value = "2048")]
    prefill: String,
    /// Comma list of decode batch sizes (empty: none).
    #[arg(long, default_value = "1")]
    batch: String,
    /// KV context per sequence for decode rows.
    #[arg(long, default_value_t = 1024)]
    ctx: usize,
    /// Do not project prefill with ISO.
    #[arg(long)]
    no_iso: bool,
    /// Measured per-layer compute (MeasuredCompute JSON from a GPU run).
    #[arg(long)]
    measured: Option<PathBuf>,
    #[arg(long, default_value = "docs/latency")]
    out: PathBuf,
    #[arg(long)]
    no_plot: bool,
    /// What each all-reduce message carries: bf16 (2 bytes per element, what the papers'
    /// engines move; `--wire bf16` on the other subcommands) or f32 (4 bytes, syncdrop's
    /// exact default wire).
    #[arg(long, default_value = "bf16", value_parser = ["f32", "bf16"])]
    wire: String,
}

pub fn run_latency(args: LatencyArgs) -> Result<()> {
    let LatencyArgs {
        models,
        tps,
        profiles,
        spd_fractions,
        prefill,
        batch,
        ctx,
        no_iso,
        measured,
        out,
        no_plot,
        wire,
    } = args;
    let opts = syncdrop::latency::LatencyOptions {
        models: list("models", &models)?,
        tp: list("tps", &tps)?,
        profiles: list("profiles", &profiles)?,
        spd_fractions: list("spd-fractions", &spd_fractions)?,
        prefill_tokens: list("prefill", &prefill)?,
        decode_batch: list("batch", &batch)?,
        decode_ctx: ctx,
        iso: !no_iso,
        measured,
        out_dir: out,
        plots: !no_plot,
        wire: wire.parse()?,
    };
    syncdrop::latency::report(&opts)?;
    Ok(())
}
