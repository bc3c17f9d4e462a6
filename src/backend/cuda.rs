//! CUDA backend (feature `cuda`). cudarc loads libcuda at run time, so this module compiles
//! on machines without a GPU; every entry point checks for the driver first and returns a
//! typed error instead of panicking.

use crate::error::{Error, Result};

/// Number of CUDA devices visible, or an error when no driver is present.
pub fn device_count() -> Result<usize> {
    // SAFETY: only probes whether libcuda can be dlopen-ed; no CUDA call is made before it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "no CUDA driver (libcuda) found on this machine".into(),
        ));
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n as usize)
        .map_err(|e| Error::Cuda(format!("{e:?}")))
}
