//! `dynamollm demo`: the main job on embedded defaults — replay the bundled
//! Conversation hour through the twin with every available policy and print
//! the comparison. No server, no GPU, no files needed.

use super::sim::{describe_counts, run_policy};
use super::PhysicsArgs;
use crate::policy::Policy;
use crate::workload::Workload;
use anyhow::Result;

/// Options of `dynamollm demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Multiply the load of the Conversation hour.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// Run the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    let physics = args.physics.load()?;
    let workload = Workload::from_options(None, None, None, args.scale, None, args.seed)?;
    println!(
        "dynamollm demo: the bundled Azure Conversation hour ({}, CC-BY 4.0) through the digital twin \
         (DGX H100, Llama-2-70B), every policy sized by replay to hold each class's P99 SLOs (5× the class's \
         median request alone on TP8 at max clock).\n",
        workload.name
    );
    let mut rows = Vec::new();
    for policy in Policy::ALL {
        let (report, counts) = run_policy(&physics, policy, &workload, None, 5.0, args.quiet)?;
        print!("{}", report.table());
        println!("  instances: {}\n", describe_counts(policy, &counts));
        rows.push(report);
    }
    let base = rows[0].energy_kwh;
    println!(
        "{:<12} {:>11} {:>9} {:>10} {:>9} {:>10}",
        "policy", "energy kWh", "vs single", "GPU-hours", "avg GPUs", "SLOs held"
    );
    for r in &rows {
        println!(
            "{:<12} {:>11.2} {:>8.2}× {:>10.1} {:>9.1} {:>10}",
            r.policy,
            r.energy_kwh,
            r.energy_kwh / base,
            r.gpu_hours,
            r.avg_gpus,
            if r.all_classes_hold() { "every class" } else { "NO" }
        );
    }
    Ok(())
}
