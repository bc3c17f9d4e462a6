//! Where weights come from: a GGUF file, or a Hugging Face folder (config.json +
//! *.safetensors + tokenizer.json). Both are memory-mapped and read row by row into the
//! shard a rank needs, so loading never holds two full copies of the weights.
//!
//! Tensors are named the GGUF way (`blk.3.attn_q.weight`); the safetensors source maps those
//! names onto Hugging Face's (`model.layers.3.self_attn.q_proj.weight`).

#![warn(missing_docs)]

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use half::{bf16, f16};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An opened model: its config and a row reader over its tensors.
pub enum ModelFiles {
    /// A GGUF file (any of the [`crate::quant::GgmlType`] formats).
    Gguf(GgufFile),
    /// A Hugging Face folder of F32 / F16 / BF16 safetensors.
    SafeTensors(StFolder),
    /// Random weights of a real model's shapes, for benchmarks (`crate::synthetic`).
    Synthetic(crate::synthetic::SyntheticModel),
}

impl ModelFiles {
    /// Open a `.gguf` file or a folder holding `config.json` and `*.safetensors`.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFiles> {
        let path = path.as_ref();
        if path.is_dir() {
            Ok(ModelFiles::SafeTensors(StFolder::open(path)?))
        } else if path.exists() {
            Ok(ModelFiles::Gguf(GgufFile::open(path)?))
        } else {
            Err(Error::MissingAsset {
                name: "model".into(),
                path: path.to_path_buf(),
            })
        }
    }

    /// A short name for titles and logs: the GGUF's file name without `.gguf`, the HF
    /// folder's name, or the synthetic spec.
    pub fn name(&self) -> String {
        let stem = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
                .unwrap_or_else(|| p.display().to_string())
        };
        match self {
            ModelFiles::Gguf(g) => stem(&g.path),
            // canonicalised so that `.` names the folder
            ModelFiles::SafeTensors(s) => stem(&s.dir.canonicalize().unwrap_or(s.dir.clone())),
            ModelFiles::Synthetic(m) => m.spec.clone(),
        }
    }

    /// The model's config: from the GGUF metadata, config.json, or the synthetic preset.
    pub fn config(&self) -> Result<LlamaConfig> {
        match self {
            ModelFiles::Gguf(g) => LlamaConfig::from_gguf(g),
            ModelFiles::SafeTensors(s) => Ok(s.config.clone()),
            ModelFiles::Synthetic(m) => Ok(m.cfg.clone()),
        }
    }

    /// Whether tensor `name` (GGUF naming) exists.
    pub fn has(&self, name: &str) -> bool {
        match self {
            ModelFiles::Gguf(g) => g.tensors.contains_key(name),
            ModelFiles::SafeTensors(s) => s.index.contains_key(&hf_name(name)),
            ModelFiles::Synthetic(m) => m.has(name),
        }
    }

    /// (rows, row length) of a tensor viewed as a matrix; a vector is one row.
    pub fn matrix_shape(&self, name: &str) -> Result<(usize, usize)> {
        match self {
            ModelFiles::Gguf(g) => Ok(g.tensor(name)?.matrix_shape()),
            ModelFiles::SafeTensors(s) => Ok(s.entry(name)?.matrix_shape()),
            ModelFiles::Synthetic(m) => m.shape(name),
        }
    }

    /// Dequantise one row into `out` (whose length is the row length).
    pub fn read_row(&self, name: &str, r: usize, out: &mut [f32]) -> Result<()> {
        match self {
            ModelFiles::Gguf(g) => {
                let t = g.tensor(name)?;
                check_row(name, t.matrix_shape(), r, out.len())?;
                g.dequantize_row(t, r, out);
                Ok(())
            }
            ModelFiles::SafeTensors(s) => s.read_row(name, r, out),
            ModelFiles::Synthetic(m) => m.read_row(name, r, out),
        }
    }

    /// Gather rows `rows` restricted to columns `cols` (all columns if None) into one
    /// row-major matrix of shape [rows.len(), cols.len()].
    pub fn gather(
        &self,
        name: &str,
        rows: &[usize],
        cols: Option<Range<usize>>,
    ) -> Result<Vec<f32>> {
        let (_, n) = self.matrix_shape(name)?;
        let cols = cols.unwrap_or(0..n);
        if let ModelFiles::Synthetic(m) = self {
            return m.gather(name, rows, &cols.collect::<Vec<_>>());
        }
        if cols.end > n {
            return Err(Error::ShapeMismatch {
                tensor: name.into(),
                expected: vec![rows.len(), cols.end],
                found: vec![rows.len(), n],
            });
        }
        let mut row = vec![0f32; n];
        let mut out = Vec::with_capacity(rows.len() * cols.len());
        for &r in rows {
            self.read_row(name, r, &mut row)?;
            out.extend_from_slice(&row[cols.clone()]);
        }
        Ok(out)
    }

    /// Columns `cols` (any order) of every row of a matrix tensor: (rows, cols.len()).
    pub fn gather_cols(&self, name: &str, cols: &[usize]) -> Result<Vec<f32>> {
        let (rows, n) = self.matrix_shape(name)?;
        if let ModelFiles::Synthetic(m) = self {
            return m.gather(name, &(0..rows).collect::<Vec<_>>(), cols);
        }
        let mut row = vec![0f32; n];
        let mut out = Vec::with_capacity(rows * cols.len());
        for r in 0..rows {
            self.read_row(name, r, &mut row)?;
            out.extend(cols.iter().map(|c| row[*c]));
        }
        Ok(out)
    }

    /// Check that a tensor has the shape the config implies: [rows, cols] in PyTorch order.
    pub fn expect_shape(&self, name: &str, rows: usize, cols: usize) -> Result<()> {
        let found = self.matrix_shape(name)?;
        if found != (rows, cols) {
            return Err(Error::ShapeMismatch {
                tensor: name.into(),
                expected: vec![rows, cols],
                found: vec![found.0, found.1],
            });
        }
        Ok(())
    }

    /// The file or folder opened (for a synthetic model, its pseudo path).
    pub fn path(&self) -> &Path {
        match self {
            ModelFiles::Gguf(g) => &g.path,
            ModelFiles::SafeTensors(s) => &s.dir,
            ModelFiles::Synthetic(m) => &m.path,
        }
    }
}

fn check_row(name: &str, (rows, cols): (usize, usize), r: usize, len: usize) -> Result<()> {
    if r >= rows || len != cols {
        return Err(Error::ShapeMismatch {
            tensor: name.into(),
            expected: vec![r + 1, len],
            found: vec![rows, cols],
        });
    }
    Ok(())
}

/// GGUF tensor name -> Hugging Face tensor name.
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.into();
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return gguf.into();
    };
    let (part, suffix) = tail.split_once('.').unwrap_or((tail, "weight"));
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return gguf.into(),
    };
    format!("model.layers.{layer}.{hf}.{suffix}")
}

#[derive(Debug, Clone, Copy)]
enum StDtype {
    F32,
    F16,
    BF16,
}

struct StEntry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// absolute byte range in the file
    start: usize,
}

impl StEntry {
    fn matrix_shape(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows: usize = self.shape.iter().rev().skip(1).product();
        // no `max(1)`: a zero dimension is zero rows (a vector already has one row)
        (rows, cols)
    }
}

/// A Hugging Face model folder: config.json plus one or more .safetensors files.
pub struct StFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Parsed from its config.json.
    pub config: LlamaConfig,
    maps: Vec<memmap2::Mmap>,
    index: HashMap<String, StEntry>,
}

impl StFolder {
    /// Read `config.json` and map every `*.safetensors` file in `dir`, indexing their tensors
    /// by Hugging Face name. `MissingAsset` when there is no safetensors file, `Safetensors`
    /// for a bad header, a dtype other than F32 / F16 / BF16, or a tensor name in two files.
    pub fn open(dir: &Path) -> Result<StFolder> {
        let config = LlamaConfig::from_hf_json(&dir.join("config.json"))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::MissingAsset {
                name: "*.safetensors".into(),
                path: dir.to_path_buf(),
            });
        }
        let mut maps = Vec::new();
        let mut index: HashMap<String, StEntry> = HashMap::new();
        for (fi, p) in files.iter().enumerate() {
            let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            // SAFETY: read-only mapping of a file we never write.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(p, e))?;
            let st_err = |msg: String| Error::Safetensors {
                path: p.clone(),
                msg,
            };
            let (header, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| st_err(e.to_string()))?;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    safetensors::Dtype::F32 => StDtype::F32,
                    safetensors::Dtype::F16 => StDtype::F16,
                    safetensors::Dtype::BF16 => StDtype::BF16,
                    d => {
                        return Err(st_err(format!(
                            "tensor '{name}' has unsupported dtype {d:?}"
                        )))
                    }
                };
                if let Some(first) = index.get(&name) {
                    return Err(st_err(format!(
                        "tensor '{name}' is also in {}",
                        files[first.file].display()
                    )));
                }
                index.insert(
                    name,
                    StEntry {
                        file: fi,
                        dtype,
                        shape: info.shape.clone(),
                        start: 8 + header + info.data_offsets.0,
                    },
                );
            }
            maps.push(map);
        }
        check_biases(&index, &config, dir)?;
        Ok(StFolder {
            dir: dir.to_path_buf(),
            config,
            maps,
            index,
        })
    }

    fn entry(&self, gguf_name: &str) -> Result<&StEntry> {
        let n = hf_name(gguf_name);
        self.index.get(&n).ok_or(Error::MissingTensor(n))
    }

    fn read_row(&self, name: &str, r: usize, out: &mut [f32]) -> Result<()> {
        let e = self.entry(name)?;
        check_row(name, e.matrix_shape(), r, out.len())?;
        let es = match e.dtype {
            StDtype::F32 => 4,
            _ => 2,
        };
        let start = e.start + r * out.len() * es;
        let b = &self.maps[e.file][start..start + out.len() * es];
        match e.dtype {
            StDtype::F32 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            StDtype::F16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            StDtype::BF16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        Ok(())
    }
}

/// Bias tensors the engine would not load (o_proj with `attention_bias`, `mlp_bias`, or
/// Q/K/V biases the config does not announce): a `Config` error, not a model silently
/// missing them.
fn check_biases(index: &HashMap<String, StEntry>, config: &LlamaConfig, dir: &Path) -> Result<()> {
    for name in index.keys() {
        let Some(part) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(_, t)| t.strip_suffix(".bias"))
        else {
            continue;
        };
        let loaded = config.qkv_bias
            && matches!(
                part,
                "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
            );
        if !loaded {
            return Err(Error::Config(format!(
                "{}: tensor '{name}' is not supported (only Q/K/V biases are)",
                dir.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hf_names() {
        use super::hf_name;
        assert_eq!(
            hf_name("blk.3.attn_q.weight"),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias"),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.12.ffn_down.weight"),
            "model.layers.12.mlp.down_proj.weight"
        );
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }
}
