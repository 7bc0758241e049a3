//! What the loop tells a person: the one-line summary on stdout, a consumer that receives
//! nothing although records wait, and a warning that would repeat on every poll.

use std::io::Write as _;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::{Input, RunSummary};

/// Notices a consumer that receives nothing although records wait in its assigned partitions
/// (a fetch stuck in the client or the broker), and says so once every [`Starved::AFTER`],
/// with each such partition's position and end, so it can be told from a quiet input.
pub(super) struct Starved {
    last_record: Instant,
    last_check: Instant,
    /// Records came since the last empty poll.
    received: bool,
}

impl Starved {
    const AFTER: Duration = Duration::from_secs(30);

    pub(super) fn new() -> Self {
        Starved {
            last_record: Instant::now(),
            last_check: Instant::now(),
            received: false,
        }
    }

    /// A record came (the clock is read at the next empty poll, not per record).
    pub(super) fn received(&mut self) {
        self.received = true;
    }

    pub(super) fn check(&mut self, consumer: &Input, topic: &str) {
        if std::mem::take(&mut self.received) {
            self.last_record = Instant::now();
        }
        if self.last_record.elapsed() < Self::AFTER || self.last_check.elapsed() < Self::AFTER {
            return;
        }
        self.last_check = Instant::now();
        let waiting = consumer.context().awaiting_restore();
        let Ok(positions) = consumer.position() else {
            return;
        };
        for e in positions.elements_for_topic(topic) {
            let p = e.partition();
            if waiting.contains(&p) {
                continue;
            }
            let Ok((start, end)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(2))
            else {
                continue;
            };
            let position = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            // Before its first record a partition has no position: it starts at the group's
            // committed offset, else at the partition's start.
            let from = position.unwrap_or_else(|| {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, p);
                consumer
                    .committed_offsets(tpl, Duration::from_secs(2))
                    .ok()
                    .and_then(|c| match c.find_partition(topic, p)?.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(start)
            });
            if from < end {
                tracing::warn!(
                    partition = p,
                    ?position,
                    end,
                    seconds = self.last_record.elapsed().as_secs(),
                    from,
                    "no record received although the partition has records waiting: a \
                     producer's transaction on the input still open, or a fetch stuck in the \
                     client or the broker (a position of None: none consumed since the \
                     assignment)"
                );
            }
        }
    }
}

/// A warning that would repeat on every poll while the broker is away (once per 10 s, with
/// how many were suppressed).
pub(super) struct Throttled {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    pub(super) fn new(what: &'static str) -> Self {
        Throttled {
            what,
            last: None,
            suppressed: 0,
        }
    }

    pub(super) fn note(&mut self, e: &dyn std::fmt::Display) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = self.suppressed, "{}: {e}", self.what);
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// The live one-line summary.
pub(super) struct Reporter {
    every: Option<Duration>,
    name: String,
    last: Instant,
    last_consumed: u64,
    latencies: Vec<f64>,
}

impl Reporter {
    pub(super) fn new(every: Option<Duration>, name: &str) -> Self {
        Reporter {
            every,
            name: name.to_string(),
            last: Instant::now(),
            last_consumed: 0,
            latencies: Vec::new(),
        }
    }

    pub(super) fn latency(&mut self, secs: f64) {
        if self.every.is_some() {
            self.latencies.push(secs);
        }
    }

    pub(super) fn tick(&mut self, s: &RunSummary) {
        let Some(every) = self.every else { return };
        if self.last.elapsed() < every {
            return;
        }
        let rate = (s.consumed - self.last_consumed) as f64 / self.last.elapsed().as_secs_f64();
        self.latencies.sort_by(f64::total_cmp);
        let p99 = self
            .latencies
            .get(((self.latencies.len() as f64) * 0.99) as usize)
            .or(self.latencies.last())
            .copied();
        // A closed stdout (`kscore run | head`) ends the summaries, never the processor.
        let line = format!(
            "[kscore {}] {rate:.0} events/s | scored {} | alerts {} | dead letters {} | event-time→commit p99 {} | commits {} aborts {}",
            self.name,
            s.scored,
            s.alerts,
            s.dead_lettered,
            p99.map_or("-".to_string(), |x| format!("{:.0} ms", x * 1000.0)),
            s.commits,
            s.aborts
        );
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::warn!("stdout closed ({e}); no more summaries");
            self.every = None;
        }
        self.last = Instant::now();
        self.last_consumed = s.consumed;
        self.latencies.clear();
    }
}
