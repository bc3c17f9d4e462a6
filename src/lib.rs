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
//! 7. [`generate`], [`eval`]: what the runner (`examples/llama/`) does with it.
//!
//! ## From an inference engine
//!
//! Only the all-reduce: `examples/p2p_allreduce.rs` (feature `cuda`) is the whole recipe,
//! from the placement checks and the selection chain to `P2pRank::all_reduce` on each
//! rank's own stream. The whole model:
//!
//! Load a model at a TP degree (ranks as threads here; `backend: BackendKind::Cuda` puts
//! them on GPUs), switch it to an SPD plan the tools made (`llama plan --tp 4 ...`), and
//! generate. [`spd::SpdPlan::load_into`] refuses a plan made for another model, TP degree or
//! head partition, or whose distilled weights are not the ones it was written with.
//!
//! ```no_run
//! use std::sync::Arc;
//! use syncdrop::generate::{generate, Sampler, SamplerConfig};
//! use syncdrop::spd::{model_sha256, SpdPlan};
//! use syncdrop::tokenizer::Tokenizer;
//! use syncdrop::{Engine, EngineOptions, ModelFiles};
//!
//! # fn main() -> syncdrop::Result<()> {
//! let files = Arc::new(ModelFiles::open("SmolLM2-135M-Instruct.Q4_1.gguf")?);
//! let ModelFiles::Gguf(gguf) = &*files else { unreachable!("a GGUF file") };
//! let tok = Tokenizer::from_gguf(gguf)?;
//! let opts = EngineOptions { tp: 4, ..Default::default() };
//! let mut engine = Engine::new(files.clone(), &opts)?;
//! let sha = model_sha256(&engine.files)?;
//! let plan = SpdPlan::load_into("plan.json".as_ref(), &mut engine, &sha)?;
//! println!("{:.0}% of blocks skip their attention all-reduce", 100.0 * plan.fraction());
//! let prompt = tok.encode("The capital of France is")?;
//! let mut greedy = Sampler::new(SamplerConfig::default())?;
//! let (out, stats) = generate(&mut engine, &prompt, 16, &mut greedy, tok.eos, |_| Ok(()))?;
//! println!("{} ({} all-reduces on rank 0)", tok.decode(&out, true)?, stats.comm.all_reduces);
//! # Ok(())
//! # }
//! ```

pub mod assets;
pub mod backend;
pub mod bench;
pub mod comm;
pub mod compensate;
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
