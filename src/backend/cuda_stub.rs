//! Stand-in for the CUDA backend when syncdrop is built without the `cuda` feature: the
//! same names, each returning `Error::NotCompiledWithCuda`.

use crate::comm::rendezvous::Rendezvous;
use crate::error::{Error, Result};

/// Number of CUDA devices visible; always an error without the `cuda` feature.
pub fn device_count() -> Result<usize> {
    Err(Error::NotCompiledWithCuda)
}

/// Whether a GPU can be used; always an error without the `cuda` feature.
pub fn probe() -> Result<()> {
    Err(Error::NotCompiledWithCuda)
}

/// Without the feature no CUDA rank can exist: the alias only lets the engine name the type
/// in code that [`create`] never lets run.
pub type CudaBackend = crate::backend::cpu::CpuBackend;

/// Always `Error::NotCompiledWithCuda`.
pub fn create(
    _dims: crate::backend::RankDims,
    _comm: std::sync::Arc<dyn crate::comm::Communicator>,
    _rank: usize,
    _graphs: bool,
    _group: Option<std::sync::Arc<P2pGroup>>,
    _emulate: Option<crate::backend::EmulatedLink>,
    _nccl: Option<(Rendezvous, usize, crate::comm::rendezvous::Terms)>,
) -> Result<CudaBackend> {
    Err(Error::NotCompiledWithCuda)
}

/// Stand-in for the P2P rendezvous (never constructed without the feature).
pub enum P2pGroup {}

/// Without the feature there is no P2P group.
pub fn p2p_group(_world: usize, _elems: usize) -> Result<Option<std::sync::Arc<P2pGroup>>> {
    Ok(None)
}

/// NCCL needs the `cuda` feature.
pub fn nccl_rendezvous(mode: &Option<crate::engine::NcclMode>) -> Result<Option<Rendezvous>> {
    match mode {
        None => Ok(None),
        Some(_) => Err(Error::NotCompiledWithCuda),
    }
}

/// GPU distillation needs the `cuda` feature.
pub fn distill_trainer(
    _gpu: usize,
    _init: &[crate::distill::StudentParams],
    _data: &[crate::distill::Sample],
    _d: usize,
    _eps: f32,
) -> Result<Box<dyn crate::distill::Trainer>> {
    Err(Error::NotCompiledWithCuda)
}
