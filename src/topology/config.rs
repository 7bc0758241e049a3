//! The topology file, as serde structs. These structs are the reference for the file format:
//! every field is documented here, unknown fields are rejected, durations are written as
//! `"100ms"`, `"5m"`, `"7d"`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// A pipeline: where events come from, the features kept per key, the models that score them,
/// and where the results go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Name of the pipeline; appears in metrics, logs and the scored events.
    pub name: String,
    /// The input stream.
    pub input: Input,
    /// Limits on per-key feature state.
    #[serde(default)]
    pub state: StateLimits,
    /// Rolling features, computed per key on event time, in this order.
    #[serde(default, rename = "feature")]
    pub features: Vec<Feature>,
    /// Models that score each event.
    #[serde(default, rename = "model")]
    pub models: Vec<Model>,
    /// Alert rules on scores.
    #[serde(default, rename = "alert")]
    pub alerts: Vec<AlertRule>,
    /// Output topics.
    pub output: Output,
    /// Delivery guarantee and commit cadence.
    #[serde(default)]
    pub delivery: Delivery,
    /// Reloading the models while running.
    #[serde(default)]
    pub reload: Reload,
}

/// Reloading the models while running (see the README's *Shipping a new model*).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reload {
    /// Whether to look for changes to the topology file's models and to the model files and
    /// version directories, and reload when one is seen (and has stayed the same for one
    /// more look).
    #[serde(default)]
    pub watch: bool,
    /// How often to look.
    #[serde(default = "Reload::default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Reload {
    const fn default_poll() -> Duration {
        Duration::from_secs(5)
    }
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: false,
            poll_interval: Self::default_poll(),
        }
    }
}

impl Topology {
    /// The feature state's changelog topic.
    pub fn changelog_topic(&self) -> String {
        self.state
            .changelog_topic
            .clone()
            .unwrap_or_else(|| format!("{}-features-changelog", self.input.group))
    }
}

/// The input topic and how to read its records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Kafka topic to consume.
    pub topic: String,
    /// Consumer group id; instances with the same group share the partitions.
    pub group: String,
    /// Record field whose value keys the features (string field). The topic should be keyed by
    /// it so that one key's events stay in one partition, in order.
    pub key_field: String,
    /// Record field with the event time (`long` with `timestamp-millis`, or plain `long` ms).
    pub event_time_field: String,
    /// Reader schema (Avro `.avsc`), relative to the topology file. Records are resolved to it.
    pub schema: PathBuf,
    /// The latest an event time may be, relative to its Kafka record's timestamp (the time the
    /// producer created the record, or the broker appended it): an event stamped later than
    /// that, by a terminal with a wrong clock say, is dead-lettered as `event_time_out_of_range`
    /// instead of entering the features. Kafka's broker applies the same guard to record
    /// timestamps (`log.message.timestamp.after.max.ms`, one hour by default). A record without
    /// a timestamp is measured against the time it is processed.
    #[serde(default = "Input::default_max_ahead", with = "humantime_serde")]
    pub event_time_max_ahead: Duration,
    /// The earliest accepted event time (RFC 3339); earlier ones (0, negative: a missing clock)
    /// are dead-lettered as `event_time_out_of_range`. Event times after
    /// 9999-12-31T23:59:59.999Z always are.
    #[serde(default = "Input::default_earliest", with = "humantime_serde")]
    pub event_time_earliest: SystemTime,
}

impl Input {
    const fn default_max_ahead() -> Duration {
        Duration::from_secs(3600)
    }
    fn default_earliest() -> SystemTime {
        // 2000-01-01T00:00:00Z
        SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_800)
    }
}

/// Bounds on per-key state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateLimits {
    /// Most events kept per key. When a key has more inside its longest window, the oldest
    /// (by event time) are dropped: a window then sees at most this many earlier events plus
    /// the event being scored. (Each event is its own changelog record, so the cap is bounded
    /// by memory only.)
    #[serde(default = "StateLimits::default_max_events")]
    pub max_events_per_key: usize,
    /// A key with no event for this long in event time is evicted: every 10,000 events of a
    /// partition, the keys whose newest event is this far behind the partition's eviction clock
    /// (a median of medians of its recent event times, which no single event can move) go. Its
    /// next event starts from empty windows, which is what it would get anyway: no window may
    /// be longer than this, and `time_since_last` takes its default after this long.
    #[serde(default = "StateLimits::default_idle", with = "humantime_serde")]
    pub idle_key_ttl: Duration,
    /// Compacted topic the state is changelogged to, in the same transaction as the outputs
    /// and offsets, and restored from on partition assignment. Default:
    /// `<input.group>-features-changelog`. It has as many partitions as the input; partition
    /// `p` holds the state of input partition `p`.
    pub changelog_topic: Option<String>,
}

impl StateLimits {
    const fn default_max_events() -> usize {
        1_000
    }
    const fn default_idle() -> Duration {
        Duration::from_secs(8 * 24 * 3600)
    }
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits {
            max_events_per_key: Self::default_max_events(),
            idle_key_ttl: Self::default_idle(),
            changelog_topic: None,
        }
    }
}

/// How a feature is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The event's own value of a numeric field (no window).
    Value,
    /// 1 if the event's field equals `equals`, else 0 (no window).
    Equals,
    /// 1 if the event's field differs from its `other_field`, else 0 (no window).
    Differs,
    /// Number of events in the window.
    Count,
    /// Sum of a numeric field over the window.
    Sum,
    /// Mean of a numeric field over the window.
    Mean,
    /// Population standard deviation of a numeric field over the window.
    Std,
    /// Minimum of a numeric field over the window.
    Min,
    /// Maximum of a numeric field over the window.
    Max,
    /// Number of distinct values of a field over the window.
    DistinctCount,
    /// 1 if the event's value of a field did not occur earlier in the window, else 0.
    IsNew,
    /// Seconds since the key's previous event (`default` when there is none, or when it is
    /// older than `idle_key_ttl`).
    TimeSinceLast,
    /// The event's value of a numeric field divided by the field's mean over the window
    /// (`default` when that mean is 0).
    RatioToMean,
}

impl Aggregation {
    /// The value where the aggregation is undefined, unless the feature sets `default`:
    /// `time_since_last` with no earlier event (or one older than `idle_key_ttl`) is -1,
    /// `ratio_to_mean` over a window whose mean is 0 is 1 (the amount is the key's typical one).
    pub fn default_value(self) -> f64 {
        match self {
            Aggregation::RatioToMean => 1.0,
            _ => -1.0,
        }
    }
    /// Whether the aggregation takes a `default`.
    pub fn has_default(self) -> bool {
        matches!(self, Aggregation::TimeSinceLast | Aggregation::RatioToMean)
    }
    /// Whether the aggregation needs `window`.
    pub fn windowed(self) -> bool {
        !matches!(
            self,
            Aggregation::Value
                | Aggregation::Equals
                | Aggregation::Differs
                | Aggregation::TimeSinceLast
        )
    }
    /// Whether the aggregation needs `field`.
    pub fn needs_field(self) -> bool {
        !matches!(self, Aggregation::Count | Aggregation::TimeSinceLast)
    }
    /// Whether `field` must be numeric.
    pub fn numeric(self) -> bool {
        matches!(
            self,
            Aggregation::Value
                | Aggregation::Sum
                | Aggregation::Mean
                | Aggregation::Std
                | Aggregation::Min
                | Aggregation::Max
                | Aggregation::RatioToMean
        )
    }
}

/// One rolling feature.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    /// Feature name, unique in the topology; models list features by it.
    pub name: String,
    /// How it is computed.
    pub aggregation: Aggregation,
    /// The record field it reads (not for `count` and `time_since_last`). For `distinct_count`
    /// and `is_new`, the field whose values are counted.
    pub field: Option<String>,
    /// Window length on event time, e.g. `"1h"`. The window ends at and includes the event
    /// being scored: it holds the key's events with time in (t - window, t].
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// For `equals`: the value compared with (string, or a number written as a string).
    pub equals: Option<String>,
    /// For `differs`: the second field.
    pub other_field: Option<String>,
    /// The value where the aggregation is undefined: for `time_since_last`, when the key has
    /// no earlier event or its previous one is older than `idle_key_ttl` (default -1); for
    /// `ratio_to_mean`, when the window's mean is 0, as for a card whose first payment is a $0
    /// verification (default 1).
    pub default: Option<f64>,
}

/// Where an execution provider runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// NVIDIA CUDA. Refused at startup, with the reason, where ONNX Runtime cannot provide it.
    Cuda,
}

impl ExecutionProvider {
    /// Its name in topology files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
        }
    }
}

/// Micro-batching of a model's rows.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// Most rows in one call to the model.
    #[serde(default = "Batching::default_max_rows")]
    pub max_rows: usize,
    /// A fixed delay: longest a row waits for others after the first row of a batch arrived
    /// (5 ms when neither this nor `latency_budget` is set).
    #[serde(default, with = "humantime_serde")]
    pub max_delay: Option<Duration>,
    /// An adapted delay and batch size instead, kept so that a batch's first row waits for
    /// the batch and the model call together under 80% of this (see `batcher::pace`).
    #[serde(default, with = "humantime_serde")]
    pub latency_budget: Option<Duration>,
}

impl Batching {
    const fn default_max_rows() -> usize {
        256
    }
    /// The delay of a batching without a latency budget.
    pub const DEFAULT_DELAY: Duration = Duration::from_millis(5);

    /// The fixed delay (`max_delay`, else 5 ms).
    pub fn delay(&self) -> Duration {
        self.max_delay.unwrap_or(Self::DEFAULT_DELAY)
    }
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_rows: Self::default_max_rows(),
            max_delay: None,
            latency_budget: None,
        }
    }
}

/// One score taken from a model output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    /// Score name; rules refer to it as `<model>.<name>`.
    pub name: String,
    /// The model output (tensor name) it is read from.
    pub output: String,
    /// Column of a `[rows, columns]` output (for a classifier's probabilities, 1 is the positive
    /// class); 0 for a `[rows]` or `[rows, 1]` output.
    #[serde(default)]
    pub column: usize,
}

/// A model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Model name, unique in the topology.
    pub name: String,
    /// ONNX file, relative to the topology file; or a directory of version directories
    /// (`<path>/<n>/model.onnx`, `n` a whole number), of which the highest is served unless
    /// `version` names one.
    pub path: PathBuf,
    /// With a directory `path`: the version directory to serve.
    #[serde(default)]
    pub version: Option<String>,
    /// What it is for: a `primary` decides; a `canary` decides instead of its primary (`of`)
    /// for a `share` of the keys; a `shadow` is scored on every record and decides nothing.
    #[serde(default)]
    pub role: Role,
    /// A canary's primary (required), or a shadow's (optional: its would-be decisions are then
    /// counted as if it stood in for that primary).
    #[serde(default)]
    pub of: Option<String>,
    /// A canary's share of the keys, more than 0 and at most 1.
    #[serde(default)]
    pub share: Option<f64>,
    /// The features it takes, in the order of its input tensor's columns.
    pub features: Vec<String>,
    /// Its scores.
    pub scores: Vec<ScoreSpec>,
    /// Batching of its rows.
    #[serde(default)]
    pub batching: Batching,
    /// Where it runs.
    #[serde(default = "Model::default_ep")]
    pub execution_provider: ExecutionProvider,
    /// Scoring threads, each with its own session.
    #[serde(default = "Model::default_workers")]
    pub workers: usize,
}

impl Model {
    const fn default_ep() -> ExecutionProvider {
        ExecutionProvider::Cpu
    }
    const fn default_workers() -> usize {
        1
    }
}

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Decides for every key (except those its canary takes).
    #[default]
    Primary,
    /// Scored and published on every record; no rule reads it.
    Shadow,
    /// Decides instead of its primary for a share of the keys.
    Canary,
}

impl Role {
    /// As the topology, the scored records and the metrics write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Shadow => "shadow",
            Role::Canary => "canary",
        }
    }
}

/// What a rule decides when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Send for review.
    Review,
    /// Block.
    Block,
}

/// An alert rule: fires when a score is at or above a threshold.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Rule name, written into the scored event when it fires.
    pub name: String,
    /// The score, as `<model>.<score>`.
    pub score: String,
    /// Fires when the score is >= this.
    pub threshold: f64,
    /// The decision when it fires; the strongest fired decision wins.
    #[serde(default = "AlertRule::default_decision")]
    pub decision: Decision,
}

impl AlertRule {
    const fn default_decision() -> Decision {
        Decision::Review
    }
}

/// Output topics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// Every scored event goes here, keyed like the input.
    pub scored_topic: String,
    /// Events for which a rule fired also go here.
    pub alerts_topic: Option<String>,
    /// Records that cannot be scored go here, with the reason in headers.
    pub dead_letter_topic: String,
}

/// Delivery guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Kafka transactions: outputs and input offsets commit together.
    #[default]
    ExactlyOnce,
    /// Outputs first, then offsets: a crash may repeat outputs, never lose them.
    AtLeastOnce,
}

/// Delivery settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// The guarantee.
    #[serde(default)]
    pub guarantee: Guarantee,
    /// How often outputs and offsets are committed (the transaction length).
    #[serde(
        default = "Delivery::default_commit_interval",
        with = "humantime_serde"
    )]
    pub commit_interval: Duration,
}

impl Delivery {
    const fn default_commit_interval() -> Duration {
        Duration::from_millis(100)
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            guarantee: Guarantee::default(),
            commit_interval: Self::default_commit_interval(),
        }
    }
}
