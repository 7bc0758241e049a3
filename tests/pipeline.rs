//! The processor end to end on the local stack, exactly once: simulated payments over several
//! partitions and many cards plus injected bad records go in; a `read_committed` reader of the
//! outputs sees exactly one scored record per good input (none missing, none twice), every
//! feature equal to a straightforward computation written here, every score equal to the
//! model's score for those features, alerts exactly where a rule fires, and each bad record in
//! the dead-letter topic with its reason. The third transaction is aborted on purpose after
//! its records were sent: a `read_uncommitted` reader sees them, the `read_committed` one never.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use apache_avro::types::Value;
use kscore::cluster::ClusterArgs;
use kscore::pipeline::RunOptions;
use kscore::schemas;
use kscore::scorer::{ScoringSession, runtime};
use kscore::sink::FramedEncoder;
use kscore::source::Decoder;
use kscore::tools::payments::{Channel, EntryMode, Payment};
use kscore::tools::simulator::{self, SimulateArgs, Simulator};
use kscore::topology::config::Guarantee;

use common::{
    Running, committed, evolved_payment_schema, field, free_port, fresh_topology, http_get,
    metric_value, metrics_port, read, start_registry,
};

const N: u64 = 1_200;

/// The fraud topology's features, straight from their definitions, for event `i` of a card's
/// in-order events.
fn expected_features(card: &[&Payment], i: usize) -> HashMap<&'static str, f64> {
    let e = card[i];
    let t = e.event_time;
    let m = 60_000i64;
    let (h, d) = (60 * m, 24 * 60 * m);
    let win = |ms: i64| -> Vec<&Payment> {
        card[..=i]
            .iter()
            .copied()
            .filter(|p| p.event_time > t - ms)
            .collect()
    };
    let amounts = |w: &[&Payment]| w.iter().map(|p| p.amount_minor as f64).collect::<Vec<_>>();
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let distinct = |w: &[&Payment], f: fn(&Payment) -> String| {
        w.iter().map(|p| f(p)).collect::<HashSet<_>>().len() as f64
    };
    let is_new = |w: &[&Payment], f: fn(&Payment) -> String| {
        f64::from(u8::from(!w[..w.len() - 1].iter().any(|p| f(p) == f(e))))
    };
    let b = |x: bool| f64::from(u8::from(x));
    let w7 = win(7 * d);
    let a7 = amounts(&w7);
    let m7 = mean(&a7);
    HashMap::from([
        ("amount", e.amount_minor as f64),
        ("online", b(e.channel == Channel::Ecommerce)),
        ("atm", b(e.channel == Channel::Atm)),
        ("manual_entry", b(e.entry_mode == EntryMode::Manual)),
        ("magstripe", b(e.entry_mode == EntryMode::Magstripe)),
        ("abroad", b(e.merchant_country != e.card_country)),
        ("count_10m", win(10 * m).len() as f64),
        ("count_1h", win(h).len() as f64),
        ("count_24h", win(d).len() as f64),
        ("sum_1h", amounts(&win(h)).iter().sum()),
        (
            "max_24h",
            amounts(&win(d)).iter().copied().fold(f64::MIN, f64::max),
        ),
        ("mean_7d", m7),
        (
            "std_7d",
            (a7.iter().map(|a| (a - m7).powi(2)).sum::<f64>() / a7.len() as f64).sqrt(),
        ),
        ("amount_to_mean_7d", e.amount_minor as f64 / m7),
        ("merchants_1h", distinct(&win(h), |p| p.merchant_id.clone())),
        (
            "merchants_24h",
            distinct(&win(d), |p| p.merchant_id.clone()),
        ),
        (
            "countries_24h",
            distinct(&win(d), |p| p.merchant_country.clone()),
        ),
        ("new_merchant_7d", is_new(&w7, |p| p.merchant_id.clone())),
        (
            "new_country_7d",
            is_new(&w7, |p| p.merchant_country.clone()),
        ),
        (
            "new_device_7d",
            is_new(&w7, |p| format!("{:?}", p.device_id)),
        ),
        (
            "secs_since_last",
            if i == 0 || t - card[i - 1].event_time > 8 * d {
                -1.0
            } else {
                (t - card[i - 1].event_time) as f64 / 1000.0
            },
        ),
    ])
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The value of one metric line of this process's endpoint (name and exact label set as
/// Prometheus prints them).
async fn metric(line_start: &str) -> Option<f64> {
    let port = metrics_port();
    let text = tokio::task::spawn_blocking(move || http_get(port, "/metrics").1)
        .await
        .ok()?;
    metric_value(&text, line_start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_with_an_aborted_transaction() {
    scenario(Guarantee::ExactlyOnce, Some(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_without_failures_is_exact_too() {
    scenario(Guarantee::AtLeastOnce, None).await;
}

async fn scenario(guarantee: Guarantee, abort_once_at: Option<u64>) {
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    metrics_port();
    let cluster = ClusterArgs::from_env();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut loaded = fresh_topology("pipe", &run_id);
    loaded.topology.delivery.guarantee = guarantee;
    let t = loaded.topology.clone();

    // Input: simulated payments over 3 partitions (40 cards, hours of event time)...
    let args = SimulateArgs {
        topic: t.input.topic.clone(),
        partitions: 3,
        count: Some(N),
        duration: None,
        rate: None,
        event_rate: 0.05,
        start: None,
        seed: 99,
        cards: Some(40),
        merchants: 60,
        fraud_per_10k: 150.0,
        labels: None,
        output_file: None,
        progress: Duration::from_secs(60),
    };
    simulator::run(&cluster, &args, Arc::new(AtomicBool::new(false)))
        .await
        .expect("simulator");
    let events: Vec<Payment> = Simulator::new(args.sim_config(0).unwrap())
        .unwrap()
        .take(N as usize)
        .map(|(p, _)| p)
        .collect();

    // ... and bad records: not framed, unknown schema id, cut short, and a payment stamped ten
    // days after it was produced.
    let sr = cluster.registry().unwrap();
    let encoder = FramedEncoder::register(
        &sr,
        &schemas::value_subject(&t.input.topic),
        schemas::PAYMENT_AVSC,
    )
    .await
    .unwrap();
    let mut future = events[0].clone();
    future.card_id = "crd_future".into();
    future.event_id = uuid::Uuid::from_u128(7);
    future.event_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 10 * 86_400_000;
    let good = encoder.encode(events[1].to_value()).unwrap();
    let mut unknown = good.clone();
    unknown[1..5].copy_from_slice(&424_242u32.to_be_bytes());
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad-json",
            br#"{"card_id":"x"}"#.to_vec(),
            "not_confluent_framed",
        ),
        ("bad-id", unknown, "unknown_schema_id"),
        ("bad-short", good[..good.len() / 3].to_vec(), "undecodable"),
        (
            "crd_future",
            encoder.encode(future.to_value()).unwrap(),
            "event_time_out_of_range",
        ),
    ];
    common::produce(
        &cluster,
        &t.input.topic,
        bad.iter()
            .map(|(key, payload, _)| (Some(key), Some(payload))),
    )
    .await;

    // The processor, aborting its third transaction once.
    let opts = RunOptions {
        instance_id: format!("test-{run_id}"),
        max_cycle_records: 150,
        abort_once_at,
        ..Default::default()
    };
    let processor = Running::start(&cluster, &loaded, opts);

    // Wait until the processor has committed the whole input, then read the outputs with fresh
    // readers. (A read_committed reader that is fetching while a transaction is aborted stalls
    // on the local stand-in broker; Kafka does not do that.)
    committed(&cluster, &loaded, Duration::from_secs(120))
        .await
        .unwrap();
    let scored = {
        let (c, topic) = (cluster.clone(), t.output.scored_topic.clone());
        tokio::task::spawn_blocking(move || {
            read(
                &c,
                &topic,
                "read_committed",
                N as usize,
                Duration::from_secs(60),
            )
        })
        .await
        .unwrap()
    };
    let dead = {
        let (c, topic) = (cluster.clone(), t.output.dead_letter_topic.clone());
        let n = bad.len();
        tokio::task::spawn_blocking(move || {
            read(&c, &topic, "read_committed", n, Duration::from_secs(30))
        })
        .await
        .unwrap()
    };
    let alerts = {
        let (c, topic) = (cluster.clone(), t.output.alerts_topic.clone().unwrap());
        tokio::task::spawn_blocking(move || {
            read(&c, &topic, "read_committed", 1, Duration::from_secs(10))
        })
        .await
        .unwrap()
    };
    let uncommitted = {
        let (c, topic) = (cluster.clone(), t.output.scored_topic.clone());
        tokio::task::spawn_blocking(move || {
            read(
                &c,
                &topic,
                "read_uncommitted",
                N as usize + 1,
                Duration::from_secs(10),
            )
        })
        .await
        .unwrap()
    };
    let summary = processor.stop().await;
    if abort_once_at.is_some() {
        assert_eq!(summary.aborts, 1, "{summary:?}");
        assert!(
            uncommitted.len() > scored.len(),
            "aborted records should be visible read_uncommitted only: {} vs {}",
            uncommitted.len(),
            scored.len()
        );
    } else {
        assert_eq!(
            (summary.aborts, uncommitted.len()),
            (0, scored.len()),
            "{summary:?}"
        );
    }

    // Exactly one scored record per good input.
    let scored_schema = apache_avro::Schema::parse_str(
        &kscore::sink::record::schema(schemas::PAYMENT_AVSC).unwrap(),
    )
    .unwrap();
    let decoder = Decoder::new(sr.clone(), scored_schema);
    let mut by_id: HashMap<uuid::Uuid, Value> = HashMap::new();
    for r in &scored {
        let v = decoder
            .decode_value(Some(&r.payload))
            .await
            .expect("scored record decodes")
            .1;
        let p = Payment::from_value(field(&v, "event")).expect("embedded payment");
        assert_eq!(r.key.as_deref(), Some(p.card_id.as_bytes()));
        assert_eq!(
            p,
            events
                .iter()
                .find(|e| e.event_id == p.event_id)
                .cloned()
                .expect("a known event"),
            "event copied whole"
        );
        assert!(
            by_id.insert(p.event_id, v).is_none(),
            "event {} scored twice",
            p.event_id
        );
    }
    assert_eq!(by_id.len(), N as usize, "one scored record per good input");

    // Features: straightforward computation per card; scores: the model on those features.
    let mut sessions: Vec<ScoringSession> = t
        .models
        .iter()
        .zip(&loaded.model_paths)
        .map(|(m, p)| ScoringSession::open(m, p).unwrap())
        .collect();
    let mut cards: HashMap<&str, Vec<&Payment>> = HashMap::new();
    for e in &events {
        cards.entry(e.card_id.as_str()).or_default().push(e);
    }
    let mut expected_alerts = HashSet::new();
    for card in cards.values() {
        for i in 0..card.len() {
            let want = expected_features(card, i);
            let v = &by_id[&card[i].event_id];
            let Value::Map(got) = field(v, "features") else {
                panic!("features is a map")
            };
            assert_eq!(got.len(), want.len());
            for (name, w) in &want {
                let Some(Value::Double(g)) = got.get(*name) else {
                    panic!("feature {name} missing")
                };
                assert!(
                    close(*g, *w),
                    "event {} feature {name}: got {g}, want {w}",
                    card[i].event_id
                );
            }
            let Value::Array(scores) = field(v, "scores") else {
                panic!("scores is an array")
            };
            let mut fired = Vec::new();
            for (m, (model, session)) in t.models.iter().zip(sessions.iter_mut()).enumerate() {
                let row: Vec<f32> = model
                    .features
                    .iter()
                    .map(|f| want[f.as_str()] as f32)
                    .collect();
                let expect = session.score(&row).unwrap()[0][0];
                let Value::Double(got) = field(&scores[m], "value") else {
                    panic!("score value")
                };
                // Scored here one row at a time, in the pipeline in batches: ONNX Runtime's float32
                // matrix kernels round differently by batch size, by a few units in the 7th digit.
                assert!(
                    (got - expect).abs() <= 1e-5 * expect.abs().max(1.0),
                    "{}: {got} vs {expect}",
                    model.name
                );
                assert_eq!(
                    field(&scores[m], "version"),
                    &Value::String(session.info().version.clone())
                );
                for r in t
                    .alerts
                    .iter()
                    .filter(|r| r.score == format!("{}.{}", model.name, model.scores[0].name))
                {
                    if expect >= r.threshold {
                        fired.push(r.name.clone());
                    }
                }
            }
            let Value::Array(got_fired) = field(v, "rules_fired") else {
                panic!("rules_fired")
            };
            let got_fired: HashSet<String> = got_fired
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    _ => String::new(),
                })
                .collect();
            assert_eq!(
                got_fired,
                fired.iter().cloned().collect::<HashSet<_>>(),
                "rules for {}",
                card[i].event_id
            );
            if !fired.is_empty() {
                expected_alerts.insert(card[i].event_id);
            }
        }
    }
    // Alerts: exactly the events where a rule fired.
    let mut alert_ids = HashSet::new();
    for r in &alerts {
        let v = decoder.decode_value(Some(&r.payload)).await.unwrap().1;
        assert!(
            alert_ids.insert(Payment::from_value(field(&v, "event")).unwrap().event_id),
            "alert twice"
        );
    }
    assert_eq!(alert_ids, expected_alerts);

    // Dead letters: each bad record once, with its reason and origin.
    assert_eq!(dead.len(), bad.len(), "dead letters");
    for (key, payload, reason) in &bad {
        let d = dead
            .iter()
            .find(|d| d.key.as_deref() == Some(key.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {key}"));
        assert_eq!(
            d.headers.get("kscore.reason").map(String::as_str),
            Some(*reason),
            "{key}"
        );
        assert_eq!(d.headers.get("kscore.source.topic"), Some(&t.input.topic));
        assert!(
            d.headers
                .get("kscore.source.offset")
                .is_some_and(|o| o.parse::<i64>().is_ok())
        );
        assert!(d.headers.get("kscore.error").is_some_and(|e| !e.is_empty()));
        assert_eq!(&d.payload, payload, "original bytes kept");
    }
    // Every input accounted for.
    assert_eq!(summary.consumed, N + bad.len() as u64);
    // The metrics say the same.
    let topic = &t.input.topic;
    let consumed = format!("kscore_records_consumed_total{{topic=\"{topic}\"}}");
    assert_eq!(metric(&consumed).await, Some((N + bad.len() as u64) as f64));
    let scored_line = format!("kscore_records_scored_total{{topic=\"{topic}\"}}");
    assert_eq!(metric(&scored_line).await, Some(N as f64));
    for (_, _, reason) in &bad {
        let line =
            format!("kscore_records_dead_lettered_total{{topic=\"{topic}\",reason=\"{reason}\"}}");
        assert_eq!(metric(&line).await, Some(1.0), "{line}");
    }
    assert_eq!(by_id.len() + dead.len(), N as usize + bad.len());
}

/// While the registry cannot be reached, records whose schema id is not cached yet wait (with
/// backoff) instead of being dead-lettered; once it is back they are scored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_is_retried_not_dead_lettered() {
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    metrics_port();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut registry = start_registry(port, dir.path());
    let mut cluster = ClusterArgs::from_env();
    cluster.registry_url = format!("http://127.0.0.1:{port}");

    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let loaded = fresh_topology("outage", &run_id);
    let t = loaded.topology.clone();
    cluster.ensure_topic(&t.input.topic, 2).await.unwrap();

    let sr = cluster.registry().unwrap();
    let subject = schemas::value_subject(&t.input.topic);
    let v1 = FramedEncoder::register(&sr, &subject, schemas::PAYMENT_AVSC)
        .await
        .unwrap();
    let v2 = FramedEncoder::register(&sr, &subject, &evolved_payment_schema(false, true))
        .await
        .unwrap();
    let events: Vec<Payment> = Simulator::new(Default::default())
        .unwrap()
        .take(100)
        .map(|(p, _)| p)
        .collect();
    common::produce_payments(&cluster, &t.input.topic, &v1, &events[..50]).await;

    let processor = Running::start(
        &cluster,
        &loaded,
        RunOptions {
            instance_id: format!("outage-{run_id}"),
            ..Default::default()
        },
    );
    committed(&cluster, &loaded, Duration::from_secs(60))
        .await
        .unwrap();

    // The registry goes away; records arrive written with a schema version not seen yet.
    registry.kill().unwrap();
    registry.wait().unwrap();
    let noted: Vec<_> = events[50..]
        .iter()
        .map(|p| {
            let Value::Record(mut fields) = p.to_value() else {
                unreachable!()
            };
            fields.push(("note".into(), Value::Union(0, Box::new(Value::Null))));
            (
                Some(p.card_id.clone()),
                Some(v2.encode(Value::Record(fields)).unwrap()),
            )
        })
        .collect();
    common::produce(&cluster, &t.input.topic, noted).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        metric("kscore_registry_retries_total ")
            .await
            .is_some_and(|n| n >= 1.0),
        "the processor should be retrying the registry"
    );
    let mut registry = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || start_registry(port, &dir)
    })
    .await
    .unwrap();

    committed(&cluster, &loaded, Duration::from_secs(60))
        .await
        .unwrap();
    let summary = processor.stop().await;
    registry.kill().unwrap();
    let _ = registry.wait();
    assert_eq!(
        (summary.consumed, summary.scored, summary.dead_lettered),
        (100, 100, 0),
        "{summary:?}"
    );
}

/// A zombie: another producer takes the processor's transactional.id and fences it. The
/// processor's next transaction fails fatally; it rebuilds its producer (fencing the zombie in
/// turn), redoes the cycle, and the outputs are still exactly one per input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_is_rebuilt_and_output_stays_exactly_once() {
    use rdkafka::producer::{BaseProducer, Producer};
    runtime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    let cluster = ClusterArgs::from_env();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let loaded = fresh_topology("fenced", &run_id);
    let t = loaded.topology.clone();
    cluster.ensure_topic(&t.input.topic, 2).await.unwrap();
    let sr = cluster.registry().unwrap();
    let v1 = FramedEncoder::register(
        &sr,
        &schemas::value_subject(&t.input.topic),
        schemas::PAYMENT_AVSC,
    )
    .await
    .unwrap();
    let events: Vec<Payment> = Simulator::new(Default::default())
        .unwrap()
        .take(300)
        .map(|(p, _)| p)
        .collect();
    common::produce_payments(&cluster, &t.input.topic, &v1, &events[..150]).await;

    let instance = format!("fenced-{run_id}");
    let processor = Running::start(
        &cluster,
        &loaded,
        RunOptions {
            instance_id: instance.clone(),
            ..Default::default()
        },
    );
    committed(&cluster, &loaded, Duration::from_secs(60))
        .await
        .unwrap();

    // The zombie takes over the transactional id.
    let zombie: BaseProducer = cluster
        .client_config()
        .unwrap()
        .set(
            "transactional.id",
            format!("kscore-{}-{instance}", t.input.group),
        )
        .create()
        .unwrap();
    tokio::task::spawn_blocking(move || {
        zombie.init_transactions(Duration::from_secs(30)).unwrap();
        zombie
    })
    .await
    .unwrap();
    common::produce_payments(&cluster, &t.input.topic, &v1, &events[150..]).await;
    committed(&cluster, &loaded, Duration::from_secs(60))
        .await
        .unwrap();
    let summary = processor.stop().await;
    assert!(
        summary.aborts >= 1,
        "the fenced transaction should have failed: {summary:?}"
    );
    assert_eq!(
        (summary.consumed, summary.scored, summary.dead_lettered),
        (300, 300, 0),
        "{summary:?}"
    );

    let scored = {
        let (c, topic) = (cluster.clone(), t.output.scored_topic.clone());
        tokio::task::spawn_blocking(move || {
            read(&c, &topic, "read_committed", 300, Duration::from_secs(30))
        })
        .await
        .unwrap()
    };
    let scored_schema = apache_avro::Schema::parse_str(
        &kscore::sink::record::schema(schemas::PAYMENT_AVSC).unwrap(),
    )
    .unwrap();
    let decoder = Decoder::new(sr, scored_schema);
    let mut ids = HashSet::new();
    for r in &scored {
        let v = decoder.decode_value(Some(&r.payload)).await.unwrap().1;
        assert!(
            ids.insert(Payment::from_value(field(&v, "event")).unwrap().event_id),
            "scored twice"
        );
    }
    assert_eq!(
        ids,
        events.iter().map(|e| e.event_id).collect::<HashSet<_>>()
    );
}
