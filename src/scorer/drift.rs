//! Drift: how the scores and inputs of a model version in production compare with the data it
//! was validated on. The reference travels inside the model file (ONNX metadata key
//! [`REFERENCE_KEY`], written by `scripts/train_models.py`): the mean of each input feature and,
//! per score, bin edges with the share of reference rows in each bin.
//!
//! [`DriftMonitor`] follows the committed rows of one model version with exponentially weighted
//! statistics over about the last [`WINDOW`] rows (exact means while fewer have been seen) and
//! publishes the score histogram, the feature means and the population-stability index
//! `PSI = Σ (actual − expected) · ln(actual / expected)` over the bins.

use metrics::{Gauge, Histogram};

use crate::telemetry::metrics as names;
use crate::topology::config::Model;

/// The ONNX metadata key holding the reference, as JSON.
pub const REFERENCE_KEY: &str = "kscore.reference";

/// Rows the recent statistics weigh, roughly.
pub const WINDOW: f64 = 10_000.0;

/// Shares below this count as this in the PSI (an empty bin would make it infinite).
const FLOOR: f64 = 1e-4;

/// What a model's inputs and scores looked like on its reference data.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Reference {
    /// Where the reference came from, for people.
    #[serde(default)]
    pub source: String,
    /// Mean of each input column, in input order.
    pub feature_means: Vec<f64>,
    /// Per score of the model (matched by output and column).
    pub scores: Vec<ScoreReference>,
}

/// One score's reference distribution.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ScoreReference {
    /// The output tensor.
    pub output: String,
    /// Its column.
    #[serde(default)]
    pub column: usize,
    /// Increasing bin edges; a value falls in bin `number of edges <= value`.
    pub edges: Vec<f64>,
    /// Share of reference rows per bin (`edges.len() + 1` of them, summing to 1).
    pub proportions: Vec<f64>,
}

impl Reference {
    /// Parses and checks the metadata value for a model of `width` inputs.
    pub fn parse(json: &str, width: usize) -> Result<Self, String> {
        let r: Reference = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if r.feature_means.len() != width {
            return Err(format!(
                "feature_means has {} values for {width} inputs",
                r.feature_means.len()
            ));
        }
        for (i, s) in r.scores.iter().enumerate() {
            if s.proportions.len() != s.edges.len() + 1 {
                return Err(format!(
                    "scores[{i}]: {} proportions for {} edges (expected edges + 1)",
                    s.proportions.len(),
                    s.edges.len()
                ));
            }
            if !s.edges.windows(2).all(|w| w[0] < w[1]) {
                return Err(format!("scores[{i}]: edges are not increasing"));
            }
            let total: f64 = s.proportions.iter().sum();
            if (total - 1.0).abs() > 1e-6 || s.proportions.iter().any(|p| *p < 0.0) {
                return Err(format!("scores[{i}]: proportions do not sum to 1"));
            }
        }
        Ok(r)
    }

    /// The reference of the score read from `output`, `column`.
    pub fn score(&self, output: &str, column: usize) -> Option<&ScoreReference> {
        self.scores
            .iter()
            .find(|s| s.output == output && s.column == column)
    }
}

/// The bin of `v` among `edges`.
fn bin(edges: &[f64], v: f64) -> usize {
    edges.partition_point(|e| *e <= v)
}

/// Population-stability index of `actual` shares against `expected` ones.
pub fn psi(actual: &[f64], expected: &[f64]) -> f64 {
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| {
            let (a, e) = (a.max(FLOOR), e.max(FLOOR));
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// A recent mean: the exact mean of the first rows, then exponentially weighted.
#[derive(Debug, Clone, Copy, Default)]
struct Recent {
    n: f64,
    mean: f64,
}

impl Recent {
    fn add(&mut self, v: f64) {
        self.n += 1.0;
        self.mean += (v - self.mean) / self.n.min(WINDOW);
    }
}

/// A score's recent share per reference bin.
struct Bins {
    edges: Vec<f64>,
    expected: Vec<f64>,
    recent: Vec<Recent>,
    psi: Gauge,
}

struct ScoreDrift {
    histogram: Histogram,
    /// Absent without a reference.
    bins: Option<Bins>,
}

/// The drift statistics of one model version.
pub struct DriftMonitor {
    info: Gauge,
    rows: metrics::Counter,
    features: Vec<(Recent, Gauge)>,
    scores: Vec<ScoreDrift>,
}

impl DriftMonitor {
    /// For `model` (its inputs and scores as the topology lists them) at `version`, its series
    /// labelled `published_as` (the name its scores answer to) and its role; registers them
    /// (the reference means set; the version's info gauge at 1 only from [`Self::activate`]).
    pub fn new(
        model: &Model,
        published_as: &str,
        version: &str,
        reference: Option<&Reference>,
    ) -> Self {
        let (m, v) = (published_as.to_string(), version.to_string());
        let role = model.role.as_str();
        // Set by `activate` once the version scores: a model loaded for a reload that is then
        // refused, or not switched to yet, never shows as scoring.
        let info = metrics::gauge!(names::MODEL_INFO, "model" => m.clone(), "version" => v.clone(), "role" => role);
        let features = model
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if let Some(r) = reference {
                    metrics::gauge!(names::MODEL_FEATURE_REFERENCE_MEAN, "model" => m.clone(), "version" => v.clone(), "role" => role, "feature" => f.clone())
                        .set(r.feature_means[i]);
                }
                let g = metrics::gauge!(names::MODEL_FEATURE_MEAN, "model" => m.clone(), "version" => v.clone(), "role" => role, "feature" => f.clone());
                (Recent::default(), g)
            })
            .collect();
        let scores = model
            .scores
            .iter()
            .map(|spec| {
                let labels = [
                    ("model", m.clone()),
                    ("version", v.clone()),
                    ("role", role.to_string()),
                    ("score", spec.name.clone()),
                ];
                let bins = reference
                    .and_then(|r| r.score(&spec.output, spec.column))
                    .map(|s| Bins {
                        edges: s.edges.clone(),
                        expected: s.proportions.clone(),
                        recent: vec![Recent::default(); s.proportions.len()],
                        psi: metrics::gauge!(names::MODEL_SCORE_PSI, &labels),
                    });
                ScoreDrift {
                    histogram: metrics::histogram!(names::MODEL_SCORE, &labels),
                    bins,
                }
            })
            .collect();
        DriftMonitor {
            rows: metrics::counter!(names::MODEL_ROWS, "model" => m, "version" => v, "role" => role),
            features,
            scores,
            info,
        }
    }

    /// The version no longer scores (a reload replaced it): its info gauge goes to 0.
    pub fn retire(&self) {
        self.info.set(0.0);
    }

    /// The version scores: its info gauge at 1.
    pub fn activate(&self) {
        self.info.set(1.0);
    }

    /// One committed row: the model's inputs and its scores.
    pub fn observe(&mut self, inputs: impl Iterator<Item = f64>, scores: &[f64]) {
        self.rows.increment(1);
        for ((recent, _), x) in self.features.iter_mut().zip(inputs) {
            recent.add(x);
        }
        for (s, &v) in self.scores.iter_mut().zip(scores) {
            s.histogram.record(v);
            if let Some(bins) = &mut s.bins {
                let b = bin(&bins.edges, v);
                for (i, share) in bins.recent.iter_mut().enumerate() {
                    share.add(if i == b { 1.0 } else { 0.0 });
                }
            }
        }
    }

    /// Sets the gauges from the statistics so far.
    pub fn publish(&self) {
        for (recent, gauge) in &self.features {
            if recent.n > 0.0 {
                gauge.set(recent.mean);
            }
        }
        for s in &self.scores {
            if let Some(bins) = &s.bins
                && bins.recent.first().is_some_and(|r| r.n > 0.0)
            {
                let actual: Vec<f64> = bins.recent.iter().map(|r| r.mean).collect();
                bins.psi.set(psi(&actual, &bins.expected));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fall_in_the_bin_of_the_edges_at_or_below_them() {
        let edges = [1.0, 2.0, 3.0];
        assert_eq!(bin(&edges, 0.5), 0);
        assert_eq!(bin(&edges, 1.0), 1);
        assert_eq!(bin(&edges, 2.5), 2);
        assert_eq!(bin(&edges, 3.0), 3);
        assert_eq!(bin(&edges, 99.0), 3);
        assert_eq!(bin(&edges, f64::NAN), 0);
    }

    #[test]
    fn psi_is_zero_for_the_same_shares_and_grows_with_the_shift() {
        let e = [0.25, 0.25, 0.25, 0.25];
        assert_eq!(psi(&e, &e), 0.0);
        let small = psi(&[0.3, 0.25, 0.25, 0.2], &e);
        let large = psi(&[0.7, 0.1, 0.1, 0.1], &e);
        // (0.05·ln 1.2) + (−0.05·ln 0.8)
        assert!((small - (0.05 * 1.2f64.ln() - 0.05 * 0.8f64.ln())).abs() < 1e-12);
        assert!(large > 0.25 && small < 0.1, "{small} {large}");
        // An empty bin is floored, not infinite.
        assert!(psi(&[0.0, 0.5, 0.5, 0.0], &e).is_finite());
    }

    #[test]
    fn recent_means_are_exact_at_first_then_forget_old_rows() {
        let mut r = Recent::default();
        for v in [1.0, 2.0, 3.0] {
            r.add(v);
        }
        assert!((r.mean - 2.0).abs() < 1e-12);
        for _ in 0..(20.0 * WINDOW) as usize {
            r.add(10.0);
        }
        assert!((r.mean - 10.0).abs() < 1e-6, "{}", r.mean);
    }

    #[test]
    fn a_reference_is_checked_against_the_model() {
        let ok = r#"{"feature_means":[1.0,2.0],"scores":[{"output":"p","column":1,"edges":[0.5],"proportions":[0.9,0.1]}]}"#;
        let r = Reference::parse(ok, 2).unwrap();
        assert_eq!(r.score("p", 1).unwrap().edges, vec![0.5]);
        assert!(r.score("p", 0).is_none());
        assert!(
            Reference::parse(ok, 3)
                .unwrap_err()
                .contains("feature_means has 2 values for 3 inputs")
        );
        let bad = r#"{"feature_means":[1.0],"scores":[{"output":"p","edges":[0.5,0.6],"proportions":[0.9,0.1]}]}"#;
        assert!(
            Reference::parse(bad, 1)
                .unwrap_err()
                .contains("2 proportions for 2 edges")
        );
        let unsorted = r#"{"feature_means":[1.0],"scores":[{"output":"p","edges":[0.6,0.5],"proportions":[0.3,0.3,0.4]}]}"#;
        assert!(
            Reference::parse(unsorted, 1)
                .unwrap_err()
                .contains("not increasing")
        );
    }
}
