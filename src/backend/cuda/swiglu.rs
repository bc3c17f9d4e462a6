//! SwiGLU of the fused gate|up projection (`csrc/swiglu.cu`).

use super::cuda_err;
use super::kernels::{check_len, Kernels};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// Mirror of `SwigluParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SwigluParams {
    pub t: i32,
    pub f: i32,
}

const _: () =
    assert!(std::mem::size_of::<SwigluParams>() == 8 && std::mem::offset_of!(SwigluParams, f) == 4);

// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for SwigluParams {}

/// Launch shape of `swiglu_bf16`: a thread per output, 1024 per block (public for the host
/// simulator's tests).
pub fn launch_config_bf16(t: usize, f: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems((t * f) as u32)
}

/// Launch shape of `swiglu_f32`: a thread per output, 256 per block (public for the host
/// simulator's tests).
pub fn launch_config_f32(t: usize, f: usize) -> LaunchConfig {
    super::kernels::grid_1d(t * f)
}

/// h (t, f) = silu(gu[:, :f]) * gu[:, f..2f].
pub fn swiglu_bf16(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    t: usize,
    f: usize,
    gu: &CudaSlice<bf16>,
    h: &mut CudaSlice<bf16>,
) -> Result<()> {
    if gu.len() < 2 * t * f || h.len() < t * f {
        return Err(Error::InvalidArgument(format!(
            "swiglu_bf16: buffers too small for t={t} f={f}"
        )));
    }
    if t * f == 0 {
        return Ok(());
    }
    let func = kern.function("swiglu", "swiglu_bf16")?;
    let p = SwigluParams {
        t: t as i32,
        f: f as i32,
    };
    let mut b = stream.launch_builder(&func);
    b.arg(&p).arg(gu).arg(h);
    // SAFETY: argument order and types match swiglu_bf16 in csrc/swiglu.cu; sizes checked.
    unsafe { b.launch(launch_config_bf16(t, f)) }.map_err(cuda_err)?;
    Ok(())
}

/// f32 activations: h (t, f) = silu(gu[:, :f]) * gu[:, f..2f].
pub fn swiglu_f32(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    t: usize,
    f: usize,
    gu: &CudaView<f32>,
    h: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("swiglu_f32", "gu", gu.len(), 2 * t * f)?;
    check_len("swiglu_f32", "h", h.len(), t * f)?;
    if t * f == 0 {
        return Ok(());
    }
    let func = kern.function("swiglu", "swiglu_f32")?;
    let p = SwigluParams {
        t: t as i32,
        f: f as i32,
    };
    let mut b = stream.launch_builder(&func);
    b.arg(&p).arg(gu).arg(h);
    // SAFETY: matches swiglu_f32 in csrc/swiglu.cu; sizes checked above.
    unsafe { b.launch(launch_config_f32(t, f)) }.map_err(cuda_err)?;
    Ok(())
}
