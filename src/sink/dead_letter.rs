//! The dead-letter record: the input's key and value as they were, with why and where from in
//! headers. One that cannot be published whole (its value, or even its key, over a size
//! limit) is cut down a step at a time: first without its value, then without its key; the
//! headers always keep the reason and the source position, and say what was left out.

use rdkafka::message::{Header, OwnedHeaders};

use crate::reason::Reason;

/// Header: why the record was dead-lettered (a fixed label, as in the metrics).
pub const REASON: &str = "kscore.reason";
/// Header: the error in words.
pub const ERROR: &str = "kscore.error";
/// Header: the input topic.
pub const SOURCE_TOPIC: &str = "kscore.source.topic";
/// Header: the input partition.
pub const SOURCE_PARTITION: &str = "kscore.source.partition";
/// Header: the input offset.
pub const SOURCE_OFFSET: &str = "kscore.source.offset";
/// Header: the topology's name.
pub const TOPOLOGY: &str = "kscore.topology";
/// Header, on a cut-down dead letter: the size in bytes of the input value left out.
pub const VALUE_OMITTED: &str = "kscore.value_omitted";
/// Header, on a cut-down dead letter: the size in bytes of the input key left out.
pub const KEY_OMITTED: &str = "kscore.key_omitted";

/// Longest `kscore.error` text, in bytes; longer ones are cut at a character boundary.
pub const MAX_ERROR_BYTES: usize = 1_000;

/// How much of the input a dead letter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cut {
    /// Key and value as they were.
    Whole,
    /// The key; the value left out.
    WithoutValue,
    /// Neither key nor value.
    WithoutKeyOrValue,
}

impl Cut {
    /// The next step down, if any.
    pub fn next(self) -> Option<Cut> {
        match self {
            Cut::Whole => Some(Cut::WithoutValue),
            Cut::WithoutValue => Some(Cut::WithoutKeyOrValue),
            Cut::WithoutKeyOrValue => None,
        }
    }
}

/// A dead letter for one input record.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Why.
    pub reason: Reason,
    /// The error in words.
    pub error: &'a str,
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Topology name.
    pub topology: &'a str,
    /// The input's key.
    pub key: Option<&'a [u8]>,
    /// The input's value (`None`: it had none, a tombstone).
    pub value: Option<&'a [u8]>,
}

impl DeadLetter<'_> {
    /// The key the dead letter carries.
    pub fn key(&self, cut: Cut) -> Option<&[u8]> {
        if cut == Cut::WithoutKeyOrValue {
            None
        } else {
            self.key
        }
    }

    /// The value the dead letter carries.
    pub fn value(&self, cut: Cut) -> Option<&[u8]> {
        if cut == Cut::Whole { self.value } else { None }
    }

    /// Its headers.
    pub fn headers(&self, cut: Cut) -> OwnedHeaders {
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(text(REASON, self.reason.label()))
            .insert(text(ERROR, truncate(self.error, MAX_ERROR_BYTES)))
            .insert(text(SOURCE_TOPIC, self.topic))
            .insert(text(SOURCE_PARTITION, &partition))
            .insert(text(SOURCE_OFFSET, &offset))
            .insert(text(TOPOLOGY, self.topology));
        if cut >= Cut::WithoutValue
            && let Some(v) = self.value
        {
            headers = headers.insert(text(VALUE_OMITTED, &v.len().to_string()));
        }
        if cut >= Cut::WithoutKeyOrValue
            && let Some(k) = self.key
        {
            headers = headers.insert(text(KEY_OMITTED, &k.len().to_string()));
        }
        headers
    }
}

fn text<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn header(h: &OwnedHeaders, key: &str) -> Option<String> {
        h.iter()
            .find(|x| x.key == key)
            .and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned()))
    }

    #[test]
    fn cutting_down_keeps_reason_and_position_and_says_what_was_left_out() {
        let long_error = "é".repeat(1_000);
        let d = DeadLetter {
            reason: Reason::OutputTooLarge,
            error: &long_error,
            topic: "payments",
            partition: 3,
            offset: 42,
            topology: "fraud",
            key: Some(b"crd_1"),
            value: Some(&[7; 2_000]),
        };
        let whole = d.headers(Cut::Whole);
        assert_eq!(
            (d.key(Cut::Whole), d.value(Cut::Whole).map(<[u8]>::len)),
            (Some(&b"crd_1"[..]), Some(2_000))
        );
        assert_eq!(header(&whole, VALUE_OMITTED), None);
        let error = header(&whole, ERROR).unwrap_or_default();
        assert!(error.len() <= MAX_ERROR_BYTES && error.len() >= MAX_ERROR_BYTES - 1);
        let no_value = d.headers(Cut::WithoutValue);
        assert_eq!(
            (d.key(Cut::WithoutValue), d.value(Cut::WithoutValue)),
            (Some(&b"crd_1"[..]), None)
        );
        assert_eq!(header(&no_value, VALUE_OMITTED).as_deref(), Some("2000"));
        let bare = d.headers(Cut::WithoutKeyOrValue);
        assert_eq!(
            (
                d.key(Cut::WithoutKeyOrValue),
                d.value(Cut::WithoutKeyOrValue)
            ),
            (None, None)
        );
        assert_eq!(header(&bare, KEY_OMITTED).as_deref(), Some("5"));
        for h in [&whole, &no_value, &bare] {
            assert_eq!(header(h, REASON).as_deref(), Some("output_too_large"));
            assert_eq!(header(h, SOURCE_PARTITION).as_deref(), Some("3"));
            assert_eq!(header(h, SOURCE_OFFSET).as_deref(), Some("42"));
            assert_eq!(header(h, SOURCE_TOPIC).as_deref(), Some("payments"));
        }
        assert_eq!(Cut::WithoutKeyOrValue.next(), None);
    }
}
