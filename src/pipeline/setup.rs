//! Everything before the first cycle: the topology's own checks, the topics (the input waited
//! for, the outputs and the changelog created with its partition count), the output encoders
//! registered, the models' batchers and drift monitors started, the consumer subscribed and the
//! delivery's first producer made.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use rdkafka::consumer::Consumer;
use tokio::runtime::Handle;

use super::backpressure::Pressure;
use super::delivery::{Delivery, Producers};
use super::models::ModelSet;
use super::publish::Outputs;
use super::recovery::{Failures, Refusals};
use super::report::{Reporter, Starved, Throttled};
use super::restore::RestoreGap;
use super::{Membership, Processor, RunOptions, RunSummary, delivery::AbortReason};
use crate::changelog::{self, Restorer};
use crate::cluster::ClusterArgs;
use crate::features::FeatureSet;
use crate::kafka::config;
use crate::kafka::context::GroupContext;
use crate::reason::Reason;
use crate::schemas;
use crate::sink::FramedEncoder;
use crate::sink::record::{self, ScoredEncoder};
use crate::source::Decoder;
use crate::telemetry::events::ProcessorRunning;
use crate::telemetry::health;
use crate::telemetry::metrics as names;
use crate::topology::Loaded;
use crate::topology::config::Guarantee;
use strum::IntoEnumIterator;

impl<'a> Processor<'a> {
    /// Sets the processor up (`None`: stopped while waiting for the input topic).
    pub(super) fn start(
        cluster: &ClusterArgs,
        loaded: &'a Loaded,
        opts: &'a RunOptions,
        rt: Handle,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<Self>> {
        let t = &loaded.topology;
        health::pipeline_started();
        crate::scorer::runtime::init(None)?;
        let set = FeatureSet::new(t, &loaded.schema);
        let feature_names = set.names();
        let Some(topics) = Topics::ensure(cluster, loaded, &rt, &stop)? else {
            return Ok(None);
        };
        let sr = cluster.registry()?;
        let outputs = outputs(&sr, loaded, &feature_names, &rt, topics.changelog.clone())?;

        let (results_tx, results) = std::sync::mpsc::channel();
        let (models, _) = ModelSet::build(loaded, None, &results_tx, opts.throttle_scoring)
            .map_err(|e| anyhow::anyhow!("{}: {e}", loaded.file.display()))?;
        models.activate();
        health::models_warm();
        register_series(&t.input.topic, &models.rule_labels);
        let models = Arc::new(models);
        let reloader =
            super::reload::Reloader::start(loaded, &models, results_tx, opts.throttle_scoring)?;

        let (consumer, delivery) = connect(cluster, loaded, opts, topics.batch_limit, &stop)?;
        let committer = super::delivery::Committer::spawn(consumer.context().commit_gate())
            .map_err(|e| anyhow::anyhow!("starting the commit thread: {e}"))?;
        Ok(Some(Processor {
            loaded,
            opts,
            rt,
            stop,
            consumer,
            decoder: Decoder::new(sr, loaded.schema.clone()),
            restorer: Restorer::new(cluster, &topics.changelog)?,
            set,
            models,
            results,
            reloader,
            outputs,
            delivery,
            committer,
            states: HashMap::new(),
            pressure: Pressure::default(),
            starved: Starved::new(),
            consumer_errors: Throttled::new("consumer"),
            reporter: Reporter::new(opts.summary_every, &t.name),
            failures: Failures::default(),
            refusals: Refusals::default(),
            summary: RunSummary::default(),
            cycles: 0,
        }))
    }
}

/// The input consumer, subscribed, and the delivery with its first producer.
fn connect(
    cluster: &ClusterArgs,
    loaded: &Loaded,
    opts: &RunOptions,
    batch_limit: Option<usize>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(super::Input, Delivery)> {
    let t = &loaded.topology;
    let consumer: super::Input = config::source(
        cluster,
        &t.input.group,
        (opts.membership == Membership::Static).then_some(opts.instance_id.as_str()),
    )?
    .create_with_context(GroupContext::default())?;
    consumer.subscribe(&[&t.input.topic])?;
    let exactly_once = t.delivery.guarantee == Guarantee::ExactlyOnce;
    let transactional_id =
        exactly_once.then(|| format!("kscore-{}-{}", t.input.group, opts.instance_id));
    let delivery = Delivery::start(
        exactly_once,
        Producers {
            cluster: cluster.clone(),
            transactional_id: transactional_id.clone(),
            batch_limit,
            stop: stop.clone(),
        },
    )?;
    ProcessorRunning {
        topology: &t.name,
        input: &t.input.topic,
        group: &t.input.group,
        transactional_id: transactional_id.as_deref(),
    }
    .emit();
    Ok((consumer, delivery))
}

/// The topics the processor writes, made ready.
struct Topics {
    changelog: String,
    /// The smallest `max.message.bytes` of the output topics: producer batches stay under it,
    /// so a topic refuses only records that are too large themselves.
    batch_limit: Option<usize>,
}

impl Topics {
    /// Waits for the input (a processor may start before its producers; an unreachable broker
    /// is waited for too), then creates the outputs and the changelog with as many partitions.
    fn ensure(
        cluster: &ClusterArgs,
        loaded: &Loaded,
        rt: &Handle,
        stop: &AtomicBool,
    ) -> anyhow::Result<Option<Self>> {
        let t = &loaded.topology;
        let Some(partitions) = cluster.wait_for_topic(&t.input.topic, stop)? else {
            return Ok(None);
        };
        let mut outputs = vec![
            t.output.scored_topic.clone(),
            t.output.dead_letter_topic.clone(),
        ];
        outputs.extend(t.output.alerts_topic.clone());
        for topic in &outputs {
            rt.block_on(cluster.ensure_topic(topic, partitions))?;
        }
        let changelog = t.changelog_topic();
        rt.block_on(changelog::ensure_topic(cluster, &changelog, partitions))?;
        outputs.push(changelog.clone());
        let batch_limit = rt.block_on(cluster.max_message_bytes(&outputs));
        Ok(Some(Topics {
            changelog,
            batch_limit,
        }))
    }
}

/// The scored schema registered under the scored and alerts subjects, and the output topics.
fn outputs(
    sr: &schema_registry_converter::async_impl::schema_registry::SrSettings,
    loaded: &Loaded,
    feature_names: &[&str],
    rt: &Handle,
    changelog_topic: String,
) -> anyhow::Result<Outputs> {
    let t = &loaded.topology;
    let scored_avsc = record::schema(&loaded.schema_text).map_err(anyhow::Error::msg)?;
    let register = |topic: &str| {
        rt.block_on(FramedEncoder::register(
            sr,
            &schemas::value_subject(topic),
            &scored_avsc,
        ))
        .map(|e| e.schema_id())
    };
    let scored_id = register(&t.output.scored_topic)?;
    let alerts_id = match &t.output.alerts_topic {
        Some(alerts) => register(alerts)?,
        None => scored_id,
    };
    Ok(Outputs {
        scored: ScoredEncoder::new(scored_id, &loaded.schema, feature_names)?,
        scored_id,
        alerts_id,
        scored_topic: t.output.scored_topic.clone(),
        alerts_topic: t.output.alerts_topic.clone(),
        dlq_topic: t.output.dead_letter_topic.clone(),
        changelog_topic,
    })
}

/// Registers at 0 the counters that carry a reason or a rule, for every value they can take:
/// a rate over a series that appears only at its first occurrence misses that occurrence, and
/// alerts and panels should see "none yet" rather than "no data".
pub(super) fn register_series(topic: &str, rules: &[(String, String, String)]) {
    for reason in Reason::all() {
        metrics::counter!(names::DEAD_LETTERED, "topic" => topic.to_string(), "reason" => reason.label())
            .increment(0);
    }
    for reason in AbortReason::iter() {
        metrics::counter!(names::ABORTS, "reason" => reason.label()).increment(0);
    }
    for (rule, model, version) in rules {
        metrics::counter!(names::ALERTS, "rule" => rule.clone(), "model" => model.clone(), "version" => version.clone())
            .increment(0);
    }
    for reason in RestoreGap::iter() {
        metrics::counter!(names::STATE_RESTORE_GAPS, "reason" => reason.label()).increment(0);
    }
    for outcome in ["switched", "unchanged", "refused"] {
        metrics::counter!(names::MODEL_RELOADS, "outcome" => outcome).increment(0);
    }
    for kind in ["assign", "revoke"] {
        metrics::counter!(names::REBALANCES, "kind" => kind).increment(0);
    }
    for name in [
        names::COMMITS,
        names::CHANGELOG_RECORDS,
        names::STATE_RESTORE_RECORDS,
        names::STATE_RESTORE_BYTES,
        names::BACKPRESSURE_PAUSES,
        names::REGISTRY_RETRIES,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [names::CONSUMED, names::SCORED] {
        metrics::counter!(name, "topic" => topic.to_string()).increment(0);
    }
    metrics::gauge!(names::INPUT_PAUSED).set(0.0);
    metrics::gauge!(names::FAILED_CYCLES).set(0.0);
}
