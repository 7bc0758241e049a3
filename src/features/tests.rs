use std::collections::HashSet;
use std::path::Path;

use apache_avro::types::Value;

use super::*;
use crate::tools::payments::Payment;
use crate::tools::simulator::{SimConfig, Simulator};
use crate::topology;

const TOPOLOGY: &str = r#"
name = "t"
[input]
topic = "in"
group = "g"
key_field = "card_id"
event_time_field = "event_time"
schema = "payment.avsc"
[state]
max_events_per_key = 10000
idle_key_ttl = "2h"
[[feature]]
name = "amount"
aggregation = "value"
field = "amount_minor"
[[feature]]
name = "count_1h"
aggregation = "count"
window = "1h"
[[feature]]
name = "sum_1h"
aggregation = "sum"
field = "amount_minor"
window = "1h"
[[feature]]
name = "mean_30m"
aggregation = "mean"
field = "amount_minor"
window = "30m"
[[feature]]
name = "std_1h"
aggregation = "std"
field = "amount_minor"
window = "1h"
[[feature]]
name = "min_1h"
aggregation = "min"
field = "amount_minor"
window = "1h"
[[feature]]
name = "max_1h"
aggregation = "max"
field = "amount_minor"
window = "1h"
[[feature]]
name = "merchants_1h"
aggregation = "distinct_count"
field = "merchant_id"
window = "1h"
[[feature]]
name = "new_merchant_1h"
aggregation = "is_new"
field = "merchant_id"
window = "1h"
[[feature]]
name = "since_last"
aggregation = "time_since_last"
default = -1.0
[[feature]]
name = "ratio_1h"
aggregation = "ratio_to_mean"
field = "amount_minor"
window = "1h"
[[feature]]
name = "online"
aggregation = "equals"
field = "channel"
equals = "ECOMMERCE"
[[feature]]
name = "abroad"
aggregation = "differs"
field = "merchant_country"
other_field = "card_country"
[output]
scored_topic = "s"
dead_letter_topic = "d"
"#;

/// `n` simulated payments over `cards` cards, `events_per_sec` in event time.
fn payments(cards: usize, events_per_sec: f64, n: usize) -> Vec<Payment> {
    Simulator::new(SimConfig {
        cards,
        events_per_sec,
        ..SimConfig::default()
    })
    .expect("sim")
    .take(n)
    .map(|(p, _)| p)
    .collect()
}

fn feature_set(toml: &str) -> FeatureSet {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("payment.avsc"),
        crate::schemas::PAYMENT_AVSC,
    )
    .expect("schema");
    let file = dir.path().join("t.toml");
    std::fs::write(&file, toml).expect("topology");
    let loaded = topology::load(Path::new(&file)).expect("valid topology");
    FeatureSet::new(&loaded.topology, &loaded.schema)
}

/// The straightforward definition, from the payments themselves: every feature of event `i`
/// over the events of its card that arrived before it (or are it), within the window, and
/// still retained (time after the card's newest earlier event time minus the longest window).
fn reference(events: &[Payment], i: usize) -> Vec<f64> {
    let e = &events[i];
    let t = e.event_time;
    let earlier: Vec<&Payment> = events[..i]
        .iter()
        .filter(|p| p.card_id == e.card_id)
        .collect();
    let newest = earlier
        .iter()
        .map(|p| p.event_time)
        .max()
        .unwrap_or(i64::MIN);
    let retained: Vec<&Payment> = earlier
        .iter()
        .copied()
        .filter(|p| p.event_time > newest.saturating_sub(3_600_000))
        .collect();
    let window = |ms: i64| -> Vec<&Payment> {
        let mut w: Vec<&Payment> = retained
            .iter()
            .copied()
            .filter(|p| p.event_time > t - ms && p.event_time <= t)
            .collect();
        w.push(e);
        w
    };
    let amounts = |w: &[&Payment]| {
        w.iter()
            .map(|p| p.amount_minor as f64)
            .collect::<Vec<f64>>()
    };
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let h = 3_600_000;
    let w1 = window(h);
    let a1 = amounts(&w1);
    let m1 = mean(&a1);
    let prev = retained
        .iter()
        .filter(|p| p.event_time <= t)
        .map(|p| p.event_time)
        .max();
    vec![
        e.amount_minor as f64,
        w1.len() as f64,
        a1.iter().sum(),
        mean(&amounts(&window(h / 2))),
        (a1.iter().map(|a| (a - m1).powi(2)).sum::<f64>() / a1.len() as f64).sqrt(),
        a1.iter().copied().fold(f64::INFINITY, f64::min),
        a1.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        w1.iter()
            .map(|p| p.merchant_id.as_str())
            .collect::<HashSet<_>>()
            .len() as f64,
        f64::from(u8::from(
            !w1[..w1.len() - 1]
                .iter()
                .any(|p| p.merchant_id == e.merchant_id),
        )),
        match prev {
            Some(p) if t - p <= 2 * h => (t - p) as f64 / 1000.0,
            _ => -1.0,
        },
        e.amount_minor as f64 / m1,
        f64::from(u8::from(
            e.channel == crate::tools::payments::Channel::Ecommerce,
        )),
        f64::from(u8::from(e.merchant_country != e.card_country)),
    ]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn features_match_the_straightforward_definition_including_late_events() {
    let set = feature_set(TOPOLOGY);
    assert_eq!(set.names().len(), 13);
    // Few cards and a slow clock so cards have many events per hour; then delay some events
    // by up to 40 minutes to make them arrive out of order.
    let cfg = SimConfig {
        cards: 25,
        merchants: 40,
        events_per_sec: 0.05,
        incidents_per_10k: 200.0,
        ..SimConfig::default()
    };
    let mut events: Vec<Payment> = Simulator::new(cfg)
        .expect("sim")
        .take(4_000)
        .map(|(p, _)| p)
        .collect();
    for i in (0..events.len()).step_by(7) {
        let j = (i + 37).min(events.len() - 1);
        events.swap(i, j);
    }
    let late = events
        .windows(2)
        .filter(|w| w[1].event_time < w[0].event_time)
        .count();
    assert!(late > 100, "the test needs out-of-order events, got {late}");

    let mut state = FeatureState::default();
    for (i, p) in events.iter().enumerate() {
        let got = state
            .update(
                &set,
                set.extract(&p.to_value(), None)
                    .expect("extract")
                    .into_owned(),
            )
            .expect("features");
        let want = reference(&events, i);
        assert!(
            got.iter().zip(&want).all(|(a, b)| close(*a, *b)),
            "event {i}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn a_key_never_holds_more_than_the_cap_and_idle_keys_are_evicted() {
    let set =
        feature_set(&TOPOLOGY.replace("max_events_per_key = 10000", "max_events_per_key = 3"));
    let mut state = FeatureState::default();
    let base = Simulator::new(SimConfig::default())
        .expect("sim")
        .next()
        .expect("event")
        .0;
    let t0 = base.event_time;
    let at = |card: &str, t: i64, amount: i64| {
        let mut p = base.clone();
        p.card_id = card.into();
        p.event_time = t0 + t;
        p.amount_minor = amount;
        set.extract(&p.to_value(), None)
            .expect("extract")
            .into_owned()
    };
    for (k, amount) in [100, 200, 300, 400, 500].into_iter().enumerate() {
        let f = state
            .update(&set, at("a", 1_000 * k as i64, amount))
            .expect("features");
        // A window sees at most 3 earlier events plus the current one: the oldest are dropped.
        assert_eq!(f[1], (k + 1).min(4) as f64);
    }
    assert_eq!(state.events(), 3);
    // Other keys, 3 hours later, enough of them to move the partition's eviction clock (one
    // group of 15 × 15 events): "a" is idle for longer than 2h and goes at the next sweep.
    assert_eq!(state.clock().now(), None);
    for i in 0..CLOCK_BASE * CLOCK_BASE {
        state
            .update(
                &set,
                at(&format!("b{}", i % 7), 3 * 3_600_000 + i as i64, 100),
            )
            .expect("features");
    }
    assert!(state.clock().now().is_some_and(|c| c >= t0 + 3 * 3_600_000));
    state.sweep(&set);
    assert_eq!(state.keys(), 7);
    // Its next event starts afresh, exactly as if it had been kept (gap > idle TTL → default).
    let f = state
        .update(&set, at("a", 3 * 3_600_000 + 1_000, 700))
        .expect("features");
    assert_eq!((f[1], f[9]), (1.0, -1.0));
}

/// A schema with a `double` field, for the non-finite cases a payment (integer amounts) cannot
/// produce.
const READINGS_AVSC: &str = r#"{"type": "record", "name": "Reading", "fields": [
  {"name": "sensor", "type": "string"},
  {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
  {"name": "x", "type": "double"}]}"#;

const READINGS: &str = r#"
name = "r"
[input]
topic = "in"
group = "g"
key_field = "sensor"
event_time_field = "at"
schema = "reading.avsc"
[[feature]]
name = "x"
aggregation = "value"
field = "x"
[[feature]]
name = "sum_1h"
aggregation = "sum"
field = "x"
window = "1h"
[output]
scored_topic = "s"
dead_letter_topic = "d"
"#;

fn readings_set() -> FeatureSet {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("reading.avsc"), READINGS_AVSC).expect("schema");
    let file = dir.path().join("r.toml");
    std::fs::write(&file, READINGS).expect("topology");
    let loaded = topology::load(Path::new(&file)).expect("valid topology");
    FeatureSet::new(&loaded.topology, &loaded.schema)
}

fn reading(sensor: &str, at: i64, x: f64) -> Value {
    Value::Record(vec![
        ("sensor".into(), Value::String(sensor.into())),
        ("at".into(), Value::TimestampMillis(at)),
        ("x".into(), Value::Double(x)),
    ])
}

#[test]
fn a_non_finite_feature_is_an_error_and_leaves_state_unchanged() {
    let set = readings_set();
    let mut state = FeatureState::default();
    let t = 1_767_225_600_000;
    // A sum of two finite values that overflows: the second event is refused...
    state
        .update(
            &set,
            set.extract(&reading("s", t, 1e308), None).expect("extract"),
        )
        .expect("features");
    let before = state.clone();
    let err = state
        .update(
            &set,
            set.extract(&reading("s", t + 1, 1e308), None)
                .expect("extract"),
        )
        .expect_err("non-finite");
    assert_eq!(err, FeatureError::NotFinite("sum_1h".into()));
    assert_eq!(err.reason(), Reason::NonFiniteFeature);
    // ... and leaves the state as it was.
    assert_eq!(state, before);
    // A non-finite input is refused before the features.
    let nan = set
        .extract(&reading("s", t + 2, f64::NAN), None)
        .expect_err("NaN input");
    assert_eq!(nan.reason(), Reason::NonFiniteFeature);
    let inf = set
        .extract(&reading("s", t + 2, f64::INFINITY), None)
        .expect_err("inf input");
    assert_eq!(inf.reason(), Reason::NonFiniteFeature);
}

/// Features of `events[range]`, taken by `state` in order.
fn run_on(
    set: &FeatureSet,
    events: &[Payment],
    state: &mut FeatureState,
    range: std::ops::Range<usize>,
) -> Vec<Vec<f64>> {
    events[range]
        .iter()
        .map(|e| {
            state
                .update(set, set.extract(&e.to_value(), None).expect("extract"))
                .expect("features")
        })
        .collect()
}

#[test]
fn rollback_takes_back_everything_since_the_checkpoint() {
    let set = feature_set(TOPOLOGY);
    let events = payments(5, 0.05, 40);
    let run = |state: &mut FeatureState, range| run_on(&set, &events, state, range);
    let mut straight = FeatureState::default();
    let want = run(&mut straight, 0..40);

    let mut state = FeatureState::default();
    let first = run(&mut state, 0..20);
    state.checkpoint();
    let _discarded = run(&mut state, 20..35);
    assert!(state.changed_keys() > 0);
    state.rollback();
    let again = run(&mut state, 20..40);
    assert_eq!([first, again].concat(), want);
}

/// With a cycle sealed (its commit under way) and the next one open: taking back the open level
/// leaves the state as sealed, taking back both leaves it as committed, and committing the
/// sealed level leaves the open changes to the next changelog, exactly those of a serial run.
#[test]
fn two_undo_levels_take_back_one_cycle_or_both() {
    let set = feature_set(TOPOLOGY);
    // Few cards and many events, so keys reach the running aggregates and the cap trims.
    let events = payments(3, 0.05, 1_200);
    let run = |state: &mut FeatureState, range| run_on(&set, &events, state, range);
    let sorted = |mut log: Vec<(Vec<u8>, Option<Vec<u8>>)>| {
        log.sort();
        log
    };
    let mut straight = FeatureState::default();
    let want = run(&mut straight, 0..1_200);

    let mut state = FeatureState::default();
    run(&mut state, 0..400);
    state.checkpoint();
    run(&mut state, 400..700);
    state.seal();
    run(&mut state, 700..900);
    state.rollback_open();
    assert!(state.sealed());
    assert_eq!(run(&mut state, 700..1_000), want[700..1_000]);
    state.rollback();
    assert!(!state.sealed());
    assert_eq!(run(&mut state, 400..700), want[400..700]);
    state.seal();
    assert_eq!(run(&mut state, 700..1_000), want[700..1_000]);
    state.commit_sealed(Some(700));
    assert_eq!(state.committed_next(), Some(700));
    assert!(!state.sealed());

    let mut serial = FeatureState::default();
    run(&mut serial, 0..700);
    serial.checkpoint();
    run(&mut serial, 700..1_000);
    assert_eq!(
        sorted(changelog_of(&mut state, &set, 1_000)),
        sorted(changelog_of(&mut serial, &set, 1_000))
    );
    // The open changes roll back to the commit; a seal on a seal keeps both.
    state.rollback();
    assert_eq!(run(&mut state, 700..800), want[700..800]);
    state.seal();
    run(&mut state, 800..900);
    state.seal();
    run(&mut state, 900..1_000);
    state.rollback();
    assert_eq!(run(&mut state, 700..1_200), want[700..1_200]);
}

/// The changelog records of one commit, as the topic would hold them (in emit order).
fn changelog_of(
    state: &mut FeatureState,
    set: &FeatureSet,
    next: i64,
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut log = Vec::new();
    state
        .changelog(set, next, |k, v| {
            log.push((k.to_vec(), v.map(<[u8]>::to_vec)));
            Ok::<_, ()>(())
        })
        .expect("emit");
    log
}

#[test]
fn state_restored_from_its_changelog_equals_the_committed_state_and_computes_the_same() {
    // Cap 3 and a 2h idle TTL, with a sweep forced in the middle: the log must carry trims and
    // evictions (tombstones) as well as updates.
    let set =
        feature_set(&TOPOLOGY.replace("max_events_per_key = 10000", "max_events_per_key = 3"));
    // 300 cards, one payment each about every 8 hours: at the forced sweep many are idle.
    let events = payments(300, 0.01, 3_000);
    let feed = |state: &mut FeatureState, range: std::ops::Range<usize>| -> Vec<Vec<f64>> {
        range
            .map(|i| {
                state
                    .update(
                        &set,
                        set.extract(&events[i].to_value(), None).expect("extract"),
                    )
                    .expect("features")
            })
            .collect()
    };
    let mut live = FeatureState::default();
    let mut log = Vec::new();
    let mut back = 0;
    for chunk in (0..2_000).step_by(250) {
        // A sweep half way through each cycle: keys evicted and back within one cycle too.
        feed(&mut live, chunk..chunk + 125);
        let before: HashSet<Key> = live.keys.keys().cloned().collect();
        live.sweep(&set);
        let evicted: Vec<Key> = before
            .into_iter()
            .filter(|k| !live.keys.contains_key(k))
            .collect();
        feed(&mut live, chunk + 125..chunk + 250);
        back += evicted
            .iter()
            .filter(|k| live.keys.contains_key(*k))
            .count();
        log.extend(changelog_of(&mut live, &set, chunk as i64 + 250));
        live.commit(chunk as i64 + 250);
    }
    assert!(
        log.iter().any(|(_, v)| v.is_none()),
        "the test needs evicted keys (tombstones)"
    );
    assert!(
        back > 0,
        "the test needs keys evicted and back in one cycle"
    );

    let mut restored = FeatureState::default();
    let mut mark = None;
    for (k, v) in &log {
        if let Some(m) = restored
            .restore_record(&set, k, v.as_deref())
            .expect("restore")
        {
            mark = Some(m);
        }
    }
    restored.restored();
    assert_eq!(mark, Some(PartitionMark { next_offset: 2_000 }));
    assert_eq!(restored, live);
    // And the rest of the stream gets the same features from both.
    assert_eq!(
        feed(&mut restored, 2_000..3_000),
        feed(&mut live, 2_000..3_000)
    );
    assert_eq!(restored, live);
}

/// A cycle's changelog written in pieces as the cycle goes (the pipeline writes it while the
/// cycle is gathered, in its transaction) restores the same state as one written at its end:
/// with trims by the cap, evictions, keys evicted and back, and a cycle whose pieces were
/// written and then taken back (its transaction aborted).
#[test]
fn a_changelog_written_as_the_cycle_goes_restores_the_same_state() {
    let set =
        feature_set(&TOPOLOGY.replace("max_events_per_key = 10000", "max_events_per_key = 3"));
    let events = payments(300, 0.01, 3_000);
    let value = |i: usize| events[i].to_value();
    let (mut whole, mut pieces) = (FeatureState::default(), FeatureState::default());
    let (mut log_whole, mut log_pieces) = (Vec::new(), Vec::new());
    let piece = |state: &mut FeatureState, log: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>| {
        state
            .changelog_so_far(&set, |k, v| {
                log.push((k.to_vec(), v.map(<[u8]>::to_vec)));
                Ok::<_, ()>(())
            })
            .expect("emit")
    };
    let mut next_piece = 0;
    let mut chunk = 0;
    let mut aborted = false;
    while chunk < 2_000 {
        let log_at = log_pieces.len();
        for i in chunk..chunk + 250 {
            for state in [&mut whole, &mut pieces] {
                let v = value(i);
                state
                    .update(&set, set.extract(&v, None).expect("extract"))
                    .expect("features");
                if i == chunk + 125 {
                    state.sweep(&set);
                }
            }
            // Pieces of 1 to 23 events.
            if i >= next_piece {
                piece(&mut pieces, &mut log_pieces);
                next_piece = i + 1 + (i * 7_919) % 23;
            }
        }
        if chunk == 1_000 && !aborted {
            // Written, then the transaction aborted: its records are not in the log, and the
            // cycle is redone.
            piece(&mut pieces, &mut log_pieces);
            log_pieces.truncate(log_at);
            whole.rollback();
            pieces.rollback();
            aborted = true;
            next_piece = chunk;
            continue;
        }
        log_whole.extend(changelog_of(&mut whole, &set, chunk as i64 + 250));
        log_pieces.extend(changelog_of(&mut pieces, &set, chunk as i64 + 250));
        whole.commit(chunk as i64 + 250);
        pieces.commit(chunk as i64 + 250);
        chunk += 250;
    }
    assert!(
        log_pieces.len() > log_whole.len(),
        "the test needs events removed after their record was written ({} and {} records)",
        log_pieces.len(),
        log_whole.len()
    );
    let restore = |log: &[(Vec<u8>, Option<Vec<u8>>)]| {
        let mut restored = FeatureState::default();
        for (k, v) in log {
            restored
                .restore_record(&set, k, v.as_deref())
                .expect("restore");
        }
        restored.restored();
        restored
    };
    let (from_whole, from_pieces) = (restore(&log_whole), restore(&log_pieces));
    assert_eq!(from_whole, whole);
    assert_eq!(from_pieces, whole);
    assert_eq!(whole, pieces);
}

#[test]
fn a_restore_places_records_by_seq_whatever_order_they_come_in() {
    // A key's records come in seq order from the log; a restore must not depend on it. The
    // same records reversed, with some written twice, restore the same state.
    let set = feature_set(TOPOLOGY);
    let events = payments(50, 0.2, 2_000);
    let mut live = FeatureState::default();
    for p in &events {
        live.update(&set, set.extract(&p.to_value(), None).expect("extract"))
            .expect("features");
    }
    let log = changelog_of(&mut live, &set, 2_000);
    live.commit(2_000);
    let (partition, records) = log.split_last().expect("records");
    assert!(records.len() > 500, "{} records", records.len());
    let mut shuffled: Vec<_> = records.iter().rev().collect();
    shuffled.extend(records.iter().step_by(7));
    shuffled.push(partition);
    let mut restored = FeatureState::default();
    for (k, v) in shuffled {
        restored
            .restore_record(&set, k, v.as_deref())
            .expect("restore");
    }
    restored.restored();
    assert_eq!(restored, live);
}

#[test]
fn a_malformed_or_foreign_changelog_value_is_an_error_not_a_panic() {
    let set = feature_set(TOPOLOGY);
    let mut state = FeatureState::default();
    let p = Simulator::new(SimConfig::default())
        .expect("sim")
        .next()
        .expect("event")
        .0;
    state
        .update(
            &set,
            set.extract(&p.to_value(), None)
                .expect("extract")
                .into_owned(),
        )
        .expect("features");
    let log = changelog_of(&mut state, &set, 1);
    let (key, value) = log
        .iter()
        .find(|(k, _)| k.as_slice() != PARTITION_KEY)
        .expect("a key record");
    let value = value.clone().expect("a value");
    let mut fresh = FeatureState::default();
    for cut in 0..value.len() {
        assert!(
            fresh
                .restore_record(&set, key, Some(&value[..cut]))
                .is_err(),
            "cut at {cut}"
        );
    }
    let mut longer = value.clone();
    longer.push(0);
    assert_eq!(
        fresh.restore_record(&set, key, Some(&longer)),
        Err(CodecError::Malformed("bytes left over"))
    );
    let mut version = value.clone();
    version[0] = 9;
    assert_eq!(
        fresh.restore_record(&set, key, Some(&version)),
        Err(CodecError::Version(9))
    );
    // A topology whose features read other fields refuses the state.
    let other = feature_set(&TOPOLOGY.replace("field = \"merchant_id\"", "field = \"device_id\""));
    assert!(matches!(
        fresh.restore_record(&other, key, Some(&value)),
        Err(CodecError::Fingerprint { .. })
    ));
    assert_eq!(
        fresh.restore_record(&set, b"\xFE", Some(&value)),
        Err(CodecError::Key)
    );
    assert_eq!(fresh.keys(), 0);
}

/// Each error's dead-letter reason.
#[test]
fn each_feature_error_has_its_reason() {
    let wrong = || ExtractError::WrongType {
        field: "amount".into(),
        found: "string".into(),
    };
    let cases = [
        (
            FeatureError::Key(ExtractError::Missing("card_id".into())),
            Reason::MissingKey,
        ),
        (FeatureError::Key(wrong()), Reason::MissingKey),
        (
            FeatureError::Key(ExtractError::Empty("card_id".into())),
            Reason::MissingKey,
        ),
        (
            FeatureError::Key(ExtractError::TooLong {
                field: "card_id".into(),
                len: 5_000,
            }),
            Reason::KeyTooLong,
        ),
        (
            FeatureError::EventTime(ExtractError::Missing("event_time".into())),
            Reason::MissingEventTime,
        ),
        (FeatureError::EventTime(wrong()), Reason::MissingEventTime),
        (
            FeatureError::EventTimeOutOfRange("0 ms is before ...".into()),
            Reason::EventTimeOutOfRange,
        ),
        (
            FeatureError::Extract(ExtractError::NotARecord),
            Reason::BadField,
        ),
        (
            FeatureError::Extract(ExtractError::Missing("amount".into())),
            Reason::MissingField,
        ),
        (FeatureError::Extract(wrong()), Reason::BadField),
        (
            FeatureError::Extract(ExtractError::NotFinite("amount".into())),
            Reason::NonFiniteFeature,
        ),
        (
            FeatureError::NotFinite("mean_7d".into()),
            Reason::NonFiniteFeature,
        ),
    ];
    for (error, reason) in cases {
        assert_eq!(error.reason(), reason, "{error}");
    }
}

/// Rolling back restores the checkpoint's state exactly, also when the cycle trimmed keys to
/// their cap, evicted idle keys, brought them back and held late events.
#[test]
fn rollback_restores_the_checkpoint_through_trims_evictions_and_late_events() {
    let set =
        feature_set(&TOPOLOGY.replace("max_events_per_key = 10000", "max_events_per_key = 3"));
    let mut events = payments(30, 0.01, 2_000);
    // Every 7th event arrives an hour late.
    for e in events.iter_mut().step_by(7) {
        e.event_time -= 3_600_000;
    }
    let feed = |state: &mut FeatureState, range: std::ops::Range<usize>| {
        for i in range {
            state
                .update(
                    &set,
                    set.extract(&events[i].to_value(), None).expect("extract"),
                )
                .expect("features");
        }
    };
    let mut state = FeatureState::default();
    let mut evicted = 0;
    for (n, start) in (0..2_000).step_by(200).enumerate() {
        state.checkpoint();
        let at_checkpoint = state.clone();
        // A cycle that is rolled back: trims (cap 3), a sweep half way (2 h idle TTL).
        feed(&mut state, start..start + 100);
        let before_sweep = state.keys();
        state.sweep(&set);
        evicted += before_sweep - state.keys();
        feed(&mut state, start + 100..start + 200);
        state.rollback();
        assert_eq!(state, at_checkpoint, "cycle {n} not taken back");
        // The same cycle again, kept.
        feed(&mut state, start..start + 200);
    }
    assert!(
        evicted > 0,
        "the test needs evictions inside a rolled-back cycle"
    );
}

// --- One bad record never changes another key's features (issue 13) -------------------------

/// The features each event gets, feeding `events` in order through one partition's state.
fn features_of(set: &FeatureSet, events: &[Payment]) -> Vec<Result<Vec<f64>, FeatureError>> {
    let mut state = FeatureState::default();
    events
        .iter()
        .map(|p| {
            set.extract(&p.to_value(), None)
                .and_then(|e| state.update(set, e))
        })
        .collect()
}

/// One event dated ten days ahead (a terminal with a wrong clock) must not evict the other
/// cards: every other event gets the features it gets without the outlier, also after many
/// sweeps' worth of events.
#[test]
fn an_event_far_in_the_future_does_not_change_other_keys_features() {
    let set = feature_set(&TOPOLOGY.replace("idle_key_ttl = \"2h\"", "idle_key_ttl = \"8d\""));
    // 300 cards, 30,000 events over ~8 hours of event time: every card has recent history.
    let events = payments(300, 1.0, 30_000);
    let mut with_outlier = events.clone();
    let mut outlier = events[100].clone();
    outlier.card_id = "crd_wrong_clock".into();
    outlier.event_time += 10 * 24 * 3_600_000;
    with_outlier.insert(101, outlier);

    let want = features_of(&set, &events);
    let got = features_of(&set, &with_outlier);
    let got: Vec<_> = got
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 101)
        .map(|(_, f)| f)
        .collect();
    let differ = want.iter().zip(&got).filter(|(w, g)| w != g).count();
    assert_eq!(differ, 0, "{differ} of {} events changed", want.len());
}

/// A $0 card-verification payment as a card's first event is scored: the ratio to a zero mean
/// takes its documented default instead of 0/0.
#[test]
fn a_zero_amount_first_payment_has_defined_features() {
    let set = feature_set(TOPOLOGY);
    let mut state = FeatureState::default();
    let mut p = payments(1, 1.0, 1).remove(0);
    p.amount_minor = 0;
    let f = state
        .update(
            &set,
            set.extract(&p.to_value(), None)
                .expect("extract")
                .into_owned(),
        )
        .expect("a $0 payment has features");
    let ratio = set
        .names()
        .iter()
        .position(|n| *n == "ratio_1h")
        .expect("ratio");
    assert_eq!(f[ratio], 1.0);
    // A second $0 payment, and then a normal one: the mean is no longer 0.
    let mut q = p.clone();
    q.event_time += 1_000;
    let f = state
        .update(&set, set.extract(&q.to_value(), None).expect("extract"))
        .expect("features");
    assert_eq!(f[ratio], 1.0);
    let mut r = q.clone();
    r.event_time += 1_000;
    r.amount_minor = 300;
    let f = state
        .update(&set, set.extract(&r.to_value(), None).expect("extract"))
        .expect("features");
    assert_eq!(f[ratio], 3.0);
}

/// An empty key would pool every such event into one history: it is a missing key.
#[test]
fn an_empty_key_is_a_missing_key() {
    let set = feature_set(TOPOLOGY);
    let mut p = payments(1, 1.0, 1).remove(0);
    p.card_id = String::new();
    let err = set
        .extract(&p.to_value(), None)
        .expect_err("empty key refused");
    assert_eq!(err.reason(), Reason::MissingKey);
}

/// Event-time arithmetic saturates: extreme times (which the range check keeps out of the
/// pipeline) never overflow inside the features.
#[test]
fn extreme_event_times_do_not_overflow() {
    let set = feature_set(TOPOLOGY);
    let mut state = FeatureState::default();
    let p = payments(1, 1.0, 1).remove(0);
    for t in [i64::MIN, i64::MAX, 0, i64::MIN + 1, i64::MAX - 1, -1] {
        // Past the range check, which would refuse them.
        let mut event = set
            .extract(&p.to_value(), None)
            .expect("extract")
            .into_owned();
        event.time = t;
        let f = state.update(&set, event).expect("features");
        assert!(f.iter().all(|x| x.is_finite()), "{t}: {f:?}");
    }
    state.sweep(&set);
}

/// Category values are hashed with a specified hash (XXH3-64 of the UTF-8 bytes), since they
/// are persisted in the changelog: values from the reference implementation.
#[test]
fn category_hashes_are_xxh3_64() {
    assert_eq!(extract::hash_str(""), 0x2d06_8005_38d3_94c2);
    assert_eq!(extract::hash_str("abc"), 0x78af_5f94_892f_3950);
    assert_eq!(extract::hash_str("ECOMMERCE"), 0x9688_0ec5_09e2_3c52);
}

/// Event times outside the topology's range are refused before they reach any state: before
/// `event_time_earliest` (2000-01-01 by default), after 9999-12-31, or more than
/// `event_time_max_ahead` (1 h by default) ahead of the record's own timestamp.
#[test]
fn event_times_outside_the_range_are_refused() {
    let set = feature_set(TOPOLOGY);
    let p = payments(1, 1.0, 1).remove(0);
    let produced = p.event_time;
    let at = |t: i64, produced_at: Option<i64>| {
        let mut e = p.clone();
        e.event_time = t;
        set.extract(&e.to_value(), produced_at).map(|_| ())
    };
    let hour = 3_600_000;
    for t in [
        i64::MIN,
        -1,
        0,
        946_684_799_999,
        LATEST_EVENT_TIME_MS + 1,
        i64::MAX,
        produced + 10 * 24 * hour,
        produced + hour + 1,
    ] {
        let err = at(t, Some(produced)).expect_err("out of range");
        assert_eq!(err.reason(), Reason::EventTimeOutOfRange, "{t}: {err}");
    }
    assert!(
        at(produced + 10 * 24 * hour, Some(produced))
            .expect_err("ahead")
            .to_string()
            .contains("10days ahead of the record's timestamp"),
    );
    for t in [
        946_684_800_000,
        produced - 365 * 24 * hour,
        produced,
        produced + hour,
    ] {
        assert_eq!(at(t, Some(produced)), Ok(()), "{t}");
    }
    // Offline there is no record timestamp: only the fixed bounds apply.
    assert_eq!(at(produced + 10 * 24 * hour, None), Ok(()));
    assert!(at(0, None).is_err());
}

/// The eviction clock follows the bulk of a partition's event times and cannot be moved by a
/// single event, nor by fewer than 64 of each 225.
#[test]
fn the_eviction_clock_is_not_moved_by_outliers() {
    let t0 = 1_767_225_600_000_i64;
    let mut clock = EvictionClock::default();
    for i in 0..CLOCK_BASE * CLOCK_BASE - 1 {
        clock.observe(t0 + i as i64);
    }
    assert_eq!(clock.now(), None, "unset before the first 225 events");
    clock.observe(t0 + 224);
    assert_eq!(clock.now(), Some(t0 + 112));
    // 63 of the next 225 events far in the future, placed as harmfully as they can be (8 in
    // each of 7 groups, 7 in the 8th, right at the start): the clock moves with the others.
    let mut clock2 = clock;
    let mut outliers = 0;
    for g in 0..CLOCK_BASE {
        for i in 0..CLOCK_BASE {
            let far = g < 8 && i < if g < 7 { 8 } else { 7 };
            outliers += usize::from(far);
            let t = if far {
                i64::MAX / 2
            } else {
                t0 + 1_000 + (g * CLOCK_BASE + i) as i64
            };
            clock2.observe(t);
        }
    }
    assert_eq!(outliers, 63);
    assert!(
        clock2.now().is_some_and(|c| c < t0 + 1_000 + 225),
        "{:?}",
        clock2.now()
    );
    // The bound is tight: 64 so placed (8 in each of 8 groups) do move it.
    let mut clock3 = clock;
    for g in 0..CLOCK_BASE {
        for i in 0..CLOCK_BASE {
            let far = g < 8 && i < 8;
            clock3.observe(if far { i64::MAX / 2 } else { t0 + 1_000 });
        }
    }
    assert_eq!(clock3.now(), Some(i64::MAX / 2));
    // Never backwards: a partition whose events go back in time keeps its clock.
    for _ in 0..CLOCK_BASE * CLOCK_BASE {
        clock.observe(t0 - 1_000_000);
    }
    assert_eq!(clock.now(), Some(t0 + 112));
}

/// State written by earlier changelog formats (version 1: categories hashed with std's
/// `DefaultHasher`; version 2: a key's whole state under the key itself) is refused record by
/// record, not misread.
#[test]
fn changelog_records_of_the_previous_format_are_refused() {
    let set = feature_set(TOPOLOGY);
    let mut state = FeatureState::default();
    for p in payments(3, 1.0, 10) {
        state
            .update(
                &set,
                set.extract(&p.to_value(), None)
                    .expect("extract")
                    .into_owned(),
            )
            .expect("features");
    }
    let mut fresh = FeatureState::default();
    for (key, value) in changelog_of(&mut state, &set, 10) {
        let mut value = value.expect("a value");
        assert_eq!(value[0], 3, "format version");
        for old in [1, 2] {
            value[0] = old;
            assert_eq!(
                fresh.restore_record(&set, &key, Some(&value)),
                Err(CodecError::Version(old))
            );
        }
        // Version 2's key records were named by the feature key alone.
        if let Some(at) = key.iter().position(|&b| b == 0xFF).filter(|&at| at > 0) {
            assert_eq!(
                fresh.restore_record(&set, &key[..at], Some(&value)),
                Err(CodecError::Version(2))
            );
        }
    }
    fresh.restored();
    assert_eq!(fresh, FeatureState::default());
}

/// What a commit writes to the changelog does not grow with the key's history: one record per
/// event added, one tombstone per event dropped, one partition record.
#[test]
fn changelog_bytes_per_event_do_not_grow_with_history() {
    let set =
        feature_set(&TOPOLOGY.replace("max_events_per_key = 10000", "max_events_per_key = 3000"));
    let mut state = FeatureState::default();
    let t0 = 1_767_225_600_000;
    // One card, an event a second: its retained history grows to the cap (3,000), then the
    // cap trims one event per event.
    let base = Simulator::new(SimConfig::default())
        .expect("sim")
        .next()
        .expect("event")
        .0;
    let mut per_commit = Vec::new();
    for i in 0..6_000i64 {
        let mut p = base.clone();
        p.event_time = t0 + i * 1_000;
        state
            .update(
                &set,
                set.extract(&p.to_value(), None)
                    .expect("extract")
                    .into_owned(),
            )
            .expect("features");
        if i % 10 == 9 {
            let (mut records, mut bytes, mut tombstones) = (0, 0, 0);
            state
                .changelog(&set, i, |k, v| {
                    records += 1;
                    // The partition record's size varies a little with its eviction clock.
                    if k != PARTITION_KEY {
                        bytes += k.len() + v.map_or(0, <[u8]>::len);
                    }
                    tombstones += usize::from(v.is_none());
                    Ok::<_, ()>(())
                })
                .expect("emit");
            state.commit(i);
            per_commit.push((records, bytes, tombstones));
        }
    }
    let held = state.keys.values().map(|k| k.events.len()).sum::<usize>();
    assert_eq!(held, 3_000);
    // 10 event records and the partition record; once the cap is reached, 10 tombstones too.
    let (growing, capped) = (per_commit[5], per_commit[590]);
    // An event record is its key (the card, 0xFF, 8 bytes) and a value of version, fingerprint,
    // time and the five inputs (one numeric, four categorical): 9 + 8 + 8 × 5 bytes. A
    // tombstone is its key alone.
    let key = base.card_id.len() + 9;
    assert_eq!(growing, (11, 10 * (key + 57), 0));
    assert_eq!(capped, (21, 10 * (key + 57) + 10 * key, 10));
    assert!(
        per_commit[..300].iter().all(|c| *c == growing),
        "{per_commit:?}"
    );
    assert!(
        per_commit[300..].iter().all(|c| *c == capped),
        "{per_commit:?}"
    );
}

/// Readings with a category, for the long-history oracle test.
const SITES_AVSC: &str = r#"{"type": "record", "name": "Reading", "fields": [
  {"name": "sensor", "type": "string"},
  {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
  {"name": "x", "type": "double"},
  {"name": "site", "type": "string"}]}"#;

fn sites_set() -> FeatureSet {
    let mut toml = String::from(
        r#"
name = "long"
[input]
topic = "in"
group = "g"
key_field = "sensor"
event_time_field = "at"
schema = "sites.avsc"
[state]
max_events_per_key = 200
idle_key_ttl = "7d"
[[feature]]
name = "since_last"
aggregation = "time_since_last"
"#,
    );
    for (window, aggregations) in [
        ("10m", &["count", "sum", "min", "distinct_count"][..]),
        (
            "1h",
            &[
                "count",
                "sum",
                "mean",
                "std",
                "min",
                "max",
                "ratio_to_mean",
                "distinct_count",
                "is_new",
            ][..],
        ),
        ("6h", &["mean", "std", "max", "is_new"][..]),
    ] {
        for a in aggregations {
            let field = match *a {
                "count" => "",
                "distinct_count" | "is_new" => "field = \"site\"\n",
                _ => "field = \"x\"\n",
            };
            toml.push_str(&format!(
                "[[feature]]\nname = \"{a}_{window}\"\naggregation = \"{a}\"\n{field}window = \"{window}\"\n"
            ));
        }
    }
    toml.push_str("[output]\nscored_topic = \"s\"\ndead_letter_topic = \"d\"\n");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("sites.avsc"), SITES_AVSC).expect("schema");
    let file = dir.path().join("long.toml");
    std::fs::write(&file, toml).expect("topology");
    let loaded = topology::load(Path::new(&file)).expect("valid topology");
    FeatureSet::new(&loaded.topology, &loaded.schema)
}

/// The running aggregates against a recomputation from the window's events, bit for bit, over
/// long random histories: values of every magnitude and sign (and repeats, zeros, `-0.0`),
/// late events (some older than what a key retains), the per-key cap trimming windows from
/// the front, rollbacks and restores from the changelog (which rebuild the aggregates).
#[test]
fn running_aggregates_equal_a_recomputation_bit_for_bit_over_long_histories() {
    use rand::{Rng, SeedableRng};
    let set = sites_set();
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut state = FeatureState::default();
    let mut log = std::collections::BTreeMap::new();
    let mut clock = 1_767_225_600_000i64;
    let (mut late, mut fast) = (0, 0);
    for i in 0..20_000i64 {
        let sensor = format!("s{}", rng.random_range(0..4));
        clock += rng.random_range(0..40_000);
        let at = if rng.random_bool(0.1) {
            late += 1;
            clock - rng.random_range(0..8 * 3_600_000)
        } else {
            fast += 1;
            clock
        };
        let x = match rng.random_range(0..10) {
            0 => 0.0,
            1 => -0.0,
            2 => 1234.5,
            // Integers (amounts in minor units), summed by plain addition where that is exact.
            3..=6 => f64::from(rng.random_range(-100_000..100_000)),
            _ => {
                let sign = if rng.random_bool(0.3) { -1.0 } else { 1.0 };
                sign * rng.random::<f64>() * 2f64.powi(rng.random_range(-30..30))
            }
        };
        // Some values recur, most seldom: windows count from one to many distinct values.
        let site = if rng.random_bool(0.5) {
            format!("site{}", rng.random_range(0..12))
        } else {
            format!("rare{}", rng.random_range(0..400))
        };
        let value = Value::Record(vec![
            ("sensor".into(), Value::String(sensor.clone())),
            ("at".into(), Value::TimestampMillis(at)),
            ("x".into(), Value::Double(x)),
            ("site".into(), Value::String(site)),
        ]);
        let event = set.extract(&value, None).expect("extract");
        // The definition: the event placed among its key's retained events, its features
        // computed from its windows' events.
        let mut events = state
            .keys
            .get(sensor.as_bytes())
            .map(|k| k.events.clone())
            .unwrap_or_default();
        let pos = events.partition_point(|e| e.time <= at);
        events.insert(
            pos,
            Stored {
                time: at,
                seq: u64::MAX,
                nums: event.nums.clone(),
                cats: event.cats.clone(),
            },
        );
        let want = compute(&set, events.make_contiguous(), pos);
        let got = state.update(&set, event);
        match (&got, &want) {
            (Ok(got), Ok(want)) => {
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(got),
                    bits(want),
                    "event {i} (seed {seed}): {got:?} vs {want:?}"
                );
            }
            _ => assert_eq!(got, want, "event {i} (seed {seed})"),
        }
        // Commits keep a compacted changelog: the last value of each key.
        let mut commit = |state: &mut FeatureState| {
            log.extend(changelog_of(state, &set, i));
            state.commit(i);
        };
        match i % 2_000 {
            0 => commit(&mut state),
            700 => state.rollback(),
            1_400 => {
                commit(&mut state);
                let mut restored = FeatureState::default();
                for (key, value) in &log {
                    restored
                        .restore_record(&set, key, value.as_deref())
                        .expect("restore");
                }
                restored.restored();
                assert_eq!(restored, state);
                state = restored;
            }
            _ => {}
        }
    }
    assert!(
        late > 1_500 && fast > 15_000,
        "late {late}, in order {fast}"
    );
    let held = state.keys.values().map(|k| k.events.len()).max();
    assert_eq!(held, Some(200), "the cap should be trimming");
}

/// A record read in place is read by position where its layout is the reader schema's, and by
/// name where it is not (a feature set compiled against another schema): the same event
/// either way.
#[test]
fn a_record_read_in_place_gives_the_same_event_by_position_or_by_name() {
    use crate::source::direct::Program;
    let set = readings_set();
    let value = reading("s1", 1_767_225_600_000, 2.5);
    let want = set.extract(&value, None).expect("extract");
    let same = apache_avro::Schema::parse_str(READINGS_AVSC).expect("schema");
    let reordered = apache_avro::Schema::parse_str(
        r#"{"type": "record", "name": "Reading", "fields": [
          {"name": "x", "type": "double"},
          {"name": "sensor", "type": "string"},
          {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}"#,
    )
    .expect("schema");
    for (schema, positional) in [(same, true), (reordered, false)] {
        let value = Value::Record(match positional {
            true => vec![
                ("sensor".into(), Value::String("s1".into())),
                ("at".into(), Value::TimestampMillis(1_767_225_600_000)),
                ("x".into(), Value::Double(2.5)),
            ],
            false => vec![
                ("x".into(), Value::Double(2.5)),
                ("sensor".into(), Value::String("s1".into())),
                ("at".into(), Value::TimestampMillis(1_767_225_600_000)),
            ],
        });
        let mut datum = Vec::new();
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .expect("writer")
            .write_value_ref(&mut datum, &value)
            .expect("datum");
        let program = std::sync::Arc::new(Program::compile(&schema).expect("compiles"));
        let direct = program.read(&datum).expect("reads");
        use extract::Fields;
        assert_eq!(direct.layout() == Some(set.layout), positional);
        assert_eq!(set.extract(&direct, None).expect("extract"), want);
    }
}
