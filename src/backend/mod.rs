//! The backend seam: one rank's memory and the ops a LLaMA block needs, at the granularity
//! where fusions live. The block schedule (`model.rs`) is written once against this trait;
//! the CPU reference backend and the CUDA backend implement it.
//!
//! A backend instance *is* one rank: it owns that rank's weight shard (by layer index), its
//! KV cache and its communicator. Shapes in comments: `t` tokens, `d` hidden size,
//! `q` = local query heads x head_dim, `f` = local FFN columns.
//!
//! `cfg(feature = "cuda")` appears here and nowhere else: without the feature, `cuda` is a
//! stub with the same names that returns `Error::NotCompiledWithCuda`.

pub mod cpu;

#[cfg(feature = "cuda")]
#[path = "cuda/mod.rs"]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;

use crate::comm::CommStats;
use crate::error::Result;

/// The environment variable that turns a GPU test's "skipped: no GPU" into a failure.
pub const REQUIRE_GPU_ENV: &str = "SYNCDROP_REQUIRE_GPU";

/// For GPU tests and benches: true when GPU 0 can be used ([`cuda::probe`], once per
/// process). Without one it prints "`who`: skipped: no GPU (why)" once and returns false, so
/// CPU-only CI passes them; with `SYNCDROP_REQUIRE_GPU=1` (scripts/gpu-check.sh sets it) it
/// panics instead, so a GPU machine whose driver fails can never pass by skipping.
pub fn gpu_or_skip(who: &str) -> bool {
    static PROBE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    static SAID: std::sync::Once = std::sync::Once::new();
    match PROBE.get_or_init(|| cuda::probe().map_err(|e| e.to_string())) {
        Ok(()) => true,
        Err(why) if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1") => {
            panic!("{who}: {REQUIRE_GPU_ENV}=1 but no usable GPU: {why}")
        }
        Err(why) => {
            SAID.call_once(|| eprintln!("{who}: skipped: no GPU ({why})"));
            false
        }
    }
}

/// What the attention output projection does with its partial sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceMode {
    /// Standard TP block: all-reduce the partial now (sync point 1).
    Reduce,
    /// SPD block: keep the partial; it rides in the MLP's all-reduce.
    IntoMlpReduce,
    /// TP = 1: nothing to reduce.
    None,
}

/// A modelled inter-GPU link that the CUDA backend holds on its communication lane for every
/// all-reduce (one-GPU measurements of ISO; results stay exact). Numbers measured with it
/// are emulated, not measured.
#[derive(Debug, Clone)]
pub struct EmulatedLink {
    /// The link whose modelled all-reduce time each hold lasts.
    pub profile: crate::latency::LinkProfile,
    /// Ranks of the emulated TP group.
    pub world: usize,
    /// CTAs the hold occupies (a real P2P kernel's footprint; overlap systems use 2-8).
    pub ctas: usize,
}

/// Host-side weights of one rank's share of one block, as loaded from the model file.
/// Fused layouts: `wqkv` is [q + 2 * kv, d] (local Q rows, then K, then V), `w_gate_up` is
/// [2f, d] (gate rows, then up rows).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockWeights {
    /// Attention RMSNorm weights: (d).
    pub attn_norm: Vec<f32>,
    /// Fused QKV projection: (q + 2 kv, d), `kv` = local KV heads x head_dim.
    pub wqkv: Vec<f32>,
    /// QKV biases, (q + 2 kv), for models that have them (Qwen2).
    pub bqkv: Option<Vec<f32>>,
    /// This rank's share of the output projection: (d, q).
    pub wo: Vec<f32>,
    /// FFN RMSNorm weights: (d).
    pub ffn_norm: Vec<f32>,
    /// Fused gate and up projections: (2f, d).
    pub w_gate_up: Vec<f32>,
    /// This rank's share of the down projection: (d, f).
    pub w_down: Vec<f32>,
    /// For each local query head, the index of its KV head among this block's local KV
    /// heads (the K/V rows of `wqkv`). Per block, so head grouping can permute heads.
    pub q_to_kv: Vec<usize>,
    /// Linear compensation of the dropped sync point ([`crate::compensate`]), used when the
    /// block runs as an SPD block; None: zero-shot or B2B as the paper has them.
    pub comp: Option<crate::compensate::Compensation>,
}

impl BlockWeights {
    /// Check these weights against a rank's static shapes; returns (local KV heads, local
    /// FFN columns), which a block's weights may choose (head grouping moves them).
    pub fn check(&self, layer: usize, d: &RankDims) -> Result<(usize, usize)> {
        let (hd, q) = (d.head_dim, d.n_q * d.head_dim);
        let rows = self.wqkv.len() / d.hidden.max(1);
        let n_kv = rows.saturating_sub(q) / (2 * hd).max(1);
        let ffn = self.w_down.len() / d.hidden.max(1);
        let ok = self.attn_norm.len() == d.hidden
            && self.wqkv.len() == (q + 2 * n_kv * hd) * d.hidden
            && self
                .bqkv
                .as_ref()
                .is_none_or(|b| b.len() == q + 2 * n_kv * hd)
            && self.wo.len() == d.hidden * q
            && self.ffn_norm.len() == d.hidden
            && self.w_gate_up.len() == 2 * ffn * d.hidden
            && self.w_down.len() == d.hidden * ffn
            && self.q_to_kv.len() == d.n_q
            && self.q_to_kv.iter().all(|k| *k < n_kv)
            && self.comp.as_ref().is_none_or(|c| c.check(d.hidden).is_ok());
        if !ok || layer >= d.n_layers {
            return Err(crate::error::Error::InvalidArgument(format!(
                "block weights for layer {layer} do not match the rank's shapes {d:?}"
            )));
        }
        Ok((n_kv, ffn))
    }
}

/// Host-side final norm and this rank's vocabulary slice of the LM head.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadWeights {
    /// Final RMSNorm weights: (d).
    pub norm: Vec<f32>,
    /// This rank's rows of the LM head: (vocab_local, d).
    pub w: Vec<f32>,
}

/// Static shapes of one rank, fixed at construction.
#[derive(Debug, Clone, PartialEq)]
pub struct RankDims {
    /// Hidden size d.
    pub hidden: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Local query heads (fixed per rank: activation buffers are sized by it). KV heads and
    /// FFN width may differ per block (head grouping) and come with each block's weights.
    pub n_q: usize,
    /// Length of this rank's vocabulary slice (vocab_local: rows of its LM head).
    pub vocab: usize,
    /// Blocks of the model (valid layer indices are 0..n_layers).
    pub n_layers: usize,
    /// KV-cache capacity in tokens: positions 0..capacity.
    pub capacity: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// How RoPE pairs a head's dimensions.
    pub rope_style: crate::config::RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
}

/// One rank on one device: its weight shard, KV cache, communicator and communication lane,
/// and the ops of a LLaMA block (see the module docs). Every rank issues the same ops in the
/// same order (SPMD); collectives go through the rank's communicator.
pub trait Backend: Send {
    /// An activation buffer on this rank's device (f32 elements).
    type Buf: Send;
    /// An all-reduce in flight on the communication lane (ISO).
    type Pending: Send;

    /// The backend's name (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// This rank's static shapes.
    fn dims(&self) -> &RankDims;

    // ---- memory -------------------------------------------------------------------------
    /// A new zero-filled buffer of `n` f32 elements.
    fn alloc(&mut self, n: usize) -> Result<Self::Buf>;
    /// Copy `host` into the first `host.len()` elements of `buf`.
    fn upload(&mut self, host: &[f32], buf: &mut Self::Buf) -> Result<()>;
    /// Copy the first `host.len()` elements of `buf` into `host`, once the ops before it have
    /// finished (the CUDA backend synchronises, and reports a P2P all-reduce timeout here).
    fn download(&mut self, buf: &Self::Buf, host: &mut [f32]) -> Result<()>;
    /// Install block `layer`'s weights, replacing earlier ones; an error when they do not
    /// match this rank's shapes ([`BlockWeights::check`]). The block's KV cache is kept when
    /// its size is unchanged.
    fn load_layer(&mut self, layer: usize, w: BlockWeights) -> Result<()>;
    /// Install the final norm and this rank's LM-head slice; an error when their lengths do
    /// not match `dims` (hidden, vocab).
    fn load_head(&mut self, w: HeadWeights) -> Result<()>;

    // ---- ops ----------------------------------------------------------------------------
    /// RMSNorm(x) -> QKV projection (+bias) -> RoPE on Q and K -> K,V written to the cache
    /// at positions pos0..pos0+t. `q_out`: (t, q).
    fn attn_in(
        &mut self,
        layer: usize,
        x: &Self::Buf,
        t: usize,
        pos0: usize,
        q_out: &mut Self::Buf,
    ) -> Result<()>;
    /// Causal attention of t queries at positions pos0.. over cache positions 0..pos0+t.
    /// `out`: (t, q).
    fn attention(
        &mut self,
        layer: usize,
        q: &Self::Buf,
        t: usize,
        pos0: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Output projection: `out` (t, d) = attn (t, q) @ `W_o[r]^T`, a partial sum over ranks.
    fn o_proj(
        &mut self,
        layer: usize,
        attn: &Self::Buf,
        t: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `resid` += `delta`; `normed` = RMSNorm(resid) * ffn_norm. (t, d) each.
    fn add_ffn_norm(
        &mut self,
        layer: usize,
        resid: &mut Self::Buf,
        delta: &Self::Buf,
        t: usize,
        normed: &mut Self::Buf,
    ) -> Result<()>;
    /// SwiGLU MLP shard: `out` (t, d) = down(silu(gate(x)) * up(x)), a partial sum over ranks.
    fn mlp(
        &mut self,
        layer: usize,
        normed: &Self::Buf,
        t: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// acc[..n] += x[..n]
    fn add(&mut self, acc: &mut Self::Buf, x: &Self::Buf, n: usize) -> Result<()>;
    /// dst[..n] = src[..n]
    fn copy(&mut self, src: &Self::Buf, dst: &mut Self::Buf, n: usize) -> Result<()>;
    /// Sum all-reduce of buf[..n] with the other ranks (this rank's communicator).
    fn all_reduce(&mut self, buf: &mut Self::Buf, n: usize) -> Result<()>;
    /// Start a sum all-reduce of buf[..n] on this rank's communication lane and return at
    /// once; the compute lane goes on. Lanes run all-reduces in submission order, which is
    /// the same on every rank (the schedule is SPMD). `wait` hands the reduced buffer back.
    fn all_reduce_start(&mut self, buf: Self::Buf, n: usize) -> Result<Self::Pending>;
    /// Finish an all-reduce `all_reduce_start` began and hand its buffer back: ops issued
    /// after this see the sum.
    fn all_reduce_wait(&mut self, pending: Self::Pending) -> Result<Self::Buf>;
    /// Final RMSNorm and this rank's LM-head slice for rows `rows` of x:
    /// `out` (rows.len(), vocab_local).
    fn lm_head(
        &mut self,
        x: &Self::Buf,
        rows: std::ops::Range<usize>,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// SPD block with linear compensation: `u` (t, d) += layer `layer`'s estimate of the
    /// other ranks' attention partials from the block input `x` (t, d); nothing when the
    /// layer has none ([`crate::compensate`]).
    fn spd_compensate(
        &mut self,
        layer: usize,
        x: &Self::Buf,
        t: usize,
        u: &mut Self::Buf,
    ) -> Result<()>;

    /// Output projection with its reduction mode. The default runs `o_proj` then, for
    /// `Reduce`, the all-reduce; the CUDA backend overrides it with a fused kernel.
    fn o_proj_reduce(
        &mut self,
        layer: usize,
        attn: &Self::Buf,
        t: usize,
        mode: ReduceMode,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.o_proj(layer, attn, t, out)?;
        if mode == ReduceMode::Reduce {
            let n = t * self.dims().hidden;
            self.all_reduce(out, n)?;
        }
        Ok(())
    }

    /// The standard TP block's attention output at TP > 1: `a` = this rank's o_proj partial,
    /// summed over ranks into the residual `x`, then `normed` = RMSNorm(x) * ffn_norm; `a`
    /// is left unspecified. The default is `o_proj_reduce(Reduce)` then `add_ffn_norm`; the
    /// CUDA backend can run the all-reduce, residual add and RMSNorm as one kernel.
    #[allow(clippy::too_many_arguments)]
    fn attn_out_reduce_norm(
        &mut self,
        layer: usize,
        attn: &Self::Buf,
        t: usize,
        a: &mut Self::Buf,
        x: &mut Self::Buf,
        normed: &mut Self::Buf,
    ) -> Result<()> {
        self.o_proj_reduce(layer, attn, t, ReduceMode::Reduce, a)?;
        self.add_ffn_norm(layer, x, a, t, normed)
    }

    /// `x[..n]` += the sum over ranks of `m[..n]` (the end of every TP and SPD block);
    /// `m` is left unspecified. The default is `all_reduce` then `add`; the CUDA backend fuses
    /// the residual add into the P2P all-reduce's epilogue.
    fn all_reduce_add(&mut self, m: &mut Self::Buf, x: &mut Self::Buf, n: usize) -> Result<()> {
        self.all_reduce(m, n)?;
        self.add(x, m, n)
    }

    /// This rank's communication counters (the CUDA backend adds its device collectives to
    /// the host communicator's).
    fn comm_stats(&self) -> CommStats;
    /// Set this rank's communication counters back to zero.
    fn reset_comm_stats(&mut self);
    /// Time the device collectives too (the CUDA backend: a pair of timing events around
    /// each collective on the communication lane, read at `comm_stats`; two event records
    /// per collective, so off unless asked for, e.g. by the ISO calibration). Collectives
    /// replayed in a CUDA graph stay untimed. The CPU backend's blocking all-reduces are
    /// always timed.
    fn set_comm_timing(&mut self, _on: bool) {}

    // ---- CUDA graphs for decode steps (the CPU backend has none) -------------------------
    // The model captures one whole decode step (t = 1, every block and the LM head) between
    // `graph_begin` and `graph_end` on fixed buffers, then replays it with `graph_launch`
    // after writing the step's position with `graph_set_pos`. Ops issued while capturing
    // read the position on the device, so one graph serves every position.

    /// Whether this backend captures decode steps (and they are switched on).
    fn graphs(&self) -> bool {
        false
    }
    /// Set the position of the next replayed step (checked against the KV capacity).
    fn graph_set_pos(&mut self, _pos0: usize) -> Result<()> {
        Ok(())
    }
    /// Start capturing a decode step. The default: an error (no CUDA graphs); the CUDA
    /// backend fails too when graphs are off for this rank.
    fn graph_begin(&mut self) -> Result<()> {
        Err(crate::error::Error::InvalidArgument(format!(
            "backend {} has no CUDA graphs",
            self.name()
        )))
    }
    /// End the capture and keep the step for `graph_launch`. The default: an error.
    fn graph_end(&mut self) -> Result<()> {
        self.graph_begin()
    }
    /// Replay the captured step; Ok(false) when none is captured.
    fn graph_launch(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// Drop the captured step (the schedule or the weights changed).
    fn graph_reset(&mut self) {}
}
