//! The communicator contract: sum all-reduce and barrier between the ranks of one TP group.
//!
//! Contract every implementation keeps:
//! - `all_reduce_sum` leaves every rank holding the element-wise sum over ranks, summed in
//!   rank order 0, 1, .., N-1, so all ranks get **bit-identical** results;
//! - collectives are called in the same order on every rank (SPMD);
//! - a failing rank calls `abort`, and peers blocked in a collective return an error instead
//!   of hanging.
//!
//! Implementations: [`Identity`] (one rank) and [`thread::ThreadComm`] (ranks are OS threads
//! sharing memory). The CUDA P2P and NCCL communicators implement the same contract on device
//! buffers.

#![warn(missing_docs)]

pub mod p2p_sim;
pub mod rendezvous;
pub mod select;
pub mod thread;

use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub use thread::ThreadComm;

/// Counters every communicator keeps: how many sync points, how long they took (wall time
/// inside the collective, waiting for slower ranks included), and how many bytes were reduced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommStats {
    /// All-reduces completed (the sync points); barriers are not counted.
    pub all_reduces: u64,
    /// Wall time inside those all-reduces, in nanoseconds.
    pub nanos: u64,
    /// Bytes reduced: elements times the communicator's [`Wire::bytes`] (at one rank too,
    /// where nothing crosses a wire: what TP would move). A barrier moves no data and is not
    /// counted. The CUDA backend's NCCL path counts 4 bytes an element on a bf16 wire too:
    /// it rounds the contributions to bf16 like the others but has NCCL sum f32, so that is
    /// what moves.
    pub bytes: u64,
    /// Of `all_reduces`, those whose time `nanos` leaves out: device collectives that ran
    /// asynchronously while lane timing was off (`Backend::set_comm_timing`), and every
    /// collective replayed in a captured CUDA graph. 0 on the CPU backend.
    pub untimed: u64,
}

impl std::ops::Add for CommStats {
    type Output = CommStats;
    fn add(self, o: CommStats) -> CommStats {
        CommStats {
            all_reduces: self.all_reduces + o.all_reduces,
            nanos: self.nanos + o.nanos,
            bytes: self.bytes + o.bytes,
            untimed: self.untimed + o.untimed,
        }
    }
}

impl CommStats {
    /// `nanos` in seconds.
    pub fn seconds(&self) -> f64 {
        self.nanos as f64 * 1e-9
    }

    /// "" when every collective was timed, else " (N of them untimed)" for a report line.
    pub fn untimed_note(&self) -> String {
        if self.untimed == 0 {
            String::new()
        } else {
            format!(
                " ({} of them untimed: asynchronous on the device)",
                self.untimed
            )
        }
    }
}

/// A communicator's running [`CommStats`], kept in relaxed atomics so that collectives taking
/// `&self` can count.
#[derive(Debug, Default)]
pub struct CommCounters {
    all_reduces: AtomicU64,
    nanos: AtomicU64,
    bytes: AtomicU64,
    untimed: AtomicU64,
}

impl CommCounters {
    /// Add counts measured elsewhere (device collectives, graph replays).
    pub fn add(&self, s: CommStats) {
        self.all_reduces.fetch_add(s.all_reduces, Ordering::Relaxed);
        self.nanos.fetch_add(s.nanos, Ordering::Relaxed);
        self.bytes.fetch_add(s.bytes, Ordering::Relaxed);
        self.untimed.fetch_add(s.untimed, Ordering::Relaxed);
    }
    /// Count one all-reduce of `bytes` that began at `start` (timed from then to now).
    pub fn record(&self, start: Instant, bytes: usize) {
        self.all_reduces.fetch_add(1, Ordering::Relaxed);
        self.nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    /// The counts so far.
    pub fn get(&self) -> CommStats {
        CommStats {
            all_reduces: self.all_reduces.load(Ordering::Relaxed),
            nanos: self.nanos.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            untimed: self.untimed.load(Ordering::Relaxed),
        }
    }
    /// Set every count back to zero.
    pub fn reset(&self) {
        self.all_reduces.store(0, Ordering::Relaxed);
        self.nanos.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.untimed.store(0, Ordering::Relaxed);
    }
}

/// What an all-reduce puts on the wire between ranks.
///
/// - [`Wire::F32`]: the callers' f32 values, summed exactly as given (the default; every
///   accuracy number in docs/ACCURACY.md was measured this way).
/// - [`Wire::Bf16`]: each rank's contribution is rounded once to bf16 (round to nearest
///   even) before it leaves the rank, halving the bytes moved, as bf16 inference engines
///   communicate. The sum is still accumulated in f32 in rank order, so all ranks hold the
///   same bits and the CPU and CUDA backends agree exactly (the P2P kernels'
///   `allreduce_f32_bf16wire` applies the same rounding).
///
/// At one rank nothing crosses a wire and nothing is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    /// f32 values as given: 4 bytes an element, exact.
    #[default]
    F32,
    /// Each rank's contribution rounded once to bf16: 2 bytes an element.
    Bf16,
}

impl Wire {
    /// Bytes per element on the wire.
    pub fn bytes(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::Bf16 => 2,
        }
    }

    /// The name `--wire` takes (the inverse of [`FromStr`](std::str::FromStr)).
    pub fn name(self) -> &'static str {
        match self {
            Wire::F32 => "f32",
            Wire::Bf16 => "bf16",
        }
    }

    /// Round `data` in place to what the wire carries.
    pub fn round(self, data: &mut [f32]) {
        if self == Wire::Bf16 {
            for x in data {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        }
    }
}

impl std::str::FromStr for Wire {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Wire> {
        match s {
            "f32" => Ok(Wire::F32),
            "bf16" => Ok(Wire::Bf16),
            _ => Err(crate::error::Error::InvalidArgument(format!(
                "unknown all-reduce wire type {s:?}: use f32 or bf16"
            ))),
        }
    }
}

/// One rank's handle to the collectives of its TP group; every implementation keeps the
/// contract in the module docs (rank-order sums, SPMD call order, `abort` wakes the peers).
pub trait Communicator: Send + Sync {
    /// This rank's index in the group, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world(&self) -> usize;
    /// What this group's all-reduces put on the wire (see [`Wire`]).
    fn wire(&self) -> Wire {
        Wire::F32
    }
    /// In-place sum over ranks, in rank order (see the module contract).
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// Return once every rank of the group has called it; an error when the group was
    /// aborted or the wait timed out.
    fn barrier(&self) -> Result<()>;
    /// Wake every peer blocked in a collective with an error (call when this rank fails).
    fn abort(&self, reason: &str);
    /// This rank's counters since it was created or last reset.
    fn stats(&self) -> CommStats;
    /// Set this rank's counters back to zero.
    fn reset_stats(&self);
}

/// The single-rank communicator: every collective is the identity. Keeps the TP=1 path the
/// same code as the TP=N path; it still counts sync points. Its wire only matters to a
/// backend that reduces with ranks of other processes itself (one rank per process, NCCL).
#[derive(Debug, Default)]
pub struct Identity {
    counters: CommCounters,
    wire: Wire,
}

impl Identity {
    /// A single rank whose [`Communicator::wire`] reports `wire` (it rounds nothing itself).
    pub fn with_wire(wire: Wire) -> Identity {
        Identity {
            counters: CommCounters::default(),
            wire,
        }
    }
}

impl Communicator for Identity {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn wire(&self) -> Wire {
        self.wire
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        self.counters
            .record(Instant::now(), data.len() * self.wire.bytes());
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _reason: &str) {}
    fn stats(&self) -> CommStats {
        self.counters.get()
    }
    fn reset_stats(&self) {
        self.counters.reset()
    }
}
