//! The CUDA backend end to end against the CPU backend, on the real SmolLM2 model: TP 1, 3
//! and 8 (virtual ranks on one GPU), greedy continuation, CUDA graphs on/off, ISO on/off,
//! SPD blocks, and the one-rank mode on a synthetic LLaMA2-70B-shaped model. Run on a GPU
//! machine by scripts/gpu-check.sh; without a GPU (or without the `cuda` feature) every test
//! says "skipped" and passes. The tests that run on CPU too are in tests/synthetic.rs.

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_backend_skipped_without_the_feature() {
    eprintln!("skipped: built without the `cuda` feature");
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;
    use syncdrop::generate::argmax;
    use syncdrop::iso::IsoMode;
    use syncdrop::{assets, BackendKind, Engine, EngineOptions, ModelFiles};

    /// bf16 weights and KV cache against the CPU's f32 over 30 layers: logits (span ~+-30)
    /// move by a few tenths; the greedy tokens must still agree.
    const BF16_ATOL: f32 = 0.6;

    /// GPU 0 usable, or "skipped: no GPU" (a failure under SYNCDROP_REQUIRE_GPU=1).
    fn have_gpu() -> bool {
        syncdrop::backend::gpu_or_skip("cuda_backend")
    }

    fn files() -> Arc<ModelFiles> {
        let path = assets::smollm2().unwrap_or_else(|e| panic!("{e}"));
        Arc::new(ModelFiles::open(path).unwrap())
    }

    fn engine(f: &Arc<ModelFiles>, tp: usize, backend: BackendKind, graphs: bool) -> Engine {
        let opts = EngineOptions {
            tp,
            threads: 2,
            capacity: 512,
            backend,
            cuda_graphs: graphs,
            ..Default::default()
        };
        Engine::new(f.clone(), &opts).unwrap()
    }

    fn golden() -> (Vec<u32>, Vec<u32>) {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("golden/smollm2_greedy.json")).unwrap();
        let ids = |k: &str| -> Vec<u32> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        (ids("prompt_ids"), ids("tokens"))
    }

    /// Max |a - b| after removing the mean difference (softmax ignores a shift).
    fn centred_diff(a: &[f32], b: &[f32]) -> f32 {
        let mean = a.iter().zip(b).map(|(x, y)| x - y).sum::<f32>() / a.len() as f32;
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y - mean).abs())
            .fold(0.0, f32::max)
    }

    /// Each decode row's argmax is the golden's next token (rows are teacher-forced, so a
    /// flip never cascades), except at a near tie the measured deviation explains: where the
    /// CPU's own gap between the golden token and the one picked is within twice that row's
    /// deviation from the CPU.
    fn assert_greedy(
        rows: &[Vec<f32>],
        cpu: &[Vec<f32>],
        prompt_len: usize,
        golden: &[u32],
        what: &str,
    ) {
        for (s, &t) in golden.iter().enumerate() {
            let i = prompt_len - 1 + s;
            let got = argmax(&rows[i]);
            if got as u32 != t {
                let margin = cpu[i][t as usize] - cpu[i][got];
                let dev = centred_diff(&rows[i], &cpu[i]);
                assert!(
                    margin <= 2.0 * dev,
                    "{what}: step {s} picked {got}, not the golden {t}: CPU margin {margin} > 2 x deviation {dev}"
                );
                eprintln!("{what}: step {s} near tie (CPU margin {margin:.3}, deviation {dev:.3}): picked {got}, golden {t}");
            }
        }
    }

    /// Prefill rows of the prompt, then decode the given tokens: every logits row.
    fn trace(e: &mut Engine, prompt: &[u32], feed: &[u32]) -> Vec<Vec<f32>> {
        let l = e.forward(prompt, 0, 0..prompt.len()).unwrap();
        let mut rows: Vec<Vec<f32>> = (0..prompt.len()).map(|i| l.row(i).to_vec()).collect();
        for (s, t) in feed.iter().enumerate() {
            rows.push(
                e.forward(&[*t], prompt.len() + s, 0..1)
                    .unwrap()
                    .row(0)
                    .to_vec(),
            );
        }
        rows
    }

    #[test]
    fn smollm2_on_cuda_at_tp_1_3_8_matches_the_cpu_and_the_greedy_golden() {
        if !have_gpu() {
            return;
        }
        let f = files();
        let (prompt, golden_toks) = golden();
        let cpu = trace(
            &mut engine(&f, 1, BackendKind::Cpu, false),
            &prompt,
            &golden_toks,
        );
        for tp in [1, 3, 8] {
            for graphs in [false, true] {
                let mut e = engine(&f, tp, BackendKind::Cuda, graphs);
                let rows = trace(&mut e, &prompt, &golden_toks);
                let worst = rows
                    .iter()
                    .zip(&cpu)
                    .map(|(g, c)| centred_diff(g, c))
                    .fold(0.0, f32::max);
                eprintln!(
                    "CUDA TP {tp} graphs {graphs}: max centred |logit diff| vs CPU = {worst:.3}"
                );
                assert!(worst <= BF16_ATOL, "TP {tp}: {worst} > {BF16_ATOL}");
                assert_greedy(
                    &rows,
                    &cpu,
                    prompt.len(),
                    &golden_toks,
                    &format!("TP {tp} graphs {graphs}"),
                );
            }
        }
    }

    /// The CUDA backend counts every sync point the CPU counts, graph replays included, and
    /// with lane timing on it times the device collectives (what the ISO calibration needs).
    #[test]
    fn comm_counters_match_the_cpu_and_time_the_lane_when_asked() {
        if !have_gpu() {
            return;
        }
        let f = files();
        let (prompt, toks) = golden();
        let count = |e: &mut Engine, timing: bool| {
            e.set_comm_timing(timing).unwrap();
            e.reset_comm_stats().unwrap();
            trace(e, &prompt, &toks[..4]);
            e.comm_stats().unwrap()[0]
        };
        let cpu = count(&mut engine(&f, 3, BackendKind::Cpu, false), false);
        assert!(cpu.all_reduces > 0 && cpu.untimed == 0, "{cpu:?}");
        for graphs in [false, true] {
            let mut g = engine(&f, 3, BackendKind::Cuda, graphs);
            for timing in [false, true] {
                let s = count(&mut g, timing);
                eprintln!("TP 3 CUDA graphs {graphs} timing {timing}: {s:?} (CPU {cpu:?})");
                assert_eq!(
                    (s.all_reduces, s.bytes),
                    (cpu.all_reduces, cpu.bytes),
                    "graphs {graphs} timing {timing}"
                );
                if timing && !graphs {
                    assert_eq!(s.untimed, 0, "every collective timed");
                    assert!(s.nanos > 0);
                }
                if graphs {
                    assert!(s.untimed > 0, "decode replays are untimed");
                }
            }
        }
    }

    #[test]
    fn cuda_graphs_on_and_off_agree_step_by_step() {
        if !have_gpu() {
            return;
        }
        let f = files();
        let (prompt, toks) = golden();
        let a = trace(&mut engine(&f, 1, BackendKind::Cuda, false), &prompt, &toks);
        let b = trace(&mut engine(&f, 1, BackendKind::Cuda, true), &prompt, &toks);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            // same kernels; only the decode attention's key split differs (capacity vs length):
            // f32 sum order, which can flip a bf16 rounding of the next layer's K/V, as ISO
            // on/off can (the same bound as there)
            let d = centred_diff(x, y);
            assert!(d <= 5e-2, "row {i}: graphs on/off differ by {d}");
        }
    }

    #[test]
    fn iso_and_spd_on_cuda_match_the_cpu() {
        if !have_gpu() {
            return;
        }
        let f = files();
        let (prompt, _) = golden();
        // a longer prompt so both ISO chunks have work: the prompt repeated
        let long: Vec<u32> = prompt.iter().cycle().take(40).copied().collect();
        for tp in [2, 3] {
            let mut c = engine(&f, tp, BackendKind::Cpu, false);
            let mut g = engine(&f, tp, BackendKind::Cuda, true);
            let spd: Vec<bool> = (0..30).map(|l| l % 3 == 1).collect();
            c.set_spd(&spd).unwrap();
            g.set_spd(&spd).unwrap();
            let want = c.forward(&long, 0, 0..long.len()).unwrap();
            let off = g.forward(&long, 0, 0..long.len()).unwrap();
            g.set_iso(IsoMode::Split(13), None);
            let on = g.prefill(&long, 0..long.len()).unwrap();
            assert_eq!(g.last_iso_split, Some(13));
            for i in 0..long.len() {
                let d1 = centred_diff(off.row(i), want.row(i));
                let d2 = centred_diff(on.row(i), off.row(i));
                assert!(d1 <= BF16_ATOL, "TP {tp} SPD row {i}: CUDA vs CPU {d1}");
                assert!(d2 <= 5e-2, "TP {tp} row {i}: ISO on vs off {d2}");
            }
            // the KV cache after the ISO prefill serves decode like the plain one
            let next = argmax(on.row(long.len() - 1)) as u32;
            let a = g.forward(&[next], long.len(), 0..1).unwrap();
            let b = c.forward(&[next], long.len(), 0..1).unwrap();
            assert!(centred_diff(a.row(0), b.row(0)) <= BF16_ATOL);
        }
    }

    /// SPD blocks with linear compensation (`spd_compensate`: unit RMSNorm, two products,
    /// an add) give the CPU's logits on CUDA, in prefill, ISO prefill and graph-captured
    /// decode, and the block inputs `block_inputs` captures in one pass are the CPU's. The
    /// maps are random and large enough to move the logits well past the bf16 tolerance, so
    /// a CUDA path that skipped or garbled them would fail.
    #[test]
    fn compensated_spd_blocks_on_cuda_match_the_cpu() {
        if !have_gpu() {
            return;
        }
        let f = files();
        let (prompt, toks) = golden();
        let long: Vec<u32> = prompt.iter().cycle().take(24).copied().collect();
        let tp = 2;
        let spd: Vec<bool> = (0..30).map(|l| l % 4 == 2).collect();
        let mut cpu = engine(&f, tp, BackendKind::Cpu, false);
        cpu.set_spd(&spd).unwrap();
        let plain = cpu.forward(&long, 0, 0..long.len()).unwrap();
        let mut g = engine(&f, tp, BackendKind::Cuda, true);
        g.set_spd(&spd).unwrap();
        let mut seed = 11u64;
        let mut rnd = |scale: f32| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            scale * (((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        };
        let (d, k) = (cpu.cfg.hidden, 4);
        for l in (0..30).filter(|l| spd[*l]) {
            let ws: Vec<_> = cpu
                .block_shards(l)
                .iter()
                .map(|s| {
                    let mut w = syncdrop::model::load_block(&cpu.files, &cpu.cfg, s, l).unwrap();
                    w.comp = Some(syncdrop::compensate::Compensation {
                        rank: k,
                        w_in: (0..k * d).map(|_| rnd(0.2)).collect(),
                        w_out: (0..d * k).map(|_| rnd(4.0)).collect(),
                    });
                    w
                })
                .collect();
            cpu.load_layer(l, ws.clone()).unwrap();
            g.load_layer(l, ws).unwrap();
        }
        let want = cpu.forward(&long, 0, 0..long.len()).unwrap();
        let moved = (0..long.len())
            .map(|i| centred_diff(want.row(i), plain.row(i)))
            .fold(0.0, f32::max);
        assert!(
            moved > 4.0 * BF16_ATOL,
            "the compensation moved the CPU's logits by only {moved}"
        );
        // block inputs captured in one pass (what compensate_blocks and the planner read)
        let layers = [2, 14, 29];
        let (gi, ci) = (
            g.block_inputs(&long, &layers).unwrap(),
            cpu.block_inputs(&long, &layers).unwrap(),
        );
        for ((a, b), l) in gi.iter().zip(&ci).zip(layers) {
            let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let diff: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
            let rel = norm(&diff) / norm(b);
            eprintln!("block {l} input: CUDA vs CPU relative L2 {rel:.2e}");
            assert!(rel < 3e-2, "block {l} input: CUDA vs CPU relative L2 {rel}");
        }
        let got = g.forward(&long, 0, 0..long.len()).unwrap();
        g.set_iso(IsoMode::Split(9), None);
        let iso = g.prefill(&long, 0..long.len()).unwrap();
        for i in 0..long.len() {
            let d1 = centred_diff(got.row(i), want.row(i));
            let d2 = centred_diff(iso.row(i), want.row(i));
            assert!(d1 <= BF16_ATOL, "row {i}: CUDA vs CPU {d1}");
            assert!(d2 <= BF16_ATOL, "row {i}: CUDA ISO vs CPU {d2}");
        }
        // decode (graphs on: captured after the first step) against the CPU's decode
        for (s, t) in toks[..4].iter().enumerate() {
            let a = g.forward(&[*t], long.len() + s, 0..1).unwrap();
            let b = cpu.forward(&[*t], long.len() + s, 0..1).unwrap();
            let dd = centred_diff(a.row(0), b.row(0));
            assert!(dd <= BF16_ATOL, "decode step {s}: CUDA vs CPU {dd}");
        }
    }

    #[test]
    fn one_rank_of_a_llama2_70b_shaped_model_runs_and_is_graph_stable() {
        if !have_gpu() {
            return;
        }
        let m = syncdrop::synthetic::SyntheticModel::parse("llama2-70b:layers=2").unwrap();
        let f = Arc::new(ModelFiles::Synthetic(m));
        let mk = |graphs| {
            Engine::new(
                f.clone(),
                &EngineOptions {
                    tp: 8,
                    capacity: 256,
                    backend: BackendKind::Cuda,
                    cuda_graphs: graphs,
                    only_rank: Some(3),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let toks: Vec<u32> = (0..32).map(|i| i * 977 % 32000).collect();
        let (mut a, mut b) = (mk(false), mk(true));
        let r = syncdrop::bench::bench_engine(
            &mut b,
            "llama2-70b:layers=2",
            "cuda",
            Some(3),
            (64, 1),
            (2, 4),
        )
        .unwrap();
        assert_eq!(r.decode_s.len(), 4);
        let (la, lb) = (
            trace(&mut a, &toks[..16], &toks[16..]),
            trace(&mut b, &toks[..16], &toks[16..]),
        );
        let vr = syncdrop::layout::even_split(32000, 8)[3].clone();
        for (x, y) in la.iter().zip(&lb) {
            assert!(
                x[..vr.start].iter().all(|v| *v == 0.0),
                "only rank 3's slice is filled"
            );
            assert!(x[vr.clone()].iter().any(|v| *v != 0.0));
            assert!(centred_diff(&x[vr.clone()], &y[vr.clone()]) <= 1e-2);
        }
    }

    /// NCCL refuses two ranks of a communicator on one GPU: the engine says so up front.
    #[test]
    fn nccl_with_virtual_ranks_is_refused_with_a_clear_error() {
        if !have_gpu() {
            return;
        }
        let gpus = syncdrop::backend::cuda::device_count().unwrap();
        let files = Arc::new(ModelFiles::Synthetic(
            syncdrop::synthetic::SyntheticModel::parse("llama2-7b:layers=1").unwrap(),
        ));
        let r = Engine::new(
            files,
            &EngineOptions {
                tp: gpus + 1,
                capacity: 64,
                backend: BackendKind::Cuda,
                nccl: Some(syncdrop::engine::NcclMode::InProcess),
                ..Default::default()
            },
        );
        match r {
            Err(syncdrop::Error::InvalidArgument(m)) => {
                assert!(m.contains("one GPU per rank"), "{m}")
            }
            Err(e) => panic!("expected the NCCL refusal, got {e}"),
            Ok(_) => panic!("expected the NCCL refusal, got an engine"),
        }
    }

    /// NCCL refuses two ranks on one GPU, so this needs two GPUs (and libnccl); elsewhere it
    /// says why it skipped. Forces NCCL through the selector's override.
    #[test]
    fn nccl_at_tp_2_on_two_gpus_matches_the_cpu() {
        if !have_gpu() {
            return;
        }
        let gpus = syncdrop::backend::cuda::device_count().unwrap_or(0);
        if gpus < 2 || !syncdrop::backend::cuda::nccl::available() {
            eprintln!("nccl: skipped: needs 2 GPUs and libnccl ({gpus} GPUs)");
            return;
        }
        // SAFETY (of the test): gpu-check runs these tests with --test-threads=1
        std::env::set_var("SYNCDROP_ALLREDUCE", "nccl");
        let f = files();
        let (prompt, _) = golden();
        let mut g = Engine::new(
            f.clone(),
            &EngineOptions {
                tp: 2,
                capacity: 512,
                backend: BackendKind::Cuda,
                nccl: Some(syncdrop::engine::NcclMode::InProcess),
                ..Default::default()
            },
        )
        .unwrap();
        let got = g.forward(&prompt, 0, 0..prompt.len()).unwrap();
        std::env::remove_var("SYNCDROP_ALLREDUCE");
        let want = engine(&f, 2, BackendKind::Cpu, false)
            .forward(&prompt, 0, 0..prompt.len())
            .unwrap();
        for i in 0..prompt.len() {
            let d = centred_diff(got.row(i), want.row(i));
            assert!(d <= BF16_ATOL, "row {i}: NCCL TP 2 vs CPU {d}");
        }
    }

    /// The opt-in fused paths (o_proj + all-reduce for decode; all-reduce + residual add +
    /// RMSNorm) and the bf16 wire, at TP 3 on virtual ranks with CUDA graphs: every logits
    /// row within bf16 tolerance of the CPU (with the same wire) and the greedy golden kept.
    #[test]
    fn fused_kernels_and_the_bf16_wire_on_cuda_match_the_cpu() {
        if !have_gpu() {
            return;
        }
        use syncdrop::comm::Wire;
        let f = files();
        let (prompt, golden_toks) = golden();
        let open = |backend: BackendKind, wire: Wire| {
            Engine::new(
                f.clone(),
                &EngineOptions {
                    tp: 3,
                    capacity: 512,
                    backend,
                    wire,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        for wire in [Wire::F32, Wire::Bf16] {
            let cpu = trace(&mut open(BackendKind::Cpu, wire), &prompt, &golden_toks);
            for (oproj, norm) in [("0", "1"), ("1", "1"), ("1", "0")] {
                // SAFETY (of the test): gpu-check runs these tests with --test-threads=1;
                // the backend reads both variables once, when it is created
                std::env::set_var("SYNCDROP_FUSED_OPROJ", oproj);
                std::env::set_var("SYNCDROP_FUSED_NORM", norm);
                let mut g = open(BackendKind::Cuda, wire);
                std::env::remove_var("SYNCDROP_FUSED_OPROJ");
                std::env::remove_var("SYNCDROP_FUSED_NORM");
                let rows = trace(&mut g, &prompt, &golden_toks);
                let worst = rows
                    .iter()
                    .zip(&cpu)
                    .map(|(a, b)| centred_diff(a, b))
                    .fold(0.0, f32::max);
                eprintln!(
                    "TP 3 {wire:?} wire, fused o_proj {oproj}, fused norm {norm}: max centred |logit diff| vs CPU = {worst:.3}"
                );
                assert!(worst <= BF16_ATOL, "{wire:?} {oproj}/{norm}: {worst}");
                assert_greedy(
                    &rows,
                    &cpu,
                    prompt.len(),
                    &golden_toks,
                    &format!("{wire:?} {oproj}/{norm}"),
                );
            }
        }
    }
}
