// Build script. Without the `cuda` feature it does nothing. With it, every csrc/*.cu is
// compiled by nvcc into a fatbin (SASS for the architectures in SYNCDROP_CUDA_ARCHS, default
// "80,90", plus PTX of the newest one, which a CUDA 13.0 driver can JIT) and embedded in the
// crate through $OUT_DIR/kernels.rs.
//
// nvcc is found from $NVCC, then PATH, then the project's own install
// (scripts/setup-nvcc.sh puts it in the syncdrop cache). Missing nvcc is a warning and the
// crate builds with no kernels (the CUDA backend then reports it at run time), unless
// SYNCDROP_REQUIRE_NVCC=1 makes it an error. Never needs nvidia-smi or /usr/local/cuda.
//
// Each fatbin is kept in $OUT_DIR with a key (sha256 of nvcc's version, its flags and
// environment, and every source in csrc/) and rebuilt only when the key changes, so the script
// can rerun on any Rust edit without recompiling kernels.
//
// It also sets SYNCDROP_SOURCE_ID, a short sha256 over the crate's sources (src/**.rs, csrc/'s
// .cu/.cuh/.h, build.rs; regular files only): ranks started as separate processes compare it
// at the rendezvous, so two builds of the same version from different sources are told apart
// (crate::BUILD).
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for watched in ["build.rs", "csrc", "src"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    println!("cargo:rustc-env=SYNCDROP_SOURCE_ID={}", source_id());
    for v in [
        "NVCC",
        "SYNCDROP_CUDA_ARCHS",
        "SYNCDROP_REQUIRE_NVCC",
        "SYNCDROP_CACHE",
    ]
    .iter()
    .chain(&NVCC_ENV)
    {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_HOST_SIM").is_some() {
        host_sim();
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
            let mut flags: Vec<String> = ["-fatbin", "-O3", "-std=c++17", "-Icsrc"].map(String::from).into();
            for (i, a) in archs.iter().enumerate() {
                let code = if i + 1 == archs.len() {
                    format!("[sm_{a},compute_{a}]")
                } else {
                    format!("sm_{a}")
                };
                flags.push("-gencode".into());
                flags.push(format!("arch=compute_{a},code={code}"));
            }
            // what every fatbin depends on: nvcc, its flags and environment, every csrc source
            // (a .cu may include another); one key for all of them
            let mut common = Sha256::new();
            let version = Command::new(&nvcc).arg("--version").output();
            match version {
                Ok(o) if o.status.success() => common.update(&o.stdout),
                other => panic!("{} --version failed: {other:?}", nvcc.display()),
            }
            common.update(flags.join(" ").as_bytes());
            for v in NVCC_ENV {
                let value = std::env::var_os(v).unwrap_or_default();
                common.update(format!("{v}={}\n", value.to_string_lossy()).as_bytes());
            }
            for f in files_under(Path::new("csrc"), &CUDA_SOURCES) {
                hash_file(&mut common, &f);
            }
            let key = hex(&common.finalize());
            for src in &sources {
                let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                let fatbin = out.join(format!("{stem}.fatbin"));
                let key_file = out.join(format!("{stem}.fatbin.key"));
                let cached = fatbin.exists()
                    && std::fs::read_to_string(&key_file).is_ok_and(|k| k == key);
                if !cached {
                    let _ = std::fs::remove_file(&key_file);
                    let status = Command::new(&nvcc).args(&flags).arg("-o").arg(&fatbin).arg(src).status();
                    match status {
                        Ok(s) if s.success() => {
                            std::fs::write(&key_file, &key).expect("write fatbin key")
                        }
                        other => panic!("nvcc failed on {}: {other:?}", src.display()),
                    }
                }
                entries.push((stem, fatbin));
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

/// The regular files under `dir` whose extension is one of `exts`, sorted (a missing
/// directory has none). Symbolic links (an editor's lock file, say), hidden files and other
/// kinds are skipped: a stray file must not change the source id or stop the build.
fn files_under(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => todo.push(p),
                Ok(m)
                    if m.is_file()
                        && p.extension().is_some_and(|x| exts.iter().any(|e| x == *e)) =>
                {
                    files.push(p)
                }
                _ => {}
            }
        }
    }
    files.sort();
    files
}

/// nvcc's own environment, which changes what it builds.
const NVCC_ENV: [&str; 3] = ["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN"];

/// What csrc/ holds that nvcc reads: kernels and headers.
const CUDA_SOURCES: [&str; 3] = ["cu", "cuh", "h"];

/// Hashes a file's path (with `/` separators) and its bytes, each length-prefixed.
fn hash_file(h: &mut Sha256, path: &Path) {
    let name: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let name = name.join("/");
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    h.update((name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(&bytes);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 12 hex digits of sha256 over src/*.rs, csrc/'s sources and build.rs (paths and bytes).
/// Not Cargo.toml: packaging rewrites it, and the version is in `BUILD` already.
fn source_id() -> String {
    let mut h = Sha256::new();
    let mut files = files_under(Path::new("src"), &["rs"]);
    files.extend(files_under(Path::new("csrc"), &CUDA_SOURCES));
    files.push(PathBuf::from("build.rs"));
    for f in &files {
        hash_file(&mut h, f);
    }
    hex(&h.finalize())[..12].to_string()
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

/// Feature `host-sim`: every csrc/*.cu compiled as C++ for the host, against
/// csrc/host_sim/cuda_bf16.h (first on the include path, so it stands in for the CUDA
/// header) and the fiber scheduler in csrc/host_sim/sim.cpp, into a static library whose
/// kernels keep their names (tests/host_sim_*.rs call them through
/// src/backend/cuda/host_sim.rs). No nvcc needed; any C++17 compiler.
fn host_sim() {
    let mut b = cc::Build::new();
    b.cpp(true)
        .include("csrc/host_sim")
        .include("csrc")
        .flag("-std=c++17")
        .flag("-fno-strict-aliasing")
        .flag("-pthread")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-sign-compare")
        .opt_level(2)
        .warnings(false)
        .file("csrc/host_sim/sim.cpp")
        .file("csrc/host_sim/selftest.cpp");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("csrc")
        .expect("csrc/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    kernels.sort();
    // -x c++: the .cu files are C++ here (sim.cpp is C++ anyway)
    b.flag("-xc++").files(&kernels).compile("syncdrop_host_sim");
    fake_cuda(&kernels);
}

/// The `extern "C" __global__` kernels a .cu file defines, by name.
fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__ void") {
        rest = rest[i + "extern \"C\" __global__ void".len()..].trim_start();
        if let Some(r) = rest.strip_prefix("__launch_bounds__") {
            let close = r.find(')').expect("__launch_bounds__(...)");
            rest = r[close + 1..].trim_start();
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        names.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    names
}

/// The simulated CUDA driver (csrc/host_sim/fake_cuda.cpp): one shared library with the
/// simulator and every kernel, registered by name, written to $OUT_DIR/fake-cuda/libcuda.so
/// with libcublas.so beside it (a link). Tests run with that folder on LD_LIBRARY_PATH
/// (scripts/sim-gpu.sh), and cudarc loads it as the driver.
fn fake_cuda(kernels: &[PathBuf]) {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fake-cuda");
    let objs = out.join("obj");
    std::fs::create_dir_all(&objs).expect("fake-cuda dir");
    let root = std::env::current_dir().expect("cwd");
    let mut sources = vec![
        root.join("csrc/host_sim/sim.cpp"),
        root.join("csrc/host_sim/fake_cuda.cpp"),
    ];
    for k in kernels {
        let text = std::fs::read_to_string(k).expect("read .cu");
        let stem = k.file_stem().unwrap().to_string_lossy().to_string();
        // kernels whose blocks wait for each other or for other ranks run concurrently
        let concurrent = matches!(stem.as_str(), "allreduce" | "emulate");
        let mut w = format!(
            "// generated by build.rs: {stem}.cu's kernels for the simulated driver\n#include \"{}\"\n#include \"sim_registry.h\"\nnamespace {{\n",
            root.join(k).display()
        );
        for (i, name) in kernel_names(&text).iter().enumerate() {
            w += &format!(
                "const bool reg{i} = sim_register(\"{name}\", &sim_bind<&{name}>, {concurrent});\n"
            );
        }
        w += "}  // namespace\n";
        let path = out.join(format!("sim_{stem}.cpp"));
        std::fs::write(&path, w).expect("write wrapper");
        sources.push(path);
    }
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let common: Vec<String> = [
        "-std=c++17",
        "-O2",
        "-g",
        "-fPIC",
        "-pthread",
        "-fno-strict-aliasing",
        "-w",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("-I{}", root.join("csrc/host_sim").display()),
        format!("-I{}", root.join("csrc").display()),
    ])
    .collect();
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let queue = std::sync::Mutex::new(sources.iter().enumerate().collect::<Vec<_>>());
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let Some((i, src)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let status = Command::new(compiler.path())
                    .args(&common)
                    .arg("-c")
                    .arg(src)
                    .arg("-o")
                    .arg(objs.join(format!("{i}.o")))
                    .status();
                if !status.is_ok_and(|s| s.success()) {
                    failures.lock().unwrap().push(src.display().to_string());
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "fake CUDA driver: compiling {failures:?} failed"
    );
    let lib = out.join("libcuda.so");
    let status = Command::new(compiler.path())
        .args(["-shared", "-pthread", "-Wl,-Bsymbolic", "-o"])
        .arg(&lib)
        .args((0..sources.len()).map(|i| objs.join(format!("{i}.o"))))
        .status()
        .expect("run the C++ compiler");
    assert!(status.success(), "fake CUDA driver: linking failed");
    for link in ["libcuda.so.1", "libcublas.so"] {
        let l = out.join(link);
        let _ = std::fs::remove_file(&l);
        std::os::unix::fs::symlink("libcuda.so", &l).expect("symlink");
    }
    println!("cargo:rustc-env=SYNCDROP_FAKE_CUDA_DIR={}", out.display());
}
