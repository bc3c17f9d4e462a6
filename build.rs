// Build script: without the `cuda` feature it does nothing. With it, kernels in csrc/ are
// compiled by nvcc (see the CUDA backend issue); a missing nvcc is a warning unless
// SYNCDROP_REQUIRE_NVCC=1.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=SYNCDROP_CUDA_ARCHS");
    println!("cargo:rerun-if-env-changed=SYNCDROP_REQUIRE_NVCC");
}
