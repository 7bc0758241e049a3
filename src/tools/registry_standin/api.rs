//! The REST surface: Confluent's paths, request bodies and response shapes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};

use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::error::{ApiError, json_headers};
use super::store::{Compatibility, Store, VersionRef};

type Shared = Arc<Mutex<Store>>;

fn ok(body: serde_json::Value) -> Response {
    (json_headers(), body.to_string()).into_response()
}

fn lock(store: &Shared) -> MutexGuard<'_, Store> {
    // A panic while holding the lock cannot leave the store half-written (every mutation
    // persists whole), so a poisoned lock is safe to take over.
    store.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

fn parse_schema_body(body: &[u8]) -> Result<SchemaBody, ApiError> {
    let parsed: SchemaBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"schema\": \"...\"}}: {e}")))?;
    match parsed.schema_type.as_deref() {
        None | Some("AVRO") => {}
        Some(other) => {
            return Err(ApiError::InvalidSchema(format!(
                "schemaType {other} is not supported by this stand-in (AVRO only)"
            )));
        }
    }
    if !parsed.references.is_empty() {
        return Err(ApiError::InvalidSchema(
            "schema references are not supported by this stand-in".to_string(),
        ));
    }
    Ok(parsed)
}

fn deleted_flag(q: &HashMap<String, String>) -> bool {
    q.get("deleted").is_some_and(|v| v == "true")
}

async fn root() -> Response {
    ok(json!({}))
}

async fn list_subjects(State(s): State<Shared>) -> Response {
    ok(json!(lock(&s).subjects()))
}

async fn list_versions(
    State(s): State<Shared>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    Ok(ok(json!(lock(&s).versions(&subject)?)))
}

async fn get_version(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = lock(&s).version(&subject, VersionRef::parse(&version)?)?;
    Ok(ok(json!(v)))
}

async fn get_version_schema(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = lock(&s).version(&subject, VersionRef::parse(&version)?)?;
    Ok((json_headers(), v.schema).into_response())
}

async fn register(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = parse_schema_body(&body)?;
    let id = lock(&s).register(&subject, &req.schema)?;
    tracing::info!(subject, id, "registered schema");
    Ok(ok(json!({ "id": id })))
}

async fn lookup(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = parse_schema_body(&body)?;
    Ok(ok(json!(lock(&s).lookup(&subject, &req.schema)?)))
}

async fn delete_subject(
    State(s): State<Shared>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    Ok(ok(json!(lock(&s).delete_subject(&subject)?)))
}

async fn delete_version(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(ok(json!(
        lock(&s).delete_version(&subject, VersionRef::parse(&version)?)?
    )))
}

fn parse_id(id: &str) -> Result<u32, ApiError> {
    // Confluent answers an id that is not a number the same way as an unknown one.
    id.parse::<u32>().map_err(|_| ApiError::SchemaNotFound(0))
}

async fn schema_by_id(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    Ok(ok(
        json!({ "schema": lock(&s).schema(id, deleted_flag(&q))? }),
    ))
}

async fn schema_string_by_id(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let schema = lock(&s).schema(id, deleted_flag(&q))?;
    Ok((json_headers(), schema).into_response())
}

async fn schema_versions(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let pairs = lock(&s).schema_versions(parse_id(&id)?)?;
    let body: Vec<_> = pairs
        .into_iter()
        .map(|(subject, version)| json!({"subject": subject, "version": version}))
        .collect();
    Ok(ok(json!(body)))
}

async fn schema_subjects(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut subjects: Vec<String> = lock(&s)
        .schema_versions(parse_id(&id)?)?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    subjects.dedup();
    Ok(ok(json!(subjects)))
}

async fn schema_types() -> Response {
    ok(json!(["AVRO"]))
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: String,
}

fn parse_config(body: &[u8]) -> Result<Compatibility, ApiError> {
    let req: ConfigBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!("expected {{\"compatibility\": \"...\"}}: {e}"))
    })?;
    Compatibility::parse(&req.compatibility)
        .ok_or(ApiError::InvalidCompatibility(req.compatibility))
}

async fn get_global_config(State(s): State<Shared>) -> Response {
    ok(json!({ "compatibilityLevel": lock(&s).global_compatibility().name() }))
}

async fn put_global_config(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let level = parse_config(&body)?;
    lock(&s).set_compatibility(None, level)?;
    Ok(ok(json!({ "compatibility": level.name() })))
}

async fn get_subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let store = lock(&s);
    let level = match store.subject_compatibility(&subject) {
        Some(level) => level,
        None if q.get("defaultToGlobal").is_some_and(|v| v == "true") => {
            store.global_compatibility()
        }
        None => return Err(ApiError::SubjectCompatibilityNotConfigured(subject)),
    };
    Ok(ok(json!({ "compatibilityLevel": level.name() })))
}

async fn put_subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let level = parse_config(&body)?;
    lock(&s).set_compatibility(Some(&subject), level)?;
    Ok(ok(json!({ "compatibility": level.name() })))
}

async fn check_compatibility(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = parse_schema_body(&body)?;
    let ok_ = lock(&s).check_compatibility(&subject, VersionRef::parse(&version)?, &req.schema)?;
    Ok(ok(json!({ "is_compatible": ok_ })))
}

async fn check_compatibility_all(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = parse_schema_body(&body)?;
    let store = lock(&s);
    // Against a subject with no versions everything is compatible, as in Confluent.
    let ok_ = match store.versions(&subject) {
        Ok(_) => store.check_compatibility(&subject, VersionRef::Latest, &req.schema)?,
        Err(_) => true,
    };
    Ok(ok(json!({ "is_compatible": ok_ })))
}

async fn not_found() -> ApiError {
    ApiError::NoSuchPath
}

/// The stand-in's routes over a store.
pub fn router(store: Store) -> Router {
    let shared: Shared = Arc::new(Mutex::new(store));
    Router::new()
        .route("/", get(root))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(schema_string_by_id))
        .route("/schemas/ids/{id}/versions", get(schema_versions))
        .route("/schemas/ids/{id}/subjects", get(schema_subjects))
        .route("/schemas/types", get(schema_types))
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config).put(put_subject_config),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_compatibility),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_compatibility_all),
        )
        .fallback(not_found)
        .with_state(shared)
}
