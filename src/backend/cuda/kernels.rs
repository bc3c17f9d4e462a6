//! The compiled kernels: fatbins embedded by build.rs, loaded once per context. The typed
//! launchers live in one module per kernel family (`csrc/rmsnorm.cu` <-> `rmsnorm.rs`, ...).

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use std::collections::HashMap;
use std::sync::Arc;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Every kernel family loaded into one context.
pub struct Kernels {
    modules: HashMap<&'static str, Arc<CudaModule>>,
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
        Ok(Kernels { modules })
    }

    pub fn function(&self, family: &str, name: &str) -> Result<CudaFunction> {
        let m = self
            .modules
            .get(family)
            .ok_or_else(|| Error::Cuda(format!("no kernel family {family}")))?;
        m.load_function(name)
            .map_err(|e| Error::Cuda(format!("{family}::{name}: {e:?}")))
    }
}
