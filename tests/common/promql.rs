//! The PromQL expressions of the shipped alerting rules and Grafana dashboard, and the metric
//! names they use.

use kscore::telemetry::metrics::{CATALOGUE, Kind};

const RULES: &str = "deploy/prometheus/rules/kscore.rules.yml";
const DASHBOARD: &str = "deploy/grafana/dashboards/kscore.json";

/// Each rule's `expr`, with where it comes from (`rule <name>`).
pub fn rule_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(RULES).unwrap();
    let doc: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut out = Vec::new();
    for group in doc["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
            out.push((
                format!("rule {name}"),
                rule["expr"].as_str().unwrap().trim().to_string(),
            ));
        }
    }
    out
}

/// The alerts the rules file defines.
pub fn alert_names() -> Vec<String> {
    rule_exprs()
        .into_iter()
        .map(|(s, _)| s.trim_start_matches("rule ").to_string())
        .collect()
}

/// Each panel target's `expr`, with where it comes from (`panel "<title>" <refId>`).
pub fn dashboard_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = doc["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = stack.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            stack.extend(inner);
        }
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    format!(
                        "panel \"{}\" {}",
                        panel["title"].as_str().unwrap_or_default(),
                        t["refId"].as_str().unwrap_or_default()
                    ),
                    expr.to_string(),
                ));
            }
        }
    }
    out
}

/// A dashboard expression with Grafana's interval variables replaced, ready for Prometheus.
pub fn for_prometheus(expr: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("$__interval", rate_interval)
        .replace("$__range", rate_interval)
}

/// Keywords followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

const FUNCTIONS_AND_KEYWORDS: &[&str] = &[
    "sum",
    "avg",
    "max",
    "min",
    "count",
    "and",
    "or",
    "unless",
    "rate",
    "irate",
    "increase",
    "delta",
    "deriv",
    "histogram_quantile",
    "le",
    "topk",
    "bottomk",
    "abs",
    "offset",
    "bool",
    "absent",
];

/// The metric names an expression selects: identifiers that are not functions, keywords,
/// labels (inside braces or a `by (...)` list), ranges (`[5m]`) or strings.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let (mut in_braces, mut in_string, mut in_group, mut in_range) = (false, false, false, false);
    let mut last_word = String::new();
    let mut word = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            if c == '"' {
                in_string = false;
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            if chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphanumeric() || *n == '_' || *n == ':')
            {
                continue;
            }
            let w = std::mem::take(&mut word);
            let selector = !in_braces
                && !in_group
                && !in_range
                && !w.chars().next().is_some_and(|c| c.is_ascii_digit())
                && !FUNCTIONS_AND_KEYWORDS.contains(&w.as_str())
                && !GROUPING.contains(&w.as_str());
            if selector {
                names.push(w.clone());
            }
            last_word = w;
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => in_braces = true,
            '}' => in_braces = false,
            '[' => in_range = true,
            ']' => in_range = false,
            '(' if GROUPING.contains(&last_word.as_str()) => in_group = true,
            ')' => in_group = false,
            _ => {}
        }
        if !c.is_whitespace() {
            last_word.clear();
        }
    }
    names
}

/// Whether kscore exports the series `name` (a catalogue metric, a histogram's `_bucket`,
/// `_sum` or `_count`, or Prometheus' own `up`).
pub fn exported(name: &str) -> bool {
    if name == "up" {
        return true;
    }
    CATALOGUE.iter().any(|m| {
        m.name == name
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(m.name)))
    })
}
