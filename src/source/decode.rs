//! Avro decoding of Confluent-framed payloads. The writer schema is fetched from the registry
//! by the id in the frame (the client caches it) and every record is resolved to the reader
//! schema, so producers can evolve their schema compatibly without the processor noticing.
//! When writer and reader are the same schema the resolution step is skipped.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;

use crate::wire::{self, FrameError};

/// A decoded record.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The writer schema's registry id.
    pub schema_id: u32,
    /// The record, resolved to the reader schema.
    pub value: Value,
    /// The datum's bytes when they were written with the reader schema itself, so they are
    /// already the reader schema's encoding of `value` (and can be copied instead of encoded).
    pub verbatim: Option<Vec<u8>>,
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

    /// Every value [`DecodeError::reason`] returns.
    pub const REASONS: &'static [&'static str] = &[
        "not_confluent_framed",
        "unknown_schema_id",
        "incompatible_schema",
        "undecodable",
    ];

    /// A short, fixed label for metrics and dead-letter headers.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Frame(_) => "not_confluent_framed",
            DecodeError::Schema { .. } => "unknown_schema_id",
            DecodeError::Incompatible { .. } => "incompatible_schema",
            DecodeError::Datum { .. } => "undecodable",
        }
    }
}

/// A datum reader for one writer schema, resolving to the reader schema unless they are the same.
/// Schemas are leaked to get `'static` readers that can be cached: there is one per writer
/// schema id seen, a handful over a process's life (decoders are made once per process too), and building a reader (name resolution) per
/// record would cost more than decoding it.
struct Writer {
    reader: GenericDatumReader<'static>,
    same_as_reader: bool,
}

/// Decodes framed payloads into records of one reader schema.
pub struct Decoder {
    registry: AvroDecoder,
    reader: &'static Schema,
    reader_canonical: String,
    writers: RwLock<HashMap<u32, Arc<Writer>>>,
}

impl Decoder {
    /// A decoder that resolves everything to `reader`.
    pub fn new(registry: SrSettings, reader: Schema) -> Self {
        let reader: &'static Schema = Box::leak(Box::new(reader));
        let reader_canonical = reader.canonical_form();
        Decoder {
            registry: AvroDecoder::new(registry),
            reader,
            reader_canonical,
            writers: RwLock::default(),
        }
    }

    /// The reader schema.
    pub fn reader(&self) -> &Schema {
        self.reader
    }

    async fn writer(&self, id: u32) -> Result<Arc<Writer>, DecodeError> {
        if let Some(w) = self
            .writers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(w.clone());
        }
        let fetched = self
            .registry
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
        let schema: &'static Schema = Box::leak(Box::new(fetched.parsed.clone()));
        let same_as_reader = schema.canonical_form() == self.reader_canonical;
        let incompatible = |reason: String| DecodeError::Incompatible { id, reason };
        let reader = if same_as_reader {
            GenericDatumReader::builder(schema).build()
        } else {
            SchemaCompatibility::can_read(schema, self.reader)
                .map_err(|e| incompatible(e.to_string()))?;
            GenericDatumReader::builder(schema)
                .reader_schema(self.reader)
                .build()
        }
        .map_err(|e| incompatible(e.to_string()))?;
        let w = Arc::new(Writer {
            reader,
            same_as_reader,
        });
        self.writers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, w.clone());
        Ok(w)
    }

    /// Decodes one payload (a Kafka record's value).
    pub async fn decode(&self, payload: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        let (id, mut datum) = wire::parse(payload)?;
        let whole = datum;
        let writer = self.writer(id).await?;
        let value = writer
            .reader
            .read_value(&mut datum)
            .map_err(|e| DecodeError::Datum {
                id,
                reason: e.to_string(),
            })?;
        if !datum.is_empty() {
            return Err(DecodeError::Datum {
                id,
                reason: format!("{} bytes left over after the record", datum.len()),
            });
        }
        Ok(Decoded {
            schema_id: id,
            value,
            verbatim: writer.same_as_reader.then(|| whole.to_vec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `REASONS` (registered at 0 for the dashboards) is exactly what `reason` gives.
    #[test]
    fn every_reason_is_listed_and_every_listed_reason_occurs() {
        let errors = [
            DecodeError::Frame(FrameError::Missing),
            DecodeError::Frame(FrameError::TooShort(3)),
            DecodeError::Frame(FrameError::BadMagic(7)),
            DecodeError::Schema {
                id: 1,
                reason: "404".into(),
                retriable: false,
            },
            DecodeError::Schema {
                id: 1,
                reason: "503".into(),
                retriable: true,
            },
            DecodeError::Incompatible {
                id: 1,
                reason: "no field".into(),
            },
            DecodeError::Datum {
                id: 1,
                reason: "eof".into(),
            },
        ];
        let given: BTreeSet<&str> = errors.iter().map(DecodeError::reason).collect();
        let listed: BTreeSet<&str> = DecodeError::REASONS.iter().copied().collect();
        assert_eq!(given, listed);
        assert_eq!(listed.len(), DecodeError::REASONS.len(), "listed twice");
    }
}
