//! The scored record, described once. [`FIELDS`] (and the nested [`SCORE_FIELDS`] and
//! [`PROCESSING`], whose fields also say which value each holds) say what it holds, in order,
//! with each field's type and documentation; the record's Avro schema ([`schema`]) and its
//! encoder ([`ScoredEncoder`]) both walk them, so they cannot disagree.
//! `schemas/scored_payment.avsc` is what [`schema`] gives for payments (a test keeps the
//! shipped file current).
//!
//! The encoder writes Avro binary directly: building an `apache_avro` `Value` for every scored
//! event (a map of features, a record per score) and encoding it through the generic writer
//! cost about 15 µs an event, more than the rest of the processor together. The event is copied
//! as its input bytes when they were written with the reader schema (or encoded from its value
//! otherwise); the rest are Avro's varints, length-prefixed strings, little-endian doubles and
//! blocks.

use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::types::Value;
use serde_json::{Value as Json, json};

use super::encode::{EncodeError, SchemaWriter};
use crate::topology::config::{Decision, Role};
use crate::wire;

/// One field of the scored record.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Its name.
    pub name: &'static str,
    /// What it holds.
    pub kind: Kind,
    /// Its documentation in the schema.
    pub doc: &'static str,
}

/// What a field of the scored record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The input event, with the input's reader schema.
    Event,
    /// The features, a map of doubles by name.
    Features,
    /// The scores, an array of [`SCORE_FIELDS`] records.
    Scores,
    /// The decision, an enum of [`Decision`]'s symbols.
    Decision,
    /// The rules that fired, an array of strings.
    RulesFired,
    /// Where it came from, a record of [`PROCESSING`].
    Processing,
}

/// The scored record's fields, in order.
pub const FIELDS: &[Field] = &[
    Field {
        name: "event",
        kind: Kind::Event,
        doc: "The input event, field for field as it was read (resolved to the reader schema).",
    },
    Field {
        name: "features",
        kind: Kind::Features,
        doc: "The feature values the models were given, by the feature names in the topology.",
    },
    Field {
        name: "scores",
        kind: Kind::Scores,
        doc: "One entry per score the topology takes from its models.",
    },
    Field {
        name: "decision",
        kind: Kind::Decision,
        doc: "The strongest decision among the rules that fired; ALLOW when none did.",
    },
    Field {
        name: "rules_fired",
        kind: Kind::RulesFired,
        doc: "Names of the alert rules that fired.",
    },
    Field {
        name: "processing",
        kind: Kind::Processing,
        doc: "Where the event came from and how it was processed.",
    },
];

/// The symbols of the `decision` enum, in order.
pub const DECISIONS: [(Decision, &str); 3] = [
    (Decision::Allow, "ALLOW"),
    (Decision::Review, "REVIEW"),
    (Decision::Block, "BLOCK"),
];

/// A field of a nested record: its name, documentation, and how its value is read (which
/// gives its Avro type).
pub struct Column<G: 'static> {
    /// Its name.
    pub name: &'static str,
    /// Its documentation in the schema.
    pub doc: Option<&'static str>,
    /// How its value is read.
    pub get: G,
}

/// Which value of a [`ScoreValue`] a `scores` entry's field holds (which gives its Avro type).
#[derive(Debug, Clone, Copy)]
pub enum ScoreGet {
    /// The model's name, a `string`.
    Model,
    /// The model's version, a `string`.
    Version,
    /// The model's role, a `string` (default `primary`, so readers of the schema without it
    /// still read records with it, and the other way round).
    Role,
    /// The score's name, a `string`.
    Score,
    /// The score, a `double`.
    Value,
}

/// Which value of the record's [`Provenance`] a `processing` field holds (which gives its Avro
/// type).
#[derive(Debug, Clone, Copy)]
pub enum ProcessingGet {
    /// The processor instance, a `string`.
    Processor,
    /// The topology's name, a `string`.
    Topology,
    /// The input topic, a `string`.
    Topic,
    /// The input partition, an `int`.
    Partition,
    /// The input offset, a `long`.
    Offset,
    /// The writer schema's id, an `int`.
    SchemaId,
    /// When it was processed, a `long` with logical type `timestamp-millis`.
    ProcessedAt,
}

/// The fields of each `scores` entry (a `ModelScore` record), in order.
pub const SCORE_FIELDS: &[Column<ScoreGet>] = &[
    Column {
        name: "model",
        doc: Some(
            "The model the score answers to, from the topology: a primary's name (also where its canary scored the event: see role and version), or a shadow's own name.",
        ),
        get: ScoreGet::Model,
    },
    Column {
        name: "version",
        doc: Some(
            "Version of the model that scored the event: its version directory's name, else its `version` metadata, else a digest of the file.",
        ),
        get: ScoreGet::Version,
    },
    Column {
        name: "role",
        doc: Some(
            "primary, canary (decided instead of the primary for this key) or shadow (published, decides nothing).",
        ),
        get: ScoreGet::Role,
    },
    Column {
        name: "score",
        doc: Some("Score name from the topology."),
        get: ScoreGet::Score,
    },
    Column {
        name: "value",
        doc: Some("The score."),
        get: ScoreGet::Value,
    },
];

/// The fields of `processing` (a `Processing` record), in order.
pub const PROCESSING: &[Column<ProcessingGet>] = &[
    Column {
        name: "processor",
        doc: Some("Instance id of the processor that scored the event."),
        get: ProcessingGet::Processor,
    },
    Column {
        name: "topology",
        doc: Some("Name of the topology."),
        get: ProcessingGet::Topology,
    },
    Column {
        name: "source_topic",
        doc: None,
        get: ProcessingGet::Topic,
    },
    Column {
        name: "source_partition",
        doc: None,
        get: ProcessingGet::Partition,
    },
    Column {
        name: "source_offset",
        doc: None,
        get: ProcessingGet::Offset,
    },
    Column {
        name: "writer_schema_id",
        doc: Some("Registry id of the schema the input was written with."),
        get: ProcessingGet::SchemaId,
    },
    Column {
        name: "processed_at",
        doc: Some(
            "Wall-clock time of scoring. Not a function of the input: leave it out when comparing runs.",
        ),
        get: ProcessingGet::ProcessedAt,
    },
];

impl ScoreGet {
    fn avro(&self) -> Json {
        match self {
            ScoreGet::Model | ScoreGet::Version | ScoreGet::Score | ScoreGet::Role => {
                json!("string")
            }
            ScoreGet::Value => json!("double"),
        }
    }

    fn default(&self) -> Option<Json> {
        matches!(self, ScoreGet::Role).then(|| json!("primary"))
    }

    #[inline]
    fn write(self, out: &mut Vec<u8>, s: &ScoreValue) {
        match self {
            ScoreGet::Model => string(out, &s.model),
            ScoreGet::Version => string(out, &s.version),
            ScoreGet::Role => string(out, s.role.as_str()),
            ScoreGet::Score => string(out, &s.score),
            ScoreGet::Value => out.extend_from_slice(&s.value.to_le_bytes()),
        }
    }
}

impl ProcessingGet {
    fn avro(&self) -> Json {
        match self {
            ProcessingGet::Processor | ProcessingGet::Topology | ProcessingGet::Topic => {
                json!("string")
            }
            ProcessingGet::Partition | ProcessingGet::SchemaId => json!("int"),
            ProcessingGet::Offset => json!("long"),
            ProcessingGet::ProcessedAt => {
                json!({"type": "long", "logicalType": "timestamp-millis"})
            }
        }
    }

    #[inline]
    fn write(self, out: &mut Vec<u8>, p: &Provenance<'_>) {
        match self {
            ProcessingGet::Processor => string(out, p.processor),
            ProcessingGet::Topology => string(out, p.topology),
            ProcessingGet::Topic => string(out, p.topic),
            ProcessingGet::Partition => long(out, i64::from(p.partition)),
            ProcessingGet::Offset => long(out, p.offset),
            // An Avro int holding the id's 32 bits.
            ProcessingGet::SchemaId => long(out, i64::from(p.schema_id as i32)),
            ProcessingGet::ProcessedAt => long(out, p.processed_at),
        }
    }
}

fn columns<G>(
    cols: &[Column<G>],
    avro: impl Fn(&G) -> Json,
    default: impl Fn(&G) -> Option<Json>,
) -> Vec<Json> {
    cols.iter()
        .map(|c| {
            let mut f = json!({"name": c.name, "type": avro(&c.get)});
            if let Some(doc) = c.doc {
                f["doc"] = json!(doc);
            }
            if let Some(d) = default(&c.get) {
                f["default"] = d;
            }
            f
        })
        .collect()
}

/// A score with its provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreValue {
    /// The model the score answers to (a canary's is its primary's name).
    pub model: Arc<str>,
    /// Version of the model that gave it.
    pub version: Arc<str>,
    /// That model's role.
    pub role: Role,
    /// Score name.
    pub score: String,
    /// `<model>.<score>`, as rules name it.
    pub qualified: String,
    /// The value.
    pub value: f64,
}

/// Where the event came from: the values of [`PROCESSING`], in its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance<'a> {
    /// Instance id.
    pub processor: &'a str,
    /// Topology name.
    pub topology: &'a str,
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Writer schema id.
    pub schema_id: u32,
    /// Processing time, ms.
    pub processed_at: i64,
}

/// The event part of a scored record.
pub enum Event<'a> {
    /// The input datum's bytes, written with the reader schema.
    Verbatim(&'a [u8]),
    /// The event resolved to the reader schema, to be encoded.
    Value(&'a Value),
}

/// One scored record's contents.
pub struct ScoredRecord<'a> {
    /// The input event.
    pub event: Event<'a>,
    /// The feature values, one for each of the encoder's feature names, in their order.
    pub features: &'a [f64],
    /// The scores.
    pub scores: &'a [ScoreValue],
    /// The decision.
    pub decision: Decision,
    /// The rules that fired.
    pub rules_fired: &'a [String],
    /// Where it came from.
    pub processing: Provenance<'a>,
}

/// The scored schema for an input schema (both as JSON text).
pub fn schema(input_avsc: &str) -> Result<String, String> {
    let input: Json =
        serde_json::from_str(input_avsc).map_err(|e| format!("input schema is not JSON: {e}"))?;
    let name = input["name"]
        .as_str()
        .ok_or("input schema has no record name")?;
    let fields: Vec<Json> = FIELDS
        .iter()
        .map(|f| {
            let ty = match f.kind {
                Kind::Event => input.clone(),
                Kind::Features => json!({"type": "map", "values": "double"}),
                Kind::Scores => json!({"type": "array", "items": {
                    "type": "record", "name": "ModelScore",
                    "fields": columns(SCORE_FIELDS, ScoreGet::avro, ScoreGet::default)}}),
                Kind::Decision => json!({"type": "enum", "name": "Decision",
                    "symbols": DECISIONS.iter().map(|(_, s)| *s).collect::<Vec<_>>()}),
                Kind::RulesFired => json!({"type": "array", "items": "string"}),
                Kind::Processing => json!({"type": "record", "name": "Processing",
                    "fields": columns(PROCESSING, ProcessingGet::avro, |_| None)}),
            };
            let mut field = json!({"name": f.name, "type": ty});
            if f.kind == Kind::RulesFired {
                field["default"] = json!([]);
            }
            field["doc"] = json!(f.doc);
            field
        })
        .collect();
    let mut out = json!({
        "type": "record",
        "name": format!("Scored{name}"),
        "doc": format!("A {name} with the features the models saw, the models' scores and the decision. Keyed like the input, one record per input event."),
        "fields": fields,
    });
    if let Some(ns) = input.get("namespace") {
        out["namespace"] = ns.clone();
    }
    serde_json::to_string_pretty(&out).map_err(|e| e.to_string())
}

/// Writes scored records with the scored schema registered under `id`.
pub struct ScoredEncoder {
    id: u32,
    /// For events that are not copied: the input's reader schema.
    event: SchemaWriter,
    /// The `features` map as one block with every value 0.0: its count, each feature's name
    /// as an Avro string with 8 bytes of value after it, and the end. The same in every record
    /// but the values, so it is copied whole and the values written into it.
    features_block: Vec<u8>,
    /// Where each feature's value is in `features_block`.
    feature_values: Vec<usize>,
}

impl ScoredEncoder {
    /// `id`: the registry id of the scored schema; `reader`: the input's reader schema (the
    /// `event` field's type); `feature_names`: the topology's features, in order.
    pub fn new(id: u32, reader: &Schema, feature_names: &[&str]) -> Result<Self, EncodeError> {
        let event = SchemaWriter::of(reader.clone()).map_err(|e| EncodeError::Value {
            id,
            reason: e.to_string(),
        })?;
        let mut features_block = Vec::new();
        let mut feature_values = Vec::with_capacity(feature_names.len());
        block(&mut features_block, feature_names.len(), |out| {
            for name in feature_names {
                string(out, name);
                feature_values.push(out.len());
                out.extend_from_slice(&0f64.to_le_bytes());
            }
        });
        Ok(ScoredEncoder {
            id,
            event,
            features_block,
            feature_values,
        })
    }

    /// Appends one framed scored record to `out` (nothing on error).
    pub fn encode_into(&self, out: &mut Vec<u8>, r: &ScoredRecord<'_>) -> Result<(), EncodeError> {
        let start = out.len();
        wire::write_header(out, self.id);
        for f in FIELDS {
            if let Err(e) = self.field(out, f.kind, r) {
                out.truncate(start);
                return Err(e);
            }
        }
        Ok(())
    }

    #[inline]
    fn field(
        &self,
        out: &mut Vec<u8>,
        kind: Kind,
        r: &ScoredRecord<'_>,
    ) -> Result<(), EncodeError> {
        match kind {
            Kind::Event => match r.event {
                Event::Verbatim(bytes) => out.extend_from_slice(bytes),
                Event::Value(v) => {
                    self.event.writer().write_value_ref(out, v).map_err(|e| {
                        EncodeError::Value {
                            id: self.id,
                            reason: e.to_string(),
                        }
                    })?;
                }
            },
            // A map<double>, one block.
            Kind::Features => {
                if r.features.len() != self.feature_values.len() {
                    return Err(EncodeError::Value {
                        id: self.id,
                        reason: format!(
                            "{} feature values for {} features",
                            r.features.len(),
                            self.feature_values.len()
                        ),
                    });
                }
                let base = out.len();
                out.extend_from_slice(&self.features_block);
                let written = out.get_mut(base..).unwrap_or_default();
                for (&at, x) in self.feature_values.iter().zip(r.features) {
                    if let Some(slot) = written.get_mut(at..at + 8) {
                        slot.copy_from_slice(&x.to_le_bytes());
                    }
                }
            }
            // An array of SCORE_FIELDS records.
            Kind::Scores => block(out, r.scores.len(), |out| {
                for s in r.scores {
                    for c in SCORE_FIELDS {
                        c.get.write(out, s);
                    }
                }
            }),
            Kind::Decision => {
                let index = DECISIONS
                    .iter()
                    .position(|(d, _)| *d == r.decision)
                    .unwrap_or(0);
                long(out, index as i64);
            }
            Kind::RulesFired => block(out, r.rules_fired.len(), |out| {
                for name in r.rules_fired {
                    string(out, name);
                }
            }),
            Kind::Processing => {
                for c in PROCESSING {
                    c.get.write(out, &r.processing);
                }
            }
        }
        Ok(())
    }
}

/// An Avro array or map of `n` items written by `items`, as one block (none when empty).
fn block(out: &mut Vec<u8>, n: usize, items: impl FnOnce(&mut Vec<u8>)) {
    if n > 0 {
        long(out, n as i64);
        items(out);
    }
    long(out, 0);
}

/// Avro `long` (and `int`): zig-zag, then 7 bits a byte, low first.
fn long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schemas;
    use crate::tools::simulator::Simulator;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::writer::datum::GenericDatumWriter;

    #[test]
    fn the_shipped_scored_schema_is_what_the_payment_schema_gives() {
        let generated: Json =
            serde_json::from_str(&schema(schemas::PAYMENT_AVSC).expect("generates")).expect("json");
        if std::env::var_os("KSCORE_WRITE_SCHEMAS").is_some() {
            let text = serde_json::to_string_pretty(&generated).expect("json") + "\n";
            std::fs::write(
                concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/scored_payment.avsc"),
                text,
            )
            .expect("write");
        }
        let shipped: Json = serde_json::from_str(schemas::SCORED_PAYMENT_AVSC).expect("json");
        assert_eq!(
            generated, shipped,
            "regenerate with KSCORE_WRITE_SCHEMAS=1 cargo test --lib scored_schema"
        );
        assert!(apache_avro::Schema::parse(&generated).is_ok());
    }

    fn field<'v>(v: &'v Value, name: &str) -> &'v Value {
        match v {
            Value::Record(fields) => fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("no field {name}")),
            other => panic!("not a record: {other:?}"),
        }
    }

    /// The encoder's bytes read back with the schema, field by field, as what was given.
    #[test]
    fn encoded_records_read_back_with_the_schema() {
        let scored = schemas::parse(schemas::SCORED_PAYMENT_AVSC).expect("scored schema");
        let payment_schema = schemas::payment().expect("payment schema");
        let reader = GenericDatumReader::builder(&scored)
            .build()
            .expect("reader");
        let event_writer = GenericDatumWriter::builder(payment_schema)
            .build()
            .expect("writer");
        let names = ["amount", "count_1h", "ratio"];
        let s = |model: &str, version: &str, score: &str, value: f64| ScoreValue {
            model: model.into(),
            version: version.into(),
            role: if version == "v2" {
                Role::Canary
            } else {
                Role::Primary
            },
            score: score.into(),
            qualified: format!("{model}.{score}"),
            value,
        };
        let scores = vec![
            s("fraud_gbt", "fraud_gbt-71a6", "fraud", 0.123_456_789),
            s("anomaly_ae", "v2", "anomaly", -1.5e-7),
        ];
        type Case<'a> = (&'a [f64], &'a [ScoreValue], Decision, Vec<String>);
        let cases: [Case<'_>; 3] = [
            (
                &[1.0, 2.0, -0.5],
                &scores,
                Decision::Block,
                vec!["likely".into(), "x".into()],
            ),
            (&[], &[], Decision::Allow, vec![]),
            (
                &[1e300, -0.0, 3.25],
                &scores[..1],
                Decision::Review,
                vec!["r".into()],
            ),
        ];
        for (i, ((payment, _), (features, s, decision, fired))) in
            Simulator::new(Default::default())
                .expect("sim")
                .zip(cases)
                .enumerate()
        {
            let value = payment.to_value();
            let mut datum = Vec::new();
            event_writer
                .write_value_ref(&mut datum, &value)
                .expect("event");
            let processing = Provenance {
                processor: "p-1",
                topology: "fraud",
                topic: "payments",
                partition: 3,
                offset: 1_234_567_890_123 * i as i64,
                schema_id: 42,
                processed_at: 1_767_225_600_123,
            };
            let names = &names[..features.len()];
            let enc = ScoredEncoder::new(7, payment_schema, names).expect("encoder");
            for event in [Event::Verbatim(&datum), Event::Value(&value)] {
                let record = ScoredRecord {
                    event,
                    features,
                    scores: s,
                    decision,
                    rules_fired: &fired,
                    processing: processing.clone(),
                };
                let mut out = Vec::new();
                enc.encode_into(&mut out, &record).expect("encode");
                assert_eq!(&out[..5], &[0, 0, 0, 0, 7]);
                let mut body = &out[5..];
                let got = reader.read_value(&mut body).expect("decodes");
                assert!(body.is_empty(), "bytes left over");
                assert_eq!(field(&got, "event"), &value, "case {i}");
                let Value::Map(map) = field(&got, "features") else {
                    panic!("features")
                };
                assert_eq!(map.len(), features.len());
                for (n, x) in names.iter().zip(features) {
                    assert_eq!(map.get(*n), Some(&Value::Double(*x)));
                }
                let Value::Array(items) = field(&got, "scores") else {
                    panic!("scores")
                };
                assert_eq!(items.len(), s.len());
                for (item, want) in items.iter().zip(s) {
                    assert_eq!(field(item, "model"), &Value::String(want.model.to_string()));
                    assert_eq!(
                        field(item, "version"),
                        &Value::String(want.version.to_string())
                    );
                    assert_eq!(
                        field(item, "role"),
                        &Value::String(want.role.as_str().into())
                    );
                    assert_eq!(field(item, "score"), &Value::String(want.score.clone()));
                    assert_eq!(field(item, "value"), &Value::Double(want.value));
                }
                let symbol = DECISIONS
                    .iter()
                    .position(|(d, _)| *d == decision)
                    .expect("symbol");
                assert_eq!(
                    field(&got, "decision"),
                    &Value::Enum(symbol as u32, DECISIONS[symbol].1.into())
                );
                assert_eq!(
                    field(&got, "rules_fired"),
                    &Value::Array(fired.iter().map(|f| Value::String(f.clone())).collect())
                );
                let p = field(&got, "processing");
                assert_eq!(field(p, "processor"), &Value::String("p-1".into()));
                assert_eq!(field(p, "topology"), &Value::String("fraud".into()));
                assert_eq!(field(p, "source_topic"), &Value::String("payments".into()));
                assert_eq!(field(p, "source_partition"), &Value::Int(3));
                assert_eq!(field(p, "source_offset"), &Value::Long(processing.offset));
                assert_eq!(field(p, "writer_schema_id"), &Value::Int(42));
                assert_eq!(
                    field(p, "processed_at"),
                    &Value::TimestampMillis(1_767_225_600_123)
                );
            }
        }
    }
}
