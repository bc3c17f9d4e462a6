//! Random-weight models of real shapes (LLaMA2-7B/13B/70B), for benchmarks: the speed of a
//! layer depends on its shapes, not on its values. A synthetic model is a weight source like
//! a GGUF file: every row is generated on demand from (seed, tensor name, row), so loading
//! one rank's shard of LLaMA2-70B never materialises the other ranks' weights, and two loads
//! give the same bits.
//!
//! Spec syntax: `llama2-7b`, `llama2-13b`, `llama2-70b`, optionally with overrides
//! `llama2-70b:layers=2,seed=7` (fewer layers make a quick test of the same block shapes).

#![warn(missing_docs)]

use crate::config::{LlamaConfig, RopeStyle};
use crate::error::{Error, Result};
use std::path::PathBuf;

/// A random-weight model parsed from a spec: its config and the seed its rows derive from.
pub struct SyntheticModel {
    /// The spec it was parsed from, e.g. `llama2-70b:layers=2`.
    pub spec: String,
    /// The preset's config (LLaMA2: half-split RoPE, theta 10000, context 4096), with any
    /// `layers` override applied.
    pub cfg: LlamaConfig,
    /// The `seed` override (0 by default); part of every element's hash.
    pub seed: u64,
    /// A pseudo path naming the model in logs (`synthetic:llama2-70b`).
    pub path: PathBuf,
}

/// The presets: (name, hidden, layers, heads, kv heads, ffn, vocab).
pub const PRESETS: &[(&str, usize, usize, usize, usize, usize, usize)] = &[
    ("llama2-7b", 4096, 32, 32, 32, 11008, 32000),
    ("llama2-13b", 5120, 40, 40, 40, 13824, 32000),
    ("llama2-70b", 8192, 80, 64, 8, 28672, 32000),
];

impl SyntheticModel {
    /// Parse `name[:key=value,...]` (keys `layers` > 0 and `seed`). `InvalidArgument` for an
    /// unknown preset or a malformed or unknown override.
    pub fn parse(spec: &str) -> Result<SyntheticModel> {
        let (name, over) = spec.split_once(':').unwrap_or((spec, ""));
        let &(_, hidden, layers, heads, kv, ffn, vocab) =
            PRESETS.iter().find(|p| p.0 == name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown synthetic model '{name}' (one of: {})",
                    PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
                ))
            })?;
        let mut cfg = LlamaConfig {
            arch: "llama".into(),
            hidden,
            n_layers: layers,
            n_heads: heads,
            n_kv_heads: kv,
            head_dim: hidden / heads,
            ffn,
            vocab,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            rope_style: RopeStyle::Half,
            tied_embeddings: false,
            qkv_bias: false,
            context_length: 4096,
            sliding_window: None,
        };
        let mut seed = 0u64;
        for kv in over.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!("synthetic override '{kv}' is not key=value"))
            })?;
            let v: u64 = v.parse().map_err(|_| {
                Error::InvalidArgument(format!("synthetic override {k}: '{v}' is not a number"))
            })?;
            match k {
                "layers" if v > 0 => cfg.n_layers = v as usize,
                "seed" => seed = v,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "synthetic override '{kv}': known keys are layers (> 0) and seed"
                    )))
                }
            }
        }
        cfg.validate()?;
        Ok(SyntheticModel {
            spec: spec.to_string(),
            cfg,
            seed,
            path: PathBuf::from(format!("synthetic:{spec}")),
        })
    }

    /// (rows, row length) of a tensor, named the GGUF way.
    pub fn shape(&self, name: &str) -> Result<(usize, usize)> {
        let c = &self.cfg;
        let (d, q, kv) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let missing = || Error::MissingTensor(name.to_string());
        let shape = match name {
            "token_embd.weight" | "output.weight" => (c.vocab, d),
            "output_norm.weight" => (1, d),
            _ => {
                let rest = name.strip_prefix("blk.").ok_or_else(missing)?;
                let (l, t) = rest.split_once('.').ok_or_else(missing)?;
                match l.parse::<usize>() {
                    Ok(l) if l < c.n_layers => {}
                    _ => return Err(missing()),
                }
                match t {
                    "attn_norm.weight" | "ffn_norm.weight" => (1, d),
                    "attn_q.weight" => (q, d),
                    "attn_k.weight" | "attn_v.weight" => (kv, d),
                    "attn_output.weight" => (d, q),
                    "ffn_gate.weight" | "ffn_up.weight" => (c.ffn, d),
                    "ffn_down.weight" => (d, c.ffn),
                    _ => return Err(missing()),
                }
            }
        };
        Ok(shape)
    }

    /// Whether the model has tensor `name` (GGUF naming; no biases, untied `output.weight`).
    pub fn has(&self, name: &str) -> bool {
        self.shape(name).is_ok()
    }

    /// Row `r` of tensor `name`: norms are 1; matrices uniform in +-sqrt(3 / cols) (unit
    /// variance outputs for unit-variance inputs, so activations stay bounded over depth).
    pub fn read_row(&self, name: &str, r: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = self.shape(name)?;
        if r >= rows || out.len() != cols {
            return Err(Error::ShapeMismatch {
                tensor: name.into(),
                expected: vec![r + 1, out.len()],
                found: vec![rows, cols],
            });
        }
        let g = self.generator(name, cols);
        out.iter_mut()
            .enumerate()
            .for_each(|(c, v)| *v = g.at(r, c));
        Ok(())
    }

    /// Rows `rows`, columns `cols` (any order) of tensor `name`, generated in parallel: each
    /// element is a hash of its coordinates, so a rank's shard costs only its own elements.
    pub fn gather(&self, name: &str, rows: &[usize], cols: &[usize]) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let (nr, nc) = self.shape(name)?;
        if rows.iter().any(|r| *r >= nr) || cols.iter().any(|c| *c >= nc) {
            return Err(Error::ShapeMismatch {
                tensor: name.into(),
                expected: vec![rows.iter().max().map_or(0, |r| r + 1), cols.len()],
                found: vec![nr, nc],
            });
        }
        let g = self.generator(name, nc);
        let mut out = vec![0f32; rows.len() * cols.len()];
        if !cols.is_empty() {
            out.par_chunks_mut(cols.len())
                .zip(rows.par_iter())
                .for_each(|(o, r)| {
                    o.iter_mut().zip(cols).for_each(|(v, c)| *v = g.at(*r, *c));
                });
        }
        Ok(out)
    }

    fn generator(&self, name: &str, cols: usize) -> Gen {
        Gen {
            key: fnv1a(name) ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            cols: cols as u64,
            norm: name.ends_with("norm.weight"),
            scale: (3.0 / cols as f32).sqrt(),
        }
    }
}

/// Element generator of one tensor: splitmix64 of (tensor key, flat index).
struct Gen {
    key: u64,
    cols: u64,
    norm: bool,
    scale: f32,
}

impl Gen {
    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        if self.norm {
            return 1.0;
        }
        let mut z = self
            .key
            .wrapping_add((r as u64 * self.cols + c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * self.scale
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
