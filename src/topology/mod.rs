//! Topology files: parsing ([`config`]), validation with every problem reported by file, field
//! path and reason, and the resolved form the pipeline is built from.

pub mod config;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use apache_avro::schema::RecordSchema;

pub use config::{Aggregation, Feature, Model, Role, Topology};

/// One thing wrong with a topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, as a field path (`feature[2].window`, `model[0] (fraud).features[3]`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// A topology that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid topology document (syntax, unknown or mistyped field).
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// The document parsed but is inconsistent.
    #[error("{}", render(file, problems))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn render(file: &Path, problems: &[Problem]) -> String {
    let mut out = format!("{}: {} problem(s)", file.display(), problems.len());
    for p in problems {
        out.push_str(&format!(
            "\n  {}: {}: {}",
            file.display(),
            p.path,
            p.message
        ));
    }
    out
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A validated topology with its paths resolved against the file's directory.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file it came from.
    pub file: PathBuf,
    /// The topology.
    pub topology: Topology,
    /// The reader schema.
    pub schema: Schema,
    /// Its text.
    pub schema_text: String,
    /// Model files, resolved, in `topology.models` order (for a directory of versions, the
    /// served version's `model.onnx`).
    pub model_paths: Vec<PathBuf>,
    /// Per model, the version directory served, where its path is a directory.
    pub model_versions: Vec<Option<String>>,
}

/// The file a model entry's path gives, and the version directory it is in: `path` itself, or
/// for a directory, `<path>/<v>/model.onnx` with `v` the version asked for, else the highest
/// whole-numbered directory holding a `model.onnx`.
pub fn resolve_model(
    path: &Path,
    version: Option<&str>,
) -> Result<(PathBuf, Option<String>), String> {
    if !path.is_dir() {
        return match version {
            Some(_) => Err(format!(
                "`version` needs a directory of versions, and {} is not one",
                path.display()
            )),
            None => Ok((path.to_path_buf(), None)),
        };
    }
    let file = |v: &str| path.join(v).join("model.onnx");
    if let Some(v) = version {
        let f = file(v);
        return if f.is_file() {
            Ok((f, Some(v.to_string())))
        } else {
            Err(format!("version {v}: {} does not exist", f.display()))
        };
    }
    let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let newest = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.parse().ok()?;
            file(&name).is_file().then_some((n, name))
        })
        .max();
    match newest {
        Some((_, v)) => Ok((file(&v), Some(v))),
        None => Err(format!(
            "{} holds no version directory (a whole number) with a model.onnx",
            path.display()
        )),
    }
}

/// The longest `batching.max_delay` or `batching.latency_budget`.
pub const MAX_BATCH_DELAY: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest `delivery.commit_interval`: half the transaction timeout.
pub const MAX_COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// The schema of a top-level field, a nullable union's non-null branch for a union of null and
/// one type; `None` if there is no such field.
pub fn scalar<'s>(schema: &'s Schema, field: &str) -> Option<&'s Schema> {
    let Schema::Record(RecordSchema { fields, .. }) = schema else {
        return None;
    };
    let f = fields.iter().find(|f| f.name == field)?;
    Some(non_null(&f.schema))
}

/// A union of null and one type: that type; any other schema as it is.
fn non_null(schema: &Schema) -> &Schema {
    if let Schema::Union(u) = schema
        && let [one] = u
            .variants()
            .iter()
            .filter(|v| !matches!(v, Schema::Null))
            .collect::<Vec<_>>()
            .as_slice()
    {
        return one;
    }
    schema
}

/// The kind of an Avro field as far as features care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// int, long, float, double (optionally nullable).
    Numeric,
    /// string, uuid, enum, boolean (optionally nullable).
    Categorical,
    /// A timestamp in milliseconds.
    TimestampMillis,
    /// Anything else (records, arrays, maps, bytes).
    Other,
}

/// The kind of a top-level field of a record schema, `None` if there is no such field.
pub fn field_kind(schema: &Schema, field: &str) -> Option<FieldKind> {
    Some(match scalar(schema, field)? {
        Schema::Int | Schema::Long | Schema::Float | Schema::Double => FieldKind::Numeric,
        Schema::TimestampMillis => FieldKind::TimestampMillis,
        Schema::String | Schema::Uuid(_) | Schema::Enum(_) | Schema::Boolean => {
            FieldKind::Categorical
        }
        _ => FieldKind::Other,
    })
}

/// Reads, parses and validates a topology file (without touching a broker or the models).
pub fn load(file: &Path) -> Result<Loaded, TopologyError> {
    load_with(file, true)
}

/// As [`load`]; `require_models: false` accepts model files that do not exist yet (computing
/// the features to train them with).
pub fn load_with(file: &Path, require_models: bool) -> Result<Loaded, TopologyError> {
    let text = std::fs::read_to_string(file).map_err(|source| TopologyError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    load_text(file, &text, require_models)
}

/// As [`load_with`], with the file's text already read (`file` names it and resolves its
/// relative paths).
pub fn load_text(file: &Path, text: &str, require_models: bool) -> Result<Loaded, TopologyError> {
    let topology: Topology = toml::from_str(text).map_err(|e| TopologyError::Parse {
        file: file.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut problems = Problems::default();
    check_names_and_topics(&topology, &mut problems);
    let (schema, schema_text) = reader_schema(&topology, base, &mut problems);
    check_input_fields(&topology, schema.as_ref(), &mut problems);
    let names = check_features(&topology, schema.as_ref(), &mut problems);
    let model_paths = check_models(&topology, base, require_models, &names, &mut problems);
    check_rules_and_delivery(&topology, &model_paths.1, &mut problems);
    let problems = problems.0;
    match (problems.is_empty(), schema) {
        (true, Some(schema)) => Ok(Loaded {
            file: file.to_path_buf(),
            topology,
            schema,
            schema_text,
            model_paths: model_paths.0,
            model_versions: model_paths.2,
        }),
        _ => Err(TopologyError::Invalid {
            file: file.to_path_buf(),
            problems,
        }),
    }
}

/// The problems found so far.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: String, message: String) {
        self.0.push(Problem { path, message });
    }
}

/// Names that must be given, and topics that must differ.
fn check_names_and_topics(topology: &Topology, problems: &mut Problems) {
    let non_empty = |v: &str| !v.trim().is_empty();
    if !non_empty(&topology.name) {
        problems.add("name".into(), "must not be empty".into());
    }
    for (path, v) in [
        ("input.topic", &topology.input.topic),
        ("input.group", &topology.input.group),
        ("input.key_field", &topology.input.key_field),
        ("input.event_time_field", &topology.input.event_time_field),
        ("output.scored_topic", &topology.output.scored_topic),
        (
            "output.dead_letter_topic",
            &topology.output.dead_letter_topic,
        ),
    ] {
        if !non_empty(v) {
            problems.add(path.into(), "must not be empty".into());
        }
    }
    if topology
        .state
        .changelog_topic
        .as_deref()
        .is_some_and(|t| !non_empty(t))
    {
        problems.add("state.changelog_topic".into(), "must not be empty".into());
    }
    let outputs = [
        Some(&topology.output.scored_topic),
        topology.output.alerts_topic.as_ref(),
        Some(&topology.output.dead_letter_topic),
        topology.state.changelog_topic.as_ref(),
    ];
    for (path, t) in [
        "output.scored_topic",
        "output.alerts_topic",
        "output.dead_letter_topic",
        "state.changelog_topic",
    ]
    .iter()
    .zip(outputs)
    {
        if t == Some(&topology.input.topic) {
            problems.add(
                (*path).into(),
                format!(
                    "must differ from the input topic `{}`",
                    topology.input.topic
                ),
            );
        }
    }
    let changelog = topology.changelog_topic();
    if outputs[..3].contains(&Some(&changelog)) {
        problems.add(
            "state.changelog_topic".into(),
            format!(
                "`{changelog}` is also an output topic; the changelog needs a topic of its own"
            ),
        );
    }
}

/// The reader schema, read and parsed (a record schema).
fn reader_schema(
    topology: &Topology,
    base: &Path,
    problems: &mut Problems,
) -> (Option<Schema>, String) {
    let schema_path = base.join(&topology.input.schema);
    match std::fs::read_to_string(&schema_path) {
        Err(e) => {
            problems.add(
                "input.schema".into(),
                format!("cannot read {}: {e}", schema_path.display()),
            );
            (None, String::new())
        }
        Ok(t) => match Schema::parse_str(&t) {
            Ok(s @ Schema::Record(_)) => (Some(s), t),
            Ok(_) => {
                problems.add(
                    "input.schema".into(),
                    format!("{} is not a record schema", schema_path.display()),
                );
                (None, t)
            }
            Err(e) => {
                problems.add(
                    "input.schema".into(),
                    format!("{} is not a valid Avro schema: {e}", schema_path.display()),
                );
                (None, t)
            }
        },
    }
}

/// The key and event-time fields.
fn check_input_fields(topology: &Topology, schema: Option<&Schema>, problems: &mut Problems) {
    let scalar_of = |name: &str| schema.map(|s| scalar(s, name));
    match scalar_of(&topology.input.key_field) {
        Some(None) => problems.add(
            "input.key_field".into(),
            format!("the schema has no field `{}`", topology.input.key_field),
        ),
        Some(Some(Schema::String | Schema::Uuid(_) | Schema::Enum(_))) | None => {}
        Some(Some(_)) => problems.add(
            "input.key_field".into(),
            format!(
                "`{}` must be a string, uuid or enum field (the key is text)",
                topology.input.key_field
            ),
        ),
    }
    match scalar_of(&topology.input.event_time_field) {
        Some(None) => problems.add(
            "input.event_time_field".into(),
            format!(
                "the schema has no field `{}`",
                topology.input.event_time_field
            ),
        ),
        Some(Some(Schema::Long | Schema::TimestampMillis | Schema::TimestampMicros)) | None => {}
        Some(Some(_)) => problems.add(
            "input.event_time_field".into(),
            format!(
                "`{}` must be a `long` with logicalType timestamp-millis or timestamp-micros (or \
                 a plain `long` of milliseconds)",
                topology.input.event_time_field
            ),
        ),
    }
}

/// The features (returns their names) and the state limits.
fn check_features(
    topology: &Topology,
    schema: Option<&Schema>,
    problems: &mut Problems,
) -> HashSet<String> {
    let non_empty = |v: &str| !v.trim().is_empty();
    let mut names = HashSet::new();
    let mut longest_window = std::time::Duration::ZERO;
    for (i, f) in topology.features.iter().enumerate() {
        let at = |k: &str| format!("feature[{i}] ({}).{k}", f.name);
        if !non_empty(&f.name) {
            problems.add(format!("feature[{i}].name"), "must not be empty".into());
        } else if !names.insert(f.name.clone()) {
            problems.add(at("name"), "is used by an earlier feature".into());
        }
        if let Some(w) = check_feature(f, &at, schema, problems) {
            longest_window = longest_window.max(w);
        }
    }
    if topology.state.max_events_per_key == 0 {
        problems.add(
            "state.max_events_per_key".into(),
            "must be at least 1".into(),
        );
    }
    if topology.state.idle_key_ttl < longest_window {
        problems.add(
            "state.idle_key_ttl".into(),
            format!(
                "{} is shorter than the longest window ({}): keys would be evicted while still inside a window",
                humantime::format_duration(topology.state.idle_key_ttl),
                humantime::format_duration(longest_window)
            ),
        );
    }
    names
}
/// One feature's fields, against its aggregation and the schema. Returns its window.
fn check_feature(
    f: &Feature,
    at: &dyn Fn(&str) -> String,
    schema: Option<&Schema>,
    problems: &mut Problems,
) -> Option<std::time::Duration> {
    let field = |name: &str| schema.map(|s| field_kind(s, name));
    let mut window = None;
    let a = f.aggregation;
    match (&f.field, a.needs_field()) {
        (None, true) => problems.add(at("field"), format!("`{a:?}` needs a field").to_lowercase()),
        (Some(_), false) => problems.add(at("field"), "not used by this aggregation".into()),
        (Some(name), true) => match field(name) {
            Some(None) => problems.add(at("field"), format!("the schema has no field `{name}`")),
            Some(Some(k)) if a.numeric() && k != FieldKind::Numeric => problems.add(
                at("field"),
                format!("`{name}` is not numeric (int, long, float or double)"),
            ),
            Some(Some(FieldKind::Other)) => {
                problems.add(at("field"), format!("`{name}` is not a scalar field"))
            }
            _ => {}
        },
        (None, false) => {}
    }
    match (f.window, a.windowed()) {
        (None, true) => problems.add(
            at("window"),
            "this aggregation needs a window, e.g. \"1h\"".into(),
        ),
        (Some(w), true) if w.is_zero() => {
            problems.add(at("window"), "must be longer than zero".into())
        }
        (Some(w), true) => window = Some(w),
        (Some(_), false) => problems.add(at("window"), "not used by this aggregation".into()),
        (None, false) => {}
    }
    check_equals(f, at, schema, problems);
    match (&f.other_field, a == config::Aggregation::Differs) {
        (None, true) => problems.add(at("other_field"), "`differs` needs the second field".into()),
        (Some(_), false) => problems.add(at("other_field"), "only used by `differs`".into()),
        (Some(o), true) => {
            if field(o) == Some(None) {
                problems.add(at("other_field"), format!("the schema has no field `{o}`"));
            }
        }
        (None, false) => {}
    }
    if f.default.is_some() && !a.has_default() {
        problems.add(
            at("default"),
            "only used by `time_since_last` and `ratio_to_mean`".into(),
        );
    }
    if f.default.is_some_and(|d| !d.is_finite()) {
        problems.add(at("default"), "must be a finite number".into());
    }
    window
}

/// A feature's `equals`: there exactly for the `equals` aggregation, and a value the field can
/// hold.
fn check_equals(
    f: &Feature,
    at: &dyn Fn(&str) -> String,
    schema: Option<&Schema>,
    problems: &mut Problems,
) {
    let a = f.aggregation;
    if let (Some(value), Some(name), config::Aggregation::Equals) = (&f.equals, &f.field, a) {
        match schema.and_then(|s| scalar(s, name)) {
            Some(Schema::Int | Schema::Long | Schema::Float | Schema::Double)
                if !value.trim().parse::<f64>().is_ok_and(f64::is_finite) =>
            {
                problems.add(
                    at("equals"),
                    format!("`{name}` is numeric; `{value}` is not a number"),
                )
            }
            Some(Schema::Enum(e)) if !e.symbols.contains(value) => problems.add(
                at("equals"),
                format!(
                    "`{value}` is not a symbol of `{name}` ({})",
                    e.symbols.join(", ")
                ),
            ),
            Some(Schema::Boolean) if value != "true" && value != "false" => problems.add(
                at("equals"),
                format!("`{name}` is a boolean; write `true` or `false`"),
            ),
            _ => {}
        }
    }
    if (a == config::Aggregation::Equals) != f.equals.is_some() {
        problems.add(
            at("equals"),
            if f.equals.is_some() {
                "only used by `equals`"
            } else {
                "`equals` needs the value to compare with"
            }
            .into(),
        );
    }
}

/// The models: returns their resolved paths, their version directories and every
/// `<model>.<score>`.
fn check_models(
    topology: &Topology,
    base: &Path,
    require_models: bool,
    names: &HashSet<String>,
    problems: &mut Problems,
) -> (Vec<PathBuf>, HashSet<String>, Vec<Option<String>>) {
    let non_empty = |v: &str| !v.trim().is_empty();
    // Models.
    let mut model_names = HashSet::new();
    let mut score_names = HashSet::new();
    let mut model_paths = Vec::new();
    let mut model_versions = Vec::new();
    for (i, m) in topology.models.iter().enumerate() {
        let at = |k: &str| format!("model[{i}] ({}).{k}", m.name);
        if !non_empty(&m.name) {
            problems.add(format!("model[{i}].name"), "must not be empty".into());
        } else if !model_names.insert(m.name.clone()) {
            problems.add(at("name"), "is used by an earlier model".into());
        }
        if m.name.contains('.') {
            problems.add(
                at("name"),
                "must not contain `.` (rules name scores `<model>.<score>`)".into(),
            );
        }
        let path = base.join(&m.path);
        let (path, version) = match resolve_model(&path, m.version.as_deref()) {
            Ok(resolved) => resolved,
            Err(e) => {
                let field = if m.version.is_some() {
                    "version"
                } else {
                    "path"
                };
                problems.add(at(field), e);
                (path, None)
            }
        };
        if require_models && !path.is_file() {
            problems.add(at("path"), format!("{} does not exist", path.display()));
        }
        model_paths.push(path);
        model_versions.push(version);
        if m.features.is_empty() {
            problems.add(at("features"), "a model needs at least one feature".into());
        }
        for (j, f) in m.features.iter().enumerate() {
            if !names.contains(f) {
                problems.add(
                    at(&format!("features[{j}]")),
                    format!("no feature named `{f}`"),
                );
            }
        }
        if m.scores.is_empty() {
            problems.add(at("scores"), "a model needs at least one score".into());
        }
        for (j, s) in m.scores.iter().enumerate() {
            if s.name.contains('.') {
                problems.add(
                    at(&format!("scores[{j}].name")),
                    "must not contain `.` (rules name scores `<model>.<score>`)".into(),
                );
            }
            if !score_names.insert(format!("{}.{}", m.name, s.name)) {
                problems.add(
                    at(&format!("scores[{j}].name")),
                    format!("`{}` is used twice", s.name),
                );
            }
        }
        if m.batching.max_rows == 0 {
            problems.add(at("batching.max_rows"), "must be at least 1".into());
        }
        for (field, value) in [
            ("max_delay", m.batching.max_delay),
            ("latency_budget", m.batching.latency_budget),
        ] {
            if value.is_some_and(|d| d > MAX_BATCH_DELAY) {
                problems.add(
                    at(&format!("batching.{field}")),
                    format!(
                        "must be at most {} (batches are sent at every commit anyway)",
                        humantime::format_duration(MAX_BATCH_DELAY)
                    ),
                );
            }
        }
        if m.batching.latency_budget.is_some_and(|d| d.is_zero()) {
            problems.add(
                at("batching.latency_budget"),
                "must be more than 0 (a row needs time to be scored)".into(),
            );
        }
        if m.batching.max_delay.is_some() && m.batching.latency_budget.is_some() {
            problems.add(
                at("batching.latency_budget"),
                "set either max_delay (a fixed delay) or latency_budget (a delay and batch size \
                 adapted to it), not both"
                    .into(),
            );
        }
        if m.workers == 0 {
            problems.add(at("workers"), "must be at least 1".into());
        }
    }
    check_roles(topology, problems);
    (model_paths, score_names, model_versions)
}

/// Canaries and shadows: each stands beside a primary, with the primary's scores; a primary
/// has at most one canary.
fn check_roles(topology: &Topology, problems: &mut Problems) {
    let mut canaries = HashSet::new();
    for (i, m) in topology.models.iter().enumerate() {
        let at = |k: &str| format!("model[{i}] ({}).{k}", m.name);
        let role = m.role.as_str();
        if m.role != Role::Canary && m.share.is_some() {
            problems.add(
                at("share"),
                format!("only a canary has a share (this model is a {role})"),
            );
        }
        if m.role == Role::Primary && m.of.is_some() {
            problems.add(
                at("of"),
                "only a canary or a shadow stands beside a primary (set `role`)".into(),
            );
        }
        if m.role == Role::Canary {
            match m.share {
                None => problems.add(
                    at("share"),
                    "a canary needs the share of keys it decides for (0 < share <= 1)".into(),
                ),
                Some(s) if !(s > 0.0 && s <= 1.0) => {
                    problems.add(
                        at("share"),
                        format!("must be more than 0 and at most 1, not {s}"),
                    );
                }
                Some(_) => {}
            }
            if m.of.is_none() {
                problems.add(
                    at("of"),
                    "a canary needs the primary it decides instead of".into(),
                );
            }
        }
        let Some(of) = &m.of else { continue };
        match topology.models.iter().find(|p| &p.name == of) {
            None => problems.add(at("of"), format!("no model named `{of}`")),
            Some(p) if p.role != Role::Primary => problems.add(
                at("of"),
                format!("`{of}` is a {}, not a primary", p.role.as_str()),
            ),
            Some(p) => {
                let names = |m: &Model| m.scores.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
                if names(p) != names(m) {
                    problems.add(
                        at("scores"),
                        format!(
                            "a {role} must give its primary's scores, by name and in order: {:?}",
                            names(p)
                        ),
                    );
                }
                if m.role == Role::Canary && !canaries.insert(of.clone()) {
                    problems.add(at("of"), format!("`{of}` has a canary already"));
                }
            }
        }
    }
}

/// The alert rules, and the delivery settings.
fn check_rules_and_delivery(
    topology: &Topology,
    score_names: &HashSet<String>,
    problems: &mut Problems,
) {
    // Rules.
    for (i, r) in topology.alerts.iter().enumerate() {
        let at = |k: &str| format!("alert[{i}] ({}).{k}", r.name);
        let model = r.score.split('.').next().unwrap_or_default();
        let stand_in = topology
            .models
            .iter()
            .find(|m| m.name == model && m.role != Role::Primary);
        if let Some(m) = stand_in {
            problems.add(
                at("score"),
                format!(
                    "`{model}` is a {}: rules name primaries' scores (a canary decides through \
                     its primary's rules; a shadow decides nothing)",
                    m.role.as_str()
                ),
            );
        } else if !score_names.contains(&r.score) {
            problems.add(
                at("score"),
                format!("no score `{}` (write `<model>.<score>`)", r.score),
            );
        }
        if !r.threshold.is_finite() {
            problems.add(at("threshold"), "must be a finite number".into());
        }
    }
    if !topology.alerts.is_empty() && topology.output.alerts_topic.is_none() {
        problems.add(
            "output.alerts_topic".into(),
            "alert rules are defined but no alerts topic".into(),
        );
    }
    let poll = topology.reload.poll_interval;
    if poll < std::time::Duration::from_millis(100) || poll > std::time::Duration::from_secs(3600) {
        problems.add(
            "reload.poll_interval".into(),
            "must be between 100ms and 1h".into(),
        );
    }
    if topology.delivery.commit_interval.is_zero() {
        problems.add(
            "delivery.commit_interval".into(),
            "must be longer than zero".into(),
        );
    }
    if topology.delivery.commit_interval > MAX_COMMIT_INTERVAL {
        problems.add(
            "delivery.commit_interval".into(),
            format!(
                "must be at most {}: a transaction is open for the whole interval, and the \
                 producer's transaction.timeout.ms is 60s",
                humantime::format_duration(MAX_COMMIT_INTERVAL)
            ),
        );
    }
}

#[cfg(test)]
mod tests;
