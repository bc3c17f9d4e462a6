//! Bad input never panics: truncated or corrupt GGUF files, unsupported quantisation types,
//! metadata that disagrees with tensor shapes, malformed safetensors folders. Each returns a
//! typed error that names the problem.

mod common;

use common::*;
use proptest::prelude::*;
use std::sync::Arc;
use syncdrop::gguf::{GgufFile, GgufWriter, Value};
use syncdrop::quant::{try_quantize_row, GgmlType};
use syncdrop::{Engine, EngineOptions, Error, ModelFiles};

fn tiny_bytes() -> Vec<u8> {
    let dir = tmpdir("tinybytes");
    write_gguf(
        &dir.join("m.gguf"),
        &Tiny::small(),
        9,
        GgmlType::Q8_0,
        "llama",
    );
    let b = std::fs::read(dir.join("m.gguf")).unwrap();
    std::fs::remove_dir_all(dir).ok();
    b
}

/// Open bytes as a model and load it at TP 2; the outcome as a Result.
fn load(bytes: &[u8], tag: &str) -> syncdrop::Result<()> {
    let dir = tmpdir(tag);
    let p = dir.join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    let r = ModelFiles::open(&p).and_then(|f| {
        let opts = EngineOptions {
            tp: 2,
            threads: 2,
            capacity: 16,
            ..Default::default()
        };
        Engine::new(Arc::new(f), &opts).map(|_| ())
    });
    std::fs::remove_dir_all(dir).ok();
    r
}

#[test]
fn the_untouched_file_loads() {
    load(&tiny_bytes(), "ok").unwrap();
}

#[test]
fn truncated_files_are_format_errors() {
    let b = tiny_bytes();
    for cut in [0, 3, 4, 8, 23, 24, 40, 200, b.len() / 2, b.len() - 1] {
        match load(&b[..cut], "trunc") {
            Err(Error::GgufFormat { what, .. }) => {
                assert!(
                    what.contains("truncated")
                        || what.contains("magic")
                        || what.contains("exceeds"),
                    "cut {cut}: {what}"
                )
            }
            other => panic!("cut at {cut}: expected GgufFormat, got {other:?}"),
        }
    }
}

#[test]
fn bad_magic_and_version() {
    let mut b = tiny_bytes();
    b[0] = b'X';
    assert!(
        matches!(load(&b, "magic"), Err(Error::GgufFormat { what, .. }) if what.contains("magic"))
    );
    let mut b = tiny_bytes();
    b[4] = 9;
    assert!(
        matches!(load(&b, "ver"), Err(Error::GgufFormat { what, .. }) if what.contains("version"))
    );
}

#[test]
fn unsupported_quant_type_names_the_tensor_and_type() {
    let mut w = GgufWriter::new();
    gguf_metadata(&mut w, &Tiny::small(), "llama");
    // type 13 = Q5_K: 176 bytes per 256 elements
    w.tensor_raw("token_embd.weight", &[256, 1], 13, vec![0u8; 176]);
    let dir = tmpdir("quant");
    w.write(dir.join("m.gguf")).unwrap();
    match GgufFile::open(dir.join("m.gguf")) {
        Err(Error::UnsupportedQuant {
            tensor,
            ggml_type: 13,
            name: "Q5_K",
        }) => assert_eq!(tensor, "token_embd.weight"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Position in `b` of tensor `name`'s data offset in the tensor table: after its name (u64
/// length, bytes), u32 dimension count, u64 dimensions and u32 type.
fn offset_field(b: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend(name.as_bytes());
    let p = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let nd = u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize;
    p + 4 + 8 * nd + 4
}

#[test]
fn tensor_offsets_that_overflow_are_format_errors() {
    let b = tiny_bytes();
    let name = "token_embd.weight";
    let p = offset_field(&b, name);
    let dir = tmpdir("offsets");
    std::fs::write(dir.join("m.gguf"), &b).unwrap();
    let t = GgufFile::open(dir.join("m.gguf")).unwrap().tensors[name].clone();
    std::fs::remove_dir_all(dir).ok();
    let off = u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
    let data_start = t.offset as u64 - off;
    // Both aligned to 32: the first wraps `data start + offset` back into the header, the
    // second puts the data's end just past 2^64, where it wraps to a small number.
    for huge in [u64::MAX - 31, u64::MAX - 31 - data_start] {
        let mut c = b.clone();
        c[p..p + 8].copy_from_slice(&huge.to_le_bytes());
        match load(&c, "offset") {
            Err(Error::GgufFormat { what, .. }) => {
                assert!(what.contains(name) && what.contains("overflows"), "{what}")
            }
            other => panic!("offset {huge}: expected GgufFormat, got {other:?}"),
        }
    }
}

#[test]
fn tensor_byte_sizes_that_overflow_are_format_errors() {
    // 2^62 f32 or 2^63 bf16 elements: the element count fits in 64 bits, the byte count does
    // not (it would wrap to 0 and pass the end-of-file check).
    for (ty, n) in [(GgmlType::F32, 1usize << 62), (GgmlType::BF16, 1 << 63)] {
        let mut w = GgufWriter::new();
        w.tensor("huge", &[n], ty, vec![]);
        let dir = tmpdir("bytesize");
        w.write(dir.join("m.gguf")).unwrap();
        match GgufFile::open(dir.join("m.gguf")) {
            Err(Error::GgufFormat { what, .. }) => {
                assert!(
                    what.contains("'huge'") && what.contains("overflows"),
                    "{what}"
                )
            }
            other => panic!("{ty:?}: expected GgufFormat, got {:?}", other.map(|_| ())),
        }
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn quantising_a_partial_block_or_an_unsupported_type_is_an_error() {
    let x = vec![0.5f32; 33];
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        match try_quantize_row(ty, &x) {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("33") && m.contains("32-element block"), "{m}")
            }
            other => panic!("{ty:?}: expected InvalidArgument, got {other:?}"),
        }
        assert_eq!(
            try_quantize_row(ty, &x[..32]).unwrap().len(),
            ty.block_bytes()
        );
    }
    for ty in [GgmlType::Q4_0, GgmlType::Q4K, GgmlType::Q6K] {
        match try_quantize_row(ty, &[0.0; 256]) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("not supported"), "{m}"),
            other => panic!("{ty:?}: expected InvalidArgument, got {other:?}"),
        }
    }
}

#[test]
fn writing_an_array_of_mixed_types_is_an_error() {
    let mut w = GgufWriter::new();
    w.meta(
        "tokenizer.ggml.tokens",
        Value::Array(vec![Value::String("a".into()), Value::U32(1)]),
    );
    match w.to_bytes() {
        Err(Error::InvalidArgument(m)) => assert!(
            m.contains("tokenizer.ggml.tokens") && m.contains("U32") && m.contains("String"),
            "{m}"
        ),
        other => panic!("expected InvalidArgument, got {:?}", other.map(|b| b.len())),
    }
    let dir = tmpdir("mixed");
    assert!(w.write(dir.join("m.gguf")).is_err());
    std::fs::remove_dir_all(dir).ok();
}

fn with_meta_override(key: &str, v: Value) -> syncdrop::Result<()> {
    let t = Tiny::small();
    let mut w = GgufWriter::new();
    let mut tmp = GgufWriter::new();
    gguf_metadata(&mut tmp, &t, "llama");
    // rewrite: same metadata, with `key` replaced
    let bytes = tmp.to_bytes().unwrap();
    let dir = tmpdir("metaread");
    std::fs::write(dir.join("meta.gguf"), &bytes).unwrap();
    let g = GgufFile::open(dir.join("meta.gguf")).unwrap();
    for (k, val) in &g.metadata {
        w.meta(k, if k == key { v.clone() } else { val.clone() });
    }
    add_tensors(&mut w, &t, 2, GgmlType::F32, false);
    let out = load(&w.to_bytes().unwrap(), "meta");
    std::fs::remove_dir_all(dir).ok();
    out
}

#[test]
fn metadata_that_disagrees_with_shapes_is_a_shape_error() {
    assert!(with_meta_override("llama.attention.head_count", Value::U32(4)).is_ok());
    for (key, v, tensor) in [
        (
            "llama.embedding_length",
            Value::U32(40),
            "token_embd.weight",
        ),
        ("llama.attention.head_count", Value::U32(2), "attn_q"),
        ("llama.feed_forward_length", Value::U32(47), "ffn_gate"),
        ("llama.attention.head_count_kv", Value::U32(1), "attn_k"),
    ] {
        match with_meta_override(key, v) {
            Err(Error::ShapeMismatch { tensor: t, .. }) => {
                assert!(t.contains(tensor), "{key}: {t}")
            }
            other => panic!("{key}: expected ShapeMismatch, got {other:?}"),
        }
    }
    match with_meta_override("llama.block_count", Value::U32(3)) {
        Err(Error::MissingTensor(t)) => assert!(t.starts_with("blk.2."), "{t}"),
        other => panic!("block_count: {other:?}"),
    }
    match with_meta_override("llama.attention.head_count", Value::U32(3)) {
        Err(Error::Config(m)) => assert!(m.contains("multiple"), "{m}"),
        other => panic!("3 heads over 2 KV heads: {other:?}"),
    }
}

#[test]
fn malformed_safetensors_folders() {
    let dir = tmpdir("st");
    let hf = dir.join("hf");
    write_hf_folder(&hf, &Tiny::small(), 1);
    assert!(ModelFiles::open(&hf).is_ok());
    std::fs::write(
        hf.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    )
    .unwrap();
    assert!(matches!(
        ModelFiles::open(&hf),
        Err(Error::Safetensors { .. })
    ));
    std::fs::write(hf.join("config.json"), b"{\"hidden_size\": 8}").unwrap();
    assert!(
        matches!(ModelFiles::open(&hf), Err(Error::Config(m)) if m.contains("num_attention_heads"))
    );
    assert!(matches!(
        ModelFiles::open(dir.join("nope.gguf")),
        Err(Error::MissingAsset { .. })
    ));
    std::fs::remove_dir_all(dir).ok();
}

/// A tensor name in two safetensors files of one folder is an error naming the tensor and
/// both files (the later file silently replaced the earlier one's tensor).
#[test]
fn a_tensor_in_two_safetensors_files_is_an_error() {
    let dir = tmpdir("st-dup");
    let t = Tiny::small();
    write_hf_folder(&dir, &t, 1);
    let name = syncdrop::weights::hf_name("output_norm.weight");
    let bytes: Vec<u8> = (0..t.hidden).flat_map(|_| 1f32.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![t.hidden], &bytes)
            .unwrap();
    let second = dir.join("model-2.safetensors");
    safetensors::serialize_to_file([(name.clone(), view)], None, &second).unwrap();
    match ModelFiles::open(&dir) {
        Err(e @ Error::Safetensors { .. }) => {
            let msg = e.to_string();
            for part in [name.as_str(), "model.safetensors", "model-2.safetensors"] {
                assert!(msg.contains(part), "{part} missing from: {msg}");
            }
        }
        other => panic!("a duplicate tensor: {:?}", other.map(|_| ())),
    }
    std::fs::remove_dir_all(dir).ok();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random byte corruption anywhere: loading returns Ok or a typed error, never panics.
    #[test]
    fn random_corruption_never_panics(pos in any::<prop::sample::Index>(), byte in any::<u8>(),
                                      cut in any::<prop::sample::Index>(), do_cut in any::<bool>()) {
        let mut b = tiny_bytes();
        let p = pos.index(b.len());
        b[p] = byte;
        if do_cut {
            let c = cut.index(b.len());
            b.truncate(c);
        }
        let r = std::panic::catch_unwind(|| load(&b, "fuzz"));
        prop_assert!(r.is_ok(), "panicked with byte {} at {}", byte, p);
    }
}
