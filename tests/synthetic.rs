//! Synthetic models of real shapes, the one-rank mode and the engine bench, on the CPU
//! backend (the CUDA side is in tests/cuda_backend.rs); plus the error a machine without a
//! GPU gives for `--backend cuda`.

use std::sync::Arc;
use syncdrop::synthetic::SyntheticModel;
use syncdrop::{BackendKind, Engine, EngineOptions, Error, ModelFiles};

fn synthetic(spec: &str) -> Arc<ModelFiles> {
    Arc::new(ModelFiles::Synthetic(SyntheticModel::parse(spec).unwrap()))
}

#[test]
fn presets_have_the_real_shapes_and_bad_specs_are_typed_errors() {
    let m = SyntheticModel::parse("llama2-70b").unwrap();
    let c = &m.cfg;
    assert_eq!(
        (c.hidden, c.n_layers, c.n_heads, c.n_kv_heads),
        (8192, 80, 64, 8)
    );
    assert_eq!((c.head_dim, c.ffn, c.vocab), (128, 28672, 32000));
    assert_eq!(m.shape("blk.79.attn_k.weight").unwrap(), (1024, 8192));
    assert_eq!(m.shape("blk.3.ffn_down.weight").unwrap(), (8192, 28672));
    assert!(m.shape("blk.80.attn_q.weight").is_err());
    assert!(!m.has("blk.0.attn_q.bias"));
    let m = SyntheticModel::parse("llama2-13b:layers=3,seed=9").unwrap();
    assert_eq!((m.cfg.hidden, m.cfg.n_layers, m.seed), (5120, 3, 9));
    for bad in [
        "gpt-5",
        "llama2-7b:layers=0",
        "llama2-7b:depth=2",
        "llama2-7b:layers=x",
    ] {
        assert!(
            matches!(SyntheticModel::parse(bad), Err(Error::InvalidArgument(_))),
            "{bad}"
        );
    }
}

#[test]
fn synthetic_rows_are_deterministic_bounded_and_distinct() {
    let m = SyntheticModel::parse("llama2-7b").unwrap();
    let (mut a, mut b, mut c) = (vec![0f32; 4096], vec![0f32; 4096], vec![0f32; 4096]);
    m.read_row("blk.0.attn_q.weight", 5, &mut a).unwrap();
    m.read_row("blk.0.attn_q.weight", 5, &mut b).unwrap();
    m.read_row("blk.0.attn_q.weight", 6, &mut c).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let bound = (3.0f32 / 4096.0).sqrt();
    // a shard gathered by columns holds the same values as the full rows
    let g = m
        .gather("blk.0.attn_q.weight", &[5, 6], &[3, 0, 4095])
        .unwrap();
    assert_eq!(g, vec![a[3], a[0], a[4095], c[3], c[0], c[4095]]);
    assert!(a.iter().all(|x| x.abs() <= bound));
    let var = a.iter().map(|x| x * x).sum::<f32>() / 4096.0;
    assert!((var * 4096.0 - 1.0).abs() < 0.1, "row variance {var}");
    m.read_row("blk.0.attn_norm.weight", 0, &mut a).unwrap();
    assert!(a.iter().all(|x| *x == 1.0));
    assert!(m.read_row("blk.0.attn_q.weight", 4096, &mut a).is_err());
    let other = SyntheticModel::parse("llama2-7b:seed=1").unwrap();
    other.read_row("blk.0.attn_q.weight", 5, &mut c).unwrap();
    assert_ne!(b, c);
}

fn opts(tp: usize, only_rank: Option<usize>) -> EngineOptions {
    EngineOptions {
        tp,
        threads: 2,
        capacity: 64,
        only_rank,
        ..Default::default()
    }
}

#[test]
fn one_rank_mode_fills_only_that_ranks_vocabulary_slice() {
    let f = synthetic("llama2-7b:layers=1");
    let toks = [1u32, 500, 31999, 7];
    // at TP 1 the one-rank mode is the whole model
    let full = Engine::new(f.clone(), &opts(1, None))
        .unwrap()
        .forward(&toks, 0, 0..4)
        .unwrap();
    let one = Engine::new(f.clone(), &opts(1, Some(0)))
        .unwrap()
        .forward(&toks, 0, 0..4)
        .unwrap();
    assert_eq!(full.data, one.data);
    // at TP 4, rank 2 alone: its slice only, deterministic
    let mut e = Engine::new(f.clone(), &opts(4, Some(2))).unwrap();
    assert_eq!((e.tp(), e.ranks_running()), (4, 1));
    let a = e.forward(&toks, 0, 3..4).unwrap();
    let b = Engine::new(f.clone(), &opts(4, Some(2)))
        .unwrap()
        .forward(&toks, 0, 3..4)
        .unwrap();
    assert_eq!(a.data, b.data);
    let vr = syncdrop::layout::even_split(32000, 4)[2].clone();
    assert!(a.row(0)[..vr.start].iter().all(|x| *x == 0.0));
    assert!(a.row(0)[vr.end..].iter().all(|x| *x == 0.0));
    assert!(a.row(0)[vr].iter().all(|x| x.is_finite()) && a.row(0).iter().any(|x| *x != 0.0));
    // a rank outside the group, and per-rank weight loading, are refused
    assert!(matches!(
        Engine::new(f.clone(), &opts(4, Some(4))),
        Err(Error::InvalidArgument(_))
    ));
    assert!(e.load_layer(0, vec![]).is_err());
}

#[test]
fn engine_bench_counts_the_ranks_parameters_and_flops() {
    let f = synthetic("llama2-7b:layers=2");
    let mut e = Engine::new(f.clone(), &opts(4, Some(1))).unwrap();
    let r = syncdrop::bench::bench_engine(&mut e, "x", "cpu", Some(1), (8, 2), (1, 3)).unwrap();
    assert_eq!((r.prefill_s.len(), r.decode_s.len()), (2, 3));
    assert!(r.decode_median_s() > 0.0 && r.prefill_tflops() > 0.0);
    // independent count from the weights rank 1 actually loads
    let cfg = f.config().unwrap();
    let shard = &e.layout.ranks[1];
    let mut params = 0u64;
    for l in 0..2 {
        let w = syncdrop::model::load_block(&f, &cfg, shard, l).unwrap();
        params += (w.wqkv.len() + w.wo.len() + w.w_gate_up.len() + w.w_down.len()) as u64;
    }
    params += 8000 * 4096; // LM-head slice: 32000 / 4
    assert_eq!(r.rank_params, params);
    let attn = 2 * 2 * (8 * 9 / 2) * 8 * 128; // causal QK^T + PV, 8 local heads
                                              // blocks for all 8 prompt tokens, the LM-head slice for the last one (the logits asked for)
    let head = 8000 * 4096;
    assert_eq!(
        r.rank_prefill_flops,
        (2 * 8 * (params - head) + 2 * head + 2 * attn) as f64
    );
    // a capacity too small for the decode steps is a clear error
    let mut small = Engine::new(
        f,
        &EngineOptions {
            capacity: 9,
            ..opts(4, Some(1))
        },
    )
    .unwrap();
    let err = syncdrop::bench::bench_engine(&mut small, "x", "cpu", None, (8, 1), (1, 3));
    assert!(matches!(err, Err(Error::InvalidArgument(m)) if m.contains("--ctx")));
}

#[test]
fn cuda_backend_without_a_gpu_is_a_typed_error() {
    let gpu = matches!(syncdrop::backend::cuda::device_count(), Ok(n) if n > 0);
    if gpu {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let r = Engine::new(
        synthetic("llama2-7b:layers=1"),
        &EngineOptions {
            backend: BackendKind::Cuda,
            ..opts(1, None)
        },
    );
    assert!(
        matches!(r, Err(Error::Cuda(_) | Error::NotCompiledWithCuda)),
        "{:?}",
        r.err()
    );
}

/// scripts/gpu-check.sh sets SYNCDROP_REQUIRE_GPU=1 so that a GPU machine whose driver fails
/// cannot pass the GPU tests by skipping them all: there the skip must become a failure.
#[test]
fn a_required_gpu_turns_the_skip_into_a_failure() {
    const CHILD: &str = "SYNCDROP_TEST_GPU_OR_SKIP_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let usable = syncdrop::backend::gpu_or_skip("child");
        println!("child: usable = {usable}");
        return;
    }
    if syncdrop::backend::cuda::probe().is_ok() {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let child = |require: Option<&str>| {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            "a_required_gpu_turns_the_skip_into_a_failure",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env_remove(syncdrop::backend::REQUIRE_GPU_ENV);
        if let Some(v) = require {
            c.env(syncdrop::backend::REQUIRE_GPU_ENV, v);
        }
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = child(None);
    assert!(
        ok && text.contains("child: skipped: no GPU") && text.contains("usable = false"),
        "{text}"
    );
    let (ok, text) = child(Some("0"));
    assert!(ok && text.contains("usable = false"), "{text}");
    let (ok, text) = child(Some("1"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("SYNCDROP_REQUIRE_GPU=1 but no usable GPU"),
        "{text}"
    );
}

#[test]
fn cuda_only_options_are_refused_with_clear_errors() {
    let f = synthetic("llama2-7b:layers=1");
    let link = syncdrop::latency::LinkProfile::by_name("a800-nvlink-400gbs").unwrap();
    for (o, needle) in [
        (
            EngineOptions {
                nccl: Some(syncdrop::engine::NcclMode::InProcess),
                ..opts(2, None)
            },
            "NCCL needs",
        ),
        (
            EngineOptions {
                backend: BackendKind::Cuda,
                nccl: Some(syncdrop::engine::NcclMode::File("/tmp/id".into())),
                ..opts(2, None)
            },
            "--rank",
        ),
        (
            EngineOptions {
                backend: BackendKind::Cuda,
                nccl: Some(syncdrop::engine::NcclMode::Tcp("127.0.0.1:29500".into())),
                ..opts(2, None)
            },
            "--rank",
        ),
        (
            EngineOptions {
                emulate_link: Some((link, 8)),
                ..opts(2, None)
            },
            "link emulation",
        ),
    ] {
        match Engine::new(f.clone(), &o) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("expected an error naming {needle}, got {:?}", other.err()),
        }
    }
}
