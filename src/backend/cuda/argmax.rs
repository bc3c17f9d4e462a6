//! Row-wise argmax on device (`csrc/argmax.cu`), for greedy decoding.

use super::cuda_err;
use super::kernels::Kernels;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Mirror of `ArgmaxParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArgmaxParams {
    pub rows: i32,
    pub n: i32,
}

const _: () =
    assert!(std::mem::size_of::<ArgmaxParams>() == 8 && std::mem::offset_of!(ArgmaxParams, n) == 4);

// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for ArgmaxParams {}

/// One block of 256 threads per row; the block size must be a power of two (tree reduction
/// in the kernel). Public for the host simulator's tests, which launch what the backend
/// launches.
pub fn launch_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub fn argmax_f32(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    rows: usize,
    n: usize,
    logits: &CudaSlice<f32>,
    out: &mut CudaSlice<u32>,
) -> Result<()> {
    if logits.len() < rows * n || out.len() < rows || n == 0 {
        return Err(Error::InvalidArgument(format!(
            "argmax_f32: rows={rows} n={n}"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = kern.function("argmax", "argmax_f32")?;
    let p = ArgmaxParams {
        rows: rows as i32,
        n: n as i32,
    };
    let cfg = launch_config(rows);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(logits).arg(out);
    // SAFETY: argument order and types match argmax_f32 in csrc/argmax.cu; sizes checked.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}
