//! Where scored events leave: Avro encoding in Confluent's wire format.

pub mod deliver;
pub mod encode;
pub mod output;
pub mod scored;

pub use encode::{EncodeError, FramedEncoder};
