//! Intra-Sequence Overlap on the CPU backend: two-chunk prefill with a communication thread
//! per rank gives the same bits as the one-shot prefill, in the logits and in the KV cache
//! (checked through decode steps that read it), at TP 1..8, with and without SPD blocks.

mod common;

use common::*;
use proptest::prelude::*;
use std::sync::Arc;
use syncdrop::quant::GgmlType;
use syncdrop::{Engine, EngineOptions, ModelFiles};

fn engine(path: &std::path::Path, tp: usize) -> Engine {
    let files = Arc::new(ModelFiles::open(path).unwrap());
    let opts = EngineOptions {
        tp,
        threads: tp,
        capacity: 96,
        row_invariant: true,
        ..Default::default()
    };
    Engine::new(files, &opts).unwrap()
}

/// Prefill (ISO at `split`, or plain when None), then two decode steps; all logits.
fn trace(e: &mut Engine, prompt: &[u32], split: Option<usize>) -> Vec<u32> {
    let n = prompt.len();
    let l = match split {
        Some(s) => e.forward_iso(prompt, s, 0..n).unwrap(),
        None => e.forward(prompt, 0, 0..n).unwrap(),
    };
    let mut bits: Vec<u32> = l.data.iter().map(|v| v.to_bits()).collect();
    for (i, t) in [7u32, 11].iter().enumerate() {
        let d = e.forward(&[*t], n + i, 0..1).unwrap();
        bits.extend(d.data.iter().map(|v| v.to_bits()));
    }
    bits
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn iso_is_bit_identical(tp in 1usize..=8, len in 2usize..70, split_pick in any::<prop::sample::Index>(),
                            spd_bits in any::<u8>(), seed in any::<u64>()) {
        let t = Tiny { n_heads: 8, n_kv_heads: 2, n_layers: 3, ..Tiny::small() };
        let dir = tmpdir("iso");
        let path = dir.join("m.gguf");
        write_gguf(&path, &t, seed, GgmlType::F32, "llama");
        let mut lcg = Lcg::new(seed);
        let prompt: Vec<u32> = (0..len).map(|_| ((lcg.next(1.0) + 1.0) * 31.9) as u32 % 64).collect();
        let split = 1 + split_pick.index(len - 1);
        let spd: Vec<bool> = (0..3).map(|i| spd_bits & (1 << i) != 0).collect();
        let mut plain = engine(&path, tp);
        plain.set_spd(&spd).unwrap();
        let mut iso = engine(&path, tp);
        iso.set_spd(&spd).unwrap();
        let a = trace(&mut plain, &prompt, None);
        let b = trace(&mut iso, &prompt, Some(split));
        prop_assert!(a == b, "TP {} len {} split {} spd {:?}: ISO differs", tp, len, split, spd);
        // the same number of sync points: each chunk pays what the whole sequence paid
        let (sa, sb) = (plain.comm_stats().unwrap()[0], iso.comm_stats().unwrap()[0]);
        if tp > 1 {
            let per_fwd = 3 * 2 - spd.iter().filter(|s| **s).count();
            prop_assert_eq!(sa.all_reduces as usize, 3 * per_fwd);
            prop_assert_eq!(sb.all_reduces as usize, 2 * per_fwd + 2 * per_fwd);
        }
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn iso_split_out_of_range_falls_back_to_plain_prefill() {
    let dir = tmpdir("isoedge");
    let path = dir.join("m.gguf");
    write_gguf(&path, &Tiny::small(), 4, GgmlType::F32, "llama");
    let prompt = [1u32, 2, 3, 4, 5];
    let a = trace(&mut engine(&path, 2), &prompt, None);
    for split in [0, 5, 9] {
        assert_eq!(trace(&mut engine(&path, 2), &prompt, Some(split)), a);
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn iso_with_the_fast_gemm_path_is_within_tolerance() {
    let dir = tmpdir("isotol");
    let path = dir.join("m.gguf");
    let t = Tiny {
        n_heads: 8,
        n_kv_heads: 2,
        ..Tiny::small()
    };
    write_gguf(&path, &t, 8, GgmlType::F32, "llama");
    let prompt: Vec<u32> = (0..40).map(|i| (i * 5 + 3) % 64).collect();
    for tp in [1, 3, 8] {
        let files = Arc::new(ModelFiles::open(&path).unwrap());
        let opts = EngineOptions {
            tp,
            threads: tp,
            capacity: 64,
            ..Default::default()
        };
        let a = Engine::new(files.clone(), &opts)
            .unwrap()
            .forward(&prompt, 0, 0..40)
            .unwrap();
        let b = Engine::new(files, &opts)
            .unwrap()
            .forward_iso(&prompt, 17, 0..40)
            .unwrap();
        assert!(max_abs_diff(&a.data, &b.data) < 1e-4, "TP {tp}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// The calibration times three real prefills with the engine's own counters (switching the
/// device backends' lane timing on and off around them) and leaves the engine as it was.
#[test]
fn calibration_times_real_prefills_and_leaves_the_engine_usable() {
    let t = Tiny {
        n_heads: 8,
        n_kv_heads: 2,
        n_layers: 3,
        ..Tiny::small()
    };
    let dir = tmpdir("iso-calibrate");
    let path = dir.join("m.gguf");
    write_gguf(&path, &t, 5, GgmlType::F32, "llama");
    let prompt: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 64).collect();
    let mut e = engine(&path, 2);
    let before = trace(&mut e, &prompt, None);
    let (m, fitted) = e.iso_model().calibrate(&mut e, 8, 40, 2).unwrap();
    if fitted {
        assert!(m.linear > 0.0 && m.attn >= 0.0 && m.fixed >= 0.0, "{m:?}");
        assert!(m.comm_token >= 0.0 && m.comm_fixed >= 0.0, "{m:?}");
    }
    // the host all-reduces of TP 2 were counted and timed during the last prefill
    let s = e.comm_stats().unwrap()[0];
    assert!(s.all_reduces > 0 && s.nanos > 0 && s.untimed == 0, "{s:?}");
    assert!(
        trace(&mut e, &prompt, None) == before,
        "calibration changed the engine"
    );
}

/// Calibration lengths of 0 tokens are an `InvalidArgument` naming them, refused before any
/// prefill (a 0-token prefill panicked on `len - 1` in a debug build; in a release build it
/// asked for logits rows from usize::MAX, which failed the engine).
#[test]
fn calibration_refuses_zero_token_prefills() {
    let dir = tmpdir("iso-calibrate-zero");
    let path = dir.join("m.gguf");
    write_gguf(&path, &Tiny::small(), 5, GgmlType::F32, "llama");
    let mut e = engine(&path, 2);
    for (short, long) in [(0, 40), (8, 0)] {
        match e.iso_model().calibrate(&mut e, short, long, 1) {
            Err(syncdrop::Error::InvalidArgument(m)) => {
                assert!(m.contains(&format!("short {short}, long {long}")), "{m}")
            }
            other => panic!("short {short} long {long}: {other:?}"),
        }
    }
    // refused before any prefill: the engine is still usable
    e.forward(&[1, 2, 3], 0, 0..3).unwrap();
    std::fs::remove_dir_all(dir).ok();
}
