//! The thread communicator: bit-identical results on every rank, exact sums on
//! integer-valued data, tagged contributions, and errors (not hangs) on misuse.

use proptest::prelude::*;
use std::sync::Arc;
use syncdrop::comm::{Communicator, Identity, ThreadComm, Wire};

/// Run `f(rank, comm)` on one thread per rank; collect results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &ThreadComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = ThreadComm::group(world)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, &c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn rank_data(rank: usize, n: usize, seed: u64, integer: bool) -> Vec<f32> {
    let mut s = seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 33) as i64;
            if integer {
                // small integers times powers of two: every partial sum is exact in f32
                ((u % 201) - 100) as f32 * [0.25f32, 1.0, 4.0][(u as usize >> 8) % 3]
            } else {
                (u as f32 / (1u64 << 31) as f32 - 0.5) * 1e3
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn all_reduce_is_bit_identical_and_exact(world in 1usize..=8,
        n in prop::sample::select(vec![0usize, 1, 2, 7, 8, 9, 15, 16, 17, 100, 1000, 4099]),
        seed in any::<u64>(), integer in any::<bool>(), repeats in 1usize..4) {
        let out = on_ranks(world, move |r, c| {
            let mut last = Vec::new();
            for k in 0..repeats {
                let mut d = rank_data(r, n, seed.wrapping_add(k as u64), integer);
                c.all_reduce_sum(&mut d).unwrap();
                last = d;
            }
            last
        });
        for (r, o) in out.iter().enumerate() {
            prop_assert_eq!(o.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            out[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "rank {} differs from rank 0", r);
        }
        // reference: the same data summed in rank order on one thread
        let last_seed = seed.wrapping_add(repeats as u64 - 1);
        let mut expect = vec![0f32; n];
        for r in 0..world {
            for (e, v) in expect.iter_mut().zip(rank_data(r, n, last_seed, integer)) {
                *e += v;
            }
        }
        if integer {
            prop_assert_eq!(&out[0], &expect);
        } else {
            for (a, b) in out[0].iter().zip(&expect) {
                prop_assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }
    }
}

#[test]
fn tagged_contributions_name_their_source() {
    // Rank r contributes 2^r at element r only: the sum shows each rank's bit exactly once.
    for world in [2, 3, 5, 8] {
        let out = on_ranks(world, move |r, c| {
            let mut d = vec![0f32; world];
            d[r] = (1u32 << r) as f32;
            c.all_reduce_sum(&mut d).unwrap();
            d
        });
        let expect: Vec<f32> = (0..world).map(|r| (1u32 << r) as f32).collect();
        assert!(out.iter().all(|o| *o == expect), "world {world}: {out:?}");
    }
}

#[test]
fn consecutive_all_reduces_never_mix_data() {
    let out = on_ranks(4, |r, c| {
        (0..500)
            .map(|k| {
                let mut d = vec![(k * 10 + r) as f32; 33];
                c.all_reduce_sum(&mut d).unwrap();
                d[32]
            })
            .collect::<Vec<_>>()
    });
    for o in &out {
        for (k, v) in o.iter().enumerate() {
            assert_eq!(*v, (40 * k + 6) as f32);
        }
    }
}

#[test]
fn counts_sync_points_and_time() {
    let out = on_ranks(3, |_, c| {
        for _ in 0..7 {
            let mut d = vec![1f32; 10];
            c.all_reduce_sum(&mut d).unwrap();
        }
        c.stats()
    });
    for s in out {
        assert_eq!(s.all_reduces, 7);
        assert_eq!(s.bytes, 7 * 40);
        assert!(s.nanos > 0);
        // host collectives block, so every one is timed
        assert_eq!((s.untimed, s.untimed_note()), (0, String::new()));
    }
    let id = Identity::default();
    id.all_reduce_sum(&mut [1.0, 2.0]).unwrap();
    assert_eq!(id.stats().all_reduces, 1);
}

/// Every communicator counts alike: bytes are elements times its wire's bytes (one rank
/// included), and a barrier is not an all-reduce.
#[test]
fn communicators_count_wire_bytes_and_not_barriers() {
    use syncdrop::comm::p2p_sim::P2pSimComm;
    use syncdrop::comm::CommStats;
    // 2 barriers around 3 all-reduces of 5 elements, on every rank of a group
    fn exercise(comms: Vec<impl Communicator + 'static>) -> Vec<CommStats> {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    c.barrier().unwrap();
                    for _ in 0..3 {
                        c.all_reduce_sum(&mut [1.0; 5]).unwrap();
                    }
                    c.barrier().unwrap();
                    c.stats()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }
    let counts = |s: &[CommStats]| -> Vec<(u64, u64)> {
        s.iter().map(|s| (s.all_reduces, s.bytes)).collect()
    };
    for wire in [Wire::F32, Wire::Bf16] {
        let b = 3 * 5 * wire.bytes() as u64;
        let one = exercise(vec![Identity::with_wire(wire)]);
        assert_eq!(counts(&one), [(3, b)], "Identity, {wire:?} wire");
        for world in [1, 3] {
            let s = exercise(ThreadComm::group_with_wire(world, wire).unwrap());
            assert_eq!(
                counts(&s),
                vec![(3, b); world],
                "ThreadComm {world}, {wire:?}"
            );
        }
    }
    let p2p = P2pSimComm::group(3, 8, std::time::Duration::from_secs(20), 0).unwrap();
    assert_eq!(
        counts(&exercise(p2p)),
        vec![(3, 3 * 5 * 4); 3],
        "P2pSimComm"
    );
}

/// What the CUDA backend adds for device collectives and graph replays.
#[test]
fn counters_add_device_collectives_and_say_which_are_untimed() {
    use syncdrop::comm::{CommCounters, CommStats};
    let c = CommCounters::default();
    c.record(std::time::Instant::now(), 40);
    let replay = CommStats {
        all_reduces: 61,
        bytes: 61 * 2304,
        untimed: 61,
        nanos: 0,
    };
    c.add(replay);
    c.add(replay);
    let s = c.get();
    assert_eq!(
        (s.all_reduces, s.bytes, s.untimed),
        (123, 40 + 2 * 61 * 2304, 122)
    );
    assert!(
        s.untimed_note().contains("122 of them untimed"),
        "{}",
        s.untimed_note()
    );
    c.reset();
    assert_eq!(c.get(), CommStats::default());
}

#[test]
fn length_mismatch_is_an_error_on_every_rank() {
    let out = on_ranks(3, |r, c| {
        let mut d = vec![1f32; 4 + usize::from(r == 1)];
        c.all_reduce_sum(&mut d)
    });
    assert!(out.iter().all(|r| r.is_err()), "{out:?}");
}

#[test]
fn abort_wakes_blocked_peers() {
    let t0 = std::time::Instant::now();
    let out = on_ranks(4, |r, c| {
        if r == 2 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            c.abort("rank 2 failed to load");
            return Err(syncdrop::Error::Comm("aborted".into()));
        }
        let mut d = vec![1f32; 8];
        c.all_reduce_sum(&mut d)
    });
    assert!(out.iter().all(|r| r.is_err()));
    assert!(t0.elapsed().as_secs() < 5);
    let msg = out[0].as_ref().unwrap_err().to_string();
    assert!(msg.contains("rank 2 failed to load"), "{msg}");
}

#[test]
fn zero_world_is_rejected() {
    assert!(ThreadComm::group(0).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The bf16 wire: each contribution rounded once to bf16 (round to nearest even), summed
    /// in f32 in rank order from 0; the same bits on every rank. This is the CPU mirror the
    /// CUDA kernels' `allreduce_f32_bf16wire` is tested against (tests/cuda_allreduce.rs).
    #[test]
    fn bf16_wire_rounds_each_contribution_once_then_sums_in_f32(world in 2usize..=8,
        n in prop::sample::select(vec![1usize, 2, 7, 9, 100, 1000, 4099]), seed in any::<u64>()) {
        let handles: Vec<_> = ThreadComm::group_with_wire(world, Wire::Bf16)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(r, c)| std::thread::spawn(move || {
                let mut d = rank_data(r, n, seed, false);
                c.all_reduce_sum(&mut d).unwrap();
                (d, c.stats().bytes, c.wire())
            }))
            .collect();
        let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // sums start from rank 0's value (as the GPU kernels' do), then add in rank order
        let mut expect: Vec<f32> = rank_data(0, n, seed, false)
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        let mut exact = rank_data(0, n, seed, false);
        for r in 1..world {
            for ((e, x), v) in expect.iter_mut().zip(exact.iter_mut()).zip(rank_data(r, n, seed, false)) {
                *e += half::bf16::from_f32(v).to_f32();
                *x += v;
            }
        }
        for (r, (d, bytes, wire)) in out.iter().enumerate() {
            prop_assert_eq!(d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            expect.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "rank {}", r);
            prop_assert_eq!(*bytes, 2 * n as u64, "two bytes per element on the wire");
            prop_assert_eq!(*wire, Wire::Bf16);
        }
        // random floats in [-500, 500) are not bf16 values: the rounding shows
        prop_assert!(expect != exact);
    }
}

#[test]
fn wire_parses_and_identity_never_rounds() {
    assert_eq!("bf16".parse::<Wire>().unwrap(), Wire::Bf16);
    assert_eq!("f32".parse::<Wire>().unwrap(), Wire::F32);
    let e = "fp8".parse::<Wire>().unwrap_err().to_string();
    assert!(e.contains("f32 or bf16"), "{e}");
    // one rank: nothing crosses a wire, nothing is rounded
    let id = Identity::with_wire(Wire::Bf16);
    let mut d = vec![1.0f32 + 1e-3, -7.654_321];
    let before = d.clone();
    id.all_reduce_sum(&mut d).unwrap();
    assert_eq!(d, before);
    assert_eq!(id.wire(), Wire::Bf16);
    // the default group moves f32 exactly
    assert_eq!(ThreadComm::group(2).unwrap()[0].wire(), Wire::F32);
}
