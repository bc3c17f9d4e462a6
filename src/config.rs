//! Model configuration: read from GGUF metadata or a Hugging Face `config.json`.

#![warn(missing_docs)]

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use std::path::Path;

/// How RoPE pairs dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeStyle {
    /// Rotate pairs (2i, 2i+1): llama.cpp's LLaMA GGUF files (the converter permutes Q/K rows).
    Interleaved,
    /// Rotate pairs (i, i + d/2): Hugging Face layout, and llama.cpp's NeoX-style archs (Qwen2).
    Half,
}

/// The shapes and constants of a LLaMA-family model (LLaMA, Mistral, Qwen2). Both readers
/// return only configs that pass [`LlamaConfig::validate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    /// Architecture: `llama`, `mistral` or `qwen2` (GGUF `general.architecture`, or
    /// `model_type`).
    pub arch: String,
    /// Hidden size d: the width of the residual stream.
    pub hidden: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (fewer than `n_heads` with GQA; they divide `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head (given by the file, else `hidden / n_heads`).
    pub head_dim: usize,
    /// FFN width: columns of gate and up, rows of down.
    pub ffn: usize,
    /// Vocabulary size: rows of the token embedding.
    pub vocab: usize,
    /// RoPE base frequency (10000 when the file gives none).
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// How RoPE pairs a head's dimensions.
    pub rope_style: RopeStyle,
    /// LM head shares the token embedding.
    pub tied_embeddings: bool,
    /// Q/K/V projections carry biases (Qwen2).
    pub qkv_bias: bool,
    /// The context length the model was trained for, in tokens (2048 when the file gives
    /// none). Informational: the KV cache is sized by `EngineOptions::capacity`.
    pub context_length: usize,
    /// Sliding-window attention: each query sees only the last `w` keys (Mistral's
    /// `sliding_window`, Qwen2's when `use_sliding_window` is true, GGUF's
    /// `{arch}.attention.sliding_window`). The engine attends over the whole cache, which is
    /// the same thing while the cache holds at most `w` tokens, so `Engine::new` refuses a
    /// larger capacity instead of computing something else.
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// Check what the rest of the crate relies on: no zero hidden size, layer or head count,
    /// query heads a multiple of KV heads, a positive even `head_dim` (RoPE pairs), positive
    /// `ffn` and `vocab`. `Error::Config` names the first that fails.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.hidden == 0 || self.n_layers == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return bad(format!("zero-sized dimension in {self:?}"));
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 {
            return bad(format!(
                "head_dim is 0 (a file that gives none gets hidden / heads = {} / {})",
                self.hidden, self.n_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.ffn == 0 || self.vocab == 0 {
            return bad("ffn and vocab must be positive".into());
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Read the config from GGUF metadata (`{arch}.*` keys), cross-checked with the
    /// embedding tensor's shape.
    pub fn from_gguf(g: &GgufFile) -> Result<LlamaConfig> {
        let arch = g.meta_str("general.architecture")?.to_string();
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Half,
            other => {
                return Err(Error::Config(format!(
                    "architecture '{other}' is not supported (llama, mistral, qwen2)"
                )))
            }
        };
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = g.meta_u64(&k("embedding_length"))? as usize;
        let n_heads = g.meta_u64(&k("attention.head_count"))? as usize;
        let n_kv_heads = g
            .meta_u64(&k("attention.head_count_kv"))
            .unwrap_or(n_heads as u64) as usize;
        let head_dim = match g.meta_u64(&k("attention.key_length")) {
            Ok(v) => v as usize,
            Err(_) if n_heads > 0 => hidden / n_heads,
            Err(e) => return Err(e),
        };
        check_gguf_rope(g, &arch, head_dim)?;
        check_gguf_biases(g)?;
        let emb = g.tensor("token_embd.weight")?;
        let (vocab, emb_dim) = emb.matrix_shape();
        if emb_dim != hidden {
            return Err(Error::ShapeMismatch {
                tensor: "token_embd.weight".into(),
                expected: vec![vocab, hidden],
                found: emb.shape(),
            });
        }
        let cfg = LlamaConfig {
            hidden,
            n_layers: g.meta_u64(&k("block_count"))? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn: g.meta_u64(&k("feed_forward_length"))? as usize,
            vocab,
            rope_theta: g.meta_f64(&k("rope.freq_base")).unwrap_or(10000.0) as f32,
            rms_eps: g.meta_f64(&k("attention.layer_norm_rms_epsilon"))? as f32,
            rope_style,
            tied_embeddings: !g.tensors.contains_key("output.weight"),
            qkv_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            context_length: g.meta_u64(&k("context_length")).unwrap_or(2048) as usize,
            sliding_window: g
                .meta_u64(&k("attention.sliding_window"))
                .ok()
                .filter(|&w| w > 0)
                .map(|w| w as usize),
            arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a Hugging Face `config.json` (model_type llama, mistral or qwen2).
    pub fn from_hf_json(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let j: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let num = |key: &str| -> Result<u64> {
            j.get(key).and_then(|v| v.as_u64()).ok_or_else(|| {
                Error::Config(format!("{}: missing integer '{key}'", path.display()))
            })
        };
        let arch = j
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama")
            .to_string();
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(Error::Config(format!(
                "model_type '{arch}' is not supported"
            )));
        }
        let hidden = num("hidden_size")? as usize;
        let n_heads = num("num_attention_heads")? as usize;
        check_hf_unsupported(&j, path)?;
        // transformers >= 4.56 may write RoPE's base inside `rope_parameters` instead
        let rope_theta = j
            .get("rope_theta")
            .or_else(|| j.get("rope_parameters").and_then(|r| r.get("rope_theta")))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0) as f32;
        let cfg = LlamaConfig {
            hidden,
            n_layers: num("num_hidden_layers")? as usize,
            n_heads,
            n_kv_heads: num("num_key_value_heads").unwrap_or(n_heads as u64) as usize,
            head_dim: num("head_dim")
                .map(|v| v as usize)
                .unwrap_or(hidden / n_heads.max(1)),
            ffn: num("intermediate_size")? as usize,
            vocab: num("vocab_size")? as usize,
            rope_theta,
            rms_eps: j
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6) as f32,
            rope_style: RopeStyle::Half,
            tied_embeddings: j
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            qkv_bias: arch == "qwen2"
                || j.get("attention_bias")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            context_length: num("max_position_embeddings").unwrap_or(2048) as usize,
            // Qwen2 writes a window it does not use unless use_sliding_window is true
            sliding_window: num("sliding_window")
                .ok()
                .filter(|&w| w > 0)
                .filter(|_| {
                    j.get("use_sliding_window")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(true)
                })
                .map(|w| w as usize),
            arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// RoPE variants the engine does not implement (scaled or partial rotary embeddings): a
/// `Config` error rather than a model whose positions are silently encoded differently.
fn check_gguf_rope(g: &GgufFile, arch: &str, head_dim: usize) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("{}: {m}", g.path.display())));
    if let Some(t) = g
        .meta(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.as_str())
    {
        let factor = g
            .meta_f64(&format!("{arch}.rope.scaling.factor"))
            .unwrap_or(1.0);
        if t != "none" && factor != 1.0 {
            return bad(format!(
                "RoPE scaling '{t}' (factor {factor}) is not supported"
            ));
        }
    }
    if let Ok(f) = g.meta_f64(&format!("{arch}.rope.scale_linear")) {
        if f != 1.0 {
            return bad(format!("linear RoPE scaling {f} is not supported"));
        }
    }
    if g.tensors.contains_key("rope_freqs.weight") {
        return bad(
            "RoPE frequency factors (rope_freqs.weight, Llama 3.1-style scaling) are not supported"
                .into(),
        );
    }
    if let Ok(n) = g.meta_u64(&format!("{arch}.rope.dimension_count")) {
        if n as usize != head_dim {
            return bad(format!(
                "RoPE over {n} of {head_dim} head dimensions (partial rotary) is not supported"
            ));
        }
    }
    Ok(())
}

/// Biases the engine would not load (attention output, MLP; K/V without Q): refused, since
/// dropping them silently gives a different model.
fn check_gguf_biases(g: &GgufFile) -> Result<()> {
    let has_q = g.tensors.contains_key("blk.0.attn_q.bias");
    for name in g.tensors.keys() {
        let Some(part) = name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(_, t)| t.strip_suffix(".bias"))
        else {
            continue;
        };
        let loaded = has_q && matches!(part, "attn_q" | "attn_k" | "attn_v");
        if !loaded {
            return Err(Error::Config(format!(
                "{}: tensor '{name}' is not supported (only Q/K/V biases are)",
                g.path.display()
            )));
        }
    }
    Ok(())
}

/// config.json settings that change the model in ways the engine does not implement.
fn check_hf_unsupported(j: &serde_json::Value, path: &Path) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("{}: {m}", path.display())));
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(r) = j.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let ty = r
            .get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        if ty != "default" {
            return bad(format!("{key} of type '{ty}' is not supported: {r}"));
        }
    }
    let partial = j.get("partial_rotary_factor").or_else(|| {
        j.get("rope_parameters")
            .and_then(|r| r.get("partial_rotary_factor"))
    });
    if let Some(f) = partial.and_then(|v| v.as_f64()) {
        if f != 1.0 {
            return bad(format!("partial_rotary_factor {f} is not supported"));
        }
    }
    if let Some(act) = j.get("hidden_act").and_then(|v| v.as_str()) {
        if act != "silu" {
            return bad(format!("hidden_act '{act}' is not supported (silu only)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config.json without `head_dim` and fewer hidden units than heads would give heads
    /// of width 0: refused, naming head_dim.
    #[test]
    fn zero_head_dim_is_refused() {
        let dir = std::env::temp_dir().join(format!("syncdrop-config-hd0-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            r#"{"model_type": "llama", "hidden_size": 2, "num_attention_heads": 4,
                "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 16}"#,
        )
        .unwrap();
        let e = LlamaConfig::from_hf_json(&path).unwrap_err();
        std::fs::remove_dir_all(&dir).ok();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
        assert!(e.to_string().contains("head_dim is 0"), "{e}");
    }
}
