//! Build script shared by every crate whose binaries or tests link libtorch.
//!
//! torch-sys declares `links = "tch"` and prints `cargo:libtorch_lib=DIR`, so
//! this script sees `DEP_TCH_LIBTORCH_LIB` (the comment in torch-sys that says
//! DEP_TORCH_SYS_... is wrong). Embedding DIR as an rpath lets the binary run
//! without LD_LIBRARY_PATH or an activated venv.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    // Nothing references a symbol of libtorch_cuda.so directly (CUDA kernels
    // register themselves from static initialisers), so the linker's
    // --as-needed default drops it and a GPU would never be seen. Force it.
    if Path::new(&dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
