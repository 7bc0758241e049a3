//! Where scored events leave: the scored record (one description: its schema and its
//! encoder), what it decides, the dead-letter record, and Avro encoding in Confluent's wire
//! format under a registered schema.

pub mod dead_letter;
pub mod decision;
pub mod encode;
pub mod record;

pub use encode::{EncodeError, FramedEncoder};
