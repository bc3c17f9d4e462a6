//! What the GPU bench binaries share: their two flags and the run-time GPU check.

use std::path::PathBuf;

pub struct GpuBenchArgs {
    /// `--quick`: small sizes, few repetitions (a smoke run).
    pub quick: bool,
    /// `--out DIR`: where to write the bench's JSON.
    pub out: Option<PathBuf>,
}

/// The flags, or None after printing "`name`: skipped: no GPU" when no GPU is visible.
pub fn args(name: &str) -> Option<GpuBenchArgs> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    if !syncdrop::backend::gpu_or_skip(name) {
        return None;
    }
    Some(GpuBenchArgs { quick, out })
}
