//! The changelog form of feature state: what the pipeline's publish step writes to the
//! compacted changelog topic in each transaction, and what [`crate::changelog::Restorer`]
//! reads back on partition assignment.
//!
//! **One record per retained event**, so what a commit writes does not grow with a key's
//! history: the events the cycle added (key: the feature key's UTF-8 bytes, `0xFF`, the event's
//! sequence number as 8 big-endian bytes; value: its time and the values the features read) and
//! a tombstone for each event it dropped (trimmed out of the longest window or over the cap, or
//! evicted with its idle key). Compaction keeps one record per live event, so the topic stays
//! bounded by the live state; a restore gathers each key's events and sorts them by (time,
//! sequence), which is the order they had. One partition record per commit (key
//! [`PARTITION_KEY`]) carries the next input offset the state belongs to and the partition's
//! counters. Restored state is equal, field for field, to the state that was committed, so a
//! restarted processor computes the same features the uninterrupted one would have.
//!
//! Values start with a format version and a fingerprint of the feature set's inputs; state
//! written by a topology that reads different fields, or by another version of the format, is
//! refused record by record instead of misread. Numbers are little-endian; floats keep their
//! exact bits; categories are their XXH3-64 hashes ([`super::extract::hash_str`]).
//!
//! Version 3 (this one): one record per event. Version 2 wrote each changed key's whole state
//! under the key itself, and version 1 hashed categories with std's `DefaultHasher`; their
//! records are refused (the keys they held start afresh).

use std::collections::VecDeque;

use super::{CLOCK_BASE, EvictionClock, FeatureSet, FeatureState, Key, KeyState, Stored};

/// Changelog key of a partition's own record. `0xFF` never occurs in UTF-8.
pub const PARTITION_KEY: &[u8] = b"\xFFpartition";

const VERSION: u8 = 3;

/// Separates the feature key from the event's sequence number in an event record's key.
/// `0xFF` never occurs in UTF-8.
const SEPARATOR: u8 = 0xFF;

/// Why a changelog record cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The record ends early or has bytes left over.
    #[error("truncated or malformed changelog value ({0})")]
    Malformed(&'static str),
    /// Written by another version of the format.
    #[error("changelog format version {0}, expected {VERSION}")]
    Version(u8),
    /// Written by a topology whose features read other fields.
    #[error(
        "changelog written for other feature inputs (fingerprint {found:016x}, expected {expected:016x})"
    )]
    Fingerprint {
        /// In the record.
        found: u64,
        /// Of this topology.
        expected: u64,
    },
    /// The key is not a feature key's UTF-8, `0xFF` and 8 bytes (nor the partition record).
    #[error("changelog key is not an event key (UTF-8 feature key, 0xFF, 8-byte sequence)")]
    Key,
}

/// What a partition record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMark {
    /// The next input offset to read: the state includes every record before it.
    pub next_offset: i64,
}

impl FeatureSet {
    /// A fingerprint of what the stored events hold: the numeric and categorical input fields,
    /// in order. Stable across runs and builds (FNV-1a, not the std hasher).
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for (name, _) in &self.num_fields {
            eat(b"n:");
            eat(name.as_bytes());
            eat(b"\0");
        }
        for (name, _) in &self.cat_fields {
            eat(b"c:");
            eat(name.as_bytes());
            eat(b"\0");
        }
        h
    }
}

/// Where the event `(time, seq)` is among `events` (sorted by time and seq), if there: the last
/// [`NEWEST`] looked at from the back, then a binary search.
fn find_event(events: &VecDeque<Stored>, time: i64, seq: u64) -> Option<usize> {
    const NEWEST: usize = 8;
    let len = events.len();
    for i in (len.saturating_sub(NEWEST)..len).rev() {
        let e = events.get(i)?;
        match (e.time, e.seq).cmp(&(time, seq)) {
            std::cmp::Ordering::Equal => return Some(i),
            std::cmp::Ordering::Less => return None,
            std::cmp::Ordering::Greater => {}
        }
    }
    events
        .binary_search_by(|e| (e.time, e.seq).cmp(&(time, seq)))
        .ok()
}

impl FeatureState {
    /// Calls `emit(key, value)` for every change of the open level not written yet (see
    /// [`FeatureState::changelog_so_far`]), then once for the partition record with
    /// `next_offset`. Returns how many records were emitted.
    pub fn changelog<E>(
        &mut self,
        set: &FeatureSet,
        next_offset: i64,
        mut emit: impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let n = self.changelog_so_far(set, &mut emit)?;
        let mut buf = Vec::with_capacity(64);
        header(&mut buf, set.fingerprint());
        buf.extend_from_slice(&next_offset.to_le_bytes());
        buf.extend_from_slice(&self.seq.to_le_bytes());
        buf.extend_from_slice(&self.since_sweep.to_le_bytes());
        encode_clock(&mut buf, &self.clock);
        emit(PARTITION_KEY, Some(&buf))?;
        Ok(n + 1)
    }

    /// Calls `emit(key, value)` for each change of the open level since the last call (or
    /// since the level opened), in order: a record for each event added and still held, a
    /// tombstone (value `None`) for each event removed whose record was written before (in
    /// an earlier level or call). An event added and removed between two calls is not
    /// written at all. So a cycle's changelog can be written as the cycle goes, in its
    /// transaction, and restores the same state as one written at its end. Returns how many
    /// records were emitted.
    pub fn changelog_so_far<E>(
        &mut self,
        set: &FeatureSet,
        mut emit: impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let fingerprint = set.fingerprint();
        let below = self.written_below;
        let mut record_key = Vec::with_capacity(64);
        let mut buf = Vec::with_capacity(128);
        let mut n = 0;
        for c in &self.journal {
            let Some((key, _)) = self.undo.get(c.entry as usize) else {
                continue;
            };
            if c.put {
                // Almost always among the key's newest few events (a key takes an event or so
                // a cycle), so looked for from the back (a binary search would touch a cache
                // line per step of a long history); else searched for. Gone again already (or
                // the key evicted): never written, nothing to take back.
                let Some(event) = self.keys.get(key).and_then(|state| {
                    find_event(&state.events, c.time, c.seq).map(|i| &state.events[i])
                }) else {
                    continue;
                };
                event_key(&mut record_key, key.as_bytes(), c.seq);
                buf.clear();
                encode_event(&mut buf, fingerprint, event);
                emit(&record_key, Some(&buf))?;
            } else if c.seq < below {
                event_key(&mut record_key, key.as_bytes(), c.seq);
                emit(&record_key, None)?;
            } else {
                continue;
            }
            n += 1;
        }
        self.journal.clear();
        self.written_below = self.seq;
        Ok(n)
    }

    /// Applies one changelog record, read in log order. Returns the partition mark when the
    /// record is the partition record. Call [`FeatureState::restored`] when done.
    pub fn restore_record(
        &mut self,
        set: &FeatureSet,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<PartitionMark>, CodecError> {
        let fingerprint = set.fingerprint();
        if key == PARTITION_KEY {
            let Some(value) = value else {
                return Ok(None);
            };
            let mut r = Reader::new(value, fingerprint)?;
            let next_offset = r.i64()?;
            let seq = r.u64()?;
            let since_sweep = r.u64()?;
            let clock = decode_clock(&mut r)?;
            r.end()?;
            (self.seq, self.since_sweep, self.clock) = (seq, since_sweep, clock);
            self.committed_next = Some(next_offset);
            return Ok(Some(PartitionMark { next_offset }));
        }
        let (feature_key, seq) = split_event_key(key, value)?;
        match value {
            None => {
                if let Some(events) = self.restoring.get_mut(feature_key.as_bytes())
                    && let Ok(i) = events.binary_search_by_key(&seq, |e| e.seq)
                {
                    events.remove(i);
                }
            }
            Some(value) => {
                let event = decode_event(value, fingerprint, seq, set)?;
                // Looked up first: a key has many records, its name is copied once.
                match self.restoring.get_mut(feature_key.as_bytes()) {
                    Some(events) => by_seq(events, event),
                    None => {
                        self.restoring
                            .insert(Key::new(feature_key.as_bytes()), VecDeque::from([event]));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Ends a restore: each key's events in their order, and the state is what was committed.
    pub fn restored(&mut self) {
        for (key, mut events) in self.restoring.drain() {
            if events.is_empty() {
                continue;
            }
            events
                .make_contiguous()
                .sort_unstable_by_key(|e| (e.time, e.seq));
            let newest = events.back().map_or(0, |e| e.time);
            self.keys.insert(
                key,
                KeyState {
                    events,
                    newest,
                    running: None,
                    undo_at: (0, 0),
                },
            );
        }
        self.checkpoint();
    }
}

/// Puts a restored event among its key's, kept in seq order: appended when it is the newest
/// (as a key's records are written), else placed, a later record of the same event replacing
/// the earlier.
fn by_seq(events: &mut VecDeque<Stored>, event: Stored) {
    if events.back().is_none_or(|b| b.seq < event.seq) {
        events.push_back(event);
        return;
    }
    match events.binary_search_by_key(&event.seq, |e| e.seq) {
        Ok(i) => events[i] = event,
        Err(i) => events.insert(i, event),
    }
}

/// An event record's key: the feature key, [`SEPARATOR`], the sequence number (big-endian, so
/// a key's records sort by it).
fn event_key(out: &mut Vec<u8>, key: &[u8], seq: u64) {
    out.clear();
    out.extend_from_slice(key);
    out.push(SEPARATOR);
    out.extend_from_slice(&seq.to_be_bytes());
}

/// The feature key and sequence number of an event record's key. A key without the separator
/// is a record of version 2 (a whole key's state): refused as such.
fn split_event_key<'k>(key: &'k [u8], value: Option<&[u8]>) -> Result<(&'k str, u64), CodecError> {
    let Some(at) = key.iter().position(|&b| b == SEPARATOR) else {
        return Err(match value.and_then(|v| v.first()) {
            Some(&version) if version != VERSION => CodecError::Version(version),
            _ => CodecError::Key,
        });
    };
    let feature_key = std::str::from_utf8(&key[..at]).map_err(|_| CodecError::Key)?;
    let seq = <[u8; 8]>::try_from(&key[at + 1..]).map_err(|_| CodecError::Key)?;
    Ok((feature_key, u64::from_be_bytes(seq)))
}

fn header(buf: &mut Vec<u8>, fingerprint: u64) {
    buf.push(VERSION);
    buf.extend_from_slice(&fingerprint.to_le_bytes());
}

fn encode_clock(buf: &mut Vec<u8>, clock: &EvictionClock) {
    buf.extend_from_slice(&clock.now.to_le_bytes());
    for (values, len) in [
        (&clock.times, clock.times_len),
        (&clock.medians, clock.medians_len),
    ] {
        buf.push(len as u8);
        for v in &values[..len] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn decode_clock(r: &mut Reader<'_>) -> Result<EvictionClock, CodecError> {
    let mut clock = EvictionClock {
        now: r.i64()?,
        ..EvictionClock::default()
    };
    for level in 0..2 {
        let [len] = r.take::<1>()?;
        let len = usize::from(len);
        if len >= CLOCK_BASE {
            return Err(CodecError::Malformed("eviction clock"));
        }
        let values = if level == 0 {
            clock.times_len = len;
            &mut clock.times
        } else {
            clock.medians_len = len;
            &mut clock.medians
        };
        for v in &mut values[..len] {
            *v = r.i64()?;
        }
    }
    Ok(clock)
}

fn encode_event(buf: &mut Vec<u8>, fingerprint: u64, e: &Stored) {
    header(buf, fingerprint);
    buf.extend_from_slice(&e.time.to_le_bytes());
    for x in &e.nums {
        buf.extend_from_slice(&x.to_bits().to_le_bytes());
    }
    for c in &e.cats {
        buf.extend_from_slice(&c.to_le_bytes());
    }
}

fn decode_event(
    value: &[u8],
    fingerprint: u64,
    seq: u64,
    set: &FeatureSet,
) -> Result<Stored, CodecError> {
    let mut r = Reader::new(value, fingerprint)?;
    let time = r.i64()?;
    let nums = (0..set.num_fields.len())
        .map(|_| r.u64().map(f64::from_bits))
        .collect::<Result<_, _>>()?;
    let cats = (0..set.cat_fields.len())
        .map(|_| r.u64())
        .collect::<Result<_, _>>()?;
    r.end()?;
    Ok(Stored {
        time,
        seq,
        nums,
        cats,
    })
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(value: &'a [u8], fingerprint: u64) -> Result<Self, CodecError> {
        let (&version, rest) = value.split_first().ok_or(CodecError::Malformed("empty"))?;
        if version != VERSION {
            return Err(CodecError::Version(version));
        }
        let mut r = Reader { rest };
        let found = r.u64()?;
        if found != fingerprint {
            return Err(CodecError::Fingerprint {
                found,
                expected: fingerprint,
            });
        }
        Ok(r)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(CodecError::Malformed("ends early"))?;
        self.rest = rest;
        Ok(*head)
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        self.take().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, CodecError> {
        self.take().map(i64::from_le_bytes)
    }

    fn end(&self) -> Result<(), CodecError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Malformed("bytes left over"))
        }
    }
}
