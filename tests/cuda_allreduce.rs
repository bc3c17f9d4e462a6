//! The P2P all-reduce kernels (csrc/allreduce.cu) with virtual ranks on one GPU: exact and
//! tagged oracles, sizes around the pack width up to 64 MiB, 10,000 back-to-back rounds,
//! CUDA-graph capture and replay, and the timeout path (a rank that never arrives). Run by
//! scripts/gpu-check.sh; without a GPU each test says "skipped" and passes. The protocol
//! itself is property-tested on CPU threads in tests/p2p_protocol.rs.

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_allreduce_skipped_without_the_feature() {
    eprintln!("skipped: built without the `cuda` feature");
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};
    use syncdrop::backend::cuda::allreduce::{P2pGroup, P2pRank};
    use syncdrop::backend::cuda::{context, kernels::Kernels};
    use syncdrop::comm::Wire;
    use syncdrop::Error;

    /// GPU 0 usable, or "skipped: no GPU" (a failure under SYNCDROP_REQUIRE_GPU=1).
    fn have_gpu() -> bool {
        syncdrop::backend::gpu_or_skip("cuda_allreduce")
    }

    /// The simulated driver (csrc/host_sim/fake_cuda.cpp) runs every kernel on CPU threads.
    fn simulated() -> bool {
        context(0)
            .ok()
            .and_then(|c| c.name().ok())
            .is_some_and(|n| n.starts_with("syncdrop simulated GPU"))
    }

    /// The spin budget of a test that expects success: 1 s on a GPU (where every case here is
    /// micro- to milliseconds of work), 60 s on the simulated driver, whose 8 ranks' kernels
    /// share CI's 2 cores and can arrive seconds apart under load.
    fn healthy() -> Duration {
        Duration::from_secs(if simulated() { 60 } else { 1 })
    }

    /// Run `f(rank, stream, kernels, p2p)` on `world` virtual ranks (threads) of GPU 0 and
    /// collect the results in rank order.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        capacity: usize,
        timeout: Duration,
        f: impl Fn(usize, &Arc<cudarc::driver::CudaStream>, &Kernels, &mut P2pRank) -> T
            + Send
            + Sync
            + 'static,
    ) -> Vec<T> {
        let group = P2pGroup::new(world, capacity).unwrap();
        let f = Arc::new(f);
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (group, f) = (group.clone(), f.clone());
                std::thread::spawn(move || {
                    let ctx = context(0).unwrap();
                    // one stream per rank; a graph capture must not wait on events recorded
                    // before it (cudarc's per-buffer tracking would insert such waits)
                    // SAFETY: every buffer of this rank lives on its one stream.
                    unsafe { ctx.disable_event_tracking() };
                    let stream = ctx.new_stream().unwrap();
                    let kern = Kernels::load(&ctx).unwrap();
                    let mut p = P2pRank::join(
                        &group,
                        r,
                        &stream,
                        0,
                        world,
                        timeout,
                        Duration::from_secs(30),
                    )
                    .unwrap();
                    f(r, &stream, &kern, &mut p)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Virtual ranks on one GPU always reach each other; NVML (matched by PCI bus id) and
    /// the driver describe GPU 0 without error.
    #[test]
    fn topology_of_virtual_ranks_and_the_nvml_survey() {
        if !have_gpu() {
            return;
        }
        use syncdrop::backend::cuda::topology::{survey_lines, topology};
        let t = topology(&[0, 0, 0, 0], 4096).unwrap();
        assert!(t.p2p_all_pairs && t.world == 4 && t.one_process, "{t:?}");
        let lines = survey_lines(&[0]).unwrap();
        eprintln!("{lines:?}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("topology: GPU 0:"), "{lines:?}");
    }

    /// Virtual ranks may spin only where freeing memory does not wait for the whole device:
    /// every GPU this crate targets has memory pools (cudarc then frees on the rank's own
    /// stream). On the simulated driver, which can be told it has none, the hazard is named.
    #[test]
    fn spinning_kernels_need_memory_pools_where_ranks_share_a_device() {
        if !have_gpu() {
            return;
        }
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED;
        use syncdrop::backend::cuda::{device_attribute, topology::spin_hazard};
        let pools = device_attribute(0, CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED).unwrap();
        eprintln!("GPU 0 memory pools: {pools}");
        assert_eq!(spin_hazard(&[0]).unwrap(), None, "one rank shares nothing");
        assert_eq!(spin_hazard(&[0, 0]).unwrap().is_some(), pools == 0);
        if simulated() {
            // the simulated driver reads this at every query (tests run one at a time)
            std::env::set_var("SYNCDROP_SIM_MEMPOOLS", "0");
            let hazard = spin_hazard(&[0, 0, 0]);
            std::env::remove_var("SYNCDROP_SIM_MEMPOOLS");
            let why = hazard
                .unwrap()
                .expect("a device without pools holding 3 ranks");
            assert!(
                why.contains("GPU 0") && why.contains("memory pools"),
                "{why}"
            );
            assert_eq!(spin_hazard(&[0]).unwrap(), None);
        }
    }

    #[test]
    fn exact_and_tagged_oracles_at_2_3_4_8_ranks_and_many_sizes() {
        if !have_gpu() {
            return;
        }
        for world in [2usize, 3, 4, 8] {
            let sizes = [0usize, 1, 3, 4, 5, 255, 256, 257, 1000, 8192, 1 << 20];
            let out = on_ranks(world, 1 << 20, healthy(), move |r, s, k, p| {
                let mut res = Vec::new();
                for &n in &sizes {
                    for two_shot in [false, true] {
                        // exact: small integers times powers of two sum without rounding
                        let host: Vec<f32> = (0..n)
                            .map(|i| ((i * 7 + r * 13) % 17) as f32 * 0.25)
                            .collect();
                        let mut d = s
                            .clone_htod(&host)
                            .unwrap_or_else(|_| s.alloc_zeros(1).unwrap());
                        p.all_reduce(s, k, &mut d.slice_mut(..n), n, two_shot, Wire::F32)
                            .unwrap();
                        let mut got = vec![0f32; n];
                        if n > 0 {
                            s.memcpy_dtoh(&d.slice(..n), &mut got).unwrap();
                        }
                        s.synchronize().unwrap();
                        p.check(s).unwrap();
                        res.push((n, two_shot, got));
                        // tagged: each rank contributes its rank id
                        let tag = vec![r as f32; n.max(1)];
                        let mut d = s.clone_htod(&tag).unwrap();
                        p.all_reduce(s, k, &mut d.slice_mut(..n), n, two_shot, Wire::F32)
                            .unwrap();
                        let got: Vec<f32> = s.clone_dtoh(&d).unwrap();
                        res.push((n, two_shot, got[..n].to_vec()));
                    }
                }
                res
            });
            for r in 0..world {
                // every rank holds the same bits as rank 0
                assert_eq!(
                    out[r], out[0],
                    "world {world}: rank {r} differs from rank 0"
                );
                for pair in out[r].chunks(2) {
                    let ((n, ts, exact), (_, _, tagged)) = (&pair[0], &pair[1]);
                    for (i, v) in exact.iter().enumerate() {
                        let want: f32 = (0..world)
                            .map(|q| ((i * 7 + q * 13) % 17) as f32 * 0.25)
                            .sum();
                        assert_eq!(*v, want, "world {world} n {n} two-shot {ts} rank {r} [{i}]");
                    }
                    let want = (world * (world - 1) / 2) as f32;
                    assert!(
                        tagged.iter().all(|v| *v == want),
                        "tagged: world {world} n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn random_floats_64_mib_and_10000_back_to_back_rounds() {
        if !have_gpu() {
            return;
        }
        let n = 16 << 20; // 64 MiB of f32

        // On the simulated driver a rank's 64 MiB upload runs on a CPU thread that the three
        // peers' spinning kernels compete with: on 2 loaded cores (CI beside a long eval) a
        // peer once arrived later than 2 s (CommTimeout, flag 0). The GPU keeps 2 s.
        let spin = if simulated() { 60 } else { 2 };
        let out = on_ranks(4, n, Duration::from_secs(spin), move |r, s, k, p| {
            let host: Vec<f32> = (0..n)
                .map(|i| ((i ^ (r * 7919)) % 1000) as f32 * 1e-3)
                .collect();
            let mut d = s.clone_htod(&host).unwrap();
            p.all_reduce(s, k, &mut d.slice_mut(..), n, true, Wire::F32)
                .unwrap();
            let big: Vec<f32> = s.clone_dtoh(&d).unwrap();
            // 10,000 small rounds: the counters advance, slots alternate, nothing mixes
            let mut d = s.alloc_zeros::<f32>(64).unwrap();
            let t0 = Instant::now();
            for i in 0..10_000u32 {
                let v = vec![(i % 97) as f32 + r as f32; 64];
                s.memcpy_htod(&v, &mut d).unwrap();
                p.all_reduce(s, k, &mut d.slice_mut(..), 64, false, Wire::F32)
                    .unwrap();
            }
            let last: Vec<f32> = s.clone_dtoh(&d).unwrap();
            p.check(s).unwrap();
            (big, last, t0.elapsed())
        });
        for (r, (big, last, dt)) in out.iter().enumerate() {
            for i in (0..n).step_by(9973) {
                let want: f32 = (0..4)
                    .map(|q| ((i ^ (q * 7919)) % 1000) as f32 * 1e-3)
                    .sum();
                assert!(
                    (big[i] - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "rank {r} [{i}]"
                );
            }
            assert_eq!(big, &out[0].0, "bit-identical across ranks");
            let want = 4.0 * (9_999 % 97) as f32 + 6.0;
            assert!(
                last.iter().all(|v| *v == want),
                "rank {r}: last round {:?}",
                &last[..4]
            );
            eprintln!("rank {r}: 10,000 one-shot all-reduces of 64 floats in {dt:?}");
        }
    }

    /// One all-reduce of `d` (256 f32), waited for, and the rank's timeout record checked.
    fn reduce_256(
        s: &Arc<cudarc::driver::CudaStream>,
        k: &Kernels,
        p: &mut P2pRank,
        d: &mut cudarc::driver::CudaSlice<f32>,
    ) -> Result<(), Error> {
        p.all_reduce(s, k, &mut d.slice_mut(..), 256, false, Wire::F32)
            .and_then(|()| s.synchronize().map_err(|e| Error::Cuda(format!("{e:?}"))))
            .and_then(|()| p.check(s))
    }

    /// Ranks 0 and 1 of `out` timed out naming rank 2, each within 3 s.
    fn assert_timed_out_naming_rank_2<T: std::fmt::Debug>(
        out: &[(Result<T, Error>, Duration)],
        why: &str,
    ) {
        for (r, (res, dt)) in out.iter().take(2).enumerate() {
            match res {
                Err(Error::CommTimeout { rank, peer, .. }) => {
                    assert_eq!(*rank, r);
                    assert_eq!(*peer, 2, "{why}");
                }
                other => panic!("rank {r}: expected a timeout, got {other:?}"),
            }
            assert!(*dt < Duration::from_secs(3), "rank {r} took {dt:?}");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out_within_about_a_second() {
        if !have_gpu() {
            return;
        }
        let gate = Arc::new(Barrier::new(3));
        let g = gate.clone();
        let out = on_ranks(3, 1024, Duration::from_millis(500), move |r, s, k, p| {
            let mut d = s.alloc_zeros::<f32>(256).unwrap();
            let t0 = Instant::now();
            // no unwrap before the gate: a panicking rank would leave the others waiting on
            // it forever (a hang for the whole stage instead of a failure)
            let res = if r == 2 {
                Ok(()) // mute: never launches
            } else {
                reduce_256(s, k, p, &mut d)
            };
            g.wait();
            (res, t0.elapsed())
        });
        assert_timed_out_naming_rank_2(&out, "the mute rank is named");
    }

    /// A rank that waits for the whole device (cuCtxSynchronize; cuMemFree does the same
    /// implicitly) while its virtual peers spin for it cannot launch its part until their
    /// kernels end: on a GPU that is a deadlock, which the spin budget turns into a timeout
    /// naming the late rank. (The simulated driver models this wait; without it the late rank
    /// would arrive and the peers would finish, failing this test.)
    #[test]
    fn a_rank_that_synchronises_the_device_while_peers_spin_stalls_them_into_a_timeout() {
        if !have_gpu() {
            return;
        }
        let gate = Arc::new(Barrier::new(3));
        let g = gate.clone();
        let out = on_ranks(3, 1024, Duration::from_millis(500), move |r, s, k, p| {
            let mut d = s.alloc_zeros::<f32>(256).unwrap();
            let _ = s.synchronize(); // (no panic before the gate: the others would wait on it)
            g.wait();
            let t0 = Instant::now();
            let res = if r == 2 {
                // let the peers' kernels start spinning, then wait for the device
                std::thread::sleep(Duration::from_millis(250));
                let sync = s
                    .context()
                    .synchronize()
                    .map_err(|e| Error::Cuda(format!("{e:?}")));
                let waited = t0.elapsed();
                // its own part, late; the peers are gone, so any outcome but a hang will do
                let _ = reduce_256(s, k, p, &mut d);
                sync.map(|()| waited)
            } else {
                reduce_256(s, k, p, &mut d).map(|()| t0.elapsed())
            };
            (res, t0.elapsed())
        });
        assert_timed_out_naming_rank_2(&out, "the rank stuck in the device-wide wait is named");
        match &out[2].0 {
            Ok(waited) => assert!(
                *waited >= Duration::from_millis(400),
                "the device-wide wait returned after {waited:?}, before the peers' 500 ms spin budget ran out"
            ),
            Err(e) => panic!("rank 2's synchronise failed: {e:?}"),
        }
    }

    #[test]
    fn all_reduce_captured_in_a_cuda_graph_replays_correctly() {
        if !have_gpu() {
            return;
        }
        let out = on_ranks(2, 1024, healthy(), move |r, s, k, p| {
            let mut d = s.alloc_zeros::<f32>(300).unwrap();
            s.begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .unwrap();
            p.all_reduce(s, k, &mut d.slice_mut(..), 300, false, Wire::F32)
                .unwrap();
            let g = s
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                .unwrap()
                .unwrap();
            let mut seen = Vec::new();
            for round in 0..5 {
                let v = vec![(round * 10 + r) as f32; 300];
                s.memcpy_htod(&v, &mut d).unwrap();
                g.launch().unwrap();
                let got: Vec<f32> = s.clone_dtoh(&d).unwrap();
                seen.push(got[299]);
            }
            p.check(s).unwrap();
            seen
        });
        for seen in &out {
            let want: Vec<f32> = (0..5).map(|round| (2 * round * 10 + 1) as f32).collect();
            assert_eq!(seen, &want, "each replay is a fresh round");
        }
    }

    #[test]
    fn fused_oproj_all_reduce_equals_gemv_then_all_reduce_bit_for_bit() {
        if !have_gpu() {
            return;
        }
        use half::bf16;
        use syncdrop::backend::cuda::gemv::gemv_bf16_f32;
        for (world, t, n, k) in [
            (2usize, 1usize, 576usize, 192usize),
            (4, 1, 8192, 1024),
            (3, 1, 100, 7),
            (2, 4, 576, 192),
            (3, 3, 1000, 64),
        ] {
            let m = t * n;
            let out = on_ranks(world, m, healthy(), move |r, s, kern, p| {
                // not dyadic: the partials need more than bf16's 8 bits, so the two wires
                // differ (small multiples of 1/32 would pass through bf16 unchanged)
                let w: Vec<bf16> = (0..n * k)
                    .map(|i| {
                        let h = (i * 2_654_435_761 + r * 40_503) % 1000;
                        bf16::from_f32(h as f32 * 1.37e-3 - 0.68)
                    })
                    .collect();
                let x: Vec<f32> = (0..t * k)
                    .map(|i| ((i * 7 + r * 3) % 11) as f32 * 0.173 - 0.8)
                    .collect();
                let (wd, xd) = (s.clone_htod(&w).unwrap(), s.clone_htod(&x).unwrap());
                let mut y = s.alloc_zeros::<f32>(m).unwrap();
                gemv_bf16_f32(
                    s,
                    kern,
                    (t, n, k),
                    &wd.slice(..),
                    &xd.slice(..),
                    &mut y.slice_mut(..),
                )
                .unwrap();
                let partial: Vec<f32> = s.clone_dtoh(&y).unwrap();
                let mut res = Vec::new();
                for wire in [Wire::F32, Wire::Bf16] {
                    s.memcpy_htod(&partial, &mut y).unwrap();
                    p.all_reduce(s, kern, &mut y.slice_mut(..), m, false, wire)
                        .unwrap();
                    let unfused: Vec<f32> = s.clone_dtoh(&y).unwrap();
                    let mut z = s.alloc_zeros::<f32>(m).unwrap();
                    p.oproj_all_reduce(
                        s,
                        kern,
                        (t, n, k),
                        &wd.slice(..),
                        &xd.slice(..),
                        &mut z.slice_mut(..),
                        wire,
                    )
                    .unwrap();
                    let fused: Vec<f32> = s.clone_dtoh(&z).unwrap();
                    res.push((wire, unfused, fused));
                }
                p.check(s).unwrap();
                res
            });
            for (r, res) in out.iter().enumerate() {
                for (i, (wire, u, f)) in res.iter().enumerate() {
                    assert_eq!(u, f, "{wire:?}: world {world} t {t} n {n} k {k} rank {r}");
                    assert_eq!(u, &out[0][i].1, "{wire:?}: rank {r} differs from rank 0");
                }
                assert_ne!(res[0].1, res[1].1, "the bf16 wire rounds the partials");
            }
        }
    }

    #[test]
    fn fused_residual_add_epilogue_adds_the_sum_to_x_and_leaves_m() {
        if !have_gpu() {
            return;
        }
        for two_shot in [false, true] {
            let n = 1000;
            let out = on_ranks(3, n, healthy(), move |r, s, k, p| {
                let m: Vec<f32> = (0..n).map(|i| ((i + r) % 9) as f32 * 0.5).collect();
                let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
                let md = s.clone_htod(&m).unwrap();
                let mut xd = s.clone_htod(&x).unwrap();
                p.all_reduce_add(
                    s,
                    k,
                    &md.slice(..),
                    &mut xd.slice_mut(..),
                    n,
                    two_shot,
                    Wire::F32,
                )
                .unwrap();
                let (x2, m2): (Vec<f32>, Vec<f32>) =
                    (s.clone_dtoh(&xd).unwrap(), s.clone_dtoh(&md).unwrap());
                p.check(s).unwrap();
                (x2, m2 == m)
            });
            for (r, (x2, m_kept)) in out.iter().enumerate() {
                assert!(m_kept, "rank {r}: m changed");
                for (i, v) in x2.iter().enumerate() {
                    let sum: f32 = (0..3).map(|q| ((i + q) % 9) as f32 * 0.5).sum();
                    assert_eq!(
                        *v,
                        (i % 7) as f32 + sum,
                        "two-shot {two_shot} rank {r} [{i}]"
                    );
                }
            }
        }
    }

    /// The CPU mirror of a bf16-wire all-reduce: every contribution rounded to bf16, summed
    /// in f32 in rank order starting from rank 0's value, then added to the residual.
    fn bf16_wire_mirror(contrib: &[Vec<f32>], residual: Option<&[f32]>) -> Vec<f32> {
        let n = contrib[0].len();
        let r = |x: f32| half::bf16::from_f32(x).to_f32();
        (0..n)
            .map(|i| {
                let mut acc = r(contrib[0][i]);
                for c in &contrib[1..] {
                    acc += r(c[i]);
                }
                residual.map_or(acc, |x| x[i] + acc)
            })
            .collect()
    }

    #[test]
    fn bf16_wire_equals_the_cpu_mirror_bit_for_bit_one_and_two_shot() {
        if !have_gpu() {
            return;
        }
        for world in [2usize, 3, 4, 8] {
            let sizes = [1usize, 255, 256, 257, 1000, 8192, 100_003];
            let contrib = move |r: usize, n: usize| -> Vec<f32> {
                // values that do not fit bf16: the rounding is visible
                (0..n)
                    .map(|i| ((i * 2654435761 + r * 40503) % 100_000) as f32 * 1.234_567e-3 - 61.7)
                    .collect()
            };
            let out = on_ranks(world, 100_003, healthy(), move |r, s, k, p| {
                let mut res = Vec::new();
                for &n in &sizes {
                    for two_shot in [false, true] {
                        let mut d = s.clone_htod(&contrib(r, n)).unwrap();
                        p.all_reduce(s, k, &mut d.slice_mut(..), n, two_shot, Wire::Bf16)
                            .unwrap();
                        let plain: Vec<f32> = s.clone_dtoh(&d).unwrap();
                        // fused residual add: x += sum (m unchanged)
                        let x: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.1).collect();
                        let md = s.clone_htod(&contrib(r, n)).unwrap();
                        let mut xd = s.clone_htod(&x).unwrap();
                        p.all_reduce_add(
                            s,
                            k,
                            &md.slice(..),
                            &mut xd.slice_mut(..),
                            n,
                            two_shot,
                            Wire::Bf16,
                        )
                        .unwrap();
                        let added: Vec<f32> = s.clone_dtoh(&xd).unwrap();
                        res.push((n, two_shot, plain, x, added));
                    }
                }
                p.check(s).unwrap();
                res
            });
            for (r, res) in out.iter().enumerate() {
                for (j, (n, ts, plain, x, added)) in res.iter().enumerate() {
                    let all: Vec<Vec<f32>> = (0..world).map(|q| contrib(q, *n)).collect();
                    let want = bf16_wire_mirror(&all, None);
                    assert_eq!(plain, &want, "world {world} n {n} two-shot {ts} rank {r}");
                    let want = bf16_wire_mirror(&all, Some(x));
                    assert_eq!(added, &want, "residual: world {world} n {n} two-shot {ts}");
                    assert_eq!(plain, &out[0][j].2, "rank {r} differs from rank 0");
                    // and the bf16 wire is not the f32 sum
                    let exact: Vec<f32> = (0..*n).map(|i| all.iter().map(|c| c[i]).sum()).collect();
                    assert_ne!(plain, &exact, "world {world} n {n}: nothing was rounded");
                }
            }
        }
    }

    #[test]
    fn bf16_in_and_out_all_reduce_rounds_the_f32_rank_order_sum_once() {
        if !have_gpu() {
            return;
        }
        use half::bf16;
        for world in [2usize, 3, 8] {
            let n = 4099;
            let contrib = move |r: usize| -> Vec<bf16> {
                (0..n)
                    .map(|i| bf16::from_f32(((i * 7 + r * 131) % 601) as f32 * 0.0371 - 11.0))
                    .collect()
            };
            let resid: Vec<bf16> = (0..n)
                .map(|i| bf16::from_f32((i % 17) as f32 * 0.3))
                .collect();
            let res2 = resid.clone();
            let out = on_ranks(world, n, healthy(), move |r, s, k, p| {
                let mut got = Vec::new();
                for two_shot in [false, true] {
                    let mut d = s.clone_htod(&contrib(r)).unwrap();
                    p.all_reduce_bf16(s, k, &mut d.slice_mut(..), None, n, two_shot)
                        .unwrap();
                    let plain: Vec<bf16> = s.clone_dtoh(&d).unwrap();
                    let mut d = s.clone_htod(&contrib(r)).unwrap();
                    let rd = s.clone_htod(&res2).unwrap();
                    p.all_reduce_bf16(s, k, &mut d.slice_mut(..), Some(&rd.slice(..)), n, two_shot)
                        .unwrap();
                    let fused: Vec<bf16> = s.clone_dtoh(&d).unwrap();
                    got.push((two_shot, plain, fused));
                }
                p.check(s).unwrap();
                got
            });
            let all: Vec<Vec<bf16>> = (0..world).map(contrib).collect();
            let sum = |i: usize| -> f32 {
                all[1..]
                    .iter()
                    .fold(all[0][i].to_f32(), |a, c| a + c[i].to_f32())
            };
            let want: Vec<bf16> = (0..n).map(|i| bf16::from_f32(sum(i))).collect();
            let want_res: Vec<bf16> = (0..n)
                .map(|i| bf16::from_f32(resid[i].to_f32() + sum(i)))
                .collect();
            for (r, got) in out.iter().enumerate() {
                for (ts, plain, fused) in got {
                    assert_eq!(plain, &want, "world {world} two-shot {ts} rank {r}");
                    assert_eq!(
                        fused, &want_res,
                        "residual: world {world} two-shot {ts} rank {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_all_reduce_add_rmsnorm_matches_the_unfused_kernels() {
        if !have_gpu() {
            return;
        }
        use syncdrop::backend::cuda::allreduce::NORM_MAX_ROWS;
        use syncdrop::backend::cuda::rmsnorm::rmsnorm_f32;
        for (world, rows, d) in [
            (2usize, 1usize, 576usize),
            (3, 3, 100),
            (8, 16, 8192),
            (4, 2, 8192),
        ] {
            let n = rows * d;
            let out = on_ranks(world, n, healthy(), move |r, s, k, p| {
                let delta: Vec<f32> = (0..n)
                    .map(|i| (((i * 37 + r * 101) % 211) as f32 - 105.0) * 0.013)
                    .collect();
                let x0: Vec<f32> = (0..n).map(|i| ((i % 29) as f32 - 14.0) * 0.07).collect();
                let w: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
                let (dd, wd) = (s.clone_htod(&delta).unwrap(), s.clone_htod(&w).unwrap());
                let mut res = Vec::new();
                for wire in [Wire::F32, Wire::Bf16] {
                    for two_shot in [false, true] {
                        // unfused: all-reduce + residual add, then RMSNorm
                        let mut xa = s.clone_htod(&x0).unwrap();
                        p.all_reduce_add(
                            s,
                            k,
                            &dd.slice(..),
                            &mut xa.slice_mut(..),
                            n,
                            two_shot,
                            wire,
                        )
                        .unwrap();
                        let mut na = s.alloc_zeros::<f32>(n).unwrap();
                        rmsnorm_f32(
                            s,
                            k,
                            rows,
                            d,
                            1e-5,
                            &xa.slice(..),
                            &wd.slice(..),
                            &mut na.slice_mut(..),
                        )
                        .unwrap();
                        // fused
                        let mut xb = s.clone_htod(&x0).unwrap();
                        let mut nb = s.alloc_zeros::<f32>(n).unwrap();
                        p.all_reduce_add_rmsnorm(
                            s,
                            k,
                            (rows, d, 1e-5),
                            &dd.slice(..),
                            &mut xb.slice_mut(..),
                            &wd.slice(..),
                            &mut nb.slice_mut(..),
                            two_shot,
                            wire,
                        )
                        .unwrap();
                        let get = |b: &cudarc::driver::CudaSlice<f32>| -> Vec<f32> {
                            s.clone_dtoh(b).unwrap()
                        };
                        res.push((wire, two_shot, get(&xa), get(&na), get(&xb), get(&nb)));
                    }
                }
                // more rows than the scratch holds: a clear error, nothing launched
                let mut big = s.alloc_zeros::<f32>(d * (NORM_MAX_ROWS + 1)).unwrap();
                let mut nbig = s.alloc_zeros::<f32>(d * (NORM_MAX_ROWS + 1)).unwrap();
                let dbig = s.alloc_zeros::<f32>(d * (NORM_MAX_ROWS + 1)).unwrap();
                let e = p
                    .all_reduce_add_rmsnorm(
                        s,
                        k,
                        (NORM_MAX_ROWS + 1, d, 1e-5),
                        &dbig.slice(..),
                        &mut big.slice_mut(..),
                        &wd.slice(..),
                        &mut nbig.slice_mut(..),
                        false,
                        Wire::F32,
                    )
                    .unwrap_err();
                assert!(e.to_string().contains("at most"), "{e}");
                p.check(s).unwrap();
                res
            });
            for (r, res) in out.iter().enumerate() {
                for (i, (wire, ts, xa, na, xb, nb)) in res.iter().enumerate() {
                    let tag =
                        format!("world {world} rows {rows} d {d} {wire:?} two-shot {ts} rank {r}");
                    // the residual stream: the same all-reduce code, the same bits
                    assert_eq!(xa, xb, "x: {tag}");
                    // the norm: another reduction order, f32 rounding only
                    for (j, (a, b)) in na.iter().zip(nb).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                            "normed[{j}] {a} vs {b}: {tag}"
                        );
                    }
                    // bit-identical across ranks
                    assert_eq!(nb, &out[0][i].5, "normed differs from rank 0: {tag}");
                }
            }
        }
    }

    /// Every P2P kernel at one rank (its barriers meet only itself), so compute-sanitizer,
    /// which serialises launches, can run them all: scripts/gpu-check.sh runs this test under
    /// memcheck, racecheck and synccheck. The results are checked too: the sum over one rank
    /// is the rank's own (wire-rounded) values.
    #[test]
    fn single_rank_runs_every_p2p_kernel_for_the_sanitizers() {
        if !have_gpu() {
            return;
        }
        use half::bf16;
        use syncdrop::backend::cuda::gemv::gemv_bf16_f32;
        use syncdrop::backend::cuda::rmsnorm::rmsnorm_f32;
        let (rows, d) = (3usize, 1000usize); // 12 blocks: the norm's grid barrier is crossed
        let n = rows * d;
        // a generous spin budget: instrumented kernels are slow
        let out = on_ranks(1, n, Duration::from_secs(10), move |_, s, k, p| {
            let v: Vec<f32> = (0..n).map(|i| (i % 101) as f32 * 0.0173 - 0.8).collect();
            let round = |w: Wire| {
                let mut r = v.clone();
                w.round(&mut r);
                r
            };
            for &m in &[1usize, 257, n] {
                for wire in [Wire::F32, Wire::Bf16] {
                    for two_shot in [false, true] {
                        let mut dv = s.clone_htod(&v[..m]).unwrap();
                        p.all_reduce(s, k, &mut dv.slice_mut(..), m, two_shot, wire)
                            .unwrap();
                        let got: Vec<f32> = s.clone_dtoh(&dv).unwrap();
                        assert_eq!(got, round(wire)[..m], "m {m} {wire:?} two-shot {two_shot}");
                    }
                }
            }
            // bf16 in/out with the residual
            let vb: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
            let mut db = s.clone_htod(&vb).unwrap();
            let rb = s.clone_htod(&vb).unwrap();
            p.all_reduce_bf16(s, k, &mut db.slice_mut(..), Some(&rb.slice(..)), n, true)
                .unwrap();
            let got: Vec<bf16> = s.clone_dtoh(&db).unwrap();
            let want: Vec<bf16> = vb
                .iter()
                .map(|x| bf16::from_f32(2.0 * x.to_f32()))
                .collect();
            assert_eq!(got, want, "bf16 in/out");
            // fused o_proj = GEMV at one rank
            let kk = 64;
            let w: Vec<bf16> = (0..d * kk)
                .map(|i| bf16::from_f32(((i % 13) as f32 - 6.0) / 8.0))
                .collect();
            let x: Vec<f32> = (0..kk).map(|i| (i % 5) as f32 * 0.25).collect();
            let (wd, xd) = (s.clone_htod(&w).unwrap(), s.clone_htod(&x).unwrap());
            let mut y = s.alloc_zeros::<f32>(d).unwrap();
            gemv_bf16_f32(
                s,
                k,
                (1, d, kk),
                &wd.slice(..),
                &xd.slice(..),
                &mut y.slice_mut(..),
            )
            .unwrap();
            let mut z = s.alloc_zeros::<f32>(d).unwrap();
            p.oproj_all_reduce(
                s,
                k,
                (1, d, kk),
                &wd.slice(..),
                &xd.slice(..),
                &mut z.slice_mut(..),
                Wire::F32,
            )
            .unwrap();
            assert_eq!(
                s.clone_dtoh(&y).unwrap(),
                s.clone_dtoh(&z).unwrap(),
                "fused o_proj"
            );
            // fused all-reduce + add + RMSNorm = add then RMSNorm at one rank
            let g: Vec<f32> = (0..d).map(|i| 1.0 + (i % 3) as f32 * 0.5).collect();
            let gd = s.clone_htod(&g).unwrap();
            for two_shot in [false, true] {
                let dd = s.clone_htod(&v).unwrap();
                let mut xd = s.clone_htod(&v).unwrap();
                let mut nd = s.alloc_zeros::<f32>(n).unwrap();
                p.all_reduce_add_rmsnorm(
                    s,
                    k,
                    (rows, d, 1e-5),
                    &dd.slice(..),
                    &mut xd.slice_mut(..),
                    &gd.slice(..),
                    &mut nd.slice_mut(..),
                    two_shot,
                    Wire::F32,
                )
                .unwrap();
                let xs: Vec<f32> = s.clone_dtoh(&xd).unwrap();
                assert!(xs.iter().zip(&v).all(|(a, b)| *a == 2.0 * b), "x = v + v");
                let mut nref = s.alloc_zeros::<f32>(n).unwrap();
                rmsnorm_f32(
                    s,
                    k,
                    rows,
                    d,
                    1e-5,
                    &xd.slice(..),
                    &gd.slice(..),
                    &mut nref.slice_mut(..),
                )
                .unwrap();
                let (a, b): (Vec<f32>, Vec<f32>) =
                    (s.clone_dtoh(&nd).unwrap(), s.clone_dtoh(&nref).unwrap());
                for (j, (u, w)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (u - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "normed[{j}] {u} vs {w}"
                    );
                }
            }
            p.check(s).unwrap();
        });
        assert_eq!(out.len(), 1);
    }

    /// NCCL on one GPU (it refuses two ranks on one, so more needs two GPUs: see
    /// tests/cuda_backend.rs): a world of 1 creates its non-blocking communicator, settles,
    /// all-reduces (the sum over one rank is its own data) and drops with its watchdog; a
    /// world of 2 whose rank 1 never comes fails within its init timeout instead of hanging.
    /// scripts/gpu-check.sh runs it as its own command (a hang here costs only itself).
    #[test]
    fn nccl_one_rank_all_reduces_and_a_missing_rank_is_an_error_not_a_hang() {
        use syncdrop::backend::cuda::nccl::{self, NcclRank, NcclTimeouts};
        use syncdrop::comm::rendezvous::{Rendezvous, Terms};
        let none = Terms::new();
        if !have_gpu() {
            return;
        }
        if !nccl::available() {
            eprintln!("nccl: skipped: libnccl.so not loadable (see scripts/gpu-check.sh nccl_lib)");
            return;
        }
        eprintln!("nccl: version {}", nccl::version().unwrap());
        let ctx = context(0).unwrap();
        // a capture must not wait on events recorded before it (as in on_ranks)
        // SAFETY: every buffer here lives on its one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().unwrap();
        let quick = NcclTimeouts {
            init: Duration::from_secs(3),
            call: Duration::from_secs(30),
        };
        {
            let r = NcclRank::join_with(&Rendezvous::in_process(), 0, 1, &none, &stream, quick)
                .unwrap();
            assert_eq!(r.world(), 1);
            for n in [1usize, 1000, 1 << 20] {
                let v: Vec<f32> = (0..n).map(|i| (i % 977) as f32 * 0.25 - 7.0).collect();
                let mut d = stream.clone_htod(&v).unwrap();
                r.all_reduce(&mut d.slice_mut(..)).unwrap();
                let got: Vec<f32> = stream.clone_dtoh(&d).unwrap();
                assert_eq!(got, v, "n {n}");
            }
            // the warm-up before a capture, then a collective captured and replayed (the
            // rank drops after the graph, as CudaBackend does)
            r.warm(4096).unwrap();
            let v: Vec<f32> = (0..4096).map(|i| i as f32 - 100.0).collect();
            let mut d = stream.clone_htod(&v).unwrap();
            stream.synchronize().unwrap();
            stream
                .begin_capture(
                    cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
                .unwrap();
            let captured = r.all_reduce(&mut d.slice_mut(..));
            let g = stream
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                .unwrap();
            captured.unwrap();
            if let Some(g) = &g {
                for _ in 0..3 {
                    g.launch().unwrap();
                }
            }
            let got: Vec<f32> = stream.clone_dtoh(&d).unwrap();
            assert_eq!(got, v, "captured one-rank all-reduce");
            drop(g);
            assert_eq!(r.aborted(), None);
        }
        let t0 = Instant::now();
        let e = NcclRank::join_with(&Rendezvous::in_process(), 0, 2, &none, &stream, quick)
            .err()
            .expect("rank 1 never joins")
            .to_string();
        let took = t0.elapsed();
        eprintln!("nccl: missing rank after {took:?}: {e}");
        assert!(e.contains("did not complete within"), "{e}");
        assert!(took < Duration::from_secs(15), "took {took:?}");
    }
}
