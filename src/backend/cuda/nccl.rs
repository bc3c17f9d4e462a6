//! NCCL through cudarc (libnccl is loaded at run time): the selection chain's choice when P2P
//! is impossible, and the way ranks span processes and machines. One communicator per rank,
//! bound to the rank's communication stream.
//!
//! The 128-byte unique id travels through [`crate::comm::rendezvous`]: in-process ranks
//! through memory, ranks in separate processes through a file or over TCP (rank 0's address,
//! so ranks can span machines). NCCL refuses two ranks on one GPU, so the engine refuses NCCL
//! with virtual ranks.

use crate::comm::rendezvous::Rendezvous;
use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, CudaViewMut};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::sync::Arc;

fn nccl_err(e: impl std::fmt::Debug) -> Error {
    Error::Comm(format!("NCCL: {e:?}"))
}

/// Whether libnccl can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: only probes whether the library can be dlopen-ed.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// One rank's NCCL communicator on its communication stream.
pub struct NcclRank {
    comm: Comm,
}

// SAFETY: the communicator is created, used and destroyed by the one rank thread that owns
// the backend; NCCL communicators may be used from any thread as long as calls on one
// communicator are not concurrent, which single ownership guarantees.
unsafe impl Send for NcclRank {}

impl NcclRank {
    pub fn join(
        rendezvous: &Rendezvous,
        rank: usize,
        world: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<NcclRank> {
        if !available() {
            return Err(Error::Comm(
                "NCCL requested but libnccl was not found on this machine".into(),
            ));
        }
        let wait = crate::comm::rendezvous::default_wait();
        let id = rendezvous.exchange(rank, world, wait, || {
            let id = Id::new().map_err(nccl_err)?;
            Ok(id.internal().map(|c| c as u8))
        })?;
        let comm = Comm::from_rank(
            stream.clone(),
            rank,
            world,
            Id::uninit(id.map(|c| c as std::ffi::c_char)),
        )
        .map_err(nccl_err)?;
        // every rank has joined (the init returns when all have): a later run must not find
        // an id file
        rendezvous.finish(rank);
        Ok(NcclRank { comm })
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// In-place sum all-reduce on the communicator's stream.
    pub fn all_reduce(&self, buf: &mut CudaViewMut<f32>) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(nccl_err)
    }

    pub fn stream(&self) -> Arc<CudaStream> {
        self.comm.stream()
    }
}
