//! CPU prefill and decode throughput of SmolLM2 at several TP degrees, next to the speed of
//! light: the bytes of weights each decoded token must stream, and this machine's measured
//! memory read bandwidth.
//!
//!   cargo bench --bench tp_throughput              # full run (SmolLM2 from the cache)
//!   cargo bench --bench tp_throughput -- --tp 1,3  # choose TP degrees
//!
//! Under `cargo test --all-targets` (no `--bench` flag) it only runs a short smoke pass.

use std::sync::Arc;
use std::time::Instant;
use syncdrop::{assets, Engine, EngineOptions, ModelFiles};

/// Read bandwidth (GB/s) of summing a 1 GiB f32 array on `threads` threads, best of `reps`.
fn read_bandwidth(threads: usize, reps: usize) -> f64 {
    let n = 1usize << 28; // 1 GiB of f32
    let data: Vec<f32> = (0..n).map(|i| (i & 1023) as f32).collect();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t0 = Instant::now();
        let chunk = n.div_ceil(threads);
        let total: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = data
                .chunks(chunk)
                .map(|c| s.spawn(move || syncdrop::backend::cpu::dot(c, c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        std::hint::black_box(total);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    // dot(c, c) reads each element once (both operands are the same cache line)
    (n * 4) as f64 / best / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let tps: Vec<usize> = args
        .iter()
        .position(|a| a == "--tp")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(|x| x.parse().expect("--tp 1,3")).collect())
        .unwrap_or(vec![1, 3]);
    let path = match assets::smollm2() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tp_throughput: {e}");
            if full {
                std::process::exit(1);
            }
            return;
        }
    };
    let files = Arc::new(ModelFiles::open(path).unwrap());
    let cfg = files.config().unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (prompt_len, decode_len, reps) = if full { (128, 64, 3) } else { (8, 4, 1) };
    let bw = if full {
        read_bandwidth(threads, 5)
    } else {
        0.0
    };
    let bw1 = if full { read_bandwidth(1, 3) } else { 0.0 };
    // f32 weights streamed per decoded token: every block's matrices + the LM head (tied
    // embedding rows). Norms and the KV cache are < 0.1% here and left out.
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    let per_layer =
        d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + d * cfg.n_heads * hd + 3 * d * cfg.ffn;
    let bytes_per_token = 4.0 * (cfg.n_layers * per_layer + cfg.vocab * d) as f64;
    println!(
        "machine: {threads} threads; measured read bandwidth {bw:.1} GB/s ({threads} threads), {bw1:.1} GB/s (1 thread)"
    );
    println!(
        "weights streamed per decoded token (f32): {:.1} MB -> decode speed of light {:.1} tok/s",
        bytes_per_token / 1e6,
        bw * 1e9 / bytes_per_token
    );
    println!("| TP | heads | prefill {prompt_len} tok (tok/s) | decode (tok/s) | implied GB/s | x of SoL time | syncs/token | comm % of decode |");
    println!("|---|---|---|---|---|---|---|---|");
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| 100 + (i * 37) % 4000)
        .collect();
    for tp in tps {
        let opts = EngineOptions {
            tp,
            threads,
            capacity: prompt_len + decode_len + 1,
            ..Default::default()
        };
        let mut e = Engine::new(files.clone(), &opts).unwrap();
        e.forward(&prompt[..4], 0, 3..4).unwrap(); // warm-up
        let mut pre = Vec::new();
        let mut dec = Vec::new();
        let mut comm_frac = Vec::new();
        let mut syncs = 0;
        for _ in 0..reps {
            let t0 = Instant::now();
            e.forward(&prompt, 0, prompt_len - 1..prompt_len).unwrap();
            pre.push(prompt_len as f64 / t0.elapsed().as_secs_f64());
            e.reset_comm_stats().unwrap();
            let t1 = Instant::now();
            for s in 0..decode_len {
                e.forward(&[prompt[s % prompt_len]], prompt_len + s, 0..1)
                    .unwrap();
            }
            let secs = t1.elapsed().as_secs_f64();
            dec.push(decode_len as f64 / secs);
            let c = e.comm_stats().unwrap()[0];
            syncs = c.all_reduces / decode_len as u64;
            comm_frac.push(c.seconds() / secs);
        }
        let (p, dtok) = (median(pre), median(dec));
        let implied = dtok * bytes_per_token / 1e9;
        println!(
            "| {tp} | {} | {p:.1} | {dtok:.2} | {implied:.1} | {:.2} | {syncs} | {:.0}% |",
            e.layout.head_partition(),
            if bw > 0.0 { bw / implied } else { 0.0 },
            100.0 * median(comm_frac)
        );
    }
    // ISO on the CPU backend: a long prefill with and without the two-chunk overlap. On this
    // backend "communication" is a shared-memory barrier exchange, so this measures the
    // schedule's overhead or gain here, not what a GPU link would hide.
    let iso_len = if full { 512 } else { 16 };
    println!();
    println!("| TP | prefill {iso_len} tok, ISO off (ms) | ISO on, split | ISO on (ms) | change |");
    println!("|---|---|---|---|---|");
    let long: Vec<u32> = (0..iso_len as u32).map(|i| 100 + (i * 53) % 4000).collect();
    for tp in [2usize, 3] {
        let opts = EngineOptions {
            tp,
            threads,
            capacity: iso_len + 1,
            ..Default::default()
        };
        let mut e = Engine::new(files.clone(), &opts).unwrap();
        let split = e.iso_model().split(iso_len).unwrap_or(iso_len / 2);
        let mut off = Vec::new();
        let mut on = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            e.forward(&long, 0, iso_len - 1..iso_len).unwrap();
            off.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            e.forward_iso(&long, split, iso_len - 1..iso_len).unwrap();
            on.push(t0.elapsed().as_secs_f64());
        }
        let (a, b) = (median(off), median(on));
        println!(
            "| {tp} | {:.1} | {split} + {} | {:.1} | {:+.1}% |",
            a * 1e3,
            iso_len - split,
            b * 1e3,
            100.0 * (b / a - 1.0)
        );
    }
}
