//! The input consumer's context: what librdkafka's group callbacks tell, kept for the commit
//! loop to act on between polls, and the lag it exports from the statistics.
//!
//! - A revocation first waits for a commit under way to end ([`CommitGate`]: the previous
//!   cycle's transaction commits, or aborts, while the next cycle is gathered), so no
//!   committing transaction of the partitions is left when they leave. Then it is a flag: the
//!   loop discards the cycle in progress, aborting its transaction if it began (what of it was
//!   published; its input offsets are never sent).
//! - An assignment pauses the new partitions at once and queues them: the loop restores their
//!   state from the changelog before it resumes them.
//! - The lag counts from the offsets the processor committed (its own map, set at every commit
//!   and restore), not from the consumer's position, which runs ahead while cycles fail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::telemetry::events::Rebalanced;
use crate::telemetry::health;
use crate::telemetry::metrics as names;

/// Whether a commit is under way, for a revocation to wait on.
#[derive(Debug, Default)]
pub struct CommitGate {
    busy: Mutex<bool>,
    ended: Condvar,
}

/// The longest a revocation waits for a commit under way: longer than a commit can take
/// ([`super::COMMIT_AT_MOST`], 120 s), so the partitions never leave while their last
/// transaction may still commit. It stays well under librdkafka's `max.poll.interval.ms`
/// (300 s), past which the member would be dropped from the group.
const COMMIT_WAIT: Duration = Duration::from_secs(super::COMMIT_AT_MOST.as_secs() + 10);
const _: () =
    assert!(COMMIT_WAIT.as_secs() > super::COMMIT_AT_MOST.as_secs() && COMMIT_WAIT.as_secs() < 300);

impl CommitGate {
    /// A commit starts.
    pub fn begin(&self) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// The commit ended (committed, aborted or failed).
    pub fn end(&self) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.ended.notify_all();
    }

    /// Waits until no commit is under way, at most `most`; whether none is.
    pub fn wait(&self, most: Duration) -> bool {
        let until = Instant::now() + most;
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            busy = self
                .ended
                .wait_timeout(busy, left.min(Duration::from_secs(1)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            health::beat();
        }
        true
    }
}

/// The input consumer's context.
#[derive(Default)]
pub struct GroupContext {
    revoked: AtomicBool,
    /// Held while a commit is under way.
    commits: Arc<CommitGate>,
    /// Partitions assigned and paused until their state is restored.
    assigned: Mutex<Vec<i32>>,
    /// Per assigned partition, the next offset committed.
    committed: Mutex<HashMap<i32, i64>>,
}

impl GroupContext {
    /// The gate commits hold while under way.
    pub fn commit_gate(&self) -> Arc<CommitGate> {
        self.commits.clone()
    }

    /// Whether partitions were revoked since the last call (which clears it).
    pub fn take_revoked(&self) -> bool {
        self.revoked.swap(false, Ordering::SeqCst)
    }

    /// Whether partitions were revoked, without clearing it.
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// The partitions assigned since the last call, to restore.
    pub fn take_assigned(&self) -> Vec<i32> {
        self.assigned
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default()
    }

    /// The partitions assigned and not yet taken for restoring.
    pub fn awaiting_restore(&self) -> Vec<i32> {
        self.assigned.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// `partition`'s committed next offset is `next`.
    pub fn set_committed(&self, partition: i32, next: i64) {
        if let Ok(mut c) = self.committed.lock() {
            c.insert(partition, next);
        }
    }

    fn committed(&self, partition: i32) -> Option<i64> {
        self.committed.lock().ok()?.get(&partition).copied()
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in stats.topics {
            for (partition, p) in t.partitions {
                // Records between what is committed and the end of the partition (the last
                // stable offset, as read `read_committed`). librdkafka's own `consumer_lag`
                // counts from offsets it committed, and offsets here are committed by the
                // transactional producer, which it does not see.
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

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                // The partitions leave once their last transaction is settled: a commit that
                // completed after their next owner read the group's offsets would have it
                // process the cycle again.
                if !self.commits.wait(COMMIT_WAIT) {
                    tracing::warn!(
                        "a commit is still under way after {COMMIT_WAIT:?}; releasing the \
                         partitions anyway"
                    );
                }
                let revoked = partitions_of(tpl);
                Rebalanced {
                    kind: "revoke",
                    partitions: &revoked,
                }
                .emit();
                // A partition assigned and revoked before the loop took it for restoring is
                // no longer this instance's to restore.
                if let Ok(mut a) = self.assigned.lock() {
                    forget_revoked(&mut a, &revoked);
                    health::awaiting_restore(a.len());
                }
                // Their new owner reports their lag from now on; a gauge left at its last value
                // here would count it twice in a sum over instances.
                for e in tpl.elements() {
                    metrics::gauge!(names::CONSUMER_LAG, "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
                        .set(0.0);
                    if let Ok(mut c) = self.committed.lock() {
                        c.remove(&e.partition());
                    }
                }
                self.revoked.store(true, Ordering::SeqCst);
            }
            Rebalance::Error(e) => tracing::warn!("rebalance failed: {e}"),
            Rebalance::Assign(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions = partitions_of(tpl);
            Rebalanced {
                kind: "assign",
                partitions: &partitions,
            }
            .emit();
            // Nothing of these partitions is read before their state is restored.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!("pausing assigned partitions: {e}");
            }
            if let Ok(mut a) = self.assigned.lock() {
                await_restore(&mut a, &partitions);
                health::awaiting_restore(a.len());
            }
            health::assigned();
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

/// Adds newly assigned partitions to those awaiting restore, each once: two assignments before
/// the loop takes them (assigned, revoked, assigned again) must not list a partition twice.
fn await_restore(pending: &mut Vec<i32>, assigned: &[i32]) {
    for p in assigned {
        if !pending.contains(p) {
            pending.push(*p);
        }
    }
}

fn forget_revoked(pending: &mut Vec<i32>, revoked: &[i32]) {
    pending.retain(|p| !revoked.contains(p));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seen in a rebalance test: [0, 1, 2, 3] restored, revoked; [0, 1] assigned, revoked before
    /// the loop took it; [0, 1, 2, 3] assigned. The restore was asked for partitions 0 and 1
    /// twice, which librdkafka refuses ("Duplicate ... in input list"), and retried for ever.
    #[test]
    fn partitions_awaiting_restore_are_listed_once_and_only_while_assigned() {
        let mut pending = Vec::new();
        await_restore(&mut pending, &[0, 1]);
        forget_revoked(&mut pending, &[0, 1]);
        await_restore(&mut pending, &[0, 1, 2, 3]);
        assert_eq!(pending, vec![0, 1, 2, 3]);
        await_restore(&mut pending, &[2, 3, 4]);
        assert_eq!(pending, vec![0, 1, 2, 3, 4]);
        forget_revoked(&mut pending, &[1, 4]);
        assert_eq!(pending, vec![0, 2, 3]);
    }
}
