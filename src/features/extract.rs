//! Pulling what the features need out of a decoded Avro record: the key, the event time, and
//! the numeric and categorical field values, by field position resolved once per topology.

use apache_avro::types::Value;

/// Why a record cannot feed the features.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractError {
    /// The record is not a record.
    #[error("value is not a record")]
    NotARecord,
    /// A field is absent or null.
    #[error("field `{0}` is missing or null")]
    Missing(String),
    /// A field has a type the feature cannot use.
    #[error("field `{field}` has an unusable value: {found}")]
    WrongType {
        /// The field.
        field: String,
        /// What was found.
        found: String,
    },
    /// A numeric field is NaN or infinite.
    #[error("field `{0}` is not a finite number")]
    NotFinite(String),
    /// A text field that must say something (the key) is empty.
    #[error("field `{0}` is empty")]
    Empty(String),
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error("field `{field}` is {len} bytes long; a key is at most {MAX_KEY_BYTES} bytes")]
    TooLong {
        /// The field.
        field: String,
        /// Its length in bytes.
        len: usize,
    },
}

/// The longest key, in bytes. Keys name state (and changelog records, which must fit in one
/// Kafka record); no entity id is longer.
pub const MAX_KEY_BYTES: usize = 4_096;

fn unwrap_union(v: &Value) -> &Value {
    match v {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

fn field<'v>(
    fields: &'v [(String, Value)],
    index: usize,
    name: &str,
) -> Result<&'v Value, ExtractError> {
    // Records resolved to the reader schema have its fields in its order; check the name anyway.
    let v = match fields.get(index) {
        Some((n, v)) if n == name => v,
        _ => fields
            .iter()
            .find_map(|(n, v)| (n == name).then_some(v))
            .ok_or_else(|| ExtractError::Missing(name.to_string()))?,
    };
    match unwrap_union(v) {
        Value::Null => Err(ExtractError::Missing(name.to_string())),
        v => Ok(v),
    }
}

fn has_field(fields: &[(String, Value)], index: usize, name: &str) -> bool {
    matches!(fields.get(index), Some((n, _)) if n == name) || fields.iter().any(|(n, _)| n == name)
}

/// A field value as a number.
pub fn numeric(fields: &[(String, Value)], index: usize, name: &str) -> Result<f64, ExtractError> {
    let x = match field(fields, index, name)? {
        Value::Int(i) => f64::from(*i),
        Value::Long(l) | Value::TimestampMillis(l) => *l as f64,
        Value::Float(f) => f64::from(*f),
        Value::Double(d) => *d,
        other => {
            return Err(ExtractError::WrongType {
                field: name.to_string(),
                found: type_name(other).to_string(),
            });
        }
    };
    if x.is_finite() {
        Ok(x)
    } else {
        Err(ExtractError::NotFinite(name.to_string()))
    }
}

/// The 64-bit hash a category is kept as: XXH3-64 of its UTF-8 bytes, seed 0. A specified
/// algorithm, so the values in feature state (and in its changelog) are the same in every
/// build, toolchain and release; std's `DefaultHasher` promises none of that.
pub fn hash_str(s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(s.as_bytes())
}

/// The category of a null value (an optional field left empty): a value of its own.
const NULL_CATEGORY: &str = "\u{0}null";

/// A field value as a category: a stable hash of its text form. Null is a category of its own.
pub fn categorical(
    fields: &[(String, Value)],
    index: usize,
    name: &str,
) -> Result<u64, ExtractError> {
    let v = match field(fields, index, name) {
        Err(ExtractError::Missing(_)) if has_field(fields, index, name) => {
            return Ok(hash_str(NULL_CATEGORY));
        }
        other => other?,
    };
    Ok(match v {
        Value::String(s) => hash_str(s),
        Value::Enum(_, s) => hash_str(s),
        Value::Uuid(u) => hash_str(&u.to_string()),
        Value::Boolean(b) => hash_str(if *b { "true" } else { "false" }),
        Value::Int(i) => hash_str(&i.to_string()),
        Value::Long(l) => hash_str(&l.to_string()),
        other => {
            return Err(ExtractError::WrongType {
                field: name.to_string(),
                found: type_name(other).to_string(),
            });
        }
    })
}

/// A field value as text (for the record key). An empty string is refused (as a key it would
/// pool every such record into one history), and so is one over [`MAX_KEY_BYTES`].
pub fn text(fields: &[(String, Value)], index: usize, name: &str) -> Result<String, ExtractError> {
    let text = match field(fields, index, name)? {
        Value::String(s) => s.clone(),
        Value::Enum(_, s) => s.clone(),
        Value::Uuid(u) => u.to_string(),
        other => {
            return Err(ExtractError::WrongType {
                field: name.to_string(),
                found: type_name(other).to_string(),
            });
        }
    };
    if text.is_empty() {
        return Err(ExtractError::Empty(name.to_string()));
    }
    if text.len() > MAX_KEY_BYTES {
        return Err(ExtractError::TooLong {
            field: name.to_string(),
            len: text.len(),
        });
    }
    Ok(text)
}

/// An Avro value's type, for error messages (the value itself may be large or sensitive).
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Boolean(_) => "boolean",
        Value::Int(_) => "int",
        Value::Long(_) => "long",
        Value::Float(_) => "float",
        Value::Double(_) => "double",
        Value::Bytes(_) | Value::Fixed(..) => "bytes",
        Value::String(_) => "string",
        Value::Enum(..) => "enum",
        Value::Union(..) => "union",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Record(_) => "record",
        Value::Date(_) => "date",
        Value::Decimal(_) | Value::BigDecimal(_) => "decimal",
        Value::TimeMillis(_) | Value::TimeMicros(_) => "time",
        Value::TimestampMillis(_) => "timestamp-millis",
        Value::TimestampMicros(_) => "timestamp-micros",
        Value::Uuid(_) => "uuid",
        _ => "another type",
    }
}

/// Event time in ms.
pub fn time_ms(fields: &[(String, Value)], index: usize, name: &str) -> Result<i64, ExtractError> {
    match field(fields, index, name)? {
        Value::TimestampMillis(t) | Value::Long(t) => Ok(*t),
        Value::TimestampMicros(t) => Ok(t.div_euclid(1000)),
        other => Err(ExtractError::WrongType {
            field: name.to_string(),
            found: type_name(other).to_string(),
        }),
    }
}

/// The fields of a record value.
pub fn record(value: &Value) -> Result<&[(String, Value)], ExtractError> {
    match value {
        Value::Record(fields) => Ok(fields),
        _ => Err(ExtractError::NotARecord),
    }
}
