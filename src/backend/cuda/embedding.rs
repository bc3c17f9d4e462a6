//! Embedding lookup (`csrc/embedding.cu`): bf16 table rows -> f32 activations.

use super::cuda_err;
use super::kernels::{check_len, grid_1d, Kernels};
use crate::error::Result;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// Mirror of `EmbedParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EmbedParams {
    pub t: i32,
    pub d: i32,
}
const _: () = assert!(std::mem::size_of::<EmbedParams>() == 8);
// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for EmbedParams {}

/// Launch shape of `embedding_f32`: a thread per output element, 256 per block (public for
/// the host simulator's tests).
pub fn launch_config(t: usize, d: usize) -> LaunchConfig {
    grid_1d(t * d)
}

/// out (t, d) = `table[ids]`. `ids` are checked against the table's row count on the host
/// (`host_ids`), since a bad id would read out of bounds on the device.
#[allow(clippy::too_many_arguments)]
pub fn embedding_f32(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    d: usize,
    host_ids: &[u32],
    ids: &CudaView<u32>,
    table: &CudaView<bf16>,
    out: &mut CudaViewMut<f32>,
) -> Result<()> {
    let t = host_ids.len();
    let vocab = table.len() / d.max(1);
    if let Some(bad) = host_ids.iter().find(|i| **i as usize >= vocab) {
        return Err(crate::error::Error::InvalidArgument(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    check_len("embedding_f32", "ids", ids.len(), t)?;
    check_len("embedding_f32", "out", out.len(), t * d)?;
    if t * d == 0 {
        return Ok(());
    }
    let f = kern.function("embedding", "embedding_f32")?;
    let p = EmbedParams {
        t: t as i32,
        d: d as i32,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(ids).arg(table).arg(out);
    // SAFETY: matches embedding_f32 in csrc/embedding.cu; ids < vocab checked above.
    unsafe { b.launch(launch_config(t, d)) }.map_err(cuda_err)?;
    Ok(())
}
