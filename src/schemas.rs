//! The Avro schemas shipped in `schemas/`, compiled into the binary so a deployed processor
//! cannot pick up a different reader schema than the one it was built and tested with.

use std::sync::LazyLock;

use apache_avro::Schema;

/// The input event: a card payment (`schemas/payment.avsc`).
pub const PAYMENT_AVSC: &str = include_str!("../schemas/payment.avsc");
/// The scored output event (`schemas/scored_payment.avsc`).
pub const SCORED_PAYMENT_AVSC: &str = include_str!("../schemas/scored_payment.avsc");

/// Parses a schema that was checked at build time by the tests below; a failure here is a
/// packaging bug, reported as an error rather than a panic.
pub fn parse(avsc: &str) -> Result<Schema, apache_avro::Error> {
    Schema::parse_str(avsc)
}

static PAYMENT: LazyLock<Result<Schema, String>> =
    LazyLock::new(|| parse(PAYMENT_AVSC).map_err(|e| format!("schemas/payment.avsc: {e}")));

/// The payment schema, parsed once.
pub fn payment() -> Result<&'static Schema, String> {
    PAYMENT.as_ref().map_err(Clone::clone)
}

/// Subject for a topic's values under Confluent's TopicNameStrategy.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_schemas_parse() {
        assert!(payment().is_ok());
        assert!(parse(SCORED_PAYMENT_AVSC).is_ok());
    }

    #[test]
    fn scored_payment_embeds_the_payment_schema_unchanged() {
        let scored: serde_json::Value =
            serde_json::from_str(SCORED_PAYMENT_AVSC).expect("scored schema is JSON");
        let payment: serde_json::Value =
            serde_json::from_str(PAYMENT_AVSC).expect("payment schema is JSON");
        assert_eq!(scored["fields"][0]["name"], "event");
        assert_eq!(scored["fields"][0]["type"], payment);
    }
}
