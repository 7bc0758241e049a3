//! Logs and metrics. Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default
//! `info`), as text or JSON lines; metrics are served for Prometheus (see [`metrics`]) next to the health endpoints (see [`health`]).

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

/// Installs the global log subscriber. Safe to call more than once (later calls do nothing).
pub fn init_logs(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
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
