//! The syncdrop reference runner: tensor-parallel LLaMA on real weights.
//!
//!   cargo run --release --example llama -- generate --tp 3 --prompt "The capital of France is"
//!   cargo run --release --example llama -- perplexity --tp 3 --lambada 50
//!
//! The model defaults to the SmolLM2 GGUF fetched by `scripts/fetch-assets.sh`.

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use syncdrop::engine::{BackendKind, Engine, EngineOptions};
use syncdrop::eval::{lambada, perplexity_texts, score_tokens};
use syncdrop::generate::{generate, Sampler, SamplerConfig};
use syncdrop::tokenizer::{chatml, Tokenizer};
use syncdrop::{assets, ModelFiles, Result};

#[derive(Parser)]
#[command(name = "llama", about = "syncdrop reference runner: tensor-parallel LLaMA inference", long_about = None)]
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
    /// Backend: cpu (threads as ranks) or cuda.
    #[arg(long, default_value = "cpu")]
    backend: BackendKind,
    /// Compute threads in total (split evenly over ranks). Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// KV-cache capacity in tokens.
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
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
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling mass (0, 1].
        #[arg(long, default_value_t = 1.0)]
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
        /// Score the first N LAMBADA passages (each on its own). Default when no --file.
        #[arg(long)]
        lambada: Option<usize>,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Window stride in tokens.
        #[arg(long, default_value_t = 256)]
        stride: usize,
    },
}

fn open(common: &Common) -> Result<(Engine, Tokenizer)> {
    let path = match &common.model {
        Some(p) => p.clone(),
        None => assets::smollm2()?,
    };
    let files = Arc::new(ModelFiles::open(&path)?);
    let tok = match &*files {
        ModelFiles::Gguf(g) => Tokenizer::from_gguf(g)?,
        ModelFiles::SafeTensors(s) => Tokenizer::from_file(&s.dir.join("tokenizer.json"))?,
    };
    let opts = EngineOptions {
        tp: common.tp,
        threads: common.threads.unwrap_or(EngineOptions::default().threads),
        capacity: common.ctx,
        backend: common.backend,
        layout: None,
    };
    let t0 = std::time::Instant::now();
    let engine = Engine::new(files, &opts)?;
    eprintln!(
        "loaded {} ({} layers, {} heads / {} KV heads) at TP {} (heads {}) on {:?} in {:.2}s",
        path.display(),
        engine.cfg.n_layers,
        engine.cfg.n_heads,
        engine.cfg.n_kv_heads,
        engine.tp(),
        engine.layout.head_partition(),
        common.backend,
        t0.elapsed().as_secs_f64()
    );
    Ok((engine, tok))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
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
            let (mut engine, tok) = open(&common)?;
            let text = if chat {
                chatml(system.as_deref().or(tok.default_system.as_deref()), &prompt)
            } else {
                prompt.clone()
            };
            let ids = tok.encode(&text)?;
            let mut sampler = Sampler::new(SamplerConfig {
                temperature,
                top_p,
                seed,
            })?;
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
            if print_ids {
                eprintln!("{{\"prompt\": {ids:?}, \"tokens\": {generated:?}}}");
            }
            let syncs_per_decode = if stats.decode_tokens + 1 > 0 {
                stats.comm.all_reduces as f64 / (stats.decode_tokens + 1) as f64
            } else {
                0.0
            };
            eprintln!(
                "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | sync points: {} ({:.0} per forward), {:.1} ms in communication ({:.1}%)",
                stats.prefill_tokens,
                stats.prefill_tps(),
                stats.decode_tokens,
                stats.decode_tps(),
                stats.comm.all_reduces,
                syncs_per_decode,
                stats.comm.seconds() * 1e3,
                100.0 * stats.comm.seconds() / (stats.prefill_secs + stats.decode_secs).max(1e-12)
            );
        }
        Cmd::Perplexity {
            common,
            file,
            lambada: n_lambada,
            window,
            stride,
        } => {
            let (mut engine, tok) = open(&common)?;
            engine.reset_comm_stats()?;
            let (what, r) = match file {
                Some(f) => {
                    let text = std::fs::read_to_string(&f).map_err(|e| {
                        syncdrop::Error::InvalidArgument(format!("{}: {e}", f.display()))
                    })?;
                    let ids = tok.encode(&text)?;
                    (
                        f.display().to_string(),
                        score_tokens(&mut engine, &ids, window, stride)?,
                    )
                }
                None => {
                    let n = n_lambada.unwrap_or(50);
                    let texts: Vec<String> = lambada(&assets::eval_dir()?, n)?
                        .iter()
                        .map(|p| p.text())
                        .collect();
                    let r = perplexity_texts(&mut engine, &tok, &texts, window, stride, true)?;
                    (format!("LAMBADA, first {} passages", texts.len()), r)
                }
            };
            let comm = engine.comm_stats()?[0];
            println!(
                "perplexity {:.4} on {} ({} tokens scored) | {:.1} tok/s | sync points {} | {:.2} s in communication",
                r.ppl(),
                what,
                r.tokens_scored,
                r.tokens_per_sec(),
                comm.all_reduces,
                comm.seconds()
            );
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
