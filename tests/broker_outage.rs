//! The broker goes away for longer than the liveness threshold (`health::STALL`, 60 s) while a
//! processor instance has a cycle to publish: the instance stays live the whole time (a restart
//! would not bring the broker back), reports not ready while it cannot publish (its commit under
//! way for longer than `health::COMMIT_SLOW`, or its producer being re-created), and once the
//! broker is back it publishes exactly what an uninterrupted run over the same input does.
//! In a file of its own because it takes the shared test broker down: test binaries run one
//! after another, so no other test sees that.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::harness::{Scenario, simulate, stack};
use common::{free_port, http_get};

/// The HTTP status of `GET path`, or `None` while nothing answers.
fn status(port: u16, path: &str) -> Option<u16> {
    Some(http_get(port, path).0).filter(|s| *s != 0)
}

#[test]
fn a_broker_outage_longer_than_the_stall_threshold_keeps_the_instance_live_and_changes_no_output() {
    let s = Scenario::new("outage");
    let events = 2_000;
    let port = free_port();

    let mut sim = simulate(&s.input, events, 0.0, 21, Some("2026-01-01T00:00:00Z"));
    assert!(sim.wait().unwrap().success());
    // Scoring throttled to 200 rows/s: the first cycle's scores take seconds, so the instance
    // holds a cycle to publish when the broker has gone. A session timeout longer than the
    // outage keeps the partitions assigned meanwhile (with the harness's 6 s they are revoked
    // and the cycle discarded before it is published), so the cycle is published against the
    // missing broker: its calls time out, it is aborted, and the producer is re-created.
    let mut instances = s.instances();
    instances.start_with(
        "a",
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--throttle-scoring",
            "200",
            "-X",
            "session.timeout.ms=120000",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(port, "/health/ready") != Some(200) {
        assert!(Instant::now() < deadline, "the instance never became ready");
        instances.check_alive();
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));

    stack("stop-broker");
    let down = Instant::now();
    let mut not_ready = 0;
    while down.elapsed() < Duration::from_secs(90) {
        instances.check_alive();
        assert_eq!(
            status(port, "/health/live"),
            Some(200),
            "not live {:?} into the outage; logs in {}",
            down.elapsed(),
            s.dir.path().display()
        );
        if status(port, "/health/ready") == Some(503) {
            not_ready += 1;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("[harness] not ready in {not_ready} of the outage's one-second checks");
    assert!(
        not_ready > 0,
        "the instance said it was ready all through the outage"
    );
    stack("start-broker");
    eprintln!("[harness] broker back after {:?}", down.elapsed());

    s.wait_committed(Duration::from_secs(300));
    assert_eq!(status(port, "/health/ready"), Some(200));
    s.finish(&mut instances, Duration::from_secs(300));
    s.assert_same_as_reference(events);
}
