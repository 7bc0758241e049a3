use super::*;

fn write(dir: &Path, toml: &str) -> PathBuf {
    std::fs::write(dir.join("payment.avsc"), crate::schemas::PAYMENT_AVSC).expect("schema");
    std::fs::write(dir.join("m.onnx"), b"placeholder").expect("model");
    let file = dir.join("t.toml");
    std::fs::write(&file, toml).expect("topology");
    file
}

const GOOD: &str = r#"
name = "fraud"
[input]
topic = "payments"
group = "g"
key_field = "card_id"
event_time_field = "event_time"
schema = "payment.avsc"

[[feature]]
name = "amount"
aggregation = "value"
field = "amount_minor"

[[feature]]
name = "count_1h"
aggregation = "count"
window = "1h"

[[feature]]
name = "merchants_1d"
aggregation = "distinct_count"
field = "merchant_id"
window = "1d"

[[feature]]
name = "since_last"
aggregation = "time_since_last"
default = -1.0

[[model]]
name = "m"
path = "m.onnx"
features = ["amount", "count_1h", "merchants_1d", "since_last"]
scores = [{ name = "fraud", output = "probabilities", column = 1 }]
batching = { max_rows = 64, max_delay = "2ms" }

[[alert]]
name = "high"
score = "m.fraud"
threshold = 0.9
decision = "BLOCK"

[output]
scored_topic = "scored"
alerts_topic = "alerts"
dead_letter_topic = "dlq"

[delivery]
commit_interval = "100ms"
"#;

#[test]
fn a_good_topology_loads_with_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loaded = load(&write(dir.path(), GOOD)).expect("valid");
    let t = &loaded.topology;
    assert_eq!(t.features.len(), 4);
    assert_eq!(
        t.features[2].window,
        Some(std::time::Duration::from_secs(86_400))
    );
    assert_eq!(
        t.models[0].batching.max_delay,
        std::time::Duration::from_millis(2)
    );
    assert_eq!(
        t.models[0].execution_provider,
        config::ExecutionProvider::Cpu
    );
    assert_eq!(t.delivery.guarantee, config::Guarantee::ExactlyOnce);
    assert_eq!(t.state.max_events_per_key, 1_000);
    assert_eq!(loaded.model_paths, vec![dir.path().join("m.onnx")]);
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let bad = GOOD
        .replace(r#"key_field = "card_id""#, r#"key_field = "card""#)
        .replace(
            r#"window = "1h""#,
            r#"window = "1h"
field = "amount_minor""#,
        )
        .replace(
            r#"field = "merchant_id"
window = "1d""#,
            r#"field = "merchant_id""#,
        )
        .replace(
            r#"features = ["amount", "count_1h", "merchants_1d", "since_last"]"#,
            r#"features = ["amount", "nope"]"#,
        )
        .replace(r#"score = "m.fraud""#, r#"score = "m.other""#)
        .replace(r#"scored_topic = "scored""#, r#"scored_topic = "payments""#);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), &bad);
    let Err(TopologyError::Invalid { problems, .. }) = load(&file) else {
        panic!("expected problems")
    };
    let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        vec![
            "output.scored_topic: must differ from the input topic `payments`",
            "input.key_field: the schema has no field `card`",
            "feature[1] (count_1h).field: not used by this aggregation",
            "feature[2] (merchants_1d).window: this aggregation needs a window, e.g. \"1h\"",
            "model[0] (m).features[1]: no feature named `nope`",
            "alert[0] (high).score: no score `m.other` (write `<model>.<score>`)",
        ]
    );
    let message = load(&file).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains(&format!(
            "{}: input.key_field: the schema has no field `card`",
            file.display()
        )),
        "{message}"
    );
}

#[test]
fn unknown_fields_and_bad_durations_name_the_key_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        &GOOD.replace(
            "commit_interval = \"100ms\"",
            "commit_interval = \"soon\"\nretries = 3",
        ),
    );
    let message = load(&file).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.starts_with(&file.display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("commit_interval") || message.contains("retries"),
        "{message}"
    );
    assert!(message.contains("line"), "{message}");
}

#[test]
fn the_changelog_topic_defaults_from_the_group_and_must_be_a_topic_of_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loaded = load(&write(dir.path(), GOOD)).expect("valid");
    assert_eq!(loaded.topology.changelog_topic(), "g-features-changelog");

    let bad = GOOD.replace("[output]", "[state]\nchangelog_topic = \"dlq\"\n[output]");
    let err = load(&write(dir.path(), &bad))
        .expect_err("invalid")
        .to_string();
    assert!(
        err.contains("state.changelog_topic") && err.contains("`dlq` is also an output topic"),
        "{err}"
    );
}
