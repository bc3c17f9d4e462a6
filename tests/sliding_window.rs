//! Sliding-window attention (Mistral, Qwen2 with use_sliding_window) is read from the model
//! files, and an engine whose KV cache could hold more tokens than the window is refused:
//! the engine attends over the whole cache, which equals the window only up to its length.

mod common;
use common::*;
use std::sync::Arc;
use syncdrop::{Engine, EngineOptions, ModelFiles};

/// The tiny model as a HF folder whose config.json gets `extra` merged in.
fn hf_with(tag: &str, extra: serde_json::Value) -> Arc<ModelFiles> {
    let dir = tmpdir(tag);
    write_hf_folder(&dir, &Tiny::small(), 3);
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(&path, cfg.to_string()).unwrap();
    Arc::new(ModelFiles::open(&dir).unwrap())
}

fn engine(files: &Arc<ModelFiles>, capacity: usize) -> syncdrop::Result<Engine> {
    let opts = EngineOptions {
        tp: 2,
        capacity,
        ..EngineOptions::default()
    };
    Engine::new(files.clone(), &opts)
}

#[test]
fn a_cache_longer_than_the_window_is_refused_and_one_within_it_runs() {
    let files = hf_with(
        "swa-mistral",
        serde_json::json!({"model_type": "mistral", "sliding_window": 16}),
    );
    assert_eq!(files.config().unwrap().sliding_window, Some(16));
    let err = engine(&files, 17).err().expect("capacity 17 > window 16");
    let msg = err.to_string();
    assert!(msg.contains("sliding window of 16 tokens"), "{msg}");
    assert!(msg.contains("--ctx 16"), "{msg}");
    let mut e = engine(&files, 16).expect("capacity 16 = window");
    let logits = e.forward(&[1, 2, 3], 0, 2..3).unwrap();
    assert!(logits.data.iter().all(|v| v.is_finite()));
}

#[test]
fn windows_the_model_does_not_use_are_ignored() {
    for (tag, extra) in [
        // Qwen2 writes a window it only uses with use_sliding_window
        (
            "swa-qwen-off",
            serde_json::json!({"sliding_window": 16, "use_sliding_window": false}),
        ),
        // Mistral v0.2+ writes null
        ("swa-null", serde_json::json!({"sliding_window": null})),
        ("swa-none", serde_json::json!({})),
    ] {
        let files = hf_with(tag, extra);
        assert_eq!(files.config().unwrap().sliding_window, None, "{tag}");
        engine(&files, 64).unwrap_or_else(|e| panic!("{tag}: {e}"));
    }
    let on = hf_with(
        "swa-qwen-on",
        serde_json::json!({"sliding_window": 16, "use_sliding_window": true}),
    );
    assert_eq!(on.config().unwrap().sliding_window, Some(16));
    assert!(engine(&on, 64).is_err());
}

#[test]
fn a_gguf_window_is_read() {
    let dir = tmpdir("swa-gguf");
    let path = dir.join("m.gguf");
    let t = Tiny::small();
    let mut w = syncdrop::gguf::GgufWriter::new();
    gguf_metadata(&mut w, &t, "llama");
    w.meta(
        "llama.attention.sliding_window",
        syncdrop::gguf::Value::U32(8),
    );
    add_tensors(&mut w, &t, 4, syncdrop::quant::GgmlType::F32, true);
    w.write(&path).unwrap();
    let files = Arc::new(ModelFiles::open(&path).unwrap());
    assert_eq!(files.config().unwrap().sliding_window, Some(8));
    assert!(engine(&files, 9).is_err());
    engine(&files, 8).unwrap();
}
