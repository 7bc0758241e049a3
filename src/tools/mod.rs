//! Off the data path: what runs beside the processor rather than in it. The event simulator
//! and the payment type it produces, `kscore tail`, the Schema Registry stand-in of the local
//! stack, and the benchmark's transactional passthrough, and the models' own benchmark.

pub mod model_bench;
pub mod models;
pub mod passthrough;
pub mod payments;
pub mod registry_standin;
pub mod simulator;
pub mod tail;
