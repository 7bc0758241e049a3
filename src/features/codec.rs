//! The changelog form of feature state: what the pipeline's publish step writes to the
//! compacted changelog topic in each transaction, and what [`crate::changelog::Restorer`]
//! reads back on partition assignment.
//!
//! One record per key changed since the last commit (key: the feature key's UTF-8 bytes;
//! value: the key's whole retained state, or a tombstone when it was evicted), and one
//! partition record (key [`PARTITION_KEY`], never valid UTF-8 so it cannot collide with a
//! feature key) with the next input offset the state belongs to and the partition's counters.
//! Restored state is equal, field for field, to the state that was committed, so a restarted
//! processor computes the same features the uninterrupted one would have.
//!
//! Values start with a format version and a fingerprint of the feature set's inputs; state
//! written by a topology that reads different fields, or by another version of the format, is
//! refused key by key instead of misread. Numbers are little-endian; floats keep their exact
//! bits; categories are their XXH3-64 hashes ([`super::extract::hash_str`]).
//!
//! Version 2 (this one): categories hashed with XXH3-64, and the partition record carries the
//! eviction clock. Version 1 hashed categories with std's `DefaultHasher`, whose output Rust
//! does not promise to keep; its records are refused.

use super::{CLOCK_BASE, EvictionClock, FeatureSet, FeatureState, KeyState, Stored};

/// Changelog key of a partition's own record. `0xFF` never occurs in UTF-8.
pub const PARTITION_KEY: &[u8] = b"\xFFpartition";

const VERSION: u8 = 2;

/// Bytes of a key record before its events: version, fingerprint, newest time, event count.
pub const KEY_HEADER_BYTES: usize = 1 + 8 + 8 + 4;

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
    /// The key is not UTF-8 (and not the partition record).
    #[error("changelog key is not UTF-8")]
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

impl FeatureState {
    /// Calls `emit(key, value)` for every key changed since the last checkpoint (value `None`:
    /// the key is gone, a tombstone), then once for the partition record with `next_offset`.
    /// Returns how many records were emitted.
    pub fn changelog<E>(
        &self,
        set: &FeatureSet,
        next_offset: i64,
        mut emit: impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let fingerprint = set.fingerprint();
        let mut buf = Vec::with_capacity(256);
        let mut n = 0;
        for key in self.undo.keys() {
            match self.keys.get(key) {
                Some(state) => {
                    buf.clear();
                    encode_key(&mut buf, fingerprint, state);
                    emit(key.as_bytes(), Some(&buf))?;
                }
                None => emit(key.as_bytes(), None)?,
            }
            n += 1;
        }
        buf.clear();
        header(&mut buf, fingerprint);
        buf.extend_from_slice(&next_offset.to_le_bytes());
        buf.extend_from_slice(&self.seq.to_le_bytes());
        buf.extend_from_slice(&self.since_sweep.to_le_bytes());
        encode_clock(&mut buf, &self.clock);
        emit(PARTITION_KEY, Some(&buf))?;
        Ok(n + 1)
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
        let key = std::str::from_utf8(key).map_err(|_| CodecError::Key)?;
        match value {
            None => {
                self.keys.remove(key);
            }
            Some(value) => {
                let state = decode_key(value, fingerprint, set)?;
                self.keys.insert(key.to_string(), state);
            }
        }
        Ok(None)
    }

    /// Ends a restore: the state is what was committed.
    pub fn restored(&mut self) {
        self.checkpoint();
    }
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

fn encode_key(buf: &mut Vec<u8>, fingerprint: u64, state: &KeyState) {
    header(buf, fingerprint);
    buf.extend_from_slice(&state.newest.to_le_bytes());
    buf.extend_from_slice(&(state.events.len() as u32).to_le_bytes());
    for e in &state.events {
        buf.extend_from_slice(&e.time.to_le_bytes());
        buf.extend_from_slice(&e.seq.to_le_bytes());
        for x in &e.nums {
            buf.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        for c in &e.cats {
            buf.extend_from_slice(&c.to_le_bytes());
        }
    }
}

fn decode_key(value: &[u8], fingerprint: u64, set: &FeatureSet) -> Result<KeyState, CodecError> {
    let mut r = Reader::new(value, fingerprint)?;
    let newest = r.i64()?;
    let n = r.u32()? as usize;
    let (nn, nc) = (set.num_fields.len(), set.cat_fields.len());
    // Each event takes 16 + 8 * (nn + nc) bytes: refuse a count the value cannot hold before
    // allocating for it.
    if r.rest.len() != n * (16 + 8 * (nn + nc)) {
        return Err(CodecError::Malformed("event count"));
    }
    let mut events = std::collections::VecDeque::with_capacity(n);
    for _ in 0..n {
        let time = r.i64()?;
        let seq = r.u64()?;
        let nums = (0..nn)
            .map(|_| r.u64().map(f64::from_bits))
            .collect::<Result<Box<[f64]>, _>>()?;
        let cats = (0..nc)
            .map(|_| r.u64())
            .collect::<Result<Box<[u64]>, _>>()?;
        events.push_back(Stored {
            time,
            seq,
            nums,
            cats,
        });
    }
    r.end()?;
    Ok(KeyState {
        events,
        newest,
        running: Default::default(),
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

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.take().map(u32::from_le_bytes)
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
