//! CPU reference backend: f32 weights (dequantised at load), f32 compute, a rank-private
//! rayon pool. Prefill GEMMs go through the `gemm` crate; decode (t <= 2) uses a row-parallel
//! GEMV, which is memory-bound and needs nothing fancier.
//!
//! Determinism: every reduction inside an op has a fixed order that does not depend on the
//! thread count, so a rank's results are reproducible bit for bit.

use super::{Backend, BlockWeights, HeadWeights, RankDims};
use crate::comm::{CommStats, Communicator};
use crate::config::RopeStyle;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::sync::Arc;

struct Layer {
    w: BlockWeights,
    n_kv: usize,
    ffn: usize,
    k: Vec<f32>, // (n_kv, capacity, head_dim)
    v: Vec<f32>, // (n_kv, capacity, head_dim)
}

/// One rank on the CPU: its f32 weight shard and KV cache per loaded block, its communicator,
/// RoPE tables up to the context capacity, an optional rank-private thread pool, and a
/// communication thread as the ISO lane (started by the first `all_reduce_start`).
pub struct CpuBackend {
    dims: RankDims,
    comm: Arc<dyn Communicator>,
    /// Rank-private pool; None with one thread (ops then run inline on the rank thread,
    /// saving a hand-off per op).
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    /// Use [`matmul_rowwise`] for every product: results independent of how a sequence is
    /// chunked (ISO bit-exactness), at a prefill speed cost.
    row_invariant: bool,
    layers: Vec<Option<Layer>>,
    head: Option<HeadWeights>,
    rope_cos: Vec<f32>, // (capacity, head_dim / 2)
    rope_sin: Vec<f32>,
    scratch: Vec<f32>,
    /// Communication lane for ISO: a thread that runs all-reduces in submission order.
    lane: Option<CommLane>,
}

type LaneJob = (Vec<f32>, usize, std::sync::mpsc::Sender<Result<Vec<f32>>>);

/// A rank's communication thread (the CPU analogue of a CUDA communication stream).
struct CommLane {
    tx: Option<std::sync::mpsc::Sender<LaneJob>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl CommLane {
    fn new(comm: Arc<dyn Communicator>) -> Result<CommLane> {
        let (tx, rx) = std::sync::mpsc::channel::<LaneJob>();
        let rank = comm.rank();
        let handle = std::thread::Builder::new()
            .name(format!("syncdrop-r{rank}-comm"))
            .spawn(move || {
                while let Ok((mut buf, n, reply)) = rx.recv() {
                    let r = comm.all_reduce_sum(&mut buf[..n]).map(|_| buf);
                    if let Err(e) = &r {
                        comm.abort(&e.to_string());
                    }
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| Error::Rank {
                rank,
                msg: format!("comm lane: {e}"),
            })?;
        Ok(CommLane {
            tx: Some(tx),
            handle: Some(handle),
        })
    }
}

impl Drop for CommLane {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl CpuBackend {
    /// A rank of shape `dims` with no weights loaded yet (`load_layer` and `load_head` follow).
    /// `threads` (at least 1) sizes the rank-private rayon pool; with 1 the ops run inline on the
    /// calling thread. `row_invariant` sends every product through [`matmul_rowwise`]: results
    /// independent of how a sequence is chunked (ISO bit-exactness), at a prefill speed cost.
    /// Errors if the pool cannot be built.
    pub fn new(
        dims: RankDims,
        comm: Arc<dyn Communicator>,
        threads: usize,
        row_invariant: bool,
    ) -> Result<CpuBackend> {
        let threads = threads.max(1);
        let rank = comm.rank();
        // the RoPE tables and every KV-cache head hold capacity x head_dim values; a capacity
        // whose tables overflow usize wrapped to short tables (and index panics)
        if f32_elems(&[dims.capacity, dims.head_dim]).is_none() {
            return Err(Error::InvalidArgument(format!(
                "a KV cache of {} tokens x head dim {} is too large to address",
                dims.capacity, dims.head_dim
            )));
        }
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(move |i| format!("syncdrop-r{rank}-{i}"))
                    .build()
                    .map_err(|e| Error::Rank {
                        rank,
                        msg: format!("thread pool: {e}"),
                    })?,
            )
        } else {
            None
        };
        let (rope_cos, rope_sin) = rope_tables(dims.rope_theta, dims.head_dim, dims.capacity);
        let n_layers = dims.n_layers;
        Ok(CpuBackend {
            dims,
            comm,
            pool,
            threads,
            row_invariant,
            layers: (0..n_layers).map(|_| None).collect(),
            head: None,
            rope_cos,
            rope_sin,
            scratch: Vec::new(),
            lane: None,
        })
    }

    /// The matrix product this backend uses (see `row_invariant`).
    fn mm(&self) -> MatmulFn {
        if self.row_invariant {
            matmul_rowwise
        } else {
            matmul
        }
    }

    /// Run `f` on this rank's pool (or inline with one thread).
    fn par<R: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
        match pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    fn layer(&self, l: usize) -> Result<&Layer> {
        self.layers
            .get(l)
            .and_then(|x| x.as_ref())
            .ok_or_else(|| Error::InvalidArgument(format!("layer {l} was not loaded")))
    }

    /// `ContextOverflow` unless positions pos0..pos0+t fit the cache (without overflow: a
    /// wrapped sum passed the check and indexed the RoPE tables out of bounds).
    fn check_capacity(&self, pos0: usize, t: usize) -> Result<()> {
        Error::check_context(pos0, t, self.dims.capacity)
    }
}

/// The product of `dims` when that many f32 values fit one allocation (isize::MAX bytes).
fn f32_elems(dims: &[usize]) -> Option<usize> {
    let n = dims.iter().try_fold(1usize, |a, b| a.checked_mul(*b))?;
    (n.checked_mul(std::mem::size_of::<f32>())? <= isize::MAX as usize).then_some(n)
}

// ---- kernels (free functions so tests and benches can call them) ----------------------------

/// Dot product with 16 independent accumulators (vectorises), summed in a fixed order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Signature shared by [`matmul`] and [`matmul_rowwise`].
pub type MatmulFn = fn(&[f32], usize, &[f32], usize, usize, &mut [f32], usize);

/// `out` (t, n) = `x` (t, k) @ `w` (n, k)^T with one fixed-order dot product per output, so
/// every row's result is independent of `t` (bit-identical to the GEMV of that row alone).
/// Runs on the current rayon pool.
pub fn matmul_rowwise(
    x: &[f32],
    t: usize,
    w: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
    threads: usize,
) {
    const ROWS: usize = 32;
    for ti in 0..t {
        let xr = &x[ti * k..(ti + 1) * k];
        let o = &mut out[ti * n..(ti + 1) * n];
        if threads > 1 {
            o.par_chunks_mut(ROWS).enumerate().for_each(|(c, oc)| {
                for (j, v) in oc.iter_mut().enumerate() {
                    let r = c * ROWS + j;
                    *v = dot(xr, &w[r * k..(r + 1) * k]);
                }
            });
        } else {
            for (r, v) in o.iter_mut().enumerate() {
                *v = dot(xr, &w[r * k..(r + 1) * k]);
            }
        }
    }
}

/// `out` (t, n) = `x` (t, k) @ `w` (n, k)^T. Decode (t <= 2) is a row-parallel GEMV; prefill
/// goes through the `gemm` crate, whose summation order depends on t (use
/// [`matmul_rowwise`] where bit-exactness across chunkings matters). Runs on the current
/// rayon pool.
pub fn matmul(x: &[f32], t: usize, w: &[f32], n: usize, k: usize, out: &mut [f32], threads: usize) {
    debug_assert!(x.len() >= t * k && w.len() == n * k && out.len() >= t * n);
    if t == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..t * n].fill(0.0);
        return;
    }
    if t <= 2 {
        return matmul_rowwise(x, t, w, n, k, out, threads);
    }
    // W (n, k) row-major read as W^T (k, n): row stride 1, column stride k
    gemm_strided(t, n, k, out, false, (x, k, 1), (w, 1, k), threads);
}

/// `out` (m, n) = a (m, k) @ b (k, n), or `out` += that when `accumulate`; each operand given
/// with its (row stride, column stride), so transposes cost nothing.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    threads: usize,
) {
    assert!(out.len() >= m * n, "gemm_strided: output too small");
    let span = |(s, rs, cs): (&[f32], usize, usize), r: usize, c: usize| {
        r == 0 || c == 0 || s.len() > (r - 1) * rs + (c - 1) * cs
    };
    assert!(
        span(a, m, k) && span(b, k, n),
        "gemm_strided: operand too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above check that every (row, col) the strides address lies inside
    // its slice; dst is (m, n) row-major and only read when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// cos and sin tables (positions, head_dim / 2) for RoPE with base `theta`.
pub fn rope_tables(theta: f32, head_dim: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = vec![0f32; positions * half];
    let mut sin = vec![0f32; positions * half];
    for p in 0..positions {
        for i in 0..half {
            let freq = (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
            let a = p as f64 * freq;
            cos[p * half + i] = a.cos() as f32;
            sin[p * half + i] = a.sin() as f32;
        }
    }
    (cos, sin)
}

/// `out` = x / sqrt(mean(x^2) + eps) * w, row by row.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot(xr, xr) / d as f32;
        let s = 1.0 / (ss + eps).sqrt();
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * s * wv;
        }
    }
}

/// Rotate one head vector in place at the angles of one position.
#[inline]
pub fn rope_head(v: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = v.len() / 2;
    match style {
        RopeStyle::Interleaved => {
            for i in 0..half {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                v[2 * i] = a * cos[i] - b * sin[i];
                v[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        RopeStyle::Half => {
            for i in 0..half {
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * cos[i] - b * sin[i];
                v[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// One query head over `len` cached positions: softmax(q K^T / sqrt(hd)) V into `out`.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], len: usize, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = q.len();
    let scale = 1.0 / (hd as f32).sqrt();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for s in 0..len {
        let sc = dot(q, &k[s * hd..(s + 1) * hd]) * scale;
        max = max.max(sc);
        scores.push(sc);
    }
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for (s, p) in scores.iter().enumerate() {
        let p = p * inv;
        for (o, vv) in out.iter_mut().zip(&v[s * hd..(s + 1) * hd]) {
            *o += p * vv;
        }
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Pending = std::sync::mpsc::Receiver<Result<Vec<f32>>>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn dims(&self) -> &RankDims {
        &self.dims
    }

    fn alloc(&mut self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; n])
    }
    fn upload(&mut self, host: &[f32], buf: &mut Vec<f32>) -> Result<()> {
        buf[..host.len()].copy_from_slice(host);
        Ok(())
    }
    fn download(&mut self, buf: &Vec<f32>, host: &mut [f32]) -> Result<()> {
        host.copy_from_slice(&buf[..host.len()]);
        Ok(())
    }

    fn load_layer(&mut self, layer: usize, w: BlockWeights) -> Result<()> {
        let (n_kv, ffn) = w.check(layer, &self.dims)?;
        let d = &self.dims;
        let hd = d.head_dim;
        let cache = f32_elems(&[n_kv, d.capacity, hd]).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {layer}: a KV cache of {n_kv} heads x {} tokens is too large to address",
                d.capacity
            ))
        })?;
        let (k, v) = match self.layers[layer].take() {
            Some(old) if old.k.len() == cache => (old.k, old.v),
            _ => (vec![0f32; cache], vec![0f32; cache]),
        };
        self.layers[layer] = Some(Layer { w, n_kv, ffn, k, v });
        Ok(())
    }

    fn load_head(&mut self, w: HeadWeights) -> Result<()> {
        if w.norm.len() != self.dims.hidden || w.w.len() != self.dims.vocab * self.dims.hidden {
            return Err(Error::InvalidArgument(
                "LM head weights do not match the rank's shapes".into(),
            ));
        }
        self.head = Some(w);
        Ok(())
    }

    fn attn_in(
        &mut self,
        layer: usize,
        x: &Vec<f32>,
        t: usize,
        pos0: usize,
        q_out: &mut Vec<f32>,
    ) -> Result<()> {
        self.check_capacity(pos0, t)?;
        let d = self.dims.clone();
        let hd = d.head_dim;
        let n_kv = self.layer(layer)?.n_kv;
        let (qn, kvn) = (d.n_q * hd, n_kv * hd);
        let width = qn + 2 * kvn;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(t * d.hidden + t * width, 0.0);
        let (normed, qkv) = scratch.split_at_mut(t * d.hidden);
        let threads = self.threads;
        let mm = self.mm();
        let lay = self.layers[layer]
            .as_mut()
            .ok_or_else(|| Error::InvalidArgument(format!("layer {layer} was not loaded")))?;
        rmsnorm(&x[..t * d.hidden], &lay.w.attn_norm, d.rms_eps, normed);
        Self::par(&self.pool, || {
            mm(normed, t, &lay.w.wqkv, width, d.hidden, qkv, threads)
        });
        let half = hd / 2;
        for ti in 0..t {
            let row = &mut qkv[ti * width..(ti + 1) * width];
            if let Some(b) = &lay.w.bqkv {
                row.iter_mut().zip(b).for_each(|(r, b)| *r += b);
            }
            let p = pos0 + ti;
            let (cos, sin) = (
                &self.rope_cos[p * half..(p + 1) * half],
                &self.rope_sin[p * half..(p + 1) * half],
            );
            for h in row[..qn + kvn].chunks_exact_mut(hd) {
                rope_head(h, cos, sin, d.rope_style);
            }
            q_out[ti * qn..(ti + 1) * qn].copy_from_slice(&row[..qn]);
            for kh in 0..n_kv {
                let dst = (kh * d.capacity + p) * hd;
                lay.k[dst..dst + hd].copy_from_slice(&row[qn + kh * hd..qn + (kh + 1) * hd]);
                lay.v[dst..dst + hd]
                    .copy_from_slice(&row[qn + kvn + kh * hd..qn + kvn + (kh + 1) * hd]);
            }
        }
        self.scratch = scratch;
        Ok(())
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &Vec<f32>,
        t: usize,
        pos0: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        self.check_capacity(pos0, t)?;
        let d = &self.dims;
        let (hd, cap) = (d.head_dim, d.capacity);
        let qn = d.n_q * hd;
        let lay = self.layer(layer)?;
        let work = |h: usize, ti: usize, o: &mut [f32], scores: &mut Vec<f32>| {
            let kv = lay.w.q_to_kv[h];
            let base = kv * cap * hd;
            let qv = &q[ti * qn + h * hd..ti * qn + (h + 1) * hd];
            let len = pos0 + ti + 1;
            attend(
                qv,
                &lay.k[base..base + len * hd],
                &lay.v[base..base + len * hd],
                len,
                scores,
                o,
            );
        };
        let out = &mut out[..t * qn];
        if self.threads > 1 && t * d.n_q > 1 {
            Self::par(&self.pool, || {
                out.par_chunks_mut(hd)
                    .enumerate()
                    .for_each_init(Vec::new, |scores, (i, o)| {
                        work(i % d.n_q, i / d.n_q, o, scores)
                    });
            });
        } else {
            let mut scores = Vec::new();
            for (i, o) in out.chunks_mut(hd).enumerate() {
                work(i % d.n_q, i / d.n_q, o, &mut scores);
            }
        }
        Ok(())
    }

    fn o_proj(
        &mut self,
        layer: usize,
        attn: &Vec<f32>,
        t: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let d = &self.dims;
        let qn = d.n_q * d.head_dim;
        let lay = self.layer(layer)?;
        let th = self.threads;
        let mm = self.mm();
        Self::par(&self.pool, || mm(attn, t, &lay.w.wo, d.hidden, qn, out, th));
        Ok(())
    }

    fn spd_compensate(
        &mut self,
        layer: usize,
        x: &Vec<f32>,
        t: usize,
        u: &mut Vec<f32>,
    ) -> Result<()> {
        let (d, eps, th) = (self.dims.hidden, self.dims.rms_eps, self.threads);
        let n = t * d;
        // the backend's own products (row-invariant when asked: ISO stays bit-exact)
        let mm = self.mm();
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Some(c) = &self.layer(layer)?.w.comp {
            Self::par(&self.pool, || {
                c.apply_with(mm, &x[..n], d, eps, &mut u[..n], th, &mut scratch)
            });
        }
        self.scratch = scratch;
        Ok(())
    }

    fn add_ffn_norm(
        &mut self,
        layer: usize,
        resid: &mut Vec<f32>,
        delta: &Vec<f32>,
        t: usize,
        normed: &mut Vec<f32>,
    ) -> Result<()> {
        let n = t * self.dims.hidden;
        resid[..n]
            .iter_mut()
            .zip(&delta[..n])
            .for_each(|(r, d)| *r += d);
        let lay = self.layer(layer)?;
        rmsnorm(
            &resid[..n],
            &lay.w.ffn_norm,
            self.dims.rms_eps,
            &mut normed[..n],
        );
        Ok(())
    }

    fn mlp(&mut self, layer: usize, normed: &Vec<f32>, t: usize, out: &mut Vec<f32>) -> Result<()> {
        let f = self.layer(layer)?.ffn;
        let d = &self.dims;
        if f == 0 {
            // More ranks than FFN columns: this rank's MLP shard is empty.
            out[..t * d.hidden].fill(0.0);
            return Ok(());
        }
        let mut gu = std::mem::take(&mut self.scratch);
        gu.resize(t * 2 * f, 0.0);
        let lay = self.layer(layer)?;
        let th = self.threads;
        let mm = self.mm();
        Self::par(&self.pool, || {
            mm(normed, t, &lay.w.w_gate_up, 2 * f, d.hidden, &mut gu, th);
            // h = silu(gate) * up, written over the gate half of each row
            for row in gu.chunks_exact_mut(2 * f) {
                let (g, u) = row.split_at_mut(f);
                g.iter_mut()
                    .zip(u.iter())
                    .for_each(|(g, u)| *g = silu(*g) * u);
            }
            // compact rows to (t, f) so the down projection reads a dense matrix
            for ti in 1..t {
                gu.copy_within(ti * 2 * f..ti * 2 * f + f, ti * f);
            }
            mm(&gu, t, &lay.w.w_down, d.hidden, f, out, th);
        });
        self.scratch = gu;
        Ok(())
    }

    fn add(&mut self, acc: &mut Vec<f32>, x: &Vec<f32>, n: usize) -> Result<()> {
        acc[..n].iter_mut().zip(&x[..n]).for_each(|(a, x)| *a += x);
        Ok(())
    }

    fn copy(&mut self, src: &Vec<f32>, dst: &mut Vec<f32>, n: usize) -> Result<()> {
        dst[..n].copy_from_slice(&src[..n]);
        Ok(())
    }

    fn all_reduce(&mut self, buf: &mut Vec<f32>, n: usize) -> Result<()> {
        self.comm.all_reduce_sum(&mut buf[..n])
    }

    fn all_reduce_start(&mut self, buf: Vec<f32>, n: usize) -> Result<Self::Pending> {
        if self.lane.is_none() {
            self.lane = Some(CommLane::new(self.comm.clone())?);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let lane = self.lane.as_ref().and_then(|l| l.tx.as_ref());
        lane.expect("lane created above")
            .send((buf, n, tx))
            .map_err(|_| Error::Comm("communication lane is gone".into()))?;
        Ok(rx)
    }

    fn all_reduce_wait(&mut self, pending: Self::Pending) -> Result<Vec<f32>> {
        pending
            .recv()
            .map_err(|_| Error::Comm("communication lane exited".into()))?
    }

    fn lm_head(
        &mut self,
        x: &Vec<f32>,
        rows: std::ops::Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let d = &self.dims;
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("LM head was not loaded".into()))?;
        let t = rows.len();
        let mut normed = vec![0f32; t * d.hidden];
        rmsnorm(
            &x[rows.start * d.hidden..rows.end * d.hidden],
            &head.norm,
            d.rms_eps,
            &mut normed,
        );
        let th = self.threads;
        let mm = self.mm();
        Self::par(&self.pool, || {
            mm(&normed, t, &head.w, d.vocab, d.hidden, out, th)
        });
        Ok(())
    }

    fn comm_stats(&self) -> CommStats {
        self.comm.stats()
    }
    fn reset_comm_stats(&mut self) {
        self.comm.reset_stats()
    }
}
