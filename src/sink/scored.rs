//! The scored record written straight to Avro binary, the hot path's encoder.
//!
//! Building an `apache_avro` `Value` for every scored event (a map of features, a record per
//! score) and encoding it through the generic writer cost about 15 µs an event, more than the
//! rest of the processor together. The scored schema is fixed by [`super::output::scored_schema`],
//! so its encoding is written here directly: the event is copied as its input bytes when they
//! were written with the reader schema (or encoded from its value otherwise), and the rest are
//! Avro's varints, length-prefixed strings, little-endian doubles and blocks. A unit test checks
//! that the bytes decode to exactly what [`super::output::scored_record`] describes.

use apache_avro::Schema;
use apache_avro::types::Value;

use super::encode::{EncodeError, SchemaWriter};
use super::output::{Provenance, ScoreValue};
use crate::topology::config::Decision;
use crate::wire;

/// The event part of a scored record.
pub enum Event<'a> {
    /// The input datum's bytes, written with the reader schema.
    Verbatim(&'a [u8]),
    /// The event resolved to the reader schema, to be encoded.
    Value(&'a Value),
}

/// Writes scored records with the scored schema registered under `id`.
pub struct ScoredEncoder {
    id: u32,
    /// For events that are not copied: the input's reader schema.
    event: SchemaWriter,
}

impl ScoredEncoder {
    /// `id`: the registry id of the scored schema; `reader`: the input's reader schema (the
    /// `event` field's type).
    pub fn new(id: u32, reader: &Schema) -> Result<Self, EncodeError> {
        let event = SchemaWriter::of(reader.clone()).map_err(|e| EncodeError::Value {
            id,
            reason: e.to_string(),
        })?;
        Ok(ScoredEncoder { id, event })
    }

    /// Appends one framed scored record to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_into(
        &self,
        out: &mut Vec<u8>,
        event: Event<'_>,
        feature_names: &[&str],
        features: &[f64],
        scores: &[ScoreValue],
        decision: Decision,
        fired: &[String],
        p: &Provenance<'_>,
    ) -> Result<(), EncodeError> {
        let start = out.len();
        wire::write_header(out, self.id);
        match event {
            Event::Verbatim(bytes) => out.extend_from_slice(bytes),
            Event::Value(v) => {
                if let Err(e) = self.event.writer().write_value_ref(out, v) {
                    out.truncate(start);
                    return Err(EncodeError::Value {
                        id: self.id,
                        reason: e.to_string(),
                    });
                }
            }
        }
        // features: map<double>, one block.
        if !features.is_empty() {
            long(out, features.len() as i64);
            for (name, x) in feature_names.iter().zip(features) {
                string(out, name);
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        long(out, 0);
        // scores: array<ModelScore>.
        if !scores.is_empty() {
            long(out, scores.len() as i64);
            for s in scores {
                string(out, &s.model);
                string(out, &s.version);
                string(out, &s.score);
                out.extend_from_slice(&s.value.to_le_bytes());
            }
        }
        long(out, 0);
        long(
            out,
            match decision {
                Decision::Allow => 0,
                Decision::Review => 1,
                Decision::Block => 2,
            },
        );
        if !fired.is_empty() {
            long(out, fired.len() as i64);
            for f in fired {
                string(out, f);
            }
        }
        long(out, 0);
        string(out, p.processor);
        string(out, p.topology);
        string(out, p.topic);
        long(out, i64::from(p.partition));
        long(out, p.offset);
        long(out, i64::from(p.schema_id as i32));
        long(out, p.processed_at);
        Ok(())
    }
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
    use crate::sink::output;
    use crate::tools::simulator::Simulator;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::writer::datum::GenericDatumWriter;

    #[test]
    fn written_bytes_decode_to_the_scored_record() {
        let scored = schemas::parse(schemas::SCORED_PAYMENT_AVSC).expect("scored schema");
        let payment = schemas::payment().expect("payment schema");
        let enc = ScoredEncoder::new(7, payment).expect("encoder");
        let reader = GenericDatumReader::builder(&scored)
            .build()
            .expect("reader");
        let event_writer = GenericDatumWriter::builder(payment)
            .build()
            .expect("writer");
        let names = ["amount", "count_1h", "ratio"];
        let scores = vec![
            ScoreValue {
                model: "fraud_gbt".into(),
                version: "fraud_gbt-71a6".into(),
                score: "fraud".into(),
                qualified: "fraud_gbt.fraud".into(),
                value: 0.123_456_789,
            },
            ScoreValue {
                model: "anomaly_ae".into(),
                version: "v2".into(),
                score: "anomaly".into(),
                qualified: "anomaly_ae.anomaly".into(),
                value: -1.5e-7,
            },
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
            let prov = Provenance {
                processor: "p-1",
                topology: "fraud",
                topic: "payments",
                partition: 3,
                offset: 1_234_567_890_123 * i as i64,
                schema_id: 42,
                processed_at: 1_767_225_600_123,
            };
            let names = &names[..features.len()];
            let want =
                output::scored_record(value.clone(), names, features, s, decision, &fired, &prov);
            for event in [Event::Verbatim(&datum), Event::Value(&value)] {
                let mut out = Vec::new();
                enc.encode_into(&mut out, event, names, features, s, decision, &fired, &prov)
                    .expect("encode");
                assert_eq!(&out[..5], &[0, 0, 0, 0, 7]);
                let mut body = &out[5..];
                let got = reader.read_value(&mut body).expect("decodes");
                assert!(body.is_empty(), "bytes left over");
                assert_eq!(got, want, "case {i}");
            }
        }
    }
}
