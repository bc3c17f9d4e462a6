//! Causal attention over the bf16 KV cache (`csrc/attention.cu`): prefill with a query
//! offset and KV length, and split-K decode ("flash decoding") with a combine pass.

use super::cuda_err;
use super::kernels::{check_len, Kernels, NULL};
use super::rope::Pos;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// Mirror of `AttnParams` in csrc/params.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttnParams {
    pub t: i32,
    pub n_q: i32,
    pub head_dim: i32,
    pub capacity: i32,
    pub pos0: i32,
    pub splits: i32,
    pub chunk: i32,
    pub scale: f32,
}

const _: () = {
    assert!(std::mem::size_of::<AttnParams>() == 32);
    assert!(std::mem::offset_of!(AttnParams, pos0) == 16);
    assert!(std::mem::offset_of!(AttnParams, chunk) == 24);
    assert!(std::mem::offset_of!(AttnParams, scale) == 28);
};

// SAFETY: plain-old-data with the C layout asserted above.
unsafe impl cudarc::driver::DeviceRepr for AttnParams {}

/// Largest head dimension the kernel handles (csrc/attention.cu ATT_MAXE * 32).
pub const MAX_HEAD_DIM: usize = 256;
/// Keys per chunk when the keys are split.
pub const SPLIT_CHUNK: usize = 64;

/// How to cut the keys of a launch: (splits, chunk). Enough (row, head) pairs to fill the
/// GPU (`min_blocks`, about 2 waves) run unsplit; otherwise chunks of [`SPLIT_CHUNK`] keys.
/// With a device-side position the length is unknown on the host: split for `capacity`
/// (chunks past the live length are empty and cost one block each).
pub fn split_plan(t: usize, n_q: usize, max_len: usize, min_blocks: usize) -> (usize, usize) {
    if t * n_q >= min_blocks || max_len <= SPLIT_CHUNK {
        (1, max_len.max(1))
    } else {
        (max_len.div_ceil(SPLIT_CHUNK), SPLIT_CHUNK)
    }
}

/// Launch shapes of `attention_f32` (grid (n_q, t, splits), 4 warps per block) and of
/// `attention_combine_f32` (grid (n_q, t), a thread per output dimension rounded up to whole
/// warps), public for the host simulator's tests.
pub fn launch_configs(
    t: usize,
    n_q: usize,
    hd: usize,
    splits: usize,
) -> (LaunchConfig, LaunchConfig) {
    let attend = LaunchConfig {
        grid_dim: (n_q as u32, t as u32, splits as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let combine = LaunchConfig {
        grid_dim: (n_q as u32, t as u32, 1),
        block_dim: (hd.div_ceil(32) as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    (attend, combine)
}

/// Floats of partial-result scratch a split launch needs.
pub fn partial_len(t: usize, n_q: usize, hd: usize, splits: usize) -> usize {
    if splits > 1 {
        t * n_q * splits * (hd + 2)
    } else {
        0
    }
}

/// out (t, n_q * hd) = causal attention of q (t, n_q * hd) at positions pos0.. over the
/// caches (n_kv, capacity, hd); `q_to_kv` (n_q) i32 on the device. `partial` must hold
/// [`partial_len`] floats for the chosen split.
#[allow(clippy::too_many_arguments)]
pub fn attention_f32(
    stream: &Arc<CudaStream>,
    kern: &Kernels,
    (t, n_q, n_kv, hd, capacity): (usize, usize, usize, usize, usize),
    pos: Pos,
    (splits, chunk): (usize, usize),
    q: &CudaView<f32>,
    k_cache: &CudaView<bf16>,
    v_cache: &CudaView<bf16>,
    q_to_kv: &CudaSlice<i32>,
    out: &mut CudaViewMut<f32>,
    partial: &mut CudaViewMut<f32>,
) -> Result<()> {
    if hd == 0 || hd > MAX_HEAD_DIM {
        return Err(Error::InvalidArgument(format!(
            "attention: head_dim {hd} outside 1..={MAX_HEAD_DIM}"
        )));
    }
    check_len("attention", "q", q.len(), t * n_q * hd)?;
    check_len("attention", "out", out.len(), t * n_q * hd)?;
    check_len("attention", "k_cache", k_cache.len(), n_kv * capacity * hd)?;
    check_len("attention", "v_cache", v_cache.len(), n_kv * capacity * hd)?;
    check_len("attention", "q_to_kv", q_to_kv.len(), n_q)?;
    check_len(
        "attention",
        "partial",
        partial.len(),
        partial_len(t, n_q, hd, splits),
    )?;
    let pos0 = pos.host_pos0(t, capacity)?;
    if splits == 0 || chunk == 0 {
        return Err(Error::InvalidArgument("attention: empty split".into()));
    }
    // every key a query may see must fall in some chunk: pos0 + t on the host, up to the
    // capacity when the position lives on the device
    let keys = match pos {
        Pos::Host(_) => pos0 + t,
        Pos::Device(_) => capacity,
    };
    if splits * chunk < keys {
        return Err(Error::InvalidArgument(format!(
            "attention: split {splits} x {chunk} covers {} of {keys} keys",
            splits * chunk
        )));
    }
    // the grid is (n_q, t, splits): y and z are limited to 65535
    if t > 65535 || splits > 65535 {
        return Err(Error::InvalidArgument(format!(
            "attention: {t} query rows or {splits} splits exceed a grid dimension (65535); \
             cut the prefill into chunks"
        )));
    }
    if t * n_q == 0 {
        return Ok(());
    }
    let p = AttnParams {
        t: t as i32,
        n_q: n_q as i32,
        head_dim: hd as i32,
        capacity: capacity as i32,
        pos0: pos0 as i32,
        splits: splits as i32,
        chunk: chunk as i32,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let f = kern.function("attention", "attention_f32")?;
    let (cfg, combine_cfg) = launch_configs(t, n_q, hd, splits);
    let mut b = stream.launch_builder(&f);
    b.arg(&p);
    match pos {
        Pos::Device(d) => b.arg(d),
        Pos::Host(_) => b.arg(&NULL),
    };
    b.arg(q).arg(k_cache).arg(v_cache).arg(q_to_kv);
    b.arg(&mut *out).arg(&mut *partial);
    // SAFETY: matches attention_f32 in csrc/attention.cu; sizes checked above; q_to_kv
    // entries are < n_kv (checked when the layer was loaded).
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    if splits > 1 {
        let f = kern.function("attention", "attention_combine_f32")?;
        let pv = partial.as_view();
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(&pv).arg(out);
        // SAFETY: matches attention_combine_f32; `partial` was written by the launch above.
        unsafe { b.launch(combine_cfg) }.map_err(cuda_err)?;
    }
    Ok(())
}
