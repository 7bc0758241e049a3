//! `kscore bench-models`: a topology's models alone, on the CPU or on CUDA. Scores the stored
//! reference batch (`models/reference_scores.json`, scored by Python onnxruntime on the CPU at
//! training time) and compares, then measures rows/s at each batch size on one thread, with
//! rows drawn from that batch. `scripts/gpu_check.sh` runs it on both providers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::scorer::{ScoringSession, runtime};
use crate::topology::config::ExecutionProvider;

/// Arguments of `kscore bench-models`.
#[derive(Debug, clap::Args)]
pub struct BenchModelsArgs {
    /// The topology whose models to run.
    #[arg(long, default_value = "topologies/fraud.toml")]
    pub topology: PathBuf,
    /// Run every model on this provider instead of its own.
    #[arg(long, value_enum)]
    pub execution_provider: Option<ExecutionProvider>,
    /// The reference batch and its scores.
    #[arg(long, default_value = "models/reference_scores.json")]
    pub reference: PathBuf,
    /// The largest difference from a reference score accepted.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    /// Batch sizes to measure, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64,128,256,512,1024,2048,4096,8192"
    )]
    pub batches: Vec<usize>,
    /// Time spent measuring each batch size.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub time_per_batch: Duration,
}

/// Runs the comparison and the measurements; prints `reference <model> ...` and
/// `rows_per_s <provider> <model> <batch> <rows/s>` lines. Fails where a score is off.
pub fn run(args: &BenchModelsArgs) -> anyhow::Result<()> {
    runtime::init(None)?;
    let loaded = crate::topology::load(&args.topology)?;
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&args.reference)
            .with_context(|| format!("reading {}", args.reference.display()))?,
    )
    .with_context(|| format!("{}: not JSON", args.reference.display()))?;
    let mut off = Vec::new();
    for (model, path) in loaded.topology.models.iter().zip(&loaded.model_paths) {
        let mut model = model.clone();
        if let Some(p) = args.execution_provider {
            model.execution_provider = p;
        }
        let provider = model.execution_provider.name();
        let mut session = ScoringSession::open(&model, path)?;
        let r = &reference[&model.name];
        let rows: Vec<f32> = r["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|row| row.as_array().into_iter().flatten())
            .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
            .collect();
        let want: Vec<f64> = r["scores"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
            .collect();
        let width = model.features.len();
        if want.is_empty() || rows.len() != want.len() * width {
            bail!(
                "{}: no reference batch for model {} with {width} columns",
                args.reference.display(),
                model.name
            );
        }
        // The reference is the model's first score.
        let got = session.score(&rows)?.swap_remove(0);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        let ok = worst <= args.tolerance;
        println!(
            "reference {} on {provider}: {} rows, largest difference {worst:.3e} (limit {:.0e}): {}",
            model.name,
            want.len(),
            args.tolerance,
            if ok { "ok" } else { "OFF" }
        );
        if !ok {
            off.push(model.name.clone());
        }
        for &batch in &args.batches {
            let input: Vec<f32> = rows.iter().copied().cycle().take(batch * width).collect();
            session.score(&input)?;
            let started = Instant::now();
            let mut scored = 0usize;
            while started.elapsed() < args.time_per_batch {
                session.score(&input)?;
                scored += batch;
            }
            let rate = scored as f64 / started.elapsed().as_secs_f64();
            println!("rows_per_s {provider} {} {batch} {rate:.0}", model.name);
        }
    }
    if !off.is_empty() {
        bail!("scores differ from the reference for {off:?}");
    }
    Ok(())
}
