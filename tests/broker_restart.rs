//! The broker process is stopped and started again under a running processor instance,
//! between two bursts of payments: once it is back, a `read_committed` reader finds exactly
//! what an uninterrupted run over the same input publishes. In a file of its own because it takes the
//! shared test broker down: test binaries run one after another, so no other test sees that.
//! It drives the local stack with `scripts/stack.sh restart-broker`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::harness::{Scenario, simulate, stack};

#[test]
fn a_broker_restarted_mid_run_changes_no_output() {
    let s = Scenario::new("broker");
    let half = 8_000;

    // Two bursts of payments from the same cards, the second three hours of event time later:
    // its 24-hour windows reach back into the first burst, so they depend on restored state.
    let mut first = simulate(&s.input, half, 0.0, 11, Some("2026-01-01T00:00:00Z"));
    assert!(first.wait().unwrap().success());
    let mut instances = s.instances();
    instances.start("a");
    s.wait_committed(Duration::from_secs(120));

    // The broker goes away and comes back under the running instance. Between bursts, and one
    // instance: the stand-in broker loses committed records when it is stopped while
    // transactions are being written, and forgets its groups' members when it restarts without
    // fencing their old generation's transactional offset commits, so two instances can both
    // process a partition for a while. Real Kafka does neither (README, the stand-ins).
    let down = Instant::now();
    stack("restart-broker");
    eprintln!("[harness] broker restarted in {:?}", down.elapsed());
    // And the instance dies with it, so its successor must read the state back from the
    // changelog the broker kept.
    instances.kill("a");
    instances.start("a");
    let mut second = simulate(&s.input, half, 0.0, 12, Some("2026-01-01T03:00:00Z"));
    assert!(second.wait().unwrap().success());
    let restores = s.finish(&mut instances, Duration::from_secs(300));
    assert!(
        restores
            .iter()
            .any(|(records, keys)| *records > 0 && *keys > 0),
        "the restarted instance restored no state: {restores:?}"
    );
    s.assert_same_as_reference(2 * half);
}
