//! Why a record goes to the dead-letter topic: one enum for every stage of the data path, so
//! the label in a dead letter's `kscore.reason` header and in the `reason` label of
//! `kscore_records_dead_lettered_total` is fixed, and the list of them (registered at 0 for the
//! dashboards, written in the README) is the enum itself.

use strum::{EnumCount, EnumIter, IntoStaticStr};

/// Why a record is dead-lettered. The label is the variant's name in snake case.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, EnumIter, EnumCount, IntoStaticStr,
)]
#[strum(serialize_all = "snake_case")]
pub enum Reason {
    /// No value, shorter than the 5-byte header, or no magic byte.
    NotConfluentFramed,
    /// A schema id the registry does not have.
    UnknownSchemaId,
    /// Written with a schema the reader schema cannot read, or holding a value it has no place
    /// for (an enum symbol it lacks).
    IncompatibleSchema,
    /// Not a valid datum of its writer schema.
    Undecodable,
    /// No key field, a null one or an empty one.
    MissingKey,
    /// A key over [`crate::features::extract::MAX_KEY_BYTES`].
    KeyTooLong,
    /// No event time, or a null one.
    MissingEventTime,
    /// An event time outside the topology's range.
    EventTimeOutOfRange,
    /// A field a feature reads is missing or null.
    MissingField,
    /// A field a feature reads has a type it cannot use.
    BadField,
    /// A NaN or infinite numeric input, or an aggregate of finite ones that overflows.
    NonFiniteFeature,
    /// In a batch a model failed on.
    ScoringFailed,
    /// A score that is not a finite number.
    NonFiniteScore,
    /// Cannot be written as a scored record.
    Unencodable,
    /// Its scored record is larger than the producer or its topic takes.
    OutputTooLarge,
    /// Its scored record is refused by the broker for another reason of the record's own.
    OutputRejected,
}

impl Reason {
    /// The fixed label (`not_confluent_framed`, ...).
    pub fn label(self) -> &'static str {
        self.into()
    }

    /// Every reason, in declaration order.
    pub fn all() -> impl Iterator<Item = Reason> {
        <Reason as strum::IntoEnumIterator>::iter()
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's table of dead-letter reasons lists exactly these.
    #[test]
    fn the_readme_lists_every_reason() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README");
        let section = readme
            .split("### Bad records")
            .nth(1)
            .and_then(|s| s.split("\n### ").next())
            .expect("a *Bad records* section");
        let listed: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split_once('`').map(|(r, _)| r))
            .filter(|r| *r != "kscore.reason")
            .collect();
        let all: Vec<&str> = Reason::all().map(Reason::label).collect();
        assert_eq!(listed, all);
    }

    #[test]
    fn labels_are_the_names_in_snake_case_and_unique() {
        assert_eq!(Reason::NotConfluentFramed.label(), "not_confluent_framed");
        assert_eq!(
            Reason::EventTimeOutOfRange.label(),
            "event_time_out_of_range"
        );
        let labels: std::collections::HashSet<&str> = Reason::all().map(Reason::label).collect();
        assert_eq!(labels.len(), Reason::COUNT);
    }
}
