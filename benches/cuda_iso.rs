//! ISO on one GPU with emulated links (issue: ISO): one LLaMA2-70B/TP8-shaped rank (synthetic
//! weights, `only_rank`), whose all-reduces are held on the communication lane for each link
//! profile's modelled time (`EngineOptions::emulate_link`, 8 CTAs), prefilled with ISO off
//! and on at 512..8192 tokens. Reports the reduction, the modelled communication, and the
//! share of communication hidden against the best possible (min of communication and
//! compute). Every number is EMULATED: real compute, modelled links.
//!
//! `cargo bench --features cuda --bench cuda_iso -- [--out DIR] [--quick]`; without a GPU it
//! prints "skipped: no GPU".

use std::sync::Arc;
use std::time::Instant;
use syncdrop::iso::IsoMode;
use syncdrop::latency::LinkProfile;
use syncdrop::synthetic::SyntheticModel;
use syncdrop::{BackendKind, Engine, EngineOptions, ModelFiles};

mod gpu_common;

fn main() {
    let Some(gpu_common::GpuBenchArgs { quick, out }) = gpu_common::args("cuda_iso") else {
        return;
    };
    let (gpu, date) = gpu_common::machine();
    println!(
        "cuda_iso on {gpu}, {date}{}",
        if quick { " (--quick)" } else { "" }
    );
    let layers = if quick { 2 } else { 10 };
    let spec = format!("llama2-70b:layers={layers}");
    let lengths: &[usize] = if quick {
        &[512]
    } else {
        &[512, 1024, 2048, 4096, 8192]
    };
    let (tp, ctas) = (8usize, 8usize);
    let mut rows = Vec::new();
    println!("EMULATED: {layers} blocks of one LLaMA2-70B TP 8 rank, real compute on this GPU, links modelled");
    println!("(the hold kernel takes CTA slots but little SM or memory bandwidth, so the overlap is an upper bound;");
    println!(" ISO on holds twice as many messages, each with its own latency term: 'modelled comm' is ISO off's)");
    println!("| profile | tokens | split | ISO off ms | ISO on ms | change | modelled comm ms | hidden / best possible |");
    println!("|---|---|---|---|---|---|---|---|");
    for name in [
        "a800-nvlink-400gbs",
        "rtx4090-pcie-nop2p",
        "h100-nvlink-nccl",
    ] {
        let profile = LinkProfile::by_name(name).expect("profile");
        let files = Arc::new(ModelFiles::Synthetic(
            SyntheticModel::parse(&spec).expect("spec"),
        ));
        let mut e = Engine::new(
            files,
            &EngineOptions {
                tp,
                capacity: 8192 + 1,
                backend: BackendKind::Cuda,
                only_rank: Some(0),
                emulate_link: Some((profile.clone(), ctas)),
                ..Default::default()
            },
        )
        .expect("engine");
        let model = e.iso_model();
        for &t in lengths {
            let ids: Vec<u32> = (0..t as u32).map(|i| i * 7919 % 32000).collect();
            let mut time = |mode: IsoMode| -> (f64, Option<usize>) {
                e.set_iso(mode, Some(model));
                e.prefill(&ids, t - 1..t).expect("prefill"); // warm-up
                let reps = if quick { 1 } else { 3 };
                let mut best = f64::MAX;
                for _ in 0..reps {
                    let t0 = Instant::now();
                    e.prefill(&ids, t - 1..t).expect("prefill");
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                (best, e.last_iso_split)
            };
            let (off, _) = time(IsoMode::Off);
            let split = model.split(t).unwrap_or(t / 2);
            let (on, used) = time(IsoMode::Split(split));
            // off: compute then comm, serially; the comm is the modelled all-reduce time
            let comm =
                2.0 * layers as f64 * profile.all_reduce_us(tp, (t * 8192 * 2) as f64) * 1e-6;
            let compute = (off - comm).max(0.0);
            let best_hidden = comm.min(compute);
            let hidden = (off - on).max(0.0) / best_hidden.max(1e-12);
            println!(
                "| {name} | {t} | {}+{} | {:.2} | {:.2} | {:+.1}% | {:.2} | {:.0}% |",
                used.unwrap_or(split),
                t - used.unwrap_or(split),
                off * 1e3,
                on * 1e3,
                100.0 * (on / off - 1.0),
                comm * 1e3,
                100.0 * hidden
            );
            rows.push(
                serde_json::json!({"profile": name, "tokens": t, "split": used,
                "off_ms": off * 1e3, "on_ms": on * 1e3, "modelled_comm_ms": comm * 1e3,
                "hidden_of_best": hidden, "layers": layers, "label": "emulated"}),
            );
        }
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(
            dir.join("cuda_iso.json"),
            serde_json::to_string_pretty(&serde_json::json!({"device": gpu, "date": date,
                "rows": rows}))
            .expect("json"),
        )
        .expect("write cuda_iso.json");
    }
}
