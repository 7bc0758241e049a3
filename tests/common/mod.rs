//! Helpers shared by the tests that run the processor on the local stack: fresh topics and
//! groups per run, waiting for the processor to commit the whole input, and reading outputs
//! afterwards (the local stand-in broker stalls a `read_committed` reader that is fetching
//! while a transaction is aborted, so outputs are read once the run is over).

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use kscore::cluster::ClusterArgs;
use kscore::topology;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;

/// A record read back, key, bytes and headers.
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The value's bytes (empty for a record without a value).
    pub payload: Vec<u8>,
    /// The value as it is: `None` for a record without one (a tombstone).
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

pub fn read(
    cluster: &ClusterArgs,
    topic: &str,
    isolation: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Record> {
    let consumer: BaseConsumer = cluster
        .client_config()
        .unwrap()
        .set(
            "group.id",
            format!("pipeline-reader-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", isolation)
        // The output topics appear when the processor starts: notice them quickly.
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
                quiet_since = Instant::now();
            }
            // The processor creates its output topics when it starts; until then they are unknown.
            Some(Err(e)) if e.to_string().contains("UnknownTopicOrPartition") => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Some(Err(e)) => panic!("reader: {e}"),
            None => {}
        }
        // Done once the expected count is there and nothing more came for a second.
        if out.len() >= expected && quiet_since.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    out
}

/// A fresh id for one test's topics and groups (12 hex digits).
pub fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// The shipped topology on topics and a group of its own: `<prefix>-in-<run>`, `<prefix>-scored-<run>`, ...
pub fn fresh_topology(prefix: &str, run_id: &str) -> topology::Loaded {
    let mut loaded = topology::load(Path::new("topologies/fraud.toml")).expect("shipped topology");
    let t = &mut loaded.topology;
    t.input.topic = format!("{prefix}-in-{run_id}");
    t.input.group = format!("{prefix}-group-{run_id}");
    t.output.scored_topic = format!("{prefix}-scored-{run_id}");
    t.output.alerts_topic = Some(format!("{prefix}-alerts-{run_id}"));
    t.output.dead_letter_topic = format!("{prefix}-dlq-{run_id}");
    loaded
}

/// A consumer in `group` (for reading its committed offsets; it never subscribes).
fn group_reader(cluster: &ClusterArgs, group: &str) -> BaseConsumer {
    cluster
        .client_config()
        .unwrap()
        .set("group.id", group)
        .create()
        .unwrap()
}

/// The group's committed offset for each partition of `topic` (0 where none), or `None` when
/// the broker does not answer.
fn group_offsets(consumer: &BaseConsumer, topic: &str) -> Option<Vec<(i32, i64)>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(5))
        .ok()?;
    Some(
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => (e.partition(), o),
                _ => (e.partition(), 0),
            })
            .collect(),
    )
}

/// The group's committed offsets on `topic`, summed over its partitions.
pub fn committed_total(cluster: &ClusterArgs, topic: &str, group: &str) -> i64 {
    group_offsets(&group_reader(cluster, group), topic)
        .map_or(0, |offsets| offsets.iter().map(|(_, o)| o).sum())
}

/// Waits until the group's committed offsets reach the end of every partition of `topic`.
pub fn wait_committed(cluster: &ClusterArgs, topic: &str, group: &str, timeout: Duration) {
    let consumer = group_reader(cluster, group);
    let deadline = Instant::now() + timeout;
    loop {
        let offsets = group_offsets(&consumer, topic).expect("committed offsets");
        let done = offsets.iter().all(|(p, committed)| {
            let (_, high) = consumer
                .fetch_watermarks(topic, *p, Duration::from_secs(5))
                .unwrap();
            *committed >= high
        });
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the processor did not commit the whole input in time"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn field<'v>(v: &'v Value, name: &str) -> &'v Value {
    match v {
        Value::Record(fields) => fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no field {name}")),
        other => panic!("not a record: {other:?}"),
    }
}

pub mod harness;
pub mod promql;

/// A TCP port free on localhost now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on localhost:`port`: the status code (0 when nothing answered) and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http(port, "GET", path, "", Duration::from_secs(5))
}

/// `POST path` on localhost:`port` with `headers` (each line ending in `\r\n`), waiting up to
/// `timeout` for the answer: the status code and the body.
pub fn http_post(port: u16, path: &str, headers: &str, timeout: Duration) -> (u16, String) {
    http(
        port,
        "POST",
        path,
        &format!("{headers}Content-Length: 0\r\n"),
        timeout,
    )
}

fn http(port: u16, method: &str, path: &str, headers: &str, timeout: Duration) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let _ = write!(
        conn,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{headers}\r\n"
    );
    let mut response = String::new();
    let _ = conn.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The sum of every sample of a metric line starting with `prefix` (a name, or a name and the
/// start of its labels) in Prometheus text.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// This test process's own metrics endpoint (for processors run in-process), installed once.
pub fn metrics_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let port = free_port();
        // From a thread outside the tests' runtimes: installed inside one, the endpoint would
        // live on that runtime and end with its test.
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        std::thread::spawn(move || kscore::telemetry::install_exporter(addr))
            .join()
            .unwrap()
            .unwrap();
        port
    })
}

/// A stand-in registry in a process of its own, on `port`, keeping its state in `dir`.
pub fn start_registry(port: u16, dir: &Path) -> std::process::Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kscore"))
        .args([
            "registry",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The payment schema as a newer producer might write it: `channel` gains the symbol
/// `CRYPTO` (which the reader schema lacks) when `symbol`, and an optional `note` is added when
/// `note`.
pub fn evolved_payment_schema(symbol: bool, note: bool) -> String {
    let mut v: serde_json::Value = serde_json::from_str(kscore::schemas::PAYMENT_AVSC).unwrap();
    let fields = v["fields"].as_array_mut().unwrap();
    if symbol {
        for f in fields.iter_mut() {
            if f["name"] == "channel" {
                f["type"]["symbols"]
                    .as_array_mut()
                    .unwrap()
                    .push("CRYPTO".into());
            }
        }
    }
    if note {
        fields
            .push(serde_json::json!({"name": "note", "type": ["null", "string"], "default": null}));
    }
    v.to_string()
}

/// A processor running in this process, on a blocking thread of the test's runtime.
pub struct Running {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<anyhow::Result<kscore::pipeline::RunSummary>>,
}

impl Running {
    /// Starts `kscore::pipeline::run` for `loaded`.
    pub fn start(
        cluster: &ClusterArgs,
        loaded: &topology::Loaded,
        opts: kscore::pipeline::RunOptions,
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cluster, loaded, flag) = (cluster.clone(), loaded.clone(), stop.clone());
        let rt = tokio::runtime::Handle::current();
        let handle = tokio::task::spawn_blocking(move || {
            kscore::pipeline::run(&cluster, &loaded, &opts, rt, flag)
        });
        Running { stop, handle }
    }

    /// Stops it and returns its totals.
    pub async fn stop(self) -> kscore::pipeline::RunSummary {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.await.unwrap().expect("processor ran")
    }
}

/// [`wait_committed`] for `loaded`'s input and group, off the test's runtime threads.
pub async fn committed(
    cluster: &ClusterArgs,
    loaded: &topology::Loaded,
    timeout: Duration,
) -> Result<(), tokio::task::JoinError> {
    let t = &loaded.topology;
    let (c, topic, group) = (
        cluster.clone(),
        t.input.topic.clone(),
        t.input.group.clone(),
    );
    tokio::task::spawn_blocking(move || wait_committed(&c, &topic, &group, timeout)).await
}

/// Runs the processor in this process until the group has committed the whole input (within
/// `timeout`; the stream must not stall), then stops it.
pub async fn run_until_committed(
    cluster: &ClusterArgs,
    loaded: &topology::Loaded,
    opts: kscore::pipeline::RunOptions,
    timeout: Duration,
) -> kscore::pipeline::RunSummary {
    let processor = Running::start(cluster, loaded, opts);
    let waited = committed(cluster, loaded, timeout).await;
    let summary = processor.stop().await;
    assert!(waited.is_ok(), "the stream stalled: {summary:?}");
    summary
}

/// The value of the first metric line starting with `prefix` (a name and its exact label set,
/// as Prometheus prints them).
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A scored record's value (the payload after its 5-byte header, read with the shipped scored
/// schema).
pub fn scored_value(payload: &[u8]) -> Value {
    static SCHEMA: std::sync::OnceLock<apache_avro::Schema> = std::sync::OnceLock::new();
    let schema = SCHEMA
        .get_or_init(|| kscore::schemas::parse(kscore::schemas::SCORED_PAYMENT_AVSC).unwrap());
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .unwrap();
    let mut body = &payload[5..];
    let value = reader.read_value(&mut body).unwrap();
    assert!(body.is_empty(), "bytes left over in a scored record");
    value
}

/// The input (partition, offset) a scored record names in its `processing`.
pub fn provenance(scored: &Value) -> (i64, i64) {
    let processing = field(scored, "processing");
    match (
        field(processing, "source_partition"),
        field(processing, "source_offset"),
    ) {
        (Value::Int(p), Value::Long(o)) => (i64::from(*p), *o),
        other => panic!("not a provenance: {other:?}"),
    }
}

/// The event ids of scored records; panics on one scored twice.
pub fn scored_event_ids(records: &[Record]) -> std::collections::HashSet<uuid::Uuid> {
    let mut ids = std::collections::HashSet::new();
    for r in records {
        let v = scored_value(&r.payload);
        let p = kscore::tools::payments::Payment::from_value(field(&v, "event")).unwrap();
        assert!(ids.insert(p.event_id), "{} scored twice", p.event_id);
    }
    ids
}

/// Produces `records` (key, value; either may be absent) to `topic` in order, with Java
/// clients' partitioner and a 2 MB message limit (tests send records over librdkafka's default
/// of 1,000,000 bytes), each acknowledged before the next.
pub async fn produce<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    cluster: &ClusterArgs,
    topic: &str,
    records: impl IntoIterator<Item = (Option<K>, Option<V>)>,
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = cluster
        .client_config()
        .unwrap()
        .set("message.max.bytes", "2000000")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for (key, value) in records {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic);
        if let Some(k) = &key {
            record = record.key(k.as_ref());
        }
        if let Some(v) = &value {
            record = record.payload(v.as_ref());
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
    }
}

/// Produces payments to `topic`, keyed by card, encoded with `encoder`.
pub async fn produce_payments(
    cluster: &ClusterArgs,
    topic: &str,
    encoder: &kscore::sink::FramedEncoder,
    payments: &[kscore::tools::payments::Payment],
) {
    let records: Vec<(Option<String>, Option<Vec<u8>>)> = payments
        .iter()
        .map(|p| {
            (
                Some(p.card_id.clone()),
                Some(encoder.encode(p.to_value()).unwrap()),
            )
        })
        .collect();
    produce(cluster, topic, records).await;
}
