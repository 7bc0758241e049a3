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
    problems_of_in(dir.path(), toml)
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

/// `GOOD` with a second model entry after the first.
fn with_model(entry: &str) -> String {
    GOOD.replace("[[alert]]", &format!("{entry}\n\n[[alert]]"))
}

/// Canaries and shadows stand beside a primary and give its scores; each problem names the
/// field.
#[test]
fn canaries_and_shadows_are_checked_against_their_primary() {
    let model = |extra: &str, scores: &str| {
        with_model(&format!(
            "[[model]]\nname = \"next\"\npath = \"m.onnx\"\nfeatures = [\"amount\"]\nscores = [{scores}]\n{extra}"
        ))
    };
    let same = r#"{ name = "fraud", output = "probabilities", column = 1 }"#;
    let good_canary = model("role = \"canary\"\nof = \"m\"\nshare = 0.05", same);
    assert_eq!(problems_of(&good_canary), Vec::<String>::new());
    let good_shadow = model("role = \"shadow\"", r#"{ name = "other", output = "y" }"#);
    assert_eq!(problems_of(&good_shadow), Vec::<String>::new());
    let cases: Vec<(String, &str)> = vec![
        (
            model("role = \"canary\"\nof = \"m\"", same),
            "model[1] (next).share: a canary needs the share of keys it decides for",
        ),
        (
            model("role = \"canary\"\nof = \"m\"\nshare = 1.5", same),
            "model[1] (next).share: must be more than 0 and at most 1, not 1.5",
        ),
        (
            model("role = \"canary\"\nshare = 0.1", same),
            "model[1] (next).of: a canary needs the primary it decides instead of",
        ),
        (
            model("role = \"canary\"\nof = \"nope\"\nshare = 0.1", same),
            "model[1] (next).of: no model named `nope`",
        ),
        (
            model(
                "role = \"canary\"\nof = \"m\"\nshare = 0.1",
                r#"{ name = "risk", output = "probabilities", column = 1 }"#,
            ),
            "model[1] (next).scores: a canary must give its primary's scores, by name and in order: [\"fraud\"]",
        ),
        (
            model("share = 0.1", same),
            "model[1] (next).share: only a canary has a share (this model is a primary)",
        ),
        (
            model("of = \"m\"", same),
            "model[1] (next).of: only a canary or a shadow stands beside a primary",
        ),
        (
            model("role = \"shadow\"\nof = \"m\"\nshare = 0.5", same),
            "model[1] (next).share: only a canary has a share (this model is a shadow)",
        ),
        (
            model("role = \"boss\"", same),
            "unknown variant `boss`, expected one of `primary`, `shadow`, `canary`",
        ),
        // Rules read primaries only.
        (
            model("role = \"shadow\"", same)
                .replace(r#"score = "m.fraud""#, r#"score = "next.fraud""#),
            "alert[0] (high).score: `next` is a shadow: rules name primaries' scores",
        ),
        // A version needs a directory of versions.
        (
            GOOD.replace(r#"path = "m.onnx""#, "path = \"m.onnx\"\nversion = \"2\""),
            "model[0] (m).version: `version` needs a directory of versions",
        ),
        (
            GOOD.replace(
                r#"commit_interval = "100ms""#,
                "commit_interval = \"100ms\"\n\n[reload]\nwatch = true\npoll_interval = \"1ms\"",
            ),
            "reload.poll_interval: must be between 100ms and 1h",
        ),
    ];
    for (toml, want) in cases {
        let got = problems_of(&toml);
        assert!(
            got.iter().any(|p| p.contains(want)),
            "want `{want}`, got {got:?}"
        );
    }
    // A second canary of the same primary.
    let two = with_model(&format!(
        "[[model]]\nname = \"a\"\npath = \"m.onnx\"\nfeatures = [\"amount\"]\nscores = [{same}]\nrole = \"canary\"\nof = \"m\"\nshare = 0.1\n\n\
         [[model]]\nname = \"b\"\npath = \"m.onnx\"\nfeatures = [\"amount\"]\nscores = [{same}]\nrole = \"canary\"\nof = \"m\"\nshare = 0.1"
    ));
    assert_eq!(
        problems_of(&two),
        vec!["model[2] (b).of: `m` has a canary already".to_string()]
    );
}

/// A directory of versions serves the highest whole-numbered version holding a `model.onnx`,
/// or the one `version` names.
#[test]
fn a_directory_of_versions_serves_the_newest_or_the_pinned_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("fraud");
    for v in ["1", "2", "10", "latest"] {
        std::fs::create_dir_all(repo.join(v)).expect("version dir");
        std::fs::write(repo.join(v).join("model.onnx"), v).expect("model");
    }
    // A version being written, without its model yet, is not served.
    std::fs::create_dir_all(repo.join("11")).expect("version dir");
    let file = write(
        dir.path(),
        &GOOD.replace(r#"path = "m.onnx""#, r#"path = "fraud""#),
    );
    let loaded = load(&file).expect("loads");
    assert_eq!(loaded.model_paths[0], repo.join("10").join("model.onnx"));
    assert_eq!(loaded.model_versions[0].as_deref(), Some("10"));
    let pinned = write(
        dir.path(),
        &GOOD.replace(r#"path = "m.onnx""#, "path = \"fraud\"\nversion = \"2\""),
    );
    let loaded = load(&pinned).expect("loads");
    assert_eq!(loaded.model_paths[0], repo.join("2").join("model.onnx"));
    assert_eq!(loaded.model_versions[0].as_deref(), Some("2"));
    let missing = GOOD.replace(r#"path = "m.onnx""#, "path = \"fraud\"\nversion = \"3\"");
    let got = problems_of_in(dir.path(), &missing);
    assert!(
        got.iter()
            .any(|p| p.starts_with("model[0] (m).version: version 3: ")
                && p.ends_with("does not exist")),
        "{got:?}"
    );
}

fn problems_of_in(dir: &Path, toml: &str) -> Vec<String> {
    match load(&write(dir, toml)) {
        Ok(_) => Vec::new(),
        Err(TopologyError::Invalid { problems, .. }) => {
            problems.iter().map(ToString::to_string).collect()
        }
        Err(e) => vec![e.to_string()],
    }
}
