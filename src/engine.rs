//! The tensor-parallel engine: one OS thread per rank, each owning a backend (its weight
//! shard, KV cache and communicator). The driver thread embeds tokens, broadcasts commands,
//! and gathers each rank's vocabulary slice of the logits.
//!
//! If any rank fails, it aborts the communicator so its peers return errors instead of
//! hanging, and the engine refuses further work (create a new one).

#![warn(missing_docs)]

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BlockWeights};
use crate::comm::{CommStats, Communicator, Identity, ThreadComm, Wire};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::layout::{even_split, TpLayout};
use crate::model::{embed, rank_dims, validate_shapes, RankModel};
use crate::weights::ModelFiles;
use std::ops::Range;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Where an engine's ranks run (`--backend cpu|cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU reference backend ([`crate::backend::cpu`]).
    Cpu,
    /// The CUDA backend: rank r on GPU `r % devices` (needs the `cuda` feature).
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            _ => Err(Error::InvalidArgument(format!(
                "unknown backend '{s}' (cpu, cuda)"
            ))),
        }
    }
}

/// How CUDA ranks reach NCCL's unique id (see `backend::cuda::nccl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NcclMode {
    /// The engine's rank threads (one GPU each: NCCL refuses two ranks on one GPU).
    InProcess,
    /// Ranks in separate processes (with `only_rank`): rank 0 writes the id to this file.
    File(std::path::PathBuf),
    /// Ranks in separate processes, on any machines (with `only_rank`): rank 0 listens on
    /// this `host:port` and hands the id to the others (see [`crate::comm::rendezvous`]).
    Tcp(String),
}

/// How [`Engine::new`] loads and runs a model. The default: TP 1 on the CPU with every
/// available thread, a KV cache of 2048 tokens, CUDA graphs on, an f32 wire.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Tensor-parallel degree (1..=query heads).
    pub tp: usize,
    /// Compute threads in total; each rank gets max(1, threads / tp).
    pub threads: usize,
    /// KV-cache capacity in tokens.
    pub capacity: usize,
    /// Which backend the ranks run on.
    pub backend: BackendKind,
    /// Head assignment; None = contiguous even split.
    pub layout: Option<TpLayout>,
    /// CPU: compute every matrix product row by row in a fixed order, so results do not
    /// depend on how a sequence is chunked (ISO on == ISO off bit for bit). Slower prefill.
    pub row_invariant: bool,
    /// CUDA: capture decode steps in CUDA graphs where nothing crosses the host inside a
    /// step (one rank, or `only_rank`).
    pub cuda_graphs: bool,
    /// Run only this rank's share of the TP-`tp` model, with its all-reduces skipped: one
    /// rank's compute for benchmarks (one rank of LLaMA2-70B at TP 8 fits on one 80 GB GPU).
    /// Logits then hold only this rank's vocabulary slice (the rest is zero) and are not
    /// the model's.
    pub only_rank: Option<usize>,
    /// CUDA: hold each all-reduce on the communication lane for this link's modelled time
    /// (ISO measurements on one GPU; labelled emulated): (profile, CTAs the hold occupies).
    /// The modelled all-reduce's world is the TP degree.
    pub emulate_link: Option<(crate::latency::LinkProfile, usize)>,
    /// CUDA: an NCCL communicator per rank, used where the selection chain picks NCCL (no
    /// P2P) and for ranks in separate processes (`NcclMode::File` with `only_rank`: the one
    /// local rank then really all-reduces with its peers).
    pub nccl: Option<NcclMode>,
    /// What all-reduces put on the wire: f32 (exact, the default) or bf16 (each rank's
    /// contribution rounded once, half the bytes; see [`crate::comm::Wire`]).
    pub wire: Wire,
    /// What ranks in separate processes must also agree on, besides the options above (the
    /// engine adds those itself, see [`Engine::rank_terms`]): whatever the caller will set
    /// after `Engine::new` that changes the collectives a rank issues, such as the SPD plan
    /// and the ISO mode. Compared with rank 0's at the NCCL rendezvous; a rank that differs
    /// stops with an error naming each difference, instead of mis-pairing collectives.
    pub rank_terms: crate::comm::rendezvous::Terms,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            tp: 1,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            capacity: 2048,
            backend: BackendKind::Cpu,
            layout: None,
            row_invariant: false,
            cuda_graphs: true,
            only_rank: None,
            emulate_link: None,
            nccl: None,
            wire: Wire::F32,
            rank_terms: Default::default(),
        }
    }
}

/// Logits for some positions: (rows, vocab) row-major.
#[derive(Debug, Clone)]
pub struct Logits {
    /// Number of rows: one per position asked for.
    pub rows: usize,
    /// Row length: the whole vocabulary.
    pub vocab: usize,
    /// `rows * vocab` values.
    pub data: Vec<f32>,
}

impl Logits {
    /// Row `i`'s `vocab` logits; panics when `i >= rows`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

enum Cmd {
    Forward {
        emb: Arc<Vec<f32>>,
        pos0: usize,
        rows: Range<usize>,
    },
    ForwardIso {
        emb: Arc<Vec<f32>>,
        split: usize,
        rows: Range<usize>,
    },
    BlockInputs {
        emb: Arc<Vec<f32>>,
        layers: Arc<Vec<usize>>,
    },
    SetSpd(Arc<Vec<bool>>),
    LoadLayer(usize, Box<BlockWeights>),
    Stats,
    ResetStats,
    CommTiming(bool),
    /// Every rank fails with this message (`Engine::fail_ranks`).
    Fail(String),
}

enum Reply {
    Ready,
    Logits(Vec<f32>),
    Hidden(Vec<Vec<f32>>),
    Stats(CommStats),
    Done,
}

struct Worker {
    tx: mpsc::Sender<Cmd>,
    rx: mpsc::Receiver<Result<Reply>>,
    handle: Option<JoinHandle<()>>,
}

/// A model loaded at a TP degree: one OS thread per rank, driven from the caller's thread.
/// Commands go to every rank running and wait for all of them. After a rank fails, the engine
/// refuses further work (create a new one); dropping it ends the rank threads. Arguments the
/// driver can check itself (logits rows, an empty forward, the SPD plan's length, a block
/// index, block weights' shapes, head-grouping shards, positions past the KV cache) are
/// refused before any rank sees them and leave the engine usable.
pub struct Engine {
    /// The model's configuration.
    pub cfg: LlamaConfig,
    /// The head and FFN partition over ranks ([`Engine::block_shards`] may differ per block).
    pub layout: TpLayout,
    /// The model files the ranks loaded from; the driver embeds tokens from them.
    pub files: Arc<ModelFiles>,
    workers: Vec<Worker>,
    vocab_ranges: Vec<Range<usize>>,
    poisoned: Option<String>,
    iso: crate::iso::IsoMode,
    iso_model: crate::iso::IsoCostModel,
    /// Split used by the last `prefill` (None: ISO off).
    pub last_iso_split: Option<usize>,
    /// Per-block head/FFN assignment that replaces `layout` for that block (head grouping).
    block_shards: Vec<Option<Vec<crate::layout::RankShard>>>,
    /// The SPD blocks the ranks run now (`set_spd`).
    spd: Vec<bool>,
    /// KV-cache capacity of every rank, in tokens (`EngineOptions::capacity`).
    capacity: usize,
}

/// Aborts the group if a rank thread unwinds, so its peers return errors instead of waiting
/// for it forever.
struct AbortOnPanic(Arc<dyn Communicator>);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort("a rank thread panicked");
        }
    }
}

fn rank_loop<B: Backend>(
    mut model: RankModel<B>,
    comm: Arc<dyn Communicator>,
    rx: mpsc::Receiver<Cmd>,
    tx: mpsc::Sender<Result<Reply>>,
) {
    while let Ok(cmd) = rx.recv() {
        let r = match cmd {
            Cmd::Forward { emb, pos0, rows } => model.forward(&emb, pos0, rows).map(Reply::Logits),
            Cmd::ForwardIso { emb, split, rows } => {
                model.forward_iso(&emb, split, rows).map(Reply::Logits)
            }
            Cmd::BlockInputs { emb, layers } => {
                model.block_inputs(&emb, &layers).map(Reply::Hidden)
            }
            Cmd::SetSpd(spd) => model.set_spd(&spd).map(|_| Reply::Done),
            Cmd::LoadLayer(l, w) => model.backend.load_layer(l, *w).map(|_| Reply::Done),
            Cmd::Stats => Ok(Reply::Stats(model.backend.comm_stats())),
            Cmd::ResetStats => {
                model.backend.reset_comm_stats();
                Ok(Reply::Done)
            }
            Cmd::CommTiming(on) => {
                model.backend.set_comm_timing(on);
                Ok(Reply::Done)
            }
            Cmd::Fail(msg) => Err(Error::Rank {
                rank: comm.rank(),
                msg,
            }),
        };
        if let Err(e) = &r {
            comm.abort(&e.to_string());
        }
        if tx.send(r).is_err() {
            break;
        }
    }
}

/// What a rank thread needs to load its shard and serve commands, whatever its backend.
struct RankStart<'a> {
    files: &'a ModelFiles,
    cfg: &'a LlamaConfig,
    layout: &'a TpLayout,
    rank: usize,
    vocab: Range<usize>,
    comm: Arc<dyn Communicator>,
    rx: mpsc::Receiver<Cmd>,
    tx: mpsc::Sender<Result<Reply>>,
}

impl RankStart<'_> {
    fn serve<B: Backend>(self, backend: Result<B>) {
        let loaded = backend.and_then(|be| {
            RankModel::load(self.files, self.cfg, self.layout, self.rank, self.vocab, be)
        });
        match loaded {
            Ok(model) => {
                if self.tx.send(Ok(Reply::Ready)).is_ok() {
                    rank_loop(model, self.comm, self.rx, self.tx);
                }
            }
            Err(e) => {
                let _ = self.tx.send(Err(e));
            }
        }
    }
}

/// Check a head and FFN assignment (a layout's, or one block's under head grouping): each
/// query head on exactly one rank, every rank's KV heads exactly those its query heads use
/// (a missing one panicked in `load_block`), and the FFN ranges a partition of 0..ffn (an
/// overlap or a gap summed the wrong MLP, silently). `what` names it in errors.
fn check_shards(cfg: &LlamaConfig, what: &str, shards: &[crate::layout::RankShard]) -> Result<()> {
    let derived = crate::layout::TpLayout::with_heads(
        cfg,
        shards.iter().map(|s| s.q_heads.clone()).collect(),
    )?;
    // the KV heads are those the query heads use (a missing one panicked in `load_block`)
    for (r, (s, d)) in shards.iter().zip(&derived.ranks).enumerate() {
        if s.kv_heads != d.kv_heads {
            return Err(Error::InvalidArgument(format!(
                "{what}: rank {r}'s KV heads {:?} are not those its query heads {:?} use ({:?})",
                s.kv_heads, s.q_heads, d.kv_heads
            )));
        }
    }
    // the FFN ranges partition 0..ffn (an overlap or a gap summed the wrong MLP)
    let mut ffn: Vec<&Range<usize>> = shards.iter().map(|s| &s.ffn).collect();
    ffn.sort_by_key(|r| (r.start, r.end));
    let mut next = 0;
    let contiguous = ffn.into_iter().filter(|r| !r.is_empty()).all(|r| {
        let joins = r.start == next;
        next = r.end;
        joins
    });
    if !contiguous || next != cfg.ffn {
        return Err(Error::InvalidArgument(format!(
            "{what}: FFN ranges {:?} do not partition the {} FFN columns",
            shards.iter().map(|s| s.ffn.clone()).collect::<Vec<_>>(),
            cfg.ffn
        )));
    }
    Ok(())
}

impl Engine {
    /// Load `files` at the given TP degree: every rank loads its own shard in its own thread.
    pub fn new(files: Arc<ModelFiles>, opts: &EngineOptions) -> Result<Engine> {
        let cfg = files.config()?;
        let layout = match &opts.layout {
            Some(l) => {
                if l.tp() != opts.tp {
                    return Err(Error::InvalidArgument(format!(
                        "layout has {} ranks but --tp is {}",
                        l.tp(),
                        opts.tp
                    )));
                }
                l.clone()
            }
            None => TpLayout::new(&cfg, opts.tp)?,
        };
        check_shards(&cfg, "layout", &layout.ranks)?;
        validate_shapes(&files, &cfg)?;
        if opts.capacity == 0 {
            return Err(Error::InvalidArgument(
                "KV-cache capacity must be positive".into(),
            ));
        }
        if let Some(w) = cfg.sliding_window.filter(|&w| opts.capacity > w) {
            return Err(Error::InvalidArgument(format!(
                "this model attends over a sliding window of {w} tokens, which syncdrop does \
                 not implement: a KV cache of {} tokens would let queries see keys beyond it; \
                 use a context of at most {w} tokens (--ctx {w})",
                opts.capacity
            )));
        }
        if opts.nccl.is_some() && opts.backend != BackendKind::Cuda {
            return Err(Error::InvalidArgument("NCCL needs --backend cuda".into()));
        }
        if matches!(opts.nccl, Some(NcclMode::File(_) | NcclMode::Tcp(_)))
            && opts.only_rank.is_none()
        {
            return Err(Error::InvalidArgument(
                "an NCCL id file or TCP rendezvous is for one rank per process: give the process's --rank".into(),
            ));
        }
        if opts.emulate_link.is_some() && opts.backend != BackendKind::Cuda {
            return Err(Error::InvalidArgument(
                "link emulation runs on the CUDA backend's communication lane (--backend cuda)"
                    .into(),
            ));
        }
        if opts.backend == BackendKind::Cuda {
            let n = crate::backend::cuda::device_count()?;
            if n == 0 {
                return Err(Error::Cuda("no CUDA device visible".into()));
            }
            // NCCL refuses two ranks of one communicator on one GPU ("duplicate GPU")
            if opts.nccl == Some(NcclMode::InProcess) && layout.tp() > n {
                return Err(Error::InvalidArgument(format!(
                    "NCCL needs one GPU per rank: TP {} on {n} visible GPU(s) would put several ranks on one (virtual ranks use the P2P kernels or the staged copy; drop --nccl)",
                    layout.tp()
                )));
            }
        }
        let tp = layout.tp();
        let ranks: Vec<usize> = match opts.only_rank {
            Some(r) if r >= tp => {
                return Err(Error::InvalidArgument(format!(
                    "--rank {r} is not a rank of TP {tp}"
                )))
            }
            Some(r) => vec![r],
            None => (0..tp).collect(),
        };
        let comms: Vec<Arc<dyn Communicator>> = if ranks.len() == 1 {
            vec![Arc::new(Identity::with_wire(opts.wire))]
        } else {
            ThreadComm::group_with_wire(tp, opts.wire)?
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn Communicator>)
                .collect()
        };
        let all_vocab = even_split(cfg.vocab, tp);
        let vocab_ranges: Vec<Range<usize>> = ranks.iter().map(|r| all_vocab[*r].clone()).collect();
        let per_rank_threads = (opts.threads / ranks.len()).max(1);
        // CUDA ranks of one process share a P2P all-reduce (buffers sized for prefill
        // chunks of up to 1024 tokens; longer messages take the selection chain's fallback)
        let nccl = crate::backend::cuda::nccl_rendezvous(&opts.nccl)?;
        let p2p = if opts.backend == BackendKind::Cuda && ranks.len() > 1 {
            crate::backend::cuda::p2p_group(tp, opts.capacity.min(1024) * cfg.hidden)?
        } else {
            None
        };
        let mut workers = Vec::with_capacity(ranks.len());
        for (rank, comm) in ranks.iter().copied().zip(comms) {
            let (ctx, crx) = mpsc::channel();
            let (rtx, rrx) = mpsc::channel();
            let (files, cfg, layout) = (files.clone(), cfg.clone(), layout.clone());
            let vocab = all_vocab[rank].clone();
            let capacity = opts.capacity;
            let (row_invariant, graphs, kind) =
                (opts.row_invariant, opts.cuda_graphs, opts.backend);
            let p2p = p2p.clone();
            let nccl = nccl
                .clone()
                .map(|rv| (rv, tp, Engine::rank_terms(&files, &cfg, &layout, opts)));
            let emulate =
                opts.emulate_link
                    .clone()
                    .map(|(profile, ctas)| crate::backend::EmulatedLink {
                        profile,
                        world: tp,
                        ctas,
                    });
            let handle = std::thread::Builder::new()
                .name(format!("syncdrop-rank{rank}"))
                .spawn(move || {
                    let _guard = AbortOnPanic(comm.clone());
                    let dims = rank_dims(&cfg, &layout.ranks[rank], &vocab, capacity);
                    let start = RankStart {
                        files: &files,
                        cfg: &cfg,
                        layout: &layout,
                        rank,
                        vocab,
                        comm: comm.clone(),
                        rx: crx,
                        tx: rtx,
                    };
                    match kind {
                        BackendKind::Cpu => start.serve(CpuBackend::new(
                            dims,
                            comm,
                            per_rank_threads,
                            row_invariant,
                        )),
                        BackendKind::Cuda => start.serve(crate::backend::cuda::create(
                            dims, comm, rank, graphs, p2p, emulate, nccl,
                        )),
                    }
                })
                .map_err(|e| Error::Rank {
                    rank,
                    msg: format!("spawn: {e}"),
                })?;
            workers.push(Worker {
                tx: ctx,
                rx: rrx,
                handle: Some(handle),
            });
        }
        let iso_model = crate::iso::IsoCostModel::from_config(&cfg, layout.tp());
        let mut engine = Engine {
            cfg,
            layout,
            files,
            workers,
            vocab_ranges,
            poisoned: None,
            iso: crate::iso::IsoMode::Off,
            iso_model,
            last_iso_split: None,
            block_shards: Vec::new(),
            spd: Vec::new(),
            capacity: opts.capacity,
        };
        engine.block_shards = vec![None; engine.cfg.n_layers];
        engine.spd = vec![false; engine.cfg.n_layers];
        engine.collect()?;
        Ok(engine)
    }

    /// The TP degree: the layout's ranks, also when `EngineOptions::only_rank` runs one.
    pub fn tp(&self) -> usize {
        self.layout.tp()
    }

    /// What a rank brings to the NCCL rendezvous for its peers to match: the model (its
    /// shapes and file), the head and MLP partition, the options that change which
    /// collectives run or how (wire, CUDA graphs, link emulation, the `SYNCDROP_ALLREDUCE`,
    /// `SYNCDROP_FUSED_OPROJ` and `SYNCDROP_FUSED_NORM` variables) and the caller's
    /// `rank_terms`. (The TP degree is the world size, checked by the rendezvous itself.)
    pub fn rank_terms(
        files: &ModelFiles,
        cfg: &LlamaConfig,
        layout: &TpLayout,
        opts: &EngineOptions,
    ) -> crate::comm::rendezvous::Terms {
        let model = match files {
            ModelFiles::Synthetic(m) => format!(
                "{}:layers={}:seed={}",
                m.spec.split(':').next().unwrap_or_default(),
                m.cfg.n_layers,
                m.seed
            ),
            // by name, not folder: the same file may sit in different folders on different
            // machines (`--model .` names the folder it is)
            _ => {
                let path = files.path();
                let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
                // (not through links: a cache's link names the file, its target a hash)
                named(path)
                    .or_else(|| path.canonicalize().ok().as_deref().and_then(named))
                    .unwrap_or_else(|| path.display().to_string())
            }
        };
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let shards: Vec<String> = layout
            .ranks
            .iter()
            .map(|r| format!("{}:{}..{}", list(&r.q_heads), r.ffn.start, r.ffn.end))
            .collect();
        // the variables as the CUDA backend reads them (an unparsable path fails there)
        let env = crate::comm::select::EnvSwitches::read().unwrap_or_default();
        let forced = env
            .forced
            .map_or("auto".to_string(), |(_, a)| format!("{a:?}"));
        let on = |b: bool| if b { "on" } else { "off" };
        crate::comm::rendezvous::Terms::new()
            .with("model", model)
            .with(
                "shape",
                format!(
                    "{}x{}h{}q{}kv{}ffn{}v",
                    cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.ffn, cfg.vocab
                ),
            )
            .with("shards", shards.join("/"))
            .with("wire", opts.wire.name())
            .with("graphs", on(opts.cuda_graphs))
            .with(
                "emulate",
                opts.emulate_link
                    .as_ref()
                    .map_or("off".to_string(), |(p, ctas)| format!("{}@{ctas}", p.name)),
            )
            .with("SYNCDROP_ALLREDUCE", forced)
            .with("SYNCDROP_FUSED_OPROJ", on(env.fused_oproj))
            .with("SYNCDROP_FUSED_NORM", on(env.fused_norm))
            .extended(&opts.rank_terms)
    }

    /// Ranks this engine runs (all of them, or the one of `EngineOptions::only_rank`).
    pub fn ranks_running(&self) -> usize {
        self.workers.len()
    }

    /// Wait for one reply from every rank; the first error wins and poisons the engine.
    fn collect(&mut self) -> Result<Vec<Reply>> {
        let mut out = Vec::with_capacity(self.workers.len());
        let mut first_err = None;
        for (rank, w) in self.workers.iter().enumerate() {
            match w.rx.recv() {
                Ok(Ok(r)) => out.push(r),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::Rank {
                        rank,
                        msg: "rank thread exited unexpectedly".into(),
                    });
                }
            }
        }
        match first_err {
            Some(e) => {
                self.poisoned = Some(e.to_string());
                Err(e)
            }
            None => Ok(out),
        }
    }

    /// The error every command returns once a rank has failed.
    fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(p) => Err(Error::Comm(format!(
                "engine unusable after an earlier failure: {p}"
            ))),
            None => Ok(()),
        }
    }

    /// The check every rank would make of a forward's arguments (`RankModel::forward`), made
    /// on the driver first: a bad call is an `InvalidArgument` that leaves the engine usable,
    /// instead of a rank error that poisons it.
    fn check_rows(tokens: &[u32], rows: &Range<usize>) -> Result<()> {
        let t = tokens.len();
        if t == 0 || rows.end > t || rows.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "forward of {t} tokens, logits rows {rows:?}"
            )));
        }
        Ok(())
    }

    /// The ranks' own capacity check (`RankModel`'s `ContextOverflow`), made on the driver
    /// first so that a sequence too long for the KV cache leaves the engine usable.
    fn check_capacity(&self, pos0: usize, t: usize) -> Result<()> {
        Error::check_context(pos0, t, self.capacity)
    }

    /// KV-cache capacity of every rank, in tokens.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Make every rank fail with `msg`, as a rank error (a communicator or device failure)
    /// would: the engine is unusable afterwards. For tests of that state; the driver checks
    /// every argument it can, so no bad call gets there.
    #[doc(hidden)]
    pub fn fail_ranks(&mut self, msg: &str) -> Result<()> {
        let msg = msg.to_string();
        self.broadcast(|| Cmd::Fail(msg.clone())).map(|_| ())
    }

    /// Send `cmds[r]` to rank r (after the failure check), then wait for every reply.
    fn send_each(&mut self, cmds: impl IntoIterator<Item = Cmd>) -> Result<Vec<Reply>> {
        self.check_usable()?;
        for (rank, (w, cmd)) in self.workers.iter().zip(cmds).enumerate() {
            w.tx.send(cmd).map_err(|_| Error::Rank {
                rank,
                msg: "rank thread is gone".into(),
            })?;
        }
        self.collect()
    }

    fn broadcast(&mut self, mk: impl Fn() -> Cmd) -> Result<Vec<Reply>> {
        let n = self.workers.len();
        self.send_each((0..n).map(|_| mk()))
    }

    /// Run `tokens` at positions pos0.. through the model (filling the KV cache) and return
    /// the logits of rows `rows` (indices into `tokens`).
    pub fn forward(&mut self, tokens: &[u32], pos0: usize, rows: Range<usize>) -> Result<Logits> {
        Self::check_rows(tokens, &rows)?;
        self.check_capacity(pos0, tokens.len())?;
        let emb = Arc::new(embed(&self.files, &self.cfg, tokens)?);
        let replies = self.broadcast(|| Cmd::Forward {
            emb: emb.clone(),
            pos0,
            rows: rows.clone(),
        })?;
        Ok(self.assemble(replies, rows.len()))
    }

    /// Prefill `tokens` from position 0 with Intra-Sequence Overlap: chunk 0 is tokens
    /// 0..split, chunk 1 the rest (split 0 or >= len: ISO off). Same results as `forward`.
    pub fn forward_iso(
        &mut self,
        tokens: &[u32],
        split: usize,
        rows: Range<usize>,
    ) -> Result<Logits> {
        Self::check_rows(tokens, &rows)?;
        self.check_capacity(0, tokens.len())?;
        let emb = Arc::new(embed(&self.files, &self.cfg, tokens)?);
        let replies = self.broadcast(|| Cmd::ForwardIso {
            emb: emb.clone(),
            split,
            rows: rows.clone(),
        })?;
        Ok(self.assemble(replies, rows.len()))
    }

    /// Choose how `prefill` splits prompts (ISO off, a fixed split, or the cost model's).
    /// Ranks in separate processes must split every prompt alike: give them the same mode,
    /// and either no model (the FLOP-count one) or the same one; a model each calibrated on
    /// its own timings would not be (put the mode in `EngineOptions::rank_terms`).
    pub fn set_iso(&mut self, mode: crate::iso::IsoMode, model: Option<crate::iso::IsoCostModel>) {
        self.iso = mode;
        if let Some(m) = model {
            self.iso_model = m;
        }
    }

    /// The cost model `prefill` splits by under `IsoMode::Auto`: the FLOP-count one made from
    /// the config, unless `set_iso` gave another.
    pub fn iso_model(&self) -> crate::iso::IsoCostModel {
        self.iso_model
    }

    /// Prefill from position 0 under the ISO mode (see `set_iso`).
    pub fn prefill(&mut self, tokens: &[u32], rows: Range<usize>) -> Result<Logits> {
        use crate::iso::IsoMode;
        let split = match self.iso {
            IsoMode::Off => None,
            IsoMode::Split(s) => (s > 0 && s < tokens.len()).then_some(s),
            // one rank has no all-reduce to hide: a second chunk would only cost
            IsoMode::Auto if self.tp() == 1 => None,
            IsoMode::Auto => self.iso_model.split(tokens.len()),
        };
        self.last_iso_split = split;
        match split {
            Some(s) => self.forward_iso(tokens, s, rows),
            None => self.forward(tokens, 0, rows),
        }
    }

    /// Concatenate the ranks' vocabulary slices into (rows, vocab) logits.
    fn assemble(&self, replies: Vec<Reply>, n: usize) -> Logits {
        let vocab = self.cfg.vocab;
        let mut data = vec![0f32; n * vocab];
        for (reply, vr) in replies.into_iter().zip(&self.vocab_ranges) {
            let Reply::Logits(part) = reply else {
                unreachable!("forward replies with logits")
            };
            for i in 0..n {
                data[i * vocab + vr.start..i * vocab + vr.end]
                    .copy_from_slice(&part[i * vr.len()..(i + 1) * vr.len()]);
            }
        }
        Logits {
            rows: n,
            vocab,
            data,
        }
    }

    /// The residual stream entering block `layer` for `tokens` at positions 0.. (t, d), under
    /// the current plan. Every rank holds the same bits; rank 0's copy is returned.
    pub fn block_input(&mut self, tokens: &[u32], layer: usize) -> Result<Vec<f32>> {
        if layer >= self.cfg.n_layers || tokens.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "block input of {} tokens at block {layer} of {}",
                tokens.len(),
                self.cfg.n_layers
            )));
        }
        Ok(self
            .block_inputs(tokens, &[layer])?
            .pop()
            .expect("one layer asked for"))
    }

    /// [`Engine::block_input`] at each of `layers` (strictly increasing), in one pass through
    /// the blocks before the last of them: what capturing many blocks' inputs should call.
    pub fn block_inputs(&mut self, tokens: &[u32], layers: &[usize]) -> Result<Vec<Vec<f32>>> {
        crate::model::check_block_layers(layers, self.cfg.n_layers)?;
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("block inputs of 0 tokens".into()));
        }
        self.check_capacity(0, tokens.len())?;
        let emb = Arc::new(embed(&self.files, &self.cfg, tokens)?);
        let layers = Arc::new(layers.to_vec());
        let mut replies = self.broadcast(|| Cmd::BlockInputs {
            emb: emb.clone(),
            layers: layers.clone(),
        })?;
        match replies.swap_remove(0) {
            Reply::Hidden(h) => Ok(h),
            _ => unreachable!("block_inputs replies with hidden states"),
        }
    }

    /// Switch blocks to SPD (`spd[l] == true`) or back to standard TP blocks. Ranks in
    /// separate processes must all switch the same blocks (put the plan in
    /// `EngineOptions::rank_terms` so that the rendezvous compares it).
    pub fn set_spd(&mut self, spd: &[bool]) -> Result<()> {
        if spd.len() != self.cfg.n_layers {
            return Err(Error::InvalidArgument(format!(
                "SPD plan has {} layers, the model has {}",
                spd.len(),
                self.cfg.n_layers
            )));
        }
        let mask = Arc::new(spd.to_vec());
        self.broadcast(|| Cmd::SetSpd(mask.clone()))?;
        self.spd = spd.to_vec();
        Ok(())
    }

    /// The SPD blocks in effect (`true`: the block drops its attention all-reduce).
    pub fn spd(&self) -> &[bool] {
        &self.spd
    }

    /// Replace block `layer`'s weights on every rank (e.g. with distilled ones). `per_rank[r]`
    /// is rank r's shard.
    pub fn load_layer(&mut self, layer: usize, per_rank: Vec<BlockWeights>) -> Result<()> {
        if per_rank.len() != self.tp() || self.workers.len() != self.tp() {
            return Err(Error::InvalidArgument(
                "one block shard per rank expected (and every rank running)".into(),
            ));
        }
        // every shard checked here before any is sent: a bad one would otherwise be refused
        // by its rank alone, after the others had installed theirs
        for (r, (w, vocab)) in per_rank.iter().zip(&self.vocab_ranges).enumerate() {
            let dims = rank_dims(&self.cfg, &self.layout.ranks[r], vocab, 0);
            w.check(layer, &dims).map_err(|e| match e {
                Error::InvalidArgument(m) => Error::InvalidArgument(format!("rank {r}: {m}")),
                e => e,
            })?;
        }
        self.send_each(
            per_rank
                .into_iter()
                .map(|shard| Cmd::LoadLayer(layer, Box::new(shard))),
        )
        .map(|_| ())
    }

    /// Each rank's heads and FFN columns in block `layer` (the layout, unless head grouping
    /// re-assigned that block).
    pub fn block_shards(&self, layer: usize) -> Vec<crate::layout::RankShard> {
        self.block_shards
            .get(layer)
            .cloned()
            .flatten()
            .unwrap_or_else(|| self.layout.ranks.clone())
    }

    /// Re-assign block `layer`'s heads and FFN columns to ranks and load the matching
    /// original weights. Each rank keeps its number of query heads.
    pub fn set_block_shards(
        &mut self,
        layer: usize,
        shards: Vec<crate::layout::RankShard>,
    ) -> Result<()> {
        if layer >= self.cfg.n_layers || shards.len() != self.tp() {
            return Err(Error::InvalidArgument(format!(
                "block {layer}: {} shards for TP {}",
                shards.len(),
                self.tp()
            )));
        }
        for (r, (s, d)) in shards.iter().zip(&self.layout.ranks).enumerate() {
            if s.q_heads.len() != d.q_heads.len() {
                return Err(Error::InvalidArgument(format!(
                    "block {layer}: rank {r} would get {} query heads; it has buffers for {}",
                    s.q_heads.len(),
                    d.q_heads.len()
                )));
            }
        }
        check_shards(&self.cfg, &format!("block {layer}"), &shards)?;
        let w = shards
            .iter()
            .map(|s| crate::model::load_block(&self.files, &self.cfg, s, layer))
            .collect::<Result<Vec<_>>>()?;
        self.load_layer(layer, w)?;
        self.block_shards[layer] = (shards != self.layout.ranks).then_some(shards);
        Ok(())
    }

    /// Communication counters of every rank.
    pub fn comm_stats(&mut self) -> Result<Vec<CommStats>> {
        Ok(self
            .broadcast(|| Cmd::Stats)?
            .into_iter()
            .map(|r| match r {
                Reply::Stats(s) => s,
                _ => CommStats::default(),
            })
            .collect())
    }

    /// Set every rank's communication counters back to zero.
    pub fn reset_comm_stats(&mut self) -> Result<()> {
        self.broadcast(|| Cmd::ResetStats).map(|_| ())
    }

    /// Time device collectives too (see `Backend::set_comm_timing`; costs two event records
    /// per collective on the CUDA backend, nothing on the CPU).
    pub fn set_comm_timing(&mut self, on: bool) -> Result<()> {
        self.broadcast(|| Cmd::CommTiming(on)).map(|_| ())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for w in &mut self.workers {
            // Closing the command channel ends the rank loop.
            let (tx, _) = mpsc::channel();
            drop(std::mem::replace(&mut w.tx, tx));
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}
