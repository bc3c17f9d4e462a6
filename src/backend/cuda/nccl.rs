//! NCCL (libnccl is loaded at run time through cudarc's bindings): the selection chain's
//! choice when P2P is impossible, and the way ranks span processes and machines. One
//! communicator per rank, bound to the rank's communication stream.
//!
//! The 128-byte unique id travels through [`crate::comm::rendezvous`]: in-process ranks
//! through memory, ranks in separate processes through a file or over TCP (rank 0's address,
//! so ranks can span machines). NCCL refuses two ranks on one GPU, so the engine refuses NCCL
//! with virtual ranks.
//!
//! **Nothing hangs.** A rank that never joins, or a peer process that dies mid-collective,
//! would leave a blocking NCCL call (or the stream waiting on its kernel) stuck forever. So
//! the communicator is created non-blocking (`ncclCommInitRankConfig`, `blocking = 0`) and:
//! - init and every call are *settled*: `ncclCommGetAsyncError` polled until it leaves
//!   `ncclInProgress`, within a deadline ([`NcclTimeouts`]); past it the communicator is
//!   aborted and a typed error names what timed out;
//! - a watchdog thread polls `ncclCommGetAsyncError` (every 100 ms) while the rank runs; on
//!   an asynchronous error (a peer's network failure, a remote rank gone) it aborts the
//!   communicator, which ends the kernels a dead peer left spinning, so the rank's stream
//!   waits return; the rank's next collective then reports the recorded reason.
//!
//! cudarc's safe `Comm` hides its handle and creates blocking communicators, so this module
//! calls the raw bindings. All calls on one communicator hold one mutex (the watchdog's polls
//! and abort included); the enqueue calls it guards are short, and a stream wait is outside it.

use crate::comm::rendezvous::{Rendezvous, Terms};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream, CudaViewMut, DevicePtrMut};
use cudarc::nccl::sys;
use std::ffi::{c_char, c_int, c_uint, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether libnccl can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: only probes whether the library can be dlopen-ed.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// NCCL's version as the integer `ncclGetVersion` gives (2.27.3 -> 22703).
pub fn version() -> Result<i32> {
    let mut v: c_int = 0;
    // SAFETY: writes one int.
    let r = unsafe { sys::ncclGetVersion(&mut v) };
    check(r as u32, "ncclGetVersion")?;
    Ok(v)
}

/// `NCCL_VERSION(2, 17, 0)`: the config layout below, and the oldest release with
/// non-blocking communicators and `ncclCommGetAsyncError` in the form used here.
const CONFIG_VERSION: c_uint = 21700;
/// `NCCL_CONFIG_UNDEF_INT`: "let NCCL choose".
const UNDEF_INT: c_int = c_int::MIN;

/// `ncclConfig_t` as NCCL 2.17 laid it out. NCCL reads `size` bytes of it and keeps its own
/// defaults for fields a newer release added, so this prefix works with every release from
/// 2.17 on (init.cc: `parseCommConfig`), whatever version cudarc's bindings were made for.
#[repr(C)]
struct ConfigV217 {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

impl ConfigV217 {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`.
    fn non_blocking() -> ConfigV217 {
        ConfigV217 {
            size: std::mem::size_of::<ConfigV217>(),
            magic: 0xcafe_beef,
            version: CONFIG_VERSION,
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: UNDEF_INT,
        }
    }
}

// ncclResult_t values (read as integers: a newer library may return one the bindings lack)
const NCCL_SUCCESS: u32 = 0;
const NCCL_IN_PROGRESS: u32 = 7;

fn result_name(r: u32) -> &'static str {
    match r {
        0 => "success",
        1 => "unhandled CUDA error",
        2 => "system error (a peer process or the network failed?)",
        3 => "internal error",
        4 => "invalid argument",
        5 => "invalid usage",
        6 => "remote error (a peer rank failed or went away)",
        7 => "in progress",
        8 => "timeout",
        _ => "unknown result",
    }
}

fn check(r: u32, what: &str) -> Result<()> {
    match r {
        NCCL_SUCCESS | NCCL_IN_PROGRESS => Ok(()),
        _ => Err(Error::Comm(format!(
            "NCCL {what}: {} ({r}){}",
            result_name(r),
            last_error()
        ))),
    }
}

/// How long NCCL may take before the rank gives up with an error (and aborts the
/// communicator) instead of hanging.
#[derive(Debug, Clone, Copy)]
pub struct NcclTimeouts {
    /// The id rendezvous plus the communicator's creation (all ranks must join).
    pub init: Duration,
    /// One call to settle (the first collective sets up connections; later ones are quick).
    pub call: Duration,
}

impl Default for NcclTimeouts {
    /// init: `SYNCDROP_RENDEZVOUS_TIMEOUT` (default 120 s); call: 60 s.
    fn default() -> Self {
        NcclTimeouts {
            init: crate::comm::rendezvous::default_wait(),
            call: Duration::from_secs(60),
        }
    }
}

/// The raw handle, movable to the watchdog thread.
#[derive(Clone, Copy)]
struct Handle(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread; every use goes through the
// `Shared::comm` mutex, so calls on it never overlap.
unsafe impl Send for Handle {}

/// What the rank and its watchdog share.
struct Shared {
    /// `None` once aborted (or dropped).
    comm: Mutex<Option<Handle>>,
    /// Why it was aborted.
    reason: Mutex<Option<String>>,
    stop: AtomicBool,
    /// Bound on the thread that aborts (NCCL finds its device itself; this is defensive).
    ctx: Arc<CudaContext>,
}

impl Shared {
    /// `ncclCommGetAsyncError` (the caller holds the lock).
    fn async_state(h: Handle) -> u32 {
        let mut state: u32 = NCCL_SUCCESS;
        // SAFETY: a live communicator; the out-parameter is read as an integer, so a value
        // the bindings' enum lacks is no undefined behaviour.
        let r = unsafe {
            sys::ncclCommGetAsyncError(h.0, &mut state as *mut u32 as *mut sys::ncclResult_t)
        } as u32;
        if r != NCCL_SUCCESS {
            r
        } else {
            state
        }
    }

    /// Abort the communicator (once) and record why. The reason is recorded first and the
    /// handle taken out under the lock, then `ncclCommAbort` runs without it: an abort waits
    /// until every CUDA graph that captured one of the communicator's collectives has been
    /// destroyed, and the owner must be able to see the reason (and drop its graph) meanwhile.
    fn abort(&self, why: String) {
        let h = {
            let mut c = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            let Some(h) = c.take() else {
                return;
            };
            self.reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(why);
            h
        };
        let _ = self.ctx.bind_to_thread();
        // SAFETY: a live communicator, taken out under the lock every call holds, so nothing
        // uses it again.
        unsafe { sys::ncclCommAbort(h.0) };
    }

    fn aborted(&self) -> Error {
        let r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        Error::Comm(format!(
            "NCCL communicator aborted: {}",
            r.as_deref().unwrap_or("by its owner")
        ))
    }

    /// Abort because of `why` and return the error that says so.
    fn fail(&self, why: String) -> Error {
        let e = Error::Comm(format!("NCCL: {why}; communicator aborted"));
        self.abort(why);
        e
    }

    /// Poll until the communicator leaves `ncclInProgress` (`what` settles), aborting it
    /// with a timeout error past `limit`.
    fn settle(&self, what: &str, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut nap = Duration::from_micros(20);
        // a collective on a non-blocking communicator launches from an NCCL thread and
        // settles within microseconds: yield (not sleep) at first, so eager all-reduces pay
        // no sleep granularity
        let spin = Duration::from_micros(200);
        loop {
            let state = {
                let c = self.comm.lock().unwrap_or_else(|e| e.into_inner());
                let Some(h) = *c else {
                    return Err(self.aborted());
                };
                Self::async_state(h)
            };
            match state {
                NCCL_SUCCESS => return Ok(()),
                NCCL_IN_PROGRESS if t0.elapsed() < spin => std::thread::yield_now(),
                NCCL_IN_PROGRESS if t0.elapsed() < limit => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(10));
                }
                NCCL_IN_PROGRESS => {
                    return Err(self.fail(format!(
                        "{what} did not complete within {limit:?} (a rank missing or stuck?)"
                    )));
                }
                r => {
                    return Err(self.fail(format!(
                        "{what}: {} ({r}){}",
                        result_name(r),
                        last_error()
                    )));
                }
            }
        }
    }
}

/// One rank's NCCL communicator on its communication stream, watched for asynchronous errors.
pub struct NcclRank {
    shared: Arc<Shared>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    stream: Arc<CudaStream>,
    world: usize,
    timeouts: NcclTimeouts,
    /// The largest all-reduce `warm` has run.
    warmed: std::cell::Cell<usize>,
}

impl NcclRank {
    /// Join with the default timeouts.
    pub fn join(
        rendezvous: &Rendezvous,
        rank: usize,
        world: usize,
        terms: &Terms,
        stream: &Arc<CudaStream>,
    ) -> Result<NcclRank> {
        Self::join_with(
            rendezvous,
            rank,
            world,
            terms,
            stream,
            NcclTimeouts::default(),
        )
    }

    /// Exchange the id (ranks in separate processes must agree on `terms`: see
    /// [`Rendezvous::exchange`]), create the communicator (every rank of `world` must join
    /// within `timeouts.init`, else this rank aborts it and returns an error) and start its
    /// watchdog.
    pub fn join_with(
        rendezvous: &Rendezvous,
        rank: usize,
        world: usize,
        terms: &Terms,
        stream: &Arc<CudaStream>,
        timeouts: NcclTimeouts,
    ) -> Result<NcclRank> {
        if !available() {
            return Err(Error::Comm(
                "NCCL requested but libnccl could not be loaded: cudarc opens libnccl.so (or libnccl.so.<CUDA major>); where only the runtime's libnccl.so.2 is installed, link it as libnccl.so in a directory on LD_LIBRARY_PATH (scripts/gpu-check.sh does this)".into(),
            ));
        }
        let v = version()?;
        if v < CONFIG_VERSION as i32 {
            return Err(Error::Comm(format!(
                "NCCL {v} is too old: syncdrop needs 2.17 or newer (non-blocking communicators, so that a missing rank is an error, not a hang)"
            )));
        }
        let id = rendezvous.exchange(rank, world, timeouts.init, terms, || {
            let mut id = std::mem::MaybeUninit::<sys::ncclUniqueId>::uninit();
            // SAFETY: fills the id.
            let r = unsafe { sys::ncclGetUniqueId(id.as_mut_ptr()) } as u32;
            check(r, "ncclGetUniqueId")?;
            // SAFETY: initialised by the successful call above.
            let id = unsafe { id.assume_init() };
            Ok(id.internal.map(|c| c as u8))
        })?;
        // the rendezvous was a start barrier: NCCL's init gets its own budget from here
        let t0 = Instant::now();
        // rank 0 clears what the rendezvous left on every way out of here (success,
        // timeout, error)
        struct Finish<'a>(&'a Rendezvous, usize, usize);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.finish(self.1, self.2);
            }
        }
        let _finish = Finish(rendezvous, rank, world);
        let unique = sys::ncclUniqueId {
            internal: id.map(|c| c as c_char),
        };
        // NCCL binds the communicator to the current device
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Comm(format!("NCCL: binding the CUDA context: {e:?}")))?;
        let mut config = ConfigV217::non_blocking();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and config; the config's size and version tell NCCL how
        // much of it to read.
        let r = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                world as c_int,
                unique,
                rank as c_int,
                &mut config as *mut ConfigV217 as *mut sys::ncclConfig_t,
            )
        } as u32;
        if comm.is_null() {
            check(r, "ncclCommInitRankConfig")?;
            return Err(Error::Comm(
                "NCCL ncclCommInitRankConfig returned no communicator".into(),
            ));
        }
        let shared = Arc::new(Shared {
            comm: Mutex::new(Some(Handle(comm))),
            reason: Mutex::new(None),
            stop: AtomicBool::new(false),
            ctx: stream.context().clone(),
        });
        if let Err(e) = check(r, "ncclCommInitRankConfig") {
            shared.abort(e.to_string());
            return Err(e);
        }
        let left = timeouts.init.saturating_sub(t0.elapsed());
        shared.settle(
            &format!("creating the communicator (rank {rank} of {world})"),
            left.max(Duration::from_millis(100)),
        )?;
        let watchdog = {
            let shared2 = shared.clone();
            match std::thread::Builder::new()
                .name(format!("nccl-watchdog-{rank}"))
                .spawn(move || watch(&shared2))
            {
                Ok(w) => w,
                Err(e) => return Err(shared.fail(format!("the watchdog thread: {e}"))),
            }
        };
        Ok(NcclRank {
            shared,
            watchdog: Some(watchdog),
            stream: stream.clone(),
            world,
            timeouts,
            warmed: std::cell::Cell::new(0),
        })
    }

    /// Before a CUDA graph captures collectives of `n` elements: one eager all-reduce of that
    /// size (once per size class), so NCCL sets up the connections its protocol for that
    /// size needs now, not inside the capture. Every rank calls it at the same point (SPMD).
    pub fn warm(&self, n: usize) -> Result<()> {
        if n == 0 || self.warmed.get() >= n {
            return Ok(());
        }
        let mut d = self
            .stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| Error::Cuda(format!("NCCL warm-up buffer: {e:?}")))?;
        self.all_reduce(&mut d.slice_mut(..))?;
        self.drain("the warm-up all-reduce")?;
        self.warmed.set(n);
        Ok(())
    }

    /// Wait (bounded by the call timeout) until the stream has run everything enqueued on it;
    /// a dead peer's abort by the watchdog also ends the wait.
    fn drain(&self, what: &str) -> Result<()> {
        let ev = self
            .stream
            .record_event(None)
            .map_err(|e| Error::Cuda(format!("{e:?}")))?;
        let t0 = Instant::now();
        while !ev.is_complete() {
            if t0.elapsed() > self.timeouts.call {
                return Err(self.shared.fail(format!(
                    "{what} did not finish within {:?}",
                    self.timeouts.call
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        self.check()
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// In-place sum all-reduce on the communicator's stream (enqueued; the stream orders it).
    pub fn all_reduce(&self, buf: &mut CudaViewMut<f32>) -> Result<()> {
        let count = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        let r = {
            let c = self.shared.comm.lock().unwrap_or_else(|e| e.into_inner());
            let Some(h) = *c else {
                return Err(self.shared.aborted());
            };
            // SAFETY: a live communicator; `ptr` holds `count` f32 on this rank's device and
            // stays alive until the stream has run the collective (the caller's buffer
            // outlives the step; `_record` orders later uses after it).
            let r = unsafe {
                sys::ncclAllReduce(
                    ptr as *const std::ffi::c_void,
                    ptr as *mut std::ffi::c_void,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    h.0,
                    self.stream.cu_stream() as _,
                )
            };
            r as u32
        };
        match r {
            NCCL_SUCCESS => Ok(()),
            NCCL_IN_PROGRESS => self.shared.settle("ncclAllReduce", self.timeouts.call),
            r => Err(self.shared.fail(format!(
                "ncclAllReduce: {} ({r}){}",
                result_name(r),
                last_error()
            ))),
        }
    }

    pub fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }

    /// The reason the communicator was aborted, if it was.
    pub fn aborted(&self) -> Option<String> {
        self.shared
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An error naming the reason if the communicator was aborted.
    pub fn check(&self) -> Result<()> {
        match self.aborted() {
            Some(_) => Err(self.shared.aborted()),
            None => Ok(()),
        }
    }
}

/// The watchdog: poll for asynchronous errors until stopped; abort on the first.
fn watch(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        let state = {
            let c = shared.comm.lock().unwrap_or_else(|e| e.into_inner());
            match *c {
                Some(h) => Shared::async_state(h),
                None => return,
            }
        };
        if !matches!(state, NCCL_SUCCESS | NCCL_IN_PROGRESS) {
            let why = format!(
                "asynchronous error {} ({state}), seen by the watchdog",
                result_name(state)
            );
            eprintln!("syncdrop: NCCL: {why}; aborting the communicator");
            shared.abort(why);
            return;
        }
    }
}

impl Drop for NcclRank {
    /// Stop the watchdog, let a healthy communicator finish what is queued (bounded: a
    /// collective killed mid-flight would leave P2P-transport peers spinning), then abort it:
    /// abort (not destroy) also ends a collective a dead peer left hanging, so the stream
    /// waits that follow return. The owner drops its CUDA graphs first (an abort waits for
    /// every graph that captured the communicator's collectives).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        if self.aborted().is_none() {
            let _ = self.drain("the collectives queued at drop");
        }
        self.shared.abort("dropped".into());
    }
}

/// NCCL's last error message as ": <message>" (empty when there is none or libnccl is not
/// loadable: the unit tests run without it).
fn last_error() -> String {
    if !available() {
        return String::new();
    }
    // SAFETY: NCCL returns its last error as a NUL-terminated string it owns (or null); the
    // communicator argument is unused by NCCL.
    let p = unsafe { sys::ncclGetLastError(std::ptr::null_mut()) };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated.
    let m = unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim()
        .to_string();
    if m.is_empty() {
        m
    } else {
        format!(": {m}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config prefix has NCCL 2.17's layout (x86-64 / aarch64: 8-byte size_t and pointer).
    #[test]
    fn config_prefix_has_nccl_2_17s_layout() {
        assert_eq!(std::mem::size_of::<ConfigV217>(), 48);
        assert_eq!(std::mem::offset_of!(ConfigV217, magic), 8);
        assert_eq!(std::mem::offset_of!(ConfigV217, blocking), 16);
        assert_eq!(std::mem::offset_of!(ConfigV217, net_name), 32);
        assert_eq!(std::mem::offset_of!(ConfigV217, split_share), 40);
        let c = ConfigV217::non_blocking();
        assert_eq!((c.magic, c.version, c.blocking), (0xcafebeef, 21700, 0));
        assert_eq!(c.size, 48);
    }

    #[test]
    fn results_other_than_success_and_in_progress_are_errors() {
        assert!(check(0, "x").is_ok() && check(7, "x").is_ok());
        let e = check(6, "ncclAllReduce").unwrap_err().to_string();
        assert!(e.contains("remote error"), "{e}");
        assert!(check(42, "x").unwrap_err().to_string().contains("unknown"));
    }
}
