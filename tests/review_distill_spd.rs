//! Review of the plan file and the distilled weights: a plan from another version is refused
//! for its version, a garbled weights hash is an error (not a panic), a head grouping the
//! engine would not apply as written is refused before anything is switched, and weights of
//! another dtype are not read as f32.

mod common;

use common::*;
use syncdrop::distill::{load_distilled, save_distilled};
use syncdrop::spd::{model_sha256, Recovery, SpdPlan};
use syncdrop::{Engine, EngineOptions};

fn tiny(tp: usize, tag: &str, layers: usize) -> (Engine, std::path::PathBuf) {
    tiny_engine(tp, tag, layers, false)
}

/// A newer plan format may rename or drop fields: the error must say "version", not
/// "missing field".
#[test]
fn a_plan_of_a_newer_version_is_refused_for_its_version() {
    let dir = tmpdir("rv-version");
    let p = dir.join("plan.json");
    std::fs::write(
        &p,
        r#"{"version": 2, "model": {"sha256": "ab"}, "tp": 2, "blocks": []}"#,
    )
    .unwrap();
    let err = SpdPlan::load(&p).unwrap_err().to_string();
    assert!(
        err.contains("version 2") && err.contains("reads version 1"),
        "{err}"
    );
    std::fs::write(&p, r#"{"tp": 2}"#).unwrap();
    let err = SpdPlan::load(&p).unwrap_err().to_string();
    assert!(err.contains("version missing"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// `distilled_sha256` comes from the file: a hand-edited value must give an error.
#[test]
fn a_garbled_distilled_hash_is_an_error_not_a_panic() {
    let (e, dir) = tiny(2, "rv-hash", 2);
    let sha = model_sha256(&e.files).unwrap();
    let mut plan = SpdPlan::new(&e, sha, &[true, false], Recovery::B2b);
    std::fs::write(dir.join("w.safetensors"), b"not these").unwrap();
    plan.distilled = Some("w.safetensors".into());
    plan.distilled_sha256 = Some("aaaaaaaaaaa\u{e9}".into()); // byte 12 inside a char
    let p = dir.join("plan.json");
    let r = std::panic::catch_unwind(|| plan.distilled_path(&p));
    let err = r.expect("panicked").unwrap_err().to_string();
    assert!(err.contains("not the ones it was written with"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// A block's head grouping is applied only with both its head permutation and its MLP order;
/// half of one, or HG+B2B with none, would run the block (and its distilled weights) in
/// another layout than the plan's. Bad groupings are refused before the engine is switched.
#[test]
fn a_plan_whose_head_grouping_cannot_apply_as_written_is_refused() {
    let (mut e, dir) = tiny(2, "rv-groups", 2);
    let sha = model_sha256(&e.files).unwrap();
    let p = dir.join("plan.json");
    let base = SpdPlan::new(&e, sha.clone(), &[true, false], Recovery::ZeroShot);

    // a whole, valid grouping loads
    let mut good = base.clone();
    good.layers[0].heads = Some(vec![vec![2, 3], vec![0, 1]]);
    good.layers[0].ffn_order = Some(vec![1, 0]);
    good.validate(&e, &sha).unwrap();

    let cases: Vec<(SpdPlan, &str)> = vec![
        {
            let mut q = base.clone();
            q.layers[0].heads = Some(vec![vec![2, 3], vec![0, 1]]);
            (q, "not both")
        },
        {
            let mut q = base.clone();
            q.layers[0].ffn_order = Some(vec![1, 0]);
            (q, "not both")
        },
        {
            let mut q = base.clone();
            q.layers[0].recovery = Some(Recovery::HgB2b);
            (q, "no head permutation")
        },
        {
            let mut q = base.clone();
            q.layers[0].heads = Some(vec![vec![0, 9], vec![1, 2]]);
            q.layers[0].ffn_order = Some(vec![1, 0]);
            (q, "block 0")
        },
        {
            let mut q = base.clone();
            q.layers[0].heads = Some(vec![vec![0, 1, 2], vec![3]]);
            q.layers[0].ffn_order = Some(vec![0, 1]);
            (q, "query heads")
        },
    ];
    for (plan, want) in cases {
        let err = plan.validate(&e, &sha).unwrap_err().to_string();
        assert!(err.contains(want), "{plan:?}: {err}");
        plan.save(&p).unwrap();
        let err = SpdPlan::load_into(&p, &mut e, &sha)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
        assert_eq!(e.spd(), &[false, false], "switched before the error");
    }
    good.save(&p).unwrap();
    SpdPlan::load_into(&p, &mut e, &sha).unwrap();
    assert_eq!(e.spd(), &[true, false]);
    assert_eq!(e.block_shards(0)[0].q_heads, vec![2, 3]);
    std::fs::remove_dir_all(dir).ok();
}

/// Distilled weights are f32: a tensor of another dtype with the same byte count is refused.
#[test]
fn distilled_weights_of_another_dtype_are_refused() {
    let (mut e, dir) = tiny(2, "rv-dtype", 2);
    let w: Vec<_> = e
        .block_shards(0)
        .iter()
        .map(|s| syncdrop::model::load_block(&e.files, &e.cfg, s, 0).unwrap())
        .collect();
    let p = dir.join("w.safetensors");
    save_distilled(&p, &[(0, w.clone())]).unwrap();
    load_distilled(&p, &mut e, &[0]).unwrap();
    // the same bytes, each tensor labelled f16 of twice the elements
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, vec![t.shape()[0] * 2], t.data().to_vec()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), b);
            (n.clone(), v.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &p).unwrap();
    let err = load_distilled(&p, &mut e, &[0]).unwrap_err().to_string();
    assert!(err.contains("F16"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// The plan's head partition must tell apart two layouts with the same head counts: SPD's
/// error and the distilled `W_o` columns belong to the heads a rank holds, so a plan made on
/// the contiguous layout must not load into an engine with another head assignment (or the
/// other way round), where its distilled weights would be read into other heads' columns.
#[test]
fn a_plan_is_refused_by_an_engine_with_other_heads_per_rank() {
    let (mut e, dir) = tiny(2, "rv-layout", 2);
    let sha = model_sha256(&e.files).unwrap();
    let opts = EngineOptions {
        tp: 2,
        threads: 1,
        capacity: 64,
        layout: Some(
            syncdrop::layout::TpLayout::with_heads(&e.cfg, vec![vec![0, 2], vec![1, 3]]).unwrap(),
        ),
        ..Default::default()
    };
    let mut f = Engine::new(e.files.clone(), &opts).unwrap();
    assert_eq!(e.layout.head_partition(), f.layout.head_partition());

    // a B2B plan made on the contiguous layout, with its distilled weights
    e.set_spd(&[true, false]).unwrap();
    let calib: Vec<Vec<u32>> = (0..3)
        .map(|s| (0..10).map(|i| (i * 7 + s * 13) % 64).collect())
        .collect();
    let dcfg = syncdrop::distill::DistillConfig {
        epochs: 3,
        lr: 3e-3,
        threads: 1,
        ..Default::default()
    };
    let (w, _) = syncdrop::distill::distill_layer(&mut e, &calib, 0, &dcfg).unwrap();
    let weights = dir.join("plan.safetensors");
    save_distilled(&weights, &[(0, w)]).unwrap();
    let mut plan = SpdPlan::new(&e, sha.clone(), &[true, false], Recovery::B2b);
    plan.set_distilled(&weights).unwrap();
    let p = dir.join("plan.json");
    plan.save(&p).unwrap();
    SpdPlan::load_into(&p, &mut e, &sha).unwrap();

    let err = SpdPlan::load_into(&p, &mut f, &sha)
        .unwrap_err()
        .to_string();
    assert!(err.contains("head partition"), "{err}");
    // and a plan made on the other layout is refused by the contiguous one
    let other = SpdPlan::new(&f, sha.clone(), &[true, false], Recovery::ZeroShot);
    other.validate(&f, &sha).unwrap();
    let err = other.validate(&e, &sha).unwrap_err().to_string();
    assert!(err.contains("head partition"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// Calibration with no sequence of 2 or more tokens scores nothing: an error, not a
/// perplexity of 1.0 and a sensitivity of 0 for every block.
#[test]
fn sensitivity_of_nothing_to_score_is_an_error() {
    let (mut e, dir) = tiny(2, "sens_nothing", 2);
    let short = vec![vec![3u32], vec![], vec![7]];
    let err = syncdrop::spd::sensitivity(&mut e, &short, 16, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 or more tokens"), "{err}");
    // one scorable sequence is enough
    let s = syncdrop::spd::sensitivity(&mut e, &[vec![3, 9, 4, 1]], 16, false).unwrap();
    assert!(
        s.base_ppl > 1.0 && s.sensitivity.iter().any(|v| *v != 0.0),
        "{s:?}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Distilled weights are written like the plan: through a temporary file renamed over the
/// old one; the file that results reads back.
#[test]
fn distilled_weights_replace_the_old_file_whole() {
    let (e, dir) = tiny(2, "save_atomic", 2);
    let cfg = e.cfg.clone();
    let w: Vec<_> = (0..2)
        .map(|r| syncdrop::model::load_block(&e.files, &cfg, &e.layout.ranks[r], 1).unwrap())
        .collect();
    let path = dir.join("w.safetensors");
    std::fs::write(&path, b"old and much longer than nothing").unwrap();
    save_distilled(&path, &[(1, w)]).unwrap();
    let mut e2 = e;
    load_distilled(&path, &mut e2, &[1]).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|d| d.ok())
        .filter(|d| d.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(dir).ok();
}
