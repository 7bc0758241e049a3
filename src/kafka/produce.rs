//! Handing records to a producer, waiting a bounded time while its queue is full
//! ([`send_waiting`], which the simulator uses too), and, for the output producer, telling the
//! errors of one record from the errors of the cycle.
//!
//! A record the producer refuses on its own account (larger than `message.max.bytes`, or than
//! its topic's `max.message.bytes`) is [`SendError::Rejected`]: the caller dead-letters it (or
//! cuts its dead letter down) and the cycle goes on; retrying would fail the same way for ever.
//! Anything else (the queue still full after [`SEND_WAIT`], a fatal or transactional error) is
//! [`SendError::Failed`], and fails the cycle.
//!
//! The broker can refuse a record too, after it was queued: the delivery report says so, and
//! the transaction can then only be aborted. Each record carries a tag (its place in the cycle)
//! as its delivery opaque, so [`Deliveries`] can say which records the broker refused and why.
//! A broker refuses whole batches, so those tags are only the record's own fault when each
//! batch held one record: the processor redoes such a cycle with a producer that batches
//! nothing ([`isolating`]) before it dead-letters anything (see `pipeline`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, OwnedHeaders, ToBytes};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

use crate::telemetry::health;

/// How long a record may wait for room in librdkafka's queue before the cycle fails (the
/// broker is not taking records: the cycle is aborted and redone, with backoff).
pub const SEND_WAIT: Duration = Duration::from_secs(20);

/// The output producer.
pub type OutputProducer = ThreadedProducer<Deliveries>;

/// Why a record was not queued.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    /// The producer refuses this record and would refuse it again.
    #[error("{0:?} ({0})")]
    Rejected(RDKafkaErrorCode),
    /// The producer cannot take records now: the cycle fails.
    #[error(transparent)]
    Failed(#[from] KafkaError),
}

/// Whether a produce error is about the record itself, and retrying cannot help.
pub fn is_record_error(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::MessageBatchTooLarge
    )
}

/// The delivery reports of the records of a cycle that the broker refused, by tag.
#[derive(Default)]
pub struct Deliveries {
    refused: Mutex<HashMap<usize, RDKafkaErrorCode>>,
}

impl Deliveries {
    /// One refusal reported so far, if any, leaving them all in place.
    pub fn peek_refused(&self) -> Option<(usize, RDKafkaErrorCode)> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .next()
            .map(|(t, c)| (*t, *c))
    }

    /// Takes the refusals reported so far.
    pub fn take_refused(&self) -> HashMap<usize, RDKafkaErrorCode> {
        std::mem::take(&mut *self.refused.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        if let Err((e, _)) = result {
            let code = match e {
                KafkaError::MessageProduction(code) => *code,
                _ => RDKafkaErrorCode::Fail,
            };
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(tag, code);
        }
    }
}

/// Settings for a producer whose every batch holds one record, so a broker's refusal names the
/// record at fault rather than its batch.
pub fn isolating(cfg: &mut rdkafka::ClientConfig) {
    cfg.set("batch.num.messages", "1").set("linger.ms", "0");
}

/// One record for [`send`].
pub struct Out<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition, where the record must go to one (changelog).
    pub partition: Option<i32>,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Value (`None`: a record without one).
    pub value: Option<&'a [u8]>,
    /// Headers.
    pub headers: Option<OwnedHeaders>,
    /// Its tag in delivery reports.
    pub tag: usize,
}

/// Queues a record, waiting (up to [`SEND_WAIT`]) while librdkafka's queue is full.
pub fn send(producer: &OutputProducer, out: Out<'_>) -> Result<(), SendError> {
    send_within(producer, out, SEND_WAIT)
}

/// [`send`], waiting up to `wait` for room in the queue.
pub fn send_within(
    producer: &OutputProducer,
    out: Out<'_>,
    wait: Duration,
) -> Result<(), SendError> {
    let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(out.topic, out.tag);
    if let Some(p) = out.partition {
        record = record.partition(p);
    }
    if let Some(k) = out.key {
        record = record.key(k);
    }
    if let Some(v) = out.value {
        record = record.payload(v);
    }
    if let Some(h) = out.headers {
        record = record.headers(h);
    }
    match send_waiting(producer, record, wait) {
        Ok(()) => Ok(()),
        Err(KafkaError::MessageProduction(code)) if is_record_error(code) => {
            Err(SendError::Rejected(code))
        }
        Err(e) => Err(SendError::Failed(e)),
    }
}

/// Hands `record` to any threaded producer, waiting (up to `wait`) while librdkafka's queue is
/// full: after that the queue-full error, or the producer's own error at once.
pub fn send_waiting<C, K, P>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, P, C::DeliveryOpaque>,
    wait: Duration,
) -> Result<(), KafkaError>
where
    C: ProducerContext + 'static,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    // The clock is read only once the queue is full (not per record).
    let mut deadline = None;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e @ KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                let now = Instant::now();
                if now >= *deadline.get_or_insert(now + wait) {
                    return Err(e);
                }
                record = r;
                health::beat();
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_producer(extra: &[(&str, &str)]) -> OutputProducer {
        let mut cfg = rdkafka::ClientConfig::new();
        // Nothing listens there: records stay queued.
        cfg.set("bootstrap.servers", "127.0.0.1:1")
            .set("queue.buffering.max.messages", "1")
            .set("message.timeout.ms", "600000");
        for (k, v) in extra {
            cfg.set(*k, *v);
        }
        #[allow(clippy::expect_used)]
        cfg.create_with_context(Deliveries::default())
            .expect("producer")
    }

    fn out(value: &[u8]) -> Out<'_> {
        Out {
            topic: "t",
            partition: None,
            key: None,
            value: Some(value),
            headers: None,
            tag: 0,
        }
    }

    /// A full queue that never drains fails the send after its wait instead of waiting for
    /// ever.
    #[test]
    fn a_queue_that_stays_full_fails_the_send_in_bounded_time() {
        let p = unreachable_producer(&[]);
        assert_eq!(send(&p, out(b"first")), Ok(()));
        let started = Instant::now();
        let wait = Duration::from_secs(1);
        let err = send_within(&p, out(b"second"), wait);
        assert_eq!(
            err,
            Err(SendError::Failed(KafkaError::MessageProduction(
                RDKafkaErrorCode::QueueFull
            )))
        );
        assert!(started.elapsed() >= wait);
        assert!(started.elapsed() < wait + Duration::from_secs(5));
    }

    /// A record over `message.max.bytes` is the record's fault: rejected, not a cycle failure.
    #[test]
    fn a_record_over_the_size_limit_is_rejected() {
        let p = unreachable_producer(&[("message.max.bytes", "1000")]);
        let big = vec![0u8; 5_000];
        assert_eq!(
            send(&p, out(&big)),
            Err(SendError::Rejected(RDKafkaErrorCode::MessageSizeTooLarge))
        );
    }
}
