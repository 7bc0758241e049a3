//! Topics: creating them, waiting for them, and what they take. Shared by `run`, the changelog,
//! the passthrough and the simulator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::cluster::{ClusterArgs, ClusterError};

impl ClusterArgs {
    /// The smallest `max.message.bytes` (the largest record batch a topic takes) of `topics`,
    /// as the cluster reports it; `None` where it cannot say (no permission to describe
    /// configs, say).
    pub async fn max_message_bytes(&self, topics: &[String]) -> Option<usize> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().ok()?.create().ok()?;
        let resources: Vec<ResourceSpecifier<'_>> =
            topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = match admin.describe_configs(&resources, &opts).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!("cannot read the output topics' max.message.bytes: {e}");
                return None;
            }
        };
        results
            .into_iter()
            .filter_map(|r| {
                r.ok()?
                    .get("max.message.bytes")?
                    .value
                    .as_deref()?
                    .parse::<usize>()
                    .ok()
            })
            .min()
    }

    /// Creates `topic` with `partitions` partitions unless it exists.
    pub async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<(), ClusterError> {
        self.ensure_topic_with(topic, partitions, &[]).await
    }

    /// Creates `topic` with `partitions` and the given topic configs unless it exists.
    pub async fn ensure_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<(), ClusterError> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()?
            .create()
            .map_err(|e| ClusterError::Admin(e.to_string()))?;
        let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        for (k, v) in configs {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| ClusterError::Admin(format!("create topic {topic}: {e}")))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(ClusterError::Admin(format!("create topic {t}: {code}")));
                }
            }
        }
        Ok(())
    }

    /// The partition count of `topic`, once it exists: waits for it (a processor may start
    /// before its producers), and for an unreachable broker, until `stop`. `None` when stopped.
    pub fn wait_for_topic(
        &self,
        topic: &str,
        stop: &AtomicBool,
    ) -> Result<Option<i32>, ClusterError> {
        let probe: BaseConsumer = self
            .client_config()?
            .create()
            .map_err(|e| ClusterError::Admin(e.to_string()))?;
        let mut said = Instant::now();
        loop {
            let n = match probe.fetch_metadata(Some(topic), Duration::from_secs(10)) {
                Ok(metadata) => metadata
                    .topics()
                    .first()
                    .map_or(0, |m| m.partitions().len()) as i32,
                Err(e) => {
                    tracing::warn!(topic, "cannot read the topic's metadata yet: {e}");
                    0
                }
            };
            if n > 0 {
                return Ok(Some(n));
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if said.elapsed() >= Duration::from_secs(5) {
                tracing::info!(topic, "waiting for the topic to exist");
                said = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The partition count of an existing `topic` (0 when it has none or does not exist).
    pub fn partitions(&self, topic: &str) -> Result<i32, ClusterError> {
        let probe: BaseConsumer = self
            .client_config()?
            .create()
            .map_err(|e| ClusterError::Admin(e.to_string()))?;
        let metadata = probe
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| ClusterError::Admin(format!("metadata of {topic}: {e}")))?;
        Ok(metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len()) as i32)
    }
}
