//! Decode GEMV (`csrc/gemv.cu`): y (t, n) = x (t, k) @ W (n, k)^T, bf16, f32 accumulation.

use super::cuda_err;
use super::kernels::{check_len, Kernels};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// Mirror of `GemvParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GemvParams {
    pub t: i32,
    pub n: i32,
    pub k: i32,
    pub pad: i32,
}

const _: () = {
    assert!(std::mem::size_of::<GemvParams>() == 16);
    assert!(std::mem::offset_of!(GemvParams, n) == 4);
    assert!(std::mem::offset_of!(GemvParams, k) == 8);
};

// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for GemvParams {}

/// Output rows per block (csrc/gemv.cu WARPS_PER_BLOCK).
const ROWS_PER_BLOCK: usize = 8;

/// Parameters and grid of both GEMV kernels: one warp per output row (public for the host
/// simulator's tests).
pub fn launch_config(t: usize, n: usize, k: usize) -> (GemvParams, LaunchConfig) {
    let p = GemvParams {
        t: t as i32,
        n: n as i32,
        k: k as i32,
        pad: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    (p, cfg)
}

pub fn gemv_bf16(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    (t, n, k): (usize, usize, usize),
    w: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
) -> Result<()> {
    if w.len() < n * k || x.len() < t * k || y.len() < t * n {
        return Err(Error::InvalidArgument(format!(
            "gemv_bf16: buffers too small for t={t} n={n} k={k}"
        )));
    }
    if t == 0 || n == 0 {
        return Ok(());
    }
    let f = kern.function("gemv", "gemv_bf16")?;
    let (p, cfg) = launch_config(t, n, k);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(w).arg(x).arg(y);
    // SAFETY: argument order and types match gemv_bf16 in csrc/gemv.cu; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// The backend's decode GEMV: y (t, n) f32 = x (t, k) f32 @ W (n, k)^T with bf16 W.
pub fn gemv_bf16_f32(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    (t, n, k): (usize, usize, usize),
    w: &CudaView<bf16>,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("gemv_bf16_f32", "w", w.len(), n * k)?;
    check_len("gemv_bf16_f32", "x", x.len(), t * k)?;
    check_len("gemv_bf16_f32", "y", y.len(), t * n)?;
    if t == 0 || n == 0 {
        return Ok(());
    }
    let f = kern.function("gemv", "gemv_bf16_f32")?;
    let (p, cfg) = launch_config(t, n, k);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(w).arg(x).arg(y);
    // SAFETY: matches gemv_bf16_f32 in csrc/gemv.cu; sizes checked above. The kernel takes
    // its 16-byte vector path only when k % 8 == 0 and both bases are 16-byte aligned (every
    // view the backend passes is: allocations are 256-byte aligned, offsets multiples of k).
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}
