//! The P2P all-reduce barrier protocol, simulated on CPU threads with the GPU kernels' counter
//! logic: bit-identical and exact results, no lost wake-ups under random delays, wrapping
//! counters, consecutive all-reduces that never mix data, and a timeout (not a hang) when a
//! rank never arrives.

use proptest::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use syncdrop::comm::p2p_sim::P2pSimComm;
use syncdrop::comm::Communicator;
use syncdrop::Error;

fn run<T: Send + 'static>(
    comms: Vec<P2pSimComm>,
    f: impl Fn(usize, &P2pSimComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let hs: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, &c))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Tagged data: rank r in round k contributes (k * 16 + r) at every element (exact in f32),
    /// so a value from the wrong round or a missing rank shows up in the sum.
    #[test]
    fn rounds_never_mix_and_counters_wrap(world in 2usize..=8, rounds in 1usize..200,
                                          n in prop::sample::select(vec![0usize, 1, 7, 8, 9, 300]),
                                          start in prop::sample::select(vec![0u32, 7, u32::MAX - 3, u32::MAX]),
                                          jitter in any::<u64>()) {
        let comms = P2pSimComm::group(world, 512, Duration::from_secs(20), start).unwrap();
        let out = run(comms, move |r, c| {
            let mut s = jitter ^ (r as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut sums = Vec::with_capacity(rounds);
            for k in 0..rounds {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                if s % 7 == 0 { std::thread::sleep(Duration::from_micros(s % 300)); }
                let mut d = vec![(k * 16 + r) as f32; n];
                c.all_reduce_sum(&mut d).unwrap();
                sums.push(d.first().copied());
            }
            sums
        });
        let tri = (world * (world - 1) / 2) as f32;
        for (r, sums) in out.iter().enumerate() {
            for (k, v) in sums.iter().enumerate() {
                if let Some(v) = v {
                    prop_assert_eq!(*v, (k * 16 * world) as f32 + tri, "rank {} round {}", r, k);
                }
            }
            prop_assert_eq!(sums, &out[0]);
        }
    }
}

#[test]
fn ten_thousand_back_to_back_all_reduces() {
    let comms = P2pSimComm::group(4, 64, Duration::from_secs(30), 0).unwrap();
    let out = run(comms, |r, c| {
        let mut last = 0.0;
        for k in 0..10_000u32 {
            let mut d = [(k % 1000) as f32 + r as f32; 4];
            c.all_reduce_sum(&mut d).unwrap();
            last = d[3];
        }
        (last, c.stats().all_reduces)
    });
    for (v, n) in out {
        assert_eq!(v, 4.0 * 999.0 + 6.0);
        assert_eq!(n, 10_000);
    }
}

#[test]
fn a_rank_that_never_arrives_times_out_with_its_name() {
    let comms = P2pSimComm::group(3, 16, Duration::from_millis(1000), 0).unwrap();
    comms[2].mute.store(true, Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    let out = run(comms, |_, c| c.all_reduce_sum(&mut [1.0; 4]));
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    for (r, res) in out.iter().enumerate() {
        match res {
            Err(Error::CommTimeout {
                rank,
                peer,
                expected,
                ..
            }) => {
                assert_eq!(*rank, r);
                assert_eq!(*peer, 2, "rank {r} should be waiting for the mute rank");
                assert_eq!(*expected, 0);
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

#[test]
fn oversized_messages_are_rejected() {
    let comms = P2pSimComm::group(2, 8, Duration::from_secs(1), 0).unwrap();
    assert!(comms[0].all_reduce_sum(&mut [0.0; 9]).is_err());
}

/// One simulated launch of `blocks` blocks: each writes its partial for this launch, meets
/// the others at the grid barrier, then reads every partial (what the RMSNorm epilogue does).
/// Returns what each block saw.
fn grid_launch(
    bar: &Arc<syncdrop::comm::p2p_sim::GridBarrierSim>,
    scratch: &Arc<Vec<std::sync::atomic::AtomicU64>>,
    launch: u64,
    blocks: usize,
    delay_seed: u64,
) -> Vec<Result<Vec<u64>, Error>> {
    let hs: Vec<_> = (0..blocks)
        .map(|b| {
            let (bar, scratch) = (bar.clone(), scratch.clone());
            std::thread::spawn(move || {
                // random small delays shuffle the arrival order
                let d = (delay_seed.wrapping_mul(b as u64 + 1) >> 7) % 300;
                std::thread::sleep(Duration::from_micros(d));
                scratch[b].store(launch * 1000 + b as u64, Ordering::Relaxed);
                bar.wait(blocks as u32, b)?;
                Ok((0..blocks)
                    .map(|q| scratch[q].load(Ordering::Relaxed))
                    .collect())
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Consecutive launches with different block counts: no block leaves the barrier before
    /// every block of its launch wrote its partial, and the generation may wrap.
    #[test]
    fn grid_barrier_releases_only_after_every_block_arrived(
        launches in prop::collection::vec(1usize..12, 1..12),
        start in prop::sample::select(vec![0u32, u32::MAX - 3]),
        seed in any::<u64>()) {
        let bar = Arc::new(syncdrop::comm::p2p_sim::GridBarrierSim::new(Duration::from_secs(5), start));
        let scratch = Arc::new((0..16).map(|_| std::sync::atomic::AtomicU64::new(u64::MAX)).collect::<Vec<_>>());
        for (l, &blocks) in launches.iter().enumerate() {
            let seen = grid_launch(&bar, &scratch, l as u64, blocks, seed ^ l as u64);
            for (b, s) in seen.into_iter().enumerate() {
                let s = s.unwrap();
                let want: Vec<u64> = (0..blocks).map(|q| l as u64 * 1000 + q as u64).collect();
                prop_assert_eq!(s, want, "launch {} block {}", l, b);
            }
        }
    }
}

#[test]
fn grid_barrier_times_out_when_a_block_never_arrives() {
    let bar = syncdrop::comm::p2p_sim::GridBarrierSim::new(Duration::from_millis(50), 0);
    // two of three blocks arrive
    let t0 = std::time::Instant::now();
    let bar = Arc::new(bar);
    let hs: Vec<_> = (0..2)
        .map(|b| {
            let bar = bar.clone();
            std::thread::spawn(move || bar.wait(3, b))
        })
        .collect();
    for (b, h) in hs.into_iter().enumerate() {
        match h.join().unwrap() {
            Err(Error::CommTimeout { rank, peer, .. }) => assert_eq!((rank, peer), (b, b)),
            other => panic!("block {b}: {other:?}"),
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
}
