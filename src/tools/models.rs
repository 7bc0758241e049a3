//! `kscore models`: what each instance scores with, from its `GET /models` (name, version,
//! role, share, when loaded), as a table; and `--reload`, which asks each instance to reload
//! (`POST /admin/models/reload` with the admin token) and prints what it came to.

use std::path::PathBuf;
use std::time::Duration;

use crate::telemetry::admin::ModelRow;

/// Arguments of `kscore models`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelsArgs {
    /// An instance's metrics endpoint (`--metrics-listen` of `kscore run`); repeat for more.
    #[arg(long = "endpoint", default_value = "http://127.0.0.1:9464")]
    pub endpoints: Vec<String>,
    /// Ask each instance to reload its models first (needs the admin token).
    #[arg(long)]
    pub reload: bool,
    /// The file holding the admin token (for `--reload`).
    #[arg(long, env = "KSCORE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
struct Listing {
    models: Vec<ModelRow>,
}

#[derive(serde::Deserialize)]
struct ReloadAnswer {
    outcome: Option<String>,
    reason: Option<String>,
    error: Option<String>,
}

/// Runs `kscore models`: fails if an instance cannot be asked, or refused a reload.
pub async fn run(args: &ModelsArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(330))
        .build()?;
    let token = match (&args.admin_token_file, args.reload) {
        (Some(f), true) => Some(crate::telemetry::admin::read_token(f)?),
        (None, true) => {
            anyhow::bail!("--reload needs --admin-token-file (or KSCORE_ADMIN_TOKEN_FILE)")
        }
        _ => None,
    };
    let mut failed = Vec::new();
    for endpoint in &args.endpoints {
        let base = endpoint.trim_end_matches('/');
        if let Some(token) = &token {
            let answer: ReloadAnswer = client
                .post(format!("{base}/admin/models/reload"))
                .bearer_auth(token)
                .send()
                .await?
                .json()
                .await?;
            match (answer.outcome.as_deref(), answer.reason, answer.error) {
                (Some(outcome @ ("switched" | "unchanged")), _, _) => {
                    println!("{base}: reload {outcome}");
                }
                (_, Some(reason), _) | (_, _, Some(reason)) => {
                    println!("{base}: reload refused: {reason}");
                    failed.push(base.to_string());
                }
                _ => failed.push(base.to_string()),
            }
        }
        let listing: Listing = client
            .get(format!("{base}/models"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        println!("{base}");
        print!("{}", table(&listing.models));
    }
    if !failed.is_empty() {
        anyhow::bail!("reload refused by {}", failed.join(", "));
    }
    Ok(())
}

/// The models as a table, one line each.
pub fn table(rows: &[ModelRow]) -> String {
    let header = [
        "name",
        "version",
        "role",
        "of",
        "share",
        "loaded at",
        "file",
    ];
    let lines: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.version.clone(),
                r.role.to_string(),
                r.of.clone().unwrap_or_else(|| "-".into()),
                r.share.map_or_else(|| "-".into(), |s| s.to_string()),
                r.loaded_at.clone(),
                r.file.clone(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str("  ");
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for l in &lines {
        line(l.iter().map(String::as_str).collect());
    }
    out
}
