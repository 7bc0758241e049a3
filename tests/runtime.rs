//! ONNX Runtime loads from the shared library the local stack installs (ORT_DYLIB_PATH, set by
//! `scripts/stack.sh env`), and a missing library is a clear error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use kscore::scorer::runtime::{self, RuntimeError};

#[test]
fn loads_the_installed_runtime() {
    let path =
        std::env::var("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH is set by scripts/stack.sh env");
    let info = runtime::init(None).expect("ONNX Runtime loads");
    assert_eq!(info.path, Path::new(&path));
    assert!(info.build.starts_with("ORT Build Info"), "{}", info.build);
    // The stack installs the CPU wheel: no CUDA provider in it.
    assert!(!info.cuda_compiled_in);
    // A second init is harmless.
    assert_eq!(runtime::init(None).expect("again").path, info.path);
}

#[test]
fn a_missing_library_is_named() {
    match runtime::library_path(Some(Path::new("/nonexistent/libonnxruntime.so"))) {
        Err(e @ RuntimeError::Missing(_)) => {
            assert_eq!(
                e.to_string(),
                "ONNX Runtime library /nonexistent/libonnxruntime.so does not exist"
            )
        }
        other => panic!("expected Missing, got {other:?}"),
    }
}
