//! Shared test helpers: tiny random LLaMA models written as real GGUF files and as Hugging
//! Face safetensors folders, so loading, sharding and RoPE layouts are exercised end to end.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use syncdrop::gguf::{GgufFile, GgufWriter, Value};
use syncdrop::quant::{quantize_row, GgmlType};

#[derive(Debug, Clone)]
pub struct Tiny {
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub qkv_bias: bool,
    pub tied: bool,
}

impl Tiny {
    pub fn small() -> Tiny {
        Tiny {
            hidden: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            ffn: 64,
            vocab: 64,
            qkv_bias: false,
            tied: true,
        }
    }
}

/// Deterministic pseudo-random floats in [-scale, scale).
pub struct Lcg(u64);
impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }
    pub fn next(&mut self, scale: f32) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next(scale)).collect()
    }
}

/// All tensors of a tiny model in Hugging Face layout: name (GGUF naming) -> (rows, cols, data).
pub fn tiny_weights(t: &Tiny, seed: u64) -> Vec<(String, usize, usize, Vec<f32>)> {
    let mut r = Lcg::new(seed);
    let (d, hd) = (t.hidden, t.head_dim);
    let s = 1.0 / (d as f32).sqrt();
    let mut w = vec![
        (
            "token_embd.weight".to_string(),
            t.vocab,
            d,
            r.vec(t.vocab * d, 1.0),
        ),
        (
            "output_norm.weight".to_string(),
            1,
            d,
            (0..d).map(|_| 1.0 + r.next(0.2)).collect(),
        ),
    ];
    if !t.tied {
        w.push(("output.weight".into(), t.vocab, d, r.vec(t.vocab * d, s)));
    }
    for l in 0..t.n_layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        w.push((
            n("attn_norm.weight"),
            1,
            d,
            (0..d).map(|_| 1.0 + r.next(0.2)).collect(),
        ));
        w.push((
            n("ffn_norm.weight"),
            1,
            d,
            (0..d).map(|_| 1.0 + r.next(0.2)).collect(),
        ));
        w.push((
            n("attn_q.weight"),
            t.n_heads * hd,
            d,
            r.vec(t.n_heads * hd * d, s),
        ));
        w.push((
            n("attn_k.weight"),
            t.n_kv_heads * hd,
            d,
            r.vec(t.n_kv_heads * hd * d, s),
        ));
        w.push((
            n("attn_v.weight"),
            t.n_kv_heads * hd,
            d,
            r.vec(t.n_kv_heads * hd * d, s),
        ));
        w.push((
            n("attn_output.weight"),
            d,
            t.n_heads * hd,
            r.vec(d * t.n_heads * hd, s),
        ));
        w.push((n("ffn_gate.weight"), t.ffn, d, r.vec(t.ffn * d, s)));
        w.push((n("ffn_up.weight"), t.ffn, d, r.vec(t.ffn * d, s)));
        w.push((
            n("ffn_down.weight"),
            d,
            t.ffn,
            r.vec(d * t.ffn, 1.0 / (t.ffn as f32).sqrt()),
        ));
        if t.qkv_bias {
            w.push((
                n("attn_q.bias"),
                1,
                t.n_heads * hd,
                r.vec(t.n_heads * hd, 0.5),
            ));
            w.push((
                n("attn_k.bias"),
                1,
                t.n_kv_heads * hd,
                r.vec(t.n_kv_heads * hd, 0.5),
            ));
            w.push((
                n("attn_v.bias"),
                1,
                t.n_kv_heads * hd,
                r.vec(t.n_kv_heads * hd, 0.5),
            ));
        }
    }
    w
}

/// llama.cpp's convert_hf_to_gguf permutation of Q/K rows: per head, GGUF row 2i is HF row i
/// and GGUF row 2i+1 is HF row i + hd/2, so interleaved RoPE on GGUF equals rotate-half on HF.
pub fn permute_rows(data: &[f32], rows: usize, cols: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for h in 0..rows / hd {
        for i in 0..hd / 2 {
            for (j, src) in [i, i + hd / 2].into_iter().enumerate() {
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[(h * hd + src) * cols..(h * hd + src + 1) * cols]);
            }
        }
    }
    out
}

pub fn gguf_metadata(w: &mut GgufWriter, t: &Tiny, arch: &str) {
    let u = |v: usize| Value::U32(v as u32);
    w.meta("general.architecture", Value::String(arch.into()))
        .meta(&format!("{arch}.embedding_length"), u(t.hidden))
        .meta(&format!("{arch}.block_count"), u(t.n_layers))
        .meta(&format!("{arch}.attention.head_count"), u(t.n_heads))
        .meta(&format!("{arch}.attention.head_count_kv"), u(t.n_kv_heads))
        .meta(&format!("{arch}.attention.key_length"), u(t.head_dim))
        .meta(&format!("{arch}.feed_forward_length"), u(t.ffn))
        .meta(&format!("{arch}.rope.freq_base"), Value::F32(10000.0))
        .meta(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        )
        .meta(&format!("{arch}.context_length"), u(256));
}

/// Add a tiny model's tensors to `w`. `ty` is the format of 2-D weights (vectors stay F32);
/// `permute_qk` applies llama.cpp's converter permutation to Q/K rows.
pub fn add_tensors(w: &mut GgufWriter, t: &Tiny, seed: u64, ty: GgmlType, permute_qk: bool) {
    for (name, rows, cols, mut data) in tiny_weights(t, seed) {
        if permute_qk && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            data = permute_rows(&data, rows, cols, t.head_dim);
        }
        let (ty, dims) = if rows == 1 {
            (GgmlType::F32, vec![cols])
        } else {
            (ty, vec![cols, rows])
        };
        w.tensor(&name, &dims, ty, quantize_row(ty, &data));
    }
}

/// Write a tiny model as GGUF. For `arch == "llama"` Q/K rows are permuted as llama.cpp's
/// converter does.
pub fn write_gguf(path: &Path, t: &Tiny, seed: u64, ty: GgmlType, arch: &str) {
    let mut w = GgufWriter::new();
    gguf_metadata(&mut w, t, arch);
    add_tensors(&mut w, t, seed, ty, arch == "llama");
    w.write(path).unwrap();
}

/// Write the same tiny model as a Hugging Face folder (config.json + model.safetensors).
pub fn write_hf_folder(dir: &Path, t: &Tiny, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({
        "model_type": if t.qkv_bias { "qwen2" } else { "llama" },
        "hidden_size": t.hidden,
        "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.n_heads,
        "num_key_value_heads": t.n_kv_heads,
        "head_dim": t.head_dim,
        "intermediate_size": t.ffn,
        "vocab_size": t.vocab,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": t.tied,
        "max_position_embeddings": 256,
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &hf_tensors(t, seed));
}

/// The tiny model's weights under Hugging Face names, as (name, shape, f32 little-endian bytes).
pub fn hf_tensors(t: &Tiny, seed: u64) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    tiny_weights(t, seed)
        .into_iter()
        .map(|(name, rows, cols, data)| {
            let shape = if rows == 1 {
                vec![cols]
            } else {
                vec![rows, cols]
            };
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (syncdrop::weights::hf_name(&name), shape, bytes)
        })
        .collect()
}

/// Write (name, shape, f32 bytes) tensors as one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: HashMap<String, safetensors::tensor::TensorView> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// An engine over a tiny f32 model of `layers` blocks (optionally with Q/K/V biases) at TP
/// `tp`, one thread, 64 tokens of KV cache; and the directory holding its GGUF (the caller
/// removes it).
pub fn tiny_engine(tp: usize, tag: &str, layers: usize, bias: bool) -> (syncdrop::Engine, PathBuf) {
    let dir = tmpdir(tag);
    let t = Tiny {
        n_layers: layers,
        qkv_bias: bias,
        ..Tiny::small()
    };
    write_gguf(&dir.join("m.gguf"), &t, 21, GgmlType::F32, "llama");
    let files = std::sync::Arc::new(syncdrop::ModelFiles::open(dir.join("m.gguf")).unwrap());
    let opts = syncdrop::EngineOptions {
        tp,
        threads: 1,
        capacity: 64,
        ..Default::default()
    };
    (syncdrop::Engine::new(files, &opts).unwrap(), dir)
}

/// A fresh temporary directory under the target dir (kept small; removed by the caller).
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "syncdrop-test-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// max |a - b|
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The runner example cargo builds beside the tests (None when it is not built).
///
/// `cargo test --all-targets` alone does not make that file (it builds examples as test
/// harnesses, named with a hash), so scripts/test.sh builds the example first and sets
/// SYNCDROP_REQUIRE_RUNNER=1: there a missing runner fails the test instead of skipping it
/// (CI once skipped every CLI test this way without saying so loudly enough to notice).
pub fn runner() -> Option<PathBuf> {
    let exe = std::env::current_exe().expect("the test's own path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples/llama"));
    match p.filter(|p| p.is_file()) {
        Some(p) => Some(p),
        None if std::env::var_os("SYNCDROP_REQUIRE_RUNNER").is_some_and(|v| v == "1") => panic!(
            "SYNCDROP_REQUIRE_RUNNER=1 and no examples/llama beside {}: build it first \
             (cargo build --release --example llama)",
            exe.display()
        ),
        None => None,
    }
}

/// Runs the runner with `args` in `dir`; returns (exit code, stderr). Every case must end
/// fast: the point is that nothing long starts.
pub fn run(llama: &Path, dir: &Path, args: &[&str]) -> (i32, String) {
    let t0 = std::time::Instant::now();
    let out = std::process::Command::new(llama)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the runner");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(60),
        "{args:?} took {:?}",
        t0.elapsed()
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A GGUF holding only a byte-level BPE tokenizer: `tokens` (ids in order), `merges`
/// ("a b"), pre-tokenizer `pre`, and `extra` metadata.
pub fn bpe_gguf(
    path: &Path,
    pre: &str,
    tokens: &[&str],
    merges: &[&str],
    extra: &[(&str, Value)],
) -> GgufFile {
    let strings =
        |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let mut w = GgufWriter::new();
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String(pre.into()))
        .meta("tokenizer.ggml.tokens", strings(tokens))
        .meta("tokenizer.ggml.merges", strings(merges));
    for (k, v) in extra {
        w.meta(k, v.clone());
    }
    w.write(path).unwrap();
    GgufFile::open(path).unwrap()
}

/// Uniform f32 in [-scale, scale) from `seed` (xorshift64; the host-simulator tests' inputs).
pub fn xorshift_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// ||a - b|| / ||b||
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// A student's four trained tensors by name (the order the distillation reports use).
pub fn student_tensors(p: &syncdrop::distill::StudentParams) -> [(&str, &Vec<f32>); 4] {
    [
        ("wo", &p.wo),
        ("ffn_norm", &p.ffn_norm),
        ("w_gate_up", &p.w_gate_up),
        ("w_down", &p.w_down),
    ]
}

/// A distillation problem of `ranks` ranks (q attention and f MLP columns each), hidden
/// size d, one sample per length in `ts`, weights scaled like a trained block's; the
/// values come from `rand(n, seed, scale)`, a fresh seed per tensor.
pub fn distill_problem(
    ranks: usize,
    (d, q, f): (usize, usize, usize),
    ts: &[usize],
    seed: u64,
    rand: impl Fn(usize, u64, f32) -> Vec<f32>,
) -> (
    Vec<syncdrop::distill::StudentParams>,
    Vec<syncdrop::distill::Sample>,
) {
    let mut k = seed.wrapping_mul(1000);
    let mut next = |n: usize, scale: f32| {
        k += 1;
        rand(n, k, scale)
    };
    let init = (0..ranks)
        .map(|_| syncdrop::distill::StudentParams {
            wo: next(d * q, 1.0 / (q as f32).sqrt()),
            ffn_norm: next(d, 0.2).iter().map(|v| 1.0 + v).collect(),
            w_gate_up: next(2 * f * d, 1.5 / (d as f32).sqrt()),
            w_down: next(d * f, 1.0 / (f as f32).sqrt()),
        })
        .collect();
    let data = ts
        .iter()
        .map(|&t| {
            let x = next(t * d, 1.0);
            // any target will do for the gradients; this one is near the output
            let target = x.iter().zip(next(t * d, 0.5)).map(|(x, e)| x + e).collect();
            syncdrop::distill::Sample {
                att: (0..ranks).map(|_| next(t * q, 1.0)).collect(),
                x,
                target,
                x_local: None,
            }
        })
        .collect();
    (init, data)
}
