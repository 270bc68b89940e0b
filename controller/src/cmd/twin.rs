//! `dynamollm twin …`: the digital twin's own commands (`anchors`: calibration).

use super::{write_json, PhysicsArgs};
use crate::workload::conversation_lengths;
use anyhow::Result;
use std::path::PathBuf;

/// `dynamollm twin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TwinCommand {
    /// Measure the calibration anchors A1–A6 of TWIN-PHYSICS.md in the twin.
    Anchors(AnchorsArgs),
}

/// Options of `dynamollm twin anchors`.
#[derive(Debug, Clone, clap::Args)]
pub struct AnchorsArgs {
    /// Write `{"anchors":[…]}` to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// Run a twin subcommand. Returns whether everything passed.
pub fn run(cmd: &TwinCommand) -> Result<bool> {
    match cmd {
        TwinCommand::Anchors(a) => anchors(a),
    }
}

fn anchors(args: &AnchorsArgs) -> Result<bool> {
    let physics = args.physics.load()?;
    let anchors = ::sim::anchors::measure_all(&physics, &conversation_lengths());
    println!("{:<5} {:<4} {:<86} {:>22}  expected", "id", "", "anchor", "measured");
    for a in &anchors {
        let measured = match &a.measured {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        println!(
            "{:<5} {:<4} {:<86} {:>22}  {}",
            a.id,
            if a.pass { "pass" } else { "FAIL" },
            a.name,
            measured,
            a.expected
        );
    }
    let passed = anchors.iter().filter(|a| a.pass).count();
    println!("{passed} of {} anchors pass", anchors.len());
    if let Some(path) = &args.json {
        write_json(path, &serde_json::json!({ "anchors": anchors }))?;
    }
    Ok(passed == anchors.len())
}
