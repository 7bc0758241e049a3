//! What a scored record decides: the topology's alert rules, each with its score found once
//! (by its place among the scores), and the strongest decision among those that fire.

use super::record::ScoreValue;
use crate::topology::config::{AlertRule, Decision};

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

#[cfg(test)]
mod tests {
    use super::*;

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
            model: "".into(),
            version: "".into(),
            role: crate::topology::config::Role::Primary,
            score: String::new(),
            qualified: q.into(),
            value: v,
        };
        let compiled =
            Rules::new(&rules, &["m.fraud".to_string(), "a.anomaly".to_string()]).expect("rules");
        let mut fired = Vec::new();
        for (scores, want, names) in [
            ([0.1, 0.2], Decision::Allow, vec![]),
            ([0.3, 2.0], Decision::Review, vec!["review", "odd"]),
            ([0.95, 0.0], Decision::Block, vec!["block", "review"]),
        ] {
            let values = [s("m.fraud", scores[0]), s("a.anomaly", scores[1])];
            assert_eq!(compiled.decide(&values, &mut fired), want);
            let got: Vec<&str> = fired.iter().map(|r| compiled.name(*r)).collect();
            assert_eq!(got, names);
        }
        assert!(Rules::new(&rules, &["m.fraud".to_string()]).is_err());
    }
}
