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
//!   evicting a key idle for that long changes nothing for its next event (unless that event
//!   is older than the partition's eviction clock, see below);
//! - a late event older than the key's retained history sees only what is retained.
//!
//! Eviction of idle keys is driven by an [`EvictionClock`] per partition: a robust estimate of
//! the partition's event time (a median of medians of its recent event times) that no single
//! event can move, so an event dated far in the future or past never evicts other keys. Every
//! [`SWEEP_EVERY`] events taken by a partition's state, the keys whose newest event time is more
//! than `idle_key_ttl` behind that clock are evicted.
//!
//! Every aggregation has a value for every finite input: where the maths is undefined (the
//! ratio to a mean of 0, no earlier event) it is the feature's `default`. Arithmetic on event
//! times saturates; event times outside the topology's range never reach the state (see
//! [`EventTimeRange`]).
//!
//! Window aggregates are kept incrementally, so an event costs the same however long its
//! key's history: each window of a key is a suffix of its events, with running aggregates
//! that take an event when it enters and give it back when it leaves (exact sums for
//! count/sum/mean/std/ratio, monotonic queues for min/max, each value's last occurrence for
//! distinct counts and `is_new`; see [`window`]). A late event (older than its key's newest)
//! is computed from its window's events directly, and then taken into the running
//! aggregates. Both ways give the same bits: a sum is exact until it is rounded once ([`exact`]), so every feature is a
//! function of the events in its window, not of the order they came and went in.
//!
//! The same code computes features online (`pipeline`) and offline (`kscore features`), so
//! training and serving cannot drift.

pub mod codec;
pub mod exact;
pub mod extract;
mod key;
pub mod offline;
mod window;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

use apache_avro::Schema;
use apache_avro::schema::RecordSchema;

pub use codec::{CodecError, PARTITION_KEY, PartitionMark};
pub use extract::ExtractError;
use key::Key;

use crate::reason::Reason;
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
    /// The event time is outside the topology's accepted range.
    #[error("event time {0}")]
    EventTimeOutOfRange(String),
    /// A feature of finite inputs came out NaN or infinite (a sum or spread of `double` values
    /// near the largest representable, say).
    #[error("feature `{0}` is not a finite number")]
    NotFinite(String),
}

impl FeatureError {
    /// Why the record is dead-lettered.
    pub fn reason(&self) -> Reason {
        match self {
            FeatureError::Key(ExtractError::TooLong { .. }) => Reason::KeyTooLong,
            FeatureError::Key(_) => Reason::MissingKey,
            FeatureError::EventTime(_) => Reason::MissingEventTime,
            FeatureError::EventTimeOutOfRange(_) => Reason::EventTimeOutOfRange,
            FeatureError::Extract(ExtractError::Missing(_)) => Reason::MissingField,
            FeatureError::Extract(ExtractError::NotFinite(_)) => Reason::NonFiniteFeature,
            FeatureError::Extract(_) => Reason::BadField,
            FeatureError::NotFinite(_) => Reason::NonFiniteFeature,
        }
    }
}

/// The latest event time accepted whatever the topology says: 9999-12-31T23:59:59.999Z, the
/// last instant RFC 3339 (and Avro libraries that turn `timestamp-millis` into dates) can show.
pub const LATEST_EVENT_TIME_MS: i64 = 253_402_300_799_999;

/// The event times a topology accepts (`input.event_time_earliest`,
/// `input.event_time_max_ahead`). Others are dead-lettered as `event_time_out_of_range` before
/// they touch any state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTimeRange {
    /// Earliest accepted event time, ms since the epoch.
    pub earliest_ms: i64,
    /// How far an event time may be ahead of the record's own timestamp (when it was produced
    /// or appended), ms.
    pub max_ahead_ms: i64,
}

impl EventTimeRange {
    /// Checks `time` against the range. `produced_at` is the Kafka record's timestamp (or, for a
    /// record without one, the time it is processed); `None` (offline) checks the fixed bounds
    /// only.
    pub fn check(&self, time: i64, produced_at: Option<i64>) -> Result<(), FeatureError> {
        let out = |why: String| {
            Err(FeatureError::EventTimeOutOfRange(format!(
                "{} {why}",
                show_time(time)
            )))
        };
        if time < self.earliest_ms {
            return out(format!(
                "is before input.event_time_earliest ({})",
                show_time(self.earliest_ms)
            ));
        }
        if time > LATEST_EVENT_TIME_MS {
            return out(format!("is after {}", show_time(LATEST_EVENT_TIME_MS)));
        }
        if let Some(at) = produced_at
            && time > at.saturating_add(self.max_ahead_ms)
        {
            return out(format!(
                "is {} ahead of the record's timestamp {} (input.event_time_max_ahead = {})",
                humantime::format_duration(std::time::Duration::from_millis(
                    time.saturating_sub(at).unsigned_abs()
                )),
                show_time(at),
                humantime::format_duration(std::time::Duration::from_millis(
                    self.max_ahead_ms.unsigned_abs()
                ))
            ));
        }
        Ok(())
    }
}

/// An event time for messages: RFC 3339 where it has one, else milliseconds.
pub fn show_time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) if ms <= LATEST_EVENT_TIME_MS as u64 => humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string(),
        _ => format!("{ms} ms"),
    }
}

/// Milliseconds of a duration, saturating (a `Duration` holds more than an `i64` of ms).
pub fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
    /// The value where the aggregation is undefined (no earlier event, a mean of 0).
    default: f64,
    /// Where a windowed feature's running aggregates are.
    slots: window::Slots,
}

/// The compiled feature definitions of a topology, shared by every partition's state.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    specs: Vec<Spec>,
    /// The distinct window lengths (ms) of the specs: each window's start is found once per
    /// event, not once per feature.
    windows: Vec<i64>,
    /// The running aggregates each key keeps per window.
    plan: window::Plan,
    /// (field name, position in the reader record) for numeric and categorical inputs.
    num_fields: Vec<(String, usize)>,
    cat_fields: Vec<(String, usize)>,
    key_field: (String, usize),
    time_field: (String, usize),
    time_range: EventTimeRange,
    /// The [`extract::layout`] of the reader schema the field positions are of.
    layout: u64,
    max_window_ms: i64,
    /// `idle_key_ttl`, ms.
    idle_ms: i64,
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
            let window_ms = f.window.map_or(0, millis);
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
                default: f.default.unwrap_or(a.default_value()),
                slots: window::Slots::default(),
            });
        }
        let mut plan = window::Plan::new(&windows);
        for spec in &mut specs {
            if spec.aggregation.windowed() {
                spec.slots = plan.add(spec.aggregation, spec.window, spec.source);
            }
        }
        let key = &topology.input.key_field;
        let time = &topology.input.event_time_field;
        FeatureSet {
            specs,
            windows,
            plan,
            num_fields,
            cat_fields,
            key_field: (key.clone(), position(schema, key)),
            time_field: (time.clone(), position(schema, time)),
            time_range: EventTimeRange {
                earliest_ms: topology
                    .input
                    .event_time_earliest
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, millis),
                max_ahead_ms: millis(topology.input.event_time_max_ahead),
            },
            layout: match schema {
                Schema::Record(RecordSchema { fields, .. }) => {
                    extract::layout(fields.iter().map(|f| f.name.as_str()))
                }
                _ => 0,
            },
            max_window_ms,
            idle_ms: millis(topology.state.idle_key_ttl),
            limits: topology.state.clone(),
        }
    }

    /// The event times this topology accepts.
    pub fn time_range(&self) -> EventTimeRange {
        self.time_range
    }

    /// Feature names, in output order.
    pub fn names(&self) -> Vec<&str> {
        self.specs.iter().map(|s| s.name.as_str()).collect()
    }

    /// Reads key, event time and feature inputs from a record, and checks the event time
    /// against the topology's range ([`EventTimeRange::check`]; `produced_at`: the Kafka
    /// record's timestamp, `None` offline).
    pub fn extract<'r, R: extract::Fields + ?Sized>(
        &self,
        fields: &'r R,
        produced_at: Option<i64>,
    ) -> Result<Event<'r>, FeatureError> {
        if !fields.is_record() {
            return Err(extract::ExtractError::NotARecord.into());
        }
        // A record laid out as the reader schema (one written with it, read in place) is read
        // by position.
        let positional = fields.layout() == Some(self.layout);
        fn place(f: &(String, usize), positional: bool) -> extract::Place<'_> {
            extract::Place {
                index: f.1,
                name: &f.0,
                positional,
            }
        }
        let at = |f| place(f, positional);
        let key = extract::text(fields, at(&self.key_field)).map_err(FeatureError::Key)?;
        let time =
            extract::time_ms(fields, at(&self.time_field)).map_err(FeatureError::EventTime)?;
        self.time_range.check(time, produced_at)?;
        let mut nums = Nums::new();
        for f in &self.num_fields {
            nums.push(extract::numeric(fields, at(f))?);
        }
        let mut cats = Cats::new();
        for f in &self.cat_fields {
            cats.push(extract::categorical(fields, at(f))?);
        }
        Ok(Event {
            key,
            time,
            nums,
            cats,
        })
    }
}

/// What the features need from one record, borrowing its key from the record where it can.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// The feature key.
    pub key: Cow<'a, str>,
    /// Event time, ms.
    pub time: i64,
    nums: Nums,
    cats: Cats,
}

impl Event<'_> {
    /// The event, owning its key.
    pub fn into_owned(self) -> Event<'static> {
        Event {
            key: Cow::Owned(self.key.into_owned()),
            time: self.time,
            nums: self.nums,
            cats: self.cats,
        }
    }
}

/// An event's numeric inputs, inline up to two.
type Nums = smallvec::SmallVec<[f64; 2]>;
/// An event's categorical inputs (hashes), inline up to six.
type Cats = smallvec::SmallVec<[u64; 6]>;

/// How the per-key maps hash (see Cargo.toml): fast, and seeded at random per map.
type KeyHashing = foldhash::fast::RandomState;

#[derive(Debug, Clone, PartialEq)]
struct Stored {
    time: i64,
    seq: u64,
    nums: Nums,
    cats: Cats,
}

#[derive(Debug, Default)]
struct KeyState {
    /// Sorted by (time, seq).
    events: VecDeque<Stored>,
    newest: i64,
    /// The windows' running aggregates, derived from `events`: none for a key with fewer than
    /// [`RUNNING_FROM`] events, nor after a rollback or restore (built again at its next
    /// event). Boxed, so a key without them is small (most keys of a card stream hold a few
    /// events).
    running: Option<Box<window::Running>>,
    /// Where the key's entry in the open undo level is: `(level, index)`, valid while `level`
    /// is [`FeatureState`]'s open one (so closing a level forgets every key's at once).
    undo_at: (u64, u32),
}

impl KeyState {
    /// Places `e` among the key's events and returns its features; on error the key is as it
    /// was. An event at or after the key's newest is appended and computed from the running
    /// aggregates; a late one (or one of a key with few events) is placed after every event
    /// with time <= its own (ties keep arrival order) and computed from its windows' events.
    fn place(&mut self, set: &FeatureSet, e: Stored) -> Result<Vec<f64>, FeatureError> {
        let plan = set.plan();
        // A key with few events is computed from them (as cheap, and nothing to keep); from
        // `RUNNING_FROM` events on it keeps running aggregates.
        if self.running.is_none() && self.events.len() >= RUNNING_FROM {
            self.running = Some(Box::new(window::Running::build(plan, &self.events)));
        }
        let t = e.time;
        let out = match self.running.as_deref_mut() {
            Some(running) if self.events.back().is_none_or(|b| b.time <= t) => {
                self.events.push_back(e);
                running.append(plan, &self.events);
                match newest_features(set, &self.events, running) {
                    Ok(out) => out,
                    Err(err) => {
                        self.events.pop_back();
                        self.running = None;
                        return Err(err);
                    }
                }
            }
            _ => {
                let pos = match self.events.back() {
                    Some(b) if b.time > t => self.events.partition_point(|x| x.time <= t),
                    _ => self.events.len(),
                };
                self.events.insert(pos, e);
                // Contiguous, so its windows are slices (a short key's deque mostly is already).
                let out = compute(set, self.events.make_contiguous(), pos).inspect_err(|_| {
                    self.events.remove(pos);
                })?;
                if let Some(running) = self.running.as_deref_mut() {
                    running.insert(plan, &self.events, pos, self.newest);
                }
                out
            }
        };
        self.newest = if self.events.len() == 1 {
            t
        } else {
            self.newest.max(t)
        };
        Ok(out)
    }

    /// Drops what no window will see again: the events outside the longest window of the
    /// newest, and the oldest over the cap (always keeping the newest). Returns them.
    fn trim(&mut self, set: &FeatureSet) -> smallvec::SmallVec<[Stored; 2]> {
        let horizon = self.newest.saturating_sub(set.max_window_ms);
        // Mostly none or one: a key's windows slide by an event or so per event.
        let mut trimmed = smallvec::SmallVec::new();
        while (self.events.len() > 1 && self.events.front().is_some_and(|e| e.time <= horizon))
            || self.events.len() > set.limits.max_events_per_key
        {
            if let Some(running) = self.running.as_deref_mut() {
                running.pop_front(set.plan(), &self.events[0]);
            }
            trimmed.extend(self.events.pop_front());
        }
        trimmed
    }
}

/// A copy with the same room to grow as the original (a derived clone would have none, and
/// the copy's next event would move its whole history).
impl Clone for KeyState {
    fn clone(&self) -> Self {
        let mut events = VecDeque::with_capacity(self.events.capacity());
        events.extend(self.events.iter().cloned());
        KeyState {
            events,
            newest: self.newest,
            running: self.running.clone(),
            undo_at: self.undo_at,
        }
    }
}

/// Equal when they hold the same events (the running aggregates are derived from them, and
/// the undo position is bookkeeping).
impl PartialEq for KeyState {
    fn eq(&self, other: &Self) -> bool {
        self.events == other.events && self.newest == other.newest
    }
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

/// A change of the open undo level, for the changelog: an event of the key at `entry` (its
/// index in the level) added (`put`) or removed (trimmed or evicted).
#[derive(Debug, Clone, Copy)]
struct Change {
    entry: u32,
    put: bool,
    time: i64,
    seq: u64,
}

/// A robust, never decreasing estimate of a partition's event time, which drives eviction: the
/// remedian (Rousseeuw & Bassett, 1990) of its event times with base [`CLOCK_BASE`] and two
/// levels. Each group of 15 consecutive event times gives its median; each 15 such medians give
/// their median, and the clock moves up to it. So the clock follows the bulk of the partition's
/// events, a group of 225 at a time, and cannot be moved by a single event, nor by any number of
/// outliers fewer than 64 (8 × 8) of 225 consecutive events. Before its first 225 events a
/// partition's clock is unset and nothing is evicted.
#[derive(Debug, Clone, Copy)]
pub struct EvictionClock {
    /// Event times of the group being filled.
    times: [i64; CLOCK_BASE],
    times_len: usize,
    /// Medians of the groups since the clock last moved.
    medians: [i64; CLOCK_BASE],
    medians_len: usize,
    /// The clock (`i64::MIN`: unset).
    now: i64,
}

/// Group size of the [`EvictionClock`]'s two levels.
pub const CLOCK_BASE: usize = 15;

impl Default for EvictionClock {
    fn default() -> Self {
        EvictionClock {
            times: [0; CLOCK_BASE],
            times_len: 0,
            medians: [0; CLOCK_BASE],
            medians_len: 0,
            now: i64::MIN,
        }
    }
}

/// Equal when they hold the same times (what lies past each level's length is not part of it).
impl PartialEq for EvictionClock {
    fn eq(&self, other: &Self) -> bool {
        self.now == other.now
            && self.times[..self.times_len] == other.times[..other.times_len]
            && self.medians[..self.medians_len] == other.medians[..other.medians_len]
    }
}

impl Eq for EvictionClock {}

impl EvictionClock {
    /// Takes one event time.
    fn observe(&mut self, t: i64) {
        self.times[self.times_len] = t;
        self.times_len += 1;
        if self.times_len < CLOCK_BASE {
            return;
        }
        self.times_len = 0;
        self.medians[self.medians_len] = median(&mut self.times);
        self.medians_len += 1;
        if self.medians_len < CLOCK_BASE {
            return;
        }
        self.medians_len = 0;
        self.now = self.now.max(median(&mut self.medians));
    }

    /// The clock, ms (`None` until the partition's first 225 events).
    pub fn now(&self) -> Option<i64> {
        (self.now != i64::MIN).then_some(self.now)
    }
}

fn median(values: &mut [i64; CLOCK_BASE]) -> i64 {
    values.sort_unstable();
    values[CLOCK_BASE / 2]
}

/// Feature state of one partition: every key's recent events, and an undo log of the keys
/// changed since the last [`FeatureState::checkpoint`], so an aborted transaction can take its
/// changes back ([`FeatureState::rollback`]) and a commit can changelog exactly those keys
/// ([`FeatureState::changelog`]).
///
/// The undo log has two levels, so the next cycle can be computed while the last one commits:
/// [`FeatureState::seal`] closes the level of a cycle whose changelog was sent, and a new one
/// opens for the next cycle; [`FeatureState::commit_sealed`] then forgets the sealed level, while
/// [`FeatureState::rollback`] takes both back and [`FeatureState::rollback_open`] only the
/// open one.
#[derive(Debug, Clone, Default)]
pub struct FeatureState {
    keys: HashMap<Key, KeyState, KeyHashing>,
    seq: u64,
    clock: EvictionClock,
    since_sweep: u64,
    /// The open undo level: each key changed since the last checkpoint (or seal), once, and
    /// how to take it back. A key finds its entry through [`KeyState::undo_at`], so an event
    /// looks up no map for it.
    undo: Vec<(Key, Undo)>,
    /// How many undo levels were closed: the open level is `level + 1`.
    level: u64,
    /// The keys evicted in the open level, and their entries: an evicted key that comes back
    /// in the same level goes on with its entry.
    evicted: HashMap<Key, u32, KeyHashing>,
    at_checkpoint: (u64, EvictionClock, u64),
    /// The open level's changes in order, for the changelog: written as a cycle goes by
    /// [`FeatureState::changelog_so_far`], the rest by [`FeatureState::changelog`].
    journal: Vec<Change>,
    /// Events with a seq below this have their record in the changelog: those of earlier
    /// levels, and the open level's written before (so removing one writes a tombstone).
    written_below: u64,
    /// The sealed level: the changes of a cycle whose commit is under way, relative to the
    /// checkpoint before it.
    sealed: Option<Box<Sealed>>,
    /// The next input offset of the last commit this state belongs to (`None`: none yet).
    committed_next: Option<i64>,
    /// During a restore, each key's events read so far, in seq order (the order a key's
    /// records are written in, so each is almost always appended).
    restoring: HashMap<Key, VecDeque<Stored>, KeyHashing>,
}

/// Keys with fewer events compute their window features from the events themselves; from
/// this many on they keep running aggregates (the same bits either way).
const RUNNING_FROM: usize = 16;

/// Events a partition's state takes between two sweeps for idle keys.
pub const SWEEP_EVERY: u64 = 10_000;

/// Equal when they hold the same keys, counters and undo levels (each level's entries in
/// any order); the level count and the evicted index are bookkeeping.
impl PartialEq for FeatureState {
    fn eq(&self, other: &Self) -> bool {
        self.keys == other.keys
            && self.seq == other.seq
            && self.clock == other.clock
            && self.since_sweep == other.since_sweep
            && same_undo(&self.undo, &other.undo)
            && self.at_checkpoint == other.at_checkpoint
            && self.sealed == other.sealed
            && self.committed_next == other.committed_next
            && self.restoring == other.restoring
    }
}

/// Whether two undo levels hold the same entries, in whatever order.
fn same_undo(a: &[(Key, Undo)], b: &[(Key, Undo)]) -> bool {
    let index: HashMap<&Key, &Undo> = b.iter().map(|(k, u)| (k, u)).collect();
    a.len() == b.len() && a.iter().all(|(k, u)| index.get(k) == Some(&u))
}

/// A sealed undo level (see [`FeatureState`]).
#[derive(Debug, Clone)]
struct Sealed {
    undo: Vec<(Key, Undo)>,
    at_checkpoint: (u64, EvictionClock, u64),
}

impl PartialEq for Sealed {
    fn eq(&self, other: &Self) -> bool {
        same_undo(&self.undo, &other.undo) && self.at_checkpoint == other.at_checkpoint
    }
}

impl FeatureState {
    /// Forgets the undo log, both levels: everything so far is committed.
    pub fn checkpoint(&mut self) {
        self.undo.clear();
        self.close_level();
        self.sealed = None;
        self.at_checkpoint = (self.seq, self.clock, self.since_sweep);
    }

    /// Closes the open undo level: its changes (their changelog sent) now await their commit,
    /// and later changes go to a new level. A state that was sealed already and not committed
    /// since is sealed anew with both levels' changes.
    pub fn seal(&mut self) {
        let undo = std::mem::take(&mut self.undo);
        self.close_level();
        let sealed = match self.sealed.take() {
            None => Sealed {
                undo,
                at_checkpoint: self.at_checkpoint,
            },
            Some(mut older) => {
                // Not expected (one commit is under way at a time), and kept correct anyway: the
                // newer changes of a key go after its older ones.
                let mut at: HashMap<Key, usize, KeyHashing> = older
                    .undo
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (k.clone(), i))
                    .collect();
                for (key, newer) in undo {
                    match at.get(&key).map(|&i| &mut older.undo[i].1) {
                        Some(u) => {
                            u.removed.extend(
                                newer
                                    .removed
                                    .into_iter()
                                    .filter(|e| e.seq < older.at_checkpoint.0),
                            );
                        }
                        None => {
                            let mut n = newer;
                            n.removed.retain(|e| e.seq < older.at_checkpoint.0);
                            at.insert(key.clone(), older.undo.len());
                            older.undo.push((key, n));
                        }
                    }
                }
                *older
            }
        };
        self.sealed = Some(Box::new(sealed));
        self.at_checkpoint = (self.seq, self.clock, self.since_sweep);
    }

    /// Everything so far is committed, together with the input offsets up to `next_offset`.
    pub fn commit(&mut self, next_offset: i64) {
        self.checkpoint();
        self.committed_next = Some(next_offset);
    }

    /// The sealed changes are committed (with the input offsets up to `next_offset`, when
    /// given); changes since the seal stay open. A state with no sealed level (one that began
    /// after the seal) has nothing committed.
    pub fn commit_sealed(&mut self, next_offset: Option<i64>) {
        if self.sealed.take().is_some() && next_offset.is_some() {
            self.committed_next = next_offset;
        }
    }

    /// Whether changes await a commit (a sealed level).
    pub fn sealed(&self) -> bool {
        self.sealed.is_some()
    }

    /// The next input offset of the commit this state belongs to, if any.
    pub fn committed_next(&self) -> Option<i64> {
        self.committed_next
    }

    /// The partition's eviction clock.
    pub fn clock(&self) -> &EvictionClock {
        &self.clock
    }

    /// Takes back every change since the last commit: the open level, then the sealed one.
    pub fn rollback(&mut self) {
        self.rollback_open();
        if let Some(sealed) = self.sealed.take() {
            let Sealed {
                undo,
                at_checkpoint,
            } = *sealed;
            self.undo = undo;
            self.at_checkpoint = at_checkpoint;
            self.rollback_open();
        }
    }

    /// Takes back the changes since the last seal (or checkpoint), keeping a sealed level.
    pub fn rollback_open(&mut self) {
        let checkpoint_seq = self.at_checkpoint.0;
        let undo = std::mem::take(&mut self.undo);
        // The counters first, so the new level's changelog starts at the checkpoint's seq.
        (self.seq, self.clock, self.since_sweep) = self.at_checkpoint;
        self.close_level();
        for (key, undo) in undo {
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
            state.running = None;
        }
    }

    /// Closes the open undo level's bookkeeping: every key's position in it is forgotten at
    /// once (its entries were taken or cleared by the caller).
    fn close_level(&mut self) {
        self.level += 1;
        self.evicted.clear();
        // The new level's changelog starts afresh: everything before was written (or taken
        // back).
        self.journal.clear();
        self.written_below = self.seq;
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
    pub fn update(&mut self, set: &FeatureSet, event: Event<'_>) -> Result<Vec<f64>, FeatureError> {
        let seq = self.seq;
        let Event {
            key,
            time: t,
            nums,
            cats,
        } = event;
        let name = key.as_bytes();
        // Looked up by a key where it is inline (compared as arrays), else by its bytes (a
        // longer key is copied only when it is new, to the map or to the undo level).
        let inline = Key::inline(name);
        let found = match &inline {
            Some(k) => self.keys.get_mut(k),
            None => self.keys.get_mut(name),
        };
        let mut fresh = None;
        let (state, existed) = match found {
            Some(s) => (s, true),
            None => (fresh.insert(KeyState::default()), false),
        };
        let newest_before = state.newest;
        let stored = Stored {
            time: t,
            seq,
            nums,
            cats,
        };
        let out = state.place(set, stored)?;
        self.seq += 1;
        let trimmed = state.trim(set);
        // The undo log: how to take the key back to the checkpoint, and what to changelog.
        let checkpoint_seq = self.at_checkpoint.0;
        let open = self.level + 1;
        let index = match state.undo_at {
            (level, i) if level == open => i as usize,
            // A key evicted in this level and back again: its entry says how it was.
            _ => match (!existed && !self.evicted.is_empty())
                .then(|| self.evicted.remove(name))
                .flatten()
            {
                Some(i) => i as usize,
                None => {
                    self.undo.push((
                        inline.clone().unwrap_or_else(|| Key::new(name)),
                        Undo {
                            existed,
                            newest: newest_before,
                            removed: Vec::new(),
                        },
                    ));
                    self.undo.len() - 1
                }
            },
        };
        state.undo_at = (open, index as u32);
        let entry = index as u32;
        self.journal.push(Change {
            entry,
            put: true,
            time: t,
            seq,
        });
        self.journal.extend(trimmed.iter().map(|e| Change {
            entry,
            put: false,
            time: e.time,
            seq: e.seq,
        }));
        let undo = &mut self.undo[index].1;
        undo.removed
            .extend(trimmed.into_iter().filter(|e| e.seq < checkpoint_seq));
        if let Some(s) = fresh {
            self.keys
                .insert(inline.unwrap_or_else(|| Key::new(name)), s);
        }
        self.clock.observe(t);
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY {
            self.sweep(set);
        }
        Ok(out)
    }

    /// Evicts the keys whose newest event time is more than `idle_key_ttl` behind the
    /// partition's eviction clock (none while the clock is unset).
    pub fn sweep(&mut self, set: &FeatureSet) {
        self.since_sweep = 0;
        let Some(now) = self.clock.now() else {
            return;
        };
        let cutoff = now.saturating_sub(set.idle_ms);
        let checkpoint_seq = self.at_checkpoint.0;
        let open = self.level + 1;
        let (undo, evicted, journal) = (&mut self.undo, &mut self.evicted, &mut self.journal);
        self.keys.retain(|key, k| {
            let keep = k.newest >= cutoff;
            if !keep {
                let index = match k.undo_at {
                    (level, i) if level == open => i as usize,
                    _ => {
                        undo.push((
                            key.clone(),
                            Undo {
                                existed: true,
                                newest: k.newest,
                                removed: Vec::new(),
                            },
                        ));
                        undo.len() - 1
                    }
                };
                evicted.insert(key.clone(), index as u32);
                let events = std::mem::take(&mut k.events);
                journal.extend(events.iter().map(|e| Change {
                    entry: index as u32,
                    put: false,
                    time: e.time,
                    seq: e.seq,
                }));
                undo[index]
                    .1
                    .removed
                    .extend(events.into_iter().filter(|e| e.seq < checkpoint_seq));
            }
            keep
        });
    }
}

/// The features of the event at `pos`, from the events of its windows.
fn compute(set: &FeatureSet, events: &[Stored], pos: usize) -> Result<Vec<f64>, FeatureError> {
    let t = events[pos].time;
    // Each window is events[start..=pos] with time > t - window. Events are sorted by time and
    // none after `pos` is older than `t`, so a binary search finds its start.
    let starts: smallvec::SmallVec<[usize; 8]> = set
        .windows
        .iter()
        .map(|w| {
            let from = t.saturating_sub(*w);
            events.partition_point(|e| e.time <= from).min(pos)
        })
        .collect();
    let mut out = Vec::with_capacity(set.specs.len());
    window::with_scratch(|scratch| {
        for spec in &set.specs {
            let x = match spec.aggregation {
                Aggregation::Value
                | Aggregation::Equals
                | Aggregation::Differs
                | Aggregation::TimeSinceLast => own(
                    spec,
                    &events[pos],
                    pos.checked_sub(1).map(|p| &events[p]),
                    set.idle_ms,
                ),
                _ => {
                    let at = At {
                        events,
                        start: starts[spec.window],
                        pos,
                    };
                    window::from_scratch(spec, &at, scratch)
                }
            };
            if !x.is_finite() {
                return Err(FeatureError::NotFinite(spec.name.clone()));
            }
            out.push(x);
        }
        Ok(())
    })?;
    Ok(out)
}

/// The features of the key's newest event, just appended: windowed ones from the running
/// aggregates, O(1) each however many events the key holds.
fn newest_features(
    set: &FeatureSet,
    events: &VecDeque<Stored>,
    running: &mut window::Running,
) -> Result<Vec<f64>, FeatureError> {
    let pos = events.len() - 1;
    let mut out = Vec::with_capacity(set.specs.len());
    for spec in &set.specs {
        let x = if spec.aggregation.windowed() {
            running.feature(spec, events)
        } else {
            own(
                spec,
                &events[pos],
                pos.checked_sub(1).map(|p| &events[p]),
                set.idle_ms,
            )
        };
        if !x.is_finite() {
            return Err(FeatureError::NotFinite(spec.name.clone()));
        }
        out.push(x);
    }
    Ok(out)
}

/// An event in its key's history (contiguous), and the start of one of its windows.
struct At<'a> {
    events: &'a [Stored],
    start: usize,
    pos: usize,
}

impl At<'_> {
    fn current(&self) -> &Stored {
        &self.events[self.pos]
    }

    fn window(&self) -> std::slice::Iter<'_, Stored> {
        self.events[self.start..=self.pos].iter()
    }
}

impl Spec {
    #[inline]
    fn num(&self, e: &Stored) -> f64 {
        match self.source {
            Source::Num(i) => e.nums[i],
            _ => 0.0,
        }
    }

    #[inline]
    fn cat(&self, e: &Stored) -> u64 {
        match self.source {
            Source::Cat(i) => e.cats[i],
            _ => 0,
        }
    }
}

/// A feature of the event itself (and its predecessor).
#[inline]
fn own(spec: &Spec, current: &Stored, prev: Option<&Stored>, idle_ms: i64) -> f64 {
    match spec.aggregation {
        Aggregation::Value => spec.num(current),
        Aggregation::Equals => {
            let eq = match spec.source {
                Source::Num(_) => spec.equals_num == Some(spec.num(current)),
                _ => spec.equals_cat == Some(spec.cat(current)),
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
        // TimeSinceLast
        _ => match prev {
            Some(prev) if current.time.saturating_sub(prev.time) <= idle_ms => {
                current.time.saturating_sub(prev.time) as f64 / 1000.0
            }
            _ => spec.default,
        },
    }
}

/// How many distinct values `values` (`n` of them) holds.
#[inline]
fn distinct(values: impl Iterator<Item = u64>, n: usize) -> f64 {
    if n <= SMALL_WINDOW {
        // A few values: count those not seen earlier in the window, on the stack.
        let mut seen = [0u64; SMALL_WINDOW];
        let mut k = 0;
        for v in values {
            if !seen[..k].contains(&v) {
                seen[k] = v;
                k += 1;
            }
        }
        return k as f64;
    }
    DISTINCT.with(|scratch| {
        // Sorting a reused buffer: no allocation and no hashing per event.
        let mut values_buf = scratch.borrow_mut();
        values_buf.clear();
        values_buf.extend(values);
        values_buf.sort_unstable();
        values_buf.dedup();
        values_buf.len() as f64
    })
}

/// Windows up to this many events count distinct values by comparing each with those before it.
const SMALL_WINDOW: usize = 16;

thread_local! {
    /// Scratch space for distinct counts, one per thread.
    static DISTINCT: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests;
