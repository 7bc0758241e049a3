//! The delivery guarantee as a protocol around each cycle's records: how a cycle begins, how it
//! commits, and how a failed one is settled.
//!
//! - Exactly-once: one Kafka transaction per cycle holds its outputs, its changelog and its input
//!   offsets (sent with the consumer's group metadata). A failed cycle's transaction is aborted
//!   (unless the producer failed fatally), and a fresh producer with the same `transactional.id`
//!   fences the old one and completes or aborts whatever it left open. A commit whose outcome is
//!   unknown (timed out, or fatal during it) is decided afterwards by the group's committed
//!   offsets. Retriable commit errors are retried.
//! - At-least-once: outputs and changelog first, flushed, then the offsets committed; a record
//!   the broker refused fails the cycle before its offsets are committed.
//!
//! Either way, the producer is rebuilt after a failure; one that batches nothing (so a broker's
//! refusal names its record) when the failure was records the broker refused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use super::publish::Counts;
use super::{CommitFault, Input};
use crate::cluster::ClusterArgs;
use crate::kafka::produce::{Deliveries, OutputProducer};
use crate::kafka::{config, deliver, produce};
use crate::telemetry::health;

/// The longest one blocking producer call (init, flush, offsets, commit, abort) may wait. The
/// loop beats between them, so even a chain of them failing against an unreachable broker stays
/// well inside [`health::STALL`]; a call that runs out fails the cycle, which is rolled back and
/// redone.
pub(super) const BROKER_CALL: Duration = Duration::from_secs(20);

/// Why a cycle did not commit.
pub(super) enum Failure {
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
    /// Why the cycle is aborted, and whether the producer failed fatally (no abort possible).
    pub(super) fn classify(&self) -> (AbortReason, bool) {
        let e = match self {
            Failure::NotCommitted(e) | Failure::Unknown { error: e, .. } => e,
        };
        match e {
            KafkaError::Transaction(t) if t.is_fatal() => (AbortReason::Fatal, true),
            KafkaError::Transaction(t) if t.txn_requires_abort() => (AbortReason::Abortable, false),
            KafkaError::Transaction(_) => (AbortReason::Transaction, false),
            KafkaError::MessageProduction(_) => (AbortReason::Produce, false),
            KafkaError::Canceled => (AbortReason::Injected, false),
            _ => (AbortReason::Other, false),
        }
    }
}

/// Why a cycle was aborted: a fatal transactional error (the producer is rebuilt), an abortable
/// one, another transactional error, a failed produce, an injected abort (tests), anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(super) enum AbortReason {
    Fatal,
    Abortable,
    Transaction,
    Produce,
    Injected,
    Other,
}

impl AbortReason {
    pub(super) fn label(self) -> &'static str {
        self.into()
    }
}

/// Makes output producers: the cluster's settings, the transactional id (exactly-once), batches
/// kept under the output topics' smallest `max.message.bytes`.
pub(super) struct Producers {
    pub(super) cluster: ClusterArgs,
    pub(super) transactional_id: Option<String>,
    pub(super) batch_limit: Option<usize>,
    pub(super) stop: Arc<AtomicBool>,
}

impl Producers {
    fn try_make(&self, isolating: bool) -> anyhow::Result<OutputProducer> {
        let mut cfg = config::sink(&self.cluster, self.transactional_id.as_deref())?;
        if let Some(limit) = self.batch_limit {
            config::limit_batches(&mut cfg, limit);
        }
        if isolating {
            produce::isolating(&mut cfg);
        }
        let p: OutputProducer = cfg.create_with_context(Deliveries::default())?;
        if self.transactional_id.is_some() {
            // Fences an earlier producer with this id and aborts what it left open.
            p.init_transactions(BROKER_CALL)?;
        }
        Ok(p)
    }

    /// A producer, retried while the broker is unreachable (beating meanwhile: the process is
    /// live, a supervisor restarting it would do no better, but not ready).
    pub(super) fn make(&self, isolating: bool) -> anyhow::Result<OutputProducer> {
        let mut backoff = Duration::from_millis(500);
        loop {
            health::beat();
            match self.try_make(isolating) {
                Ok(p) => {
                    health::producer_down(false);
                    return Ok(p);
                }
                Err(e) if !self.stop.load(Ordering::Relaxed) => {
                    health::producer_down(true);
                    tracing::warn!("output producer not ready, retrying in {backoff:?}: {e:#}");
                    health::beat();
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The producer of a delivery, and whether it batches nothing.
pub(super) struct Link {
    producers: Producers,
    producer: OutputProducer,
    isolating: bool,
}

impl Link {
    /// Waits for the cycle's deliveries; fails as soon as the broker refused one.
    fn flush(&self) -> Result<(), KafkaError> {
        let deliveries = self.producer.context();
        deliver::flush_unless(&self.producer, BROKER_CALL, || {
            deliveries
                .peek_refused()
                .map(|(_, code)| KafkaError::MessageProduction(code))
        })
    }
}

/// The guarantee, each with its way to begin, commit and settle a cycle.
pub(super) enum Delivery {
    /// Outputs, changelog and offsets commit together in one transaction.
    ExactlyOnce(Link),
    /// Outputs and changelog first, then the offsets: a crash may repeat a cycle's outputs.
    AtLeastOnce(Link),
}

impl Delivery {
    /// The delivery of `guarantee` with a first producer.
    pub(super) fn start(exactly_once: bool, producers: Producers) -> anyhow::Result<Self> {
        let producer = producers.make(false)?;
        let link = Link {
            producers,
            producer,
            isolating: false,
        };
        Ok(if exactly_once {
            Delivery::ExactlyOnce(link)
        } else {
            Delivery::AtLeastOnce(link)
        })
    }

    fn link(&self) -> &Link {
        match self {
            Delivery::ExactlyOnce(l) | Delivery::AtLeastOnce(l) => l,
        }
    }

    fn link_mut(&mut self) -> &mut Link {
        match self {
            Delivery::ExactlyOnce(l) | Delivery::AtLeastOnce(l) => l,
        }
    }

    /// The producer the cycle's records go to.
    pub(super) fn producer(&self) -> &OutputProducer {
        &self.link().producer
    }

    /// Whether the producer batches nothing (a cycle redone to find refused records).
    pub(super) fn isolating(&self) -> bool {
        self.link().isolating
    }

    /// Begins a cycle.
    pub(super) fn begin(&self) -> Result<(), Failure> {
        match self {
            Delivery::ExactlyOnce(l) => l
                .producer
                .begin_transaction()
                .map_err(Failure::NotCommitted),
            Delivery::AtLeastOnce(_) => Ok(()),
        }
    }

    /// Commits the cycle's records (already sent) with its input offsets. `inject` aborts a
    /// transaction on purpose, `fault` fakes a transaction's commit failure (testing aids;
    /// at-least-once has no transaction and ignores both).
    pub(super) fn commit(
        &self,
        consumer: &Input,
        offsets: &TopicPartitionList,
        counts: Counts,
        inject: bool,
        fault: Option<CommitFault>,
    ) -> Result<Counts, Failure> {
        let not_committed = Failure::NotCommitted;
        match self {
            Delivery::AtLeastOnce(l) => {
                // Deliveries refused by the broker are lost unless the offsets stay behind them.
                l.flush().map_err(not_committed)?;
                consumer
                    .commit(offsets, CommitMode::Sync)
                    .map_err(not_committed)?;
                Ok(counts)
            }
            Delivery::ExactlyOnce(l) => {
                let cgm = consumer
                    .group_metadata()
                    .ok_or(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownMemberId))
                    .map_err(not_committed)?;
                if inject {
                    // Make sure the records reached the broker, so the abort is visible to readers.
                    l.flush().map_err(not_committed)?;
                    return Err(Failure::NotCommitted(KafkaError::Canceled));
                }
                health::beat();
                l.producer
                    .send_offsets_to_transaction(offsets, &cgm, BROKER_CALL)
                    .map_err(not_committed)?;
                health::beat();
                // Deliveries first: a record that failed makes the commit fail (abortable).
                l.flush().map_err(not_committed)?;
                commit_transaction(&l.producer, counts, fault)
            }
        }
    }

    /// Settles a failed cycle's transaction and makes the next producer (one that batches
    /// nothing if `isolate`).
    pub(super) fn settle(
        &mut self,
        failure: &Failure,
        fatal: bool,
        isolate: bool,
    ) -> anyhow::Result<()> {
        if let Delivery::ExactlyOnce(l) = self {
            health::beat();
            if let Failure::NotCommitted(_) = failure
                && !fatal
                && let Err(e) = l.producer.abort_transaction(BROKER_CALL)
            {
                tracing::warn!("abort_transaction: {e}");
            }
        }
        // A fresh producer with the same transactional.id fences the old one and settles what it
        // left open. (Readers of the local stand-in broker only move past an aborted transaction
        // after this; failures are rare, so it is done after every one.)
        let link = self.link_mut();
        link.isolating = isolate;
        link.producer = link.producers.make(isolate)?;
        Ok(())
    }

    /// Back to a producer that batches, once the records at fault are known and the cycle
    /// committed.
    pub(super) fn back_to_batching(&mut self) -> anyhow::Result<()> {
        let link = self.link_mut();
        if link.isolating {
            link.isolating = false;
            link.producer = link.producers.make(false)?;
        }
        Ok(())
    }

    /// What the broker refused of the failed cycle's records, by tag.
    pub(super) fn take_refused(&self) -> std::collections::HashMap<usize, RDKafkaErrorCode> {
        self.producer().context().take_refused()
    }
}

/// Commits the open transaction, retrying retriable errors (up to 3 times).
fn commit_transaction(
    producer: &OutputProducer,
    counts: Counts,
    mut fault: Option<CommitFault>,
) -> Result<Counts, Failure> {
    let mut retries = 0;
    loop {
        health::beat();
        if fault == Some(CommitFault::RetriableBeforeCommit) {
            fault = None;
            retries += 1;
            tracing::warn!("commit failed with a retriable error (injected); retrying the commit");
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

/// Whether the group's committed offsets are the cycle's (`None`: stopping before the broker
/// answered). Asked once the transaction is settled, so they are final.
pub(super) fn committed_outcome(
    consumer: &Input,
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
