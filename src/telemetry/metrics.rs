//! Every metric name the process exports, in one place, and the Prometheus exporter. Names
//! start with `kscore_`; labels are low-cardinality (topic, partition, model, reason, pattern),
//! never a key or an id.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Events the simulator produced, labelled `pattern` (`none` for legitimate payments).
pub const SIMULATOR_EVENTS: &str = "kscore_simulator_events_total";
/// Events the broker refused to the simulator.
pub const SIMULATOR_DELIVERY_FAILURES: &str = "kscore_simulator_delivery_failures_total";
/// Records `tail` read, labelled `outcome` (`decoded`, `undecodable`).
pub const TAIL_RECORDS: &str = "kscore_tail_records_total";

/// Records read from the input, labelled `topic`.
pub const CONSUMED: &str = "kscore_records_consumed_total";
/// Events scored and published, labelled `topic`.
pub const SCORED: &str = "kscore_records_scored_total";
/// Records sent to the dead-letter topic, labelled `topic` (the input) and `reason`.
pub const DEAD_LETTERED: &str = "kscore_records_dead_lettered_total";
/// Alerts published, labelled `rule`.
pub const ALERTS: &str = "kscore_alerts_total";
/// Transactions (or at-least-once commits) committed.
pub const COMMITS: &str = "kscore_commits_total";
/// Transactions aborted, labelled `reason`.
pub const ABORTS: &str = "kscore_transactions_aborted_total";
/// Rows per model call, labelled `model`.
pub const BATCH_ROWS: &str = "kscore_batch_rows";
/// Seconds per model call, labelled `model`.
pub const SCORING_SECONDS: &str = "kscore_scoring_seconds";
/// Seconds from an event's event time to the commit that published it.
pub const EVENT_TO_COMMIT_SECONDS: &str = "kscore_event_time_to_commit_seconds";
/// Seconds a commit took.
pub const COMMIT_SECONDS: &str = "kscore_commit_seconds";
/// Consumer lag in records, labelled `topic` and `partition`.
pub const CONSUMER_LAG: &str = "kscore_consumer_lag";
/// Keys held in feature state.
pub const STATE_KEYS: &str = "kscore_feature_state_keys";
/// Changelog records written (changed keys and partition records).
pub const CHANGELOG_RECORDS: &str = "kscore_changelog_records_total";
/// Seconds a restore of newly assigned partitions took.
pub const STATE_RESTORE_SECONDS: &str = "kscore_state_restore_seconds";
/// Changelog records read by restores.
pub const STATE_RESTORE_RECORDS: &str = "kscore_state_restore_records_total";
/// Changelog bytes (keys and values) read by restores.
pub const STATE_RESTORE_BYTES: &str = "kscore_state_restore_bytes_total";
/// Restored partitions whose state did not match the committed offsets, labelled `reason`
/// (`behind`, `ahead`), and changelog records that could not be read (`unreadable`).
pub const STATE_RESTORE_GAPS: &str = "kscore_state_restore_gaps_total";
/// Rebalance callbacks, labelled `kind` (`assign`, `revoke`).
pub const REBALANCES: &str = "kscore_rebalances_total";
/// Times the input was paused because the models were behind.
pub const BACKPRESSURE_PAUSES: &str = "kscore_backpressure_pauses_total";
/// 1 while the input is paused because the models are behind, else 0.
pub const INPUT_PAUSED: &str = "kscore_input_paused";
/// Registry calls retried because the registry was unreachable.
pub const REGISTRY_RETRIES: &str = "kscore_registry_retries_total";

/// Serves `/metrics` on `addr` from a background thread.
pub fn install_exporter(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("metrics endpoint on {addr}: {e}"))
}
