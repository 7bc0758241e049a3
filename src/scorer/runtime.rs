//! Loading ONNX Runtime. The library is found at run time (`ORT_DYLIB_PATH`, absolute), not
//! linked at build time, so one binary runs with the CPU build or a CUDA build of the runtime.
//! One environment per process.

use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep::ExecutionProvider;

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();

/// The environment variable naming the ONNX Runtime shared library.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// ONNX Runtime could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No path given and `ORT_DYLIB_PATH` unset.
    #[error(
        "ONNX Runtime library not configured: set {DYLIB_ENV} to the absolute path of libonnxruntime.so (scripts/stack.sh env prints it)"
    )]
    NotConfigured,
    /// The file is missing.
    #[error("ONNX Runtime library {0} does not exist")]
    Missing(PathBuf),
    /// The library did not load or has the wrong version.
    #[error("loading ONNX Runtime from {path}: {reason}")]
    Load {
        /// The library.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The environment could not be created.
    #[error("creating the ONNX Runtime environment: {0}")]
    Environment(String),
}

/// What the loaded runtime offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// The library that was loaded.
    pub path: PathBuf,
    /// ONNX Runtime's build string (version, commit, flags).
    pub build: String,
    /// Whether this build of the runtime has the CUDA execution provider.
    pub cuda_compiled_in: bool,
}

/// The process's ONNX Runtime environment, once [`init`] succeeded.
pub fn environment() -> Result<&'static Environment, RuntimeError> {
    ENVIRONMENT.get().ok_or(RuntimeError::NotConfigured)
}

/// The library path: `explicit`, else `ORT_DYLIB_PATH`.
pub fn library_path(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os(DYLIB_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .ok_or(RuntimeError::NotConfigured)?,
    };
    if !path.exists() {
        return Err(RuntimeError::Missing(path));
    }
    Ok(path)
}

/// Loads ONNX Runtime and creates the process's environment. Calling it again is harmless.
pub fn init(explicit: Option<&Path>) -> Result<RuntimeInfo, RuntimeError> {
    let path = library_path(explicit)?;
    if ENVIRONMENT.get().is_none() {
        let builder = ort::init_from(&path).map_err(|e| RuntimeError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let env = builder
            .with_name("kscore")
            .with_telemetry(false)
            .build()
            .map_err(|e| RuntimeError::Environment(e.to_string()))?;
        // Sessions hold only a weak reference to the environment: keep it for the process.
        let _ = ENVIRONMENT.set(env);
    }
    let cuda_compiled_in =
        ort::ep::CUDA::is_available().map_err(|e| RuntimeError::Environment(e.to_string()))?;
    Ok(RuntimeInfo {
        path,
        build: ort::info().to_string(),
        cuda_compiled_in,
    })
}
