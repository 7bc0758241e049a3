//! The models a cycle is scored with, as one set: each model's batcher and workers, the
//! feature columns it takes and its drift monitor ([`Member`]); which models score a record
//! (a primary, or for a share of the keys its canary, and every shadow); where each published
//! score comes from ([`ScoreSlots`]) and the alert rules over them.
//!
//! A set never changes. A reload ([`super::reload`]) builds a new one beside it, keeping the
//! members whose entry and file did not change, and the loop switches to it between two
//! cycles: every record of a cycle is scored by one set. A cycle holds its set until it is
//! committed, so the set's drift monitors see its rows and a replaced model's sessions are
//! freed only when no cycle needs them.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::batcher::{ModelBatcher, Scored};
use crate::scorer::ScorerError;
use crate::scorer::drift::DriftMonitor;
use crate::sink::decision::Rules;
use crate::sink::record::{DECISIONS, ScoreValue};
use crate::telemetry::events::ModelLoaded;
use crate::telemetry::metrics as names;
use crate::topology::Loaded;
use crate::topology::config::{Decision, Model, Role};

/// A canary's buckets: a key's bucket is its XXH3-64 modulo this, and a canary with share `s`
/// takes the buckets below `round(s × BUCKETS)`.
pub(super) const BUCKETS: u64 = 10_000;

/// The canary bucket of a feature key: `xxh3_64(key as UTF-8) mod 10000`. A specified hash, so
/// a key gets the same bucket in every instance, build and replay (and can be recomputed
/// outside: the README shows how).
pub(super) fn bucket(key: &str) -> u16 {
    (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % BUCKETS) as u16
}

/// The buckets a canary of `share` takes.
fn buckets_of(share: f64) -> u16 {
    (share.clamp(0.0, 1.0) * BUCKETS as f64).round() as u16
}

/// One model of a set.
pub(super) struct Member {
    /// Its topology entry.
    pub(super) entry: Model,
    /// The file served, and its digest (what says it changed).
    pub(super) file: PathBuf,
    pub(super) digest: String,
    pub(super) batcher: ModelBatcher,
    /// Where its input columns come from among the features.
    pub(super) columns: Vec<usize>,
    pub(super) drift: Mutex<DriftMonitor>,
    /// When it was loaded.
    pub(super) loaded_at: SystemTime,
    /// The name its scores answer to: a canary's primary's, else its own.
    pub(super) published_as: String,
    /// Committed records whose decision it took part in, by decision (for a shadow with a
    /// primary: the decision had it stood in for that primary).
    decisions: [metrics::Counter; 3],
}

impl Member {
    /// Its version.
    pub(super) fn version(&self) -> &str {
        &self.batcher.info().version
    }

    /// Counts `n` committed decisions `d`.
    pub(super) fn decided(&self, d: Decision, n: u64) {
        self.decisions[d as usize].increment(n);
    }
}

/// A topology's models, loaded, and how their scores become the published ones.
pub(super) struct ModelSet {
    pub(super) members: Vec<Arc<Member>>,
    /// Per member, its share of the keys (canaries), as the topology says now.
    pub(super) shares: Vec<Option<f64>>,
    /// Per member that is a primary with a canary: the canary and the buckets it takes.
    canary: Vec<Option<(usize, u16)>>,
    pub(super) scores: ScoreSlots,
    pub(super) rules: Rules,
    /// Per rule and variant (0: its primary decided, 1: the primary's canary did), the labels
    /// its alerts are counted by: the rule, the model and the version.
    pub(super) rule_labels: Vec<(String, String, String)>,
    /// Per shadow that names a primary: the shadow and, per score, (its slot, the primary's).
    shadows: Vec<(usize, Vec<(usize, usize)>)>,
}

/// Why a set could not be built: the model and what went wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(super) struct Refused(pub(super) String);

impl From<ScorerError> for Refused {
    fn from(e: ScorerError) -> Self {
        Refused(e.to_string())
    }
}

impl ModelSet {
    /// Loads the models of `loaded`, keeping those of `previous` whose entry, place and file
    /// are unchanged (their sessions, and their drift statistics, carry on). Each new model
    /// runs a warm-up row, which must score finite numbers.
    pub(super) fn build(
        loaded: &Loaded,
        previous: Option<&ModelSet>,
        results: &Sender<Scored>,
        throttle: Option<f64>,
    ) -> Result<(Self, usize), Refused> {
        let t = &loaded.topology;
        let feature_names: Vec<&str> = t.features.iter().map(|f| f.name.as_str()).collect();
        let mut members = Vec::with_capacity(t.models.len());
        let mut fresh = 0;
        for (i, m) in t.models.iter().enumerate() {
            let file = loaded
                .model_paths
                .get(i)
                .ok_or_else(|| Refused(format!("model {}: no file resolved", m.name)))?;
            // A topology put together in code may leave the version directories out.
            let version = loaded.model_versions.get(i).and_then(Option::as_deref);
            let digest = crate::scorer::session::file_digest(file);
            let kept = previous.and_then(|p| p.members.get(i)).filter(|old| {
                same_but_share(&old.entry, m) && old.file == *file && old.digest == digest
            });
            if let Some(old) = kept {
                members.push(old.clone());
                continue;
            }
            members.push(Arc::new(Member::start(
                i,
                m,
                file,
                version,
                digest,
                &feature_names,
                results,
                throttle,
            )?));
            fresh += 1;
        }
        let shares = t.models.iter().map(|m| m.share).collect();
        Ok((Self::assemble(members, shares, &t.alerts)?, fresh))
    }

    /// The set of `members` (in topology order), each canary with its share in `shares` (the
    /// topology's now: a member kept across a reload that changed only its share has the one
    /// it was loaded with), with `alerts` over their scores.
    pub(super) fn assemble(
        members: Vec<Arc<Member>>,
        shares: Vec<Option<f64>>,
        alerts: &[crate::topology::config::AlertRule],
    ) -> Result<Self, Refused> {
        let canary = members
            .iter()
            .map(|p| {
                let c = members.iter().position(|c| {
                    c.entry.role == Role::Canary && c.entry.of.as_deref() == Some(&p.entry.name)
                })?;
                (p.entry.role == Role::Primary).then(|| {
                    (
                        c,
                        buckets_of(shares.get(c).copied().flatten().unwrap_or(0.0)),
                    )
                })
            })
            .collect::<Vec<_>>();
        let scores = ScoreSlots::new(&members, &canary);
        let rules = Rules::new(alerts, &scores.qualified()).map_err(Refused)?;
        let rule_labels = scores.rule_labels(&rules);
        let shadows = scores.shadows(&members);
        Ok(ModelSet {
            members,
            shares,
            canary,
            scores,
            rules,
            rule_labels,
            shadows,
        })
    }

    /// The members that score a record of `bucket`: each primary, or its canary where the
    /// bucket is the canary's, and every shadow.
    pub(super) fn routes(&self, bucket: u16) -> impl Iterator<Item = usize> + '_ {
        self.members
            .iter()
            .enumerate()
            .filter_map(move |(i, m)| match m.entry.role {
                Role::Primary => Some(self.decider(i, bucket)),
                Role::Shadow => Some(i),
                Role::Canary => None,
            })
    }

    /// Who decides for primary `i` at `bucket`: its canary, or itself.
    fn decider(&self, i: usize, bucket: u16) -> usize {
        match self.canary.get(i).copied().flatten() {
            Some((c, taken)) if bucket < taken => c,
            _ => i,
        }
    }

    /// The members whose scores decided a record of `bucket` (a primary or its canary each).
    pub(super) fn deciders(&self, bucket: u16) -> impl Iterator<Item = usize> + '_ {
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.entry.role == Role::Primary)
            .map(move |(i, _)| self.decider(i, bucket))
    }

    /// Per shadow that names a primary, the decision had it stood in for that primary, given
    /// the record's published `values` (`scratch` is reused).
    pub(super) fn shadow_decisions<'s>(
        &'s self,
        values: &'s [ScoreValue],
        scratch: &'s mut [ScoreValue],
        fired: &'s mut Vec<usize>,
    ) -> impl Iterator<Item = (usize, Decision)> + 's {
        self.shadows.iter().map(move |(s, pairs)| {
            // Rules read values only: the provenance stays as `scratch` was made.
            for (to, from) in scratch.iter_mut().zip(values) {
                to.value = from.value;
            }
            for &(own, primary) in pairs {
                scratch[primary].value = values[own].value;
            }
            (*s, self.rules.decide(scratch, fired))
        })
    }

    /// Its members that `next` does not keep no longer score: their info gauges go to 0.
    pub(super) fn retire_unless_in(&self, next: &ModelSet) {
        for m in &self.members {
            if !next.members.iter().any(|n| Arc::ptr_eq(n, m)) {
                m.drift.lock().unwrap_or_else(|p| p.into_inner()).retire();
            }
        }
    }

    /// Its members score now: their info gauges at 1 (also where a retired member had the
    /// same labels).
    pub(super) fn activate(&self) {
        for m in &self.members {
            m.drift.lock().unwrap_or_else(|p| p.into_inner()).activate();
        }
    }

    /// Any member's batcher that died, as an error.
    pub(super) fn check(&self) -> Result<(), crate::batcher::BatcherError> {
        self.members.iter().try_for_each(|m| m.batcher.check())
    }

    /// The batchers, in member order.
    pub(super) fn batchers(&self) -> impl Iterator<Item = &ModelBatcher> {
        self.members.iter().map(|m| &m.batcher)
    }
}

impl Member {
    #[allow(clippy::too_many_arguments)]
    fn start(
        index: usize,
        m: &Model,
        file: &Path,
        version: Option<&str>,
        digest: String,
        feature_names: &[&str],
        results: &Sender<Scored>,
        throttle: Option<f64>,
    ) -> Result<Self, Refused> {
        let columns = m
            .features
            .iter()
            .map(|f| {
                feature_names
                    .iter()
                    .position(|n| n == f)
                    .ok_or_else(|| Refused(format!("model {}: no feature `{f}`", m.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batcher = ModelBatcher::start(index, m, file, version, results.clone(), throttle)?;
        Ok(Self::new(m, file, digest, batcher, columns))
    }

    /// A model whose batcher is running, taking `columns` of the features.
    pub(super) fn new(
        m: &Model,
        file: &Path,
        digest: String,
        batcher: ModelBatcher,
        columns: Vec<usize>,
    ) -> Self {
        let info = batcher.info().clone();
        let published_as = match m.role {
            Role::Canary => m.of.clone().unwrap_or_else(|| m.name.clone()),
            _ => m.name.clone(),
        };
        ModelLoaded {
            model: &m.name,
            version: &info.version,
            role: m.role.as_str(),
            drift_reference: info.reference.is_some(),
        }
        .emit();
        let drift = DriftMonitor::new(m, &published_as, &info.version, info.reference.as_deref());
        let labels = |d: &str| {
            [
                ("model", published_as.clone()),
                ("version", info.version.clone()),
                ("role", m.role.as_str().to_string()),
                ("decision", d.to_string()),
            ]
        };
        // In `Decision as usize` order, as `DECISIONS` lists them.
        let decisions = DECISIONS.map(|(_, d)| {
            let c = metrics::counter!(names::MODEL_DECISIONS, &labels(d));
            c.increment(0);
            c
        });
        Member {
            entry: m.clone(),
            file: file.to_path_buf(),
            digest,
            batcher,
            columns,
            drift: Mutex::new(drift),
            loaded_at: SystemTime::now(),
            published_as,
            decisions,
        }
    }
}

/// Whether a model kept as it was serves entry `new`: the same in everything but a canary's
/// share (a share is the set's, not the model's: changing it reloads nothing).
fn same_but_share(old: &Model, new: &Model) -> bool {
    Model {
        share: new.share,
        ..old.clone()
    } == *new
}

/// One published score: where it comes from, and its provenance for each who can give it.
struct Slot {
    /// The member that gives it, and the score's place among that member's.
    member: usize,
    score: usize,
    /// Where a canary gives it instead: the canary, the buckets it takes, and its provenance.
    canary: Option<(usize, u16, ScoreValue)>,
}

/// Every published score, in order: primaries' (each given by the primary or its canary) and
/// shadows', in topology order. `values` holds each one's provenance as the primary (or the
/// shadow) gives it; [`ScoreSlots::fill`] writes a record's values and provenance in.
pub(super) struct ScoreSlots {
    slots: Vec<Slot>,
    pub(super) values: Vec<ScoreValue>,
}

impl ScoreSlots {
    fn new(members: &[Arc<Member>], canary: &[Option<(usize, u16)>]) -> Self {
        let value = |m: &Member, i: usize| {
            let spec = &m.entry.scores[i];
            ScoreValue {
                model: m.published_as.as_str().into(),
                version: m.version().into(),
                role: m.entry.role,
                score: spec.name.clone(),
                qualified: format!("{}.{}", m.published_as, spec.name),
                value: f64::NAN,
            }
        };
        let (slots, values) = members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.entry.role != Role::Canary)
            .flat_map(|(k, m)| {
                (0..m.entry.scores.len()).map(move |i| {
                    let canary = canary
                        .get(k)
                        .copied()
                        .flatten()
                        .map(|(c, taken)| (c, taken, value(&members[c], i)));
                    (
                        Slot {
                            member: k,
                            score: i,
                            canary,
                        },
                        value(m, i),
                    )
                })
            })
            .unzip();
        ScoreSlots { slots, values }
    }

    /// Every score's `<model>.<score>`, as rules name them.
    pub(super) fn qualified(&self) -> Vec<String> {
        self.values.iter().map(|v| v.qualified.clone()).collect()
    }

    /// Fills `values` with a record's scores and their provenance (NaN where one is missing):
    /// `scores` per member, `bucket` the record's.
    pub(super) fn fill(&self, values: &mut [ScoreValue], scores: &[Option<Vec<f64>>], bucket: u16) {
        for ((slot, v), primary) in self.slots.iter().zip(values).zip(&self.values) {
            let (member, from) = match &slot.canary {
                Some((c, taken, canary)) if bucket < *taken => (*c, canary),
                _ => (slot.member, primary),
            };
            if v.role != from.role || !Arc::ptr_eq(&v.version, &from.version) {
                v.version = from.version.clone();
                v.role = from.role;
            }
            v.value = scores
                .get(member)
                .and_then(|got| got.as_ref()?.get(slot.score).copied())
                .unwrap_or(f64::NAN);
        }
    }

    /// Per rule, for its primary and for the primary's canary: (rule, model, version).
    fn rule_labels(&self, rules: &Rules) -> Vec<(String, String, String)> {
        (0..rules.len())
            .flat_map(|r| {
                let slot = rules
                    .score_of(r)
                    .and_then(|i| Some((self.slots.get(i)?, self.values.get(i)?)));
                let label = |v: Option<&ScoreValue>| {
                    let (model, version) = v
                        .map(|v| (v.model.to_string(), v.version.to_string()))
                        .unwrap_or_default();
                    (rules.name(r).to_string(), model, version)
                };
                let primary = slot.map(|(_, v)| v);
                let canary = slot.map(|(s, v)| s.canary.as_ref().map_or(v, |c| &c.2));
                [label(primary), label(canary)]
            })
            .collect()
    }

    /// The variant (0 primary, 1 canary) a record's value of slot `i` was given by.
    pub(super) fn variant(values: &[ScoreValue], i: usize) -> usize {
        usize::from(values.get(i).is_some_and(|v| v.role == Role::Canary))
    }

    /// Per shadow naming a primary: its slots paired with the primary's.
    fn shadows(&self, members: &[Arc<Member>]) -> Vec<(usize, Vec<(usize, usize)>)> {
        members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.entry.role == Role::Shadow)
            .filter_map(|(s, m)| {
                let of = m.entry.of.as_ref()?;
                let p = members.iter().position(|p| &p.entry.name == of)?;
                let at = |k: usize| self.slots.iter().position(|sl| sl.member == k);
                let (own, primary) = (at(s)?, at(p)?);
                let n = m.entry.scores.len();
                Some((s, (0..n).map(|i| (own + i, primary + i)).collect()))
            })
            .collect()
    }
}

/// Sets of models that need no ONNX Runtime, for tests: each entry scored by its own scorer.
#[cfg(test)]
pub(super) mod testing {
    use std::sync::mpsc::{Receiver, channel};

    use super::*;
    use crate::batcher::Scorer;
    use crate::topology::config::AlertRule;

    /// A model entry from TOML.
    pub(in crate::pipeline) fn entry(toml: &str) -> Model {
        toml::from_str(toml).expect("a model entry")
    }

    /// The set of `entries` (taking the features at `columns`), with `alerts`.
    pub(in crate::pipeline) fn set(
        entries: Vec<(Model, Vec<usize>, Box<dyn Scorer>)>,
        alerts: &[AlertRule],
    ) -> (Arc<ModelSet>, Receiver<Scored>) {
        let (tx, rx) = channel();
        let members: Vec<Arc<Member>> = entries
            .into_iter()
            .enumerate()
            .map(|(i, (m, columns, scorer))| {
                let b = ModelBatcher::start_with(i, &m, vec![scorer], tx.clone(), None)
                    .expect("starts");
                Arc::new(Member::new(&m, Path::new("m.onnx"), "d".into(), b, columns))
            })
            .collect();
        let shares = members
            .iter()
            .map(|m: &Arc<Member>| m.entry.share)
            .collect();
        let set = ModelSet::assemble(members, shares, alerts).expect("assembles");
        (Arc::new(set), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{entry, set};
    use super::*;
    use crate::batcher::Scorer;
    use crate::scorer::ModelInfo;
    use crate::topology::config::AlertRule;

    /// Scores every row `value`.
    struct Constant(ModelInfo, f64);

    impl Scorer for Constant {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn score(&mut self, rows: &[f32]) -> Result<Vec<Vec<f64>>, ScorerError> {
            Ok(vec![vec![self.1; rows.len()]])
        }
    }

    fn constant(version: &str, value: f64) -> Box<dyn Scorer> {
        Box::new(Constant(
            ModelInfo {
                name: "m".into(),
                version: version.into(),
                input: "x".into(),
                width: 1,
                reference: None,
            },
            value,
        ))
    }

    const SCORE: &str = r#"scores = [{ name = "fraud", output = "p" }]"#;

    fn fraud_with(extra: &[(&str, &str, f64)]) -> Arc<ModelSet> {
        let mut entries = vec![(
            entry(&format!(
                "name = \"fraud\"\npath = \"a.onnx\"\nfeatures = [\"x\"]\n{SCORE}"
            )),
            vec![0],
            constant("1", 0.1),
        )];
        for (name, role_lines, value) in extra {
            entries.push((
                entry(&format!(
                    "name = \"{name}\"\npath = \"b.onnx\"\nfeatures = [\"x\"]\n{SCORE}\n{role_lines}"
                )),
                vec![0],
                constant("2", *value),
            ));
        }
        let rule = AlertRule {
            name: "block".into(),
            score: "fraud.fraud".into(),
            threshold: 0.5,
            decision: Decision::Block,
        };
        set(entries, &[rule]).0
    }

    /// A canary takes the keys whose bucket is below its share's, and decides for them under
    /// its primary's name with its own version; the primary scores the others.
    #[test]
    fn a_canary_decides_for_its_share_of_keys_under_its_primarys_name() {
        let s = fraud_with(&[(
            "next",
            "role = \"canary\"\nof = \"fraud\"\nshare = 0.25",
            0.9,
        )]);
        assert_eq!(s.routes(2_499).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.routes(2_500).collect::<Vec<_>>(), vec![0]);
        assert_eq!(s.deciders(0).collect::<Vec<_>>(), vec![1]);
        let mut values = s.scores.values.clone();
        let scores = vec![None, Some(vec![0.9])];
        s.scores.fill(&mut values, &scores, 10);
        assert_eq!(values.len(), 1);
        assert_eq!(&*values[0].model, "fraud");
        assert_eq!(&*values[0].version, "2");
        assert_eq!(values[0].role, Role::Canary);
        assert_eq!(values[0].value, 0.9);
        let mut fired = Vec::new();
        assert_eq!(s.rules.decide(&values, &mut fired), Decision::Block);
        assert_eq!(ScoreSlots::variant(&values, 0), 1);
        // The same buffer, for a key of the primary's.
        s.scores.fill(&mut values, &[Some(vec![0.1]), None], 9_999);
        assert_eq!((&*values[0].version, values[0].role), ("1", Role::Primary));
        assert_eq!(s.rules.decide(&values, &mut fired), Decision::Allow);
        assert_eq!(
            s.rule_labels,
            vec![
                ("block".into(), "fraud".into(), "1".into()),
                ("block".into(), "fraud".into(), "2".into())
            ]
        );
    }

    /// A shadow scores every record under its own name and decides nothing; naming a primary,
    /// its would-be decision is the one with its scores in the primary's place.
    #[test]
    fn a_shadow_scores_everything_and_decides_nothing() {
        let s = fraud_with(&[("candidate", "role = \"shadow\"\nof = \"fraud\"", 0.9)]);
        for bucket in [0, 5_000, 9_999] {
            assert_eq!(s.routes(bucket).collect::<Vec<_>>(), vec![0, 1]);
            assert_eq!(s.deciders(bucket).collect::<Vec<_>>(), vec![0]);
        }
        let mut values = s.scores.values.clone();
        s.scores
            .fill(&mut values, &[Some(vec![0.1]), Some(vec![0.9])], 0);
        let shown: Vec<_> = values
            .iter()
            .map(|v| (v.model.to_string(), v.version.to_string(), v.role, v.value))
            .collect();
        assert_eq!(
            shown,
            vec![
                ("fraud".into(), "1".into(), Role::Primary, 0.1),
                ("candidate".into(), "2".into(), Role::Shadow, 0.9)
            ]
        );
        let mut fired = Vec::new();
        assert_eq!(s.rules.decide(&values, &mut fired), Decision::Allow);
        let (mut scratch, mut f) = (values.clone(), Vec::new());
        let would: Vec<_> = s.shadow_decisions(&values, &mut scratch, &mut f).collect();
        assert_eq!(would, vec![(1, Decision::Block)]);
    }

    /// Buckets are XXH3-64 of the key modulo 10,000: fixed values, so other tools can
    /// recompute them.
    #[test]
    fn buckets_are_a_specified_hash_of_the_key() {
        assert_eq!(u64::from(bucket("")), 0x2d06_8005_38d3_94c2 % BUCKETS);
        assert_eq!(buckets_of(0.05), 500);
        assert_eq!(buckets_of(1.0), 10_000);
    }
}
