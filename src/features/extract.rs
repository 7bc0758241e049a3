//! Pulling what the features need out of a decoded Avro record: the key, the event time, and
//! the numeric and categorical field values, by field position resolved once per topology.

use std::hash::{DefaultHasher, Hash, Hasher};

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
}

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
                found: format!("{other:?}"),
            });
        }
    };
    if x.is_finite() {
        Ok(x)
    } else {
        Err(ExtractError::NotFinite(name.to_string()))
    }
}

/// A stable 64-bit hash of a string (SipHash with fixed keys: the same in every process).
pub fn hash_str(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
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
                found: format!("{other:?}"),
            });
        }
    })
}

/// A field value as text (for the record key).
pub fn text(fields: &[(String, Value)], index: usize, name: &str) -> Result<String, ExtractError> {
    match field(fields, index, name)? {
        Value::String(s) => Ok(s.clone()),
        Value::Enum(_, s) => Ok(s.clone()),
        Value::Uuid(u) => Ok(u.to_string()),
        other => Err(ExtractError::WrongType {
            field: name.to_string(),
            found: format!("{other:?}"),
        }),
    }
}

/// Event time in ms.
pub fn time_ms(fields: &[(String, Value)], index: usize, name: &str) -> Result<i64, ExtractError> {
    match field(fields, index, name)? {
        Value::TimestampMillis(t) | Value::Long(t) => Ok(*t),
        Value::TimestampMicros(t) => Ok(t.div_euclid(1000)),
        other => Err(ExtractError::WrongType {
            field: name.to_string(),
            found: format!("{other:?}"),
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
