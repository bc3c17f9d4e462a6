//! Stand-in for the CUDA backend when syncdrop is built without the `cuda` feature: the
//! same names, each returning `Error::NotCompiledWithCuda`.

use crate::error::{Error, Result};

/// Number of CUDA devices visible; always an error without the `cuda` feature.
pub fn device_count() -> Result<usize> {
    Err(Error::NotCompiledWithCuda)
}
