use super::*;

const V1: &str = r#"{"type":"record","name":"P","fields":[{"name":"a","type":"long"}]}"#;
// V1 with different whitespace and key order: the same schema.
const V1_REORDERED: &str =
    r#"{ "fields": [ {"type": "long", "name": "a"} ], "name": "P", "type": "record" }"#;
// Adds an optional field: backward compatible.
const V2: &str = r#"{"type":"record","name":"P","fields":[{"name":"a","type":"long"},{"name":"b","type":["null","string"],"default":null}]}"#;
// Adds a required field without a default: not backward compatible.
const V_BAD: &str = r#"{"type":"record","name":"P","fields":[{"name":"a","type":"long"},{"name":"c","type":"string"}]}"#;

#[test]
fn ids_are_global_and_stable_for_identical_schemas() {
    let mut s = Store::in_memory();
    assert_eq!(s.register("t1-value", V1), Ok(1));
    assert_eq!(s.register("t1-value", V1_REORDERED), Ok(1));
    assert_eq!(s.register("t2-value", V1), Ok(1));
    assert_eq!(s.register("t1-value", V2), Ok(2));
    assert_eq!(s.versions("t1-value"), Ok(vec![1, 2]));
    assert_eq!(s.versions("t2-value"), Ok(vec![1]));
    assert_eq!(
        s.subjects(),
        vec!["t1-value".to_string(), "t2-value".to_string()]
    );
    let latest = s
        .version("t1-value", VersionRef::Latest)
        .map(|v| (v.version, v.id));
    assert_eq!(latest, Ok((2, 2)));
    assert_eq!(
        s.lookup("t2-value", V1_REORDERED)
            .map(|v| (v.version, v.id)),
        Ok((1, 1))
    );
}

#[test]
fn errors_carry_confluent_codes() {
    let mut s = Store::in_memory();
    s.register("t-value", V1).ok();
    let code = |r: Result<_, ApiError>| r.err().map(|e| e.codes().0);
    assert_eq!(code(s.versions("nope").map(|_| ())), Some(40401));
    assert_eq!(
        code(s.version("t-value", VersionRef::Number(9)).map(|_| ())),
        Some(40402)
    );
    assert_eq!(code(s.schema(99, false).map(|_| ())), Some(40403));
    assert_eq!(code(s.lookup("t-value", V2).map(|_| ())), Some(40403));
    assert_eq!(
        code(s.register("t-value", "{not json").map(|_| ())),
        Some(42201)
    );
    assert_eq!(
        code(s.register("t-value", r#"{"type":"nosuch"}"#).map(|_| ())),
        Some(42201)
    );
    assert_eq!(code(VersionRef::parse("0").map(|_| ())), Some(42202));
    assert_eq!(code(s.register("t-value", V_BAD).map(|_| ())), Some(409));
}

#[test]
fn compatibility_none_allows_anything_and_soft_delete_keeps_ids() {
    let mut s = Store::in_memory();
    s.register("t-value", V1).ok();
    assert!(
        s.set_compatibility(Some("t-value"), Compatibility::None)
            .is_ok()
    );
    assert_eq!(s.register("t-value", V_BAD), Ok(2));
    assert_eq!(s.delete_subject("t-value"), Ok(vec![1, 2]));
    assert_eq!(
        s.versions("t-value").err().map(|e| e.codes().0),
        Some(40401)
    );
    assert_eq!(s.schema(2, false).err().map(|e| e.codes().0), Some(40403));
    assert!(s.schema(2, true).is_ok());
    // Registering again after a delete reuses the id and starts a new version.
    assert_eq!(s.register("t-value", V1), Ok(1));
    assert_eq!(s.versions("t-value"), Ok(vec![3]));
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut s = Store::open(dir.path()).expect("open");
        assert_eq!(s.register("a-value", V1), Ok(1));
        assert_eq!(s.register("b-value", V2), Ok(2));
        assert!(s.set_compatibility(None, Compatibility::Full).is_ok());
    }
    let s = Store::open(dir.path()).expect("reopen");
    assert_eq!(
        s.subjects(),
        vec!["a-value".to_string(), "b-value".to_string()]
    );
    assert_eq!(
        s.version("b-value", VersionRef::Latest).map(|v| v.id),
        Ok(2)
    );
    assert_eq!(s.global_compatibility(), Compatibility::Full);
}
