//! `kscore simulate`: realistic card payments, produced to a topic as Confluent-framed Avro
//! through the registry, keyed by card id, with labelled fraud incidents whose ground truth goes
//! to a side file and never into the events.

pub mod model;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

pub use model::{Label, Pattern, SimConfig, Simulator};

use crate::cluster::ClusterArgs;
use crate::kafka::{deliver, produce};
use crate::schemas;
use crate::sink::FramedEncoder;
use crate::telemetry::metrics as names;

/// How long an event may wait for room in the producer's queue before the simulator gives up
/// (the broker has taken nothing for that long).
const QUEUE_WAIT: Duration = Duration::from_secs(60);

/// Options of `kscore simulate`.
///
/// The defaults give the world the shipped models were trained on (`scripts/train.sh`): 5,000
/// cards, 1,500 merchants, 1.67 payments a second of event time (each card about 1.2 payments
/// an hour), 10 fraud incidents per 10,000 payments. How busy each card is matters most: the
/// rolling features count a card's payments per window, so packing more payments into each
/// card (a higher rate over the same cards) makes ordinary cards look like card testing and
/// velocity fraud, and the models flag most of them.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Topic to produce to (created if missing).
    #[arg(long, default_value = "payments")]
    pub topic: String,
    /// Partitions when the topic is created.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (wall clock), e.g. `30s`, `5m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Events per second, paced in real time: each event is sent when the wall clock reaches
    /// its event time. Without it, events are produced as fast as the broker takes them, their
    /// event time advancing at `--event-rate`. Unless `--cards` is given, the number of cards
    /// grows with the rate (3,000 per event a second) so each card stays as busy as in the
    /// trained world.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Event-time rate (payments per simulated second, over all cards) when producing as fast
    /// as possible. Per card that is `event-rate / cards` payments a second: the default
    /// 1.67 over 5,000 cards is about 1.2 payments per card per hour.
    #[arg(long, default_value_t = SimConfig::TRAINED_EVENTS_PER_SEC)]
    pub event_rate: f64,
    /// Event time of the first event: RFC 3339 (`2026-01-01T00:00:00Z`) or `now`. Defaults to
    /// `now` with `--rate`, else to 2026-01-01T00:00:00Z so runs are reproducible.
    #[arg(long)]
    pub start: Option<String>,
    /// RNG seed: the same seed and options give the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Number of cards the payments are spread over [default: 5,000, or 3,000 per event a
    /// second with `--rate`]. Fewer cards for the same rate make each card busier (see
    /// `--event-rate`).
    #[arg(long)]
    pub cards: Option<usize>,
    /// Number of merchants (each card has favourite merchants among them; more merchants make
    /// a card's merchants more varied).
    #[arg(long, default_value_t = SimConfig::TRAINED_MERCHANTS)]
    pub merchants: usize,
    /// Fraud incidents started per 10,000 legitimate payments (card testing, account takeover,
    /// velocity; each incident is several payments).
    #[arg(long, default_value_t = SimConfig::TRAINED_INCIDENTS_PER_10K)]
    pub fraud_per_10k: f64,
    /// Write the ground-truth labels (CSV: event_id, card_id, event_time, is_fraud, pattern,
    /// incident) to this file.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Write the events to this Avro object container file instead of Kafka (for training and
    /// `kscore features`).
    #[arg(long)]
    pub output_file: Option<PathBuf>,
    /// How often to log progress.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub progress: Duration,
}

impl SimulateArgs {
    /// The number of cards: `--cards`, else as busy per card as the trained world at the rate.
    pub fn cards(&self) -> usize {
        self.cards.unwrap_or_else(|| match self.rate {
            Some(rate) if rate.is_finite() && rate > 0.0 => {
                let per_event = SimConfig::TRAINED_CARDS as f64 / SimConfig::TRAINED_EVENTS_PER_SEC;
                ((rate * per_event).round() as usize).max(1)
            }
            _ => SimConfig::TRAINED_CARDS,
        })
    }

    /// The generator configuration these options describe (`now` resolved against `now_ms`).
    pub fn sim_config(&self, now_ms: i64) -> Result<SimConfig, String> {
        let live = self.rate.is_some();
        let start_ms = match self.start.as_deref() {
            Some("now") => now_ms,
            Some(s) => crate::features::millis(
                humantime::parse_rfc3339_weak(s)
                    .map_err(|e| format!("--start {s}: {e}"))?
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|e| format!("--start {s}: {e}"))?,
            ),
            None if live => now_ms,
            None => SimConfig::default().start_ms,
        };
        Ok(SimConfig {
            seed: self.seed,
            cards: self.cards(),
            merchants: self.merchants,
            start_ms,
            events_per_sec: self.rate.unwrap_or(self.event_rate),
            incidents_per_10k: self.fraud_per_10k,
            diurnal: !live,
        })
    }
}

/// Counts deliveries reported by librdkafka's background thread.
#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

struct DeliveryCounter(Arc<Deliveries>);

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(_) => {
                self.0.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::SIMULATOR_DELIVERY_FAILURES).increment(1);
                let mut first = self.0.first_error.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// What a simulation run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulateSummary {
    /// Events handed to the producer.
    pub produced: u64,
    /// Events the broker acknowledged.
    pub delivered: u64,
    /// Events the broker refused.
    pub failed: u64,
    /// Of the produced events, how many were fraud.
    pub fraud: u64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, crate::features::millis)
}

/// Runs the simulator until `count`, `duration` or `stop`.
pub async fn run(
    cluster: &ClusterArgs,
    args: &SimulateArgs,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<SimulateSummary> {
    let new_sim = || -> anyhow::Result<Simulator> {
        let cfg = args.sim_config(now_ms()).map_err(anyhow::Error::msg)?;
        Simulator::new(cfg).map_err(anyhow::Error::msg)
    };
    // Checks the options before anything touches the cluster.
    let sim = new_sim()?;
    let cfg = sim.config();
    tracing::info!(
        cards = cfg.cards,
        merchants = cfg.merchants,
        "simulated world: {:.1} payments per card per hour of event time",
        cfg.events_per_sec * 3600.0 / cfg.cards as f64
    );
    if let Some(path) = &args.output_file {
        let (args, path) = (args.clone(), path.clone());
        return tokio::task::spawn_blocking(move || write_file(sim, &args, &path, &stop)).await?;
    }
    cluster.ensure_topic(&args.topic, args.partitions).await?;
    let sr = cluster.registry()?;
    let encoder = FramedEncoder::register(
        &sr,
        &schemas::value_subject(&args.topic),
        schemas::PAYMENT_AVSC,
    )
    .await?;
    tracing::info!(topic = %args.topic, schema_id = encoder.schema_id(), "payment schema registered");
    let mut config = cluster.client_config()?;
    config
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("compression.type", "lz4")
        // Same partition for a key as Java clients' default partitioner.
        .set("partitioner", "murmur2_random");
    let deliveries = Arc::new(Deliveries::default());
    let producer: ThreadedProducer<DeliveryCounter> =
        config.create_with_context(DeliveryCounter(deliveries.clone()))?;
    // Made again now that the producer is ready: with `--rate` the first event time is `now`,
    // and paced events are released when the wall clock reaches their event time, not later by
    // however long the set-up above, or building the world, took.
    let mut sim = new_sim()?;
    if args.rate.is_some() && matches!(args.start.as_deref(), None | Some("now")) {
        sim.start_at(now_ms());
    }
    let args = args.clone();
    let summary = tokio::task::spawn_blocking(move || {
        produce(sim, &args, &encoder, &producer, &deliveries, &stop)
    })
    .await??;
    Ok(summary)
}

/// Writes events to an Avro container file, labels as usual.
fn write_file(
    sim: Simulator,
    args: &SimulateArgs,
    path: &std::path::Path,
    stop: &AtomicBool,
) -> anyhow::Result<SimulateSummary> {
    let schema = schemas::payment().map_err(anyhow::Error::msg)?;
    let file =
        File::create(path).map_err(|e| anyhow::anyhow!("--output-file {}: {e}", path.display()))?;
    let mut writer = apache_avro::Writer::new(schema, BufWriter::new(file))?;
    let mut labels = open_labels(args)?;
    let count = args
        .count
        .ok_or_else(|| anyhow::anyhow!("--output-file needs --count"))?;
    let mut summary = SimulateSummary {
        produced: 0,
        delivered: 0,
        failed: 0,
        fraud: 0,
    };
    for (payment, label) in sim.take(count as usize) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        writer.append_value(payment.to_value())?;
        summary.produced += 1;
        summary.fraud += u64::from(label.pattern.is_some());
        if let Some(w) = labels.as_mut() {
            writeln!(w, "{}", label.csv_line())?;
        }
    }
    writer.flush()?;
    if let Some(mut w) = labels {
        w.flush()?;
    }
    summary.delivered = summary.produced;
    tracing::info!(
        "wrote {} events ({} fraud) to {}",
        summary.produced,
        summary.fraud,
        path.display()
    );
    Ok(summary)
}

fn open_labels(args: &SimulateArgs) -> anyhow::Result<Option<BufWriter<File>>> {
    match &args.labels {
        Some(path) => {
            let mut w = BufWriter::new(
                File::create(path)
                    .map_err(|e| anyhow::anyhow!("--labels {}: {e}", path.display()))?,
            );
            writeln!(w, "{}", Label::CSV_HEADER)?;
            Ok(Some(w))
        }
        None => Ok(None),
    }
}

fn produce(
    sim: Simulator,
    args: &SimulateArgs,
    encoder: &FramedEncoder,
    producer: &ThreadedProducer<DeliveryCounter>,
    deliveries: &Deliveries,
    stop: &AtomicBool,
) -> anyhow::Result<SimulateSummary> {
    let mut labels = match &args.labels {
        Some(path) => {
            let mut w = BufWriter::new(
                File::create(path)
                    .map_err(|e| anyhow::anyhow!("--labels {}: {e}", path.display()))?,
            );
            writeln!(w, "{}", Label::CSV_HEADER)?;
            Some(w)
        }
        None => None,
    };
    let started = Instant::now();
    let start_ms = sim.config().start_ms;
    let live = args.rate.is_some();
    let mut produced = 0u64;
    let mut fraud = 0u64;
    let mut last_report = Instant::now();
    let mut last_count = 0u64;
    let mut buf = Vec::with_capacity(512);
    for (payment, label) in sim {
        if stop.load(Ordering::Relaxed)
            || args.count.is_some_and(|c| produced >= c)
            || args.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        if live {
            // Release the event when the wall clock reaches its event time, waking at least
            // every 200 ms to notice a stop.
            let due = Duration::from_millis(
                u64::try_from(payment.event_time.saturating_sub(start_ms)).unwrap_or(0),
            );
            loop {
                let left = due.saturating_sub(started.elapsed());
                if left.is_zero() || stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(200)));
            }
        }
        buf.clear();
        // The record keeps the broker's produce timestamp: event time is in the payload, and an
        // old event time as the record timestamp would make time-based retention delete a
        // replayed history at once.
        encoder.encode_into(payment.to_value(), &mut buf)?;
        let record = BaseRecord::to(&args.topic)
            .key(payment.card_id.as_bytes())
            .payload(&buf);
        produce::send_waiting(producer, record, QUEUE_WAIT)
            .map_err(|e| anyhow::anyhow!("producing to {}: {e}", args.topic))?;
        produced += 1;
        if label.pattern.is_some() {
            fraud += 1;
        }
        metrics::counter!(names::SIMULATOR_EVENTS, "pattern" => label.pattern.map_or("none", Pattern::name)).increment(1);
        if let Some(w) = labels.as_mut() {
            writeln!(w, "{}", label.csv_line())?;
        }
        if last_report.elapsed() >= args.progress {
            let rate = (produced - last_count) as f64 / last_report.elapsed().as_secs_f64();
            let of = args.count.map_or(String::new(), |c| format!("/{c}"));
            tracing::info!(
                "produced {produced}{of} events ({rate:.0}/s), {fraud} fraud, delivered {}, failed {}, event time {}",
                deliveries.ok.load(Ordering::Relaxed),
                deliveries.failed.load(Ordering::Relaxed),
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + Duration::from_millis(payment.event_time.max(0) as u64)
                ),
            );
            last_report = Instant::now();
            last_count = produced;
        }
    }
    if let Some(mut w) = labels {
        w.flush()?;
    }
    deliver::flush(producer, Duration::from_secs(60))?;
    let summary = SimulateSummary {
        produced,
        delivered: deliveries.ok.load(Ordering::Relaxed),
        failed: deliveries.failed.load(Ordering::Relaxed),
        fraud,
    };
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "done: produced {} events ({} fraud) in {secs:.1}s ({:.0}/s); delivered {}, failed {}",
        summary.produced,
        summary.fraud,
        summary.produced as f64 / secs.max(1e-9),
        summary.delivered,
        summary.failed
    );
    if summary.failed > 0 {
        let first = deliveries
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        anyhow::bail!(
            "{} events were not delivered; first error: {}",
            summary.failed,
            first.unwrap_or_default()
        );
    }
    Ok(summary)
}
