//! The command line as a user meets it: `kscore validate` on the shipped topology, and on one
//! whose model does not fit its feature list (checked with ONNX Runtime, no broker needed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn validate(topology: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kscore"))
        .arg("validate")
        .arg(topology)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_shipped_topology_validates() {
    let (ok, output) = validate(Path::new("topologies/fraud.toml"));
    assert!(ok, "{output}");
    assert!(
        output.contains("topologies/fraud.toml: ok (21 features, 2 models, 3 alert rules)"),
        "{output}"
    );
}

#[test]
fn a_model_input_width_mismatch_is_reported_with_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["topologies", "schemas", "models"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    std::fs::copy(
        "schemas/payment.avsc",
        dir.path().join("schemas/payment.avsc"),
    )
    .unwrap();
    for m in ["fraud_gbt.onnx", "anomaly_ae.onnx"] {
        std::fs::copy(
            Path::new("models").join(m),
            dir.path().join("models").join(m),
        )
        .unwrap();
    }
    let text = std::fs::read_to_string("topologies/fraud.toml").unwrap();
    let broken = text.replacen(r#""amount", "count_10m","#, r#""count_10m","#, 1);
    assert_ne!(broken, text, "the edit applies");
    let file = dir.path().join("topologies/fraud.toml");
    std::fs::write(&file, broken).unwrap();
    let (ok, output) = validate(&file);
    assert!(!ok);
    assert!(
        output.contains(&format!(
            "{}: model[1] (anomaly_ae).features: the model's input `features` takes 10 columns but 9 features are listed",
            file.display()
        )),
        "{output}"
    );
}
