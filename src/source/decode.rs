//! Avro decoding of Confluent-framed payloads. The writer schema is fetched from the registry
//! by the id in the frame (the client caches it) and every record is resolved to the reader
//! schema, so producers can evolve their schema compatibly without the processor noticing.
//! When writer and reader are the same schema the resolution step is skipped. A record that
//! fails says which schema it failed against: not a datum of its writer schema (`undecodable`),
//! or a datum that cannot be read as the reader schema (`incompatible_schema`, with the field).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use apache_avro::error::Details;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::ResolvedSchema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;

use super::direct::{Direct, Program};
use crate::features::extract::{Fields, Scalar};
use crate::reason::Reason;
use crate::wire::{self, FrameError};

/// A decoded record.
#[derive(Debug)]
pub struct Decoded<'a> {
    /// The writer schema's registry id.
    pub schema_id: u32,
    /// The record.
    pub record: Record<'a>,
    /// Whether the datum (the payload after its 5-byte header) was written with the reader
    /// schema itself, so it already is the reader schema's encoding of the record and can be
    /// copied instead of encoded.
    pub verbatim: bool,
}

/// A record, as read.
#[derive(Debug)]
pub enum Record<'a> {
    /// Written with the reader schema, and read in place.
    Direct(Direct<'a>),
    /// Decoded into a generic value, resolved to the reader schema.
    Value(Value),
}

impl Decoded<'_> {
    /// The event for the scored record to encode: `None` where the datum is copied instead
    /// (it was written with the reader schema).
    pub fn into_event(self) -> Option<Value> {
        match self.record {
            Record::Value(v) if !self.verbatim => Some(v),
            _ => None,
        }
    }
}

impl Fields for Record<'_> {
    fn is_record(&self) -> bool {
        match self {
            Record::Direct(d) => d.is_record(),
            Record::Value(v) => v.is_record(),
        }
    }

    fn get(&self, index: usize, name: &str) -> Option<Scalar<'_>> {
        match self {
            Record::Direct(d) => d.get(index, name),
            Record::Value(v) => v.get(index, name),
        }
    }

    fn layout(&self) -> Option<u64> {
        match self {
            Record::Direct(d) => d.layout(),
            Record::Value(_) => None,
        }
    }

    #[inline]
    fn at(&self, index: usize) -> Option<Scalar<'_>> {
        match self {
            Record::Direct(d) => d.at(index),
            Record::Value(_) => None,
        }
    }
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    /// Not a Confluent frame.
    #[error("not Confluent wire format: {0}")]
    Frame(#[from] FrameError),
    /// The registry did not give the writer schema. `retriable` errors (network, 502/503) say
    /// nothing about the record and must be retried, not dead-lettered.
    #[error("writer schema {id} unavailable from the registry: {reason}")]
    Schema {
        /// The schema id in the frame.
        id: u32,
        /// The registry client's message.
        reason: String,
        /// Whether trying again may succeed.
        retriable: bool,
    },
    /// The writer schema cannot be resolved to the reader schema.
    #[error("writer schema {id} is not compatible with the reader schema: {reason}")]
    Incompatible {
        /// The schema id in the frame.
        id: u32,
        /// Why.
        reason: String,
    },
    /// The bytes are not a datum of the writer schema.
    #[error("payload is not a valid Avro datum of writer schema {id}: {reason}")]
    Datum {
        /// The schema id in the frame.
        id: u32,
        /// Why.
        reason: String,
    },
    /// The record is a valid datum of its writer schema, but cannot be read as the reader
    /// schema (a symbol the reader's enum lacks, say).
    #[error("record of writer schema {id} cannot be read with the reader schema: {reason}")]
    Resolve {
        /// The schema id in the frame.
        id: u32,
        /// Which field, and why.
        reason: String,
    },
}

impl DecodeError {
    /// Whether the error is about the registry rather than the record.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            DecodeError::Schema {
                retriable: true,
                ..
            }
        )
    }

    /// Why the record is dead-lettered.
    pub fn reason(&self) -> Reason {
        match self {
            DecodeError::Frame(_) => Reason::NotConfluentFramed,
            DecodeError::Schema { .. } => Reason::UnknownSchemaId,
            DecodeError::Incompatible { .. } | DecodeError::Resolve { .. } => {
                Reason::IncompatibleSchema
            }
            DecodeError::Datum { .. } => Reason::Undecodable,
        }
    }
}

self_cell::self_cell!(
    /// A writer schema and the datum reader that borrows it, cached per schema id: building a
    /// reader (name resolution) per record would cost more than decoding it.
    struct WriterReader {
        owner: Schema,
        #[covariant]
        dependent: GenericDatumReader,
    }
);

self_cell::self_cell!(
    /// The reader schema and its named types, for resolving records to it.
    struct ReaderSchema {
        owner: Schema,
        #[covariant]
        dependent: ResolvedSchema,
    }
);

/// What is cached per writer schema id.
struct Writer {
    reader: WriterReader,
    same_as_reader: bool,
    /// For a writer that is the reader schema, its compiled in-place reader (`None` where the
    /// schema has what that does not cover).
    direct: Option<Arc<Program>>,
}

/// Where writer schemas come from.
enum Writers {
    /// The registry, by the id in the frame.
    Registry(Box<AvroDecoder>),
    /// A fixed set (no registry): other ids are unknown.
    Fixed,
}

/// Decodes framed payloads into records of one reader schema.
pub struct Decoder {
    source: Writers,
    reader: ReaderSchema,
    reader_canonical: String,
    writers: RwLock<HashMap<u32, Arc<Writer>>>,
}

impl Decoder {
    /// A decoder that fetches writer schemas from the registry and resolves everything to
    /// `reader`.
    pub fn new(registry: SrSettings, reader: Schema) -> Self {
        Self::with_source(
            Writers::Registry(Box::new(AvroDecoder::new(registry))),
            reader,
        )
    }

    /// A decoder that knows exactly these writer schemas, by id, and no registry: a frame naming
    /// another id is `unknown_schema_id`. A writer that cannot be read as `reader` is refused
    /// here, with the reason.
    pub fn with_writers(
        reader: Schema,
        writers: impl IntoIterator<Item = (u32, Schema)>,
    ) -> Result<Self, DecodeError> {
        let decoder = Self::with_source(Writers::Fixed, reader);
        for (id, schema) in writers {
            let w = decoder.compile(id, schema)?;
            decoder
                .writers
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, Arc::new(w));
        }
        Ok(decoder)
    }

    fn with_source(source: Writers, reader: Schema) -> Self {
        let reader_canonical = reader.canonical_form();
        // A parsed schema's names resolve (parsing checked them); should they not, resolution
        // finds no names and refuses records, it never misreads them.
        static NO_NAMES: Schema = Schema::Null;
        let reader = ReaderSchema::new(reader, |s| {
            ResolvedSchema::try_from(s)
                .or_else(|e| {
                    tracing::warn!("reader schema names: {e}");
                    ResolvedSchema::try_from(&NO_NAMES)
                })
                .unwrap_or_else(|_| unreachable!("the null schema has no names to resolve"))
        });
        Decoder {
            source,
            reader,
            reader_canonical,
            writers: RwLock::default(),
        }
    }

    fn compile(&self, id: u32, schema: Schema) -> Result<Writer, DecodeError> {
        let incompatible = |reason: String| DecodeError::Incompatible { id, reason };
        let same_as_reader = schema.canonical_form() == self.reader_canonical;
        if !same_as_reader {
            SchemaCompatibility::can_read(&schema, self.reader.borrow_owner())
                .map_err(|e| incompatible(e.to_string()))?;
        }
        let direct = same_as_reader
            .then(|| Program::compile(&schema))
            .flatten()
            .map(Arc::new);
        let reader = WriterReader::try_new(schema, |s| GenericDatumReader::builder(s).build())
            .map_err(|e| incompatible(e.to_string()))?;
        Ok(Writer {
            reader,
            same_as_reader,
            direct,
        })
    }

    /// The writer schema `id`, if it is cached.
    fn cached(&self, id: u32) -> Option<Arc<Writer>> {
        self.writers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// The writer schema `id`, cached or fetched from the registry.
    async fn writer(&self, id: u32) -> Result<Arc<Writer>, DecodeError> {
        if let Some(w) = self.cached(id) {
            return Ok(w);
        }
        let registry = match &self.source {
            Writers::Registry(r) => r,
            Writers::Fixed => return Err(unknown(id)),
        };
        let fetched = registry
            .get_schema(id)
            .await
            .map_err(|e| DecodeError::Schema {
                id,
                reason: match &e.cause {
                    Some(cause) => format!("{}: {cause}", e.error),
                    None => e.error.clone(),
                },
                retriable: e.retriable,
            })?;
        let w = Arc::new(self.compile(id, fetched.parsed.clone())?);
        self.writers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, w.clone());
        Ok(w)
    }

    /// Decodes one payload (a Kafka record's value).
    pub async fn decode<'a>(&self, payload: Option<&'a [u8]>) -> Result<Decoded<'a>, DecodeError> {
        let (id, datum) = wire::parse(payload)?;
        let writer = self.writer(id).await?;
        self.decode_with(&writer, id, datum)
    }

    /// Decodes one payload whose writer schema is cached already, without the registry and
    /// without an async call; `None` when the schema is to be fetched (use
    /// [`Decoder::decode`]).
    pub fn decode_cached<'a>(
        &self,
        payload: Option<&'a [u8]>,
    ) -> Option<Result<Decoded<'a>, DecodeError>> {
        let (id, datum) = match wire::parse(payload) {
            Ok(frame) => frame,
            Err(e) => return Some(Err(e.into())),
        };
        let writer = self.cached(id)?;
        Some(self.decode_with(&writer, id, datum))
    }

    /// Decodes one payload into a generic value resolved to the reader schema, whatever its
    /// writer (for tools and tests that look at whole records).
    pub async fn decode_value(&self, payload: Option<&[u8]>) -> Result<(u32, Value), DecodeError> {
        let (id, datum) = wire::parse(payload)?;
        let writer = self.writer(id).await?;
        Ok((id, self.value_with(&writer, id, datum)?))
    }

    /// Decodes one payload with the writer schemas already known (never calls the registry):
    /// for a decoder made [`Decoder::with_writers`], the same as [`Decoder::decode`].
    pub fn decode_known<'a>(&self, payload: Option<&'a [u8]>) -> Result<Decoded<'a>, DecodeError> {
        let (id, datum) = wire::parse(payload)?;
        let writer = self.cached(id).ok_or_else(|| unknown(id))?;
        self.decode_with(&writer, id, datum)
    }

    /// [`Decoder::decode_value`] with the writer schemas already known.
    pub fn decode_value_known(&self, payload: Option<&[u8]>) -> Result<(u32, Value), DecodeError> {
        let (id, datum) = wire::parse(payload)?;
        let writer = self.cached(id).ok_or_else(|| unknown(id))?;
        Ok((id, self.value_with(&writer, id, datum)?))
    }

    /// Decodes `datum` (the payload after its header) with writer schema `id`.
    fn decode_with<'a>(
        &self,
        writer: &Writer,
        id: u32,
        datum: &'a [u8],
    ) -> Result<Decoded<'a>, DecodeError> {
        let record = match &writer.direct {
            Some(program) => Record::Direct(
                program
                    .read(datum)
                    .map_err(|reason| DecodeError::Datum { id, reason })?,
            ),
            None => Record::Value(self.value_with(writer, id, datum)?),
        };
        Ok(Decoded {
            schema_id: id,
            record,
            verbatim: writer.same_as_reader,
        })
    }

    /// Decodes `datum` into a generic value resolved to the reader schema.
    fn value_with(&self, writer: &Writer, id: u32, datum: &[u8]) -> Result<Value, DecodeError> {
        // Two steps, so an error says which schema the record failed against: decoding with
        // the writer schema, then resolving the value to the reader schema.
        let mut datum = Exact {
            rest: datum,
            short: false,
        };
        let value = writer
            .reader
            .borrow_dependent()
            .read_value(&mut datum)
            .map_err(|e| DecodeError::Datum {
                id,
                reason: e.to_string(),
            })?;
        if datum.short {
            // apache-avro reads a string cut short by the end of the datum as a null instead of
            // failing; such a record must not pass (its bytes would be copied into the output).
            return Err(DecodeError::Datum {
                id,
                reason: "the datum ends early".into(),
            });
        }
        if !datum.rest.is_empty() {
            return Err(DecodeError::Datum {
                id,
                reason: format!("{} bytes left over after the record", datum.rest.len()),
            });
        }
        if writer.same_as_reader {
            return Ok(value);
        }
        let reader = self.reader.borrow_owner();
        let names = self.reader.borrow_dependent().get_names();
        match value.clone().resolve_with_names(reader, names) {
            Ok(v) => Ok(v),
            Err(e) => Err(DecodeError::Resolve {
                id,
                reason: explain(&value, reader, names, e),
            }),
        }
    }
}

/// A frame naming a schema id this decoder has no way to know.
fn unknown(id: u32) -> DecodeError {
    DecodeError::Schema {
        id,
        reason: "not one of this decoder's schemas".into(),
        retriable: false,
    }
}

/// A datum being read, noting whether a read asked for more than was left.
struct Exact<'a> {
    rest: &'a [u8],
    short: bool,
}

impl std::io::Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.rest.len());
        if n < buf.len() {
            self.short = true;
        }
        let (head, rest) = self.rest.split_at(n);
        buf[..n].copy_from_slice(head);
        self.rest = rest;
        Ok(n)
    }
}

/// Why a value of the writer schema does not resolve to the reader schema, naming the
/// top-level field that fails where there is one (tried field by field: failures only).
fn explain(
    value: &Value,
    reader: &Schema,
    names: &apache_avro::schema::NamesRef<'_>,
    whole: apache_avro::Error,
) -> String {
    if let (Value::Record(fields), Schema::Record(record)) = (value, reader) {
        for f in &record.fields {
            let Some((_, v)) = fields.iter().find(|(n, _)| *n == f.name) else {
                continue;
            };
            if let Err(e) = v.clone().resolve_with_names(&f.schema, names) {
                return format!("field `{}`: {}", f.name, describe(&e));
            }
        }
    }
    describe(&whole)
}

/// An Avro resolution error in words (some of the library's own say something else).
fn describe(e: &apache_avro::Error) -> String {
    match e.details() {
        // Raised for a symbol the reader's enum lacks, whether or not the enum has a default.
        Details::GetEnumDefault { symbol, symbols } => format!(
            "symbol `{symbol}` is not one of the reader's enum symbols {symbols:?}, and the \
             reader's enum has no default to read it as"
        ),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schemas;
    use crate::tools::simulator::Simulator;

    fn framed(schema: &Schema, id: u32, value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_header(&mut out, id);
        apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .expect("writer")
            .write_value_ref(&mut out, value)
            .expect("encodes");
        out
    }

    /// A record whose last string is cut short is an error, not a record with a null there
    /// (apache-avro reads such a string as null; its bytes, copied into the scored record,
    /// would make an output nobody can read).
    #[test]
    fn a_datum_cut_inside_its_last_string_is_undecodable() {
        let payment = schemas::payment().expect("schema").clone();
        let decoder =
            Decoder::with_writers(payment.clone(), [(1, payment.clone())]).expect("decoder");
        let mut p = Simulator::new(Default::default())
            .expect("sim")
            .next()
            .expect("event")
            .0;
        p.ip_address = Some("203.0.113.77".into());
        let frame = framed(&payment, 1, &p.to_value());
        assert!(decoder.decode_known(Some(&frame)).is_ok());
        for cut in 1..5 {
            let err = decoder
                .decode_known(Some(&frame[..frame.len() - cut]))
                .expect_err("cut short");
            assert_eq!(err.reason(), Reason::Undecodable, "{err}");
        }
    }

    /// Errors say which schema the record failed against.
    #[test]
    fn errors_name_the_schema_and_field_at_fault() {
        let payment = schemas::payment().expect("schema").clone();
        let mut v: serde_json::Value = serde_json::from_str(schemas::PAYMENT_AVSC).expect("json");
        for f in v["fields"].as_array_mut().expect("fields") {
            if f["name"] == "channel" {
                f["type"]["symbols"]
                    .as_array_mut()
                    .expect("symbols")
                    .push("CRYPTO".into());
            }
        }
        let evolved = Schema::parse_str(&v.to_string()).expect("evolved");
        let decoder = Decoder::with_writers(payment.clone(), [(1, payment), (2, evolved.clone())])
            .expect("decoder");
        let p = Simulator::new(Default::default())
            .expect("sim")
            .next()
            .expect("event")
            .0;
        let Value::Record(mut fields) = p.to_value() else {
            unreachable!()
        };
        for (name, value) in &mut fields {
            if name == "channel" {
                *value = Value::Enum(4, "CRYPTO".into());
            }
        }
        let frame = framed(&evolved, 2, &Value::Record(fields));
        let err = decoder
            .decode_known(Some(&frame))
            .expect_err("unknown symbol");
        assert_eq!(err.reason(), Reason::IncompatibleSchema);
        assert_eq!(
            err.to_string(),
            "record of writer schema 2 cannot be read with the reader schema: field `channel`: \
             symbol `CRYPTO` is not one of the reader's enum symbols [\"POS\", \"ECOMMERCE\", \
             \"ATM\", \"MOTO\"], and the reader's enum has no default to read it as"
        );
        let err = decoder
            .decode_known(Some(&frame[..frame.len() / 2]))
            .expect_err("truncated");
        assert!(
            err.to_string()
                .starts_with("payload is not a valid Avro datum of writer schema 2: "),
            "{err}"
        );
    }

    /// Each error's dead-letter reason.
    #[test]
    fn each_error_has_its_reason() {
        let cases = [
            (
                DecodeError::Frame(FrameError::Missing),
                Reason::NotConfluentFramed,
            ),
            (
                DecodeError::Frame(FrameError::TooShort(3)),
                Reason::NotConfluentFramed,
            ),
            (
                DecodeError::Frame(FrameError::BadMagic(7)),
                Reason::NotConfluentFramed,
            ),
            (
                DecodeError::Schema {
                    id: 1,
                    reason: "404".into(),
                    retriable: false,
                },
                Reason::UnknownSchemaId,
            ),
            (
                DecodeError::Incompatible {
                    id: 1,
                    reason: "no field".into(),
                },
                Reason::IncompatibleSchema,
            ),
            (
                DecodeError::Resolve {
                    id: 1,
                    reason: "enum".into(),
                },
                Reason::IncompatibleSchema,
            ),
            (
                DecodeError::Datum {
                    id: 1,
                    reason: "eof".into(),
                },
                Reason::Undecodable,
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(error.reason(), reason, "{error}");
        }
    }
}
