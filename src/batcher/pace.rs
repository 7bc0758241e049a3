//! How large a model's batches grow and how long their first row waits for others.
//!
//! Fixed (`batching.max_rows`, `batching.max_delay`), or adapted to `batching.latency_budget`
//! by additive increase and multiplicative decrease, as Clipper (NSDI'17) sizes its batches:
//! each scored batch reports the latency the batching decides, the time its first row waited
//! for the batch to be sent plus the time the model took to score it. (Not the wait for a free
//! worker: that grows only when the model cannot keep up, where the answer is larger batches,
//! which score more rows per second, and past those the pipeline's backpressure; counting it
//! would shrink the batches exactly when they must grow.) Under `HEADROOM` of the budget, the
//! batch-size cap grows by `max_rows / 64` rows (at least one) and the delay by a fiftieth of
//! the budget; over it, both shrink by a tenth. The headroom keeps the peaks of that saw-tooth
//! under the budget itself, so the latency's p99 stays under it while batches grow as large as
//! it allows. The delay never exceeds half the budget (the rest is for scoring); the cap never
//! exceeds `max_rows` nor falls under one row. Both are exported per model
//! (`kscore_batch_target_rows`, `kscore_batch_delay_seconds`).

use std::sync::Mutex;
use std::time::Duration;

use crate::telemetry::metrics as names;
use crate::topology::config::Batching;

/// The share of the budget under which a batch counts as on time.
pub const HEADROOM: f64 = 0.8;
/// The factor both knobs shrink by when a batch was late.
const DECREASE: f64 = 0.9;

/// A model's batch-size cap and delay, and how they adapt.
#[derive(Debug)]
pub struct Pace {
    model: String,
    max_rows: usize,
    budget: Option<Duration>,
    now: Mutex<Limits>,
}

/// What a batch may be now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rows at which a batch is sent.
    pub rows: usize,
    /// Longest the first row of a batch waits for others.
    pub delay: Duration,
}

impl Pace {
    /// The pace of `model`'s batching.
    pub fn new(model: &str, batching: &Batching) -> Self {
        let max_rows = batching.max_rows.max(1);
        let limits = match batching.latency_budget {
            // Start small, as Clipper does, and grow while batches are on time.
            Some(budget) => Limits {
                rows: 1,
                delay: budget / 10,
            },
            None => Limits {
                rows: max_rows,
                delay: batching.delay(),
            },
        };
        let pace = Pace {
            model: model.to_string(),
            max_rows,
            budget: batching.latency_budget,
            now: Mutex::new(limits),
        };
        pace.export(limits);
        pace
    }

    /// The limits for the next batch.
    pub fn limits(&self) -> Limits {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch's first row waited and was scored in `latency`: adapt.
    pub fn observe(&self, latency: Duration) {
        let Some(budget) = self.budget else {
            return;
        };
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        let before = *now;
        if latency.as_secs_f64() <= budget.as_secs_f64() * HEADROOM {
            now.rows = (now.rows + (self.max_rows / 64).max(1)).min(self.max_rows);
            now.delay = (now.delay + budget / 50).min(budget / 2);
        } else {
            now.rows = ((now.rows as f64 * DECREASE) as usize).max(1);
            now.delay = now.delay.mul_f64(DECREASE);
        }
        let after = *now;
        drop(now);
        if after != before {
            self.export(after);
        }
    }

    fn export(&self, limits: Limits) {
        metrics::gauge!(names::BATCH_TARGET_ROWS, "model" => self.model.clone())
            .set(limits.rows as f64);
        metrics::gauge!(names::BATCH_DELAY_SECONDS, "model" => self.model.clone())
            .set(limits.delay.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rows: usize, delay: Duration) -> Limits {
        Limits { rows, delay }
    }

    fn budget(ms: u64, max_rows: usize) -> Pace {
        Pace::new(
            "m",
            &Batching {
                max_rows,
                max_delay: None,
                latency_budget: Some(Duration::from_millis(ms)),
            },
        )
    }

    #[test]
    fn on_time_batches_grow_additively_and_late_ones_shrink_by_a_tenth() {
        let pace = budget(20, 640);
        let start = pace.limits();
        assert_eq!(start, at(1, Duration::from_millis(2)));
        // On time (under 80% of 20 ms): +10 rows (640 / 64), +0.4 ms.
        pace.observe(Duration::from_millis(16));
        assert_eq!(pace.limits(), at(11, Duration::from_micros(2_400)));
        for _ in 0..9 {
            pace.observe(Duration::from_millis(5));
        }
        assert_eq!(pace.limits(), at(101, Duration::from_micros(6_000)));
        // Late: both cut by 10%.
        pace.observe(Duration::from_micros(16_001));
        assert_eq!(pace.limits(), at(90, Duration::from_micros(5_400)));
    }

    #[test]
    fn the_limits_stay_within_max_rows_half_the_budget_and_one_row() {
        let pace = budget(20, 100);
        for _ in 0..1000 {
            pace.observe(Duration::ZERO);
        }
        assert_eq!(pace.limits(), at(100, Duration::from_millis(10)));
        for _ in 0..1000 {
            pace.observe(Duration::from_secs(1));
        }
        assert_eq!(pace.limits().rows, 1);
    }

    #[test]
    fn without_a_budget_the_limits_are_fixed() {
        let pace = Pace::new(
            "m",
            &Batching {
                max_rows: 64,
                max_delay: Some(Duration::from_millis(3)),
                latency_budget: None,
            },
        );
        pace.observe(Duration::from_secs(10));
        assert_eq!(pace.limits(), at(64, Duration::from_millis(3)));
    }
}
