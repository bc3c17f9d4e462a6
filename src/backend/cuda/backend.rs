//! The CUDA implementation of the [`Backend`] seam: one rank on one GPU, on one stream.
//!
//! Storage: linear-layer weights and the KV cache in bf16; norm weights, biases and every
//! activation in f32 (the residual stream stays f32, as on the CPU). Products: decode-sized
//! (t <= [`GEMV_MAX_T`]) go through the bandwidth-bound GEMV kernel, longer ones convert the
//! activations to bf16 and call cuBLAS (tensor cores, f32 accumulation).
//!
//! Ranks: the engine runs one host thread per rank and gives each its own `CudaBackend` on
//! device `rank % devices`: with fewer GPUs than ranks, several *virtual ranks* share a GPU,
//! each with its own weight shard, KV cache, two streams (compute and a communication lane)
//! and cuBLAS handle. The sum between ranks is chosen per message by the selection chain
//! (`comm::select`): the P2P one-shot / two-shot kernels, NCCL, or a copy staged through the
//! host communicator.
//!
//! CUDA graphs: with graphs on and every all-reduce of a decode step on the device (one rank,
//! or P2P / NCCL for decode-sized messages; see `graphs()`), the model captures a decode step
//! once and replays it; the position lives in device memory so one graph serves every step.

use super::allreduce::{P2pGroup, P2pRank, NORM_MAX_ROWS};
use super::attention::{self, partial_len, split_plan};
use super::elementwise::{add_f32, f32_to_bf16};
use super::gemm::Gemm;
use super::gemv::gemv_bf16_f32;
use super::kernels::Kernels;
use super::rmsnorm::{add_rmsnorm_f32, rmsnorm_f32};
use super::rope::{qkv_rope_cache, Pos};
use super::swiglu::swiglu_f32;
use super::topology;
use super::{context, cuda_err, device_count};
use crate::backend::{Backend, BlockWeights, EmulatedLink, HeadWeights, RankDims, ReduceMode};
use crate::comm::select::{select, Algo, Topology};
use crate::comm::Wire;
use crate::comm::{CommCounters, CommStats, Communicator};
use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DeviceRepr, PushKernelArg, ValidAsZeroBits,
};
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

/// Products with at most this many rows use the GEMV kernel; longer ones cuBLAS.
pub const GEMV_MAX_T: usize = 4;

/// Spin budget of a P2P all-reduce barrier before it reports `CommTimeout`.
/// Generous against first-use stalls; the timeout test uses its own short budget.
pub const P2P_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

struct DevLayer {
    attn_norm: CudaSlice<f32>,
    wqkv: CudaSlice<bf16>,
    bqkv: Option<CudaSlice<f32>>,
    wo: CudaSlice<bf16>,
    ffn_norm: CudaSlice<f32>,
    w_gate_up: CudaSlice<bf16>,
    w_down: CudaSlice<bf16>,
    q_to_kv: CudaSlice<i32>,
    n_kv: usize,
    ffn: usize,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    comp: Option<DevComp>,
}

/// A block's linear compensation ([`crate::compensate`]): the two factors in bf16.
struct DevComp {
    w_in: CudaSlice<bf16>,
    w_out: CudaSlice<bf16>,
    rank: usize,
}

struct DevHead {
    norm: CudaSlice<f32>,
    w: CudaSlice<bf16>,
}

/// The compute context of one rank: stream, kernels, cuBLAS.
struct Exec {
    stream: Arc<CudaStream>,
    /// The communication lane: every device-side all-reduce runs here, in submission order
    /// (the same on every rank), ordered against the compute stream by events.
    comm: Arc<CudaStream>,
    kern: Kernels,
    gemm: Gemm,
    num_sms: usize,
    /// Inside a graph capture: ops read the position from `pos_dev`, and nothing may
    /// allocate.
    capturing: bool,
    pos_dev: CudaSlice<i32>,
    /// Set when a scratch buffer was reallocated: a captured graph holds the old addresses.
    moved: std::cell::Cell<bool>,
}

/// Reusable activation scratch (grown on demand, never while capturing).
struct Scratch {
    normed: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    gu: CudaSlice<f32>,
    h: CudaSlice<f32>,
    xb: CudaSlice<bf16>,
    partial: CudaSlice<f32>,
    /// Linear compensation: its estimate (t, d) before it is added.
    comp: CudaSlice<f32>,
    /// Linear compensation: unit RMSNorm weights (d), uploaded with the first map.
    ones: Option<CudaSlice<f32>>,
}

pub struct CudaBackend {
    dims: RankDims,
    comm: Arc<dyn Communicator>,
    _ctx: Arc<CudaContext>,
    ex: Exec,
    sc: Scratch,
    layers: Vec<Option<DevLayer>>,
    head: Option<DevHead>,
    stage: Vec<f32>,
    graphs_on: bool,
    /// SYNCDROP_ALLREDUCE, SYNCDROP_FUSED_OPROJ and SYNCDROP_FUSED_NORM, read once (not per
    /// all-reduce).
    env_algo: Option<String>,
    fused_oproj: bool,
    fused_norm: bool,
    /// The selection chain's answer per message size (the topology is fixed once joined).
    algos: std::collections::HashMap<usize, Algo>,
    /// Reused events ordering the lanes for all-reduces that are joined at once.
    ev_fork: CudaEvent,
    ev_join: CudaEvent,
    graph: Option<RankGraph>,
    /// Device ordinal this rank runs on.
    pub device: usize,
    /// The P2P all-reduce, when the rank joined a group; the topology the selector sees.
    p2p: Option<(P2pRank, Topology)>,
    /// The engine offered a P2P group (its ranks share this process), joined or not.
    in_group: bool,
    /// Selection log lines already printed (each fallback is logged once).
    logged: std::collections::HashSet<String>,
    /// Sync points served on the device (P2P, NCCL, emulated holds; the host communicator
    /// counts the staged ones).
    dev_counters: CommCounters,
    /// `set_comm_timing`: time device collectives with event pairs on the lane.
    comm_timing: bool,
    /// Timed collectives whose events `comm_stats` has not read yet.
    lane_timed: std::sync::Mutex<Vec<(CudaEvent, CudaEvent)>>,
    /// Collectives issued while capturing: a graph's replays count them.
    capture_tally: std::cell::Cell<CommStats>,
    emulate: Option<EmulatedLink>,
    /// NCCL on the communication stream, when the engine asked for it.
    nccl: Option<super::nccl::NcclRank>,
}

impl Drop for CudaBackend {
    /// This runs before any field drops (fields then drop in declaration order; every
    /// stream, buffer and module holds its own `Arc` of the context, so `_ctx` going first
    /// among them frees nothing early). The graph goes first: an in-flight graph is freed
    /// when it completes, and NCCL's abort waits until every graph that captured its
    /// collectives is gone. Then NCCL (its drop drains a healthy communicator, bounded, and
    /// aborts, which also ends a collective a dead peer left hanging, so the waits below
    /// return), then both lanes are waited for and the P2P rank (which waits for its peers;
    /// its spins are bounded) dropped while the modules their work runs in are still loaded.
    fn drop(&mut self) {
        self.graph = None;
        self.nccl = None;
        let _ = self.ex.stream.synchronize();
        let _ = self.ex.comm.synchronize();
        self.p2p = None;
    }
}

/// An all-reduce in flight on the communication lane.
pub struct CudaPending {
    buf: Option<CudaSlice<f32>>,
    done: Option<CudaEvent>,
    /// The compute stream, which frees `buf`: dropped un-waited (an error path), it must
    /// still wait for the lane, or the memory could be reused under the running kernel.
    compute: Arc<CudaStream>,
}

impl Drop for CudaPending {
    fn drop(&mut self) {
        if let Some(ev) = self.done.take() {
            let _ = self.compute.wait(&ev);
        }
    }
}

/// A captured decode step. cudarc's graph holds raw driver handles and is not `Send`; a
/// rank's backend is created, used and dropped on its own thread, and a graph launch binds
/// the context first, so moving the handle with the backend is sound.
/// A captured decode step and the collectives each replay runs.
struct RankGraph(CudaGraph, CommStats);
// SAFETY: see above; the graph is never shared, only owned by one backend at a time.
unsafe impl Send for RankGraph {}

fn grow<T: DeviceRepr + ValidAsZeroBits>(
    ex: &Exec,
    buf: &mut CudaSlice<T>,
    n: usize,
) -> Result<()> {
    if buf.len() >= n {
        return Ok(());
    }
    if ex.capturing {
        return Err(Error::Cuda(format!(
            "scratch buffer of {} elements would grow to {n} inside a CUDA-graph capture",
            buf.len()
        )));
    }
    *buf = ex.stream.alloc_zeros::<T>(n).map_err(cuda_err)?;
    ex.moved.set(true);
    Ok(())
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.par_iter().map(|x| bf16::from_f32(*x)).collect()
}

impl Exec {
    fn up_f32(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<f32>(1).map_err(cuda_err);
        }
        self.stream.clone_htod(v).map_err(cuda_err)
    }
    fn up_bf16(&self, v: &[f32]) -> Result<CudaSlice<bf16>> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<bf16>(1).map_err(cuda_err);
        }
        self.stream.clone_htod(&to_bf16(v)).map_err(cuda_err)
    }

    fn pos(&self, pos0: usize) -> Pos<'_> {
        if self.capturing {
            Pos::Device(&self.pos_dev)
        } else {
            Pos::Host(pos0)
        }
    }

    /// y (t, n) = x (t, k) @ W (n, k)^T: GEMV for short t, cuBLAS otherwise.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        xb: &mut CudaSlice<bf16>,
        (t, n, k): (usize, usize, usize),
        w: &CudaView<bf16>,
        x: &CudaView<f32>,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        if t <= GEMV_MAX_T {
            return gemv_bf16_f32(&self.stream, &self.kern, (t, n, k), w, x, y);
        }
        grow(self, xb, t * k)?;
        f32_to_bf16(
            &self.stream,
            &self.kern,
            t * k,
            x,
            &mut xb.slice_mut(..t * k),
        )?;
        self.gemm.bf16_f32((t, n, k), w, &xb.slice(..t * k), y)
    }
}

/// Layer `l`'s weights, or an error naming the layer that was never loaded.
fn loaded(layers: &[Option<DevLayer>], l: usize) -> Result<&DevLayer> {
    layers
        .get(l)
        .and_then(|x| x.as_ref())
        .ok_or_else(|| Error::InvalidArgument(format!("layer {l} was not loaded")))
}

impl CudaBackend {
    /// A rank on device `ordinal` (virtual ranks: several backends on one device).
    pub fn new(
        dims: RankDims,
        comm: Arc<dyn Communicator>,
        ordinal: usize,
        graphs: bool,
    ) -> Result<CudaBackend> {
        let ctx = context(ordinal)?;
        // One stream per rank and every op on it: cudarc's cross-stream event tracking is
        // not needed, and events recorded per buffer would not belong in a graph capture.
        // SAFETY: this context struct is private to this rank; all its buffers live on one
        // stream, so ordering is the stream's.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err)?;
        let ev_fork = ctx.new_event(None).map_err(cuda_err)?;
        let ev_join = ctx.new_event(None).map_err(cuda_err)?;
        // the communication lane at the device's highest stream priority: when ISO overlaps
        // it with GEMMs, its blocks take SMs as soon as any free up, so peers spinning in the
        // same all-reduce are not kept waiting behind this rank's compute (NCCL's and DeepEP's
        // communication streams do the same)
        let (_, highest) =
            cudarc::driver::result::stream::get_priority_range().map_err(cuda_err)?;
        let comm_stream = ctx.new_stream_with_priority(highest).map_err(cuda_err)?;
        let kern = Kernels::load(&ctx)?;
        let gemm = Gemm::new(&stream)?;
        // one small GEMM now, so cuBLAS's own first-use work (module loads, workspace) is
        // done before this rank joins peers that spin in P2P kernels waiting for it
        {
            let a = stream.alloc_zeros::<bf16>(64 * 64).map_err(cuda_err)?;
            let mut c = stream.alloc_zeros::<f32>(64 * 64).map_err(cuda_err)?;
            gemm.bf16_f32(
                (64, 64, 64),
                &a.slice(..),
                &a.slice(..),
                &mut c.slice_mut(..),
            )?;
            stream.synchronize().map_err(cuda_err)?;
        }
        let num_sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err)? as usize;
        let z32 = |n| stream.alloc_zeros::<f32>(n).map_err(cuda_err);
        let sc = Scratch {
            normed: z32(1)?,
            qkv: z32(1)?,
            gu: z32(1)?,
            h: z32(1)?,
            xb: stream.alloc_zeros::<bf16>(1).map_err(cuda_err)?,
            partial: z32(1)?,
            comp: z32(1)?,
            ones: None,
        };
        let pos_dev = stream.alloc_zeros::<i32>(1).map_err(cuda_err)?;
        let n_layers = dims.n_layers;
        // a typo in SYNCDROP_ALLREDUCE fails here, before any weight is loaded, not at the
        // first all-reduce
        let env = crate::comm::select::EnvSwitches::read()?;
        Ok(CudaBackend {
            dims,
            comm,
            _ctx: ctx,
            ex: Exec {
                stream,
                comm: comm_stream,
                kern,
                gemm,
                num_sms,
                capturing: false,
                pos_dev,
                moved: std::cell::Cell::new(false),
            },
            sc,
            layers: (0..n_layers).map(|_| None).collect(),
            head: None,
            stage: Vec::new(),
            graphs_on: graphs,
            env_algo: env.forced.map(|(v, _)| v),
            fused_oproj: env.fused_oproj,
            fused_norm: env.fused_norm,
            algos: Default::default(),
            ev_fork,
            ev_join,
            graph: None,
            device: ordinal,
            p2p: None,
            in_group: false,
            logged: Default::default(),
            dev_counters: CommCounters::default(),
            comm_timing: false,
            lane_timed: Default::default(),
            capture_tally: Default::default(),
            emulate: None,
            nccl: None,
        })
    }

    /// Join an NCCL communicator of `world` ranks on the communication stream (ranks in
    /// separate processes must agree on `terms`).
    pub fn join_nccl(
        &mut self,
        rv: &crate::comm::rendezvous::Rendezvous,
        rank: usize,
        world: usize,
        terms: &crate::comm::rendezvous::Terms,
    ) -> Result<()> {
        self.nccl = Some(super::nccl::NcclRank::join(
            rv,
            rank,
            world,
            terms,
            &self.ex.comm,
        )?);
        self.algos.clear();
        Ok(())
    }

    /// Ranks this rank all-reduces with: NCCL's world when it spans processes, else the
    /// host communicator's.
    fn world(&self) -> usize {
        match &self.nccl {
            Some(n) => n.world(),
            None => self.comm.world(),
        }
    }

    /// Emulate inter-GPU links on this rank's communication lane: every all-reduce also
    /// holds `ctas` CTAs for the profile's modelled time of an all-reduce over `world` ranks
    /// (bf16 messages, as real TP systems send). For one-GPU ISO measurements; the results
    /// stay exact (the real reduction still runs).
    pub fn emulate_link(&mut self, link: EmulatedLink) {
        self.emulate = Some(link);
    }

    /// Launch the emulated link hold for an all-reduce of `n` elements on the comm lane.
    fn hold(&self, n: usize) -> Result<()> {
        let Some(e) = &self.emulate else {
            return Ok(());
        };
        let us = e.profile.all_reduce_us(e.world, (n * 2) as f64);
        // the kernel holds at most 1 s; a NaN or negative model time holds nothing
        let ns = ((us * 1e3) as i64).clamp(0, 1_000_000_000);
        let f = self.ex.kern.function("emulate", "hold_link")?;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (e.ctas.max(1) as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.ex.comm.launch_builder(&f);
        b.arg(&ns);
        // SAFETY: hold_link(int64_t) reads nothing but its argument.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }

    /// The reduction itself on the comm lane (P2P kernels), or None when it must be staged
    /// through the host.
    /// Forks the lane off the compute stream only when the reduction runs there.
    fn reduce_on_lane(&mut self, buf: &mut CudaSlice<f32>, n: usize) -> Result<bool> {
        if self.world() == 1 {
            self.fork()?;
            let t0 = self.lane_t0()?;
            self.hold(n)?;
            self.lane_count(t0, n * self.comm.wire().bytes())?;
            return Ok(true);
        }
        let algo = self.algo(n)?;
        let wire = self.comm.wire();
        if algo == Algo::Nccl {
            if let Some(nc) = &self.nccl {
                self.fork()?;
                let t0 = self.lane_t0()?;
                if wire == Wire::Bf16 {
                    // the same contributions as the other paths; NCCL still moves f32 (its
                    // bf16 sum would round after every ring step)
                    super::elementwise::round_bf16_f32(
                        &self.ex.comm,
                        &self.ex.kern,
                        n,
                        &mut buf.slice_mut(..n),
                    )?;
                }
                nc.all_reduce(&mut buf.slice_mut(..n))?;
                self.hold(n)?;
                self.lane_count(t0, n * 4)?;
                return Ok(true);
            }
        }
        let t0 = if matches!(algo, Algo::OneShot | Algo::TwoShot) && self.p2p.is_some() {
            self.fork()?;
            self.lane_t0()?
        } else {
            None
        };
        if let (Algo::OneShot | Algo::TwoShot, Some((p, _))) = (algo, &mut self.p2p) {
            p.all_reduce(
                &self.ex.comm,
                &self.ex.kern,
                &mut buf.slice_mut(..n),
                n,
                algo == Algo::TwoShot,
                wire,
            )?;
            self.hold(n)?;
            self.lane_count(t0, n * wire.bytes())?;
            return Ok(true);
        }
        Ok(false)
    }

    /// compute -> lane dependency (the lane waits for what compute issued so far).
    fn fork(&self) -> Result<()> {
        self.ev_fork.record(&self.ex.stream).map_err(cuda_err)?;
        self.ex.comm.wait(&self.ev_fork).map_err(cuda_err)
    }

    /// Before a collective on the lane: its start event when timing is on (not while
    /// capturing: a graph's replays are counted, untimed, at launch).
    fn lane_t0(&self) -> Result<Option<CudaEvent>> {
        if !self.comm_timing || self.ex.capturing {
            return Ok(None);
        }
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        self.ex.comm.record_event(flags).map(Some).map_err(cuda_err)
    }

    /// After a collective of `bytes` and its emulated hold: tallied into the graph being
    /// captured, timed by its lane events (read at `comm_stats`), or counted untimed.
    fn lane_count(&self, t0: Option<CudaEvent>, bytes: usize) -> Result<()> {
        let one = CommStats {
            all_reduces: 1,
            bytes: bytes as u64,
            untimed: u64::from(t0.is_none()),
            nanos: 0,
        };
        if self.ex.capturing {
            self.capture_tally.set(self.capture_tally.get() + one);
            return Ok(());
        }
        if let Some(t0) = t0 {
            let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
            let t1 = self.ex.comm.record_event(flags).map_err(cuda_err)?;
            self.lane_timed
                .lock()
                .expect("lane timing lock")
                .push((t0, t1));
        }
        self.dev_counters.add(one);
        Ok(())
    }

    /// compute waits for everything issued on the lane so far (an all-reduce joined at once).
    fn join_lane(&self) -> Result<()> {
        self.ev_join.record(&self.ex.comm).map_err(cuda_err)?;
        self.ex.stream.wait(&self.ev_join).map_err(cuda_err)
    }

    fn pending(&self, buf: CudaSlice<f32>, done: Option<CudaEvent>) -> CudaPending {
        CudaPending {
            buf: Some(buf),
            done,
            compute: self.ex.stream.clone(),
        }
    }

    /// lane -> event the compute stream can wait on.
    fn lane_done(&self) -> Result<CudaEvent> {
        self.ex.comm.record_event(None).map_err(cuda_err)
    }

    /// Register this rank's buffers in `group` and learn the topology. Ranks are placed
    /// `rank % devices`, so the ranks per device follow from the world size.
    pub fn join_p2p(&mut self, group: &Arc<P2pGroup>) -> Result<()> {
        self.in_group = true;
        let world = self.comm.world();
        let n_dev = device_count()?.max(1);
        let rank_devices: Vec<usize> = (0..world).map(|r| r % n_dev).collect();
        let per_device = world.div_ceil(n_dev);
        let devs = topology::distinct(&rank_devices);
        if self.comm.rank() == 0 && devs.len() > 1 {
            for line in topology::survey_lines(&devs)? {
                eprintln!("{line}");
            }
        }
        // every rank computes the same answer, so either all join or none does
        let mut topo = topology::topology(&rank_devices, 0)?;
        let off = if !topo.p2p_all_pairs {
            Some(format!("not every pair of the GPUs {rank_devices:?} can access each other's memory (cuDeviceCanAccessPeer)"))
        } else {
            topology::spin_hazard(&rank_devices)?
        };
        if let Some(why) = off {
            if self.comm.rank() == 0 {
                eprintln!(
                    "all-reduce: P2P kernels off: {why}; the selection chain falls back to NCCL or the staged copy"
                );
            }
            return Ok(());
        }
        let rank = P2pRank::join(
            group,
            self.comm.rank(),
            &self.ex.comm,
            self.device,
            per_device,
            P2P_TIMEOUT,
            std::time::Duration::from_secs(60),
        )?;
        // the registered buffer holds `capacity` elements of the wire type
        topo.custom_buffer_bytes = rank.capacity() * self.comm.wire().bytes();
        self.p2p = Some((rank, topo));
        self.algos.clear();
        Ok(())
    }

    /// The algorithm for an all-reduce of `n` f32 (selection chain + env override), with
    /// each fallback line logged once.
    fn algo(&mut self, n: usize) -> Result<Algo> {
        if let Some(a) = self.algos.get(&n) {
            return Ok(*a);
        }
        let bytes = n * self.comm.wire().bytes();
        let (algo, log) = select(bytes, &self.topology(), self.env_algo.as_deref())?;
        for line in log {
            if self.comm.rank() == 0 && self.logged.insert(line.clone()) {
                eprintln!("syncdrop: {line}");
            }
        }
        self.algos.insert(n, algo);
        Ok(algo)
    }

    /// What the selection chain sees: the P2P group's topology, or none (ranks in other
    /// processes when the engine offered no group), plus NCCL.
    fn topology(&self) -> Topology {
        let mut topo = match &self.p2p {
            Some((_, t)) => *t,
            None => Topology {
                world: self.world(),
                p2p_all_pairs: false,
                one_process: self.in_group,
                nccl_available: false,
                custom_buffer_bytes: 0,
            },
        };
        topo.nccl_available = self.nccl.is_some();
        topo
    }

    /// The device a rank runs on: `rank % devices` (virtual ranks when ranks > devices).
    pub fn device_for_rank(rank: usize) -> Result<usize> {
        let n = device_count()?;
        if n == 0 {
            return Err(Error::Cuda("no CUDA device visible".into()));
        }
        Ok(rank % n)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.ex.stream
    }

    /// For the fused P2P kernels: the executor, layer `l`'s weights and the P2P rank, borrowed
    /// together (the caller checked that the rank joined a P2P group).
    fn p2p_and_layer(&mut self, l: usize) -> Result<(&Exec, &DevLayer, &mut P2pRank)> {
        let Self {
            ex, layers, p2p, ..
        } = self;
        let lay = loaded(layers, l)?;
        let (p, _) = p2p
            .as_mut()
            .ok_or_else(|| Error::Comm("no P2P group joined".into()))?;
        Ok((ex, lay, p))
    }

    fn layer(&self, l: usize) -> Result<&DevLayer> {
        loaded(&self.layers, l)
    }

    /// Size every scratch buffer for a one-token step, so a capture never allocates.
    fn reserve_decode(&mut self) -> Result<()> {
        let d = self.dims.clone();
        let (mut width, mut ffn, mut comp) = (0, 0, 0);
        for l in self.layers.iter().flatten() {
            width = width.max((d.n_q + 2 * l.n_kv) * d.head_dim);
            ffn = ffn.max(l.ffn);
            if let Some(c) = &l.comp {
                comp = d.hidden;
                ffn = ffn.max(c.rank); // its k coordinates go through `h`
            }
        }
        let splits = split_plan(1, d.n_q, d.capacity, 2 * self.ex.num_sms).0;
        let Self { ex, sc, .. } = self;
        grow(ex, &mut sc.normed, d.hidden)?;
        grow(ex, &mut sc.qkv, width)?;
        grow(ex, &mut sc.gu, 2 * ffn)?;
        grow(ex, &mut sc.h, ffn)?;
        grow(ex, &mut sc.comp, comp)?;
        grow(
            ex,
            &mut sc.partial,
            partial_len(1, d.n_q, d.head_dim, splits).max(1),
        )?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Pending = CudaPending;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn dims(&self) -> &RankDims {
        &self.dims
    }

    fn alloc(&mut self, n: usize) -> Result<CudaSlice<f32>> {
        if self.ex.capturing {
            return Err(Error::Cuda("allocation inside a CUDA-graph capture".into()));
        }
        self.ex
            .stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(cuda_err)
    }
    fn upload(&mut self, host: &[f32], buf: &mut CudaSlice<f32>) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        self.ex
            .stream
            .memcpy_htod(host, &mut buf.slice_mut(..host.len()))
            .map_err(cuda_err)
    }
    fn download(&mut self, buf: &CudaSlice<f32>, host: &mut [f32]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        self.ex
            .stream
            .memcpy_dtoh(&buf.slice(..host.len()), host)
            .map_err(cuda_err)?;
        self.ex.stream.synchronize().map_err(cuda_err)?;
        // a P2P all-reduce that timed out since the last synchronisation surfaces here
        match &self.p2p {
            Some((p, _)) => p.check(&self.ex.stream),
            None => Ok(()),
        }
    }

    fn load_layer(&mut self, layer: usize, w: BlockWeights) -> Result<()> {
        let (n_kv, ffn) = w.check(layer, &self.dims)?;
        self.graph_reset();
        if w.comp.is_some() && self.sc.ones.is_none() {
            self.sc.ones = Some(self.ex.up_f32(&vec![1.0; self.dims.hidden])?);
        }
        let d = &self.dims;
        let cache = (n_kv * d.capacity * d.head_dim).max(1);
        let ex = &self.ex;
        let (k, v) = match self.layers[layer].take() {
            Some(old) if old.k.len() == cache => (old.k, old.v),
            _ => (
                ex.stream.alloc_zeros::<bf16>(cache).map_err(cuda_err)?,
                ex.stream.alloc_zeros::<bf16>(cache).map_err(cuda_err)?,
            ),
        };
        let q_to_kv: Vec<i32> = w.q_to_kv.iter().map(|x| *x as i32).collect();
        let q_to_kv = if q_to_kv.is_empty() {
            ex.stream.alloc_zeros::<i32>(1).map_err(cuda_err)?
        } else {
            ex.stream.clone_htod(&q_to_kv).map_err(cuda_err)?
        };
        self.layers[layer] = Some(DevLayer {
            attn_norm: ex.up_f32(&w.attn_norm)?,
            wqkv: ex.up_bf16(&w.wqkv)?,
            bqkv: w.bqkv.as_ref().map(|b| ex.up_f32(b)).transpose()?,
            wo: ex.up_bf16(&w.wo)?,
            ffn_norm: ex.up_f32(&w.ffn_norm)?,
            w_gate_up: ex.up_bf16(&w.w_gate_up)?,
            w_down: ex.up_bf16(&w.w_down)?,
            q_to_kv,
            n_kv,
            ffn,
            k,
            v,
            comp: match &w.comp {
                Some(c) => Some(DevComp {
                    w_in: ex.up_bf16(&c.w_in)?,
                    w_out: ex.up_bf16(&c.w_out)?,
                    rank: c.rank,
                }),
                None => None,
            },
        });
        Ok(())
    }

    fn load_head(&mut self, w: HeadWeights) -> Result<()> {
        if w.norm.len() != self.dims.hidden || w.w.len() != self.dims.vocab * self.dims.hidden {
            return Err(Error::InvalidArgument(
                "LM head weights do not match the rank's shapes".into(),
            ));
        }
        self.graph_reset();
        self.head = Some(DevHead {
            norm: self.ex.up_f32(&w.norm)?,
            w: self.ex.up_bf16(&w.w)?,
        });
        Ok(())
    }

    fn attn_in(
        &mut self,
        layer: usize,
        x: &CudaSlice<f32>,
        t: usize,
        pos0: usize,
        q_out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let (hd, dm) = (d.head_dim, d.hidden);
        let n_kv = self.layer(layer)?.n_kv;
        let width = (d.n_q + 2 * n_kv) * hd;
        let Self { ex, sc, layers, .. } = self;
        let lay = layers[layer].as_mut().expect("checked above");
        grow(ex, &mut sc.normed, t * dm)?;
        grow(ex, &mut sc.qkv, t * width)?;
        rmsnorm_f32(
            &ex.stream,
            &ex.kern,
            t,
            dm,
            d.rms_eps,
            &x.slice(..t * dm),
            &lay.attn_norm.slice(..),
            &mut sc.normed.slice_mut(..t * dm),
        )?;
        ex.matmul(
            &mut sc.xb,
            (t, width, dm),
            &lay.wqkv.slice(..),
            &sc.normed.slice(..t * dm),
            &mut sc.qkv.slice_mut(..t * width),
        )?;
        let bias = lay.bqkv.as_ref().map(|b| b.slice(..));
        qkv_rope_cache(
            &ex.stream,
            &ex.kern,
            (t, d.n_q, n_kv, hd),
            (d.capacity, d.rope_style, d.rope_theta),
            ex.pos(pos0),
            &sc.qkv.slice(..t * width),
            bias.as_ref(),
            &mut q_out.slice_mut(..t * d.n_q * hd),
            &mut lay.k.slice_mut(..),
            &mut lay.v.slice_mut(..),
        )
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &CudaSlice<f32>,
        t: usize,
        pos0: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let hd = d.head_dim;
        let max_len = if self.ex.capturing {
            d.capacity
        } else {
            pos0 + t
        };
        let split = split_plan(t, d.n_q, max_len, 2 * self.ex.num_sms);
        let Self { ex, sc, layers, .. } = self;
        let lay = loaded(layers, layer)?;
        let np = partial_len(t, d.n_q, hd, split.0).max(1);
        grow(ex, &mut sc.partial, np)?;
        attention::attention_f32(
            &ex.stream,
            &ex.kern,
            (t, d.n_q, lay.n_kv, hd, d.capacity),
            ex.pos(pos0),
            split,
            &q.slice(..t * d.n_q * hd),
            &lay.k.slice(..),
            &lay.v.slice(..),
            &lay.q_to_kv,
            &mut out.slice_mut(..t * d.n_q * hd),
            &mut sc.partial.slice_mut(..np),
        )
    }

    fn o_proj(
        &mut self,
        layer: usize,
        attn: &CudaSlice<f32>,
        t: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let qn = d.n_q * d.head_dim;
        let Self { ex, sc, layers, .. } = self;
        let lay = loaded(layers, layer)?;
        ex.matmul(
            &mut sc.xb,
            (t, d.hidden, qn),
            &lay.wo.slice(..),
            &attn.slice(..t * qn),
            &mut out.slice_mut(..t * d.hidden),
        )
    }

    fn spd_compensate(
        &mut self,
        layer: usize,
        x: &CudaSlice<f32>,
        t: usize,
        u: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let n = t * d.hidden;
        let Self { ex, sc, layers, .. } = self;
        let Some(c) = &loaded(layers, layer)?.comp else {
            return Ok(());
        };
        let k = c.rank;
        grow(ex, &mut sc.normed, n)?;
        grow(ex, &mut sc.h, t * k)?;
        grow(ex, &mut sc.comp, n)?;
        rmsnorm_f32(
            &ex.stream,
            &ex.kern,
            t,
            d.hidden,
            d.rms_eps,
            &x.slice(..n),
            &sc.ones
                .as_ref()
                .expect("uploaded with the first map")
                .slice(..),
            &mut sc.normed.slice_mut(..n),
        )?;
        ex.matmul(
            &mut sc.xb,
            (t, k, d.hidden),
            &c.w_in.slice(..),
            &sc.normed.slice(..n),
            &mut sc.h.slice_mut(..t * k),
        )?;
        ex.matmul(
            &mut sc.xb,
            (t, d.hidden, k),
            &c.w_out.slice(..),
            &sc.h.slice(..t * k),
            &mut sc.comp.slice_mut(..n),
        )?;
        add_f32(
            &ex.stream,
            &ex.kern,
            n,
            &mut u.slice_mut(..n),
            &sc.comp.slice(..n),
        )
    }

    fn add_ffn_norm(
        &mut self,
        layer: usize,
        resid: &mut CudaSlice<f32>,
        delta: &CudaSlice<f32>,
        t: usize,
        normed: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let n = t * d.hidden;
        let lay = self.layer(layer)?;
        add_rmsnorm_f32(
            &self.ex.stream,
            &self.ex.kern,
            t,
            d.hidden,
            d.rms_eps,
            &mut resid.slice_mut(..n),
            Some(&delta.slice(..n)),
            &lay.ffn_norm.slice(..),
            &mut normed.slice_mut(..n),
        )
    }

    fn mlp(
        &mut self,
        layer: usize,
        normed: &CudaSlice<f32>,
        t: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let n = t * d.hidden;
        let f = self.layer(layer)?.ffn;
        let Self { ex, sc, layers, .. } = self;
        if f == 0 {
            // More ranks than FFN columns: this rank's MLP shard is empty.
            return ex
                .stream
                .memset_zeros(&mut out.slice_mut(..n))
                .map_err(cuda_err);
        }
        let lay = layers[layer].as_ref().expect("checked above");
        grow(ex, &mut sc.gu, t * 2 * f)?;
        grow(ex, &mut sc.h, t * f)?;
        ex.matmul(
            &mut sc.xb,
            (t, 2 * f, d.hidden),
            &lay.w_gate_up.slice(..),
            &normed.slice(..n),
            &mut sc.gu.slice_mut(..t * 2 * f),
        )?;
        swiglu_f32(
            &ex.stream,
            &ex.kern,
            t,
            f,
            &sc.gu.slice(..t * 2 * f),
            &mut sc.h.slice_mut(..t * f),
        )?;
        ex.matmul(
            &mut sc.xb,
            (t, d.hidden, f),
            &lay.w_down.slice(..),
            &sc.h.slice(..t * f),
            &mut out.slice_mut(..n),
        )
    }

    fn add(&mut self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: usize) -> Result<()> {
        add_f32(
            &self.ex.stream,
            &self.ex.kern,
            n,
            &mut acc.slice_mut(..n),
            &x.slice(..n),
        )
    }

    fn copy(&mut self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.ex
            .stream
            .memcpy_dtod(&src.slice(..n), &mut dst.slice_mut(..n))
            .map_err(cuda_err)
    }

    /// On the communication lane (P2P kernels, or only the emulated link at one rank) with
    /// the compute stream waiting for it, else staged through the host communicator.
    fn all_reduce(&mut self, buf: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        if n == 0 || (self.world() == 1 && self.emulate.is_none()) {
            return Ok(());
        }
        if self.reduce_on_lane(buf, n)? {
            return self.join_lane();
        }
        if self.ex.capturing {
            return Err(Error::Cuda(
                "a host-staged all-reduce cannot be captured in a CUDA graph".into(),
            ));
        }
        if self.comm.world() != self.world() {
            return Err(Error::Comm(format!(
                "a host-staged all-reduce cannot reach the {} ranks of other processes (NCCL only)",
                self.world()
            )));
        }
        let mut stage = std::mem::take(&mut self.stage);
        stage.resize(n, 0.0);
        self.download(buf, &mut stage)?;
        let r = self.comm.all_reduce_sum(&mut stage);
        if r.is_ok() {
            self.upload(&stage, buf)?;
        }
        self.stage = stage;
        r
    }

    /// With the P2P kernels the residual add runs in the all-reduce's epilogue (one kernel
    /// instead of an all-reduce and an add); otherwise the default.
    fn all_reduce_add(
        &mut self,
        m: &mut CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        if n > 0 && self.world() > 1 && self.p2p.is_some() {
            let algo = self.algo(n)?;
            if matches!(algo, Algo::OneShot | Algo::TwoShot) {
                self.fork()?;
                let t0 = self.lane_t0()?;
                let wire = self.comm.wire();
                let (p, _) = self.p2p.as_mut().expect("checked above");
                p.all_reduce_add(
                    &self.ex.comm,
                    &self.ex.kern,
                    &m.slice(..n),
                    &mut x.slice_mut(..n),
                    n,
                    algo == Algo::TwoShot,
                    wire,
                )?;
                self.hold(n)?;
                self.lane_count(t0, n * wire.bytes())?;
                return self.join_lane();
            }
        }
        self.all_reduce(m, n)?;
        self.add(x, m, n)
    }

    /// ISO: the all-reduce goes to the communication lane and the compute stream runs on;
    /// `all_reduce_wait` makes compute wait for it. Staged all-reduces cannot overlap (they
    /// cross the host) and complete here.
    fn all_reduce_start(&mut self, mut buf: CudaSlice<f32>, n: usize) -> Result<CudaPending> {
        if n == 0 || (self.world() == 1 && self.emulate.is_none()) {
            return Ok(self.pending(buf, None));
        }
        if self.reduce_on_lane(&mut buf, n)? {
            let done = Some(self.lane_done()?);
            return Ok(self.pending(buf, done));
        }
        self.all_reduce(&mut buf, n)?;
        Ok(self.pending(buf, None))
    }
    fn all_reduce_wait(&mut self, mut pending: CudaPending) -> Result<CudaSlice<f32>> {
        if let Some(ev) = pending.done.take() {
            self.ex.stream.wait(&ev).map_err(cuda_err)?;
        }
        // nothing left for Drop to wait on; hand the buffer back
        Ok(pending
            .buf
            .take()
            .expect("a pending all-reduce holds its buffer"))
    }

    fn lm_head(
        &mut self,
        x: &CudaSlice<f32>,
        rows: std::ops::Range<usize>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let t = rows.len();
        let Self { ex, sc, head, .. } = self;
        let head = head
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("LM head was not loaded".into()))?;
        grow(ex, &mut sc.normed, t * d.hidden)?;
        rmsnorm_f32(
            &ex.stream,
            &ex.kern,
            t,
            d.hidden,
            d.rms_eps,
            &x.slice(rows.start * d.hidden..rows.end * d.hidden),
            &head.norm.slice(..),
            &mut sc.normed.slice_mut(..t * d.hidden),
        )?;
        ex.matmul(
            &mut sc.xb,
            (t, d.vocab, d.hidden),
            &head.w.slice(..),
            &sc.normed.slice(..t * d.hidden),
            &mut out.slice_mut(..t * d.vocab),
        )
    }

    /// Decode-sized (t <= GEMV_MAX_T) standard blocks can run the fused o_proj + one-shot
    /// all-reduce kernel (SYNCDROP_FUSED_OPROJ=1) when the chain picks one-shot. Off by
    /// default until the GPU sweep (benches/cuda_allreduce.rs, fused vs unfused) shows it wins
    /// on a shape; vLLM saw fusions lose at some sizes.
    fn o_proj_reduce(
        &mut self,
        layer: usize,
        attn: &CudaSlice<f32>,
        t: usize,
        mode: ReduceMode,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let fused = mode == ReduceMode::Reduce
            && t <= GEMV_MAX_T
            && self.p2p.is_some()
            && self.fused_oproj
            && self.algo(t * d.hidden)? == Algo::OneShot;
        if !fused {
            self.o_proj(layer, attn, t, out)?;
            if mode == ReduceMode::Reduce {
                self.all_reduce(out, t * d.hidden)?;
            }
            return Ok(());
        }
        let qn = d.n_q * d.head_dim;
        // on the comm lane like every P2P collective (they share the round counters)
        self.fork()?;
        let t0 = self.lane_t0()?;
        let wire = self.comm.wire();
        let (ex, lay, p) = self.p2p_and_layer(layer)?;
        let n = t * d.hidden;
        p.oproj_all_reduce(
            &ex.comm,
            &ex.kern,
            (t, d.hidden, qn),
            &lay.wo.slice(..),
            &attn.slice(..t * qn),
            &mut out.slice_mut(..n),
            wire,
        )?;
        self.hold(n)?;
        self.lane_count(t0, n * wire.bytes())?;
        self.join_lane()
    }

    /// With SYNCDROP_FUSED_NORM=1, when the chain picks a P2P kernel for up to
    /// NORM_MAX_ROWS rows (decode, short chunks): o_proj, then one kernel for the all-reduce,
    /// the residual add and the FFN RMSNorm (`allreduce_add_rmsnorm_f32`), instead of an
    /// all-reduce kernel and an add + RMSNorm kernel. Off by default until the GPU sweep shows
    /// the saved launch is not lost to the grid barrier it needs. A decode step that the fused
    /// o_proj takes (SYNCDROP_FUSED_OPROJ=1, t <= GEMV_MAX_T, one-shot) keeps that kernel.
    fn attn_out_reduce_norm(
        &mut self,
        layer: usize,
        attn: &CudaSlice<f32>,
        t: usize,
        a: &mut CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        normed: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.dims.clone();
        let n = t * d.hidden;
        let algo =
            if self.fused_norm && t <= NORM_MAX_ROWS && self.world() > 1 && self.p2p.is_some() {
                Some(self.algo(n)?)
            } else {
                None
            };
        let fused = match algo {
            // a decode step that the fused o_proj takes (it needs one-shot) keeps that kernel
            Some(Algo::OneShot) if self.fused_oproj && t <= GEMV_MAX_T => None,
            Some(a @ (Algo::OneShot | Algo::TwoShot)) => Some(a),
            _ => None,
        };
        let Some(algo) = fused else {
            self.o_proj_reduce(layer, attn, t, ReduceMode::Reduce, a)?;
            return self.add_ffn_norm(layer, x, a, t, normed);
        };
        self.o_proj(layer, attn, t, a)?;
        self.fork()?;
        let t0 = self.lane_t0()?;
        let wire = self.comm.wire();
        let (ex, lay, p) = self.p2p_and_layer(layer)?;
        p.all_reduce_add_rmsnorm(
            &ex.comm,
            &ex.kern,
            (t, d.hidden, d.rms_eps),
            &a.slice(..n),
            &mut x.slice_mut(..n),
            &lay.ffn_norm.slice(..),
            &mut normed.slice_mut(..n),
            algo == Algo::TwoShot,
            wire,
        )?;
        self.hold(n)?;
        self.lane_count(t0, n * wire.bytes())?;
        self.join_lane()
    }

    fn comm_stats(&self) -> CommStats {
        // read the lane timings recorded so far (waits for those collectives to finish)
        let timed = std::mem::take(&mut *self.lane_timed.lock().expect("lane timing lock"));
        for (t0, t1) in timed {
            match t0.elapsed_ms(&t1) {
                Ok(ms) => self.dev_counters.add(CommStats {
                    nanos: (f64::from(ms) * 1e6) as u64,
                    ..Default::default()
                }),
                // a failed lane (reported by the op that failed): count it untimed
                Err(_) => self.dev_counters.add(CommStats {
                    untimed: 1,
                    ..Default::default()
                }),
            }
        }
        self.comm.stats() + self.dev_counters.get()
    }
    fn reset_comm_stats(&mut self) {
        self.comm.reset_stats();
        self.dev_counters.reset();
        self.lane_timed.lock().expect("lane timing lock").clear();
    }
    fn set_comm_timing(&mut self, on: bool) {
        self.comm_timing = on;
    }

    /// Graphs need every all-reduce of a decode step on the device: one rank, or a P2P
    /// group whose selection keeps decode-sized messages on the P2P kernels.
    fn graphs(&self) -> bool {
        if !self.graphs_on {
            return false;
        }
        // without P2P or NCCL the chain ends in the host-staged copy, which cannot be captured
        self.world() == 1
            || matches!(
                select(
                    self.dims.hidden * self.comm.wire().bytes(),
                    &self.topology(),
                    self.env_algo.as_deref()
                ),
                Ok((Algo::OneShot | Algo::TwoShot | Algo::Nccl, _))
            )
    }

    fn graph_set_pos(&mut self, pos0: usize) -> Result<()> {
        Error::check_context(pos0, 1, self.dims.capacity)?;
        let ex = &mut self.ex;
        ex.stream
            .memcpy_htod(&[pos0 as i32], &mut ex.pos_dev)
            .map_err(cuda_err)
    }

    fn graph_begin(&mut self) -> Result<()> {
        if !self.graphs() {
            return Err(Error::Cuda("CUDA graphs are off for this rank".into()));
        }
        self.reserve_decode()?;
        if let Some(n) = &self.nccl {
            // NCCL connects lazily per protocol: connect for the decode size now, not inside
            // the capture
            n.warm(self.dims.hidden)?;
        }
        self.ex.stream.synchronize().map_err(cuda_err)?;
        self.ex.moved.set(false);
        self.capture_tally.set(CommStats::default());
        self.ex
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err)?;
        self.ex.capturing = true;
        Ok(())
    }

    fn graph_end(&mut self) -> Result<()> {
        self.ex.capturing = false;
        // an op that failed after forking the lane left it unjoined: join it, so the capture
        // ends (with the op's error reported by the caller) instead of failing as "unjoined"
        if let Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE) =
            self.ex.comm.capture_status()
        {
            let _ = self.ex.stream.join(&self.ex.comm);
        }
        let g = self
            .ex
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(cuda_err)?;
        self.graph = Some(RankGraph(
            g.ok_or_else(|| Error::Cuda("empty CUDA graph".into()))?,
            self.capture_tally.take(),
        ));
        Ok(())
    }

    fn graph_launch(&mut self) -> Result<bool> {
        if let Some(Err(e)) = self.nccl.as_ref().map(|n| n.check()) {
            // a replay would run NCCL kernels that exit at once on the abort flag: garbage
            // sums and no error. Drop the graph (the abort waits for it) and say why.
            self.graph = None;
            return Err(e);
        }
        if self.ex.moved.replace(false) {
            // scratch moved since the capture (a longer prefill): capture again
            self.graph = None;
        }
        match &self.graph {
            Some(g) => {
                g.0.launch().map_err(cuda_err)?;
                // the replay runs the captured collectives again (untimed)
                self.dev_counters.add(g.1);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn graph_reset(&mut self) {
        self.graph = None;
    }
}
