//! Review of head grouping and the planner at their edges: more than 8 ranks (TP = heads),
//! explicit layouts that split KV groups, empty calibration, NaN budgets.

mod common;

use common::*;
use std::sync::Arc;
use syncdrop::distill::DistillConfig;
use syncdrop::headgroup::{group_block, pair_mlp};
use syncdrop::layout::TpLayout;
use syncdrop::planner::{plan, Budget};
use syncdrop::quant::GgmlType;
use syncdrop::spd::Sensitivity;
use syncdrop::{Engine, EngineOptions, ModelFiles};

fn engine(path: &std::path::Path, tp: usize, layout: Option<TpLayout>) -> Engine {
    let files = Arc::new(ModelFiles::open(path).unwrap());
    let opts = EngineOptions {
        tp,
        threads: 1,
        capacity: 64,
        layout,
        ..Default::default()
    };
    Engine::new(files, &opts).unwrap()
}

fn logits(e: &mut Engine, toks: &[u32]) -> Vec<f32> {
    e.forward(toks, 0, 0..toks.len()).unwrap().data
}

fn calib() -> Vec<Vec<u32>> {
    (0..3)
        .map(|s| (0..16).map(|i| (i * 5 + s * 17) % 64).collect())
        .collect()
}

/// Brute force over all permutations (n! of them).
fn best_total(score: &[Vec<f64>]) -> f64 {
    fn rec(score: &[Vec<f64>], row: usize, used: &mut [bool]) -> f64 {
        if row == score.len() {
            return 0.0;
        }
        let mut best = f64::NEG_INFINITY;
        for m in 0..score.len() {
            if !used[m] {
                used[m] = true;
                best = best.max(score[row][m] + rec(score, row + 1, used));
                used[m] = false;
            }
        }
        best
    }
    rec(score, 0, &mut vec![false; score.len()])
}

#[test]
fn mlp_pairing_beyond_8_ranks_is_optimal() {
    let mut r = Lcg::new(7);
    for n in [9usize, 10] {
        for _ in 0..3 {
            let score: Vec<Vec<f64>> = (0..n)
                .map(|_| (0..n).map(|_| f64::from(r.next(1.0)) + 1.0).collect())
                .collect();
            let p = pair_mlp(&score).unwrap();
            let mut sorted = p.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..n).collect::<Vec<_>>(),
                "not a permutation: {p:?}"
            );
            let got: f64 = p.iter().enumerate().map(|(g, m)| score[g][*m]).sum();
            if n == 9 {
                let best = best_total(&score);
                assert!((got - best).abs() < 1e-9, "n {n}: {got} vs optimum {best}");
            }
        }
    }
    // up to 8 ranks the exhaustive search and beyond it the Hungarian one agree in kind
    let s: Vec<Vec<f64>> = (0..9)
        .map(|g| {
            (0..9)
                .map(|m| if m == (g + 4) % 9 { 5.0 } else { 1.0 })
                .collect()
        })
        .collect();
    assert_eq!(
        pair_mlp(&s).unwrap(),
        (0..9).map(|g| (g + 4) % 9).collect::<Vec<_>>()
    );
}

/// SmolLM2's shape in small: 9 heads, 3 KV groups, at TP 9 (one head per rank).
#[test]
fn head_grouping_at_tp_equal_to_heads() {
    let t = Tiny {
        n_heads: 9,
        n_kv_heads: 3,
        n_layers: 2,
        ..Tiny::small()
    };
    let dir = tmpdir("rv-hg-tp9");
    let path = dir.join("m.gguf");
    write_gguf(&path, &t, 5, GgmlType::F32, "llama");
    let toks: Vec<u32> = (0..12).map(|i| (i * 11 + 2) % 64).collect();
    let base = logits(&mut engine(&path, 9, None), &toks);
    let mut e = engine(&path, 9, None);
    let g = group_block(&mut e, 1, &calib()).expect("head grouping at TP 9");
    assert_eq!(g.ffn_order.len(), 9);
    assert!(max_abs_diff(&logits(&mut e, &toks), &base) < 1e-4);
    std::fs::remove_dir_all(dir).ok();
}

/// An explicit layout whose ranks hold a multiple of the group size but not whole groups
/// ([[0, 2], [1, 3]]), or whole groups in interleaved order ([[0, 2, 1, 3], ...]).
#[test]
fn head_grouping_with_explicit_layouts() {
    for (heads, kv, layout) in [
        (4usize, 2usize, vec![vec![0usize, 2], vec![1, 3]]),
        (8, 4, vec![vec![0, 2, 1, 3], vec![4, 5, 6, 7]]),
        (8, 4, vec![vec![0, 4, 1, 5], vec![2, 6, 3, 7]]),
    ] {
        let t = Tiny {
            n_heads: heads,
            n_kv_heads: kv,
            n_layers: 2,
            ..Tiny::small()
        };
        let dir = tmpdir(&format!("rv-hg-layout{heads}{}", layout[0][1]));
        let path = dir.join("m.gguf");
        write_gguf(&path, &t, 11, GgmlType::F32, "llama");
        let cfg = ModelFiles::open(&path).unwrap().config().unwrap();
        let l = TpLayout::with_heads(&cfg, layout.clone()).unwrap();
        let toks: Vec<u32> = (0..12).map(|i| (i * 11 + 2) % 64).collect();
        let base = logits(&mut engine(&path, 2, Some(l.clone())), &toks);
        let mut e = engine(&path, 2, Some(l));
        let g = group_block(&mut e, 1, &calib())
            .unwrap_or_else(|err| panic!("layout {layout:?}: {err}"));
        for (r, hs) in g.heads.iter().enumerate() {
            assert_eq!(hs.len(), layout[r].len(), "{layout:?} -> {:?}", g.heads);
        }
        assert!(g.dissimilarity_after >= g.dissimilarity_before - 1e-9);
        assert!(max_abs_diff(&logits(&mut e, &toks), &base) < 1e-4);
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn head_grouping_refuses_empty_calibration() {
    let dir = tmpdir("rv-hg-empty");
    let path = dir.join("m.gguf");
    write_gguf(&path, &Tiny::small(), 3, GgmlType::F32, "llama");
    let mut e = engine(&path, 2, None);
    let err = group_block(&mut e, 0, &[]).unwrap_err().to_string();
    assert!(err.contains("calibration"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

fn planner_engine(tag: &str) -> (Engine, std::path::PathBuf, Sensitivity) {
    let dir = tmpdir(tag);
    let t = Tiny {
        n_layers: 3,
        ..Tiny::small()
    };
    write_gguf(&dir.join("m.gguf"), &t, 21, GgmlType::F32, "llama");
    let e = engine(&dir.join("m.gguf"), 2, None);
    let sens = Sensitivity {
        base_ppl: 10.0,
        ppl_from: vec![13.0, 12.0, 11.0],
        sensitivity: vec![1.0, 1.0, 1.0],
        tp: Some(2),
        passages: Some(3),
        compensation_rank: None,
    };
    (e, dir, sens)
}

/// A NaN budget is refused before any evaluation (it compares false with every loss: the
/// search would run to an empty plan whose verdict reads "inconclusive").
#[test]
fn planner_refuses_a_nan_budget() {
    let (mut e, dir, sens) = planner_engine("rv-plan-nan");
    let mut calls = 0;
    let mut metric = |_: &mut Engine, _: usize| -> syncdrop::Result<f64> {
        calls += 1;
        Ok(10.0)
    };
    let got = plan(
        &mut e,
        &sens,
        Budget::AccDrop(f64::NAN),
        0.0,
        &mut metric,
        &[],
        None,
        |_| {},
    );
    assert!(got.is_err(), "{:?}", got.map(|o| o.0.verdict_text));
    assert_eq!(calls, 0);
    std::fs::remove_dir_all(dir).ok();
}

/// B2B with no calibration passages (or all of them held out) is refused before the
/// zero-shot search, not after it.
#[test]
fn planner_refuses_b2b_without_calibration_up_front() {
    let (mut e, dir, sens) = planner_engine("rv-plan-calib");
    for (calib, holdout) in [(vec![], 0usize), (calib(), 3)] {
        let dcfg = DistillConfig {
            epochs: 2,
            holdout,
            patience: 1,
            threads: 1,
            ..Default::default()
        };
        let mut calls = 0;
        // every SPD step is over budget: the planner reaches distillation
        let mut metric = |e: &mut Engine, _: usize| -> syncdrop::Result<f64> {
            calls += 1;
            Ok(if e.spd().contains(&true) { 20.0 } else { 10.0 })
        };
        let got = plan(
            &mut e,
            &sens,
            Budget::PplIncrease(0.01),
            0.0,
            &mut metric,
            &calib,
            Some(&dcfg),
            |_| {},
        );
        let err = got.map(|o| o.0.verdict_text).unwrap_err().to_string();
        assert!(err.contains("calibration"), "{err}");
        assert_eq!(calls, 0, "holdout {holdout}: evaluated before refusing");
    }
    std::fs::remove_dir_all(dir).ok();
}
