//! One model's ONNX Runtime session, owned by one scoring worker (`Session::run` takes
//! `&mut self`; sharing one behind a lock would serialise the workers). Opening a session checks
//! the model against its topology entry: one float input of `[rows, features]` with as many
//! columns as features listed, and every output a score names.

use std::path::{Path, PathBuf};

use ndarray::ArrayView2;
use ort::ep::{self, ExecutionProvider as _};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use super::drift::{REFERENCE_KEY, Reference};
use super::runtime;
use crate::topology::config::{ExecutionProvider, Model};

/// A model that cannot be opened or run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScorerError {
    /// ONNX Runtime is not loaded.
    #[error(transparent)]
    Runtime(#[from] std::sync::Arc<runtime::RuntimeError>),
    /// CUDA was asked for and cannot be provided.
    #[error("model {model}: execution provider `cuda` unavailable: {reason}")]
    Cuda {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
    /// The file does not load as an ONNX model.
    #[error("model {model}: cannot load {path}: {reason}")]
    Load {
        /// The model.
        model: String,
        /// The file.
        path: PathBuf,
        /// ONNX Runtime's message.
        reason: String,
    },
    /// The model does not fit its topology entry.
    #[error("model {model}: {problem}")]
    Mismatch {
        /// The model.
        model: String,
        /// What does not fit; `field` says which topology field.
        problem: String,
        /// The topology field the problem is about (`features`, `scores[0].output`, ...).
        field: String,
    },
    /// A run failed.
    #[error("model {model}: inference failed: {reason}")]
    Run {
        /// The model.
        model: String,
        /// ONNX Runtime's message.
        reason: String,
    },
}

/// What a model is, as the processor reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Name from the topology.
    pub name: String,
    /// The model's `version` metadata, else `digest-` and a 64-bit hash of the file, in hex.
    pub version: String,
    /// Input tensor name.
    pub input: String,
    /// Number of input columns.
    pub width: usize,
    /// The drift reference stored with the model, if it has a valid one.
    pub reference: Option<std::sync::Arc<Reference>>,
}

/// One model's session and how its outputs become scores.
pub struct ScoringSession {
    session: Session,
    info: ModelInfo,
    /// (output name, column) per score, in topology order.
    scores: Vec<(String, usize)>,
}

/// The version of a model without `version` metadata: `digest-` and the XXH3-64 of the file
/// in hex. A specified hash, so the same file has the same version in every build and release
/// (it is written into every scored record).
pub fn file_digest(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    format!("digest-{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
}

impl ScoringSession {
    /// Opens `path` for `model`, with its execution provider. ONNX Runtime must be loaded.
    pub fn open(model: &Model, path: &Path) -> Result<Self, ScorerError> {
        let session = Self::load(model, path)?;
        let (input, width) = Self::input(model, &session)?;
        let scores = Self::scores(model, &session)?;
        let (version, reference) = Self::metadata(model, path, &session, width);
        let info = ModelInfo {
            name: model.name.clone(),
            version,
            input,
            width,
            reference,
        };
        Ok(ScoringSession {
            session,
            info,
            scores,
        })
    }

    /// Names the version it is (a version directory's name, which takes precedence over the
    /// model's metadata).
    pub fn set_version(&mut self, version: &str) {
        self.info.version = version.to_string();
    }

    /// The session, with the model's execution provider (CUDA refused, with the reason, where
    /// the runtime cannot give it; never a silent CPU fallback).
    fn load(model: &Model, path: &Path) -> Result<Session, ScorerError> {
        Self::load_profiled(model, path, None)
    }

    /// [`Self::load`], with ONNX Runtime's profiler writing to files named from `profile`.
    pub(super) fn load_profiled(
        model: &Model,
        path: &Path,
        profile: Option<&Path>,
    ) -> Result<Session, ScorerError> {
        let env =
            runtime::environment().map_err(|e| ScorerError::Runtime(std::sync::Arc::new(e)))?;
        let name = model.name.clone();
        let load_err = |reason: String| ScorerError::Load {
            model: name.clone(),
            path: path.to_path_buf(),
            reason,
        };
        let mut builder = Session::builder(env)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::Level3)
                    .map_err(Into::into)
            })
            // One thread per session: parallelism comes from workers, each owning a session.
            .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
            .map_err(|e| load_err(e.to_string()))?;
        if let Some(prefix) = profile {
            builder = builder
                .with_profiling(prefix)
                .map_err(|e| load_err(e.to_string()))?;
        }
        if model.execution_provider == ExecutionProvider::Cuda {
            let compiled = ep::CUDA::is_available().unwrap_or(false);
            if !compiled {
                return Err(ScorerError::Cuda {
                    model: name,
                    reason: "this ONNX Runtime build has no CUDA execution provider (use the onnxruntime-gpu build, with CUDA 13 and cuDNN 9, via ORT_DYLIB_PATH)".into(),
                });
            }
            builder = builder
                .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| ScorerError::Cuda {
                    model: name.clone(),
                    reason: e.to_string(),
                })?;
        }
        builder
            .commit_from_file(path)
            .map_err(|e| load_err(e.to_string()))
    }

    fn mismatch(model: &Model, field: &str, problem: String) -> ScorerError {
        ScorerError::Mismatch {
            model: model.name.clone(),
            problem,
            field: field.into(),
        }
    }

    /// The model's one input, `[rows, features]` with as many columns as features listed: its
    /// name and width.
    fn input(model: &Model, session: &Session) -> Result<(String, usize), ScorerError> {
        let mismatch = |field: &str, problem: String| Self::mismatch(model, field, problem);
        let [input] = session.inputs() else {
            return Err(mismatch(
                "path",
                format!(
                    "the model has {} inputs; kscore feeds exactly one `[rows, features]` float tensor",
                    session.inputs().len()
                ),
            ));
        };
        let shape = input
            .dtype()
            .tensor_shape()
            .map(|s| s.to_vec())
            .unwrap_or_default();
        let width = match shape.as_slice() {
            [_, w] if *w > 0 => *w as usize,
            other => {
                return Err(mismatch(
                    "path",
                    format!(
                        "input `{}` has shape {other:?}; expected [rows, features]",
                        input.name()
                    ),
                ));
            }
        };
        if width != model.features.len() {
            return Err(mismatch(
                "features",
                format!(
                    "the model's input `{}` takes {width} columns but {} features are listed",
                    input.name(),
                    model.features.len()
                ),
            ));
        }
        Ok((input.name().to_string(), width))
    }

    /// (output, column) per score, each a float32 tensor's existing column.
    fn scores(model: &Model, session: &Session) -> Result<Vec<(String, usize)>, ScorerError> {
        let mismatch = |field: &str, problem: String| Self::mismatch(model, field, problem);
        let mut scores = Vec::new();
        for (i, s) in model.scores.iter().enumerate() {
            let Some(out) = session.outputs().iter().find(|o| o.name() == s.output) else {
                let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
                return Err(mismatch(
                    &format!("scores[{i}].output"),
                    format!("no output `{}` (the model has {names:?})", s.output),
                ));
            };
            // Scores are read as float32 tensors: another type would fail every batch.
            match out.dtype().tensor_type() {
                Some(ort::value::TensorElementType::Float32) => {}
                other => {
                    return Err(mismatch(
                        &format!("scores[{i}].output"),
                        format!(
                            "output `{}` is {}; scores are read from float32 tensors",
                            s.output,
                            other.map_or("not a tensor".to_string(), |t| format!("a {t:?} tensor"))
                        ),
                    ));
                }
            }
            let shape = out
                .dtype()
                .tensor_shape()
                .map(|s| s.to_vec())
                .unwrap_or_default();
            let columns = match shape.as_slice() {
                [_] => 1,
                [_, c] if *c > 0 => *c as usize,
                other => {
                    return Err(mismatch(
                        &format!("scores[{i}].output"),
                        format!(
                            "output `{}` has shape {other:?}; expected [rows] or [rows, columns]",
                            s.output
                        ),
                    ));
                }
            };
            if s.column >= columns {
                return Err(mismatch(
                    &format!("scores[{i}].column"),
                    format!(
                        "output `{}` has {columns} column(s); column {} does not exist",
                        s.output, s.column
                    ),
                ));
            }
            scores.push((s.output.clone(), s.column));
        }
        Ok(scores)
    }

    /// The model's version (its `version` metadata, else a digest of the file) and its drift
    /// reference (a warning, and none, where it is invalid).
    fn metadata(
        model: &Model,
        path: &Path,
        session: &Session,
        width: usize,
    ) -> (String, Option<std::sync::Arc<Reference>>) {
        let name = &model.name;
        let metadata = session.metadata().ok();
        let version = metadata
            .as_ref()
            .and_then(|m| m.custom("version"))
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| file_digest(path));
        let reference = match metadata.as_ref().and_then(|m| m.custom(REFERENCE_KEY)) {
            None => None,
            Some(json) => match Reference::parse(&json, width) {
                Ok(r) => Some(std::sync::Arc::new(r)),
                Err(e) => {
                    tracing::warn!(model = %name, path = %path.display(),
                        "metadata `{REFERENCE_KEY}` is invalid ({e}); no drift index for this model");
                    None
                }
            },
        };
        drop(metadata);
        (version, reference)
    }

    /// The model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Scores `rows` (row-major, `width` columns). Returns one vector per score, one value per row.
    pub fn score(&mut self, rows: &[f32]) -> Result<Vec<Vec<f64>>, ScorerError> {
        let n = rows.len() / self.info.width.max(1);
        let run_err = |reason: String| ScorerError::Run {
            model: self.info.name.clone(),
            reason,
        };
        let view = ArrayView2::from_shape((n, self.info.width), rows)
            .map_err(|e| run_err(e.to_string()))?;
        let tensor = TensorRef::from_array_view(view).map_err(|e| run_err(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.info.input.as_str() => tensor])
            .map_err(|e| ScorerError::Run {
                model: self.info.name.clone(),
                reason: e.to_string(),
            })?;
        let mut result = Vec::with_capacity(self.scores.len());
        for (output, column) in &self.scores {
            let (shape, data) = outputs[output.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(|e| ScorerError::Run {
                    model: self.info.name.clone(),
                    reason: format!("output {output}: {e}"),
                })?;
            let columns = if shape.len() == 2 {
                shape[1] as usize
            } else {
                1
            };
            let values: Vec<f64> = (0..n)
                .map(|r| f64::from(data.get(r * columns + column).copied().unwrap_or(f32::NAN)))
                .collect();
            result.push(values);
        }
        Ok(result)
    }
}
