//! Tensor parallelism on tiny random models written as real GGUF / safetensors files:
//! TP N equals TP 1 for random configs (uneven head splits, GQA, biases, untied heads),
//! RoPE layouts agree across file formats, and bad TP degrees are typed errors.

mod common;

use common::*;
use proptest::prelude::*;
use std::sync::Arc;
use syncdrop::quant::GgmlType;
use syncdrop::{Engine, EngineOptions, Error, ModelFiles};

fn engine(path: &std::path::Path, tp: usize) -> Engine {
    let files = Arc::new(ModelFiles::open(path).unwrap());
    let opts = EngineOptions {
        tp,
        threads: tp,
        capacity: 64,
        ..Default::default()
    };
    Engine::new(files, &opts).unwrap()
}

/// Prefill `prompt` then decode `steps` tokens (fed greedily from the TP-1 run); returns the
/// logits of every prefill row and every decode step, concatenated.
fn run(e: &mut Engine, prompt: &[u32], decode: &[u32]) -> Vec<f32> {
    let mut out = e.forward(prompt, 0, 0..prompt.len()).unwrap().data;
    for (i, t) in decode.iter().enumerate() {
        out.extend(e.forward(&[*t], prompt.len() + i, 0..1).unwrap().data);
    }
    out
}

fn assert_close(a: &[f32], b: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

prop_compose! {
    fn tiny_cfg()(n_kv in 1usize..=3, group in 1usize..=3, hd in prop::sample::select(vec![2usize, 4, 8, 16]),
                  hidden in 4usize..=40, ffn in 1usize..=50, layers in 1usize..=2,
                  bias in any::<bool>(), tied in any::<bool>()) -> Tiny {
        Tiny { hidden, n_layers: layers, n_heads: n_kv * group, n_kv_heads: n_kv, head_dim: hd,
               ffn, vocab: 37, qkv_bias: bias, tied }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn tp_n_equals_tp_1(t in tiny_cfg(), tp_pick in 0usize..100, len in 1usize..10,
                        steps in 0usize..4, seed in any::<u64>()) {
        let tp = 1 + tp_pick % t.n_heads;
        let dir = tmpdir("tpn");
        let path = dir.join("m.gguf");
        write_gguf(&path, &t, seed, GgmlType::F32, "llama");
        let mut lcg = Lcg::new(seed ^ 7);
        let prompt: Vec<u32> = (0..len).map(|_| ((lcg.next(1.0) + 1.0) * 18.0) as u32 % 37).collect();
        let decode: Vec<u32> = (0..steps).map(|_| ((lcg.next(1.0) + 1.0) * 18.0) as u32 % 37).collect();
        let reference = run(&mut engine(&path, 1), &prompt, &decode);
        let got = run(&mut engine(&path, tp), &prompt, &decode);
        assert_close(&got, &reference, 1e-4, 1e-4, &format!("TP {tp} vs TP 1 for {t:?}"));
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn hf_rotate_half_equals_gguf_interleaved() {
    // Same weights: HF folder (rotate-half RoPE) and GGUF with llama.cpp's Q/K permutation
    // (interleaved RoPE). Different layouts, same model, same logits.
    for bias in [false, true] {
        let t = Tiny {
            qkv_bias: bias,
            ..Tiny::small()
        };
        let dir = tmpdir(&format!("hf{bias}"));
        write_hf_folder(&dir.join("hf"), &t, 5);
        // Qwen2 GGUF files are not permuted and use rotate-half: write one for the bias case.
        let arch = if bias { "qwen2" } else { "llama" };
        write_gguf(&dir.join("m.gguf"), &t, 5, GgmlType::F32, arch);
        let prompt = [1u32, 5, 9, 33, 2, 7, 7, 60];
        for tp in [1, 2, 3] {
            let a = run(&mut engine(&dir.join("hf"), tp), &prompt, &[4, 8]);
            let b = run(&mut engine(&dir.join("m.gguf"), tp), &prompt, &[4, 8]);
            assert_close(
                &a,
                &b,
                1e-4,
                1e-4,
                &format!("HF vs GGUF ({arch}) at TP {tp}"),
            );
        }
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn interleaved_rope_on_unpermuted_weights_differs() {
    // Guard for the test above: with the wrong RoPE layout, logits must differ.
    let t = Tiny::small();
    let dir = tmpdir("ropeneg");
    write_hf_folder(&dir.join("hf"), &t, 5);
    // a llama GGUF *without* llama.cpp's Q/K permutation
    let mut w = syncdrop::gguf::GgufWriter::new();
    gguf_metadata(&mut w, &t, "llama");
    add_tensors(&mut w, &t, 5, GgmlType::F32, false);
    w.write(dir.join("m.gguf")).unwrap();
    let a = run(&mut engine(&dir.join("hf"), 1), &[1, 5, 9, 33], &[]);
    let b = run(&mut engine(&dir.join("m.gguf"), 1), &[1, 5, 9, 33], &[]);
    assert!(max_abs_diff(&a, &b) > 1e-3, "RoPE layout had no effect");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn invalid_tp_degrees_are_typed_errors() {
    let t = Tiny::small();
    let dir = tmpdir("badtp");
    let path = dir.join("m.gguf");
    write_gguf(&path, &t, 1, GgmlType::F32, "llama");
    let files = Arc::new(ModelFiles::open(&path).unwrap());
    for tp in [0, 5, 64] {
        let opts = EngineOptions {
            tp,
            ..Default::default()
        };
        match Engine::new(files.clone(), &opts) {
            Err(Error::InvalidTpDegree {
                tp: got,
                n_heads: 4,
            }) => assert_eq!(got, tp),
            Err(e) => panic!("TP {tp}: wrong error {e}"),
            Ok(_) => panic!("TP {tp} accepted"),
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn spd_plan_is_a_no_op_at_tp1_and_all_off_is_standard() {
    let t = Tiny::small();
    let dir = tmpdir("spd");
    let path = dir.join("m.gguf");
    write_gguf(&path, &t, 3, GgmlType::F32, "llama");
    let prompt = [3u32, 1, 4, 1, 5, 9, 2, 6];
    // TP 1: the SPD block equals the standard block (only the summation order differs).
    let base = run(&mut engine(&path, 1), &prompt, &[5]);
    let mut e = engine(&path, 1);
    e.set_spd(&[true, true]).unwrap();
    assert_close(
        &run(&mut e, &prompt, &[5]),
        &base,
        1e-5,
        1e-5,
        "SPD at TP 1",
    );
    // TP 2: an all-off plan is the standard model bit for bit; an all-on plan is not.
    let std2 = run(&mut engine(&path, 2), &prompt, &[5]);
    let mut e = engine(&path, 2);
    e.set_spd(&[false, false]).unwrap();
    assert_eq!(run(&mut e, &prompt, &[5]), std2);
    let mut e = engine(&path, 2);
    e.set_spd(&[true, true]).unwrap();
    assert!(
        max_abs_diff(&run(&mut e, &prompt, &[5]), &std2) > 1e-4,
        "SPD changed nothing at TP 2"
    );
    assert!(
        e.set_spd(&[true]).is_err(),
        "plan of the wrong length accepted"
    );
    std::fs::remove_dir_all(dir).ok();
}
