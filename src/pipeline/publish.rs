//! Publishing a cycle: its scored records (and alerts) and dead letters in input order, and
//! the changelog of the state it changed. A record the producer refuses on its own account
//! becomes a dead letter here, and a dead letter that does not fit is cut down; anything else
//! fails the cycle (see `delivery` for the transaction around it and `recovery` for what
//! follows a failure).

use std::collections::{BTreeMap, HashMap};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::cycle::{Outcome, Pending};
use super::models::{ModelSet, ScoreSlots};
use super::now_ms;
use crate::features::{FeatureSet, FeatureState};
use crate::kafka::produce::{self, Out, OutputProducer, SendError};
use crate::reason::Reason;
use crate::sink::dead_letter::{Cut, DeadLetter};
use crate::sink::record::{Event, Provenance, ScoreValue, ScoredEncoder, ScoredRecord};
use crate::topology::Loaded;
use crate::topology::config::Decision;

/// Where the outputs go and how they are framed.
pub(super) struct Outputs {
    pub(super) scored: ScoredEncoder,
    /// The scored schema's id under the scored topic's subject, and under the alerts topic's
    /// (the same with a registry that keeps ids global, as Confluent's does).
    pub(super) scored_id: u32,
    pub(super) alerts_id: u32,
    pub(super) scored_topic: String,
    pub(super) alerts_topic: Option<String>,
    pub(super) dlq_topic: String,
    pub(super) changelog_topic: String,
}

/// What one cycle published.
#[derive(Debug, Default, Clone)]
pub(super) struct Counts {
    pub(super) changelog: u64,
    pub(super) changelog_bytes: u64,
    pub(super) scored: u64,
    pub(super) alerts: u64,
    /// Alerts by rule and variant (`2 × rule + 0` where the rule's primary decided, `+ 1` where
    /// its canary did; see `ModelSet::rule_labels`).
    pub(super) fired: Vec<u64>,
    /// Per model of the cycle's set, the committed decisions it took part in, by decision.
    pub(super) decisions: Vec<[u64; 3]>,
    /// Dead letters by reason.
    pub(super) dead: BTreeMap<Reason, u64>,
}

impl Counts {
    /// Nothing published yet, by a cycle scored with `models`.
    pub(super) fn new(models: &ModelSet) -> Self {
        Counts {
            fired: vec![0; 2 * models.rules.len()],
            decisions: vec![[0; 3]; models.members.len()],
            ..Counts::default()
        }
    }
}

/// Delivery tags: each record's place in the cycle times four, plus what it is.
pub(super) const TAG_SCORED: usize = 0;
pub(super) const TAG_ALERT: usize = 1;
pub(super) const TAG_DEAD: usize = 2;
/// Changelog records (not a record of the cycle).
pub(super) const TAG_CHANGELOG: usize = usize::MAX;

fn tag(index: usize, kind: usize) -> usize {
    index.saturating_mul(4).saturating_add(kind)
}

/// The dead-letter reason for a refusal of a record's scored output.
pub(super) fn reason_for(code: RDKafkaErrorCode) -> Reason {
    match code {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::MessageBatchTooLarge => Reason::OutputTooLarge,
        _ => Reason::OutputRejected,
    }
}

/// What sending a cycle's scored records reuses from record to record.
struct Scratch {
    values: Vec<ScoreValue>,
    fired: Vec<usize>,
    fired_names: Vec<String>,
    buf: Vec<u8>,
    alert_buf: Vec<u8>,
    now: i64,
    /// The last record's decision and canary bucket.
    decision: Decision,
    bucket: u16,
    /// For shadows' would-be decisions.
    shadow_values: Vec<ScoreValue>,
    shadow_fired: Vec<usize>,
}

/// Everything publishing needs besides the cycle.
pub(super) struct Publisher<'a> {
    pub(super) outputs: &'a Outputs,
    pub(super) loaded: &'a Loaded,
    /// The models that scored the cycle.
    pub(super) models: &'a ModelSet,
    pub(super) instance: &'a str,
    pub(super) set: &'a FeatureSet,
}

impl Publisher<'_> {
    /// The state each partition's records left, for restoring it after a crash or rebalance:
    /// the events the cycle added and dropped since the last call, per partition read, and
    /// when `finish`, a partition record with its `next` offset. Returns the records and
    /// bytes written.
    pub(super) fn send_changelog(
        &self,
        producer: &OutputProducer,
        next_offsets: &BTreeMap<i32, i64>,
        states: &mut HashMap<i32, FeatureState>,
        finish: bool,
    ) -> Result<(u64, u64), KafkaError> {
        let (mut n, mut bytes) = (0, 0);
        for (partition, next) in next_offsets {
            let Some(state) = states.get_mut(partition) else {
                continue;
            };
            let mut emit = |key: &[u8], value: Option<&[u8]>| {
                bytes += (key.len() + value.map_or(0, <[u8]>::len)) as u64;
                produce::send(
                    producer,
                    Out {
                        topic: &self.outputs.changelog_topic,
                        partition: Some(*partition),
                        key: Some(key),
                        value,
                        headers: None,
                        tag: TAG_CHANGELOG,
                    },
                )
                .map_err(|e| match e {
                    SendError::Failed(e) => e,
                    SendError::Rejected(code) => KafkaError::MessageProduction(code),
                })
            };
            n += if finish {
                state.changelog(self.set, *next, &mut emit)?
            } else {
                state.changelog_so_far(self.set, &mut emit)?
            } as u64;
        }
        Ok((n, bytes))
    }

    /// Records of the cycle, from its `base`-th on, in input order: their scored records and
    /// alerts, and their dead letters; what they add to `counts`.
    pub(super) fn send_records(
        &self,
        producer: &OutputProducer,
        pending: &[Pending],
        base: usize,
        counts: &mut Counts,
    ) -> Result<(), KafkaError> {
        let models = self.models;
        let mut scratch = Scratch {
            values: models.scores.values.clone(),
            fired: Vec::new(),
            fired_names: Vec::new(),
            buf: Vec::with_capacity(1024),
            alert_buf: Vec::new(),
            now: now_ms(),
            decision: Decision::Allow,
            bucket: 0,
            shadow_values: models.scores.values.clone(),
            shadow_fired: Vec::new(),
        };
        for (i, p) in (base..).zip(pending) {
            let (reason, error, cut) = match &p.outcome {
                Outcome::Dead { reason, error, cut } => (*reason, error.clone(), *cut),
                Outcome::Scored { .. } => match self.scored(producer, p, i, &mut scratch)? {
                    None => {
                        counts.scored += 1;
                        if !scratch.fired.is_empty() && self.outputs.alerts_topic.is_some() {
                            counts.alerts += 1;
                            for &r in &scratch.fired {
                                let slot = models.rules.score_of(r).unwrap_or(usize::MAX);
                                counts.fired[2 * r + ScoreSlots::variant(&scratch.values, slot)] +=
                                    1;
                            }
                        }
                        let d = scratch.decision as usize;
                        for m in models.deciders(scratch.bucket) {
                            counts.decisions[m][d] += 1;
                        }
                        for (s, d) in models.shadow_decisions(
                            &scratch.values,
                            &mut scratch.shadow_values,
                            &mut scratch.shadow_fired,
                        ) {
                            counts.decisions[s][d as usize] += 1;
                        }
                        continue;
                    }
                    Some(dead) => dead,
                },
            };
            self.send_dead(producer, p, i, reason, &error, cut)?;
            *counts.dead.entry(reason).or_default() += 1;
        }
        Ok(())
    }

    /// Decides, encodes and sends a scored record: `Some` dead letter instead when it cannot
    /// be encoded or the producer refuses it.
    fn scored(
        &self,
        producer: &OutputProducer,
        p: &Pending,
        i: usize,
        scratch: &mut Scratch,
    ) -> Result<Option<(Reason, String, Cut)>, KafkaError> {
        let Outcome::Scored {
            event,
            schema_id,
            features,
            scores,
            bucket,
            ..
        } = &p.outcome
        else {
            return Ok(None);
        };
        let t = &self.loaded.topology;
        let rules = &self.models.rules;
        self.models
            .scores
            .fill(&mut scratch.values, scores, *bucket);
        let decision = rules.decide(&scratch.values, &mut scratch.fired);
        (scratch.decision, scratch.bucket) = (decision, *bucket);
        scratch.fired_names.clear();
        scratch
            .fired_names
            .extend(scratch.fired.iter().map(|r| rules.name(*r).to_string()));
        let datum = p
            .value
            .as_deref()
            .and_then(|v| v.get(crate::wire::HEADER_LEN..));
        let event = match (event, datum) {
            (Some(value), _) => Event::Value(value),
            (None, Some(bytes)) => Event::Verbatim(bytes),
            // A record read in place always has its payload.
            (None, None) => {
                let error = "the record has neither a value nor a datum to copy".to_string();
                return Ok(Some((Reason::Unencodable, error, Cut::Whole)));
            }
        };
        let record = ScoredRecord {
            event,
            features,
            scores: &scratch.values,
            decision,
            rules_fired: &scratch.fired_names,
            processing: Provenance {
                processor: self.instance,
                topology: &t.name,
                topic: &t.input.topic,
                partition: p.partition,
                offset: p.offset,
                schema_id: *schema_id,
                processed_at: scratch.now,
            },
        };
        scratch.buf.clear();
        if let Err(e) = self.outputs.scored.encode_into(&mut scratch.buf, &record) {
            return Ok(Some((Reason::Unencodable, e.to_string(), Cut::Whole)));
        }
        let alert = !scratch.fired.is_empty();
        self.send_scored(producer, p, i, &scratch.buf, &mut scratch.alert_buf, alert)
    }

    /// Sends a scored record (and its alert). `Some` dead letter instead when the producer
    /// refuses the record.
    fn send_scored(
        &self,
        producer: &OutputProducer,
        p: &Pending,
        i: usize,
        buf: &[u8],
        alert_buf: &mut Vec<u8>,
        alert: bool,
    ) -> Result<Option<(Reason, String, Cut)>, KafkaError> {
        let out = self.outputs;
        let refused = |code: RDKafkaErrorCode, what: &str| {
            (
                reason_for(code),
                format!(
                    "the {what} of {} bytes (key {} bytes) was refused by the producer: {code:?} ({code})",
                    buf.len(),
                    p.key.as_ref().map_or(0, Vec::len)
                ),
                Cut::Whole,
            )
        };
        let record = |topic, value, kind| Out {
            topic,
            partition: None,
            key: p.key.as_deref(),
            value: Some(value),
            headers: None,
            tag: tag(i, kind),
        };
        match produce::send(producer, record(out.scored_topic.as_str(), buf, TAG_SCORED)) {
            Ok(()) => {}
            Err(SendError::Rejected(code)) => return Ok(Some(refused(code, "scored record"))),
            Err(SendError::Failed(e)) => return Err(e),
        }
        if let Some(alerts) = out.alerts_topic.as_ref().filter(|_| alert) {
            let value: &Vec<u8> = if out.alerts_id == out.scored_id {
                alert_buf.clear();
                alert_buf.extend_from_slice(buf);
                alert_buf
            } else {
                // The same record under the alerts subject's schema id.
                alert_buf.clear();
                crate::wire::write_header(alert_buf, out.alerts_id);
                alert_buf.extend_from_slice(buf.get(crate::wire::HEADER_LEN..).unwrap_or_default());
                alert_buf
            };
            match produce::send(
                producer,
                record(alerts.as_str(), value.as_slice(), TAG_ALERT),
            ) {
                Ok(()) => {}
                // Its scored record is already on its way: the cycle is redone without it.
                Err(SendError::Rejected(code)) => {
                    return Err(KafkaError::MessageProduction(code));
                }
                Err(SendError::Failed(e)) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Sends a record's dead letter, cut down as far as the producer needs.
    fn send_dead(
        &self,
        producer: &OutputProducer,
        p: &Pending,
        i: usize,
        reason: Reason,
        error: &str,
        cut: Cut,
    ) -> Result<(), KafkaError> {
        let t = &self.loaded.topology;
        let letter = DeadLetter {
            reason,
            error,
            topic: &t.input.topic,
            partition: p.partition,
            offset: p.offset,
            topology: &t.name,
            key: p.key.as_deref(),
            value: p.value.as_deref(),
        };
        let mut cut = cut;
        loop {
            let sent = produce::send(
                producer,
                Out {
                    topic: &self.outputs.dlq_topic,
                    partition: None,
                    key: letter.key(cut),
                    value: letter.value(cut),
                    headers: Some(letter.headers(cut)),
                    tag: tag(i, TAG_DEAD),
                },
            );
            match sent {
                Ok(()) => return Ok(()),
                Err(SendError::Rejected(code)) => match cut.next() {
                    Some(less) => {
                        tracing::warn!(
                            partition = p.partition,
                            offset = p.offset,
                            "dead letter refused ({code}); sending it cut down ({less:?})"
                        );
                        cut = less;
                    }
                    None => {
                        return Err(KafkaError::MessageProduction(code));
                    }
                },
                Err(SendError::Failed(e)) => return Err(e),
            }
        }
    }
}
