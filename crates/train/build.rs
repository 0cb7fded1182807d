//! Makes every binary and test of this crate find libtorch without LD_LIBRARY_PATH (rpath to the
//! torch/lib that torch-sys linked against) and records that folder so `cuda::load` can open
//! libtorch_cuda at run time: linking it would cost ~0.6 s of start-up for every command, and the linker
//! drops it anyway because no symbol of it is referenced (tch-rs #980).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=PIRCLIP_TORCH_LIB={dir}");
    }
}
