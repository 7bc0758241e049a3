//! Where scored events leave: Avro encoding in Confluent's wire format.

pub mod dead_letter;
pub mod deliver;
pub mod encode;
pub mod output;
pub mod produce;
pub mod scored;

pub use encode::{EncodeError, FramedEncoder};
