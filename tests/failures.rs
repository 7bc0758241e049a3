//! Failures around one record or one cycle, on the local stack: a cycle that keeps failing to
//! commit (backoff, readiness, lag from what is committed, logs naming the offsets); a record
//! the broker refuses (found and dead-lettered); a commit reported failed after it succeeded,
//! and one failing retriably (neither is redone); a stop while the registry is away (nothing
//! dead-lettered, the group kept); non-finite scores (dead-lettered, kept out of the
//! histograms); a closed stdout under `--summary-every`; and the passthrough meeting a record it
//! cannot copy.
//!
//! The tests take turns (one lock): some read this process's metrics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use kscore::cluster::ClusterArgs;
use kscore::pipeline::{self, CommitFault, RunOptions, RunSummary};
use kscore::schemas;
use kscore::scorer::runtime;
use kscore::sink::FramedEncoder;
use kscore::tools::payments::Payment;
use kscore::tools::simulator::{SimConfig, Simulator};
use kscore::topology::Loaded;

use common::harness::{Instances, LogDir, end_offsets, pipeline, scored_by_input, simulate};
use common::{
    Running, committed, committed_total, evolved_payment_schema, free_port, fresh_topology,
    http_get, metric_sum, metrics_port, read, run_until_committed, scored_event_ids,
    start_registry, wait_committed,
};

/// Held by each test for its whole run (an async lock: some tests hold it across awaits).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The turn, for a test without a runtime of its own.
fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    TURN.blocking_lock()
}

fn payments(n: usize, seed: u64) -> Vec<Payment> {
    Simulator::new(SimConfig {
        seed,
        cards: 30,
        events_per_sec: 0.05,
        ..SimConfig::default()
    })
    .unwrap()
    .take(n)
    .map(|(p, _)| p)
    .collect()
}

async fn produce(cluster: &ClusterArgs, topic: &str, encoder: &FramedEncoder, events: &[Payment]) {
    common::produce_payments(cluster, topic, encoder, events).await;
}

async fn input_encoder(cluster: &ClusterArgs, loaded: &Loaded) -> FramedEncoder {
    let t = &loaded.topology;
    cluster.ensure_topic(&t.input.topic, 2).await.unwrap();
    FramedEncoder::register(
        &cluster.registry().unwrap(),
        &schemas::value_subject(&t.input.topic),
        schemas::PAYMENT_AVSC,
    )
    .await
    .unwrap()
}

/// Runs the processor in this process until the whole input is committed, then stops it.
async fn process(cluster: &ClusterArgs, loaded: &Loaded, opts: RunOptions) -> RunSummary {
    run_until_committed(cluster, loaded, opts, Duration::from_secs(90)).await
}

async fn read_committed(cluster: &ClusterArgs, topic: &str, n: usize) -> Vec<common::Record> {
    let (c, topic) = (cluster.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        read(&c, &topic, "read_committed", n, Duration::from_secs(30))
    })
    .await
    .unwrap()
}

/// A broker that refuses every commit: the instance backs off (a handful of attempts in 12 s,
/// not dozens), reports not ready after 3 failed cycles in a row while staying live, its lag
/// counts from the committed offsets and so shows the whole input, and each failure's log line
/// names the input topic and offsets. When commits succeed again everything is scored once.
#[test]
fn failing_cycles_back_off_turn_not_ready_and_leave_the_lag_visible() {
    let _turn = turn();
    let cluster = ClusterArgs::from_env();
    let dir = LogDir::new();
    let run = common::run_id();
    let input = format!("failing-in-{run}");
    let p = pipeline(dir.path(), &input, "failing", &run);
    let events = 400;
    let mut sim = simulate(&input, events, 0.0, 31, Some("2026-01-01T00:00:00Z"));
    assert!(sim.wait().unwrap().success());

    let switch = dir.path().join("fail-commits");
    std::fs::write(&switch, b"").unwrap();
    let port = free_port();
    let mut instances = Instances::new(&p, dir.path());
    instances.start_with(
        "a",
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--fail-commits-while",
            switch.to_str().unwrap(),
        ],
    );
    // The first attempt fails once the instance is up; then 12 s of failing.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_sum(
        &http_get(port, "/metrics").1,
        "kscore_transactions_aborted_total",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "no cycle was attempted");
        instances.check_alive();
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(12));
    let metrics = http_get(port, "/metrics").1;
    let aborts = metric_sum(&metrics, "kscore_transactions_aborted_total");
    // 0.1, 0.2, 0.4, ... 6.4 s between attempts: about 8 in 12 s (without backoff, over 30).
    assert!((5.0..=10.0).contains(&aborts), "{aborts} attempts in 12 s");
    assert!(
        metric_sum(&metrics, "kscore_failed_cycles ") >= 5.0,
        "{metrics}"
    );
    assert_eq!(http_get(port, "/health/live").0, 200);
    let (status, report) = http_get(port, "/health/ready");
    assert_eq!(status, 503, "{report}");
    assert!(report.contains("\"failed_cycles\":"), "{report}");
    // Every record read, none committed: the lag is the whole input.
    assert_eq!(
        metric_sum(&metrics, "kscore_consumer_lag{"),
        events as f64,
        "{metrics}"
    );
    let logs: String = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .collect();
    let failed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("cycle failed"))
        .collect();
    assert!(!failed.is_empty(), "no failure logged");
    for line in &failed {
        assert!(
            line.contains(&format!("topic={input}"))
                && line.contains("offsets=")
                && line.contains("..")
                && line.contains("retry_in="),
            "{line}"
        );
    }

    // Commits succeed again: all of it is scored, once; ready; no lag.
    std::fs::remove_file(&switch).unwrap();
    wait_committed(&cluster, &input, &p.group, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = http_get(port, "/metrics").1;
        let ready = http_get(port, "/health/ready").0 == 200;
        if ready
            && metric_sum(&metrics, "kscore_consumer_lag{") == 0.0
            && metric_sum(&metrics, "kscore_failed_cycles ") == 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "not ready again: {metrics}");
        std::thread::sleep(Duration::from_millis(250));
    }
    instances.stop_all();
    assert_eq!(end_offsets(&cluster, &input), events as i64);
    assert_eq!(
        scored_by_input(&cluster, &p, events as usize).len(),
        events as usize
    );
}

/// A scored record over its topic's `max.message.bytes` is refused by the broker, which fails
/// the whole batch; the processor redoes the cycle one record per batch, finds the record,
/// dead-letters it as `output_too_large`, and scores every other record once. (The old
/// processor aborted the cycle for ever.) The limit is on the compressed batch, so the big
/// field is random text that lz4 cannot shrink: 50,000 repeated letters would fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_found_and_dead_lettered() {
    let _turn = TURN.lock().await;
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    let cluster = ClusterArgs::from_env();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let loaded = fresh_topology("refused", &run_id);
    let t = loaded.topology.clone();
    let encoder = input_encoder(&cluster, &loaded).await;
    // The scored and alerts topics take records of at most 20,000 bytes.
    for topic in [
        &t.output.scored_topic,
        t.output.alerts_topic.as_ref().unwrap(),
    ] {
        cluster
            .ensure_topic_with(topic, 2, &[("max.message.bytes", "20000")])
            .await
            .unwrap();
    }
    let mut events = payments(300, 41);
    let mut big = events[150].clone();
    big.event_id = uuid::Uuid::from_u128(0xb16);
    big.card_id = "crd_big".into();
    big.merchant_name = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0xb16);
        (0..50_000)
            .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
            .collect()
    };
    events.insert(150, big.clone());
    produce(&cluster, &t.input.topic, &encoder, &events).await;

    let summary = process(
        &cluster,
        &loaded,
        RunOptions {
            instance_id: format!("refused-{run_id}"),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (summary.consumed, summary.scored, summary.dead_lettered),
        (301, 300, 1),
        "{summary:?}"
    );
    let scored = read_committed(&cluster, &t.output.scored_topic, 300).await;
    let ids = scored_event_ids(&scored);
    assert_eq!(ids.len(), 300);
    assert!(!ids.contains(&big.event_id));
    let dead = read_committed(&cluster, &t.output.dead_letter_topic, 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].headers.get("kscore.reason").map(String::as_str),
        Some("output_too_large")
    );
    assert_eq!(dead[0].key.as_deref(), Some(&b"crd_big"[..]));
    assert_eq!(
        dead[0].value.as_deref(),
        Some(encoder.encode(big.to_value()).unwrap().as_slice())
    );
}

/// A commit reported failed although it went through (librdkafka completing it after its
/// call timed out) is not redone: the broker's committed offsets say it committed. A retriable
/// commit error is retried, not aborted. Either way, each input is scored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_decided_by_the_broker_not_by_the_error() {
    let _turn = TURN.lock().await;
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    let cluster = ClusterArgs::from_env();
    for (n, fault) in [
        CommitFault::TimedOutAfterCommit,
        CommitFault::RetriableBeforeCommit,
    ]
    .into_iter()
    .enumerate()
    {
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let loaded = fresh_topology(&format!("commit{n}"), &run_id);
        let t = loaded.topology.clone();
        let encoder = input_encoder(&cluster, &loaded).await;
        let events = payments(300, 50 + n as u64);
        produce(&cluster, &t.input.topic, &encoder, &events).await;
        let summary = process(
            &cluster,
            &loaded,
            RunOptions {
                instance_id: format!("commit-{run_id}"),
                max_cycle_records: 100,
                commit_fault: Some((2, fault)),
                ..Default::default()
            },
        )
        .await;
        let scored = read_committed(&cluster, &t.output.scored_topic, 300).await;
        assert_eq!(scored.len(), 300, "{fault:?}: every input scored once");
        assert_eq!(scored_event_ids(&scored).len(), 300);
        assert_eq!(
            (summary.consumed, summary.scored, summary.aborts),
            (300, 300, 0),
            "{fault:?}: {summary:?}"
        );
    }
}

/// A stop while the registry cannot be reached ends the cycle without publishing it: nothing
/// is dead-lettered (the records are read again by the next run), and while it waited the
/// instance kept polling, so it stayed in its group past `max.poll.interval.ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_registry_outage_dead_letters_nothing() {
    let _turn = TURN.lock().await;
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut registry = start_registry(port, dir.path());
    let mut cluster = ClusterArgs::from_env();
    cluster.registry_url = format!("http://127.0.0.1:{port}");
    // A member that does not poll for 8 s leaves its group.
    cluster.kafka_properties.extend([
        ("max.poll.interval.ms".to_string(), "8000".to_string()),
        ("session.timeout.ms".to_string(), "6000".to_string()),
    ]);
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let loaded = fresh_topology("regstop", &run_id);
    let t = loaded.topology.clone();
    let v1 = input_encoder(&cluster, &loaded).await;
    let v2 = FramedEncoder::register(
        &cluster.registry().unwrap(),
        &schemas::value_subject(&t.input.topic),
        &evolved_payment_schema(false, true),
    )
    .await
    .unwrap();
    let events = payments(100, 60);
    produce(&cluster, &t.input.topic, &v1, &events[..50]).await;

    let opts = RunOptions {
        instance_id: format!("regstop-{run_id}"),
        // A dynamic member leaves its group when it misses max.poll.interval.ms.
        membership: pipeline::Membership::Dynamic,
        ..Default::default()
    };
    let processor = Running::start(&cluster, &loaded, opts.clone());
    committed(&cluster, &loaded, Duration::from_secs(60))
        .await
        .unwrap();
    let members = || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let probe: BaseConsumer = cluster.client_config().unwrap().create().unwrap();
        let groups = probe
            .fetch_group_list(Some(&t.input.group), Duration::from_secs(10))
            .unwrap();
        groups.groups().first().map_or(0, |g| g.members().len())
    };
    assert_eq!(members(), 1);

    // The registry goes away; records arrive written with a schema version not seen yet.
    registry.kill().unwrap();
    registry.wait().unwrap();
    let with_note = |p: &Payment| {
        let Value::Record(mut fields) = p.to_value() else {
            unreachable!()
        };
        fields.push(("note".into(), Value::Union(0, Box::new(Value::Null))));
        v2.encode(Value::Record(fields)).unwrap()
    };
    let noted: Vec<_> = events[50..]
        .iter()
        .map(|p| (Some(p.card_id.clone()), Some(with_note(p))))
        .collect();
    common::produce(&cluster, &t.input.topic, noted).await;
    // Longer than max.poll.interval.ms: a member that stopped polling would be out of its group.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        tokio::task::block_in_place(members),
        1,
        "the instance left its group while it waited"
    );
    let summary = processor.stop().await;
    assert_eq!(
        (summary.consumed, summary.dead_lettered),
        (50, 0),
        "{summary:?}"
    );
    assert_eq!(
        committed_total(&cluster, &t.input.topic, &t.input.group),
        50
    );
    let dead = read(
        &cluster,
        &t.output.dead_letter_topic,
        "read_committed",
        0,
        Duration::from_secs(3),
    );
    assert!(dead.is_empty(), "{} dead letters", dead.len());

    // With the registry back, the next run scores them.
    let mut registry = start_registry(port, dir.path());
    let summary = process(&cluster, &loaded, opts).await;
    registry.kill().unwrap();
    let _ = registry.wait();
    assert_eq!(
        (summary.consumed, summary.scored, summary.dead_lettered),
        (50, 50, 0)
    );
    let scored = read_committed(&cluster, &t.output.scored_topic, 100).await;
    assert_eq!(scored_event_ids(&scored).len(), 100);
}

/// A score that is not a finite number dead-letters its record before anything is published:
/// it never reaches the score histogram (whose sum would be NaN for good), and only published
/// scores are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_scores_are_dead_lettered_and_kept_out_of_the_histograms() {
    let _turn = TURN.lock().await;
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    let metrics = metrics_port();
    let cluster = ClusterArgs::from_env();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut loaded = fresh_topology("nan", &run_id);
    // A third model: sqrt(amount) (tests/models/make_models.py), NaN for a refund.
    let mut sqrt = loaded.topology.models[1].clone();
    sqrt.name = format!("sqrt{}", &run_id[..8]);
    sqrt.path = "tests/models/sqrt.onnx".into();
    sqrt.features = vec!["amount".into()];
    sqrt.scores = vec![kscore::topology::config::ScoreSpec {
        name: "root".into(),
        output: "y".into(),
        column: 0,
    }];
    loaded.topology.models.push(sqrt.clone());
    loaded.model_paths.push("tests/models/sqrt.onnx".into());
    let t = loaded.topology.clone();
    let encoder = input_encoder(&cluster, &loaded).await;
    let mut events = payments(100, 70);
    for p in events.iter_mut().step_by(10) {
        p.amount_minor = -p.amount_minor.max(1);
    }
    produce(&cluster, &t.input.topic, &encoder, &events).await;
    let summary = process(
        &cluster,
        &loaded,
        RunOptions {
            instance_id: format!("nan-{run_id}"),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (summary.scored, summary.dead_lettered),
        (90, 10),
        "{summary:?}"
    );
    let dead = read_committed(&cluster, &t.output.dead_letter_topic, 10).await;
    assert_eq!(dead.len(), 10);
    for d in &dead {
        assert_eq!(
            d.headers.get("kscore.reason").map(String::as_str),
            Some("non_finite_score")
        );
        assert!(d.value.is_some(), "the original value is kept");
    }
    let text = http_get(metrics, "/metrics").1;
    let series = format!("kscore_model_score_sum{{model=\"{}\"", sqrt.name);
    let line = text
        .lines()
        .find(|l| l.starts_with(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    let sum: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(sum.is_finite() && sum > 0.0, "{line}");
    let count = metric_sum(
        &text,
        &format!("kscore_model_score_count{{model=\"{}\"", sqrt.name),
    );
    assert_eq!(count, 90.0);
}

/// `--summary-every` writing to a closed pipe (`kscore run ... | head -1`) ends the summaries,
/// not the processor: it keeps running and stops cleanly on SIGTERM.
#[test]
fn a_closed_stdout_does_not_stop_the_processor() {
    let _turn = turn();
    let cluster = ClusterArgs::from_env();
    let dir = LogDir::new();
    let run = common::run_id();
    let input = format!("pipe-in-{run}");
    let p = pipeline(dir.path(), &input, "pipe", &run);
    let mut sim = simulate(&input, 100, 0.0, 33, Some("2026-01-01T00:00:00Z"));
    assert!(sim.wait().unwrap().success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kscore"))
        .args(["run", "--topology"])
        .arg(&p.file)
        .args(["--instance-id", "pipe", "--summary-every", "100ms"])
        .env("RUST_LOG", "info,librdkafka=off,rdkafka=off")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("pipe.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut first = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("[kscore fraud]"), "{first}");
    // The reader is gone: the next summaries meet a closed pipe.
    wait_committed(&cluster, &input, &p.group, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the processor died");
    let exit = terminate(&mut child);
    assert!(exit.success(), "{exit}");
    let logs = std::fs::read_to_string(dir.path().join("pipe.log")).unwrap();
    assert!(!logs.contains("panicked"), "{logs}");
}

/// The passthrough baseline copies everything or says what it could not copy: a record over
/// the producer's limit ends it with an error naming the record, instead of a retry loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_passthrough_stops_on_a_record_it_cannot_copy() {
    let _turn = TURN.lock().await;
    let cluster = ClusterArgs::from_env();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let input = format!("pass-in-{run}");
    cluster.ensure_topic(&input, 1).await.unwrap();
    common::produce(
        &cluster,
        &input,
        [(None::<&[u8]>, Some(vec![7u8; 1_020_000]))],
    )
    .await;
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["90", env!("CARGO_BIN_EXE_kscore"), "passthrough"])
            .args(["--input", &input, "--output", &format!("pass-out-{run}")])
            .args(["--group", &format!("pass-{run}")])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{logs}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        logs.contains("offset 0") && logs.contains("MessageSizeTooLarge"),
        "{logs}"
    );
}

/// `kscore tail` reading payments with event times at the ends of `long` says how old they
/// are without overflowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_survives_extreme_event_times() {
    let _turn = TURN.lock().await;
    let cluster = ClusterArgs::from_env();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let loaded = fresh_topology("tail", &run_id);
    let topic = loaded.topology.input.topic.clone();
    let encoder = input_encoder(&cluster, &loaded).await;
    let mut events = payments(3, 80);
    events[0].event_time = i64::MIN;
    events[1].event_time = i64::MAX;
    produce(&cluster, &topic, &encoder, &events).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kscore"))
            .args([
                "tail",
                "--topic",
                &topic,
                "--from-beginning",
                "--count",
                "3",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

/// A SIGTERM that arrives while the processor is still starting (an orchestrator that changes
/// its mind at once, a test that stops it right after starting it) stops it cleanly too: the
/// handler is in place before its first log line, not once it has loaded its topology.
#[test]
fn a_sigterm_during_start_up_stops_the_processor_cleanly() {
    let _turn = turn();
    let dir = LogDir::new();
    let run = common::run_id();
    let input = format!("early-in-{run}");
    let p = pipeline(dir.path(), &input, "early", &run);
    let log = dir.path().join("early.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kscore"))
        .args(["run", "--topology"])
        .arg(&p.file)
        .args(["--instance-id", "early"])
        .env("RUST_LOG", "info,librdkafka=off,rdkafka=off")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Its first line says it has started: the signal goes at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&log).unwrap_or_default().is_empty() {
        assert!(Instant::now() < deadline, "the processor wrote nothing");
        std::thread::sleep(Duration::from_millis(1));
    }
    let exit = terminate(&mut child);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(exit.success(), "{exit}\n{logs}");
    assert!(logs.contains("stop requested"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

/// Sends `child` a SIGTERM and returns how it exited (within 40 s, or the test fails).
fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the processor ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
