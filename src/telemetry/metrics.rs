//! Every metric the process exports, in one place: its name (a constant the code records
//! through), type, labels, meaning and, for histograms, buckets. [`CATALOGUE`] is the single
//! source: the exporter describes and buckets from it, `docs/metrics.md` is checked against it
//! by a unit test, and the Prometheus test checks the processor exports nothing outside it.
//!
//! Names start with `kscore_` (the process metrics keep the standard `process_` names);
//! labels are low-cardinality (topic, partition, model, version, score, feature, rule, reason),
//! never a key or an id.

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

impl Kind {
    /// Prometheus' name for the type.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Full name.
    pub name: &'static str,
    /// Type.
    pub kind: Kind,
    /// Label names.
    pub labels: &'static [&'static str],
    /// What it means (the `# HELP` text and the catalogue's description).
    pub help: &'static str,
    /// Bucket upper bounds, for histograms.
    pub buckets: &'static [f64],
}

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
/// Alerts published, labelled `rule`, `model` and `version`.
pub const ALERTS: &str = "kscore_alerts_total";
/// Transactions (or at-least-once commits) committed.
pub const COMMITS: &str = "kscore_commits_total";
/// Transactions aborted, labelled `reason`.
pub const ABORTS: &str = "kscore_transactions_aborted_total";
/// Rows per model call, labelled `model`.
pub const BATCH_ROWS: &str = "kscore_batch_rows";
/// Seconds per model call, labelled `model`.
pub const SCORING_SECONDS: &str = "kscore_scoring_seconds";
/// The batch-size cap a model's batching is at, labelled `model`.
pub const BATCH_TARGET_ROWS: &str = "kscore_batch_target_rows";
/// The delay a model's batching is at, labelled `model`.
pub const BATCH_DELAY_SECONDS: &str = "kscore_batch_delay_seconds";
/// Seconds from an event's event time to the commit that published it.
pub const EVENT_TO_COMMIT_SECONDS: &str = "kscore_event_time_to_commit_seconds";
/// Seconds a commit took.
pub const COMMIT_SECONDS: &str = "kscore_commit_seconds";
/// Cycles in a row that failed to commit.
pub const FAILED_CYCLES: &str = "kscore_failed_cycles";
/// Consumer lag in records, labelled `topic` and `partition`.
pub const CONSUMER_LAG: &str = "kscore_consumer_lag";
/// Keys held in feature state.
pub const STATE_KEYS: &str = "kscore_feature_state_keys";
/// Changelog records written (events added, tombstones of events dropped, partition records).
pub const CHANGELOG_RECORDS: &str = "kscore_changelog_records_total";
/// Bytes of changelog records written, keys and values, before compression.
pub const CHANGELOG_BYTES: &str = "kscore_changelog_bytes_total";
/// Seconds a restore of newly assigned partitions took.
pub const STATE_RESTORE_SECONDS: &str = "kscore_state_restore_seconds";
/// Changelog records read by restores.
pub const STATE_RESTORE_RECORDS: &str = "kscore_state_restore_records_total";
/// Changelog bytes (keys and values) read by restores.
pub const STATE_RESTORE_BYTES: &str = "kscore_state_restore_bytes_total";
/// Restored partitions whose state did not match the committed offsets, labelled `reason`.
pub const STATE_RESTORE_GAPS: &str = "kscore_state_restore_gaps_total";
/// Rebalance callbacks, labelled `kind` (`assign`, `revoke`).
pub const REBALANCES: &str = "kscore_rebalances_total";
/// Times the input was paused because the models were behind.
pub const BACKPRESSURE_PAUSES: &str = "kscore_backpressure_pauses_total";
/// 1 while the input is paused because the models are behind, else 0.
pub const INPUT_PAUSED: &str = "kscore_input_paused";
/// Registry calls retried because the registry was unreachable.
pub const REGISTRY_RETRIES: &str = "kscore_registry_retries_total";
/// 1 for each model version loaded, labelled `model` and `version`.
pub const MODEL_INFO: &str = "kscore_model_info";
/// Rows a model scored in committed cycles, labelled `model` and `version`.
pub const MODEL_ROWS: &str = "kscore_model_rows_total";
/// Scores of committed rows, labelled `model`, `version` and `score`.
pub const MODEL_SCORE: &str = "kscore_model_score";
/// Recent mean of each model input, labelled `model`, `version` and `feature`.
pub const MODEL_FEATURE_MEAN: &str = "kscore_model_feature_mean";
/// Mean of each model input in the model's reference data.
pub const MODEL_FEATURE_REFERENCE_MEAN: &str = "kscore_model_feature_reference_mean";
/// Population-stability index of recent scores against the model's reference distribution.
pub const MODEL_SCORE_PSI: &str = "kscore_model_score_psi";
/// Committed decisions each model version took part in, labelled `model`, `version`, `role`
/// and `decision`.
pub const MODEL_DECISIONS: &str = "kscore_model_decisions_total";
/// Reloads of the models, labelled `outcome` (`switched`, `unchanged`, `refused`).
pub const MODEL_RELOADS: &str = "kscore_model_reloads_total";
/// 1 once the processor is ready (state restored, models warm), else 0.
pub const READY: &str = "kscore_ready";

/// Seconds: from a millisecond to a minute.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Event-time latency: fine around a commit interval (the latency target is the interval plus
/// 50 ms), then up to minutes for a backlog.
const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
    1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Rows per model call, in powers of two up to the largest batch anyone configures.
const ROWS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];
/// Scores: probabilities in twentieths, then larger values for unbounded scores (errors).
const SCORES: &[f64] = &[
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
    0.9, 0.95, 1.0, 2.0, 5.0, 10.0,
];

const fn metric(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
        buckets: &[],
    }
}

const fn histogram(
    name: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram,
        labels,
        help,
        buckets,
    }
}

use Kind::{Counter, Gauge};

/// Every metric `kscore` exports, in the order of `docs/metrics.md`.
#[rustfmt::skip]
pub const CATALOGUE: &[Metric] = &[
    // The stream.
    metric(CONSUMED, Counter, &["topic"], "Input records read and committed."),
    metric(SCORED, Counter, &["topic"], "Events scored and published to the scored topic."),
    metric(DEAD_LETTERED, Counter, &["topic", "reason"], "Input records sent to the dead-letter topic, by reason (one series per reason from the start, at 0; the reasons are listed in the README's *Bad records*)."),
    metric(ALERTS, Counter, &["rule", "model", "version"], "Alerts published, by the topology's alert rule and the model version whose score fired it."),
    metric(CONSUMER_LAG, Gauge, &["topic", "partition"], "Records between the partition's last committed offset (what the processor has committed, not how far it has read) and its last stable offset: it grows while cycles fail to commit."),
    histogram(EVENT_TO_COMMIT_SECONDS, &[], LATENCY, "Seconds from an event's event time to the commit that published its score."),
    // Transactions.
    metric(COMMITS, Counter, &[], "Transactions committed (cycles committed, under at-least-once)."),
    metric(ABORTS, Counter, &["reason"], "Transactions aborted, by reason (`abortable`, `fatal`, `transaction`, `produce`, `injected`, `other`)."),
    metric(FAILED_CYCLES, Gauge, &[], "Cycles in a row that failed to commit (0 once one commits); not ready from 3. Each retry waits 0.1 s after the first failure, doubling to 30 s."),
    histogram(COMMIT_SECONDS, &[], SECONDS, "Seconds a commit took: from the end of the cycle's gathering (its records and changelog records not published during it, the partition records and the offsets), until its transaction committed (on the commit thread, while the next cycle is gathered)."),
    // Scoring.
    histogram(BATCH_ROWS, &["model"], ROWS, "Rows per model call."),
    histogram(SCORING_SECONDS, &["model"], SECONDS, "Seconds per model call."),
    metric(BATCH_TARGET_ROWS, Gauge, &["model"], "Rows at which the model's batches are sent now: `batching.max_rows`, or with a `latency_budget` the cap adapted to it."),
    metric(BATCH_DELAY_SECONDS, Gauge, &["model"], "Longest the first row of the model's batch waits for others now: `batching.max_delay`, or with a `latency_budget` the delay adapted to it."),
    metric(MODEL_INFO, Gauge, &["model", "version", "role"], "1 for each model version scoring now, 0 for one a reload replaced. `model` is the name its scores answer to (a canary's primary's), `role` primary, canary or shadow."),
    metric(MODEL_ROWS, Counter, &["model", "version", "role"], "Rows a model version scored, in committed cycles."),
    histogram(MODEL_SCORE, &["model", "version", "role", "score"], SCORES, "Scores of committed rows, per model version."),
    metric(MODEL_FEATURE_MEAN, Gauge, &["model", "version", "role", "feature"], "Mean of each model input over about the last 10,000 rows the version scored (exponentially weighted)."),
    metric(MODEL_FEATURE_REFERENCE_MEAN, Gauge, &["model", "version", "role", "feature"], "Mean of each model input in the reference data stored with the model."),
    metric(MODEL_SCORE_PSI, Gauge, &["model", "version", "role", "score"], "Population-stability index of about the last 10,000 scores of the version against the reference distribution stored with the model (0.1: watch, 0.25: shifted)."),
    metric(MODEL_DECISIONS, Counter, &["model", "version", "role", "decision"], "Committed records whose decision (ALLOW, REVIEW, BLOCK) the model version took part in: a primary's or its canary's for each record it scored; a shadow naming a primary counts the decision had it stood in for that primary."),
    metric(MODEL_RELOADS, Counter, &["outcome"], "Reloads of the models: `switched` (a new set scores from the next cycle), `unchanged` (nothing to load), `refused` (the reason is logged; the models before keep scoring)."),
    // Backpressure.
    metric(INPUT_PAUSED, Gauge, &[], "1 while the input is paused because the models are behind, else 0."),
    metric(BACKPRESSURE_PAUSES, Counter, &[], "Times the input was paused because the models were behind."),
    // Feature state.
    metric(STATE_KEYS, Gauge, &[], "Keys held in feature state."),
    metric(CHANGELOG_RECORDS, Counter, &[], "Changelog records written (one per event added, a tombstone per event dropped, one partition record per partition and commit)."),
    metric(CHANGELOG_BYTES, Counter, &[], "Bytes of changelog records written, keys and values, before the producer compresses them: per event, independent of how much history its key holds."),
    histogram(STATE_RESTORE_SECONDS, &[], SECONDS, "Seconds a restore of newly assigned partitions took."),
    metric(STATE_RESTORE_RECORDS, Counter, &[], "Changelog records read by restores."),
    metric(STATE_RESTORE_BYTES, Counter, &[], "Changelog bytes (keys and values) read by restores."),
    metric(STATE_RESTORE_GAPS, Counter, &["reason"], "Restored partitions whose changelog did not match the committed offsets (`behind`, `ahead`, `offsets_behind`) and changelog records that could not be read (`unreadable`)."),
    // The group and the process.
    metric(REBALANCES, Counter, &["kind"], "Rebalance callbacks (`assign`, `revoke`)."),
    metric(REGISTRY_RETRIES, Counter, &[], "Schema-registry calls retried because the registry was unreachable."),
    metric(READY, Gauge, &[], "1 while the processor is ready (see `/health/ready`), else 0."),
    metric("process_cpu_seconds_total", Counter, &[], "CPU seconds the process used, user and system."),
    metric("process_resident_memory_bytes", Gauge, &[], "Resident memory of the process."),
    metric("process_virtual_memory_bytes", Gauge, &[], "Virtual memory of the process."),
    metric("process_virtual_memory_max_bytes", Gauge, &[], "Limit on virtual memory, where one is set."),
    metric("process_open_fds", Gauge, &[], "Open file descriptors."),
    metric("process_max_fds", Gauge, &[], "Limit on open file descriptors."),
    metric("process_threads", Gauge, &[], "Threads of the process."),
    metric("process_start_time_seconds", Gauge, &[], "Start time of the process, in seconds since the Unix epoch."),
    // The other commands.
    metric(SIMULATOR_EVENTS, Counter, &["pattern"], "`simulate`: events produced, by fraud pattern (`none` for legitimate payments)."),
    metric(SIMULATOR_DELIVERY_FAILURES, Counter, &[], "`simulate`: events the broker refused."),
    metric(TAIL_RECORDS, Counter, &["outcome"], "`tail`: records read (`decoded`, `undecodable`)."),
];

/// The catalogue entry of a metric.
pub fn find(name: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|m| m.name == name)
}

/// The catalogue as the Markdown table `docs/metrics.md` holds.
pub fn markdown_table() -> String {
    let mut out = String::from("| Metric | Type | Labels | Meaning |\n|---|---|---|---|\n");
    for m in CATALOGUE {
        let labels = if m.labels.is_empty() {
            "".to_string()
        } else {
            m.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            labels,
            m.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_typed_by_suffix() {
        let mut seen = std::collections::HashSet::new();
        for m in CATALOGUE {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(
                m.name.starts_with("kscore_") || m.name.starts_with("process_"),
                "{}",
                m.name
            );
            assert_eq!(
                m.name.ends_with("_total"),
                m.kind == Kind::Counter,
                "{}: counters, and only counters, end in _total",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Histogram,
                !m.buckets.is_empty(),
                "{}",
                m.name
            );
            assert!(m.buckets.windows(2).all(|w| w[0] < w[1]), "{}", m.name);
            for label in m.labels {
                assert!(
                    !["key", "id", "card", "event_id", "offset"].contains(label),
                    "{}: label {label} is unbounded",
                    m.name
                );
            }
        }
    }

    /// `docs/metrics.md` holds the catalogue's table, between its markers. After changing the
    /// catalogue, `KSCORE_BLESS=1 cargo test --lib catalogue` rewrites the table.
    #[test]
    fn the_catalogue_in_docs_matches() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");
        let doc = std::fs::read_to_string(path).expect("docs/metrics.md");
        let (begin, end) = ("<!-- catalogue: begin -->\n", "<!-- catalogue: end -->");
        let (Some(a), Some(b)) = (doc.find(begin), doc.find(end)) else {
            panic!("docs/metrics.md lacks the catalogue markers");
        };
        let table = markdown_table();
        let current = &doc[a + begin.len()..b];
        if current != table {
            if std::env::var_os("KSCORE_BLESS").is_some() {
                let updated = format!("{}{table}{}", &doc[..a + begin.len()], &doc[b..]);
                std::fs::write(path, updated).expect("write docs/metrics.md");
            } else {
                panic!(
                    "docs/metrics.md is out of date with telemetry::metrics::CATALOGUE; \
                     run `KSCORE_BLESS=1 cargo test --lib catalogue`. Expected table:\n{table}"
                );
            }
        }
    }
}
