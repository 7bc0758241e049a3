//! Logs and metrics. Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default
//! `info`; ONNX Runtime's own at `warn` unless `RUST_LOG` names `ort`), as text or JSON lines; metrics are served for Prometheus (see [`metrics`]) next to the health endpoints (see [`health`]).

pub mod admin;
pub mod events;
pub mod health;
pub mod metrics;
mod server;

pub use server::install_exporter;

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The log filter: `RUST_LOG`, else `info`; ONNX Runtime's own logs (its graph optimiser
/// reports every pass at `info`) at `warn` unless the filter names `ort`.
pub fn log_filter(rust_log: Option<&str>) -> String {
    let base = rust_log
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .unwrap_or("info");
    if base.split(',').any(|d| d.trim_start().starts_with("ort")) {
        base.to_string()
    } else {
        format!("{base},ort=warn")
    }
}

/// Installs the global log subscriber. Safe to call more than once (later calls do nothing).
pub fn init_logs(format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(log_filter(rust_log.as_deref()))
        .unwrap_or_else(|_| EnvFilter::new(log_filter(None)));
    // Colours only on a terminal: a log file or a collector gets plain `key=value` text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn onnx_runtime_logs_are_at_warn_unless_asked_for() {
        assert_eq!(log_filter(None), "info,ort=warn");
        assert_eq!(log_filter(Some("info")), "info,ort=warn");
        assert_eq!(
            log_filter(Some(" debug,librdkafka=off ")),
            "debug,librdkafka=off,ort=warn"
        );
        assert_eq!(log_filter(Some("info,ort=debug")), "info,ort=debug");
        assert_eq!(log_filter(Some("")), "info,ort=warn");
    }
}
