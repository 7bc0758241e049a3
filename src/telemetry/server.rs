//! The HTTP endpoint operators and Prometheus call: `/metrics` (the Prometheus text format),
//! `/health/live` and `/health/ready` (200 or 503, with the [`health::Report`] as JSON).
//!
//! It runs on a thread of its own with a single-threaded runtime, so a busy pipeline or a
//! test's short-lived runtime never delays or ends it. Histograms get the catalogue's buckets;
//! process metrics are collected at each scrape.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::health;
use super::metrics::{CATALOGUE, Kind};

/// Installs the global metrics recorder and serves the endpoints on `addr` from a background
/// thread. Fails if `addr` cannot be bound or a recorder is already installed.
pub fn install_exporter(addr: SocketAddr) -> Result<(), String> {
    let mut builder = PrometheusBuilder::new();
    for m in CATALOGUE.iter().filter(|m| m.kind == Kind::Histogram) {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(m.name.to_string()), m.buckets)
            .map_err(|e| format!("buckets of {}: {e}", m.name))?;
    }
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("metrics endpoint on {addr}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("metrics endpoint on {addr}: {e}"))?;
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("metrics recorder: {e}"))?;
    describe();
    let process = metrics_process::Collector::default();
    process.describe();
    process.collect();

    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || serve(listener, handle, process))
        .map_err(|e| format!("metrics endpoint thread: {e}"))?;
    Ok(())
}

fn describe() {
    for m in CATALOGUE {
        let (name, help) = (m.name, m.help);
        match m.kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

fn serve(
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
    process: metrics_process::Collector,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("metrics endpoint: no runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("metrics endpoint: {e}");
                return;
            }
        };
        // Histogram buckets are drained by upkeep; without it they grow between scrapes.
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
        let app = Router::new()
            .route(
                "/metrics",
                get(move || {
                    let handle = handle.clone();
                    let process = process.clone();
                    async move {
                        process.collect();
                        handle.render()
                    }
                }),
            )
            .route("/health/live", get(live))
            .route("/health/ready", get(ready));
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });
}

fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn live() -> impl IntoResponse {
    let r = health::report();
    (status(r.live), Json(r))
}

async fn ready() -> impl IntoResponse {
    let r = health::report();
    (status(r.ready), Json(r))
}
