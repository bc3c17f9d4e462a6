//! Token selection on device (`csrc/sample.cu`, `csrc/argmax.cu`): temperature + nucleus
//! sampling with one uniform per row, so decoding never copies logits to the host.

use super::cuda_err;
use super::kernels::{check_len, Kernels};
use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Mirror of `SampleParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleParams {
    pub rows: i32,
    pub n: i32,
    pub temperature: f32,
    pub top_p: f32,
}

const _: () = {
    assert!(std::mem::size_of::<SampleParams>() == 16);
    assert!(std::mem::offset_of!(SampleParams, temperature) == 8);
};

// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for SampleParams {}

/// One block of `SAMPLE_THREADS` (1024, csrc/sample.cu) per row. Public for the host
/// simulator's tests, which launch what the backend launches.
pub fn launch_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `out[r]` = a token drawn from `softmax(logits[r] / temperature)` restricted to the nucleus
/// of mass `top_p`, using `u[r]` in [0, 1). temperature > 0 (use argmax for greedy).
#[allow(clippy::too_many_arguments)]
pub fn sample_f32(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    (rows, n): (usize, usize),
    temperature: f32,
    top_p: f32,
    logits: &CudaView<f32>,
    u: &CudaView<f32>,
    out: &mut CudaViewMut<u32>,
) -> Result<()> {
    if !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "sample: temperature {temperature} must be > 0 and top_p {top_p} in (0, 1]"
        )));
    }
    check_len("sample", "logits", logits.len(), rows * n)?;
    check_len("sample", "u", u.len(), rows)?;
    check_len("sample", "out", out.len(), rows)?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let f = kern.function("sample", "sample_f32")?;
    let p = SampleParams {
        rows: rows as i32,
        n: n as i32,
        temperature,
        top_p,
    };
    let cfg = launch_config(rows);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(logits).arg(u).arg(out);
    // SAFETY: matches sample_f32 in csrc/sample.cu; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}
