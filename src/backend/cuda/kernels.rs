//! The compiled kernels: fatbins embedded by build.rs, loaded once per context. The typed
//! launchers live in one module per kernel family (`csrc/rmsnorm.cu` <-> `rmsnorm.rs`, ...).

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use std::collections::HashMap;
use std::sync::Arc;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Every kernel of every family, loaded into one context and resolved once: a decode step
/// launches a few hundred kernels, and a lookup must not be a driver call (or trigger lazy
/// module loading inside a graph capture, or while a peer rank spins in an all-reduce).
pub struct Kernels {
    /// family -> kernel name -> function (each holds its module alive)
    functions: HashMap<&'static str, HashMap<&'static str, CudaFunction>>,
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        if FATBINS.is_empty() {
            return Err(Error::Cuda(
                "syncdrop was built with the cuda feature but without nvcc: no kernels (run scripts/setup-nvcc.sh and rebuild)".into(),
            ));
        }
        let mut modules = HashMap::new();
        for (name, bin) in FATBINS {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bin.to_vec()))
                .map_err(|e| Error::Cuda(format!("loading kernel family {name}: {e:?}")))?;
            modules.insert(*name, m);
        }
        let mut functions = HashMap::new();
        for (family, names) in KERNEL_NAMES {
            let m = modules
                .get(family)
                .ok_or_else(|| Error::Cuda(format!("no kernel family {family}")))?;
            let mut fs = HashMap::new();
            for name in *names {
                let f = m
                    .load_function(name)
                    .map_err(|e| Error::Cuda(format!("{family}::{name}: {e:?}")))?;
                fs.insert(*name, f);
            }
            functions.insert(*family, fs);
        }
        Ok(Kernels { functions })
    }

    pub fn function(&self, family: &str, name: &str) -> Result<CudaFunction> {
        self.functions
            .get(family)
            .and_then(|fs| fs.get(name))
            .cloned()
            .ok_or_else(|| Error::Cuda(format!("no kernel {family}::{name}")))
    }
}

/// Every kernel of every family (csrc/*.cu `extern "C" __global__`), resolved at load.
pub const KERNEL_NAMES: &[(&str, &[&str])] = &[
    (
        "allreduce",
        &[
            "allreduce_f32",
            "allreduce_f32_bf16wire",
            "allreduce_bf16",
            "oproj_allreduce_f32",
            "oproj_allreduce_f32_bf16wire",
            "allreduce_add_rmsnorm_f32",
            "allreduce_add_rmsnorm_f32_bf16wire",
        ],
    ),
    ("argmax", &["argmax_f32"]),
    ("attention", &["attention_f32", "attention_combine_f32"]),
    (
        "distill",
        &[
            "distill_norm_fwd",
            "distill_swiglu_bwd",
            "distill_norm_bwd",
            "distill_norm_wgrad",
            "distill_mse",
            "distill_adam",
        ],
    ),
    ("elementwise", &["add_f32", "f32_to_bf16", "round_bf16_f32"]),
    ("embedding", &["embedding_f32"]),
    ("emulate", &["hold_link"]),
    ("gemv", &["gemv_bf16", "gemv_bf16_f32"]),
    (
        "rmsnorm",
        &["add_rmsnorm_bf16", "add_rmsnorm_f32", "rmsnorm_f32"],
    ),
    ("rope", &["rope_bf16", "qkv_rope_cache"]),
    ("sample", &["sample_f32"]),
    ("swiglu", &["swiglu_bf16", "swiglu_f32"]),
];

/// One thread per element, 256 per block.
pub fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fail with a named error when a buffer holds fewer than `need` elements.
pub fn check_len(what: &str, name: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::InvalidArgument(format!(
            "{what}: {name} holds {have} elements, needs {need}"
        )));
    }
    Ok(())
}

/// A null device pointer for an optional kernel argument.
pub const NULL: u64 = 0;
