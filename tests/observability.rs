//! Observability against a real Prometheus: the processor runs on the local stack with
//! Prometheus scraping it every second and evaluating the shipped alerting rules; then every
//! expression of the Grafana dashboard and of the rules is evaluated through Prometheus' HTTP
//! API. Each dashboard expression must return data; each rule must evaluate without error;
//! the processor must export nothing outside the catalogue; the health endpoints must say live
//! and ready. Needs `prometheus` (`scripts/stack.sh install` puts it there).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kscore::cluster::ClusterArgs;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;

use common::harness::{LogDir, pipeline, simulate_cards};
use common::{free_port, promql, wait_committed};

const EVENTS: u64 = 3_000;
const GARBAGE: u64 = 20;

/// Kills a child process when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(dir: &Path, target: u16) -> (Guard, String) {
    let port = free_port();
    let rules = std::env::current_dir()
        .unwrap()
        .join("deploy/prometheus/rules/kscore.rules.yml");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: kscore\n    static_configs:\n      - targets: [\"127.0.0.1:{target}\"]\n",
            rules.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus not found: run scripts/stack.sh install (it installs Prometheus)");
    (Guard(child), format!("http://127.0.0.1:{port}"))
}

async fn get_json(url: reqwest::Url) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Evaluates `expr` now; the `data.result` array, or the error Prometheus gave.
async fn query(prometheus: &str, expr: &str) -> Result<Vec<Value>, String> {
    let url =
        reqwest::Url::parse_with_params(&format!("{prometheus}/api/v1/query"), &[("query", expr)])
            .unwrap();
    let (_, body) = get_json(url).await;
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

async fn scalar(prometheus: &str, expr: &str) -> f64 {
    let result = query(prometheus, expr).await.unwrap();
    assert_eq!(result.len(), 1, "{expr}: {result:?}");
    result[0]["value"][1].as_str().unwrap().parse().unwrap()
}

fn produce_garbage(cluster: &ClusterArgs, topic: &str) {
    let producer: BaseProducer = cluster.client_config().unwrap().create().unwrap();
    for i in 0..GARBAGE {
        let key = format!("garbage-{i}");
        producer
            .send(
                BaseRecord::to(topic)
                    .key(&key)
                    .payload(r#"{"card_id":"not avro"}"#),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_processor_and_every_panel_and_rule_evaluates() {
    let cluster = ClusterArgs::from_env();
    let dir = LogDir::new();
    let run = common::run_id();
    let input = format!("obs-in-{run}");
    let p = pipeline(dir.path(), &input, "obs", &run);

    let metrics_port = free_port();
    let log = std::fs::File::create(dir.path().join("processor.log")).unwrap();
    let _processor = Guard(
        Command::new(env!("CARGO_BIN_EXE_kscore"))
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["run", "--topology"])
            .arg(&p.file)
            .args(["--instance-id", "obs"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let (_prometheus, prometheus) = start_prometheus(dir.path(), metrics_port);
    let endpoint = format!("http://127.0.0.1:{metrics_port}");

    // Live and ready once the models are warm and the (empty) state is restored. The input
    // topic does not exist yet: the processor waits for it, live but not ready.
    let health = |path: &str| reqwest::Url::parse(&format!("{endpoint}{path}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, live) = loop {
        if let Ok(r) = reqwest::get(health("/health/live")).await {
            break (r.status().as_u16(), r.json::<Value>().await.unwrap());
        }
        assert!(Instant::now() < deadline, "no health endpoint");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (status, live["live"].as_bool()),
        (200, Some(true)),
        "{live}"
    );
    let (status, ready) = get_json(health("/health/ready")).await;
    assert_eq!(
        (status, &ready["ready"]),
        (503, &Value::Bool(false)),
        "{ready}"
    );

    // Input: payments paced over about 15 s, so scrapes see rates, and records that are not
    // Avro at all, which are dead-lettered.
    let mut sim = simulate_cards(&input, EVENTS, 200.0, 5, None, "300");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, ready) = get_json(health("/health/ready")).await;
        if status == 200 {
            assert_eq!(ready["ready"], true);
            assert_eq!(ready["models_warm"], true);
            assert_eq!(ready["assigned"], true);
            assert_eq!(ready["restoring"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {ready}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    produce_garbage(&cluster, &input);
    assert!(sim.wait().unwrap().success());
    let (c, topic, group) = (cluster.clone(), input.clone(), p.group.clone());
    tokio::task::spawn_blocking(move || {
        wait_committed(&c, &topic, &group, Duration::from_secs(120))
    })
    .await
    .unwrap();
    // A few more scrapes and rule evaluations after the last commit.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // The processor exports nothing outside the catalogue.
    let text = reqwest::get(format!("{endpoint}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut exported = std::collections::BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(
            promql::exported(name),
            "the processor exports `{name}`, which is not in the catalogue"
        );
        exported.insert(name.to_string());
    }
    assert!(exported.len() > 40, "{exported:?}");

    // Prometheus scraped it and sees what happened.
    assert_eq!(scalar(&prometheus, r#"up{job="kscore"}"#).await, 1.0);
    assert_eq!(
        scalar(&prometheus, "sum(kscore_records_consumed_total)").await,
        (EVENTS + GARBAGE) as f64
    );
    assert_eq!(
        scalar(&prometheus, "sum(kscore_records_scored_total)").await,
        EVENTS as f64
    );
    assert_eq!(
        scalar(
            &prometheus,
            r#"sum(kscore_records_dead_lettered_total{reason="not_confluent_framed"})"#
        )
        .await,
        GARBAGE as f64
    );
    // Each model scored each event; the shipped models carry a drift reference.
    for model in ["fraud_gbt", "anomaly_ae"] {
        assert_eq!(
            scalar(
                &prometheus,
                &format!(r#"sum(kscore_model_rows_total{{model="{model}"}})"#)
            )
            .await,
            EVENTS as f64
        );
        let psi = scalar(
            &prometheus,
            &format!(r#"max(kscore_model_score_psi{{model="{model}"}})"#),
        )
        .await;
        assert!(psi.is_finite() && psi >= 0.0, "{model}: PSI {psi}");
    }

    // Every dashboard expression returns data.
    let panels = promql::dashboard_exprs();
    assert!(panels.len() > 25);
    let mut empty = Vec::new();
    for (source, expr) in &panels {
        let expr = promql::for_prometheus(expr, "1m");
        match query(&prometheus, &expr).await {
            Ok(result) if result.is_empty() => empty.push(format!("{source}: {expr}")),
            Ok(_) => {}
            Err(e) => panic!("{source}: {expr}: {e}"),
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // Every rule expression evaluates, and Prometheus loaded and evaluated every rule.
    for (source, expr) in promql::rule_exprs() {
        if let Err(e) = query(&prometheus, &expr).await {
            panic!("{source}: {expr}: {e}");
        }
    }
    let url = reqwest::Url::parse(&format!("{prometheus}/api/v1/rules")).unwrap();
    let (_, body) = get_json(url).await;
    let rules: Vec<&Value> = body["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(rules.len(), promql::alert_names().len());
    for r in rules {
        assert_eq!(r["health"], "ok", "{r}");
    }
}
