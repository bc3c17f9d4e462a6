//! One rank's LLaMA: loading its weight shard, and the block schedule written once against
//! the [`Backend`] seam.
//!
//! Standard TP block (two sync points) and SPD block (one), DESIGN.md section 2:
//!
//! ```text
//! a_r = Attn_r(RMSNorm1(X)) @ W_o[r]            a_r = Attn_r(RMSNorm1(X)) @ W_o[r]
//! Y   = X + AllReduce(a_r)                      U_r = X + a_r            (local)
//! m_r = MLP_r(RMSNorm2(Y))                      m_r = MLP_r(RMSNorm2(U_r))
//! Out = Y + AllReduce(m_r)                      Out = X + AllReduce(a_r + m_r)
//! ```

#![warn(missing_docs)]

use crate::backend::{Backend, BlockWeights, HeadWeights, RankDims, ReduceMode};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::layout::{RankShard, TpLayout};
use crate::weights::ModelFiles;
use std::ops::Range;

/// Static shapes of `rank` under `layout`.
pub fn rank_dims(
    cfg: &LlamaConfig,
    shard: &RankShard,
    vocab: &Range<usize>,
    capacity: usize,
) -> RankDims {
    RankDims {
        hidden: cfg.hidden,
        head_dim: cfg.head_dim,
        n_q: shard.q_heads.len(),
        vocab: vocab.len(),
        n_layers: cfg.n_layers,
        capacity,
        rope_theta: cfg.rope_theta,
        rope_style: cfg.rope_style,
        rms_eps: cfg.rms_eps,
    }
}

/// Check every tensor of the model against the shapes the config implies, before any rank
/// loads: metadata that disagrees with the tensor table is a typed error, not a panic later.
pub fn validate_shapes(files: &ModelFiles, cfg: &LlamaConfig) -> Result<()> {
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    files.expect_shape("token_embd.weight", cfg.vocab, d)?;
    files.expect_shape("output_norm.weight", 1, d)?;
    if !cfg.tied_embeddings {
        files.expect_shape("output.weight", cfg.vocab, d)?;
    }
    for l in 0..cfg.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        files.expect_shape(&n("attn_norm.weight"), 1, d)?;
        files.expect_shape(&n("ffn_norm.weight"), 1, d)?;
        files.expect_shape(&n("attn_q.weight"), cfg.n_heads * hd, d)?;
        files.expect_shape(&n("attn_k.weight"), cfg.n_kv_heads * hd, d)?;
        files.expect_shape(&n("attn_v.weight"), cfg.n_kv_heads * hd, d)?;
        files.expect_shape(&n("attn_output.weight"), d, cfg.n_heads * hd)?;
        files.expect_shape(&n("ffn_gate.weight"), cfg.ffn, d)?;
        files.expect_shape(&n("ffn_up.weight"), cfg.ffn, d)?;
        files.expect_shape(&n("ffn_down.weight"), d, cfg.ffn)?;
        if cfg.qkv_bias {
            files.expect_shape(&n("attn_q.bias"), 1, cfg.n_heads * hd)?;
            files.expect_shape(&n("attn_k.bias"), 1, cfg.n_kv_heads * hd)?;
            files.expect_shape(&n("attn_v.bias"), 1, cfg.n_kv_heads * hd)?;
        }
    }
    Ok(())
}

fn head_rows(heads: &[usize], hd: usize) -> Vec<usize> {
    heads.iter().flat_map(|h| h * hd..(h + 1) * hd).collect()
}

fn gather_cols(files: &ModelFiles, name: &str, cols: &[usize]) -> Result<Vec<f32>> {
    files.gather_cols(name, cols)
}

/// Host weights of `shard`'s part of block `l`.
pub fn load_block(
    files: &ModelFiles,
    cfg: &LlamaConfig,
    shard: &RankShard,
    l: usize,
) -> Result<BlockWeights> {
    let hd = cfg.head_dim;
    let n = |s: &str| format!("blk.{l}.{s}");
    let qr = head_rows(&shard.q_heads, hd);
    let kvr = head_rows(&shard.kv_heads, hd);
    let mut wqkv = files.gather(&n("attn_q.weight"), &qr, None)?;
    wqkv.extend(files.gather(&n("attn_k.weight"), &kvr, None)?);
    wqkv.extend(files.gather(&n("attn_v.weight"), &kvr, None)?);
    let bqkv = if cfg.qkv_bias {
        let mut b = gather_cols(files, &n("attn_q.bias"), &qr)?;
        b.extend(gather_cols(files, &n("attn_k.bias"), &kvr)?);
        b.extend(gather_cols(files, &n("attn_v.bias"), &kvr)?);
        Some(b)
    } else {
        None
    };
    let ffn_rows: Vec<usize> = shard.ffn.clone().collect();
    let mut w_gate_up = files.gather(&n("ffn_gate.weight"), &ffn_rows, None)?;
    w_gate_up.extend(files.gather(&n("ffn_up.weight"), &ffn_rows, None)?);
    Ok(BlockWeights {
        attn_norm: files.gather(&n("attn_norm.weight"), &[0], None)?,
        wqkv,
        bqkv,
        wo: gather_cols(files, &n("attn_output.weight"), &qr)?,
        ffn_norm: files.gather(&n("ffn_norm.weight"), &[0], None)?,
        w_gate_up,
        q_to_kv: shard
            .q_heads
            .iter()
            .map(|h| shard.local_kv(*h, cfg.group_size()))
            .collect(),
        w_down: files.gather(
            &n("ffn_down.weight"),
            &(0..cfg.hidden).collect::<Vec<_>>(),
            Some(shard.ffn.clone()),
        )?,
        comp: None,
    })
}

/// Final norm and the LM-head rows `vocab` (the tied embedding when there is no output.weight).
pub fn load_head(
    files: &ModelFiles,
    cfg: &LlamaConfig,
    vocab: &Range<usize>,
) -> Result<HeadWeights> {
    let name = if cfg.tied_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    let rows: Vec<usize> = vocab.clone().collect();
    Ok(HeadWeights {
        norm: files.gather("output_norm.weight", &[0], None)?,
        w: files.gather(name, &rows, None)?,
    })
}

/// One rank: its shard of every block, its backend, and the SPD plan it runs.
pub struct RankModel<B: Backend> {
    /// The model's config.
    pub cfg: LlamaConfig,
    /// This rank's index, 0..world.
    pub rank: usize,
    /// Number of ranks (the TP degree).
    pub world: usize,
    /// This rank's shard of the layout it was loaded with; head grouping re-assigns a block's
    /// heads without changing it (the query-head count, which sizes the buffers, stays).
    pub shard: RankShard,
    /// The slice of the vocabulary whose logits this rank computes.
    pub vocab: Range<usize>,
    /// The rank's backend: its weights, KV cache and communicator.
    pub backend: B,
    /// spd[l]: block l runs as an SPD block (its attention sync point is dropped).
    spd: Vec<bool>,
    /// Buffers of the captured decode step (CUDA graphs), kept across steps.
    decode: Option<StepBufs<B::Buf>>,
}

impl<B: Backend> RankModel<B> {
    /// Load `rank`'s shard of every block into `backend`.
    pub fn load(
        files: &ModelFiles,
        cfg: &LlamaConfig,
        layout: &TpLayout,
        rank: usize,
        vocab: Range<usize>,
        mut backend: B,
    ) -> Result<Self> {
        let shard = layout.ranks[rank].clone();
        for l in 0..cfg.n_layers {
            backend.load_layer(l, load_block(files, cfg, &shard, l)?)?;
        }
        backend.load_head(load_head(files, cfg, &vocab)?)?;
        Ok(RankModel {
            cfg: cfg.clone(),
            rank,
            world: layout.tp(),
            shard,
            vocab,
            backend,
            spd: vec![false; cfg.n_layers],
            decode: None,
        })
    }

    /// Set which blocks run as SPD blocks (`spd[l]` for block l); a change drops the captured
    /// decode graph. `InvalidArgument` unless there is one entry per layer. At TP 1 an SPD
    /// block runs as the standard block.
    pub fn set_spd(&mut self, spd: &[bool]) -> Result<()> {
        if spd.len() != self.cfg.n_layers {
            return Err(Error::InvalidArgument(format!(
                "SPD plan has {} layers, the model has {}",
                spd.len(),
                self.cfg.n_layers
            )));
        }
        if self.spd != spd {
            self.backend.graph_reset();
        }
        self.spd = spd.to_vec();
        Ok(())
    }

    /// The SPD flag of every block (see [`RankModel::set_spd`]).
    pub fn spd(&self) -> &[bool] {
        &self.spd
    }

    /// Run `embeddings` (t, d) of tokens at positions pos0.. through every block, filling the
    /// KV cache, and return this rank's logits slice for `rows`: (rows.len(), vocab_local).
    pub fn forward(
        &mut self,
        embeddings: &[f32],
        pos0: usize,
        rows: Range<usize>,
    ) -> Result<Vec<f32>> {
        let d = self.cfg.hidden;
        let t = embeddings.len() / d;
        if t == 0 || rows.end > t || rows.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "forward of {t} tokens, logits rows {rows:?}"
            )));
        }
        self.check_capacity(pos0, t)?;
        if t == 1 && self.backend.graphs() {
            return self.decode_graphed(embeddings, pos0);
        }
        let qn = self.shard.q_heads.len() * self.cfg.head_dim;
        let mut b = StepBufs::alloc(&mut self.backend, t, d, qn, rows.len() * self.vocab.len())?;
        let be = &mut self.backend;
        be.upload(embeddings, &mut b.x)?;
        blocks(
            be,
            &self.spd,
            self.world,
            &mut b,
            t,
            pos0,
            0..self.cfg.n_layers,
        )?;
        be.lm_head(&b.x, rows.clone(), &mut b.logits)?;
        let mut host = vec![0f32; rows.len() * self.vocab.len()];
        be.download(&b.logits, &mut host)?;
        Ok(host)
    }

    /// The residual streams entering each of `layers` (strictly increasing), in one pass
    /// through blocks 0..the last of them under the current plan: the block inputs that
    /// distillation and compensation fit on.
    pub fn block_inputs(&mut self, embeddings: &[f32], layers: &[usize]) -> Result<Vec<Vec<f32>>> {
        check_block_layers(layers, self.cfg.n_layers)?;
        let d = self.cfg.hidden;
        let t = embeddings.len() / d;
        if t == 0 {
            return Err(Error::InvalidArgument("block inputs of 0 tokens".into()));
        }
        self.check_capacity(0, t)?;
        let qn = self.shard.q_heads.len() * self.cfg.head_dim;
        let mut b = StepBufs::alloc(&mut self.backend, t, d, qn, 1)?; // no logits
        let be = &mut self.backend;
        be.upload(embeddings, &mut b.x)?;
        let mut out = Vec::with_capacity(layers.len());
        let mut done = 0;
        for &l in layers {
            blocks(be, &self.spd, self.world, &mut b, t, 0, done..l)?;
            done = l;
            let mut host = vec![0f32; t * d];
            be.download(&b.x, &mut host)?;
            out.push(host);
        }
        Ok(out)
    }

    /// `ContextOverflow` unless positions pos0..pos0+t fit the KV cache, checked before any
    /// op runs (and without overflow: a wrapped `pos0 + t` passed the backends' checks).
    fn check_capacity(&self, pos0: usize, t: usize) -> Result<()> {
        Error::check_context(pos0, t, self.backend.dims().capacity)
    }

    /// One decode step through a CUDA graph: captured on the first call (on buffers kept
    /// for every later step), replayed after writing the position on the device.
    fn decode_graphed(&mut self, embeddings: &[f32], pos0: usize) -> Result<Vec<f32>> {
        let d = self.cfg.hidden;
        let qn = self.shard.q_heads.len() * self.cfg.head_dim;
        let nv = self.vocab.len();
        let mut b = match self.decode.take() {
            Some(b) => b,
            None => StepBufs::alloc(&mut self.backend, 1, d, qn, nv)?,
        };
        let r = (|| {
            let be = &mut self.backend;
            be.upload(embeddings, &mut b.x)?;
            be.graph_set_pos(pos0)?;
            if !be.graph_launch()? {
                be.graph_begin()?;
                let captured = blocks(
                    be,
                    &self.spd,
                    self.world,
                    &mut b,
                    1,
                    pos0,
                    0..self.cfg.n_layers,
                )
                .and_then(|_| be.lm_head(&b.x, 0..1, &mut b.logits));
                // end the capture whatever happened, so the stream is usable again
                let ended = be.graph_end();
                captured?;
                ended?;
                if !be.graph_launch()? {
                    return Err(Error::Cuda(
                        "the decode graph just captured could not be launched".into(),
                    ));
                }
            }
            let mut host = vec![0f32; nv];
            be.download(&b.logits, &mut host)?;
            Ok(host)
        })();
        self.decode = Some(b);
        if r.is_err() {
            self.backend.graph_reset();
        }
        r
    }
}

/// Activation buffers of one forward call.
struct StepBufs<T> {
    x: T,
    q: T,
    att: T,
    a: T,
    normed: T,
    m: T,
    u: T,
    logits: T,
}

impl<T> StepBufs<T> {
    fn alloc<B: Backend<Buf = T>>(
        be: &mut B,
        t: usize,
        d: usize,
        qn: usize,
        logits: usize,
    ) -> Result<Self> {
        Ok(StepBufs {
            x: be.alloc(t * d)?,
            q: be.alloc(t * qn)?,
            att: be.alloc(t * qn)?,
            a: be.alloc(t * d)?,
            normed: be.alloc(t * d)?,
            m: be.alloc(t * d)?,
            u: be.alloc(t * d)?,
            logits: be.alloc(logits)?,
        })
    }
}

/// Refuses a list of blocks that is empty, not strictly increasing, or past the last of `n`
/// (what [`RankModel::block_inputs`] and `Engine::block_inputs` take).
pub(crate) fn check_block_layers(layers: &[usize], n: usize) -> Result<()> {
    if layers.is_empty()
        || layers.iter().any(|l| *l >= n)
        || layers.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(Error::InvalidArgument(format!(
            "block inputs at blocks {layers:?}: blocks of 0..{n} in increasing order"
        )));
    }
    Ok(())
}

/// Blocks `layers` over `b.x` (t, d) at positions pos0..: the TP block, or the SPD block
/// where `spd[l]`. Written once for every backend.
fn blocks<B: Backend>(
    be: &mut B,
    spd: &[bool],
    world: usize,
    b: &mut StepBufs<B::Buf>,
    t: usize,
    pos0: usize,
    layers: Range<usize>,
) -> Result<()> {
    let d = be.dims().hidden;
    for l in layers {
        let spd_l = spd[l];
        // one rank has no sync point to drop: its SPD block is the standard block (the same
        // sum, and no all-reduce of one rank to count)
        let spd_l = spd_l && world > 1;
        be.attn_in(l, &b.x, t, pos0, &mut b.q)?;
        be.attention(l, &b.q, t, pos0, &mut b.att)?;
        if spd_l {
            be.o_proj_reduce(l, &b.att, t, ReduceMode::IntoMlpReduce, &mut b.a)?;
            be.copy(&b.x, &mut b.u, t * d)?;
            be.spd_compensate(l, &b.x, t, &mut b.u)?; // + the LC estimate, if the block has one
            be.add_ffn_norm(l, &mut b.u, &b.a, t, &mut b.normed)?; // U_r = X + a_r (local)
            be.mlp(l, &b.normed, t, &mut b.m)?;
            be.add(&mut b.m, &b.a, t * d)?; // a_r + m_r ride together
            be.all_reduce_add(&mut b.m, &mut b.x, t * d)?; // X += AllReduce(a_r + m_r)
        } else {
            if world > 1 {
                // X += AllReduce(a_r); normed = RMSNorm(X)
                be.attn_out_reduce_norm(l, &b.att, t, &mut b.a, &mut b.x, &mut b.normed)?;
            } else {
                be.o_proj_reduce(l, &b.att, t, ReduceMode::None, &mut b.a)?;
                be.add_ffn_norm(l, &mut b.x, &b.a, t, &mut b.normed)?;
            }
            be.mlp(l, &b.normed, t, &mut b.m)?;
            if world > 1 {
                be.all_reduce_add(&mut b.m, &mut b.x, t * d)?;
            } else {
                be.add(&mut b.x, &b.m, t * d)?;
            }
        }
    }
    Ok(())
}

impl<B: Backend> RankModel<B> {
    /// Intra-Sequence Overlap prefill (DESIGN.md section 4): tokens 0..split are chunk 0, the
    /// rest chunk 1. Per layer, on the compute lane: Attn(c0), Attn(c1), MLP(c0), MLP(c1);
    /// each all-reduce goes to the communication lane and is waited for only when its result
    /// is needed, so one chunk's all-reduce runs while the other chunk computes. Chunk 1's
    /// attention reads chunk 0's K/V (prefill with a prefix). SPD blocks have one all-reduce
    /// per chunk. Results equal `forward` bit for bit on the CPU backend.
    pub fn forward_iso(
        &mut self,
        embeddings: &[f32],
        split: usize,
        rows: Range<usize>,
    ) -> Result<Vec<f32>> {
        let d = self.cfg.hidden;
        let t = embeddings.len() / d;
        if split == 0 || split >= t {
            return self.forward(embeddings, 0, rows);
        }
        if rows.end > t || rows.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "ISO forward of {t} tokens, logits rows {rows:?}"
            )));
        }
        self.check_capacity(0, t)?;
        let qn = self.shard.q_heads.len() * self.cfg.head_dim;
        let (world, spd) = (self.world, self.spd.clone());
        let be = &mut self.backend;
        let lens = [split, t - split];
        let pos = [0, split];
        let mut x = Vec::new();
        let (mut q, mut att, mut normed, mut u) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut a_store: [Option<B::Buf>; 2] = [None, None];
        let mut m_store: [Option<B::Buf>; 2] = [None, None];
        for c in 0..2 {
            let n = lens[c] * d;
            let mut xc = be.alloc(n)?;
            be.upload(&embeddings[pos[c] * d..pos[c] * d + n], &mut xc)?;
            x.push(xc);
            q.push(be.alloc(lens[c] * qn)?);
            att.push(be.alloc(lens[c] * qn)?);
            normed.push(be.alloc(n)?);
            u.push(be.alloc(n)?);
            a_store[c] = Some(be.alloc(n)?);
            m_store[c] = Some(be.alloc(n)?);
        }
        let mut mlp_pending: [Option<B::Pending>; 2] = [None, None];
        for (l, &spd_l) in spd.iter().enumerate() {
            // one rank has no sync point to drop
            let spd_l = spd_l && world > 1;
            // attention of both chunks; chunk c first takes in its previous MLP all-reduce
            let mut attn_pending: [Option<B::Pending>; 2] = [None, None];
            for c in 0..2 {
                let n = lens[c] * d;
                if let Some(p) = mlp_pending[c].take() {
                    let m = be.all_reduce_wait(p)?;
                    be.add(&mut x[c], &m, n)?;
                    m_store[c] = Some(m);
                }
                be.attn_in(l, &x[c], lens[c], pos[c], &mut q[c])?;
                be.attention(l, &q[c], lens[c], pos[c], &mut att[c])?;
                let mut a = a_store[c].take().expect("chunk buffer");
                be.o_proj(l, &att[c], lens[c], &mut a)?;
                if !spd_l && world > 1 {
                    attn_pending[c] = Some(be.all_reduce_start(a, n)?);
                } else {
                    a_store[c] = Some(a);
                }
            }
            // MLP of both chunks
            for c in 0..2 {
                let n = lens[c] * d;
                let a = match attn_pending[c].take() {
                    Some(p) => be.all_reduce_wait(p)?,
                    None => a_store[c].take().expect("chunk buffer"),
                };
                let mut m = m_store[c].take().expect("chunk buffer");
                if spd_l {
                    be.copy(&x[c], &mut u[c], n)?;
                    be.spd_compensate(l, &x[c], lens[c], &mut u[c])?;
                    be.add_ffn_norm(l, &mut u[c], &a, lens[c], &mut normed[c])?;
                    be.mlp(l, &normed[c], lens[c], &mut m)?;
                    be.add(&mut m, &a, n)?;
                    mlp_pending[c] = Some(be.all_reduce_start(m, n)?);
                } else {
                    be.add_ffn_norm(l, &mut x[c], &a, lens[c], &mut normed[c])?;
                    be.mlp(l, &normed[c], lens[c], &mut m)?;
                    if world > 1 {
                        mlp_pending[c] = Some(be.all_reduce_start(m, n)?);
                    } else {
                        be.add(&mut x[c], &m, n)?;
                        m_store[c] = Some(m);
                    }
                }
                a_store[c] = Some(a);
            }
        }
        for c in 0..2 {
            if let Some(p) = mlp_pending[c].take() {
                let m = be.all_reduce_wait(p)?;
                be.add(&mut x[c], &m, lens[c] * d)?;
            }
        }
        // logits of the requested rows, chunk by chunk
        let nv = self.vocab.len();
        let mut host = Vec::with_capacity(rows.len() * nv);
        for c in 0..2 {
            let lo = rows.start.max(pos[c]);
            let hi = rows.end.min(pos[c] + lens[c]);
            if lo < hi {
                let mut logits = be.alloc((hi - lo) * nv)?;
                be.lm_head(&x[c], lo - pos[c]..hi - pos[c], &mut logits)?;
                let mut part = vec![0f32; (hi - lo) * nv];
                be.download(&logits, &mut part)?;
                host.extend(part);
            }
        }
        Ok(host)
    }
}

/// Token embeddings read straight from the model file (no resident copy of the table).
pub fn embed(files: &ModelFiles, cfg: &LlamaConfig, tokens: &[u32]) -> Result<Vec<f32>> {
    let d = cfg.hidden;
    let mut out = vec![0f32; tokens.len() * d];
    for (i, &tok) in tokens.iter().enumerate() {
        if tok as usize >= cfg.vocab {
            return Err(Error::InvalidArgument(format!(
                "token id {tok} is outside the vocabulary of {}",
                cfg.vocab
            )));
        }
        files.read_row(
            "token_embd.weight",
            tok as usize,
            &mut out[i * d..(i + 1) * d],
        )?;
    }
    Ok(out)
}
