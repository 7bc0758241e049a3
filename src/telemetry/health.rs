//! Liveness and readiness, as the HTTP endpoints report them. The pipeline reports here:
//! a beat each turn of its loop (also while it waits on the models or restores state), its
//! group assignment, the partitions waiting for their state
//! to be restored, and warm model sessions. Commands that run no pipeline are live and ready.
//!
//! * live: the processing loop turned in the last [`STALL`] (a loop stuck in a call that never
//!   returns is what a restart cures);
//! * ready: live, the model sessions ran their warm-up batch, the consumer received its first
//!   assignment, no assigned partition is still waiting for its state to be restored, the
//!   output producer is not being re-created (as it is while the broker is unreachable: the
//!   process stays live then, since a restart would do no better), no commit has been under
//!   way for longer than [`COMMIT_SLOW`] (its broker calls are failing or retried: a
//!   commit takes milliseconds while the broker answers), and fewer than
//!   [`FAILED_CYCLES_NOT_READY`] cycles in a row have failed to commit.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::metrics as names;

/// How long the loop may go without a beat before the process is reported not live.
pub const STALL: Duration = Duration::from_secs(60);

static WATCHED: AtomicBool = AtomicBool::new(false);
static LAST_BEAT_MS: AtomicI64 = AtomicI64::new(0);
static MODELS_WARM: AtomicBool = AtomicBool::new(false);
static ASSIGNED: AtomicBool = AtomicBool::new(false);
static RESTORING: AtomicUsize = AtomicUsize::new(0);
static PRODUCER_DOWN: AtomicBool = AtomicBool::new(false);
static FAILED_CYCLES: AtomicU32 = AtomicU32::new(0);
/// When the commit under way began (ms since the epoch; 0: none is).
static COMMIT_SINCE_MS: AtomicI64 = AtomicI64::new(0);

/// A commit under way for longer than this makes the process not ready until it ends.
pub const COMMIT_SLOW: Duration = Duration::from_secs(10);

/// Consecutive failed cycles after which the process is reported not ready (until a cycle
/// commits again).
pub const FAILED_CYCLES_NOT_READY: u32 = 3;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, crate::features::millis)
}

/// A pipeline starts: from now on liveness and readiness follow it.
pub fn pipeline_started() {
    MODELS_WARM.store(false, Ordering::SeqCst);
    ASSIGNED.store(false, Ordering::SeqCst);
    RESTORING.store(0, Ordering::SeqCst);
    PRODUCER_DOWN.store(false, Ordering::SeqCst);
    FAILED_CYCLES.store(0, Ordering::SeqCst);
    COMMIT_SINCE_MS.store(0, Ordering::SeqCst);
    beat();
    WATCHED.store(true, Ordering::SeqCst);
    publish();
}

/// The pipeline made progress.
pub fn beat() {
    LAST_BEAT_MS.store(now_ms(), Ordering::Relaxed);
}

/// Every model session ran its warm-up batch.
pub fn models_warm() {
    MODELS_WARM.store(true, Ordering::SeqCst);
    publish();
}

/// The consumer received an assignment (possibly empty: more members than partitions).
pub fn assigned() {
    ASSIGNED.store(true, Ordering::SeqCst);
    publish();
}

/// `n` assigned partitions wait for their state to be restored (0: none).
pub fn awaiting_restore(n: usize) {
    RESTORING.store(n, Ordering::SeqCst);
    publish();
}

/// The output producer failed and is being re-created (`true`), or is ready again (`false`).
pub fn producer_down(down: bool) {
    PRODUCER_DOWN.store(down, Ordering::SeqCst);
    publish();
}

/// `n` cycles in a row have failed to commit (0: the last one committed).
pub fn failed_cycles(n: u32) {
    FAILED_CYCLES.store(n, Ordering::SeqCst);
    publish();
}

/// A commit began (`true`) or ended (`false`).
pub fn committing(on: bool) {
    COMMIT_SINCE_MS.store(if on { now_ms().max(1) } else { 0 }, Ordering::SeqCst);
    publish();
}

/// The health of the process at this moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// See the module documentation.
    pub live: bool,
    /// See the module documentation.
    pub ready: bool,
    /// Whether a pipeline runs in this process.
    pub pipeline: bool,
    /// Milliseconds since the pipeline's last beat.
    pub last_beat_ms_ago: Option<i64>,
    /// Model sessions warm.
    pub models_warm: bool,
    /// First assignment received.
    pub assigned: bool,
    /// Assigned partitions whose state is not restored yet.
    pub restoring: usize,
    /// The output producer is being re-created.
    pub producer_down: bool,
    /// Cycles in a row that failed to commit.
    pub failed_cycles: u32,
    /// Milliseconds the commit under way has taken so far (`None`: none is under way).
    pub commit_ms: Option<i64>,
}

/// The current report.
pub fn report() -> Report {
    if !WATCHED.load(Ordering::SeqCst) {
        return Report {
            live: true,
            ready: true,
            pipeline: false,
            last_beat_ms_ago: None,
            models_warm: false,
            assigned: false,
            restoring: 0,
            producer_down: false,
            failed_cycles: 0,
            commit_ms: None,
        };
    }
    let ago = now_ms() - LAST_BEAT_MS.load(Ordering::Relaxed);
    let live = ago <= STALL.as_millis() as i64;
    let models_warm = MODELS_WARM.load(Ordering::SeqCst);
    let assigned = ASSIGNED.load(Ordering::SeqCst);
    let restoring = RESTORING.load(Ordering::SeqCst);
    let producer_down = PRODUCER_DOWN.load(Ordering::SeqCst);
    let failed_cycles = FAILED_CYCLES.load(Ordering::SeqCst);
    let now = now_ms();
    let commit_ms = Some(COMMIT_SINCE_MS.load(Ordering::SeqCst))
        .filter(|since| *since != 0)
        .map(|since| (now - since).max(0));
    Report {
        live,
        ready: live
            && models_warm
            && assigned
            && restoring == 0
            && !producer_down
            && commit_ms.is_none_or(|ms| ms <= COMMIT_SLOW.as_millis() as i64)
            && failed_cycles < FAILED_CYCLES_NOT_READY,
        pipeline: true,
        last_beat_ms_ago: Some(ago),
        models_warm,
        assigned,
        restoring,
        producer_down,
        failed_cycles,
        commit_ms,
    }
}

/// Sets the readiness gauge from the current report (also before each scrape, since a
/// stalled loop or a slow commit changes it with no event).
pub fn publish() {
    metrics::gauge!(names::READY).set(if report().ready { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test touching the process-wide state.
    #[test]
    fn ready_only_once_warm_assigned_and_restored() {
        assert!(report().ready && report().live && !report().pipeline);
        pipeline_started();
        let r = report();
        assert!(r.live && !r.ready, "{r:?}");
        models_warm();
        assert!(!report().ready, "no assignment yet");
        awaiting_restore(2);
        assigned();
        assert!(!report().ready, "two partitions still to restore");
        awaiting_restore(0);
        let r = report();
        assert!(
            r.ready && r.models_warm && r.assigned && r.restoring == 0,
            "{r:?}"
        );
        // A rebalance: partitions wait for their state again.
        awaiting_restore(1);
        assert!(!report().ready);
        awaiting_restore(0);
        // The broker unreachable: the producer is re-created, live but not ready.
        producer_down(true);
        let r = report();
        assert!(r.live && !r.ready && r.producer_down, "{r:?}");
        producer_down(false);
        assert!(report().ready);
        // Cycles failing to commit: ready until the stated number in a row, then not.
        for n in 1..FAILED_CYCLES_NOT_READY {
            failed_cycles(n);
            assert!(report().ready, "{n} failed cycles");
        }
        failed_cycles(FAILED_CYCLES_NOT_READY);
        let r = report();
        assert!(
            r.live && !r.ready && r.failed_cycles == FAILED_CYCLES_NOT_READY,
            "{r:?}"
        );
        failed_cycles(0);
        assert!(report().ready);
        // A commit under way: ready while it is quick, not once it has taken too long.
        committing(true);
        assert!(report().ready && report().commit_ms.is_some());
        COMMIT_SINCE_MS.store(
            now_ms() - COMMIT_SLOW.as_millis() as i64 - 1_000,
            Ordering::SeqCst,
        );
        let r = report();
        assert!(r.live && !r.ready, "{r:?}");
        committing(false);
        let r = report();
        assert!(r.ready && r.commit_ms.is_none(), "{r:?}");
        // A loop that stopped turning is neither live nor ready.
        LAST_BEAT_MS.store(
            now_ms() - STALL.as_millis() as i64 - 1_000,
            Ordering::Relaxed,
        );
        let r = report();
        assert!(!r.live && !r.ready, "{r:?}");
        beat();
        assert!(report().ready);
    }
}
