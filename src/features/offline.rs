//! `kscore features`: the offline side of the features. Turns a file of events (an Avro object
//! container file, as `kscore simulate --output-file` writes) into a feature table (CSV) with
//! the same code the processor runs, so models are trained on exactly what they will be served.
//! Features depend only on each key's own events in order, so one state for the whole file
//! gives what the processor computes per partition.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;

use apache_avro::Reader;
use apache_avro::types::Value;

use super::{FeatureSet, FeatureState, extract};
use crate::topology;

/// Options of `kscore features`.
#[derive(Debug, Clone, clap::Args)]
pub struct FeaturesArgs {
    /// The topology whose features to compute.
    #[arg(long)]
    pub topology: PathBuf,
    /// Events: an Avro object container file, in the order the processor would read them.
    #[arg(long)]
    pub events: PathBuf,
    /// Where to write the table (CSV: id, key, event time, then one column per feature).
    #[arg(long)]
    pub output: PathBuf,
    /// Field identifying each event, written as the first column (to join labels on).
    #[arg(long, default_value = "event_id")]
    pub id_field: String,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeaturesSummary {
    /// Rows written.
    pub rows: u64,
    /// Events skipped because a feature could not be computed (the processor dead-letters them).
    pub skipped: u64,
}

/// Computes the feature table.
pub fn run(args: &FeaturesArgs) -> anyhow::Result<FeaturesSummary> {
    let loaded = topology::load_with(&args.topology, false)?;
    let set = FeatureSet::new(&loaded.topology, &loaded.schema);
    let input =
        File::open(&args.events).map_err(|e| anyhow::anyhow!("{}: {e}", args.events.display()))?;
    let reader = Reader::builder(BufReader::new(input))
        .reader_schema(&loaded.schema)
        .build()
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: not an Avro container file of a compatible schema: {e}",
                args.events.display()
            )
        })?;
    let mut out = BufWriter::new(
        File::create(&args.output)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.output.display()))?,
    );
    let names = set.names();
    writeln!(
        out,
        "{},{},{},{}",
        args.id_field,
        loaded.topology.input.key_field,
        loaded.topology.input.event_time_field,
        names.join(",")
    )?;
    let mut state = FeatureState::default();
    let mut summary = FeaturesSummary::default();
    for (n, record) in reader.enumerate() {
        let value =
            record.map_err(|e| anyhow::anyhow!("{}: record {n}: {e}", args.events.display()))?;
        let id = id_of(&value, &args.id_field);
        let row = set.extract(&value, None).and_then(|event| {
            let (key, time) = (event.key.clone(), event.time);
            state.update(&set, event).map(|f| (key, time, f))
        });
        match row {
            Ok((key, time, features)) => {
                let cols: Vec<String> = features.iter().map(|x| format!("{x}")).collect();
                writeln!(out, "{id},{key},{time},{}", cols.join(","))?;
                summary.rows += 1;
            }
            Err(e) => {
                tracing::warn!(record = n, id, "skipped: {e}");
                summary.skipped += 1;
            }
        }
    }
    out.flush()?;
    tracing::info!(rows = summary.rows, skipped = summary.skipped, output = %args.output.display(), "feature table written");
    Ok(summary)
}

fn id_of(value: &Value, field: &str) -> String {
    extract::record(value)
        .ok()
        .and_then(|fields| extract::text(fields, usize::MAX, field).ok())
        .unwrap_or_default()
}
