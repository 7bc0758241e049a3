//! Shipping a new model without stopping the stream, against the local stack with `kscore run`
//! as a child process under simulated load:
//! - a new version directory is picked up by the watcher, a broken one refused, and a rollback
//!   (the topology pinning the old version) switched to; a SIGKILL and restart after it; every
//!   record is scored exactly once, by one version that it names, with that version's scores,
//!   and each partition sees the versions in the order they were loaded;
//! - a canary takes its share of keys (by XXH3-64 of the card id, recomputed here), the share
//!   raised by `POST /admin/models/reload` mid-run; a shadow is scored on every record and
//!   never decides.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use common::harness::{self, Instances, LogDir, Pipeline};
use common::{field, free_port, http_get, http_post, metric_sum};
use kscore::cluster::ClusterArgs;
use kscore::scorer::ScoringSession;

const TOKEN: &str = "reload-test-token-7f3a";

/// One scored record, as these tests look at it.
struct Seen {
    card: String,
    features: BTreeMap<String, f64>,
    /// Per score entry: (model, version, role, score, value).
    scores: Vec<(String, String, String, String, f64)>,
    decision: String,
}

fn string(v: &Value) -> String {
    match v {
        Value::String(s) | Value::Enum(_, s) => s.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

/// The committed scored records of `p`, by input (partition, offset); none dead-lettered.
fn scored(cluster: &ClusterArgs, p: &Pipeline, expected: usize) -> BTreeMap<(i64, i64), Seen> {
    let records = common::read(
        cluster,
        &p.scored,
        "read_committed",
        expected,
        Duration::from_secs(60),
    );
    let mut out = BTreeMap::new();
    for r in records {
        let v = common::scored_value(&r.payload);
        let source = common::provenance(&v);
        let Value::Map(features) = field(&v, "features") else {
            panic!("features")
        };
        let features = features
            .iter()
            .map(|(k, x)| match x {
                Value::Double(x) => (k.clone(), *x),
                other => panic!("feature {k}: {other:?}"),
            })
            .collect();
        let Value::Array(items) = field(&v, "scores") else {
            panic!("scores")
        };
        let scores = items
            .iter()
            .map(|s| {
                let Value::Double(x) = field(s, "value") else {
                    panic!("value")
                };
                (
                    string(field(s, "model")),
                    string(field(s, "version")),
                    string(field(s, "role")),
                    string(field(s, "score")),
                    *x,
                )
            })
            .collect();
        let seen = Seen {
            card: string(field(field(&v, "event"), "card_id")),
            features,
            scores,
            decision: string(field(&v, "decision")),
        };
        assert!(
            out.insert(source, seen).is_none(),
            "{source:?} scored twice"
        );
    }
    assert_eq!(out.len(), expected, "scored records");
    let dead = common::read(cluster, &p.dlq, "read_committed", 0, Duration::from_secs(3));
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    out
}

/// The fraud models, opened in this process to score records' features again: the shipped
/// classifier and the test's logistic regression (`tests/models/fraud_linear.onnx`).
struct Models {
    features: Vec<String>,
    gbt: ScoringSession,
    linear: ScoringSession,
}

impl Models {
    fn open() -> Self {
        kscore::scorer::runtime::init(None).unwrap();
        let loaded = kscore::topology::load(Path::new("topologies/fraud.toml")).unwrap();
        let entry = loaded.topology.models[0].clone();
        Models {
            features: entry.features.clone(),
            gbt: ScoringSession::open(&entry, &loaded.model_paths[0]).unwrap(),
            linear: ScoringSession::open(&entry, Path::new("tests/models/fraud_linear.onnx"))
                .unwrap(),
        }
    }

    /// (the classifier's, the regression's) fraud score of a record's features.
    fn score(&mut self, seen: &Seen) -> (f64, f64) {
        let row: Vec<f32> = self
            .features
            .iter()
            .map(|f| seen.features[f] as f32)
            .collect();
        (
            self.gbt.score(&row).unwrap()[0][0],
            self.linear.score(&row).unwrap()[0][0],
        )
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * a.abs().max(1e-3)
}

/// The shipped topology on topics of its own, its text changed by `edit`.
fn topology(dir: &Path, input: &str, name: &str, edit: impl Fn(String) -> String) -> Pipeline {
    let p = harness::pipeline(dir, input, name, &common::run_id());
    let text = std::fs::read_to_string(&p.file).unwrap();
    std::fs::write(&p.file, edit(text)).unwrap();
    p
}

fn root() -> PathBuf {
    std::env::current_dir().unwrap()
}

/// Puts `model` into `repo` as version `v`, as a deployment should: written aside, then
/// renamed into place in one step.
fn deploy(repo: &Path, v: &str, model: &[u8]) {
    let aside = repo.join(format!(".incoming-{v}"));
    std::fs::create_dir_all(&aside).unwrap();
    std::fs::write(aside.join("model.onnx"), model).unwrap();
    std::fs::rename(&aside, repo.join(v)).unwrap();
}

/// Waits for `what` to hold of the instance's `GET /models` listing.
fn wait_models(port: u16, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get(port, "/models");
        if status == 200 && ok(&serde_json::from_str(&body).unwrap()) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: /models says {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The version of the model named `name` in a `GET /models` listing.
fn version_of(listing: &serde_json::Value, name: &str) -> Option<String> {
    listing["models"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["version"].as_str().map(str::to_string))
}

fn start(instances: &mut Instances<'_>, id: &str, port: u16, token: &Path) {
    let addr = format!("127.0.0.1:{port}");
    instances.start_with(
        id,
        &[
            "--metrics-listen",
            &addr,
            "--admin-token-file",
            token.to_str().unwrap(),
        ],
    );
}

fn wait_some_committed(cluster: &ClusterArgs, input: &str, group: &str, at_least: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while common::committed_total(cluster, input, group) < at_least {
        assert!(Instant::now() < deadline, "fewer than {at_least} committed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A new version is loaded beside the old and scores from a cycle boundary on; a broken one is
/// refused while the one before keeps scoring; a rollback is the same reload with the old
/// version. A SIGKILL after it and a restart lose and repeat nothing.
#[test]
fn versions_switch_between_cycles_and_every_record_names_the_one_that_scored_it() {
    let cluster = ClusterArgs::from_env();
    let dir = LogDir::new();
    let run = common::run_id();
    let input = format!("reload-in-{run}");
    let repo = dir.path().join("fraud");
    deploy(
        &repo,
        "1",
        &std::fs::read(root().join("models/fraud_gbt.onnx")).unwrap(),
    );
    let fraud_path = format!("path = \"{}/models/fraud_gbt.onnx\"", root().display());
    let p = topology(dir.path(), &input, "reload", |t| {
        assert!(t.contains(&fraud_path));
        assert!(t.contains("watch = false\npoll_interval = \"5s\""));
        t.replace(&fraud_path, &format!("path = \"{}\"", repo.display()))
            .replace(
                "watch = false\npoll_interval = \"5s\"",
                "watch = true\npoll_interval = \"200ms\"",
            )
    });
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let port = free_port();
    let events: u64 = 16_000;
    let mut simulator = harness::simulate(&input, events, 1_600.0, 17, None);
    let mut instances = Instances::new(&p, dir.path());
    start(&mut instances, "a", port, &token);
    wait_models(port, "version 1 serves", |l| {
        version_of(l, "fraud_gbt").as_deref() == Some("1")
    });
    wait_some_committed(&cluster, &input, &p.group, 1_500);

    // A new version directory: the watcher loads it.
    deploy(
        &repo,
        "2",
        &std::fs::read(root().join("tests/models/fraud_linear.onnx")).unwrap(),
    );
    wait_models(port, "version 2 serves", |l| {
        version_of(l, "fraud_gbt").as_deref() == Some("2")
    });
    let after_v2 = common::committed_total(&cluster, &input, &p.group);
    wait_some_committed(&cluster, &input, &p.group, after_v2 + 1_500);

    // A broken one is refused; version 2 keeps scoring.
    deploy(&repo, "3", b"not an onnx model");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_sum(
        &http_get(port, "/metrics").1,
        "kscore_model_reloads_total{outcome=\"refused\"}",
    ) < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the broken version was not refused"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_models(port, "version 2 still serves", |l| {
        version_of(l, "fraud_gbt").as_deref() == Some("2")
    });

    // The endpoint wants the token.
    let reload = |headers: &str| {
        http_post(
            port,
            "/admin/models/reload",
            headers,
            Duration::from_secs(120),
        )
    };
    assert_eq!(reload("").0, 401);
    assert_eq!(reload("Authorization: Bearer wrong\r\n").0, 401);

    // Rollback: the topology pins version 1 (the watcher, or the request, reloads it).
    let text = std::fs::read_to_string(&p.file).unwrap();
    let pinned = format!("path = \"{}\"\nversion = \"1\"", repo.display());
    std::fs::write(
        &p.file,
        text.replace(&format!("path = \"{}\"", repo.display()), &pinned),
    )
    .unwrap();
    let (status, body) = reload(&format!("Authorization: Bearer {TOKEN}\r\n"));
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        answer["outcome"] == "switched" || answer["outcome"] == "unchanged",
        "{body}"
    );
    assert_eq!(
        version_of(&answer, "fraud_gbt").as_deref(),
        Some("1"),
        "{body}"
    );
    // Two switches (to 2, back to 1), counted as the loop makes them, between two cycles.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(port, "/metrics").1;
        let switched = metric_sum(&metrics, "kscore_model_reloads_total{outcome=\"switched\"}");
        if switched == 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline && switched < 2.0,
            "{switched} switches"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after_v1 = common::committed_total(&cluster, &input, &p.group);
    wait_some_committed(&cluster, &input, &p.group, after_v1 + 1_000);

    // A crash after the rollback: the restart loads what the topology names, version 1.
    instances.kill("a");
    start(&mut instances, "a", port, &token);
    harness::wait_input(&mut simulator, &mut instances);
    harness::finish(
        &cluster,
        &mut instances,
        &input,
        &p,
        Duration::from_secs(300),
    );

    let out = scored(&cluster, &p, events as usize);
    let mut models = Models::open();
    let mut by_partition: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    let mut anomaly_versions = std::collections::BTreeSet::new();
    for ((partition, offset), seen) in &out {
        let (model, version, role, score, value) = &seen.scores[0];
        assert_eq!(
            (model.as_str(), role.as_str(), score.as_str()),
            ("fraud_gbt", "primary", "fraud")
        );
        let (gbt, linear) = models.score(seen);
        let want = match version.as_str() {
            "1" => gbt,
            "2" => linear,
            other => panic!("{partition}/{offset}: version {other}"),
        };
        assert!(
            close(want, *value),
            "{partition}/{offset}: version {version} should score {want}, the record has {value} (the other version gives {})",
            if version == "1" { linear } else { gbt }
        );
        anomaly_versions.insert(seen.scores[1].1.clone());
        let versions = by_partition.entry(*partition).or_default();
        if versions.last() != Some(version) {
            versions.push(version.clone());
        }
    }
    // Each partition saw the versions in the order they were loaded: 1, then 2, then 1.
    for (partition, versions) in &by_partition {
        let order = ["1", "2", "1"];
        let mut at = 0;
        for v in versions {
            while at < order.len() && order[at] != v {
                at += 1;
            }
            assert!(
                at < order.len(),
                "partition {partition}: versions {versions:?}"
            );
        }
    }
    assert!(
        by_partition.values().any(|v| *v == ["1", "2", "1"]),
        "no partition saw all three: {by_partition:?}"
    );
    // The anomaly model was kept: one version throughout.
    assert_eq!(anomaly_versions.len(), 1, "{anomaly_versions:?}");
}

/// The canary bucket of a card, as the README defines it: XXH3-64 of the key's UTF-8 bytes,
/// modulo 10,000.
fn bucket(card: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(card.as_bytes()) % 10_000
}

/// A canary decides for its share of the keys (under its primary's name, with its own
/// version); its share is raised by `POST /admin/models/reload` mid-run, from a cycle boundary
/// on; a shadow is published on every record and decides nothing.
#[test]
fn a_canary_takes_its_share_of_keys_and_a_shadow_decides_nothing() {
    let cluster = ClusterArgs::from_env();
    let dir = LogDir::new();
    let run = common::run_id();
    let input = format!("canary-in-{run}");
    let linear = root().join("tests/models/fraud_linear.onnx");
    let loaded = kscore::topology::load(Path::new("topologies/fraud.toml")).unwrap();
    let features = format!("{:?}", loaded.topology.models[0].features);
    let entry = |name: &str, role: &str| {
        format!(
            "[[model]]\nname = \"{name}\"\n{role}\npath = \"{}\"\nfeatures = {features}\n\
             scores = [{{ name = \"fraud\", output = \"probabilities\", column = 1 }}]\n\n",
            linear.display()
        )
    };
    let canary = |share: &str| {
        entry(
            "fraud_next",
            &format!("role = \"canary\"\nof = \"fraud_gbt\"\nshare = {share}"),
        )
    };
    let shadow = entry("fraud_shadow", "role = \"shadow\"\nof = \"fraud_gbt\"");
    let decisions = "# --- decisions";
    let p = topology(dir.path(), &input, "canary", |t| {
        assert!(t.contains(decisions));
        t.replace(decisions, &format!("{}{shadow}{decisions}", canary("0.3")))
    });
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let port = free_port();
    let events: u64 = 12_000;
    let mut simulator = harness::simulate(&input, events, 1_600.0, 23, None);
    let mut instances = Instances::new(&p, dir.path());
    start(&mut instances, "a", port, &token);
    wait_some_committed(&cluster, &input, &p.group, 3_000);

    let loaded_at = |listing: &serde_json::Value| {
        listing["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "fraud_next")
            .map(|m| m["loaded_at"].clone())
            .unwrap()
    };
    let before = loaded_at(&serde_json::from_str(&http_get(port, "/models").1).unwrap());
    // Raise the share; the request answers once the new set is loaded.
    let text = std::fs::read_to_string(&p.file).unwrap();
    std::fs::write(&p.file, text.replace("share = 0.3", "share = 0.6")).unwrap();
    let (status, body) = http_post(
        port,
        "/admin/models/reload",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
        Duration::from_secs(120),
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["outcome"], "switched", "{body}");
    let next = answer["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "fraud_next")
        .unwrap()
        .clone();
    assert_eq!(
        (next["role"].as_str(), next["share"].as_f64()),
        (Some("canary"), Some(0.6))
    );
    // A share is the set's: the canary's session was kept, not loaded again.
    assert_eq!(loaded_at(&answer), before, "{body}");
    // `kscore models` shows the same, one line per model.
    let listing = std::process::Command::new(env!("CARGO_BIN_EXE_kscore"))
        .args(["models", "--endpoint", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(listing.status.success(), "{listing:?}");
    let listing = String::from_utf8(listing.stdout).unwrap();
    let line = |name: &str| {
        listing
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.first() == Some(&name))
            .unwrap_or_else(|| panic!("no {name} in\n{listing}"))
    };
    assert_eq!(
        line("name")[..5],
        ["name", "version", "role", "of", "share"]
    );
    assert_eq!(
        line("fraud_next")[1..5],
        ["linear-1", "canary", "fraud_gbt", "0.6"]
    );
    assert_eq!(
        line("fraud_shadow")[1..5],
        ["linear-1", "shadow", "fraud_gbt", "-"]
    );
    assert_eq!(line("fraud_gbt")[2..5], ["primary", "-", "-"]);
    harness::wait_input(&mut simulator, &mut instances);
    common::wait_committed(&cluster, &input, &p.group, Duration::from_secs(300));
    let metrics = http_get(port, "/metrics").1;
    instances.stop_all();

    let out = scored(&cluster, &p, events as usize);
    let mut models = Models::open();
    let gbt_version = models.gbt.info().version.clone();
    // Per partition: whether the keys between the two shares had gone to the canary yet.
    let mut switched: BTreeMap<i64, bool> = BTreeMap::new();
    let (mut canaried, mut shadow_would_differ) = (0, 0);
    for ((partition, offset), seen) in &out {
        let at = format!("{partition}/{offset} (card {})", seen.card);
        assert_eq!(seen.scores.len(), 3, "{at}: {:?}", seen.scores);
        let (gbt, lin) = models.score(seen);
        let b = bucket(&seen.card);
        let (model, version, role, _, fraud) = &seen.scores[0];
        assert_eq!(model, "fraud_gbt", "{at}");
        let by_canary = role == "canary";
        if b < 3_000 {
            assert!(by_canary, "{at}: bucket {b} belongs to the canary");
        } else if b >= 6_000 {
            assert!(!by_canary, "{at}: bucket {b} belongs to the primary");
        } else {
            // Once the share was raised in a partition, it stays raised.
            let was = switched.entry(*partition).or_default();
            assert!(
                !*was || by_canary,
                "{at}: bucket {b} went back to the primary"
            );
            *was |= by_canary;
        }
        if by_canary {
            canaried += 1;
            assert_eq!(version, "linear-1", "{at}");
            assert!(close(lin, *fraud), "{at}: canary score {fraud}, want {lin}");
        } else {
            assert_eq!((role.as_str(), version), ("primary", &gbt_version), "{at}");
            assert!(
                close(gbt, *fraud),
                "{at}: primary score {fraud}, want {gbt}"
            );
        }
        let (anomaly_model, _, anomaly_role, _, anomaly) = &seen.scores[1];
        assert_eq!(
            (anomaly_model.as_str(), anomaly_role.as_str()),
            ("anomaly_ae", "primary")
        );
        let (shadow_model, shadow_version, shadow_role, _, shadow) = &seen.scores[2];
        assert_eq!(
            (
                shadow_model.as_str(),
                shadow_version.as_str(),
                shadow_role.as_str()
            ),
            ("fraud_shadow", "linear-1", "shadow"),
            "{at}"
        );
        assert!(
            close(lin, *shadow),
            "{at}: shadow score {shadow}, want {lin}"
        );
        // The decision is the shipped rules' over the deciding scores only.
        let decide = |fraud: f64| {
            if fraud >= 0.8 {
                "BLOCK"
            } else if fraud >= 0.3 || *anomaly >= 0.6 {
                "REVIEW"
            } else {
                "ALLOW"
            }
        };
        assert_eq!(seen.decision, decide(*fraud), "{at}");
        if decide(*shadow) != decide(*fraud) {
            shadow_would_differ += 1;
        }
    }
    assert!(
        switched.values().any(|s| *s),
        "the raised share never took effect"
    );
    assert!(canaried > 3_000 && canaried < 9_000, "{canaried} canaried");
    assert!(
        shadow_would_differ > 0,
        "the shadow never disagreed: the test shows nothing"
    );
    // Each version's decisions, side by side.
    for role in ["primary", "canary", "shadow"] {
        let n = metrics
            .lines()
            .filter(|l| {
                l.starts_with("kscore_model_decisions_total{")
                    && l.contains(&format!("role=\"{role}\""))
            })
            .filter(|l| l.contains("model=\"fraud_gbt\"") || l.contains("model=\"fraud_shadow\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        assert!(n > 0.0, "no {role} decisions counted:\n{metrics}");
    }
}
