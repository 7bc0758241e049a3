//! Scoring: ONNX Runtime loaded at run time from its shared library, execution providers, and
//! (with the pipeline) one session per scoring worker.

pub mod runtime;

pub use runtime::{RuntimeError, RuntimeInfo};
