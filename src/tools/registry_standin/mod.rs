//! A small, faithful stand-in for Confluent Schema Registry, for local runs and tests where the
//! real one cannot be installed. Not on the data path: the processor talks to whichever registry
//! its configuration names, through `schema_registry_converter`, exactly as it would to
//! Confluent's.
//!
//! What it implements: Avro schemas; register and look up under a subject; fetch by global id;
//! subject versions including `latest`; list subjects; soft deletes; compatibility levels
//! (checked with `apache-avro`'s schema compatibility); Confluent's error codes and statuses.
//! What it does not: schema references, Protobuf and JSON Schema, modes, contexts, auth.

mod api;
mod error;
mod store;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::Path;

pub use api::router;
pub use error::ApiError;
pub use store::{Compatibility, Store, VersionRef, VersionView};

/// Serves the registry on `listener` until the future is dropped or the process ends.
pub async fn serve(listener: tokio::net::TcpListener, store: Store) -> std::io::Result<()> {
    axum::serve(listener, router(store)).await
}

/// Serves `store` on a free port of 127.0.0.1 in a task of the current runtime (for benchmarks
/// and tests): the registry's base URL, and the task.
pub async fn spawn_local(
    store: Store,
) -> std::io::Result<(String, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    Ok((url, tokio::spawn(serve(listener, store))))
}

/// Binds `addr`, opens the store in `data_dir` and serves until the process is stopped.
pub async fn run(addr: SocketAddr, data_dir: &Path) -> anyhow::Result<()> {
    let store = Store::open(data_dir)
        .map_err(|e| anyhow::anyhow!("schema registry state in {}: {e}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, data_dir = %data_dir.display(), "schema registry stand-in listening");
    serve(listener, store).await?;
    Ok(())
}
