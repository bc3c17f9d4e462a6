//! Rotary position embedding in place (`csrc/rope.cu`), both layouts.

use super::cuda_err;
use super::kernels::{check_len, Kernels, NULL};
use crate::config::RopeStyle;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
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

/// Launch shape of `rope_bf16`: one thread per (row, head, pair), 1024 per block (public for
/// the host simulator's tests).
pub fn rope_launch_config(t: usize, heads: usize, head_dim: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems((t * heads * head_dim / 2) as u32)
}

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
    let cfg = rope_launch_config(t, heads, head_dim);
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(x);
    // SAFETY: argument order and types match rope_bf16 in csrc/rope.cu; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// Mirror of `QkvRopeParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QkvRopeParams {
    pub t: i32,
    pub n_q: i32,
    pub n_kv: i32,
    pub head_dim: i32,
    pub capacity: i32,
    pub pos0: i32,
    pub style: i32,
    pub has_bias: i32,
    pub theta: f32,
    pub pad: [i32; 3],
}

const _: () = {
    assert!(std::mem::size_of::<QkvRopeParams>() == 48);
    assert!(std::mem::offset_of!(QkvRopeParams, capacity) == 16);
    assert!(std::mem::offset_of!(QkvRopeParams, has_bias) == 28);
    assert!(std::mem::offset_of!(QkvRopeParams, theta) == 32);
};

// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for QkvRopeParams {}

/// Where the positions of a QKV epilogue or an attention launch come from.
#[derive(Clone, Copy)]
pub enum Pos<'a> {
    /// Rows are at positions pos0.. (a launch parameter).
    Host(usize),
    /// pos0 is read on the device from this i32 (a captured CUDA graph replays with a new
    /// position written there before each launch).
    Device(&'a CudaSlice<i32>),
}

impl Pos<'_> {
    /// The launch parameter pos0 for `t` rows: the host position, checked against the KV
    /// capacity, or 0 when the kernel reads it on the device (the caller checked it then).
    pub fn host_pos0(self, t: usize, capacity: usize) -> Result<usize> {
        match self {
            Pos::Host(p) => Error::check_context(p, t, capacity).map(|()| p),
            Pos::Device(_) => Ok(0),
        }
    }
}

/// Launch shape of `qkv_rope_cache`: one thread per (row, head, pair) over the
/// n_q + 2 n_kv heads of a row, 256 per block (public for the host simulator's tests).
pub fn qkv_launch_config(t: usize, n_q: usize, n_kv: usize, hd: usize) -> LaunchConfig {
    super::kernels::grid_1d(t * (n_q + 2 * n_kv) * hd / 2)
}

/// Fused QKV epilogue: bias, RoPE on Q and K, Q to `q_out`, K/V into the bf16 caches.
/// `qkv` (t, (n_q + 2 n_kv) * hd); caches (n_kv, capacity, hd).
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_cache(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    (t, n_q, n_kv, hd): (usize, usize, usize, usize),
    (capacity, style, theta): (usize, RopeStyle, f32),
    pos: Pos,
    qkv: &CudaView<f32>,
    bias: Option<&CudaView<f32>>,
    q_out: &mut CudaViewMut<f32>,
    k_cache: &mut CudaViewMut<bf16>,
    v_cache: &mut CudaViewMut<bf16>,
) -> Result<()> {
    let width = (n_q + 2 * n_kv) * hd;
    check_len("qkv_rope_cache", "qkv", qkv.len(), t * width)?;
    check_len("qkv_rope_cache", "q_out", q_out.len(), t * n_q * hd)?;
    check_len(
        "qkv_rope_cache",
        "k_cache",
        k_cache.len(),
        n_kv * capacity * hd,
    )?;
    check_len(
        "qkv_rope_cache",
        "v_cache",
        v_cache.len(),
        n_kv * capacity * hd,
    )?;
    if let Some(b) = bias {
        check_len("qkv_rope_cache", "bias", b.len(), width)?;
    }
    if hd % 2 != 0 {
        return Err(Error::InvalidArgument(format!(
            "qkv_rope_cache: head_dim {hd} is odd"
        )));
    }
    let pos0 = pos.host_pos0(t, capacity)?;
    if t * width == 0 {
        return Ok(());
    }
    let f = kern.function("rope", "qkv_rope_cache")?;
    let p = QkvRopeParams {
        t: t as i32,
        n_q: n_q as i32,
        n_kv: n_kv as i32,
        head_dim: hd as i32,
        capacity: capacity as i32,
        pos0: pos0 as i32,
        style: match style {
            RopeStyle::Interleaved => 0,
            RopeStyle::Half => 1,
        },
        has_bias: i32::from(bias.is_some()),
        theta,
        pad: [0; 3],
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&p);
    match pos {
        Pos::Device(d) => b.arg(d),
        Pos::Host(_) => b.arg(&NULL),
    };
    b.arg(qkv);
    match bias {
        Some(x) => b.arg(x),
        None => b.arg(&NULL),
    };
    b.arg(q_out).arg(k_cache).arg(v_cache);
    // SAFETY: matches qkv_rope_cache in csrc/rope.cu; sizes checked above; with a device
    // position the caller guarantees pos + t <= capacity (the graph path checks on the host
    // before writing the position).
    unsafe { b.launch(qkv_launch_config(t, n_q, n_kv, hd)) }.map_err(cuda_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_position_past_the_kv_cache_is_a_context_overflow_not_a_wrap() {
        assert_eq!(Pos::Host(7).host_pos0(3, 10).unwrap(), 7);
        for (p, t) in [(8, 3), (usize::MAX, 2)] {
            match Pos::Host(p).host_pos0(t, 10) {
                Err(Error::ContextOverflow { capacity: 10, .. }) => {}
                other => panic!("pos0 {p}, t {t}: {other:?}"),
            }
        }
    }
}
