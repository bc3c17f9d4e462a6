//! Rotary position embedding in place (`csrc/rope.cu`), both layouts.

use super::cuda_err;
use super::kernels::Kernels;
use crate::config::RopeStyle;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// Mirror of `RopeParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RopeParams {
    pub t: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub stride: i32,
    pub pos0: i32,
    pub style: i32,
    pub theta: f32,
    pub pad: i32,
}

const _: () = {
    assert!(std::mem::size_of::<RopeParams>() == 32);
    assert!(std::mem::offset_of!(RopeParams, stride) == 12);
    assert!(std::mem::offset_of!(RopeParams, style) == 20);
    assert!(std::mem::offset_of!(RopeParams, theta) == 24);
};

// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for RopeParams {}

/// Rotate the first `heads` head vectors of each of `t` rows of `x` (row stride `stride`).
#[allow(clippy::too_many_arguments)]
pub fn rope_bf16(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    x: &mut CudaSlice<bf16>,
    (t, heads, head_dim, stride): (usize, usize, usize, usize),
    pos0: usize,
    theta: f32,
    style: RopeStyle,
) -> Result<()> {
    if head_dim % 2 != 0 || heads * head_dim > stride || x.len() < t * stride {
        return Err(Error::InvalidArgument(format!(
            "rope_bf16: t={t} heads={heads} head_dim={head_dim} stride={stride} for {} elements",
            x.len()
        )));
    }
    let total = t * heads * head_dim / 2;
    if total == 0 {
        return Ok(());
    }
    let f = kern.function("rope", "rope_bf16")?;
    let p = RopeParams {
        t: t as i32,
        heads: heads as i32,
        head_dim: head_dim as i32,
        stride: stride as i32,
        pos0: pos0 as i32,
        style: match style {
            RopeStyle::Interleaved => 0,
            RopeStyle::Half => 1,
        },
        theta,
        pad: 0,
    };
    let cfg = LaunchConfig::for_num_elems(total as u32);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(x);
    // SAFETY: argument order and types match rope_bf16 in csrc/rope.cu; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}
