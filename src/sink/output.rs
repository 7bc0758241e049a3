//! The scored event: its schema, derived from the input's reader schema (the input record is
//! embedded whole as `event`), and building one from an input record, its features, scores and
//! the topology's rules. `schemas/scored_payment.avsc` is what this gives for payments.

use std::collections::HashMap;

use apache_avro::types::Value;
use serde_json::{Value as Json, json};

use crate::topology::config::{AlertRule, Decision};

/// The scored schema for an input schema (both as JSON text).
pub fn scored_schema(input_avsc: &str) -> Result<String, String> {
    let input: Json =
        serde_json::from_str(input_avsc).map_err(|e| format!("input schema is not JSON: {e}"))?;
    let name = input["name"]
        .as_str()
        .ok_or("input schema has no record name")?;
    let mut out = json!({
        "type": "record",
        "name": format!("Scored{name}"),
        "doc": format!("A {name} with the features the models saw, the models' scores and the decision. Keyed like the input, one record per input event."),
        "fields": [
            {"name": "event", "type": input, "doc": "The input event, field for field as it was read (resolved to the reader schema)."},
            {"name": "features", "type": {"type": "map", "values": "double"}, "doc": "The feature values the models were given, by the feature names in the topology."},
            {"name": "scores", "type": {"type": "array", "items": {
                "type": "record", "name": "ModelScore", "fields": [
                    {"name": "model", "type": "string", "doc": "Model name from the topology."},
                    {"name": "version", "type": "string", "doc": "Model version (its `version` metadata, else a digest of the file)."},
                    {"name": "score", "type": "string", "doc": "Score name from the topology."},
                    {"name": "value", "type": "double", "doc": "The score."}
                ]}}, "doc": "One entry per score the topology takes from its models."},
            {"name": "decision", "type": {"type": "enum", "name": "Decision", "symbols": ["ALLOW", "REVIEW", "BLOCK"]}, "doc": "The strongest decision among the rules that fired; ALLOW when none did."},
            {"name": "rules_fired", "type": {"type": "array", "items": "string"}, "default": [], "doc": "Names of the alert rules that fired."},
            {"name": "processing", "type": {
                "type": "record", "name": "Processing", "fields": [
                    {"name": "processor", "type": "string", "doc": "Instance id of the processor that scored the event."},
                    {"name": "topology", "type": "string", "doc": "Name of the topology."},
                    {"name": "source_topic", "type": "string"},
                    {"name": "source_partition", "type": "int"},
                    {"name": "source_offset", "type": "long"},
                    {"name": "writer_schema_id", "type": "int", "doc": "Registry id of the schema the input was written with."},
                    {"name": "processed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}, "doc": "Wall-clock time of scoring. Not a function of the input: leave it out when comparing runs."}
                ]}, "doc": "Where the event came from and how it was processed."}
        ]
    });
    if let Some(ns) = input.get("namespace") {
        out["namespace"] = ns.clone();
    }
    serde_json::to_string_pretty(&out).map_err(|e| e.to_string())
}

/// A score with its provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreValue {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Score name.
    pub score: String,
    /// `<model>.<score>`, as rules name it.
    pub qualified: String,
    /// The value.
    pub value: f64,
}

/// Where the event came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance<'a> {
    /// Instance id.
    pub processor: &'a str,
    /// Topology name.
    pub topology: &'a str,
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Writer schema id.
    pub schema_id: u32,
    /// Processing time, ms.
    pub processed_at: i64,
}

/// The rules that fire on `scores`, and the decision.
pub fn decide(rules: &[AlertRule], scores: &[ScoreValue]) -> (Decision, Vec<String>) {
    let mut decision = Decision::Allow;
    let mut fired = Vec::new();
    for r in rules {
        if scores
            .iter()
            .any(|s| s.qualified == r.score && s.value >= r.threshold)
        {
            fired.push(r.name.clone());
            decision = decision.max(r.decision);
        }
    }
    (decision, fired)
}

/// A topology's alert rules with each rule's score found once, by its place among the scores
/// (`<model>.<score>` in topology order), so deciding compares numbers, not names.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Per rule: the index of its score, the threshold, the decision.
    rules: Vec<(usize, f64, Decision)>,
    names: Vec<String>,
}

impl Rules {
    /// `qualified`: every score's `<model>.<score>`, in the order scores are given to
    /// [`Rules::decide`]. A rule naming no score is an error (validation reports it first).
    pub fn new(rules: &[AlertRule], qualified: &[String]) -> Result<Self, String> {
        let compiled = rules
            .iter()
            .map(|r| {
                qualified
                    .iter()
                    .position(|q| *q == r.score)
                    .map(|i| (i, r.threshold, r.decision))
                    .ok_or_else(|| format!("alert rule `{}`: no score `{}`", r.name, r.score))
            })
            .collect::<Result<_, _>>()?;
        Ok(Rules {
            rules: compiled,
            names: rules.iter().map(|r| r.name.clone()).collect(),
        })
    }

    /// The decision for `scores`; `fired` gets the indices of the rules that fired.
    pub fn decide(&self, scores: &[ScoreValue], fired: &mut Vec<usize>) -> Decision {
        fired.clear();
        let mut decision = Decision::Allow;
        for (i, (score, threshold, d)) in self.rules.iter().enumerate() {
            if scores.get(*score).is_some_and(|s| s.value >= *threshold) {
                fired.push(i);
                decision = decision.max(*d);
            }
        }
        decision
    }

    /// A rule's name.
    pub fn name(&self, rule: usize) -> &str {
        self.names.get(rule).map_or("", String::as_str)
    }

    /// The score index a rule reads.
    pub fn score_of(&self, rule: usize) -> Option<usize> {
        self.rules.get(rule).map(|r| r.0)
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn decision_value(d: Decision) -> Value {
    match d {
        Decision::Allow => Value::Enum(0, "ALLOW".into()),
        Decision::Review => Value::Enum(1, "REVIEW".into()),
        Decision::Block => Value::Enum(2, "BLOCK".into()),
    }
}

/// The scored record.
pub fn scored_record(
    event: Value,
    feature_names: &[&str],
    features: &[f64],
    scores: &[ScoreValue],
    decision: Decision,
    fired: &[String],
    p: &Provenance<'_>,
) -> Value {
    let features: HashMap<String, Value> = feature_names
        .iter()
        .zip(features)
        .map(|(n, v)| ((*n).to_string(), Value::Double(*v)))
        .collect();
    let scores = scores
        .iter()
        .map(|s| {
            Value::Record(vec![
                ("model".into(), Value::String(s.model.clone())),
                ("version".into(), Value::String(s.version.clone())),
                ("score".into(), Value::String(s.score.clone())),
                ("value".into(), Value::Double(s.value)),
            ])
        })
        .collect();
    Value::Record(vec![
        ("event".into(), event),
        ("features".into(), Value::Map(features)),
        ("scores".into(), Value::Array(scores)),
        ("decision".into(), decision_value(decision)),
        (
            "rules_fired".into(),
            Value::Array(fired.iter().map(|f| Value::String(f.clone())).collect()),
        ),
        (
            "processing".into(),
            Value::Record(vec![
                ("processor".into(), Value::String(p.processor.to_string())),
                ("topology".into(), Value::String(p.topology.to_string())),
                ("source_topic".into(), Value::String(p.topic.to_string())),
                ("source_partition".into(), Value::Int(p.partition)),
                ("source_offset".into(), Value::Long(p.offset)),
                ("writer_schema_id".into(), Value::Int(p.schema_id as i32)),
                (
                    "processed_at".into(),
                    Value::TimestampMillis(p.processed_at),
                ),
            ]),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schemas;

    #[test]
    fn the_shipped_scored_schema_is_what_the_payment_schema_gives() {
        let generated: Json =
            serde_json::from_str(&scored_schema(schemas::PAYMENT_AVSC).expect("generates"))
                .expect("json");
        if std::env::var_os("KSCORE_WRITE_SCHEMAS").is_some() {
            let text = serde_json::to_string_pretty(&generated).expect("json") + "\n";
            std::fs::write(
                concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/scored_payment.avsc"),
                text,
            )
            .expect("write");
        }
        let shipped: Json = serde_json::from_str(schemas::SCORED_PAYMENT_AVSC).expect("json");
        assert_eq!(
            generated, shipped,
            "regenerate with KSCORE_WRITE_SCHEMAS=1 cargo test --lib scored_schema"
        );
        assert!(apache_avro::Schema::parse(&generated).is_ok());
    }

    #[test]
    fn the_strongest_fired_decision_wins() {
        let rule = |name: &str, score: &str, threshold: f64, decision| AlertRule {
            name: name.into(),
            score: score.into(),
            threshold,
            decision,
        };
        let rules = vec![
            rule("block", "m.fraud", 0.8, Decision::Block),
            rule("review", "m.fraud", 0.3, Decision::Review),
            rule("odd", "a.anomaly", 1.0, Decision::Review),
        ];
        let s = |q: &str, v: f64| ScoreValue {
            model: String::new(),
            version: String::new(),
            score: String::new(),
            qualified: q.into(),
            value: v,
        };
        assert_eq!(
            decide(&rules, &[s("m.fraud", 0.1), s("a.anomaly", 0.2)]),
            (Decision::Allow, vec![])
        );
        assert_eq!(
            decide(&rules, &[s("m.fraud", 0.3), s("a.anomaly", 2.0)]),
            (Decision::Review, vec!["review".into(), "odd".into()])
        );
        assert_eq!(
            decide(&rules, &[s("m.fraud", 0.95), s("a.anomaly", 0.0)]),
            (Decision::Block, vec!["block".into(), "review".into()])
        );
        // The compiled rules decide the same, by index.
        let compiled =
            Rules::new(&rules, &["m.fraud".to_string(), "a.anomaly".to_string()]).expect("rules");
        let mut fired = Vec::new();
        for (scores, want) in [
            ([0.1, 0.2], Decision::Allow),
            ([0.3, 2.0], Decision::Review),
            ([0.95, 0.0], Decision::Block),
        ] {
            let values = [s("m.fraud", scores[0]), s("a.anomaly", scores[1])];
            assert_eq!(compiled.decide(&values, &mut fired), want);
            let names: Vec<String> = fired
                .iter()
                .map(|r| compiled.name(*r).to_string())
                .collect();
            assert_eq!(names, decide(&rules, &values).1);
        }
        assert!(Rules::new(&rules, &["m.fraud".to_string()]).is_err());
    }
}
