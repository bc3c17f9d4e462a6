//! Criterion benchmarks of the CPU hot paths (filled in by the benchmark issue).
use criterion::{criterion_group, criterion_main, Criterion};

fn bench_dot(c: &mut Criterion) {
    let a: Vec<f32> = (0..4096).map(|i| i as f32 * 1e-3).collect();
    c.bench_function("dot_4096", |b| {
        b.iter(|| syncdrop::backend::cpu::dot(std::hint::black_box(&a), &a))
    });
}

criterion_group!(benches, bench_dot);
criterion_main!(benches);
