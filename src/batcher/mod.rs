//! Micro-batching of feature rows per model, and the scoring workers behind it.
//!
//! The pipeline hands rows over a batch at a time; they are gathered until `max_rows` are
//! waiting or `max_delay` has passed since the first row of the batch (or the pipeline asks for
//! a flush at a commit), then handed to one of the model's worker threads, each owning its ONNX
//! Runtime session. The channels are bounded, so a slow model makes `try_submit` hand rows back:
//! backpressure reaches the consumer instead of memory growing. Results come back tagged with each row's ticket so the pipeline can put
//! outputs back in input order.

use std::sync::mpsc::{
    Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError, channel, sync_channel,
};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

enum Msg {
    /// Rows (row-major) and their tickets, submitted together: one channel message per batch,
    /// not per row (per-row hand-offs between threads cost more than scoring the row).
    Rows(Vec<Ticket>, Vec<f32>),
    Flush,
}

struct Batch {
    tickets: Vec<Ticket>,
    rows: Vec<f32>,
}

/// One model's batcher thread and worker pool.
pub struct ModelBatcher {
    tx: SyncSender<Msg>,
    max_rows: usize,
    info: ModelInfo,
    threads: Vec<JoinHandle<()>>,
}

impl ModelBatcher {
    /// Opens the model's sessions (one per worker) and starts its threads. Results go to `out`.
    pub fn start(
        index: usize,
        model: &Model,
        path: &std::path::Path,
        out: Sender<Scored>,
        throttle: Option<f64>,
    ) -> Result<Self, ScorerError> {
        let mut sessions = Vec::new();
        for _ in 0..model.workers.max(1) {
            let mut session = ScoringSession::open(model, path)?;
            // Warm-up: the first run allocates and plans; paying for it here keeps it out of
            // the first cycle's latency, and a model that cannot run fails the start.
            session.score(&vec![0.0; session.info().width])?;
            sessions.push(session);
        }
        let info = sessions[0].info().clone();
        let max_rows = model.batching.max_rows.max(1);
        let max_delay = model.batching.max_delay;
        let width = info.width;
        // Room for a few batches of rows; beyond that `try_submit` hands them back.
        let (tx, rx) = sync_channel::<Msg>(4);
        let (batch_tx, batch_rx) = sync_channel::<Batch>(sessions.len() * 2);
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        let mut threads = Vec::new();
        let name = model.name.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("batch-{name}"))
                .spawn(move || gather(rx, batch_tx, max_rows, max_delay, width))
                .map_err(|e| ScorerError::Run {
                    model: model.name.clone(),
                    reason: e.to_string(),
                })?,
        );
        for (w, mut session) in sessions.into_iter().enumerate() {
            let rx = batch_rx.clone();
            let out = out.clone();
            let name = name.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("score-{name}-{w}"))
                    .spawn(move || {
                        loop {
                            let batch = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                                Ok(b) => b,
                                Err(_) => return,
                            };
                            let started = Instant::now();
                            let n = batch.tickets.len();
                            let rows = match session.score(&batch.rows) {
                                Ok(scores) => Ok(batch
                                    .tickets
                                    .iter()
                                    .enumerate()
                                    .map(|(i, t)| (*t, scores.iter().map(|s| s[i]).collect()))
                                    .collect()),
                                Err(e) => Err((batch.tickets, e)),
                            };
                            if let Some(rate) = throttle.filter(|r| *r > 0.0) {
                                // Testing aid: a model this many rows per second slow.
                                let due = Duration::from_secs_f64(n as f64 / rate);
                                std::thread::sleep(due.saturating_sub(started.elapsed()));
                            }
                            metrics::histogram!(names::BATCH_ROWS, "model" => name.clone())
                                .record(n as f64);
                            metrics::histogram!(names::SCORING_SECONDS, "model" => name.clone())
                                .record(started.elapsed().as_secs_f64());
                            if out.send(Scored { model: index, rows }).is_err() {
                                return;
                            }
                        }
                    })
                    .map_err(|e| ScorerError::Run {
                        model: model.name.clone(),
                        reason: e.to_string(),
                    })?,
            );
        }
        Ok(ModelBatcher {
            tx,
            max_rows,
            info,
            threads,
        })
    }

    /// The model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Most rows in one batch.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Queues rows (row-major, `tickets.len()` of them) unless the model's queue is full;
    /// then they come back, so the caller can do something useful (keep its consumer
    /// polling) before it tries again.
    pub fn try_submit(
        &self,
        tickets: Vec<Ticket>,
        rows: Vec<f32>,
    ) -> Result<(), (Vec<Ticket>, Vec<f32>)> {
        match self.tx.try_send(Msg::Rows(tickets, rows)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => Ok(()),
            Err(TrySendError::Full(Msg::Rows(t, r))) => Err((t, r)),
            Err(TrySendError::Full(Msg::Flush)) => Ok(()),
        }
    }

    /// Sends what is waiting to the workers now.
    pub fn flush(&self) {
        match self.tx.try_send(Msg::Flush) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(m)) => {
                let _ = self.tx.send(m);
            }
        }
    }

    /// Stops the threads after the queued work is done.
    pub fn shutdown(self) {
        drop(self.tx);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn gather(
    rx: Receiver<Msg>,
    out: SyncSender<Batch>,
    max_rows: usize,
    max_delay: Duration,
    width: usize,
) {
    let mut batch = Batch {
        tickets: Vec::with_capacity(max_rows),
        rows: Vec::with_capacity(max_rows * width),
    };
    let mut deadline: Option<Instant> = None;
    loop {
        let msg = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        let flush = match msg {
            Ok(Msg::Rows(tickets, rows)) => {
                if batch.tickets.is_empty() {
                    deadline = Some(Instant::now() + max_delay);
                }
                batch.tickets.extend_from_slice(&tickets);
                batch.rows.extend_from_slice(&rows);
                batch.tickets.len() >= max_rows
            }
            Ok(Msg::Flush) | Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => {
                if !batch.tickets.is_empty() {
                    let _ = out.send(batch);
                }
                return;
            }
        };
        if flush && !batch.tickets.is_empty() {
            let full = std::mem::replace(
                &mut batch,
                Batch {
                    tickets: Vec::with_capacity(max_rows),
                    rows: Vec::with_capacity(max_rows * width),
                },
            );
            if out.send(full).is_err() {
                return;
            }
        }
        if flush {
            deadline = None;
        }
    }
}

/// Starts a batcher per model of a topology; results of all of them arrive on the returned receiver.
pub fn start_all(
    models: &[Model],
    paths: &[std::path::PathBuf],
    throttle: Option<f64>,
) -> Result<(Vec<ModelBatcher>, Receiver<Scored>), ScorerError> {
    let (tx, rx) = channel();
    let mut batchers = Vec::new();
    for (i, (m, p)) in models.iter().zip(paths).enumerate() {
        batchers.push(ModelBatcher::start(i, m, p, tx.clone(), throttle)?);
    }
    Ok((batchers, rx))
}
