//! The processor's client settings, in two kinds. What a guarantee needs is *enforced*: an
//! operator's setting (`-X`, or the properties file) that contradicts it is a start-up error
//! naming the setting, never silently overwritten. What only tunes is *defaulted*: set where
//! the operator did not set it.

use rdkafka::ClientConfig;

use crate::cluster::{ClusterArgs, ClusterError};

/// A client setting that contradicts what the processor needs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The connection settings cannot be used.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// An operator's setting contradicts an enforced one.
    #[error(
        "Kafka client setting `{key}={found}` (from -X or the properties file) contradicts what \
         {needs}: it must be `{required}`; remove it"
    )]
    Contradicts {
        /// The property.
        key: String,
        /// The operator's value.
        found: String,
        /// The value the processor needs.
        required: String,
        /// What needs it.
        needs: &'static str,
    },
}

/// A setting with the reason it is enforced.
struct Enforced<'a> {
    key: &'a str,
    value: &'a str,
    needs: &'static str,
}

fn enforce(cfg: &mut ClientConfig, settings: &[Enforced<'_>]) -> Result<(), ConfigError> {
    for s in settings {
        if let Some(found) = cfg.get(s.key)
            && found != s.value
        {
            return Err(ConfigError::Contradicts {
                key: s.key.to_string(),
                found: found.to_string(),
                required: s.value.to_string(),
                needs: s.needs,
            });
        }
        cfg.set(s.key, s.value);
    }
    Ok(())
}

/// Sets what the operator has not set.
fn default(cfg: &mut ClientConfig, settings: &[(&str, &str)]) {
    for (key, value) in settings {
        if cfg.get(key).is_none() {
            cfg.set(*key, *value);
        }
    }
}

/// The input consumer's settings (shared with the benchmark's passthrough, so the two are
/// compared on equal terms). Enforced: the group, offsets committed only by the processor (in
/// its transactions), `read_committed`. Defaulted: static membership as
/// `kscore-<group>-<instance_id>` (unless `instance_id` is `None`), reading from the earliest
/// offset of a new group, statistics every 5 s (the lag metric), fetch tuning.
pub fn source(
    cluster: &ClusterArgs,
    group: &str,
    instance_id: Option<&str>,
) -> Result<ClientConfig, ConfigError> {
    let mut cfg = cluster.client_config()?;
    const OFFSETS: &str =
        "the processor needs (it commits offsets itself, with the outputs they belong to)";
    enforce(
        &mut cfg,
        &[
            Enforced {
                key: "group.id",
                value: group,
                needs: "the topology's `input.group` names",
            },
            Enforced {
                key: "enable.auto.commit",
                value: "false",
                needs: OFFSETS,
            },
            Enforced {
                key: "enable.auto.offset.store",
                value: "false",
                needs: OFFSETS,
            },
            Enforced {
                key: "isolation.level",
                value: "read_committed",
                needs: "the processor needs (input of aborted transactions must not be read)",
            },
        ],
    )?;
    // Static membership: a restarted instance takes its partitions back at once instead of
    // waiting out its dead predecessor's session and rebalancing the whole group.
    if let Some(instance_id) = instance_id {
        default(
            &mut cfg,
            &[(
                "group.instance.id",
                &format!("kscore-{group}-{instance_id}"),
            )],
        );
    }
    default(
        &mut cfg,
        &[
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
            // A fetch waits at most this long for data: well under the commit interval, so a
            // quiet partition does not hold events back (librdkafka's default is 500 ms).
            ("fetch.wait.max.ms", "100"),
            // Prefetch per partition: a cycle takes at most 20,000 records, and librdkafka's
            // default of 100,000 kept its broker thread fetching twice as hard (measured:
            // 1.6 -> 0.7 CPU-s for a 200,000-event backlog) and holds more memory.
            ("queued.min.messages", "20000"),
            // A partition whose prefetch is full is fetched again this soon after it has room.
            // librdkafka's default, a second, left both the processor and the passthrough
            // waiting on an empty queue with a backlog on the broker (measured, 200,000
            // events: passthrough 119 k/s -> 287-302 k/s, processor 62-68 k/s -> 86-124 k/s).
            ("fetch.queue.backoff.ms", "20"),
        ],
    );
    Ok(cfg)
}

/// The output producer's settings. Enforced: idempotence, and with `transactional_id` (exactly
/// once) that id. Defaulted: Java clients' partitioner (the same partition for a key), a 5 ms
/// linger, lz4 compression, a 60 s transaction timeout.
pub fn sink(
    cluster: &ClusterArgs,
    transactional_id: Option<&str>,
) -> Result<ClientConfig, ConfigError> {
    let mut cfg = cluster.client_config()?;
    enforce(
        &mut cfg,
        &[Enforced {
            key: "enable.idempotence",
            value: "true",
            needs: "publishing each output once needs",
        }],
    )?;
    if let Some(id) = transactional_id {
        enforce(
            &mut cfg,
            &[Enforced {
                key: "transactional.id",
                value: id,
                needs: "exactly-once needs (`kscore-<group>-<instance id>`, so a restart fences \
                        its predecessor)",
            }],
        )?;
        default(&mut cfg, &[("transaction.timeout.ms", "60000")]);
    }
    default(
        &mut cfg,
        &[
            ("partitioner", "murmur2_random"),
            ("linger.ms", "5"),
            // Batches are compressed (a batch that would grow is sent as it is): records in
            // one batch repeat their categories, ids' prefixes and the changelog's keys. Fewer
            // bytes for the broker to take, store and serve (measured on the stand-in, 600,000
            // events: processor 60-68 k/s -> 85-100 k/s, broker CPU 10.5-13.5 -> 7.7-7.9 s per
            // million events).
            ("compression.type", "lz4"),
        ],
    );
    Ok(cfg)
}

/// Keeps the producer's batches under `limit` bytes (the smallest `max.message.bytes` of the
/// topics it writes), unless the operator set `batch.size`: a batch over a topic's limit is
/// refused whole.
pub fn limit_batches(cfg: &mut ClientConfig, limit: usize) {
    // librdkafka's default batch.size.
    const DEFAULT: usize = 1_000_000;
    match cfg.get("batch.size").map(str::parse::<usize>) {
        Some(Ok(set)) if set > limit => tracing::warn!(
            batch_size = set,
            limit,
            "batch.size is larger than an output topic's max.message.bytes: batches that \
             large are refused, and their records are then redone one batch each"
        ),
        Some(_) => {}
        None if limit < DEFAULT => {
            cfg.set("batch.size", limit.to_string());
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(props: &[(&str, &str)]) -> ClusterArgs {
        let mut c = ClusterArgs::from_env();
        c.kafka_config = None;
        c.kafka_properties = props
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        c
    }

    #[test]
    fn a_setting_that_contradicts_the_guarantee_is_an_error() {
        let err = sink(
            &with(&[("enable.idempotence", "false")]),
            Some("kscore-g-0"),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert_eq!(
            err,
            "Kafka client setting `enable.idempotence=false` (from -X or the properties file) \
             contradicts what publishing each output once needs: it must be `true`; remove it"
        );
        for (key, value) in [
            ("isolation.level", "read_uncommitted"),
            ("enable.auto.commit", "true"),
            ("group.id", "another"),
        ] {
            let err = source(&with(&[(key, value)]), "g", Some("0"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(&format!("`{key}={value}`")), "{err}");
        }
        assert!(sink(&with(&[("transactional.id", "mine")]), Some("kscore-g-0")).is_err());
    }

    #[test]
    fn tuning_is_the_operators_where_set_and_agreeing_settings_pass() {
        let cfg = source(
            &with(&[
                ("fetch.wait.max.ms", "20"),
                ("group.instance.id", "custom"),
                ("isolation.level", "read_committed"),
            ]),
            "g",
            Some("0"),
        )
        .expect("valid");
        assert_eq!(cfg.get("fetch.wait.max.ms"), Some("20"));
        assert_eq!(cfg.get("group.instance.id"), Some("custom"));
        assert_eq!(cfg.get("queued.min.messages"), Some("20000"));
        assert_eq!(cfg.get("fetch.queue.backoff.ms"), Some("20"));
        assert_eq!(cfg.get("enable.auto.commit"), Some("false"));
        let cfg = sink(&with(&[("linger.ms", "50")]), Some("kscore-g-0")).expect("valid");
        assert_eq!(cfg.get("linger.ms"), Some("50"));
        assert_eq!(cfg.get("transactional.id"), Some("kscore-g-0"));
        assert_eq!(cfg.get("enable.idempotence"), Some("true"));
        assert_eq!(cfg.get("compression.type"), Some("lz4"));
        let cfg = sink(&with(&[("compression.type", "zstd")]), None).expect("valid");
        assert_eq!(cfg.get("compression.type"), Some("zstd"));
        let cfg = source(&with(&[]), "g", None).expect("valid");
        assert_eq!(cfg.get("group.instance.id"), None);
    }
}
