//! What the subcommands share: the model and engine options, calibration and training
//! options, opening a model, and checks and file helpers.

use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use syncdrop::distill::{DistillConfig, DistillDevice};
use syncdrop::engine::{BackendKind, Engine, EngineOptions};
use syncdrop::spd::{self, model_sha256, Sensitivity, SpdPlan};
use syncdrop::tasks;
use syncdrop::tokenizer::Tokenizer;
use syncdrop::{assets, Error, ModelFiles, Result};

#[derive(Args, Clone)]
pub struct Common {
    /// Model: a .gguf file or a Hugging Face folder (config.json + *.safetensors +
    /// tokenizer.json). Default: the SmolLM2-135M-Instruct GGUF in the syncdrop cache.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tensor-parallel degree: 1 ..= number of query heads (uneven head splits are fine).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Backend: cpu (threads as ranks) or cuda (distill, plan and sweep then also train on
    /// GPU 0).
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// Compute threads in total (split evenly over ranks). Default: all cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// KV-cache capacity in tokens.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Sync-Point Drop: a plan file (JSON from `plan`), `all`, `none`, or `layers:5,6,20`
    /// (zero-shot SPD on exactly those blocks, numbered from 0).
    #[arg(long, default_value = "none")]
    pub spd: String,
    /// Intra-Sequence Overlap for prefills: off, on/auto (split by a cost model calibrated
    /// on three timed prefills), or a fixed split length.
    #[arg(long, default_value = "off")]
    pub iso: syncdrop::iso::IsoMode,
    /// CPU: row-by-row matrix products, so ISO on/off give identical bits (slower prefill).
    #[arg(long)]
    pub row_invariant: bool,
    /// A random-weight model of real shapes instead of --model, for benchmarks:
    /// llama2-7b, llama2-13b or llama2-70b, optionally `:layers=N,seed=S`. No tokenizer:
    /// use it with `bench`.
    #[arg(long, conflicts_with = "model")]
    pub synthetic: Option<String>,
    /// Run only this rank's share of the TP model (its all-reduces skipped): one rank's
    /// compute, e.g. one rank of LLaMA2-70B at --tp 8 on one 80 GB GPU. Benchmarks only.
    #[arg(long)]
    pub rank: Option<usize>,
    /// CUDA: do not capture decode steps in CUDA graphs.
    #[arg(long)]
    pub no_graphs: bool,
    /// CUDA: emulate inter-GPU links on one GPU: hold every all-reduce for this profile's
    /// modelled time on the communication lane (see `latency`; e.g. a800-nvlink-400gbs,
    /// rtx4090-pcie-nop2p). Timings are then emulated, results stay exact.
    #[arg(long)]
    pub emulate_link: Option<String>,
    /// CUDA: give every rank an NCCL communicator (used where P2P is impossible; needs one
    /// GPU per rank: NCCL refuses two ranks on one GPU).
    #[arg(long)]
    pub nccl: bool,
    /// CUDA, one rank per process (with --rank): rendezvous through this file (rank 0 writes
    /// NCCL's id, every rank answers, rank 0 confirms; one run per file at a time: a second
    /// rank 0 on it is refused); the processes' ranks then all-reduce with each other.
    /// Every rank must get the same options (compared at the rendezvous). Across machines
    /// prefer --nccl-tcp. For `bench`.
    #[arg(long, conflicts_with_all = ["nccl", "nccl_tcp"])]
    pub nccl_id: Option<PathBuf>,
    /// CUDA, one rank per process (with --rank), on any machines: rendezvous over TCP at rank
    /// 0's HOST:PORT (rank 0 listens there; the others connect, and rank 0 names any that do
    /// not arrive). Waits SYNCDROP_RENDEZVOUS_TIMEOUT seconds (default 120). For `bench`.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "nccl")]
    pub nccl_tcp: Option<String>,
    /// What all-reduces move between ranks: f32 (exact) or bf16 (each rank's contribution
    /// rounded once to bf16, half the bytes, summed in f32 in rank order; both backends).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub wire: String,
}

/// The sensitivity's calibration text (distillation has its own: [`Train`]).
#[derive(Args, Clone)]
pub struct Calib {
    /// Calibration passages (BoolQ's Wikipedia passages) for the sensitivity analysis.
    #[arg(long, default_value_t = 16)]
    pub calib: usize,
    /// Tokens per calibration passage (longer ones are cut).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
}

/// Distillation (B2B) settings, shared by `distill`, `plan` and `sweep`. The defaults are
/// what docs/ACCURACY.md found distillation needs: with 8 passages of 128 tokens it was
/// starved of data (held-out MSE 5.0 -> 2.3 on TP 8's block 24; 64 x 256 tokens: 4.9 -> 0.8).
#[derive(Args)]
pub struct Train {
    /// Distillation: calibration passages (BoolQ's Wikipedia passages, the first N; the last
    /// --holdout of them are held out). About a minute per block on 2 cores at the defaults.
    #[arg(long, default_value_t = 72)]
    pub distill_calib: usize,
    /// Distillation: tokens per passage (longer ones are cut).
    #[arg(long, default_value_t = 256)]
    pub distill_seq_len: usize,
    /// Distillation: the most epochs of Adam (one step per training passage).
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Distillation: Adam's learning rate.
    #[arg(long, default_value_t = 5e-5, allow_negative_numbers = true)]
    pub lr: f32,
    /// Distillation: hold the last N calibration passages out of training; after every
    /// epoch their loss is measured and the best epoch's weights are kept (early stopping).
    /// 0: train on every passage and keep the last epoch.
    #[arg(long, default_value_t = 8)]
    pub holdout: usize,
    /// Distillation with --holdout: stop after this many epochs without a better held-out
    /// loss.
    #[arg(long, default_value_t = 3)]
    pub patience: usize,
    /// Distillation (and compensation) text: `boolq` (Wikipedia passages), or any task of the
    /// eval data that is not scored by `eval` (e.g. `openbookqa`, `csqa`, `socialiqa`): its
    /// documents with their correct answers, joined into passages; `a,b` takes passages
    /// from each in turn.
    #[arg(long, default_value = "boolq", value_name = "SOURCES")]
    pub distill_text: String,
}

pub struct Opened {
    pub engine: Engine,
    pub tok: Tokenizer,
    pub sha: Option<String>,
}

pub fn model_files(common: &Common) -> Result<Arc<ModelFiles>> {
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

pub fn open(common: &Common) -> Result<Opened> {
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
pub fn separate_processes(common: &Common) -> bool {
    common.nccl_id.is_some() || common.nccl_tcp.is_some()
}

/// What this runner does after the engine starts that changes the collectives a rank issues,
/// for ranks in separate processes to compare at their rendezvous: the SPD blocks and head
/// groups (a plan by what it switches, not by its file), the ISO mode, the KV capacity and
/// `job` (the subcommand and its sizes).
pub fn rank_terms(
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

pub fn open_engine(
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
pub fn calibration(tok: &Tokenizer, c: &Calib, flag: &str) -> Result<Vec<Vec<u32>>> {
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
pub fn encode_cut<'a>(
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

pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    syncdrop::files::write_atomic(path, syncdrop::files::to_json_pretty_compact(v).as_bytes())
}

/// Parse a JSON file; errors name the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bad = |e: String| Error::InvalidArgument(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

pub fn sibling(path: &Path, ext: &str) -> PathBuf {
    path.with_extension(ext)
}

pub fn list<T: std::str::FromStr>(what: &str, s: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse()
                .map_err(|_| Error::InvalidArgument(format!("--{what}: cannot parse '{x}'")))
        })
        .collect()
}

pub fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// `e` as an invalid argument that names where it came from (`--sensitivity FILE: ...`).
pub fn named(what: impl std::fmt::Display, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => bad(format!("{what}: {m}")),
        e => bad(format!("{what}: {e}")),
    }
}

/// Refuses a count below `min` (`--name N`).
pub fn at_least(name: &str, v: usize, min: usize) -> Result<()> {
    if v < min {
        return Err(bad(format!("--{name} {v}: must be at least {min}")));
    }
    Ok(())
}

/// Refuses to start work whose result would overwrite an existing file, unless `force`
/// (`--force`): a plan, its distilled weights or a sensitivity JSON can take an hour to make.
pub fn keep_existing(force: bool, outputs: &[(&str, &Path)]) -> Result<()> {
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
pub fn prepare_out(path: &Path) -> Result<()> {
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
pub fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Refuses a run whose outputs (flag, path) would land on one file: the one written last
/// (a plot, the distilled weights) would replace the other after the work.
pub fn distinct_outputs(outs: &[(&str, &Path)]) -> Result<()> {
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
pub fn check_common(c: &Common) -> Result<()> {
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
pub fn no_spd(c: &Common, cmd: &str) -> Result<()> {
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
pub fn distill_data(tok: &Tokenizer, train: &Train, used: bool) -> Result<Vec<Vec<u32>>> {
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
pub fn saved_sensitivity(path: &Path, engine: &Engine) -> Result<Sensitivity> {
    let s: Sensitivity = read_json(path)?;
    s.check_for(engine)
        .map_err(|e| named(format_args!("--sensitivity {}", path.display()), e))?;
    Ok(s)
}

/// The distillation settings of --epochs, --lr, --holdout and --patience, checked when
/// `used` (a run that distils nothing ignores them). With `--backend cuda` the training runs
/// on GPU 0, else on `--threads` host threads.
pub fn distill_config(train: &Train, used: bool, common: &Common) -> Result<DistillConfig> {
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
pub fn comp_fit_line(l: usize, c: &syncdrop::distill::CompReport) -> String {
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
pub fn distill_settings(train: &Train, cfg: &DistillConfig) -> serde_json::Value {
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
pub fn check_calib(c: &Calib) -> Result<()> {
    at_least("calib", c.calib, 1)?;
    at_least("seq-len", c.seq_len, 2)
}

/// The window in which `plan` and `sweep` score LAMBADA perplexity (`perplexity`'s default).
pub const PPL_WINDOW: usize = 512;

/// Refuses a KV cache too small for scoring `texts` in [`PPL_WINDOW`]-token windows, before
/// the sensitivity and distillation run (the overflow stopped a run after them).
pub fn ppl_fits_ctx<'a>(
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
