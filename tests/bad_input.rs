//! Bad input on the local stack: ordinary payments mixed with one record of every bad kind
//! (not framed, tombstones, unknown and incompatible schemas, truncated and padded datums, an
//! enum symbol the reader lacks, empty keys, event times at 0, negative, after 9999, at the
//! extremes of `long` and ten days in the future, a record whose scored output is too large to
//! publish) and a $0 verification payment that must be scored.
//!
//! Asserts: every input ends up exactly once, as a scored record or a dead letter with its
//! reason and its original key and value (cut down only where it cannot be published whole);
//! the stream never stalls; and every good record's features equal those of a run over the good
//! records alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use apache_avro::types::Value;
use kscore::cluster::ClusterArgs;
use kscore::pipeline::{RunOptions, RunSummary};
use kscore::schemas;
use kscore::scorer::runtime;
use kscore::sink::FramedEncoder;
use kscore::source::Decoder;
use kscore::tools::payments::Payment;
use kscore::tools::simulator::{SimConfig, Simulator};
use kscore::topology::Loaded;

use common::{Record, evolved_payment_schema, field, fresh_topology, read, run_until_committed};

/// An input record: key and value as produced.
#[derive(Clone)]
struct Input {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

/// A bad record and the reason its dead letter must carry.
struct Bad {
    name: &'static str,
    input: Input,
    reason: &'static str,
    /// Text the `kscore.error` header must contain.
    error_has: &'static str,
}

async fn produce(cluster: &ClusterArgs, topic: &str, records: &[Input]) {
    cluster.ensure_topic(topic, 3).await.unwrap();
    common::produce(
        cluster,
        topic,
        records.iter().map(|r| (r.key.as_ref(), r.value.as_ref())),
    )
    .await;
}

async fn process(cluster: &ClusterArgs, loaded: &Loaded, instance: &str) -> RunSummary {
    let opts = RunOptions {
        instance_id: instance.to_string(),
        max_cycle_records: 200,
        ..Default::default()
    };
    // Never stalls: the whole input is committed within the time a good input takes.
    run_until_committed(cluster, loaded, opts, Duration::from_secs(120)).await
}

async fn read_topic(cluster: &ClusterArgs, topic: &str, expected: usize) -> Vec<Record> {
    let (c, topic) = (cluster.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        read(
            &c,
            &topic,
            "read_committed",
            expected,
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap()
}

/// Features of every scored record, by event id.
async fn features_by_event(decoder: &Decoder, scored: &[Record]) -> HashMap<uuid::Uuid, Value> {
    let mut out = HashMap::new();
    for r in scored {
        let v = decoder.decode_value(r.value.as_deref()).await.unwrap().1;
        let p = Payment::from_value(field(&v, "event")).unwrap();
        let previous = out.insert(p.event_id, field(&v, "features").clone());
        assert!(previous.is_none(), "{} scored twice", p.event_id);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_and_change_no_other_record() {
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    let cluster = ClusterArgs::from_env();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mixed = fresh_topology("bad", &run_id);
    let clean = fresh_topology("clean", &run_id);
    let sr = cluster.registry().unwrap();

    let v1 = FramedEncoder::register(
        &sr,
        &schemas::value_subject(&mixed.topology.input.topic),
        schemas::PAYMENT_AVSC,
    )
    .await
    .unwrap();
    // A producer's newer schema with a channel the processor's reader schema does not know.
    let v2 = FramedEncoder::register(
        &sr,
        &schemas::value_subject(&mixed.topology.input.topic),
        &evolved_payment_schema(true, false),
    )
    .await
    .unwrap();
    // And another producer's schema, which cannot be read as a payment at all.
    let foreign = FramedEncoder::register(
        &sr,
        &format!("foreign-{run_id}-value"),
        r#"{"type": "record", "name": "Payment", "fields": [{"name": "card_id", "type": "long"}]}"#,
    )
    .await
    .unwrap();

    // 600 simulated payments, 40 cards, hours of event time in the past.
    let events: Vec<Payment> = Simulator::new(SimConfig {
        seed: 5,
        cards: 40,
        merchants: 60,
        events_per_sec: 0.05,
        incidents_per_10k: 100.0,
        ..SimConfig::default()
    })
    .unwrap()
    .take(600)
    .map(|(p, _)| p)
    .collect();
    let good = |p: &Payment| Input {
        key: Some(p.card_id.clone().into_bytes()),
        value: Some(v1.encode(p.to_value()).unwrap()),
    };
    // A $0 card verification as a new card's first payment: scored, not dead-lettered.
    let mut zero = events[10].clone();
    zero.card_id = "crd_verification".into();
    zero.event_id = uuid::Uuid::from_u128(0x5e70);
    zero.amount_minor = 0;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let template = events[20].clone();
    let payment = |card: &str, f: &dyn Fn(&mut Payment)| {
        let mut p = template.clone();
        p.card_id = card.into();
        p.event_id = uuid::Uuid::new_v4();
        f(&mut p);
        Input {
            key: Some(card.as_bytes().to_vec()),
            value: Some(v1.encode(p.to_value()).unwrap()),
        }
    };
    let time = |card: &str, t: i64| payment(card, &|p| p.event_time = t);
    let framed = v1.encode(template.to_value()).unwrap();
    let mut unknown_id = framed.clone();
    unknown_id[1..5].copy_from_slice(&987_654u32.to_be_bytes());
    let mut padded = framed.clone();
    padded.extend_from_slice(&[0, 0, 0]);
    let crypto = {
        let Value::Record(mut fields) = template.to_value() else {
            unreachable!()
        };
        for (name, v) in &mut fields {
            if name == "channel" {
                *v = Value::Enum(4, "CRYPTO".into());
            }
        }
        Input {
            key: Some(b"crd_crypto".to_vec()),
            value: Some(v2.encode(Value::Record(fields)).unwrap()),
        }
    };
    let raw = |key: &str, value: Option<Vec<u8>>| Input {
        key: Some(key.as_bytes().to_vec()),
        value,
    };
    let bad = vec![
        Bad {
            name: "json",
            input: raw("bad-json", Some(br#"{"card_id":"x"}"#.to_vec())),
            reason: "not_confluent_framed",
            error_has: "not the Confluent magic byte",
        },
        Bad {
            name: "short",
            input: raw("bad-short", Some(vec![0, 0, 1])),
            reason: "not_confluent_framed",
            error_has: "shorter than the 5-byte Confluent header",
        },
        Bad {
            name: "tombstone",
            input: raw("bad-tombstone", None),
            reason: "not_confluent_framed",
            error_has: "no value",
        },
        Bad {
            name: "unknown schema id",
            input: raw("bad-id", Some(unknown_id)),
            reason: "unknown_schema_id",
            error_has: "987654",
        },
        Bad {
            name: "foreign schema",
            input: raw(
                "bad-foreign",
                Some(
                    foreign
                        .encode(Value::Record(vec![("card_id".into(), Value::Long(7))]))
                        .unwrap(),
                ),
            ),
            reason: "incompatible_schema",
            error_has: "not compatible with the reader schema",
        },
        Bad {
            name: "truncated",
            input: raw("bad-truncated", Some(framed[..framed.len() / 2].to_vec())),
            reason: "undecodable",
            error_has: "not a valid Avro datum of writer schema",
        },
        Bad {
            name: "padded",
            input: raw("bad-padded", Some(padded)),
            reason: "undecodable",
            error_has: "3 bytes left over",
        },
        Bad {
            name: "unknown enum symbol",
            input: crypto,
            reason: "incompatible_schema",
            error_has: "field `channel`: symbol `CRYPTO` is not one of the reader's enum symbols",
        },
        Bad {
            name: "empty key",
            input: payment("", &|_| {}),
            reason: "missing_key",
            error_has: "card_id",
        },
        Bad {
            name: "epoch",
            input: time("crd_epoch", 0),
            reason: "event_time_out_of_range",
            error_has: "before input.event_time_earliest",
        },
        Bad {
            name: "negative",
            input: time("crd_negative", -86_400_000),
            reason: "event_time_out_of_range",
            error_has: "before input.event_time_earliest",
        },
        Bad {
            name: "year 10000",
            input: time("crd_10000", 253_402_300_800_000),
            reason: "event_time_out_of_range",
            error_has: "after 9999-12-31T23:59:59.999Z",
        },
        Bad {
            name: "long max",
            input: time("crd_max", i64::MAX),
            reason: "event_time_out_of_range",
            error_has: "after 9999",
        },
        Bad {
            name: "long min",
            input: time("crd_min", i64::MIN),
            reason: "event_time_out_of_range",
            error_has: "before input.event_time_earliest",
        },
        Bad {
            name: "ten days ahead",
            input: time("crd_wrong_clock", now + 10 * 86_400_000),
            reason: "event_time_out_of_range",
            error_has: "ahead of the record's timestamp",
        },
        Bad {
            name: "huge merchant name",
            input: payment("crd_huge", &|p| p.merchant_name = "x".repeat(1_000_000)),
            reason: "output_too_large",
            error_has: "scored record",
        },
    ];

    // The mixed input: the good payments with the bad records spread among them.
    let mut mixed_input = Vec::new();
    let mut clean_input = Vec::new();
    let mut bad_iter = bad.iter();
    for (i, p) in events.iter().enumerate() {
        mixed_input.push(good(p));
        clean_input.push(good(p));
        if i == 300 {
            mixed_input.push(good(&zero));
            clean_input.push(good(&zero));
        }
        if i % 30 == 29
            && let Some(b) = bad_iter.next()
        {
            mixed_input.push(b.input.clone());
        }
    }
    mixed_input.extend(bad_iter.map(|b| b.input.clone()));
    assert_eq!(mixed_input.len(), events.len() + 1 + bad.len());
    produce(&cluster, &mixed.topology.input.topic, &mixed_input).await;
    produce(&cluster, &clean.topology.input.topic, &clean_input).await;

    let mixed_summary = process(&cluster, &mixed, &format!("bad-{run_id}")).await;
    let clean_summary = process(&cluster, &clean, &format!("clean-{run_id}")).await;

    // Exactly once each: scored + dead-lettered = consumed.
    let good_count = events.len() + 1;
    assert_eq!(
        (
            mixed_summary.consumed,
            mixed_summary.scored,
            mixed_summary.dead_lettered
        ),
        (
            mixed_input.len() as u64,
            good_count as u64,
            bad.len() as u64
        ),
        "{mixed_summary:?}"
    );
    assert_eq!(
        (clean_summary.scored, clean_summary.dead_lettered),
        (good_count as u64, 0)
    );
    let scored = read_topic(&cluster, &mixed.topology.output.scored_topic, good_count).await;
    let dead = read_topic(
        &cluster,
        &mixed.topology.output.dead_letter_topic,
        bad.len(),
    )
    .await;
    let clean_scored = read_topic(&cluster, &clean.topology.output.scored_topic, good_count).await;
    assert_eq!(
        (scored.len(), dead.len(), clean_scored.len()),
        (good_count, bad.len(), good_count)
    );

    // Each dead letter once, with its reason, its origin, and the original key and value.
    let mut seen = HashSet::new();
    for b in &bad {
        let d = dead
            .iter()
            .find(|d| d.key == b.input.key)
            .unwrap_or_else(|| panic!("{}: no dead letter", b.name));
        assert!(seen.insert(d.key.clone()), "{}: twice", b.name);
        let header = |h: &str| d.headers.get(h).cloned().unwrap_or_default();
        assert_eq!(header("kscore.reason"), b.reason, "{}", b.name);
        assert!(
            header("kscore.error").contains(b.error_has),
            "{}: {}",
            b.name,
            header("kscore.error")
        );
        assert_eq!(header("kscore.source.topic"), mixed.topology.input.topic);
        assert!(
            header("kscore.source.offset").parse::<i64>().is_ok(),
            "{}",
            b.name
        );
        assert!(
            header("kscore.source.partition").parse::<i32>().is_ok(),
            "{}",
            b.name
        );
        if b.name == "huge merchant name" {
            // Over the producer's limit: cut down to its headers, which say so.
            assert_eq!(d.value, None, "{}", b.name);
            assert_eq!(
                header("kscore.value_omitted"),
                b.input.value.as_ref().unwrap().len().to_string()
            );
        } else {
            assert_eq!(d.value, b.input.value, "{}: original value kept", b.name);
        }
    }

    // Every good record's features, the $0 one's included, as without the bad records.
    let scored_schema = apache_avro::Schema::parse_str(schemas::SCORED_PAYMENT_AVSC).unwrap();
    let decoder = Decoder::new(sr, scored_schema);
    let got = features_by_event(&decoder, &scored).await;
    let want = features_by_event(&decoder, &clean_scored).await;
    assert_eq!(got.len(), good_count);
    let differ: Vec<_> = want
        .iter()
        .filter(|(id, f)| got.get(*id) != Some(*f))
        .map(|(id, _)| *id)
        .collect();
    assert!(
        differ.is_empty(),
        "{} records' features differ",
        differ.len()
    );
    let Value::Map(zero_features) = &got[&zero.event_id] else {
        panic!("features map")
    };
    assert_eq!(
        zero_features.get("amount_to_mean_7d"),
        Some(&Value::Double(1.0))
    );
}
