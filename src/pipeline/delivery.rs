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
//! refusal names its record) when the failure was records the broker refused. The flush and the
//! commit (and a failed transaction's abort) run on the commit thread ([`Committer`]) while the
//! loop gathers the next cycle; the offsets are sent from the loop's thread, which has the
//! consumer and its group metadata.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use super::publish::Counts;
use super::{CommitFault, Input};
use crate::cluster::ClusterArgs;
use crate::kafka::context::CommitGate;
use crate::kafka::produce::{Deliveries, OutputProducer};
use crate::kafka::{BROKER_CALL, COMMIT_RETRIES, config, deliver, produce};
use crate::telemetry::health;

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
    /// Shared with the commit thread while a commit is under way.
    producer: Arc<OutputProducer>,
    isolating: bool,
}

/// Waits for the cycle's deliveries; fails as soon as the broker refused one.
fn flush(producer: &OutputProducer) -> Result<(), KafkaError> {
    let deliveries = producer.context();
    deliver::flush_unless(producer, BROKER_CALL, || {
        deliveries
            .peek_refused()
            .map(|(_, code)| KafkaError::MessageProduction(code))
    })
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
        let producer = Arc::new(producers.make(false)?);
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

    /// Whether a cycle's outputs are a transaction (exactly-once): what of it was sent is
    /// aborted with it.
    pub(super) fn transactional(&self) -> bool {
        matches!(self, Delivery::ExactlyOnce(_))
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

    /// Sends the cycle's input offsets to its transaction (exactly-once; on this thread, as it
    /// needs the consumer's group metadata). Not when `inject` is to abort the transaction.
    pub(super) fn send_offsets(
        &self,
        consumer: &Input,
        offsets: &TopicPartitionList,
        inject: bool,
    ) -> Result<(), Failure> {
        let Delivery::ExactlyOnce(l) = self else {
            return Ok(());
        };
        if inject {
            return Ok(());
        }
        let cgm = consumer
            .group_metadata()
            .ok_or(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownMemberId))
            .map_err(Failure::NotCommitted)?;
        health::beat();
        l.producer
            .send_offsets_to_transaction(offsets, &cgm, BROKER_CALL)
            .map_err(Failure::NotCommitted)
    }

    /// Starts committing the cycle whose records (and offsets) were sent, on the commit
    /// thread: flush, then commit the transaction; on failure, note the broker's refusals and
    /// abort it. `inject` aborts a transaction on purpose, `fault` fakes a transaction's commit
    /// failure (testing aids; at-least-once has no transaction and ignores both). Take the
    /// outcome with [`Delivery::finish_commit`].
    pub(super) fn start_commit(
        &self,
        committer: &mut Committer,
        counts: Counts,
        inject: bool,
        fault: Option<CommitFault>,
    ) {
        let (l, exactly_once) = match self {
            Delivery::ExactlyOnce(l) => (l, true),
            Delivery::AtLeastOnce(l) => (l, false),
        };
        committer.begin(Job {
            producer: l.producer.clone(),
            exactly_once,
            counts,
            inject,
            fault,
        });
    }

    /// Waits for the commit under way. At-least-once commits the input offsets here, once
    /// the outputs are flushed.
    pub(super) fn finish_commit(
        &self,
        committer: &mut Committer,
        consumer: &Input,
        offsets: &TopicPartitionList,
    ) -> Done {
        let mut done = committer.finish();
        if let (Delivery::AtLeastOnce(_), Ok(_)) = (self, &done.result) {
            // Deliveries refused by the broker are lost unless the offsets stay behind them:
            // they were flushed first.
            if let Err(e) = consumer.commit(offsets, CommitMode::Sync) {
                done.result = Err(Failure::NotCommitted(e));
            }
        }
        done
    }

    /// Settles a failed cycle's transaction and makes the next producer (one that batches
    /// nothing if `isolate`).
    pub(super) fn settle(
        &mut self,
        failure: &Failure,
        isolate: bool,
        aborted: bool,
    ) -> anyhow::Result<()> {
        if let Delivery::ExactlyOnce(l) = self
            && !aborted
        {
            abort(&l.producer, failure);
        }
        // A fresh producer with the same transactional.id fences the old one and settles what it
        // left open. (Readers of the local stand-in broker only move past an aborted transaction
        // after this; failures are rare, so it is done after every one.)
        let link = self.link_mut();
        link.isolating = isolate;
        link.producer = Arc::new(link.producers.make(isolate)?);
        Ok(())
    }

    /// Back to a producer that batches, once the records at fault are known and the cycle
    /// committed.
    pub(super) fn back_to_batching(&mut self) -> anyhow::Result<()> {
        let link = self.link_mut();
        if link.isolating {
            link.isolating = false;
            link.producer = Arc::new(link.producers.make(false)?);
        }
        Ok(())
    }

    /// What the broker refused of the failed cycle's records, by tag.
    pub(super) fn take_refused(&self) -> std::collections::HashMap<usize, RDKafkaErrorCode> {
        self.producer().context().take_refused()
    }
}

/// Commits the open transaction, retrying retriable errors (up to [`COMMIT_RETRIES`] times).
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
                if e.is_retriable() && !e.txn_requires_abort() && retries < COMMIT_RETRIES =>
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

/// A commit for the commit thread.
pub(super) struct Job {
    producer: Arc<OutputProducer>,
    exactly_once: bool,
    counts: Counts,
    inject: bool,
    fault: Option<CommitFault>,
}

/// How a commit ended.
pub(super) struct Done {
    /// Its counts, or why it failed.
    pub(super) result: Result<Counts, Failure>,
    /// The records the broker refused, by delivery tag (taken before the abort).
    pub(super) refused: HashMap<usize, RDKafkaErrorCode>,
    /// Whether its transaction was aborted already.
    pub(super) aborted: bool,
    /// When it ended.
    pub(super) at: Instant,
}

/// Runs one commit (on the commit thread).
fn run(job: Job) -> Done {
    let Job {
        producer,
        exactly_once,
        counts,
        inject,
        fault,
    } = job;
    let result = if !exactly_once {
        flush(&producer)
            .map(|()| counts)
            .map_err(Failure::NotCommitted)
    } else if inject {
        // Make sure the records reached the broker, so the abort is visible to readers.
        flush(&producer)
            .and(Err(KafkaError::Canceled))
            .map_err(Failure::NotCommitted)
    } else {
        health::beat();
        // Deliveries first: a record that failed makes the commit fail (abortable).
        match flush(&producer) {
            Ok(()) => commit_transaction(&producer, counts, fault),
            Err(e) => Err(Failure::NotCommitted(e)),
        }
    };
    let (mut refused, mut aborted) = (HashMap::new(), false);
    if let Err(failure) = &result {
        // The refusals first: an abort's purged records must not count as refused.
        refused = producer.context().take_refused();
        // Aborted here, before the commit counts as ended, so a revocation waiting for it hands
        // the partitions over with nothing of the cycle open.
        aborted = exactly_once && abort(&producer, failure);
    }
    Done {
        result,
        refused,
        aborted,
        at: Instant::now(),
    }
}

/// Aborts the open transaction of a cycle that was not committed (not after a fatal error,
/// which left the producer unusable, nor when the outcome is unknown); whether it did.
fn abort(producer: &OutputProducer, failure: &Failure) -> bool {
    let (_, fatal) = failure.classify();
    if fatal || !matches!(failure, Failure::NotCommitted(_)) {
        return false;
    }
    health::beat();
    if let Err(e) = producer.abort_transaction(BROKER_CALL) {
        tracing::warn!("abort_transaction: {e}");
    }
    true
}

/// The commit thread: commits one cycle while the loop gathers the next. While a commit is
/// under way the input consumer's [`CommitGate`] is held, so a revocation waits for it to end
/// (committed or aborted) before the partitions leave.
pub(super) struct Committer {
    jobs: std::sync::mpsc::SyncSender<Job>,
    done: std::sync::mpsc::Receiver<Done>,
    gate: Arc<CommitGate>,
    /// The counts of the commit under way, should the thread be gone.
    under_way: Option<Counts>,
    /// A commit that could not be handed to the thread, or one that ended and was seen to
    /// (by [`Committer::ended`]).
    unsent: Option<Done>,
}

impl Committer {
    /// Starts the thread.
    pub(super) fn spawn(gate: Arc<CommitGate>) -> std::io::Result<Self> {
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Job>(1);
        let (done_tx, done) = std::sync::mpsc::sync_channel::<Done>(1);
        let thread_gate = gate.clone();
        std::thread::Builder::new()
            .name("kscore-commit".into())
            .spawn(move || {
                for job in job_rx {
                    health::committing(true);
                    let done = run(job);
                    health::committing(false);
                    thread_gate.end();
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Committer {
            jobs,
            done,
            gate,
            under_way: None,
            unsent: None,
        })
    }

    fn begin(&mut self, job: Job) {
        self.gate.begin();
        let counts = job.counts.clone();
        if self.jobs.send(job).is_err() {
            // The thread is gone: nothing was committed.
            self.gate.end();
            self.unsent = Some(Done {
                result: Err(Failure::NotCommitted(KafkaError::Canceled)),
                refused: HashMap::new(),
                aborted: false,
                at: Instant::now(),
            });
            return;
        }
        self.under_way = Some(counts);
    }

    /// Whether the commit under way ended (or none is): [`Delivery::finish_commit`] then
    /// returns at once.
    pub(super) fn ended(&mut self) -> bool {
        if self.unsent.is_some() || self.under_way.is_none() {
            return true;
        }
        match self.done.try_recv() {
            Ok(done) => {
                self.under_way = None;
                self.unsent = Some(done);
                true
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => false,
            // The thread died: finishing says so.
            Err(std::sync::mpsc::TryRecvError::Disconnected) => true,
        }
    }

    /// Waits for the commit under way to end.
    fn finish(&mut self) -> Done {
        if let Some(done) = self.unsent.take() {
            return done;
        }
        let counts = self.under_way.take().unwrap_or_default();
        match self.done.recv() {
            Ok(done) => done,
            // The thread died during the commit: whether it committed is unknown.
            Err(_) => {
                self.gate.end();
                Done {
                    result: Err(Failure::Unknown {
                        error: KafkaError::Canceled,
                        counts: Box::new(counts),
                    }),
                    refused: HashMap::new(),
                    aborted: false,
                    at: Instant::now(),
                }
            }
        }
    }
}
