//! Kafka plumbing every command shares: the client settings the guarantees enforce apart from
//! those that only tune, the consumer context that turns group callbacks into what the
//! pipeline acts on, sending with per-record refusals and bounded waits, waiting for
//! deliveries, and topics.

pub mod admin;
pub mod config;
pub mod context;
pub mod deliver;
pub mod produce;
