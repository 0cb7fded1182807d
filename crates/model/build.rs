//! Makes every binary and test of this crate find libtorch without LD_LIBRARY_PATH (rpath to the
//! torch/lib that torch-sys linked against) and records that folder so `cuda::load` can open
//! libtorch_cuda at run time: linking it would cost ~0.6 s of start-up for every command, and the linker
//! drops it anyway because no symbol of it is referenced (tch-rs #980).
//!
//! The model crate also compiles `csrc/shim.cpp` (libtorch calls tch does not bind) against the same
//! libtorch headers, and the dist crate its `csrc/dist.cpp` (c10d) and the NCCL plugin `csrc/nccl.cpp`;
//! the other crates share this script only for the rpath.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let package = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
    let (is_model_crate, is_dist_crate) = (package == "pirclip-model", package == "pirclip-dist");
    // Only the crates with C++ name it; naming a missing file would rerun the others every build.
    if is_model_crate {
        println!("cargo:rerun-if-changed=csrc/shim.cpp");
    } else if is_dist_crate {
        println!("cargo:rerun-if-changed=csrc/dist.cpp");
        println!("cargo:rerun-if-changed=csrc/nccl.cpp");
        println!("cargo::rustc-check-cfg=cfg(pirclip_dist)");
        println!("cargo::rustc-check-cfg=cfg(pirclip_nccl)");
    } else {
        println!("cargo:rerun-if-changed=../model/build.rs"); // the other crates share this script
    }
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    println!("cargo:rustc-env=PIRCLIP_TORCH_LIB={dir}");
    let include = PathBuf::from(&dir).join("../include");
    if is_model_crate {
        libtorch_cpp(&include)
            .file("csrc/shim.cpp")
            .compile("pirclip_shim");
    }
    if is_dist_crate {
        // torch.distributed (gloo): only where gloo's headers are installed (Debian's libgloo-dev, which
        // scripts/setup.sh installs); without them pirclip builds and runs single-process.
        let gloo = std::env::var("GLOO_INCLUDE_DIR").unwrap_or_else(|_| "/usr/include".into());
        println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
        if PathBuf::from(&gloo).join("gloo/algorithm.h").is_file() {
            libtorch_cpp(&include)
                .include(&gloo)
                .flag("-DUSE_C10D_GLOO")
                .file("csrc/dist.cpp")
                .compile("pirclip_dist");
            println!("cargo:rustc-cfg=pirclip_dist");
            nccl_plugin(&include, &dir);
        } else {
            println!(
                "cargo:warning=gloo headers not found under {gloo}: pirclip is built without distributed \
                 training (install libgloo-dev, or set GLOO_INCLUDE_DIR, and rebuild)"
            );
        }
    }
}

/// The NCCL backend as a shared library of its own (csrc/nccl.cpp), linked against libtorch_cuda, where
/// the CUDA wheel's headers are installed: torch's `nvidia/cu13` (runtime, plus the crt and cccl headers
/// that scripts/setup.sh adds from the matching nvidia-cuda-crt / nvidia-cuda-cccl wheels) and
/// `nvidia/nccl`, or the folders in CUDA_INCLUDE_DIRS. Elsewhere pirclip builds without it and says so
/// when `--dist-backend nccl` is asked for.
fn nccl_plugin(include: &std::path::Path, torch_lib: &str) {
    println!("cargo:rerun-if-env-changed=CUDA_INCLUDE_DIRS");
    let site = PathBuf::from(torch_lib).join("../..");
    let mut dirs: Vec<PathBuf> = std::env::var("CUDA_INCLUDE_DIRS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
        dirs.extend(entries.flatten().map(|e| e.path().join("include")));
    }
    let needed = [
        "nccl.h",
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
    ];
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|f| !dirs.iter().any(|d| d.join(f).exists()))
        .collect();
    if !missing.is_empty() {
        println!(
            "cargo:warning=NCCL backend not built (missing {}): distributed training runs on gloo only",
            missing.join(", ")
        );
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("libpirclip_nccl.so");
    let mut build = libtorch_cpp(include);
    for d in dirs.iter().filter(|d| d.is_dir()) {
        build.include(d);
    }
    let mut cmd = build
        .flag("-DUSE_C10D_NCCL")
        .flag("-DUSE_CUDA")
        .get_compiler()
        .to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "csrc/nccl.cpp", "-o"])
        .arg(&out)
        .arg(format!("-L{torch_lib}"))
        .args(["-ltorch_cuda", "-ltorch_cpu", "-lc10_cuda", "-lc10"])
        .arg(format!("-Wl,-rpath,{torch_lib}"));
    match cmd.status() {
        Ok(s) if s.success() => {
            println!("cargo:rustc-cfg=pirclip_nccl");
            println!("cargo:rustc-env=PIRCLIP_NCCL_PLUGIN={}", out.display());
        }
        other => println!(
            "cargo:warning=NCCL backend not built: compiling csrc/nccl.cpp failed ({other:?})"
        ),
    }
}

/// A C++ build against libtorch's headers, with the ABI the library was built with.
fn libtorch_cpp(include: &std::path::Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT");
    b
}

/// torch-sys's choice (LIBTORCH_CXX11_ABI), else 1: PyPI wheels use the C++11 ABI since torch 2.7.
fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
}
