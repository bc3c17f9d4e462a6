//! Review of the ISO split and its calibration: defects found and fixed, one test each.

mod common;

use common::*;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use syncdrop::iso::IsoCostModel;
use syncdrop::quant::GgmlType;
use syncdrop::{Engine, EngineOptions, Error, ModelFiles};

/// Run `f` on its own thread and fail (not hang) if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("timed out (or the worker panicked)")
}

/// `multiple: 0` is read as 1 (no rounding), but the length guard used `2 * multiple` = 0:
/// with `min_len` 0 or 1, a 1-token prefill panicked in `clamp(1, 0)` and a 0-token one
/// returned Some(1), a split past the end. Every split must satisfy 0 < s < t.
#[test]
fn split_stays_inside_the_prompt_when_multiple_is_zero() {
    for (min_len, multiple) in [(0, 0), (1, 0), (0, 1), (0, usize::MAX / 2 + 1)] {
        let m = IsoCostModel {
            linear: 1.0,
            attn: 0.01,
            min_len,
            multiple,
            fixed: 0.0,
            comm_token: 0.0,
            comm_fixed: 0.0,
        };
        for t in 0..40 {
            let s = std::panic::catch_unwind(|| m.split(t))
                .unwrap_or_else(|_| panic!("split({t}) panicked for {m:?}"));
            if let Some(s) = s {
                assert!(s > 0 && s < t, "split({t}) = {s} for {m:?}");
            }
        }
    }
}

/// A calibration prefill that fails (here: longer than the KV cache) poisons the engine;
/// `calibrate` then returned the "engine unusable" error of its clean-up call instead of
/// the prefill's own error (`ContextOverflow`, which callers map to a --ctx hint).
#[test]
fn calibration_reports_the_failing_prefills_own_error() {
    let r = within(120, || {
        let dir = tmpdir("review-iso-cal");
        let path = dir.join("m.gguf");
        write_gguf(&path, &Tiny::small(), 5, GgmlType::F32, "llama");
        let files = Arc::new(ModelFiles::open(&path).unwrap());
        let opts = EngineOptions {
            tp: 2,
            threads: 2,
            capacity: 100,
            ..Default::default()
        };
        let mut e = Engine::new(files, &opts).unwrap();
        let r = e.iso_model().calibrate(&mut e, 64, 256, 1).map(|_| ());
        std::fs::remove_dir_all(dir).ok();
        r
    });
    match r {
        Err(Error::ContextOverflow { needed, capacity }) => {
            assert_eq!((needed, capacity), (160, 100))
        }
        other => panic!("expected the mid prefill's ContextOverflow, got {other:?}"),
    }
}

/// `IsoMode::Auto` never splits at TP 1 (no all-reduce to hide, so a second chunk only
/// costs); at TP 2 the same model splits the same prompt.
#[test]
fn auto_iso_is_off_at_tp_1() {
    let dir = tmpdir("review-iso-tp1");
    let path = dir.join("m.gguf");
    write_gguf(&path, &Tiny::small(), 5, GgmlType::F32, "llama");
    let files = Arc::new(ModelFiles::open(&path).unwrap());
    let toks: Vec<u32> = (0..96).map(|i| (i * 7 + 1) % 64).collect();
    for (tp, splits) in [(1, false), (2, true)] {
        let opts = EngineOptions {
            tp,
            threads: 1,
            capacity: 128,
            ..Default::default()
        };
        let mut e = Engine::new(files.clone(), &opts).unwrap();
        let model = IsoCostModel {
            comm_token: 1.0,
            ..e.iso_model()
        };
        assert!(model.split(toks.len()).is_some(), "{model:?}");
        e.set_iso(syncdrop::iso::IsoMode::Auto, Some(model));
        e.prefill(&toks, 95..96).unwrap();
        assert_eq!(e.last_iso_split.is_some(), splits, "TP {tp}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A split that leaves a chunk empty has no gain to predict (it underflowed `t - s`).
#[test]
fn iso_gain_of_a_split_outside_the_prompt_is_none() {
    let m = IsoCostModel {
        linear: 1.0,
        attn: 0.01,
        min_len: 0,
        multiple: 1,
        fixed: 0.0,
        comm_token: 0.5,
        comm_fixed: 0.0,
    };
    assert!(m.iso_gain(10, 5).is_some_and(|g| g > 0.0));
    for s in [0, 10, 11, usize::MAX] {
        assert_eq!(m.iso_gain(10, s), None, "s = {s}");
    }
}
