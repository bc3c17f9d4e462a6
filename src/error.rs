//! One error type for the whole crate. Every variant carries the context a user needs to fix
//! the input; the library never panics or exits on bad input or a missing GPU.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("malformed GGUF {path}: {what} (at byte {offset})")]
    GgufFormat {
        path: PathBuf,
        offset: u64,
        what: String,
    },

    #[error("GGUF tensor '{tensor}' has quantisation type {ggml_type} ({name}), which syncdrop cannot dequantise")]
    UnsupportedQuant {
        tensor: String,
        ggml_type: u32,
        name: &'static str,
    },

    #[error("tensor '{0}' not found in the model file")]
    MissingTensor(String),

    #[error("metadata key '{key}' missing or of the wrong type in {path}")]
    MissingMetadata { path: PathBuf, key: String },

    #[error("tensor '{tensor}' has shape {found:?}, but the model config implies {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("invalid model config: {0}")]
    Config(String),

    #[error("tensor-parallel degree {tp} is invalid: it must be between 1 and the number of query heads ({n_heads})")]
    InvalidTpDegree { tp: usize, n_heads: usize },

    #[error("safetensors error in {path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    #[error(
        "asset '{name}' not found at {path}: run `scripts/fetch-assets.sh` (or set SYNCDROP_CACHE)"
    )]
    MissingAsset { name: String, path: PathBuf },

    #[error("sequence of {needed} tokens exceeds the KV cache capacity of {capacity}")]
    ContextOverflow { needed: usize, capacity: usize },

    #[error("rank {rank}: {msg}")]
    Rank { rank: usize, msg: String },

    #[error("communicator: {0}")]
    Comm(String),

    #[error("all-reduce timed out: rank {rank} waited for peer {peer}, whose flag reads {flag} (expected {expected})")]
    CommTimeout {
        rank: usize,
        peer: usize,
        flag: u32,
        expected: u32,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("syncdrop was built without the `cuda` feature; rebuild with `--features cuda`")]
    NotCompiledWithCuda,

    #[error("CUDA error: {0}")]
    Cuda(String),

    #[error("evaluation data error in {path}: {msg}")]
    EvalData { path: PathBuf, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
