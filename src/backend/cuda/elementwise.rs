//! Elementwise helpers (`csrc/elementwise.cu`): residual add, f32 -> bf16 conversion,
//! rounding f32 to bf16 in place.

use super::cuda_err;
use super::kernels::{check_len, grid_1d, Kernels};
use crate::error::Result;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// Mirror of `ElemParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ElemParams {
    pub n: i64,
}
const _: () = assert!(std::mem::size_of::<ElemParams>() == 8);
// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for ElemParams {}

/// Launch shape of every kernel here: a thread per element, 256 per block (public for the
/// host simulator's tests).
pub fn launch_config(n: usize) -> LaunchConfig {
    grid_1d(n)
}

/// acc[..n] += x[..n]
pub fn add_f32(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    n: usize,
    acc: &mut CudaViewMut<f32>,
    x: &CudaView<f32>,
) -> Result<()> {
    check_len("add_f32", "acc", acc.len(), n)?;
    check_len("add_f32", "x", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = kern.function("elementwise", "add_f32")?;
    let p = ElemParams { n: n as i64 };
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(acc).arg(x);
    // SAFETY: matches add_f32 in csrc/elementwise.cu; both buffers hold n elements.
    unsafe { b.launch(launch_config(n)) }.map_err(cuda_err)?;
    Ok(())
}

/// y[..n] = bf16(x[..n])
pub fn f32_to_bf16(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    n: usize,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<bf16>,
) -> Result<()> {
    check_len("f32_to_bf16", "x", x.len(), n)?;
    check_len("f32_to_bf16", "y", y.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = kern.function("elementwise", "f32_to_bf16")?;
    let p = ElemParams { n: n as i64 };
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(x).arg(y);
    // SAFETY: matches f32_to_bf16 in csrc/elementwise.cu; both buffers hold n elements.
    unsafe { b.launch(launch_config(n)) }.map_err(cuda_err)?;
    Ok(())
}

/// x[..n] = f32(bf16(x[..n])): what a bf16 wire carries, on a path that moves f32 (NCCL).
pub fn round_bf16_f32(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    n: usize,
    x: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("round_bf16_f32", "x", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = kern.function("elementwise", "round_bf16_f32")?;
    let p = ElemParams { n: n as i64 };
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(x);
    // SAFETY: matches round_bf16_f32 in csrc/elementwise.cu; x holds n elements.
    unsafe { b.launch(launch_config(n)) }.map_err(cuda_err)?;
    Ok(())
}
