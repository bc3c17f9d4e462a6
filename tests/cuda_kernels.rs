//! CUDA kernels against the CPU reference. Run on a GPU machine (scripts/gpu-check.sh);
//! without a GPU, or without the `cuda` feature, each test says "skipped" and passes.
//! Tolerance is computed on bf16-rounded inputs: |gpu - ref| <= atol + rtol * |ref|.

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_kernels_skipped_without_the_feature() {
    eprintln!("skipped: built without the `cuda` feature");
}

#[cfg(feature = "cuda")]
mod gpu {
    use half::bf16;
    use proptest::prelude::*;
    use syncdrop::backend::cpu::rmsnorm;
    use syncdrop::backend::cuda::{
        argmax, context, device_count, gemv, kernels, rmsnorm, rope, swiglu,
    };

    fn gpu() -> Option<(std::sync::Arc<cudarc::driver::CudaStream>, kernels::Kernels)> {
        match device_count() {
            Ok(n) if n > 0 => {
                let ctx = context(0).ok()?;
                let k = kernels::Kernels::load(&ctx).expect("kernels load");
                Some((ctx.default_stream(), k))
            }
            _ => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| eprintln!("cuda_kernels: skipped: no GPU"));
                None
            }
        }
    }

    fn rand_bf16(n: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed | 1;
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
            rmsnorm::add_rmsnorm_bf16(&stream, &k, rows, d, 1e-5, &mut r, with_delta.then_some(&dd), &wd, &mut out).unwrap();
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
            gemv::gemv_bf16(&stream, &kern, (t, n, k), &wd, &xd, &mut yd).unwrap();
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
            rope::rope_bf16(&stream, &kern, &mut xd, (t, heads, hd, stride), pos0, 10000.0, style).unwrap();
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
            swiglu::swiglu_bf16(&stream, &kern, t, f, &gd, &mut hd).unwrap();
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
            argmax::argmax_f32(&stream, &kern, rows, n, &xd, &mut od).unwrap();
            let got: Vec<u32> = stream.clone_dtoh(&od).unwrap();
            for r in 0..rows {
                prop_assert_eq!(got[r] as usize, syncdrop::generate::argmax(&x[r * n..(r + 1) * n]), "row {}", r);
            }
        }
    }
}
