// Build script. Without the `cuda` feature it does nothing. With it, every csrc/*.cu is
// compiled by nvcc into a fatbin (SASS for the architectures in SYNCDROP_CUDA_ARCHS, default
// "80,90", plus PTX of the newest one, which a CUDA 13.0 driver can JIT) and embedded in the
// crate through $OUT_DIR/kernels.rs.
//
// nvcc is found from $NVCC, then PATH, then the project's own install
// (scripts/setup-nvcc.sh puts it in the syncdrop cache). Missing nvcc is a warning and the
// crate builds with no kernels (the CUDA backend then reports it at run time), unless
// SYNCDROP_REQUIRE_NVCC=1 makes it an error. Never needs nvidia-smi or /usr/local/cuda.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    for v in [
        "NVCC",
        "SYNCDROP_CUDA_ARCHS",
        "SYNCDROP_REQUIRE_NVCC",
        "SYNCDROP_CACHE",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let required = std::env::var("SYNCDROP_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let mut sources: Vec<PathBuf> = std::fs::read_dir("csrc")
        .expect("csrc/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let mut entries = Vec::new();
    match find_nvcc() {
        Some(nvcc) => {
            let archs = std::env::var("SYNCDROP_CUDA_ARCHS").unwrap_or_else(|_| "80,90".into());
            let archs: Vec<&str> = archs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
            for src in &sources {
                let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                let fatbin = out.join(format!("{stem}.fatbin"));
                let mut cmd = Command::new(&nvcc);
                cmd.arg("-fatbin").arg("-O3").arg("-std=c++17").arg("-Icsrc");
                for (i, a) in archs.iter().enumerate() {
                    let code = if i + 1 == archs.len() {
                        format!("[sm_{a},compute_{a}]")
                    } else {
                        format!("sm_{a}")
                    };
                    cmd.arg("-gencode").arg(format!("arch=compute_{a},code={code}"));
                }
                cmd.arg("-o").arg(&fatbin).arg(src);
                let status = cmd.status();
                match status {
                    Ok(s) if s.success() => entries.push((stem, fatbin)),
                    other => panic!("nvcc failed on {}: {other:?}", src.display()),
                }
            }
        }
        None if required => panic!(
            "SYNCDROP_REQUIRE_NVCC=1 but no nvcc found (set NVCC, put nvcc on PATH, or run scripts/setup-nvcc.sh)"
        ),
        None => println!(
            "cargo:warning=syncdrop: no nvcc found; building the cuda feature without kernels (run scripts/setup-nvcc.sh)"
        ),
    }
    let mut rs = String::from("/// (kernel family, fatbin) for every csrc/*.cu compiled by build.rs.\npub const FATBINS: &[(&str, &[u8])] = &[\n");
    for (stem, path) in &entries {
        rs.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    rs.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), rs).expect("write kernels.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if Command::new("nvcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(PathBuf::from("nvcc"));
    }
    let cache = std::env::var_os("SYNCDROP_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| Path::new(&p).join("syncdrop")))
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/syncdrop")))?;
    let p = cache.join("nvcc-13.0.88/nvidia/cu13/bin/nvcc");
    p.exists().then_some(p)
}
