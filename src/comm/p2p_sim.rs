//! The P2P all-reduce barrier protocol, simulated on CPU threads with the same counter logic
//! the CUDA kernels use (DESIGN.md section 5). Each rank owns a buffer that every peer can
//! read (peer memory on GPU, shared memory here) and a flag array that peers write.
//!
//! Protocol of one all-reduce (one-shot), round k of rank r, slot s = k mod 2:
//! 1. write the input into `data[r][s]` (plain stores);
//! 2. signal: for every peer p, store `flags[p][s][r] = c` with **release** order, where c is
//!    r's round counter (u32, wrapping; never reset, so CUDA-graph replays stay valid);
//! 3. wait: for every peer p, spin until `flags[r][s][p] == c` with **acquire** loads, under a
//!    budget; on expiry record (rank, peer, flag seen) and return `CommTimeout`;
//! 4. sum `data[0..N][s]` in rank order 0..N (bit-identical on every rank).
//!
//! The simulation also publishes each round's length beside the data (before the release) and
//! refuses a round whose ranks disagree on it, where the kernels would sum stale elements.
//!
//! Why two slots and one barrier suffice: a rank writes slot s again in round k+2 only after
//! passing round k+1's barrier, which every peer reaches only after finishing round k's reads.
//! Equality (not >=) comparisons make the counters wrap-safe. Only flag stores cross ranks:
//! no peer atomics (read-modify-write over PCIe is not supported).

use super::{CommCounters, CommStats, Communicator};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct RankMem {
    /// data[slot][i] as f32 bits (atomics only so the simulation itself is free of UB when a
    /// protocol bug lets a peer write while we read; ordering comes from the flags)
    data: [Vec<AtomicU32>; 2],
    /// flags[slot][peer]: the round counter peer `peer` last signalled into this rank
    flags: [Vec<AtomicU32>; 2],
    /// len[slot]: how many elements this rank wrote into data[slot] (checked by the peers)
    len: [AtomicUsize; 2],
}

struct Shared {
    world: usize,
    capacity: usize,
    mem: Vec<RankMem>,
    aborted: AtomicBool,
    abort_reason: Mutex<Option<String>>,
    timeout: Duration,
}

/// One rank of a simulated P2P group.
pub struct P2pSimComm {
    rank: usize,
    sh: Arc<Shared>,
    round: AtomicU32,
    counters: CommCounters,
    /// Test hook: skip signalling (a rank that "never arrives").
    pub mute: AtomicBool,
}

impl P2pSimComm {
    /// A group of `world` ranks with buffers of `capacity` f32 and a spin budget of `timeout`.
    /// `start_counter` lets tests start near u32::MAX to exercise wrapping.
    pub fn group(
        world: usize,
        capacity: usize,
        timeout: Duration,
        start_counter: u32,
    ) -> Result<Vec<P2pSimComm>> {
        if world == 0 {
            return Err(Error::InvalidArgument("communicator world size 0".into()));
        }
        let mk = |n: usize, v: u32| (0..n).map(|_| AtomicU32::new(v)).collect::<Vec<_>>();
        let sh = Arc::new(Shared {
            world,
            capacity,
            // flags start one behind the first counter so no stale flag matches round 0
            mem: (0..world)
                .map(|_| RankMem {
                    data: [mk(capacity, 0), mk(capacity, 0)],
                    flags: [
                        mk(world, start_counter.wrapping_sub(1)),
                        mk(world, start_counter.wrapping_sub(2)),
                    ],
                    len: [AtomicUsize::new(0), AtomicUsize::new(0)],
                })
                .collect(),
            aborted: AtomicBool::new(false),
            abort_reason: Mutex::new(None),
            timeout,
        });
        Ok((0..world)
            .map(|rank| P2pSimComm {
                rank,
                sh: sh.clone(),
                round: AtomicU32::new(start_counter),
                counters: CommCounters::default(),
                mute: AtomicBool::new(false),
            })
            .collect())
    }

    /// One round of the protocol (module docs) on `data`, uncounted: an all-reduce, or with
    /// no data a barrier.
    fn exchange(&self, data: &mut [f32]) -> Result<()> {
        let sh = &*self.sh;
        if data.len() > sh.capacity {
            return Err(Error::InvalidArgument(format!(
                "all-reduce of {} elements exceeds the registered buffer of {}",
                data.len(),
                sh.capacity
            )));
        }
        let c = self.round.fetch_add(1, Ordering::Relaxed);
        // slot alternates with the round; counters of the two slots differ by one round
        let s = (c & 1) as usize;
        let me = &sh.mem[self.rank];
        for (d, v) in me.data[s].iter().zip(data.iter()) {
            d.store(v.to_bits(), Ordering::Relaxed);
        }
        me.len[s].store(data.len(), Ordering::Relaxed);
        if !self.mute.load(Ordering::Relaxed) {
            for p in 0..sh.world {
                sh.mem[p].flags[s][self.rank].store(c, Ordering::Release);
            }
        }
        let deadline = Instant::now() + sh.timeout;
        for p in 0..sh.world {
            let mut spins = 0u32;
            loop {
                let seen = me.flags[s][p].load(Ordering::Acquire);
                if seen == c {
                    break;
                }
                if sh.aborted.load(Ordering::Relaxed) {
                    let why = sh.abort_reason.lock().map(|r| r.clone()).ok().flatten();
                    return Err(Error::Comm(format!(
                        "rank {}: group aborted: {}",
                        self.rank,
                        why.unwrap_or_default()
                    )));
                }
                spins = spins.wrapping_add(1);
                if spins % 64 == 0 {
                    if Instant::now() > deadline {
                        return Err(Error::CommTimeout {
                            rank: self.rank,
                            peer: p,
                            flag: seen,
                            expected: c,
                        });
                    }
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
        }
        // every peer's round-c data is visible (acquire above pairs with its release)
        if let Some(p) =
            (0..sh.world).find(|&p| sh.mem[p].len[s].load(Ordering::Relaxed) != data.len())
        {
            return Err(Error::Comm(format!(
                "all-reduce length mismatch: rank {} sent {}, rank {p} sent {}",
                self.rank,
                data.len(),
                sh.mem[p].len[s].load(Ordering::Relaxed)
            )));
        }
        for (i, out) in data.iter_mut().enumerate() {
            let mut acc = f32::from_bits(sh.mem[0].data[s][i].load(Ordering::Relaxed));
            for p in 1..sh.world {
                acc += f32::from_bits(sh.mem[p].data[s][i].load(Ordering::Relaxed));
            }
            *out = acc;
        }
        Ok(())
    }
}

impl Communicator for P2pSimComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.sh.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let start = Instant::now();
        self.exchange(data)?;
        self.counters.record(start, std::mem::size_of_val(data));
        Ok(())
    }

    /// A round with no data (the same flags and counters), not counted as an all-reduce.
    fn barrier(&self) -> Result<()> {
        self.exchange(&mut [])
    }

    fn abort(&self, reason: &str) {
        if let Ok(mut r) = self.sh.abort_reason.lock() {
            r.get_or_insert_with(|| format!("rank {}: {reason}", self.rank));
        }
        self.sh.aborted.store(true, Ordering::Relaxed);
    }

    fn stats(&self) -> CommStats {
        self.counters.get()
    }
    fn reset_stats(&self) {
        self.counters.reset()
    }
}

/// The grid barrier of the fused all-reduce + RMSNorm epilogue (`grid_barrier` in
/// csrc/allreduce.cu), on CPU threads as blocks: read the generation, count the arrival; the
/// last of `blocks` arrivals resets the count and advances the generation (release); the others
/// spin (acquire) until the generation moves, under a budget. The count is back at 0 after
/// every barrier, so consecutive launches may use different block counts (on the GPU stream
/// order separates launches; here the caller joins one launch's threads before the next).
#[derive(Debug)]
pub struct GridBarrierSim {
    count: AtomicU32,
    generation: AtomicU32,
    timeout: Duration,
}

impl GridBarrierSim {
    /// A barrier whose waits give up after `timeout`; `start_generation` near u32::MAX lets
    /// tests exercise wrapping.
    pub fn new(timeout: Duration, start_generation: u32) -> GridBarrierSim {
        GridBarrierSim {
            count: AtomicU32::new(0),
            generation: AtomicU32::new(start_generation),
            timeout,
        }
    }

    /// One block's arrival among `blocks`; returns once all have arrived, or
    /// `Error::CommTimeout` (rank = peer = `block`) when they do not within the budget.
    pub fn wait(&self, blocks: u32, block: usize) -> Result<()> {
        let generation = self.generation.load(Ordering::Acquire);
        let old = self.count.fetch_add(1, Ordering::AcqRel);
        if old + 1 == blocks {
            self.count.store(0, Ordering::Relaxed);
            self.generation
                .store(generation.wrapping_add(1), Ordering::Release);
            return Ok(());
        }
        let t0 = Instant::now();
        loop {
            let seen = self.generation.load(Ordering::Acquire);
            if seen != generation {
                return Ok(());
            }
            if t0.elapsed() > self.timeout {
                return Err(Error::CommTimeout {
                    rank: block,
                    peer: block,
                    flag: seen,
                    expected: generation.wrapping_add(1),
                });
            }
            std::hint::spin_loop();
        }
    }
}
