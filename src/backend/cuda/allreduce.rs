//! The P2P all-reduce (`csrc/allreduce.cu`): one-shot and two-shot over peer pointers, for
//! ranks that are threads of one process, on one GPU (virtual ranks) or on GPUs with peer
//! access. Each rank registers its buffers once in a [`P2pGroup`]; every launch then reads
//! the peers' raw device addresses, so no IPC and nothing per call on the host (CUDA-graph
//! safe: the round counters live in device memory).
//!
//! Co-residency: a rank's blocks spin on its peers' blocks, so all ranks' blocks must be on
//! the GPU at once. The grid is capped at `sms / ranks_per_device` blocks (and
//! `AR_MAX_BLOCKS`); a launch that still cannot meet its peers times out and reports
//! `Error::CommTimeout` instead of hanging.

use super::cuda_err;
use super::kernels::{check_len, Kernels};
use crate::comm::Wire;
use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// csrc/params.h AR_MAX_WORLD / AR_MAX_BLOCKS.
pub const MAX_WORLD: usize = 8;
pub const MAX_BLOCKS: usize = 256;
/// csrc/params.h AR_NORM_MAX_ROWS: rows the fused all-reduce + add + RMSNorm takes.
pub const NORM_MAX_ROWS: usize = 16;
const FLAGS: usize = 2 * 2 * MAX_BLOCKS * MAX_WORLD;

/// Mirror of `PeerPtrs`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PeerPtrs {
    pub p: [u64; MAX_WORLD],
}
/// Mirror of `ArParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArParams {
    pub rank: i32,
    pub world: i32,
    pub n: i64,
    pub capacity: i64,
    pub budget: i64,
    pub two_shot: i32,
    pub has_residual: i32,
}
const _: () = {
    assert!(std::mem::size_of::<PeerPtrs>() == 64);
    assert!(std::mem::size_of::<ArParams>() == 40);
    assert!(std::mem::offset_of!(ArParams, n) == 8);
    assert!(std::mem::offset_of!(ArParams, budget) == 24);
    assert!(std::mem::offset_of!(ArParams, two_shot) == 32);
};
// SAFETY: plain-old-data with the C layouts asserted above.
unsafe impl cudarc::driver::DeviceRepr for PeerPtrs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for ArParams {}

/// What one rank registered: device ordinal, context, data and flag addresses.
#[derive(Clone, Copy)]
struct Registered {
    device: usize,
    ctx: usize,
    data: u64,
    flags: u64,
    sms: usize,
}

/// The rendezvous of one group of ranks (shared by their threads).
pub struct P2pGroup {
    world: usize,
    capacity: usize,
    slots: Mutex<Vec<Option<Registered>>>,
    all_in: Condvar,
    /// Ranks that finished with the group (their last kernels done): registered memory is
    /// freed only when every rank has left, since peers read it until their last barrier.
    left: Mutex<usize>,
    all_left: Condvar,
}

impl P2pGroup {
    /// A group of `world` ranks whose all-reduces hold at most `capacity` f32 each. One rank
    /// is allowed (its barriers meet only itself): the engine never makes such a group, but
    /// compute-sanitizer serialises launches, so ranks can never meet under it and its
    /// runs over the P2P kernels use one rank (tests/cuda_allreduce.rs, `single_rank`).
    pub fn new(world: usize, capacity: usize) -> Result<Arc<P2pGroup>> {
        if !(1..=MAX_WORLD).contains(&world) {
            return Err(Error::InvalidArgument(format!(
                "P2P all-reduce supports 1..={MAX_WORLD} ranks, not {world}"
            )));
        }
        Ok(Arc::new(P2pGroup {
            world,
            capacity,
            slots: Mutex::new(vec![None; world]),
            all_in: Condvar::new(),
            left: Mutex::new(0),
            all_left: Condvar::new(),
        }))
    }
}

/// Device memory from `cuMemAlloc` (not the stream-ordered pool that cudarc's allocations
/// come from: pool memory is not reachable through `cuCtxEnablePeerAccess`), zeroed, freed
/// on drop.
struct PeerMem {
    ctx: Arc<cudarc::driver::CudaContext>,
    ptr: sys::CUdeviceptr,
}

impl PeerMem {
    fn zeroed(ctx: &Arc<cudarc::driver::CudaContext>, bytes: usize) -> Result<PeerMem> {
        ctx.bind_to_thread().map_err(cuda_err)?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: plain allocation and a memset of the bytes just allocated. cuMemsetD8 is
        // asynchronous to the host (it runs on the legacy stream, which the rank's
        // non-blocking stream does not wait for): synchronise the context, so no peer's first
        // flag store can land before the zeros and be wiped by them.
        unsafe {
            sys::cuMemAlloc_v2(&mut ptr, bytes.max(4))
                .result()
                .map_err(cuda_err)?;
            sys::cuMemsetD8_v2(ptr, 0, bytes.max(4))
                .result()
                .map_err(cuda_err)?;
            sys::cuCtxSynchronize().result().map_err(cuda_err)?;
        }
        Ok(PeerMem {
            ctx: ctx.clone(),
            ptr,
        })
    }
}

impl Drop for PeerMem {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return; // leaked on purpose (P2pRank::drop)
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemAlloc_v2 above; the owner made sure no kernel uses it.
        unsafe {
            let _ = sys::cuMemFree_v2(self.ptr);
        }
    }
}

/// Width in f32 of each region of a rank's registered data (2 slots x 2 regions): the
/// capacity rounded up to a multiple of 8, so every region starts 16-byte aligned for the
/// kernels' 16-byte peer loads. A rank registers `4 * region_width(capacity)` f32 of data,
/// and `ArParams::capacity` is this width.
pub fn region_width(capacity: usize) -> usize {
    capacity.max(1).next_multiple_of(8)
}

/// The launch shape every all-reduce kernel of `n` elements uses on a grid capped at
/// `max_grid` blocks (the same grid for the same n on every rank and in every kernel: they
/// share counters, flags and slots), or None for nothing to do (n == 0).
///
/// Invariant the protocol rests on: chunk `ch` (elements `256 ch ..`) is handled by block
/// `ch % max_grid` whatever `n` is (the grid is either the chunk count, below `max_grid`, or
/// `max_grid`). Each block keeps its own round counter and alternates its own two slots, so an
/// element must stay with one block from round to round: a grid sized any other way (by
/// 16-byte packs, a per-call cap) would let a peer overwrite a slot another block still reads.
/// `tests::every_chunk_stays_with_one_block_whatever_the_size` holds it.
pub fn launch_config(n: usize, max_grid: usize) -> Option<LaunchConfig> {
    if n == 0 {
        return None;
    }
    let grid = n.div_ceil(256).clamp(1, max_grid.clamp(1, MAX_BLOCKS));
    Some(LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The f32-in, f32-out kernel for a wire type.
fn f32_kernel(wire: Wire) -> &'static str {
    match wire {
        Wire::F32 => "allreduce_f32",
        Wire::Bf16 => "allreduce_f32_bf16wire",
    }
}

/// One rank's registered buffers and its view of the peers.
pub struct P2pRank {
    rank: usize,
    world: usize,
    capacity: usize,
    group: Arc<P2pGroup>,
    /// The stream every collective of this rank runs on (waited for before leaving).
    stream: Arc<CudaStream>,
    /// This rank's registered data and flags (peers read and write them): kept alive here.
    data_mem: PeerMem,
    flags_mem: PeerMem,
    ctr: CudaSlice<u32>,
    err: CudaSlice<u32>,
    /// Per-row partial sums of squares of the fused RMSNorm epilogue, [rows][MAX_BLOCKS].
    norm_scratch: CudaSlice<f32>,
    /// The epilogue's grid barrier among this rank's blocks: {count, generation}.
    gbar: CudaSlice<u32>,
    data_peers: PeerPtrs,
    flag_peers: PeerPtrs,
    budget_ns: i64,
    max_grid: usize,
}

/// Whether device `a` can read device `b`'s memory (same device: always).
pub fn can_access_peer(a: usize, b: usize) -> Result<bool> {
    if a == b {
        return Ok(true);
    }
    let mut ok = 0i32;
    // SAFETY: plain driver query on valid ordinals (checked by the callers' contexts).
    unsafe {
        sys::cuDeviceCanAccessPeer(&mut ok, a as i32, b as i32)
            .result()
            .map_err(cuda_err)?;
    }
    Ok(ok != 0)
}

impl P2pRank {
    /// Allocate and register `rank`'s buffers on `stream`'s device, wait (up to `wait`) for
    /// every peer to register, enable peer access to peers on other devices.
    /// `ranks_per_device` caps the grid for co-residency; `timeout` bounds every spin.
    pub fn join(
        group: &Arc<P2pGroup>,
        rank: usize,
        stream: &Arc<CudaStream>,
        device: usize,
        ranks_per_device: usize,
        timeout: Duration,
        wait: Duration,
    ) -> Result<P2pRank> {
        let (world, capacity) = (group.world, group.capacity);
        if rank >= world {
            return Err(Error::InvalidArgument(format!("rank {rank} of {world}")));
        }
        let ctx = stream.context();
        let data = PeerMem::zeroed(ctx, 4 * region_width(capacity) * 4)?;
        let flags = PeerMem::zeroed(ctx, FLAGS * 4)?;
        let ctr = stream.alloc_zeros::<u32>(MAX_BLOCKS).map_err(cuda_err)?;
        let err = stream.alloc_zeros::<u32>(5).map_err(cuda_err)?;
        let norm_scratch = stream
            .alloc_zeros::<f32>(NORM_MAX_ROWS * MAX_BLOCKS)
            .map_err(cuda_err)?;
        let gbar = stream.alloc_zeros::<u32>(2).map_err(cuda_err)?;
        stream.synchronize().map_err(cuda_err)?; // zeros visible before any peer signals
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err)? as usize;
        let me = Registered {
            device,
            ctx: ctx.cu_ctx() as usize,
            data: data.ptr,
            flags: flags.ptr,
            sms,
        };
        let peers = {
            let mut slots = group.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots[rank] = Some(me);
            group.all_in.notify_all();
            let (slots, to) = group
                .all_in
                .wait_timeout_while(slots, wait, |s| s.iter().any(Option::is_none))
                .unwrap_or_else(|e| e.into_inner());
            if to.timed_out() {
                let missing: Vec<usize> = (0..world).filter(|r| slots[*r].is_none()).collect();
                return Err(Error::Comm(format!(
                    "P2P group: ranks {missing:?} did not register within {wait:?}"
                )));
            }
            slots
                .iter()
                .map(|s| s.expect("all registered"))
                .collect::<Vec<_>>()
        };
        for (p, reg) in peers.iter().enumerate() {
            if reg.device == device {
                continue;
            }
            if !can_access_peer(device, reg.device)? {
                return Err(Error::Comm(format!(
                    "rank {rank} (GPU {device}) cannot access rank {p}'s GPU {}: no P2P",
                    reg.device
                )));
            }
            // SAFETY: both contexts are live primary contexts (held by their ranks); enabling
            // twice returns PEER_ACCESS_ALREADY_ENABLED, which is fine.
            let r = unsafe { sys::cuCtxEnablePeerAccess(reg.ctx as sys::CUcontext, 0) };
            if r != sys::CUresult::CUDA_SUCCESS
                && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
            {
                return Err(Error::Cuda(format!("cuCtxEnablePeerAccess: {r:?}")));
            }
        }
        let mut data_peers = PeerPtrs::default();
        let mut flag_peers = PeerPtrs::default();
        for (p, reg) in peers.iter().enumerate() {
            data_peers.p[p] = reg.data;
            flag_peers.p[p] = reg.flags;
        }
        // every rank must launch the same grid: the smallest GPU of the group sets it
        let sms = peers.iter().map(|p| p.sms).min().unwrap_or(sms);
        Ok(P2pRank {
            rank,
            world,
            capacity,
            group: group.clone(),
            stream: stream.clone(),
            data_mem: data,
            flags_mem: flags,
            ctr,
            err,
            norm_scratch,
            gbar,
            data_peers,
            flag_peers,
            // wall time (%globaltimer), not SM cycles: clocks drop under load
            budget_ns: timeout.as_nanos().min(i64::MAX as u128) as i64,
            max_grid: (sms / ranks_per_device.max(1)).clamp(1, MAX_BLOCKS),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sum all-reduce of `buf[..n]` in place, one-shot or two-shot, with `wire` between
    /// ranks (f32, or each contribution rounded to bf16; the sum is f32 either way).
    pub fn all_reduce(
        &mut self,
        stream: &Arc<CudaStream>,
        kern: &Kernels,
        buf: &mut CudaViewMut<f32>,
        n: usize,
        two_shot: bool,
        wire: Wire,
    ) -> Result<()> {
        check_len("p2p all_reduce", "buf", buf.len(), n)?;
        let ptr = buf.device_ptr(stream).0;
        self.launch(
            stream,
            kern,
            f32_kernel(wire),
            (ptr, ptr, None),
            n,
            two_shot,
        )
    }

    /// Fused residual add: `x[..n] += sum over ranks of m[..n]` (`m` is left as it was).
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_add(
        &mut self,
        stream: &Arc<CudaStream>,
        kern: &Kernels,
        m: &CudaView<f32>,
        x: &mut CudaViewMut<f32>,
        n: usize,
        two_shot: bool,
        wire: Wire,
    ) -> Result<()> {
        check_len("p2p all_reduce_add", "m", m.len(), n)?;
        check_len("p2p all_reduce_add", "x", x.len(), n)?;
        let mp = m.device_ptr(stream).0;
        let xp = x.device_ptr(stream).0;
        self.launch(
            stream,
            kern,
            f32_kernel(wire),
            (mp, xp, Some(xp)),
            n,
            two_shot,
        )
    }

    /// The standard block's attention output in one launch: `x[..rows*d] += sum over ranks
    /// of delta`, then `normed = RMSNorm(x) * weight` per row of `d` (rows <= NORM_MAX_ROWS).
    /// `delta` is left as it was; x and normed are bit-identical on every rank.
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_add_rmsnorm(
        &mut self,
        stream: &Arc<CudaStream>,
        kern: &Kernels,
        (rows, d, eps): (usize, usize, f32),
        delta: &CudaView<f32>,
        x: &mut CudaViewMut<f32>,
        weight: &CudaView<f32>,
        normed: &mut CudaViewMut<f32>,
        two_shot: bool,
        wire: Wire,
    ) -> Result<()> {
        let n = rows * d;
        if rows > NORM_MAX_ROWS {
            return Err(Error::InvalidArgument(format!(
                "fused all-reduce + RMSNorm takes at most {NORM_MAX_ROWS} rows, not {rows}"
            )));
        }
        check_len("all_reduce_add_rmsnorm", "delta", delta.len(), n)?;
        check_len("all_reduce_add_rmsnorm", "x", x.len(), n)?;
        check_len("all_reduce_add_rmsnorm", "weight", weight.len(), d)?;
        check_len("all_reduce_add_rmsnorm", "normed", normed.len(), n)?;
        let Some(cfg) = self.launch_cfg("all-reduce + RMSNorm", n)? else {
            return Ok(());
        };
        let mut p = self.params(n, two_shot);
        p.has_residual = 1;
        let name = match wire {
            Wire::F32 => "allreduce_add_rmsnorm_f32",
            Wire::Bf16 => "allreduce_add_rmsnorm_f32_bf16wire",
        };
        let f = kern.function("allreduce", name)?;
        let (rows32, d32) = (rows as i32, d as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(&rows32)
            .arg(&d32)
            .arg(&eps)
            .arg(&self.data_peers)
            .arg(&self.flag_peers)
            .arg(&mut self.ctr)
            .arg(&mut self.err)
            .arg(delta)
            .arg(x)
            .arg(weight)
            .arg(normed)
            .arg(&mut self.norm_scratch)
            .arg(&mut self.gbar);
        // SAFETY: matches allreduce_add_rmsnorm_f32(_bf16wire) in csrc/allreduce.cu; the
        // lengths were checked above (rows <= AR_NORM_MAX_ROWS fits the scratch, n <= the
        // registered capacity); the scratch and grid barrier are this rank's alone.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }

    /// For an engine whose activations are bf16: `buf[..n]` (in place) becomes the sum over
    /// ranks, accumulated in f32 in rank order and rounded once to bf16 (bit-identical on
    /// every rank); with `residual`, `buf = bf16(residual + sum)` (the fused residual add).
    pub fn all_reduce_bf16(
        &mut self,
        stream: &Arc<CudaStream>,
        kern: &Kernels,
        buf: &mut CudaViewMut<half::bf16>,
        residual: Option<&CudaView<half::bf16>>,
        n: usize,
        two_shot: bool,
    ) -> Result<()> {
        check_len("p2p all_reduce_bf16", "buf", buf.len(), n)?;
        let res = match residual {
            Some(r) => {
                check_len("p2p all_reduce_bf16", "residual", r.len(), n)?;
                Some(r.device_ptr(stream).0)
            }
            None => None,
        };
        let ptr = buf.device_ptr(stream).0;
        self.launch(stream, kern, "allreduce_bf16", (ptr, ptr, res), n, two_shot)
    }

    /// Launch one of the all-reduce kernels on raw pointers (in, out, residual) of at least
    /// n elements of the kernel's input/output type.
    fn launch(
        &mut self,
        stream: &Arc<CudaStream>,
        kern: &Kernels,
        name: &str,
        (input, out, residual): (u64, u64, Option<u64>),
        n: usize,
        two_shot: bool,
    ) -> Result<()> {
        let Some(cfg) = self.launch_cfg("all-reduce", n)? else {
            return Ok(());
        };
        let mut p = self.params(n, two_shot);
        p.has_residual = i32::from(residual.is_some());
        let f = kern.function("allreduce", name)?;
        let res = residual.unwrap_or(0);
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(&self.data_peers)
            .arg(&self.flag_peers)
            .arg(&mut self.ctr)
            .arg(&mut self.err)
            .arg(&input)
            .arg(&out)
            .arg(&res);
        // SAFETY: matches allreduce_f32 / allreduce_f32_bf16wire / allreduce_bf16 in
        // csrc/allreduce.cu (same arguments; the callers checked that the pointers hold n
        // elements of the kernel's type); peers' buffers stay registered for the group's
        // life; n <= capacity checked above (the registered regions are at least capacity
        // f32 wide, enough for either wire type).
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }

    /// The launch shape every all-reduce kernel of `n` elements uses (the same grid for the
    /// same n on every rank and in every kernel: they share counters, flags and slots), or
    /// None for nothing to do; `what` names the caller in the capacity error.
    fn launch_cfg(&self, what: &str, n: usize) -> Result<Option<LaunchConfig>> {
        if n > self.capacity {
            return Err(Error::InvalidArgument(format!(
                "{what} of {n} elements exceeds the registered buffer of {}",
                self.capacity
            )));
        }
        Ok(launch_config(n, self.max_grid))
    }

    fn params(&self, n: usize, two_shot: bool) -> ArParams {
        ArParams {
            rank: self.rank as i32,
            world: self.world as i32,
            n: n as i64,
            capacity: region_width(self.capacity) as i64,
            budget: self.budget_ns,
            two_shot: i32::from(two_shot),
            has_residual: 0,
        }
    }

    /// Fused decode output projection + one-shot all-reduce for `t` tokens: out (t, n) = sum
    /// over ranks of x_r (t, k) @ W_r (n, k)^T, in one launch; each rank's partial crosses
    /// `wire`. Each element is the decode GEMV's (`gemv_bf16_f32`) bits before the sum.
    #[allow(clippy::too_many_arguments)]
    pub fn oproj_all_reduce(
        &mut self,
        stream: &Arc<CudaStream>,
        kern: &Kernels,
        (t, n, k): (usize, usize, usize),
        w: &CudaView<half::bf16>,
        x: &CudaView<f32>,
        out: &mut CudaViewMut<f32>,
        wire: Wire,
    ) -> Result<()> {
        check_len("oproj_all_reduce", "w", w.len(), n * k)?;
        check_len("oproj_all_reduce", "x", x.len(), t * k)?;
        check_len("oproj_all_reduce", "out", out.len(), t * n)?;
        // elements (token, row) map to blocks as all_reduce's elements do
        let Some(cfg) = self.launch_cfg("fused o_proj", t * n)? else {
            return Ok(());
        };
        let p = self.params(t * n, false);
        let name = match wire {
            Wire::F32 => "oproj_allreduce_f32",
            Wire::Bf16 => "oproj_allreduce_f32_bf16wire",
        };
        let f = kern.function("allreduce", name)?;
        let (k32, n32) = (k as i32, n as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(&k32)
            .arg(&n32)
            .arg(w)
            .arg(x)
            .arg(&self.data_peers)
            .arg(&self.flag_peers)
            .arg(&mut self.ctr)
            .arg(&mut self.err)
            .arg(out);
        // SAFETY: matches oproj_allreduce_f32(_bf16wire) in csrc/allreduce.cu (params, k, rows,
        // w, x, peers, flags, ctr, err, out); sizes checked above.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }

    /// The stream this rank's collectives must run on (the one it joined with).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// After a synchronisation: the timeout a block recorded, as a typed error.
    pub fn check(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let e: Vec<u32> = stream.clone_dtoh(&self.err).map_err(cuda_err)?;
        if e[0] != 0 {
            return Err(Error::CommTimeout {
                rank: e[1] as usize,
                peer: e[2] as usize,
                flag: e[3],
                expected: e[4],
            });
        }
        Ok(())
    }
}

impl Drop for P2pRank {
    /// Wait for this rank's last collective, then for every peer to do the same (bounded),
    /// before the registered memory goes: peers read it until their last barrier. If a peer
    /// has not left by then, the memory is leaked instead: a peer kernel still reading freed
    /// memory would fault, and with virtual ranks that error is sticky in the context every
    /// rank shares.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        let g = &self.group;
        let mut left = g.left.lock().unwrap_or_else(|e| e.into_inner());
        *left += 1;
        g.all_left.notify_all();
        let (left, to) = g
            .all_left
            .wait_timeout_while(left, Duration::from_secs(10), |n| *n < g.world)
            .unwrap_or_else(|e| e.into_inner());
        if to.timed_out() {
            eprintln!(
                "syncdrop: P2P rank {} of {}: {} of the ranks left within 10 s; its registered \
                 buffers are leaked rather than freed under peers that may still read them",
                self.rank, g.world, *left
            );
            self.data_mem.ptr = 0;
            self.flags_mem.ptr = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block that handles element `i` of an all-reduce of `n` elements.
    fn block_of(i: usize, n: usize, max_grid: usize) -> usize {
        let grid = launch_config(n, max_grid).unwrap().grid_dim.0 as usize;
        (i / 256) % grid
    }

    #[test]
    fn every_chunk_stays_with_one_block_whatever_the_size() {
        for max_grid in [1, 2, 3, 7, 16, 66, 132, MAX_BLOCKS] {
            let sizes = [
                1,
                255,
                256,
                257,
                4096,
                8192,
                33_000,
                256 * max_grid + 1,
                1 << 20,
            ];
            for &a in &sizes {
                for &b in &sizes {
                    for i in (0..a.min(b)).step_by(97) {
                        assert_eq!(
                            block_of(i, a, max_grid),
                            block_of(i, b, max_grid),
                            "element {i}: n = {a} and n = {b} on a grid capped at {max_grid}"
                        );
                    }
                }
            }
        }
        assert!(launch_config(0, 8).is_none());
    }
}
