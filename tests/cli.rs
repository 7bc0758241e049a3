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

/// `kscore --help` gives each subcommand its own description.
#[test]
fn help_describes_each_subcommand() {
    let out = Command::new(env!("CARGO_BIN_EXE_kscore"))
        .arg("--help")
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    let line = |cmd: &str| {
        help.lines()
            .find(|l| l.trim_start().starts_with(&format!("{cmd} ")))
            .map(|l| l.trim_start()[cmd.len()..].trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        line("passthrough"),
        "Benchmark baseline: copy a topic to another in transactions, nothing else",
        "{help}"
    );
    assert_eq!(
        line("features"),
        "Compute a topology's features over a file of events, offline (for training)",
        "{help}"
    );
}

/// ONNX Runtime's own logs (graph optimiser, session options) stay at `warn` unless asked
/// for, also when `RUST_LOG` sets the level for everything else.
#[test]
fn onnx_runtime_chatter_stays_out_of_info_logs() {
    for filter in ["info", "debug,librdkafka=off"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kscore"))
            .args(["validate", "topologies/fraud.toml"])
            .env("RUST_LOG", filter)
            .output()
            .expect("runs");
        let logs = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{logs}");
        let chatter = logs.lines().filter(|l| l.contains("ort::")).count();
        assert_eq!(chatter, 0, "RUST_LOG={filter}:\n{logs}");
    }
    // Asked for, they are there.
    let out = Command::new(env!("CARGO_BIN_EXE_kscore"))
        .args(["validate", "topologies/fraud.toml"])
        .env("RUST_LOG", "info,ort=info")
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ort::"));
}

/// `scripts/stack.sh install` leaves an installed broker alone (it used to reinstall it on
/// every start: `pip show | grep -q` under `pipefail`).
#[test]
fn the_stack_script_does_not_reinstall_what_is_installed() {
    let run = || {
        Command::new("scripts/stack.sh")
            .arg("install")
            .output()
            .expect("runs")
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = run();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{said}");
    assert!(!said.contains("installing"), "{said}");
}
