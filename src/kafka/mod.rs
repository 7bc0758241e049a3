//! Kafka plumbing every command shares: the client settings the guarantees enforce apart from
//! those that only tune, the consumer context that turns group callbacks into what the
//! pipeline acts on, sending with per-record refusals and bounded waits, waiting for
//! deliveries, and topics.

use std::time::Duration;

pub mod admin;
pub mod config;
pub mod context;
pub mod deliver;
pub mod produce;

/// The longest one blocking producer call (init, flush, offsets, commit, abort) may wait. The
/// processor's loop beats between them, so even a chain of them failing against an unreachable
/// broker stays well inside the health check's stall limit; a call that runs out fails the
/// cycle, which is rolled back and redone.
pub const BROKER_CALL: Duration = Duration::from_secs(20);

/// How many times a transaction's commit is retried after a retriable error.
pub const COMMIT_RETRIES: u32 = 3;

/// The longest a cycle's commit can take: its flush, every commit attempt, and the abort
/// after a failed one, each [`BROKER_CALL`] at most.
pub const COMMIT_AT_MOST: Duration =
    Duration::from_secs(BROKER_CALL.as_secs() * (1 + (1 + COMMIT_RETRIES as u64) + 1));
