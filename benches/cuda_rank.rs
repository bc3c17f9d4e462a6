//! GPU benchmarks of the CUDA backend, in one run (scripts/gpu-check.sh calls it):
//!
//! 1. device-to-device copy bandwidth (the bandwidth yardstick of this run);
//! 2. decode GEMV on LLaMA2-70B/TP8 shard shapes vs that bandwidth and vs cuBLAS (GemmEx,
//!    N = 1) on the same shapes;
//! 3. the bf16 GEMM peak (cuBLAS, 8192^3);
//! 4. one rank of LLaMA2-70B at TP 8 (synthetic weights of the real shapes): decode step at a
//!    1k context with CUDA graphs on and off vs the weight-streaming limit, and a 2k-token
//!    prefill in TFLOP/s vs the GEMM peak;
//! 5. block-to-block distillation: one Adam step of an SPD block of SmolLM2-135M (TP 3, 8) and
//!    LLaMA2-7B (TP 8) shapes on the default calibration (16 passages of 256 tokens), GPU
//!    trainer vs the CPU trainer on every host core;
//! 6. per-layer compute of one rank of LLaMA2-7B/13B/70B at TP 2/4/8 for the latency model
//!    (the entries `syncdrop::latency::needed_entries` asks for), as a `MeasuredCompute`
//!    JSON: per layer = (time with 3 layers - time with 1 layer) / 2, so embedding, LM head
//!    and host overheads cancel.
//!
//! `cargo bench --features cuda --bench cuda_rank -- [--out DIR] [--quick]`. Without a GPU it
//! prints "skipped: no GPU" and exits 0. Every number it prints ran on the GPU it names.

use std::sync::Arc;
use std::time::Instant;
use syncdrop::backend::cuda::{self, gemm::Gemm, gemv, kernels::Kernels};
use syncdrop::latency::{self, LatencyOptions, MeasuredCompute, MeasuredEntry, Phase};
use syncdrop::synthetic::SyntheticModel;
use syncdrop::{BackendKind, Engine, EngineOptions, ModelFiles, Result};

use cudarc::driver::{sys, CudaStream};
use half::bf16;

mod gpu_common;

fn timed(stream: &Arc<CudaStream>, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let ctx = stream.context();
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let err = |e| syncdrop::Error::Cuda(format!("{e:?}"));
    let a = ctx.new_event(flags).map_err(err)?;
    let b = ctx.new_event(flags).map_err(err)?;
    a.record(stream).map_err(err)?;
    for _ in 0..reps {
        f()?;
    }
    b.record(stream).map_err(err)?;
    Ok(a.elapsed_ms(&b).map_err(err)? as f64 * 1e-3 / reps as f64)
}

/// Uniform bf16 values in [-1, 1): GEMMs on zeros run cooler and faster than on real data.
fn rand_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// Write the report so far: a bench killed midway still leaves every finished section.
fn save(out: &std::path::Path, report: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| syncdrop::Error::io(out, e))?;
    let path = out.join("cuda_rank.json");
    std::fs::write(&path, serde_json::to_string_pretty(report).expect("json"))
        .map_err(|e| syncdrop::Error::io(&path, e))
}

fn engine(spec: &str, tp: usize, rank: usize, capacity: usize) -> Result<Engine> {
    let files = Arc::new(ModelFiles::Synthetic(SyntheticModel::parse(spec)?));
    Engine::new(
        files,
        &EngineOptions {
            tp,
            capacity,
            backend: BackendKind::Cuda,
            cuda_graphs: true,
            only_rank: Some(rank),
            ..Default::default()
        },
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds of one forward of `tokens` tokens at position `pos0` (median of `reps`).
fn forward_s(e: &mut Engine, tokens: usize, pos0: usize, reps: usize) -> Result<f64> {
    let ids: Vec<u32> = (0..tokens as u32).map(|i| i * 7919 % 32000).collect();
    e.forward(&ids, pos0, tokens - 1..tokens)?; // warm-up (and graph capture for t = 1)
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        e.forward(&ids, pos0, tokens - 1..tokens)?;
        v.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

/// Seconds per Adam step of the CPU and GPU distillation trainers on one SPD block of each
/// shape (random weights and samples: a step's cost does not depend on the values).
fn distill_section(
    quick: bool,
    report: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    use syncdrop::distill::{CpuTrainer, Sample, StudentParams, Trainer};
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (samples, t) = if quick { (4, 128) } else { (16, 256) };
    println!(
        "\ndistillation, {samples} samples x {t} tokens: seconds per Adam step (all ranks of the block); CPU on {threads} threads"
    );
    println!("| model, TP | d | q, f per rank | CPU ms/step | GPU ms/step | speedup |");
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    // (name, d, q heads, head dim, ffn, tp)
    for (name, d, heads, hd, ffn, tp) in [
        ("SmolLM2-135M", 576usize, 9usize, 64, 1536usize, 3),
        ("SmolLM2-135M", 576, 9, 64, 1536, 8),
        ("LLaMA2-7B", 4096, 32, 128, 11008, 8),
    ] {
        let (q, f) = (heads.div_ceil(tp) * hd, ffn.div_ceil(tp));
        let mut seed = d as u64 * 7 + tp as u64;
        let mut rand = |n: usize, scale: f32| -> Vec<f32> {
            seed += 1;
            rand_bf16(n, seed)
                .iter()
                .map(|v| v.to_f32() * scale)
                .collect()
        };
        let init: Vec<StudentParams> = (0..tp)
            .map(|_| StudentParams {
                wo: rand(d * q, 0.05),
                ffn_norm: vec![1.0; d],
                w_gate_up: rand(2 * f * d, 0.05),
                w_down: rand(d * f, 0.05),
            })
            .collect();
        let data: Vec<Sample> = (0..samples)
            .map(|_| Sample {
                x: rand(t * d, 1.0),
                att: (0..tp).map(|_| rand(t * q, 1.0)).collect(),
                target: rand(t * d, 1.0),
                x_local: None,
            })
            .collect();
        let eps = 1e-5;
        // CPU: one warm-up step, then a few (a 7B block's step takes seconds)
        let cpu_steps = if quick || d > 1024 { 2 } else { 8 };
        let mut cpu = CpuTrainer::new(init.clone(), &data, d, eps, threads);
        cpu.adam_step(0, 1, 1e-4)?;
        let t0 = Instant::now();
        for s in 0..cpu_steps {
            cpu.adam_step(s % samples, s + 2, 1e-4)?;
        }
        let cpu_s = t0.elapsed().as_secs_f64() / cpu_steps as f64;
        let mut gpu = cuda::distill::trainer(0, &init, &data, d, eps)?;
        gpu.adam_step(0, 1, 1e-4)?;
        gpu.synchronize()?;
        let gpu_steps = 4 * samples;
        let t0 = Instant::now();
        for s in 0..gpu_steps {
            gpu.adam_step(s % samples, s + 2, 1e-4)?;
        }
        gpu.synchronize()?;
        let gpu_s = t0.elapsed().as_secs_f64() / gpu_steps as f64;
        println!(
            "| {name}, TP {tp} | {d} | {q}, {f} | {:.2} | {:.3} | {:.0}x |",
            cpu_s * 1e3,
            gpu_s * 1e3,
            cpu_s / gpu_s
        );
        rows.push(
            serde_json::json!({"model": name, "tp": tp, "d": d, "q": q, "f": f,
            "samples": samples, "tokens": t, "cpu_threads": threads,
            "cpu_ms_per_step": cpu_s * 1e3, "gpu_ms_per_step": gpu_s * 1e3}),
        );
        report.insert("distill".into(), rows.clone().into());
    }
    Ok(())
}

fn main() -> Result<()> {
    let Some(gpu_common::GpuBenchArgs { quick, out }) = gpu_common::args("cuda_rank") else {
        return Ok(());
    };
    let out = out.unwrap_or_else(|| std::path::PathBuf::from("."));
    let ctx = cuda::context(0)?;
    // SAFETY: this section's buffers all live on its one stream.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx
        .new_stream()
        .map_err(|e| syncdrop::Error::Cuda(format!("{e:?}")))?;
    let kern = Kernels::load(&ctx)?;
    let err = |e| syncdrop::Error::Cuda(format!("{e:?}"));
    let mut report = serde_json::Map::new();
    let (gpu, date) = gpu_common::machine();
    report.insert("date".into(), date.clone().into());
    report.insert("device".into(), gpu.clone().into());
    println!(
        "cuda_rank on {gpu}, {date}{}",
        if quick { " (--quick)" } else { "" }
    );

    // 1. copy bandwidth
    let bytes = if quick { 1 << 26 } else { 1 << 30 };
    let src = stream.alloc_zeros::<u8>(bytes).map_err(err)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(err)?;
    let t = timed(&stream, 20, || {
        stream.memcpy_dtod(&src, &mut dst).map_err(err)
    })?;
    let copy_bw = 2.0 * bytes as f64 / t; // read + write
    println!(
        "D2D copy of {} MiB: {:.1} GB/s (read + write)",
        bytes >> 20,
        copy_bw / 1e9
    );
    report.insert("copy_gbps".into(), (copy_bw / 1e9).into());
    drop((src, dst));
    save(&out, &report)?;

    // 2. GEMV vs cuBLAS on LLaMA2-70B TP 8 shard shapes (n, k)
    let gemm = Gemm::new(&stream)?;
    let mut rows = Vec::new();
    println!("\n| shape (n x k) | GEMV us | GEMV GB/s | of copy BW | cuBLAS us | GEMV speedup |");
    println!("|---|---|---|---|---|---|");
    for (what, n, k) in [
        ("qkv", 1280, 8192),
        ("o_proj", 8192, 1024),
        ("gate_up", 7168, 8192),
        ("down", 8192, 3584),
        ("lm_head", 4000, 8192),
    ] {
        // as in a decode step, every launch streams weights that are not in L2 (50 MB on
        // H100): rotate through copies totalling at least 256 MiB
        let copies = (256usize << 20).div_ceil(n * k * 2).max(2);
        let host = rand_bf16(n * k, n as u64 * 31 + k as u64);
        let ws = (0..copies)
            .map(|_| stream.clone_htod(&host).map_err(err))
            .collect::<Result<Vec<_>>>()?;
        let xh = rand_bf16(k, 7);
        let x = stream
            .clone_htod(&xh.iter().map(|v| v.to_f32()).collect::<Vec<f32>>())
            .map_err(err)?;
        let xb = stream.clone_htod(&xh).map_err(err)?;
        let mut y = stream.alloc_zeros::<f32>(n).map_err(err)?;
        let reps = if quick { 10 } else { 200 };
        let mut i = 0;
        let tg = timed(&stream, reps, || {
            i += 1;
            gemv::gemv_bf16_f32(
                &stream,
                &kern,
                (1, n, k),
                &ws[i % copies].slice(..),
                &x.slice(..),
                &mut y.slice_mut(..),
            )
        })?;
        let mut i = 0;
        let tc = timed(&stream, reps, || {
            i += 1;
            let w = &ws[i % copies];
            gemm.bf16_f32((1, n, k), &w.slice(..), &xb.slice(..), &mut y.slice_mut(..))
        })?;
        drop(ws);
        let bw = (n * k * 2) as f64 / tg;
        println!(
            "| {what} {n}x{k} | {:.1} | {:.0} | {:.0}% | {:.1} | {:.2}x |",
            tg * 1e6,
            bw / 1e9,
            100.0 * bw / copy_bw,
            tc * 1e6,
            tc / tg
        );
        rows.push(
            serde_json::json!({"shape": what, "n": n, "k": k, "gemv_us": tg * 1e6,
            "gemv_gbps": bw / 1e9, "frac_of_copy": bw / copy_bw, "cublas_us": tc * 1e6}),
        );
    }
    report.insert("gemv".into(), rows.into());
    save(&out, &report)?;

    // 3. bf16 GEMM peak, on random data
    let m = if quick { 2048 } else { 8192 };
    let a = stream.clone_htod(&rand_bf16(m * m, 1)).map_err(err)?;
    let b = stream.clone_htod(&rand_bf16(m * m, 2)).map_err(err)?;
    let mut c = stream.alloc_zeros::<f32>(m * m).map_err(err)?;
    let tg = timed(&stream, 10, || {
        gemm.bf16_f32((m, m, m), &a.slice(..), &b.slice(..), &mut c.slice_mut(..))
    })?;
    let peak = 2.0 * (m * m * m) as f64 / tg;
    println!(
        "\ncuBLAS bf16 GEMM {m}^3 (f32 out): {:.0} TFLOP/s",
        peak / 1e12
    );
    report.insert("gemm_peak_tflops".into(), (peak / 1e12).into());
    drop((a, b, c));
    save(&out, &report)?;

    // 4. one rank of LLaMA2-70B at TP 8
    let spec = if quick {
        "llama2-70b:layers=4"
    } else {
        "llama2-70b"
    };
    for graphs in [true, false] {
        let t0 = Instant::now();
        let files = Arc::new(ModelFiles::Synthetic(SyntheticModel::parse(spec)?));
        let mut e = Engine::new(
            files,
            &EngineOptions {
                tp: 8,
                capacity: 2048 + 64,
                backend: BackendKind::Cuda,
                cuda_graphs: graphs,
                only_rank: Some(0),
                ..Default::default()
            },
        )?;
        eprintln!(
            "loaded one rank of {spec} in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        let r = syncdrop::bench::bench_engine(&mut e, spec, "cuda", Some(0), (1024, 1), (3, 32))?;
        let limit = r.rank_params as f64 * 2.0 / copy_bw;
        println!(
            "\none rank of {spec} TP 8, 1k context, graphs {graphs}: decode {:.3} ms/step = {:.2}x the weight-streaming limit {:.3} ms ({:.2} GB at the copy bandwidth)",
            r.decode_median_s() * 1e3,
            r.decode_median_s() / limit,
            limit * 1e3,
            r.rank_params as f64 * 2e-9
        );
        report.insert(
            format!("decode_70b_tp8_graphs_{graphs}"),
            serde_json::json!({"ms": r.decode_median_s() * 1e3, "limit_ms": limit * 1e3,
                "of_limit": r.decode_median_s() / limit, "steps": r.decode_s}),
        );
        save(&out, &report)?;
        if graphs {
            let p =
                syncdrop::bench::bench_engine(&mut e, spec, "cuda", Some(0), (2048, 3), (0, 0))?;
            println!(
                "prefill of 2048 tokens: {:.2} ms, {:.0} TFLOP/s = {:.0}% of the GEMM peak",
                p.prefill_median_s() * 1e3,
                p.prefill_tflops(),
                100.0 * p.prefill_tflops() * 1e12 / peak
            );
            report.insert(
                "prefill_70b_tp8_2k".into(),
                serde_json::json!({"ms": p.prefill_median_s() * 1e3, "tflops": p.prefill_tflops(),
                    "of_peak": p.prefill_tflops() * 1e12 / peak}),
            );
            save(&out, &report)?;
        }
    }

    // 5. distillation steps: GPU trainer vs CPU trainer (all host cores)
    distill_section(quick, &mut report)?;
    save(&out, &report)?;

    // 6. per-layer compute for the latency model
    let opts = LatencyOptions {
        models: vec!["llama2-7b".into(), "llama2-13b".into(), "llama2-70b".into()],
        tp: vec![2, 4, 8],
        prefill_tokens: if quick {
            vec![512]
        } else {
            vec![512, 1024, 2048, 4096, 8192]
        },
        decode_batch: vec![1],
        ..Default::default()
    };
    let needed = latency::needed_entries(&opts)?;
    let mut entries: Vec<MeasuredEntry> = Vec::new();
    for model in &opts.models {
        for &tp in &opts.tp {
            let cap = needed
                .iter()
                .filter(|n| &n.model == model && n.tp == tp)
                .map(|n| n.ctx + n.tokens)
                .max()
                .unwrap_or(1)
                + 1;
            let mut e1 = engine(&format!("{model}:layers=1"), tp, 0, cap)?;
            let mut e3 = engine(&format!("{model}:layers=3"), tp, 0, cap)?;
            for n in needed.iter().filter(|n| &n.model == model && n.tp == tp) {
                if n.batch != 1 {
                    continue; // the engine runs one sequence
                }
                let reps = if n.phase == Phase::Decode { 20 } else { 3 };
                let t1 = forward_s(&mut e1, n.tokens, n.ctx, reps)?;
                let t3 = forward_s(&mut e3, n.tokens, n.ctx, reps)?;
                let layer_us = ((t3 - t1) / 2.0 * 1e6).max(0.0);
                entries.push(MeasuredEntry {
                    layer_us,
                    ..n.clone()
                });
                println!(
                    "{model} TP {tp} {:?} tokens {} ctx {}: {layer_us:.1} us/layer",
                    n.phase, n.tokens, n.ctx
                );
            }
            // the table so far, after every (model, TP): a kill midway keeps what was measured
            let table = MeasuredCompute {
                schema: 1,
                device: gpu.clone(),
                date: date.clone(),
                command: "cargo bench --features cuda --bench cuda_rank (scripts/gpu-check.sh)"
                    .into(),
                notes: "one rank (only_rank 0), synthetic weights of the real shapes, CUDA graphs for decode; per layer = (3 layers - 1 layer) / 2".into(),
                entries: entries.clone(),
            };
            let path = out.join("measured_compute.json");
            std::fs::write(&path, serde_json::to_string_pretty(&table).expect("json"))
                .map_err(|e| syncdrop::Error::io(&path, e))?;
        }
    }
    save(&out, &report)?;
    println!(
        "\nwrote {} and measured_compute.json",
        out.join("cuda_rank.json").display()
    );
    Ok(())
}
