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

/// (device name, UTC date) for a bench's report and first line: every number names the GPU
/// it ran on and when.
pub fn machine() -> (String, String) {
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    (
        run("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader"])
            .unwrap_or_else(|| "unknown GPU".into()),
        run("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default(),
    )
}
