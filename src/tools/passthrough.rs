//! `kscore passthrough`: the benchmark's baseline. Consumes a topic and produces the same bytes
//! (key, payload, partition) to another topic in Kafka transactions, with the processor's own
//! client settings, commit interval and cycle size, and nothing else: no decoding, features,
//! scoring or encoding. The processor's throughput over this one is the share of the Kafka
//! round trip that the processor's own work leaves.
//!
//! It exports the processor's metrics (`kscore_records_consumed_total`, `kscore_commits_total`,
//! `kscore_event_time_to_commit_seconds`), the latter measured from each record's timestamp,
//! which the simulator sets when it sends the event, at its event time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use crate::cluster::ClusterArgs;
use crate::kafka::config;
use crate::kafka::deliver;
use crate::kafka::produce::{self, Deliveries, Out, OutputProducer};
use crate::telemetry::metrics as names;

/// What to copy where.
#[derive(Debug, Clone, clap::Args)]
pub struct PassthroughArgs {
    /// Topic to read.
    #[arg(long)]
    pub input: String,
    /// Topic to write (created with the input's partition count).
    #[arg(long)]
    pub output: String,
    /// Consumer group.
    #[arg(long)]
    pub group: String,
    /// Transaction cadence, as the processor's `delivery.commit_interval`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    pub commit_interval: Duration,
    /// Most records per transaction, as the processor's.
    #[arg(long, default_value_t = 20_000)]
    pub max_cycle_records: usize,
}

/// Runs until `stop` is set. Blocking.
pub fn run(
    cluster: &ClusterArgs,
    args: &PassthroughArgs,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let Some(partitions) = cluster.wait_for_topic(&args.input, &stop)? else {
        return Ok(0);
    };
    rt.block_on(cluster.ensure_topic(&args.output, partitions))?;
    let consumer: BaseConsumer =
        config::source(cluster, &args.group, Some("passthrough"))?.create()?;
    consumer.subscribe(&[&args.input])?;
    let txn_id = format!("kscore-passthrough-{}", args.group);
    let producer: OutputProducer =
        config::sink(cluster, Some(&txn_id))?.create_with_context(Deliveries::default())?;
    producer.init_transactions(Duration::from_secs(60))?;
    let mut total = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let mut first: BTreeMap<i32, i64> = BTreeMap::new();
        let mut stamps: Vec<i64> = Vec::new();
        let mut open = false;
        while started.elapsed() < args.commit_interval && stamps.len() < args.max_cycle_records {
            let wait = args
                .commit_interval
                .saturating_sub(started.elapsed())
                .min(Duration::from_millis(50));
            let Some(Ok(m)) = consumer.poll(wait) else {
                continue;
            };
            if !open {
                producer.begin_transaction()?;
                open = true;
            }
            // A full queue is waited for (up to 20 s); any other refusal ends the run: a
            // baseline copies everything or says what it could not copy.
            produce::send(
                &producer,
                Out {
                    topic: &args.output,
                    partition: Some(m.partition()),
                    key: m.key(),
                    value: m.payload(),
                    headers: None,
                    tag: 0,
                },
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "copying {}/{} offset {} to {}: {e}",
                    args.input,
                    m.partition(),
                    m.offset(),
                    args.output
                )
            })?;
            first.entry(m.partition()).or_insert(m.offset());
            next.insert(m.partition(), m.offset() + 1);
            stamps.push(m.timestamp().to_millis().unwrap_or(0));
        }
        if !open {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &next {
            tpl.add_partition_offset(&args.input, *p, Offset::Offset(*o))?;
        }
        let committed = consumer
            .group_metadata()
            .ok_or(KafkaError::Canceled)
            .and_then(|cgm| {
                producer.send_offsets_to_transaction(&tpl, &cgm, Duration::from_secs(30))
            })
            .and_then(|()| deliver::commit_transaction(&producer, Duration::from_secs(60)));
        if let Err(e) = committed {
            // A baseline, not a product: abort, rewind and go on; a fatal error ends the run.
            tracing::warn!("passthrough transaction failed: {e}");
            producer.abort_transaction(Duration::from_secs(30))?;
            for (p, o) in &first {
                consumer.seek(&args.input, *p, Offset::Offset(*o), Duration::from_secs(10))?;
            }
            continue;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, crate::features::millis);
        for t in &stamps {
            metrics::histogram!(names::EVENT_TO_COMMIT_SECONDS)
                .record(now.saturating_sub(*t) as f64 / 1000.0);
        }
        metrics::counter!(names::CONSUMED, "topic" => args.input.clone())
            .increment(stamps.len() as u64);
        metrics::counter!(names::COMMITS).increment(1);
        total += stamps.len() as u64;
    }
    Ok(total)
}
