//! Smoke test on the local stack (broker and registry addresses from KSCORE_BROKERS and
//! KSCORE_REGISTRY_URL; `scripts/stack.sh start` provides them): simulated payments produced
//! through the registry are read back from the broker and decoded into exactly the records the
//! simulator generated, and corrupt records come back as decode errors, not panics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kscore::cluster::ClusterArgs;
use kscore::schemas;
use kscore::source::{DecodeError, Decoder};
use kscore::tools::payments::Payment;
use kscore::tools::simulator::{self, Label, SimulateArgs, Simulator};
use kscore::wire::FrameError;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// partition, offset, key, value
type Raw = (i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);

fn fresh_topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn sim_args(topic: &str, count: u64, labels: std::path::PathBuf) -> SimulateArgs {
    SimulateArgs {
        topic: topic.to_string(),
        partitions: 3,
        count: Some(count),
        duration: None,
        rate: None,
        event_rate: 50.0,
        start: None,
        seed: 20261122,
        cards: Some(300),
        merchants: 200,
        fraud_per_10k: 100.0,
        labels: Some(labels),
        output_file: None,
        progress: Duration::from_secs(60),
    }
}

/// Every record of `topic` (all partitions, from the start), read `read_committed` until
/// `expected` arrived and nothing more came for a second, or `timeout` passed.
fn read_all(cluster: &ClusterArgs, topic: &str, expected: usize, timeout: Duration) -> Vec<Raw> {
    common::read(cluster, topic, "read_committed", expected, timeout)
        .into_iter()
        .map(|r| (r.partition, r.offset, r.key, r.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_events_round_trip_through_broker_and_registry() {
    let cluster = ClusterArgs::from_env();
    let topic = fresh_topic("smoke-payments");
    let dir = tempfile::tempdir().expect("tempdir");
    let labels_path = dir.path().join("labels.csv");
    let args = sim_args(&topic, 3_000, labels_path.clone());

    let summary = simulator::run(&cluster, &args, Arc::new(AtomicBool::new(false)))
        .await
        .expect("simulator runs");
    assert_eq!(
        (summary.produced, summary.delivered, summary.failed),
        (3_000, 3_000, 0)
    );

    // What the simulator must have sent: the same seed and options, generated again.
    let cfg = args.sim_config(0).expect("config");
    let expected: Vec<(Payment, Label)> = Simulator::new(cfg)
        .expect("simulator")
        .take(3_000)
        .collect();
    assert_eq!(
        summary.fraud,
        expected.iter().filter(|(_, l)| l.pattern.is_some()).count() as u64
    );
    assert!(summary.fraud > 0, "the sample should contain fraud");

    let records = tokio::task::spawn_blocking({
        let cluster = cluster.clone();
        let topic = topic.clone();
        move || read_all(&cluster, &topic, 3_000, Duration::from_secs(60))
    })
    .await
    .expect("reader");
    assert_eq!(records.len(), 3_000);

    let decoder = Decoder::new(
        cluster.registry().expect("registry"),
        schemas::payment().expect("schema").clone(),
    );
    let mut received: HashMap<uuid::Uuid, Payment> = HashMap::new();
    let mut by_partition: BTreeMap<i32, Vec<(i64, Payment)>> = BTreeMap::new();
    for (partition, offset, key, payload) in &records {
        let (_, value) = decoder
            .decode_value(payload.as_deref())
            .await
            .expect("decodes");
        let payment = Payment::from_value(&value).expect("is a payment");
        assert_eq!(
            key.as_deref(),
            Some(payment.card_id.as_bytes()),
            "record key is the card id"
        );
        by_partition
            .entry(*partition)
            .or_default()
            .push((*offset, payment.clone()));
        assert!(
            received.insert(payment.event_id, payment).is_none(),
            "duplicate event"
        );
    }
    // Whole records, every field: exactly what was generated, nothing missing, nothing extra.
    let mut want: Vec<&Payment> = expected.iter().map(|(p, _)| p).collect();
    let mut got: Vec<&Payment> = received.values().collect();
    want.sort_by_key(|p| p.event_id);
    got.sort_by_key(|p| p.event_id);
    assert_eq!(got, want);

    // A card's events all sit in one partition, in the order they were generated.
    let position: HashMap<uuid::Uuid, usize> = expected
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.event_id, i))
        .collect();
    let mut partition_of_card: HashMap<&str, i32> = HashMap::new();
    for (partition, events) in &by_partition {
        let mut sorted = events.clone();
        sorted.sort_by_key(|(o, _)| *o);
        let order: Vec<usize> = sorted.iter().map(|(_, p)| position[&p.event_id]).collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "partition {partition} out of generation order"
        );
        for (_, p) in events {
            let seen = *partition_of_card
                .entry(p.card_id.as_str())
                .or_insert(*partition);
            assert_eq!(seen, *partition, "card {} in two partitions", p.card_id);
        }
    }

    // Labels: one line per event, same ids, fraud flags as generated; never inside the event.
    let text = std::fs::read_to_string(&labels_path).expect("labels");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], Label::CSV_HEADER);
    let want_lines: Vec<String> = expected.iter().map(|(_, l)| l.csv_line()).collect();
    assert_eq!(
        lines[1..].to_vec(),
        want_lines.iter().map(String::as_str).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_decode_errors_not_panics() {
    let cluster = ClusterArgs::from_env();
    let sr = cluster.registry().expect("registry");
    let topic = fresh_topic("smoke-corrupt");
    cluster.ensure_topic(&topic, 1).await.expect("topic");
    let encoder = kscore::sink::FramedEncoder::register(
        &sr,
        &schemas::value_subject(&topic),
        schemas::PAYMENT_AVSC,
    )
    .await
    .expect("register");
    let id = encoder.schema_id();
    let good = {
        let p = Simulator::new(Default::default())
            .expect("sim")
            .next()
            .expect("one event")
            .0;
        encoder.encode(p.to_value()).expect("encode")
    };
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[1, 2, 3]);
    let mut unknown_id = good.clone();
    unknown_id[1..5].copy_from_slice(&987_654u32.to_be_bytes());
    let payloads: Vec<Vec<u8>> = vec![
        br#"{"card_id":"c1","amount":12.5}"#.to_vec(),
        vec![0, 0, 0],
        Vec::new(),
        unknown_id,
        truncated,
        trailing,
        good.clone(),
    ];

    let producer: FutureProducer = cluster
        .client_config()
        .expect("config")
        .create()
        .expect("producer");
    for p in &payloads {
        producer
            .send(
                FutureRecord::<str, [u8]>::to(&topic)
                    .key("c1")
                    .payload(p.as_slice()),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
    }
    let records = tokio::task::spawn_blocking({
        let cluster = cluster.clone();
        let topic = topic.clone();
        move || read_all(&cluster, &topic, payloads.len(), Duration::from_secs(30))
    })
    .await
    .expect("reader");
    assert_eq!(records.len(), 7);

    let decoder = Decoder::new(sr, schemas::payment().expect("schema").clone());
    let mut results = Vec::new();
    for (_, _, _, payload) in &records {
        results.push(decoder.decode(payload.as_deref()).await);
    }
    let reasons: Vec<&str> = results
        .iter()
        .map(|r| r.as_ref().map_or_else(|e| e.reason().label(), |_| "ok"))
        .collect();
    assert_eq!(
        reasons,
        vec![
            "not_confluent_framed",
            "not_confluent_framed",
            "not_confluent_framed",
            "unknown_schema_id",
            "undecodable",
            "undecodable",
            "ok"
        ]
    );
    assert!(matches!(
        &results[0],
        Err(DecodeError::Frame(FrameError::BadMagic(b'{')))
    ));
    assert!(matches!(
        &results[1],
        Err(DecodeError::Frame(FrameError::TooShort(3)))
    ));
    assert!(matches!(
        &results[2],
        Err(DecodeError::Frame(FrameError::TooShort(0)))
    ));
    match &results[3] {
        Err(
            e @ DecodeError::Schema {
                id: 987_654,
                retriable: false,
                ..
            },
        ) => {
            assert!(e.to_string().contains("987654"), "{e}");
        }
        other => panic!("expected an unknown schema id error, got {other:?}"),
    }
    match &results[5] {
        Err(DecodeError::Datum { id: got, reason }) => {
            assert_eq!(*got, id);
            assert_eq!(reason, "3 bytes left over after the record");
        }
        other => panic!("expected trailing bytes to be rejected, got {other:?}"),
    }
    let decoded = results[6].as_ref().expect("the good record decodes");
    assert_eq!(decoded.schema_id, id);
}

/// A producer that evolved its schema compatibly (an added optional field) is read through
/// the reader schema: the new field is dropped, every other field comes through unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_with_an_evolved_schema_resolve_to_the_reader_schema() {
    let cluster = ClusterArgs::from_env();
    let sr = cluster.registry().expect("registry");
    let topic = fresh_topic("smoke-evolved");
    let subject = schemas::value_subject(&topic);
    let v1 = kscore::sink::FramedEncoder::register(&sr, &subject, schemas::PAYMENT_AVSC)
        .await
        .expect("v1");
    let mut json: serde_json::Value = serde_json::from_str(schemas::PAYMENT_AVSC).expect("json");
    json["fields"]
        .as_array_mut()
        .expect("fields")
        .push(serde_json::json!(
            {"name": "loyalty_tier", "type": ["null", "string"], "default": null}
        ));
    let v2 = kscore::sink::FramedEncoder::register(&sr, &subject, &json.to_string())
        .await
        .expect("v2 is backward compatible");
    assert_ne!(v1.schema_id(), v2.schema_id());

    let p = Simulator::new(Default::default())
        .expect("sim")
        .next()
        .expect("event")
        .0;
    let apache_avro::types::Value::Record(mut fields) = p.to_value() else {
        panic!("record")
    };
    fields.push((
        "loyalty_tier".into(),
        apache_avro::types::Value::Union(
            1,
            Box::new(apache_avro::types::Value::String("gold".into())),
        ),
    ));
    let framed = v2
        .encode(apache_avro::types::Value::Record(fields))
        .expect("encodes with v2");

    let decoder = Decoder::new(sr, schemas::payment().expect("schema").clone());
    let (schema_id, value) = decoder
        .decode_value(Some(&framed))
        .await
        .expect("resolves to the reader schema");
    assert_eq!(schema_id, v2.schema_id());
    assert_eq!(Payment::from_value(&value), Ok(p));
    // And the older writer still decodes too.
    let old = v1
        .encode(
            Simulator::new(Default::default())
                .expect("sim")
                .next()
                .expect("event")
                .0
                .to_value(),
        )
        .expect("v1");
    assert_eq!(
        decoder
            .decode(Some(&old))
            .await
            .expect("v1 decodes")
            .schema_id,
        v1.schema_id()
    );
}
