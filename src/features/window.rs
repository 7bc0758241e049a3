//! Running window aggregates of one key, so that an event costs O(1) amortised per feature
//! however many events its key holds.
//!
//! A key's events are sorted by event time, and each of its windows (one per distinct window
//! length) is a suffix of them: the events with time after `newest - length`. When an event
//! newer than the key's newest arrives it is appended, each window's front moves past the
//! events that fell out of it (giving them back to the aggregates), and the event enters
//! every window. Per (window, field) a key keeps what its features need:
//! - an exact sum, and an exact sum of squares for `std` ([`ExactSum`]);
//! - a monotonic queue for `min` and `max` (values stored negated for `max`): the window's
//!   later values that are smaller than everything after them, so the minimum is the front;
//! - for `distinct_count` and `is_new`, per categorical field, where each value last occurred
//!   among the key's events, and per event a bit for each field of whether it is that last
//!   occurrence. A window's distinct count is the number of last occurrences in it (every
//!   window ends at the newest event), so it changes by a bit test when an event leaves the
//!   window and by one lookup per field when an event arrives, however many windows count the
//!   field.
//!
//! A late event is computed from its own window directly ([`from_scratch`]) and then enters
//! the windows whose span it falls in (a monotonic queue is rebuilt, since the event lands in
//! the middle, and the last occurrences are found again). A key with fewer than 16 events
//! keeps no aggregates: its events are computed the same way. The aggregates are a cache of
//! the events: a restored or rolled-back key drops them, and they are built from its events
//! again at its next event.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use super::exact::ExactSum;
use super::{At, FeatureSet, Source, Spec, Stored};
use crate::topology::config::Aggregation;

/// The running aggregates a feature set keeps per window, compiled once.
#[derive(Debug, Clone, Default)]
pub(super) struct Plan {
    windows: Vec<WindowPlan>,
    sums: usize,
    squares: usize,
    mins: usize,
    counts: usize,
    /// The categorical fields whose last occurrences are kept, each once: `counts` slots
    /// refer to them by their index here.
    counted_fields: Vec<usize>,
}

/// One window's aggregates: `(slot, field)` pairs, the slot indexing the key's flat list of
/// that kind of aggregate.
#[derive(Debug, Clone, Default)]
struct WindowPlan {
    length_ms: i64,
    /// Whether any feature reads this window.
    used: bool,
    sums: Vec<(usize, usize)>,
    squares: Vec<(usize, usize)>,
    /// Minima of a field (`(field, false)`) or maxima (`(field, true)`, stored negated).
    mins: Vec<(usize, (usize, bool))>,
    /// Distinct counts and `is_new` of a field: `(slot, index in Plan::counted_fields)`.
    counts: Vec<(usize, usize)>,
}

/// Where a feature's aggregates are in a key's [`Running`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Slots {
    /// Sum, minimum/maximum or counted values, by the aggregation.
    pub(super) main: usize,
    /// The sum of squares, for `std`.
    pub(super) squares: usize,
}

fn intern<T: PartialEq>(list: &mut Vec<(usize, T)>, next: &mut usize, item: T) -> usize {
    if let Some((slot, _)) = list.iter().find(|(_, x)| *x == item) {
        return *slot;
    }
    list.push((*next, item));
    *next += 1;
    *next - 1
}

impl Plan {
    /// A plan for windows of these lengths (ms).
    pub(super) fn new(lengths: &[i64]) -> Self {
        Plan {
            windows: lengths
                .iter()
                .map(|&length_ms| WindowPlan {
                    length_ms,
                    ..WindowPlan::default()
                })
                .collect(),
            ..Plan::default()
        }
    }

    /// Registers what a windowed feature over `window` reads; returns where it is kept.
    pub(super) fn add(&mut self, aggregation: Aggregation, window: usize, source: Source) -> Slots {
        let w = &mut self.windows[window];
        w.used = true;
        let mut slots = Slots::default();
        let field = match source {
            Source::Num(i) | Source::Cat(i) => i,
            Source::None => return slots,
        };
        match aggregation {
            Aggregation::Sum | Aggregation::Mean | Aggregation::RatioToMean => {
                slots.main = intern(&mut w.sums, &mut self.sums, field);
            }
            Aggregation::Std => {
                slots.main = intern(&mut w.sums, &mut self.sums, field);
                slots.squares = intern(&mut w.squares, &mut self.squares, field);
            }
            Aggregation::Min | Aggregation::Max => {
                let negate = aggregation == Aggregation::Max;
                slots.main = intern(&mut w.mins, &mut self.mins, (field, negate));
            }
            Aggregation::DistinctCount | Aggregation::IsNew => {
                let j = match self.counted_fields.iter().position(|&f| f == field) {
                    Some(j) => j,
                    None => {
                        self.counted_fields.push(field);
                        self.counted_fields.len() - 1
                    }
                };
                slots.main = intern(&mut w.counts, &mut self.counts, j);
            }
            _ => {}
        }
        slots
    }
}

/// A key's running aggregates; see the module documentation. Built from its events
/// ([`Running::build`]) and kept in step with them.
#[derive(Debug, Clone)]
pub(super) struct Running {
    /// Per window, the index of its first event.
    starts: Vec<usize>,
    sums: Vec<ExactSum>,
    squares: Vec<ExactSum>,
    mins: Vec<Monotonic>,
    /// Per counted field, each value's last occurrence among the key's events, by ordinal (the
    /// key's events are numbered as they are appended: `first` is the front's).
    last: Vec<LastSeen>,
    /// Per event, front first: one bit per counted field, set where the event is its value's
    /// last occurrence.
    latest: LatestBits,
    first: u64,
    /// Per counted slot: the number of its field's last occurrences in its window, which is
    /// the window's distinct count.
    distinct: Vec<u32>,
    /// Per counted slot: whether the newest event's value occurs earlier in its window.
    seen: Vec<bool>,
}

/// One bit per (event, counted field), events front first: a ring of 64-bit words, `words`
/// per event.
#[derive(Debug, Clone)]
struct LatestBits {
    bits: VecDeque<u64>,
    words: usize,
}

impl LatestBits {
    fn new(fields: usize) -> Self {
        LatestBits {
            bits: VecDeque::new(),
            words: fields.div_ceil(64),
        }
    }

    #[inline]
    fn get(&self, event: usize, field: usize) -> bool {
        self.bits
            .get(event * self.words + field / 64)
            .is_some_and(|w| (w >> (field % 64)) & 1 == 1)
    }

    #[inline]
    fn set(&mut self, event: usize, field: usize, on: bool) {
        if let Some(w) = self.bits.get_mut(event * self.words + field / 64) {
            if on {
                *w |= 1 << (field % 64);
            } else {
                *w &= !(1 << (field % 64));
            }
        }
    }

    /// A new last event, the last occurrence of each of its `fields` values.
    #[inline]
    fn push_all(&mut self, fields: usize) {
        for w in 0..self.words {
            let n = fields.saturating_sub(w * 64).min(64);
            self.bits
                .push_back(if n == 64 { u64::MAX } else { (1 << n) - 1 });
        }
    }

    /// The first event is gone.
    #[inline]
    fn pop_front(&mut self) {
        for _ in 0..self.words {
            self.bits.pop_front();
        }
    }
}

/// The smallest values of a window's suffixes, in window order: `(seq, value)`.
#[derive(Debug, Clone, Default)]
struct Monotonic(VecDeque<(u64, f64)>);

impl Monotonic {
    #[inline]
    fn push(&mut self, seq: u64, x: f64) {
        while self.0.back().is_some_and(|&(_, b)| b >= x) {
            self.0.pop_back();
        }
        self.0.push_back((seq, x));
    }

    /// The window's first event, `seq`, leaves it.
    #[inline]
    fn leave(&mut self, seq: u64) {
        if self.0.front().is_some_and(|&(s, _)| s == seq) {
            self.0.pop_front();
        }
    }

    fn min(&self) -> f64 {
        self.0.front().map_or(f64::INFINITY, |&(_, x)| x)
    }
}

/// Each value's last occurrence (an event's ordinal).
type LastSeen = HashMap<u64, u64, BuildHasherDefault<Mix>>;

/// Categories are already XXH3 hashes: a multiply spreads them over a table's buckets.
#[derive(Default)]
struct Mix(u64);

impl Hasher for Mix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (x ^ (x >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// `x * x` exactly, as two floats (the product and its rounding error), where it is finite and
/// not tiny.
#[inline]
fn square(x: f64) -> (f64, f64) {
    let p = x * x;
    (p, x.mul_add(x, -p))
}

/// Adds `x * x` to `sum`, exactly.
#[inline]
fn add_square(sum: &mut ExactSum, x: f64) {
    let (p, r) = square(x);
    sum.add(p);
    sum.add(r);
}

/// What a monotonic queue holds for `x`: maxima are kept as minima of the negated values.
#[inline]
fn queued(x: f64, negate: bool) -> f64 {
    if negate { -x } else { x }
}

impl Running {
    /// Empty aggregates for `plan`.
    fn new(plan: &Plan) -> Self {
        Running {
            starts: vec![0; plan.windows.len()],
            sums: vec![ExactSum::default(); plan.sums],
            squares: vec![ExactSum::default(); plan.squares],
            mins: vec![Monotonic::default(); plan.mins],
            last: vec![LastSeen::default(); plan.counted_fields.len()],
            latest: LatestBits::new(plan.counted_fields.len()),
            first: 0,
            distinct: vec![0; plan.counts],
            seen: vec![false; plan.counts],
        }
    }

    /// The aggregates of a key's events.
    pub(super) fn build(plan: &Plan, events: &VecDeque<Stored>) -> Self {
        let mut running = Running::new(plan);
        let Some(newest) = events.back().map(|e| e.time) else {
            return running;
        };
        for (w, window) in plan.windows.iter().enumerate() {
            if !window.used {
                continue;
            }
            let from = newest.saturating_sub(window.length_ms);
            // The newest event is always in its own windows (a zero-length one holds only it).
            let start = events
                .partition_point(|e| e.time <= from)
                .min(events.len() - 1);
            running.starts[w] = start;
            for e in events.range(start..) {
                running.enter(window, e);
            }
        }
        running.recount(plan, events);
        running
    }

    /// Finds every counted value's last occurrence again, and each window's distinct counts.
    fn recount(&mut self, plan: &Plan, events: &VecDeque<Stored>) {
        let fields = &plan.counted_fields;
        if fields.is_empty() {
            return;
        }
        self.first = 0;
        self.latest.bits.clear();
        self.latest.bits.resize(events.len() * self.latest.words, 0);
        for last in &mut self.last {
            last.clear();
        }
        for (i, e) in events.iter().enumerate().rev() {
            for (j, &field) in fields.iter().enumerate() {
                if let Some(last) = self.last.get_mut(j)
                    && let Entry::Vacant(v) = last.entry(e.cats[field])
                {
                    v.insert(i as u64);
                    self.latest.set(i, j, true);
                }
            }
        }
        for (w, window) in plan.windows.iter().enumerate() {
            for &(slot, j) in &window.counts {
                self.distinct[slot] = (self.starts[w]..events.len())
                    .filter(|&i| self.latest.get(i, j))
                    .count() as u32;
            }
        }
    }

    /// `e` enters the window's sums and queues, at its end (its counted values are the
    /// caller's).
    #[inline]
    fn enter(&mut self, window: &WindowPlan, e: &Stored) {
        self.sum_in(window, e);
        for &(slot, (field, negate)) in &window.mins {
            self.mins[slot].push(e.seq, queued(e.nums[field], negate));
        }
    }

    /// `e` enters the window's sums (its queues and counted values are the caller's).
    #[inline]
    fn sum_in(&mut self, window: &WindowPlan, e: &Stored) {
        for &(slot, field) in &window.sums {
            self.sums[slot].add(e.nums[field]);
        }
        for &(slot, field) in &window.squares {
            add_square(&mut self.squares[slot], e.nums[field]);
        }
    }

    /// `e`, the key's event at `pos`, leaves the window (from its front).
    #[inline]
    fn leave(&mut self, window: &WindowPlan, e: &Stored, pos: usize) {
        for &(slot, field) in &window.sums {
            self.sums[slot].sub(e.nums[field]);
        }
        for &(slot, field) in &window.squares {
            let (p, r) = square(e.nums[field]);
            self.squares[slot].sub(p);
            self.squares[slot].sub(r);
        }
        for &(slot, _) in &window.mins {
            self.mins[slot].leave(e.seq);
        }
        for &(slot, j) in &window.counts {
            if self.latest.get(pos, j) {
                self.distinct[slot] -= 1;
            }
        }
    }

    /// The key's newest event was just appended (its time at or after every other's): the
    /// windows move to end at it, and it enters them.
    pub(super) fn append(&mut self, plan: &Plan, events: &VecDeque<Stored>) {
        let last = events.len() - 1;
        let newest = &events[last];
        // The windows move to end at the newest: the events that fell out of them leave.
        for (w, window) in plan.windows.iter().enumerate() {
            if !window.used {
                continue;
            }
            let from = newest.time.saturating_sub(window.length_ms);
            let mut start = self.starts[w];
            while start < last && events[start].time <= from {
                self.leave(window, &events[start], start);
                start += 1;
            }
            self.starts[w] = start;
        }
        // The newest is the last occurrence of each of its values; where a value occurred
        // before, that occurrence no longer is.
        let fields = &plan.counted_fields;
        let mut before: smallvec::SmallVec<[Option<usize>; 8]> = smallvec::SmallVec::new();
        if !fields.is_empty() {
            let ordinal = self.first + last as u64;
            for (j, &field) in fields.iter().enumerate() {
                let prev = self
                    .last
                    .get_mut(j)
                    .and_then(|m| m.insert(newest.cats[field], ordinal))
                    .map(|p| p.saturating_sub(self.first) as usize);
                if let Some(p) = prev {
                    self.latest.set(p, j, false);
                }
                before.push(prev);
            }
            self.latest.push_all(fields.len());
        }
        for (w, window) in plan.windows.iter().enumerate() {
            if !window.used {
                continue;
            }
            self.enter(window, newest);
            for &(slot, j) in &window.counts {
                // Seen in the window: its last occurrence there is replaced by the newest.
                let seen = before
                    .get(j)
                    .copied()
                    .flatten()
                    .is_some_and(|p| p >= self.starts[w]);
                self.seen[slot] = seen;
                if !seen {
                    self.distinct[slot] += 1;
                }
            }
        }
    }

    /// A late event was inserted at `pos` (its key's newest time, `newest`, unchanged): it
    /// enters the windows whose span it falls in.
    pub(super) fn insert(
        &mut self,
        plan: &Plan,
        events: &VecDeque<Stored>,
        pos: usize,
        newest: i64,
    ) {
        let e = &events[pos];
        for (w, window) in plan.windows.iter().enumerate() {
            if !window.used {
                continue;
            }
            if e.time <= newest.saturating_sub(window.length_ms) {
                // Before the window: it sorts before the window's first event.
                self.starts[w] += 1;
                continue;
            }
            self.sum_in(window, e);
            // In the middle of the window: its queues are rebuilt.
            for &(slot, (field, negate)) in &window.mins {
                let queue = &mut self.mins[slot];
                queue.0.clear();
                for e in events.range(self.starts[w]..) {
                    queue.push(e.seq, queued(e.nums[field], negate));
                }
            }
        }
        // The events after it moved: their last occurrences are found again.
        self.recount(plan, events);
    }

    /// The key's first event is about to be dropped (trimmed).
    pub(super) fn pop_front(&mut self, plan: &Plan, first: &Stored) {
        for (w, window) in plan.windows.iter().enumerate() {
            if !window.used {
                continue;
            }
            if self.starts[w] == 0 {
                self.leave(window, first, 0);
            } else {
                self.starts[w] -= 1;
            }
        }
        if !plan.counted_fields.is_empty() {
            // Its values that no later event has are no longer held.
            for (j, &field) in plan.counted_fields.iter().enumerate() {
                if self.latest.get(0, j)
                    && let Some(last) = self.last.get_mut(j)
                {
                    last.remove(&first.cats[field]);
                }
            }
            self.latest.pop_front();
            self.first += 1;
        }
    }

    /// A windowed feature of the key's newest event, from the running aggregates.
    #[inline]
    pub(super) fn feature(&mut self, spec: &Spec, events: &VecDeque<Stored>) -> f64 {
        let n = (events.len() - self.starts[spec.window]) as f64;
        let slots = spec.slots;
        let current = &events[events.len() - 1];
        match spec.aggregation {
            Aggregation::Count => n,
            Aggregation::Sum => self.sums[slots.main].value(),
            Aggregation::Mean => self.sums[slots.main].value() / n,
            Aggregation::Std => spread(
                self.sums[slots.main].value(),
                self.squares[slots.squares].value(),
                n,
            ),
            Aggregation::Min => self.mins[slots.main].min(),
            Aggregation::Max => -self.mins[slots.main].min(),
            Aggregation::DistinctCount => f64::from(self.distinct[slots.main]),
            Aggregation::IsNew => f64::from(u8::from(!self.seen[slots.main])),
            _ => ratio(
                spec.num(current),
                self.sums[slots.main].value() / n,
                spec.default,
            ),
        }
    }
}

/// Population standard deviation from the exact sum and sum of squares of `n` values (each
/// rounded once): `sqrt(E[x²] - E[x]²)`, and 0 where that difference is within the rounding
/// of `E[x²]` (so a window of equal values has a spread of exactly 0).
#[inline]
pub(super) fn spread(sum: f64, squares: f64, n: f64) -> f64 {
    let mean = sum / n;
    let second = squares / n;
    let variance = second - mean * mean;
    if variance <= second * (8.0 * f64::EPSILON) {
        // Not finite stays not finite (an overflowed square).
        if variance.is_finite() { 0.0 } else { variance }
    } else {
        variance.sqrt()
    }
}

/// The event's value over the window's mean; `default` where the mean is 0.
#[inline]
pub(super) fn ratio(x: f64, mean: f64, default: f64) -> f64 {
    // A mean of 0 (a card's first payment is a $0 verification): undefined.
    if mean == 0.0 { default } else { x / mean }
}

/// Sums for [`from_scratch`] (a sum and a sum of squares), reused so a sum allocates nothing
/// after the first.
pub(super) type Scratch = (ExactSum, ExactSum);

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Runs `f` with this thread's [`Scratch`].
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|scratch| f(&mut scratch.borrow_mut()))
}

/// A windowed feature of the event at `at.pos`, computed from the events of its window
/// (`at.start..=at.pos`): what the running aggregates give, for a late event or a key with
/// few events.
pub(super) fn from_scratch(spec: &Spec, at: &At<'_>, scratch: &mut Scratch) -> f64 {
    let (s, squares) = scratch;
    let num = |e: &Stored| spec.num(e);
    let n = (at.pos + 1 - at.start) as f64;
    let mut sum = || exact_sum(at.window().map(num), s);
    match spec.aggregation {
        Aggregation::Count => n,
        Aggregation::Sum => sum(),
        Aggregation::Mean => sum() / n,
        Aggregation::Std => {
            // Squares of integers below 2^26 are exact integers below 2^52.
            let small = at
                .window()
                .all(|e| integral(num(e)) && num(e).abs() < 67_108_864.0);
            let plain = at.window().map(|e| num(e) * num(e));
            let sq = match plain_integer_sum(plain).filter(|_| small) {
                Some(x) => x,
                None => {
                    squares.clear();
                    at.window().for_each(|e| add_square(squares, num(e)));
                    squares.value()
                }
            };
            spread(sum(), sq, n)
        }
        Aggregation::Min => at.window().map(num).fold(f64::INFINITY, min_later),
        Aggregation::Max => -at.window().map(|e| -num(e)).fold(f64::INFINITY, min_later),
        Aggregation::DistinctCount => {
            super::distinct(at.window().map(|e| spec.cat(e)), at.pos + 1 - at.start)
        }
        Aggregation::IsNew => {
            let v = spec.cat(at.current());
            let seen = at
                .window()
                .take(at.pos - at.start)
                .any(|e| spec.cat(e) == v);
            f64::from(u8::from(!seen))
        }
        _ => ratio(num(at.current()), sum() / n, spec.default),
    }
}

/// The exact sum of `xs` rounded once, as [`ExactSum`] gives it: by plain addition where that
/// is exact, else with `scratch`.
fn exact_sum(xs: impl Iterator<Item = f64> + Clone, scratch: &mut ExactSum) -> f64 {
    if let Some(s) = plain_integer_sum(xs.clone()) {
        return s;
    }
    scratch.clear();
    xs.for_each(|x| scratch.add(x));
    scratch.value()
}

/// The sum of `xs` by plain addition when every value and every partial sum is an integer
/// below 2^53 in magnitude (then every addition is exact: amounts in minor units), else
/// `None`. A zero sum is `+0.0`, as [`ExactSum`] gives it.
#[inline]
fn plain_integer_sum(xs: impl Iterator<Item = f64>) -> Option<f64> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    let mut s = 0.0f64;
    for x in xs {
        s += x;
        // A rounded partial sum below 2^53 means the true one was at most 2^53: exact.
        if !integral(x) || s.abs() >= EXACT {
            return None;
        }
    }
    Some(if s == 0.0 { 0.0 } else { s })
}

/// Whether `x` is an integer, for `|x| < 2^63` (from there on it may say no, and every caller
/// refuses such values anyway). A conversion, where `fract` calls libm's `trunc` on x86-64 without
/// SSE 4.1.
#[inline]
fn integral(x: f64) -> bool {
    x == (x as i64) as f64
}

/// The smaller, the later one where they are equal (as the monotonic queue keeps): so `-0.0`
/// and `0.0` come out the same either way.
#[inline]
fn min_later(a: f64, b: f64) -> f64 {
    if b <= a { b } else { a }
}

impl FeatureSet {
    pub(super) fn plan(&self) -> &Plan {
        &self.plan
    }
}
