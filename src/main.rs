//! The `kscore` command line: parses arguments and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand};
use kscore::cluster::ClusterArgs;
use kscore::telemetry::{self, LogFormat};

/// Exactly-once Kafka stream processor that scores events with ONNX Runtime models.
#[derive(Debug, Parser)]
#[command(name = "kscore", version, about)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve Prometheus metrics (`/metrics`) and health (`/health/live`, `/health/ready`) on
    /// this address (e.g. `127.0.0.1:9464`).
    #[arg(long, global = true, env = "KSCORE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Produce simulated card payments (with labelled fraud) to a topic.
    Simulate {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        args: kscore::tools::simulator::SimulateArgs,
    },
    /// Read a topic of payments, decode them and print a running summary.
    Tail {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        args: kscore::tools::tail::TailArgs,
    },
    /// Run the processor: consume, featurise, score, publish (exactly once by default).
    Run {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The topology file.
        #[arg(long, env = "KSCORE_TOPOLOGY")]
        topology: PathBuf,
        /// Stable id of this instance (part of the transactional id: reuse it on restart).
        #[arg(long, env = "KSCORE_INSTANCE_ID", default_value = "0")]
        instance_id: String,
        /// Print a one-line summary this often (e.g. `1s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        summary_every: Option<std::time::Duration>,
        /// Stop after this long.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Consumer-group membership: `static` (a restart keeps its partitions without a
        /// rebalance) or `dynamic` (a stopping instance hands its partitions over at once).
        #[arg(long, env = "KSCORE_MEMBERSHIP", value_enum, default_value = "static")]
        membership: kscore::pipeline::Membership,
        /// Turn on `POST /admin/models/reload` on the metrics endpoint, answering requests that
        /// carry the token in this file (`Authorization: Bearer <token>`).
        #[arg(long, env = "KSCORE_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
        /// Testing aid: cap each model worker at this many rows per second (a slow model).
        #[arg(long, hide = true)]
        throttle_scoring: Option<f64>,
        /// Testing aid: while this file exists, abort every transaction after its records
        /// were sent (a broker refusing every commit).
        #[arg(long, hide = true)]
        fail_commits_while: Option<PathBuf>,
    },
    /// List the models each instance scores with (name, version, role, share, loaded at), from
    /// its metrics endpoint; with --reload, ask each to reload first.
    Models {
        #[command(flatten)]
        args: kscore::tools::models::ModelsArgs,
    },
    /// Benchmark baseline: copy a topic to another in transactions, nothing else.
    Passthrough {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        args: kscore::tools::passthrough::PassthroughArgs,
    },
    /// Score the reference batch with each model of a topology and measure rows/s per batch
    /// size, on the CPU or on CUDA (scripts/gpu_check.sh runs both).
    BenchModels {
        #[command(flatten)]
        args: kscore::tools::model_bench::BenchModelsArgs,
    },
    /// Compute a topology's features over a file of events, offline (for training).
    Features {
        #[command(flatten)]
        args: kscore::features::offline::FeaturesArgs,
    },
    /// Check a topology file without a broker; reports every problem.
    Validate {
        /// The topology file.
        topology: PathBuf,
    },
    /// Load ONNX Runtime and report its build and execution providers; with a topology, open
    /// each of its models and report which provider runs each node (exit status 1 where a
    /// model that asks for cuda has nodes on the CPU).
    CheckRuntime {
        /// The ONNX Runtime shared library; defaults to ORT_DYLIB_PATH.
        #[arg(long)]
        onnxruntime: Option<PathBuf>,
        /// A topology whose models to open.
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Open every model with this provider instead of its own.
        #[arg(long, value_enum, requires = "topology")]
        execution_provider: Option<kscore::topology::config::ExecutionProvider>,
    },
    /// Serve the Schema Registry stand-in used on the local stack.
    Registry {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Where the registry keeps its state.
        #[arg(long, default_value = ".local/data/registry")]
        data_dir: PathBuf,
    },
}

/// How long a stop may take before the process exits regardless.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Sets `stop` on Ctrl-C or SIGTERM, for commands that stop cleanly. The handlers are in place
/// when this returns: a signal from then on sets the flag instead of ending the process at once
/// (so this is called before anything else the command does, even its first log line).
fn stop_on_signals(stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("installing the Ctrl-C (SIGINT) handler")?;
    let flag = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stop requested");
        flag.store(true, Ordering::Relaxed);
        // Everything committed is safe whatever happens now; a consumer that cannot finish
        // leaving its group (librdkafka waits for a join in flight) must not keep the process.
        std::thread::spawn(|| {
            std::thread::sleep(STOP_GRACE);
            tracing::warn!("still stopping after {STOP_GRACE:?}; exiting now");
            std::process::exit(0);
        });
    });
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    if matches!(
        cli.command,
        Command::Simulate { .. }
            | Command::Tail { .. }
            | Command::Run { .. }
            | Command::Passthrough { .. }
    ) {
        stop_on_signals(&stop)?;
    }
    if matches!(cli.command, Command::Run { .. }) {
        // Not ready from the endpoint's first answer: the pipeline has yet to start.
        telemetry::health::pipeline_started();
    }
    if let Some(addr) = cli.metrics_listen {
        kscore::telemetry::install_exporter(addr).map_err(anyhow::Error::msg)?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    match cli.command {
        Command::Simulate { cluster, args } => {
            tracing::info!("connecting: {}", cluster.describe());
            kscore::tools::simulator::run(&cluster, &args, stop).await?;
        }
        Command::Tail { cluster, args } => {
            kscore::tools::tail::run(&cluster, &args, stop).await?;
        }
        Command::Run {
            cluster,
            topology,
            instance_id,
            summary_every,
            duration,
            membership,
            admin_token_file,
            throttle_scoring,
            fail_commits_while,
        } => {
            tracing::info!("connecting: {}", cluster.describe());
            let loaded = kscore::topology::load(&topology)?;
            if let Some(file) = admin_token_file {
                if cli.metrics_listen.is_none() {
                    anyhow::bail!(
                        "--admin-token-file needs --metrics-listen: the admin endpoint is served there"
                    );
                }
                telemetry::admin::enable(telemetry::admin::read_token(&file)?);
            }
            if let Some(d) = duration {
                let flag = stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    flag.store(true, Ordering::Relaxed);
                });
            }
            let opts = kscore::pipeline::RunOptions {
                instance_id,
                summary_every,
                throttle_scoring,
                membership,
                fail_cycles: fail_commits_while.map(kscore::pipeline::FailSwitch::File),
                ..Default::default()
            };
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                kscore::pipeline::run(&cluster, &loaded, &opts, rt, stop)
            })
            .await??;
        }
        Command::Passthrough { cluster, args } => {
            let rt = tokio::runtime::Handle::current();
            let n = tokio::task::spawn_blocking(move || {
                kscore::tools::passthrough::run(&cluster, &args, rt, stop)
            })
            .await??;
            tracing::info!(records = n, "passthrough stopped");
        }
        Command::Models { args } => {
            kscore::tools::models::run(&args).await?;
        }
        Command::BenchModels { args } => {
            tokio::task::spawn_blocking(move || kscore::tools::model_bench::run(&args)).await??;
        }
        Command::Features { args } => {
            tokio::task::spawn_blocking(move || kscore::features::offline::run(&args)).await??;
        }
        Command::Validate { topology } => {
            let loaded = kscore::topology::load(&topology)?;
            // The models are checked against their entries with ONNX Runtime itself.
            kscore::scorer::runtime::init(None).map_err(|e| {
                anyhow::anyhow!("{}: cannot check the models: {e}", topology.display())
            })?;
            let problems = kscore::scorer::check_models(&loaded);
            if !problems.is_empty() {
                return Err(kscore::topology::TopologyError::Invalid {
                    file: topology.clone(),
                    problems,
                }
                .into());
            }
            println!(
                "{}: ok ({} features, {} models, {} alert rules)",
                topology.display(),
                loaded.topology.features.len(),
                loaded.topology.models.len(),
                loaded.topology.alerts.len()
            );
        }
        Command::CheckRuntime {
            onnxruntime,
            topology,
            execution_provider,
        } => {
            let info = kscore::scorer::runtime::init(onnxruntime.as_deref())?;
            println!("ONNX Runtime loaded from {}", info.path.display());
            println!("{}", info.build);
            println!(
                "execution providers: cpu yes, cuda {}",
                if info.cuda_compiled_in {
                    "compiled in (a GPU is still needed at run time)"
                } else {
                    "not in this build"
                }
            );
            if let Some(topology) = topology {
                let loaded = kscore::topology::load(&topology)?;
                let (lines, all_where_asked) =
                    kscore::scorer::placement::report(&loaded, execution_provider)?;
                for line in lines {
                    println!("{line}");
                }
                if !all_where_asked {
                    anyhow::bail!(
                        "{}: nodes of a cuda model run on the CPU (listed above)",
                        topology.display()
                    );
                }
            }
        }
        Command::Registry { listen, data_dir } => {
            kscore::tools::registry_standin::run(listen, &data_dir).await?;
        }
    }
    Ok(())
}

/// See Cargo.toml: the pipeline's many small allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logs(cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
