//! Where events enter: Kafka records in Confluent's wire format, decoded with the writer schema
//! their id names and resolved to the reader schema shipped in `schemas/`.

pub mod decode;

pub use decode::{DecodeError, Decoded, Decoder};
