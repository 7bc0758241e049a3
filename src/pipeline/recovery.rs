//! After a failed cycle: how long to wait before the next try, and what was learned about the
//! records the broker refused.
//!
//! Failures in a row back off (0.1 s, doubling to 30 s) and count towards readiness (not ready
//! from [`crate::telemetry::health::FAILED_CYCLES_NOT_READY`]). The broker refuses whole batches, so records it
//! refused are only known to be at fault when each batch held one record: the first failure
//! with refusals makes the next try isolate them ([`learn`] says so), the next names them, and
//! they are dead-lettered (or their dead letters cut down) from then on.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::cycle::{Outcome, Pending, Poison};
use super::publish::{TAG_ALERT, TAG_CHANGELOG, TAG_SCORED, reason_for};
use crate::kafka::produce;
use crate::sink::dead_letter::Cut;
use crate::telemetry::events::{CycleFailed, CyclesRecovered};

/// Consecutive failed cycles.
#[derive(Default)]
pub(super) struct Failures {
    consecutive: u32,
}

impl Failures {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);

    /// A cycle failed: counted, and logged with the input it held.
    pub(super) fn failed(
        &mut self,
        topic: &str,
        first: &BTreeMap<i32, i64>,
        next: &BTreeMap<i32, i64>,
        reason: &'static str,
        error: &KafkaError,
    ) {
        self.consecutive = self.consecutive.saturating_add(1);
        let offsets: Vec<String> = first
            .iter()
            .map(|(p, from)| format!("{p}:[{from}..{})", next.get(p).copied().unwrap_or(*from)))
            .collect();
        CycleFailed {
            topic,
            offsets: offsets.join(" "),
            consecutive: self.consecutive,
            retry_in: self.backoff(),
            reason,
            error: match error {
                KafkaError::Canceled => "aborted on purpose (a testing aid)".to_string(),
                e => e.to_string(),
            },
        }
        .emit();
    }

    /// A cycle committed; whether it ended a run of failures.
    pub(super) fn committed(&mut self) -> bool {
        let had = self.consecutive > 0;
        if had {
            CyclesRecovered {
                after: self.consecutive,
            }
            .emit();
            self.consecutive = 0;
        }
        had
    }

    /// The wait before the next try: 0.1 s after one failure, doubling to 30 s.
    pub(super) fn backoff(&self) -> Duration {
        let doublings = self.consecutive.saturating_sub(1).min(16);
        (Self::FIRST_BACKOFF * 2u32.pow(doublings)).min(Self::MAX_BACKOFF)
    }
}

/// What is known of the records the broker refused.
#[derive(Default)]
pub(super) struct Refusals {
    /// Records the producer could not publish, by input position.
    pub(super) poisoned: HashMap<(i32, i64), Poison>,
    /// Per partition, the last offset of a record in a batch the broker refused: the records at
    /// fault are among those up to there, so the producer batches nothing until they are passed.
    pub(super) suspects: BTreeMap<i32, i64>,
}

impl Refusals {
    /// Whether the cycle `next` (per partition, the next offset it read) reaches every suspect.
    pub(super) fn covered_by(&self, next: &BTreeMap<i32, i64>) -> bool {
        self.suspects
            .iter()
            .all(|(p, o)| next.get(p).is_some_and(|n| n > o))
    }

    /// A cycle reading up to `next` committed: its suspects and poisoned records are done.
    /// Whether any suspect is left.
    pub(super) fn committed(&mut self, next: &BTreeMap<i32, i64>, assigned: &[i32]) -> bool {
        let passed = |p: &i32, o: &i64| next.get(p).is_some_and(|n| o < n);
        self.poisoned.retain(|(p, o), _| !passed(p, o));
        self.suspects
            .retain(|p, o| !passed(p, o) && assigned.contains(p));
        !self.suspects.is_empty()
    }
}

/// After a failed cycle, what the broker refused (by delivery tag): with a producer that
/// batched nothing the refusals are the records' own and go on the poison list; otherwise the
/// records of the refused batches become suspects and the next tries isolate them. Returns
/// whether the next producer must batch nothing.
pub(super) fn learn(
    refused: &HashMap<usize, RDKafkaErrorCode>,
    pending: &[Pending],
    isolating: bool,
    refusals: &mut Refusals,
) -> bool {
    let own: Vec<(usize, RDKafkaErrorCode)> = refused
        .iter()
        .filter(|(_, code)| produce::is_record_error(**code))
        .map(|(t, c)| (*t, *c))
        .collect();
    if own.is_empty() {
        return isolating;
    }
    if !isolating {
        for p in own.iter().filter_map(|(tag, _)| pending.get(tag / 4)) {
            let last = refusals.suspects.entry(p.partition).or_insert(p.offset);
            *last = (*last).max(p.offset);
        }
        tracing::warn!(
            records = own.len(),
            "the broker refused records; redoing the cycle with one record per batch to find \
             those at fault"
        );
        return true;
    }
    let poisoned = &mut refusals.poisoned;
    for (tag, code) in own {
        if tag == TAG_CHANGELOG {
            tracing::error!("the broker refused a changelog record: {code}");
            continue;
        }
        let Some(p) = pending.get(tag / 4) else {
            continue;
        };
        let at = (p.partition, p.offset);
        let entry = poisoned.entry(at).or_insert_with(|| Poison {
            reason: reason_for(code),
            error: String::new(),
            cut: Cut::Whole,
        });
        match tag % 4 {
            TAG_SCORED | TAG_ALERT => {
                entry.reason = reason_for(code);
                entry.error = format!("the broker refused the scored record: {code:?} ({code})");
            }
            _ => {
                // Its dead letter was refused: the next try sends less of it.
                if let Outcome::Dead { reason, error, cut } = &p.outcome {
                    entry.reason = *reason;
                    entry.error.clone_from(error);
                    entry.cut = cut.next().unwrap_or(Cut::WithoutKeyOrValue);
                }
            }
        }
        tracing::warn!(
            partition = at.0,
            offset = at.1,
            reason = entry.reason.label(),
            "the broker refused this record's output ({code}); dead-lettering it on the next try"
        );
    }
    true
}
