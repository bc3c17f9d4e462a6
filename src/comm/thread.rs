//! Ranks as OS threads: a real shared-memory all-reduce.
//!
//! Protocol (two barriers per all-reduce, reduce-scatter then all-gather):
//! 1. rank r copies its input into `inputs[r]`;                      barrier A
//! 2. rank r sums chunk r of all inputs, **in rank order 0..N**, into `chunks[r]`;  barrier B
//! 3. every rank copies all chunks out.
//!
//! The next call's step 1 can only overwrite `inputs[r]` after barrier B (everyone finished
//! reading inputs), and step 2 can only overwrite `chunks[r]` after the next barrier A
//! (everyone finished copying chunks out), so two barriers suffice. Every element is summed
//! by exactly one rank in a fixed order and then copied, so all ranks hold identical bits.

use super::{CommCounters, CommStats, Communicator, Wire};
use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long a rank waits in a barrier before it declares its peers lost.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(600);

struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
}

/// A reusable barrier that can be aborted and times out instead of hanging forever.
struct AbortableBarrier {
    n: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

impl AbortableBarrier {
    fn wait(&self, rank: usize) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = &s.aborted {
            return Err(Error::Comm(format!("rank {rank}: group aborted: {r}")));
        }
        let gen = s.generation;
        s.arrived += 1;
        if s.arrived == self.n {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + BARRIER_TIMEOUT;
        while s.generation == gen {
            if let Some(r) = &s.aborted {
                return Err(Error::Comm(format!("rank {rank}: group aborted: {r}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Comm(format!(
                    "rank {rank}: barrier timed out after {BARRIER_TIMEOUT:?} ({} of {} arrived)",
                    s.arrived, self.n
                )));
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn abort(&self, reason: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.aborted.get_or_insert_with(|| reason.to_string());
        self.cv.notify_all();
    }
}

struct Shared {
    world: usize,
    inputs: Vec<RwLock<Vec<f32>>>,
    chunks: Vec<RwLock<Vec<f32>>>,
    barrier: AbortableBarrier,
}

/// One rank's handle to a thread group. Create the whole group with [`ThreadComm::group`]
/// and move each handle into its rank's thread.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
    counters: CommCounters,
    wire: Wire,
}

impl ThreadComm {
    /// A group of `world` ranks moving f32 ([`Wire::F32`]).
    pub fn group(world: usize) -> Result<Vec<ThreadComm>> {
        Self::group_with_wire(world, Wire::F32)
    }

    /// A group of `world` ranks whose contributions are rounded to `wire` before the sum.
    pub fn group_with_wire(world: usize, wire: Wire) -> Result<Vec<ThreadComm>> {
        if world == 0 {
            return Err(Error::InvalidArgument("communicator world size 0".into()));
        }
        let shared = Arc::new(Shared {
            world,
            inputs: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
            chunks: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
            barrier: AbortableBarrier {
                n: world,
                state: Mutex::new(BarrierState {
                    arrived: 0,
                    generation: 0,
                    aborted: None,
                }),
                cv: Condvar::new(),
            },
        });
        Ok((0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
                counters: CommCounters::default(),
                wire,
            })
            .collect())
    }

    fn chunk(&self, n: usize, r: usize) -> std::ops::Range<usize> {
        let per = n.div_ceil(self.shared.world);
        (r * per).min(n)..((r + 1) * per).min(n)
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let start = Instant::now();
        let sh = &*self.shared;
        if sh.world > 1 {
            {
                let mut mine = sh.inputs[self.rank]
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                mine.clear();
                mine.extend_from_slice(data);
                self.wire.round(&mut mine);
            }
            sh.barrier.wait(self.rank)?;
            let range = self.chunk(data.len(), self.rank);
            {
                let ins: Vec<_> = sh
                    .inputs
                    .iter()
                    .map(|l| l.read().unwrap_or_else(|p| p.into_inner()))
                    .collect();
                if let Some(bad) = ins.iter().position(|v| v.len() != data.len()) {
                    let msg = format!(
                        "all-reduce length mismatch: rank {} sent {}, rank {bad} sent {}",
                        self.rank,
                        data.len(),
                        ins[bad].len()
                    );
                    sh.barrier.abort(&msg);
                    return Err(Error::Comm(msg));
                }
                let mut out = sh.chunks[self.rank]
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                out.clear();
                out.extend_from_slice(&ins[0][range.clone()]);
                for src in &ins[1..] {
                    for (o, v) in out.iter_mut().zip(&src[range.clone()]) {
                        *o += *v;
                    }
                }
            }
            sh.barrier.wait(self.rank)?;
            for r in 0..sh.world {
                let range = self.chunk(data.len(), r);
                let c = sh.chunks[r].read().unwrap_or_else(|p| p.into_inner());
                data[range].copy_from_slice(&c);
            }
        }
        self.counters.record(start, data.len() * self.wire.bytes());
        Ok(())
    }

    fn wire(&self) -> Wire {
        self.wire
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait(self.rank)
    }

    fn abort(&self, reason: &str) {
        self.shared
            .barrier
            .abort(&format!("rank {}: {reason}", self.rank));
    }

    fn stats(&self) -> CommStats {
        self.counters.get()
    }
    fn reset_stats(&self) {
        self.counters.reset()
    }
}
