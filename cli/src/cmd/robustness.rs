//! `dynamollm robustness`: the same controller settings on traffic they were
//! not tuned on, in one table. Scenarios: the Coding week with Coding
//! lengths; the Coding week's curve with Conversation lengths at ×1 and
//! ×1.6; the bundled Conversation hour at ×2, ×8 and ×16; each at several
//! seeds, `dynamollm` against `single-pool` (sized by replay, as `sim`
//! does), optionally the oracle too. Each row says whether the run holds:
//! every class at its P99 SLO over the run, its worst class-hour at 95% or
//! more, and fewer class-hours below 99% than `single-pool` (on a run long
//! enough to have hours).

use crate::cmd::sim::{run_policies, RunOptions};
use crate::report::SimReport;
use anyhow::{bail, Context, Result};
use controller::policy::Policy;
use controller::profile::ProfileTable;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Options of `dynamollm robustness`.
#[derive(Debug, Clone, clap::Args)]
pub struct RobustnessArgs {
    /// Seeds, comma-separated.
    #[arg(long, default_value = "1,2,3")]
    pub seeds: String,
    /// Scenarios to run, comma-separated (default: all): coding-week, coding-curve-conv-x1,
    /// coding-curve-conv-x1.6, conv-hour-x2, conv-hour-x8, conv-hour-x16.
    #[arg(long)]
    pub only: Option<String>,
    /// Replay only the first H hours of each scenario (a quick look; the week's figures need the week).
    #[arg(long, value_name = "H", value_parser = crate::cmd::flag::hours)]
    pub hours: Option<f64>,
    /// Also run the oracle (it knows every minute's load ahead).
    #[arg(long)]
    pub oracle: bool,
    /// Where the bundled week-long rate curve and the length traces are.
    #[arg(long, value_name = "DIR", default_value = "data")]
    pub data: PathBuf,
    /// Write the rows as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One scenario: a workload and a load multiplier.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    /// Rate curve and lengths files under the data folder; `None`: the bundled Conversation hour.
    rates_lengths: Option<(&'static str, &'static str)>,
    scale: f64,
}

const WEEK: &str = "azure-llm-2024-week-coding-rate.csv";
const SCENARIOS: [Scenario; 6] = [
    Scenario { name: "coding-week", rates_lengths: Some((WEEK, "azure-llm-2023-code.csv")), scale: 1.0 },
    Scenario { name: "coding-curve-conv-x1", rates_lengths: Some((WEEK, "azure-llm-2023-conv.csv")), scale: 1.0 },
    Scenario { name: "coding-curve-conv-x1.6", rates_lengths: Some((WEEK, "azure-llm-2023-conv.csv")), scale: 1.6 },
    Scenario { name: "conv-hour-x2", rates_lengths: None, scale: 2.0 },
    Scenario { name: "conv-hour-x8", rates_lengths: None, scale: 8.0 },
    Scenario { name: "conv-hour-x16", rates_lengths: None, scale: 16.0 },
];

/// The least attainment a class-hour may fall to in a run that holds.
pub const WORST_HOUR_FLOOR: f64 = 0.95;

/// One policy's figures in one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyFigures {
    /// Energy (kWh).
    pub energy_kwh: f64,
    /// Energy over `single-pool`'s.
    pub energy_ratio: f64,
    /// The class with the lowest SLO attainment over the run, and that attainment.
    pub worst_class: (String, f64),
    /// The lowest attainment of any class in any clock hour with enough requests (none: no such hour).
    pub worst_class_hour: Option<f64>,
    /// Class-hours below 99%.
    pub class_hours_below_99: u32,
}

/// One row: a scenario at a seed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// The scenario.
    pub scenario: String,
    /// Load multiplier.
    pub scale: f64,
    /// Seed.
    pub seed: u64,
    /// `single-pool`.
    pub single_pool: PolicyFigures,
    /// `dynamollm`.
    pub dynamollm: PolicyFigures,
    /// The oracle, when it ran.
    pub oracle: Option<PolicyFigures>,
    /// Whether dynamollm holds: every class ≥ 99%, the worst class-hour ≥ 95%, and no more
    /// class-hours below 99% than single-pool.
    pub holds: bool,
}

fn figures(r: &SimReport, base_kwh: f64) -> PolicyFigures {
    let worst = r
        .classes
        .iter()
        .map(|(name, c)| (name.clone(), c.latency.slo_attainment))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_else(|| ("-".into(), 1.0));
    PolicyFigures {
        energy_kwh: r.energy_kwh,
        energy_ratio: r.energy_kwh / base_kwh,
        worst_class: worst,
        worst_class_hour: r.latency.worst_hour_attainment,
        class_hours_below_99: r.latency.hours_below_p99,
    }
}

/// Whether a policy's run holds against single-pool's (see [`Row::holds`]).
pub fn holds(p: &PolicyFigures, single: &PolicyFigures) -> bool {
    p.worst_class.1 >= telemetry::P99_ATTAINMENT
        && p.worst_class_hour.is_none_or(|w| w >= WORST_HOUR_FLOOR)
        && p.class_hours_below_99 <= single.class_hours_below_99
}

fn parse_seeds(text: &str) -> Result<Vec<u64>> {
    let seeds: Vec<u64> = text
        .split(',')
        .map(|s| s.trim().parse::<u64>().with_context(|| format!("--seeds: {s:?} is not a seed")))
        .collect::<Result<_>>()?;
    if seeds.is_empty() {
        bail!("--seeds: give at least one");
    }
    Ok(seeds)
}

fn scenarios(only: Option<&str>) -> Result<Vec<Scenario>> {
    let Some(list) = only else { return Ok(SCENARIOS.to_vec()) };
    list.split(',')
        .map(|n| {
            let n = n.trim();
            SCENARIOS.iter().copied().find(|s| s.name == n).with_context(|| {
                let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                format!("--only: no scenario {n:?} (there are: {})", names.join(", "))
            })
        })
        .collect()
}

fn workload(s: &Scenario, data: &Path, hours: Option<f64>, seed: u64) -> Result<::sim::Workload> {
    match s.rates_lengths {
        Some((rates, lengths)) => {
            let (r, l) = (data.join(rates), data.join(lengths));
            for f in [&r, &l] {
                if !f.is_file() {
                    bail!("{}: not found (run from the repository's root, or give --data DIR)", f.display());
                }
            }
            ::sim::Workload::from_options(None, Some(&r), Some(&l), s.scale, hours, seed)
        }
        None => ::sim::Workload::from_options(None, None, None, s.scale, hours, seed),
    }
}

fn pct(a: f64) -> String {
    format!("{:.2}%", a * 100.0)
}

/// The table of rows.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:>4} {:>9} {:>17} {:>12} {:>12} {:>14} {:>6}",
        "scenario", "seed", "energy×", "worst class", "worst hour", "(single)", "hours<99% d/s", "holds"
    );
    for r in rows {
        let d = &r.dynamollm;
        let hour = |p: &PolicyFigures| p.worst_class_hour.map_or("-".to_string(), pct);
        let _ = writeln!(
            s,
            "{:<24} {:>4} {:>8.3}× {:>17} {:>12} {:>12} {:>14} {:>6}",
            r.scenario,
            r.seed,
            d.energy_ratio,
            format!("{} {}", d.worst_class.0, pct(d.worst_class.1)),
            hour(d),
            hour(&r.single_pool),
            format!("{}/{}", d.class_hours_below_99, r.single_pool.class_hours_below_99),
            if r.holds { "yes" } else { "NO" }
        );
        if let Some(o) = &r.oracle {
            let _ = writeln!(
                s,
                "{:<24} {:>4} {:>8.3}× {:>17} {:>12} {:>12} {:>14} {:>6}",
                "  oracle",
                "",
                o.energy_ratio,
                format!("{} {}", o.worst_class.0, pct(o.worst_class.1)),
                hour(o),
                "",
                format!("{}/{}", o.class_hours_below_99, r.single_pool.class_hours_below_99),
                if holds(o, &r.single_pool) { "yes" } else { "NO" }
            );
        }
    }
    let held = rows.iter().filter(|r| r.holds).count();
    let _ = writeln!(s, "dynamollm holds in {held} of {} runs", rows.len());
    s
}

/// Run the suite, print the table; returns the rows.
pub fn run(args: &RobustnessArgs) -> Result<Vec<Row>> {
    let seeds = parse_seeds(&args.seeds)?;
    let chosen = scenarios(args.only.as_deref())?;
    let physics = ::sim::Physics::default_h100_llama70b();
    let profile = ProfileTable::bundled();
    let mut policies = vec![Policy::SinglePool, Policy::DynamoLlm];
    if args.oracle {
        policies.push(Policy::Oracle);
    }
    let mut opts = RunOptions::sized_by_replay(5.0, true);
    opts.tables = false;
    let bar = crate::cmd::progress_bar(
        (chosen.len() * seeds.len()) as u64,
        args.quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} runs {msg}",
    );
    let mut rows = Vec::new();
    for s in &chosen {
        for &seed in &seeds {
            bar.set_message(format!("{} seed {seed}", s.name));
            let w = workload(s, &args.data, args.hours, seed)?;
            let reports = run_policies(&physics, &w, &policies, &profile, &opts, None)?;
            let find = |p: Policy| reports.iter().find(|r| r.policy == p.name());
            let (Some(single), Some(dyn_)) = (find(Policy::SinglePool), find(Policy::DynamoLlm)) else {
                bail!("{} seed {seed}: a policy did not run", s.name);
            };
            let base = single.energy_kwh;
            let single_f = figures(single, base);
            let dyn_f = figures(dyn_, base);
            let oracle = find(Policy::Oracle).map(|o| figures(o, base));
            let ok = holds(&dyn_f, &single_f);
            rows.push(Row {
                scenario: s.name.to_string(),
                scale: s.scale,
                seed,
                single_pool: single_f,
                dynamollm: dyn_f,
                oracle,
                holds: ok,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    print!("{}", table(&rows));
    if let Some(p) = &args.json {
        crate::cmd::write_json(p, &rows)?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(worst: f64, hour: Option<f64>, below: u32) -> PolicyFigures {
        PolicyFigures {
            energy_kwh: 1.0,
            energy_ratio: 0.5,
            worst_class: ("SS".into(), worst),
            worst_class_hour: hour,
            class_hours_below_99: below,
        }
    }

    #[test]
    fn a_run_holds_only_with_every_class_the_hours_and_no_more_bad_hours_than_the_baseline() {
        let single = f(0.991, Some(0.96), 10);
        assert!(holds(&f(0.995, Some(0.97), 8), &single));
        assert!(!holds(&f(0.989, Some(0.97), 8), &single), "a class misses its P99 over the run");
        assert!(!holds(&f(0.995, Some(0.94), 8), &single), "an hour below 95%");
        assert!(!holds(&f(0.995, Some(0.97), 11), &single), "more bad hours than single-pool");
        assert!(holds(&f(0.995, None, 0), &f(1.0, None, 0)), "a run too short for hours");
        assert_eq!(parse_seeds("1, 2,3").unwrap(), vec![1, 2, 3]);
        assert!(parse_seeds("1,x").is_err());
        assert!(scenarios(Some("conv-hour-x8,nope")).unwrap_err().to_string().contains("coding-week"));
    }
}
