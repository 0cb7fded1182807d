//! Makes every binary and test of this crate find libtorch without LD_LIBRARY_PATH (rpath to the
//! torch/lib that torch-sys linked against), and keeps libtorch_cuda linked: no symbol of it is referenced
//! directly, so `--as-needed` would drop it and CUDA would be invisible at run time (tch-rs #980).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
