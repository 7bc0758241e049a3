//! kscore: a Kafka stream processor that keeps rolling per-key event-time features, scores
//! events with ONNX Runtime models in micro-batches, and publishes scored events exactly once.
//!
//! The data path, in module order:
//! `source` (Kafka consumer, Confluent wire format, Avro decode) → `features` → `batcher` →
//! `scorer` → `sink` (Avro encode, transactional producer). Around it: `cluster` (how to reach
//! Kafka and the registry), `telemetry`, the event `simulator` and the `registry_standin` used
//! on the local stack.

pub mod batcher;
pub mod changelog;
pub mod cluster;
pub mod features;
pub mod kafka;
pub mod pipeline;
pub mod reason;
pub mod schemas;
pub mod scorer;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod tools;
pub mod topology;
pub mod wire;
