//! `dynamollm predictor`: how well the output-class predictor does on Azure traces.

use super::write_json;
use anyhow::{Context, Result};
use controller::predict::online_accuracy;
use std::path::PathBuf;
use telemetry::trace::AzureTrace;

/// Options of `dynamollm predictor`.
#[derive(Debug, Clone, clap::Args)]
pub struct PredictorArgs {
    /// Azure traces to predict on, in order (predict each request, then learn from it).
    #[arg(long = "trace", value_name = "FILE", required = true)]
    pub traces: Vec<PathBuf>,
    /// Write the figures as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Run `dynamollm predictor`.
pub fn run(args: &PredictorArgs) -> Result<()> {
    let mut out = serde_json::Map::new();
    println!("{:<40} {:>10} {:>10} {:>22}", "trace", "requests", "accuracy", "most-common baseline");
    for path in &args.traces {
        let trace = AzureTrace::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut pairs = Vec::new();
        for r in trace {
            let r = r?;
            pairs.push((r.input_tokens, r.output_tokens));
        }
        let a = online_accuracy(pairs);
        println!(
            "{:<40} {:>10} {:>9.1}% {:>21.1}%",
            path.display(),
            a.requests,
            100.0 * a.accuracy,
            100.0 * a.baseline_accuracy
        );
        out.insert(path.display().to_string(), serde_json::to_value(&a)?);
    }
    if let Some(p) = &args.json {
        write_json(p, &serde_json::Value::Object(out))?;
    }
    Ok(())
}
