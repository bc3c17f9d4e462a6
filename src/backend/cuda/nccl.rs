//! NCCL through cudarc (libnccl is loaded at run time): the selection chain's choice when P2P
//! is impossible, and the way ranks span processes and machines. One communicator per rank,
//! bound to the rank's communication stream.
//!
//! Rendezvous of the 128-byte unique id: in-process ranks share it through memory
//! ([`Rendezvous::InProcess`], made by the engine); ranks in separate processes (one per GPU,
//! or across machines on a shared filesystem) through a file that rank 0 writes atomically
//! (mode 0600, with the world size in a header line the others check) and removes once every
//! rank has joined; the others poll it ([`Rendezvous::File`]). NCCL refuses two ranks on one
//! GPU, so the engine refuses NCCL with virtual ranks.

use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, CudaViewMut};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

fn nccl_err(e: impl std::fmt::Debug) -> Error {
    Error::Comm(format!("NCCL: {e:?}"))
}

/// Whether libnccl can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: only probes whether the library can be dlopen-ed.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// How ranks exchange NCCL's unique id.
#[derive(Clone)]
pub enum Rendezvous {
    /// Threads of one process: rank 0 creates the id, the others wait for it here.
    InProcess(Arc<(Mutex<Option<[std::ffi::c_char; 128]>>, Condvar)>),
    /// Separate processes: rank 0 writes the id to this file, the others read it.
    File(PathBuf),
}

impl Rendezvous {
    pub fn in_process() -> Rendezvous {
        Rendezvous::InProcess(Arc::new((Mutex::new(None), Condvar::new())))
    }

    fn exchange(&self, rank: usize, world: usize, wait: Duration) -> Result<Id> {
        match self {
            Rendezvous::InProcess(cell) => {
                let (lock, cv) = &**cell;
                let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                if rank == 0 {
                    let id = Id::new().map_err(nccl_err)?;
                    *slot = Some(*id.internal());
                    cv.notify_all();
                    return Ok(id);
                }
                let (slot, to) = cv
                    .wait_timeout_while(slot, wait, |s| s.is_none())
                    .unwrap_or_else(|e| e.into_inner());
                match *slot {
                    Some(bytes) if !to.timed_out() => Ok(Id::uninit(bytes)),
                    _ => Err(Error::Comm(format!(
                        "NCCL rendezvous: rank 0 published no id within {wait:?}"
                    ))),
                }
            }
            Rendezvous::File(path) => {
                if rank == 0 {
                    let id = Id::new().map_err(nccl_err)?;
                    let mut bytes = id_header(world).into_bytes();
                    bytes.extend(id.internal().iter().map(|c| *c as u8));
                    // a name no other writer uses, readable by this user only (the id holds
                    // rank 0's address), then an atomic rename
                    let mut tmp = path.clone().into_os_string();
                    tmp.push(format!(".tmp-{}", std::process::id()));
                    let tmp = PathBuf::from(tmp);
                    {
                        use std::io::Write;
                        use std::os::unix::fs::OpenOptionsExt;
                        let mut f = std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .mode(0o600)
                            .open(&tmp)
                            .map_err(|e| Error::io(&tmp, e))?;
                        f.write_all(&bytes).map_err(|e| Error::io(&tmp, e))?;
                    }
                    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
                    return Ok(id);
                }
                let start = Instant::now();
                loop {
                    if let Ok(b) = std::fs::read(path) {
                        if let Some(id) = parse_id_file(&b, world, path)? {
                            return Ok(Id::uninit(id));
                        }
                        // incomplete: still being written by something else; wait
                    }
                    if start.elapsed() > wait {
                        return Err(Error::Comm(format!(
                            "NCCL rendezvous: no complete id in {} after {wait:?} (is rank 0 running?)",
                            path.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// The first line of a rendezvous file: what it is and for which world size.
fn id_header(world: usize) -> String {
    format!("syncdrop-nccl-id v1 world={world}\n")
}

/// The id in a rendezvous file's bytes: `Some` when complete, `None` when not yet (a reader
/// retries), an error for a file that is not a syncdrop id file or was written for another
/// world size (a stale file from an earlier run, most likely).
pub fn parse_id_file(
    bytes: &[u8],
    world: usize,
    path: &std::path::Path,
) -> Result<Option<[std::ffi::c_char; 128]>> {
    let header = id_header(world);
    let Some(nl) = bytes.iter().position(|&c| c == b'\n') else {
        return Ok(None);
    };
    let (head, id) = (&bytes[..=nl], &bytes[nl + 1..]);
    if !head.starts_with(b"syncdrop-nccl-id v1 ") {
        return Err(Error::Comm(format!(
            "{} is not a syncdrop NCCL id file",
            path.display()
        )));
    }
    if head != header.as_bytes() {
        return Err(Error::Comm(format!(
            "NCCL rendezvous file {} was written for another world size ({}), this rank's is {world}; a stale file from an earlier run? delete it",
            path.display(),
            String::from_utf8_lossy(head).trim()
        )));
    }
    if id.len() != 128 {
        return Ok(None);
    }
    let mut out = [0 as std::ffi::c_char; 128];
    for (d, s) in out.iter_mut().zip(id) {
        *d = *s as std::ffi::c_char;
    }
    Ok(Some(out))
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
        let id = rendezvous.exchange(rank, world, Duration::from_secs(120))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, id).map_err(nccl_err)?;
        if let (0, Rendezvous::File(path)) = (rank, rendezvous) {
            // every rank has joined (the init returns when all have): a later run must not
            // find this id
            let _ = std::fs::remove_file(path);
        }
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
