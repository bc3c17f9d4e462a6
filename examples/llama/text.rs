//! Text: `generate` and `perplexity`.

use crate::common::*;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use syncdrop::eval::{lambada, perplexity_texts, score_tokens};
use syncdrop::generate::{generate, Sampler, SamplerConfig};
use syncdrop::tokenizer::chatml;
use syncdrop::{assets, Error, Result};

#[derive(Args)]
pub struct GenerateArgs {
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
}

pub fn run_generate(args: GenerateArgs) -> Result<()> {
    let GenerateArgs {
        common,
        prompt,
        chat,
        system,
        max_tokens,
        temperature,
        top_p,
        seed,
        print_ids,
    } = args;
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
    Ok(())
}

#[derive(Args)]
pub struct PerplexityArgs {
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
}

pub fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let PerplexityArgs {
        common,
        file,
        lambada: n_lambada,
        window,
        stride,
    } = args;
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
    Ok(())
}
