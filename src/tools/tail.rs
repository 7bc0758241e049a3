//! `kscore tail`: reads a topic of Confluent-framed payments (`read_committed`), decodes each
//! record through the registry and prints a running one-line summary, so a person can see
//! events flowing and spot undecodable ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};

use crate::cluster::ClusterArgs;
use crate::schemas;
use crate::source::Decoder;
use crate::telemetry::metrics as names;
use crate::tools::payments::Payment;

/// Options of `kscore tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Topic to read.
    #[arg(long, default_value = "payments")]
    pub topic: String,
    /// Start from the earliest offset instead of new records only.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How often to print the summary line.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub every: Duration,
}

/// What `tail` saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TailSummary {
    /// Records read.
    pub records: u64,
    /// Records that did not decode.
    pub errors: u64,
}

fn money(minor: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", minor / 100, (minor % 100).abs())
}

/// Tails the topic until `count`, `duration` or `stop`.
pub async fn run(
    cluster: &ClusterArgs,
    args: &TailArgs,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<TailSummary> {
    let reader = schemas::payment().map_err(anyhow::Error::msg)?.clone();
    let decoder = Decoder::new(cluster.registry()?, reader);
    let mut cfg = cluster.client_config()?;
    cfg.set("group.id", format!("kscore-tail-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set(
            "auto.offset.reset",
            if args.from_beginning {
                "earliest"
            } else {
                "latest"
            },
        );
    let consumer: StreamConsumer = cfg.create()?;
    consumer.subscribe(&[&args.topic])?;
    let started = Instant::now();
    let mut summary = TailSummary::default();
    let mut window_start = Instant::now();
    let mut window_records = 0u64;
    let mut last: Option<String> = None;
    loop {
        if stop.load(Ordering::Relaxed)
            || args.count.is_some_and(|c| summary.records >= c)
            || args.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
            Err(_) => {}
            Ok(Err(e)) => tracing::warn!("consumer: {e}"),
            Ok(Ok(msg)) => {
                summary.records += 1;
                window_records += 1;
                let parsed = decoder
                    .decode_value(msg.payload())
                    .await
                    .map_err(|e| format!("undecodable: {e}"))
                    .and_then(|(_, v)| {
                        Payment::from_value(&v).map_err(|e| format!("not a payment: {e}"))
                    });
                match parsed {
                    Ok(p) => {
                        metrics::counter!(names::TAIL_RECORDS, "outcome" => "decoded").increment(1);
                        let lag_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, crate::features::millis)
                            .saturating_sub(p.event_time);
                        last = Some(format!(
                            "{} {} at {} ({} {}, {}), event time {:.1}s ago",
                            p.card_id,
                            money(p.amount_minor, &p.currency),
                            p.merchant_name,
                            p.mcc,
                            p.merchant_country,
                            p.channel_name(),
                            lag_ms as f64 / 1000.0
                        ));
                    }
                    Err(e) => {
                        summary.errors += 1;
                        metrics::counter!(names::TAIL_RECORDS, "outcome" => "undecodable")
                            .increment(1);
                        tracing::warn!(partition = msg.partition(), offset = msg.offset(), "{e}");
                    }
                }
            }
        }
        if window_start.elapsed() >= args.every {
            let rate = window_records as f64 / window_start.elapsed().as_secs_f64();
            println!(
                "[tail {}] {} events ({rate:.0}/s), {} undecodable | last: {}",
                args.topic,
                summary.records,
                summary.errors,
                last.as_deref().unwrap_or("-")
            );
            window_start = Instant::now();
            window_records = 0;
        }
    }
    println!(
        "[tail {}] done: {} events, {} undecodable | last: {}",
        args.topic,
        summary.records,
        summary.errors,
        last.as_deref().unwrap_or("-")
    );
    Ok(summary)
}
