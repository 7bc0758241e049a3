//! `kscore run`: the processor. One consumer and one producer per instance; work proceeds in
//! cycles of at most `commit_interval` (and at most `max_cycle_records` records, which bounds
//! memory), each one [`Processor::run`]'s turn:
//!
//! 1. **gather** ([`cycle`]): poll records; decode each (source), compute its features
//!    (features), hand its rows to the models' batchers (batcher → scorer threads), or set it
//!    aside as a dead letter with its reason; restore newly assigned partitions first
//!    ([`restore`]);
//! 2. **wait for the scores**, the input paused while the models are behind ([`backpressure`]),
//!    and **settle** which records are dead letters after all (non-finite scores, records the
//!    producer refused before);
//! 3. **publish** ([`publish`]) the scored events and alerts in input order, the dead letters
//!    and the changelog of the state the cycle changed, and **commit** with the input offsets
//!    ([`delivery`]: one transaction under exactly-once). The commit runs on the commit thread
//!    while the loop gathers and scores the next cycle. Once it ended, that cycle's
//!    transaction begins and its records are published during its gathering, in input order
//!    as their scores arrive; the rest, its changelog and its offsets once it is gathered;
//! 4. on success the cycle's feature state changes are committed (its sealed undo level is
//!    forgotten); on failure the state is rolled back with the next cycle's changes too, the
//!    consumer rewound to the cycle's first offsets, and the cycle redone after a backoff
//!    ([`recovery`]); a revocation discards the cycle being gathered once the commit under way
//!    ended, aborting its transaction if it began (its offsets are never sent).
//!
//! One record never stops the stream: one whose output the producer refuses is dead-lettered
//! instead, and a dead letter that does not fit is cut down. Set-up is [`setup`].

mod backpressure;
mod cycle;
mod delivery;
mod models;
mod publish;
mod recovery;
mod reload;
mod report;
mod restore;
mod setup;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::batcher::Scored;
use crate::changelog::Restorer;
use crate::cluster::ClusterArgs;
use crate::features::{FeatureSet, FeatureState};
use crate::kafka::context::GroupContext;
use crate::sink::record::DECISIONS;
use crate::source::Decoder;
use crate::telemetry::events::{CommitFoundCommitted, CycleCommitted, CycleDiscarded};
use crate::telemetry::health;
use crate::topology::Loaded;

use backpressure::Pressure;
use cycle::{Cycle, Outcome};
use delivery::{Committer, Delivery, Done, Failure};
use models::ModelSet;
use publish::{Counts, Outputs, Publisher};
use recovery::{Failures, Refusals};
use report::{Reporter, Starved, Throttled};

/// The input consumer.
type Input = BaseConsumer<GroupContext>;

/// Options of `kscore run` besides the topology.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stable id of this instance: part of the `transactional.id`, so a restarted instance
    /// fences its predecessor and aborts the transaction it left open.
    pub instance_id: String,
    /// Most records in one cycle (one transaction).
    pub max_cycle_records: usize,
    /// How often to print the one-line summary (`None`: never).
    pub summary_every: Option<Duration>,
    /// Testing aid: abort the n-th transaction (once) after all its records were sent, to show
    /// that an aborted cycle is redone and its records never reach `read_committed`.
    pub abort_once_at: Option<u64>,
    /// Testing aid: while on, abort every transaction after its records were sent (a broker
    /// that refuses every commit), to show backoff, readiness and lag.
    pub fail_cycles: Option<FailSwitch>,
    /// Testing aid: make the n-th transaction's commit fail (once) in this way.
    pub commit_fault: Option<(u64, CommitFault)>,
    /// Testing aid: cap each model worker at this many rows per second, to show backpressure.
    pub throttle_scoring: Option<f64>,
    /// How this instance belongs to its consumer group.
    pub membership: Membership,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            instance_id: "0".into(),
            max_cycle_records: 20_000,
            summary_every: None,
            abort_once_at: None,
            fail_cycles: None,
            commit_fault: None,
            throttle_scoring: None,
            membership: Membership::Static,
        }
    }
}

/// A testing aid's switch.
#[derive(Debug, Clone)]
pub enum FailSwitch {
    /// On while the flag is set.
    Flag(Arc<AtomicBool>),
    /// On while the file exists.
    File(std::path::PathBuf),
}

impl FailSwitch {
    /// Whether the switch is on.
    pub fn on(&self) -> bool {
        match self {
            FailSwitch::Flag(f) => f.load(Ordering::Relaxed),
            FailSwitch::File(p) => p.exists(),
        }
    }
}

/// A commit failure a test can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitFault {
    /// The commit succeeds, but is reported as timed out (librdkafka completing a commit whose
    /// call ran out of time): the processor must find from the broker that it committed.
    TimedOutAfterCommit,
    /// A retriable error before the commit: the processor must retry, not abort.
    RetriableBeforeCommit,
}

/// Consumer-group membership (KIP-345).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Membership {
    /// `group.instance.id = kscore-<group>-<instance>`: a restarted instance takes its
    /// partitions back without a rebalance, but one that stops for good keeps them until its
    /// session times out (static members never send LeaveGroup).
    #[default]
    Static,
    /// No `group.instance.id`: a stopping instance leaves the group and its partitions move at
    /// once (scaling down), but every restart rebalances the group.
    Dynamic,
}

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Records read (and committed).
    pub consumed: u64,
    /// Scored events published.
    pub scored: u64,
    /// Alerts published.
    pub alerts: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Transactions committed.
    pub commits: u64,
    /// Transactions aborted.
    pub aborts: u64,
}

/// Runs the processor until `stop` is set. Blocking: call it from a thread of its own.
pub fn run(
    cluster: &ClusterArgs,
    loaded: &Loaded,
    opts: &RunOptions,
    rt: Handle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<RunSummary> {
    match Processor::start(cluster, loaded, opts, rt, stop)? {
        Some(p) => p.run(),
        // Stopped before the input existed.
        None => Ok(RunSummary::default()),
    }
}

/// A running processor: its stages, its consumer and delivery, and what changes cycle by
/// cycle. Built by [`Processor::start`] (in [`setup`]).
struct Processor<'a> {
    loaded: &'a Loaded,
    opts: &'a RunOptions,
    rt: Handle,
    stop: Arc<AtomicBool>,
    consumer: Input,
    decoder: Decoder,
    set: FeatureSet,
    restorer: Restorer,
    /// The models the next cycle is scored with.
    models: Arc<ModelSet>,
    /// Every model's scores.
    results: Receiver<Scored>,
    /// Builds the models anew on a reload.
    reloader: reload::Reloader,
    outputs: Outputs,
    delivery: Delivery,
    /// The commit thread.
    committer: Committer,
    states: HashMap<i32, FeatureState>,
    pressure: Pressure,
    starved: Starved,
    consumer_errors: Throttled,
    reporter: Reporter,
    failures: Failures,
    /// What is known of the records the broker refused (see [`recovery`]).
    refusals: Refusals,
    summary: RunSummary,
    cycles: u64,
}

/// A published cycle whose commit is under way.
struct Committing {
    cycle: Cycle,
    offsets: TopicPartitionList,
    /// When its publishing began.
    started: Instant,
}

/// What becomes of the cycle just gathered.
#[derive(PartialEq, Eq)]
enum Next {
    Publish,
    Discard,
    Nothing,
}

/// How gathering a cycle ended.
enum Gathered {
    /// With records to score and publish.
    Records,
    /// With none.
    Empty,
    /// Cut short by a revocation or a stop: the cycle is discarded.
    Interrupted,
    /// Ended by a failure, the commit before it or its own publishing, that was recovered from
    /// (the cycle rolled back and the input rewound with it): nothing more to do.
    Recovered,
}

/// What the loop carries from cycle to cycle: the commit under way, a spare cycle (whose
/// capacity is reused), and whether to go on.
struct Flight {
    committing: Option<Committing>,
    spare: Cycle,
    live: bool,
}

impl Processor<'_> {
    /// The commit loop, until a stop. Each cycle is gathered (and scored) while the one before
    /// commits; once that commit ended, the cycle's transaction begins and its records are
    /// published as their scores arrive, the rest once it is gathered. A failed commit takes
    /// the gathered cycle back with it.
    fn run(mut self) -> anyhow::Result<RunSummary> {
        let mut cycle = Cycle::new(self.models.clone());
        let mut flight = Flight {
            committing: None,
            spare: Cycle::new(self.models.clone()),
            live: true,
        };
        while flight.live && !self.stopping() {
            if let Some(handover) = self.reloader.take() {
                let next = handover.set.clone();
                self.switch(next);
                handover.switched(reload::rows(&self.models, self.loaded));
            }
            cycle.clear(&self.models);
            let next = match self.gather(&mut cycle, &mut flight)? {
                Gathered::Records if self.await_scores(&mut cycle)? => Next::Publish,
                Gathered::Records | Gathered::Interrupted => Next::Discard,
                Gathered::Empty | Gathered::Recovered => Next::Nothing,
            };
            if next == Next::Discard {
                self.discard(&cycle)?;
            }
            // A cycle whose transaction began had no commit before it under way.
            let ok = self.finish_commit(&mut flight, &cycle, next == Next::Publish)?;
            if flight.live && ok && next == Next::Publish {
                let started = Instant::now();
                match self.publish(&mut cycle) {
                    Ok(offsets) => {
                        let empty = Cycle::new(self.models.clone());
                        flight.committing = Some(Committing {
                            cycle: std::mem::replace(
                                &mut cycle,
                                std::mem::replace(&mut flight.spare, empty),
                            ),
                            offsets,
                            started,
                        });
                    }
                    Err(failure) => {
                        let refused = self.delivery.take_refused();
                        flight.live = self.recover(&cycle, failure, started, refused, false)?;
                    }
                }
            }
            self.reporter.tick(&self.summary);
        }
        // The last commit under way ends before the processor does.
        if let Some(c) = flight.committing.take() {
            let done = self
                .delivery
                .finish_commit(&mut self.committer, &self.consumer, &c.offsets);
            self.ended(&c, done)?;
        }
        tracing::info!(summary = ?self.summary, "processor stopped");
        Ok(self.summary)
    }

    /// Ends the commit under way, if any, waiting for it: `false` when it failed (recovered
    /// from, which takes the state back to before it). `gathered`: `cycle` was gathered on the
    /// failed cycle's state and is discarded with it.
    fn finish_commit(
        &mut self,
        flight: &mut Flight,
        cycle: &Cycle,
        gathered: bool,
    ) -> anyhow::Result<bool> {
        let Some(c) = flight.committing.take() else {
            return Ok(true);
        };
        let done = self
            .delivery
            .finish_commit(&mut self.committer, &self.consumer, &c.offsets);
        let ok = done.result.is_ok();
        if !ok && gathered {
            // Computed on the failed cycle's state: taken back, and read again.
            self.discard(cycle)?;
        }
        flight.live = self.ended(&c, done)?;
        flight.spare = c.cycle;
        Ok(ok)
    }

    /// During the gathering: once the commit before ended, the cycle's transaction begins and
    /// its records whose scores all arrived are published. `Some` when the gathering must end:
    /// that commit failed, or publishing did (each recovered from).
    fn advance(
        &mut self,
        cycle: &mut Cycle,
        flight: &mut Flight,
    ) -> anyhow::Result<Option<Gathered>> {
        if flight.committing.is_some() {
            if !self.committer.ended() {
                return Ok(None);
            }
            if !self.finish_commit(flight, cycle, true)? || !flight.live {
                return Ok(Some(Gathered::Recovered));
            }
        }
        cycle::drain_scores(&self.results, cycle)?;
        let ready = cycle.ready();
        if ready > cycle.sent
            && let Err(failure) = self.send_upto(cycle, ready)
        {
            let refused = self.delivery.take_refused();
            flight.live = self.recover(cycle, failure, Instant::now(), refused, false)?;
            return Ok(Some(Gathered::Recovered));
        }
        Ok(None)
    }

    /// Between two cycles: the next is scored with `next`, a reload's set.
    fn switch(&mut self, next: Arc<ModelSet>) {
        self.models.retire_unless_in(&next);
        next.activate();
        setup::register_series(&self.loaded.topology.input.topic, &next.rule_labels);
        let models: Vec<(String, String, &'static str)> = next
            .members
            .iter()
            .map(|m| {
                (
                    m.entry.name.clone(),
                    m.version().to_string(),
                    m.entry.role.as_str(),
                )
            })
            .collect();
        let loaded = next
            .members
            .iter()
            .filter(|m| !self.models.members.iter().any(|o| Arc::ptr_eq(o, m)))
            .count();
        crate::telemetry::events::ModelsSwitched {
            models: &models,
            loaded,
        }
        .emit();
        self.models = next;
    }

    /// A commit ended: the cycle is committed, or recovered from. `false` when stopping with
    /// its outcome unknown.
    fn ended(&mut self, c: &Committing, done: Done) -> anyhow::Result<bool> {
        let Done {
            result,
            refused,
            aborted,
            at,
        } = done;
        match result {
            Ok(counts) => {
                self.committed(&c.cycle, counts, c.started, at)?;
                Ok(true)
            }
            Err(failure) => self.recover(&c.cycle, failure, c.started, refused, aborted),
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Waits for every score of the cycle, the consumer kept polling (paused while the models
    /// are behind). `false` when a revocation came meanwhile.
    fn await_scores(&mut self, cycle: &mut Cycle) -> anyhow::Result<bool> {
        let (consumer, pressure) = (&self.consumer, &mut self.pressure);
        cycle.flush(&mut || pressure.hold(consumer))?;
        cycle::wait_scores(&self.results, cycle, &mut || {
            // Waiting on slow models is the loop turning, not a stuck process.
            health::beat();
            pressure.hold(consumer)
        })?;
        let revoked = self.consumer.context().take_revoked();
        self.pressure.release(&self.consumer);
        Ok(!revoked)
    }

    /// Begins the cycle's transaction if it has not begun, and publishes its records from the
    /// first not sent up to `to` (after [`cycle::settle`]), in input order.
    fn send_upto(&mut self, cycle: &mut Cycle, to: usize) -> Result<(), Failure> {
        if !cycle.begun() {
            self.delivery.begin()?;
            cycle.counts = Some(publish::Counts::new(&cycle.models));
        }
        let from = cycle.sent;
        cycle::settle(cycle, from, to, &self.refusals.poisoned);
        let publisher = Publisher {
            outputs: &self.outputs,
            loaded: self.loaded,
            models: &cycle.models,
            instance: &self.opts.instance_id,
            set: &self.set,
        };
        let records = cycle.records.get(from..to).unwrap_or_default();
        if let Some(counts) = cycle.counts.as_mut() {
            let producer = self.delivery.producer();
            publisher
                .send_records(producer, records, from, counts)
                .map_err(Failure::NotCommitted)?;
            // The state's changes so far too, so few are left for the cycle's end: in its
            // transaction only. Under at-least-once a cycle cut short would leave changelog
            // records of events whose offsets were never committed, with no partition
            // record to tell a restore (their events read again would be held twice).
            if self.delivery.transactional() {
                let (n, bytes) = publisher
                    .send_changelog(producer, &cycle.next, &mut self.states, false)
                    .map_err(Failure::NotCommitted)?;
                counts.changelog += n;
                counts.changelog_bytes += bytes;
            }
        }
        cycle.sent = to;
        Ok(())
    }

    /// Publishes the rest of the cycle (every score is in), seals its feature state changes
    /// and starts its commit with its input offsets (see [`Delivery::start_commit`]); the
    /// offsets, to finish it with.
    fn publish(&mut self, cycle: &mut Cycle) -> Result<TopicPartitionList, Failure> {
        self.cycles += 1;
        let all = cycle.records.len();
        self.send_upto(cycle, all)?;
        let publisher = Publisher {
            outputs: &self.outputs,
            loaded: self.loaded,
            models: &cycle.models,
            instance: &self.opts.instance_id,
            set: &self.set,
        };
        let mut counts = cycle.counts.clone().unwrap_or_default();
        let (n, bytes) = publisher
            .send_changelog(
                self.delivery.producer(),
                &cycle.next,
                &mut self.states,
                true,
            )
            .map_err(Failure::NotCommitted)?;
        counts.changelog += n;
        counts.changelog_bytes += bytes;
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in &cycle.next {
            offsets
                .add_partition_offset(
                    &self.loaded.topology.input.topic,
                    *partition,
                    Offset::Offset(*next),
                )
                .map_err(Failure::NotCommitted)?;
        }
        // Testing aids (applied only to transactions).
        let inject = self.opts.abort_once_at == Some(self.cycles)
            || self.opts.fail_cycles.as_ref().is_some_and(FailSwitch::on);
        let fault = self
            .opts
            .commit_fault
            .filter(|(at, _)| *at == self.cycles)
            .map(|(_, f)| f);
        self.delivery
            .send_offsets(&self.consumer, &offsets, inject)?;
        // What the changelog holds now awaits the commit; the next cycle's changes are apart.
        for s in self.states.values_mut() {
            s.seal();
        }
        self.delivery
            .start_commit(&mut self.committer, counts, inject, fault);
        Ok(offsets)
    }

    /// The cycle committed (at `at`): its state changes are committed, its outputs counted
    /// and observed.
    fn committed(
        &mut self,
        cycle: &Cycle,
        counts: Counts,
        started: Instant,
        at: Instant,
    ) -> anyhow::Result<()> {
        for (partition, s) in &mut self.states {
            let next = cycle.next.get(partition).copied();
            s.commit_sealed(next);
            if let Some(next) = next {
                self.consumer.context().set_committed(*partition, next);
            }
        }
        self.failures.committed();
        let assigned: Vec<i32> = self
            .consumer
            .assignment()
            .map(|a| a.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        if !self.refusals.committed(&cycle.next, &assigned) {
            self.delivery.back_to_batching()?;
        }
        self.observe(cycle, at);
        let topic = &self.loaded.topology.input.topic;
        CycleCommitted {
            topic,
            consumed: cycle.records.len() as u64,
            scored: counts.scored,
            dead: &counts.dead,
            alerts: counts
                .fired
                .iter()
                .zip(&cycle.models.rule_labels)
                .filter(|(n, _)| **n > 0)
                .map(|(n, (rule, model, version))| {
                    (rule.as_str(), model.as_str(), version.as_str(), *n)
                })
                .collect(),
            changelog_records: counts.changelog,
            changelog_bytes: counts.changelog_bytes,
            took: at.saturating_duration_since(started),
            state_keys: self.states.values().map(FeatureState::keys).sum(),
        }
        .emit();
        self.summary.consumed += cycle.records.len() as u64;
        self.summary.scored += counts.scored;
        self.summary.alerts += counts.alerts;
        self.summary.dead_lettered += counts.dead.values().sum::<u64>();
        self.summary.commits += 1;
        for (member, by_decision) in cycle.models.members.iter().zip(&counts.decisions) {
            for ((d, _), n) in DECISIONS.iter().zip(by_decision) {
                if *n > 0 {
                    member.decided(*d, *n);
                }
            }
        }
        Ok(())
    }

    /// A committed cycle's latency (to its commit at `at`) and drift: only published scores
    /// count.
    fn observe(&mut self, cycle: &Cycle, at: Instant) {
        let now = now_ms().saturating_sub(crate::features::millis(at.elapsed()));
        // The monitors of the set that scored the cycle, locked once for the whole cycle (only
        // this thread observes; a reload's new set shares the monitors of the models it keeps).
        let members = &cycle.models.members;
        let mut drift: Vec<_> = members
            .iter()
            .map(|m| m.drift.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let to_commit = metrics::histogram!(crate::telemetry::metrics::EVENT_TO_COMMIT_SECONDS);
        for p in &cycle.records {
            if let Outcome::Scored {
                event_time,
                features,
                scores,
                ..
            } = &p.outcome
            {
                let secs = now.saturating_sub(*event_time) as f64 / 1000.0;
                to_commit.record(secs);
                self.reporter.latency(secs);
                for (d, (member, s)) in drift.iter_mut().zip(members.iter().zip(scores)) {
                    if let Some(s) = s {
                        d.observe(member.columns.iter().map(|&c| features[c]), s);
                    }
                }
            }
        }
        for d in &drift {
            d.publish();
        }
    }

    /// A failed cycle: settles its transaction; unless the broker says it committed after all,
    /// rolls it back, rewinds the input and waits out the backoff, the group served meanwhile.
    /// `false` when stopping with the outcome unknown (nothing more is sent; a restart finds
    /// the state and offsets of whichever it was).
    fn recover(
        &mut self,
        cycle: &Cycle,
        failure: Failure,
        started: Instant,
        refused: HashMap<usize, rdkafka::error::RDKafkaErrorCode>,
        aborted: bool,
    ) -> anyhow::Result<bool> {
        let (reason, _) = failure.classify();
        let isolate = recovery::learn(
            &refused,
            &cycle.records,
            self.delivery.isolating(),
            &mut self.refusals,
        );
        self.delivery.settle(&failure, isolate, aborted)?;
        let topic = &self.loaded.topology.input.topic;
        let error = match failure {
            Failure::Unknown { error, counts } => {
                match delivery::committed_outcome(&self.consumer, topic, &cycle.next, &self.stop) {
                    Some(true) => {
                        CommitFoundCommitted { error: &error }.emit();
                        self.committed(cycle, *counts, started, Instant::now())?;
                        return Ok(true);
                    }
                    Some(false) => error,
                    None => return Ok(false),
                }
            }
            Failure::NotCommitted(error) => error,
        };
        self.summary.aborts += 1;
        self.failures
            .failed(topic, &cycle.first, &cycle.next, reason.label(), &error);
        self.roll_back(cycle, true);
        let until = Instant::now() + self.failures.backoff();
        while Instant::now() < until && !self.stopping() {
            health::beat();
            self.pressure.hold_now(&self.consumer);
        }
        self.pressure.release(&self.consumer);
        Ok(true)
    }

    /// A revocation or a stop cut the cycle short, or the commit before it failed: what of it
    /// was sent is aborted with its transaction (and the producer made anew, as after any
    /// failure).
    fn discard(&mut self, cycle: &Cycle) -> anyhow::Result<()> {
        CycleDiscarded {
            records: cycle.records.len(),
            published: cycle.sent,
            stopping: self.stopping(),
        }
        .emit();
        if cycle.begun() {
            let isolating = self.delivery.isolating();
            let failure = Failure::NotCommitted(rdkafka::error::KafkaError::Canceled);
            self.delivery.settle(&failure, isolating, false)?;
        }
        self.pressure.release(&self.consumer);
        self.roll_back(cycle, false);
        Ok(())
    }

    /// The cycle never happened: its state changes are taken back (`all`: with everything
    /// since the last commit, a sealed cycle's too; else those of the open level only) and the
    /// partitions it read rewound to where it began (a partition that cannot be rewound gives
    /// up its state, which is then restored again). Partitions reassigned meanwhile start from
    /// the committed offsets anyway.
    fn roll_back(&mut self, cycle: &Cycle, all: bool) {
        for s in self.states.values_mut() {
            if all {
                s.rollback();
            } else {
                s.rollback_open();
            }
        }
        let topic = &self.loaded.topology.input.topic;
        let reassigned = self.consumer.context().awaiting_restore();
        let kept = self.consumer.assignment().unwrap_or_default();
        for (partition, offset) in &cycle.first {
            if reassigned.contains(partition) || kept.find_partition(topic, *partition).is_none() {
                continue;
            }
            if let Err(e) = self.consumer.seek(
                topic,
                *partition,
                Offset::Offset(*offset),
                Duration::from_secs(10),
            ) {
                tracing::warn!(
                    partition,
                    offset,
                    "rewinding failed: {e}; discarding the partition's state"
                );
                self.states.remove(partition);
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, crate::features::millis)
}
