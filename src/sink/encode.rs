//! Avro encoding into Confluent's wire format with a schema registered once under the topic's
//! subject (TopicNameStrategy). Encoding itself never calls the registry.

use apache_avro::Schema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use schema_registry_converter::async_impl::schema_registry::{SrSettings, post_schema};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::wire;

/// Why a record could not be encoded or its schema registered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EncodeError {
    /// The registry refused the schema or could not be reached.
    #[error("registering the schema under subject {subject}: {reason}")]
    Register {
        /// The subject.
        subject: String,
        /// The registry client's message.
        reason: String,
        /// Whether trying again may succeed.
        retriable: bool,
    },
    /// The schema text is not Avro.
    #[error("schema for subject {subject} does not parse: {reason}")]
    Schema {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
    /// The value does not match the schema.
    #[error("value does not match schema {id}: {reason}")]
    Value {
        /// The schema id.
        id: u32,
        /// Why.
        reason: String,
    },
}

self_cell::self_cell!(
    /// A schema and the datum writer that borrows it (name resolution done once).
    pub(crate) struct SchemaWriter {
        owner: Schema,
        #[covariant]
        dependent: GenericDatumWriter,
    }
);

impl SchemaWriter {
    /// A writer for `schema`.
    pub(crate) fn of(schema: Schema) -> Result<Self, apache_avro::Error> {
        SchemaWriter::try_new(schema, |s| GenericDatumWriter::builder(s).build())
    }

    /// The writer.
    pub(crate) fn writer(&self) -> &GenericDatumWriter<'_> {
        self.borrow_dependent()
    }
}

/// Encodes values of one schema, registered under one subject; there is one encoder per output
/// topic.
pub struct FramedEncoder {
    writer: SchemaWriter,
    id: u32,
}

impl FramedEncoder {
    /// Registers `avsc` under `subject` (or finds it there) and returns an encoder for it.
    pub async fn register(sr: &SrSettings, subject: &str, avsc: &str) -> Result<Self, EncodeError> {
        let schema = Schema::parse_str(avsc).map_err(|e| EncodeError::Schema {
            subject: subject.to_string(),
            reason: e.to_string(),
        })?;
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, avsc.to_string());
        let registered = post_schema(sr, subject.to_string(), supplied)
            .await
            .map_err(|e| EncodeError::Register {
                subject: subject.to_string(),
                reason: match &e.cause {
                    Some(c) => format!("{}: {c}", e.error),
                    None => e.error.clone(),
                },
                retriable: e.retriable,
            })?;
        let writer = SchemaWriter::of(schema).map_err(|e| EncodeError::Schema {
            subject: subject.to_string(),
            reason: e.to_string(),
        })?;
        Ok(FramedEncoder {
            writer,
            id: registered.id,
        })
    }

    /// The registry id of the schema.
    pub fn schema_id(&self) -> u32 {
        self.id
    }

    /// Encodes one value, appending the frame to `out`.
    pub fn encode_into(&self, value: Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        wire::write_header(out, self.id);
        if let Err(e) = self.writer.writer().write_value_ref(out, &value) {
            out.truncate(start);
            return Err(EncodeError::Value {
                id: self.id,
                reason: e.to_string(),
            });
        }
        Ok(())
    }

    /// Encodes one value into a new buffer.
    pub fn encode(&self, value: Value) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(256);
        self.encode_into(value, &mut out)?;
        Ok(out)
    }
}
