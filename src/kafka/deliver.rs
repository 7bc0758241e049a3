//! Waiting for a producer's records to be delivered, and committing its transaction, without
//! rust-rdkafka's 100 ms steps.
//!
//! `ThreadedProducer::flush` (which `commit_transaction` calls first) checks whether records are
//! still outstanding and, if so, polls for up to 100 ms before checking again. The producer's
//! own polling thread takes the delivery reports that this poll waits for, so the poll runs out
//! its 100 ms and every flush with records in flight lasted up to 100 ms longer than the
//! deliveries did: on the local stack, 100 ms of a 135 ms commit. These wait in 1 ms steps.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};

/// Returns once every record produced so far is delivered (or failed), or the timeout passed.
pub fn flush<C: ProducerContext + 'static>(
    producer: &ThreadedProducer<C>,
    timeout: Duration,
) -> KafkaResult<()> {
    flush_unless(producer, timeout, || None)
}

/// [`flush`], but returns that error as soon as `failed` gives one (a record the broker refused
/// dooms a transaction: its other records are only purged by the abort, so waiting for them
/// would only wait out the timeout).
pub fn flush_unless<C: ProducerContext + 'static>(
    producer: &ThreadedProducer<C>,
    timeout: Duration,
    failed: impl Fn() -> Option<KafkaError>,
) -> KafkaResult<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = failed() {
            return Err(e);
        }
        // A zero timeout only checks: nothing is polled here, the polling thread serves reports.
        match producer.flush(Duration::ZERO) {
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            done => return done,
        }
    }
}

/// Commits the open transaction: waits for its records, then ends it.
pub fn commit_transaction<C: ProducerContext + 'static>(
    producer: &ThreadedProducer<C>,
    timeout: Duration,
) -> KafkaResult<()> {
    let started = Instant::now();
    flush(producer, timeout)?;
    producer.commit_transaction(timeout.saturating_sub(started.elapsed()))
}
