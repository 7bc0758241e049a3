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
        t.models[0].batching.delay(),
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

/// The problems of `toml` (none when it loads).
fn problems_of(toml: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    match load(&write(dir.path(), toml)) {
        Ok(_) => Vec::new(),
        Err(TopologyError::Invalid { problems, .. }) => {
            problems.iter().map(ToString::to_string).collect()
        }
        Err(e) => vec![e.to_string()],
    }
}

/// Topologies that would send every record to the dead-letter topic are refused at load, each
/// with the field and the reason.
#[test]
fn settings_that_would_dead_letter_every_record_are_refused() {
    let cases: Vec<(String, &str)> = vec![
        // An event time that is not a long or a timestamp.
        (
            GOOD.replace(
                r#"event_time_field = "event_time""#,
                r#"event_time_field = "card_present""#,
            ),
            "input.event_time_field: `card_present` must be a `long`",
        ),
        // A key that is not text.
        (
            GOOD.replace(r#"key_field = "card_id""#, r#"key_field = "card_present""#),
            "input.key_field: `card_present` must be a string, uuid or enum field",
        ),
        (
            GOOD.replace(r#"key_field = "card_id""#, r#"key_field = "amount_minor""#),
            "input.key_field: `amount_minor` must be a string, uuid or enum field",
        ),
        // A dot in a model or score name: rules name scores `<model>.<score>`.
        (
            GOOD.replace(r#"name = "m""#, r#"name = "m.v2""#)
                .replace(r#"score = "m.fraud""#, r#"score = "m.v2.fraud""#),
            "model[0] (m.v2).name: must not contain `.`",
        ),
        (
            GOOD.replace(r#"{ name = "fraud", output"#, r#"{ name = "fraud.p", output"#)
                .replace(r#"score = "m.fraud""#, r#"score = "m.fraud.p""#),
            "model[0] (m).scores[0].name: must not contain `.`",
        ),
        // `equals` that can never match.
        (
            GOOD.replace(
                "[[model]]",
                "[[feature]]\nname = \"big\"\naggregation = \"equals\"\nfield = \"amount_minor\"\nequals = \"lots\"\n\n[[model]]",
            ),
            "feature[4] (big).equals: `amount_minor` is numeric; `lots` is not a number",
        ),
        (
            GOOD.replace(
                "[[model]]",
                "[[feature]]\nname = \"crypto\"\naggregation = \"equals\"\nfield = \"channel\"\nequals = \"CRYPTO\"\n\n[[model]]",
            ),
            "feature[4] (crypto).equals: `CRYPTO` is not a symbol of `channel` (POS, ECOMMERCE, ATM, MOTO)",
        ),
        // A batching delay too long to mean anything (and to add to a clock reading).
        (
            GOOD.replace(r#"max_delay = "2ms""#, r#"max_delay = "100years""#),
            "model[0] (m).batching.max_delay: must be at most 1m",
        ),
        // A fixed delay and a latency budget: one or the other.
        (
            GOOD.replace(r#"max_delay = "2ms""#, r#"max_delay = "2ms", latency_budget = "20ms""#),
            "model[0] (m).batching.latency_budget: set either max_delay (a fixed delay) or latency_budget (a delay and batch size adapted to it), not both",
        ),
        (
            GOOD.replace(r#"max_delay = "2ms""#, r#"latency_budget = "0ms""#),
            "model[0] (m).batching.latency_budget: must be more than 0 (a row needs time to be scored)",
        ),
        // A commit interval the transaction timeout (60 s) would cut short.
        (
            GOOD.replace(r#"commit_interval = "100ms""#, r#"commit_interval = "5m""#),
            "delivery.commit_interval: must be at most 30s",
        ),
    ];
    for (toml, want) in cases {
        let got = problems_of(&toml);
        assert!(
            got.iter().any(|p| p.starts_with(want)),
            "want `{want}`, got {got:?}"
        );
    }
    assert_eq!(problems_of(GOOD), Vec::<String>::new());
}

/// An `int`, `float` or `double` event-time field is refused: event times are read from
/// `long`s (milliseconds, `timestamp-millis`, `timestamp-micros`) only.
#[test]
fn a_numeric_event_time_that_is_not_a_long_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("reading.avsc"),
        r#"{"type": "record", "name": "Reading", "fields": [
            {"name": "sensor", "type": "string"},
            {"name": "at_s", "type": "int"},
            {"name": "at_f", "type": "double"},
            {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "at_opt", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]}]}"#,
    )
    .expect("schema");
    let topology = |field: &str| {
        format!(
            "name = \"r\"\n[input]\ntopic = \"in\"\ngroup = \"g\"\nkey_field = \"sensor\"\n\
             event_time_field = \"{field}\"\nschema = \"reading.avsc\"\n\
             [output]\nscored_topic = \"s\"\ndead_letter_topic = \"d\"\n"
        )
    };
    for (field, ok) in [
        ("at_s", false),
        ("at_f", false),
        ("at_us", true),
        ("at_opt", true),
    ] {
        let file = dir.path().join(format!("{field}.toml"));
        std::fs::write(&file, topology(field)).expect("topology");
        let result = load(&file);
        assert_eq!(
            result.is_ok(),
            ok,
            "{field}: {:?}",
            result.err().map(|e| e.to_string())
        );
        if !ok {
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                message.contains(&format!(
                    "input.event_time_field: `{field}` must be a `long`"
                )),
                "{message}"
            );
        }
    }
}
