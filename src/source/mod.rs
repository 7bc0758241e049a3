//! Where events enter: Kafka records in Confluent's wire format, decoded with the writer schema
//! their id names and resolved to the reader schema shipped in `schemas/`; a record written with
//! the reader schema itself is read in place (`direct`), without a generic value.

pub mod decode;
pub mod direct;

pub use decode::{DecodeError, Decoded, Decoder, Record};
pub use direct::Direct;
