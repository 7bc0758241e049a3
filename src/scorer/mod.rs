//! Scoring: ONNX Runtime loaded at run time from its shared library, execution providers, and
//! (with the pipeline) one session per scoring worker; drift of scores and inputs against the
//! reference stored with each model.

pub mod drift;
pub mod placement;
pub mod runtime;
pub mod session;

pub use runtime::{RuntimeError, RuntimeInfo};
pub use session::{ModelInfo, ScorerError, ScoringSession};

use crate::topology::{Loaded, Problem};

/// Opens every model of a topology to check it against its entry (input width, outputs,
/// execution provider). Needs ONNX Runtime; returns the problems found, by field path.
pub fn check_models(loaded: &Loaded) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (i, (model, path)) in loaded
        .topology
        .models
        .iter()
        .zip(&loaded.model_paths)
        .enumerate()
    {
        let at = |field: &str| format!("model[{i}] ({}).{field}", model.name);
        match ScoringSession::open(model, path) {
            Ok(_) => {}
            Err(ScorerError::Mismatch { problem, field, .. }) => problems.push(Problem {
                path: at(&field),
                message: problem,
            }),
            Err(e @ ScorerError::Cuda { .. }) => problems.push(Problem {
                path: at("execution_provider"),
                message: e.to_string(),
            }),
            Err(e) => problems.push(Problem {
                path: at("path"),
                message: e.to_string(),
            }),
        }
    }
    problems
}
