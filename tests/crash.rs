//! Crash equivalence: processors are SIGKILLed and restarted at random moments, instances join
//! and leave the group, and a dead instance's open transaction is recovered, while simulated
//! payments arrive; what a `read_committed` reader then finds in the scored topic must be
//! exactly what an uninterrupted run over the same input publishes (every field but processing
//! metadata), one record per input, none missing, none twice. Feature state is what makes this
//! hard: it is restored from the changelog after every crash and rebalance.
//!
//! Sizes: `KSCORE_CRASH_EVENTS` (default 6000) events at `KSCORE_CRASH_RATE` (default 400) per
//! second, `KSCORE_CRASH_KILLS` (default 4) kills. The broker restart is in `tests/broker_restart.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use common::harness::{Scenario, simulate, wait_input};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn sigkilled_and_restarted_the_processor_publishes_exactly_what_an_uninterrupted_run_does() {
    let events = setting("KSCORE_CRASH_EVENTS", 6_000);
    let rate = setting("KSCORE_CRASH_RATE", 400);
    let kills = setting("KSCORE_CRASH_KILLS", 4);
    let seed = setting("KSCORE_CRASH_SEED", rand::rng().random());
    eprintln!("[harness] {events} events at {rate}/s, {kills} kills, seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let s = Scenario::new("crash");

    let mut simulator = simulate(&s.input, events, rate as f64, 11, None);
    let mut instances = s.instances();
    instances.start("p");
    // Kills at random moments over the time the input takes to arrive, the last one after it.
    let span = events as f64 / rate as f64 + 3.0;
    let mut moments: Vec<f64> = (0..kills).map(|_| rng.random_range(1.0..span)).collect();
    moments.sort_by(f64::total_cmp);
    let started = Instant::now();
    for (i, at) in moments.into_iter().enumerate() {
        let wait = Duration::from_secs_f64(at).saturating_sub(started.elapsed());
        std::thread::sleep(wait);
        if i == 0 {
            // However early the moments fall, a restart must find committed state to restore.
            s.wait_some_committed(Duration::from_secs(60));
        }
        instances.check_alive();
        instances.kill("p");
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1_000)));
        instances.start("p");
    }
    wait_input(&mut simulator, &mut instances);
    let restores = s.finish(&mut instances, Duration::from_secs(300));
    assert!(
        restores.iter().filter(|(records, _)| *records > 0).count() >= 1,
        "no start restored any state, so the test showed nothing: {restores:?}"
    );
    s.assert_same_as_reference(events);
}

#[test]
fn instances_joining_and_leaving_the_group_publish_exactly_what_one_uninterrupted_run_does() {
    let events = setting("KSCORE_CRASH_EVENTS", 6_000);
    let rate = setting("KSCORE_CRASH_RATE", 400);
    let s = Scenario::new("group");

    let mut simulator = simulate(&s.input, events, rate as f64, 11, None);
    let mut instances = s.instances();
    let span = events as f64 / rate as f64;
    // (moment as a fraction of the input's span, action, instance)
    let script = [
        (0.0, "start", "a"),
        (0.1, "start", "b"),
        (0.2, "start", "c"),
        (0.35, "kill", "b"),
        (0.4, "start", "b"),
        (0.55, "stop", "c"),
        (0.7, "kill", "a"),
        (0.75, "start", "a"),
        (0.85, "start", "c"),
    ];
    let started = Instant::now();
    for (at, action, id) in script {
        let wait = Duration::from_secs_f64(at * span).saturating_sub(started.elapsed());
        std::thread::sleep(wait);
        instances.check_alive();
        match action {
            "start" => instances.start(id),
            "kill" => instances.kill(id),
            _ => instances.stop(id),
        }
    }
    wait_input(&mut simulator, &mut instances);
    let restores = s.finish(&mut instances, Duration::from_secs(300));
    assert!(
        restores.iter().filter(|(records, _)| *records > 0).count() >= 2,
        "too few restores read state: {restores:?}"
    );
    s.assert_same_as_reference(events);
}

/// A cycle's records are published while it is gathered, as their scores arrive (the models
/// get a cycle's rows in batches of `max_rows`, 512). An instance joining or leaving the group
/// revokes the partitions of a cycle that has published some (3 s cycles of 1,200 records make
/// that certain): its transaction is aborted, and the output is still exactly that of one
/// uninterrupted run.
#[test]
fn a_rebalance_aborts_the_records_a_cycle_published_while_gathered() {
    let s = Scenario::new("revoked");
    let text = std::fs::read_to_string(&s.under_test.file).unwrap();
    let from = "commit_interval = \"100ms\"";
    assert!(text.contains(from), "fraud.toml no longer has {from}");
    std::fs::write(
        &s.under_test.file,
        text.replace(from, "commit_interval = \"3s\""),
    )
    .unwrap();
    let (events, rate) = (6_000, 400.0);
    let mut simulator = simulate(&s.input, events, rate, 12, None);
    let mut instances = s.instances();
    let started = Instant::now();
    // (b is stopped and started again: a static member that left for good would keep its
    // partitions until its session timed out.)
    let script = [
        (0.0, "start", "a"),
        (5.0, "start", "b"),
        (10.0, "stop", "b"),
        (11.0, "start", "b"),
    ];
    for (at, action, id) in script {
        std::thread::sleep(Duration::from_secs_f64(at).saturating_sub(started.elapsed()));
        instances.check_alive();
        match action {
            "start" => instances.start(id),
            _ => instances.stop(id),
        }
    }
    wait_input(&mut simulator, &mut instances);
    s.finish(&mut instances, Duration::from_secs(300));
    let discarded = instances.discarded();
    assert!(
        discarded
            .iter()
            .any(|(records, published)| *published > 0 && published <= records),
        "no rebalance aborted a cycle with published records: {discarded:?}"
    );
    s.assert_same_as_reference(events);
}

/// An instance died inside a transaction that had already sent scored records and changelog
/// records. Until someone re-initialises its `transactional.id`, `read_committed` readers
/// cannot read past it; the instance restarted with the same id does that (which aborts the
/// transaction), and nothing of the dead transaction reaches the output or the restored state.
#[test]
fn an_open_transaction_left_by_a_dead_instance_is_aborted_by_its_restart() {
    let s = Scenario::new("zombie");
    let events = 800;
    let mut simulator = simulate(&s.input, events, 10_000.0, 11, None);
    assert!(simulator.wait().unwrap().success());

    // The instance processes this first part and stops; then a "dead" instance with its
    // transactional.id leaves an open transaction holding a forged scored record and a forged
    // partition record in every partition.
    let mut instances = s.instances();
    instances.start("z");
    s.wait_committed(Duration::from_secs(120));
    instances.stop("z");

    let dead: ThreadedProducer<_> = s
        .cluster
        .client_config()
        .unwrap()
        .set(
            "transactional.id",
            format!("kscore-{}-z", s.under_test.group),
        )
        .create()
        .unwrap();
    dead.init_transactions(Duration::from_secs(30)).unwrap();
    dead.begin_transaction().unwrap();
    let changelog = format!("{}-features-changelog", s.under_test.group);
    let forged = [1u8; 64];
    for partition in 0..4 {
        dead.send(
            BaseRecord::<[u8], [u8]>::to(&s.under_test.scored)
                .partition(partition)
                .payload(&forged[..]),
        )
        .map_err(|(e, _)| e)
        .unwrap();
        dead.send(
            BaseRecord::<[u8], [u8]>::to(&changelog)
                .partition(partition)
                .key(&b"\xFFpartition"[..])
                .payload(&forged[..]),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    dead.flush(Duration::from_secs(30)).unwrap();
    // The process "dies": no commit, no abort, the transaction stays open on the broker.
    std::mem::forget(dead);

    // More input arrives; the restarted instance aborts the dead transaction, restores the
    // committed state (not the forged records) and goes on.
    let mut more = simulate(&s.input, 2 * events, 10_000.0, 11, None);
    assert!(more.wait().unwrap().success());
    instances.start("z");
    let restores = s.finish(&mut instances, Duration::from_secs(120));
    assert!(
        restores
            .iter()
            .any(|(records, keys)| *records > 0 && *keys > 0),
        "the restart restored no state: {restores:?}"
    );
    s.assert_same_as_reference(3 * events);
}
