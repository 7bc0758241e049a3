//! `kscore run`: wires the stages into the processor and runs its commit loop.
//!
//! One consumer and one producer per instance. Work proceeds in cycles of at most
//! `commit_interval` (and at most `max_cycle_records` records, which bounds memory):
//!
//! 1. poll records; decode each (source), compute its features (features), hand its rows to
//!    the models' batchers (batcher → scorer threads), or set it aside for the dead-letter
//!    topic with the reason;
//! 2. at the end of the cycle, flush the batchers and wait for every score; a record whose
//!    scores are not all finite becomes a dead letter;
//! 3. in one Kafka transaction: the scored events (and alerts) in input order, the dead
//!    letters, the changelog of the feature state the cycle changed (see [`crate::changelog`]),
//!    and the input offsets (next offset to read, with the consumer's group metadata), then
//!    commit. Feature state is checkpointed only when the commit succeeded.
//!
//! One record never stops the stream: a record whose scored output the producer refuses (too
//! large) is dead-lettered as `output_too_large` instead, and a dead letter that cannot be
//! published whole is cut down (see [`crate::sink::dead_letter`]). The broker refuses whole
//! batches, so when it refuses records the cycle is redone with a producer that batches nothing,
//! which tells the records at fault; those are dead-lettered on the next try.
//!
//! If the transaction must be aborted, the feature state changes of the cycle are rolled back
//! and the consumer is rewound to the cycle's first offsets, so the cycle is redone exactly,
//! after a backoff that doubles with each consecutive failure (0.1 s up to 30 s); after
//! [`health::FAILED_CYCLES_NOT_READY`] consecutive failures the instance reports not ready. If
//! the producer hits a fatal error it is rebuilt with the same `transactional.id`, which fences
//! the old one and aborts whatever it left open. A commit whose outcome is unknown (it timed
//! out, or failed fatally) is decided by the broker: a rebuilt producer settles the
//! transaction, then the group's committed offsets say whether the cycle was committed.
//! Retriable commit errors are retried. A rebalance discards the cycle in progress (nothing of
//! it was sent) and rolls its state changes back; newly assigned partitions stay paused until
//! their state is restored from the changelog. `at_least_once` sends the same records without
//! a transaction, then commits the offsets.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::Producer;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::batcher::{self, BatcherError, ModelBatcher, Refused, Scored};
use crate::changelog::{self, Restorer};
use crate::cluster::ClusterArgs;
use crate::features::{FeatureSet, FeatureState};
use crate::reason::Reason;
use crate::schemas;
use crate::scorer::drift::DriftMonitor;
use crate::sink::dead_letter::{Cut, DeadLetter};
use crate::sink::output::{self, Provenance, Rules, ScoreValue};
use crate::sink::produce::{self, Deliveries, Out, OutputProducer, SendError};
use crate::sink::scored::{self, ScoredEncoder};
use crate::sink::{FramedEncoder, deliver};
use crate::source::Decoder;
use crate::telemetry::health;
use crate::telemetry::metrics as names;
use crate::topology::Loaded;
use crate::topology::config::Guarantee;
use strum::IntoEnumIterator;

/// Options of `kscore run` besides the topology.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stable id of this instance: part of the `transactional.id`, so a restarted instance
    /// fences its predecessor and aborts the transaction it left open.
    pub instance_id: String,
    /// Most records in one cycle (one transaction).
    pub max_cycle_records: usize,
    /// How often to print the one-line summary (`None`: never).
    pub summary_every: Option<Duration>,
    /// Testing aid: abort the n-th transaction (once) after all its records were sent, to show
    /// that an aborted cycle is redone and its records never reach `read_committed`.
    pub abort_once_at: Option<u64>,
    /// Testing aid: while on, abort every transaction after its records were sent (a broker
    /// that refuses every commit), to show backoff, readiness and lag.
    pub fail_cycles: Option<FailSwitch>,
    /// Testing aid: make the n-th transaction's commit fail (once) in this way.
    pub commit_fault: Option<(u64, CommitFault)>,
    /// Testing aid: cap each model worker at this many rows per second, to show backpressure.
    pub throttle_scoring: Option<f64>,
    /// How this instance belongs to its consumer group.
    pub membership: Membership,
}

/// A testing aid's switch.
#[derive(Debug, Clone)]
pub enum FailSwitch {
    /// On while the flag is set.
    Flag(Arc<AtomicBool>),
    /// On while the file exists.
    File(std::path::PathBuf),
}

impl FailSwitch {
    /// Whether the switch is on.
    pub fn on(&self) -> bool {
        match self {
            FailSwitch::Flag(f) => f.load(Ordering::Relaxed),
            FailSwitch::File(p) => p.exists(),
        }
    }
}

/// A commit failure a test can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitFault {
    /// The commit succeeds, but is reported as timed out (librdkafka completing a commit whose
    /// call ran out of time): the processor must find from the broker that it committed.
    TimedOutAfterCommit,
    /// A retriable error before the commit: the processor must retry, not abort.
    RetriableBeforeCommit,
}

/// Consumer-group membership (KIP-345).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Membership {
    /// `group.instance.id = kscore-<group>-<instance>`: a restarted instance takes its
    /// partitions back without a rebalance, but one that stops for good keeps them until its
    /// session times out (static members never send LeaveGroup).
    #[default]
    Static,
    /// No `group.instance.id`: a stopping instance leaves the group and its partitions move at
    /// once (scaling down), but every restart rebalances the group.
    Dynamic,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            instance_id: "0".into(),
            max_cycle_records: 20_000,
            summary_every: None,
            abort_once_at: None,
            fail_cycles: None,
            commit_fault: None,
            throttle_scoring: None,
            membership: Membership::Static,
        }
    }
}

/// The input consumer's settings (shared with the benchmark's passthrough, so the two are
/// compared on equal terms): manual offsets, `read_committed`, and static membership as
/// `kscore-<group>-<instance_id>` unless `instance_id` is `None`.
pub fn source_config(
    cluster: &ClusterArgs,
    group: &str,
    instance_id: Option<&str>,
) -> anyhow::Result<ClientConfig> {
    let mut cfg = cluster.client_config()?;
    // Static membership: a restarted instance takes its partitions back at once instead of
    // waiting out its dead predecessor's session and rebalancing the whole group. Override with
    // `-X group.instance.id=...`.
    if let Some(instance_id) = instance_id
        && cfg.get("group.instance.id").is_none()
    {
        cfg.set("group.instance.id", format!("kscore-{group}-{instance_id}"));
    }
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000");
    tune(
        &mut cfg,
        &[
            // A fetch waits at most this long for data: well under the commit interval, so a
            // quiet partition does not hold events back (librdkafka's default is 500 ms).
            ("fetch.wait.max.ms", "100"),
            // Prefetch per partition: a cycle takes at most 20,000 records, and librdkafka's
            // default of 100,000 kept its broker thread fetching twice as hard (measured:
            // 1.6 -> 0.7 CPU-s for a 200,000-event backlog) and holds more memory.
            ("queued.min.messages", "20000"),
        ],
    );
    Ok(cfg)
}

/// Sets performance settings the operator has not set (`-X` or the properties file win);
/// settings the guarantees depend on are set unconditionally by the callers instead.
fn tune(cfg: &mut ClientConfig, defaults: &[(&str, &str)]) {
    for (key, value) in defaults {
        if cfg.get(key).is_none() {
            cfg.set(*key, *value);
        }
    }
}

/// The output producer's settings: idempotent, and transactional with `transactional_id`.
pub fn sink_config(
    cluster: &ClusterArgs,
    transactional_id: Option<&str>,
) -> anyhow::Result<ClientConfig> {
    let mut cfg = cluster.client_config()?;
    cfg.set("enable.idempotence", "true")
        // Same partition for a key as Java clients' default partitioner.
        .set("partitioner", "murmur2_random");
    tune(&mut cfg, &[("linger.ms", "5")]);
    if let Some(id) = transactional_id {
        cfg.set("transactional.id", id)
            .set("transaction.timeout.ms", "60000");
    }
    Ok(cfg)
}

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Records read (and committed).
    pub consumed: u64,
    /// Scored events published.
    pub scored: u64,
    /// Alerts published.
    pub alerts: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Transactions committed.
    pub commits: u64,
    /// Transactions aborted.
    pub aborts: u64,
}

/// Consumer callbacks: note revocations and assignments, export lag.
struct SourceContext {
    revoked: AtomicBool,
    /// Partitions assigned and paused until their state is restored.
    assigned: Mutex<Vec<i32>>,
    /// Per assigned partition, the next offset committed: lag counts from here, so it grows
    /// while nothing commits (cycles failing), however far the consumer has read.
    committed: Mutex<HashMap<i32, i64>>,
}

impl SourceContext {
    fn take_assigned(&self) -> Vec<i32> {
        self.assigned
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default()
    }

    fn awaiting_restore(&self) -> Vec<i32> {
        self.assigned.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn set_committed(&self, partition: i32, next: i64) {
        if let Ok(mut c) = self.committed.lock() {
            c.insert(partition, next);
        }
    }

    fn committed(&self, partition: i32) -> Option<i64> {
        self.committed.lock().ok()?.get(&partition).copied()
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in stats.topics {
            for (partition, p) in t.partitions {
                // Records between what is committed and the end of the partition (the last
                // stable offset, as read `read_committed`). librdkafka's own `consumer_lag`
                // counts from offsets it committed, and offsets here are committed by the
                // transactional producer, which it does not see; its position (`app_offset`)
                // runs ahead of the commits while cycles fail.
                let end = if p.ls_offset >= 0 {
                    p.ls_offset
                } else {
                    p.hi_offset
                };
                if partition >= 0 && p.desired && end >= 0 {
                    let from = self.committed(partition).unwrap_or(p.lo_offset.max(0));
                    metrics::gauge!(names::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set((end - from).max(0) as f64);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = ?partitions_of(tpl), "partitions revoked");
                metrics::counter!(names::REBALANCES, "kind" => "revoke").increment(1);
                // Their new owner reports their lag from now on; a gauge left at its last value
                // here would count it twice in a sum over instances.
                for e in tpl.elements() {
                    metrics::gauge!(names::CONSUMER_LAG, "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
                        .set(0.0);
                    if let Ok(mut c) = self.committed.lock() {
                        c.remove(&e.partition());
                    }
                }
                // No transaction is open here: they open and commit between polls. The cycle in
                // progress has sent nothing; the loop discards it when this poll returns.
                self.revoked.store(true, Ordering::SeqCst);
            }
            Rebalance::Error(e) => tracing::warn!("rebalance failed: {e}"),
            Rebalance::Assign(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions = partitions_of(tpl);
            tracing::info!(?partitions, "partitions assigned");
            metrics::counter!(names::REBALANCES, "kind" => "assign").increment(1);
            // Nothing of these partitions is read before their state is restored.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!("pausing assigned partitions: {e}");
            }
            if let Ok(mut a) = self.assigned.lock() {
                a.extend(partitions);
                health::awaiting_restore(a.len());
            }
            health::assigned();
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

/// A record of the cycle, waiting for its scores or set aside as a dead letter.
struct Pending {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    /// The input value as it was: the dead letter's value, and the scored record's `event`
    /// bytes when written with the reader schema.
    value: Option<Vec<u8>>,
    outcome: Outcome,
}

enum Outcome {
    Scored {
        event: Value,
        /// Whether the input datum was written with the reader schema (and is copied into the
        /// output as it is).
        verbatim: bool,
        schema_id: u32,
        event_time: i64,
        features: Vec<f64>,
        /// Per model, its scores once they arrived.
        scores: Vec<Option<Vec<f64>>>,
    },
    Dead {
        reason: Reason,
        error: String,
        /// How much of the input its dead letter carries.
        cut: Cut,
    },
}

struct Outputs {
    scored: ScoredEncoder,
    /// The scored schema's id under the scored topic's subject, and under the alerts topic's
    /// (the same with a registry that keeps ids global, as Confluent's does).
    scored_id: u32,
    alerts_id: u32,
    scored_topic: String,
    alerts_topic: Option<String>,
    dlq_topic: String,
}

/// What the producer learned about records of the cycle it could not publish: on the next try
/// they are dead-lettered, or their dead letters cut down.
#[derive(Debug, Clone)]
struct Poison {
    reason: Reason,
    error: String,
    cut: Cut,
}

/// Most records in a cycle redone with a producer that batches nothing.
const ISOLATED_CYCLE_RECORDS: usize = 1_000;

/// Delivery tags: each record's place in the cycle times four, plus what it is.
const TAG_SCORED: usize = 0;
const TAG_ALERT: usize = 1;
const TAG_DEAD: usize = 2;
/// Changelog records (not a record of the cycle).
const TAG_CHANGELOG: usize = usize::MAX;

fn tag(index: usize, kind: usize) -> usize {
    index.saturating_mul(4).saturating_add(kind)
}

/// Where each model's input columns come from among the features.
fn model_columns(loaded: &Loaded, feature_names: &[&str]) -> anyhow::Result<Vec<Vec<usize>>> {
    loaded
        .topology
        .models
        .iter()
        .map(|m| {
            m.features
                .iter()
                .map(|f| {
                    feature_names.iter().position(|n| n == f).ok_or_else(|| {
                        anyhow::anyhow!(
                            "{}: model `{}` takes feature `{f}`, which the topology does not define",
                            loaded.file.display(),
                            m.name
                        )
                    })
                })
                .collect()
        })
        .collect()
}

/// Runs the processor until `stop` is set. Blocking: call it from a thread of its own.
pub fn run(
    cluster: &ClusterArgs,
    loaded: &Loaded,
    opts: &RunOptions,
    rt: Handle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<RunSummary> {
    let t = &loaded.topology;
    let problems = crate::features::check(loaded);
    if !problems.is_empty() {
        return Err(crate::topology::TopologyError::Invalid {
            file: loaded.file.clone(),
            problems,
        }
        .into());
    }
    health::pipeline_started();
    crate::scorer::runtime::init(None)?;
    let sr = cluster.registry()?;
    let decoder = Decoder::new(sr.clone(), loaded.schema.clone());
    let scored_avsc = output::scored_schema(&loaded.schema_text).map_err(anyhow::Error::msg)?;
    let set = FeatureSet::new(t, &loaded.schema);
    let feature_names = set.names();
    let model_columns = model_columns(loaded, &feature_names)?;

    // Output topics, with as many partitions as the input.
    let meta_consumer: BaseConsumer = cluster.client_config()?.create()?;
    // The input may not exist yet (the processor started before its producers): wait for it.
    let mut waited = Instant::now();
    let partitions = loop {
        // An unreachable broker is waited for too, not a reason to exit.
        let n = match meta_consumer.fetch_metadata(Some(&t.input.topic), Duration::from_secs(10)) {
            Ok(metadata) => metadata
                .topics()
                .first()
                .map_or(0, |m| m.partitions().len()) as i32,
            Err(e) => {
                tracing::warn!("cannot read the input topic's metadata yet: {e}");
                0
            }
        };
        if n > 0 {
            break n;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(RunSummary::default());
        }
        if waited.elapsed() >= Duration::from_secs(5) {
            tracing::info!(topic = %t.input.topic, "waiting for the input topic to exist");
            waited = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(meta_consumer);
    let mut out_topics = vec![
        t.output.scored_topic.clone(),
        t.output.dead_letter_topic.clone(),
    ];
    out_topics.extend(t.output.alerts_topic.clone());
    for topic in &out_topics {
        rt.block_on(cluster.ensure_topic(topic, partitions))?;
    }
    let changelog_topic = t.changelog_topic();
    rt.block_on(changelog::ensure_topic(
        cluster,
        &changelog_topic,
        partitions,
    ))?;
    out_topics.push(changelog_topic.clone());
    // The smallest record batch the output topics take: the producer's batches stay under it,
    // so a topic's `max.message.bytes` refuses only records that are too large themselves.
    let batch_limit = rt.block_on(cluster.max_message_bytes(&out_topics));
    let restorer = Restorer::new(cluster, &changelog_topic)?;
    let scored = rt.block_on(FramedEncoder::register(
        &sr,
        &schemas::value_subject(&t.output.scored_topic),
        &scored_avsc,
    ))?;
    let alerts_id = match &t.output.alerts_topic {
        Some(alerts) => rt
            .block_on(FramedEncoder::register(
                &sr,
                &schemas::value_subject(alerts),
                &scored_avsc,
            ))?
            .schema_id(),
        None => scored.schema_id(),
    };
    let outputs = Outputs {
        scored: ScoredEncoder::new(scored.schema_id(), &loaded.schema)?,
        scored_id: scored.schema_id(),
        alerts_id,
        scored_topic: t.output.scored_topic.clone(),
        alerts_topic: t.output.alerts_topic.clone(),
        dlq_topic: t.output.dead_letter_topic.clone(),
    };

    let (batchers, results) =
        batcher::start_all(&t.models, &loaded.model_paths, opts.throttle_scoring)?;
    let versions: Vec<String> = batchers.iter().map(|b| b.info().version.clone()).collect();
    for b in &batchers {
        tracing::info!(model = %b.info().name, version = %b.info().version,
            drift_reference = b.info().reference.is_some(), "model loaded");
    }
    health::models_warm();
    let mut drift: Vec<DriftMonitor> = t
        .models
        .iter()
        .zip(&batchers)
        .map(|(m, b)| DriftMonitor::new(m, &b.info().version, b.info().reference.as_deref()))
        .collect();
    let scores = ScoreSlots::new(loaded, &versions);
    let rules = Rules::new(&t.alerts, &scores.qualified()).map_err(anyhow::Error::msg)?;
    // Alerts are counted by rule and by the model version whose score fired it.
    let rule_labels: Vec<(String, String, String)> = (0..rules.len())
        .map(|r| {
            let (model, version) = rules
                .score_of(r)
                .and_then(|i| scores.values.get(i))
                .map(|v| (v.model.clone(), v.version.clone()))
                .unwrap_or_default();
            (rules.name(r).to_string(), model, version)
        })
        .collect();
    register_series(&t.input.topic, &rule_labels);

    let consumer: BaseConsumer<SourceContext> = source_config(
        cluster,
        &t.input.group,
        (opts.membership == Membership::Static).then_some(opts.instance_id.as_str()),
    )?
    .create_with_context(SourceContext {
        revoked: AtomicBool::new(false),
        assigned: Mutex::new(Vec::new()),
        committed: Mutex::new(HashMap::new()),
    })?;
    consumer.subscribe(&[&t.input.topic])?;

    let transactional = t.delivery.guarantee == Guarantee::ExactlyOnce;
    let txn_id = format!("kscore-{}-{}", t.input.group, opts.instance_id);
    let try_producer = |isolate: bool| -> anyhow::Result<OutputProducer> {
        let mut cfg = sink_config(cluster, transactional.then_some(txn_id.as_str()))?;
        if let Some(limit) = batch_limit {
            limit_batches(&mut cfg, limit);
        }
        if isolate {
            produce::isolating(&mut cfg);
        }
        let p: OutputProducer = cfg.create_with_context(Deliveries::default())?;
        if transactional {
            // Fences an earlier producer with this id and aborts what it left open.
            p.init_transactions(BROKER_CALL)?;
        }
        Ok(p)
    };
    // While the broker is unreachable, keep trying, and beat meanwhile: the process is live (a
    // supervisor restarting it would do no better) but not ready.
    let make_producer = |isolate: bool| -> anyhow::Result<OutputProducer> {
        let mut backoff = Duration::from_millis(500);
        loop {
            health::beat();
            match try_producer(isolate) {
                Ok(p) => {
                    health::producer_down(false);
                    return Ok(p);
                }
                Err(e) if !stop.load(Ordering::Relaxed) => {
                    health::producer_down(true);
                    tracing::warn!(
                        "transactional producer not ready, retrying in {backoff:?}: {e:#}"
                    );
                    health::beat();
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    };
    let mut isolating = false;
    let mut producer = make_producer(isolating)?;
    tracing::info!(topology = %t.name, input = %t.input.topic, group = %t.input.group, transactional_id = %txn_id,
        guarantee = ?t.delivery.guarantee, "processor running");

    let mut states: HashMap<i32, FeatureState> = HashMap::new();
    let mut consumer_errors = Throttled::new("consumer");
    let mut starved = Starved::new();
    let mut pressure = Pressure::default();
    let mut summary = RunSummary::default();
    let mut reporter = Reporter::new(opts.summary_every, &t.name);
    let mut cycles = 0u64;
    let mut failures = Failures::default();
    let mut poisoned: HashMap<(i32, i64), Poison> = HashMap::new();
    let publisher = Publisher {
        outputs: &outputs,
        loaded,
        feature_names: &feature_names,
        scores: &scores,
        rules: &rules,
        instance: &opts.instance_id,
        changelog_topic: &changelog_topic,
        set: &set,
        transactional,
    };

    // The cycle's records. Kept between cycles so its capacity is reused: growing it to a
    // cycle's thousands of records again every cycle showed in profiles (copies, page faults).
    let mut pending: Vec<Pending> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // 1. Gather a cycle.
        let started = Instant::now();
        pending.clear();
        let mut first_offsets: BTreeMap<i32, i64> = BTreeMap::new();
        let mut next_offsets: BTreeMap<i32, i64> = BTreeMap::new();
        let mut outstanding = 0usize;
        let mut discarded = false;
        // Per model, the rows of this cycle not handed to its batcher yet.
        let mut open: Vec<(Vec<u64>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); batchers.len()];
        // One record per batch is slow: such a cycle is kept short, and a refused record past
        // it is found by a later one.
        let cycle_records = if isolating {
            opts.max_cycle_records.min(ISOLATED_CYCLE_RECORDS)
        } else {
            opts.max_cycle_records
        };
        while started.elapsed() < t.delivery.commit_interval
            && pending.len() < cycle_records
            && !stop.load(Ordering::Relaxed)
        {
            health::beat();
            let wait = t
                .delivery
                .commit_interval
                .saturating_sub(started.elapsed())
                .min(Duration::from_millis(50));
            let msg = consumer.poll(wait);
            if consumer.context().revoked.swap(false, Ordering::SeqCst) {
                discarded = true;
                break;
            }
            let assigned = consumer.context().take_assigned();
            if !assigned.is_empty() {
                restore_assigned(
                    &consumer,
                    &restorer,
                    &set,
                    &t.input.topic,
                    &mut states,
                    &assigned,
                    transactional,
                    &stop,
                )?;
            }
            let msg = match msg {
                None => {
                    starved.check(&consumer, &t.input.topic);
                    continue;
                }
                Some(Err(e)) => {
                    consumer_errors.note(&e);
                    continue;
                }
                Some(Ok(m)) => {
                    starved.received();
                    m
                }
            };
            first_offsets.entry(msg.partition()).or_insert(msg.offset());
            // While the registry is away, the record waits; so does the consumer, serving its
            // group, and a stop or a revocation ends the wait and the cycle.
            let mut wait_registry = |d: Duration| -> bool {
                let until = Instant::now() + d;
                while Instant::now() < until {
                    health::beat();
                    if stop.load(Ordering::Relaxed)
                        || consumer.context().revoked.load(Ordering::SeqCst)
                    {
                        return false;
                    }
                    pressure.hold(&consumer);
                }
                true
            };
            let state = states.entry(msg.partition()).or_default();
            let Some(p) = take(&msg, &decoder, &rt, &set, state, &mut wait_registry) else {
                discarded = true;
                break;
            };
            next_offsets.insert(msg.partition(), msg.offset() + 1);
            if let Outcome::Scored { features, .. } = &p.outcome {
                let ticket = pending.len() as u64;
                for ((b, cols), open) in batchers.iter().zip(&model_columns).zip(&mut open) {
                    open.0.push(ticket);
                    open.1.extend(cols.iter().map(|&c| features[c] as f32));
                    outstanding += 1;
                    if open.0.len() >= b.max_rows() {
                        submit(b, open, &mut pressure, &consumer)?;
                    }
                }
            }
            pending.push(p);
        }
        // 2. Every score. Polling goes on while they are awaited, every partition paused.
        if !discarded {
            for (b, open) in batchers.iter().zip(&mut open) {
                submit(b, open, &mut pressure, &consumer)?;
                b.flush()?;
            }
            wait_scores(&results, &mut pending, outstanding, &batchers, &mut || {
                // Waiting on slow models is the loop turning, not a stuck process.
                health::beat();
                pressure.hold(&consumer)
            })?;
        }
        if consumer.context().revoked.swap(false, Ordering::SeqCst) {
            discarded = true;
        }
        pressure.release(&consumer);
        if discarded {
            tracing::info!(
                records = pending.len(),
                "discarding the cycle in progress (nothing of it was sent): {}",
                if stop.load(Ordering::Relaxed) {
                    "stopping"
                } else {
                    "rebalance"
                }
            );
            discard(&consumer, &t.input.topic, &mut states, &first_offsets);
            continue;
        }
        if pending.is_empty() {
            reporter.tick(&summary);
            continue;
        }
        settle(&mut pending, &scores, &poisoned);

        // 3. Publish and commit.
        let commit_started = Instant::now();
        cycles += 1;
        let inject = transactional
            && (opts.abort_once_at == Some(cycles)
                || opts.fail_cycles.as_ref().is_some_and(FailSwitch::on));
        let fault = opts
            .commit_fault
            .filter(|(at, _)| transactional && *at == cycles)
            .map(|(_, f)| f);
        let result = publisher.publish(
            &producer,
            &consumer,
            &pending,
            &next_offsets,
            &states,
            inject,
            fault,
        );
        let committed = match result {
            Ok(counts) => Some(counts),
            Err(failure) => {
                let (reason, fatal) = failure.classify();
                let refused = producer.context().take_refused();
                // Settle the transaction: abort what can be aborted; a fresh producer with the
                // same transactional.id fences the old one and completes or aborts whatever it
                // left open. (Readers of the local stand-in broker only move past an aborted
                // transaction after this; failures are rare, so it is done after every one.)
                if transactional {
                    health::beat();
                    if let Failure::NotCommitted(_) = &failure
                        && !fatal
                        && let Err(e) = producer.abort_transaction(BROKER_CALL)
                    {
                        tracing::warn!("abort_transaction: {e}");
                    }
                    isolating = learn(&refused, &pending, isolating, &mut poisoned);
                    producer = make_producer(isolating)?;
                }
                match failure {
                    // The outcome of the commit is unknown: the group's committed offsets, now
                    // that the transaction is settled, say whether the cycle went through.
                    Failure::Unknown { error, counts } => {
                        match committed_outcome(&consumer, &t.input.topic, &next_offsets, &stop) {
                            Some(true) => {
                                tracing::warn!(error = %error, "the commit was reported failed, but the group has the cycle's offsets: it was committed");
                                Some(*counts)
                            }
                            Some(false) => {
                                summary.aborts += 1;
                                metrics::counter!(names::ABORTS, "reason" => reason.label())
                                    .increment(1);
                                failures.note(
                                    &error,
                                    &first_offsets,
                                    &next_offsets,
                                    &t.input.topic,
                                );
                                None
                            }
                            // Stopping with the outcome unknown: nothing more is sent; a restart
                            // finds the state and offsets of whichever it was.
                            None => break,
                        }
                    }
                    Failure::NotCommitted(error) => {
                        summary.aborts += 1;
                        metrics::counter!(names::ABORTS, "reason" => reason.label()).increment(1);
                        failures.note(&error, &first_offsets, &next_offsets, &t.input.topic);
                        None
                    }
                }
            }
        };
        match committed {
            Some(counts) => {
                for (partition, s) in &mut states {
                    match next_offsets.get(partition) {
                        Some(next) => {
                            s.commit(*next);
                            consumer.context().set_committed(*partition, *next);
                        }
                        None => s.checkpoint(),
                    }
                }
                poisoned.retain(|(p, o), _| next_offsets.get(p).is_none_or(|next| o >= next));
                if failures.succeeded() && isolating {
                    // Back to batching, now that the records at fault are known.
                    isolating = false;
                    producer = make_producer(isolating)?;
                }
                metrics::counter!(names::CHANGELOG_RECORDS).increment(counts.changelog);
                let now = now_ms();
                let to_commit = metrics::histogram!(names::EVENT_TO_COMMIT_SECONDS);
                for p in &pending {
                    if let Outcome::Scored {
                        event_time,
                        features,
                        scores,
                        ..
                    } = &p.outcome
                    {
                        let secs = now.saturating_sub(*event_time) as f64 / 1000.0;
                        to_commit.record(secs);
                        reporter.latency(secs);
                        for ((d, cols), s) in drift.iter_mut().zip(&model_columns).zip(scores) {
                            if let Some(s) = s {
                                d.observe(cols.iter().map(|&c| features[c]), s);
                            }
                        }
                    }
                }
                for d in &drift {
                    d.publish();
                }
                metrics::counter!(names::COMMITS).increment(1);
                metrics::histogram!(names::COMMIT_SECONDS)
                    .record(commit_started.elapsed().as_secs_f64());
                metrics::gauge!(names::STATE_KEYS)
                    .set(states.values().map(FeatureState::keys).sum::<usize>() as f64);
                summary.consumed += pending.len() as u64;
                // Counted once committed, so a redone cycle is not counted twice.
                let topic = t.input.topic.clone();
                metrics::counter!(names::CONSUMED, "topic" => topic.clone())
                    .increment(pending.len() as u64);
                metrics::counter!(names::SCORED, "topic" => topic.clone()).increment(counts.scored);
                for (reason, n) in &counts.dead {
                    metrics::counter!(names::DEAD_LETTERED, "topic" => topic.clone(), "reason" => reason.label()).increment(*n);
                }
                for (rule, n) in counts.fired.iter().enumerate() {
                    if *n > 0
                        && let Some((name, model, version)) = rule_labels.get(rule)
                    {
                        metrics::counter!(names::ALERTS, "rule" => name.clone(), "model" => model.clone(), "version" => version.clone()).increment(*n);
                    }
                }
                summary.scored += counts.scored;
                summary.alerts += counts.alerts;
                summary.dead_lettered += counts.dead.values().sum::<u64>();
                summary.commits += 1;
            }
            None => {
                discard(&consumer, &t.input.topic, &mut states, &first_offsets);
                // Wait out the backoff serving the group: paused, polling, rewinding anything
                // fetched meanwhile.
                let until = Instant::now() + failures.backoff();
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    health::beat();
                    pressure.hold_now(&consumer);
                }
                pressure.release(&consumer);
            }
        }
        reporter.tick(&summary);
    }
    for b in batchers {
        b.shutdown();
    }
    tracing::info!(?summary, "processor stopped");
    Ok(summary)
}

/// Consecutive failed cycles: the backoff before the next try, and readiness.
#[derive(Default)]
struct Failures {
    consecutive: u32,
}

impl Failures {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);

    /// A cycle failed: log it with the input it held, and count it.
    fn note(
        &mut self,
        error: &KafkaError,
        first: &BTreeMap<i32, i64>,
        next: &BTreeMap<i32, i64>,
        topic: &str,
    ) {
        self.consecutive = self.consecutive.saturating_add(1);
        let error = match error {
            KafkaError::Canceled => "aborted on purpose (a testing aid)".to_string(),
            e => e.to_string(),
        };
        health::failed_cycles(self.consecutive);
        metrics::gauge!(names::FAILED_CYCLES).set(f64::from(self.consecutive));
        let ranges: Vec<String> = first
            .iter()
            .map(|(p, from)| format!("{p}:[{from}..{})", next.get(p).copied().unwrap_or(*from)))
            .collect();
        tracing::warn!(
            %topic,
            offsets = %ranges.join(" "),
            consecutive = self.consecutive,
            retry_in = ?self.backoff(),
            %error,
            "cycle failed; rolled back feature state and rewound to the cycle's first offsets"
        );
    }

    /// A cycle committed. Whether it ended a run of failures.
    fn succeeded(&mut self) -> bool {
        let had = self.consecutive > 0;
        if had {
            tracing::info!(
                after = self.consecutive,
                "cycle committed after failed attempts"
            );
            self.consecutive = 0;
            health::failed_cycles(0);
            metrics::gauge!(names::FAILED_CYCLES).set(0.0);
        }
        had
    }

    /// The wait before the next try: 0.1 s after one failure, doubling to 30 s.
    fn backoff(&self) -> Duration {
        let doublings = self.consecutive.saturating_sub(1).min(16);
        (Self::FIRST_BACKOFF * 2u32.pow(doublings)).min(Self::MAX_BACKOFF)
    }
}

/// Takes back the cycle's state changes and rewinds the partitions it read to where it began
/// (a partition that cannot be rewound gives up its state, which is restored again).
fn discard(
    consumer: &BaseConsumer<SourceContext>,
    topic: &str,
    states: &mut HashMap<i32, FeatureState>,
    first_offsets: &BTreeMap<i32, i64>,
) {
    for s in states.values_mut() {
        s.rollback();
    }
    // Partitions reassigned start again from the committed offsets; the others are rewound.
    let reassigned = consumer.context().awaiting_restore();
    let kept = consumer.assignment().unwrap_or_default();
    for (partition, offset) in first_offsets {
        if reassigned.contains(partition) || kept.find_partition(topic, *partition).is_none() {
            continue;
        }
        if let Err(e) = consumer.seek(
            topic,
            *partition,
            Offset::Offset(*offset),
            Duration::from_secs(10),
        ) {
            tracing::warn!(
                partition,
                offset,
                "rewinding failed: {e}; discarding the partition's state"
            );
            states.remove(partition);
        }
    }
}

/// Whether the group's committed offsets are the cycle's (`None`: stopping before the broker
/// answered). Asked once the transaction is settled, so they are final.
fn committed_outcome(
    consumer: &BaseConsumer<SourceContext>,
    topic: &str,
    next_offsets: &BTreeMap<i32, i64>,
    stop: &AtomicBool,
) -> Option<bool> {
    let mut tpl = TopicPartitionList::new();
    for p in next_offsets.keys() {
        tpl.add_partition(topic, *p);
    }
    loop {
        health::beat();
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => {
                let at = |p: i32| match c.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                };
                return Some(next_offsets.iter().all(|(p, next)| at(*p) >= *next));
            }
            Err(e) => {
                tracing::warn!("reading the group's committed offsets to settle a commit: {e}");
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Keeps batches under the smallest `max.message.bytes` of the output topics, unless the
/// operator set `batch.size`.
fn limit_batches(cfg: &mut ClientConfig, limit: usize) {
    // librdkafka's default batch.size.
    const DEFAULT: usize = 1_000_000;
    match cfg.get("batch.size").map(str::parse::<usize>) {
        Some(Ok(set)) if set > limit => tracing::warn!(
            batch_size = set,
            limit,
            "batch.size is larger than an output topic's max.message.bytes: batches that \
             large are refused, and their records are then redone one batch each"
        ),
        Some(_) => {}
        None if limit < DEFAULT => {
            cfg.set("batch.size", limit.to_string());
        }
        None => {}
    }
}

/// After a failed cycle, what the broker refused: records at fault go on the poison list (with
/// a producer that batched nothing, the refusal is theirs), or the next try isolates them.
/// Returns whether the next producer must batch nothing.
fn learn(
    refused: &HashMap<usize, RDKafkaErrorCode>,
    pending: &[Pending],
    isolating: bool,
    poisoned: &mut HashMap<(i32, i64), Poison>,
) -> bool {
    let own: Vec<(usize, RDKafkaErrorCode)> = refused
        .iter()
        .filter(|(_, code)| produce::is_record_error(**code))
        .map(|(t, c)| (*t, *c))
        .collect();
    if own.is_empty() {
        return isolating;
    }
    if !isolating {
        tracing::warn!(
            records = own.len(),
            "the broker refused records; redoing the cycle with one record per batch to find \
             those at fault"
        );
        return true;
    }
    for (tag, code) in own {
        if tag == TAG_CHANGELOG {
            tracing::error!("the broker refused a changelog record: {code}");
            continue;
        }
        let Some(p) = pending.get(tag / 4) else {
            continue;
        };
        let at = (p.partition, p.offset);
        let entry = poisoned.entry(at).or_insert_with(|| Poison {
            reason: reason_for(code),
            error: String::new(),
            cut: Cut::Whole,
        });
        match tag % 4 {
            TAG_SCORED | TAG_ALERT => {
                entry.reason = reason_for(code);
                entry.error = format!("the broker refused the scored record: {code:?} ({code})");
            }
            _ => {
                // Its dead letter was refused: the next try sends less of it.
                if let Outcome::Dead { reason, error, cut } = &p.outcome {
                    entry.reason = *reason;
                    entry.error.clone_from(error);
                    entry.cut = cut.next().unwrap_or(Cut::WithoutKeyOrValue);
                }
            }
        }
        tracing::warn!(
            partition = at.0,
            offset = at.1,
            reason = entry.reason.label(),
            "the broker refused this record's output ({code}); dead-lettering it on the next try"
        );
    }
    true
}

fn reason_for(code: RDKafkaErrorCode) -> Reason {
    match code {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::MessageBatchTooLarge => Reason::OutputTooLarge,
        _ => Reason::OutputRejected,
    }
}

/// Gives newly assigned partitions the state they were last committed with, then resumes them.
///
/// A partition whose state this instance still holds, committed with the offset the group
/// has committed, is kept as is; the others are read back from the changelog. The restored
/// partition record must name the group's committed offset: a changelog behind it (commit
/// markers still on their way) is read again for up to 30 s. Under exactly-once a changelog
/// ahead of the group's offset wins: it was committed in the same transaction as offsets the
/// group has lost, and the partition continues from its offset. Otherwise (a changelog
/// deleted by hand, an at-least-once crash) the state is used as it is, logged and counted.
#[allow(clippy::too_many_arguments)]
fn restore_assigned(
    consumer: &BaseConsumer<SourceContext>,
    restorer: &Restorer,
    set: &FeatureSet,
    topic: &str,
    states: &mut HashMap<i32, FeatureState>,
    assigned: &[i32],
    transactional: bool,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut seek_to: Vec<(i32, i64)> = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in assigned {
        tpl.add_partition(topic, *p);
    }
    let committed: BTreeMap<i32, Option<i64>> = loop {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => {
                break c
                    .elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(o) => (e.partition(), Some(o)),
                        _ => (e.partition(), None),
                    })
                    .collect();
            }
            Err(e) if !stop.load(Ordering::Relaxed) => {
                tracing::warn!("fetching committed offsets failed, retrying: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let expected = |p: &i32| committed.get(p).copied().flatten();
    for (p, o) in &committed {
        if let Some(o) = o {
            consumer.context().set_committed(*p, *o);
        }
    }
    let mut todo: Vec<i32> = assigned
        .iter()
        .copied()
        .filter(|p| {
            let current = states
                .get(p)
                .is_some_and(|s| s.committed_next().is_some() && s.committed_next() == expected(p));
            !current
        })
        .collect();
    let kept = assigned.len() - todo.len();
    let (mut records, mut bytes, mut keys) = (0u64, 0u64, 0usize);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !todo.is_empty() {
        let restored = match restorer.restore(set, &todo, stop) {
            Ok(r) => r,
            // Stopping: the partitions stay paused and the loop ends.
            Err(KafkaError::Canceled) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut behind = Vec::new();
        for (p, r) in restored {
            let found = r.mark.map(|m| m.next_offset);
            let want = expected(&p);
            // Only a changelog with an older partition record can be catching up; one with none
            // at all (deleted, or written before changelogs) is not waited for.
            if found.is_some_and(|f| f < want.unwrap_or(0)) && Instant::now() < deadline {
                behind.push(p);
                continue;
            }
            let ahead = found.unwrap_or(0) > want.unwrap_or(0);
            if ahead && transactional {
                // The partition record committed in the same transaction as the offsets: that
                // transaction is committed, so its offsets were too, and the group's are stale
                // (lost by the broker, or reset by hand without deleting the changelog). Going
                // back to them would publish those records' outputs a second time.
                let next = found.unwrap_or(0);
                tracing::warn!(
                    partition = p,
                    changelog_offset = next,
                    committed_offset = ?want,
                    "the group's committed offset is behind the changelog's committed state; \
                     continuing from the changelog's offset (to reprocess from an earlier \
                     offset, delete the changelog topic as well)"
                );
                metrics::counter!(names::STATE_RESTORE_GAPS, "reason" => RestoreGap::OffsetsBehind.label())
                    .increment(1);
                seek_to.push((p, next));
            } else if found != want {
                let reason = if ahead {
                    RestoreGap::Ahead
                } else {
                    RestoreGap::Behind
                }
                .label();
                tracing::warn!(
                    partition = p,
                    changelog_offset = ?found,
                    committed_offset = ?want,
                    "the changelog's state is {reason} the group's committed offset (changelog \
                     deleted or reset, offsets reset, or an at-least-once crash): features of \
                     this partition's next events may differ from an uninterrupted run"
                );
                metrics::counter!(names::STATE_RESTORE_GAPS, "reason" => reason).increment(1);
            }
            if r.unreadable > 0 {
                metrics::counter!(names::STATE_RESTORE_GAPS, "reason" => RestoreGap::Unreadable.label())
                    .increment(r.unreadable);
            }
            records += r.records;
            bytes += r.bytes;
            keys += r.state.keys();
            states.insert(p, r.state);
        }
        if !behind.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
        todo = behind;
    }
    // Partitions revoked and not given back are no longer ours to hold.
    if let Ok(now) = consumer.assignment() {
        states.retain(|p, _| now.find_partition(topic, *p).is_some());
    }
    let seconds = started.elapsed().as_secs_f64();
    metrics::histogram!(names::STATE_RESTORE_SECONDS).record(seconds);
    metrics::counter!(names::STATE_RESTORE_RECORDS).increment(records);
    metrics::counter!(names::STATE_RESTORE_BYTES).increment(bytes);
    metrics::gauge!(names::STATE_KEYS)
        .set(states.values().map(FeatureState::keys).sum::<usize>() as f64);
    tracing::info!(
        partitions = ?assigned,
        kept,
        records,
        bytes,
        keys,
        seconds,
        "feature state restored"
    );
    for (partition, offset) in seek_to {
        consumer.context().set_committed(partition, offset);
        consumer.seek(
            topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(10),
        )?;
    }
    consumer.resume(&tpl)?;
    health::awaiting_restore(consumer.context().awaiting_restore().len());
    Ok(())
}

/// Registers at 0 the counters that carry a reason or a rule, for every value they can take:
/// a rate over a series that appears only at its first occurrence misses that occurrence, and
/// alerts and panels should see "none yet" rather than "no data".
fn register_series(topic: &str, rules: &[(String, String, String)]) {
    for reason in Reason::all() {
        metrics::counter!(names::DEAD_LETTERED, "topic" => topic.to_string(), "reason" => reason.label())
            .increment(0);
    }
    for reason in AbortReason::iter() {
        metrics::counter!(names::ABORTS, "reason" => reason.label()).increment(0);
    }
    for (rule, model, version) in rules {
        metrics::counter!(names::ALERTS, "rule" => rule.clone(), "model" => model.clone(), "version" => version.clone())
            .increment(0);
    }
    for reason in RestoreGap::iter() {
        metrics::counter!(names::STATE_RESTORE_GAPS, "reason" => reason.label()).increment(0);
    }
    for kind in ["assign", "revoke"] {
        metrics::counter!(names::REBALANCES, "kind" => kind).increment(0);
    }
    for name in [
        names::COMMITS,
        names::CHANGELOG_RECORDS,
        names::STATE_RESTORE_RECORDS,
        names::STATE_RESTORE_BYTES,
        names::BACKPRESSURE_PAUSES,
        names::REGISTRY_RETRIES,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [names::CONSUMED, names::SCORED] {
        metrics::counter!(name, "topic" => topic.to_string()).increment(0);
    }
    metrics::gauge!(names::INPUT_PAUSED).set(0.0);
    metrics::gauge!(names::FAILED_CYCLES).set(0.0);
}

/// The longest one blocking producer call (init, flush, offsets, commit, abort) may wait. The
/// loop beats between them, so even a chain of them failing against an unreachable broker stays
/// well inside [`health::STALL`]; a call that runs out fails the cycle, which is rolled back and
/// redone.
const BROKER_CALL: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, crate::features::millis)
}

/// Decodes and featurises one record. While the registry cannot be reached the record waits
/// (`wait(d)`: up to `d`, serving the consumer; `false` when the cycle must end, for a stop or a
/// revocation): `None` then, and the cycle is discarded, never the record dead-lettered.
fn take(
    msg: &BorrowedMessage<'_>,
    decoder: &Decoder,
    rt: &Handle,
    set: &FeatureSet,
    state: &mut FeatureState,
    wait: &mut dyn FnMut(Duration) -> bool,
) -> Option<Pending> {
    let dead = |reason: Reason, error: String| Outcome::Dead {
        reason,
        error,
        cut: Cut::Whole,
    };
    let mut backoff = Duration::from_millis(100);
    let mut warned: Option<Instant> = None;
    let decoded = loop {
        match rt.block_on(decoder.decode(msg.payload())) {
            Err(e) if e.is_retriable() => {
                // The registry being down says nothing about the record: wait, do not dead-letter.
                metrics::counter!(names::REGISTRY_RETRIES).increment(1);
                if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "registry unavailable, retrying (every {backoff:?} at most): {e}"
                    );
                    warned = Some(Instant::now());
                }
                if !wait(backoff) {
                    return None;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            other => break other,
        }
    };
    // The record's own timestamp (when it was produced, or appended), against which its event
    // time is checked; a record without one is checked against now.
    let produced_at = msg.timestamp().to_millis().unwrap_or_else(now_ms);
    let outcome = match decoded {
        Err(e) => dead(e.reason(), e.to_string()),
        Ok(d) => match set.extract(&d.value, Some(produced_at)) {
            Err(e) => dead(e.reason(), e.to_string()),
            Ok(ev) => {
                let event_time = ev.time;
                match state.update(set, ev) {
                    Err(e) => dead(e.reason(), e.to_string()),
                    Ok(features) => Outcome::Scored {
                        event: d.value,
                        verbatim: d.verbatim,
                        schema_id: d.schema_id,
                        event_time,
                        features,
                        scores: Vec::new(),
                    },
                }
            }
        },
    };
    Some(Pending {
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().map(<[u8]>::to_vec),
        outcome,
    })
}

fn wait_scores(
    results: &std::sync::mpsc::Receiver<Scored>,
    pending: &mut [Pending],
    mut outstanding: usize,
    batchers: &[ModelBatcher],
    idle: &mut dyn FnMut(),
) -> Result<(), BatcherError> {
    for p in pending.iter_mut() {
        if let Outcome::Scored { scores, .. } = &mut p.outcome {
            scores.resize(batchers.len(), None);
        }
    }
    let mut failures: Vec<(u64, String)> = Vec::new();
    while outstanding > 0 {
        let batch = match results.recv_timeout(Duration::from_millis(50)) {
            Ok(batch) => batch,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // A dead worker's rows never come back: stop waiting for them.
                for b in batchers {
                    b.check()?;
                }
                idle();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                for b in batchers {
                    b.check()?;
                }
                return Err(BatcherError::Died {
                    model: "every model".into(),
                    reason: "the scoring threads are gone".into(),
                });
            }
        };
        match batch.rows {
            Ok(rows) => {
                outstanding = outstanding.saturating_sub(rows.len());
                for (ticket, values) in rows {
                    if let Some(Pending {
                        outcome: Outcome::Scored { scores, .. },
                        ..
                    }) = pending.get_mut(ticket as usize)
                    {
                        scores[batch.model] = Some(values);
                    }
                }
            }
            Err((tickets, e)) => {
                outstanding = outstanding.saturating_sub(tickets.len());
                failures.extend(tickets.into_iter().map(|t| (t, e.to_string())));
            }
        }
    }
    for (ticket, error) in failures {
        if let Some(p) = pending.get_mut(ticket as usize) {
            p.outcome = Outcome::Dead {
                reason: Reason::ScoringFailed,
                error,
                cut: Cut::Whole,
            };
        }
    }
    Ok(())
}

/// Every score of the topology, in order: names and versions kept once, the value filled in per
/// event. `slots[i]` says where score `i` comes from: (model index, score index).
struct ScoreSlots {
    slots: Vec<(usize, usize)>,
    values: Vec<ScoreValue>,
}

impl ScoreSlots {
    fn new(loaded: &Loaded, versions: &[String]) -> Self {
        let (slots, values) = loaded
            .topology
            .models
            .iter()
            .enumerate()
            .flat_map(|(m, model)| {
                model.scores.iter().enumerate().map(move |(i, spec)| {
                    let value = ScoreValue {
                        model: model.name.clone(),
                        version: versions.get(m).cloned().unwrap_or_default(),
                        score: spec.name.clone(),
                        qualified: format!("{}.{}", model.name, spec.name),
                        value: f64::NAN,
                    };
                    ((m, i), value)
                })
            })
            .unzip();
        ScoreSlots { slots, values }
    }

    fn qualified(&self) -> Vec<String> {
        self.values.iter().map(|v| v.qualified.clone()).collect()
    }

    /// Fills `values` with an event's scores (NaN where one is missing).
    fn fill(&self, values: &mut [ScoreValue], scores: &[Option<Vec<f64>>]) {
        for ((m, i), v) in self.slots.iter().zip(values) {
            v.value = scores
                .get(*m)
                .and_then(|got| got.as_ref()?.get(*i).copied())
                .unwrap_or(f64::NAN);
        }
    }
}

/// Decides, before anything is published, the records that are dead letters after all: those
/// the producer refused on an earlier try, and those with a score that is not a finite number
/// (so only published scores reach the drift and latency metrics).
fn settle(pending: &mut [Pending], scores: &ScoreSlots, poisoned: &HashMap<(i32, i64), Poison>) {
    let mut values = scores.values.clone();
    for p in pending.iter_mut() {
        if let Some(poison) = poisoned.get(&(p.partition, p.offset)) {
            p.outcome = Outcome::Dead {
                reason: poison.reason,
                error: poison.error.clone(),
                cut: poison.cut,
            };
            continue;
        }
        if let Outcome::Scored { scores: got, .. } = &p.outcome {
            scores.fill(&mut values, got);
            if let Some(bad) = values.iter().find(|v| !v.value.is_finite()) {
                p.outcome = Outcome::Dead {
                    reason: Reason::NonFiniteScore,
                    error: format!(
                        "score {} is not a finite number ({})",
                        bad.qualified, bad.value
                    ),
                    cut: Cut::Whole,
                };
            }
        }
    }
}

/// What one cycle published.
#[derive(Debug, Default)]
struct Counts {
    changelog: u64,
    scored: u64,
    alerts: u64,
    /// Alerts by rule index.
    fired: Vec<u64>,
    /// Dead letters by reason.
    dead: BTreeMap<Reason, u64>,
}

/// Why a cycle did not commit.
enum Failure {
    /// Certainly not committed (a send, the offsets or the flush failed, or the commit was
    /// refused in a way that requires an abort).
    NotCommitted(KafkaError),
    /// The commit itself failed in a way that leaves its outcome open (timed out, or the
    /// producer failed fatally during it): the broker decides.
    Unknown {
        error: KafkaError,
        /// What the cycle published, should it turn out committed.
        counts: Box<Counts>,
    },
}

impl Failure {
    /// A short reason label, and whether the producer failed fatally (no abort is possible).
    fn classify(&self) -> (AbortReason, bool) {
        let e = match self {
            Failure::NotCommitted(e) | Failure::Unknown { error: e, .. } => e,
        };
        classify(e)
    }
}

/// Everything a cycle's publishing needs besides the cycle.
struct Publisher<'a> {
    outputs: &'a Outputs,
    loaded: &'a Loaded,
    feature_names: &'a [&'a str],
    scores: &'a ScoreSlots,
    rules: &'a Rules,
    instance: &'a str,
    changelog_topic: &'a str,
    set: &'a FeatureSet,
    transactional: bool,
}

impl Publisher<'_> {
    /// Publishes the cycle and commits it with its input offsets (in one transaction under
    /// exactly-once).
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        producer: &OutputProducer,
        consumer: &BaseConsumer<SourceContext>,
        pending: &[Pending],
        next_offsets: &BTreeMap<i32, i64>,
        states: &HashMap<i32, FeatureState>,
        inject_abort: bool,
        fault: Option<CommitFault>,
    ) -> Result<Counts, Failure> {
        let t = &self.loaded.topology;
        let not_committed = Failure::NotCommitted;
        if self.transactional {
            producer.begin_transaction().map_err(not_committed)?;
        }
        let counts = self.send_records(producer, pending)?;
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in next_offsets {
            tpl.add_partition_offset(&t.input.topic, *partition, Offset::Offset(*next))
                .map_err(not_committed)?;
        }
        let mut counts = counts;
        // The state each partition's records left, for restoring it after a crash or rebalance.
        for (partition, next) in next_offsets {
            if let Some(state) = states.get(partition) {
                counts.changelog += state
                    .changelog(self.set, *next, |key, value| {
                        produce::send(
                            producer,
                            Out {
                                topic: self.changelog_topic,
                                partition: Some(*partition),
                                key: Some(key),
                                value,
                                headers: None,
                                tag: TAG_CHANGELOG,
                            },
                        )
                        .map_err(|e| match e {
                            SendError::Failed(e) => e,
                            SendError::Rejected(code) => KafkaError::MessageProduction(code),
                        })
                    })
                    .map_err(not_committed)? as u64;
            }
        }
        if !self.transactional {
            deliver::flush(producer, BROKER_CALL).map_err(not_committed)?;
            consumer
                .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
                .map_err(not_committed)?;
            return Ok(counts);
        }
        let cgm = consumer
            .group_metadata()
            .ok_or(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownMemberId))
            .map_err(not_committed)?;
        if inject_abort {
            // Make sure the records reached the broker, so the abort is visible to readers.
            deliver::flush(producer, BROKER_CALL).map_err(not_committed)?;
            return Err(Failure::NotCommitted(KafkaError::Canceled));
        }
        health::beat();
        producer
            .send_offsets_to_transaction(&tpl, &cgm, BROKER_CALL)
            .map_err(not_committed)?;
        health::beat();
        // Deliveries first: a record that failed makes the commit fail (abortable).
        deliver::flush(producer, BROKER_CALL).map_err(not_committed)?;
        let mut retries = 0;
        let mut fault = fault;
        loop {
            health::beat();
            if fault == Some(CommitFault::RetriableBeforeCommit) {
                fault = None;
                retries += 1;
                tracing::warn!(
                    "commit failed with a retriable error (injected); retrying the commit"
                );
                continue;
            }
            match producer.commit_transaction(BROKER_CALL) {
                Ok(()) if fault == Some(CommitFault::TimedOutAfterCommit) => {
                    return Err(Failure::Unknown {
                        error: KafkaError::Canceled,
                        counts: Box::new(counts),
                    });
                }
                Ok(()) => return Ok(counts),
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && !e.txn_requires_abort() && retries < 3 =>
                {
                    retries += 1;
                    tracing::warn!("commit failed with a retriable error, retrying: {e}");
                }
                Err(error) => {
                    let abortable =
                        matches!(&error, KafkaError::Transaction(e) if e.txn_requires_abort());
                    return Err(if abortable {
                        Failure::NotCommitted(error)
                    } else {
                        Failure::Unknown {
                            error,
                            counts: Box::new(counts),
                        }
                    });
                }
            }
        }
    }

    /// The cycle's scored records, alerts and dead letters, in input order.
    fn send_records(
        &self,
        producer: &OutputProducer,
        pending: &[Pending],
    ) -> Result<Counts, Failure> {
        let t = &self.loaded.topology;
        let out = self.outputs;
        let now = now_ms();
        let mut counts = Counts {
            fired: vec![0; self.rules.len()],
            ..Counts::default()
        };
        let mut values = self.scores.values.clone();
        let mut fired = Vec::new();
        let mut fired_names: Vec<String> = Vec::new();
        let mut buf = Vec::with_capacity(1024);
        let mut alert_buf = Vec::new();
        for (i, p) in pending.iter().enumerate() {
            let (reason, error, cut) = match &p.outcome {
                Outcome::Dead { reason, error, cut } => (*reason, error.clone(), *cut),
                Outcome::Scored {
                    event,
                    verbatim,
                    schema_id,
                    features,
                    scores,
                    ..
                } => {
                    self.scores.fill(&mut values, scores);
                    let decision = self.rules.decide(&values, &mut fired);
                    fired_names.clear();
                    fired_names.extend(fired.iter().map(|r| self.rules.name(*r).to_string()));
                    let prov = Provenance {
                        processor: self.instance,
                        topology: &t.name,
                        topic: &t.input.topic,
                        partition: p.partition,
                        offset: p.offset,
                        schema_id: *schema_id,
                        processed_at: now,
                    };
                    let datum = p
                        .value
                        .as_deref()
                        .and_then(|v| v.get(crate::wire::HEADER_LEN..));
                    let event = match datum.filter(|_| *verbatim) {
                        Some(bytes) => scored::Event::Verbatim(bytes),
                        None => scored::Event::Value(event),
                    };
                    buf.clear();
                    if let Err(e) = out.scored.encode_into(
                        &mut buf,
                        event,
                        self.feature_names,
                        features,
                        &values,
                        decision,
                        &fired_names,
                        &prov,
                    ) {
                        (Reason::Unencodable, e.to_string(), Cut::Whole)
                    } else {
                        match self.send_scored(
                            producer,
                            p,
                            i,
                            &buf,
                            &mut alert_buf,
                            !fired.is_empty(),
                        )? {
                            None => {
                                counts.scored += 1;
                                if !fired.is_empty() && out.alerts_topic.is_some() {
                                    counts.alerts += 1;
                                    for r in &fired {
                                        counts.fired[*r] += 1;
                                    }
                                }
                                continue;
                            }
                            Some(dead) => dead,
                        }
                    }
                }
            };
            self.send_dead(producer, p, i, reason, &error, cut)?;
            *counts.dead.entry(reason).or_default() += 1;
        }
        Ok(counts)
    }

    /// Sends a scored record (and its alert). `Some` dead letter instead when the producer
    /// refuses the record.
    fn send_scored(
        &self,
        producer: &OutputProducer,
        p: &Pending,
        i: usize,
        buf: &[u8],
        alert_buf: &mut Vec<u8>,
        alert: bool,
    ) -> Result<Option<(Reason, String, Cut)>, Failure> {
        let out = self.outputs;
        let refused = |code: RDKafkaErrorCode, what: &str| {
            (
                reason_for(code),
                format!(
                    "the {what} of {} bytes (key {} bytes) was refused by the producer: {code:?} ({code})",
                    buf.len(),
                    p.key.as_ref().map_or(0, Vec::len)
                ),
                Cut::Whole,
            )
        };
        let record = |topic, value, kind| Out {
            topic,
            partition: None,
            key: p.key.as_deref(),
            value: Some(value),
            headers: None,
            tag: tag(i, kind),
        };
        match produce::send(producer, record(out.scored_topic.as_str(), buf, TAG_SCORED)) {
            Ok(()) => {}
            Err(SendError::Rejected(code)) => return Ok(Some(refused(code, "scored record"))),
            Err(SendError::Failed(e)) => return Err(Failure::NotCommitted(e)),
        }
        if let Some(alerts) = out.alerts_topic.as_ref().filter(|_| alert) {
            let value: &Vec<u8> = if out.alerts_id == out.scored_id {
                alert_buf.clear();
                alert_buf.extend_from_slice(buf);
                alert_buf
            } else {
                // The same record under the alerts subject's schema id.
                alert_buf.clear();
                crate::wire::write_header(alert_buf, out.alerts_id);
                alert_buf.extend_from_slice(buf.get(crate::wire::HEADER_LEN..).unwrap_or_default());
                alert_buf
            };
            match produce::send(
                producer,
                record(alerts.as_str(), value.as_slice(), TAG_ALERT),
            ) {
                Ok(()) => {}
                // Its scored record is already on its way: the cycle is redone without it.
                Err(SendError::Rejected(code)) => {
                    return Err(Failure::NotCommitted(KafkaError::MessageProduction(code)));
                }
                Err(SendError::Failed(e)) => return Err(Failure::NotCommitted(e)),
            }
        }
        Ok(None)
    }

    /// Sends a record's dead letter, cut down as far as the producer needs.
    fn send_dead(
        &self,
        producer: &OutputProducer,
        p: &Pending,
        i: usize,
        reason: Reason,
        error: &str,
        cut: Cut,
    ) -> Result<(), Failure> {
        let t = &self.loaded.topology;
        let letter = DeadLetter {
            reason,
            error,
            topic: &t.input.topic,
            partition: p.partition,
            offset: p.offset,
            topology: &t.name,
            key: p.key.as_deref(),
            value: p.value.as_deref(),
        };
        let mut cut = cut;
        loop {
            let sent = produce::send(
                producer,
                Out {
                    topic: &self.outputs.dlq_topic,
                    partition: None,
                    key: letter.key(cut),
                    value: letter.value(cut),
                    headers: Some(letter.headers(cut)),
                    tag: tag(i, TAG_DEAD),
                },
            );
            match sent {
                Ok(()) => return Ok(()),
                Err(SendError::Rejected(code)) => match cut.next() {
                    Some(less) => {
                        tracing::warn!(
                            partition = p.partition,
                            offset = p.offset,
                            "dead letter refused ({code}); sending it cut down ({less:?})"
                        );
                        cut = less;
                    }
                    None => {
                        return Err(Failure::NotCommitted(KafkaError::MessageProduction(code)));
                    }
                },
                Err(SendError::Failed(e)) => return Err(Failure::NotCommitted(e)),
            }
        }
    }
}

/// Why a cycle was aborted: a fatal transactional error (the producer is rebuilt), an abortable
/// one, another transactional error, a failed produce, an injected abort (tests), anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
enum AbortReason {
    Fatal,
    Abortable,
    Transaction,
    Produce,
    Injected,
    Other,
}

impl AbortReason {
    fn label(self) -> &'static str {
        self.into()
    }
}

/// Why a restored partition's state does not match the group's committed offset: the changelog
/// is behind it or ahead of it, the offsets are behind the changelog under exactly-once (the
/// changelog wins), or some changelog records could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
enum RestoreGap {
    Behind,
    Ahead,
    OffsetsBehind,
    Unreadable,
}

impl RestoreGap {
    fn label(self) -> &'static str {
        self.into()
    }
}

/// Why the cycle is aborted, and whether the producer failed fatally.
fn classify(e: &KafkaError) -> (AbortReason, bool) {
    match e {
        KafkaError::Transaction(t) if t.is_fatal() => (AbortReason::Fatal, true),
        KafkaError::Transaction(t) if t.txn_requires_abort() => (AbortReason::Abortable, false),
        KafkaError::Transaction(_) => (AbortReason::Transaction, false),
        KafkaError::MessageProduction(_) => (AbortReason::Produce, false),
        KafkaError::Canceled => (AbortReason::Injected, false),
        _ => (AbortReason::Other, false),
    }
}

/// Hands a model the rows gathered for it; while its queue is full, holds the input.
fn submit(
    b: &ModelBatcher,
    open: &mut (Vec<u64>, Vec<f32>),
    pressure: &mut Pressure,
    consumer: &BaseConsumer<SourceContext>,
) -> Result<(), BatcherError> {
    if open.0.is_empty() {
        return Ok(());
    }
    let mut batch = std::mem::take(open);
    loop {
        match b.try_submit(batch.0, batch.1) {
            Ok(()) => return Ok(()),
            Err(Refused::Full(t, r)) => {
                batch = (t, r);
                pressure.hold(consumer);
            }
            Err(Refused::Dead(e)) => return Err(e),
        }
    }
}

/// Backpressure. While a model's queue is full or scores are awaited, every assigned partition
/// is paused and the consumer keeps polling: it stays in its group (no `max.poll.interval.ms`
/// expiry), serves rebalances (partitions assigned meanwhile are paused by the rebalance
/// callback until restored), and fetches nothing more, so memory stays bounded by the cycle
/// (`max_cycle_records`) and librdkafka's prefetch limit whatever the backlog.
///
/// Pausing drops what librdkafka has prefetched, which then has to be fetched again, so the
/// input is only paused once the models have been behind for `HOLD_AFTER` in a cycle; short
/// waits just wait.
#[derive(Default)]
struct Pressure {
    paused: bool,
    since: Option<Instant>,
}

const HOLD_AFTER: Duration = Duration::from_millis(200);

impl Pressure {
    fn hold(&mut self, consumer: &BaseConsumer<SourceContext>) {
        if self.since.get_or_insert_with(Instant::now).elapsed() < HOLD_AFTER {
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        if !self.paused {
            if let Ok(all) = consumer.assignment()
                && let Err(e) = consumer.pause(&all)
            {
                tracing::warn!("pausing under backpressure: {e}");
            }
            self.paused = true;
            metrics::counter!(names::BACKPRESSURE_PAUSES).increment(1);
            metrics::gauge!(names::INPUT_PAUSED).set(1.0);
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(10)) {
            // Fetched before the pause took hold: not part of this cycle, read it again later.
            let (partition, offset) = (m.partition(), m.offset());
            let topic = m.topic().to_string();
            drop(m);
            if let Err(e) = consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            ) {
                tracing::warn!(
                    partition,
                    offset,
                    "rewinding under backpressure failed: {e}"
                );
            }
        }
    }

    /// Holds the input at once (a failed cycle's backoff): paused, polling, rewinding.
    fn hold_now(&mut self, consumer: &BaseConsumer<SourceContext>) {
        self.since.get_or_insert_with(|| {
            Instant::now()
                .checked_sub(HOLD_AFTER)
                .unwrap_or_else(Instant::now)
        });
        self.hold(consumer);
    }

    fn release(&mut self, consumer: &BaseConsumer<SourceContext>) {
        self.since = None;
        if !self.paused {
            return;
        }
        self.paused = false;
        metrics::gauge!(names::INPUT_PAUSED).set(0.0);
        // Not the partitions still waiting for their state.
        let waiting = consumer.context().awaiting_restore();
        if let Ok(all) = consumer.assignment() {
            let mut tpl = TopicPartitionList::new();
            for e in all.elements() {
                if !waiting.contains(&e.partition()) {
                    tpl.add_partition(e.topic(), e.partition());
                }
            }
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!("resuming after backpressure: {e}");
            }
        }
    }
}

/// Notices a consumer that receives nothing although records wait in its assigned partitions
/// (a fetch stuck in the client or the broker), and says so once every [`Starved::AFTER`],
/// with each such partition's position and end, so it can be told from a quiet input.
struct Starved {
    last_record: Instant,
    last_check: Instant,
}

impl Starved {
    const AFTER: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Starved {
            last_record: Instant::now(),
            last_check: Instant::now(),
        }
    }

    fn received(&mut self) {
        self.last_record = Instant::now();
    }

    fn check(&mut self, consumer: &BaseConsumer<SourceContext>, topic: &str) {
        if self.last_record.elapsed() < Self::AFTER || self.last_check.elapsed() < Self::AFTER {
            return;
        }
        self.last_check = Instant::now();
        let waiting = consumer.context().awaiting_restore();
        let Ok(positions) = consumer.position() else {
            return;
        };
        for e in positions.elements_for_topic(topic) {
            let p = e.partition();
            if waiting.contains(&p) {
                continue;
            }
            let Ok((start, end)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(2))
            else {
                continue;
            };
            let position = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            // Before its first record a partition has no position: it starts at the group's
            // committed offset, else at the partition's start.
            let from = position.unwrap_or_else(|| {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, p);
                consumer
                    .committed_offsets(tpl, Duration::from_secs(2))
                    .ok()
                    .and_then(|c| match c.find_partition(topic, p)?.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(start)
            });
            if from < end {
                tracing::warn!(
                    partition = p,
                    ?position,
                    end,
                    seconds = self.last_record.elapsed().as_secs(),
                    from,
                    "no record received although the partition has records waiting: a \
                     producer's transaction on the input still open, or a fetch stuck in the \
                     client or the broker (a position of None: none consumed since the \
                     assignment)"
                );
            }
        }
    }
}

/// A warning that would repeat on every poll while the broker is away (once per 10 s, with
/// how many were suppressed).
struct Throttled {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn new(what: &'static str) -> Self {
        Throttled {
            what,
            last: None,
            suppressed: 0,
        }
    }

    fn note(&mut self, e: &dyn std::fmt::Display) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = self.suppressed, "{}: {e}", self.what);
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// The live one-line summary.
struct Reporter {
    every: Option<Duration>,
    name: String,
    last: Instant,
    last_consumed: u64,
    latencies: Vec<f64>,
}

impl Reporter {
    fn new(every: Option<Duration>, name: &str) -> Self {
        Reporter {
            every,
            name: name.to_string(),
            last: Instant::now(),
            last_consumed: 0,
            latencies: Vec::new(),
        }
    }

    fn latency(&mut self, secs: f64) {
        if self.every.is_some() {
            self.latencies.push(secs);
        }
    }

    fn tick(&mut self, s: &RunSummary) {
        let Some(every) = self.every else { return };
        if self.last.elapsed() < every {
            return;
        }
        let rate = (s.consumed - self.last_consumed) as f64 / self.last.elapsed().as_secs_f64();
        self.latencies.sort_by(f64::total_cmp);
        let p99 = self
            .latencies
            .get(((self.latencies.len() as f64) * 0.99) as usize)
            .or(self.latencies.last())
            .copied();
        // A closed stdout (`kscore run | head`) ends the summaries, never the processor.
        let line = format!(
            "[kscore {}] {rate:.0} events/s | scored {} | alerts {} | dead letters {} | event-time→commit p99 {} | commits {} aborts {}",
            self.name,
            s.scored,
            s.alerts,
            s.dead_lettered,
            p99.map_or("-".to_string(), |x| format!("{:.0} ms", x * 1000.0)),
            s.commits,
            s.aborts
        );
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::warn!("stdout closed ({e}); no more summaries");
            self.every = None;
        }
        self.last = Instant::now();
        self.last_consumed = s.consumed;
        self.latencies.clear();
    }
}
