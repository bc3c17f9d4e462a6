//! Latency model (issue 7): per-layer compute of one rank, communication from link profiles,
//! SPD fraction and ISO on/off -> projected end-to-end prefill and decode latency.
//!
//! Every number this module produces carries a label:
//! - **modelled**: computed from a formula and cited constants (roofline compute, link
//!   profiles). No multi-GPU link was measured for any profile here.
//! - **measured**: read from a [`MeasuredCompute`] table that a benchmark wrote after timing
//!   real kernels (one block on one rank, no communication), or timed on this machine (the
//!   CPU thread communicator fit, [`measure_thread_all_reduce`]).
//! - **emulated** is reserved for GPU runs whose links are held by an emulation kernel
//!   (issue 6); nothing in this module emulates.
//!
//! ## The model
//!
//! One transformer block on one rank is two parts, *attention* (RMSNorm + QKV projection +
//! RoPE + KV write, attention over the cache, output projection) and *MLP* (RMSNorm +
//! gate/up/down). A part costs `max(bytes / (BW * mem_eff), flops / (peak * flop_eff))`
//! on the roofline ([`Device`]) plus half of a fixed per-layer overhead (kernel gaps), or the
//! measured time of the block ([`MeasuredCompute`]), split between the parts in the roofline's
//! proportion unless the table gives `attn_us`.
//!
//! A standard TP block issues two all-reduces of `tokens * hidden * wire` bytes, an SPD
//! block one (DESIGN.md section 2). The wire is bf16 (2 bytes) unless a scenario says f32
//! ([`Scenario::wire`], `latency --wire f32`): bf16 is what the papers' engines move; f32 is
//! syncdrop's exact default ([`Wire::F32`]), twice the bytes. A collective costs
//! `alpha + algorithm bytes / bandwidth` ([`LinkProfile::all_reduce_us`]): ring / two-shot / NCCL move `2 (n - 1) / n * size` bytes
//! per rank; a one-shot kernel (small messages, where the profile has one) pulls all `n - 1`
//! peers' buffers, `(n - 1) * size` bytes, at the per-GPU link bandwidth.
//!
//! The forward is simulated as operations on two FIFO lanes per rank ([`simulate`]): a compute
//! lane and a communication lane, with every operation starting when its lane is free and its
//! inputs are ready. Without ISO each block's ops depend on each other in a chain, so the
//! result is the serial sum. With ISO the prompt is two chunks in the order of DESIGN.md
//! section 4 (Attn c0, Attn c1, MLP c0, MLP c1 on compute; AR_attn c0, AR_attn c1, AR_mlp c0,
//! AR_mlp c1 on comm), so one chunk's all-reduce runs under the other chunk's compute; the
//! split comes from [`crate::iso::IsoCostModel`] (FLOP-balanced chunks). The vocabulary-parallel
//! LM head of the last token(s) follows, with an all-gather of the logits.
//!
//! ## Assumptions (also in docs/LATENCY.md)
//! - bf16 weights, activations and KV cache (2 bytes); one sequence per prefill; decode is
//!   one token per sequence for `batch` sequences that each hold `ctx` tokens of cache.
//! - Uneven head splits take the largest rank (the slowest rank sets the pace): query heads
//!   `ceil(heads / n)`, KV heads the most any rank of the engine's [`TpLayout`] holds
//!   (`ceil(kv / n)`, or 1 when `n > kv`, unless a KV head's query heads span two ranks,
//!   which both hold it), FFN columns `ceil(ffn / n)`, vocabulary rows `ceil(vocab / n)`.
//! - Embedding lookup, sampling and host overheads are left out; so is SM contention between
//!   a communication kernel and compute under ISO (DESIGN section 4 caps it at 2-8 CTAs).
//! - SPD blocks are the last `round(f * layers)` blocks (all blocks cost the same, so only the
//!   ISO pipeline's edges see the choice).
//! - Alphas not given by a source are marked "assumption" in the profile's source string.

#![warn(missing_docs)]

use crate::comm::Wire;
use crate::config::{LlamaConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::iso::IsoCostModel;
use crate::layout::TpLayout;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bytes per element of weights, activations and KV cache on the GPU (bf16).
pub const BF16: f64 = 2.0;

/// The item of `items` whose `key` is `name`, or an error listing the known names.
fn find_named<T>(items: Vec<T>, name: &str, key: fn(&T) -> &String, what: &str) -> Result<T> {
    let known: Vec<String> = items.iter().map(|i| key(i).clone()).collect();
    items.into_iter().find(|i| key(i) == name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "unknown {what} '{name}'; known: {}",
            known.join(", ")
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Model shapes

/// The shape of a LLaMA-architecture model: all the latency model needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Name the shape is known by ([`ModelShape::by_name`]), e.g. `llama2-70b`.
    pub name: String,
    /// Hidden size (elements per token row).
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads (fewer than `heads` with GQA).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// MLP intermediate width (columns of gate and up).
    pub ffn: usize,
    /// Vocabulary size (rows of the LM head).
    pub vocab: usize,
}

/// What the largest rank owns at TP n (see the module's assumptions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RankShape {
    /// Query heads: `ceil(heads / n)`.
    pub q_heads: usize,
    /// KV heads: the most any rank of [`TpLayout::new`] holds. `ceil(kv_heads / n)`, or 1
    /// when `n > kv_heads`, unless a KV head's query heads span two ranks, which both hold
    /// it (SmolLM2 at TP 4: 2; LLaMA2-70B at TP 3: 4).
    pub kv_heads: usize,
    /// FFN columns: `ceil(ffn / n)`.
    pub ffn: usize,
    /// Vocabulary rows of the LM head: `ceil(vocab / n)`.
    pub vocab: usize,
}

impl ModelShape {
    fn new(name: &str, dims: [usize; 6], vocab: usize) -> ModelShape {
        let [hidden, layers, heads, kv_heads, ffn, head_dim] = dims;
        ModelShape {
            name: name.into(),
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            ffn,
            vocab,
        }
    }
    /// LLaMA2-7B (Touvron et al. 2023, arXiv 2307.09288, Table 1; HF config.json).
    pub fn llama2_7b() -> ModelShape {
        Self::new("llama2-7b", [4096, 32, 32, 32, 11008, 128], 32000)
    }
    /// LLaMA2-13B.
    pub fn llama2_13b() -> ModelShape {
        Self::new("llama2-13b", [5120, 40, 40, 40, 13824, 128], 32000)
    }
    /// LLaMA2-70B (GQA with 8 KV heads).
    pub fn llama2_70b() -> ModelShape {
        Self::new("llama2-70b", [8192, 80, 64, 8, 28672, 128], 32000)
    }
    /// SmolLM2-135M (DESIGN.md section 6), the model the CPU backend runs.
    pub fn smollm2_135m() -> ModelShape {
        Self::new("smollm2-135m", [576, 30, 9, 3, 1536, 64], 49152)
    }
    /// The built-in shapes: LLaMA2-7B, LLaMA2-13B, LLaMA2-70B and SmolLM2-135M.
    pub fn known() -> Vec<ModelShape> {
        vec![
            Self::llama2_7b(),
            Self::llama2_13b(),
            Self::llama2_70b(),
            Self::smollm2_135m(),
        ]
    }
    /// The built-in shape called `name`, or an error listing the known names.
    pub fn by_name(name: &str) -> Result<ModelShape> {
        find_named(Self::known(), name, |m| &m.name, "model shape")
    }
    /// The shape of `cfg` (from GGUF metadata or config.json), called `name`.
    pub fn from_config(name: &str, cfg: &LlamaConfig) -> ModelShape {
        Self::new(
            name,
            [
                cfg.hidden,
                cfg.n_layers,
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.ffn,
                cfg.head_dim,
            ],
            cfg.vocab,
        )
    }

    /// A `LlamaConfig` of this shape, so [`IsoCostModel::from_config`] can be reused.
    pub fn to_config(&self) -> LlamaConfig {
        LlamaConfig {
            arch: "llama".into(),
            hidden: self.hidden,
            n_layers: self.layers,
            n_heads: self.heads,
            n_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            ffn: self.ffn,
            vocab: self.vocab,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            rope_style: RopeStyle::Interleaved,
            tied_embeddings: false,
            qkv_bias: false,
            context_length: 4096,
            sliding_window: None,
        }
    }

    /// The largest rank's share at TP `tp`. `InvalidTpDegree` unless `tp` is in
    /// `1..=heads`; `Config` when `heads` is not a multiple of `kv_heads` (no GQA layout).
    pub fn rank(&self, tp: usize) -> Result<RankShape> {
        if tp == 0 || tp > self.heads {
            return Err(Error::InvalidTpDegree {
                tp,
                n_heads: self.heads,
            });
        }
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return Err(Error::Config(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.heads, self.kv_heads
            )));
        }
        // the KV heads the engine's layout really gives each rank (a KV head whose query
        // heads span two ranks is on both)
        let layout = TpLayout::new(&self.to_config(), tp)?;
        Ok(RankShape {
            q_heads: self.heads.div_ceil(tp),
            kv_heads: layout
                .ranks
                .iter()
                .map(|r| r.kv_heads.len())
                .max()
                .unwrap_or(1),
            ffn: self.ffn.div_ceil(tp),
            vocab: self.vocab.div_ceil(tp),
        })
    }

    /// Bytes of one all-reduce message for `rows` token rows (hidden vectors as `wire`
    /// carries them: 2 bytes per element for bf16, 4 for f32).
    pub fn message_bytes(&self, rows: usize, wire: Wire) -> f64 {
        rows as f64 * self.hidden as f64 * wire.bytes() as f64
    }
}

/// Bytes moved through memory and floating-point operations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Work {
    /// Bytes read from and written to memory.
    pub bytes: f64,
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: f64,
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work {
            bytes: self.bytes + o.bytes,
            flops: self.flops + o.flops,
        }
    }
}

/// The token rows a block processes in one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Chunk {
    /// Sequences in the call (decode batch; 1 for a prefill).
    pub seqs: usize,
    /// New tokens per sequence (the chunk length for a prefill, 1 for decode).
    pub tokens: usize,
    /// Tokens already in each sequence's KV cache (ISO's chunk 1 sees chunk 0 here).
    pub prefix: usize,
}

impl Chunk {
    /// A prefill chunk: `tokens` new tokens of one sequence after `prefix` cached ones.
    pub fn prefill(tokens: usize, prefix: usize) -> Chunk {
        Chunk {
            seqs: 1,
            tokens,
            prefix,
        }
    }
    /// A decode step: one new token for each of `batch` sequences, each with `ctx` cached tokens.
    pub fn decode(batch: usize, ctx: usize) -> Chunk {
        Chunk {
            seqs: batch,
            tokens: 1,
            prefix: ctx,
        }
    }
    /// Rows in the GEMMs (all sequences' new tokens).
    pub fn rows(&self) -> usize {
        self.seqs * self.tokens
    }
}

/// One of the two parts of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// RMSNorm + QKV projection + RoPE + KV write, attention over the cache, output projection.
    Attn,
    /// RMSNorm + gate/up projection + SwiGLU + down projection.
    Mlp,
}

impl ModelShape {
    /// Bytes and FLOPs of one part of one block on the largest rank at TP `tp`, elements of
    /// `elem` bytes (2 for bf16, 4 for the f32 CPU backend).
    pub fn part_work(&self, tp: usize, part: Part, c: Chunk, elem: f64) -> Result<Work> {
        let r = self.rank(tp)?;
        let (d, hd) = (self.hidden as f64, self.head_dim as f64);
        let (qn, kvn) = (r.q_heads as f64 * hd, r.kv_heads as f64 * hd);
        let rows = c.rows() as f64;
        Ok(match part {
            Part::Attn => {
                let weights = d * (qn + 2.0 * kvn) + qn * d;
                // each query of a sequence sees the prefix plus the causal part of the chunk
                let (q, p) = (c.tokens as f64, c.prefix as f64);
                let pairs = c.seqs as f64 * (q * p + q * (q + 1.0) / 2.0);
                // K and V of every key read once (flash-style), new K/V written once
                let kv = c.seqs as f64 * (p + q) * 2.0 * kvn + rows * 2.0 * kvn;
                // activations: x in, q/k/v out, attention in/out, o_proj out
                let act = rows * (d + (qn + 2.0 * kvn) + 2.0 * qn + d);
                Work {
                    bytes: elem * (weights + kv + act),
                    flops: 2.0 * rows * weights + 4.0 * qn * pairs,
                }
            }
            Part::Mlp => {
                let f = r.ffn as f64;
                let weights = 3.0 * d * f;
                let act = rows * (2.0 * d + 3.0 * f);
                Work {
                    bytes: elem * (weights + act),
                    flops: 2.0 * rows * weights,
                }
            }
        })
    }

    /// Final norm + the rank's vocabulary slice of the LM head for `rows` rows.
    pub fn lm_head_work(&self, tp: usize, rows: usize, elem: f64) -> Result<Work> {
        let r = self.rank(tp)?;
        let w = r.vocab as f64 * self.hidden as f64;
        let rows = rows as f64;
        Ok(Work {
            bytes: elem * (w + rows * (self.hidden as f64 + r.vocab as f64)),
            flops: 2.0 * rows * w,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Link profiles

/// A one-shot all-reduce kernel: every rank pulls the `n - 1` peer buffers and sums.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OneShot {
    /// Latency of one one-shot all-reduce (us).
    pub alpha_us: f64,
    /// Per-GPU link bandwidth the pulls share (GB/s, one direction).
    pub link_gbs: f64,
    /// Messages above this use the ring / two-shot path (beyond 4 ranks at most
    /// [`crate::comm::select::ONE_SHOT_MAX_BYTES_LARGE_WORLD`], as the engine selects).
    pub max_bytes: f64,
}

/// Per-collective latency and bandwidth of one interconnect + library, with its source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkProfile {
    /// Name the profile is known by ([`LinkProfile::by_name`]), e.g. `h100-nvlink-nccl`.
    pub name: String,
    /// Key of the [`Device`] whose compute goes with this link.
    pub device: String,
    /// Latency of one ring / two-shot / NCCL collective (us).
    pub alpha_us: f64,
    /// Bandwidth applied to the algorithm bytes `2 (n - 1) / n * size` (bus bandwidth, GB/s).
    pub busbw_gbs: f64,
    /// A one-shot kernel for messages up to its `max_bytes`, where the profile has one (all-reduce
    /// only: the all-gather always takes `alpha_us` and `busbw_gbs`).
    pub one_shot: Option<OneShot>,
    /// Where the numbers come from.
    pub source: String,
    /// "modelled", or "fitted to measurements" for a profile fitted on this machine.
    pub label: String,
}

/// Bytes each rank sends (and receives) in a ring all-reduce of `size` bytes over `n` ranks.
pub fn ring_bytes(n: usize, size: f64) -> f64 {
    if n <= 1 {
        0.0
    } else {
        2.0 * (n - 1) as f64 / n as f64 * size
    }
}

impl LinkProfile {
    /// Time (us) of one sum all-reduce of `size` bytes over `n` ranks; 0 at one rank.
    pub fn all_reduce_us(&self, n: usize, size: f64) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        if let Some(os) = &self.one_shot {
            // beyond 4 ranks one-shot pulls more peers per byte: the engine's selector (and
            // vLLM's) hands messages above 256 KiB to two-shot there
            let max = if n > 4 {
                os.max_bytes
                    .min(crate::comm::select::ONE_SHOT_MAX_BYTES_LARGE_WORLD as f64)
            } else {
                os.max_bytes
            };
            if size <= max {
                return os.alpha_us + (n - 1) as f64 * size / (os.link_gbs * 1e3);
            }
        }
        self.alpha_us + ring_bytes(n, size) / (self.busbw_gbs * 1e3)
    }

    /// Time (us) of an all-gather whose result is `total` bytes; 0 at one rank.
    pub fn all_gather_us(&self, n: usize, total: f64) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        self.alpha_us + (n - 1) as f64 / n as f64 * total / (self.busbw_gbs * 1e3)
    }

    /// The GPU link profiles, each with its source.
    pub fn known() -> Vec<LinkProfile> {
        let p = |name: &str, device: &str, alpha: f64, bw: f64, source: &str| LinkProfile {
            name: name.into(),
            device: device.into(),
            alpha_us: alpha,
            busbw_gbs: bw,
            one_shot: None,
            source: source.into(),
            label: "modelled".into(),
        };
        let mut oneshot = p(
            "h100-nvlink-oneshot",
            "h100-sxm",
            12.0,
            370.0,
            "DESIGN.md section 7: custom one-shot / multimem all-reduce ~5-12 us on 8xH100 \
             (vLLM custom all-reduce, TensorRT-LLM); one-shot alpha 8 us (middle of 5-12) at \
             NVLink 4's 450 GB/s per direction (NVIDIA H100 datasheet: 900 GB/s bidirectional) \
             up to 512 KiB; above it two-shot at alpha 12 us (top of the range) and 370 GB/s",
        );
        oneshot.one_shot = Some(OneShot {
            alpha_us: 8.0,
            link_gbs: 450.0,
            max_bytes: 512.0 * 1024.0,
        });
        vec![
            p(
                "h100-nvlink-nccl",
                "h100-sxm",
                20.0,
                370.0,
                "DESIGN.md section 7: NCCL all-reduce inside one 8xH100 node ~19-25 us for \
                 messages <= 256 KB (alpha 20 us); NVLink 4 ~370 GB/s effective for NCCL",
            ),
            oneshot,
            p(
                "a100-300gbs",
                "a100",
                15.0,
                300.0,
                "SPD paper (Kim et al., ICML 2025, arXiv 2502.20727), experimental setup: \
                 A100-80GB with 300 GB/s links (their high-bandwidth setting); alpha 15 us is an \
                 assumption (NCCL small-message latency in one A100 node), not from the paper",
            ),
            p(
                "a100-p2p-off-10gbs",
                "a100",
                30.0,
                10.0,
                "SPD paper (arXiv 2502.20727), experimental setup: the same A100s with P2P \
                 disabled, 10 GB/s; alpha 30 us is an assumption (copies staged through host \
                 memory)",
            ),
            p(
                "a100-2node-50gbs",
                "a100",
                35.0,
                50.0,
                "SPD paper (arXiv 2502.20727), experimental setup: 2 nodes (4+4 GPUs) at \
                 50 GB/s between them, modelled as a flat ring at the slowest link; alpha 35 us \
                 is an assumption (inter-node NCCL latency)",
            ),
            p(
                "a800-nvlink-400gbs",
                "a800",
                15.0,
                400.0,
                "ISO paper (Xiao & Su, arXiv 2409.11155), experimental setup: A800 GPUs with \
                 NVLink at 400 GB/s (nominal, used as bus bandwidth: optimistic); alpha 15 us \
                 is an assumption",
            ),
            p(
                "a800-nvlink-200gbs",
                "a800",
                15.0,
                200.0,
                "the same A800s per direction: the datasheet's 400 GB/s NVLink is the two-way \
                 total of 8 NVLink 3 links at 25 GB/s each way (the A100's 600 GB/s counts 12 \
                 links the same way), so 200 GB/s each way, used as bus bandwidth (NCCL reaches \
                 ~75-80% of it: still optimistic); alpha 15 us is an assumption",
            ),
            p(
                "rtx4090-pcie-nop2p",
                "rtx4090",
                40.0,
                25.0,
                "ISO paper (arXiv 2409.11155) RTX 4090 setting; GeForce 4090s have no P2P, so \
                 collectives are staged through host memory over PCIe 4.0 x16 (PCI-SIG: 32 GB/s \
                 per direction raw, ~25 GB/s effective); alpha 40 us is an assumption (two \
                 staged copies + host synchronisation per step); PCIe switch contention ignored",
            ),
        ]
    }

    /// The known profile called `name`, or an error listing the known names.
    pub fn by_name(name: &str) -> Result<LinkProfile> {
        find_named(Self::known(), name, |p| &p.name, "link profile")
    }
}

// ---------------------------------------------------------------------------------------------
// Compute

/// A roofline device (modelled compute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Name a [`LinkProfile::device`] refers to, e.g. `h100-sxm`.
    pub key: String,
    /// Memory bandwidth (GB/s) the roofline uses.
    pub mem_gbs: f64,
    /// Dense bf16 tensor throughput (TFLOP/s).
    pub peak_tflops: f64,
    /// Fraction of `mem_gbs` that bandwidth-bound kernels reach.
    pub mem_eff: f64,
    /// Fraction of `peak_tflops` that compute-bound kernels reach.
    pub flop_eff: f64,
    /// Kernel gaps and small ops per block (us), split evenly between the two parts.
    pub layer_overhead_us: f64,
    /// Bytes per element (2 for bf16).
    pub elem_bytes: f64,
    /// Where the constants come from.
    pub source: String,
}

impl Device {
    /// The GPU roofline devices (H100 SXM, A100, A800, RTX 4090), each with its source; bf16
    /// elements and 4 us of per-block overhead for all of them.
    pub fn known() -> Vec<Device> {
        let d = |key: &str, mem: f64, peak: f64, eff: (f64, f64), source: &str| Device {
            key: key.into(),
            mem_gbs: mem,
            peak_tflops: peak,
            mem_eff: eff.0,
            flop_eff: eff.1,
            layer_overhead_us: 4.0,
            elem_bytes: BF16,
            source: source.into(),
        };
        vec![
            d(
                "h100-sxm",
                3000.0,
                800.0,
                (0.85, 0.85),
                "DESIGN.md section 7: measured D2D copy ~3.0 TB/s (HBM3 spec 3.35 TB/s) and \
                 ~800 TFLOP/s bf16 dense measured; mem_eff 0.85 = issue 3's GEMV goal vs copy \
                 bandwidth, flop_eff 0.85 of the measured GEMM peak (assumption)",
            ),
            d(
                "a100",
                2039.0,
                312.0,
                (0.8, 0.75),
                "NVIDIA A100 datasheet (80GB SXM): 2,039 GB/s HBM2e, 312 TFLOP/s bf16 dense; \
                 efficiencies 0.8 / 0.75 of spec are assumptions",
            ),
            d(
                "a800",
                2039.0,
                312.0,
                (0.8, 0.75),
                "A800 80GB SXM: the A100's memory and tensor cores (export variant with \
                 400 GB/s NVLink); same spec numbers and assumed efficiencies as a100",
            ),
            d(
                "rtx4090",
                1008.0,
                165.2,
                (0.8, 0.75),
                "NVIDIA Ada Lovelace architecture whitepaper, appendix table for GeForce RTX \
                 4090: 1,008 GB/s GDDR6X, 165.2 TFLOP/s FP16/BF16 tensor with FP32 accumulate \
                 (dense); efficiencies are assumptions",
            ),
        ]
    }

    /// The known device with key `key`, or an error listing the known keys.
    pub fn by_key(key: &str) -> Result<Device> {
        find_named(Self::known(), key, |d| &d.key, "compute device")
    }

    /// Roofline time (us) of `w`.
    pub fn time_us(&self, w: Work) -> f64 {
        let mem = w.bytes / (self.mem_gbs * self.mem_eff * 1e3);
        let flop = w.flops / (self.peak_tflops * self.flop_eff * 1e6);
        mem.max(flop)
    }

    /// Roofline time (us) of the two parts of one block.
    pub fn block_us(&self, m: &ModelShape, tp: usize, c: Chunk) -> Result<(f64, f64)> {
        let half = self.layer_overhead_us / 2.0;
        let a = self.time_us(m.part_work(tp, Part::Attn, c, self.elem_bytes)?);
        let f = self.time_us(m.part_work(tp, Part::Mlp, c, self.elem_bytes)?);
        Ok((a + half, f + half))
    }
}

/// Prefill or decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// A prompt of one sequence in one forward (or in ISO's two chunks).
    Prefill,
    /// One new token for each sequence of a batch.
    Decode,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        })
    }
}

/// Version of the [`MeasuredCompute`] schema this code reads.
pub const MEASURED_SCHEMA: u32 = 1;

/// Per-layer compute measured on a device: the file a GPU benchmark writes.
///
/// ```json
/// { "schema": 1, "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-01",
///   "command": "cargo run --release --features cuda --example llama -- bench-layer ...",
///   "notes": "random bf16 weights of the true shapes, CUDA graphs on",
///   "entries": [
///     { "model": "llama2-70b", "tp": 8, "phase": "decode", "tokens": 1, "batch": 1,
///       "ctx": 1024, "layer_us": 81.3 },
///     { "model": "llama2-70b", "tp": 8, "phase": "prefill", "tokens": 1024, "batch": 1,
///       "ctx": 1024, "layer_us": 690.0, "attn_us": 260.0 } ] }
/// ```
///
/// An entry is the time of ONE transformer block on ONE rank (the largest rank at that TP
/// degree), compute only: no all-reduce, no waiting for peers (time the block with the
/// communicator replaced by the identity, or take the compute-lane time).
/// - `model`: a [`ModelShape`] name (`llama2-7b`, `llama2-13b`, `llama2-70b`, `smollm2-135m`).
/// - `phase: "prefill"`: `tokens` new tokens of one sequence (`batch` = 1) with `ctx` tokens
///   already in the KV cache (0 for a plain prefill; ISO's second chunk has the first chunk's
///   length here). `phase: "decode"`: `tokens` = 1, `batch` sequences, each with `ctx` tokens
///   of cache before the new one.
/// - `layer_us`: attention part + MLP part; optional `attn_us`: the attention part alone
///   (otherwise the split is taken from the roofline's proportion).
///
/// [`needed_entries`] lists the keys a given set of [`LatencyOptions`] looks up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasuredCompute {
    /// Schema version; must be [`MEASURED_SCHEMA`].
    pub schema: u32,
    /// The GPU as the benchmark names it (free text; [`device_key_of`] maps it to a [`Device`]).
    pub device: String,
    /// When the table was measured (free text, e.g. `2026-12-01`).
    pub date: String,
    /// The command that wrote the table.
    pub command: String,
    /// Anything else about the run (may be left out of the JSON).
    #[serde(default)]
    pub notes: String,
    /// The timed blocks; a lookup takes the first entry with a matching key.
    pub entries: Vec<MeasuredEntry>,
}

/// One row of a [`MeasuredCompute`] table: one block on the largest rank, compute only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasuredEntry {
    /// A [`ModelShape`] name.
    pub model: String,
    /// TP degree (1 to the model's query heads).
    pub tp: usize,
    /// `prefill` or `decode` in the JSON.
    pub phase: Phase,
    /// New tokens per sequence (1 for decode).
    pub tokens: usize,
    /// Sequences (1 for prefill).
    pub batch: usize,
    /// Tokens already in each sequence's KV cache before the call.
    pub ctx: usize,
    /// Time of one block, attention part + MLP part (us, > 0).
    pub layer_us: f64,
    /// Time of the attention part alone (us, in `[0, layer_us]`); absent: the roofline's split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_us: Option<f64>,
}

impl MeasuredCompute {
    /// Parse and validate; `origin` names the source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<MeasuredCompute> {
        let m: MeasuredCompute = serde_json::from_str(text).map_err(|e| {
            Error::InvalidArgument(format!(
                "measured compute table {origin}: {e} (expected {{schema, device, date, \
                 command, entries: [{{model, tp, phase: prefill|decode, tokens, batch, ctx, \
                 layer_us}}]}}; see syncdrop::latency::MeasuredCompute)"
            ))
        })?;
        m.validate(origin)?;
        Ok(m)
    }

    /// Read, parse and validate the table at `path`.
    pub fn load(path: &Path) -> Result<MeasuredCompute> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Check the schema version and every entry: a known model, `tp` in 1..=heads, `tokens` and
    /// `batch` >= 1 (prefill: batch 1; decode: tokens 1), a finite `layer_us` > 0 and `attn_us`
    /// in `[0, layer_us]`. `origin` names the source in errors.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("{origin}: {m}")));
        if self.schema != MEASURED_SCHEMA {
            return bad(format!(
                "schema {} (this build reads schema {MEASURED_SCHEMA})",
                self.schema
            ));
        }
        for (i, e) in self.entries.iter().enumerate() {
            let shape = ModelShape::by_name(&e.model)
                .map_err(|err| Error::InvalidArgument(format!("{origin}: entry {i}: {err}")))?;
            if e.tp == 0 || e.tp > shape.heads {
                return bad(format!("entry {i}: tp {} for {}", e.tp, e.model));
            }
            if e.tokens == 0 || e.batch == 0 {
                return bad(format!("entry {i}: tokens and batch must be >= 1"));
            }
            if e.phase == Phase::Prefill && e.batch != 1 {
                return bad(format!("entry {i}: a prefill entry has batch 1"));
            }
            if e.phase == Phase::Decode && e.tokens != 1 {
                return bad(format!("entry {i}: a decode entry has tokens 1"));
            }
            if !(e.layer_us.is_finite() && e.layer_us > 0.0) {
                return bad(format!("entry {i}: layer_us {} is not > 0", e.layer_us));
            }
            if let Some(a) = e.attn_us {
                if !(a.is_finite() && a >= 0.0 && a <= e.layer_us) {
                    return bad(format!("entry {i}: attn_us {a} not in [0, layer_us]"));
                }
            }
        }
        Ok(())
    }

    fn find(&self, model: &str, tp: usize, phase: Phase, c: Chunk) -> Option<&MeasuredEntry> {
        let (tokens, batch) = match phase {
            Phase::Prefill => (c.tokens, 1),
            Phase::Decode => (1, c.seqs),
        };
        self.entries.iter().find(|e| {
            e.model == model
                && e.tp == tp
                && e.phase == phase
                && e.tokens == tokens
                && e.batch == batch
                && e.ctx == c.prefix
        })
    }
}

/// Which compute numbers a projection uses.
#[derive(Debug, Clone)]
pub enum Compute {
    /// Roofline: modelled.
    Roofline(Device),
    /// A measured table; `split` gives the attention / MLP proportion when the table has no
    /// `attn_us`, and the LM head (not in the table: modelled).
    Measured {
        /// The measured per-block times.
        table: MeasuredCompute,
        /// Roofline device for the attention / MLP split and for the LM head.
        split: Device,
    },
}

impl Compute {
    /// The two parts of one block (us) and the label of the numbers.
    pub fn block_us(
        &self,
        m: &ModelShape,
        tp: usize,
        phase: Phase,
        c: Chunk,
    ) -> Result<(f64, f64, &'static str)> {
        match self {
            Compute::Roofline(d) => {
                let (a, f) = d.block_us(m, tp, c)?;
                Ok((a, f, "modelled"))
            }
            Compute::Measured { table, split } => {
                let e = table.find(&m.name, tp, phase, c).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "measured table ({}) has no entry for {} tp {tp} {phase} tokens {} \
                         batch {} ctx {}",
                        table.device, m.name, c.tokens, c.seqs, c.prefix
                    ))
                })?;
                let attn = match e.attn_us {
                    Some(a) => a,
                    None => {
                        let (a, f) = split.block_us(m, tp, c)?;
                        e.layer_us * a / (a + f)
                    }
                };
                Ok((attn, e.layer_us - attn, "measured"))
            }
        }
    }

    fn lm_head_us(&self, m: &ModelShape, tp: usize, rows: usize) -> Result<f64> {
        let d = match self {
            Compute::Roofline(d) => d,
            Compute::Measured { split, .. } => split,
        };
        Ok(d.time_us(m.lm_head_work(tp, rows, d.elem_bytes)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Two-lane event simulation

/// One of a rank's two FIFO lanes in [`simulate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Lane {
    /// Block compute and the LM head (a CUDA compute stream; the CPU rank thread).
    Compute,
    /// All-reduces and the logits' all-gather (a CUDA communication stream; the CPU comm thread).
    Comm,
}

/// An operation on a lane; `deps` are indices of earlier operations whose end it waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// The lane that runs it.
    pub lane: Lane,
    /// Duration (us); a negative one counts as 0.
    pub us: f64,
    /// Indices of ops issued before this one whose end it waits for.
    pub deps: Vec<usize>,
}

/// Start and end (us) of each op: lanes run their ops in issue order (FIFO, like a CUDA
/// stream or the CPU backend's communication thread), each op starts when its lane is free
/// and its dependencies have ended.
pub fn simulate(ops: &[Op]) -> Result<Vec<(f64, f64)>> {
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(ops.len());
    let (mut compute_free, mut comm_free) = (0.0f64, 0.0f64);
    for (i, op) in ops.iter().enumerate() {
        let mut ready = 0.0f64;
        for &d in &op.deps {
            if d >= i {
                return Err(Error::InvalidArgument(format!(
                    "op {i} depends on op {d}, which is not issued before it"
                )));
            }
            ready = ready.max(out[d].1);
        }
        let free = match op.lane {
            Lane::Compute => &mut compute_free,
            Lane::Comm => &mut comm_free,
        };
        let start = ready.max(*free);
        let end = start + op.us.max(0.0);
        *free = end;
        out.push((start, end));
    }
    Ok(out)
}

/// Cost of one chunk's ops in one block (us).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkCost {
    /// Attention part of the block (us).
    pub attn_us: f64,
    /// MLP part of the block (us).
    pub mlp_us: f64,
    /// One all-reduce of this chunk's rows (0 at TP 1).
    pub ar_us: f64,
}

/// The forward's ops: one chunk = the plain serial schedule; two chunks = the ISO order of
/// DESIGN.md section 4. `spd[l]` drops block l's attention all-reduce. Ends with the LM head
/// (`lm_us`, after the last chunk's final all-reduce) and the logits gather (`gather_us`).
pub fn forward_ops(chunks: &[ChunkCost], spd: &[bool], lm_us: f64, gather_us: f64) -> Vec<Op> {
    let mut ops = Vec::new();
    let push = |ops: &mut Vec<Op>, lane, us, deps: Vec<usize>| {
        ops.push(Op { lane, us, deps });
        ops.len() - 1
    };
    let k = chunks.len();
    let mut prev_mlp_ar: Vec<Option<usize>> = vec![None; k];
    for &spd_l in spd {
        let mut attn_ar: Vec<Option<usize>> = vec![None; k];
        for (c, cc) in chunks.iter().enumerate() {
            let a = push(
                &mut ops,
                Lane::Compute,
                cc.attn_us,
                prev_mlp_ar[c].into_iter().collect(),
            );
            if !spd_l {
                attn_ar[c] = Some(push(&mut ops, Lane::Comm, cc.ar_us, vec![a]));
            }
        }
        for (c, cc) in chunks.iter().enumerate() {
            let m = push(
                &mut ops,
                Lane::Compute,
                cc.mlp_us,
                attn_ar[c].into_iter().collect(),
            );
            prev_mlp_ar[c] = Some(push(&mut ops, Lane::Comm, cc.ar_us, vec![m]));
        }
    }
    let lm = push(
        &mut ops,
        Lane::Compute,
        lm_us,
        prev_mlp_ar.last().copied().flatten().into_iter().collect(),
    );
    push(&mut ops, Lane::Comm, gather_us, vec![lm]);
    ops
}

/// Which blocks are SPD for a fraction `f` of `layers` (the last `round(f * layers)`).
pub fn spd_blocks(layers: usize, f: f64) -> Vec<bool> {
    let k = ((f.clamp(0.0, 1.0) * layers as f64).round() as usize).min(layers);
    (0..layers).map(|l| l >= layers - k).collect()
}

// ---------------------------------------------------------------------------------------------
// Projection

/// One projected configuration.
#[derive(Debug, Clone)]
pub struct Scenario<'a> {
    /// The model shape.
    pub model: &'a ModelShape,
    /// TP degree (ranks).
    pub tp: usize,
    /// The interconnect: all-reduces and the logits' all-gather.
    pub link: &'a LinkProfile,
    /// Per-block compute: roofline or a measured table.
    pub compute: &'a Compute,
    /// Prefill or decode.
    pub phase: Phase,
    /// Prompt length (prefill).
    pub tokens: usize,
    /// Decode batch.
    pub batch: usize,
    /// Decode context per sequence.
    pub ctx: usize,
    /// Fraction of blocks with SPD, in [0, 1] (the last ones: [`spd_blocks`]).
    pub spd_fraction: f64,
    /// Split a prefill into ISO's two chunks where [`iso_split`] says it pays (decode: ignored).
    pub iso: bool,
    /// What the all-reduces move (the logits' all-gather stays bf16).
    pub wire: Wire,
}

impl<'a> Scenario<'a> {
    /// Decode at batch 1, context 1024, no SPD, no ISO, bf16 on the wire; set the rest with
    /// struct update syntax (`Scenario { tokens: 2048, ..Scenario::new(..) }`).
    pub fn new(
        model: &'a ModelShape,
        tp: usize,
        link: &'a LinkProfile,
        compute: &'a Compute,
        phase: Phase,
    ) -> Scenario<'a> {
        Scenario {
            model,
            tp,
            link,
            compute,
            phase,
            tokens: 1,
            batch: 1,
            ctx: 1024,
            spd_fraction: 0.0,
            iso: false,
            wire: Wire::Bf16,
        }
    }
}

/// One row of the projection table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    /// Model shape name.
    pub model: String,
    /// TP degree.
    pub tp: usize,
    /// Link profile name.
    pub profile: String,
    /// Prefill or decode.
    pub phase: Phase,
    /// Prompt length (1 for decode).
    pub tokens: usize,
    /// Sequences (1 for prefill).
    pub batch: usize,
    /// KV context per sequence for decode (0 for prefill).
    pub ctx: usize,
    /// Requested SPD fraction, in [0, 1].
    pub spd_fraction: f64,
    /// Blocks with SPD: the last `round(spd_fraction * layers)`.
    pub spd_blocks: usize,
    /// ISO requested; `iso_split` says whether the prompt was split.
    pub iso: bool,
    /// Tokens in ISO's first chunk (None without ISO, or when the cost model turns it off).
    pub iso_split: Option<usize>,
    /// All-reduces per forward: 2 per standard block and 1 per SPD block, per chunk; 0 at TP 1
    /// (the logits' all-gather not counted).
    pub all_reduces: usize,
    /// Busy time of the compute lane: blocks and LM head (ms).
    pub compute_ms: f64,
    /// Busy time of the communication lane: all-reduces and the logits' all-gather (ms).
    pub comm_ms: f64,
    /// Time not covered by compute: `total_ms - compute_ms`, at least 0 (ms).
    pub exposed_comm_ms: f64,
    /// Projected latency of the forward: the end of its last op (ms).
    pub total_ms: f64,
    /// Baseline (same setting, no SPD, no ISO) total / this total.
    pub speedup: f64,
    /// "measured" or "modelled" (the compute of the blocks).
    pub compute_label: String,
    /// What the all-reduces moved: "bf16" or "f32" (older reports: bf16).
    #[serde(default = "bf16_name")]
    pub wire: String,
    /// Always "modelled" for GPU links; "fitted to measurements" for the CPU profile.
    pub comm_label: String,
}

fn bf16_name() -> String {
    "bf16".into()
}

/// The ISO split the cost model picks for a `t`-token prompt at TP `tp` (None: ISO off).
/// None at TP 1 (or 0), as in the engine (`Engine::prefill`): one rank has no all-reduce to
/// hide, so a second chunk would only cost.
pub fn iso_split(m: &ModelShape, tp: usize, t: usize) -> Option<usize> {
    if tp <= 1 {
        return None;
    }
    IsoCostModel::from_config(&m.to_config(), tp).split(t)
}

struct Timed {
    compute_ms: f64,
    comm_ms: f64,
    total_ms: f64,
    all_reduces: usize,
    label: &'static str,
}

fn run(s: &Scenario, spd: &[bool], split: Option<usize>) -> Result<Timed> {
    let m = s.model;
    let chunks: Vec<(Chunk, Phase)> = match s.phase {
        Phase::Decode => vec![(Chunk::decode(s.batch, s.ctx), Phase::Decode)],
        Phase::Prefill => match split {
            Some(a) => vec![
                (Chunk::prefill(a, 0), Phase::Prefill),
                (Chunk::prefill(s.tokens - a, a), Phase::Prefill),
            ],
            None => vec![(Chunk::prefill(s.tokens, 0), Phase::Prefill)],
        },
    };
    let mut label = "modelled";
    let mut costs = Vec::new();
    for (c, phase) in &chunks {
        let (attn_us, mlp_us, l) = s.compute.block_us(m, s.tp, *phase, *c)?;
        label = l;
        costs.push(ChunkCost {
            attn_us,
            mlp_us,
            ar_us: s
                .link
                .all_reduce_us(s.tp, m.message_bytes(c.rows(), s.wire)),
        });
    }
    let rows = match s.phase {
        Phase::Decode => s.batch,
        Phase::Prefill => 1,
    };
    let lm = s.compute.lm_head_us(m, s.tp, rows)?;
    let gather = s
        .link
        .all_gather_us(s.tp, rows as f64 * m.vocab as f64 * BF16);
    let ops = forward_ops(&costs, spd, lm, gather);
    let times = simulate(&ops)?;
    let total = times.iter().fold(0.0f64, |a, t| a.max(t.1));
    let sum = |lane| -> f64 { ops.iter().filter(|o| o.lane == lane).map(|o| o.us).sum() };
    let all_reduces = if s.tp > 1 {
        chunks.len() * spd.iter().map(|&d| if d { 1 } else { 2 }).sum::<usize>()
    } else {
        0
    };
    Ok(Timed {
        compute_ms: sum(Lane::Compute) / 1e3,
        comm_ms: sum(Lane::Comm) / 1e3,
        total_ms: total / 1e3,
        all_reduces,
        label,
    })
}

/// Project one scenario (and its baseline: no SPD, no ISO, for the speedup).
pub fn project(s: &Scenario) -> Result<Projection> {
    if !(0.0..=1.0).contains(&s.spd_fraction) {
        return Err(Error::InvalidArgument(format!(
            "SPD fraction {} is not in [0, 1]",
            s.spd_fraction
        )));
    }
    let (n_tok, n_batch) = match s.phase {
        Phase::Prefill => (s.tokens, 1),
        Phase::Decode => (1, s.batch),
    };
    if n_tok == 0 || n_batch == 0 {
        return Err(Error::InvalidArgument(
            "a projection needs at least one token and one sequence".into(),
        ));
    }
    let m = s.model;
    let spd = spd_blocks(m.layers, s.spd_fraction);
    let split = match (s.phase, s.iso) {
        (Phase::Prefill, true) => iso_split(m, s.tp, s.tokens),
        _ => None,
    };
    let t = run(s, &spd, split)?;
    let base = run(s, &vec![false; m.layers], None)?;
    Ok(Projection {
        model: m.name.clone(),
        tp: s.tp,
        profile: s.link.name.clone(),
        phase: s.phase,
        tokens: if s.phase == Phase::Prefill {
            s.tokens
        } else {
            1
        },
        batch: n_batch,
        ctx: if s.phase == Phase::Decode { s.ctx } else { 0 },
        spd_fraction: s.spd_fraction,
        spd_blocks: spd.iter().filter(|&&d| d).count(),
        iso: s.iso,
        iso_split: split,
        all_reduces: t.all_reduces,
        compute_ms: t.compute_ms,
        comm_ms: t.comm_ms,
        exposed_comm_ms: (t.total_ms - t.compute_ms).max(0.0),
        total_ms: t.total_ms,
        speedup: base.total_ms / t.total_ms,
        compute_label: t.label.into(),
        wire: s.wire.name().into(),
        comm_label: s.link.label.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Validation against the papers

/// One comparison of the projection with a published point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationPoint {
    /// The published claim and the setting compared, in short.
    pub claim: String,
    /// The paper, and the part of it the claim comes from.
    pub source: String,
    /// The paper's number (latency reduction in %).
    pub paper_pct: f64,
    /// The model's number for the closest setting we can express (latency reduction in %).
    pub model_pct: f64,
    /// Profile and compute behind `model_pct` (and the prompt lengths, where several).
    pub setting: String,
    /// Context for the comparison: the alpha that would reproduce the paper, the communication
    /// share, or the range over prompt lengths.
    pub note: String,
}

fn reduction_pct(p: &Projection) -> f64 {
    100.0 * (1.0 - 1.0 / p.speedup)
}

/// The per-all-reduce latency (us) at which the model reproduces a `target` % latency
/// reduction for `model` at TP `tp`, SPD fraction `f`, on `link`'s bandwidth and `device`'s
/// compute (decode at batch 1, context `ctx`). None when no alpha in 0..2000 us does.
pub fn implied_alpha_us(
    model: &ModelShape,
    tp: usize,
    link: &LinkProfile,
    device: &Device,
    f: f64,
    ctx: usize,
    target: f64,
) -> Result<Option<f64>> {
    let compute = Compute::Roofline(device.clone());
    let at = |alpha: f64| -> Result<f64> {
        let mut l = link.clone();
        l.alpha_us = alpha;
        l.one_shot = None;
        let s = Scenario {
            ctx,
            spd_fraction: f,
            ..Scenario::new(model, tp, &l, &compute, Phase::Decode)
        };
        Ok(reduction_pct(&project(&s)?))
    };
    // the reduction grows with alpha (comm share grows): bisect
    let (mut lo, mut hi) = (0.0f64, 2000.0f64);
    if at(lo)? > target || at(hi)? < target {
        return Ok(None);
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if at(mid)? < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(0.5 * (lo + hi)))
}

/// The papers' points next to the projection (roofline compute; see docs/LATENCY.md).
pub fn validate() -> Result<Vec<ValidationPoint>> {
    let m70 = ModelShape::llama2_70b();
    let mut out = Vec::new();
    let spd_src = "SPD paper, Kim et al., ICML 2025, arXiv 2502.20727 (abstract; LLaMA2-70B, \
                   8 GPUs, 70% SPD blocks zero-shot: 19.7% latency reduction, 0.94% accuracy drop)";
    for (profile, ctx) in [("a100-300gbs", 1024), ("h100-nvlink-nccl", 1024)] {
        let link = LinkProfile::by_name(profile)?;
        let dev = Device::by_key(&link.device)?;
        let compute = Compute::Roofline(dev.clone());
        let dec = project(&Scenario {
            ctx,
            spd_fraction: 0.7,
            ..Scenario::new(&m70, 8, &link, &compute, Phase::Decode)
        })?;
        let alpha = implied_alpha_us(&m70, 8, &link, &dev, 0.7, ctx, 19.7)?;
        out.push(ValidationPoint {
            claim: "SPD 70% blocks, LLaMA2-70B, TP 8, decode step".into(),
            source: spd_src.into(),
            paper_pct: 19.7,
            model_pct: reduction_pct(&dec),
            setting: format!(
                "{profile}, batch 1, ctx {ctx}, roofline compute ({})",
                dev.key
            ),
            note: match alpha {
                Some(a) => format!(
                    "the model reaches 19.7% only if one all-reduce costs ~{a:.0} us (profile: \
                     alpha {:.0} us, comm {:.2} of {:.2} ms)",
                    link.alpha_us, dec.comm_ms, dec.total_ms
                ),
                None => "no alpha in 0..2000 us reproduces 19.7%".into(),
            },
        });
        let pre = project(&Scenario {
            tokens: 2048,
            ctx: 0,
            spd_fraction: 0.7,
            ..Scenario::new(&m70, 8, &link, &compute, Phase::Prefill)
        })?;
        out.push(ValidationPoint {
            claim: "SPD 70% blocks, LLaMA2-70B, TP 8, prefill of 2048 tokens".into(),
            source: spd_src.into(),
            paper_pct: 19.7,
            model_pct: reduction_pct(&pre),
            setting: format!("{profile}, roofline compute ({})", dev.key),
            note: format!("prefill comm {:.2} of {:.2} ms", pre.comm_ms, pre.total_ms),
        });
    }
    let iso_src = "ISO paper, Xiao & Su, arXiv 2409.11155 (abstract: prefill -35% on RTX 4090, \
                   -15% on A800, 30B/70B models)";
    for (profile, paper) in [
        ("a800-nvlink-400gbs", 15.0),
        ("a800-nvlink-200gbs", 15.0),
        ("rtx4090-pcie-nop2p", 35.0),
    ] {
        let link = LinkProfile::by_name(profile)?;
        let dev = Device::by_key(&link.device)?;
        let compute = Compute::Roofline(dev.clone());
        let mut lo = f64::MAX;
        let mut hi = f64::MIN;
        let mut detail = Vec::new();
        for t in [512usize, 1024, 2048, 4096, 8192] {
            let p = project(&Scenario {
                tokens: t,
                ctx: 0,
                iso: true,
                ..Scenario::new(&m70, 8, &link, &compute, Phase::Prefill)
            })?;
            let r = reduction_pct(&p);
            lo = lo.min(r);
            hi = hi.max(r);
            detail.push(format!("{t}: {r:.1}%"));
        }
        out.push(ValidationPoint {
            claim: "ISO prefill, LLaMA2-70B shape, TP 8".into(),
            source: iso_src.into(),
            paper_pct: paper,
            model_pct: 0.5 * (lo + hi),
            setting: format!("{profile}, roofline compute ({}), 512-8192 tokens", dev.key),
            note: format!(
                "range {lo:.1}%..{hi:.1}% (midpoint shown); per length {}",
                detail.join(", ")
            ),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Measurements on this machine (CPU thread communicator)

/// One timed all-reduce size on the thread communicator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommSample {
    /// Ranks (threads) in the group.
    pub world: usize,
    /// Message length (f32 elements).
    pub floats: usize,
    /// Message size (bytes, 4 per element).
    pub bytes: f64,
    /// Median over repetitions of the slowest rank's time per all-reduce (us).
    pub us: f64,
}

/// Time `reps` back-to-back all-reduces of each size on a [`crate::comm::ThreadComm`] group
/// of `world` threads (measured, this machine). Per repetition the slowest rank counts.
/// `InvalidArgument` when `reps` is 0 (no median to take).
pub fn measure_thread_all_reduce(
    world: usize,
    sizes: &[usize],
    reps: usize,
) -> Result<Vec<CommSample>> {
    use crate::comm::{Communicator, ThreadComm};
    if reps == 0 {
        return Err(Error::InvalidArgument(
            "measure_thread_all_reduce needs at least one repetition".into(),
        ));
    }
    let mut out = Vec::new();
    for &n in sizes {
        let comms = ThreadComm::group(world)?;
        let per_rank: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || -> Result<Vec<f64>> {
                        let mut data = vec![1.0f32; n];
                        c.all_reduce_sum(&mut data)?; // warm-up
                        let mut t = Vec::with_capacity(reps);
                        for _ in 0..reps {
                            c.barrier()?;
                            let t0 = std::time::Instant::now();
                            c.all_reduce_sum(&mut data)?;
                            t.push(t0.elapsed().as_secs_f64() * 1e6);
                        }
                        Ok(t)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Comm("rank thread panicked".into())))
                })
                .collect()
        });
        let per_rank: Vec<Vec<f64>> = per_rank.into_iter().collect::<Result<_>>()?;
        let mut worst: Vec<f64> = (0..reps)
            .map(|i| per_rank.iter().map(|v| v[i]).fold(0.0, f64::max))
            .collect();
        worst.sort_by(f64::total_cmp);
        out.push(CommSample {
            world,
            floats: n,
            bytes: 4.0 * n as f64,
            us: worst[worst.len() / 2],
        });
    }
    Ok(out)
}

/// Least-squares fit of `us = alpha + ring_bytes(n, bytes) / (busbw * 1e3)`: returns a
/// profile labelled "fitted to measurements". Errors with fewer than two distinct sizes or a
/// non-positive slope.
pub fn fit_profile(name: &str, samples: &[CommSample], source: &str) -> Result<LinkProfile> {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (ring_bytes(s.world, s.bytes), s.us))
        .collect();
    let n = pts.len() as f64;
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if pts.len() < 2 || sxx <= 0.0 {
        return Err(Error::InvalidArgument(
            "fit_profile needs at least two distinct message sizes".into(),
        ));
    }
    let slope = sxy / sxx; // us per byte
    if slope <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "fit_profile: time does not grow with size (slope {slope:e} us/byte)"
        )));
    }
    Ok(LinkProfile {
        name: name.into(),
        device: "cpu".into(),
        alpha_us: (my - slope * mx).max(0.0),
        busbw_gbs: 1.0 / slope / 1e3,
        one_shot: None,
        source: source.into(),
        label: "fitted to measurements".into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Report (the runner's `latency` subcommand)

/// Options of [`report`]; plain data so the runner maps its flags onto it.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyOptions {
    /// Model shapes (`--models`): names from [`ModelShape::known`].
    pub models: Vec<String>,
    /// TP degrees (`--tp`).
    pub tp: Vec<usize>,
    /// Link profiles (`--profiles`); empty = every profile in [`LinkProfile::known`].
    pub profiles: Vec<String>,
    /// SPD fractions (`--spd-fractions`), each in [0, 1].
    pub spd_fractions: Vec<f64>,
    /// Prompt lengths for prefill rows (`--prefill`); empty = no prefill rows.
    pub prefill_tokens: Vec<usize>,
    /// Decode batch sizes (`--batch`); empty = no decode rows.
    pub decode_batch: Vec<usize>,
    /// KV context per sequence for decode rows (`--ctx`).
    pub decode_ctx: usize,
    /// Also project prefill with ISO on (`--no-iso` clears it).
    pub iso: bool,
    /// A [`MeasuredCompute`] JSON (`--measured FILE`): used for the profiles whose device it
    /// matches (see [`device_key_of`]); other profiles stay on the roofline.
    pub measured: Option<PathBuf>,
    /// Where `projection.json` and the SVG plots go (`--out`).
    pub out_dir: PathBuf,
    /// Draw the plots (`--no-plot` clears it).
    pub plots: bool,
    /// What the all-reduces move (`--wire`; default bf16, as the papers' engines).
    pub wire: Wire,
}

impl Default for LatencyOptions {
    fn default() -> Self {
        LatencyOptions {
            models: vec!["llama2-70b".into()],
            tp: vec![8],
            profiles: Vec::new(),
            spd_fractions: vec![0.0, 0.5, 0.7, 1.0],
            prefill_tokens: vec![2048],
            decode_batch: vec![1],
            decode_ctx: 1024,
            iso: true,
            measured: None,
            out_dir: PathBuf::from("docs/latency"),
            plots: true,
            wire: Wire::Bf16,
        }
    }
}

/// The device key a measured table's free-text `device` maps to (`h100-sxm`, `a100`,
/// `a800`, `rtx4090`), if any.
pub fn device_key_of(device: &str) -> Option<&'static str> {
    let d = device.to_lowercase();
    [
        ("h100", "h100-sxm"),
        ("a100", "a100"),
        ("a800", "a800"),
        ("4090", "rtx4090"),
    ]
    .into_iter()
    .find(|(pat, _)| d.contains(pat))
    .map(|(_, k)| k)
}

/// What [`report`] writes to `projection.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyReport {
    /// What the labels `modelled` and `measured` stand for.
    pub note: String,
    /// The measured table used, as "device date (command)"; None: roofline only.
    pub measured_table: Option<String>,
    /// Every known roofline device ([`Device::known`]).
    pub devices: Vec<Device>,
    /// The link profiles projected.
    pub profiles: Vec<LinkProfile>,
    /// The projections, by profile, model, TP, setting (prefill, prefill with ISO, decode) and SPD
    /// fraction.
    pub rows: Vec<Projection>,
    /// The papers' points ([`validate`]).
    pub validation: Vec<ValidationPoint>,
}

/// Keys (model, tp, phase, tokens, batch, ctx) a measured table needs for `opts` to use
/// measured compute everywhere; `layer_us` is left 0 for the benchmark to fill in.
pub fn needed_entries(opts: &LatencyOptions) -> Result<Vec<MeasuredEntry>> {
    let mut out: Vec<MeasuredEntry> = Vec::new();
    let mut add = |model: &str, tp, phase, tokens, batch, ctx| {
        let e = MeasuredEntry {
            model: model.to_string(),
            tp,
            phase,
            tokens,
            batch,
            ctx,
            layer_us: 0.0,
            attn_us: None,
        };
        if !out.contains(&e) {
            out.push(e);
        }
    };
    for name in &opts.models {
        let m = ModelShape::by_name(name)?;
        for &tp in &opts.tp {
            for &t in &opts.prefill_tokens {
                add(name, tp, Phase::Prefill, t, 1, 0);
                if opts.iso {
                    if let Some(s) = iso_split(&m, tp, t) {
                        add(name, tp, Phase::Prefill, s, 1, 0);
                        add(name, tp, Phase::Prefill, t - s, 1, s);
                    }
                }
            }
            for &b in &opts.decode_batch {
                add(name, tp, Phase::Decode, 1, b, opts.decode_ctx);
            }
        }
    }
    Ok(out)
}

/// Project every combination of `opts`, print the table and the validation to stdout, write
/// `projection.json` (and, with `plots`, `spd_decode_70b_tp8.svg` and `iso_prefill_70b_tp8.svg`)
/// into `out_dir`.
pub fn report(opts: &LatencyOptions) -> Result<LatencyReport> {
    let measured = match &opts.measured {
        Some(p) => Some(MeasuredCompute::load(p)?),
        None => None,
    };
    let profiles: Vec<LinkProfile> = if opts.profiles.is_empty() {
        LinkProfile::known()
    } else {
        opts.profiles
            .iter()
            .map(|p| LinkProfile::by_name(p))
            .collect::<Result<_>>()?
    };
    let models: Vec<ModelShape> = opts
        .models
        .iter()
        .map(|m| ModelShape::by_name(m))
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    // the scenarios the measured table could not cover, each said once (never silently)
    let mut fell_back = std::collections::BTreeSet::new();
    for link in &profiles {
        let dev = Device::by_key(&link.device)?;
        let roof = Compute::Roofline(dev.clone());
        let meas = measured
            .as_ref()
            .filter(|t| device_key_of(&t.device) == Some(dev.key.as_str()))
            .map(|t| Compute::Measured {
                table: t.clone(),
                split: dev.clone(),
            });
        for m in &models {
            for &tp in &opts.tp {
                let mut settings = Vec::new();
                for &t in &opts.prefill_tokens {
                    settings.push((Phase::Prefill, t, 1, false));
                    if opts.iso {
                        settings.push((Phase::Prefill, t, 1, true));
                    }
                }
                for &b in &opts.decode_batch {
                    settings.push((Phase::Decode, 1, b, false));
                }
                for &(phase, tokens, batch, iso) in &settings {
                    for &f in &opts.spd_fractions {
                        let mk = |compute| Scenario {
                            tokens,
                            batch,
                            ctx: opts.decode_ctx,
                            spd_fraction: f,
                            iso,
                            wire: opts.wire,
                            ..Scenario::new(m, tp, link, compute, phase)
                        };
                        // measured where the table has the entries, else the roofline
                        let p = match &meas {
                            Some(c) => match project(&mk(c)) {
                                Ok(p) => p,
                                Err(e) => {
                                    if fell_back.insert(e.to_string()) {
                                        eprintln!(
                                            "latency: {} TP {tp} {phase:?}: the measured table \
                                             does not cover it ({e}); roofline (modelled) instead",
                                            m.name
                                        );
                                    }
                                    project(&mk(&roof))?
                                }
                            },
                            None => project(&mk(&roof))?,
                        };
                        rows.push(p);
                    }
                }
            }
        }
    }
    println!(
        "All-reduce messages: {} ({} bytes per element); the papers' points below use bf16.",
        opts.wire.name(),
        opts.wire.bytes()
    );
    print_table(&rows);
    let validation = validate()?;
    println!();
    println!("Validation against the papers (modelled; roofline compute):");
    println!("| claim | setting | paper | model | note |");
    println!("|---|---|---|---|---|");
    for v in &validation {
        println!(
            "| {} | {} | -{:.1}% | -{:.1}% | {} |",
            v.claim, v.setting, v.paper_pct, v.model_pct, v.note
        );
    }
    let rep = LatencyReport {
        note: "compute: 'modelled' = roofline (Device, cited constants), 'measured' = \
               MeasuredCompute table; communication: modelled from LinkProfile (cited). \
               No multi-GPU link was measured."
            .into(),
        measured_table: measured
            .as_ref()
            .map(|t| format!("{} {} ({})", t.device, t.date, t.command)),
        devices: Device::known(),
        profiles: profiles.clone(),
        rows,
        validation,
    };
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
    let json_path = opts.out_dir.join("projection.json");
    let json = crate::files::to_json_pretty_compact(&rep);
    crate::files::write_atomic(&json_path, json.as_bytes())?;
    println!();
    println!("wrote {}", json_path.display());
    if opts.plots {
        let spd_path = opts.out_dir.join("spd_decode_70b_tp8.svg");
        plot_spd(&profiles, &spd_path)?;
        let iso_path = opts.out_dir.join("iso_prefill_70b_tp8.svg");
        plot_iso(&profiles, &iso_path)?;
        println!("wrote {} and {}", spd_path.display(), iso_path.display());
    }
    Ok(rep)
}

/// The projection table in markdown.
pub fn print_table(rows: &[Projection]) {
    println!("| model | tp | profile | phase | tokens | batch | spd | iso | compute ms | comm ms | exposed comm ms | total ms | speedup | compute | comm |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let iso = match (r.iso, r.iso_split) {
            (false, _) => "off".to_string(),
            (true, Some(s)) => format!("{s}+{}", r.tokens - s),
            (true, None) if r.tp <= 1 => "off (TP 1)".to_string(),
            (true, None) => "off (short)".to_string(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3}x | {} | {} |",
            r.model,
            r.tp,
            r.profile,
            r.phase,
            r.tokens,
            r.batch,
            r.spd_fraction,
            iso,
            r.compute_ms,
            r.comm_ms,
            r.exposed_comm_ms,
            r.total_ms,
            r.speedup,
            r.compute_label,
            r.comm_label
        );
    }
}

type Series = (String, Vec<(f64, f64)>);

fn line_plot(
    path: &Path,
    title: &str,
    x: (&str, std::ops::Range<f64>, bool),
    y_desc: &str,
    series: &[Series],
    legend: plotters::chart::SeriesLabelPosition,
) -> Result<()> {
    use plotters::prelude::*;
    let ys = series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
    let pad = (hi - lo).max(1e-3) * 0.08;
    let err = |e: String| Error::InvalidArgument(format!("plot {}: {e}", path.display()));
    let canvas = SVGBackend::new(path, (820, 500)).into_drawing_area();
    let root = canvas
        .fill(&WHITE)
        .and_then(|_| canvas.titled(title, ("sans-serif", 16)))
        .map_err(|e| err(e.to_string()))?;
    // one colour per series (Tableau 10)
    let palette: Vec<RGBColor> = [
        0x1f77b4, 0xd62728, 0x2ca02c, 0x9467bd, 0x17becf, 0x000000, 0xff7f0e, 0x8c564b,
    ]
    .iter()
    .map(|&c: &u32| RGBColor((c >> 16) as u8, (c >> 8) as u8, c as u8))
    .collect();
    // a log axis is drawn as log2(x) on a linear axis, labelled with 2^v
    let log2 = x.2;
    let tx = |v: f64| if log2 { v.log2() } else { v };
    let xr = tx(x.1.start)..tx(x.1.end);
    let mut chart = ChartBuilder::on(&root)
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(xr, (lo - pad)..(hi + pad))
        .map_err(|e| err(e.to_string()))?;
    let fmt = |v: &f64| {
        if log2 {
            format!("{:.0}", 2f64.powf(*v))
        } else {
            format!("{v:.1}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(x.0)
        .y_desc(y_desc)
        .x_label_formatter(&fmt)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = palette[i % palette.len()];
        let pts: Vec<(f64, f64)> = pts.iter().map(|&(a, b)| (tx(a), b)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn roofline_scenario_total(
    link: &LinkProfile,
    phase: Phase,
    tokens: usize,
    f: f64,
    iso: bool,
) -> Result<Projection> {
    let m = ModelShape::llama2_70b();
    let compute = Compute::Roofline(Device::by_key(&link.device)?);
    project(&Scenario {
        tokens,
        spd_fraction: f,
        iso,
        ..Scenario::new(&m, 8, link, &compute, phase)
    })
}

/// One series per profile: `y(profile, x)` at each of `xs`.
fn per_profile(
    profiles: &[LinkProfile],
    xs: &[f64],
    y: impl Fn(&LinkProfile, f64) -> Result<f64>,
) -> Result<Vec<Series>> {
    profiles
        .iter()
        .map(|link| {
            let pts = xs
                .iter()
                .map(|&x| Ok((x, y(link, x)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok((link.name.clone(), pts))
        })
        .collect()
}

/// Projected decode speedup vs SPD fraction, LLaMA2-70B TP 8, batch 1, ctx 1024, per profile.
pub fn plot_spd(profiles: &[LinkProfile], path: &Path) -> Result<()> {
    let xs: Vec<f64> = (0..=10).map(|i| i as f64 / 10.0).collect();
    let series = per_profile(profiles, &xs, |link, f| {
        Ok(roofline_scenario_total(link, Phase::Decode, 1, f, false)?.speedup)
    })?;
    line_plot(
        path,
        "LLaMA2-70B TP 8 decode (batch 1, ctx 1024): projected speedup vs SPD fraction (modelled)",
        ("fraction of blocks with SPD", 0.0..1.0, false),
        "speedup over TP baseline",
        &series,
        plotters::chart::SeriesLabelPosition::UpperLeft,
    )
}

/// Projected ISO prefill reduction (%) vs prompt length, LLaMA2-70B TP 8, no SPD, per profile.
pub fn plot_iso(profiles: &[LinkProfile], path: &Path) -> Result<()> {
    let xs = [256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
    let series = per_profile(profiles, &xs, |link, t| {
        let p = roofline_scenario_total(link, Phase::Prefill, t as usize, 0.0, true)?;
        Ok(reduction_pct(&p))
    })?;
    line_plot(
        path,
        "LLaMA2-70B TP 8 prefill: projected ISO latency reduction (%) vs prompt length (modelled)",
        ("prompt tokens (log scale)", 256.0..16384.0, true),
        "prefill latency reduction with ISO (%; negative = slower)",
        &series,
        plotters::chart::SeriesLabelPosition::LowerRight,
    )
}
