//! The feature state's changelog topic: created compacted with the input's partition count,
//! and read back on partition assignment.
//!
//! `pipeline` writes, in every transaction, the keys each partition changed and a partition
//! record carrying the next input offset (see [`crate::features::codec`]). Restoring reads the
//! assigned partitions of the changelog `read_committed` from the beginning to their end (the
//! last stable offset), so the state is exactly the last committed one; the partition record
//! then tells which input offset that state belongs to, and the caller checks it against the
//! group's committed offsets.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::cluster::ClusterArgs;
use crate::features::{FeatureSet, FeatureState, PartitionMark};

/// A partition's restored state and what it took.
#[derive(Debug)]
pub struct Restored {
    /// The state as last committed.
    pub state: FeatureState,
    /// The partition record last committed (`None`: the changelog holds none).
    pub mark: Option<PartitionMark>,
    /// Changelog records read.
    pub records: u64,
    /// Bytes of keys and values read.
    pub bytes: u64,
    /// Records that could not be applied (malformed, or written for other feature inputs).
    pub unreadable: u64,
}

/// Creates the changelog topic (compacted, as many partitions as the input) unless it exists,
/// and refuses one whose partition count differs: its partition `p` must hold the state of
/// input partition `p`.
pub async fn ensure_topic(
    cluster: &ClusterArgs,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    cluster
        .ensure_topic_with(topic, partitions, &[("cleanup.policy", "compact")])
        .await?;
    let found = cluster.partitions(topic)?;
    if found != partitions {
        anyhow::bail!(
            "changelog topic `{topic}` has {found} partitions but the input has {partitions}; \
             the state of input partition p lives in changelog partition p. Recreate the \
             changelog with {partitions} partitions (its state is then rebuilt from the input's \
             retained history only) or name another one in `state.changelog_topic`"
        );
    }
    Ok(())
}

/// The restore consumer's callbacks: reaching the end of a partition is how a restore ends,
/// not an error to log.
struct RestoreContext;

impl ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports it as a partition error or, from some paths, as a global one.
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::warn!("changelog reader: {error}: {reason}");
        }
    }
}

impl ConsumerContext for RestoreContext {}

/// Reads changelog partitions back into feature state.
pub struct Restorer {
    config: ClientConfig,
    topic: String,
    /// How long a read may see nothing before it is started again with a fresh consumer.
    stall: Duration,
}

impl Restorer {
    /// A restorer for `topic`, with the cluster's connection settings.
    pub fn new(cluster: &ClusterArgs, topic: &str) -> anyhow::Result<Self> {
        let mut config = cluster.client_config()?;
        config
            // Only `assign` is used: nothing joins this group or commits to it.
            .set("group.id", format!("{topic}-restore"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            // A fetch that fills the prefetch queue is followed by the next one as soon as the
            // queue has room again. librdkafka's default waits a second, and the end of the
            // partitions is only seen by the fetch after: a restore of 200,000 records spent
            // a second waiting for it.
            .set("fetch.queue.backoff.ms", "5");
        Ok(Restorer {
            config,
            topic: topic.to_string(),
            stall: Duration::from_secs(10),
        })
    }

    /// Restores `partitions` from the beginning of the changelog to its end (the last stable
    /// offset: a transaction still open is not part of the committed state). Keeps trying
    /// while the broker is unreachable, until `stop` is set.
    pub fn restore(
        &self,
        set: &FeatureSet,
        partitions: &[i32],
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<BTreeMap<i32, Restored>, KafkaError> {
        loop {
            // Retrying while the broker is away is the loop turning, not a stuck process: an
            // attempt can spend its whole metadata wait (10 s) without a poll that beats.
            crate::telemetry::health::beat();
            match self.attempt(set, partitions) {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => {
                    tracing::warn!(
                        topic = %self.topic,
                        ?partitions,
                        "changelog read made no progress for {:?}; starting it again",
                        self.stall
                    );
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, "changelog read failed, retrying: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(KafkaError::Canceled);
            }
        }
    }

    /// One read of every partition to its end; `None` when it stalled.
    fn attempt(
        &self,
        set: &FeatureSet,
        partitions: &[i32],
    ) -> Result<Option<BTreeMap<i32, Restored>>, KafkaError> {
        let consumer: BaseConsumer<RestoreContext> =
            self.config.create_with_context(RestoreContext)?;
        let mut tpl = TopicPartitionList::new();
        // Each once: librdkafka refuses an assignment that lists a partition twice.
        let mut partitions = partitions.to_vec();
        partitions.sort_unstable();
        partitions.dedup();
        for p in &partitions {
            tpl.add_partition_offset(&self.topic, *p, Offset::Beginning)?;
        }
        // The partitions' leader, known before they are assigned: assigned without it, each
        // partition's offset lookup waits for librdkafka's fixed 500 ms retry timer.
        consumer.fetch_metadata(Some(&self.topic), Duration::from_secs(10))?;
        consumer.assign(&tpl)?;
        let mut open: HashMap<i32, Restored> = partitions
            .iter()
            .map(|p| {
                (
                    *p,
                    Restored {
                        state: FeatureState::default(),
                        mark: None,
                        records: 0,
                        bytes: 0,
                        unreadable: 0,
                    },
                )
            })
            .collect();
        let mut done = BTreeMap::new();
        // The clocks are read after every empty poll and every `CHECK_EVERY` polls, not per
        // record (they were 9 % of a restore's samples).
        const CHECK_EVERY: u32 = 1024;
        let mut progress = Instant::now();
        let (mut moved, mut since_check) = (false, 0);
        while !open.is_empty() {
            since_check += 1;
            if since_check >= CHECK_EVERY {
                since_check = 0;
                // A long restore is progress, not a stuck process.
                crate::telemetry::health::beat();
                if std::mem::take(&mut moved) {
                    progress = Instant::now();
                } else if progress.elapsed() > self.stall {
                    return Ok(None);
                }
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => since_check = CHECK_EVERY,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    moved = true;
                    if let Some(mut r) = open.remove(&p) {
                        r.state.restored();
                        done.insert(p, r);
                    }
                }
                Some(Err(e)) => tracing::debug!(topic = %self.topic, "changelog read: {e}"),
                Some(Ok(m)) => {
                    moved = true;
                    let Some(r) = open.get_mut(&m.partition()) else {
                        continue;
                    };
                    r.records += 1;
                    r.bytes += (m.key_len() + m.payload_len()) as u64;
                    let key = m.key().unwrap_or_default();
                    match r.state.restore_record(set, key, m.payload()) {
                        Ok(Some(mark)) => r.mark = Some(mark),
                        Ok(None) => {}
                        Err(e) => {
                            r.unreadable += 1;
                            if r.unreadable <= 3 {
                                tracing::warn!(
                                    topic = %self.topic,
                                    partition = m.partition(),
                                    offset = m.offset(),
                                    "changelog record skipped: {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
        // Closing a consumer takes librdkafka some 100 ms; the state is ready without it.
        // (Where no thread can be started, the closure and the consumer are dropped here.)
        let _ = std::thread::Builder::new()
            .name("restore-close".into())
            .spawn(move || drop(consumer));
        Ok(Some(done))
    }
}
