//! The card payment event of `schemas/payment.avsc` as a Rust type, with its mapping to and
//! from Avro values. The processor itself works on generic Avro records (topologies name their
//! fields); this type is for the simulator, the tests and anything that builds payments.

use apache_avro::types::Value;
use uuid::Uuid;

/// Where a payment was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Card-present at a point-of-sale terminal.
    Pos,
    /// Online.
    Ecommerce,
    /// Cash machine.
    Atm,
    /// Mail or telephone order.
    Moto,
}

/// How the card details were captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryMode {
    /// EMV chip.
    Chip,
    /// NFC tap.
    Contactless,
    /// Magnetic stripe swipe.
    Magstripe,
    /// Typed in by hand.
    Manual,
    /// Stored by the merchant.
    CredentialOnFile,
}

const CHANNELS: [(Channel, &str); 4] = [
    (Channel::Pos, "POS"),
    (Channel::Ecommerce, "ECOMMERCE"),
    (Channel::Atm, "ATM"),
    (Channel::Moto, "MOTO"),
];

const ENTRY_MODES: [(EntryMode, &str); 5] = [
    (EntryMode::Chip, "CHIP"),
    (EntryMode::Contactless, "CONTACTLESS"),
    (EntryMode::Magstripe, "MAGSTRIPE"),
    (EntryMode::Manual, "MANUAL"),
    (EntryMode::CredentialOnFile, "CREDENTIAL_ON_FILE"),
];

/// A card payment authorisation; field docs are in `schemas/payment.avsc`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct Payment {
    pub event_id: Uuid,
    /// Milliseconds since the Unix epoch, UTC.
    pub event_time: i64,
    pub card_id: String,
    pub account_id: String,
    pub merchant_id: String,
    pub merchant_name: String,
    pub mcc: String,
    pub amount_minor: i64,
    pub currency: String,
    pub merchant_country: String,
    pub card_country: String,
    pub channel: Channel,
    pub entry_mode: EntryMode,
    pub card_present: bool,
    pub device_id: Option<String>,
    pub ip_address: Option<String>,
}

/// A value that does not have the shape of a payment.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}`: {problem}")]
pub struct ShapeError {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn shape(field: &'static str, problem: impl Into<String>) -> ShapeError {
    ShapeError {
        field,
        problem: problem.into(),
    }
}

fn enum_value<T: Copy + PartialEq>(table: &[(T, &str)], v: T) -> Value {
    let (i, name) = table
        .iter()
        .enumerate()
        .find_map(|(i, (t, n))| (*t == v).then_some((i, *n)))
        .unwrap_or((0, table[0].1));
    Value::Enum(i as u32, name.to_string())
}

fn opt_string(v: &Option<String>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
    }
}

impl Payment {
    /// The Avro record for `schemas/payment.avsc`.
    pub fn to_value(&self) -> Value {
        Value::Record(vec![
            ("event_id".into(), Value::Uuid(self.event_id)),
            ("event_time".into(), Value::TimestampMillis(self.event_time)),
            ("card_id".into(), Value::String(self.card_id.clone())),
            ("account_id".into(), Value::String(self.account_id.clone())),
            (
                "merchant_id".into(),
                Value::String(self.merchant_id.clone()),
            ),
            (
                "merchant_name".into(),
                Value::String(self.merchant_name.clone()),
            ),
            ("mcc".into(), Value::String(self.mcc.clone())),
            ("amount_minor".into(), Value::Long(self.amount_minor)),
            ("currency".into(), Value::String(self.currency.clone())),
            (
                "merchant_country".into(),
                Value::String(self.merchant_country.clone()),
            ),
            (
                "card_country".into(),
                Value::String(self.card_country.clone()),
            ),
            ("channel".into(), enum_value(&CHANNELS, self.channel)),
            (
                "entry_mode".into(),
                enum_value(&ENTRY_MODES, self.entry_mode),
            ),
            ("card_present".into(), Value::Boolean(self.card_present)),
            ("device_id".into(), opt_string(&self.device_id)),
            ("ip_address".into(), opt_string(&self.ip_address)),
        ])
    }

    /// Reads a payment from an Avro record resolved to `schemas/payment.avsc`.
    pub fn from_value(value: &Value) -> Result<Self, ShapeError> {
        let Value::Record(fields) = value else {
            return Err(shape("<record>", "not a record"));
        };
        let get = |name: &'static str| -> Result<&Value, ShapeError> {
            fields
                .iter()
                .find_map(|(n, v)| (n == name).then_some(v))
                .ok_or_else(|| shape(name, "missing"))
        };
        let string = |name: &'static str| -> Result<String, ShapeError> {
            match get(name)? {
                Value::String(s) => Ok(s.clone()),
                other => Err(shape(name, format!("expected a string, found {other:?}"))),
            }
        };
        let opt = |name: &'static str| -> Result<Option<String>, ShapeError> {
            match get(name)? {
                Value::Union(_, inner) => match inner.as_ref() {
                    Value::Null => Ok(None),
                    Value::String(s) => Ok(Some(s.clone())),
                    other => Err(shape(
                        name,
                        format!("expected null or a string, found {other:?}"),
                    )),
                },
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                other => Err(shape(
                    name,
                    format!("expected null or a string, found {other:?}"),
                )),
            }
        };
        fn symbol<T: Copy>(
            table: &[(T, &str)],
            field: &'static str,
            v: &Value,
        ) -> Result<T, ShapeError> {
            match v {
                Value::Enum(_, s) => table
                    .iter()
                    .find_map(|(t, n)| (n == s).then_some(*t))
                    .ok_or_else(|| shape(field, format!("unknown symbol {s}"))),
                other => Err(shape(field, format!("expected an enum, found {other:?}"))),
            }
        }
        Ok(Payment {
            event_id: match get("event_id")? {
                Value::Uuid(u) => *u,
                Value::String(s) => {
                    Uuid::parse_str(s).map_err(|e| shape("event_id", e.to_string()))?
                }
                other => {
                    return Err(shape(
                        "event_id",
                        format!("expected a uuid, found {other:?}"),
                    ));
                }
            },
            event_time: match get("event_time")? {
                Value::TimestampMillis(t) | Value::Long(t) => *t,
                other => {
                    return Err(shape(
                        "event_time",
                        format!("expected timestamp-millis, found {other:?}"),
                    ));
                }
            },
            card_id: string("card_id")?,
            account_id: string("account_id")?,
            merchant_id: string("merchant_id")?,
            merchant_name: string("merchant_name")?,
            mcc: string("mcc")?,
            amount_minor: match get("amount_minor")? {
                Value::Long(v) => *v,
                Value::Int(v) => i64::from(*v),
                other => {
                    return Err(shape(
                        "amount_minor",
                        format!("expected a long, found {other:?}"),
                    ));
                }
            },
            currency: string("currency")?,
            merchant_country: string("merchant_country")?,
            card_country: string("card_country")?,
            channel: symbol(&CHANNELS, "channel", get("channel")?)?,
            entry_mode: symbol(&ENTRY_MODES, "entry_mode", get("entry_mode")?)?,
            card_present: match get("card_present")? {
                Value::Boolean(b) => *b,
                other => {
                    return Err(shape(
                        "card_present",
                        format!("expected a boolean, found {other:?}"),
                    ));
                }
            },
            device_id: opt("device_id")?,
            ip_address: opt("ip_address")?,
        })
    }

    /// Channel name as in the schema.
    pub fn channel_name(&self) -> &'static str {
        CHANNELS
            .iter()
            .find(|(c, _)| *c == self.channel)
            .map_or("POS", |(_, n)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schemas;

    fn sample() -> Payment {
        Payment {
            event_id: Uuid::from_u128(0x1234),
            event_time: 1_767_225_600_000,
            card_id: "crd_1".into(),
            account_id: "acc_1".into(),
            merchant_id: "mer_1".into(),
            merchant_name: "Corner Grocer".into(),
            mcc: "5411".into(),
            amount_minor: 2_345,
            currency: "EUR".into(),
            merchant_country: "NL".into(),
            card_country: "NL".into(),
            channel: Channel::Ecommerce,
            entry_mode: EntryMode::CredentialOnFile,
            card_present: false,
            device_id: Some("dev_9".into()),
            ip_address: None,
        }
    }

    #[test]
    fn avro_round_trip_through_the_shipped_schema() {
        let schema = schemas::payment().expect("schema");
        let p = sample();
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .expect("writer");
        let bytes = writer.write_value_to_vec(p.to_value()).expect("encodes");
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .expect("reader");
        let back = reader.read_value(&mut bytes.as_slice()).expect("decodes");
        assert_eq!(Payment::from_value(&back), Ok(p));
    }
}
