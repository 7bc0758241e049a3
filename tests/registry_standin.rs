//! The Schema Registry stand-in over HTTP: Confluent's paths, JSON shapes, error codes and
//! statuses, driven both with raw HTTP and with `schema_registry_converter`, the client the
//! processor uses. Each test serves its own registry on an ephemeral port; no stack needed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use apache_avro::types::Value;
use kscore::tools::registry_standin::{Store, spawn_local};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_all_subjects, get_all_versions, get_schema_by_id,
    get_schema_by_subject_and_version, post_schema,
};
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde_json::{Value as Json, json};

const V1: &str =
    r#"{"type":"record","name":"Beat","namespace":"t","fields":[{"name":"n","type":"long"}]}"#;
const V2: &str = r#"{"type":"record","name":"Beat","namespace":"t","fields":[{"name":"n","type":"long"},{"name":"note","type":["null","string"],"default":null}]}"#;
const INCOMPATIBLE: &str =
    r#"{"type":"record","name":"Beat","namespace":"t","fields":[{"name":"n","type":"string"}]}"#;

struct Server {
    url: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn serve(store: Store) -> Server {
    let (url, task) = spawn_local(store).await.expect("registry");
    Server { url, task }
}

async fn serve_dir(dir: &Path) -> Server {
    serve(Store::open(dir).expect("open store")).await
}

fn sr(url: &str) -> SrSettings {
    SrSettings::new_builder(url.to_string())
        .no_proxy()
        .build()
        .expect("settings")
}

/// Sends a request; returns status, content type and JSON body.
async fn call(method: &str, url: String, body: Option<Json>) -> (u16, String, Json) {
    let client = reqwest::Client::new();
    let req = match method {
        "GET" => client.get(url),
        "POST" => client.post(url),
        "PUT" => client.put(url),
        "DELETE" => client.delete(url),
        _ => unreachable!("test helper"),
    };
    let req = match body {
        Some(b) => req
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(b.to_string()),
        None => req,
    };
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await.expect("body");
    (
        status,
        ctype,
        serde_json::from_str(&text).unwrap_or(Json::String(text)),
    )
}

#[tokio::test]
async fn rest_api_matches_confluent_shapes_and_error_codes() {
    let s = serve(Store::in_memory()).await;
    let u = &s.url;

    let (st, ctype, body) = call(
        "POST",
        format!("{u}/subjects/beats-value/versions"),
        Some(json!({"schema": V1})),
    )
    .await;
    assert_eq!((st, body), (200, json!({"id": 1})));
    assert_eq!(ctype, "application/vnd.schemaregistry.v1+json");
    // Same schema, other subject: same global id. A new schema: a new id and version.
    let (_, _, body) = call(
        "POST",
        format!("{u}/subjects/other-value/versions"),
        Some(json!({"schema": V1, "schemaType": "AVRO"})),
    )
    .await;
    assert_eq!(body, json!({"id": 1}));
    let (_, _, body) = call(
        "POST",
        format!("{u}/subjects/beats-value/versions"),
        Some(json!({"schema": V2})),
    )
    .await;
    assert_eq!(body, json!({"id": 2}));

    let (st, _, body) = call("GET", format!("{u}/subjects"), None).await;
    assert_eq!((st, body), (200, json!(["beats-value", "other-value"])));
    let (_, _, body) = call("GET", format!("{u}/subjects/beats-value/versions"), None).await;
    assert_eq!(body, json!([1, 2]));
    let (_, _, latest) = call(
        "GET",
        format!("{u}/subjects/beats-value/versions/latest"),
        None,
    )
    .await;
    assert_eq!(latest["subject"], "beats-value");
    assert_eq!(
        (latest["version"].as_u64(), latest["id"].as_u64()),
        (Some(2), Some(2))
    );
    let stored: Json =
        serde_json::from_str(latest["schema"].as_str().expect("schema string")).expect("json");
    assert_eq!(stored, serde_json::from_str::<Json>(V2).expect("json"));
    let (_, _, v1) = call("GET", format!("{u}/subjects/beats-value/versions/1"), None).await;
    assert_eq!(
        (v1["version"].as_u64(), v1["id"].as_u64()),
        (Some(1), Some(1))
    );
    let (st, _, by_id) = call("GET", format!("{u}/schemas/ids/1?deleted=true"), None).await;
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Json>(by_id["schema"].as_str().expect("string")).expect("json"),
        serde_json::from_str::<Json>(V1).expect("json")
    );
    let (_, _, found) = call(
        "POST",
        format!("{u}/subjects/beats-value"),
        Some(json!({"schema": V1})),
    )
    .await;
    assert_eq!(
        (
            found["subject"].as_str(),
            found["version"].as_u64(),
            found["id"].as_u64()
        ),
        (Some("beats-value"), Some(1), Some(1))
    );
    let (_, _, body) = call("GET", format!("{u}/schemas/ids/1/versions"), None).await;
    assert_eq!(
        body,
        json!([{"subject": "beats-value", "version": 1}, {"subject": "other-value", "version": 1}])
    );

    // Errors: Confluent's error_code, message and HTTP status.
    let expect_err = |got: (u16, String, Json), status: u16, code: u64| {
        assert_eq!(got.0, status, "{got:?}");
        assert_eq!(got.2["error_code"].as_u64(), Some(code), "{got:?}");
        assert!(
            got.2["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{got:?}"
        );
    };
    expect_err(
        call("GET", format!("{u}/subjects/nope/versions"), None).await,
        404,
        40401,
    );
    expect_err(
        call("GET", format!("{u}/subjects/nope/versions/latest"), None).await,
        404,
        40401,
    );
    expect_err(
        call(
            "POST",
            format!("{u}/subjects/nope"),
            Some(json!({"schema": V1})),
        )
        .await,
        404,
        40401,
    );
    expect_err(
        call("GET", format!("{u}/subjects/beats-value/versions/7"), None).await,
        404,
        40402,
    );
    expect_err(
        call("GET", format!("{u}/schemas/ids/99"), None).await,
        404,
        40403,
    );
    expect_err(
        call(
            "POST",
            format!("{u}/subjects/other-value"),
            Some(json!({"schema": V2})),
        )
        .await,
        404,
        40403,
    );
    expect_err(
        call(
            "POST",
            format!("{u}/subjects/x-value/versions"),
            Some(json!({"schema": "{\"type\": \"recrd\"}"})),
        )
        .await,
        422,
        42201,
    );
    expect_err(
        call(
            "POST",
            format!("{u}/subjects/x-value/versions"),
            Some(json!({"schema": "not json"})),
        )
        .await,
        422,
        42201,
    );
    expect_err(
        call(
            "GET",
            format!("{u}/subjects/beats-value/versions/zero"),
            None,
        )
        .await,
        422,
        42202,
    );
    expect_err(
        call(
            "POST",
            format!("{u}/subjects/beats-value/versions"),
            Some(json!({"schema": INCOMPATIBLE})),
        )
        .await,
        409,
        409,
    );
    expect_err(
        call(
            "PUT",
            format!("{u}/config"),
            Some(json!({"compatibility": "SIDEWAYS"})),
        )
        .await,
        422,
        42203,
    );

    // Compatibility settings change what may be registered.
    let (_, _, body) = call(
        "POST",
        format!("{u}/compatibility/subjects/beats-value/versions/latest"),
        Some(json!({"schema": INCOMPATIBLE})),
    )
    .await;
    assert_eq!(body, json!({"is_compatible": false}));
    let (_, _, body) = call(
        "PUT",
        format!("{u}/config/beats-value"),
        Some(json!({"compatibility": "NONE"})),
    )
    .await;
    assert_eq!(body, json!({"compatibility": "NONE"}));
    let (st, _, body) = call(
        "POST",
        format!("{u}/subjects/beats-value/versions"),
        Some(json!({"schema": INCOMPATIBLE})),
    )
    .await;
    assert_eq!((st, body), (200, json!({"id": 3})));
    let (_, _, body) = call("GET", format!("{u}/config"), None).await;
    assert_eq!(body, json!({"compatibilityLevel": "BACKWARD"}));

    // Soft delete: the subject is gone, its ids still resolve with deleted=true.
    let (_, _, body) = call("DELETE", format!("{u}/subjects/other-value"), None).await;
    assert_eq!(body, json!([1]));
    let (_, _, body) = call("GET", format!("{u}/subjects"), None).await;
    assert_eq!(body, json!(["beats-value"]));
    s.task.abort();
}

#[tokio::test]
async fn drives_with_the_processors_registry_client() {
    let s = serve(Store::in_memory()).await;
    let settings = sr(&s.url);

    let registered = post_schema(
        &settings,
        "beats-value".into(),
        SuppliedSchema::new(None, SchemaType::Avro, V1.into()),
    )
    .await
    .expect("register");
    assert_eq!(registered.id, 1);
    let again = post_schema(
        &settings,
        "beats-value".into(),
        SuppliedSchema::new(None, SchemaType::Avro, V1.into()),
    )
    .await
    .expect("register again");
    assert_eq!(again.id, 1);
    let by_id = get_schema_by_id(1, &settings).await.expect("by id");
    assert_eq!(by_id.schema_type, SchemaType::Avro);
    let latest = get_schema_by_subject_and_version(&settings, "beats-value", None)
        .await
        .expect("latest");
    assert_eq!((latest.id, latest.version), (1, Some(1)));
    assert_eq!(
        get_all_subjects(&settings).await.expect("subjects"),
        vec!["beats-value".to_string()]
    );
    assert_eq!(
        get_all_versions(&settings, "beats-value".into())
            .await
            .expect("versions"),
        vec![1]
    );
    let missing = get_schema_by_id(42, &settings)
        .await
        .expect_err("missing id is an error");
    assert!(!missing.retriable, "{missing:?}");

    // Encode with the client's encoder (TopicNameStrategy), decode with its decoder.
    let encoder = AvroEncoder::new(sr(&s.url));
    let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
        "beats".into(),
        false,
        SuppliedSchema::new(None, SchemaType::Avro, V2.into()),
    );
    let bytes = encoder
        .encode(
            vec![
                ("n", Value::Long(7)),
                (
                    "note",
                    Value::Union(1, Box::new(Value::String("hi".into()))),
                ),
            ],
            strategy,
        )
        .await
        .expect("encode");
    assert_eq!(&bytes[..5], &[0, 0, 0, 0, 2]);
    let decoded = AvroDecoder::new(sr(&s.url))
        .decode(Some(&bytes))
        .await
        .expect("decode");
    assert_eq!(
        decoded.value,
        Value::Record(vec![
            ("n".into(), Value::Long(7)),
            (
                "note".into(),
                Value::Union(1, Box::new(Value::String("hi".into())))
            )
        ])
    );
    s.task.abort();
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = serve_dir(dir.path()).await;
    let id = post_schema(
        &sr(&first.url),
        "a-value".into(),
        SuppliedSchema::new(None, SchemaType::Avro, V2.into()),
    )
    .await
    .expect("register")
    .id;
    first.task.abort();
    let _ = first.task.await;

    let second = serve_dir(dir.path()).await;
    let (st, _, body) = call(
        "GET",
        format!("{}/subjects/a-value/versions/latest", second.url),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(body["id"].as_u64(), Some(u64::from(id)));
    // Ids keep counting from where they were.
    let next = post_schema(
        &sr(&second.url),
        "b-value".into(),
        SuppliedSchema::new(None, SchemaType::Avro, V1.into()),
    )
    .await
    .expect("register")
    .id;
    assert_eq!(next, id + 1);
    second.task.abort();
}
