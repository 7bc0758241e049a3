//! Backpressure: with a backlog of `KSCORE_BACKPRESSURE_EVENTS` payments (default 1,000,000
//! on the release build, 15,000 on the debug build) and scoring throttled below what the rest
//! of the processor could do, the processor's peak RSS stays under `RSS_LIMIT_MIB`, it pauses
//! its input while the models are behind (and pauses again when a second instance joins and
//! leaves the group meanwhile), the lag shows in its metrics, and every input still gets
//! exactly one scored record.
//!
//! `scripts/test.sh` runs the debug build's size; the million is
//! `cargo test --release --test backpressure`, by hand.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kscore::cluster::ClusterArgs;

use common::harness::{Instances, LogDir, end_offsets, pipeline, simulate_cards};
use common::{committed_total, free_port, http_get, metric_sum, wait_committed};

/// The limit asserted on the processor's peak resident set. The million-event run needs more
/// than the debug run's 15,000 only because of the local stand-in broker: it ignores
/// `fetch.max.bytes` and answers a fetch with everything up to the end of the partition (a
/// 115 MB response for this backlog), which librdkafka then holds as messages. Against Apache
/// Kafka a fetch is capped at `fetch.max.bytes` (50 MB by default) and the consumer's queue at
/// `queued.max.messages.kbytes`.
const RSS_LIMIT_MIB: f64 = if cfg!(debug_assertions) {
    400.0
} else {
    1024.0
};

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|kb| kb / 1024.0)
}

#[test]
fn a_slow_model_over_a_large_backlog_keeps_memory_bounded_and_output_exact() {
    let cluster = ClusterArgs::from_env();
    let events: u64 = std::env::var("KSCORE_BACKPRESSURE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            15_000
        } else {
            1_000_000
        });
    let dir = LogDir::new();
    let run = common::run_id();
    let input = format!("pressure-in-{run}");
    let p = pipeline(dir.path(), &input, "pressure", &run);
    let started = Instant::now();
    // Cards as many as the demo's, so keys hold realistic histories (a few hundred cards over
    // a million events would make every key hundreds of events long).
    let mut sim = simulate_cards(
        &input,
        events,
        0.0,
        21,
        None,
        if cfg!(debug_assertions) {
            "200"
        } else {
            "50000"
        },
    );
    assert!(sim.wait().unwrap().success());
    eprintln!(
        "[harness] {events} events produced in {:?}",
        started.elapsed()
    );

    let port = free_port();
    let log = std::fs::File::create(dir.path().join("slow.log")).unwrap();
    // Each model worker scores at most 3,000 rows a second (300 on the debug build;
    // `KSCORE_BACKPRESSURE_THROTTLE`), below what the rest of the processor does (about 5,000
    // events a second on the release build with this many cards): the models are the
    // bottleneck.
    let throttle = std::env::var("KSCORE_BACKPRESSURE_THROTTLE").unwrap_or(
        if cfg!(debug_assertions) {
            "300"
        } else {
            "3000"
        }
        .into(),
    );
    let mut slow = Command::new(env!("CARGO_BIN_EXE_kscore"))
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .args(["run", "--topology"])
        .arg(&p.file)
        .args(["--instance-id", "slow", "--throttle-scoring", &throttle])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    let mut others = Instances::new(&p, dir.path());
    let (mut peak, mut paused_seen, mut max_lag, mut pauses) = (0.0f64, false, 0.0f64, 0.0f64);
    let mut joined = false;
    let mut pauses_at_join = 0.0;
    let mut left = false;
    let deadline = Instant::now() + Duration::from_secs(1_800);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        assert!(slow.try_wait().unwrap().is_none(), "the processor exited");
        peak = peak.max(peak_rss_mib(slow.id()).unwrap_or(0.0));
        let m = http_get(port, "/metrics").1;
        paused_seen |= metric_sum(&m, "kscore_input_paused") > 0.0;
        pauses = pauses.max(metric_sum(&m, "kscore_backpressure_pauses_total"));
        max_lag = max_lag.max(metric_sum(&m, "kscore_consumer_lag{"));
        let done = committed_total(&cluster, &input, &p.group) as f64;
        // A second instance joins a third of the way in and leaves at two thirds: partitions
        // move while the input is paused. It is a dynamic member, so leaving hands its
        // partitions back at once (a static member keeps them until its session times out,
        // which the stand-in broker never does).
        if !joined && done > events as f64 / 3.0 {
            others.start_with("helper", &["--membership", "dynamic"]);
            joined = true;
            pauses_at_join = pauses;
        }
        if joined && !left && done > 2.0 * events as f64 / 3.0 {
            others.stop("helper");
            left = true;
        }
        if done >= events as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done in time: {done} of {events}"
        );
    }
    wait_committed(&cluster, &input, &p.group, Duration::from_secs(600));
    peak = peak.max(peak_rss_mib(slow.id()).unwrap_or(0.0));
    Command::new("kill")
        .args(["-TERM", &slow.id().to_string()])
        .status()
        .unwrap();
    slow.wait().unwrap();
    eprintln!(
        "[harness] peak RSS {peak:.0} MiB, {pauses} pauses, max lag {max_lag}, {:?} in all",
        started.elapsed()
    );
    assert!(peak > 0.0 && peak < RSS_LIMIT_MIB, "peak RSS {peak:.0} MiB");
    // The input is paused once the models have been behind for 200 ms in a cycle.
    assert!(
        paused_seen && pauses_at_join >= 1.0,
        "input never paused before the rebalance ({pauses_at_join} pauses)"
    );
    assert!(
        pauses > pauses_at_join,
        "input not paused again after the rebalance ({pauses} pauses in all)"
    );
    assert!(max_lag > 0.0, "lag never showed in the metrics");

    // Exactly one scored record per input.
    let inputs = end_offsets(&cluster, &input) as usize;
    assert_eq!(inputs as u64, events);
    let seen = sources(&cluster, &p.scored, inputs);
    assert_eq!(seen.len(), inputs, "scored {} of {inputs}", seen.len());
}

/// The input (partition, offset) of every committed scored record, read as they come (a
/// million records are not kept); panics on a duplicate.
fn sources(
    cluster: &ClusterArgs,
    topic: &str,
    expected: usize,
) -> std::collections::HashSet<(i64, i64)> {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = cluster
        .client_config()
        .unwrap()
        .set(
            "group.id",
            format!("pressure-reader-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = std::collections::HashSet::with_capacity(expected);
    let mut quiet = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let source = common::harness::source_of(m.payload().unwrap_or_default());
                assert!(seen.insert(source), "input {source:?} scored twice");
                quiet = Instant::now();
            }
            Some(Err(e)) => panic!("reader: {e}"),
            None => {}
        }
        if seen.len() >= expected && quiet.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    seen
}
