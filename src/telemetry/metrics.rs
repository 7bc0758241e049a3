//! Every metric name the process exports, in one place, and the Prometheus exporter. Names
//! start with `kscore_`; labels are low-cardinality (topic, partition, model, reason, pattern),
//! never a key or an id.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Events the simulator produced, labelled `pattern` (`none` for legitimate payments).
pub const SIMULATOR_EVENTS: &str = "kscore_simulator_events_total";
/// Events the broker refused to the simulator.
pub const SIMULATOR_DELIVERY_FAILURES: &str = "kscore_simulator_delivery_failures_total";
/// Records `tail` read, labelled `outcome` (`decoded`, `undecodable`).
pub const TAIL_RECORDS: &str = "kscore_tail_records_total";

/// Serves `/metrics` on `addr` from a background thread.
pub fn install_exporter(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("metrics endpoint on {addr}: {e}"))
}
