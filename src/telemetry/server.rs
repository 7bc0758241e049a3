//! The HTTP endpoint operators and Prometheus call: `/metrics` (the Prometheus text format),
//! `/health/live` and `/health/ready` (200 or 503, with the [`health::Report`] as JSON),
//! `/models` and `POST /admin/models/reload` (see [`admin`]).
//!
//! It runs on a thread of its own with a single-threaded runtime, so a busy pipeline or a
//! test's short-lived runtime never delays or ends it. Histograms get the catalogue's buckets;
//! process metrics are collected at each scrape.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::{get, post};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use super::admin::{self, Denied, Reply};
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
                        health::publish();
                        handle.render()
                    }
                }),
            )
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .route("/models", get(models))
            .route("/admin/models/reload", post(reload));
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

async fn models() -> impl IntoResponse {
    Json(json!({ "models": admin::models() }))
}

/// How long a reload request waits for the models to be loaded, checked and switched to.
const RELOAD_WAIT: Duration = Duration::from_secs(300);

async fn reload(headers: HeaderMap) -> impl IntoResponse {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let answer = |status: StatusCode, body: serde_json::Value| (status, Json(body));
    let rx = match admin::request_reload(auth) {
        Ok(rx) => rx,
        Err(Denied::Off) => {
            return answer(
                StatusCode::NOT_FOUND,
                json!({"error": "the admin endpoint is off: start `kscore run` with --admin-token-file"}),
            );
        }
        Err(Denied::Unauthorized) => {
            return answer(
                StatusCode::UNAUTHORIZED,
                json!({"error": "missing or wrong `Authorization: Bearer <token>`"}),
            );
        }
        Err(Denied::NotRunning) => {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "no processor is running"}),
            );
        }
    };
    match tokio::time::timeout(RELOAD_WAIT, rx).await {
        Ok(Ok(Reply::Switched(models))) => answer(
            StatusCode::OK,
            json!({"outcome": "switched", "models": models}),
        ),
        Ok(Ok(Reply::Unchanged(models))) => answer(
            StatusCode::OK,
            json!({"outcome": "unchanged", "models": models}),
        ),
        Ok(Ok(Reply::Refused(reason))) => answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"outcome": "refused", "reason": reason}),
        ),
        Ok(Err(_)) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the processor stopped"}),
        ),
        Err(_) => answer(
            StatusCode::GATEWAY_TIMEOUT,
            json!({"error": "the reload is not switched to yet (still loading, or the current cycle has not ended); see the logs and GET /models"}),
        ),
    }
}
