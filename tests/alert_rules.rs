//! The alerting rules and the dashboard, checked without a running processor: `promtool check
//! rules` and the rules' unit tests (`promtool test rules`, each alert firing on a synthetic
//! series), and every metric named by a rule or a panel is one the processor exports (in
//! `telemetry::metrics::CATALOGUE`). Needs `promtool` (`scripts/stack.sh install` puts it there).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::promql;

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir("deploy/prometheus/rules")
        .output()
        .expect("promtool not found: run scripts/stack.sh install (it installs Prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_rules_file_is_valid() {
    let out = promtool(&["check", "rules", "kscore.rules.yml"]);
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
}

#[test]
fn each_alert_fires_in_its_unit_test() {
    let out = promtool(&["test", "rules", "kscore.rules.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert of the rules file has a test that expects it to fire.
    let tests = std::fs::read_to_string("deploy/prometheus/rules/kscore.rules.test.yml").unwrap();
    for alert in promql::alert_names() {
        let firing = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(&alert) && t.contains("exp_labels"));
        assert!(firing, "no unit test shows {alert} firing");
    }
}

#[test]
fn rules_and_panels_name_only_exported_metrics() {
    let mut exprs = promql::rule_exprs();
    exprs.extend(promql::dashboard_exprs());
    assert!(exprs.len() > 30, "{} expressions found", exprs.len());
    for (source, expr) in exprs {
        for name in promql::metric_names(&expr) {
            assert!(
                promql::exported(&name),
                "{source} queries `{name}`, which kscore does not export: {expr}"
            );
        }
    }
}

#[test]
fn metric_names_are_the_selectors_only() {
    let names = promql::metric_names(
        r#"histogram_quantile(0.99, sum by (model, le) (rate(kscore_scoring_seconds_bucket{model!="x"}[$__rate_interval]))) > 0.05 and on (topic) up{job="kscore"} == 0"#,
    );
    assert_eq!(names, vec!["kscore_scoring_seconds_bucket", "up"]);
    assert!(
        promql::exported("kscore_scoring_seconds_bucket")
            && !promql::exported("kscore_scoring_seconds_total")
    );
}
