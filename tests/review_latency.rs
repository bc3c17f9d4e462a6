//! Review regressions for src/latency.rs and src/bench.rs.

use std::sync::Arc;
use syncdrop::latency::*;
use syncdrop::synthetic::SyntheticModel;
use syncdrop::{Engine, EngineOptions, ModelFiles};

/// The bench prefills with logits for the last row only (`prefill(&ids, prompt - 1..prompt)`)
/// and the engine runs the LM head on the requested rows alone, so its FLOPs count the
/// LM-head slice once, not once per prompt token.
#[test]
fn bench_prefill_flops_count_the_lm_head_for_the_last_row_only() {
    let f = Arc::new(ModelFiles::Synthetic(
        SyntheticModel::parse("llama2-7b:layers=1").unwrap(),
    ));
    let e = Engine::new(
        f.clone(),
        &EngineOptions {
            tp: 4,
            threads: 2,
            capacity: 16,
            only_rank: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = f.config().unwrap();
    let w = syncdrop::model::load_block(&f, &cfg, &e.layout.ranks[1], 0).unwrap();
    let block = (w.wqkv.len() + w.wo.len() + w.w_gate_up.len() + w.w_down.len()) as f64;
    let head = 8000.0 * 4096.0; // LM-head slice: 32000 / 4 rows of 4096
    assert_eq!(
        syncdrop::bench::rank_params(&e, 1) as f64,
        block + head,
        "decode streams the blocks and the LM-head slice"
    );
    let t = 8.0;
    let attn = 2.0 * 2.0 * (8.0 * 9.0 / 2.0) * 8.0 * 128.0; // causal QK^T + PV, 8 local heads
    let want = 2.0 * t * block + 2.0 * head + attn;
    assert_eq!(syncdrop::bench::rank_prefill_flops(&e, 1, 8), want);
}

/// The engine never splits a prefill at TP 1 (no all-reduce to hide); neither may the
/// projection, which otherwise reports an ISO slowdown that cannot happen.
#[test]
fn iso_is_off_at_tp_1_as_in_the_engine() {
    let m = ModelShape::llama2_7b();
    assert_eq!(iso_split(&m, 1, 2048), None);
    assert!(iso_split(&m, 2, 2048).is_some());
    let link = LinkProfile::by_name("h100-nvlink-nccl").unwrap();
    let c = Compute::Roofline(Device::by_key("h100-sxm").unwrap());
    let mk = |iso| {
        project(&Scenario {
            tokens: 2048,
            iso,
            ..Scenario::new(&m, 1, &link, &c, Phase::Prefill)
        })
        .unwrap()
    };
    let (on, off) = (mk(true), mk(false));
    assert_eq!(on.iso_split, None);
    assert_eq!(on.total_ms, off.total_ms);
    assert_eq!(on.speedup, 1.0);
    // and a measured table is not asked for ISO chunk entries at TP 1
    let opts = LatencyOptions {
        models: vec!["llama2-7b".into()],
        tp: vec![1],
        prefill_tokens: vec![2048],
        decode_batch: vec![],
        ..Default::default()
    };
    assert_eq!(needed_entries(&opts).unwrap().len(), 1);
}

/// No repetitions: an error, not an index-out-of-bounds panic on the empty median.
#[test]
fn thread_all_reduce_timing_with_no_repetitions_is_an_error() {
    assert!(measure_thread_all_reduce(2, &[64], 0).is_err());
}

/// The one-shot profile follows the engine's selector: beyond 4 ranks messages above 256 KiB
/// go two-shot (at 8 ranks one-shot is the slower of the two there by the model's own
/// constants); at up to 4 ranks one-shot serves up to the profile's 512 KiB.
#[test]
fn one_shot_hands_large_messages_to_two_shot_beyond_4_ranks() {
    use syncdrop::comm::select::ONE_SHOT_MAX_BYTES_LARGE_WORLD;
    use syncdrop::latency::{ring_bytes, LinkProfile};
    let p = LinkProfile::by_name("h100-nvlink-oneshot").unwrap();
    let os = p.one_shot.clone().unwrap();
    let two_shot = |n: usize, size: f64| p.alpha_us + ring_bytes(n, size) / (p.busbw_gbs * 1e3);
    let one_shot = |n: usize, size: f64| os.alpha_us + (n - 1) as f64 * size / (os.link_gbs * 1e3);
    let big = 384.0 * 1024.0;
    assert!(big > ONE_SHOT_MAX_BYTES_LARGE_WORLD as f64 && big <= os.max_bytes);
    assert_eq!(p.all_reduce_us(8, big), two_shot(8, big));
    assert!(two_shot(8, big) < one_shot(8, big));
    assert_eq!(p.all_reduce_us(4, big), one_shot(4, big));
    let small = 64.0 * 1024.0;
    assert_eq!(p.all_reduce_us(8, small), one_shot(8, small));
}
