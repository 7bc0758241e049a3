//! Where the Kafka cluster and the schema registry are and how to authenticate to them: one set
//! of command-line/environment settings shared by every subcommand. Kafka security settings
//! (TLS, SASL PLAIN/SCRAM/OAUTHBEARER) are librdkafka properties passed through unchanged, from
//! a properties file and/or `-X key=value`; secrets never reach logs (see [`ClusterArgs::describe`]).

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use schema_registry_converter::async_impl::schema_registry::SrSettings;

/// Connection settings for Kafka and the schema registry.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Kafka bootstrap servers, comma separated.
    #[arg(long, env = "KSCORE_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,

    /// A librdkafka properties file (`key=value` lines, `#` comments), e.g. with
    /// `security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`, `ssl.ca.location`.
    #[arg(long, env = "KSCORE_KAFKA_CONFIG")]
    pub kafka_config: Option<PathBuf>,

    /// One librdkafka property, `key=value`; repeatable; applied after `--kafka-config`.
    #[arg(short = 'X', long = "kafka-property", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,

    /// Schema registry URL; several, comma separated, are tried in order.
    #[arg(
        long,
        env = "KSCORE_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub registry_url: String,

    /// Registry basic-auth user (Confluent Cloud: the API key).
    #[arg(long, env = "KSCORE_REGISTRY_USERNAME")]
    pub registry_username: Option<String>,

    /// Registry basic-auth password (Confluent Cloud: the API secret).
    #[arg(long, env = "KSCORE_REGISTRY_PASSWORD", hide_env_values = true)]
    pub registry_password: Option<String>,

    /// Registry bearer token, instead of basic auth.
    #[arg(long, env = "KSCORE_REGISTRY_TOKEN", hide_env_values = true)]
    pub registry_token: Option<String>,
}

/// A connection setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The properties file could not be read.
    #[error("cannot read Kafka properties file {path}: {source}")]
    PropertiesFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the properties file is not `key=value`.
    #[error("{path}:{line}: expected `key=value`")]
    PropertiesLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The registry client could not be built.
    #[error("schema registry settings: {0}")]
    Registry(String),
    /// A Kafka admin request failed.
    #[error("Kafka admin: {0}")]
    Admin(String),
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got `{s}`")),
    }
}

/// Whether a librdkafka property holds a secret that must not be logged.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "ssl.key.pem",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl ClusterArgs {
    /// Settings for the local stack's defaults, for tests and tools; reads the same environment
    /// variables as the command line.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ClusterArgs {
            brokers: var("KSCORE_BROKERS").unwrap_or_else(|| "127.0.0.1:9092".into()),
            kafka_config: var("KSCORE_KAFKA_CONFIG").map(PathBuf::from),
            kafka_properties: Vec::new(),
            registry_url: var("KSCORE_REGISTRY_URL")
                .unwrap_or_else(|| "http://127.0.0.1:8081".into()),
            registry_username: var("KSCORE_REGISTRY_USERNAME"),
            registry_password: var("KSCORE_REGISTRY_PASSWORD"),
            registry_token: var("KSCORE_REGISTRY_TOKEN"),
        }
    }

    /// Every librdkafka property these settings give, file first, then `-X`.
    pub fn properties(&self) -> Result<Vec<(String, String)>, ClusterError> {
        let mut props = vec![("bootstrap.servers".to_string(), self.brokers.clone())];
        if let Some(path) = &self.kafka_config {
            let text =
                std::fs::read_to_string(path).map_err(|source| ClusterError::PropertiesFile {
                    path: path.clone(),
                    source,
                })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let kv = parse_property(line).map_err(|_| ClusterError::PropertiesLine {
                    path: path.clone(),
                    line: i + 1,
                })?;
                props.push(kv);
            }
        }
        props.extend(self.kafka_properties.iter().cloned());
        Ok(props)
    }

    /// A librdkafka client configuration with these settings.
    pub fn client_config(&self) -> Result<ClientConfig, ClusterError> {
        let mut cfg = ClientConfig::new();
        for (k, v) in self.properties()? {
            cfg.set(k, v);
        }
        Ok(cfg)
    }

    /// The settings as a log line, secrets replaced.
    pub fn describe(&self) -> String {
        let props = self.properties().unwrap_or_default();
        let shown: Vec<String> = props
            .iter()
            .map(|(k, v)| {
                if is_secret(k) {
                    format!("{k}=[redacted]")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        let auth = match (&self.registry_username, &self.registry_token) {
            (Some(u), _) => format!("basic auth as {u}"),
            (None, Some(_)) => "bearer token".to_string(),
            _ => "no auth".to_string(),
        };
        format!(
            "kafka [{}], registry {} ({auth})",
            shown.join(", "),
            self.registry_url
        )
    }

    /// Schema registry client settings.
    pub fn registry(&self) -> Result<SrSettings, ClusterError> {
        let mut urls = self
            .registry_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty());
        let first = urls
            .next()
            .ok_or_else(|| ClusterError::Registry("no registry URL".into()))?;
        let mut b = SrSettings::new_builder(first.trim_end_matches('/').to_string());
        for u in urls {
            b.add_url(u.trim_end_matches('/').to_string());
        }
        if let Some(user) = &self.registry_username {
            b.set_basic_authorization(user, self.registry_password.as_deref());
        } else if let Some(token) = &self.registry_token {
            b.set_token_authorization(token);
        }
        b.set_timeout(Duration::from_secs(10));
        b.build().map_err(|e| ClusterError::Registry(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_descriptions() {
        let mut args = ClusterArgs::from_env();
        args.kafka_properties = vec![
            ("sasl.password".into(), "hunter2".into()),
            ("sasl.username".into(), "alice".into()),
            ("ssl.key.password".into(), "s3cret".into()),
        ];
        let d = args.describe();
        assert!(d.contains("sasl.username=alice"), "{d}");
        assert!(!d.contains("hunter2") && !d.contains("s3cret"), "{d}");
    }

    #[test]
    fn properties_file_lines_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("client.properties");
        std::fs::write(
            &path,
            "# comment\nsecurity.protocol=SASL_SSL\n\nnot a property\n",
        )
        .expect("write");
        let mut args = ClusterArgs::from_env();
        args.kafka_config = Some(path);
        let err = args
            .properties()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.ends_with("client.properties:4: expected `key=value`"),
            "{err}"
        );
    }
}
