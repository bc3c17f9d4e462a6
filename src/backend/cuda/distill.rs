//! Block-to-block distillation on a GPU (`csrc/distill.cu` and cuBLAS f32 GEMMs): a
//! [`Trainer`] that keeps every sample, each rank's parameters, gradients and Adam moments on
//! the device, so a training step is a few dozen launches and no copy. The math is
//! src/distill.rs's, step for step; tests/cuda_kernels.rs holds its losses, gradients and
//! trained weights to the CPU trainer's.

use super::cuda_err;
use super::gemm::Gemm;
use super::kernels::{grid_1d, Kernels};
use super::swiglu::SwigluParams;
use crate::distill::{adam_corrections, Sample, StudentParams, Trainer, ADAM};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Mirror of `DistillNormParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DistillNormParams {
    pub rows: i32,
    pub d: i32,
    pub eps: f32,
}

/// Mirror of `MseParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MseParams {
    pub n: i64,
    pub scale: f32,
    pub pad: i32,
}

/// Mirror of `AdamParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdamParams {
    pub n: i64,
    pub lr: f32,
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub c1: f32,
    pub c2: f32,
}

impl AdamParams {
    /// Adam step `step` (counted from 1) over `n` elements at learning rate `lr`: the
    /// trainer's betas and epsilon ([`ADAM`]) and their bias corrections.
    pub fn new(n: usize, lr: f32, step: usize) -> AdamParams {
        let (b1, b2, eps) = ADAM;
        let (c1, c2) = adam_corrections(step);
        AdamParams {
            n: n as i64,
            lr,
            b1,
            b2,
            eps,
            c1,
            c2,
        }
    }
}

/// `DISTILL_MSE_BLOCKS` in csrc/params.h: the MSE kernel's fixed grid.
pub const MSE_BLOCKS: usize = 128;

const _: () = {
    assert!(std::mem::size_of::<DistillNormParams>() == 12);
    assert!(std::mem::offset_of!(DistillNormParams, eps) == 8);
    assert!(std::mem::size_of::<MseParams>() == 16);
    assert!(std::mem::offset_of!(MseParams, scale) == 8);
    assert!(std::mem::size_of::<AdamParams>() == 32);
    assert!(std::mem::offset_of!(AdamParams, c2) == 28);
};
// SAFETY: plain-old-data with the C layouts asserted above.
unsafe impl cudarc::driver::DeviceRepr for DistillNormParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for MseParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for AdamParams {}

/// One block of 256 threads per row (the row kernels' launch bound): distill_norm_fwd and
/// distill_norm_bwd. Public, as [`mse_launch_config`], for the host simulator's tests, which
/// launch what the backend launches; the elementwise kernels (distill_swiglu_bwd,
/// distill_norm_wgrad, distill_adam) take `kernels::grid_1d` of their element count.
pub fn rows_launch_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// distill_mse's fixed grid: [`MSE_BLOCKS`] blocks of 256 threads, grid-stride.
pub fn mse_launch_config() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (MSE_BLOCKS as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One rank's four trainable tensors on the device, in [`StudentParams`] order: wo (d, q),
/// ffn_norm (d), w_gate_up (2f, d), w_down (d, f).
struct DevParams([CudaSlice<f32>; 4]);

/// One sample on the device.
struct DevSample {
    t: usize,
    x: CudaSlice<f32>,
    att: Vec<CudaSlice<f32>>,
    target: CudaSlice<f32>,
}

/// One rank's forward tape (sized for the longest sample).
struct Tape {
    a: CudaSlice<f32>,    // (t, d) att @ Wo^T
    u: CudaSlice<f32>,    // (t, d) x + a
    n: CudaSlice<f32>,    // (t, d) normed
    rinv: CudaSlice<f32>, // (t)
    gu: CudaSlice<f32>,   // (t, 2f)
    s: CudaSlice<f32>,    // (t, f)
}

struct Rank {
    q: usize,
    f: usize,
    params: DevParams,
    grads: DevParams,
    m: DevParams,
    v: DevParams,
    tape: Tape,
}

/// The GPU trainer. Everything runs on one stream; only `mean_loss`, `loss_and_grads` and
/// `params` wait for it.
pub struct GpuTrainer {
    stream: Arc<CudaStream>,
    kern: Kernels,
    gemm: Gemm,
    d: usize,
    eps: f32,
    ranks: Vec<Rank>,
    data: Vec<DevSample>,
    // scratch shared by the ranks' backward passes, and the block's output
    out: CudaSlice<f32>,  // (t, d)
    dout: CudaSlice<f32>, // (t, d)
    ds: CudaSlice<f32>,   // (t, f_max)
    dgu: CudaSlice<f32>,  // (t, 2 f_max)
    dn: CudaSlice<f32>,   // (t, d)
    da: CudaSlice<f32>,   // (t, d)
    partial: CudaSlice<f64>,
}

/// A GPU trainer on device `gpu` for `init` (one [`StudentParams`] per rank) and `data`.
pub fn trainer(
    gpu: usize,
    init: &[StudentParams],
    data: &[Sample],
    d: usize,
    eps: f32,
) -> Result<GpuTrainer> {
    if init.is_empty() || d == 0 {
        return Err(Error::InvalidArgument(
            "GPU distillation needs at least one rank and a hidden size".into(),
        ));
    }
    let ctx = super::context(gpu)?;
    // SAFETY: this context struct is the trainer's own, and every buffer it allocates lives on
    // its one stream (cuBLAS included), so the stream orders every access.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(cuda_err)?;
    let kern = Kernels::load(&ctx)?;
    let gemm = Gemm::new(&stream)?;
    let up = |v: &[f32]| stream.clone_htod(v).map_err(cuda_err);
    let zeros = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(cuda_err);
    let t_max = data.iter().map(|s| s.x.len() / d).max().unwrap_or(0).max(1);
    let mut ranks = Vec::with_capacity(init.len());
    for p in init {
        let (q, f) = (p.wo.len() / d, p.w_down.len() / d);
        if q * d != p.wo.len()
            || p.ffn_norm.len() != d
            || p.w_gate_up.len() != 2 * f * d
            || f * d != p.w_down.len()
        {
            return Err(Error::InvalidArgument(format!(
                "GPU distillation: a rank's parameters are not of hidden size {d}"
            )));
        }
        let dev = |p: &StudentParams| -> Result<DevParams> {
            Ok(DevParams([
                up(&p.wo)?,
                up(&p.ffn_norm)?,
                up(&p.w_gate_up)?,
                up(&p.w_down)?,
            ]))
        };
        let zero = || -> Result<DevParams> {
            Ok(DevParams([
                zeros(d * q)?,
                zeros(d)?,
                zeros(2 * f * d)?,
                zeros(d * f)?,
            ]))
        };
        ranks.push(Rank {
            q,
            f,
            params: dev(p)?,
            grads: zero()?,
            m: zero()?,
            v: zero()?,
            tape: Tape {
                a: zeros(t_max * d)?,
                u: zeros(t_max * d)?,
                n: zeros(t_max * d)?,
                rinv: zeros(t_max)?,
                gu: zeros(t_max * 2 * f)?,
                s: zeros(t_max * f)?,
            },
        });
    }
    let mut dev_data = Vec::with_capacity(data.len());
    for s in data {
        let t = s.x.len() / d;
        if s.x_local.is_some() {
            return Err(Error::InvalidArgument(
                "GPU distillation does not train blocks with linear compensation yet; \
                 distil them with --backend cpu"
                    .into(),
            ));
        }
        if t == 0 {
            return Err(Error::InvalidArgument(
                "GPU distillation: a sample of no tokens".into(),
            ));
        }
        if t * d != s.x.len() || s.target.len() != s.x.len() || s.att.len() != ranks.len() {
            return Err(Error::InvalidArgument(
                "GPU distillation: a sample's input, target or attention outputs do not match the ranks".into(),
            ));
        }
        for (a, r) in s.att.iter().zip(&ranks) {
            if a.len() != t * r.q {
                return Err(Error::InvalidArgument(format!(
                    "GPU distillation: an attention output holds {} values, expected {t} x {}",
                    a.len(),
                    r.q
                )));
            }
        }
        dev_data.push(DevSample {
            t,
            x: up(&s.x)?,
            att: s.att.iter().map(|a| up(a)).collect::<Result<_>>()?,
            target: up(&s.target)?,
        });
    }
    let f_max = ranks.iter().map(|r| r.f).max().unwrap_or(1);
    Ok(GpuTrainer {
        out: zeros(t_max * d)?,
        dout: zeros(t_max * d)?,
        ds: zeros(t_max * f_max)?,
        dgu: zeros(t_max * 2 * f_max)?,
        dn: zeros(t_max * d)?,
        da: zeros(t_max * d)?,
        partial: stream.alloc_zeros::<f64>(MSE_BLOCKS).map_err(cuda_err)?,
        stream,
        kern,
        gemm,
        d,
        eps,
        ranks,
        data: dev_data,
    })
}

impl GpuTrainer {
    /// Wait for every queued step (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err)
    }

    fn norm_params(&self, rows: usize) -> DistillNormParams {
        DistillNormParams {
            rows: rows as i32,
            d: self.d as i32,
            eps: self.eps,
        }
    }

    /// The student's output for sample `i` into `out`, each rank's tape, and dout = dL/dout
    /// with the per-block partial sums of squared errors in `partial` (not read back).
    fn forward(&mut self, i: usize) -> Result<()> {
        let (d, s) = (self.d, &self.data[i]);
        let t = s.t;
        let st = &self.stream;
        let np = self.norm_params(t);
        let mut out = self.out.slice_mut(0..t * d);
        st.memcpy_dtod(&s.x, &mut out).map_err(cuda_err)?;
        for (r, att) in self.ranks.iter_mut().zip(&s.att) {
            let (q, f) = (r.q, r.f);
            let [wo, norm, wgu, wd] = &r.params.0;
            let tp = &mut r.tape;
            // a = att @ Wo^T
            self.gemm
                .f32_rm((t, d, q), (att, false), (wo, true), 0.0, &mut tp.a)?;
            // u = x + a; n = RMSNorm(u) * w; rinv
            let func = self.kern.function("distill", "distill_norm_fwd")?;
            let mut b = st.launch_builder(&func);
            b.arg(&np)
                .arg(&s.x)
                .arg(&tp.a)
                .arg(norm)
                .arg(&mut tp.u)
                .arg(&mut tp.n)
                .arg(&mut tp.rinv);
            // SAFETY: matches distill_norm_fwd in csrc/distill.cu; x, a, u, n hold t * d
            // values, rinv t, w d (sized at construction for the longest sample).
            unsafe { b.launch(rows_launch_config(t)) }.map_err(cuda_err)?;
            // out += a
            super::elementwise::add_f32(
                st,
                &self.kern,
                t * d,
                &mut self.out.slice_mut(0..t * d),
                &tp.a.slice(0..t * d),
            )?;
            // gu = n @ Wgu^T; s = silu(gate) * up; out += s @ Wd^T
            self.gemm
                .f32_rm((t, 2 * f, d), (&tp.n, false), (wgu, true), 0.0, &mut tp.gu)?;
            super::swiglu::swiglu_f32(
                st,
                &self.kern,
                t,
                f,
                &tp.gu.slice(0..t * 2 * f),
                &mut tp.s.slice_mut(0..t * f),
            )?;
            self.gemm
                .f32_rm((t, d, f), (&tp.s, false), (wd, true), 1.0, &mut self.out)?;
        }
        let n = t * d;
        let mp = MseParams {
            n: n as i64,
            scale: (2.0 / n as f64) as f32,
            pad: 0,
        };
        let func = self.kern.function("distill", "distill_mse")?;
        let mut b = st.launch_builder(&func);
        b.arg(&mp)
            .arg(&self.out)
            .arg(&s.target)
            .arg(&mut self.dout)
            .arg(&mut self.partial);
        let cfg = mse_launch_config();
        // SAFETY: matches distill_mse in csrc/distill.cu: out, target, dout hold n values,
        // partial MSE_BLOCKS, the grid it is launched with.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }

    /// The mean squared error of the last forward (waits for the stream).
    fn read_loss(&self, i: usize) -> Result<f64> {
        self.synchronize()?;
        let partial = self.stream.clone_dtoh(&self.partial).map_err(cuda_err)?;
        Ok(partial.iter().sum::<f64>() / (self.data[i].t * self.d) as f64)
    }

    /// Every rank's gradients of sample `i` into `grads`, after [`Self::forward`] of it.
    fn backward(&mut self, i: usize) -> Result<()> {
        let (d, s) = (self.d, &self.data[i]);
        let t = s.t;
        let st = &self.stream;
        let np = self.norm_params(t);
        for (r, att) in self.ranks.iter_mut().zip(&s.att) {
            let (q, f) = (r.q, r.f);
            let [_, norm, wgu, wd] = &r.params.0;
            let [g_wo, g_norm, g_wgu, g_wd] = &mut r.grads.0;
            let tp = &r.tape;
            // m = s @ Wd^T: dWd = dout^T s; ds = dout @ Wd
            self.gemm
                .f32_rm((d, f, t), (&self.dout, true), (&tp.s, false), 0.0, g_wd)?;
            self.gemm.f32_rm(
                (t, f, d),
                (&self.dout, false),
                (wd, false),
                0.0,
                &mut self.ds,
            )?;
            // s = silu(gate) * up
            let func = self.kern.function("distill", "distill_swiglu_bwd")?;
            let sp = SwigluParams {
                t: t as i32,
                f: f as i32,
            };
            let mut b = st.launch_builder(&func);
            b.arg(&sp).arg(&tp.gu).arg(&self.ds).arg(&mut self.dgu);
            // SAFETY: matches distill_swiglu_bwd in csrc/distill.cu; gu and dgu hold t * 2f
            // values, ds t * f (sized for the longest sample and widest rank).
            unsafe { b.launch(grid_1d(t * f)) }.map_err(cuda_err)?;
            // gu = n @ Wgu^T: dWgu = dgu^T n; dn = dgu @ Wgu
            self.gemm
                .f32_rm((2 * f, d, t), (&self.dgu, true), (&tp.n, false), 0.0, g_wgu)?;
            self.gemm.f32_rm(
                (t, d, 2 * f),
                (&self.dgu, false),
                (wgu, false),
                0.0,
                &mut self.dn,
            )?;
            // n = RMSNorm(u) * w, u = x + a, out = a + m: da, dw
            let func = self.kern.function("distill", "distill_norm_bwd")?;
            let mut b = st.launch_builder(&func);
            b.arg(&np)
                .arg(&tp.u)
                .arg(&tp.rinv)
                .arg(norm)
                .arg(&self.dn)
                .arg(&self.dout)
                .arg(&mut self.da);
            // SAFETY: matches distill_norm_bwd in csrc/distill.cu; u, dn, dout, da hold
            // t * d values, rinv t, w d.
            unsafe { b.launch(rows_launch_config(t)) }.map_err(cuda_err)?;
            let func = self.kern.function("distill", "distill_norm_wgrad")?;
            let mut b = st.launch_builder(&func);
            b.arg(&np)
                .arg(&tp.u)
                .arg(&tp.rinv)
                .arg(&self.dn)
                .arg(g_norm);
            // SAFETY: matches distill_norm_wgrad in csrc/distill.cu; one thread per column
            // of d; u and dn hold t * d values, rinv t, dw d.
            unsafe { b.launch(grid_1d(d)) }.map_err(cuda_err)?;
            // a = att @ Wo^T: dWo = da^T att
            self.gemm
                .f32_rm((d, q, t), (&self.da, true), (att, false), 0.0, g_wo)?;
        }
        Ok(())
    }

    fn download(&self, p: &DevParams) -> Result<StudentParams> {
        let get = |s: &CudaSlice<f32>| self.stream.clone_dtoh(s).map_err(cuda_err);
        let [wo, norm, wgu, wd] = &p.0;
        Ok(StudentParams {
            wo: get(wo)?,
            ffn_norm: get(norm)?,
            w_gate_up: get(wgu)?,
            w_down: get(wd)?,
        })
    }
}

impl Drop for GpuTrainer {
    /// Queued steps finish before their buffers, kernels and cuBLAS handle go.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

impl Trainer for GpuTrainer {
    fn loss_and_grads(&mut self, i: usize) -> Result<(f64, Vec<StudentParams>)> {
        self.forward(i)?;
        self.backward(i)?;
        let loss = self.read_loss(i)?;
        let grads = self
            .ranks
            .iter()
            .map(|r| self.download(&r.grads))
            .collect::<Result<_>>()?;
        Ok((loss, grads))
    }

    fn mean_loss(&mut self, samples: std::ops::Range<usize>) -> Result<f64> {
        let n = samples.len();
        let mut sum = 0.0;
        for i in samples {
            self.forward(i)?;
            sum += self.read_loss(i)?;
        }
        Ok(sum / n.max(1) as f64)
    }

    fn adam_step(&mut self, i: usize, step: usize, lr: f32) -> Result<()> {
        self.forward(i)?;
        self.backward(i)?;
        let func = self.kern.function("distill", "distill_adam")?;
        for r in &mut self.ranks {
            for (((p, g), m), v) in r
                .params
                .0
                .iter_mut()
                .zip(&r.grads.0)
                .zip(r.m.0.iter_mut())
                .zip(r.v.0.iter_mut())
            {
                let n = p.len();
                let ap = AdamParams::new(n, lr, step);
                let mut b = self.stream.launch_builder(&func);
                b.arg(&ap).arg(p).arg(g).arg(m).arg(v);
                // SAFETY: matches distill_adam in csrc/distill.cu; the parameter, its
                // gradient and both moments were allocated with the same length n.
                unsafe { b.launch(grid_1d(n)) }.map_err(cuda_err)?;
            }
        }
        Ok(())
    }

    fn params(&mut self) -> Result<Vec<StudentParams>> {
        self.ranks
            .iter()
            .map(|r| self.download(&r.params))
            .collect()
    }

    fn set_params(&mut self, params: &[StudentParams]) -> Result<()> {
        if params.len() != self.ranks.len() {
            return Err(Error::InvalidArgument(format!(
                "GPU distillation: {} ranks' parameters for a trainer of {}",
                params.len(),
                self.ranks.len()
            )));
        }
        for (r, p) in self.ranks.iter_mut().zip(params) {
            let host = [&p.wo, &p.ffn_norm, &p.w_gate_up, &p.w_down];
            for (dev, src) in r.params.0.iter_mut().zip(host) {
                if dev.len() != src.len() {
                    return Err(Error::InvalidArgument(
                        "GPU distillation: parameters of another shape".into(),
                    ));
                }
                self.stream.memcpy_htod(src, dev).map_err(cuda_err)?;
            }
        }
        Ok(())
    }
}
