//! Rolling per-key features on event time.
//!
//! Each key keeps its recent events (time, the numeric and categorical values the features
//! read) sorted by event time. A feature of an event at time `t` is computed over the key's
//! events with time in `(t - window, t]` that arrived up to and including this one: **the
//! scored event is inside its own window**. Out-of-order events are placed by event time; their
//! features see the events already present with time ≤ t; features already emitted for later
//! events are not revised.
//!
//! Features are a pure function of the key's own sequence of events, never of the wall clock,
//! other keys, partitioning or when eviction ran:
//! - a key keeps only events within its longest window of its newest event time, and at most
//!   `max_events_per_key` of them (the oldest by event time are dropped first);
//! - `time_since_last` is `default` when the previous event is older than `idle_key_ttl`, so
//!   evicting a key idle for that long (by event time, against the partition's newest event)
//!   changes nothing;
//! - a late event older than the key's retained history sees only what is retained.
//!
//! The same code computes features online (`pipeline`) and offline (`kscore features`), so
//! training and serving cannot drift.

pub mod codec;
pub mod extract;
pub mod offline;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

use apache_avro::Schema;
use apache_avro::schema::RecordSchema;
use apache_avro::types::Value;

pub use codec::{CodecError, PARTITION_KEY, PartitionMark};
pub use extract::ExtractError;

use crate::topology::config::{Aggregation, StateLimits, Topology};

/// Why an event cannot be given features.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeatureError {
    /// A field the features read is missing or unusable.
    #[error(transparent)]
    Extract(#[from] ExtractError),
    /// The key field is missing or unusable.
    #[error("key: {0}")]
    Key(ExtractError),
    /// The event-time field is missing or unusable.
    #[error("event time: {0}")]
    EventTime(ExtractError),
    /// A feature came out NaN or infinite (for example a ratio to a zero mean).
    #[error("feature `{0}` is not a finite number")]
    NotFinite(String),
}

impl FeatureError {
    /// Every value [`FeatureError::reason`] returns.
    pub const REASONS: &'static [&'static str] = &[
        "missing_key",
        "missing_event_time",
        "missing_field",
        "bad_field",
        "non_finite_feature",
    ];

    /// A short, fixed label for metrics and dead-letter headers.
    pub fn reason(&self) -> &'static str {
        match self {
            FeatureError::Key(_) => "missing_key",
            FeatureError::EventTime(_) => "missing_event_time",
            FeatureError::Extract(ExtractError::Missing(_)) => "missing_field",
            FeatureError::Extract(_) => "bad_field",
            FeatureError::NotFinite(_) => "non_finite_feature",
        }
    }
}

/// Where a feature reads its value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    None,
    Num(usize),
    Cat(usize),
}

#[derive(Debug, Clone)]
struct Spec {
    name: String,
    aggregation: Aggregation,
    source: Source,
    other: Source,
    /// Index of the feature's window length in [`FeatureSet::windows`].
    window: usize,
    equals_num: Option<f64>,
    equals_cat: Option<u64>,
    default: f64,
}

/// The compiled feature definitions of a topology, shared by every partition's state.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    specs: Vec<Spec>,
    /// The distinct window lengths (ms) of the specs: each window's start is found once per
    /// event, not once per feature.
    windows: Vec<i64>,
    /// (field name, position in the reader record) for numeric and categorical inputs.
    num_fields: Vec<(String, usize)>,
    cat_fields: Vec<(String, usize)>,
    key_field: (String, usize),
    time_field: (String, usize),
    max_window_ms: i64,
    limits: StateLimits,
}

fn position(schema: &Schema, name: &str) -> usize {
    match schema {
        Schema::Record(RecordSchema { fields, .. }) => fields
            .iter()
            .position(|f| f.name == name)
            .unwrap_or(usize::MAX),
        _ => usize::MAX,
    }
}

fn intern(list: &mut Vec<(String, usize)>, schema: &Schema, name: &str) -> usize {
    if let Some(i) = list.iter().position(|(n, _)| n == name) {
        return i;
    }
    list.push((name.to_string(), position(schema, name)));
    list.len() - 1
}

impl FeatureSet {
    /// Compiles a validated topology's features against its reader schema.
    pub fn new(topology: &Topology, schema: &Schema) -> Self {
        let mut num_fields = Vec::new();
        let mut cat_fields = Vec::new();
        let mut specs = Vec::new();
        let mut windows: Vec<i64> = Vec::new();
        let mut max_window_ms = 0;
        for f in &topology.features {
            let a = f.aggregation;
            let numeric_field = f.field.as_deref().is_some_and(|n| {
                crate::topology::field_kind(schema, n) == Some(crate::topology::FieldKind::Numeric)
            });
            let source = match (
                &f.field,
                a.numeric()
                    || (numeric_field && matches!(a, Aggregation::Equals | Aggregation::Differs)),
            ) {
                (None, _) => Source::None,
                (Some(n), true) => Source::Num(intern(&mut num_fields, schema, n)),
                (Some(n), false) => Source::Cat(intern(&mut cat_fields, schema, n)),
            };
            let other = match (&f.other_field, source) {
                (Some(n), Source::Num(_)) => Source::Num(intern(&mut num_fields, schema, n)),
                (Some(n), _) => Source::Cat(intern(&mut cat_fields, schema, n)),
                (None, _) => Source::None,
            };
            let window_ms = f.window.map_or(0, |w| w.as_millis() as i64);
            max_window_ms = max_window_ms.max(window_ms);
            let window = windows
                .iter()
                .position(|&w| w == window_ms)
                .unwrap_or_else(|| {
                    windows.push(window_ms);
                    windows.len() - 1
                });
            specs.push(Spec {
                name: f.name.clone(),
                aggregation: a,
                source,
                other,
                window,
                equals_num: f.equals.as_deref().and_then(|e| e.parse().ok()),
                equals_cat: f.equals.as_deref().map(extract::hash_str),
                default: f.default.unwrap_or(-1.0),
            });
        }
        let key = &topology.input.key_field;
        let time = &topology.input.event_time_field;
        FeatureSet {
            specs,
            windows,
            num_fields,
            cat_fields,
            key_field: (key.clone(), position(schema, key)),
            time_field: (time.clone(), position(schema, time)),
            max_window_ms,
            limits: topology.state.clone(),
        }
    }

    /// Feature names, in output order.
    pub fn names(&self) -> Vec<&str> {
        self.specs.iter().map(|s| s.name.as_str()).collect()
    }

    /// Reads key, event time and feature inputs from a record.
    pub fn extract(&self, value: &Value) -> Result<Event, FeatureError> {
        let fields = extract::record(value)?;
        let key = extract::text(fields, self.key_field.1, &self.key_field.0)
            .map_err(FeatureError::Key)?;
        let time = extract::time_ms(fields, self.time_field.1, &self.time_field.0)
            .map_err(FeatureError::EventTime)?;
        let nums = self
            .num_fields
            .iter()
            .map(|(n, i)| extract::numeric(fields, *i, n))
            .collect::<Result<Vec<_>, _>>()?;
        let cats = self
            .cat_fields
            .iter()
            .map(|(n, i)| extract::categorical(fields, *i, n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Event {
            key,
            time,
            nums,
            cats,
        })
    }
}

/// What the features need from one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The feature key.
    pub key: String,
    /// Event time, ms.
    pub time: i64,
    nums: Vec<f64>,
    cats: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
struct Stored {
    time: i64,
    seq: u64,
    nums: Box<[f64]>,
    cats: Box<[u64]>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct KeyState {
    /// Sorted by (time, seq).
    events: VecDeque<Stored>,
    newest: i64,
}

/// How to take a key back to the last checkpoint. Events added since carry a `seq` at or above
/// the checkpoint's and are dropped; events the checkpoint had that were trimmed or evicted
/// since are kept here, oldest first (they left from the front, so they all sort before the
/// key's remaining events). Nothing of the key's history is copied on its first change.
#[derive(Debug, Clone, PartialEq)]
struct Undo {
    /// Whether the key existed at the checkpoint.
    existed: bool,
    /// Its `newest` then.
    newest: i64,
    /// Its events removed since, oldest first.
    removed: Vec<Stored>,
}

/// Feature state of one partition: every key's recent events, and an undo log of the keys
/// changed since the last [`FeatureState::checkpoint`], so an aborted transaction can take its
/// changes back ([`FeatureState::rollback`]) and a commit can changelog exactly those keys
/// ([`FeatureState::changelog`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureState {
    keys: HashMap<String, KeyState>,
    seq: u64,
    watermark: i64,
    since_sweep: u64,
    /// Keys changed since the last checkpoint, and how to take each back.
    undo: HashMap<String, Undo>,
    at_checkpoint: (u64, i64, u64),
    /// The next input offset of the last commit this state belongs to (`None`: none yet).
    committed_next: Option<i64>,
}

const SWEEP_EVERY: u64 = 10_000;

impl Default for FeatureState {
    fn default() -> Self {
        FeatureState {
            keys: HashMap::new(),
            seq: 0,
            watermark: i64::MIN,
            since_sweep: 0,
            undo: HashMap::new(),
            at_checkpoint: (0, i64::MIN, 0),
            committed_next: None,
        }
    }
}

impl FeatureState {
    /// Forgets the undo log: everything so far is committed.
    pub fn checkpoint(&mut self) {
        self.undo.clear();
        self.at_checkpoint = (self.seq, self.watermark, self.since_sweep);
    }

    /// Everything so far is committed, together with the input offsets up to `next_offset`.
    pub fn commit(&mut self, next_offset: i64) {
        self.checkpoint();
        self.committed_next = Some(next_offset);
    }

    /// The next input offset of the commit this state belongs to, if any.
    pub fn committed_next(&self) -> Option<i64> {
        self.committed_next
    }

    /// Takes back every change since the last checkpoint.
    pub fn rollback(&mut self) {
        let checkpoint_seq = self.at_checkpoint.0;
        for (key, undo) in self.undo.drain() {
            if !undo.existed {
                self.keys.remove(&key);
                continue;
            }
            let state = self.keys.entry(key).or_default();
            state.events.retain(|e| e.seq < checkpoint_seq);
            for (i, e) in undo.removed.into_iter().enumerate() {
                state.events.insert(i, e);
            }
            state.newest = undo.newest;
        }
        (self.seq, self.watermark, self.since_sweep) = self.at_checkpoint;
    }

    /// Keys changed since the last checkpoint.
    pub fn changed_keys(&self) -> usize {
        self.undo.len()
    }

    /// Number of keys held.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Number of events held, over all keys.
    pub fn events(&self) -> usize {
        self.keys.values().map(|k| k.events.len()).sum()
    }

    /// Adds an event and returns its features, in [`FeatureSet::names`] order. On error the
    /// state is unchanged.
    pub fn update(&mut self, set: &FeatureSet, event: Event) -> Result<Vec<f64>, FeatureError> {
        let seq = self.seq;
        let Event {
            key,
            time: t,
            nums,
            cats,
        } = event;
        if !self.undo.contains_key(&key) {
            let at_checkpoint = self.keys.get(&key);
            let undo = Undo {
                existed: at_checkpoint.is_some(),
                newest: at_checkpoint.map_or(0, |s| s.newest),
                removed: Vec::new(),
            };
            self.undo.insert(key.clone(), undo);
        }
        let checkpoint_seq = self.at_checkpoint.0;
        let mut fresh = None;
        let state = match self.keys.get_mut(&key) {
            Some(s) => s,
            None => fresh.insert(KeyState::default()),
        };
        // Insert after every event with time <= t: ties keep arrival order.
        let pos = state.events.partition_point(|e| e.time <= t);
        state.events.insert(
            pos,
            Stored {
                time: t,
                seq,
                nums: nums.into(),
                cats: cats.into(),
            },
        );
        let out = match compute(set, &state.events, pos) {
            Ok(out) => out,
            Err(e) => {
                state.events.remove(pos);
                return Err(e);
            }
        };
        self.seq += 1;
        state.newest = state.newest.max(t);
        // Trim: outside the longest window of the newest event, and over the cap.
        let horizon = state.newest.saturating_sub(set.max_window_ms);
        let mut trimmed = Vec::new();
        while state.events.front().is_some_and(|e| e.time <= horizon) && state.events.len() > 1 {
            trimmed.extend(state.events.pop_front());
        }
        while state.events.len() > set.limits.max_events_per_key {
            trimmed.extend(state.events.pop_front());
        }
        if !trimmed.is_empty()
            && let Some(undo) = self.undo.get_mut(&key)
        {
            undo.removed
                .extend(trimmed.into_iter().filter(|e| e.seq < checkpoint_seq));
        }
        if let Some(s) = fresh {
            self.keys.insert(key, s);
        }
        self.watermark = self.watermark.max(t);
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY {
            self.sweep(set);
        }
        Ok(out)
    }

    /// Evicts keys idle for longer than `idle_key_ttl` against the newest event time seen.
    pub fn sweep(&mut self, set: &FeatureSet) {
        self.since_sweep = 0;
        let ttl = set.limits.idle_key_ttl.as_millis() as i64;
        let cutoff = self.watermark.saturating_sub(ttl);
        let checkpoint_seq = self.at_checkpoint.0;
        let undo = &mut self.undo;
        self.keys.retain(|key, k| {
            let keep = k.newest >= cutoff;
            if !keep {
                let entry = undo.entry(key.clone()).or_insert_with(|| Undo {
                    existed: true,
                    newest: k.newest,
                    removed: Vec::new(),
                });
                let events = std::mem::take(&mut k.events);
                entry
                    .removed
                    .extend(events.into_iter().filter(|e| e.seq < checkpoint_seq));
            }
            keep
        });
    }
}

fn compute(
    set: &FeatureSet,
    events: &VecDeque<Stored>,
    pos: usize,
) -> Result<Vec<f64>, FeatureError> {
    let current = &events[pos];
    let t = current.time;
    let idle_ms = set.limits.idle_key_ttl.as_millis() as i64;
    // Each window is events[start..=pos] with time > t - window. Events are sorted by time and
    // none after `pos` is older than `t`, so a binary search finds its start.
    let starts: Vec<usize> = set
        .windows
        .iter()
        .map(|w| {
            let from = t.saturating_sub(*w);
            events.partition_point(|e| e.time <= from).min(pos)
        })
        .collect();
    let mut out = Vec::with_capacity(set.specs.len());
    for spec in &set.specs {
        let num = |e: &Stored| match spec.source {
            Source::Num(i) => e.nums[i],
            _ => 0.0,
        };
        let cat = |e: &Stored| match spec.source {
            Source::Cat(i) => e.cats[i],
            _ => 0,
        };
        let start = starts[spec.window];
        let window = || events.range(start..=pos);
        let x = match spec.aggregation {
            Aggregation::Value => num(current),
            Aggregation::Equals => {
                let eq = match spec.source {
                    Source::Num(_) => spec.equals_num == Some(num(current)),
                    _ => spec.equals_cat == Some(cat(current)),
                };
                f64::from(u8::from(eq))
            }
            Aggregation::Differs => {
                let differs = match (spec.source, spec.other) {
                    (Source::Num(a), Source::Num(b)) => current.nums[a] != current.nums[b],
                    (Source::Cat(a), Source::Cat(b)) => current.cats[a] != current.cats[b],
                    _ => true,
                };
                f64::from(u8::from(differs))
            }
            Aggregation::Count => window().count() as f64,
            Aggregation::Sum => window().map(num).sum(),
            Aggregation::Mean => mean(window().map(num)),
            Aggregation::Std => {
                let (s, n) = sum_count(window().map(num));
                let m = s / n as f64;
                (window().map(|e| (num(e) - m).powi(2)).sum::<f64>() / n as f64).sqrt()
            }
            Aggregation::Min => window().map(num).fold(f64::INFINITY, f64::min),
            Aggregation::Max => window().map(num).fold(f64::NEG_INFINITY, f64::max),
            Aggregation::DistinctCount if pos + 1 - start <= SMALL_WINDOW => {
                // A few values: count those not seen earlier in the window, on the stack.
                let mut seen = [0u64; SMALL_WINDOW];
                let mut n = 0;
                for v in window().map(cat) {
                    if !seen[..n].contains(&v) {
                        seen[n] = v;
                        n += 1;
                    }
                }
                n as f64
            }
            Aggregation::DistinctCount => DISTINCT.with(|scratch| {
                // Sorting a reused buffer: no allocation and no hashing per event.
                let mut values = scratch.borrow_mut();
                values.clear();
                values.extend(window().map(cat));
                values.sort_unstable();
                values.dedup();
                values.len() as f64
            }),
            Aggregation::IsNew => {
                let v = cat(current);
                let seen = window()
                    .take_while(|e| !std::ptr::eq(*e, current))
                    .any(|e| cat(e) == v);
                f64::from(u8::from(!seen))
            }
            Aggregation::TimeSinceLast => match pos.checked_sub(1).map(|p| &events[p]) {
                Some(prev) if t - prev.time <= idle_ms => (t - prev.time) as f64 / 1000.0,
                _ => spec.default,
            },
            Aggregation::RatioToMean => num(current) / mean(window().map(num)),
        };
        if !x.is_finite() {
            return Err(FeatureError::NotFinite(spec.name.clone()));
        }
        out.push(x);
    }
    Ok(out)
}

/// Windows up to this many events count distinct values by comparing each with those before it.
const SMALL_WINDOW: usize = 16;

thread_local! {
    /// Scratch space for distinct counts, one per thread.
    static DISTINCT: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

fn sum_count(xs: impl Iterator<Item = f64>) -> (f64, usize) {
    xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1))
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = sum_count(xs);
    s / n as f64
}

#[cfg(test)]
mod tests;
