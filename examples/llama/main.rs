//! The syncdrop reference runner: tensor-parallel LLaMA on real weights, and the SPD tools.
//!
//!   cargo run --release --example llama -- generate --tp 3 --prompt "The capital of France is"
//!   cargo run --release --example llama -- perplexity --tp 3 --lambada 50
//!   cargo run --release --example llama -- sensitivity --tp 4 --plot sens.svg
//!   cargo run --release --example llama -- plan --tp 4 --budget-acc 1 --b2b --out plan.json
//!   cargo run --release --example llama -- eval --tp 4 --spd plan.json
//!   cargo run --release --example llama -- compare --base base.json plan=plan_eval.json --plot f.svg
//!
//! The model defaults to the SmolLM2 GGUF fetched by `scripts/fetch-assets.sh`.

mod accuracy;
mod common;
mod distill;
mod perf;
mod plan;
mod sweep;
mod text;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "llama", version = syncdrop::BUILD, about = "syncdrop reference runner: tensor-parallel LLaMA inference and SPD tools", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt (or a chat message with --chat), streaming tokens.
    Generate(text::GenerateArgs),
    /// Perplexity of a text file or of LAMBADA passages, with a sliding window.
    Perplexity(text::PerplexityArgs),
    /// Zero-shot accuracy on the SPD paper's tasks (lm-eval scoring), table + JSON.
    Eval(accuracy::EvalArgs),
    /// Paired accuracy losses of runs against a baseline on the same documents, from `eval
    /// --out` JSON (no model is loaded): a per-task table with paired standard errors, the
    /// average's 95% interval and a verdict per budget, JSON, and a forest plot (SVG).
    Compare(accuracy::CompareArgs),
    /// Per-block SPD sensitivity (the SPD paper's Algorithm 1): table, JSON, SVG plot.
    Sensitivity(plan::SensitivityArgs),
    /// Choose the largest SPD plan within an accuracy budget, verified on held-out data.
    Plan(plan::PlanArgs),
    /// Accuracy and perplexity versus SPD fraction (zero-shot and B2B) at several TP degrees:
    /// the SPD paper's main figure. JSON + SVG.
    Sweep(sweep::SweepArgs),
    /// Time prefill and decode on random tokens: ms per decode step, achieved weight
    /// bandwidth, prefill TFLOP/s. Works with --synthetic models, --rank, CPU and CUDA.
    Bench(perf::BenchArgs),
    /// Projected end-to-end prefill/decode latency per link profile, SPD fraction and ISO
    /// (the latency model, docs/LATENCY.md): table on stdout, JSON + SVG in --out. Compute
    /// is a roofline (modelled) unless --measured gives per-layer GPU times.
    Latency(perf::LatencyArgs),
    /// Distil (B2B) every SPD block of a plan, with or without linear compensation; writes
    /// the weights and an updated plan.
    Distill(distill::DistillArgs),
}

fn run(cli: Cli) -> syncdrop::Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => text::run_generate(a),
        Cmd::Perplexity(a) => text::run_perplexity(a),
        Cmd::Eval(a) => accuracy::run_eval(a),
        Cmd::Compare(a) => accuracy::run_compare(a),
        Cmd::Sensitivity(a) => plan::run_sensitivity(a),
        Cmd::Plan(a) => plan::run_plan(a),
        Cmd::Sweep(a) => sweep::run_sweep(a),
        Cmd::Bench(a) => perf::run_bench(a),
        Cmd::Latency(a) => perf::run_latency(a),
        Cmd::Distill(a) => distill::run_distill(a),
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
