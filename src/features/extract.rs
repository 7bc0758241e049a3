//! Pulling what the features need out of a decoded Avro record: the key, the event time, and
//! the numeric and categorical field values, by field position resolved once per topology.

use std::borrow::Cow;

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

/// A top-level field's value as the features see it, borrowed from wherever the record lives: a
/// generic Avro value, or a datum read in place ([`crate::source::Direct`]). A union is seen as
/// its branch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    /// Null (an optional field left empty).
    Null,
    /// A boolean.
    Boolean(bool),
    /// An `int`.
    Int(i32),
    /// A `long`.
    Long(i64),
    /// A `float`.
    Float(f32),
    /// A `double`.
    Double(f64),
    /// A `string`.
    Str(&'a str),
    /// An enum's symbol.
    Enum(&'a str),
    /// A `uuid`.
    Uuid(uuid::Uuid),
    /// A `timestamp-millis`.
    TimestampMillis(i64),
    /// A `timestamp-micros`.
    TimestampMicros(i64),
    /// Any other type, by its name (for error messages): no feature reads it.
    Other(&'static str),
}

impl<'a> Scalar<'a> {
    /// How the features see an Avro value.
    pub fn of(v: &'a Value) -> Self {
        let v = match v {
            Value::Union(_, inner) => inner,
            other => other,
        };
        match v {
            Value::Null => Scalar::Null,
            Value::Boolean(b) => Scalar::Boolean(*b),
            Value::Int(i) => Scalar::Int(*i),
            Value::Long(l) => Scalar::Long(*l),
            Value::Float(f) => Scalar::Float(*f),
            Value::Double(d) => Scalar::Double(*d),
            Value::String(s) => Scalar::Str(s),
            Value::Enum(_, s) => Scalar::Enum(s),
            Value::Uuid(u) => Scalar::Uuid(*u),
            Value::TimestampMillis(t) => Scalar::TimestampMillis(*t),
            Value::TimestampMicros(t) => Scalar::TimestampMicros(*t),
            other => Scalar::Other(type_name(other)),
        }
    }

    /// The type's name, for error messages (the value itself may be large or sensitive).
    fn type_name(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Boolean(_) => "boolean",
            Scalar::Int(_) => "int",
            Scalar::Long(_) => "long",
            Scalar::Float(_) => "float",
            Scalar::Double(_) => "double",
            Scalar::Str(_) => "string",
            Scalar::Enum(_) => "enum",
            Scalar::Uuid(_) => "uuid",
            Scalar::TimestampMillis(_) => "timestamp-millis",
            Scalar::TimestampMicros(_) => "timestamp-micros",
            Scalar::Other(name) => name,
        }
    }
}

/// A record whose top-level fields are looked up by their position in the reader schema and
/// their name.
pub trait Fields {
    /// Whether the value is a record at all.
    fn is_record(&self) -> bool {
        true
    }

    /// The field at `index` if it is named `name`, else the field named `name`; `None` when the
    /// record has no such field.
    fn get(&self, index: usize, name: &str) -> Option<Scalar<'_>>;

    /// The [`layout`] of the record's top-level fields, where it is known without looking.
    fn layout(&self) -> Option<u64> {
        None
    }

    /// The field at `index`, for a caller that knows the record's [`Fields::layout`] (so needs
    /// no name to check it by).
    fn at(&self, _index: usize) -> Option<Scalar<'_>> {
        None
    }
}

/// A fingerprint of a record's top-level field names, in order: where a record's layout is a
/// schema's, a field's position in that schema is its position in the record.
pub fn layout<'n>(names: impl IntoIterator<Item = &'n str>) -> u64 {
    let mut all = Vec::new();
    for n in names {
        all.extend_from_slice(&(n.len() as u64).to_le_bytes());
        all.extend_from_slice(n.as_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&all)
}

/// Where a field is: its position in the reader schema and its name, and whether the record is
/// known to be laid out as that schema (then the position is enough, see [`Fields::layout`]).
#[derive(Debug, Clone, Copy)]
pub struct Place<'n> {
    /// Position in the reader schema.
    pub index: usize,
    /// The field's name.
    pub name: &'n str,
    /// The record's layout is the reader schema's.
    pub positional: bool,
}

impl<'n> Place<'n> {
    /// A field looked up by position, checked by name.
    pub fn new(index: usize, name: &'n str) -> Self {
        Place {
            index,
            name,
            positional: false,
        }
    }

    #[inline]
    fn get<'r, R: Fields + ?Sized>(&self, fields: &'r R) -> Option<Scalar<'r>> {
        if self.positional
            && let Some(v) = fields.at(self.index)
        {
            return Some(v);
        }
        fields.get(self.index, self.name)
    }
}

impl Fields for [(String, Value)] {
    fn get(&self, index: usize, name: &str) -> Option<Scalar<'_>> {
        // Records resolved to the reader schema have its fields in its order; check the name
        // anyway.
        match self.get(index) {
            Some((n, v)) if n == name => Some(Scalar::of(v)),
            _ => self
                .iter()
                .find_map(|(n, v)| (n == name).then(|| Scalar::of(v))),
        }
    }
}

impl Fields for Value {
    fn is_record(&self) -> bool {
        matches!(self, Value::Record(_))
    }

    fn get(&self, index: usize, name: &str) -> Option<Scalar<'_>> {
        match self {
            Value::Record(fields) => Fields::get(fields.as_slice(), index, name),
            _ => None,
        }
    }
}

/// A present, non-null field.
fn field<'r, R: Fields + ?Sized>(fields: &'r R, at: Place<'_>) -> Result<Scalar<'r>, ExtractError> {
    let name = at.name;
    match at.get(fields) {
        None | Some(Scalar::Null) => Err(ExtractError::Missing(name.to_string())),
        Some(v) => Ok(v),
    }
}

fn wrong(name: &str, found: Scalar<'_>) -> ExtractError {
    ExtractError::WrongType {
        field: name.to_string(),
        found: found.type_name().to_string(),
    }
}

/// A field value as a number.
pub fn numeric<R: Fields + ?Sized>(fields: &R, at: Place<'_>) -> Result<f64, ExtractError> {
    let name = at.name;
    let x = match field(fields, at)? {
        Scalar::Int(i) => f64::from(i),
        Scalar::Long(l) | Scalar::TimestampMillis(l) => l as f64,
        Scalar::Float(f) => f64::from(f),
        Scalar::Double(d) => d,
        other => return Err(wrong(name, other)),
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
pub fn categorical<R: Fields + ?Sized>(fields: &R, at: Place<'_>) -> Result<u64, ExtractError> {
    let name = at.name;
    Ok(match at.get(fields) {
        None => return Err(ExtractError::Missing(name.to_string())),
        Some(Scalar::Null) => hash_str(NULL_CATEGORY),
        Some(Scalar::Str(s) | Scalar::Enum(s)) => hash_str(s),
        Some(Scalar::Uuid(u)) => hash_str(&u.to_string()),
        Some(Scalar::Boolean(b)) => hash_str(if b { "true" } else { "false" }),
        Some(Scalar::Int(i)) => hash_str(&i.to_string()),
        Some(Scalar::Long(l)) => hash_str(&l.to_string()),
        Some(other) => return Err(wrong(name, other)),
    })
}

/// A field value as text (for the record key), borrowed from the record where it is text. An
/// empty string is refused (as a key it would pool every such record into one history), and so
/// is one over [`MAX_KEY_BYTES`].
pub fn text<'r, R: Fields + ?Sized>(
    fields: &'r R,
    at: Place<'_>,
) -> Result<Cow<'r, str>, ExtractError> {
    let name = at.name;
    let text = match field(fields, at)? {
        Scalar::Str(s) | Scalar::Enum(s) => Cow::Borrowed(s),
        Scalar::Uuid(u) => Cow::Owned(u.to_string()),
        other => return Err(wrong(name, other)),
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
pub fn time_ms<R: Fields + ?Sized>(fields: &R, at: Place<'_>) -> Result<i64, ExtractError> {
    let name = at.name;
    match field(fields, at)? {
        Scalar::TimestampMillis(t) | Scalar::Long(t) => Ok(t),
        Scalar::TimestampMicros(t) => Ok(t.div_euclid(1000)),
        other => Err(wrong(name, other)),
    }
}

/// The fields of a record value.
pub fn record(value: &Value) -> Result<&[(String, Value)], ExtractError> {
    match value {
        Value::Record(fields) => Ok(fields),
        _ => Err(ExtractError::NotARecord),
    }
}
