//! Fused residual add + RMSNorm (`csrc/rmsnorm.cu`).

use super::cuda_err;
use super::kernels::{check_len, Kernels, NULL};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// Mirror of `RmsNormParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RmsNormParams {
    pub rows: i32,
    pub d: i32,
    pub eps: f32,
    pub has_delta: i32,
}

const _: () = {
    assert!(std::mem::size_of::<RmsNormParams>() == 16);
    assert!(std::mem::offset_of!(RmsNormParams, rows) == 0);
    assert!(std::mem::offset_of!(RmsNormParams, d) == 4);
    assert!(std::mem::offset_of!(RmsNormParams, eps) == 8);
    assert!(std::mem::offset_of!(RmsNormParams, has_delta) == 12);
};

// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for RmsNormParams {}

/// One block per row, a thread per element up to 1024 (public for the host simulator's
/// tests, which launch what the backend launches).
pub fn launch_config(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: ((d.div_ceil(32) * 32).clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn params(rows: usize, d: usize, eps: f32, has_delta: bool) -> RmsNormParams {
    RmsNormParams {
        rows: rows as i32,
        d: d as i32,
        eps,
        has_delta: i32::from(has_delta),
    }
}

/// `residual` += `delta` (when given); `out` = RMSNorm(residual) * weight. (rows, d) bf16.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_bf16(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    rows: usize,
    d: usize,
    eps: f32,
    residual: &mut CudaSlice<bf16>,
    delta: Option<&CudaSlice<bf16>>,
    weight: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    if residual.len() < rows * d
        || out.len() < rows * d
        || weight.len() < d
        || delta.is_some_and(|x| x.len() < rows * d)
    {
        return Err(Error::InvalidArgument(format!(
            "add_rmsnorm_bf16: buffers too small for ({rows}, {d})"
        )));
    }
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let f = k.function("rmsnorm", "add_rmsnorm_bf16")?;
    let p = params(rows, d, eps, delta.is_some());
    let cfg = launch_config(rows, d);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(residual);
    match delta {
        Some(dx) => b.arg(dx),
        None => b.arg(weight), // unused by the kernel when has_delta == 0
    };
    b.arg(weight).arg(out);
    // SAFETY: argument order and types match the kernel signature in csrc/rmsnorm.cu; every
    // buffer holds at least rows * d (weight: d) elements, checked above.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// f32 activations: `residual` += `delta` (when given); `out` = RMSNorm(residual) * weight.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_f32(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    rows: usize,
    d: usize,
    eps: f32,
    residual: &mut CudaViewMut<f32>,
    delta: Option<&CudaView<f32>>,
    weight: &CudaView<f32>,
    out: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("add_rmsnorm_f32", "residual", residual.len(), rows * d)?;
    check_len("add_rmsnorm_f32", "out", out.len(), rows * d)?;
    check_len("add_rmsnorm_f32", "weight", weight.len(), d)?;
    if let Some(dx) = delta {
        check_len("add_rmsnorm_f32", "delta", dx.len(), rows * d)?;
    }
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let f = k.function("rmsnorm", "add_rmsnorm_f32")?;
    let p = params(rows, d, eps, delta.is_some());
    let cfg = launch_config(rows, d);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(residual);
    match delta {
        Some(dx) => b.arg(dx),
        None => b.arg(&NULL), // not read when has_delta == 0
    };
    b.arg(weight).arg(out);
    // SAFETY: matches add_rmsnorm_f32 in csrc/rmsnorm.cu; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// `out` = RMSNorm(x) * weight for `rows` f32 rows of `d`; `x` is only read.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_f32(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    rows: usize,
    d: usize,
    eps: f32,
    x: &CudaView<f32>,
    weight: &CudaView<f32>,
    out: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("rmsnorm_f32", "x", x.len(), rows * d)?;
    check_len("rmsnorm_f32", "out", out.len(), rows * d)?;
    check_len("rmsnorm_f32", "weight", weight.len(), d)?;
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let f = k.function("rmsnorm", "rmsnorm_f32")?;
    let p = params(rows, d, eps, false);
    let cfg = launch_config(rows, d);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(x).arg(weight).arg(out);
    // SAFETY: matches rmsnorm_f32 in csrc/rmsnorm.cu; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}
