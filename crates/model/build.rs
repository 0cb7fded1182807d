//! Makes every binary and test of this crate find libtorch without LD_LIBRARY_PATH (rpath to the
//! torch/lib that torch-sys linked against) and records that folder so `cuda::load` can open
//! libtorch_cuda at run time: linking it would cost ~0.6 s of start-up for every command, and the linker
//! drops it anyway because no symbol of it is referenced (tch-rs #980).
//!
//! The model crate also compiles `csrc/shim.cpp` (libtorch calls tch does not bind) against the same
//! libtorch headers; the train and cli crates share this script only for the rpath.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let is_model_crate = std::env::var("CARGO_PKG_NAME").as_deref() == Ok("pirclip-model");
    if is_model_crate {
        // Only the model crate has the shim; naming a missing file would rerun the others every build.
        println!("cargo:rerun-if-changed=csrc/shim.cpp");
    } else {
        println!("cargo:rerun-if-changed=../model/build.rs"); // train and cli share this script
    }
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    println!("cargo:rustc-env=PIRCLIP_TORCH_LIB={dir}");
    if is_model_crate {
        let include = PathBuf::from(&dir).join("../include");
        cc::Build::new()
            .cpp(true)
            .pic(true)
            .warnings(false)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .file("csrc/shim.cpp")
            .compile("pirclip_shim");
    }
}

/// torch-sys's choice (LIBTORCH_CXX11_ABI), else 1: PyPI wheels use the C++11 ABI since torch 2.7.
fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
}
