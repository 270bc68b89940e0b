//! `dynamollm demo`: the main job on embedded defaults — replay the bundled
//! Conversation hour through the twin with every available policy and print
//! the comparison. No server, no GPU, no files needed.

use super::sim::{compare_table, run_policies, RunOptions};
use super::PhysicsArgs;
use crate::policy::Policy;
use crate::profile::ProfileTable;
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
         (DGX H100, Llama-2-70B), the static baselines sized by replay to hold each class's P99 SLOs (5× the class's \
         median request alone on TP8 at max clock), the controlled policies planning from the bundled profile.\n",
        workload.name
    );
    let opts = RunOptions { instances: None, slo_multiplier: 5.0, warm_spawn: true, quiet: args.quiet };
    let rows = run_policies(&physics, &workload, &Policy::ALL, &ProfileTable::bundled(), &opts, None)?;
    print!("{}", compare_table(&rows));
    let holds: Vec<&str> = rows.iter().filter(|r| !r.all_classes_hold()).map(|r| r.policy.as_str()).collect();
    if !holds.is_empty() {
        println!("  (policies missing a class's P99 SLO: {})", holds.join(", "));
    }
    Ok(())
}
