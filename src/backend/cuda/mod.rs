//! CUDA backend (feature `cuda`). cudarc loads libcuda at run time, so this module compiles
//! on machines without a GPU; every entry point checks for the driver first and returns a
//! typed error instead of panicking.
//!
//! Kernel families live one per file in `csrc/` and are mirrored here one per module
//! (`csrc/rmsnorm.cu` <-> [`rmsnorm`], `csrc/gemv.cu` <-> [`gemv`], ...); [`kernels`] loads
//! the embedded fatbins, [`gemm`] wraps cuBLAS, and [`backend`] puts them behind the
//! [`crate::backend::Backend`] seam. Kernels are tested against the CPU reference on a GPU
//! (tests/cuda_kernels.rs), the whole backend against the CPU backend (tests/cuda_backend.rs).

pub mod allreduce;
pub mod argmax;
pub mod attention;
pub mod backend;
pub mod distill;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod gemv;
#[cfg(feature = "host-sim")]
pub mod host_sim;
pub mod kernels;
pub mod nccl;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod swiglu;
pub mod topology;

pub use backend::CudaBackend;

use crate::comm::rendezvous::{Rendezvous, Terms};
use crate::error::{Error, Result};
use std::sync::Arc;

fn cuda_err(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{e:?}"))
}

/// Driver settings virtual ranks need, applied once before the driver initialises unless
/// the user set them: eager module loading (a lazy first use can wait for a context-wide
/// sync while peer ranks spin in an all-reduce) and 32 hardware work queues (two streams per
/// rank; with the default 8, one rank's queued collective can sit behind a peer's compute
/// kernel that the spinning peers are waiting for).
fn driver_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in [
            ("CUDA_MODULE_LOADING", "EAGER"),
            ("CUDA_DEVICE_MAX_CONNECTIONS", "32"),
        ] {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
    });
}

/// Number of CUDA devices visible, or an error when no driver is present.
pub fn device_count() -> Result<usize> {
    driver_env();
    // SAFETY: only probes whether libcuda can be dlopen-ed; no CUDA call is made before it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "no CUDA driver (libcuda) found on this machine".into(),
        ));
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n as usize)
        .map_err(cuda_err)
}

/// An attribute of device `ordinal` (the driver's `cuDeviceGetAttribute`).
pub fn device_attribute(
    ordinal: usize,
    attr: cudarc::driver::sys::CUdevice_attribute,
) -> Result<i32> {
    let dev = cudarc::driver::result::device::get(ordinal as i32).map_err(cuda_err)?;
    // SAFETY: a plain query on a device handle the driver just returned.
    unsafe { cudarc::driver::result::device::get_attribute(dev, attr) }.map_err(cuda_err)
}

/// Whether GPU 0 can be used: a driver, at least one device, and a context that opens (a
/// driver that loads but fails to initialise is caught here, not at the first kernel).
pub fn probe() -> Result<()> {
    if device_count()? == 0 {
        return Err(Error::Cuda("the CUDA driver sees no device".into()));
    }
    context(0).map(drop)
}

/// A context on device `ordinal`, or a typed error (no driver, no such device).
pub fn context(ordinal: usize) -> Result<Arc<cudarc::driver::CudaContext>> {
    let n = device_count()?;
    if ordinal >= n {
        return Err(Error::Cuda(format!(
            "device {ordinal} requested, {n} visible"
        )));
    }
    cudarc::driver::CudaContext::new(ordinal).map_err(cuda_err)
}

/// The backend of `rank`: on device `rank % devices` (virtual ranks share a GPU). With a
/// group, the rank joins its P2P all-reduce (the selection chain still decides per message);
/// with `nccl` = (rendezvous, world, terms) an NCCL communicator of `world` ranks.
pub fn create(
    dims: crate::backend::RankDims,
    comm: Arc<dyn crate::comm::Communicator>,
    rank: usize,
    graphs: bool,
    group: Option<Arc<allreduce::P2pGroup>>,
    emulate: Option<crate::backend::EmulatedLink>,
    nccl: Option<(Rendezvous, usize, Terms)>,
) -> Result<CudaBackend> {
    let dev = CudaBackend::device_for_rank(rank)?;
    let mut be = CudaBackend::new(dims, comm, dev, graphs)?;
    if let Some((rv, world, terms)) = nccl {
        be.join_nccl(&rv, rank, world, &terms)?;
    }
    if let Some(e) = emulate {
        be.emulate_link(e);
    }
    if let Some(g) = group {
        be.join_p2p(&g)?;
    }
    Ok(be)
}

/// Distillation's training loop on GPU `gpu` ([`distill::GpuTrainer`]): the samples and
/// parameters are copied there once.
pub fn distill_trainer(
    gpu: usize,
    init: &[crate::distill::StudentParams],
    data: &[crate::distill::Sample],
    d: usize,
    eps: f32,
) -> Result<Box<dyn crate::distill::Trainer>> {
    Ok(Box::new(distill::trainer(gpu, init, data, d, eps)?))
}

/// The P2P rendezvous for `world` ranks with all-reduces up to `elems` f32 (None for one
/// rank). Created by the engine, shared by its rank threads.
pub fn p2p_group(world: usize, elems: usize) -> Result<Option<Arc<allreduce::P2pGroup>>> {
    if !(2..=allreduce::MAX_WORLD).contains(&world) {
        return Ok(None);
    }
    allreduce::P2pGroup::new(world, elems).map(Some)
}

/// The NCCL rendezvous for an engine: in-process (its rank threads), through a file or over
/// TCP (ranks in separate processes). None when NCCL is not asked for.
pub fn nccl_rendezvous(mode: &Option<crate::engine::NcclMode>) -> Result<Option<Rendezvous>> {
    use crate::engine::NcclMode;
    Ok(match mode {
        None => None,
        Some(NcclMode::InProcess) => Some(Rendezvous::in_process()),
        Some(NcclMode::File(p)) => Some(Rendezvous::File(p.clone())),
        Some(NcclMode::Tcp(a)) => Some(Rendezvous::Tcp(a.clone())),
    })
}
