//! What the HTTP endpoint says of the models and asks of them: `GET /models` lists the models
//! this instance scores with (name, version, role, share, when loaded); `POST
//! /admin/models/reload` asks for a reload (see `pipeline::reload`). The reload endpoint is
//! off unless the processor was started with an admin token, and then answers only requests
//! that carry it (`Authorization: Bearer <token>`); the token is never logged.

use std::sync::mpsc::Sender;
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

/// One model this instance scores with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    /// Its name in the topology.
    pub name: String,
    /// The name its scores answer to (a canary's primary's, else its own).
    pub answers_as: String,
    /// The version loaded.
    pub version: String,
    /// `primary`, `canary` or `shadow`.
    pub role: std::borrow::Cow<'static, str>,
    /// The primary it stands beside, for a canary or shadow.
    pub of: Option<String>,
    /// A canary's share of the keys.
    pub share: Option<f64>,
    /// The entry's path (a file, or a directory of versions).
    pub path: String,
    /// The file loaded.
    pub file: String,
    /// When it was loaded (RFC 3339, UTC).
    pub loaded_at: String,
}

/// What a reload came to.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A new set is switched to (it scores from this cycle on): its models.
    Switched(Vec<ModelRow>),
    /// Nothing changed: the models scoring.
    Unchanged(Vec<ModelRow>),
    /// Refused, and why; the models before keep scoring.
    Refused(String),
}

/// A request to the reloading thread.
#[derive(Debug)]
pub enum Request {
    /// Reload now, and answer here.
    Reload(tokio::sync::oneshot::Sender<Reply>),
    /// The processor is stopping.
    Stop,
}

static MODELS: RwLock<Vec<ModelRow>> = RwLock::new(Vec::new());
static RELOADS: Mutex<Option<Sender<Request>>> = Mutex::new(None);
static TOKEN: RwLock<Option<String>> = RwLock::new(None);

/// The models scoring now, for `GET /models`.
pub fn publish_models(rows: Vec<ModelRow>) {
    *MODELS.write().unwrap_or_else(|p| p.into_inner()) = rows;
}

/// The models scoring now.
pub fn models() -> Vec<ModelRow> {
    MODELS.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Where reload requests go while a processor runs.
pub fn serve_reloads(to: Sender<Request>) {
    *RELOADS.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
}

/// No processor takes reload requests any more.
pub fn stop_reloads() {
    *RELOADS.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Turns the reload endpoint on, answering requests that carry `token`.
pub fn enable(token: String) {
    *TOKEN.write().unwrap_or_else(|p| p.into_inner()) = Some(token);
}

/// The admin token in `file`, trimmed: an error naming the file if it cannot be read or is
/// empty.
pub fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("admin token file {}: {e}", file.display()))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        anyhow::bail!("admin token file {}: it is empty", file.display());
    }
    Ok(token)
}

/// Why a reload request is not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The endpoint is off (no admin token).
    Off,
    /// No token, or the wrong one.
    Unauthorized,
    /// No processor is running to reload.
    NotRunning,
}

/// Checks a request's `Authorization` header and hands the request to the processor: the
/// receiver of its reply.
pub fn request_reload(
    authorization: Option<&str>,
) -> Result<tokio::sync::oneshot::Receiver<Reply>, Denied> {
    let token = TOKEN.read().unwrap_or_else(|p| p.into_inner()).clone();
    let token = token.ok_or(Denied::Off)?;
    let given = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if !same(given.as_bytes(), token.as_bytes()) {
        return Err(Denied::Unauthorized);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let to = RELOADS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    to.ok_or(Denied::NotRunning)?
        .send(Request::Reload(tx))
        .map_err(|_| Denied::NotRunning)?;
    Ok(rx)
}

/// Equal bytes, compared in time that depends on the lengths only (a token is not guessed a
/// byte at a time from response times).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"", b"x"));
    }
}
