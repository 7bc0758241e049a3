//! The processor's notable events, one struct each. An event's `emit()` writes its log line
//! and updates its metrics together, so a call site is one line and a metric never moves
//! without its log, nor the other way round. Metric names come from [`super::metrics`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::{health, metrics as names};
use crate::reason::Reason;

/// A model's sessions are open and warm.
pub struct ModelLoaded<'a> {
    /// Model name.
    pub model: &'a str,
    /// Its version.
    pub version: &'a str,
    /// Its role.
    pub role: &'a str,
    /// Whether it carries a drift reference.
    pub drift_reference: bool,
}

impl ModelLoaded<'_> {
    /// Logs it (the model's info gauge is set by its drift monitor).
    pub fn emit(self) {
        tracing::info!(model = %self.model, version = %self.version, role = %self.role,
            drift_reference = self.drift_reference, "model loaded");
    }
}

/// A reload's new models score from this cycle on.
pub struct ModelsSwitched<'a> {
    /// Per model of the new set: (name, version, role).
    pub models: &'a [(String, String, &'static str)],
    /// Models newly loaded (the others were kept).
    pub loaded: usize,
}

impl ModelsSwitched<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        let models: Vec<String> = self
            .models
            .iter()
            .map(|(n, v, r)| format!("{n}@{v} ({r})"))
            .collect();
        tracing::info!(models = %models.join(", "), loaded = self.loaded,
            "models switched: the next cycle is scored with these");
        metrics::counter!(names::MODEL_RELOADS, "outcome" => "switched").increment(1);
    }
}

/// A reload was refused: the models before keep scoring.
pub struct ReloadRefused<'a> {
    /// Why (the model and what is wrong).
    pub reason: &'a str,
}

impl ReloadRefused<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::warn!(reason = %self.reason, "model reload refused; the models loaded before keep scoring");
        metrics::counter!(names::MODEL_RELOADS, "outcome" => "refused").increment(1);
    }
}

/// A reload found nothing to load.
pub struct ReloadUnchanged;

impl ReloadUnchanged {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::info!("model reload: nothing changed");
        metrics::counter!(names::MODEL_RELOADS, "outcome" => "unchanged").increment(1);
    }
}

/// The processor is set up and consuming.
pub struct ProcessorRunning<'a> {
    /// Topology name.
    pub topology: &'a str,
    /// Input topic.
    pub input: &'a str,
    /// Consumer group.
    pub group: &'a str,
    /// The transactional id (exactly-once), or none.
    pub transactional_id: Option<&'a str>,
}

impl ProcessorRunning<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(topology = %self.topology, input = %self.input, group = %self.group,
            transactional_id = ?self.transactional_id, "processor running");
    }
}

/// A cycle was committed.
pub struct CycleCommitted<'a> {
    /// Input topic.
    pub topic: &'a str,
    /// Input records of the cycle.
    pub consumed: u64,
    /// Scored records published.
    pub scored: u64,
    /// Dead letters published, by reason.
    pub dead: &'a BTreeMap<Reason, u64>,
    /// Alerts published, by (rule, model, version).
    pub alerts: Vec<(&'a str, &'a str, &'a str, u64)>,
    /// Changelog records written.
    pub changelog_records: u64,
    /// Their bytes, keys and values.
    pub changelog_bytes: u64,
    /// How long publishing and committing took.
    pub took: Duration,
    /// Keys held over all partitions afterwards.
    pub state_keys: usize,
}

impl CycleCommitted<'_> {
    /// Counts it (counted once committed, so a redone cycle is not counted twice).
    pub fn emit(self) {
        tracing::debug!(
            topic = %self.topic,
            consumed = self.consumed,
            scored = self.scored,
            dead_lettered = self.dead.values().sum::<u64>(),
            seconds = self.took.as_secs_f64(),
            "cycle committed"
        );
        let topic = self.topic.to_string();
        metrics::counter!(names::COMMITS).increment(1);
        metrics::histogram!(names::COMMIT_SECONDS).record(self.took.as_secs_f64());
        metrics::counter!(names::CHANGELOG_RECORDS).increment(self.changelog_records);
        metrics::counter!(names::CHANGELOG_BYTES).increment(self.changelog_bytes);
        metrics::gauge!(names::STATE_KEYS).set(self.state_keys as f64);
        metrics::counter!(names::CONSUMED, "topic" => topic.clone()).increment(self.consumed);
        metrics::counter!(names::SCORED, "topic" => topic.clone()).increment(self.scored);
        for (reason, n) in self.dead {
            metrics::counter!(names::DEAD_LETTERED, "topic" => topic.clone(), "reason" => reason.label())
                .increment(*n);
        }
        for (rule, model, version, n) in self.alerts {
            metrics::counter!(names::ALERTS, "rule" => rule.to_string(), "model" => model.to_string(), "version" => version.to_string())
                .increment(n);
        }
    }
}

/// A cycle failed to commit and was rolled back; it is retried after `retry_in`.
pub struct CycleFailed<'a> {
    /// Input topic.
    pub topic: &'a str,
    /// The input it held, per partition: `p:[from..to)`.
    pub offsets: String,
    /// Failures in a row, this one included.
    pub consecutive: u32,
    /// The backoff before the next try.
    pub retry_in: Duration,
    /// Why it failed (the abort reason's label).
    pub reason: &'static str,
    /// The error in words.
    pub error: String,
}

impl CycleFailed<'_> {
    /// Logs it, counts the abort, and updates readiness.
    pub fn emit(self) {
        tracing::warn!(
            topic = %self.topic,
            offsets = %self.offsets,
            consecutive = self.consecutive,
            retry_in = ?self.retry_in,
            error = %self.error,
            "cycle failed; rolled back feature state and rewound to the cycle's first offsets"
        );
        metrics::counter!(names::ABORTS, "reason" => self.reason).increment(1);
        metrics::gauge!(names::FAILED_CYCLES).set(f64::from(self.consecutive));
        health::failed_cycles(self.consecutive);
    }
}

/// A cycle committed after failed attempts.
pub struct CyclesRecovered {
    /// The failures in a row before it.
    pub after: u32,
}

impl CyclesRecovered {
    /// Logs it and clears the failure count.
    pub fn emit(self) {
        tracing::info!(after = self.after, "cycle committed after failed attempts");
        metrics::gauge!(names::FAILED_CYCLES).set(0.0);
        health::failed_cycles(0);
    }
}

/// A commit reported as failed turned out, by the group's offsets, to be committed.
pub struct CommitFoundCommitted<'a> {
    /// The error the commit reported.
    pub error: &'a dyn std::fmt::Display,
}

impl CommitFoundCommitted<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(error = %self.error, "the commit was reported failed, but the group has \
            the cycle's offsets: it was committed");
    }
}

/// The cycle in progress was discarded, what of it was published aborted.
pub struct CycleDiscarded {
    /// Its records.
    pub records: usize,
    /// How many of them were published (in its transaction, now aborted).
    pub published: usize,
    /// Whether for a stop (else a rebalance).
    pub stopping: bool,
}

impl CycleDiscarded {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(
            records = self.records,
            published = self.published,
            "discarding the cycle in progress (aborting what of it was published): {}",
            if self.stopping {
                "stopping"
            } else {
                "rebalance"
            }
        );
    }
}

/// The schema registry could not be reached for a record's writer schema; it is retried.
pub struct RegistryUnavailable<'a> {
    /// The record's partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The wait before the next try.
    pub retry_in: Duration,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
    /// Whether to log this one (the first, and one every 10 s after).
    pub log: bool,
}

impl RegistryUnavailable<'_> {
    /// Counts the retry, and logs it when asked.
    pub fn emit(self) {
        metrics::counter!(names::REGISTRY_RETRIES).increment(1);
        if self.log {
            tracing::warn!(
                partition = self.partition,
                offset = self.offset,
                "registry unavailable, retrying (every {:?} at most): {}",
                self.retry_in,
                self.error
            );
        }
    }
}

/// The input is paused because the models are behind.
pub struct InputPaused;

impl InputPaused {
    /// Counts the pause and sets the gauge.
    pub fn emit(self) {
        tracing::debug!("input paused: the models are behind");
        metrics::counter!(names::BACKPRESSURE_PAUSES).increment(1);
        metrics::gauge!(names::INPUT_PAUSED).set(1.0);
    }
}

/// The input is resumed.
pub struct InputResumed;

impl InputResumed {
    /// Clears the gauge.
    pub fn emit(self) {
        tracing::debug!("input resumed");
        metrics::gauge!(names::INPUT_PAUSED).set(0.0);
    }
}

/// Newly assigned partitions got their state.
pub struct StateRestored<'a> {
    /// The partitions.
    pub partitions: &'a [i32],
    /// How many kept the state this instance held.
    pub kept: usize,
    /// Changelog records read.
    pub records: u64,
    /// Changelog bytes read.
    pub bytes: u64,
    /// Keys restored.
    pub keys: usize,
    /// How long it took.
    pub took: Duration,
    /// Keys held over all partitions afterwards.
    pub state_keys: usize,
}

impl StateRestored<'_> {
    /// Logs it (tests read `records=` and `keys=` from this line) and records the metrics.
    pub fn emit(self) {
        let seconds = self.took.as_secs_f64();
        metrics::histogram!(names::STATE_RESTORE_SECONDS).record(seconds);
        metrics::counter!(names::STATE_RESTORE_RECORDS).increment(self.records);
        metrics::counter!(names::STATE_RESTORE_BYTES).increment(self.bytes);
        metrics::gauge!(names::STATE_KEYS).set(self.state_keys as f64);
        tracing::info!(
            partitions = ?self.partitions,
            kept = self.kept,
            records = self.records,
            bytes = self.bytes,
            keys = self.keys,
            seconds,
            "feature state restored"
        );
    }
}

/// A restored partition's state did not match the group's committed offset.
pub struct RestoreGapFound<'a> {
    /// The gap's label (`behind`, `ahead`, `offsets_behind`, `unreadable`).
    pub reason: &'static str,
    /// The partition.
    pub partition: i32,
    /// The next offset the changelog's state belongs to.
    pub changelog_offset: Option<i64>,
    /// The group's committed offset.
    pub committed_offset: Option<i64>,
    /// What it means and what happens now.
    pub what: &'a str,
    /// How many (records, for `unreadable`).
    pub count: u64,
}

impl RestoreGapFound<'_> {
    /// Logs it and counts it.
    pub fn emit(self) {
        tracing::warn!(
            partition = self.partition,
            changelog_offset = ?self.changelog_offset,
            committed_offset = ?self.committed_offset,
            reason = self.reason,
            "{}",
            self.what
        );
        metrics::counter!(names::STATE_RESTORE_GAPS, "reason" => self.reason).increment(self.count);
    }
}

/// A rebalance callback.
pub struct Rebalanced<'a> {
    /// `assign` or `revoke`.
    pub kind: &'static str,
    /// The partitions.
    pub partitions: &'a [i32],
}

impl Rebalanced<'_> {
    /// Logs it and counts it.
    pub fn emit(self) {
        tracing::info!(partitions = ?self.partitions, "partitions {}",
            if self.kind == "assign" { "assigned" } else { "revoked" });
        metrics::counter!(names::REBALANCES, "kind" => self.kind).increment(1);
    }
}
