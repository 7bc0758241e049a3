use std::collections::HashSet;
use std::path::Path;

use super::*;
use crate::payments::Payment;
use crate::simulator::{SimConfig, Simulator};
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
max_events_per_key = 100000
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
        f64::from(u8::from(e.channel == crate::payments::Channel::Ecommerce)),
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
            .update(&set, set.extract(&p.to_value()).expect("extract"))
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
        feature_set(&TOPOLOGY.replace("max_events_per_key = 100000", "max_events_per_key = 3"));
    let mut state = FeatureState::default();
    let base = Simulator::new(SimConfig::default())
        .expect("sim")
        .next()
        .expect("event")
        .0;
    let at = |card: &str, t: i64, amount: i64| {
        let mut p = base.clone();
        p.card_id = card.into();
        p.event_time = t;
        p.amount_minor = amount;
        set.extract(&p.to_value()).expect("extract")
    };
    for (k, amount) in [100, 200, 300, 400, 500].into_iter().enumerate() {
        let f = state
            .update(&set, at("a", 1_000 * k as i64, amount))
            .expect("features");
        // A window sees at most 3 earlier events plus the current one: the oldest are dropped.
        assert_eq!(f[1], (k + 1).min(4) as f64);
    }
    assert_eq!(state.events(), 3);
    // Another key, 3 hours later: "a" is idle for longer than 2h and goes at the next sweep.
    state
        .update(&set, at("b", 3 * 3_600_000, 100))
        .expect("features");
    state.sweep(&set);
    assert_eq!(state.keys(), 1);
    // Its next event starts afresh, exactly as if it had been kept (gap > idle TTL → default).
    let f = state
        .update(&set, at("a", 3 * 3_600_000 + 1, 700))
        .expect("features");
    assert_eq!((f[1], f[9]), (1.0, -1.0));
}

#[test]
fn a_non_finite_feature_is_an_error_and_leaves_state_unchanged() {
    let set = feature_set(TOPOLOGY);
    let mut state = FeatureState::default();
    let mut p = Simulator::new(SimConfig::default())
        .expect("sim")
        .next()
        .expect("event")
        .0;
    p.amount_minor = 0; // ratio to a zero mean
    let err = state
        .update(&set, set.extract(&p.to_value()).expect("extract"))
        .expect_err("non-finite");
    assert_eq!(err, FeatureError::NotFinite("ratio_1h".into()));
    assert_eq!(err.reason(), "non_finite_feature");
    assert_eq!((state.keys(), state.events()), (0, 0));
}

#[test]
fn rollback_takes_back_everything_since_the_checkpoint() {
    let set = feature_set(TOPOLOGY);
    let events = payments(5, 0.05, 40);
    let run = |state: &mut FeatureState, range: std::ops::Range<usize>| -> Vec<Vec<f64>> {
        range
            .map(|i| {
                state
                    .update(&set, set.extract(&events[i].to_value()).expect("extract"))
                    .expect("features")
            })
            .collect()
    };
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

/// The changelog records of one commit, as the topic would hold them (in emit order).
fn changelog_of(
    state: &FeatureState,
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
        feature_set(&TOPOLOGY.replace("max_events_per_key = 100000", "max_events_per_key = 3"));
    let events = payments(30, 0.01, 3_000);
    let feed = |state: &mut FeatureState, range: std::ops::Range<usize>| -> Vec<Vec<f64>> {
        range
            .map(|i| {
                state
                    .update(&set, set.extract(&events[i].to_value()).expect("extract"))
                    .expect("features")
            })
            .collect()
    };
    let mut live = FeatureState::default();
    let mut log = Vec::new();
    for (n, chunk) in (0..2_000).step_by(250).enumerate() {
        feed(&mut live, chunk..chunk + 250);
        if n == 3 {
            live.sweep(&set);
        }
        log.extend(changelog_of(&live, &set, chunk as i64 + 250));
        live.commit(chunk as i64 + 250);
    }
    assert!(
        log.iter().any(|(_, v)| v.is_none()),
        "the test needs evicted keys (tombstones)"
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
        .update(&set, set.extract(&p.to_value()).expect("extract"))
        .expect("features");
    let log = changelog_of(&state, &set, 1);
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
        Err(CodecError::Malformed("event count"))
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

/// `REASONS` (registered at 0 for the dashboards) is exactly what `reason` gives.
#[test]
fn every_feature_reason_is_listed_and_every_listed_reason_occurs() {
    let wrong = || ExtractError::WrongType {
        field: "amount".into(),
        found: "string".into(),
    };
    let errors = [
        FeatureError::Key(ExtractError::Missing("card_id".into())),
        FeatureError::Key(wrong()),
        FeatureError::EventTime(ExtractError::Missing("event_time".into())),
        FeatureError::EventTime(wrong()),
        FeatureError::Extract(ExtractError::NotARecord),
        FeatureError::Extract(ExtractError::Missing("amount".into())),
        FeatureError::Extract(wrong()),
        FeatureError::Extract(ExtractError::NotFinite("amount".into())),
        FeatureError::NotFinite("mean_7d".into()),
    ];
    let given: HashSet<&str> = errors.iter().map(FeatureError::reason).collect();
    let listed: HashSet<&str> = FeatureError::REASONS.iter().copied().collect();
    assert_eq!(given, listed);
    assert_eq!(listed.len(), FeatureError::REASONS.len(), "listed twice");
}

/// Rolling back restores the checkpoint's state exactly, also when the cycle trimmed keys to
/// their cap, evicted idle keys, brought them back and held late events.
#[test]
fn rollback_restores_the_checkpoint_through_trims_evictions_and_late_events() {
    let set =
        feature_set(&TOPOLOGY.replace("max_events_per_key = 100000", "max_events_per_key = 3"));
    let mut events = payments(30, 0.01, 2_000);
    // Every 7th event arrives an hour late.
    for e in events.iter_mut().step_by(7) {
        e.event_time -= 3_600_000;
    }
    let feed = |state: &mut FeatureState, range: std::ops::Range<usize>| {
        for i in range {
            state
                .update(&set, set.extract(&events[i].to_value()).expect("extract"))
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
