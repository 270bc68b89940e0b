//! The commands of the `dynamollm` binary, one module each.

pub mod agent;
pub mod assess;
pub mod bound;
pub mod check;
pub mod demo;
pub mod forecast;
pub mod predictor;
pub mod profile;
pub mod rehearse;
pub mod report;
pub mod robustness;
pub mod serve;
pub mod sim;
pub mod twin;

use ::sim::Physics;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Options every twin-backed command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct PhysicsArgs {
    /// The twin's physics file (default: the embedded DGX H100 + Llama-2-70B, profiles/twin/llama2-70b-h100.toml).
    #[arg(long, value_name = "FILE")]
    pub physics: Option<PathBuf>,
}

impl PhysicsArgs {
    /// Load the chosen physics.
    pub fn load(&self) -> Result<Physics> {
        match &self.physics {
            Some(p) => Ok(Physics::load(p)?),
            None => Ok(Physics::default_h100_llama70b()),
        }
    }
}

/// The workload options of the replaying commands (`sim`, `bound`).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// An Azure trace (TIMESTAMP,ContextTokens,GeneratedTokens) replayed at its own timestamps
    /// (default: the bundled Conversation hour).
    #[arg(long, value_name = "FILE", conflicts_with = "rates")]
    pub trace: Option<PathBuf>,
    /// A rate curve (minute,rate_lo,rate_mid,rate_hi) turned into Poisson arrivals.
    #[arg(long, value_name = "FILE", requires = "lengths")]
    pub rates: Option<PathBuf>,
    /// An Azure trace whose token lengths the Poisson arrivals draw from.
    #[arg(long, value_name = "FILE")]
    pub lengths: Option<PathBuf>,
    /// Multiply the load (0.001 to 1000).
    #[arg(long, default_value_t = 1.0, value_parser = flag::scale)]
    pub scale: f64,
    /// Replay only the first H hours (0.001 to 100000).
    #[arg(long, value_name = "H", value_parser = flag::hours)]
    pub hours: Option<f64>,
    /// Seed: the same seed gives the same numbers.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl WorkloadArgs {
    /// Build the workload these options describe.
    pub fn load(&self) -> Result<::sim::Workload> {
        ::sim::Workload::from_options(
            self.trace.as_deref(),
            self.rates.as_deref(),
            self.lengths.as_deref(),
            self.scale,
            self.hours,
            self.seed,
        )
    }
}

/// A progress bar over `len` units, hidden with `quiet` or when stdout is not a terminal.
pub fn progress_bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet || !std::io::stdout().is_terminal() {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

/// Write JSON to a file, naming it on failure.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Parsers of numeric flags with their ranges: clap refuses a value out of
/// range before anything runs (exit 2, the flag and value named).
pub mod flag {
    fn in_range(s: &str, lo: f64, hi: f64) -> Result<f64, String> {
        let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(format!("must be a number in [{lo}, {hi}]"))
        }
    }

    /// A speed-up: virtual seconds per wall second, 0.01 to 10000.
    pub fn speed(s: &str) -> Result<f64, String> {
        in_range(s, 0.01, 10_000.0)
    }

    /// A power (W), 1 W to 1 GW.
    pub fn power_w(s: &str) -> Result<f64, String> {
        in_range(s, 1.0, 1e9)
    }

    /// A load multiplier, 0.001 to 1000.
    pub fn scale(s: &str) -> Result<f64, String> {
        in_range(s, 0.001, 1_000.0)
    }

    /// Hours of a trace to replay, 0.001 to 100000.
    pub fn hours(s: &str) -> Result<f64, String> {
        in_range(s, 0.001, 100_000.0)
    }

    /// An SLO multiplier, 1 to 1000 (below 1 no request could meet its SLO).
    pub fn slo_multiplier(s: &str) -> Result<f64, String> {
        in_range(s, 1.0, 1_000.0)
    }

    /// A share, 0 to 1.
    pub fn share(s: &str) -> Result<f64, String> {
        in_range(s, 0.0, 1.0)
    }

    /// A measurement window in seconds, 1 to a week.
    pub fn window_s(s: &str) -> Result<f64, String> {
        in_range(s, 1.0, 604_800.0)
    }

    /// A request rate (requests/s), 0.001 to 1000000.
    pub fn rate(s: &str) -> Result<f64, String> {
        in_range(s, 0.001, 1e6)
    }

    /// A relative tolerance, 0.0001 to 1.
    pub fn tolerance(s: &str) -> Result<f64, String> {
        in_range(s, 1e-4, 1.0)
    }

    /// An energy in kWh, 0.000001 to 1e9.
    pub fn kwh(s: &str) -> Result<f64, String> {
        in_range(s, 1e-6, 1e9)
    }
}
