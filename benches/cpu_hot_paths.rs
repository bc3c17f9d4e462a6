//! Criterion benchmarks of the CPU hot paths: thread all-reduce, the GEMM/GEMV wrapper,
//! dequantisation, attention, and an SPD block's linear compensation. `cargo bench --bench cpu_hot_paths`; CI compiles them and
//! runs each once (cargo test --all-targets).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use syncdrop::backend::cpu::{attend, dot, matmul};
use syncdrop::comm::{Communicator, ThreadComm};
use syncdrop::quant::{dequantize_row, quantize_row, GgmlType};

fn bench_dot(c: &mut Criterion) {
    let a: Vec<f32> = (0..4096).map(|i| i as f32 * 1e-3).collect();
    c.bench_function("dot_4096", |b| b.iter(|| dot(black_box(&a), &a)));
}

/// SmolLM2 shapes: decode GEMV (t = 1) and a 128-token prefill GEMM of the MLP up projection.
fn bench_matmul(c: &mut Criterion) {
    let (n, k) = (1536, 576);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
        .collect();
    let mut g = c.benchmark_group("matmul_1536x576");
    for t in [1usize, 128] {
        let x: Vec<f32> = (0..t * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut out = vec![0f32; t * n];
        g.throughput(Throughput::Elements((2 * t * n * k) as u64));
        g.bench_with_input(BenchmarkId::new("t", t), &t, |b, &t| {
            b.iter(|| matmul(black_box(&x), t, &w, n, k, &mut out, 1))
        });
    }
    g.finish();
}

/// Linear compensation of one SPD block on one rank (SmolLM2, rank 32: unit RMSNorm, x^ W_in^T,
/// h W_out^T, add), at decode and a 128-token prefill; next to it, what that rank's MLP shard
/// at TP 8 multiplies (gate/up 384 x 576, down 576 x 192), the work LC is added to.
fn bench_compensate(c: &mut Criterion) {
    use syncdrop::compensate::Compensation;
    let (d, k, f) = (576, 32, 192);
    let w = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i % 89) as f32 - 44.0) * 1e-3).collect() };
    let comp = Compensation {
        rank: k,
        w_in: w(k * d),
        w_out: w(d * k),
    };
    let (gate_up, down) = (w(2 * f * d), w(d * f));
    let mut g = c.benchmark_group("spd_block_rank_576");
    for t in [1usize, 128] {
        let x: Vec<f32> = (0..t * d).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut u = x.clone();
        let mut scratch = Vec::new();
        g.throughput(Throughput::Elements(t as u64));
        g.bench_with_input(BenchmarkId::new("lc_rank32_t", t), &t, |b, _| {
            b.iter(|| {
                comp.apply_with(matmul, black_box(&x), d, 1e-5, &mut u, 1, &mut scratch);
            })
        });
        let mut h = vec![0f32; t * 2 * f];
        let mut out = vec![0f32; t * d];
        g.bench_with_input(BenchmarkId::new("mlp_shard_tp8_t", t), &t, |b, &t| {
            b.iter(|| {
                matmul(black_box(&x), t, &gate_up, 2 * f, d, &mut h, 1);
                matmul(&h[..t * f], t, &down, d, f, &mut out, 1);
            })
        });
    }
    g.finish();
}

fn bench_dequant(c: &mut Criterion) {
    let x: Vec<f32> = (0..576).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut g = c.benchmark_group("dequantize_row_576");
    g.throughput(Throughput::Elements(576));
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let q = quantize_row(ty, &x);
        let mut out = vec![0f32; 576];
        g.bench_function(format!("{ty:?}"), |b| {
            b.iter(|| dequantize_row(ty, black_box(&q), &mut out))
        });
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let hd = 64;
    let mut g = c.benchmark_group("attend_one_query");
    for len in [128usize, 1024] {
        let q: Vec<f32> = (0..hd).map(|i| i as f32 * 0.01).collect();
        let k: Vec<f32> = (0..len * hd)
            .map(|i| ((i % 31) as f32 - 15.0) * 0.01)
            .collect();
        let v = k.clone();
        let mut scores = Vec::new();
        let mut out = vec![0f32; hd];
        g.bench_with_input(BenchmarkId::new("kv_len", len), &len, |b, &len| {
            b.iter(|| attend(black_box(&q), &k, &v, len, &mut scores, &mut out))
        });
    }
    g.finish();
}

/// Latency of one thread all-reduce of a decode-sized message (576 f32) at 2 and 3 ranks:
/// the peers run the same number of all-reduces in their own threads.
fn bench_all_reduce(c: &mut Criterion) {
    let mut g = c.benchmark_group("thread_all_reduce_576");
    for world in [2usize, 3] {
        g.bench_function(BenchmarkId::new("ranks", world), |b| {
            b.iter_custom(|iters| {
                let comms = ThreadComm::group(world).unwrap();
                let start = Arc::new(Barrier::new(world));
                let mut it = comms.into_iter();
                let me = it.next().unwrap();
                let peers: Vec<_> = it
                    .map(|c| {
                        let start = start.clone();
                        std::thread::spawn(move || {
                            start.wait();
                            let mut d = vec![1f32; 576];
                            for _ in 0..iters {
                                c.all_reduce_sum(&mut d).unwrap();
                            }
                        })
                    })
                    .collect();
                start.wait();
                let t0 = std::time::Instant::now();
                let mut d = vec![1f32; 576];
                for _ in 0..iters {
                    me.all_reduce_sum(&mut d).unwrap();
                }
                let el = t0.elapsed();
                peers.into_iter().for_each(|p| p.join().unwrap());
                el
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_dot,
    bench_matmul,
    bench_compensate,
    bench_dequant,
    bench_attention,
    bench_all_reduce
);
criterion_main!(benches);
