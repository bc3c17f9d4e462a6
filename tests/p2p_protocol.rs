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
    let comms = P2pSimComm::group(3, 16, Duration::from_millis(300), 0).unwrap();
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
