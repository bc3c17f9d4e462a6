//! The simulator itself (csrc/host_sim) and the first kernel families run through it: the
//! kernels' own CUDA C++ on CPU threads against the CPU reference (feature `host-sim`;
//! scripts/test.sh runs it). Without the feature each test says "skipped".

#[cfg(not(feature = "host-sim"))]
#[test]
fn host_sim_skipped_without_the_feature() {
    eprintln!("skipped: built without the `host-sim` feature");
}

#[cfg(feature = "host-sim")]
mod common;

#[cfg(feature = "host-sim")]
mod sim {
    use super::common::xorshift_f32 as rand_f32;
    use half::bf16;
    use proptest::prelude::*;
    use syncdrop::backend::cpu::rmsnorm;
    use syncdrop::backend::cuda::gemv::GemvParams;
    use syncdrop::backend::cuda::host_sim::{cfg, kernels, launch, Blocks, Ptr};
    use syncdrop::backend::cuda::rmsnorm::RmsNormParams;

    extern "C" {
        fn sim_selftest_block_sum(out: *mut f32);
        fn sim_selftest_sync_or(live: i32, vote: i32, out: *mut i32);
        fn sim_selftest_shuffle_after_return(out: *mut f32);
        fn sim_selftest_deadlock(out: *mut f32);
    }

    #[test]
    fn shared_memory_is_per_block_sequential_and_concurrent() {
        for blocks in [Blocks::Sequential, Blocks::Concurrent] {
            for threads in [32u32, 64, 256, 1024] {
                let mut out = vec![0f32; 5];
                let o = Ptr(out.as_mut_ptr());
                launch(cfg((5, 1, 1), (threads, 1, 1)), blocks, || unsafe {
                    sim_selftest_block_sum(o.get())
                })
                .unwrap();
                let want = (threads * (threads + 1) / 2) as f32;
                assert_eq!(out, vec![want; 5], "{blocks:?}, {threads} threads");
            }
        }
    }

    #[test]
    fn syncthreads_counts_returned_threads_and_ors_the_votes() {
        for (live, vote) in [(64, 3), (64, -1), (40, 39), (1, 0)] {
            let mut out = vec![-1i32; 64];
            let o = Ptr(out.as_mut_ptr());
            launch(cfg((1, 1, 1), (64, 1, 1)), Blocks::Sequential, || unsafe {
                sim_selftest_sync_or(live, vote, o.get())
            })
            .unwrap();
            let first = (vote >= 0 && vote < live) as i32;
            for (t, &v) in out.iter().enumerate() {
                let want = if (t as i32) < live { first * 2 } else { -1 };
                assert_eq!(v, want, "live {live}, vote {vote}, thread {t}");
            }
        }
    }

    #[test]
    fn a_shuffle_after_a_lane_returned_is_an_error() {
        let mut out = vec![0f32; 32];
        let o = Ptr(out.as_mut_ptr());
        let e = launch(cfg((1, 1, 1), (32, 1, 1)), Blocks::Sequential, || unsafe {
            sim_selftest_shuffle_after_return(o.get())
        })
        .unwrap_err();
        assert!(e.contains("after lane 0 returned"), "{e}");
    }

    #[test]
    fn a_deadlock_is_reported_not_hung() {
        let mut out = vec![0f32; 32];
        let o = Ptr(out.as_mut_ptr());
        let e = launch(cfg((1, 1, 1), (32, 1, 1)), Blocks::Sequential, || unsafe {
            sim_selftest_deadlock(o.get())
        })
        .unwrap_err();
        assert!(e.contains("deadlock"), "{e}");
        assert!(e.contains("thread 0 waits at __syncthreads"), "{e}");
        assert!(e.contains("thread 1 waits at a warp shuffle"), "{e}");
    }

    #[test]
    fn launch_shapes_a_gpu_refuses_are_refused() {
        assert!(
            launch(cfg((1, 1, 1), (2048, 1, 1)), Blocks::Sequential, || {})
                .unwrap_err()
                .contains("1024")
        );
        assert!(
            launch(cfg((0, 1, 1), (32, 1, 1)), Blocks::Sequential, || {})
                .unwrap_err()
                .contains("empty")
        );
    }

    /// What the backend launches (src/backend/cuda/rmsnorm.rs).
    fn rmsnorm_cfg(rows: usize, d: usize) -> cudarc::driver::LaunchConfig {
        syncdrop::backend::cuda::rmsnorm::launch_config(rows, d)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// add_rmsnorm_f32 and rmsnorm_f32 against the CPU's rmsnorm: the residual add is
        /// exact, the norm within f32 reduction-order error.
        #[test]
        fn rmsnorm_f32_matches_the_cpu(rows in 1usize..5, d in 1usize..700, seed in any::<u64>(),
                                       delta in any::<bool>()) {
            let x0 = rand_f32(rows * d, seed, 2.0);
            let dx = rand_f32(rows * d, seed ^ 0x55, 1.0);
            let w = rand_f32(d, seed ^ 0xAA, 1.5);
            let eps = 1e-5f32;
            let mut x = x0.clone();
            let mut y = vec![0f32; rows * d];
            let p = RmsNormParams { rows: rows as i32, d: d as i32, eps, has_delta: delta as i32 };
            let (xp, yp) = (Ptr(x.as_mut_ptr()), Ptr(y.as_mut_ptr()));
            launch(rmsnorm_cfg(rows, d), Blocks::Sequential, || unsafe {
                kernels::add_rmsnorm_f32(p, xp.get(), dx.as_ptr(), w.as_ptr(), yp.get())
            }).unwrap();
            let mut plain = vec![0f32; rows * d];
            let pp = Ptr(plain.as_mut_ptr());
            launch(rmsnorm_cfg(rows, d), Blocks::Sequential, || unsafe {
                kernels::rmsnorm_f32(p, x.as_ptr(), w.as_ptr(), pp.get())
            }).unwrap();
            for r in 0..rows {
                let sl = r * d..(r + 1) * d;
                let want_x: Vec<f32> = if delta {
                    x0[sl.clone()].iter().zip(&dx[sl.clone()]).map(|(a, b)| a + b).collect()
                } else {
                    x0[sl.clone()].to_vec()
                };
                prop_assert_eq!(&x[sl.clone()], &want_x[..]);
                let mut want = vec![0f32; d];
                rmsnorm(&want_x, &w, eps, &mut want);
                for i in 0..d {
                    let tol = 1e-5 + 1e-5 * want[i].abs();
                    prop_assert!((y[r * d + i] - want[i]).abs() <= tol, "row {} col {}: {} vs {}", r, i, y[r * d + i], want[i]);
                    prop_assert!((plain[r * d + i] - want[i]).abs() <= tol);
                }
            }
        }

        /// gemv_bf16_f32 (the decode GEMV) against an f64 dot product of the same bf16
        /// weights, on the vector path (k % 8 == 0, aligned) and the scalar one; results do
        /// not depend on t (the sum order is fixed per k).
        #[test]
        fn gemv_bf16_f32_matches_a_dot_product(t in 1usize..5, n in 1usize..40, k8 in 1usize..150,
                                               odd in any::<bool>(), seed in any::<u64>()) {
            let k = if odd { k8 * 8 + 3 } else { k8 * 8 };
            let w: Vec<bf16> = rand_f32(n * k, seed, 1.0).into_iter().map(bf16::from_f32).collect();
            let x = rand_f32(t * k, seed ^ 7, 1.0);
            let mut y = vec![f32::NAN; t * n];
            let p = GemvParams { t: t as i32, n: n as i32, k: k as i32, pad: 0 };
            let yp = Ptr(y.as_mut_ptr());
            let (_, lc) = syncdrop::backend::cuda::gemv::launch_config(t, n, k);
            launch(lc, Blocks::Sequential, || unsafe {
                kernels::gemv_bf16_f32(p, w.as_ptr(), x.as_ptr(), yp.get())
            }).unwrap();
            for ti in 0..t {
                for r in 0..n {
                    let want: f64 = (0..k).map(|c| w[r * k + c].to_f64() * x[ti * k + c] as f64).sum();
                    let got = y[ti * n + r] as f64;
                    prop_assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "t {} row {}: {} vs {}", ti, r, got, want);
                }
            }
            // the first token's row alone gives the same bits
            let mut y1 = vec![0f32; n];
            let y1p = Ptr(y1.as_mut_ptr());
            let p1 = GemvParams { t: 1, ..p };
            launch(lc, Blocks::Sequential, || unsafe {
                kernels::gemv_bf16_f32(p1, w.as_ptr(), x.as_ptr(), y1p.get())
            }).unwrap();
            prop_assert_eq!(&y1[..], &y[..n]);
        }
    }
}
