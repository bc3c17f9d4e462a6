//! One error type for the whole crate. Every variant carries the context a user needs to fix
//! the input; the library never panics or exits on bad input or a missing GPU.

#![warn(missing_docs)]

use std::path::PathBuf;

/// Every error the crate returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation on `path` failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder operated on.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A GGUF file breaks the format: bad magic, an unsupported version, a truncated or
    /// inconsistent header, or tensor data past the end of the file.
    #[error("malformed GGUF {path}: {what} (at byte {offset})")]
    GgufFormat {
        /// The GGUF file.
        path: PathBuf,
        /// Byte offset in the file where the problem was found.
        offset: u64,
        /// What is wrong.
        what: String,
    },

    /// A GGUF tensor is stored in a ggml type syncdrop cannot dequantise (Q5_0, Q2_K, IQ*, ...).
    #[error("GGUF tensor '{tensor}' has quantisation type {ggml_type} ({name}), which syncdrop cannot dequantise")]
    UnsupportedQuant {
        /// The tensor's name.
        tensor: String,
        /// Its ggml type id.
        ggml_type: u32,
        /// The type's name (`unknown` for an id syncdrop does not know).
        name: &'static str,
    },

    /// A tensor that was asked for is not in the model file (or in an SPD plan's distilled
    /// weights); the payload names it.
    #[error("tensor '{0}' not found in the model file")]
    MissingTensor(String),

    /// A GGUF metadata key that was asked for is missing or holds another type.
    #[error("metadata key '{key}' missing or of the wrong type in {path}")]
    MissingMetadata {
        /// The GGUF file.
        path: PathBuf,
        /// The key.
        key: String,
    },

    /// A tensor's shape disagrees with what the model config implies, or a read asks for
    /// rows or columns the tensor does not have.
    #[error("tensor '{tensor}' has shape {found:?}, but the model config implies {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        tensor: String,
        /// The shape the config or the read needs.
        expected: Vec<usize>,
        /// The shape the tensor has.
        found: Vec<usize>,
    },

    /// A model config cannot be used: an unsupported architecture, a `config.json` that does
    /// not parse or lacks a key, or values that fail [`LlamaConfig::validate`].
    ///
    /// [`LlamaConfig::validate`]: crate::config::LlamaConfig::validate
    #[error("invalid model config: {0}")]
    Config(String),

    /// A TP degree of 0 or above the model's number of query heads.
    #[error("tensor-parallel degree {tp} is invalid: it must be between 1 and the number of query heads ({n_heads})")]
    InvalidTpDegree {
        /// The degree asked for.
        tp: usize,
        /// The model's query heads.
        n_heads: usize,
    },

    /// A safetensors file could not be parsed or written, or holds a dtype syncdrop cannot
    /// read.
    #[error("safetensors error in {path}: {msg}")]
    Safetensors {
        /// The safetensors file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },

    /// The tokenizer cannot be built (an unsupported model, malformed merges) or failed to
    /// encode or decode.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// A file or folder that should be there is not: a cached asset (model, evaluation data),
    /// the model path given, or a model folder without `*.safetensors`.
    #[error(
        "asset '{name}' not found at {path}: run `scripts/fetch-assets.sh` (or set SYNCDROP_CACHE)"
    )]
    MissingAsset {
        /// What was looked for.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
    },

    /// A forward would write KV-cache positions past the cache's capacity.
    #[error("sequence of {needed} tokens exceeds the KV cache capacity of {capacity}")]
    ContextOverflow {
        /// Positions the sequence needs (its first position plus its tokens).
        needed: usize,
        /// The KV-cache capacity in tokens (`EngineOptions::capacity`).
        capacity: usize,
    },

    /// A rank's thread, thread pool or communication lane could not be started, or a rank
    /// thread is gone.
    #[error("rank {rank}: {msg}")]
    Rank {
        /// The rank.
        rank: usize,
        /// What happened.
        msg: String,
    },

    /// A collective, a rendezvous or NCCL failed: the group was aborted by a failing rank, a
    /// wait timed out, ranks disagree (lengths, options), or a forced all-reduce cannot run;
    /// also any call on an engine after an earlier failure.
    #[error("communicator: {0}")]
    Comm(String),

    /// A P2P all-reduce's bounded spin ended before a peer's flag arrived (the CUDA kernels,
    /// and their simulation in [`crate::comm::p2p_sim`]).
    #[error("all-reduce timed out: rank {rank} waited for peer {peer}, whose flag reads {flag} (expected {expected})")]
    CommTimeout {
        /// The rank that waited (the block, for the grid barrier).
        rank: usize,
        /// The peer it waited for (the block again, for the grid barrier).
        peer: usize,
        /// The flag's value when it gave up (a round counter, or the barrier's generation).
        flag: u32,
        /// The value it waited for.
        expected: u32,
    },

    /// An argument, option or environment variable is invalid; the message says which and
    /// why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A CUDA function was called in a build without the `cuda` feature.
    #[error("syncdrop was built without the `cuda` feature; rebuild with `--features cuda`")]
    NotCompiledWithCuda,

    /// A CUDA driver, cuBLAS or kernel call failed, or no CUDA device is usable.
    #[error("CUDA error: {0}")]
    Cuda(String),

    /// An evaluation data file (gzipped JSON lines) is malformed or holds no documents.
    #[error("evaluation data error in {path}: {msg}")]
    EvalData {
        /// The data file.
        path: PathBuf,
        /// What is wrong, and on which line where that applies.
        msg: String,
    },
}

/// The crate's result type: `E` defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for an operation on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Ok when KV-cache positions pos0..pos0+t fit `capacity`, else
    /// [`Error::ContextOverflow`] (without overflow: a wrapped `pos0 + t` would pass).
    pub(crate) fn check_context(pos0: usize, t: usize, capacity: usize) -> Result<()> {
        match pos0.checked_add(t) {
            Some(end) if end <= capacity => Ok(()),
            end => Err(Error::ContextOverflow {
                needed: end.unwrap_or(usize::MAX),
                capacity,
            }),
        }
    }
}
