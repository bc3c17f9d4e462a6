//! # syncdrop
//!
//! Tensor-parallel LLaMA inference that communicates less: Sync-Point Drop (SPD),
//! Intra-Sequence Overlap (ISO) and a custom P2P all-reduce, on a CPU reference backend
//! (threads as ranks) and a CUDA backend.
//!
//! Reading order:
//! 1. [`comm`]: the communicator contract (sum all-reduce, bit-identical on every rank);
//! 2. [`layout`]: which heads / KV heads / MLP columns each rank owns (uneven allowed);
//! 3. [`backend`]: the seam between the model and a device; [`backend::cpu`] is the reference;
//! 4. [`model`]: one rank's weights and the TP / SPD block schedule, written once;
//! 5. [`engine`]: ranks as threads, the driver, logits assembly;
//! 6. [`gguf`], [`quant`], [`weights`], [`tokenizer`]: getting real models in;
//! 7. [`generate`], [`eval`]: what the runner (`examples/llama.rs`) does with it.

pub mod assets;
pub mod backend;
pub mod bench;
pub mod comm;
pub mod config;
pub mod distill;
pub mod engine;
pub mod error;
pub mod eval;
pub mod files;
pub mod generate;
pub mod gguf;
pub mod headgroup;
pub mod iso;
pub mod latency;
pub mod layout;
pub mod model;
pub mod planner;
pub mod progress;
pub mod quant;
pub mod spd;
pub mod synthetic;
pub mod tasks;
pub mod tokenizer;
pub mod weights;

/// This build: the crate version and a short sha256 of its sources (`0.1.0+src.1a2b3c4d5e6f`),
/// computed by build.rs over src/**.rs, csrc/ and build.rs. Ranks in separate processes
/// compare it at the rendezvous, so builds of one version from different sources do not pair
/// their collectives.
pub const BUILD: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "+src.",
    env!("SYNCDROP_SOURCE_ID")
);

pub use config::{LlamaConfig, RopeStyle};
pub use engine::{BackendKind, Engine, EngineOptions, Logits};
pub use error::{Error, Result};
pub use layout::TpLayout;
pub use weights::ModelFiles;
