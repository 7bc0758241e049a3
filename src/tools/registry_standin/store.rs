//! The stand-in registry's state: global schema ids, subjects and their versions, compatibility
//! settings, persisted to one JSON file after every change so it survives restarts.
//!
//! The rules follow Confluent Schema Registry: an identical schema (same JSON, whitespace and key
//! order aside) gets the same global id in every subject; registering a schema a subject already
//! holds returns its id without a new version; deletes are soft and keep ids resolvable.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// Compatibility levels, as Confluent names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    /// No checks.
    None,
    /// The new schema can read data written with the latest version.
    Backward,
    /// ... with every earlier version.
    BackwardTransitive,
    /// Data written with the new schema can be read with the latest version.
    Forward,
    /// ... with every earlier version.
    ForwardTransitive,
    /// Backward and forward against the latest version.
    Full,
    /// Backward and forward against every earlier version.
    FullTransitive,
}

impl Compatibility {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_uppercase())).ok()
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Compatibility::None => "NONE",
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSchema {
    id: u32,
    /// Compact JSON of the schema as first registered.
    schema: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubjectVersion {
    version: u32,
    id: u32,
    deleted: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Global schemas; id = position + 1.
    schemas: Vec<StoredSchema>,
    subjects: BTreeMap<String, Vec<SubjectVersion>>,
    #[serde(default)]
    global_compatibility: Option<Compatibility>,
    #[serde(default)]
    subject_compatibility: BTreeMap<String, Compatibility>,
}

/// One version of a subject, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionView {
    /// Subject name.
    pub subject: String,
    /// Version within the subject, from 1.
    pub version: u32,
    /// Global schema id.
    pub id: u32,
    /// The schema as a JSON string.
    pub schema: String,
}

/// Which version of a subject a request means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    /// The newest live version (`latest` or `-1`).
    Latest,
    /// A version number.
    Number(u32),
}

impl VersionRef {
    /// Parses a path segment the way Confluent does: `latest`, `-1`, or a positive integer.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        if s == "latest" || s == "-1" {
            return Ok(VersionRef::Latest);
        }
        match s.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(VersionRef::Number(n)),
            _ => Err(ApiError::InvalidVersion(s.to_string())),
        }
    }
}

/// The registry's state and where it is persisted.
#[derive(Debug)]
pub struct Store {
    state: State,
    file: Option<PathBuf>,
}

/// Normalises a schema for identity: the same JSON value, whatever the whitespace or key order.
fn normalise(schema: &str) -> Result<(String, Schema), ApiError> {
    let json: serde_json::Value = serde_json::from_str(schema)
        .map_err(|e| ApiError::InvalidSchema(format!("not JSON: {e}")))?;
    let parsed =
        Schema::parse(&json).map_err(|e| ApiError::InvalidSchema(format!("not Avro: {e}")))?;
    let compact = serde_json::to_string(&json)
        .map_err(|e| ApiError::InvalidSchema(format!("cannot re-serialise: {e}")))?;
    Ok((compact, parsed))
}

impl Store {
    /// A store kept only in memory.
    pub fn in_memory() -> Self {
        Store {
            state: State::default(),
            file: None,
        }
    }

    /// Opens (or creates) the store persisted in `dir/registry.json`.
    pub fn open(dir: &Path) -> Result<Self, ApiError> {
        fs::create_dir_all(dir)
            .map_err(|e| ApiError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let file = dir.join("registry.json");
        let state = match fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::Storage(format!(
                    "{} is not a registry state file: {e}",
                    file.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(ApiError::Storage(format!(
                    "cannot read {}: {e}",
                    file.display()
                )));
            }
        };
        Ok(Store {
            state,
            file: Some(file),
        })
    }

    fn persist(&self) -> Result<(), ApiError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let tmp = file.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| ApiError::Storage(format!("cannot serialise state: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, file)
        };
        write().map_err(|e| ApiError::Storage(format!("cannot write {}: {e}", file.display())))
    }

    fn schema_by_id(&self, id: u32) -> Option<&StoredSchema> {
        id.checked_sub(1)
            .and_then(|i| self.state.schemas.get(i as usize))
    }

    fn live_versions(&self, subject: &str) -> Option<Vec<&SubjectVersion>> {
        let versions: Vec<_> = self
            .state
            .subjects
            .get(subject)?
            .iter()
            .filter(|v| !v.deleted)
            .collect();
        (!versions.is_empty()).then_some(versions)
    }

    fn view(&self, subject: &str, v: &SubjectVersion) -> Result<VersionView, ApiError> {
        let schema = self
            .schema_by_id(v.id)
            .ok_or(ApiError::SchemaNotFound(v.id))?;
        Ok(VersionView {
            subject: subject.to_string(),
            version: v.version,
            id: v.id,
            schema: schema.schema.clone(),
        })
    }

    /// Subjects with at least one live version, sorted.
    pub fn subjects(&self) -> Vec<String> {
        self.state
            .subjects
            .iter()
            .filter(|(_, vs)| vs.iter().any(|v| !v.deleted))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Live version numbers of a subject.
    pub fn versions(&self, subject: &str) -> Result<Vec<u32>, ApiError> {
        let versions = self
            .live_versions(subject)
            .ok_or_else(|| ApiError::SubjectNotFound(subject.to_string()))?;
        Ok(versions.iter().map(|v| v.version).collect())
    }

    /// One live version of a subject.
    pub fn version(&self, subject: &str, version: VersionRef) -> Result<VersionView, ApiError> {
        let versions = self
            .live_versions(subject)
            .ok_or_else(|| ApiError::SubjectNotFound(subject.to_string()))?;
        let found = match version {
            VersionRef::Latest => versions.last().copied(),
            VersionRef::Number(n) => versions.iter().find(|v| v.version == n).copied(),
        };
        match found {
            Some(v) => self.view(subject, v),
            None => Err(ApiError::VersionNotFound(match version {
                VersionRef::Latest => "latest".to_string(),
                VersionRef::Number(n) => n.to_string(),
            })),
        }
    }

    /// The schema with a global id. Without `include_deleted`, a schema whose every version was
    /// deleted is not found, as in Confluent.
    pub fn schema(&self, id: u32, include_deleted: bool) -> Result<String, ApiError> {
        let schema = self.schema_by_id(id).ok_or(ApiError::SchemaNotFound(id))?;
        let live = self
            .state
            .subjects
            .values()
            .flatten()
            .any(|v| v.id == id && !v.deleted);
        if live || include_deleted {
            Ok(schema.schema.clone())
        } else {
            Err(ApiError::SchemaNotFound(id))
        }
    }

    /// Subject-version pairs that use a schema id.
    pub fn schema_versions(&self, id: u32) -> Result<Vec<(String, u32)>, ApiError> {
        self.schema_by_id(id).ok_or(ApiError::SchemaNotFound(id))?;
        Ok(self
            .state
            .subjects
            .iter()
            .flat_map(|(s, vs)| {
                vs.iter()
                    .filter(|v| v.id == id && !v.deleted)
                    .map(move |v| (s.clone(), v.version))
            })
            .collect())
    }

    fn find_id(&self, compact: &str) -> Option<u32> {
        self.state
            .schemas
            .iter()
            .find(|s| s.schema == compact)
            .map(|s| s.id)
    }

    /// Looks a schema up under a subject: which version of it, if any, this schema is.
    pub fn lookup(&self, subject: &str, schema: &str) -> Result<VersionView, ApiError> {
        let versions = self
            .live_versions(subject)
            .ok_or_else(|| ApiError::SubjectNotFound(subject.to_string()))?;
        let (compact, _) = normalise(schema)?;
        let id = self
            .find_id(&compact)
            .ok_or(ApiError::SchemaNotFoundInSubject)?;
        let v = versions
            .iter()
            .find(|v| v.id == id)
            .ok_or(ApiError::SchemaNotFoundInSubject)?;
        self.view(subject, v)
    }

    /// The compatibility level that applies to a subject.
    pub fn effective_compatibility(&self, subject: &str) -> Compatibility {
        self.state
            .subject_compatibility
            .get(subject)
            .copied()
            .or(self.state.global_compatibility)
            .unwrap_or(Compatibility::Backward)
    }

    /// The global compatibility level.
    pub fn global_compatibility(&self) -> Compatibility {
        self.state
            .global_compatibility
            .unwrap_or(Compatibility::Backward)
    }

    /// The subject-level compatibility, if one was set.
    pub fn subject_compatibility(&self, subject: &str) -> Option<Compatibility> {
        self.state.subject_compatibility.get(subject).copied()
    }

    /// Sets the global (subject `None`) or a subject's compatibility level.
    pub fn set_compatibility(
        &mut self,
        subject: Option<&str>,
        level: Compatibility,
    ) -> Result<(), ApiError> {
        match subject {
            None => self.state.global_compatibility = Some(level),
            Some(s) => {
                self.state
                    .subject_compatibility
                    .insert(s.to_string(), level);
            }
        }
        self.persist()
    }

    /// Why `candidate` may not be registered after `existing` under `level`, if it may not.
    fn incompatibility(
        &self,
        level: Compatibility,
        candidate: &Schema,
        existing: &[&SubjectVersion],
    ) -> Result<Option<String>, ApiError> {
        if level == Compatibility::None || existing.is_empty() {
            return Ok(None);
        }
        let against: Vec<&SubjectVersion> = if level.transitive() {
            existing.to_vec()
        } else {
            existing.last().copied().into_iter().collect()
        };
        for v in against {
            let old = self
                .schema_by_id(v.id)
                .ok_or(ApiError::SchemaNotFound(v.id))?;
            let (_, old) = normalise(&old.schema)?;
            let backward = || SchemaCompatibility::can_read(&old, candidate);
            let forward = || SchemaCompatibility::can_read(candidate, &old);
            let result = match level {
                Compatibility::Backward | Compatibility::BackwardTransitive => backward(),
                Compatibility::Forward | Compatibility::ForwardTransitive => forward(),
                _ => backward().and_then(|_| forward()),
            };
            if let Err(e) = result {
                return Ok(Some(format!(
                    "{} check against version {} failed: {e}",
                    level.name(),
                    v.version
                )));
            }
        }
        Ok(None)
    }

    /// Whether `schema` could be registered under `subject` after `version` (all live versions
    /// for transitive levels).
    pub fn check_compatibility(
        &self,
        subject: &str,
        version: VersionRef,
        schema: &str,
    ) -> Result<bool, ApiError> {
        let (_, parsed) = normalise(schema)?;
        let target = self.version(subject, version)?;
        let versions = self.live_versions(subject).unwrap_or_default();
        let level = self.effective_compatibility(subject);
        let existing: Vec<&SubjectVersion> = if level.transitive() {
            versions
        } else {
            versions
                .into_iter()
                .filter(|v| v.version == target.version)
                .collect()
        };
        Ok(self.incompatibility(level, &parsed, &existing)?.is_none())
    }

    /// Registers a schema under a subject and returns its global id.
    pub fn register(&mut self, subject: &str, schema: &str) -> Result<u32, ApiError> {
        let (compact, parsed) = normalise(schema)?;
        let existing_id = self.find_id(&compact);
        let live: Vec<&SubjectVersion> = self.live_versions(subject).unwrap_or_default();
        if let Some(id) = existing_id
            && live.iter().any(|v| v.id == id)
        {
            return Ok(id);
        }
        if let Some(why) =
            self.incompatibility(self.effective_compatibility(subject), &parsed, &live)?
        {
            return Err(ApiError::Incompatible(why));
        }
        let id = match existing_id {
            Some(id) => id,
            None => {
                let id = u32::try_from(self.state.schemas.len() + 1)
                    .map_err(|_| ApiError::Storage("schema id space exhausted".to_string()))?;
                self.state.schemas.push(StoredSchema {
                    id,
                    schema: compact,
                });
                id
            }
        };
        let versions = self.state.subjects.entry(subject.to_string()).or_default();
        let version = versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        versions.push(SubjectVersion {
            version,
            id,
            deleted: false,
        });
        self.persist()?;
        Ok(id)
    }

    /// Soft-deletes a subject; returns the versions deleted.
    pub fn delete_subject(&mut self, subject: &str) -> Result<Vec<u32>, ApiError> {
        let versions = self
            .state
            .subjects
            .get_mut(subject)
            .filter(|vs| vs.iter().any(|v| !v.deleted))
            .ok_or_else(|| ApiError::SubjectNotFound(subject.to_string()))?;
        let mut deleted = Vec::new();
        for v in versions.iter_mut().filter(|v| !v.deleted) {
            v.deleted = true;
            deleted.push(v.version);
        }
        self.persist()?;
        Ok(deleted)
    }

    /// Soft-deletes one version; returns its number.
    pub fn delete_version(&mut self, subject: &str, version: VersionRef) -> Result<u32, ApiError> {
        let target = self.version(subject, version)?.version;
        if let Some(v) = self
            .state
            .subjects
            .get_mut(subject)
            .and_then(|vs| vs.iter_mut().find(|v| v.version == target))
        {
            v.deleted = true;
        }
        self.persist()?;
        Ok(target)
    }
}
