//! Newly assigned partitions get the state they were last committed with before they are read.
//!
//! A partition whose state this instance still holds, committed with the offset the group has
//! committed, is kept as is; the others are read back from the changelog. The restored partition
//! record must name the group's committed offset: a changelog behind it (commit markers still on
//! their way) is read again for up to 30 s. Under exactly-once a changelog ahead of the group's
//! offset wins: it was committed in the same transaction as offsets the group has lost, and the
//! partition continues from its offset. Otherwise (a changelog deleted by hand, an
//! at-least-once crash) the state is used as it is, logged and counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::Input;
use crate::changelog::{Restored, Restorer};
use crate::features::{FeatureSet, FeatureState};
use crate::telemetry::events::{RestoreGapFound, StateRestored};
use crate::telemetry::health;
use crate::topology::config::Guarantee;

/// Why a restored partition's state does not match the group's committed offset: the changelog
/// is behind it or ahead of it, the offsets are behind the changelog under exactly-once (the
/// changelog wins), or some changelog records could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(super) enum RestoreGap {
    Behind,
    Ahead,
    OffsetsBehind,
    Unreadable,
}

impl RestoreGap {
    pub(super) fn label(self) -> &'static str {
        self.into()
    }
}

/// What restoring partitions needs.
pub(super) struct Restore<'a> {
    pub(super) consumer: &'a Input,
    pub(super) restorer: &'a Restorer,
    pub(super) set: &'a FeatureSet,
    pub(super) topic: &'a str,
    pub(super) guarantee: Guarantee,
    pub(super) stop: &'a AtomicBool,
}

impl Restore<'_> {
    /// Restores `assigned` into `states`, then resumes them.
    pub(super) fn assigned(
        &self,
        states: &mut HashMap<i32, FeatureState>,
        assigned: &[i32],
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut tpl = TopicPartitionList::new();
        for p in assigned {
            tpl.add_partition(self.topic, *p);
        }
        let Some(committed) = self.committed_offsets(&tpl)? else {
            return Ok(());
        };
        for (p, o) in &committed {
            if let Some(o) = o {
                self.consumer.context().set_committed(*p, *o);
            }
        }
        let expected = |p: &i32| committed.get(p).copied().flatten();
        let todo: Vec<i32> = assigned
            .iter()
            .copied()
            .filter(|p| {
                let current = states.get(p).is_some_and(|s| {
                    s.committed_next().is_some() && s.committed_next() == expected(p)
                });
                !current
            })
            .collect();
        let kept = assigned.len() - todo.len();
        let Some(read) = self.read(states, todo, &expected)? else {
            return Ok(());
        };
        // Partitions revoked and not given back are no longer ours to hold.
        if let Ok(now) = self.consumer.assignment() {
            states.retain(|p, _| now.find_partition(self.topic, *p).is_some());
        }
        StateRestored {
            partitions: assigned,
            kept,
            records: read.records,
            bytes: read.bytes,
            keys: read.keys,
            took: started.elapsed(),
            state_keys: states.values().map(FeatureState::keys).sum(),
        }
        .emit();
        for (partition, offset) in read.seek_to {
            self.consumer.context().set_committed(partition, offset);
            self.consumer.seek(
                self.topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )?;
        }
        self.consumer.resume(&tpl)?;
        health::awaiting_restore(self.consumer.context().awaiting_restore().len());
        Ok(())
    }

    /// The group's committed offsets of `tpl`, retried while the broker is away (`None`:
    /// stopping).
    fn committed_offsets(
        &self,
        tpl: &TopicPartitionList,
    ) -> anyhow::Result<Option<BTreeMap<i32, Option<i64>>>> {
        loop {
            match self
                .consumer
                .committed_offsets(tpl.clone(), Duration::from_secs(10))
            {
                Ok(c) => {
                    return Ok(Some(
                        c.elements()
                            .iter()
                            .map(|e| match e.offset() {
                                Offset::Offset(o) => (e.partition(), Some(o)),
                                _ => (e.partition(), None),
                            })
                            .collect(),
                    ));
                }
                Err(e) if !self.stop.load(Ordering::Relaxed) => {
                    tracing::warn!("fetching committed offsets failed, retrying: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(_) => return Ok(None),
            }
        }
    }

    /// Reads `todo`'s changelog partitions into `states`, waiting (up to 30 s) for any that is
    /// behind the group's offset (`None`: stopping; the partitions stay paused).
    fn read(
        &self,
        states: &mut HashMap<i32, FeatureState>,
        mut todo: Vec<i32>,
        expected: &dyn Fn(&i32) -> Option<i64>,
    ) -> anyhow::Result<Option<Read>> {
        let mut read = Read::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !todo.is_empty() {
            let restored = match self.restorer.restore(self.set, &todo, self.stop) {
                Ok(r) => r,
                Err(KafkaError::Canceled) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut behind = Vec::new();
            for (p, r) in restored {
                let found = r.mark.map(|m| m.next_offset);
                let want = expected(&p);
                // Only a changelog with an older partition record can be catching up; one with
                // none at all (deleted, or written before changelogs) is not waited for.
                if found.is_some_and(|f| f < want.unwrap_or(0)) && Instant::now() < deadline {
                    behind.push(p);
                    continue;
                }
                read.seek_to.extend(self.compare(p, &r, want));
                read.records += r.records;
                read.bytes += r.bytes;
                read.keys += r.state.keys();
                states.insert(p, r.state);
            }
            if !behind.is_empty() {
                std::thread::sleep(Duration::from_millis(500));
            }
            todo = behind;
        }
        Ok(Some(read))
    }

    /// Reports a restored partition whose state does not match the group's offset `want`;
    /// `Some` offset to continue from where the changelog wins.
    fn compare(&self, p: i32, r: &Restored, want: Option<i64>) -> Option<(i32, i64)> {
        let found = r.mark.map(|m| m.next_offset);
        let ahead = found.unwrap_or(0) > want.unwrap_or(0);
        if r.unreadable > 0 {
            RestoreGapFound {
                reason: RestoreGap::Unreadable.label(),
                partition: p,
                changelog_offset: found,
                committed_offset: want,
                what: "changelog records that cannot be read (written for other feature inputs, \
                       or by an older format): their keys start afresh",
                count: r.unreadable,
            }
            .emit();
        }
        if ahead && self.guarantee == Guarantee::ExactlyOnce {
            // The partition record committed in the same transaction as the offsets: that
            // transaction is committed, so its offsets were too, and the group's are stale (lost
            // by the broker, or reset by hand without deleting the changelog). Going back to them
            // would publish those records' outputs a second time.
            RestoreGapFound {
                reason: RestoreGap::OffsetsBehind.label(),
                partition: p,
                changelog_offset: found,
                committed_offset: want,
                what: "the group's committed offset is behind the changelog's committed state; \
                       continuing from the changelog's offset (to reprocess from an earlier \
                       offset, delete the changelog topic as well)",
                count: 1,
            }
            .emit();
            return Some((p, found.unwrap_or(0)));
        }
        if found != want {
            let (reason, what) = if ahead {
                (
                    RestoreGap::Ahead,
                    "the changelog's state is ahead of the group's committed offset (offsets \
                     reset, or an at-least-once crash): features of this partition's next events \
                     may differ from an uninterrupted run",
                )
            } else {
                (
                    RestoreGap::Behind,
                    "the changelog's state is behind the group's committed offset (changelog \
                     deleted or reset): features of this partition's next events may differ \
                     from an uninterrupted run",
                )
            };
            RestoreGapFound {
                reason: reason.label(),
                partition: p,
                changelog_offset: found,
                committed_offset: want,
                what,
                count: 1,
            }
            .emit();
        }
        None
    }
}

/// What a restore read, and the partitions to continue from the changelog's offset.
#[derive(Default)]
struct Read {
    records: u64,
    bytes: u64,
    keys: usize,
    seek_to: Vec<(i32, i64)>,
}
