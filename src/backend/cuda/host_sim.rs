//! The kernels' own CUDA C++ run on the host (feature `host-sim`), for testing them on a
//! machine without a GPU.
//!
//! build.rs compiles every `csrc/*.cu` with a C++ compiler against `csrc/host_sim/`: a
//! stand-in `cuda_bf16.h` (qualifiers, bf16 and vector types, intrinsics) and `sim.cpp`, a
//! scheduler that runs each CUDA thread of a block as a fiber on the block's OS thread. So
//! `__shared__` memory is per block, `__syncthreads` waits for every live thread, a
//! full-mask warp shuffle needs all 32 lanes (a lane that returned is an error, as it is
//! undefined behaviour on a GPU), and a block that can never finish is reported as a
//! deadlock instead of hanging. Blocks run spread over the cores (each wholly on one OS
//! thread), or each on its own OS thread at once
//! ([`Blocks::Concurrent`]) for kernels whose blocks wait for each other or for other
//! ranks' blocks (the P2P all-reduce with ranks as threads, the fused norm's grid barrier).
//!
//! What it checks: indexing, bounds of the launch shape, reduction orders, barrier and
//! shuffle discipline, the P2P protocol across ranks. What it cannot: timing, occupancy,
//! register spills, the GPU memory model beyond sequential consistency, `__expf`'s
//! approximation (the host uses `expf`), or out-of-bounds accesses, which read host memory.
//! Kernels take host pointers in place of device pointers; [`kernels`] declares them with
//! the parameter structs the CUDA modules mirror.
//!
//! ```no_run
//! use syncdrop::backend::cuda::{host_sim, rmsnorm::RmsNormParams};
//! let (rows, d) = (2usize, 64usize);
//! let x = vec![1.0f32; rows * d];
//! let w = vec![1.0f32; d];
//! let mut y = vec![0.0f32; rows * d];
//! let p = RmsNormParams { rows: rows as i32, d: d as i32, eps: 1e-5, has_delta: 0 };
//! let out = host_sim::Ptr(y.as_mut_ptr());
//! let cfg = host_sim::cfg((rows as u32, 1, 1), (128, 1, 1));
//! host_sim::launch(cfg, host_sim::Blocks::Sequential, || unsafe {
//!     host_sim::kernels::rmsnorm_f32(p, x.as_ptr(), w.as_ptr(), out.get())
//! })
//! .unwrap();
//! ```

use cudarc::driver::LaunchConfig;
use std::ffi::{c_char, c_void};

/// How the blocks of a launch run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocks {
    /// One after another on the calling thread (deterministic; enough for every kernel whose
    /// blocks are independent).
    Sequential,
    /// Each block on its own OS thread, all at once: kernels with a grid barrier, and each
    /// rank's launch of a P2P collective (the ranks' blocks meet at peer barriers).
    Concurrent,
}

/// Fiber stack per simulated thread. The kernels keep a few hundred bytes of locals; the
/// rest is headroom for the C++ runtime and an unoptimised build.
pub const STACK_BYTES: usize = 64 * 1024;

/// A launch shape, as the CUDA modules build them.
pub fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// A raw pointer that closures run by many simulated threads may capture: the kernels'
/// device pointers are host pointers here, shared as they are on a GPU.
#[derive(Debug, Clone, Copy)]
pub struct Ptr<T>(pub *mut T);
// SAFETY: a kernel argument; which thread writes where is the kernel's business, as on a GPU.
unsafe impl<T> Send for Ptr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Ptr<T> {}
impl<T> Ptr<T> {
    /// The pointer. Call this inside the closure (not `.0`): a closure that names only the
    /// field captures the bare pointer, which is not `Sync`.
    pub fn get(self) -> *mut T {
        self.0
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SimDim3 {
    x: u32,
    y: u32,
    z: u32,
}

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn syncdrop_sim_launch(
        grid: SimDim3,
        block: SimDim3,
        concurrent: i32,
        thunk: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
        stack_bytes: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn syncdrop_sim_spins() -> i64;
}

extern "C" fn thunk<F: Fn() + Sync>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `&F` that `launch` passed, alive until the launch returns.
    let f = unsafe { &*(ctx as *const F) };
    // a panic must not unwind through the scheduler's C++ frames
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        eprintln!("host_sim: a simulated thread panicked");
        std::process::abort();
    }
}

/// Runs `f` as every thread of the launch `cfg` (typically one call of a [`kernels`]
/// function) and returns when all blocks are done, or the simulator's first error: a
/// deadlock (with the waiting threads and their barriers), or a warp shuffle with a lane
/// missing. `shared_mem_bytes` must be 0 (no kernel here uses dynamic shared memory).
pub fn launch<F: Fn() + Sync>(cfg: LaunchConfig, blocks: Blocks, f: F) -> Result<(), String> {
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    if cfg.shared_mem_bytes != 0 {
        return Err("host_sim: dynamic shared memory is not simulated".into());
    }
    if [g.0, g.1, g.2, b.0, b.1, b.2].contains(&0) {
        return Err(format!("host_sim: empty launch {g:?} x {b:?}"));
    }
    let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
    if threads > 1024 {
        return Err(format!(
            "host_sim: {threads} threads per block (a GPU allows 1024)"
        ));
    }
    let mut err = vec![0u8; 1024];
    // SAFETY: `f` outlives the call, which joins every thread it starts; `err` holds
    // err.len() bytes.
    let rc = unsafe {
        syncdrop_sim_launch(
            SimDim3 {
                x: g.0,
                y: g.1,
                z: g.2,
            },
            SimDim3 {
                x: b.0,
                y: b.1,
                z: b.2,
            },
            (blocks == Blocks::Concurrent) as i32,
            thunk::<F>,
            &f as *const F as *mut c_void,
            STACK_BYTES,
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
    Err(format!(
        "host_sim: {}",
        String::from_utf8_lossy(&err[..end])
    ))
}

/// How many times simulated threads have yielded in spin loops since the process started
/// (a P2P barrier that had to wait for a peer shows up here).
pub fn spins() -> i64 {
    // SAFETY: reads an atomic counter.
    unsafe { syncdrop_sim_spins() }
}

/// The kernels of `csrc/*.cu`, compiled for the host: the same names and parameters as on
/// the GPU, host pointers for device pointers (`bf16` for `__nv_bfloat16`, `u64` addresses
/// in [`PeerPtrs`](super::allreduce::PeerPtrs)). Call them only inside [`launch`].
pub mod kernels {
    use super::super::{
        allreduce::{ArParams, PeerPtrs},
        argmax::ArgmaxParams,
        attention::AttnParams,
        distill::{AdamParams, DistillNormParams, MseParams},
        elementwise::ElemParams,
        embedding::EmbedParams,
        gemv::GemvParams,
        rmsnorm::RmsNormParams,
        rope::{QkvRopeParams, RopeParams},
        sample::SampleParams,
        swiglu::SwigluParams,
    };
    use half::bf16;

    #[allow(clippy::too_many_arguments)]
    extern "C" {
        // csrc/rmsnorm.cu
        pub fn add_rmsnorm_bf16(
            p: RmsNormParams,
            residual: *mut bf16,
            delta: *const bf16,
            weight: *const bf16,
            out: *mut bf16,
        );
        pub fn add_rmsnorm_f32(
            p: RmsNormParams,
            residual: *mut f32,
            delta: *const f32,
            weight: *const f32,
            out: *mut f32,
        );
        pub fn rmsnorm_f32(p: RmsNormParams, x: *const f32, weight: *const f32, out: *mut f32);
        // csrc/gemv.cu
        pub fn gemv_bf16(p: GemvParams, w: *const bf16, x: *const bf16, y: *mut bf16);
        pub fn gemv_bf16_f32(p: GemvParams, w: *const bf16, x: *const f32, y: *mut f32);
        // csrc/rope.cu
        pub fn rope_bf16(p: RopeParams, x: *mut bf16);
        pub fn qkv_rope_cache(
            p: QkvRopeParams,
            pos_ptr: *const i32,
            qkv: *const f32,
            bias: *const f32,
            q_out: *mut f32,
            kc: *mut bf16,
            vc: *mut bf16,
        );
        // csrc/attention.cu
        pub fn attention_f32(
            p: AttnParams,
            pos_ptr: *const i32,
            q: *const f32,
            kc: *const bf16,
            vc: *const bf16,
            q_to_kv: *const i32,
            out: *mut f32,
            part: *mut f32,
        );
        pub fn attention_combine_f32(p: AttnParams, part: *const f32, out: *mut f32);
        // csrc/swiglu.cu
        pub fn swiglu_bf16(p: SwigluParams, gu: *const bf16, h: *mut bf16);
        pub fn swiglu_f32(p: SwigluParams, gu: *const f32, h: *mut f32);
        // csrc/elementwise.cu
        pub fn add_f32(p: ElemParams, acc: *mut f32, x: *const f32);
        pub fn f32_to_bf16(p: ElemParams, x: *const f32, y: *mut bf16);
        pub fn round_bf16_f32(p: ElemParams, x: *mut f32);
        // csrc/embedding.cu
        pub fn embedding_f32(p: EmbedParams, ids: *const u32, table: *const bf16, out: *mut f32);
        // csrc/argmax.cu
        pub fn argmax_f32(p: ArgmaxParams, logits: *const f32, out: *mut u32);
        // csrc/sample.cu
        pub fn sample_f32(p: SampleParams, logits: *const f32, u: *const f32, out: *mut u32);
        // csrc/emulate.cu
        pub fn hold_link(ns: i64);
        // csrc/distill.cu
        pub fn distill_norm_fwd(
            p: DistillNormParams,
            x: *const f32,
            a: *const f32,
            w: *const f32,
            u: *mut f32,
            n: *mut f32,
            rinv: *mut f32,
        );
        pub fn distill_swiglu_bwd(p: SwigluParams, gu: *const f32, ds: *const f32, dgu: *mut f32);
        pub fn distill_norm_bwd(
            p: DistillNormParams,
            u: *const f32,
            rinv: *const f32,
            w: *const f32,
            dn: *const f32,
            dout: *const f32,
            da: *mut f32,
        );
        pub fn distill_norm_wgrad(
            p: DistillNormParams,
            u: *const f32,
            rinv: *const f32,
            dn: *const f32,
            dw: *mut f32,
        );
        pub fn distill_mse(
            p: MseParams,
            out: *const f32,
            target: *const f32,
            dout: *mut f32,
            partial: *mut f64,
        );
        pub fn distill_adam(
            p: AdamParams,
            param: *mut f32,
            grad: *const f32,
            m: *mut f32,
            v: *mut f32,
        );
        // csrc/allreduce.cu
        pub fn allreduce_f32(
            p: ArParams,
            data: PeerPtrs,
            flags: PeerPtrs,
            ctr: *mut u32,
            err: *mut u32,
            input: *const f32,
            out: *mut f32,
            residual: *const f32,
        );
        pub fn allreduce_f32_bf16wire(
            p: ArParams,
            data: PeerPtrs,
            flags: PeerPtrs,
            ctr: *mut u32,
            err: *mut u32,
            input: *const f32,
            out: *mut f32,
            residual: *const f32,
        );
        pub fn allreduce_bf16(
            p: ArParams,
            data: PeerPtrs,
            flags: PeerPtrs,
            ctr: *mut u32,
            err: *mut u32,
            input: *const bf16,
            out: *mut bf16,
            residual: *const bf16,
        );
        pub fn oproj_allreduce_f32(
            p: ArParams,
            k: i32,
            rows: i32,
            w: *const bf16,
            x: *const f32,
            data: PeerPtrs,
            flags: PeerPtrs,
            ctr: *mut u32,
            err: *mut u32,
            out: *mut f32,
        );
        pub fn oproj_allreduce_f32_bf16wire(
            p: ArParams,
            k: i32,
            rows: i32,
            w: *const bf16,
            x: *const f32,
            data: PeerPtrs,
            flags: PeerPtrs,
            ctr: *mut u32,
            err: *mut u32,
            out: *mut f32,
        );
        pub fn allreduce_add_rmsnorm_f32(
            p: ArParams,
            rows: i32,
            d: i32,
            eps: f32,
            data: PeerPtrs,
            flags: PeerPtrs,
            ctr: *mut u32,
            err: *mut u32,
            delta: *const f32,
            x: *mut f32,
            weight: *const f32,
            normed: *mut f32,
            scratch: *mut f32,
            gbar: *mut u32,
        );
        pub fn allreduce_add_rmsnorm_f32_bf16wire(
            p: ArParams,
            rows: i32,
            d: i32,
            eps: f32,
            data: PeerPtrs,
            flags: PeerPtrs,
            ctr: *mut u32,
            err: *mut u32,
            delta: *const f32,
            x: *mut f32,
            weight: *const f32,
            normed: *mut f32,
            scratch: *mut f32,
            gbar: *mut u32,
        );
    }
}
