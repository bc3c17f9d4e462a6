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

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use syncdrop::distill::{
    compensate_blocks, distill_layer, recover_layer, save_recovered, CompConfig, DistillConfig,
    DistillDevice,
};
use syncdrop::engine::{BackendKind, Engine, EngineOptions};
use syncdrop::eval::{lambada, perplexity_texts, score_tokens};
use syncdrop::generate::{generate, Sampler, SamplerConfig};
use syncdrop::planner::{self, Budget};
use syncdrop::spd::{self, model_sha256, Recovery, Sensitivity, SpdPlan};
use syncdrop::tasks::{self, evaluate_suite, SuiteScore};
use syncdrop::tokenizer::{chatml, Tokenizer};
use syncdrop::{assets, Error, ModelFiles, Result};

#[derive(Parser)]
#[command(name = "llama", version = syncdrop::BUILD, about = "syncdrop reference runner: tensor-parallel LLaMA inference and SPD tools", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// Model: a .gguf file or a Hugging Face folder (config.json + *.safetensors +
    /// tokenizer.json). Default: the SmolLM2-135M-Instruct GGUF in the syncdrop cache.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tensor-parallel degree: 1 ..= number of query heads (uneven head splits are fine).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Backend: cpu (threads as ranks) or cuda (distill, plan and sweep then also train on
    /// GPU 0).
    #[arg(long, default_value = "cpu")]
    backend: BackendKind,
    /// Compute threads in total (split evenly over ranks). Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// KV-cache capacity in tokens.
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// Sync-Point Drop: a plan file (JSON from `plan`), `all`, `none`, or `layers:5,6,20`
    /// (zero-shot SPD on exactly those blocks, numbered from 0).
    #[arg(long, default_value = "none")]
    spd: String,
    /// Intra-Sequence Overlap for prefills: off, on/auto (split by a cost model calibrated
    /// on three timed prefills), or a fixed split length.
    #[arg(long, default_value = "off")]
    iso: syncdrop::iso::IsoMode,
    /// CPU: row-by-row matrix products, so ISO on/off give identical bits (slower prefill).
    #[arg(long)]
    row_invariant: bool,
    /// A random-weight model of real shapes instead of --model, for benchmarks:
    /// llama2-7b, llama2-13b or llama2-70b, optionally `:layers=N,seed=S`. No tokenizer:
    /// use it with `bench`.
    #[arg(long, conflicts_with = "model")]
    synthetic: Option<String>,
    /// Run only this rank's share of the TP model (its all-reduces skipped): one rank's
    /// compute, e.g. one rank of LLaMA2-70B at --tp 8 on one 80 GB GPU. Benchmarks only.
    #[arg(long)]
    rank: Option<usize>,
    /// CUDA: do not capture decode steps in CUDA graphs.
    #[arg(long)]
    no_graphs: bool,
    /// CUDA: emulate inter-GPU links on one GPU: hold every all-reduce for this profile's
    /// modelled time on the communication lane (see `latency`; e.g. a800-nvlink-400gbs,
    /// rtx4090-pcie-nop2p). Timings are then emulated, results stay exact.
    #[arg(long)]
    emulate_link: Option<String>,
    /// CUDA: give every rank an NCCL communicator (used where P2P is impossible; needs one
    /// GPU per rank: NCCL refuses two ranks on one GPU).
    #[arg(long)]
    nccl: bool,
    /// CUDA, one rank per process (with --rank): rendezvous through this file (rank 0 writes
    /// NCCL's id, every rank answers, rank 0 confirms; one run per file at a time: a second
    /// rank 0 on it is refused); the processes' ranks then all-reduce with each other.
    /// Every rank must get the same options (compared at the rendezvous). Across machines
    /// prefer --nccl-tcp. For `bench`.
    #[arg(long, conflicts_with_all = ["nccl", "nccl_tcp"])]
    nccl_id: Option<PathBuf>,
    /// CUDA, one rank per process (with --rank), on any machines: rendezvous over TCP at rank
    /// 0's HOST:PORT (rank 0 listens there; the others connect, and rank 0 names any that do
    /// not arrive). Waits SYNCDROP_RENDEZVOUS_TIMEOUT seconds (default 120). For `bench`.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "nccl")]
    nccl_tcp: Option<String>,
    /// What all-reduces move between ranks: f32 (exact) or bf16 (each rank's contribution
    /// rounded once to bf16, half the bytes, summed in f32 in rank order; both backends).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    wire: String,
}

/// The sensitivity's calibration text (distillation has its own: [`Train`]).
#[derive(Args, Clone)]
struct Calib {
    /// Calibration passages (BoolQ's Wikipedia passages) for the sensitivity analysis.
    #[arg(long, default_value_t = 16)]
    calib: usize,
    /// Tokens per calibration passage (longer ones are cut).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
}

/// Distillation (B2B) settings, shared by `distill`, `plan` and `sweep`. The defaults are
/// what docs/ACCURACY.md found distillation needs: with 8 passages of 128 tokens it was
/// starved of data (held-out MSE 5.0 -> 2.3 on TP 8's block 24; 64 x 256 tokens: 4.9 -> 0.8).
#[derive(Args)]
struct Train {
    /// Distillation: calibration passages (BoolQ's Wikipedia passages, the first N; the last
    /// --holdout of them are held out). About a minute per block on 2 cores at the defaults.
    #[arg(long, default_value_t = 72)]
    distill_calib: usize,
    /// Distillation: tokens per passage (longer ones are cut).
    #[arg(long, default_value_t = 256)]
    distill_seq_len: usize,
    /// Distillation: the most epochs of Adam (one step per training passage).
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Distillation: Adam's learning rate.
    #[arg(long, default_value_t = 5e-5, allow_negative_numbers = true)]
    lr: f32,
    /// Distillation: hold the last N calibration passages out of training; after every
    /// epoch their loss is measured and the best epoch's weights are kept (early stopping).
    /// 0: train on every passage and keep the last epoch.
    #[arg(long, default_value_t = 8)]
    holdout: usize,
    /// Distillation with --holdout: stop after this many epochs without a better held-out
    /// loss.
    #[arg(long, default_value_t = 3)]
    patience: usize,
    /// Distillation (and compensation) text: `boolq` (Wikipedia passages), or any task of the
    /// eval data that is not scored by `eval` (e.g. `openbookqa`, `csqa`, `socialiqa`): its
    /// documents with their correct answers, joined into passages; `a,b` takes passages
    /// from each in turn.
    #[arg(long, default_value = "boolq", value_name = "SOURCES")]
    distill_text: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt (or a chat message with --chat), streaming tokens.
    Generate {
        #[command(flatten)]
        common: Common,
        /// Prompt text (raw completion).
        #[arg(long, default_value = "The capital of France is")]
        prompt: String,
        /// Wrap the prompt as a ChatML user turn (instruct models).
        #[arg(long)]
        chat: bool,
        /// System prompt for --chat (default: the one the model's chat template inserts).
        #[arg(long)]
        system: Option<String>,
        /// Tokens to generate.
        #[arg(short = 'n', long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f32,
        /// Nucleus sampling mass (0, 1].
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also print the prompt and generated token ids (JSON) on stderr.
        #[arg(long)]
        print_ids: bool,
    },
    /// Perplexity of a text file or of LAMBADA passages, with a sliding window.
    Perplexity {
        #[command(flatten)]
        common: Common,
        /// A UTF-8 text file to score as one sequence.
        #[arg(long, conflicts_with = "lambada")]
        file: Option<PathBuf>,
        /// Score the first N LAMBADA passages (each on its own). Default when no --file: 50.
        #[arg(long)]
        lambada: Option<usize>,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Window stride in tokens.
        #[arg(long, default_value_t = 256)]
        stride: usize,
    },
    /// Zero-shot accuracy on the SPD paper's tasks (lm-eval scoring), table + JSON.
    Eval {
        #[command(flatten)]
        common: Common,
        /// Comma-separated tasks (default: arc_easy,arc_challenge,hellaswag,lambada,piqa,sciq,winogrande).
        /// `arc_easy:test` and `arc_challenge:test` are ARC's test splits, prompted zero-shot
        /// like the validation splits the default scores: fresh documents for a confirmation.
        #[arg(long)]
        tasks: Option<String>,
        /// Documents per task (a fixed-seed sample).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Which half of a split sample: search (0) or held-out (1); default: no split.
        #[arg(long, conflicts_with = "offset")]
        split: Option<usize>,
        /// Skip the first K documents of the fixed-seed shuffle. With K = the `plan` run's
        /// --limit, every document evaluated is one its search split never saw: verify a plan
        /// on up to --limit documents per task instead of the held-out split's K.
        #[arg(long)]
        offset: Option<usize>,
        /// A previous `eval --out` JSON of the same documents (e.g. the TP baseline): print
        /// this run's loss against it with the paired standard error and 95% interval.
        #[arg(long)]
        paired_with: Option<PathBuf>,
        /// With --paired-with: the accuracy budget in points, for a within / over /
        /// inconclusive verdict.
        #[arg(long, requires = "paired_with", allow_negative_numbers = true)]
        budget_acc: Option<f64>,
        /// Write the scores as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Paired accuracy losses of runs against a baseline on the same documents, from `eval
    /// --out` JSON (no model is loaded): a per-task table with paired standard errors, the
    /// average's 95% interval and a verdict per budget, JSON, and a forest plot (SVG).
    Compare {
        /// The baseline's `eval --out` JSON. `a.json+b.json` is one run on the union of both
        /// files' documents (e.g. two --offset ranges, or --tasks halves, of one sample).
        #[arg(long, value_name = "FILE[+FILE...]")]
        base: String,
        /// The runs to compare, each `[LABEL=]FILE[+FILE...]` on the baseline's documents
        /// (the label defaults to the first file's name).
        #[arg(required = true, value_name = "RUN")]
        runs: Vec<String>,
        /// Comma-separated tasks to leave out of the average (e.g. `lambada`, whose gains can
        /// carry it); a name also matches its `:test` split.
        #[arg(long, value_name = "TASKS")]
        without: Option<String>,
        /// Accuracy budget in points: a within / over / not resolved verdict per run, and the
        /// budget line in the plot.
        #[arg(long, allow_negative_numbers = true)]
        budget_acc: Option<f64>,
        /// Write the comparisons as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Draw the forest plot (SVG): each run's average loss with its 95% interval, and
        /// each task's loss as a dot.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// The plot's title (default: what the runs are compared against).
        #[arg(long, requires = "plot")]
        title: Option<String>,
    },
    /// Per-block SPD sensitivity (the SPD paper's Algorithm 1): table, JSON, SVG plot.
    Sensitivity {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        calib: Calib,
        /// In-sensitive threshold t1 for the plot (default: median sensitivity).
        #[arg(long, allow_negative_numbers = true)]
        t1: Option<f64>,
        /// Extremely-sensitive threshold t2 (default: 90th percentile).
        #[arg(long, allow_negative_numbers = true)]
        t2: Option<f64>,
        #[arg(long, default_value = "sensitivity.json")]
        out: PathBuf,
        #[arg(long, default_value = "sensitivity.svg")]
        plot: PathBuf,
        /// Re-plot and re-classify a saved sensitivity JSON instead of measuring.
        #[arg(long)]
        from_json: Option<PathBuf>,
        /// Overwrite an existing --out (without it a measured run refuses one).
        #[arg(long)]
        force: bool,
    },
    /// Choose the largest SPD plan within an accuracy budget, verified on held-out data.
    Plan {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        calib: Calib,
        /// Budget as a maximum relative perplexity increase in percent (LAMBADA passages).
        #[arg(long, conflicts_with = "budget_acc", allow_negative_numbers = true)]
        budget_ppl: Option<f64>,
        /// Budget as a maximum drop of average task accuracy, in points.
        #[arg(long, allow_negative_numbers = true)]
        budget_acc: Option<f64>,
        /// Documents per task (accuracy budget) or LAMBADA passages (perplexity budget) in
        /// each of the search and held-out splits.
        #[arg(long, default_value_t = 40)]
        limit: usize,
        /// Documents per task (accuracy) or LAMBADA passages (perplexity) in the held-out
        /// split, which checks the chosen plan (default: --limit). They follow the search
        /// split in the same fixed-seed order: with --limit 80 --heldout-limit 500 the check
        /// scores what `eval --offset 80 --limit 500` does. Two evaluations of this size; a
        /// 1-point accuracy budget takes several hundred documents per task to resolve.
        #[arg(long, value_name = "N")]
        heldout_limit: Option<usize>,
        /// Also distil (B2B) the blocks beyond the zero-shot set while the budget holds.
        #[arg(long)]
        b2b: bool,
        #[command(flatten)]
        train: Train,
        /// A search step fits when its loss + Z paired standard errors is within budget:
        /// 0 compares point estimates (prone to the winner's curse on small samples), 1.645
        /// asks for a one-sided 95% upper bound within budget (conservative).
        #[arg(
            long,
            default_value_t = 0.0,
            value_name = "Z",
            allow_negative_numbers = true
        )]
        search_z: f64,
        /// With --budget-acc: a step also needs every task's own drop (+ Z s.e. with
        /// --search-z) within this many points. The seven-task average can hide a task that
        /// collapses while another gains (LC at TP 8 raises LAMBADA while the others lose)
        #[arg(long, value_name = "POINTS", allow_negative_numbers = true)]
        max_task_drop: Option<f64>,
        /// After the longest zero-shot prefix in sensitivity order, try the next N blocks one
        /// at a time and keep each that still fits: the block that ends the prefix (the
        /// "wall") can cost far more than those after it. One evaluation per block; 0 keeps
        /// the prefix only (the paper's classes).
        #[arg(long, default_value_t = 0, value_name = "N")]
        past_wall: usize,
        /// With --b2b: distil the zero-shot blocks too once they are chosen (kept when that
        /// lowers the loss), so that more blocks fit the budget. The paper leaves them
        /// zero-shot.
        #[arg(long, requires = "b2b")]
        distill_zero_shot: bool,
        /// Linear compensation of rank K (ours, not the paper's; see `distill --compensate`):
        /// fitted first for every block on the distillation passages, in closed form (a few
        /// seconds a block); the sensitivity is then measured and every search step scored
        /// with SPD + LC, and B2B trains with it. 0: none.
        #[arg(long, default_value_t = 0, value_name = "K")]
        compensate: usize,
        /// Reuse a sensitivity JSON (from `sensitivity`, or the one a previous `plan` saved
        /// beside its --out) instead of measuring it.
        #[arg(long)]
        sensitivity: Option<PathBuf>,
        /// The plan (JSON). Beside it: its sensitivity plot (.svg), the measured sensitivity
        /// (.sensitivity.json, unless --sensitivity was given), any distilled weights
        /// (.safetensors), and with --budget-acc the held-out split's per-document outcomes
        /// (.heldout_base.json, .heldout_plan.json: `eval --out` files).
        #[arg(long, default_value = "plan.json")]
        out: PathBuf,
        /// Overwrite an existing --out and the distilled weights beside it (without it an
        /// existing one is refused: a plan can take an hour of distillation).
        #[arg(long)]
        force: bool,
    },
    /// Accuracy and perplexity versus SPD fraction (zero-shot and B2B) at several TP degrees:
    /// the SPD paper's main figure. JSON + SVG.
    Sweep {
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
    },
    /// Time prefill and decode on random tokens: ms per decode step, achieved weight
    /// bandwidth, prefill TFLOP/s. Works with --synthetic models, --rank, CPU and CUDA.
    Bench {
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
    },
    /// Projected end-to-end prefill/decode latency per link profile, SPD fraction and ISO
    /// (the latency model, docs/LATENCY.md): table on stdout, JSON + SVG in --out. Compute
    /// is a roofline (modelled) unless --measured gives per-layer GPU times.
    Latency {
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
    },
    /// Distil (B2B) every SPD block of a plan, with or without linear compensation; writes
    /// the weights and an updated plan.
    Distill {
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
    },
}

struct Opened {
    engine: Engine,
    tok: Tokenizer,
    sha: Option<String>,
}

fn model_files(common: &Common) -> Result<Arc<ModelFiles>> {
    check_common(common)?;
    if let Some(spec) = &common.synthetic {
        return Ok(Arc::new(ModelFiles::Synthetic(
            syncdrop::synthetic::SyntheticModel::parse(spec)?,
        )));
    }
    let path = match &common.model {
        Some(p) => p.clone(),
        None => assets::smollm2()?,
    };
    Ok(Arc::new(ModelFiles::open(&path)?))
}

fn open(common: &Common) -> Result<Opened> {
    if let Some(r) = common.rank {
        return Err(Error::InvalidArgument(format!(
            "--rank {r} runs one rank's share of the model, whose logits hold only that rank's slice of the vocabulary: it is for `bench` only (as are --nccl-id and --nccl-tcp)"
        )));
    }
    let files = model_files(common)?;
    let tok = match &*files {
        ModelFiles::Gguf(g) => Tokenizer::from_gguf(g)?,
        ModelFiles::SafeTensors(s) => Tokenizer::from_file(&s.dir.join("tokenizer.json"))?,
        ModelFiles::Synthetic(_) => {
            return Err(Error::InvalidArgument(
                "a --synthetic model has random weights and no tokenizer: use it with `bench`"
                    .into(),
            ))
        }
    };
    let (engine, sha) = open_engine(common, files, &Default::default())?;
    Ok(Opened { engine, tok, sha })
}

/// Whether this process runs one rank of several processes (`--nccl-id` / `--nccl-tcp`).
fn separate_processes(common: &Common) -> bool {
    common.nccl_id.is_some() || common.nccl_tcp.is_some()
}

/// What this runner does after the engine starts that changes the collectives a rank issues,
/// for ranks in separate processes to compare at their rendezvous: the SPD blocks and head
/// groups (a plan by what it switches, not by its file), the ISO mode, the KV capacity and
/// `job` (the subcommand and its sizes).
fn rank_terms(
    common: &Common,
    files: &ModelFiles,
    job: &syncdrop::comm::rendezvous::Terms,
) -> Result<syncdrop::comm::rendezvous::Terms> {
    if !separate_processes(common) {
        return Ok(Default::default());
    }
    let n = files.config()?.n_layers;
    Ok(spd::rank_terms(&common.spd, n)?
        .with("iso", format!("{:?}", common.iso))
        .with("ctx", common.ctx)
        .extended(job))
}

fn open_engine(
    common: &Common,
    files: Arc<ModelFiles>,
    job: &syncdrop::comm::rendezvous::Terms,
) -> Result<(Engine, Option<String>)> {
    let path = files.path().to_path_buf();
    let opts = EngineOptions {
        tp: common.tp,
        threads: common.threads.unwrap_or(EngineOptions::default().threads),
        capacity: common.ctx,
        backend: common.backend,
        layout: None,
        row_invariant: common.row_invariant,
        cuda_graphs: !common.no_graphs,
        only_rank: common.rank,
        emulate_link: common
            .emulate_link
            .as_deref()
            // the hold occupies 8 CTAs, as a P2P all-reduce kernel would (benches/cuda_iso.rs)
            .map(|n| syncdrop::latency::LinkProfile::by_name(n).map(|p| (p, 8)))
            .transpose()?,
        nccl: match (&common.nccl_id, &common.nccl_tcp, common.nccl) {
            (Some(f), _, _) => Some(syncdrop::engine::NcclMode::File(f.clone())),
            (None, Some(a), _) => Some(syncdrop::engine::NcclMode::Tcp(a.clone())),
            (None, None, true) => Some(syncdrop::engine::NcclMode::InProcess),
            (None, None, false) => None,
        },
        wire: common.wire.parse()?,
        rank_terms: rank_terms(common, &files, job)?,
    };
    let t0 = std::time::Instant::now();
    let mut engine = Engine::new(files, &opts)?;
    let n = engine.cfg.n_layers;
    let mut sha = None;
    let spd_desc = match common.spd.as_str() {
        "none" => "none".to_string(),
        "all" => {
            engine.set_spd(&vec![true; n])?;
            format!("all {n} blocks")
        }
        list if list.starts_with("layers:") => {
            let mask = spd::layer_mask(&list["layers:".len()..], n)?;
            engine.set_spd(&mask)?;
            format!(
                "zero-shot on {} of {n} blocks ({list})",
                mask.iter().filter(|b| **b).count()
            )
        }
        plan_path => {
            let plan_path = Path::new(plan_path);
            let s = model_sha256(&engine.files)?;
            let plan = SpdPlan::load_into(plan_path, &mut engine, &s)?;
            sha = Some(s);
            format!(
                "{} ({:.0}% of blocks)",
                plan_path.display(),
                100.0 * plan.fraction()
            )
        }
    };
    if common.iso == syncdrop::iso::IsoMode::Auto && separate_processes(common) {
        // every rank must cut a prefill at the same token, and each process would time its
        // own calibration prefills differently
        eprintln!("ISO cost model: FLOP counts (ranks in separate processes must all split a prefill alike, so none calibrates on its own timings)");
        engine.set_iso(common.iso, None);
    } else if common.iso == syncdrop::iso::IsoMode::Auto && engine.tp() == 1 {
        eprintln!("ISO: off at TP 1 (no all-reduce to hide)");
        engine.set_iso(common.iso, None);
    } else if common.iso == syncdrop::iso::IsoMode::Auto {
        // three timed prefills of up to 256 tokens, within the KV cache (--ctx)
        let long = 256.min(common.ctx);
        let (m, fitted) = engine
            .iso_model()
            .calibrate(&mut engine, (long / 4).max(1), long, 2)?;
        if fitted {
            eprintln!(
                "ISO cost model calibrated on three prefills: {:.3e} s/token + {:.3e} s per attention pair + {:.3e} s per chunk; communication {:.3e} s/token + {:.3e} s per chunk; ISO off below {} tokens{}",
                m.linear,
                m.attn,
                m.fixed,
                m.comm_token,
                m.comm_fixed,
                m.min_len,
                if m.comm_token > 0.0 || m.comm_fixed > 0.0 { " and wherever the hidden communication would not pay for the second chunk" } else { "" }
            );
        } else {
            eprintln!("ISO cost model: timing fit unusable (noisy machine?), using FLOP counts");
        }
        engine.set_iso(common.iso, Some(m));
    } else {
        engine.set_iso(common.iso, None);
    }
    eprintln!(
        "loaded {} ({} layers, {} heads / {} KV heads) at TP {} (heads {}){} on {:?} in {:.2}s; SPD: {spd_desc}",
        path.display(),
        n,
        engine.cfg.n_heads,
        engine.cfg.n_kv_heads,
        engine.tp(),
        engine.layout.head_partition(),
        match common.rank {
            Some(r) => format!(", rank {r} only"),
            None => String::new(),
        },
        common.backend,
        t0.elapsed().as_secs_f64()
    );
    Ok((engine, sha))
}

/// The first `c.calib` BoolQ passages, cut to `c.seq_len` tokens; `flag` names the option
/// that asked for them in errors.
fn calibration(tok: &Tokenizer, c: &Calib, flag: &str) -> Result<Vec<Vec<u32>>> {
    let passages = tasks::boolq_passages(&assets::eval_dir()?, c.calib)?;
    if passages.len() < c.calib {
        return Err(bad(format!(
            "--{flag} {}: BoolQ has {} distinct passages",
            c.calib,
            passages.len()
        )));
    }
    encode_cut(tok, passages.iter(), c.seq_len)
}

/// Each passage's tokens, the first `seq_len` of them.
fn encode_cut<'a>(
    tok: &Tokenizer,
    passages: impl Iterator<Item = &'a String>,
    seq_len: usize,
) -> Result<Vec<Vec<u32>>> {
    passages
        .map(|p| {
            let mut ids = tok.encode_document(p)?;
            ids.truncate(seq_len);
            Ok(ids)
        })
        .collect()
}

fn task_list(s: &Option<String>) -> Vec<String> {
    match s {
        Some(s) => s.split(',').map(|t| t.trim().to_string()).collect(),
        None => tasks::PAPER_TASKS.iter().map(|s| s.to_string()).collect(),
    }
}

fn print_suite(s: &SuiteScore) {
    println!("| task | n | acc | +- s.e. | acc_norm | +- s.e. |");
    println!("|---|---|---|---|---|---|");
    for t in &s.tasks {
        println!(
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} |",
            t.task,
            t.n,
            t.acc,
            t.stderr(),
            t.acc_norm,
            t.stderr_norm()
        );
    }
    println!(
        "| **average** (acc_norm for arc/hellaswag/piqa) | | {:.4} | {:.4} | | |",
        s.average, s.average_stderr
    );
}

/// `compare`'s table: one column per run, each task's loss (baseline - run, points) with its
/// paired s.e., then the average with its 95% interval and, with a budget, each verdict.
fn print_comparisons(
    base: &SuiteScore,
    rows: &[tasks::Comparison],
    without: &[String],
    budget: Option<f64>,
) {
    if !without.is_empty() {
        println!(
            "(average over the tasks other than {}; loss = baseline - run, points)\n",
            without.join(", ")
        );
    } else {
        println!("(loss = baseline - run, points; +- paired standard error)\n");
    }
    let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
    println!("| task | n | baseline | {} |", labels.join(" | "));
    println!("|---|---|---|{}", "---|".repeat(rows.len()));
    for (i, t) in base.tasks.iter().enumerate() {
        let cells: Vec<String> = rows
            .iter()
            .map(|r| {
                let d = &r.per_task[i].1;
                format!("{:+.1} +- {:.1}", 100.0 * d.diff, 100.0 * d.stderr)
            })
            .collect();
        println!(
            "| {} | {} | {:.1}% | {} |",
            t.task,
            t.n,
            100.0 * tasks::headline(t),
            cells.join(" | ")
        );
    }
    let cells: Vec<String> = rows
        .iter()
        .map(|r| {
            let (lo, hi) = r.average.ci95();
            format!(
                "**{:+.2} +- {:.2}** [{:+.2}, {:+.2}]",
                100.0 * r.average.diff,
                100.0 * r.average.stderr,
                100.0 * lo,
                100.0 * hi
            )
        })
        .collect();
    println!(
        "| average | {} | {:.1}% | {} |",
        base.tasks.iter().map(|t| t.n).sum::<usize>(),
        100.0 * base.average,
        cells.join(" | ")
    );
    if let Some(b) = budget {
        println!();
        for r in rows {
            let (_, text) =
                syncdrop::planner::verdict(r.average.diff, Some(r.average.stderr), b / 100.0, "pt");
            println!("{}: {text}", r.label);
        }
    }
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    syncdrop::files::write_atomic(path, syncdrop::files::to_json_pretty_compact(v).as_bytes())
}

/// Parse a JSON file; errors name the file.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bad = |e: String| Error::InvalidArgument(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

fn sibling(path: &Path, ext: &str) -> PathBuf {
    path.with_extension(ext)
}

fn list<T: std::str::FromStr>(what: &str, s: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse()
                .map_err(|_| Error::InvalidArgument(format!("--{what}: cannot parse '{x}'")))
        })
        .collect()
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// `e` as an invalid argument that names where it came from (`--sensitivity FILE: ...`).
fn named(what: impl std::fmt::Display, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => bad(format!("{what}: {m}")),
        e => bad(format!("{what}: {e}")),
    }
}

/// Refuses a count below `min` (`--name N`).
fn at_least(name: &str, v: usize, min: usize) -> Result<()> {
    if v < min {
        return Err(bad(format!("--{name} {v}: must be at least {min}")));
    }
    Ok(())
}

/// Refuses to start work whose result would overwrite an existing file, unless `force`
/// (`--force`): a plan, its distilled weights or a sensitivity JSON can take an hour to make.
fn keep_existing(force: bool, outputs: &[(&str, &Path)]) -> Result<()> {
    if force {
        return Ok(());
    }
    for (what, path) in outputs {
        if path.exists() {
            return Err(bad(format!(
                "{what} {} exists: add --force to overwrite it, or write to another file",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Makes sure an output can be written before the work that produces it: creates its folder
/// if missing (as `latency` does), and refuses a path that is a folder.
fn prepare_out(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(bad(format!(
            "{}: is a folder, not a file to write",
            path.display()
        )));
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => std::fs::create_dir_all(dir).map_err(|e| {
            bad(format!(
                "cannot create {} for {}: {e}",
                dir.display(),
                path.display()
            ))
        }),
        _ => Ok(()),
    }
}

/// Whether `a` and `b` name one existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Refuses a run whose outputs (flag, path) would land on one file: the one written last
/// (a plot, the distilled weights) would replace the other after the work.
fn distinct_outputs(outs: &[(&str, &Path)]) -> Result<()> {
    for (i, (fa, a)) in outs.iter().enumerate() {
        for (fb, b) in &outs[i + 1..] {
            if a == b || same_file(a, b) {
                return Err(bad(format!(
                    "{fa} and {fb} are both {}: one would overwrite the other; give them \
                     different names",
                    a.display()
                )));
            }
        }
    }
    Ok(())
}

/// Options every subcommand that opens a model shares: checked before the model loads, by
/// [`model_files`], which every path to a model takes.
fn check_common(c: &Common) -> Result<()> {
    if c.threads == Some(0) {
        return Err(bad(
            "--threads 0: give at least 1 (or leave it out: all cores)",
        ));
    }
    if let Some(m) = &c.model {
        if !m.exists() {
            return Err(bad(format!(
                "--model {}: no such file or folder",
                m.display()
            )));
        }
    }
    let spd = c.spd.as_str();
    if !(matches!(spd, "none" | "all") || spd.starts_with("layers:") || Path::new(spd).is_file()) {
        return Err(bad(format!(
            "--spd {spd}: not `none`, `all`, `layers:I,J-K` nor a plan file (JSON from `plan`) that exists"
        )));
    }
    Ok(())
}

/// Subcommands that choose SPD blocks themselves refuse an --spd that they would ignore.
fn no_spd(c: &Common, cmd: &str) -> Result<()> {
    if c.spd != "none" {
        return Err(bad(format!(
            "`{cmd}` chooses the SPD blocks itself and starts from none: drop --spd {}",
            c.spd
        )));
    }
    Ok(())
}

/// The distillation's (and head grouping's) calibration text, `--distill-calib` passages of
/// `--distill-seq-len` tokens; none when not `used`.
fn distill_data(tok: &Tokenizer, train: &Train, used: bool) -> Result<Vec<Vec<u32>>> {
    if !used {
        return Ok(Vec::new());
    }
    let c = Calib {
        calib: train.distill_calib,
        seq_len: train.distill_seq_len,
    };
    if train.distill_text == "boolq" {
        return calibration(tok, &c, "distill-calib");
    }
    let sources: Vec<&str> = train.distill_text.split(',').map(str::trim).collect();
    let dir = assets::eval_dir()?;
    let mut lists = Vec::new();
    for s in &sources {
        if tasks::PAPER_TASKS.contains(&tasks::base_task(s)) {
            return Err(bad(format!(
                "--distill-text {s}: `eval` scores that task, so fitting on its documents would \
                 leak them into the scores; pick a task it does not score (openbookqa, csqa, \
                 socialiqa, ...) or boolq"
            )));
        }
        // each source's share, rounded up; about 5 characters a token, so most passages
        // fill --distill-seq-len
        let share = c.calib.div_ceil(sources.len());
        let list = if *s == "boolq" {
            tasks::boolq_passages(&dir, share)?
        } else {
            tasks::task_passages(&dir, s, share, 5 * c.seq_len)?
        };
        if list.len() < share {
            return Err(bad(format!(
                "--distill-text {s}: {} passages, {share} needed for --distill-calib {}",
                list.len(),
                c.calib
            )));
        }
        lists.push(list);
    }
    // in turn, so that --holdout's last passages come from every source
    let passages = (0..c.calib).map(|i| &lists[i % lists.len()][i / lists.len()]);
    encode_cut(tok, passages, c.seq_len)
}

/// A sensitivity saved by `sensitivity` (or `plan`), checked against `engine`'s model and
/// TP degree.
fn saved_sensitivity(path: &Path, engine: &Engine) -> Result<Sensitivity> {
    let s: Sensitivity = read_json(path)?;
    s.check_for(engine)
        .map_err(|e| named(format_args!("--sensitivity {}", path.display()), e))?;
    Ok(s)
}

/// The distillation settings of --epochs, --lr, --holdout and --patience, checked when
/// `used` (a run that distils nothing ignores them). With `--backend cuda` the training runs
/// on GPU 0, else on `--threads` host threads.
fn distill_config(train: &Train, used: bool, common: &Common) -> Result<DistillConfig> {
    let cfg = DistillConfig {
        epochs: train.epochs,
        lr: train.lr,
        holdout: train.holdout,
        patience: train.patience,
        device: match common.backend {
            BackendKind::Cpu => DistillDevice::Cpu,
            BackendKind::Cuda => DistillDevice::Cuda(0),
        },
        threads: common
            .threads
            .unwrap_or_else(|| DistillConfig::default().threads),
    };
    if used {
        cfg.validate()?;
        at_least("distill-calib", train.distill_calib, 1)?;
        at_least("distill-seq-len", train.distill_seq_len, 2)?;
        if train.holdout >= train.distill_calib {
            return Err(bad(format!(
                "--holdout {} leaves none of the {} distillation passages (--distill-calib) to \
                 train on",
                train.holdout, train.distill_calib
            )));
        }
    }
    Ok(cfg)
}

/// One block's linear compensation fit, as the runner logs it.
fn comp_fit_line(l: usize, c: &syncdrop::distill::CompReport) -> String {
    format!(
        "block {l:2}: linear compensation rank {} on {} tokens leaves {:.1}% of the missing \
         partials{} in {:.1}s",
        c.rank,
        c.tokens,
        100.0 * c.residual,
        if c.heldout { " (held out)" } else { "" },
        c.secs
    )
}

/// What a plan records of how its distilled weights were made.
fn distill_settings(train: &Train, cfg: &DistillConfig) -> serde_json::Value {
    serde_json::json!({
        "calib_passages": train.distill_calib,
        "text": train.distill_text,
        "seq_len": train.distill_seq_len,
        "epochs": cfg.epochs,
        // the f32 as written on the command line (5e-5, not 4.99999987e-5)
        "lr": cfg.lr.to_string().parse::<f64>().unwrap_or(f64::from(cfg.lr)),
        "holdout": cfg.holdout,
        "patience": cfg.patience,
        "device": cfg.device_name(),
    })
}

/// At least one calibration passage of at least two tokens (perplexity needs a next token).
fn check_calib(c: &Calib) -> Result<()> {
    at_least("calib", c.calib, 1)?;
    at_least("seq-len", c.seq_len, 2)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Latency {
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
        } => {
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
        }
        Cmd::Bench {
            common,
            prompt,
            prefill_reps,
            steps,
            warmup,
            out,
        } => {
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
        }
        Cmd::Generate {
            common,
            prompt,
            chat,
            system,
            max_tokens,
            temperature,
            top_p,
            seed,
            print_ids,
        } => {
            if system.is_some() && !chat {
                return Err(bad("--system is the system prompt of --chat: add --chat"));
            }
            // the sampling settings before the model loads
            let mut sampler = Sampler::new(SamplerConfig {
                temperature,
                top_p,
                seed,
            })?;
            let Opened {
                mut engine, tok, ..
            } = open(&common)?;
            let text = if chat {
                chatml(system.as_deref().or(tok.default_system.as_deref()), &prompt)
            } else {
                prompt.clone()
            };
            if tok.encode(&text)?.is_empty() {
                return Err(bad("the prompt is empty: give --prompt some text"));
            }
            let ids = tok.encode_document(&text)?;
            if ids.len() + max_tokens > common.ctx {
                return Err(bad(format!(
                    "the prompt ({} tokens) and -n {max_tokens} need {} positions, more than the KV cache's --ctx {}: raise --ctx or lower -n",
                    ids.len(),
                    ids.len() + max_tokens,
                    common.ctx
                )));
            }
            let stop = if chat {
                tok.token_id("<|im_end|>").or(tok.eos)
            } else {
                tok.eos
            };
            if !chat {
                print!("{prompt}");
            }
            let mut generated = Vec::new();
            let mut shown = String::new();
            let (_, stats) = generate(&mut engine, &ids, max_tokens, &mut sampler, stop, |t| {
                generated.push(t);
                let s = tok.decode(&generated, true)?;
                // Print only complete characters: the decoded text grows monotonically.
                if let Some(new) = s.strip_prefix(shown.as_str()) {
                    print!("{new}");
                    let _ = std::io::stdout().flush();
                }
                shown = s;
                Ok(())
            })?;
            println!();
            if let Some(s) = engine.last_iso_split {
                eprintln!(
                    "ISO: prompt of {} tokens split {} + {}",
                    ids.len(),
                    s,
                    ids.len() - s
                );
            }
            if print_ids {
                eprintln!("{{\"prompt\": {ids:?}, \"tokens\": {generated:?}}}");
            }
            eprintln!(
                "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | sync points: {} ({:.0} per forward), {:.1} ms in communication ({:.1}%){}",
                stats.prefill_tokens,
                stats.prefill_tps(),
                stats.decode_tokens,
                stats.decode_tps(),
                stats.comm.all_reduces,
                stats.comm.all_reduces as f64 / (stats.decode_tokens + 1) as f64,
                stats.comm.seconds() * 1e3,
                100.0 * stats.comm.seconds() / (stats.prefill_secs + stats.decode_secs).max(1e-12),
                stats.comm.untimed_note()
            );
        }
        Cmd::Perplexity {
            common,
            file,
            lambada: n_lambada,
            window,
            stride,
        } => {
            if n_lambada == Some(0) {
                return Err(bad("--lambada 0: give at least 1 passage"));
            }
            if window > common.ctx {
                return Err(bad(format!(
                    "--window {window} is longer than the KV cache (--ctx {}): lower --window or raise --ctx",
                    common.ctx
                )));
            }
            if window < 2 || stride == 0 || stride > window {
                return Err(bad(format!(
                    "--window {window} --stride {stride}: need a window of at least 2 tokens and 0 < stride <= window"
                )));
            }
            // the text before the model loads: a wrong path fails at once
            let text = file
                .as_ref()
                .map(|f| {
                    std::fs::read_to_string(f)
                        .map_err(|e| Error::InvalidArgument(format!("--file {}: {e}", f.display())))
                })
                .transpose()?;
            let Opened {
                mut engine, tok, ..
            } = open(&common)?;
            engine.reset_comm_stats()?;
            let (what, r) = match (file, text) {
                (Some(f), Some(text)) => {
                    let ids = tok.encode_document(&text)?;
                    (
                        f.display().to_string(),
                        score_tokens(&mut engine, &ids, window, stride)?,
                    )
                }
                _ => {
                    let n = n_lambada.unwrap_or(50);
                    let texts: Vec<String> = lambada(&assets::eval_dir()?, n)?
                        .iter()
                        .map(|p| p.text())
                        .collect();
                    let r = perplexity_texts(&mut engine, &tok, &texts, window, stride, true)?;
                    (format!("LAMBADA, first {} passages", texts.len()), r)
                }
            };
            if r.tokens_scored == 0 {
                return Err(bad(format!(
                    "{what}: no token to score (an empty file, or passages of one token)"
                )));
            }
            let comm = engine.comm_stats()?[0];
            println!(
                "perplexity {:.4} on {} ({} tokens scored) | {:.1} tok/s | sync points {} | {:.2} s in communication{}",
                r.ppl(),
                what,
                r.tokens_scored,
                r.tokens_per_sec(),
                comm.all_reduces,
                comm.seconds(),
                comm.untimed_note()
            );
        }
        Cmd::Eval {
            common,
            tasks: names,
            limit,
            seed,
            split,
            offset,
            paired_with,
            budget_acc,
            out,
        } => {
            at_least("limit", limit, 1)?;
            if let Some(k) = split.filter(|k| *k > 1) {
                return Err(bad(format!(
                    "--split {k}: 0 (the search half) or 1 (the held-out half)"
                )));
            }
            if let Some(b) = budget_acc.filter(|b| b.is_nan() || *b < 0.0) {
                return Err(bad(format!(
                    "--budget-acc {b}: a budget is 0 points or more"
                )));
            }
            if let (Some(out), Some(p)) = (&out, &paired_with) {
                if out == p || same_file(out, p) {
                    return Err(bad(format!(
                        "--out {} is the --paired-with file: this run's scores would replace \
                         the reference; write them to another file",
                        out.display()
                    )));
                }
            }
            if let Some(out) = &out {
                prepare_out(out)?;
            }
            // Read the reference first: a bad file should fail before an hour of evaluation.
            let reference: Option<SuiteScore> =
                paired_with.as_deref().map(read_json).transpose()?;
            // the documents (a misspelt --tasks) before the model loads
            let dir = assets::eval_dir()?;
            let sets = task_list(&names)
                .into_iter()
                .map(|t| {
                    let task = tasks::load_task(&dir, &t)?;
                    let docs = match offset {
                        Some(k) => tasks::sample_after(&task, k, limit, seed),
                        None => tasks::sample(&task, limit, seed, split),
                    };
                    if docs.is_empty() {
                        return Err(Error::InvalidArgument(format!(
                            "{t}: no documents left after skipping {} of {}",
                            offset.unwrap_or(0),
                            task.docs.len()
                        )));
                    }
                    Ok((t, docs))
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some(r) = &reference {
                // Same tasks and documents, or the pairing is meaningless: check before running.
                let ours: Vec<(&str, Vec<u64>)> = sets
                    .iter()
                    .map(|(t, d)| (t.as_str(), d.iter().map(|d| d.id).collect()))
                    .collect();
                let theirs: Vec<(&str, Vec<u64>)> = r
                    .tasks
                    .iter()
                    .map(|t| (t.task.as_str(), t.docs.iter().map(|d| d.id).collect()))
                    .collect();
                if ours != theirs {
                    return Err(Error::InvalidArgument(format!(
                        "--paired-with {}: its tasks or documents differ from this run's \
                         (evaluate both with the same --tasks, --limit, --seed, --split/--offset)",
                        paired_with.as_deref().unwrap_or(Path::new("")).display()
                    )));
                }
            }
            let Opened {
                mut engine, tok, ..
            } = open(&common)?;
            let s = evaluate_suite(&mut engine, &tok, &sets, true)?;
            print_suite(&s);
            if let Some(out) = out {
                write_json(&out, &s)?;
            }
            if let Some(r) = &reference {
                let d = tasks::paired_difference(r, &s)?;
                let (lo, hi) = d.ci95();
                println!(
                    "loss against {}: {:+.2} +- {:.2} pt (paired s.e.; 95% interval [{:+.2}, {:+.2}]); \
                     {} of {} documents changed outcome",
                    paired_with.as_deref().unwrap_or(Path::new("")).display(),
                    100.0 * d.diff,
                    100.0 * d.stderr,
                    100.0 * lo,
                    100.0 * hi,
                    d.discordant,
                    d.docs
                );
                if let Some(b) = budget_acc {
                    let (_, text) =
                        syncdrop::planner::verdict(d.diff, Some(d.stderr), b / 100.0, "pt");
                    println!("budget {b} pt: {text}");
                }
            }
        }
        Cmd::Compare {
            base,
            runs,
            without,
            budget_acc,
            out,
            plot,
            title,
        } => {
            if let Some(b) = budget_acc.filter(|b| b.is_nan() || *b < 0.0) {
                return Err(bad(format!(
                    "--budget-acc {b}: a budget is 0 points or more"
                )));
            }
            let without: Vec<String> = without
                .as_deref()
                .map(|w| list("without", w))
                .transpose()?
                .unwrap_or_default();
            // An output must not replace an input (or the other output).
            let inputs: Vec<String> = std::iter::once(base.as_str())
                .chain(
                    runs.iter()
                        .map(|r| r.split_once('=').map_or(r.as_str(), |(_, f)| f)),
                )
                .flat_map(|spec| spec.split('+'))
                .map(String::from)
                .collect();
            let outs: Vec<(&str, &Path)> = [("--out", &out), ("--plot", &plot)]
                .into_iter()
                .filter_map(|(f, p)| p.as_deref().map(|p| (f, p)))
                .collect();
            distinct_outputs(&outs)?;
            for (flag, o) in &outs {
                if let Some(f) = inputs.iter().find(|f| same_file(o, Path::new(f))) {
                    return Err(bad(format!(
                        "{flag} {} is the input {f}: writing it would replace a score; \
                         give another name",
                        o.display()
                    )));
                }
            }
            for p in out.iter().chain(&plot) {
                prepare_out(p)?;
            }
            let load = |spec: &str| -> Result<SuiteScore> {
                let parts = spec
                    .split('+')
                    .map(|f| read_json::<SuiteScore>(Path::new(f)))
                    .collect::<Result<Vec<_>>>()?;
                let s = tasks::merge_suites(parts).map_err(|e| named(spec, e))?;
                if without.is_empty() {
                    Ok(s)
                } else {
                    tasks::without_tasks(s, &without).map_err(|e| named(spec, e))
                }
            };
            let base_score = load(&base)?;
            let mut rows = Vec::new();
            for run in &runs {
                let (label, spec) = match run.split_once('=') {
                    Some((l, f)) if !l.is_empty() => (l.to_string(), f),
                    _ => {
                        let first = run.split('+').next().unwrap_or(run);
                        let stem = Path::new(first)
                            .file_stem()
                            .map_or(first.into(), |s| s.to_string_lossy().into_owned());
                        (stem, run.as_str())
                    }
                };
                let score = load(spec)?;
                rows.push(tasks::compare(&label, &base_score, &score).map_err(|e| {
                    bad(format!(
                        "{run} against --base {base}: {e} (compare runs on the same \
                         documents: the same --tasks, --limit, --seed, --split/--offset)"
                    ))
                })?);
            }
            print_comparisons(&base_score, &rows, &without, budget_acc);
            if let Some(out) = &out {
                write_json(
                    out,
                    &serde_json::json!({
                        "base": base,
                        "without": without,
                        "budget_acc": budget_acc,
                        "base_accuracy": base_score.average,
                        "runs": rows,
                    }),
                )?;
                eprintln!("wrote {}", out.display());
            }
            if let Some(p) = &plot {
                let title = title.unwrap_or_else(|| match budget_acc {
                    Some(b) => format!("accuracy loss against {base} (budget {b} pt)"),
                    None => format!("accuracy loss against {base}"),
                });
                syncdrop::spd::plot_comparisons(&rows, budget_acc, &title, p)?;
                eprintln!("wrote {}", p.display());
            }
        }
        Cmd::Sensitivity {
            common,
            calib,
            t1,
            t2,
            out,
            plot,
            from_json,
            force,
        } => {
            if let (Some(a), Some(b)) = (t1, t2) {
                if a > b {
                    return Err(bad(format!(
                        "--t1 {a} is above --t2 {b}: t1 separates in-sensitive from sensitive blocks, t2 sensitive from extremely sensitive"
                    )));
                }
            }
            match &from_json {
                Some(p) => distinct_outputs(&[("--from-json", p), ("--plot", &plot)])?,
                None => distinct_outputs(&[("--out", &out), ("--plot", &plot)])?,
            }
            prepare_out(&plot)?;
            let (s, tp, n_calib): (Sensitivity, usize, String) = match from_json {
                Some(p) => {
                    let s: Sensitivity = read_json(&p)?;
                    if s.ppl_from.len() != s.sensitivity.len() {
                        return Err(bad(format!(
                            "--from-json {}: {} sensitivities but {} perplexities (ppl_from): \
                             not a file as `sensitivity` writes it",
                            p.display(),
                            s.sensitivity.len(),
                            s.ppl_from.len()
                        )));
                    }
                    let passages = match s.passages {
                        Some(n) => format!("{n} calibration passages ({})", p.display()),
                        None => format!("the calibration passages of {}", p.display()),
                    };
                    let tp = s.tp.unwrap_or(common.tp);
                    (s, tp, passages)
                }
                None => {
                    no_spd(&common, "sensitivity")?;
                    check_calib(&calib)?;
                    keep_existing(force, &[("--out", &out)])?;
                    prepare_out(&out)?;
                    let Opened {
                        mut engine, tok, ..
                    } = open(&common)?;
                    let seqs = calibration(&tok, &calib, "calib")?;
                    let s = spd::sensitivity(&mut engine, &seqs, calib.seq_len.max(2), true)?;
                    write_json(&out, &s)?;
                    eprintln!("wrote {}", out.display());
                    (
                        s,
                        engine.tp(),
                        format!("{} calibration passages", seqs.len()),
                    )
                }
            };
            if s.sensitivity.is_empty() {
                return Err(bad("the sensitivity has no blocks"));
            }
            let mut sorted = s.sensitivity.clone();
            sorted.sort_by(f64::total_cmp);
            let t1 = t1.unwrap_or(sorted[sorted.len() / 2]);
            let t2 = t2.unwrap_or(sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)]);
            println!("base perplexity {:.4} on {n_calib}", s.base_ppl);
            println!("| block | ppl with blocks i.. SPD | sensitivity | class |");
            println!("|---|---|---|---|");
            for (i, v) in s.sensitivity.iter().enumerate() {
                println!(
                    "| {i} | {:.4} | {v:+.4} | {:?} |",
                    s.ppl_from[i],
                    spd::classify(*v, t1, t2)
                );
            }
            spd::plot_sensitivity(&s, t1, t2, &format!("SPD sensitivity, TP {tp}"), &plot)?;
            eprintln!("wrote {}", plot.display());
        }
        Cmd::Plan {
            common,
            calib,
            budget_ppl,
            budget_acc,
            limit,
            heldout_limit,
            b2b,
            train,
            search_z,
            max_task_drop,
            past_wall,
            distill_zero_shot,
            compensate,
            sensitivity,
            out,
            force,
        } => {
            no_spd(&common, "plan")?;
            check_calib(&calib)?;
            at_least("limit", limit, 1)?;
            let heldout = heldout_limit.unwrap_or(limit);
            at_least("heldout-limit", heldout, 1)?;
            if common.tp < 2 {
                return Err(bad(format!(
                    "--tp {}: SPD drops all-reduces between ranks, and one rank has none: plan for TP 2 or more",
                    common.tp
                )));
            }
            if let Some(b) = budget_ppl.or(budget_acc).filter(|b| b.is_nan() || *b < 0.0) {
                return Err(bad(format!("budget {b}: a budget is 0 or more")));
            }
            let budget = match (budget_ppl, budget_acc) {
                (Some(p), None) => Budget::PplIncrease(p / 100.0),
                (None, Some(a)) => Budget::AccDrop(a / 100.0),
                _ => {
                    return Err(Error::InvalidArgument(
                        "give --budget-ppl PERCENT or --budget-acc POINTS".into(),
                    ))
                }
            };
            match (max_task_drop, budget) {
                (Some(c), _) if c.is_nan() || c < 0.0 => {
                    return Err(bad(format!(
                        "--max-task-drop {c}: a cap on each task's drop is 0 points or more"
                    )))
                }
                (Some(_), Budget::PplIncrease(_)) => {
                    return Err(bad(
                        "--max-task-drop caps each task's accuracy drop: it needs --budget-acc",
                    ))
                }
                _ => {}
            }
            // linear compensation fits on the distillation passages with their hold-out
            let recovers = b2b || compensate > 0;
            let dcfg = distill_config(&train, recovers, &common)?;
            let ccfg = (compensate > 0).then(|| CompConfig {
                rank: compensate,
                holdout: train.holdout,
                ..CompConfig::default()
            });
            distinct_outputs(&[
                ("--out", &out),
                ("the plot beside --out", &sibling(&out, "svg")),
                (
                    "the distilled weights beside --out",
                    &sibling(&out, "safetensors"),
                ),
            ])?;
            let weights = sibling(&out, "safetensors");
            let mut kept = vec![("--out", out.as_path())];
            if recovers {
                kept.push(("the distilled weights beside --out", weights.as_path()));
            }
            // a measured sensitivity is saved beside the plan (minutes of work, and with
            // --compensate the only record of SPD + LC's block order): reuse it with
            // --sensitivity
            let sens_out = sibling(&out, "sensitivity.json");
            if sensitivity.is_none() {
                kept.push(("the sensitivity beside --out", sens_out.as_path()));
            }
            // an accuracy budget's held-out outcomes (two evaluations), in eval's format
            let held_out = [
                sibling(&out, "heldout_base.json"),
                sibling(&out, "heldout_plan.json"),
            ];
            if matches!(budget, Budget::AccDrop(_)) {
                for p in &held_out {
                    kept.push(("the held-out outcomes beside --out", p.as_path()));
                }
            }
            keep_existing(force, &kept)?;
            prepare_out(&out)?;
            // the search and held-out data before the model loads and the sensitivity runs
            let dir = assets::eval_dir()?;
            enum Data {
                Passages([Vec<String>; 2]),
                Docs([Vec<(String, Vec<tasks::Doc>)>; 2]),
            }
            let data = match budget {
                Budget::PplIncrease(_) => {
                    let texts: Vec<String> = lambada(&dir, limit + heldout)?
                        .iter()
                        .map(|p| p.text())
                        .collect();
                    if texts.len() < limit + heldout {
                        return Err(bad(format!(
                            "--limit {limit}, --heldout-limit {heldout}: a perplexity budget \
                             scores {limit} LAMBADA passages in the search split and {heldout} \
                             in the held-out split, and LAMBADA has {}: give fewer",
                            texts.len(),
                        )));
                    }
                    let held_out = texts[limit..].to_vec();
                    let mut search = texts;
                    search.truncate(limit);
                    Data::Passages([search, held_out])
                }
                Budget::AccDrop(_) => {
                    let mut splits = [Vec::new(), Vec::new()];
                    for t in tasks::PAPER_TASKS {
                        let task = tasks::load_task(&dir, t)?;
                        let halves = tasks::plan_splits(&task, limit, heldout, 0);
                        for (v, docs) in splits.iter_mut().zip(halves) {
                            v.push((t.to_string(), docs));
                        }
                    }
                    Data::Docs(splits)
                }
            };
            let Opened {
                mut engine, tok, ..
            } = open(&common)?;
            if let Data::Passages(halves) = &data {
                ppl_fits_ctx(&tok, halves.iter().flatten(), common.ctx)?;
            }
            // the distillation's (and head grouping's and compensation's) calibration text,
            // none without them: read before the sensitivity, so that a bad --distill-calib
            // stops the run early
            let seqs = distill_data(&tok, &train, recovers)?;
            if let Some(c) = &ccfg {
                c.validate(engine.cfg.hidden, seqs.len())
                    .map_err(|e| named("--compensate", e))?;
            }
            let saved = sensitivity
                .map(|p| saved_sensitivity(&p, &engine).map(|s| (p, s)))
                .transpose()?;
            if let Some((p, s)) = &saved {
                if s.compensation_rank != ccfg.map(|c| c.rank) {
                    let how = |r: Option<usize>| {
                        r.map_or("zero-shot SPD blocks".into(), |k| {
                            format!("SPD blocks compensated at rank {k}")
                        })
                    };
                    eprintln!(
                        "warning: --sensitivity {} was measured with {}, this plan searches \
                         {}: its block order may not be this search's",
                        p.display(),
                        how(s.compensation_rank),
                        how(ccfg.map(|c| c.rank))
                    );
                }
            }
            // linear compensation for every block, before the sensitivity (which then
            // measures SPD + LC)
            let lc = match &ccfg {
                Some(c) => {
                    eprintln!(
                        "fitting linear compensation of rank {} for every block on {} passages \
                         ({} held out)",
                        c.rank,
                        seqs.len(),
                        c.holdout
                    );
                    Some(compensate_blocks(
                        &mut engine,
                        &seqs,
                        c,
                        dcfg.threads,
                        true,
                        |l, r| eprintln!("{}", comp_fit_line(l, r)),
                    )?)
                }
                None => None,
            };
            let sens: Sensitivity = match saved {
                Some((_, s)) => s,
                None => {
                    let seqs = calibration(&tok, &calib, "calib")?;
                    let mut s = spd::sensitivity(&mut engine, &seqs, calib.seq_len.max(2), true)?;
                    s.compensation_rank = ccfg.map(|c| c.rank);
                    // written now: a search that fails later keeps it
                    write_json(&sens_out, &s)?;
                    eprintln!("wrote {} (reuse it with --sensitivity)", sens_out.display());
                    s
                }
            };
            let mut metric: Box<dyn planner::Metric> = match data {
                Data::Passages(halves) => {
                    let enc = |h: &[String]| {
                        h.iter()
                            .map(|t| tok.encode_document(t))
                            .collect::<Result<Vec<_>>>()
                    };
                    Box::new(planner::PplMetric {
                        splits: [enc(&halves[0])?, enc(&halves[1])?],
                        window: PPL_WINDOW,
                    })
                }
                // the planner gets per-document outcomes: paired s.e. of the drop; with the
                // model's own tokenizer (GGUF or a Hugging Face folder's tokenizer.json)
                Data::Docs(splits) => Box::new(planner::SuiteMetric { tok, splits }),
            };
            let (outcome, distilled) = planner::plan(
                &mut engine,
                &sens,
                budget,
                planner::Search {
                    z: search_z,
                    past_wall,
                    distill_zero_shot,
                    compensation: lc.as_ref(),
                    max_task_drop: max_task_drop.map(|p| p / 100.0),
                },
                metric.as_mut(),
                &seqs,
                b2b.then_some(&dcfg),
                |m| eprintln!("{m}"),
            )?;
            let sha = model_sha256(&engine.files)?;
            let mut plan = planner::plan_file(&engine, sha, &sens, &outcome, budget);
            if !distilled.is_empty() {
                let w = sibling(&out, "safetensors");
                // zero-shot blocks with compensation keep the model's weights: only their
                // maps are written
                let original: Vec<usize> = distilled
                    .iter()
                    .map(|b| b.0)
                    .filter(|l| outcome.recovery[*l] == Some(Recovery::ZeroShot))
                    .collect();
                save_recovered(&w, &distilled, &original)?;
                plan.set_distilled(&w)?;
                // how the weights were made (the per-block reports are in the outcome)
                plan.notes["distillation_settings"] = distill_settings(&train, &dcfg);
                plan.notes["b2b"] = serde_json::json!(b2b);
                if let Some(c) = &ccfg {
                    plan.notes["compensation"] = serde_json::json!({
                        "rank": c.rank, "ridge": c.ridge, "holdout": c.holdout,
                        "fitted": "every block up front, on the TP model's block inputs; \
                                   refitted on the plan's inputs before a block's B2B",
                    });
                }
            }
            plan.save(&out)?;
            if let Some((base, chosen)) = &outcome.heldout_suites {
                write_json(&held_out[0], base)?;
                write_json(&held_out[1], chosen)?;
                let (b, p) = (held_out[0].display(), held_out[1].display());
                eprintln!(
                    "wrote the held-out split's outcomes: {b} (TP baseline) and {p} (the plan); \
                     per task, with a plot: `compare --base {b} {p} --plot held_out.svg`"
                );
            }
            spd::plot_sensitivity(
                &sens,
                outcome.t1,
                outcome.t2,
                &format!(
                    "SPD sensitivity and the planner's thresholds, TP {}",
                    engine.tp()
                ),
                &sibling(&out, "svg"),
            )?;
            println!(
                "plan: {} of {} blocks SPD ({:.0}%): {} zero-shot, {} B2B, {} HG+B2B; thresholds t1 = {}, t2 = {}",
                outcome.spd.iter().filter(|s| **s).count(),
                outcome.spd.len(),
                100.0 * outcome.fraction,
                outcome.zero_shot_blocks,
                outcome.b2b_blocks,
                outcome.hg_b2b_blocks,
                threshold(outcome.t1),
                threshold(outcome.t2)
            );
            println!(
                "search split: {:.4} -> {:.4}; held-out split: {:.4} -> {:.4} (loss {:+.4}, budget {}): {}",
                outcome.search_base,
                outcome.search_score,
                outcome.heldout_base,
                outcome.heldout_score,
                outcome.heldout_loss,
                budget.limit(),
                outcome.verdict_text
            );
            eprintln!(
                "wrote {} ({} evaluations)",
                out.display(),
                outcome.evaluations
            );
        }
        Cmd::Sweep {
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
        } => {
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
            if fracs.is_empty()
                && b2b_fracs.is_empty()
                && hg_fracs.is_empty()
                && lc_fracs.is_empty()
            {
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
                let measure =
                    |engine: &mut Engine, method: &str, k: usize| -> Result<spd::SweepPoint> {
                        let ppl =
                            perplexity_texts(engine, &tok, &texts, PPL_WINDOW, 256, false)?.ppl();
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
                        compensate_blocks(
                            &mut engine,
                            &seqs,
                            &ccfg,
                            dcfg.threads,
                            true,
                            |l, r| eprintln!("TP {tp} lc {}", comp_fit_line(l, r)),
                        )?;
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
                    let targets: Vec<usize> =
                        fr.iter().map(|f| (f * n as f64).round() as usize).collect();
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
        }
        Cmd::Distill {
            common,
            train,
            compensate,
            no_b2b,
            out,
            force,
        } => {
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
                let (w, rep) =
                    recover_layer(&mut engine, &seqs, l, b2b, ccfg.as_ref(), dcfg.threads)?;
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
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
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

/// The window in which `plan` and `sweep` score LAMBADA perplexity (`perplexity`'s default).
const PPL_WINDOW: usize = 512;

/// Refuses a KV cache too small for scoring `texts` in [`PPL_WINDOW`]-token windows, before
/// the sensitivity and distillation run (the overflow stopped a run after them).
fn ppl_fits_ctx<'a>(
    tok: &Tokenizer,
    texts: impl Iterator<Item = &'a String>,
    ctx: usize,
) -> Result<()> {
    let mut longest = 0;
    for t in texts {
        longest = longest.max(tok.encode_document(t)?.len());
    }
    let need = longest.min(PPL_WINDOW);
    if need > ctx {
        return Err(bad(format!(
            "--ctx {ctx}: the LAMBADA perplexity scores windows of up to {need} tokens (the \
             longest passage, at most {PPL_WINDOW}): raise --ctx to {need} or more"
        )));
    }
    Ok(())
}

/// A planner threshold for the log: -inf (no block in that class) reads "none".
fn threshold(t: f64) -> String {
    if t.is_finite() {
        format!("{t:.4}")
    } else {
        "none (no block in that class)".into()
    }
}
