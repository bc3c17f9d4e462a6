//! Decoding's token selection (csrc/argmax.cu, csrc/sample.cu) and the GPU distillation
//! trainer's kernels (csrc/distill.cu) run through the host simulator at the backend's launch
//! shapes (argmax::launch_config, sample::launch_config, distill::rows_launch_config,
//! distill::mse_launch_config, kernels::grid_1d), against the CPU's argmax and sampler
//! (src/generate.rs) and the CPU trainer (src/distill.rs). Feature `host-sim`; without it the
//! one test here says "skipped".
//!
//! The simulator computes `__expf` with `expf`, so whatever goes through an exponential is
//! compared with a tolerance (and a draw only where its uniform is not within 1e-4 of a
//! boundary of the inverse CDF).

#[cfg(not(feature = "host-sim"))]
#[test]
fn host_sim_decode_train_skipped_without_the_feature() {
    eprintln!("skipped: built without the `host-sim` feature");
}

#[cfg(feature = "host-sim")]
mod common;

#[cfg(feature = "host-sim")]
mod sim {
    use super::common::{distill_problem, rel_err, student_tensors};
    use half::bf16;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use syncdrop::backend::cpu::rmsnorm;
    use syncdrop::backend::cuda::argmax::{self, ArgmaxParams};
    use syncdrop::backend::cuda::distill::{
        mse_launch_config, rows_launch_config, AdamParams, DistillNormParams, MseParams, MSE_BLOCKS,
    };
    use syncdrop::backend::cuda::host_sim::{kernels, launch, Blocks, Ptr};
    use syncdrop::backend::cuda::kernels::grid_1d;
    use syncdrop::backend::cuda::sample::{self, SampleParams};
    use syncdrop::backend::cuda::swiglu::SwigluParams;
    use syncdrop::distill::{
        adam_corrections, loss_and_grads, swiglu, CpuTrainer, Sample, StudentParams, Trainer, ADAM,
    };
    use syncdrop::generate::{argmax as cpu_argmax, Sampler, SamplerConfig};

    /// Uniform f32 in [-scale, scale) from `seed`.
    fn rand_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    }

    /// A value no kernel writes: an output still holding it was never written.
    const SENTINEL: f32 = -12345.678;

    // ---- argmax ------------------------------------------------------------------------------

    /// argmax_f32 over `rows` rows of `n`, launched as the backend launches it.
    fn gpu_argmax(x: &[f32], rows: usize, n: usize) -> Vec<u32> {
        assert_eq!(x.len(), rows * n);
        let mut out = vec![u32::MAX; rows];
        let o = Ptr(out.as_mut_ptr());
        let p = ArgmaxParams {
            rows: rows as i32,
            n: n as i32,
        };
        launch(argmax::launch_config(rows), Blocks::Sequential, || unsafe {
            kernels::argmax_f32(p, x.as_ptr(), o.get())
        })
        .unwrap();
        out
    }

    /// Rows whose answer is fixed: NaN passed over, -inf a value like any other, the lowest
    /// index on ties within a thread's stride and across threads, -0 == +0, +inf.
    #[test]
    fn argmax_edge_rows_match_the_cpu() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let mut cases: Vec<(Vec<f32>, usize)> = vec![
            (vec![nan, -inf, -inf], 1),
            (vec![nan; 5], 0),
            (vec![-inf; 300], 0),
            (vec![nan, nan, -inf], 2),
            (vec![-0.0, 0.0], 0),
            (vec![0.0, -0.0], 0),
            (vec![1.0, inf, 2.0, inf], 1),
            (vec![3.0], 0),
        ];
        // n = 257: the maximum is thread 0's second element, the only one past the first stride
        let mut x = rand_f32(257, 1, 1.0);
        x[256] = 5.0;
        cases.push((x, 256));
        // n = 600: equal maxima at 261 (thread 5's second) and 515 (thread 3's third), NaN
        // and -inf ahead of them
        let mut x = rand_f32(600, 2, 1.0);
        x[261] = 7.0;
        x[515] = 7.0;
        x[0] = nan;
        x[1] = inf.copysign(-1.0);
        x[599] = nan;
        cases.push((x, 261));
        // n = 1000: the same maximum in every thread, and at 0: index 0 wins
        let mut x = rand_f32(1000, 3, 1.0);
        for i in (0..1000).step_by(7) {
            x[i] = 2.5;
        }
        cases.push((x, 0));
        // n = 4099, not a multiple of the block: the maximum at the very end
        let mut x = rand_f32(4099, 4, 1.0);
        x[4098] = 1.5;
        cases.push((x, 4098));
        for (x, want) in &cases {
            assert_eq!(
                cpu_argmax(x),
                *want,
                "the CPU argmax of {:?}",
                &x[..x.len().min(8)]
            );
            let got = gpu_argmax(x, 1, x.len());
            assert_eq!(got, vec![*want as u32], "n = {}", x.len());
        }
        // the same rows batched where n agrees: every row its own block
        let rows: Vec<f32> = [
            [nan, -inf, 2.0],
            [nan, nan, nan],
            [1.0, 1.0, 0.0],
            [-inf, 0.0, 0.0],
        ]
        .concat();
        assert_eq!(gpu_argmax(&rows, 4, 3), vec![2, 0, 0, 1]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        /// argmax_f32 against the engine's CPU argmax on bf16-rounded values (ties come
        /// naturally), with planted ties, -inf, NaN and rows of nothing but NaN or -inf.
        #[test]
        fn argmax_matches_the_cpu(rows in 1usize..5,
                                  n in prop::sample::select(vec![1usize, 2, 3, 31, 255, 256, 257, 300, 1000, 4099]),
                                  seed in any::<u64>(), ties in any::<bool>(), specials in 0u8..4) {
            let mut x: Vec<f32> = rand_f32(rows * n, seed, 4.0)
                .into_iter()
                .map(|v| bf16::from_f32(v).to_f32())
                .collect();
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
            for row in x.chunks_mut(n) {
                if ties {
                    for _ in 0..3 {
                        row[r.random_range(0..n)] = 9.0;
                    }
                    if r.random::<bool>() {
                        row[n - 1] = 9.0;
                    }
                }
                if specials >= 1 {
                    for _ in 0..n.div_ceil(4) {
                        row[r.random_range(0..n)] = f32::NEG_INFINITY;
                    }
                }
                if specials >= 2 {
                    for _ in 0..n.div_ceil(4) {
                        row[r.random_range(0..n)] = f32::NAN;
                    }
                }
                if specials == 3 {
                    match r.random_range(0..3) {
                        0 => row.fill(f32::NAN),
                        1 => row.fill(f32::NEG_INFINITY),
                        _ => {}
                    }
                }
            }
            let got = gpu_argmax(&x, rows, n);
            for ri in 0..rows {
                prop_assert_eq!(got[ri] as usize, cpu_argmax(&x[ri * n..(ri + 1) * n]), "row {}", ri);
            }
        }
    }

    // ---- sampling ----------------------------------------------------------------------------

    /// sample_f32 of one row of logits per uniform (`logits` holds one row, repeated for every
    /// u, or one row per u), launched as the backend launches it.
    fn gpu_sample(logits: &[f32], n: usize, u: &[f32], temperature: f32, top_p: f32) -> Vec<u32> {
        let rows = u.len();
        let all: Vec<f32> = if logits.len() == n {
            logits.repeat(rows)
        } else {
            logits.to_vec()
        };
        assert_eq!(all.len(), rows * n);
        let mut out = vec![u32::MAX; rows];
        let o = Ptr(out.as_mut_ptr());
        let p = SampleParams {
            rows: rows as i32,
            n: n as i32,
            temperature,
            top_p,
        };
        launch(sample::launch_config(rows), Blocks::Sequential, || unsafe {
            kernels::sample_f32(p, all.as_ptr(), u.as_ptr(), o.get())
        })
        .unwrap();
        out
    }

    /// The CPU sampler's kept set, in f64: the tokens of weight exp((l - max) / T), sorted by
    /// weight (then index), up to the first whose cumulative mass reaches top_p; NaN weighs 0.
    /// Also the weights and whether the cut is too close to call (a cumulative mass within
    /// 1e-5 of top_p, or weights within 1e-5 of each other across the cut: f32 sums and
    /// `__expf` could go either way).
    fn nucleus(logits: &[f32], temperature: f32, top_p: f32) -> (Vec<usize>, Vec<f64>, bool) {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| {
                let e = ((l as f64 - max) / temperature as f64).exp();
                if e.is_nan() {
                    0.0
                } else {
                    e
                }
            })
            .collect();
        let total: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
        let mut keep = order.len();
        let mut close = false;
        if top_p < 1.0 {
            let mut acc = 0.0;
            for (k, &i) in order.iter().enumerate() {
                acc += w[i] / total;
                if (acc - top_p as f64).abs() < 1e-5 {
                    close = true;
                }
                if acc >= top_p as f64 {
                    keep = k + 1;
                    break;
                }
            }
            if keep < order.len() && w[order[keep]] >= w[order[keep - 1]] * (1.0 - 1e-5) {
                close = true;
            }
        }
        let mut kept: Vec<usize> = order[..keep]
            .iter()
            .copied()
            .filter(|&i| w[i] > 0.0)
            .collect();
        kept.sort_unstable();
        (kept, w, close)
    }

    /// The token the kernel's inverse CDF gives u: the kept tokens in token order, each
    /// owning an interval of [0, 1) as wide as its share of the kept mass; None when u lies
    /// within 1e-4 of a boundary (f32 sums in another order could go either way).
    fn inverse_cdf(kept: &[usize], w: &[f64], u: f32) -> Option<usize> {
        let total: f64 = kept.iter().map(|&i| w[i]).sum();
        let target = u as f64 * total;
        let mut run = 0.0;
        for (k, &i) in kept.iter().enumerate() {
            let next = run + w[i];
            let inner = k > 0 && (target - run).abs() < 1e-4 * total;
            let outer = k + 1 < kept.len() && (target - next).abs() < 1e-4 * total;
            if target < next || k + 1 == kept.len() {
                return if inner || outer { None } else { Some(i) };
            }
            run = next;
        }
        None
    }

    /// The largest f32 below 1: a uniform in [0, 1) can be this.
    const U_MAX: f32 = 1.0 - f32::EPSILON / 2.0;

    // Rows of nucleus sampling (top_p < 1) cost the simulator about twenty times what rows of
    // plain sampling do (forty block sums of bisection on 1024 threads): the tests below
    // spend them sparingly.

    /// Tiny temperatures are greedy: the argmax for any u, as the CPU sampler is, down to a
    /// subnormal temperature (the backend accepts any T > 0; 1 / T overflows f32 below
    /// 2.9e-39). n = 3000: three tokens a thread, the maxima at thread boundaries.
    #[test]
    fn sampling_is_greedy_in_the_limit_of_tiny_temperature() {
        let (n, rows) = (3000, 4);
        let mut logits = rand_f32(rows * n, 11, 4.0);
        for (r, at) in [0usize, 1023, 2047, 2999].into_iter().enumerate() {
            logits[r * n + at] = 5.0 + r as f32 * 1e-3;
        }
        assert!((1.0f32 / 1e-40).is_infinite());
        let u = [0.0, 0.3, 0.7, U_MAX];
        for (temp, top_p, rows) in [
            (1e-3f32, 1.0f32, 4usize),
            (1e-6, 1.0, 4),
            (1e-38, 1.0, 4),
            (1e-40, 1.0, 4),
            (1e-40, 0.5, 2),
        ] {
            let got = gpu_sample(&logits[..rows * n], n, &u[..rows], temp, top_p);
            for r in 0..rows {
                let row = &logits[r * n..(r + 1) * n];
                let want = cpu_argmax(row) as u32;
                let mut cpu = Sampler::new(SamplerConfig {
                    temperature: temp,
                    top_p,
                    seed: r as u64,
                })
                .unwrap();
                assert_eq!(
                    cpu.sample(row),
                    want,
                    "the CPU sampler at temperature {temp}"
                );
                assert_eq!(
                    got[r], want,
                    "temperature {temp}, top_p {top_p}, u {}",
                    u[r]
                );
            }
        }
    }

    /// A top_p between the cumulative masses (CPU order: by weight, then index) of the `k`th
    /// and `k + 1`th tokens, so that the CPU's nucleus is exactly those k tokens.
    fn top_p_keeping(logits: &[f32], temperature: f32, k: usize) -> f32 {
        let (_, w, _) = nucleus(logits, temperature, 1.0);
        let total: f64 = w.iter().sum();
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let below: f64 = sorted[..k - 1].iter().sum::<f64>() / total;
        (below + 0.5 * sorted[k - 1] / total) as f32
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

        /// Only the CPU sampler's nucleus is ever drawn, and each uniform draws the token the
        /// inverse CDF over the nucleus (in token order) gives it: u = 0 the first kept
        /// token, u just below 1 the last. The CPU sampler's own draws land in the same set.
        #[test]
        fn only_the_cpu_samplers_nucleus_is_drawn(n in prop::sample::select(vec![6usize, 50, 1000, 1500]),
                                                  keep_frac in 0.0f64..1.0,
                                                  temp in prop::sample::select(vec![0.5f32, 1.0, 2.0]),
                                                  seed in any::<u64>()) {
            let logits = rand_f32(n, seed, 3.0);
            let k = 1 + (keep_frac * keep_frac * (n - 1) as f64) as usize;
            let top_p = top_p_keeping(&logits, temp, k);
            let (kept, w, close) = nucleus(&logits, temp, top_p);
            prop_assume!(!close && top_p < 1.0);
            prop_assert_eq!(kept.len(), k);
            let mut cpu = Sampler::new(SamplerConfig { temperature: temp, top_p, seed }).unwrap();
            let mut drawn = std::collections::BTreeSet::new();
            for _ in 0..300 {
                let t = cpu.sample(&logits) as usize;
                prop_assert!(kept.binary_search(&t).is_ok(), "the CPU sampler drew {} outside {:?}", t, kept);
                drawn.insert(t);
            }
            if kept.len() <= 3 {
                prop_assert_eq!(drawn.into_iter().collect::<Vec<_>>(), kept.clone());
            }
            let u = [0.0f32, U_MAX, rand_f32(1, seed ^ 1, 0.5)[0] + 0.5];
            let got = gpu_sample(&logits, n, &u, temp, top_p);
            for (&t, &uk) in got.iter().zip(&u) {
                prop_assert!(kept.binary_search(&(t as usize)).is_ok(), "u {}: token {} outside the nucleus {:?}", uk, t, kept);
                if let Some(want) = inverse_cdf(&kept, &w, uk) {
                    prop_assert_eq!(t as usize, want, "u {}", uk);
                }
            }
            prop_assert_eq!(got[0] as usize, kept[0]);
            prop_assert_eq!(got[1] as usize, *kept.last().unwrap());
        }
    }

    /// Pearson's chi-square of token counts against probabilities over `tokens`.
    fn chi_square(got: &[u32], tokens: &[usize], p: &[f64]) -> f64 {
        let rows = got.len() as f64;
        tokens
            .iter()
            .zip(p)
            .map(|(&t, &pi)| {
                let seen = got.iter().filter(|&&g| g as usize == t).count() as f64;
                (seen - rows * pi).powi(2) / (rows * pi)
            })
            .sum()
    }

    /// Over seeded uniforms the draws follow the softmax at the temperature: chi-square
    /// below its 0.1% point (5 degrees of freedom), every draw the inverse CDF's token; over
    /// evenly spaced uniforms every token's count is its expected count within 1 (an
    /// inverse CDF's counts), at top_p 0.6 over the two kept tokens renormalised.
    #[test]
    fn draws_follow_the_softmax() {
        let logits = [0.5f32, 2.0, -1.0, 1.0, 0.0, 1.5];
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        let random: Vec<f32> = (0..128).map(|_| r.random::<f32>()).collect();
        let even = |m: usize| -> Vec<f32> { (0..m).map(|i| (i as f32 + 0.5) / m as f32).collect() };
        for (temp, top_p, u, chi2_bound) in [
            (1.0f32, 1.0f32, random, Some(20.52)),
            (2.0, 1.0, even(64), None),
            (1.0, 0.6, even(8), None),
        ] {
            let got = gpu_sample(&logits, 6, &u, temp, top_p);
            let (kept, w, close) = nucleus(&logits, temp, top_p);
            assert!(!close);
            if top_p < 1.0 {
                assert_eq!(kept, vec![1, 5]);
            }
            let mass: f64 = kept.iter().map(|&i| w[i]).sum();
            let p: Vec<f64> = kept.iter().map(|&i| w[i] / mass).collect();
            for (&t, &uk) in got.iter().zip(&u) {
                assert!(
                    kept.contains(&(t as usize)),
                    "temperature {temp} top_p {top_p} u {uk}: {t}"
                );
                if let Some(want) = inverse_cdf(&kept, &w, uk) {
                    assert_eq!(t as usize, want, "temperature {temp} top_p {top_p} u {uk}");
                }
            }
            if let Some(bound) = chi2_bound {
                let chi2 = chi_square(&got, &kept, &p);
                assert!(
                    chi2 < bound,
                    "temperature {temp} top_p {top_p}: chi-square {chi2}"
                );
            } else {
                for (&t, &pt) in kept.iter().zip(&p) {
                    let seen = got.iter().filter(|&&g| g as usize == t).count() as f64;
                    let want = pt * u.len() as f64;
                    assert!((seen - want).abs() <= 1.0, "temperature {temp} top_p {top_p} token {t}: {seen} draws, expected {want:.2}");
                }
            }
        }
    }

    /// u at the ends of [0, 1): tokens of probability 0 (-inf logits) at both ends of the
    /// row, over whole thread ranges, are never drawn; u = 0 and the smallest uniforms take
    /// the first token that has any mass, u just below 1 (and 1 itself, past the range) the
    /// last; with a nucleus, its first and last tokens in token order.
    #[test]
    fn uniforms_near_0_and_1_stay_on_tokens_with_mass() {
        let n = 2500; // three tokens a thread: thread 0's range and more are -inf
        let mut logits = rand_f32(n, 21, 2.0);
        logits[..7].fill(f32::NEG_INFINITY);
        logits[n - 9..].fill(f32::NEG_INFINITY);
        let u = [0.0f32, 1e-30, f32::EPSILON / 2.0, U_MAX, 1.0];
        let got = gpu_sample(&logits, n, &u, 1.0, 1.0);
        assert_eq!(got, [7, 7, 7, n - 10, n - 10].map(|t| t as u32));
        let top_p = top_p_keeping(&logits, 1.0, 300);
        let (kept, _, close) = nucleus(&logits, 1.0, top_p);
        assert!(!close && kept.len() == 300);
        let (first, last) = (kept[0] as u32, *kept.last().unwrap() as u32);
        assert!(
            first > 7 && last < n as u32 - 10,
            "a nucleus inside the row: {first}..={last}"
        );
        let got = gpu_sample(&logits, n, &[0.0, U_MAX, 1.0], 1.0, top_p);
        assert_eq!(got, vec![first, last, last], "top_p {top_p}");
    }

    /// Rows without a finite maximum: all NaN (the kernel's defined answer, 0) and all -inf
    /// (0, as the CPU sampler's argmax), with and without a nucleus.
    #[test]
    fn rows_of_nan_or_minus_infinity_give_0() {
        for top_p in [1.0f32, 0.5] {
            let u = [0.0f32, U_MAX];
            assert_eq!(gpu_sample(&[f32::NAN; 40], 40, &u, 1.0, top_p), vec![0; 2]);
            let row = [f32::NEG_INFINITY; 40];
            assert_eq!(gpu_sample(&row, 40, &u[..1], 1.0, top_p), vec![0]);
            let mut cpu = Sampler::new(SamplerConfig {
                temperature: 1.0,
                top_p,
                seed: 0,
            })
            .unwrap();
            assert_eq!(cpu.sample(&[f32::NAN; 40]), 0);
            assert_eq!(cpu.sample(&row), 0);
        }
    }

    /// A row with some NaN logits draws from the finite ones, within their nucleus, as the
    /// CPU sampler does (a NaN weighs 0): NaN at tokens 0 and 3, top_p 0.6 keeps 1 and 5.
    #[test]
    fn nan_logits_weigh_nothing_and_keep_the_nucleus() {
        let logits = [f32::NAN, 2.0, -1.0, f32::NAN, 0.0, 1.5];
        let mut cpu = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_p: 0.6,
            seed: 3,
        })
        .unwrap();
        assert!((0..200).all(|_| [1, 5].contains(&cpu.sample(&logits))));
        for (top_p, rows) in [(0.6f32, 4usize), (1.0, 8)] {
            let u: Vec<f32> = (0..rows).map(|i| (i as f32 + 0.5) / rows as f32).collect();
            let (kept, w, close) = nucleus(&logits, 1.0, top_p);
            assert!(!close);
            assert_eq!(
                kept,
                if top_p < 1.0 {
                    vec![1, 5]
                } else {
                    vec![1, 2, 4, 5]
                }
            );
            let got = gpu_sample(&logits, 6, &u, 1.0, top_p);
            for (&t, &uk) in got.iter().zip(&u) {
                assert!(
                    kept.contains(&(t as usize)),
                    "top_p {top_p} u {uk}: token {t} outside {kept:?}"
                );
                if let Some(want) = inverse_cdf(&kept, &w, uk) {
                    assert_eq!(t as usize, want, "top_p {top_p} u {uk}");
                }
            }
        }
    }

    /// A non-finite max: the CPU sampler returns the argmax (a +inf logit takes the softmax's
    /// whole mass; with nothing above -inf, the first -inf; with every logit NaN, 0), at any
    /// temperature, top-p and draw. Before, the kernel weighed a +inf logit exp(NaN), kept no
    /// token and returned 0.
    #[test]
    fn a_non_finite_max_is_the_cpu_samplers_argmax() {
        let inf = f32::INFINITY;
        let nan = f32::NAN;
        let cases: [&[f32]; 6] = [
            &[0.5, 2.0, inf, 1.0],
            &[inf, 2.0, 0.5, 1.0],
            &[nan, 0.5, inf, 2.0, inf],
            &[-inf, -inf, -inf, -inf],
            &[nan, -inf, nan, -inf],
            &[nan, nan, nan, nan],
        ];
        for logits in cases {
            let want = syncdrop::generate::argmax(logits) as u32;
            for (temperature, top_p) in [(1.0, 1.0), (0.7, 0.9), (1e-40, 0.5)] {
                let mut cpu = Sampler::new(SamplerConfig {
                    temperature,
                    top_p,
                    seed: 3,
                })
                .unwrap();
                assert_eq!(cpu.sample(logits), want, "CPU, {logits:?}");
                // long rows too: the first match may sit in any thread's stride
                let mut long = vec![-inf; 3000];
                long[2000..2000 + logits.len()].copy_from_slice(logits);
                let want_long = syncdrop::generate::argmax(&long) as u32;
                for (row, n, w) in [(logits, logits.len(), want), (&long[..], 3000, want_long)] {
                    assert_eq!(
                        gpu_sample(row, n, &[0.0, 0.5, U_MAX], temperature, top_p),
                        vec![w; 3],
                        "T {temperature} top_p {top_p} n {n}: {logits:?}"
                    );
                }
            }
        }
    }

    // ---- distillation ------------------------------------------------------------------------

    fn norm_params(rows: usize, d: usize, eps: f32) -> DistillNormParams {
        DistillNormParams {
            rows: rows as i32,
            d: d as i32,
            eps,
        }
    }

    /// distill_norm_fwd: (u, n, rinv).
    fn gpu_norm_fwd(
        x: &[f32],
        a: &[f32],
        w: &[f32],
        rows: usize,
        eps: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = w.len();
        let (mut u, mut n, mut rinv) = (
            vec![SENTINEL; rows * d],
            vec![SENTINEL; rows * d],
            vec![SENTINEL; rows],
        );
        let (up, np, rp) = (
            Ptr(u.as_mut_ptr()),
            Ptr(n.as_mut_ptr()),
            Ptr(rinv.as_mut_ptr()),
        );
        let p = norm_params(rows, d, eps);
        launch(rows_launch_config(rows), Blocks::Sequential, || unsafe {
            kernels::distill_norm_fwd(
                p,
                x.as_ptr(),
                a.as_ptr(),
                w.as_ptr(),
                up.get(),
                np.get(),
                rp.get(),
            )
        })
        .unwrap();
        (u, n, rinv)
    }

    /// distill_swiglu_bwd: dgu (t, 2f); the buffer has a sentinel tail past t * 2f.
    fn gpu_swiglu_bwd(gu: &[f32], ds: &[f32], t: usize, f: usize) -> Vec<f32> {
        let mut dgu = vec![SENTINEL; t * 2 * f + 300];
        let o = Ptr(dgu.as_mut_ptr());
        let p = SwigluParams {
            t: t as i32,
            f: f as i32,
        };
        launch(grid_1d(t * f), Blocks::Sequential, || unsafe {
            kernels::distill_swiglu_bwd(p, gu.as_ptr(), ds.as_ptr(), o.get())
        })
        .unwrap();
        assert!(
            dgu[t * 2 * f..].iter().all(|&v| v == SENTINEL),
            "written past t * 2f"
        );
        dgu.truncate(t * 2 * f);
        dgu
    }

    /// distill_norm_bwd: da.
    fn gpu_norm_bwd(
        u: &[f32],
        rinv: &[f32],
        w: &[f32],
        dn: &[f32],
        dout: &[f32],
        rows: usize,
        eps: f32,
    ) -> Vec<f32> {
        let d = w.len();
        let mut da = vec![SENTINEL; rows * d];
        let o = Ptr(da.as_mut_ptr());
        let p = norm_params(rows, d, eps);
        launch(rows_launch_config(rows), Blocks::Sequential, || unsafe {
            kernels::distill_norm_bwd(
                p,
                u.as_ptr(),
                rinv.as_ptr(),
                w.as_ptr(),
                dn.as_ptr(),
                dout.as_ptr(),
                o.get(),
            )
        })
        .unwrap();
        da
    }

    /// distill_norm_wgrad: dw (d); sentinel tail past d.
    fn gpu_norm_wgrad(u: &[f32], rinv: &[f32], dn: &[f32], rows: usize, d: usize) -> Vec<f32> {
        let mut dw = vec![SENTINEL; d + 300];
        let o = Ptr(dw.as_mut_ptr());
        let p = norm_params(rows, d, 0.0);
        launch(grid_1d(d), Blocks::Sequential, || unsafe {
            kernels::distill_norm_wgrad(p, u.as_ptr(), rinv.as_ptr(), dn.as_ptr(), o.get())
        })
        .unwrap();
        assert!(dw[d..].iter().all(|&v| v == SENTINEL), "written past d");
        dw.truncate(d);
        dw
    }

    /// distill_mse as the trainer launches it: (dout, the mean squared error from the
    /// blocks' partial sums, the partials).
    fn gpu_mse(out: &[f32], target: &[f32]) -> (Vec<f32>, f64, Vec<f64>) {
        let n = out.len();
        let mut dout = vec![SENTINEL; n + 300];
        let mut partial = vec![f64::NAN; MSE_BLOCKS + 4];
        let (dp, pp) = (Ptr(dout.as_mut_ptr()), Ptr(partial.as_mut_ptr()));
        let p = MseParams {
            n: n as i64,
            scale: (2.0 / n as f64) as f32,
            pad: 0,
        };
        launch(mse_launch_config(), Blocks::Sequential, || unsafe {
            kernels::distill_mse(p, out.as_ptr(), target.as_ptr(), dp.get(), pp.get())
        })
        .unwrap();
        assert!(dout[n..].iter().all(|&v| v == SENTINEL), "written past n");
        assert!(
            partial[MSE_BLOCKS..].iter().all(|v| v.is_nan()),
            "written past the grid"
        );
        assert!(
            partial[..MSE_BLOCKS].iter().all(|v| v.is_finite()),
            "a block wrote no partial"
        );
        dout.truncate(n);
        partial.truncate(MSE_BLOCKS);
        let loss = partial.iter().sum::<f64>() / n as f64;
        (dout, loss, partial)
    }

    /// distill_adam over one tensor, as the trainer launches it (sentinel tails past n).
    fn gpu_adam(
        param: &mut Vec<f32>,
        grad: &[f32],
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        step: usize,
        lr: f32,
    ) {
        let n = param.len();
        let p = AdamParams::new(n, lr, step);
        for b in [&mut *param, &mut *m, &mut *v] {
            b.extend([SENTINEL; 300]);
        }
        let (pp, mp, vp) = (
            Ptr(param.as_mut_ptr()),
            Ptr(m.as_mut_ptr()),
            Ptr(v.as_mut_ptr()),
        );
        launch(grid_1d(n), Blocks::Sequential, || unsafe {
            kernels::distill_adam(p, pp.get(), grad.as_ptr(), mp.get(), vp.get())
        })
        .unwrap();
        for b in [param, m, v] {
            assert!(b[n..].iter().all(|&x| x == SENTINEL), "written past n");
            b.truncate(n);
        }
    }

    /// |got - want| <= atol + rtol |want|, element by element.
    fn assert_close(
        what: &str,
        got: &[f32],
        want: &[f64],
        atol: f64,
        rtol: f64,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(got.len(), want.len(), "{}: length", what);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            prop_assert!(
                (g as f64 - w).abs() <= atol + rtol * w.abs(),
                "{}[{}]: {} vs {}",
                what,
                i,
                g,
                w
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        /// distill_norm_fwd: u = x + a exactly, n as the CPU trainer's rmsnorm of u, rinv as
        /// its 1 / sqrt(mean(u^2) + eps) (f32 sums in another order: relative 1e-5).
        #[test]
        fn norm_forward_matches_the_cpu_trainer(rows in 1usize..6,
                                                d in prop::sample::select(vec![1usize, 7, 64, 255, 256, 257, 576, 1000]),
                                                seed in any::<u64>()) {
            let eps = 1e-5f32;
            let x = rand_f32(rows * d, seed, 2.0);
            let a = rand_f32(rows * d, seed ^ 1, 1.0);
            let w: Vec<f32> = rand_f32(d, seed ^ 2, 0.3).iter().map(|v| 1.0 + v).collect();
            let (u, n, rinv) = gpu_norm_fwd(&x, &a, &w, rows, eps);
            let want_u: Vec<f32> = x.iter().zip(&a).map(|(x, a)| x + a).collect();
            prop_assert_eq!(&u, &want_u);
            let mut want_n = vec![0f32; rows * d];
            rmsnorm(&want_u, &w, eps, &mut want_n);
            let want_n: Vec<f64> = want_n.iter().map(|&v| v as f64).collect();
            assert_close("n", &n, &want_n, 1e-6, 1e-5)?;
            let want_r: Vec<f64> = want_u
                .chunks_exact(d)
                .map(|r| 1.0 / (r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64 + eps as f64).sqrt())
                .collect();
            assert_close("rinv", &rinv, &want_r, 0.0, 1e-5)?;
        }

        /// distill_swiglu_bwd against the CPU trainer's formula in f64, and as the gradient of
        /// the CPU's `swiglu`: sum(dgu . delta) is the central difference of sum(ds . s)
        /// along delta.
        #[test]
        fn swiglu_backward_is_the_gradient_of_the_cpus_swiglu(t in 1usize..6,
                                                              f in prop::sample::select(vec![1usize, 7, 64, 255, 256, 300]),
                                                              seed in any::<u64>()) {
            let gu = rand_f32(t * 2 * f, seed, 4.0);
            let ds = rand_f32(t * f, seed ^ 1, 1.0);
            let dgu = gpu_swiglu_bwd(&gu, &ds, t, f);
            let mut want = vec![0f64; t * 2 * f];
            for ti in 0..t {
                for j in 0..f {
                    let (g, up) = (gu[ti * 2 * f + j] as f64, gu[ti * 2 * f + f + j] as f64);
                    let sg = 1.0 / (1.0 + (-g).exp());
                    let d = ds[ti * f + j] as f64;
                    want[ti * 2 * f + j] = d * up * sg * (1.0 + g * (1.0 - sg));
                    want[ti * 2 * f + f + j] = d * g * sg;
                }
            }
            assert_close("dgu", &dgu, &want, 1e-6, 1e-5)?;
            let delta = rand_f32(t * 2 * f, seed ^ 2, 1.0);
            let h = 1e-2f32;
            let at = |sign: f32| -> f64 {
                let moved: Vec<f32> = gu.iter().zip(&delta).map(|(g, e)| g + sign * h * e).collect();
                swiglu(&moved, t, f).iter().zip(&ds).map(|(s, d)| (*s as f64) * (*d as f64)).sum()
            };
            let fd = (at(1.0) - at(-1.0)) / (2.0 * h as f64);
            let an: f64 = dgu.iter().zip(&delta).map(|(g, e)| (*g as f64) * (*e as f64)).sum();
            let scale: f64 = dgu.iter().zip(&delta).map(|(g, e)| ((*g as f64) * (*e as f64)).abs()).sum();
            prop_assert!((fd - an).abs() <= 1e-3 * scale + 1e-4, "directional derivative {} vs {}", an, fd);
        }

        /// distill_norm_bwd and distill_norm_wgrad on the tape distill_norm_fwd wrote: da and
        /// dw against the CPU trainer's formulas in f64, and as the gradients of
        /// sum(dn . n(u, w)) (central differences in f64 along random directions).
        #[test]
        fn norm_backward_is_the_gradient_of_the_norm(rows in 1usize..7,
                                                     d in prop::sample::select(vec![1usize, 7, 64, 255, 256, 257, 576]),
                                                     seed in any::<u64>()) {
            let eps = 1e-5f32;
            let x = rand_f32(rows * d, seed, 1.5);
            let a = rand_f32(rows * d, seed ^ 1, 0.5);
            let w: Vec<f32> = rand_f32(d, seed ^ 2, 0.3).iter().map(|v| 1.0 + v).collect();
            let dn = rand_f32(rows * d, seed ^ 3, 1.0);
            let dout = rand_f32(rows * d, seed ^ 4, 1e-2);
            let (u, _, rinv) = gpu_norm_fwd(&x, &a, &w, rows, eps);
            let da = gpu_norm_bwd(&u, &rinv, &w, &dn, &dout, rows, eps);
            let dw = gpu_norm_wgrad(&u, &rinv, &dn, rows, d);
            // the CPU trainer's formulas, f64
            let mut want_da = vec![0f64; rows * d];
            let mut want_dw = vec![0f64; d];
            let mut scale_da = vec![0f64; rows * d];
            for (r, &ri) in rinv.iter().enumerate() {
                let ri = ri as f64;
                let o = r * d;
                let dot: f64 = (0..d).map(|j| dn[o + j] as f64 * w[j] as f64 * u[o + j] as f64).sum();
                let c = ri * ri * ri * dot / d as f64;
                for j in 0..d {
                    let (p, q) = (ri * dn[o + j] as f64 * w[j] as f64, u[o + j] as f64 * c);
                    want_da[o + j] = dout[o + j] as f64 + p - q;
                    scale_da[o + j] = (dout[o + j] as f64).abs() + p.abs() + q.abs();
                    want_dw[j] += dn[o + j] as f64 * u[o + j] as f64 * ri;
                }
            }
            for i in 0..rows * d {
                prop_assert!((da[i] as f64 - want_da[i]).abs() <= 1e-5 * scale_da[i] + 1e-7, "da[{}]: {} vs {}", i, da[i], want_da[i]);
            }
            assert_close("dw", &dw, &want_dw, 1e-6, 1e-5)?;
            // L(u, w) = sum dn . u rinv(u) w, in f64
            let loss = |u: &[f64], w: &[f64]| -> f64 {
                u.chunks_exact(d).zip(dn.chunks_exact(d)).map(|(ur, dr)| {
                    let ri = 1.0 / (ur.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps as f64).sqrt();
                    (0..d).map(|j| dr[j] as f64 * ur[j] * ri * w[j]).sum::<f64>()
                }).sum()
            };
            let u64s: Vec<f64> = u.iter().map(|&v| v as f64).collect();
            let w64s: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let h = 1e-5;
            let du = rand_f32(rows * d, seed ^ 5, 1.0);
            let moved = |s: f64| -> Vec<f64> { u64s.iter().zip(&du).map(|(u, e)| u + s * h * *e as f64).collect() };
            let fd = (loss(&moved(1.0), &w64s) - loss(&moved(-1.0), &w64s)) / (2.0 * h);
            // da - dout is dL/du
            let an: f64 = (0..rows * d).map(|i| (da[i] as f64 - dout[i] as f64) * du[i] as f64).sum();
            let sc: f64 = (0..rows * d).map(|i| ((da[i] - dout[i]) as f64 * du[i] as f64).abs()).sum();
            prop_assert!((fd - an).abs() <= 1e-4 * sc + 1e-6, "du: directional derivative {} vs {}", an, fd);
            let dwd = rand_f32(d, seed ^ 6, 1.0);
            let movedw = |s: f64| -> Vec<f64> { w64s.iter().zip(&dwd).map(|(w, e)| w + s * h * *e as f64).collect() };
            let fd = (loss(&u64s, &movedw(1.0)) - loss(&u64s, &movedw(-1.0))) / (2.0 * h);
            let an: f64 = dw.iter().zip(&dwd).map(|(g, e)| *g as f64 * *e as f64).sum();
            let sc: f64 = dw.iter().zip(&dwd).map(|(g, e)| (*g as f64 * *e as f64).abs()).sum();
            prop_assert!((fd - an).abs() <= 1e-4 * sc + 1e-6, "dw: directional derivative {} vs {}", an, fd);
        }

        /// distill_adam against the CPU trainer's update over a few steps (the same f32
        /// expressions: within a few ulps), with sizes around the 256-thread block.
        #[test]
        fn adam_matches_the_cpu_trainers_update(n in prop::sample::select(vec![1usize, 255, 256, 257, 1000]),
                                                seed in any::<u64>()) {
            let (b1, b2, e) = ADAM;
            let lr = 1e-3f32;
            let mut p = rand_f32(n, seed, 1.0);
            let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
            let (mut pc, mut mc, mut vc) = (p.clone(), m.clone(), v.clone());
            for step in 1..=4 {
                let g = rand_f32(n, seed ^ step as u64, 0.1);
                gpu_adam(&mut p, &g, &mut m, &mut v, step, lr);
                let (c1, c2) = adam_corrections(step);
                for i in 0..n {
                    mc[i] = b1 * mc[i] + (1.0 - b1) * g[i];
                    vc[i] = b2 * vc[i] + (1.0 - b2) * g[i] * g[i];
                    pc[i] -= lr * (mc[i] / c1) / ((vc[i] / c2).sqrt() + e);
                }
                let close = |a: f32, b: f32| (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(1e-30);
                for i in 0..n {
                    prop_assert!(close(m[i], mc[i]) && close(v[i], vc[i]), "step {} m/v[{}]", step, i);
                    prop_assert!((p[i] - pc[i]).abs() <= 4.0 * f32::EPSILON * pc[i].abs() + 1e-4 * lr, "step {} param[{}]: {} vs {}", step, i, p[i], pc[i]);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

        /// distill_mse over the fixed grid of MSE_BLOCKS blocks, n below, at and past one
        /// grid stride: dout as the CPU trainer's 2 e / n, the partials summing to its loss.
        #[test]
        fn mse_matches_the_cpu_trainer(n in prop::sample::select(vec![1usize, 255, 256, 257, 32767, 32768, 32769, 70001]),
                                       seed in any::<u64>()) {
            let out = rand_f32(n, seed, 2.0);
            let target = rand_f32(n, seed ^ 1, 2.0);
            let (dout, loss, partial) = gpu_mse(&out, &target);
            let mut want_loss = 0f64;
            let want: Vec<f64> = out.iter().zip(&target).map(|(o, t)| {
                let e = (o - t) as f64;
                want_loss += e * e;
                ((2.0 * e / n as f64) as f32) as f64
            }).collect();
            want_loss /= n as f64;
            assert_close("dout", &dout, &want, 0.0, 3e-7)?;
            prop_assert!((loss - want_loss).abs() <= 1e-12 * want_loss, "loss {} vs {}", loss, want_loss);
            // block b holds the elements b * 256 + i (mod a grid stride)
            let mut want_partial = vec![0f64; MSE_BLOCKS];
            for i in 0..n {
                want_partial[(i / 256) % MSE_BLOCKS] += ((out[i] - target[i]) as f64).powi(2);
            }
            for (b, (&pb, &want)) in partial.iter().zip(&want_partial).enumerate() {
                prop_assert!((pb - want).abs() <= 1e-12 * want.max(1e-300), "partial[{}]: {} vs {}", b, pb, want);
            }
        }
    }

    // ---- the kernels composed into the trainer -------------------------------------------------

    /// Row-major C (m, n) = op(A) @ op(B) + beta C as the GPU trainer's cuBLAS calls
    /// (`Gemm::f32_rm`): `ta`: A stored (k, m), else (m, k); `tb`: B stored (n, k), else (k, n).
    /// f64 sums.
    fn gemm(
        (m, n, k): (usize, usize, usize),
        (a, ta): (&[f32], bool),
        (b, tb): (&[f32], bool),
        beta: f32,
        c: &mut [f32],
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for l in 0..k {
                    let av = if ta { a[l * m + i] } else { a[i * k + l] };
                    let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                    acc += av as f64 * bv as f64;
                }
                c[i * n + j] = (acc + beta as f64 * c[i * n + j] as f64) as f32;
            }
        }
    }

    /// GpuTrainer's forward and backward of one sample (src/backend/cuda/distill.rs), step for
    /// step, with the distill kernels in the simulator and host GEMMs for cuBLAS: the loss
    /// and every rank's gradients.
    fn composed_loss_and_grads(
        params: &[StudentParams],
        s: &Sample,
        d: usize,
        eps: f32,
    ) -> (f64, Vec<StudentParams>) {
        let t = s.x.len() / d;
        let mut out = s.x.clone();
        let mut tapes = Vec::new();
        for (p, att) in params.iter().zip(&s.att) {
            let (q, f) = (p.wo.len() / d, p.w_down.len() / d);
            let mut a = vec![0f32; t * d];
            gemm((t, d, q), (att, false), (&p.wo, true), 0.0, &mut a);
            let (u, n, rinv) = gpu_norm_fwd(&s.x, &a, &p.ffn_norm, t, eps);
            out.iter_mut().zip(&a).for_each(|(o, a)| *o += a);
            let mut gu = vec![0f32; t * 2 * f];
            gemm(
                (t, 2 * f, d),
                (&n, false),
                (&p.w_gate_up, true),
                0.0,
                &mut gu,
            );
            let sw = swiglu(&gu, t, f);
            gemm((t, d, f), (&sw, false), (&p.w_down, true), 1.0, &mut out);
            tapes.push((u, n, rinv, gu, sw));
        }
        let (dout, loss, _) = gpu_mse(&out, &s.target);
        let mut grads = Vec::new();
        for ((p, att), (u, n, rinv, gu, sw)) in params.iter().zip(&s.att).zip(&tapes) {
            let (q, f) = (p.wo.len() / d, p.w_down.len() / d);
            let mut g_wd = vec![0f32; d * f];
            gemm((d, f, t), (&dout, true), (sw, false), 0.0, &mut g_wd);
            let mut ds = vec![0f32; t * f];
            gemm((t, f, d), (&dout, false), (&p.w_down, false), 0.0, &mut ds);
            let dgu = gpu_swiglu_bwd(gu, &ds, t, f);
            let mut g_wgu = vec![0f32; 2 * f * d];
            gemm((2 * f, d, t), (&dgu, true), (n, false), 0.0, &mut g_wgu);
            let mut dn = vec![0f32; t * d];
            gemm(
                (t, d, 2 * f),
                (&dgu, false),
                (&p.w_gate_up, false),
                0.0,
                &mut dn,
            );
            let da = gpu_norm_bwd(u, rinv, &p.ffn_norm, &dn, &dout, t, eps);
            let g_norm = gpu_norm_wgrad(u, rinv, &dn, t, d);
            let mut g_wo = vec![0f32; d * q];
            gemm((d, q, t), (&da, true), (att, false), 0.0, &mut g_wo);
            grads.push(StudentParams {
                wo: g_wo,
                ffn_norm: g_norm,
                w_gate_up: g_wgu,
                w_down: g_wd,
            });
        }
        (loss, grads)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

        /// The distill kernels composed as GpuTrainer composes them give the CPU trainer's
        /// loss and gradients (relative 1e-4, as tests/cuda_kernels.rs holds the GPU trainer
        /// to), and distill_adam on those gradients the CPU trainer's parameters after a few
        /// Adam steps (relative 1e-3).
        #[test]
        fn the_kernels_compose_into_the_cpu_trainer(ranks in 1usize..4,
                                                    d in prop::sample::select(vec![8usize, 64, 260]),
                                                    q in prop::sample::select(vec![8usize, 16]),
                                                    f in prop::sample::select(vec![8usize, 48, 130]),
                                                    t in 1usize..12, seed in any::<u64>()) {
            let eps = 1e-5f32;
            let (init, data) = distill_problem(ranks, (d, q, f), &[t, t / 2 + 1], seed, rand_f32);
            for s in &data {
                let (lc, gc) = loss_and_grads(&init, s, d, eps, 1);
                let (lg, gg) = composed_loss_and_grads(&init, s, d, eps);
                prop_assert!((lg - lc).abs() <= 1e-5 * lc, "loss {} vs {}", lg, lc);
                for (r, (a, b)) in gg.iter().zip(&gc).enumerate() {
                    for ((name, x), (_, y)) in student_tensors(a).into_iter().zip(student_tensors(b)) {
                        let e = rel_err(x, y);
                        prop_assert!(e < 1e-4, "t {} rank {} d{}: relative error {:.2e}", s.x.len() / d, r, name, e);
                    }
                }
            }
            let mut cpu = CpuTrainer::new(init.clone(), &data, d, eps, 1);
            let mut params = init.clone();
            let zeros = |p: &StudentParams| StudentParams {
                wo: vec![0.0; p.wo.len()],
                ffn_norm: vec![0.0; p.ffn_norm.len()],
                w_gate_up: vec![0.0; p.w_gate_up.len()],
                w_down: vec![0.0; p.w_down.len()],
            };
            let mut m: Vec<StudentParams> = init.iter().map(zeros).collect();
            let mut v = m.clone();
            let lr = 1e-3;
            for step in 1..=3 {
                let i = step % data.len();
                cpu.adam_step(i, step, lr).unwrap();
                let (_, grads) = composed_loss_and_grads(&params, &data[i], d, eps);
                for (((p, g), mr), vr) in params.iter_mut().zip(&grads).zip(&mut m).zip(&mut v) {
                    gpu_adam(&mut p.wo, &g.wo, &mut mr.wo, &mut vr.wo, step, lr);
                    gpu_adam(&mut p.ffn_norm, &g.ffn_norm, &mut mr.ffn_norm, &mut vr.ffn_norm, step, lr);
                    gpu_adam(&mut p.w_gate_up, &g.w_gate_up, &mut mr.w_gate_up, &mut vr.w_gate_up, step, lr);
                    gpu_adam(&mut p.w_down, &g.w_down, &mut mr.w_down, &mut vr.w_down, step, lr);
                }
            }
            for (r, (a, b)) in params.iter().zip(&cpu.params().unwrap()).enumerate() {
                for ((name, x), (_, y)) in student_tensors(a).into_iter().zip(student_tensors(b)) {
                    let e = rel_err(x, y);
                    prop_assert!(e < 1e-3, "rank {} {} after 3 steps: relative error {:.2e}", r, name, e);
                }
            }
        }
    }
}
