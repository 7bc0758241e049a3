//! Backpressure: holding the input while the models are behind, without leaving the group.

use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;

use super::Input;
use crate::telemetry::events::{InputPaused, InputResumed};

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
pub(super) struct Pressure {
    paused: bool,
    since: Option<Instant>,
}

const HOLD_AFTER: Duration = Duration::from_millis(200);

impl Pressure {
    pub(super) fn hold(&mut self, consumer: &Input) {
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
            InputPaused.emit();
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
    pub(super) fn hold_now(&mut self, consumer: &Input) {
        self.since.get_or_insert_with(|| {
            Instant::now()
                .checked_sub(HOLD_AFTER)
                .unwrap_or_else(Instant::now)
        });
        self.hold(consumer);
    }

    pub(super) fn release(&mut self, consumer: &Input) {
        self.since = None;
        if !self.paused {
            return;
        }
        self.paused = false;
        InputResumed.emit();
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
