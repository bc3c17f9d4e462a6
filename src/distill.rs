//! Block-to-block (B2B) distillation of an SPD block (DESIGN.md section 3).
//!
//! Teacher: the original TP block. Student: the same block run as an SPD block, initialised
//! from the teacher's weights. Both see the same block inputs X (from calibration text); the
//! loss is the mean squared error between their outputs. Trained: each rank's output
//! projection `W_o[r]`, its own copy of the FFN norm, and its MLP shard — every parameter
//! downstream of the dropped sync point. Q/K/V stay frozen: in an SPD block the attention
//! itself is exact, so its outputs are computed once and cached.
//!
//! Gradients are written by hand (RMSNorm, SwiGLU, matmuls) and checked against finite
//! differences in tests; the optimiser is Adam. The training loop runs on host threads or on
//! a GPU ([`DistillDevice`]): both are a [`Trainer`], and GPU tests hold the GPU one to the
//! host one.

#![warn(missing_docs)]

use crate::backend::cpu::{attend, gemm_strided, rmsnorm, rope_head, rope_tables};
use crate::backend::BlockWeights;
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::layout::RankShard;

/// Q, K and V of `n_q` query and `n_kv` KV heads for one sequence X (t, d) at positions 0..t:
/// RMSNorm(X) @ W_qkv^T (+ bias), with RoPE applied to the Q and K columns. Returns
/// (t, (n_q + 2 n_kv) * head_dim), each row laid out Q | K | V.
pub fn qkv_rope(
    cfg: &LlamaConfig,
    w: &BlockWeights,
    x: &[f32],
    n_q: usize,
    n_kv: usize,
) -> Vec<f32> {
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    let t = x.len() / d;
    let width = (n_q + 2 * n_kv) * hd;
    let mut normed = vec![0f32; t * d];
    rmsnorm(x, &w.attn_norm, cfg.rms_eps, &mut normed);
    let mut qkv = vec![0f32; t * width];
    gemm_strided(
        t,
        width,
        d,
        &mut qkv,
        false,
        (&normed, d, 1),
        (&w.wqkv, 1, d),
        1,
    );
    let (cos, sin) = rope_tables(cfg.rope_theta, hd, t);
    let half = hd / 2;
    for (p, row) in qkv.chunks_exact_mut(width).enumerate() {
        if let Some(b) = &w.bqkv {
            row.iter_mut().zip(b).for_each(|(r, b)| *r += b);
        }
        for h in row[..(n_q + n_kv) * hd].chunks_exact_mut(hd) {
            rope_head(
                h,
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
                cfg.rope_style,
            );
        }
    }
    qkv
}

/// Attention output of one rank for one sequence: (t, q) = softmax(QK^T)V of its heads, before
/// the output projection. X is (t, d) at positions 0..t.
pub fn attention_output(
    cfg: &LlamaConfig,
    shard: &RankShard,
    w: &BlockWeights,
    x: &[f32],
) -> Vec<f32> {
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    let t = x.len() / d;
    let (nq, nkv) = (shard.q_heads.len(), shard.kv_heads.len());
    let (qn, kvn) = (nq * hd, nkv * hd);
    let width = qn + 2 * kvn;
    let qkv = qkv_rope(cfg, w, x, nq, nkv);
    // gather K and V per local KV head: (nkv, t, hd)
    let mut k = vec![0f32; nkv * t * hd];
    let mut v = vec![0f32; nkv * t * hd];
    for p in 0..t {
        for kh in 0..nkv {
            let src = p * width + qn + kh * hd;
            k[(kh * t + p) * hd..(kh * t + p + 1) * hd].copy_from_slice(&qkv[src..src + hd]);
            v[(kh * t + p) * hd..(kh * t + p + 1) * hd]
                .copy_from_slice(&qkv[src + kvn..src + kvn + hd]);
        }
    }
    let mut out = vec![0f32; t * qn];
    let mut scores = Vec::new();
    for (i, &h) in shard.q_heads.iter().enumerate() {
        let kh = shard.local_kv(h, cfg.group_size());
        for p in 0..t {
            let q = &qkv[p * width + i * hd..p * width + (i + 1) * hd];
            let base = kh * t * hd;
            attend(
                q,
                &k[base..base + (p + 1) * hd],
                &v[base..base + (p + 1) * hd],
                p + 1,
                &mut scores,
                &mut out[p * qn + i * hd..p * qn + (i + 1) * hd],
            );
        }
    }
    out
}

/// The trainable part of one rank's SPD block.
#[derive(Debug, Clone, PartialEq)]
pub struct StudentParams {
    /// The rank's attention output projection, (d, q_r) row-major.
    pub wo: Vec<f32>,
    /// The FFN RMSNorm gain, (d).
    pub ffn_norm: Vec<f32>,
    /// The rank's gate and up projections stacked, (2 f_r, d).
    pub w_gate_up: Vec<f32>,
    /// The rank's down projection, (d, f_r).
    pub w_down: Vec<f32>,
}

impl StudentParams {
    /// The trainable tensors of a rank's block weights (copied).
    pub fn from_block(w: &BlockWeights) -> Self {
        StudentParams {
            wo: w.wo.clone(),
            ffn_norm: w.ffn_norm.clone(),
            w_gate_up: w.w_gate_up.clone(),
            w_down: w.w_down.clone(),
        }
    }
    /// Write these tensors into a rank's block weights (Q/K/V and the attention norm stay).
    pub fn apply(&self, w: &mut BlockWeights) {
        w.wo.clone_from(&self.wo);
        w.ffn_norm.clone_from(&self.ffn_norm);
        w.w_gate_up.clone_from(&self.w_gate_up);
        w.w_down.clone_from(&self.w_down);
    }
    fn zeros_like(&self) -> Self {
        StudentParams {
            wo: vec![0.0; self.wo.len()],
            ffn_norm: vec![0.0; self.ffn_norm.len()],
            w_gate_up: vec![0.0; self.w_gate_up.len()],
            w_down: vec![0.0; self.w_down.len()],
        }
    }
    fn tensors_mut(&mut self) -> [&mut Vec<f32>; 4] {
        [
            &mut self.wo,
            &mut self.ffn_norm,
            &mut self.w_gate_up,
            &mut self.w_down,
        ]
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU: `gu` is (t, 2f), each row its gate columns then its up columns; returns s (t, f)
/// with s = silu(gate) * up, silu(g) = g * sigmoid(g).
pub fn swiglu(gu: &[f32], t: usize, f: usize) -> Vec<f32> {
    let mut s = vec![0f32; t * f];
    for ti in 0..t {
        for j in 0..f {
            let g = gu[ti * 2 * f + j];
            s[ti * f + j] = g * sigmoid(g) * gu[ti * 2 * f + f + j];
        }
    }
    s
}

/// Host SwiGLU MLP shard: `out` (t, d) += down(silu(gate(n)) * up(n)) for normed input `n`
/// (t, d), `w_gate_up` (2f, d), `w_down` (d, f). Returns the gate|up activations (t, 2f) and
/// the SwiGLU output (t, f), which the backward pass needs.
pub fn mlp_into(
    n: &[f32],
    w_gate_up: &[f32],
    w_down: &[f32],
    d: usize,
    th: usize,
    out: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let t = n.len() / d;
    let f = w_down.len() / d;
    let mut gu = vec![0f32; t * 2 * f];
    gemm_strided(
        t,
        2 * f,
        d,
        &mut gu,
        false,
        (n, d, 1),
        (w_gate_up, 1, d),
        th,
    );
    let s = swiglu(&gu, t, f);
    gemm_strided(t, d, f, out, true, (&s, f, 1), (w_down, 1, f), th);
    (gu, s)
}

/// Saved activations of one rank's student forward, for the backward pass.
struct RankTape {
    u: Vec<f32>,    // (t, d) X + a_r
    rinv: Vec<f32>, // (t) 1 / rms(u)
    n: Vec<f32>,    // (t, d) normed
    gu: Vec<f32>,   // (t, 2f) gate | up
    s: Vec<f32>,    // (t, f) silu(gate) * up
}

/// Student rank r's contribution a_r + m_r (t, d), with its tape.
fn rank_forward(
    p: &StudentParams,
    att: &[f32],
    x: &[f32],
    d: usize,
    eps: f32,
    th: usize,
) -> (Vec<f32>, RankTape) {
    let t = x.len() / d;
    let q = p.wo.len() / d;
    let mut a = vec![0f32; t * d];
    gemm_strided(t, d, q, &mut a, false, (att, q, 1), (&p.wo, 1, q), th);
    let u: Vec<f32> = x.iter().zip(&a).map(|(x, a)| x + a).collect();
    let mut n = vec![0f32; t * d];
    rmsnorm(&u, &p.ffn_norm, eps, &mut n);
    let rinv: Vec<f32> = u
        .chunks_exact(d)
        .map(|r| 1.0 / (r.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt())
        .collect();
    // out = a + MLP(n)
    let (gu, s) = mlp_into(&n, &p.w_gate_up, &p.w_down, d, th, &mut a);
    (a, RankTape { u, rinv, n, gu, s })
}

/// Gradients of one rank's parameters given dOut (t, d).
#[allow(clippy::too_many_arguments)]
fn rank_backward(
    p: &StudentParams,
    tape: &RankTape,
    att: &[f32],
    dout: &[f32],
    d: usize,
    th: usize,
    g: &mut StudentParams,
) {
    let t = dout.len() / d;
    let q = p.wo.len() / d;
    let f = p.w_down.len() / d;
    // m = s @ Wd^T: dWd += dout^T s ; ds = dout @ Wd
    gemm_strided(
        d,
        f,
        t,
        &mut g.w_down,
        true,
        (dout, 1, d),
        (&tape.s, f, 1),
        th,
    );
    let mut ds = vec![0f32; t * f];
    gemm_strided(t, f, d, &mut ds, false, (dout, d, 1), (&p.w_down, f, 1), th);
    // s = silu(gate) * up
    let mut dgu = vec![0f32; t * 2 * f];
    for ti in 0..t {
        for j in 0..f {
            let gate = tape.gu[ti * 2 * f + j];
            let up = tape.gu[ti * 2 * f + f + j];
            let sg = sigmoid(gate);
            let dsv = ds[ti * f + j];
            dgu[ti * 2 * f + j] = dsv * up * sg * (1.0 + gate * (1.0 - sg));
            dgu[ti * 2 * f + f + j] = dsv * gate * sg;
        }
    }
    // gu = n @ Wgu^T: dWgu += dgu^T n ; dn = dgu @ Wgu
    gemm_strided(
        2 * f,
        d,
        t,
        &mut g.w_gate_up,
        true,
        (&dgu, 1, 2 * f),
        (&tape.n, d, 1),
        th,
    );
    let mut dn = vec![0f32; t * d];
    gemm_strided(
        t,
        d,
        2 * f,
        &mut dn,
        false,
        (&dgu, 2 * f, 1),
        (&p.w_gate_up, d, 1),
        th,
    );
    // n = u * rinv * w: dw += sum_t dn * u * rinv ; du = rinv * (dn*w - u * rinv^2 * mean(dn*w*u))
    let mut da = dout.to_vec(); // out = a + m: the direct path
    for ti in 0..t {
        let r = tape.rinv[ti];
        let (u, dnr) = (&tape.u[ti * d..(ti + 1) * d], &dn[ti * d..(ti + 1) * d]);
        let mut dot = 0f32;
        for j in 0..d {
            g.ffn_norm[j] += dnr[j] * u[j] * r;
            dot += dnr[j] * p.ffn_norm[j] * u[j];
        }
        let c = r * r * r * dot / d as f32;
        for j in 0..d {
            da[ti * d + j] += r * dnr[j] * p.ffn_norm[j] - u[j] * c;
        }
    }
    // a = att @ Wo^T: dWo += da^T att
    gemm_strided(d, q, t, &mut g.wo, true, (&da, 1, d), (att, q, 1), th);
}

/// One sequence of training data for a block: its input X (t, d), each rank's cached
/// attention output (t, q_r), and the teacher's output (t, d).
pub struct Sample {
    /// The block's input X, (t, d).
    pub x: Vec<f32>,
    /// Per rank: its attention output before o_proj, (t, q_r); fixed in training, since
    /// Q/K/V are not trained.
    pub att: Vec<Vec<f32>>,
    /// The original TP block's output on X, (t, d): what the SPD block learns to give.
    pub target: Vec<f32>,
    /// Per rank, the local MLP input's residual part when the block has linear compensation
    /// (X + the rank's estimate, [`crate::compensate`]); None: X itself. Fixed in training.
    pub x_local: Option<Vec<Vec<f32>>>,
}

impl Sample {
    /// What rank `r`'s local residual U_r starts from: X, or X + its LC estimate.
    pub fn local(&self, r: usize) -> &[f32] {
        match &self.x_local {
            Some(v) => &v[r],
            None => &self.x,
        }
    }
}

/// Output of the SPD student block: X + sum_r (a_r + m_r), summed in rank order.
pub fn student_output(
    params: &[StudentParams],
    s: &Sample,
    d: usize,
    eps: f32,
    th: usize,
) -> Vec<f32> {
    let mut out = s.x.clone();
    for (r, (p, att)) in params.iter().zip(&s.att).enumerate() {
        let (o, _) = rank_forward(p, att, s.local(r), d, eps, th);
        out.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }
    out
}

/// Output of the original TP block (the teacher) from the ranks' original weights.
pub fn teacher_output(
    weights: &[BlockWeights],
    att: &[Vec<f32>],
    x: &[f32],
    d: usize,
    eps: f32,
    th: usize,
) -> Vec<f32> {
    let t = x.len() / d;
    let mut y = x.to_vec();
    for (w, a) in weights.iter().zip(att) {
        let q = w.wo.len() / d;
        gemm_strided(t, d, q, &mut y, true, (a, q, 1), (&w.wo, 1, q), th);
    }
    let mut n = vec![0f32; t * d];
    rmsnorm(&y, &weights[0].ffn_norm, eps, &mut n);
    let mut out = y.clone();
    for w in weights {
        mlp_into(&n, &w.w_gate_up, &w.w_down, d, th, &mut out);
    }
    out
}

/// Mean squared error and its gradients with respect to every rank's parameters.
pub fn loss_and_grads(
    params: &[StudentParams],
    s: &Sample,
    d: usize,
    eps: f32,
    th: usize,
) -> (f64, Vec<StudentParams>) {
    let mut out = s.x.clone();
    let mut tapes = Vec::with_capacity(params.len());
    for (r, (p, att)) in params.iter().zip(&s.att).enumerate() {
        let (o, tape) = rank_forward(p, att, s.local(r), d, eps, th);
        out.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        tapes.push(tape);
    }
    let n = out.len() as f64;
    let mut loss = 0f64;
    let dout: Vec<f32> = out
        .iter()
        .zip(&s.target)
        .map(|(o, t)| {
            let e = (o - t) as f64;
            loss += e * e;
            (2.0 * e / n) as f32
        })
        .collect();
    let grads = params
        .iter()
        .zip(&tapes)
        .zip(&s.att)
        .map(|((p, tape), att)| {
            let mut g = p.zeros_like();
            rank_backward(p, tape, att, &dout, d, th, &mut g);
            g
        })
        .collect();
    (loss / n, grads)
}

/// Where distillation's training loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DistillDevice {
    /// Host threads (`DistillConfig::threads`); the reference.
    #[default]
    Cpu,
    /// GPU `n`: samples, parameters and Adam's moments live there; cuBLAS f32 GEMMs and the
    /// kernels of csrc/distill.cu. Needs the `cuda` feature and a GPU.
    Cuda(usize),
}

/// Block-to-block distillation settings: Adam on MSE between the SPD block's output and the
/// original TP block's.
#[derive(Debug, Clone)]
pub struct DistillConfig {
    /// The most epochs; with a held-out set training stops earlier once the held-out loss
    /// has not improved for [`DistillConfig::patience`] epochs.
    pub epochs: usize,
    /// Adam's learning rate.
    pub lr: f32,
    /// Host threads of the CPU trainer (and of capturing the samples).
    pub threads: usize,
    /// Where the training runs.
    pub device: DistillDevice,
    /// The last `holdout` samples are not trained on: after every epoch the held-out mean
    /// loss is measured, and the parameters of the epoch with the lowest one are returned
    /// (early stopping). 0: train on every sample and return the last epoch's parameters.
    pub holdout: usize,
    /// With a held-out set: stop after this many epochs without a new best held-out loss.
    pub patience: usize,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            epochs: 10,
            lr: 5e-5,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            device: DistillDevice::Cpu,
            holdout: 0,
            patience: 3,
        }
    }
}

/// Adam's (beta1, beta2, epsilon), on every device.
pub const ADAM: (f32, f32, f32) = (0.9, 0.999, 1e-8);

/// Adam's bias corrections (1 - beta1^step, 1 - beta2^step) for `step` counted from 1.
pub fn adam_corrections(step: usize) -> (f32, f32) {
    let (b1, b2, _) = ADAM;
    (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32))
}

/// The training loop's state on one device: the samples, every rank's parameters and
/// Adam's moments. [`distill`] drives it; [`CpuTrainer`] is the reference and
/// `backend::cuda::distill_trainer` the GPU one.
pub trait Trainer {
    /// The loss of sample `i` and its gradients at the current parameters.
    fn loss_and_grads(&mut self, i: usize) -> Result<(f64, Vec<StudentParams>)>;
    /// The mean loss over the samples `samples` (indices into the trainer's samples).
    fn mean_loss(&mut self, samples: std::ops::Range<usize>) -> Result<f64>;
    /// One Adam step on sample `i`; `step` counts from 1 (the bias corrections).
    fn adam_step(&mut self, i: usize, step: usize, lr: f32) -> Result<()>;
    /// The current parameters of every rank.
    fn params(&mut self) -> Result<Vec<StudentParams>>;
    /// Replace every rank's parameters (Adam's moments stay): to measure earlier ones again.
    fn set_params(&mut self, params: &[StudentParams]) -> Result<()>;
}

/// The reference trainer: host f32, `threads` threads per GEMM.
pub struct CpuTrainer<'a> {
    data: &'a [Sample],
    params: Vec<StudentParams>,
    m: Vec<StudentParams>,
    v: Vec<StudentParams>,
    d: usize,
    eps: f32,
    threads: usize,
}

impl<'a> CpuTrainer<'a> {
    /// A trainer starting from `init` (one per rank) on `data`, for hidden size `d`, with the
    /// RMSNorm epsilon `eps` of the model and `threads` threads per GEMM.
    pub fn new(
        init: Vec<StudentParams>,
        data: &'a [Sample],
        d: usize,
        eps: f32,
        threads: usize,
    ) -> Self {
        let m: Vec<StudentParams> = init.iter().map(StudentParams::zeros_like).collect();
        CpuTrainer {
            data,
            v: m.clone(),
            m,
            params: init,
            d,
            eps,
            threads,
        }
    }
}

impl Trainer for CpuTrainer<'_> {
    fn loss_and_grads(&mut self, i: usize) -> Result<(f64, Vec<StudentParams>)> {
        Ok(loss_and_grads(
            &self.params,
            &self.data[i],
            self.d,
            self.eps,
            self.threads,
        ))
    }

    fn mean_loss(&mut self, samples: std::ops::Range<usize>) -> Result<f64> {
        // the forward pass alone: the same sums as loss_and_grads', without the gradients
        let n = samples.len();
        let sum: f64 = self.data[samples]
            .iter()
            .map(|s| {
                let out = student_output(&self.params, s, self.d, self.eps, self.threads);
                let se: f64 = out
                    .iter()
                    .zip(&s.target)
                    .map(|(o, t)| ((o - t) as f64).powi(2))
                    .sum();
                se / out.len() as f64
            })
            .sum();
        Ok(sum / n.max(1) as f64)
    }

    fn adam_step(&mut self, i: usize, step: usize, lr: f32) -> Result<()> {
        let (_, grads) = self.loss_and_grads(i)?;
        let (b1, b2, e) = ADAM;
        let (c1, c2) = adam_corrections(step);
        for (((p, mut g), mr), vr) in self
            .params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            for (((pt, gt), mt), vt) in p
                .tensors_mut()
                .into_iter()
                .zip(g.tensors_mut())
                .zip(mr.tensors_mut())
                .zip(vr.tensors_mut())
            {
                for i in 0..pt.len() {
                    mt[i] = b1 * mt[i] + (1.0 - b1) * gt[i];
                    vt[i] = b2 * vt[i] + (1.0 - b2) * gt[i] * gt[i];
                    pt[i] -= lr * (mt[i] / c1) / ((vt[i] / c2).sqrt() + e);
                }
            }
        }
        Ok(())
    }

    fn params(&mut self) -> Result<Vec<StudentParams>> {
        Ok(self.params.clone())
    }

    fn set_params(&mut self, params: &[StudentParams]) -> Result<()> {
        self.params = params.to_vec();
        Ok(())
    }
}

/// How one block's distillation went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DistillReport {
    /// The mean loss over the training samples, before training.
    pub mse_before: f64,
    /// The mean training loss of the parameters returned: the trained ones, those of the
    /// best held-out epoch, or the original ones again (`kept_original`).
    pub mse_after: f64,
    /// The mean training loss the last epoch ended with.
    pub mse_trained: f64,
    /// Training did not help (the training loss, or with a held-out set the held-out loss,
    /// did not go down: too large a learning rate, say), so the original parameters were
    /// returned: distillation never leaves a block worse than it found it.
    pub kept_original: bool,
    /// Adam steps taken (one per training sample per epoch).
    pub steps: usize,
    /// Wall time of the training, seconds.
    pub secs: f64,
    /// Where it trained: `cpu (N threads)` or `cuda:N`.
    pub device: String,
    /// With [`DistillConfig::holdout`] samples: the held-out losses.
    pub heldout: Option<HeldoutCurve>,
}

/// The held-out loss over a distillation: what early stopping chose from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldoutCurve {
    /// Held-out samples (the last ones given).
    pub samples: usize,
    /// Before training (the original parameters).
    pub before: f64,
    /// After each epoch run (fewer than `epochs` when training stopped early).
    pub epochs: Vec<f64>,
    /// The epoch whose parameters were returned, from 1; 0 = the original parameters.
    pub best_epoch: usize,
}

impl HeldoutCurve {
    /// The held-out loss of the parameters returned.
    pub fn best(&self) -> f64 {
        match self.best_epoch {
            0 => self.before,
            e => self.epochs[e - 1],
        }
    }
}

impl DistillReport {
    /// "" or, for log lines, the held-out losses and, when the original parameters were
    /// kept, a note saying why.
    pub fn note(&self) -> String {
        let mut note = String::new();
        if let Some(h) = &self.heldout {
            note += &format!(
                " (held-out {:.3e} -> {:.3e} on {} samples, epoch {} of {} run)",
                h.before,
                h.best(),
                h.samples,
                h.best_epoch,
                h.epochs.len()
            );
        }
        if self.kept_original {
            let what = if self.heldout.is_some() {
                "held-out loss never went down"
            } else {
                "worse"
            };
            note += &format!(
                " (training ended at mse {:.3e}, {what}: kept the original weights; a smaller --lr?)",
                self.mse_trained
            );
        }
        note
    }
}

impl DistillConfig {
    /// Where it trains, in words: `cpu (N threads)` or `cuda:N`.
    pub fn device_name(&self) -> String {
        match self.device {
            DistillDevice::Cpu => format!("cpu ({} threads)", self.threads),
            DistillDevice::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// At least one epoch, a positive, finite learning rate and, with a held-out set, a
    /// patience of at least one epoch.
    pub fn validate(&self) -> Result<()> {
        if self.holdout > 0 && self.patience == 0 {
            return Err(Error::InvalidArgument(
                "early stopping needs a patience of at least one epoch".into(),
            ));
        }
        if self.epochs == 0 {
            return Err(Error::InvalidArgument(
                "distillation needs at least one epoch (--epochs)".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "distillation's learning rate must be a positive number (--lr {})",
                self.lr
            )));
        }
        Ok(())
    }
}

/// Adam for up to `epochs` epochs (one step per training sample). Without a held-out set
/// (`cfg.holdout == 0`), trains on every sample and returns the last epoch's parameters; with
/// one, trains on the others and returns the parameters of the epoch with the lowest held-out
/// loss, stopping after `cfg.patience` epochs without a new best. Either way, if training did
/// not help, the original parameters (see [`DistillReport::kept_original`]).
pub fn distill(
    init: Vec<StudentParams>,
    data: &[Sample],
    d: usize,
    eps: f32,
    cfg: &DistillConfig,
) -> Result<(Vec<StudentParams>, DistillReport)> {
    cfg.validate()?;
    if data.is_empty() {
        return Err(Error::InvalidArgument(
            "distillation needs at least one sample".into(),
        ));
    }
    if cfg.holdout >= data.len() {
        return Err(Error::InvalidArgument(format!(
            "distillation holds out {} of {} samples: none would be left to train on \
             (more calibration passages, or a smaller hold-out)",
            cfg.holdout,
            data.len()
        )));
    }
    let t0 = std::time::Instant::now();
    let mut trainer: Box<dyn Trainer + '_> = match cfg.device {
        DistillDevice::Cpu => Box::new(CpuTrainer::new(init.clone(), data, d, eps, cfg.threads)),
        DistillDevice::Cuda(gpu) => {
            crate::backend::cuda::distill_trainer(gpu, &init, data, d, eps)?
        }
    };
    let n_train = data.len() - cfg.holdout;
    let (train, held) = (0..n_train, n_train..data.len());
    let before = trainer.mean_loss(train.clone())?;
    let mut heldout = if cfg.holdout > 0 {
        Some(HeldoutCurve {
            samples: cfg.holdout,
            before: trainer.mean_loss(held.clone())?,
            epochs: Vec::new(),
            best_epoch: 0,
        })
    } else {
        None
    };
    // the parameters of the best held-out epoch so far (None: the original ones)
    let mut best: Option<Vec<StudentParams>> = None;
    let mut step = 0;
    for epoch in 1..=cfg.epochs {
        for i in train.clone() {
            step += 1;
            trainer.adam_step(i, step, cfg.lr)?;
        }
        if let Some(h) = &mut heldout {
            let loss = trainer.mean_loss(held.clone())?;
            h.epochs.push(loss);
            if loss < h.best() {
                h.best_epoch = epoch;
                best = Some(trainer.params()?);
            } else if epoch - h.best_epoch >= cfg.patience {
                break;
            }
        }
    }
    let trained = trainer.mean_loss(train.clone())?;
    let (params, after, kept_original) = match &heldout {
        // no held-out set: the last epoch, unless it is worse (or not a number)
        None if trained.is_nan() || trained > before => (init, before, true),
        None => (trainer.params()?, trained, false),
        // held-out: the best epoch; the original parameters when no epoch beat them
        Some(h) if h.best_epoch == 0 => (init, before, true),
        Some(h) if h.best_epoch == h.epochs.len() => (best.unwrap_or(init), trained, false),
        Some(_) => {
            let params = best.unwrap_or(init);
            trainer.set_params(&params)?;
            let after = trainer.mean_loss(train)?;
            (params, after, false)
        }
    };
    Ok((
        params,
        DistillReport {
            mse_before: before,
            mse_after: after,
            mse_trained: trained,
            kept_original,
            steps: step,
            secs: t0.elapsed().as_secs_f64(),
            device: cfg.device_name(),
            heldout,
        },
    ))
}

/// Distil block `layer` of `engine` on calibration sequences and load the result into the
/// engine. Block inputs come from the engine under its current plan (so earlier SPD blocks
/// are accounted for); the teacher is the original TP block on those inputs.
pub fn distill_layer(
    engine: &mut crate::engine::Engine,
    calib: &[Vec<u32>],
    layer: usize,
    cfg: &DistillConfig,
) -> Result<(Vec<BlockWeights>, DistillReport)> {
    let (w, rep) = recover_layer(engine, calib, layer, Some(cfg), None, cfg.threads)?;
    Ok((w, rep.b2b.expect("B2B was asked for")))
}

/// Linear compensation settings ([`crate::compensate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompConfig {
    /// Rank k of each rank's map.
    pub rank: usize,
    /// Ridge strength, relative to the mean diagonal of the normal matrix.
    pub ridge: f64,
    /// Fit on all but the last `holdout` calibration sequences and report how much of the
    /// missing partials the map leaves on those (with B2B, its hold-out is used instead).
    pub holdout: usize,
}

impl Default for CompConfig {
    fn default() -> Self {
        CompConfig {
            rank: crate::compensate::DEFAULT_RANK,
            ridge: crate::compensate::DEFAULT_RIDGE,
            holdout: 8,
        }
    }
}

impl CompConfig {
    /// Refuses settings that cannot fit a model of hidden size `d` on `passages`
    /// calibration sequences (checked before any block input is captured).
    pub fn validate(&self, d: usize, passages: usize) -> Result<()> {
        if self.rank == 0 || self.rank > d {
            return Err(Error::InvalidArgument(format!(
                "linear compensation of rank {}: the rank is 1 to the hidden size {d}",
                self.rank
            )));
        }
        if !(self.ridge.is_finite() && self.ridge >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "linear compensation ridge {}: a finite number >= 0",
                self.ridge
            )));
        }
        if self.holdout >= passages {
            return Err(Error::InvalidArgument(format!(
                "linear compensation holds out {} of {passages} calibration sequences: none \
                 would be left to fit on",
                self.holdout
            )));
        }
        Ok(())
    }
}

/// Host memory [`compensate_blocks`] may hold in captured block inputs at a time.
const CAPTURE_BYTES: usize = 512 << 20;

/// Linear compensation fitted for every block of a model ([`compensate_blocks`]): what the
/// planner searches with.
#[derive(Debug, Clone)]
pub struct BlockCompensation {
    /// The settings it was fitted with.
    pub config: CompConfig,
    /// Per block, one map per rank, for the engine's head assignment at fitting time.
    pub maps: Vec<Vec<crate::compensate::Compensation>>,
    /// Per block, how the fit went.
    pub reports: Vec<CompReport>,
}

/// Fit linear compensation for every block of `engine` on the TP model's block inputs (it
/// switches every block to a standard TP block first, and leaves them so) and load it.
/// The maps act in SPD blocks only, so the engine's outputs do not change until blocks are
/// switched to SPD; then each runs SPD + LC. Unlike [`recover_layer`] in plan order, no
/// block's inputs see an earlier block's SPD error: one fit serves every plan. `progress`:
/// a bar on stderr; `log` gets each block's report.
pub fn compensate_blocks(
    engine: &mut crate::engine::Engine,
    calib: &[Vec<u32>],
    cfg: &CompConfig,
    threads: usize,
    progress: bool,
    mut log: impl FnMut(usize, &CompReport),
) -> Result<BlockCompensation> {
    let n = engine.cfg.n_layers;
    let d = engine.cfg.hidden;
    cfg.validate(d, calib.len())?;
    if calib.iter().any(|s| s.is_empty()) {
        return Err(Error::InvalidArgument(
            "linear compensation: an empty calibration sequence".into(),
        ));
    }
    engine.set_spd(&vec![false; n])?;
    // the inputs of several blocks are captured in one pass per sequence (a pass per block
    // would rerun the blocks before it every time), as many as fit in CAPTURE_BYTES
    let tokens: usize = calib.iter().map(Vec::len).sum();
    let per_block = (tokens * d * std::mem::size_of::<f32>()).max(1);
    let group = (CAPTURE_BYTES / per_block).clamp(1, n);
    let bar = crate::progress::bar(n as u64, "compensation", progress);
    let mut maps = Vec::with_capacity(n);
    let mut reports = Vec::with_capacity(n);
    let all: Vec<usize> = (0..n).collect();
    for layers in all.chunks(group) {
        bar.set_message(format!("capturing the inputs of blocks {layers:?}"));
        let mut inputs: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(calib.len()); layers.len()];
        for seq in calib {
            for (i, x) in engine.block_inputs(seq, layers)?.into_iter().enumerate() {
                inputs[i].push(x);
            }
        }
        // maps act in SPD blocks only (none here): loading them leaves later inputs alone
        for (&l, xs) in layers.iter().zip(inputs) {
            let (w, rep) = recover_captured(engine, xs, l, None, Some(cfg), threads)?;
            let rep = rep.comp.expect("compensation was asked for");
            bar.suspend(|| log(l, &rep));
            bar.inc(1);
            bar.set_message(format!("block {l}: {:.0}% left", 100.0 * rep.residual));
            maps.push(
                w.into_iter()
                    .map(|w| w.comp.expect("fitted on every rank"))
                    .collect(),
            );
            reports.push(rep);
        }
    }
    bar.finish_and_clear();
    Ok(BlockCompensation {
        config: *cfg,
        maps,
        reports,
    })
}

/// Load block `layer`'s original weights for the engine's head assignment with the maps
/// `comps` (one per rank) into `engine`; returns the weights loaded.
pub fn load_compensated(
    engine: &mut crate::engine::Engine,
    layer: usize,
    comps: &[crate::compensate::Compensation],
) -> Result<Vec<BlockWeights>> {
    let w = compensated_weights(engine, layer, comps)?;
    engine.load_layer(layer, w.clone())?;
    Ok(w)
}

/// Block `layer`'s original weights for the engine's head assignment with the maps `comps`
/// (one per rank), without loading them.
pub fn compensated_weights(
    engine: &crate::engine::Engine,
    layer: usize,
    comps: &[crate::compensate::Compensation],
) -> Result<Vec<BlockWeights>> {
    let cfg = engine.cfg.clone();
    let shards = engine.block_shards(layer);
    if shards.len() != comps.len() {
        return Err(Error::InvalidArgument(format!(
            "block {layer}: {} compensation maps for TP {}",
            comps.len(),
            shards.len()
        )));
    }
    shards
        .iter()
        .zip(comps)
        .map(|(s, c)| {
            let mut w = crate::model::load_block(&engine.files, &cfg, s, layer)?;
            w.comp = Some(c.clone());
            Ok(w)
        })
        .collect()
}

/// How linear compensation of one block went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompReport {
    /// Rank of the maps.
    pub rank: usize,
    /// Calibration tokens fitted on.
    pub tokens: usize,
    /// Share of the missing partials' energy the maps leave (1 = zero-shot, 0 = exact), on
    /// the held-out sequences (on the fitted ones when none are held out).
    pub residual: f64,
    /// Whether `residual` was measured on held-out sequences.
    pub heldout: bool,
    /// Seconds to fit the maps and measure the residual (capturing the block inputs, shared
    /// with B2B, not included).
    pub secs: f64,
}

/// How one block's recovery went: its linear compensation and its B2B, each if asked for.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoverReport {
    /// Linear compensation.
    pub comp: Option<CompReport>,
    /// Block-to-block distillation (after the compensation, which it trains with).
    pub b2b: Option<DistillReport>,
}

/// Recover SPD block `layer` of `engine` on calibration sequences: fit its linear
/// compensation (`comp`), then distil it (`b2b`) with the compensation in place, and load the
/// result into the engine. Block inputs come from the engine under its current plan; the
/// teacher is the original TP block on those inputs. `threads`: host threads for capturing
/// and fitting.
pub fn recover_layer(
    engine: &mut crate::engine::Engine,
    calib: &[Vec<u32>],
    layer: usize,
    b2b: Option<&DistillConfig>,
    comp: Option<&CompConfig>,
    threads: usize,
) -> Result<(Vec<BlockWeights>, RecoverReport)> {
    if b2b.is_none() && comp.is_none() {
        return Err(Error::InvalidArgument(
            "recovering a block needs B2B, linear compensation or both".into(),
        ));
    }
    if let Some(cc) = comp {
        // before capturing: a bad rank would otherwise stop the run after it
        let holdout = b2b.map_or(cc.holdout, |b| b.holdout);
        CompConfig { holdout, ..*cc }.validate(engine.cfg.hidden, calib.len())?;
    }
    let inputs = calib
        .iter()
        .map(|seq| engine.block_input(seq, layer))
        .collect::<Result<Vec<_>>>()?;
    recover_captured(engine, inputs, layer, b2b, comp, threads)
}

/// [`recover_layer`] on block inputs already captured (one per calibration sequence).
fn recover_captured(
    engine: &mut crate::engine::Engine,
    inputs: Vec<Vec<f32>>,
    layer: usize,
    b2b: Option<&DistillConfig>,
    comp: Option<&CompConfig>,
    threads: usize,
) -> Result<(Vec<BlockWeights>, RecoverReport)> {
    let mcfg = engine.cfg.clone();
    let (d, eps) = (mcfg.hidden, mcfg.rms_eps);
    let shards = engine.block_shards(layer);
    let mut weights: Vec<BlockWeights> = shards
        .iter()
        .map(|s| crate::model::load_block(&engine.files, &mcfg, s, layer))
        .collect::<Result<_>>()?;
    let mut data = Vec::with_capacity(inputs.len());
    for x in inputs {
        let att: Vec<Vec<f32>> = shards
            .iter()
            .zip(&weights)
            .map(|(s, w)| attention_output(&mcfg, s, w, &x))
            .collect();
        // the TP block's output is B2B's target; linear compensation alone needs none
        let target = match b2b {
            Some(_) => teacher_output(&weights, &att, &x, d, eps, threads),
            None => Vec::new(),
        };
        data.push(Sample {
            x,
            att,
            target,
            x_local: None,
        });
    }
    let mut report = RecoverReport {
        comp: None,
        b2b: None,
    };
    if let Some(cc) = comp {
        let t0 = std::time::Instant::now();
        // validated above: at least one sequence is left to fit on
        let holdout = b2b.map_or(cc.holdout, |b| b.holdout);
        // each rank's attention partial a_r = att_r W_o[r]^T, (t, d)
        let partials = |s: &Sample| -> Vec<Vec<f32>> {
            s.att
                .iter()
                .zip(&weights)
                .map(|(a, w)| {
                    let t = s.x.len() / d;
                    let q = w.wo.len() / d;
                    let mut p = vec![0f32; t * d];
                    gemm_strided(t, d, q, &mut p, false, (a, q, 1), (&w.wo, 1, q), threads);
                    p
                })
                .collect()
        };
        let n_fit = data.len() - holdout;
        let mut ne = crate::compensate::NormalEquations::new(d, shards.len(), eps);
        for s in &data[..n_fit] {
            ne.add(&s.x, &partials(s), threads)?;
        }
        let comps = ne.solve(cc.rank, cc.ridge)?;
        let check = if holdout > 0 {
            &data[n_fit..]
        } else {
            &data[..]
        };
        let seqs: Vec<(Vec<f32>, Vec<Vec<f32>>)> =
            check.iter().map(|s| (s.x.clone(), partials(s))).collect();
        let residual = crate::compensate::residual_fraction(&comps, &seqs, d, eps, threads);
        for s in &mut data {
            s.x_local = Some(
                comps
                    .iter()
                    .map(|c| {
                        let mut u = s.x.clone();
                        c.apply(&s.x, d, eps, &mut u, threads);
                        u
                    })
                    .collect(),
            );
        }
        for (w, c) in weights.iter_mut().zip(comps) {
            w.comp = Some(c);
        }
        report.comp = Some(CompReport {
            rank: cc.rank,
            tokens: ne.tokens(),
            residual,
            heldout: holdout > 0,
            secs: t0.elapsed().as_secs_f64(),
        });
    }
    if let Some(cfg) = b2b {
        let init = weights.iter().map(StudentParams::from_block).collect();
        let (trained, rep) = distill(init, &data, d, eps, cfg)?;
        for (w, p) in weights.iter_mut().zip(&trained) {
            p.apply(w);
        }
        report.b2b = Some(rep);
    }
    engine.load_layer(layer, weights.clone())?;
    Ok((weights, report))
}

/// Save distilled blocks: tensors `blk.{l}.rank{r}.{wo,ffn_norm,w_gate_up,w_down}` (f32),
/// and for a block with linear compensation `blk.{l}.rank{r}.comp_in` (k, d) and
/// `comp_out` (d, k).
pub fn save_distilled(path: &std::path::Path, blocks: &[(usize, Vec<BlockWeights>)]) -> Result<()> {
    save_recovered(path, blocks, &[])
}

/// [`save_distilled`], except that the blocks in `original` keep the model's weights: only
/// their linear compensation is written (a few MB instead of the block), and
/// [`load_distilled`] takes their weights from the model.
pub fn save_recovered(
    path: &std::path::Path,
    blocks: &[(usize, Vec<BlockWeights>)],
    original: &[usize],
) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let bytes = |data: &[f32]| data.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (l, ranks) in blocks {
        let keep = original.contains(l);
        if keep && ranks.iter().any(|w| w.comp.is_none()) {
            return Err(Error::InvalidArgument(format!(
                "block {l}: saved with the model's weights, so it needs linear compensation \
                 on every rank (otherwise there is nothing to save)"
            )));
        }
        for (r, w) in ranks.iter().enumerate() {
            let weights = [
                ("wo", &w.wo),
                ("ffn_norm", &w.ffn_norm),
                ("w_gate_up", &w.w_gate_up),
                ("w_down", &w.w_down),
            ];
            for (name, data) in weights.into_iter().filter(|_| !keep) {
                tensors.push((
                    format!("blk.{l}.rank{r}.{name}"),
                    vec![data.len()],
                    bytes(data),
                ));
            }
            if let Some(c) = &w.comp {
                let d = c.w_in.len() / c.rank;
                tensors.push((
                    format!("blk.{l}.rank{r}.comp_in"),
                    vec![c.rank, d],
                    bytes(&c.w_in),
                ));
                tensors.push((
                    format!("blk.{l}.rank{r}.comp_out"),
                    vec![d, c.rank],
                    bytes(&c.w_out),
                ));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Safetensors {
                    path: path.to_path_buf(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    // like the plan beside them: temporary file, fsync, rename (an interrupted or power-cut
    // write leaves the previous weights, never a short file), mode 0666 less the umask
    crate::files::write_atomic(path, &bytes)
}

/// The blocks a distilled weights file holds linear compensation for (any rank), read from
/// its safetensors header alone.
pub fn compensated_in(path: &std::path::Path) -> Result<Vec<usize>> {
    use std::io::Read;
    let bad = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > size.saturating_sub(8) {
        return Err(bad(format!("header of {len} bytes in a file of {size}")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let names: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let mut layers: Vec<usize> = names
        .keys()
        .filter(|k| k.ends_with(".comp_in") || k.ends_with(".comp_out"))
        .filter_map(|k| k.strip_prefix("blk.")?.split('.').next()?.parse().ok())
        .collect();
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}

/// Load distilled blocks saved by [`save_distilled`] into `engine` (for the layers listed),
/// with their linear compensation where the file has one. Returns the layers that got one.
pub fn load_distilled(
    path: &std::path::Path,
    engine: &mut crate::engine::Engine,
    layers: &[usize],
) -> Result<Vec<usize>> {
    let mut compensated = Vec::new();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let mcfg = engine.cfg.clone();
    for &l in layers {
        let mut ranks = Vec::new();
        for (r, shard) in engine.block_shards(l).iter().enumerate() {
            let mut w = crate::model::load_block(&engine.files, &mcfg, shard, l)?;
            w.comp = load_comp(&st, path, l, r, mcfg.hidden)?;
            // a compensated block saved without weights keeps the model's
            let original = w.comp.is_some() && st.tensor(&format!("blk.{l}.rank{r}.wo")).is_err();
            for (name, dst) in [
                ("wo", &mut w.wo),
                ("ffn_norm", &mut w.ffn_norm),
                ("w_gate_up", &mut w.w_gate_up),
                ("w_down", &mut w.w_down),
            ]
            .into_iter()
            .filter(|_| !original)
            {
                let key = format!("blk.{l}.rank{r}.{name}");
                let t = st
                    .tensor(&key)
                    .map_err(|_| Error::MissingTensor(format!("{key} in {}", path.display())))?;
                // save_distilled writes f32 vectors: another dtype of the same byte count
                // (f16 of twice the elements) would be read as garbage
                if t.dtype() != safetensors::Dtype::F32 {
                    return Err(Error::Safetensors {
                        path: path.to_path_buf(),
                        msg: format!("{key} is {:?}; distilled weights are F32", t.dtype()),
                    });
                }
                if t.shape() != [dst.len()] {
                    return Err(Error::ShapeMismatch {
                        tensor: key,
                        expected: vec![dst.len()],
                        found: t.shape().to_vec(),
                    });
                }
                let vals: Vec<f32> = t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                *dst = vals;
            }
            ranks.push(w);
        }
        let with = ranks.iter().filter(|w| w.comp.is_some()).count();
        if with != 0 && with != ranks.len() {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                msg: format!(
                    "block {l}: {with} of {} ranks have linear compensation (all or none)",
                    ranks.len()
                ),
            });
        }
        if with != 0 {
            compensated.push(l);
        }
        engine.load_layer(l, ranks)?;
    }
    Ok(compensated)
}

/// The linear compensation of block `l`, rank `r` in a distilled file, if it has one.
fn load_comp(
    st: &safetensors::SafeTensors,
    path: &std::path::Path,
    l: usize,
    r: usize,
    d: usize,
) -> Result<Option<crate::compensate::Compensation>> {
    let (ki, ko) = (
        format!("blk.{l}.rank{r}.comp_in"),
        format!("blk.{l}.rank{r}.comp_out"),
    );
    let (tin, tout) = match (st.tensor(&ki), st.tensor(&ko)) {
        (Err(_), Err(_)) => return Ok(None),
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                msg: format!("{ki} and {ko} come together; the file has only one of them"),
            })
        }
    };
    let bad = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let k = match tin.shape() {
        [k, dd] if *k > 0 && *dd == d => *k,
        s => {
            return Err(bad(format!(
                "{ki} has shape {s:?}; a rank-k map is [k, {d}] with k >= 1"
            )))
        }
    };
    if tout.shape() != [d, k] {
        return Err(bad(format!(
            "{ko} has shape {:?}; with {ki} of rank {k} it must be [{d}, {k}]",
            tout.shape()
        )));
    }
    for (key, t) in [(&ki, &tin), (&ko, &tout)] {
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                msg: format!("{key} is {:?}; distilled weights are F32", t.dtype()),
            });
        }
    }
    let vals = |t: &safetensors::tensor::TensorView| -> Vec<f32> {
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let c = crate::compensate::Compensation {
        rank: k,
        w_in: vals(&tin),
        w_out: vals(&tout),
    };
    c.check(d)?;
    Ok(Some(c))
}
