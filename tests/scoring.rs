//! The shipped models through kscore's scorer: the stored reference batch gives exactly the
//! scores Python onnxruntime gave (within 1e-6); a model that does not fit its topology entry
//! and a `cuda` provider the runtime cannot give are refused with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use kscore::scorer::{ScorerError, ScoringSession, runtime};
use kscore::topology;

fn fraud() -> topology::Loaded {
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    topology::load(Path::new("topologies/fraud.toml")).expect("shipped topology is valid")
}

#[test]
fn shipped_models_reproduce_the_reference_scores() {
    let loaded = fraud();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("models/reference_scores.json").expect("reference"),
    )
    .expect("json");
    for (model, path) in loaded.topology.models.iter().zip(&loaded.model_paths) {
        let r = &reference[&model.name];
        let names: Vec<&str> = r["features"]
            .as_array()
            .expect("features")
            .iter()
            .map(|v| v.as_str().expect("name"))
            .collect();
        assert_eq!(
            names,
            model
                .features
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            "{}: feature order",
            model.name
        );
        let rows: Vec<f32> = r["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .expect("row")
                    .iter()
                    .map(|v| v.as_f64().expect("f") as f32)
            })
            .collect();
        let want: Vec<f64> = r["scores"]
            .as_array()
            .expect("scores")
            .iter()
            .map(|v| v.as_f64().expect("f"))
            .collect();

        let mut session = ScoringSession::open(model, path).expect("opens");
        assert!(
            session
                .info()
                .version
                .starts_with(&format!("{}-", model.name)),
            "{}",
            session.info().version
        );
        let got = session.score(&rows).expect("scores");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), want.len());
        for (i, (g, w)) in got[0].iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6, "{} row {i}: {g} vs {w}", model.name);
        }
        // Row by row gives the same as the batch: batching never changes a score.
        let width = model.features.len();
        for i in [0, 17, 63] {
            let one = session
                .score(&rows[i * width..(i + 1) * width])
                .expect("one row");
            assert!((one[0][0] - got[0][i]).abs() <= 1e-6);
        }
    }
}

#[test]
fn a_model_that_does_not_fit_its_entry_is_refused_with_the_field() {
    let loaded = fraud();
    let mut model = loaded.topology.models[0].clone();
    model.features.pop();
    match ScoringSession::open(&model, &loaded.model_paths[0]) {
        Err(ScorerError::Mismatch { field, problem, .. }) => {
            assert_eq!(field, "features");
            assert_eq!(
                problem,
                "the model's input `features` takes 21 columns but 20 features are listed"
            );
        }
        other => panic!(
            "expected a mismatch, got {:?}",
            other.map(|s| s.info().clone())
        ),
    }
    let mut model = loaded.topology.models[1].clone();
    model.scores[0].output = "score".into();
    match ScoringSession::open(&model, &loaded.model_paths[1]) {
        Err(ScorerError::Mismatch { field, .. }) => assert_eq!(field, "scores[0].output"),
        other => panic!(
            "expected a mismatch, got {:?}",
            other.map(|s| s.info().clone())
        ),
    }
}

#[test]
fn cuda_is_refused_where_the_runtime_cannot_provide_it_never_silently_cpu() {
    let loaded = fraud();
    let mut model = loaded.topology.models[1].clone();
    model.execution_provider = kscore::topology::config::ExecutionProvider::Cuda;
    match ScoringSession::open(&model, &loaded.model_paths[1]) {
        Err(e @ ScorerError::Cuda { .. }) => {
            assert!(e.to_string().contains("no CUDA execution provider"), "{e}")
        }
        Err(e) => panic!("expected a CUDA error, got {e}"),
        Ok(_) => panic!("a CPU-only runtime must not accept cuda"),
    }
}
