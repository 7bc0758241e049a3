//! `kscore features`: the offline side of the features. Turns a file of events (an Avro object
//! container file, as `kscore simulate --output-file` writes) into a feature table (CSV) with
//! the same code the processor runs, so models are trained on exactly what they will be served.
//! Features depend only on each key's own events in order, so one state for the whole file
//! gives what the processor computes per partition.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;

use apache_avro::Reader;
use apache_avro::types::Value;

use super::{FeatureError, FeatureSet, FeatureState, extract};
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
    let header: Vec<&str> = [
        args.id_field.as_str(),
        loaded.topology.input.key_field.as_str(),
        loaded.topology.input.event_time_field.as_str(),
    ]
    .into_iter()
    .chain(names.iter().copied())
    .collect();
    writeln!(out, "{}", csv_line(header))?;
    let mut table = Table::new(&set);
    let mut summary = FeaturesSummary::default();
    for (n, record) in reader.enumerate() {
        let value =
            record.map_err(|e| anyhow::anyhow!("{}: record {n}: {e}", args.events.display()))?;
        let id = id_of(&value, &args.id_field);
        match table.row(&value) {
            Ok((key, time, features)) => {
                let cols: Vec<String> = features.iter().map(|x| format!("{x}")).collect();
                let time = time.to_string();
                let line = csv_line(
                    [id.as_str(), key.as_str(), time.as_str()]
                        .into_iter()
                        .chain(cols.iter().map(String::as_str)),
                );
                writeln!(out, "{line}")?;
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

/// One state for the whole file, checkpointed as the processor's is at each commit, so its
/// undo log (what a rollback would need) stays bounded however many keys the file has.
pub struct Table<'a> {
    set: &'a FeatureSet,
    state: FeatureState,
    since_checkpoint: usize,
}

impl<'a> Table<'a> {
    /// Events between checkpoints.
    pub const CHECKPOINT_EVERY: usize = 1_024;

    /// An empty table for `set`.
    pub fn new(set: &'a FeatureSet) -> Self {
        Table {
            set,
            state: FeatureState::default(),
            since_checkpoint: 0,
        }
    }

    /// One record's key, event time and features (what the processor computes for it), or why
    /// it has none (the processor dead-letters it). Offline there is no record timestamp, so
    /// only the fixed event-time bounds apply.
    pub fn row(&mut self, value: &Value) -> Result<(String, i64, Vec<f64>), FeatureError> {
        let event = self.set.extract(value, None)?;
        let (key, time) = (event.key.to_string(), event.time);
        let features = self.state.update(self.set, event)?;
        self.since_checkpoint += 1;
        if self.since_checkpoint >= Self::CHECKPOINT_EVERY {
            self.state.checkpoint();
            self.since_checkpoint = 0;
        }
        Ok((key, time, features))
    }

    /// The state.
    pub fn state(&self) -> &FeatureState {
        &self.state
    }
}

/// A CSV line (RFC 4180): fields with a comma, a quote or a line break are quoted, quotes
/// doubled.
pub fn csv_line<'s>(fields: impl IntoIterator<Item = &'s str>) -> String {
    let mut line = String::new();
    for (i, f) in fields.into_iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if f.contains([',', '"', '\n', '\r']) {
            line.push('"');
            line.push_str(&f.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(f);
        }
    }
    line
}

fn id_of(value: &Value, field: &str) -> String {
    extract::record(value)
        .ok()
        .and_then(|fields| extract::text(fields, extract::Place::new(usize::MAX, field)).ok())
        .map(Cow::into_owned)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::simulator::{SimConfig, Simulator};

    #[test]
    fn fields_with_commas_quotes_or_line_breaks_are_quoted() {
        assert_eq!(csv_line(["a", "b c", "1.5"]), "a,b c,1.5");
        assert_eq!(
            csv_line(["crd,1", "say \"hi\"", "two\nlines", ""]),
            "\"crd,1\",\"say \"\"hi\"\"\",\"two\nlines\","
        );
    }

    /// However many keys the file has, the undo log holds at most one checkpoint's worth.
    #[test]
    fn the_offline_state_is_checkpointed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("payment.avsc"),
            crate::schemas::PAYMENT_AVSC,
        )
        .expect("schema");
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/fraud.toml"
        ))
        .expect("topology")
        .replace("../schemas/payment.avsc", "payment.avsc");
        let file = dir.path().join("t.toml");
        std::fs::write(&file, text).expect("write");
        let loaded = topology::load_with(&file, false).expect("topology");
        let set = FeatureSet::new(&loaded.topology, &loaded.schema);
        let mut table = Table::new(&set);
        let events = Simulator::new(SimConfig {
            cards: 20_000,
            ..SimConfig::default()
        })
        .expect("sim")
        .take(6_000);
        let mut most = 0;
        for (p, _) in events {
            table.row(&p.to_value()).expect("features");
            most = most.max(table.state().changed_keys());
        }
        assert!(table.state().keys() > 4_000);
        assert!(most <= Table::CHECKPOINT_EVERY, "{most}");
    }
}
