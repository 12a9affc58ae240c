//! Link settings that libtorch needs but cargo cannot infer.
//!
//! * `libtorch_cuda.so` has no symbol we reference directly, so `--as-needed` would drop it and CUDA would
//!   be invisible at run time; `--no-as-needed` keeps it (when the torch wheel ships it).
//! * The Python extension finds libtorch through an rpath relative to itself: the installed layout is
//!   `site-packages/blip_peft/_blip_peft.abi3.so` next to `site-packages/torch/lib/`.
//! * Test binaries live in `target/`, where that relative path points nowhere, so integration tests get
//!   the absolute folder of the libtorch they were built against.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
    // Integration tests (tests/*.rs); the lib's unit-test binary gets LD_LIBRARY_PATH from the Makefile.
    println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{lib_dir}");
}
