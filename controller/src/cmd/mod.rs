//! The commands of the `dynamollm` binary, one module each.

pub mod agent;
pub mod demo;
pub mod forecast;
pub mod predictor;
pub mod profile;
pub mod report;
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
