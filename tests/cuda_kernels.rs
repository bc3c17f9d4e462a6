//! CUDA kernels against the CPU reference. Run on a GPU machine (scripts/gpu-check.sh);
//! without a GPU, or without the `cuda` feature, each test says "skipped" and passes.
//! Tolerance is computed on bf16-rounded inputs: |gpu - ref| <= atol + rtol * |ref|.

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_kernels_skipped_without_the_feature() {
    eprintln!("skipped: built without the `cuda` feature");
}

#[cfg(feature = "cuda")]
mod common;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::{distill_problem, rel_err, student_tensors};
    use half::bf16;
    use proptest::prelude::*;
    use syncdrop::backend::cpu::rmsnorm;
    use syncdrop::backend::cuda::{
        argmax, attention, context, embedding, gemm, gemv, kernels, rmsnorm, rope, sample, swiglu,
    };

    /// The stream and kernels of GPU 0, opened once per process (a context and its modules
    /// per proptest case would cost hundreds of fatbin loads, slow under compute-sanitizer),
    /// or None after "skipped: no GPU" (a failure under SYNCDROP_REQUIRE_GPU=1).
    fn gpu() -> Option<(
        std::sync::Arc<cudarc::driver::CudaStream>,
        &'static kernels::Kernels,
    )> {
        static GPU: std::sync::OnceLock<(
            std::sync::Arc<cudarc::driver::CudaStream>,
            kernels::Kernels,
        )> = std::sync::OnceLock::new();
        if !syncdrop::backend::gpu_or_skip("cuda_kernels") {
            return None;
        }
        let (stream, k) = GPU.get_or_init(|| {
            let ctx = context(0).expect("context on GPU 0");
            let k = kernels::Kernels::load(&ctx).expect("kernels load");
            (ctx.default_stream(), k)
        });
        Some((stream.clone(), k))
    }

    /// Uniform bf16 values in [-2, 2) from `seed`: distinct seeds give distinct streams
    /// (the seed is mixed first, so `seed` and `seed ^ 1` differ).
    fn rand_bf16(n: usize, seed: u64) -> Vec<bf16> {
        let mut s =
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0xD1B5_4A32_D192_ED03;
        if s == 0 {
            s = 1; // xorshift's one fixed point
        }
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn add_rmsnorm_matches_cpu(rows in 1usize..9, d in prop::sample::select(vec![1usize, 7, 8, 9, 63, 64, 65, 576, 1000, 4096, 8192]),
                                  with_delta in any::<bool>(), seed in any::<u64>()) {
            let Some((stream, k)) = gpu() else { return Ok(()); };
            let x = rand_bf16(rows * d, seed);
            let dx = rand_bf16(rows * d, seed ^ 1);
            let w = rand_bf16(d, seed ^ 2);
            // reference on bf16-rounded values, residual rounded to bf16 like the kernel stores it
            let resid: Vec<f32> = x.iter().zip(&dx).map(|(a, b)| {
                let v = a.to_f32() + if with_delta { b.to_f32() } else { 0.0 };
                bf16::from_f32(v).to_f32()
            }).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let mut expect = vec![0f32; rows * d];
            rmsnorm(&resid, &wf, 1e-5, &mut expect);
            let mut r = stream.clone_htod(&x).unwrap();
            let dd = stream.clone_htod(&dx).unwrap();
            let wd = stream.clone_htod(&w).unwrap();
            let mut out = stream.alloc_zeros::<bf16>(rows * d).unwrap();
            rmsnorm::add_rmsnorm_bf16(&stream, k, rows, d, 1e-5, &mut r, with_delta.then_some(&dd), &wd, &mut out).unwrap();
            let got: Vec<bf16> = stream.clone_dtoh(&out).unwrap();
            let res: Vec<bf16> = stream.clone_dtoh(&r).unwrap();
            for i in 0..rows * d {
                let (g, e) = (got[i].to_f32(), expect[i]);
                prop_assert!((g - e).abs() <= 1e-2 + 1e-2 * e.abs(), "out[{}] = {} vs {}", i, g, e);
                prop_assert_eq!(res[i].to_f32(), resid[i], "residual[{}]", i);
            }
        }

        #[test]
        fn gemv_matches_cpu(t in 1usize..5, n in prop::sample::select(vec![1usize, 7, 8, 9, 100, 1024]),
                            k in prop::sample::select(vec![1usize, 7, 8, 9, 64, 576, 1000, 4096]), seed in any::<u64>()) {
            let Some((stream, kern)) = gpu() else { return Ok(()); };
            let w = rand_bf16(n * k, seed);
            let x = rand_bf16(t * k, seed ^ 5);
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let mut expect = vec![0f32; t * n];
            syncdrop::backend::cpu::matmul_rowwise(&xf, t, &wf, n, k, &mut expect, 1);
            let wd = stream.clone_htod(&w).unwrap();
            let xd = stream.clone_htod(&x).unwrap();
            let mut yd = stream.alloc_zeros::<bf16>(t * n).unwrap();
            gemv::gemv_bf16(&stream, kern, (t, n, k), &wd, &xd, &mut yd).unwrap();
            let got: Vec<bf16> = stream.clone_dtoh(&yd).unwrap();
            let scale = (k as f32).sqrt();
            for i in 0..t * n {
                let (g, e) = (got[i].to_f32(), expect[i]);
                prop_assert!((g - e).abs() <= 1e-2 * scale + 1e-2 * e.abs(), "y[{}] = {} vs {}", i, g, e);
            }
        }

        #[test]
        fn rope_matches_cpu(t in 1usize..6, heads in 1usize..5, hd in prop::sample::select(vec![2usize, 8, 64, 128]),
                            pos0 in 0usize..3000, half_style in any::<bool>(), seed in any::<u64>()) {
            let Some((stream, kern)) = gpu() else { return Ok(()); };
            let style = if half_style { syncdrop::RopeStyle::Half } else { syncdrop::RopeStyle::Interleaved };
            let stride = heads * hd + 3; // rows wider than the rotated part: the tail is untouched
            let x = rand_bf16(t * stride, seed);
            let mut expect: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let (cos, sin) = syncdrop::backend::cpu::rope_tables(10000.0, hd, pos0 + t);
            for r in 0..t {
                let p = pos0 + r;
                for h in 0..heads {
                    let v = &mut expect[r * stride + h * hd..r * stride + (h + 1) * hd];
                    syncdrop::backend::cpu::rope_head(v, &cos[p * hd / 2..(p + 1) * hd / 2], &sin[p * hd / 2..(p + 1) * hd / 2], style);
                }
            }
            let mut xd = stream.clone_htod(&x).unwrap();
            rope::rope_bf16(&stream, kern, &mut xd, (t, heads, hd, stride), pos0, 10000.0, style).unwrap();
            let got: Vec<bf16> = stream.clone_dtoh(&xd).unwrap();
            for i in 0..t * stride {
                let (g, e) = (got[i].to_f32(), expect[i]);
                // angles up to ~3000 rad: f32 argument reduction differs from the f64 tables
                prop_assert!((g - e).abs() <= 2e-2 + 2e-2 * e.abs(), "x[{}] = {} vs {}", i, g, e);
            }
        }

        #[test]
        fn swiglu_matches_cpu(t in 1usize..5, f in prop::sample::select(vec![1usize, 7, 8, 9, 384, 1536]), seed in any::<u64>()) {
            let Some((stream, kern)) = gpu() else { return Ok(()); };
            let gu = rand_bf16(t * 2 * f, seed);
            let guf: Vec<f32> = gu.iter().map(|v| v.to_f32()).collect();
            let expect = syncdrop::distill::swiglu(&guf, t, f);
            let gd = stream.clone_htod(&gu).unwrap();
            let mut hd = stream.alloc_zeros::<bf16>(t * f).unwrap();
            swiglu::swiglu_bf16(&stream, kern, t, f, &gd, &mut hd).unwrap();
            let got: Vec<bf16> = stream.clone_dtoh(&hd).unwrap();
            for i in 0..t * f {
                let (g, e) = (got[i].to_f32(), expect[i]);
                prop_assert!((g - e).abs() <= 1e-2 + 1e-2 * e.abs(), "h[{}] = {} vs {}", i, g, e);
            }
        }

        #[test]
        fn argmax_matches_cpu(rows in 1usize..5, n in prop::sample::select(vec![1usize, 2, 255, 256, 257, 49152]), seed in any::<u64>(), tie in any::<bool>()) {
            let Some((stream, kern)) = gpu() else { return Ok(()); };
            let mut x: Vec<f32> = rand_bf16(rows * n, seed).iter().map(|v| v.to_f32()).collect();
            if tie && n > 3 {
                for r in 0..rows { x[r * n + n - 1] = 99.0; x[r * n + 1] = 99.0; }
            }
            let xd = stream.clone_htod(&x).unwrap();
            let mut od = stream.alloc_zeros::<u32>(rows).unwrap();
            argmax::argmax_f32(&stream, kern, rows, n, &xd, &mut od).unwrap();
            let got: Vec<u32> = stream.clone_dtoh(&od).unwrap();
            for r in 0..rows {
                prop_assert_eq!(got[r] as usize, syncdrop::generate::argmax(&x[r * n..(r + 1) * n]), "row {}", r);
            }
        }
    }

    fn f32s(v: &[bf16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    fn close(g: f32, e: f32, atol: f32, rtol: f32) -> bool {
        (g - e).abs() <= atol + rtol * e.abs()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn gemv_f32_io_matches_cpu(t in 1usize..5, n in prop::sample::select(vec![1usize, 7, 8, 9, 100, 1280]),
                                   k in prop::sample::select(vec![1usize, 7, 8, 9, 64, 576, 1000, 1024, 1032, 8192]), seed in any::<u64>()) {
            let Some((stream, kern)) = gpu() else { return Ok(()); };
            let w = rand_bf16(n * k, seed);
            let x = f32s(&rand_bf16(t * k, seed ^ 5));
            let mut expect = vec![0f32; t * n];
            syncdrop::backend::cpu::matmul_rowwise(&x, t, &f32s(&w), n, k, &mut expect, 1);
            let wd = stream.clone_htod(&w).unwrap();
            let xd = stream.clone_htod(&x).unwrap();
            let mut yd = stream.alloc_zeros::<f32>(t * n).unwrap();
            gemv::gemv_bf16_f32(&stream, kern, (t, n, k), &wd.slice(..), &xd.slice(..), &mut yd.slice_mut(..)).unwrap();
            let got: Vec<f32> = stream.clone_dtoh(&yd).unwrap();
            for i in 0..t * n {
                // same bf16 inputs, f32 sums in another order: only rounding differs
                prop_assert!(close(got[i], expect[i], 1e-4 * (k as f32).sqrt(), 1e-4), "y[{}] = {} vs {}", i, got[i], expect[i]);
            }
        }

        #[test]
        fn cublas_gemm_matches_cpu(t in prop::sample::select(vec![5usize, 17, 64, 130]), n in prop::sample::select(vec![8usize, 100, 576]),
                                   k in prop::sample::select(vec![8usize, 64, 576, 1000]), seed in any::<u64>()) {
            let Some((stream, _kern)) = gpu() else { return Ok(()); };
            let w = rand_bf16(n * k, seed);
            let x = rand_bf16(t * k, seed ^ 9);
            let mut expect = vec![0f32; t * n];
            syncdrop::backend::cpu::matmul_rowwise(&f32s(&x), t, &f32s(&w), n, k, &mut expect, 1);
            let g = gemm::Gemm::new(&stream).unwrap();
            let wd = stream.clone_htod(&w).unwrap();
            let xd = stream.clone_htod(&x).unwrap();
            let mut yd = stream.alloc_zeros::<f32>(t * n).unwrap();
            g.bf16_f32((t, n, k), &wd.slice(..), &xd.slice(..), &mut yd.slice_mut(..)).unwrap();
            let got: Vec<f32> = stream.clone_dtoh(&yd).unwrap();
            for i in 0..t * n {
                prop_assert!(close(got[i], expect[i], 1e-3 * (k as f32).sqrt(), 1e-3), "y[{}] = {} vs {}", i, got[i], expect[i]);
            }
        }

        #[test]
        fn add_rmsnorm_f32_matches_cpu(rows in 1usize..9, d in prop::sample::select(vec![1usize, 7, 64, 65, 576, 8192]),
                                       with_delta in any::<bool>(), seed in any::<u64>()) {
            let Some((stream, k)) = gpu() else { return Ok(()); };
            let x = f32s(&rand_bf16(rows * d, seed));
            let dx = f32s(&rand_bf16(rows * d, seed ^ 1));
            let w = f32s(&rand_bf16(d, seed ^ 2));
            let resid: Vec<f32> = x.iter().zip(&dx).map(|(a, b)| if with_delta { a + b } else { *a }).collect();
            let mut expect = vec![0f32; rows * d];
            rmsnorm(&resid, &w, 1e-5, &mut expect);
            let mut r = stream.clone_htod(&x).unwrap();
            let dd = stream.clone_htod(&dx).unwrap();
            let wd = stream.clone_htod(&w).unwrap();
            let mut out = stream.alloc_zeros::<f32>(rows * d).unwrap();
            if with_delta {
                rmsnorm::add_rmsnorm_f32(&stream, k, rows, d, 1e-5, &mut r.slice_mut(..), Some(&dd.slice(..)), &wd.slice(..), &mut out.slice_mut(..)).unwrap();
            } else {
                rmsnorm::rmsnorm_f32(&stream, k, rows, d, 1e-5, &r.slice(..), &wd.slice(..), &mut out.slice_mut(..)).unwrap();
            }
            let got: Vec<f32> = stream.clone_dtoh(&out).unwrap();
            let res: Vec<f32> = stream.clone_dtoh(&r).unwrap();
            for i in 0..rows * d {
                prop_assert!(close(got[i], expect[i], 1e-5, 1e-4), "out[{}] = {} vs {}", i, got[i], expect[i]);
                prop_assert_eq!(res[i], resid[i], "residual[{}]", i);
            }
        }

        #[test]
        fn qkv_epilogue_and_attention_match_cpu(t in 1usize..6, pos0 in prop::sample::select(vec![0usize, 1, 63, 64, 200, 1000]),
                                                n_kv in 1usize..3, group in 1usize..4, hd in prop::sample::select(vec![8usize, 64, 128]),
                                                half_style in any::<bool>(), bias in any::<bool>(), forced_split in any::<bool>(),
                                                device_pos in any::<bool>(), seed in any::<u64>()) {
            let Some((stream, kern)) = gpu() else { return Ok(()); };
            let style = if half_style { syncdrop::RopeStyle::Half } else { syncdrop::RopeStyle::Interleaved };
            let n_q = n_kv * group;
            let cap = pos0 + t + 5;
            let width = (n_q + 2 * n_kv) * hd;
            let theta = 10000.0f32;
            // earlier cache positions hold random K/V (bf16), the new rows come from qkv
            let old_k = f32s(&rand_bf16(n_kv * cap * hd, seed ^ 11));
            let old_v = f32s(&rand_bf16(n_kv * cap * hd, seed ^ 12));
            let qkv = f32s(&rand_bf16(t * width, seed));
            let b = f32s(&rand_bf16(width, seed ^ 3));
            let q_to_kv: Vec<usize> = (0..n_q).map(|h| h / group).collect();
            // CPU reference: bias, RoPE, cache write (bf16-rounded as the GPU stores it)
            let (cos, sin) = syncdrop::backend::cpu::rope_tables(theta, hd, cap);
            let (mut kc, mut vc) = (old_k.clone(), old_v.clone());
            let mut q_ref = vec![0f32; t * n_q * hd];
            for r in 0..t {
                let p = pos0 + r;
                let mut row = qkv[r * width..(r + 1) * width].to_vec();
                if bias { row.iter_mut().zip(&b).for_each(|(x, b)| *x += b); }
                for h in row[..(n_q + n_kv) * hd].chunks_exact_mut(hd) {
                    syncdrop::backend::cpu::rope_head(h, &cos[p * hd / 2..(p + 1) * hd / 2], &sin[p * hd / 2..(p + 1) * hd / 2], style);
                }
                q_ref[r * n_q * hd..(r + 1) * n_q * hd].copy_from_slice(&row[..n_q * hd]);
                for kh in 0..n_kv {
                    for i in 0..hd {
                        kc[(kh * cap + p) * hd + i] = bf16::from_f32(row[(n_q + kh) * hd + i]).to_f32();
                        vc[(kh * cap + p) * hd + i] = bf16::from_f32(row[(n_q + n_kv + kh) * hd + i]).to_f32();
                    }
                }
            }
            let mut att_ref = vec![0f32; t * n_q * hd];
            let mut scores = Vec::new();
            for r in 0..t {
                for h in 0..n_q {
                    let base = q_to_kv[h] * cap * hd;
                    let len = pos0 + r + 1;
                    syncdrop::backend::cpu::attend(&q_ref[(r * n_q + h) * hd..(r * n_q + h + 1) * hd], &kc[base..base + len * hd],
                        &vc[base..base + len * hd], len, &mut scores, &mut att_ref[(r * n_q + h) * hd..(r * n_q + h + 1) * hd]);
                }
            }
            // GPU
            let to_b = |v: &[f32]| v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>();
            let mut kd = stream.clone_htod(&to_b(&old_k)).unwrap();
            let mut vd = stream.clone_htod(&to_b(&old_v)).unwrap();
            let qkvd = stream.clone_htod(&qkv).unwrap();
            let bd = stream.clone_htod(&b).unwrap();
            let mut qd = stream.alloc_zeros::<f32>(t * n_q * hd).unwrap();
            let bias_view = bd.slice(..);
            // a captured decode graph reads the position on the device (and splits for the
            // whole capacity): the same results either way
            let pos_dev = stream.clone_htod(&[pos0 as i32]).unwrap();
            let pos = if device_pos { rope::Pos::Device(&pos_dev) } else { rope::Pos::Host(pos0) };
            rope::qkv_rope_cache(&stream, kern, (t, n_q, n_kv, hd), (cap, style, theta), pos,
                &qkvd.slice(..), bias.then_some(&bias_view), &mut qd.slice_mut(..), &mut kd.slice_mut(..), &mut vd.slice_mut(..)).unwrap();
            let q_got: Vec<f32> = stream.clone_dtoh(&qd).unwrap();
            for i in 0..t * n_q * hd {
                prop_assert!(close(q_got[i], q_ref[i], 1e-4, 1e-4), "q[{}] = {} vs {}", i, q_got[i], q_ref[i]);
            }
            let k_got: Vec<bf16> = stream.clone_dtoh(&kd).unwrap();
            for i in 0..n_kv * cap * hd {
                prop_assert!(close(k_got[i].to_f32(), kc[i], 1e-3, 8e-3), "k[{}] = {} vs {}", i, k_got[i], kc[i]);
            }
            let v_got: Vec<bf16> = stream.clone_dtoh(&vd).unwrap();
            for i in 0..n_kv * cap * hd {
                // V is only biased and rounded: exact
                prop_assert!(v_got[i].to_f32() == vc[i], "v[{}] = {} vs {}", i, v_got[i], vc[i]);
            }
            let keys = if device_pos { cap } else { pos0 + t };
            let split = if forced_split {
                attention::split_plan(t, n_q, keys, usize::MAX)
            } else {
                attention::split_plan(t, n_q, keys, 1)
            };
            let np = attention::partial_len(t, n_q, hd, split.0).max(1);
            let mut part = stream.alloc_zeros::<f32>(np).unwrap();
            let q2k = stream.clone_htod(&q_to_kv.iter().map(|x| *x as i32).collect::<Vec<_>>()).unwrap();
            let mut od = stream.alloc_zeros::<f32>(t * n_q * hd).unwrap();
            attention::attention_f32(&stream, kern, (t, n_q, n_kv, hd, cap), pos, split,
                &qd.slice(..), &kd.slice(..), &vd.slice(..), &q2k, &mut od.slice_mut(..), &mut part.slice_mut(..)).unwrap();
            let got: Vec<f32> = stream.clone_dtoh(&od).unwrap();
            for i in 0..t * n_q * hd {
                // K written by the GPU and the CPU may round differently by one bf16 ulp
                prop_assert!(close(got[i], att_ref[i], 5e-3, 5e-3), "att[{}] = {} vs {} (split {:?}, device pos {})", i, got[i], att_ref[i], split, device_pos);
            }
        }

        #[test]
        fn embedding_and_swiglu_f32_match_cpu(t in 1usize..6, d in prop::sample::select(vec![1usize, 8, 576]), seed in any::<u64>()) {
            let Some((stream, kern)) = gpu() else { return Ok(()); };
            let vocab = 50;
            let table = rand_bf16(vocab * d, seed);
            let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7 + seed as u32) % vocab as u32).collect();
            let td = stream.clone_htod(&table).unwrap();
            let idd = stream.clone_htod(&ids).unwrap();
            let mut od = stream.alloc_zeros::<f32>(t * d).unwrap();
            embedding::embedding_f32(&stream, kern, d, &ids, &idd.slice(..), &td.slice(..), &mut od.slice_mut(..)).unwrap();
            let got: Vec<f32> = stream.clone_dtoh(&od).unwrap();
            for (r, id) in ids.iter().enumerate() {
                for c in 0..d {
                    prop_assert_eq!(got[r * d + c], table[*id as usize * d + c].to_f32());
                }
            }
            let bad = [vocab as u32];
            prop_assert!(embedding::embedding_f32(&stream, kern, d, &bad, &idd.slice(..), &td.slice(..), &mut od.slice_mut(..)).is_err());
            let gu = f32s(&rand_bf16(t * 2 * d, seed ^ 4));
            let expect = syncdrop::distill::swiglu(&gu, t, d);
            let gd = stream.clone_htod(&gu).unwrap();
            let mut hd = stream.alloc_zeros::<f32>(t * d).unwrap();
            swiglu::swiglu_f32(&stream, kern, t, d, &gd.slice(..), &mut hd.slice_mut(..)).unwrap();
            let got: Vec<f32> = stream.clone_dtoh(&hd).unwrap();
            for i in 0..t * d {
                prop_assert!(close(got[i], expect[i], 1e-5, 1e-4), "h[{}] = {} vs {}", i, got[i], expect[i]);
            }
        }
    }

    /// Sampling: a very low temperature or a tiny nucleus is greedy; otherwise the draws
    /// follow the softmax (chi-square on a small vocabulary, 4,000 rows at once).
    #[test]
    fn sampling_is_greedy_in_the_limit_and_follows_the_softmax() {
        let Some((stream, kern)) = gpu() else { return };
        let n = 6;
        let rows = 4000;
        let logits_row = [0.5f32, 2.0, -1.0, 1.0, 0.0, 1.5];
        let logits: Vec<f32> = (0..rows).flat_map(|_| logits_row).collect();
        let u: Vec<f32> = (0..rows)
            .map(|i| ((i as f32 + 0.5) / rows as f32 * 7919.0).fract())
            .collect();
        let ld = stream.clone_htod(&logits).unwrap();
        let ud = stream.clone_htod(&u).unwrap();
        let mut od = stream.alloc_zeros::<u32>(rows).unwrap();
        for (temp, top_p) in [(1e-3f32, 1.0f32), (1.0, 0.05)] {
            sample::sample_f32(
                &stream,
                kern,
                (rows, n),
                temp,
                top_p,
                &ld.slice(..),
                &ud.slice(..),
                &mut od.slice_mut(..),
            )
            .unwrap();
            let got: Vec<u32> = stream.clone_dtoh(&od).unwrap();
            assert!(
                got.iter().all(|t| *t == 1),
                "temperature {temp} top_p {top_p}: not greedy"
            );
        }
        sample::sample_f32(
            &stream,
            kern,
            (rows, n),
            1.0,
            1.0,
            &ld.slice(..),
            &ud.slice(..),
            &mut od.slice_mut(..),
        )
        .unwrap();
        let got: Vec<u32> = stream.clone_dtoh(&od).unwrap();
        let z: f32 = logits_row.iter().map(|x| x.exp()).sum();
        let mut chi2 = 0.0;
        for (i, l) in logits_row.iter().enumerate() {
            let expect = rows as f32 * l.exp() / z;
            let seen = got.iter().filter(|t| **t as usize == i).count() as f32;
            chi2 += (seen - expect).powi(2) / expect;
        }
        // 5 degrees of freedom: P(chi2 > 20.5) < 0.001
        assert!(chi2 < 20.5, "chi-square {chi2}");
        // nucleus 0.6: only tokens 1 (p~.43) and 5 (p~.26) are kept
        sample::sample_f32(
            &stream,
            kern,
            (rows, n),
            1.0,
            0.6,
            &ld.slice(..),
            &ud.slice(..),
            &mut od.slice_mut(..),
        )
        .unwrap();
        let got: Vec<u32> = stream.clone_dtoh(&od).unwrap();
        assert!(got.iter().all(|t| *t == 1 || *t == 5), "nucleus leaked");
        assert!(got.contains(&5) && got.contains(&1));
        assert!(sample::sample_f32(
            &stream,
            kern,
            (rows, n),
            0.0,
            1.0,
            &ld.slice(..),
            &ud.slice(..),
            &mut od.slice_mut(..)
        )
        .is_err());
    }

    /// Streams run asynchronously to each other and events order them, as the ISO schedule
    /// (a compute and a communication stream per rank) relies on: stream B, waiting on an
    /// event recorded on stream A after a 1 s kernel and a copy, sees the copy; without the
    /// wait it reads at once and sees the old value. (The simulated driver gives each stream
    /// a worker thread of its own for this: a missing wait in the backend is a real race.)
    #[test]
    fn streams_run_asynchronously_and_events_order_them() {
        let Some((_, k)) = gpu() else {
            return;
        };
        // a context handle of its own: cudarc's per-buffer event tracking (on by default)
        // would make B wait for A's write by itself
        let ctx = context(0).unwrap();
        // SAFETY: the buffers below are ordered by hand: that is what this test checks.
        unsafe { ctx.disable_event_tracking() };
        let (a, b) = (ctx.new_stream().unwrap(), ctx.new_stream().unwrap());
        let hold = k.function("emulate", "hold_link").unwrap();
        let one_warp = cudarc::driver::LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let ms = std::time::Duration::from_millis;
        for wait in [false, true] {
            let mut buf = a.alloc_zeros::<u32>(1).unwrap();
            a.synchronize().unwrap();
            let ns: i64 = 1_000_000_000;
            use cudarc::driver::PushKernelArg;
            let mut l = a.launch_builder(&hold);
            l.arg(&ns);
            // SAFETY: hold_link(int64_t) reads nothing but its argument.
            unsafe { l.launch(one_warp) }.unwrap();
            a.memcpy_htod(&[7u32], &mut buf).unwrap();
            let ev = a.record_event(None).unwrap();
            if wait {
                b.wait(&ev).unwrap();
            }
            let t0 = std::time::Instant::now();
            let got = b.clone_dtoh(&buf).unwrap()[0];
            let dt = t0.elapsed();
            a.synchronize().unwrap();
            if wait {
                assert_eq!(got, 7, "B waited for A's event: it sees A's copy");
                assert!(dt >= ms(500), "the wait took {dt:?}, A held 1 s");
            } else {
                assert_eq!(
                    got, 0,
                    "B did not wait: A's copy, after a 1 s kernel, is not in yet"
                );
                assert!(
                    dt < ms(500),
                    "B waited {dt:?} for a stream it never waited on"
                );
            }
        }
    }

    /// Runs without a GPU: every `extern "C" __global__` kernel in csrc/ is in the list the
    /// loader resolves eagerly, and the P2P limits agree between params.h and Rust.
    #[test]
    fn kernel_list_and_p2p_limits_match_csrc() {
        let mut found = Vec::new();
        for e in std::fs::read_dir("csrc").unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "cu") {
                let family = path.file_stem().unwrap().to_string_lossy().to_string();
                let text = std::fs::read_to_string(&path).unwrap();
                for part in text.split("extern \"C\" __global__").skip(1) {
                    // skip `__launch_bounds__(...)` before the name
                    let part = part.trim_start().trim_start_matches("void").trim_start();
                    let part = match part.strip_prefix("__launch_bounds__") {
                        Some(rest) => &rest[rest.find(')').unwrap() + 1..],
                        None => part,
                    };
                    let head = &part[..part.find('(').unwrap()];
                    let name = head.split_whitespace().last().unwrap().to_string();
                    found.push((family.clone(), name));
                }
            }
        }
        found.sort();
        let mut listed: Vec<(String, String)> = kernels::KERNEL_NAMES
            .iter()
            .flat_map(|(f, ns)| ns.iter().map(move |n| (f.to_string(), n.to_string())))
            .collect();
        listed.sort();
        assert_eq!(found, listed);
        let params = std::fs::read_to_string("csrc/params.h").unwrap();
        let define = |name: &str| -> usize {
            let line = params
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap();
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        use syncdrop::backend::cuda::allreduce;
        assert_eq!(define("AR_MAX_WORLD"), allreduce::MAX_WORLD);
        assert_eq!(define("AR_MAX_BLOCKS"), allreduce::MAX_BLOCKS);
        assert_eq!(
            define("DISTILL_MSE_BLOCKS"),
            syncdrop::backend::cuda::distill::MSE_BLOCKS
        );
    }

    /// Uniform f32 in [-scale, scale) from `seed`.
    fn rand_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        rand_bf16(n, seed)
            .iter()
            .map(|v| v.to_f32() * scale / 2.0)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

        /// The GPU trainer's losses and gradients, and its parameters after Adam steps, are
        /// the CPU trainer's (f32 sums in another order: relative 1e-4, 1e-3 after steps).
        #[test]
        fn gpu_distillation_matches_cpu(ranks in 1usize..4, d in prop::sample::select(vec![8usize, 64, 96]),
                                        q in prop::sample::select(vec![8usize, 64]), f in prop::sample::select(vec![8usize, 48, 128]),
                                        t in 1usize..40, seed in any::<u64>()) {
            use syncdrop::distill::{CpuTrainer, Trainer};
            if gpu().is_none() { return Ok(()); }
            let (init, data) = distill_problem(ranks, (d, q, f), &[t, t / 2 + 1], seed, rand_f32);
            let eps = 1e-5;
            let mut cpu = CpuTrainer::new(init.clone(), &data, d, eps, 1);
            let mut gpu = syncdrop::backend::cuda::distill_trainer(0, &init, &data, d, eps).unwrap();
            for i in 0..data.len() {
                let (lc, gc) = cpu.loss_and_grads(i).unwrap();
                let (lg, gg) = gpu.loss_and_grads(i).unwrap();
                prop_assert!((lg - lc).abs() <= 1e-4 * lc.abs(), "sample {i}: loss {lg} vs {lc}");
                for (r, (a, b)) in gg.iter().zip(&gc).enumerate() {
                    for ((name, x), (_, y)) in student_tensors(a).into_iter().zip(student_tensors(b)) {
                        let e = rel_err(x, y);
                        prop_assert!(e < 1e-4, "sample {i} rank {r} d{name}: relative error {e:.2e}");
                    }
                }
            }
            for step in 1..=6 {
                let i = step % data.len();
                cpu.adam_step(i, step, 1e-3).unwrap();
                gpu.adam_step(i, step, 1e-3).unwrap();
            }
            for (r, (a, b)) in gpu.params().unwrap().iter().zip(&cpu.params().unwrap()).enumerate() {
                for ((name, x), (_, y)) in student_tensors(a).into_iter().zip(student_tensors(b)) {
                    let e = rel_err(x, y);
                    prop_assert!(e < 1e-3, "rank {r} {name} after 6 steps: relative error {e:.2e}");
                }
            }
            for range in [0..data.len(), 1..data.len()] {
                let (mg, mc) = (gpu.mean_loss(range.clone()).unwrap(), cpu.mean_loss(range.clone()).unwrap());
                prop_assert!((mg - mc).abs() <= 1e-3 * mc, "mean loss over {range:?}: {mg} vs {mc}");
            }
            // back to the initial parameters (early stopping's restore): the initial losses
            gpu.set_params(&init).unwrap();
            let back = CpuTrainer::new(init.clone(), &data, d, eps, 1).mean_loss(0..data.len()).unwrap();
            let mg = gpu.mean_loss(0..data.len()).unwrap();
            prop_assert!((mg - back).abs() <= 1e-4 * back, "after set_params: {mg} vs {back}");
            prop_assert!(gpu.params().unwrap()[0].wo == init[0].wo);
        }
    }

    /// `distill` on the GPU at SmolLM2's TP 3 shapes: it lowers the loss as the CPU run does,
    /// to the same numbers.
    #[test]
    fn gpu_distillation_trains_like_the_cpu_at_smollm2_shapes() {
        use syncdrop::distill::{distill, DistillConfig, DistillDevice};
        if gpu().is_none() {
            return;
        }
        let (d, eps) = (576, 1e-5);
        let (init, data) = distill_problem(3, (d, 192, 512), &[64, 64, 40], 7, rand_f32);
        let run = |device, holdout| {
            let cfg = DistillConfig {
                epochs: 3,
                lr: 1e-4,
                device,
                holdout,
                ..Default::default()
            };
            distill(init.clone(), &data, d, eps, &cfg).unwrap()
        };
        // with a held-out sample: the same curve on both devices
        let (_, hc) = run(DistillDevice::Cpu, 1);
        let (_, hg) = run(DistillDevice::Cuda(0), 1);
        let (hc, hg) = (hc.heldout.unwrap(), hg.heldout.unwrap());
        assert_eq!(hg.epochs.len(), hc.epochs.len(), "{hg:?} vs {hc:?}");
        assert!((hg.before - hc.before).abs() <= 1e-4 * hc.before);
        for (g, c) in hg.epochs.iter().zip(&hc.epochs) {
            assert!((g - c).abs() <= 1e-2 * c, "{hg:?} vs {hc:?}");
        }
        let (pc, rc) = run(DistillDevice::Cpu, 0);
        let (pg, rg) = run(DistillDevice::Cuda(0), 0);
        eprintln!("cpu {rc:?}\ngpu {rg:?}");
        assert!(
            !rg.kept_original && rg.mse_after < 0.9 * rg.mse_before,
            "{rg:?}"
        );
        assert_eq!(rg.steps, rc.steps);
        assert!((rg.mse_before - rc.mse_before).abs() <= 1e-4 * rc.mse_before);
        assert!((rg.mse_after - rc.mse_after).abs() <= 1e-2 * rc.mse_after);
        for (a, b) in pg.iter().zip(&pc) {
            for ((name, x), (_, y)) in student_tensors(a).into_iter().zip(student_tensors(b)) {
                assert!(rel_err(x, y) < 1e-3, "{name}: {:.2e}", rel_err(x, y));
            }
        }
    }
}
