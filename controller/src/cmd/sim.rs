//! `dynamollm sim`: replay a workload through the twin under a policy.

use super::{progress_bar, write_json, PhysicsArgs};
use crate::policy::{self, Policy};
use crate::report::SimReport;
use crate::workload::Workload;
use ::sim::measure::{class_slos, SloRule};
use ::sim::Physics;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Instant;
use telemetry::ClassBoundaries;

/// Options of `dynamollm sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Policy: single-pool or multi-pool.
    #[arg(long, default_value = "single-pool")]
    pub policy: String,
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
    /// Multiply the load.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Replay only the first H hours.
    #[arg(long, value_name = "H")]
    pub hours: Option<f64>,
    /// Seed: the same seed gives the same numbers.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Instances per pool instead of sizing by replay: one number for every pool,
    /// or per class for multi-pool (e.g. `SS=2,LS=5`).
    #[arg(long, value_name = "N")]
    pub instances: Option<String>,
    /// SLO multiplier: P99 TTFT and TBT within this multiple of the class's median request alone on TP8 at max clock.
    #[arg(long, default_value_t = 5.0)]
    pub slo_multiplier: f64,
    /// Write the run as one JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// Parse `--instances` for a policy.
pub fn parse_instances(policy: Policy, text: &str) -> Result<Vec<u32>> {
    let pools = policy.pool_count();
    if let Ok(n) = text.trim().parse::<u32>() {
        return Ok(vec![n; pools]);
    }
    if policy == Policy::SinglePool {
        bail!("--instances for single-pool is one number, got `{text}`");
    }
    let mut counts = vec![0; pools];
    for part in text.split(',') {
        let (k, v) =
            part.split_once('=').ok_or_else(|| anyhow::anyhow!("--instances: `{part}` is not CLASS=N (e.g. SS=2)"))?;
        let class = telemetry::RequestClass::parse(k).map_err(|e| anyhow::anyhow!("--instances: {e}"))?;
        let n: u32 = v.trim().parse().map_err(|_| anyhow::anyhow!("--instances: `{v}` is not a whole number"))?;
        counts[policy.pool_of(class)] = n;
    }
    Ok(counts)
}

/// Size (unless given) and run one policy on a workload.
pub fn run_policy(
    physics: &Physics,
    policy: Policy,
    workload: &Workload,
    instances: Option<Vec<u32>>,
    slo_multiplier: f64,
    quiet: bool,
) -> Result<(SimReport, Vec<u32>)> {
    let slo =
        class_slos(physics, &workload.slo_pairs, &ClassBoundaries::default(), SloRule::Multiplier(slo_multiplier));
    let counts = match instances {
        Some(c) => c,
        None => {
            let bar = progress_bar(0, quiet, "{spinner} {msg} [{elapsed}]");
            let counts = policy::size(policy, physics, workload, slo, &mut |c: &[u32]| {
                bar.set_message(format!("sizing {} by replay: trying {:?} instances", policy.name(), c));
                bar.tick();
            })?;
            bar.finish_and_clear();
            counts
        }
    };
    let span = workload.span_s.unwrap_or(0.0).max(1.0);
    let bar = progress_bar(span as u64, quiet, "{bar:40} {percent}% of the trace replayed [{elapsed} < {eta}] {msg}");
    bar.set_message(policy.name());
    let start = Instant::now();
    let totals =
        policy::run(physics, &policy.spec(physics, &counts), workload, slo, &mut |t| bar.set_position(t as u64))?;
    let wall_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((SimReport::new(policy.name(), &workload.name, workload.seed, &totals, wall_s), counts))
}

/// Describe a layout for the table.
pub fn describe_counts(policy: Policy, counts: &[u32]) -> String {
    match policy {
        Policy::SinglePool => format!("{} × TP8 @ max clock", counts[0]),
        Policy::MultiPool => telemetry::RequestClass::ALL
            .iter()
            .filter(|c| counts[c.index()] > 0)
            .map(|c| format!("{}={}", c.name(), counts[c.index()]))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Run `dynamollm sim`.
pub fn run(args: &SimArgs) -> Result<()> {
    let policy = Policy::parse(&args.policy)?;
    let physics = args.physics.load()?;
    let workload = Workload::from_options(
        args.trace.as_deref(),
        args.rates.as_deref(),
        args.lengths.as_deref(),
        args.scale,
        args.hours,
        args.seed,
    )?;
    let instances = args.instances.as_deref().map(|t| parse_instances(policy, t)).transpose()?;
    let sized = instances.is_none();
    let (report, counts) = run_policy(&physics, policy, &workload, instances, args.slo_multiplier, args.quiet)?;
    print!("{}", report.table());
    println!(
        "  instances: {} ({})",
        describe_counts(policy, &counts),
        if sized { "the smallest count holding every class's P99 SLOs, found by replay" } else { "--instances" }
    );
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}
