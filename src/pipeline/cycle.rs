//! One cycle's records, from the poll to their fate: each record is decoded, featurised and
//! handed to the models (or set aside as a dead letter with its reason); at the end of the
//! cycle every score is awaited, and [`settle`] decides which records are dead letters after
//! all. Nothing here publishes: see `publish` and `delivery`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::runtime::Handle;

use super::backpressure::Pressure;
use super::models::ModelSet;
use super::publish::Counts;
use super::restore::Restore;
use super::{Flight, Gathered, Input, Processor, now_ms};
use crate::batcher::{BatcherError, ModelBatcher, Refused, Scored};
use crate::features::{FeatureSet, FeatureState};
use crate::reason::Reason;
use crate::sink::dead_letter::Cut;
use crate::source::{DecodeError, Decoded, Decoder};
use crate::telemetry::events::RegistryUnavailable;
use crate::telemetry::health;
use std::sync::Arc;

/// A record of the cycle, waiting for its scores or set aside as a dead letter.
pub(super) struct Pending {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<Vec<u8>>,
    /// The input value as it was: the dead letter's value, and the scored record's `event`
    /// bytes when written with the reader schema.
    pub(super) value: Option<Vec<u8>>,
    pub(super) outcome: Outcome,
}

/// A record's fate so far.
pub(super) enum Outcome {
    Scored {
        /// The event resolved to the reader schema, to be encoded; `None` where the input datum
        /// was written with the reader schema and is copied into the output as it is.
        event: Option<Value>,
        schema_id: u32,
        event_time: i64,
        /// The key's canary bucket (see `models::bucket`).
        bucket: u16,
        features: Vec<f64>,
        /// Per model of the cycle's set, its scores once they arrived (`None` for models that
        /// do not score this record).
        scores: Vec<Option<Vec<f64>>>,
    },
    Dead {
        reason: Reason,
        error: String,
        /// How much of the input its dead letter carries.
        cut: Cut,
    },
}

/// A record the producer could not publish: on the next try it is dead-lettered, or its dead
/// letter cut down (see `recovery`).
#[derive(Debug, Clone)]
pub(super) struct Poison {
    pub(super) reason: Reason,
    pub(super) error: String,
    pub(super) cut: Cut,
}

/// The cycle in progress. Kept between cycles so its capacity is reused: growing its record
/// vector to thousands of records again every cycle showed in profiles.
pub(super) struct Cycle {
    /// The models it is scored with, the same for all its records.
    pub(super) models: Arc<ModelSet>,
    pub(super) records: Vec<Pending>,
    /// Per partition read, the first offset of the cycle (where a rollback rewinds to)...
    pub(super) first: BTreeMap<i32, i64>,
    /// ... and the next offset to read after it (what a commit commits).
    pub(super) next: BTreeMap<i32, i64>,
    /// Rows handed to the models whose scores are still to come.
    pub(super) outstanding: usize,
    /// Per model, the rows not handed to its batcher yet.
    open: Vec<(Vec<u64>, Vec<f32>)>,
    /// Which cycle this is (counted by [`Cycle::clear`]): the high half of each ticket, so the
    /// scores of a discarded cycle's rows, arriving later, are known and dropped.
    generation: u32,
    /// How many of its records (a prefix) are published already, in its open transaction.
    pub(super) sent: usize,
    /// What it published so far, once its transaction began.
    pub(super) counts: Option<Counts>,
}

/// A row's ticket: its cycle's generation and its record's place in the cycle.
fn ticket(generation: u32, index: usize) -> u64 {
    (u64::from(generation) << 32) | (index as u64 & 0xffff_ffff)
}

/// The record a ticket names in the cycle of `generation`, if it is of that cycle.
fn place(generation: u32, ticket: u64) -> Option<usize> {
    ((ticket >> 32) as u32 == generation).then_some((ticket & 0xffff_ffff) as usize)
}

impl Cycle {
    /// An empty cycle scored with `models`.
    pub(super) fn new(models: Arc<ModelSet>) -> Self {
        Cycle {
            models,
            records: Vec::new(),
            first: BTreeMap::new(),
            next: BTreeMap::new(),
            outstanding: 0,
            open: Vec::new(),
            generation: 0,
            sent: 0,
            counts: None,
        }
    }

    /// Whether its transaction began (some of its records may be on their way).
    pub(super) fn begun(&self) -> bool {
        self.counts.is_some()
    }

    /// The end of the records whose fate is known: from [`Cycle::sent`] on, each is a dead
    /// letter or has every score it waits for. They can be published (after [`settle`]).
    pub(super) fn ready(&self) -> usize {
        let models = &self.models;
        let waiting = |p: &Pending| match &p.outcome {
            Outcome::Dead { .. } => false,
            Outcome::Scored { scores, bucket, .. } => models
                .routes(*bucket)
                .any(|m| scores.get(m).is_none_or(Option::is_none)),
        };
        let rest = self.records.get(self.sent..).unwrap_or_default();
        self.sent + rest.iter().position(waiting).unwrap_or(rest.len())
    }

    /// Empties it for the next cycle, to be scored with `models`.
    pub(super) fn clear(&mut self, models: &Arc<ModelSet>) {
        self.records.clear();
        self.first.clear();
        self.next.clear();
        self.outstanding = 0;
        self.open = vec![(Vec::new(), Vec::new()); models.members.len()];
        self.generation = self.generation.wrapping_add(1);
        self.models = models.clone();
        self.sent = 0;
        self.counts = None;
    }

    /// Takes one decoded record: its rows go to the models that score it (in batches of their
    /// `max_rows`).
    pub(super) fn push(
        &mut self,
        mut p: Pending,
        hold: &mut dyn FnMut(),
    ) -> Result<(), BatcherError> {
        if let Outcome::Scored {
            features,
            bucket,
            scores,
            ..
        } = &mut p.outcome
        {
            // A slot per model, filled as its scores arrive.
            scores.resize(self.models.members.len(), None);
            let ticket = ticket(self.generation, self.records.len());
            for m in self.models.routes(*bucket) {
                let (member, open) = (&self.models.members[m], &mut self.open[m]);
                open.0.push(ticket);
                open.1
                    .extend(member.columns.iter().map(|&c| features[c] as f32));
                self.outstanding += 1;
                if open.0.len() >= member.batcher.max_rows() {
                    submit(&member.batcher, open, hold)?;
                }
            }
        }
        self.records.push(p);
        Ok(())
    }

    /// Hands every model the rows it has not had yet, and asks for their batches now.
    pub(super) fn flush(&mut self, hold: &mut dyn FnMut()) -> Result<(), BatcherError> {
        for (b, open) in self.models.batchers().zip(&mut self.open) {
            submit(b, open, hold)?;
            b.flush()?;
        }
        Ok(())
    }
}

/// Most records in a cycle redone with a producer that batches nothing (one produce request
/// each): such a cycle is kept short, and ends once it holds every suspect; suspects past it
/// are found by the next one.
const ISOLATED_CYCLE_RECORDS: usize = 1_000;

impl Processor<'_> {
    /// Polls and takes records until the commit interval has passed or the cycle is full,
    /// restoring newly assigned partitions first; meanwhile ends the commit before it and
    /// publishes what is scored (see [`Processor::advance`]).
    pub(super) fn gather(
        &mut self,
        cycle: &mut Cycle,
        flight: &mut Flight,
    ) -> anyhow::Result<Gathered> {
        let t = &self.loaded.topology;
        let started = Instant::now();
        let most = if self.delivery.isolating() {
            self.opts.max_cycle_records.min(ISOLATED_CYCLE_RECORDS)
        } else {
            self.opts.max_cycle_records
        };
        let isolating = self.delivery.isolating();
        // The cycle's clock is read once per poll (it was twice), the health beat's (the wall
        // clock) after every 16 polls and every empty one.
        let mut elapsed = Duration::ZERO;
        let mut polled: u32 = 0;
        let mut quiet = false;
        while elapsed < t.delivery.commit_interval
            && cycle.records.len() < most
            && !self.stop.load(Ordering::Relaxed)
            && !(isolating && !cycle.next.is_empty() && self.refusals.covered_by(&cycle.next))
        {
            // Every 32 polls and after an empty one (never between a poll and its record,
            // which borrows the consumer; a revocation, which only a poll delivers, is seen
            // first).
            if (quiet || polled.is_multiple_of(32))
                && let Some(ended) = self.advance(cycle, flight)?
            {
                return Ok(ended);
            }
            let wait = t
                .delivery
                .commit_interval
                .saturating_sub(started.elapsed())
                .min(Duration::from_millis(50));
            let msg = self.consumer.poll(wait);
            quiet = msg.is_none();
            elapsed = started.elapsed();
            polled = polled.wrapping_add(1);
            if msg.is_none() || polled.is_multiple_of(16) {
                health::beat();
            }
            if self.consumer.context().take_revoked() {
                return Ok(Gathered::Interrupted);
            }
            let assigned = self.consumer.context().take_assigned();
            if !assigned.is_empty() {
                let restore = Restore {
                    consumer: &self.consumer,
                    restorer: &self.restorer,
                    set: &self.set,
                    topic: &t.input.topic,
                    guarantee: t.delivery.guarantee,
                    stop: &self.stop,
                };
                restore.assigned(&mut self.states, &assigned)?;
            }
            let msg = match msg {
                None => {
                    self.starved.check(&self.consumer, &t.input.topic);
                    continue;
                }
                Some(Err(e)) => {
                    self.consumer_errors.note(&e);
                    continue;
                }
                Some(Ok(m)) => {
                    self.starved.received();
                    m
                }
            };
            cycle.first.entry(msg.partition()).or_insert(msg.offset());
            let taken = {
                let mut wait = registry_wait(&self.consumer, &mut self.pressure, &self.stop);
                let state = self.states.entry(msg.partition()).or_default();
                take(&msg, &self.decoder, &self.rt, &self.set, state, &mut wait)
            };
            let Some(p) = taken else {
                return Ok(Gathered::Interrupted);
            };
            cycle.next.insert(msg.partition(), msg.offset() + 1);
            let (consumer, pressure) = (&self.consumer, &mut self.pressure);
            cycle.push(p, &mut || pressure.hold(consumer))?;
        }
        // A stop ends the gathering; what was gathered is still published.
        Ok(if cycle.records.is_empty() {
            Gathered::Empty
        } else {
            Gathered::Records
        })
    }
}

/// Hands a model the rows gathered for it; while its queue is full, holds the input.
fn submit(
    b: &ModelBatcher,
    open: &mut (Vec<u64>, Vec<f32>),
    hold: &mut dyn FnMut(),
) -> Result<(), BatcherError> {
    if open.0.is_empty() {
        return Ok(());
    }
    let mut batch = std::mem::take(open);
    loop {
        match b.try_submit(batch.0, batch.1) {
            Ok(()) => return Ok(()),
            Err(Refused::Full(t, r)) => {
                batch = (t, r);
                hold();
            }
            Err(Refused::Dead(e)) => return Err(e),
        }
    }
}

/// While the registry is away a record waits; so does the consumer, serving its group: `wait`
/// waits up to `d` and says `false` when the cycle must end, for a stop or a revocation.
pub(super) fn registry_wait<'a>(
    consumer: &'a Input,
    pressure: &'a mut Pressure,
    stop: &'a std::sync::atomic::AtomicBool,
) -> impl FnMut(Duration) -> bool + 'a {
    move |d| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            crate::telemetry::health::beat();
            if stop.load(std::sync::atomic::Ordering::Relaxed) || consumer.context().revoked() {
                return false;
            }
            pressure.hold(consumer);
        }
        true
    }
}

/// Decodes and featurises one record. While the registry cannot be reached the record waits
/// (`wait`, see [`registry_wait`]): `None` when the wait ended the cycle, which is then
/// discarded, never the record dead-lettered.
pub(super) fn take(
    msg: &BorrowedMessage<'_>,
    decoder: &Decoder,
    rt: &Handle,
    set: &FeatureSet,
    state: &mut FeatureState,
    wait: &mut dyn FnMut(Duration) -> bool,
) -> Option<Pending> {
    let dead = |reason: Reason, error: String| Outcome::Dead {
        reason,
        error,
        cut: Cut::Whole,
    };
    // Almost always the writer schema is known: no registry call, and no async one.
    let decoded = match decoder.decode_cached(msg.payload()) {
        Some(decoded) => decoded,
        None => fetching(msg, decoder, rt, wait)?,
    };
    // The record's own timestamp (when it was produced, or appended), against which its event
    // time is checked; a record without one is checked against now.
    let produced_at = msg.timestamp().to_millis().unwrap_or_else(now_ms);
    let outcome = match decoded {
        Err(e) => dead(e.reason(), e.to_string()),
        Ok(d) => match set.extract(&d.record, Some(produced_at)) {
            Err(e) => dead(e.reason(), e.to_string()),
            Ok(ev) => {
                let event_time = ev.time;
                let bucket = super::models::bucket(&ev.key);
                match state.update(set, ev) {
                    Err(e) => dead(e.reason(), e.to_string()),
                    Ok(features) => Outcome::Scored {
                        schema_id: d.schema_id,
                        event: d.into_event(),
                        event_time,
                        bucket,
                        features,
                        scores: Vec::new(),
                    },
                }
            }
        },
    };
    Some(Pending {
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().map(<[u8]>::to_vec),
        outcome,
    })
}

/// Decodes a record whose writer schema is to be fetched from the registry. While the registry
/// cannot be reached the record waits (`wait`): `None` when the wait ended the cycle.
fn fetching<'m>(
    msg: &'m BorrowedMessage<'_>,
    decoder: &Decoder,
    rt: &Handle,
    wait: &mut dyn FnMut(Duration) -> bool,
) -> Option<Result<Decoded<'m>, DecodeError>> {
    let mut backoff = Duration::from_millis(100);
    let mut logged: Option<Instant> = None;
    loop {
        match rt.block_on(decoder.decode(msg.payload())) {
            Err(e) if e.is_retriable() => {
                // The registry being down says nothing about the record: wait, do not dead-letter.
                let log = logged.is_none_or(|w| w.elapsed() >= Duration::from_secs(10));
                RegistryUnavailable {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    retry_in: backoff,
                    error: &e,
                    log,
                }
                .emit();
                if log {
                    logged = Some(Instant::now());
                }
                if !wait(backoff) {
                    return None;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            other => return Some(other),
        }
    }
}

/// Waits for every score of the cycle (`idle` between checks). A dead model is an error: its
/// rows never come.
pub(super) fn wait_scores(
    results: &Receiver<Scored>,
    cycle: &mut Cycle,
    idle: &mut dyn FnMut(),
) -> Result<(), BatcherError> {
    while cycle.outstanding > 0 {
        match results.recv_timeout(Duration::from_millis(50)) {
            Ok(batch) => absorb(cycle, batch),
            Err(RecvTimeoutError::Timeout) => {
                cycle.models.check()?;
                idle();
            }
            Err(RecvTimeoutError::Disconnected) => return Err(gone(&cycle.models)),
        }
    }
    Ok(())
}

/// Takes the scores that have arrived, without waiting.
pub(super) fn drain_scores(
    results: &Receiver<Scored>,
    cycle: &mut Cycle,
) -> Result<(), BatcherError> {
    loop {
        match results.try_recv() {
            Ok(batch) => absorb(cycle, batch),
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => return Err(gone(&cycle.models)),
        }
    }
}

/// The scoring threads are gone: the model that died, if one did.
fn gone(models: &ModelSet) -> BatcherError {
    match models.check() {
        Err(e) => e,
        Ok(()) => BatcherError::Died {
            model: "every model".into(),
            reason: "the scoring threads are gone".into(),
        },
    }
}

/// One batch's scores into their records' slots; the rows of a batch the model failed on are
/// `scoring_failed`. Scores of an earlier, discarded cycle's rows are dropped.
fn absorb(cycle: &mut Cycle, batch: Scored) {
    let generation = cycle.generation;
    match batch.rows {
        Ok(rows) => {
            for (i, values) in rows
                .into_iter()
                .filter_map(|(t, v)| Some((place(generation, t)?, v)))
            {
                cycle.outstanding = cycle.outstanding.saturating_sub(1);
                if let Some(Pending {
                    outcome: Outcome::Scored { scores, .. },
                    ..
                }) = cycle.records.get_mut(i)
                    && let Some(slot) = scores.get_mut(batch.model)
                {
                    *slot = Some(values);
                }
            }
        }
        Err((tickets, e)) => {
            for i in tickets.into_iter().filter_map(|t| place(generation, t)) {
                cycle.outstanding = cycle.outstanding.saturating_sub(1);
                if let Some(p) = cycle.records.get_mut(i) {
                    p.outcome = Outcome::Dead {
                        reason: Reason::ScoringFailed,
                        error: e.to_string(),
                        cut: Cut::Whole,
                    };
                }
            }
        }
    }
}

/// Decides, before they are published, which of the records `from..to` are dead letters after
/// all: those the producer refused on an earlier try, and those with a score that is not a
/// finite number (so only published scores reach the drift and latency metrics).
pub(super) fn settle(
    cycle: &mut Cycle,
    from: usize,
    to: usize,
    poisoned: &HashMap<(i32, i64), Poison>,
) {
    let scores = &cycle.models.scores;
    let mut values = scores.values.clone();
    for p in cycle.records.get_mut(from..to).unwrap_or_default() {
        if let Some(poison) = poisoned.get(&(p.partition, p.offset)) {
            p.outcome = Outcome::Dead {
                reason: poison.reason,
                error: poison.error.clone(),
                cut: poison.cut,
            };
            continue;
        }
        if let Outcome::Scored {
            scores: got,
            bucket,
            ..
        } = &p.outcome
        {
            scores.fill(&mut values, got, *bucket);
            if let Some(bad) = values.iter().find(|v| !v.value.is_finite()) {
                p.outcome = Outcome::Dead {
                    reason: Reason::NonFiniteScore,
                    error: format!(
                        "score {} is not a finite number ({})",
                        bad.qualified, bad.value
                    ),
                    cut: Cut::Whole,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::models::testing;
    use super::*;
    use crate::batcher::Scorer;
    use crate::scorer::{ModelInfo, ScorerError};

    /// Scores a row as its one column, slowly enough that a cycle can end before its scores
    /// arrive.
    struct Echo(ModelInfo);

    impl Scorer for Echo {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn score(&mut self, rows: &[f32]) -> Result<Vec<Vec<f64>>, ScorerError> {
            std::thread::sleep(Duration::from_millis(50));
            Ok(vec![rows.iter().map(|&x| f64::from(x)).collect()])
        }
    }

    fn models() -> (Arc<ModelSet>, Receiver<Scored>) {
        let model = testing::entry(
            r#"name = "m"
               path = "m.onnx"
               features = ["x"]
               scores = [{ name = "s", output = "y" }]
               batching = { max_rows = 4, max_delay = "1ms" }"#,
        );
        let info = ModelInfo {
            name: "m".into(),
            version: "v".into(),
            input: "x".into(),
            width: 1,
            reference: None,
        };
        testing::set(vec![(model, vec![0], Box::new(Echo(info)))], &[])
    }

    fn pending(offset: i64, x: f64) -> Pending {
        Pending {
            partition: 0,
            offset,
            key: None,
            value: None,
            outcome: Outcome::Scored {
                event: None,
                schema_id: 1,
                event_time: 0,
                bucket: 0,
                features: vec![x],
                scores: Vec::new(),
            },
        }
    }

    fn scores_of(cycle: &Cycle) -> Vec<Option<Vec<f64>>> {
        cycle
            .records
            .iter()
            .map(|p| match &p.outcome {
                Outcome::Scored { scores, .. } => scores[0].clone(),
                Outcome::Dead { .. } => None,
            })
            .collect()
    }

    /// Drains the scores that arrive until `n` rows are still to come (within 5 s).
    fn drain_until(results: &Receiver<Scored>, cycle: &mut Cycle, n: usize) {
        let until = Instant::now() + Duration::from_secs(5);
        while cycle.outstanding > n && Instant::now() < until {
            drain_scores(results, cycle).expect("scoring");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(cycle.outstanding, n);
    }

    /// Records are ready to publish in input order, each once its fate is known: a dead letter
    /// at once, a scored record once its scores arrived, and none past a record still waiting.
    #[test]
    fn records_become_ready_in_order_as_their_scores_arrive() {
        let (models, results) = models();
        let mut cycle = Cycle::new(models.clone());
        cycle.clear(&models);
        let dead = Pending {
            outcome: Outcome::Dead {
                reason: Reason::NotConfluentFramed,
                error: "x".into(),
                cut: Cut::Whole,
            },
            ..pending(0, 0.0)
        };
        cycle.push(dead, &mut || ()).expect("taken");
        // Batches of four rows: the first four go to the model at the fourth.
        for i in 1..=6 {
            cycle.push(pending(i, i as f64), &mut || ()).expect("taken");
        }
        assert_eq!(cycle.ready(), 1, "the dead letter only");
        drain_until(&results, &mut cycle, 2);
        assert_eq!(cycle.ready(), 5);
        assert_eq!(
            scores_of(&cycle)[1..5],
            [
                Some(vec![1.0]),
                Some(vec![2.0]),
                Some(vec![3.0]),
                Some(vec![4.0])
            ]
        );
        // The first five published: the rest is ready once scored.
        cycle.sent = 5;
        assert_eq!(cycle.ready(), 5);
        cycle.flush(&mut || ()).expect("flushed");
        wait_scores(&results, &mut cycle, &mut || ()).expect("scored");
        assert_eq!(cycle.ready(), 7);
        assert_eq!(scores_of(&cycle)[5..], [Some(vec![5.0]), Some(vec![6.0])]);
    }

    /// A cycle cut short (a revocation) leaves its rows with the models; their scores, arriving
    /// during the next cycle, must not be taken for that cycle's records (same places, other
    /// events).
    #[test]
    fn scores_of_a_discarded_cycle_never_reach_the_next() {
        let (models, results) = models();
        let mut cycle = Cycle::new(models.clone());
        cycle.clear(&models);
        for i in 0..3 {
            cycle
                .push(pending(i, 100.0 + i as f64), &mut || ())
                .expect("taken");
        }
        cycle.flush(&mut || ()).expect("flushed");
        // Discarded: the next cycle begins at once, its scores still to come.
        cycle.clear(&models);
        for i in 0..3 {
            cycle
                .push(pending(10 + i, i as f64), &mut || ())
                .expect("taken");
        }
        cycle.flush(&mut || ()).expect("flushed");
        wait_scores(&results, &mut cycle, &mut || ()).expect("scored");
        assert_eq!(
            scores_of(&cycle),
            vec![Some(vec![0.0]), Some(vec![1.0]), Some(vec![2.0])]
        );
        assert_eq!(cycle.outstanding, 0);
    }
}
