//! Micro-batching of feature rows per model, and the scoring workers behind it.
//!
//! The pipeline hands rows over a batch at a time; they are gathered until the batch-size cap
//! is reached or the delay has passed since the first row of the batch was handed over (or the
//! pipeline asks for a flush at a commit), then handed to one of the model's worker threads,
//! each owning its ONNX Runtime session. The cap and the delay are `max_rows` and `max_delay`,
//! or adapted to a `latency_budget` ([`pace`]). The channels are bounded, so a slow model makes
//! `try_submit` hand rows back: backpressure reaches the consumer instead of memory growing.
//! Results come back tagged with each row's ticket so the pipeline can put outputs back in
//! input order.
//!
//! A worker that dies (a panic) never takes rows with it silently: the batcher reports it as
//! [`BatcherError::Died`] to the next call, and the pipeline stops rather than wait for scores
//! that will never come (nothing of the cycle is committed; a restart resumes it).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod pace;

use pace::Pace;

use crate::scorer::{ModelInfo, ScorerError, ScoringSession};
use crate::telemetry::metrics as names;
use crate::topology::config::Model;

/// A row's place in the pipeline's current cycle.
pub type Ticket = u64;

/// A batch that could not be scored: its tickets and why.
pub type Failed = (Vec<Ticket>, ScorerError);

/// Scores of one batch: per row, its ticket and one value per score of the model.
#[derive(Debug)]
pub struct Scored {
    /// Index of the model in the topology.
    pub model: usize,
    /// Result per row, in submission order.
    pub rows: Result<Vec<(Ticket, Vec<f64>)>, Failed>,
}

/// What scores rows: a model session, owned by one worker thread.
pub trait Scorer: Send + 'static {
    /// The model.
    fn info(&self) -> &ModelInfo;
    /// Scores `rows` (row-major): one vector per score, one value per row.
    fn score(&mut self, rows: &[f32]) -> Result<Vec<Vec<f64>>, ScorerError>;
}

impl Scorer for ScoringSession {
    fn info(&self) -> &ModelInfo {
        ScoringSession::info(self)
    }
    fn score(&mut self, rows: &[f32]) -> Result<Vec<Vec<f64>>, ScorerError> {
        ScoringSession::score(self, rows)
    }
}

/// A batcher that can no longer score.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatcherError {
    /// One of the model's threads ended (a panic): rows handed to it are lost.
    #[error(
        "model {model}: a scoring thread died ({reason}); stopping, the cycle in progress is not committed"
    )]
    Died {
        /// The model.
        model: String,
        /// The panic's message, where it had one.
        reason: String,
    },
}

/// Why rows were not taken.
#[derive(Debug)]
pub enum Refused {
    /// The model's queue is full: try again later.
    Full(Vec<Ticket>, Vec<f32>),
    /// The batcher is dead.
    Dead(BatcherError),
}

enum Msg {
    /// Rows (row-major) and their tickets, submitted together: one channel message per batch,
    /// not per row (per-row hand-offs between threads cost more than scoring the row); and
    /// when they were handed over.
    Rows(Vec<Ticket>, Vec<f32>, Instant),
    Flush,
}

struct Batch {
    tickets: Vec<Ticket>,
    rows: Vec<f32>,
    /// When its first row was handed over.
    since: Instant,
    /// When it was handed to the workers.
    sent: Instant,
}

impl Batch {
    fn empty(max_rows: usize, width: usize) -> Self {
        Batch {
            tickets: Vec::with_capacity(max_rows),
            rows: Vec::with_capacity(max_rows * width),
            since: Instant::now(),
            sent: Instant::now(),
        }
    }
}

/// Hands a batch to the workers; false once they are gone.
fn send(out: &SyncSender<Batch>, mut batch: Batch) -> bool {
    batch.sent = Instant::now();
    out.send(batch).is_ok()
}

/// One model's batcher thread and worker pool.
pub struct ModelBatcher {
    tx: SyncSender<Msg>,
    max_rows: usize,
    info: ModelInfo,
    threads: Vec<JoinHandle<()>>,
    /// Why a thread died, if one did.
    died: Arc<Mutex<Option<String>>>,
    /// The batch-size cap and delay now.
    pace: Arc<Pace>,
}

/// Runs `body`, noting why it died if it panicked, so the pipeline can say so instead of
/// waiting for rows that will never come.
fn guarded(
    died: Arc<Mutex<Option<String>>>,
    body: Box<dyn FnOnce() + Send>,
) -> impl FnOnce() + Send + 'static {
    move || {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(body)) {
            let reason = panic_message(&*panic);
            tracing::error!("scoring thread died: {reason}");
            died.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(reason);
        }
    }
}

/// A scoring worker: takes batches from its model's queue, scores them with its own session,
/// and sends the rows' scores (or the batch's failure) back.
struct Worker {
    model: usize,
    name: String,
    session: Box<dyn Scorer>,
    batches: Arc<Mutex<Receiver<Batch>>>,
    out: Sender<Scored>,
    throttle: Option<f64>,
    pace: Arc<Pace>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let batch = match self
                .batches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv()
            {
                Ok(b) => b,
                Err(_) => return,
            };
            let started = Instant::now();
            let n = batch.tickets.len();
            let rows = match self.session.score(&batch.rows) {
                Ok(scores) => rows_of(&self.name, &batch.tickets, &scores),
                Err(e) => Err(e),
            }
            .map_err(|e| (batch.tickets, e));
            if let Some(due) = self
                .throttle
                .filter(|r| *r > 0.0)
                .and_then(|rate| Duration::try_from_secs_f64(n as f64 / rate).ok())
            {
                // Testing aid: a model this many rows per second slow.
                std::thread::sleep(due.saturating_sub(started.elapsed()));
            }
            // What the batching decides: how long the batch was gathered, and how long a batch
            // of its size takes to score (not the wait for a free worker: see `pace`).
            self.pace
                .observe(batch.sent.saturating_duration_since(batch.since) + started.elapsed());
            metrics::histogram!(names::BATCH_ROWS, "model" => self.name.clone()).record(n as f64);
            metrics::histogram!(names::SCORING_SECONDS, "model" => self.name.clone())
                .record(started.elapsed().as_secs_f64());
            let scored = Scored {
                model: self.model,
                rows,
            };
            if self.out.send(scored).is_err() {
                return;
            }
        }
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".into())
}

impl ModelBatcher {
    /// Opens the model's sessions (one per worker) and starts its threads. Results go to `out`.
    pub fn start(
        index: usize,
        model: &Model,
        path: &std::path::Path,
        version: Option<&str>,
        out: Sender<Scored>,
        throttle: Option<f64>,
    ) -> Result<Self, ScorerError> {
        let mut sessions: Vec<Box<dyn Scorer>> = Vec::new();
        for _ in 0..model.workers.max(1) {
            let mut session = ScoringSession::open(model, path)?;
            if let Some(v) = version {
                session.set_version(v);
            }
            // Warm-up: the first run allocates and plans; paying for it here keeps it out of
            // the first cycle's latency, and a model that cannot run, or scores a row of zeros
            // as something other than a finite number, fails the start (or the reload).
            let warm = session.score(&vec![0.0; session.info().width])?;
            if let Some(bad) = warm.iter().flatten().find(|v| !v.is_finite()) {
                return Err(ScorerError::Run {
                    model: model.name.clone(),
                    reason: format!("the warm-up row scored {bad}, not a finite number"),
                });
            }
            sessions.push(Box::new(session));
        }
        Self::start_with(index, model, sessions, out, throttle)
    }

    /// Starts the model's threads with these scorers (one worker each; at least one).
    pub fn start_with(
        index: usize,
        model: &Model,
        sessions: Vec<Box<dyn Scorer>>,
        out: Sender<Scored>,
        throttle: Option<f64>,
    ) -> Result<Self, ScorerError> {
        let info = sessions
            .first()
            .map(|s| s.info().clone())
            .ok_or_else(|| ScorerError::Run {
                model: model.name.clone(),
                reason: "no scoring workers".into(),
            })?;
        let died: Arc<Mutex<Option<String>>> = Arc::default();
        let max_rows = model.batching.max_rows.max(1);
        let pace = Arc::new(Pace::new(&model.name, &model.batching));
        let width = info.width;
        // Room for a few batches of rows; beyond that `try_submit` hands them back.
        let (tx, rx) = sync_channel::<Msg>(4);
        let (batch_tx, batch_rx) = sync_channel::<Batch>(sessions.len() * 2);
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        let spawn = |thread: String, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(thread)
                .spawn(guarded(died.clone(), body))
                .map_err(|e| ScorerError::Run {
                    model: model.name.clone(),
                    reason: e.to_string(),
                })
        };
        let gather_pace = pace.clone();
        let mut threads = vec![spawn(
            format!("batch-{}", model.name),
            Box::new(move || gather(rx, batch_tx, &gather_pace, max_rows, width)),
        )?];
        for (w, session) in sessions.into_iter().enumerate() {
            let worker = Worker {
                model: index,
                name: model.name.clone(),
                session,
                batches: batch_rx.clone(),
                out: out.clone(),
                throttle,
                pace: pace.clone(),
            };
            threads.push(spawn(
                format!("score-{}-{w}", model.name),
                Box::new(move || worker.run()),
            )?);
        }
        Ok(ModelBatcher {
            tx,
            max_rows,
            info,
            threads,
            died,
            pace,
        })
    }

    /// `Err` once one of the model's threads has died.
    pub fn check(&self) -> Result<(), BatcherError> {
        let died = self.died.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let reason = died.or_else(|| {
            self.threads
                .iter()
                .any(JoinHandle::is_finished)
                .then(|| "the thread ended".to_string())
        });
        match reason {
            None => Ok(()),
            Some(reason) => Err(BatcherError::Died {
                model: self.info.name.clone(),
                reason,
            }),
        }
    }

    /// The model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Most rows in one batch.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// The batch-size cap and delay the batching is at now.
    pub fn limits(&self) -> pace::Limits {
        self.pace.limits()
    }

    /// Queues rows (row-major, `tickets.len()` of them) unless the model's queue is full;
    /// then they come back, so the caller can do something useful (keep its consumer
    /// polling) before it tries again.
    pub fn try_submit(&self, tickets: Vec<Ticket>, rows: Vec<f32>) -> Result<(), Refused> {
        self.check().map_err(Refused::Dead)?;
        match self.tx.try_send(Msg::Rows(tickets, rows, Instant::now())) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Msg::Rows(t, r, _))) => Err(Refused::Full(t, r)),
            Err(TrySendError::Full(Msg::Flush)) => Ok(()),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Dead(self.died_now())),
        }
    }

    fn died_now(&self) -> BatcherError {
        self.check().err().unwrap_or_else(|| BatcherError::Died {
            model: self.info.name.clone(),
            reason: "its batching thread is gone".into(),
        })
    }

    /// Sends what is waiting to the workers now.
    pub fn flush(&self) -> Result<(), BatcherError> {
        self.check()?;
        match self.tx.try_send(Msg::Flush) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(m)) => self.tx.send(m).map_err(|_| self.died_now()),
            Err(TrySendError::Disconnected(_)) => Err(self.died_now()),
        }
    }

    /// Stops the threads after the queued work is done (as dropping it does).
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for ModelBatcher {
    /// Closes its queue (the batching thread sends what it holds and ends, and the workers
    /// after it) and waits for its threads: a replaced model's sessions are freed here.
    fn drop(&mut self) {
        let (closed, _) = sync_channel(0);
        drop(std::mem::replace(&mut self.tx, closed));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The batching thread: rows in, batches of at most the pace's cap out.
fn gather(rx: Receiver<Msg>, out: SyncSender<Batch>, pace: &Pace, max_rows: usize, width: usize) {
    let mut batch = Batch::empty(max_rows, width);
    let mut deadline: Option<Instant> = None;
    loop {
        let msg = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        let flush = match msg {
            Ok(Msg::Rows(tickets, rows, handed_over)) => {
                let limits = pace.limits();
                // The pace keeps the cap at one row or more.
                let cap = limits.rows.max(1);
                if batch.tickets.is_empty() {
                    batch.since = handed_over;
                    // A delay too long to add (validation bounds it) is no deadline: the
                    // pipeline's flush at the end of the cycle sends the batch.
                    deadline = handed_over.checked_add(limits.delay);
                }
                batch.tickets.extend_from_slice(&tickets);
                batch.rows.extend_from_slice(&rows);
                // Full batches go at the cap; rows over it start the next batch.
                while batch.tickets.len() >= cap {
                    let rest = Batch {
                        tickets: batch.tickets.split_off(cap),
                        rows: batch.rows.split_off(cap * width),
                        since: handed_over,
                        sent: handed_over,
                    };
                    if !send(&out, std::mem::replace(&mut batch, rest)) {
                        return;
                    }
                    deadline = if batch.tickets.is_empty() {
                        None
                    } else {
                        handed_over.checked_add(limits.delay)
                    };
                }
                false
            }
            Ok(Msg::Flush) | Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => {
                if !batch.tickets.is_empty() {
                    send(&out, batch);
                }
                return;
            }
        };
        if flush {
            if !batch.tickets.is_empty()
                && !send(
                    &out,
                    std::mem::replace(&mut batch, Batch::empty(max_rows, width)),
                )
            {
                return;
            }
            deadline = None;
        }
    }
}

/// Per row of a batch, its ticket and its scores; an error if the model gave fewer values than
/// rows.
fn rows_of(
    model: &str,
    tickets: &[Ticket],
    scores: &[Vec<f64>],
) -> Result<Vec<(Ticket, Vec<f64>)>, ScorerError> {
    if let Some(short) = scores.iter().find(|s| s.len() < tickets.len()) {
        return Err(ScorerError::Run {
            model: model.to_string(),
            reason: format!(
                "the model gave {} values for a batch of {} rows",
                short.len(),
                tickets.len()
            ),
        });
    }
    Ok(tickets
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, scores.iter().map(|s| s[i]).collect()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::config::{Batching, ExecutionProvider};
    use std::sync::mpsc::channel;

    /// Scores each row as the sum of its columns; panics on a row whose first column is NaN.
    struct Sum(ModelInfo);

    impl Scorer for Sum {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn score(&mut self, rows: &[f32]) -> Result<Vec<Vec<f64>>, ScorerError> {
            let sums: Vec<f64> = rows
                .chunks(2)
                .map(|r| {
                    assert!(!r[0].is_nan(), "a row it cannot take");
                    f64::from(r[0] + r[1])
                })
                .collect();
            Ok(vec![sums])
        }
    }

    fn model(max_delay: Duration) -> Model {
        Model {
            name: "m".into(),
            path: "m.onnx".into(),
            version: None,
            role: crate::topology::Role::Primary,
            of: None,
            share: None,
            features: vec!["a".into(), "b".into()],
            scores: vec![],
            batching: Batching {
                max_rows: 4,
                max_delay: Some(max_delay),
                latency_budget: None,
            },
            execution_provider: ExecutionProvider::Cpu,
            workers: 1,
        }
    }

    /// The test model's description: two columns.
    fn info() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            version: "v".into(),
            input: "x".into(),
            width: 2,
            reference: None,
        }
    }

    fn start(max_delay: Duration) -> (ModelBatcher, Receiver<Scored>) {
        let (tx, rx) = channel();
        let b =
            ModelBatcher::start_with(0, &model(max_delay), vec![Box::new(Sum(info()))], tx, None)
                .expect("starts");
        (b, rx)
    }

    fn submit(b: &ModelBatcher, tickets: Vec<Ticket>, rows: Vec<f32>) -> Result<(), Refused> {
        b.try_submit(tickets, rows)
    }

    /// A `max_delay` too long to add to a clock reading is no deadline, not a panic that kills
    /// the batching thread (and with it every row handed over).
    #[test]
    fn a_huge_max_delay_does_not_kill_the_batcher() {
        let (b, rx) = start(Duration::MAX);
        assert!(submit(&b, vec![1], vec![1.0, 2.0]).is_ok());
        b.flush().expect("alive");
        let scored = rx.recv_timeout(Duration::from_secs(10)).expect("scores");
        assert_eq!(scored.rows.expect("scored"), vec![(1, vec![3.0])]);
        assert_eq!(b.check(), Ok(()));
    }

    /// A worker that dies is an error on the next call, never rows that silently vanish.
    #[test]
    fn a_dead_worker_is_reported_not_waited_for() {
        let (b, rx) = start(Duration::from_millis(1));
        assert!(submit(&b, vec![1], vec![f32::NAN, 0.0]).is_ok());
        b.flush().expect("handed over");
        // No scores come back for the rows it had...
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
        // ... and the batcher says why.
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.check().is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = b.check().expect_err("dead");
        assert!(
            matches!(&err, BatcherError::Died { model, reason } if model == "m" && reason.contains("a row it cannot take")),
            "{err}"
        );
        assert!(matches!(
            submit(&b, vec![2], vec![1.0, 1.0]),
            Err(Refused::Dead(_))
        ));
        assert!(b.flush().is_err());
    }

    /// A model with a fixed cost per call, as real ones have (2 ms, plus 20 µs a row): one row
    /// at a time it scores under 500 rows/s, in batches of 200 about 30 times that.
    struct Slow(ModelInfo);

    impl Scorer for Slow {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn score(&mut self, rows: &[f32]) -> Result<Vec<Vec<f64>>, ScorerError> {
            let n = rows.len() / 2;
            std::thread::sleep(Duration::from_micros(2_000 + 20 * n as u64));
            Ok(vec![vec![0.0; n]])
        }
    }

    /// Under a load one-row batches cannot carry (5,000 rows/s), a 50 ms latency budget grows
    /// the batches from one row to what the load needs, and then holds each row's latency
    /// (handed over to scored, queueing included) under the budget: p99 over the second half
    /// of the run. Every row is scored once.
    #[test]
    fn a_latency_budget_grows_batches_under_load_and_holds_the_p99() {
        let budget = Duration::from_millis(50);
        let mut m = model(Duration::ZERO);
        m.batching = Batching {
            max_rows: 512,
            max_delay: None,
            latency_budget: Some(budget),
        };
        let (tx, rx) = channel();
        let b = ModelBatcher::start_with(0, &m, vec![Box::new(Slow(info()))], tx, None)
            .expect("starts");
        let (rows, per_message) = (10_000u64, 10u64);
        // Scores are taken as they come: (batch size, per row its ticket, when it came back).
        let receiver = std::thread::spawn(move || {
            let mut batches = Vec::new();
            let mut got = 0;
            while got < rows as usize {
                let scored = rx.recv_timeout(Duration::from_secs(10)).expect("scores");
                let done = Instant::now();
                let batch = scored.rows.expect("scored");
                got += batch.len();
                batches.push((done, batch.into_iter().map(|(t, _)| t).collect::<Vec<_>>()));
            }
            batches
        });
        let run = Duration::from_secs(2);
        let started = Instant::now();
        let mut handed = Vec::with_capacity(rows as usize);
        let mut next: Ticket = 0;
        while next < rows {
            // 5,000 rows/s, in messages of 10, as the pipeline hands rows over.
            let due = started + run.mul_f64(next as f64 / rows as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let tickets: Vec<Ticket> = (next..next + per_message).collect();
            let mut pending = (tickets, vec![1.0; 2 * per_message as usize]);
            loop {
                match b.try_submit(pending.0, pending.1) {
                    Ok(()) => break,
                    Err(Refused::Full(t, r)) => {
                        pending = (t, r);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(Refused::Dead(e)) => panic!("{e}"),
                }
            }
            handed.extend(std::iter::repeat_n(Instant::now(), per_message as usize));
            next += per_message;
        }
        b.flush().expect("alive");
        let batches = receiver.join().expect("receiver");
        let mut latency = vec![Duration::ZERO; rows as usize];
        let mut seen = vec![0u32; rows as usize];
        let mut sizes = Vec::new();
        for (done, tickets) in &batches {
            sizes.push(tickets.len());
            for t in tickets {
                latency[*t as usize] = done.saturating_duration_since(handed[*t as usize]);
                seen[*t as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "every row scored once");
        assert_eq!(sizes[0], 1, "batches start at one row: {:?}", &sizes[..5]);
        let late: Vec<usize> = sizes[sizes.len() / 2..].to_vec();
        let mean = late.iter().sum::<usize>() as f64 / late.len() as f64;
        assert!(
            mean >= 20.0,
            "batches grew: {mean:.0} rows in the second half"
        );
        let mut second_half = latency[rows as usize / 2..].to_vec();
        second_half.sort();
        let p99 = second_half[second_half.len() * 99 / 100];
        assert!(p99 <= budget, "p99 {p99:?} over the budget {budget:?}");
        let limits = b.limits();
        eprintln!(
            "{} batches, first {:?}, second half {mean:.0} rows on average, p99 {p99:?}, now {limits:?}",
            sizes.len(),
            &sizes[..sizes.len().min(8)]
        );
        assert!(limits.rows > 1 && limits.delay <= budget / 2, "{limits:?}");
        b.shutdown();
    }
}
