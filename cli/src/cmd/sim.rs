//! `dynamollm sim`: replay a workload through the twin under a policy.

use super::{progress_bar, write_json, PhysicsArgs, WorkloadArgs};
use crate::baseline;
use crate::closed_loop::{count_minutes, run_controlled, ControlSummary};
use crate::profile::{ProfileTable, Severity};
use crate::report::SimReport;
use ::sim::measure::{class_slos, SloRule};
use ::sim::Physics;
use anyhow::{bail, Context, Result};
use controller::control::{ControllerConfig, Tuning};
use controller::policy::Policy;
use forecast::MinuteCounts;
use sim::workload::Workload;
use std::path::PathBuf;
use std::time::Instant;
use telemetry::ClassBoundaries;

/// Options of `dynamollm sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Policy: single-pool, multi-pool, scale-inst, scale-shard, scale-freq, dynamollm or oracle.
    #[arg(long, default_value = "single-pool")]
    pub policy: String,
    /// Run several policies on the same trace and seed and compare them: `all` or a comma list.
    #[arg(long, value_name = "LIST")]
    pub compare: Option<String>,
    /// The profile the controller plans with (default: the bundled Llama-2-70B / H100 profile).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Write every controller decision with its reason as JSON lines.
    #[arg(long, value_name = "FILE")]
    pub decisions: Option<PathBuf>,
    /// Spawn new instances cold (weights download, 7 min) instead of from warm standby.
    #[arg(long)]
    pub cold_spawn: bool,
    /// Keep every instance the controller finds or spawns at least this long (s) before it may
    /// retire it as surplus: damps spawn/retire churn at some energy cost (0: no minimum).
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    pub retire_min_age_s: f64,
    /// The lowest the clock loop's learnt margin on a pool's load may fall (0–1; default 0.85):
    /// below 1 a pool that keeps its SLOs with room to spare runs lower clocks than the profile's
    /// one instance allows, which saves energy and holds more GPU-hours. 1 favours GPU-hours.
    #[arg(long, value_name = "F")]
    pub clock_margin_floor: Option<f64>,
    /// A pool whose classes all hold at least this share of their requests within SLO (above
    /// the 0.99 target, at most 1; default 0.996) grows its learnt capacity and lowers its clock
    /// margin a step: lower runs nearer the 99% line, for less energy and less room to spare.
    #[arg(long, value_name = "A")]
    pub attainment_comfort: Option<f64>,
    /// A step down to a lower clock must also carry the pool's smoothed rate plus this many
    /// Poisson standard deviations of one 5 s count (≥ 0; default 1): a steady load's chance
    /// bursts no longer take a clock down and, a period later, back up. 0: the load seen now only.
    #[arg(long, value_name = "Z")]
    pub clock_down_sigmas: Option<f64>,
    /// The shard loop keeps a pool's fleet when a new TP mix needing new instances saves less
    /// than this share of its power (0 to below 1; default 0.04; 0: the spawn's cost alone
    /// decides). The oracle, whose changes are free, never holds back.
    #[arg(long, value_name = "H")]
    pub mix_hysteresis: Option<f64>,
    /// A site power budget (W) the controlled policies keep: what the fleet may draw in a second at
    /// its clocks and load (from the profile and the power measured, plus one standard deviation of
    /// its spread), idle and starting instances included, stays 2% under it. The static policies
    /// ignore it.
    #[arg(long, value_name = "W", value_parser = super::flag::power_w)]
    pub power_budget_w: Option<f64>,
    /// Hours of the run's day with a budget of their own: `FROM-TO=W` periods, comma separated
    /// (hour 0 is the run's start; `16-21=40000,21-6=70000`; a period may wrap past midnight).
    /// Other hours have --power-budget-w, or no budget.
    #[arg(long, value_name = "LIST")]
    pub power_budget_schedule: Option<String>,
    /// Under a power budget, the classes by rank, highest first (e.g. `SS,SM,MS`): the lowest-ranked
    /// pools' clocks go down first, then they give up instances. Classes left out follow, short prompts first.
    #[arg(long, value_name = "LIST")]
    pub class_priority: Option<String>,
    /// What the controlled policies' plans minimise: `energy` (the default), `cost` (GPU rental
    /// and energy at the time-of-use tariff), `carbon` (operational at the intensity series, and
    /// the embodied share of the GPUs held), or weights (`energy_kwh=1,gpu_hours=0.2`; keys
    /// energy_kwh, gpu_hours, carbon_kg, cost_usd). A comma list of the names (`energy,cost,carbon`)
    /// runs each controlled policy once per objective, side by side, named `POLICY (OBJECTIVE)`.
    /// The prices: the accounting's (`--accounting`, `--intensity`).
    #[arg(long, value_name = "OBJECTIVE", default_value = "energy")]
    pub objective: String,
    /// A carbon price ($ per tonne CO2e) the cost objective adds.
    #[arg(long, value_name = "USD")]
    pub carbon_usd_per_t: Option<f64>,
    /// The share of requests whose output class the router predicts right (the rest go to another
    /// output band's pool): a sensitivity study of output-length prediction.
    #[arg(long, default_value_t = 1.0, value_parser = super::flag::share)]
    pub predictor_accuracy: f64,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Instances per pool instead of sizing by replay: one number for every pool,
    /// or per class for multi-pool (e.g. `SS=2,LS=5`).
    #[arg(long, value_name = "N")]
    pub instances: Option<String>,
    /// SLO multiplier: P99 TTFT and TBT within this multiple of the class's median request alone on TP8 at max clock
    /// (1 to 1000).
    #[arg(long, default_value_t = 5.0, value_parser = super::flag::slo_multiplier)]
    pub slo_multiplier: f64,
    /// Write the run as one JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an energy, carbon and cost report of every policy run: HTML (self-contained,
    /// with charts), or JSON / CSV by the file's extension.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// The policy the report compares against (default: single-pool when it ran); must be one that ran.
    #[arg(long, value_name = "POLICY")]
    pub baseline: Option<String>,
    /// A TOML file whose `[carbon]`, `[cost]` and `[sci]` tables override the accounting's defaults
    /// (for `--report` and the JSON's `cost_usd` and `carbon_kg`).
    #[arg(long, value_name = "FILE")]
    pub accounting: Option<PathBuf>,
    /// A carbon intensity series (CSV `time,g_per_kwh`, or `builtin:caiso-like`) in place of the
    /// accounting's `[carbon]` source.
    #[arg(long, value_name = "FILE")]
    pub intensity: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// How the twin's router spreads a pool's requests over its instances, for every policy:
    /// `requests` (fewest outstanding) or `prompt-tokens` (fewest prompt tokens queued, then
    /// fewest requests). Default: the physics file's `[router] balance` (requests).
    #[arg(long, value_name = "BALANCE", value_parser = |s: &str| sim::Balance::parse(s))]
    pub balance: Option<sim::Balance>,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// The most instances `--instances` may give one pool.
pub const MAX_INSTANCES: u32 = service::config::MAX_INSTANCES;

/// Parse `--instances` for a policy.
pub fn parse_instances(policy: Policy, text: &str) -> Result<Vec<u32>> {
    let pools = policy.pool_count();
    if let Ok(n) = text.trim().parse::<u32>() {
        if n == 0 {
            bail!("--instances 0: a cluster with no instance serves nothing (every request would be turned away)");
        }
        if n > MAX_INSTANCES {
            bail!("--instances {n}: at most {MAX_INSTANCES} per pool");
        }
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
        if n > MAX_INSTANCES {
            bail!("--instances {part}: at most {MAX_INSTANCES} per pool");
        }
        counts[policy.pool_of(class)] = n;
    }
    if counts.iter().all(|&n| n == 0) {
        bail!("--instances {text}: a cluster with no instance serves nothing (every request would be turned away)");
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
        None => size_by_replay(physics, policy, workload, slo_multiplier, quiet)?,
    };
    let span = workload.span_s.unwrap_or(0.0).max(1.0);
    let bar = progress_bar(span as u64, quiet, "{bar:40} {percent}% of the trace replayed [{elapsed} < {eta}] {msg}");
    bar.set_message(policy.name());
    let start = Instant::now();
    let totals = baseline::run(physics, &baseline::spec(policy, physics, &counts), workload, slo, &mut |t| {
        bar.set_position(t as u64)
    })?;
    let wall_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((SimReport::new(policy.name(), &workload.name, workload.seed, &totals, wall_s), counts))
}

/// The smallest per-pool TP8 instance counts of a static policy whose replay
/// holds every class's P99 SLOs (see [`baseline::size`]), with a spinner.
pub fn size_by_replay(
    physics: &Physics,
    policy: Policy,
    workload: &Workload,
    slo_multiplier: f64,
    quiet: bool,
) -> Result<Vec<u32>> {
    let slo =
        class_slos(physics, &workload.slo_pairs, &ClassBoundaries::default(), SloRule::Multiplier(slo_multiplier));
    let bar = progress_bar(0, quiet, "{spinner} {msg} [{elapsed}]");
    let counts = baseline::size(policy, physics, workload, slo, &mut |c: &[u32]| {
        bar.set_message(format!("sizing {} by replay: trying {:?} instances", policy.name(), c));
        bar.tick();
    })?;
    bar.finish_and_clear();
    Ok(counts)
}

/// Describe a layout for the table.
pub fn describe_counts(policy: Policy, counts: &[u32]) -> String {
    match policy {
        Policy::MultiPool => telemetry::RequestClass::ALL
            .iter()
            .filter(|c| counts[c.index()] > 0)
            .map(|c| format!("{}={}", c.name(), counts[c.index()]))
            .collect::<Vec<_>>()
            .join(" "),
        _ => format!("{} × TP8 @ max clock", counts[0]),
    }
}

/// The controller's learning settings `sim`'s flags may change (each `None`: the config's default).
#[derive(Debug, Clone, Copy, Default)]
pub struct LearnerTuning {
    /// `ControllerConfig::clock_margin_floor`.
    pub clock_margin_floor: Option<f64>,
    /// `ControllerConfig::attainment_comfort`.
    pub attainment_comfort: Option<f64>,
    /// `ControllerConfig::clock_down_sigmas`.
    pub clock_down_sigmas: Option<f64>,
    /// `ControllerConfig::mix_hysteresis`.
    pub mix_hysteresis: Option<f64>,
}

impl LearnerTuning {
    /// Set in `cfg` what is given.
    pub fn apply(&self, cfg: &mut ControllerConfig) {
        if let Some(f) = self.clock_margin_floor {
            cfg.clock_margin_floor = f;
        }
        if let Some(a) = self.attainment_comfort {
            cfg.attainment_comfort = a;
        }
        if let Some(z) = self.clock_down_sigmas {
            cfg.clock_down_sigmas = z;
        }
        if let Some(h) = self.mix_hysteresis {
            cfg.mix_hysteresis = h;
        }
    }
}

/// How a controlled policy runs.
pub struct ControlledRun<'a> {
    /// The profile to plan with.
    pub profile: &'a ProfileTable,
    /// Single-pool's instance count (scale-freq keeps that layout, scale-shard its GPUs; 0: unknown).
    pub single_pool_instances: u32,
    /// Spawn warm.
    pub warm_spawn: bool,
    /// `ControllerConfig::retire_min_age_s` (s).
    pub retire_min_age_s: f64,
    /// The learning settings `sim`'s flags may change.
    pub tuning: LearnerTuning,
    /// A site power budget, and the class ranks it degrades by.
    pub power_budget: Option<PowerBudget>,
    /// What the plan minimises.
    pub objective: controller::control::Objective,
    /// Where decisions go.
    pub decisions: Option<&'a mut dyn std::io::Write>,
    /// The future, for the oracle.
    pub future: Option<&'a MinuteCounts>,
    /// Called with the controller and the time before each of its steps (tests read what it has
    /// learnt, or start it from a state of their own).
    pub on_step: Option<crate::closed_loop::OnStep<'a>>,
}

impl<'a> ControlledRun<'a> {
    /// `sim`'s defaults with `profile`: warm spawns, no minimum age to retire, the controller's
    /// own learning settings, the energy objective, no budget, no decisions written.
    pub fn new(profile: &'a ProfileTable) -> ControlledRun<'a> {
        ControlledRun {
            profile,
            single_pool_instances: 0,
            warm_spawn: true,
            retire_min_age_s: 0.0,
            tuning: LearnerTuning::default(),
            power_budget: None,
            objective: controller::control::Objective::energy(),
            decisions: None,
            future: None,
            on_step: None,
        }
    }
}

/// Run a controlled policy (scale-inst, scale-shard, scale-freq, dynamollm, oracle).
pub fn run_controlled_policy(
    physics: &Physics,
    policy: Policy,
    workload: &Workload,
    slo_multiplier: f64,
    run: ControlledRun<'_>,
    quiet: bool,
) -> Result<(SimReport, ControlSummary)> {
    let loops = policy.loops().ok_or_else(|| anyhow::anyhow!("{} is not a controlled policy", policy.name()))?;
    let slo =
        class_slos(physics, &workload.slo_pairs, &ClassBoundaries::default(), SloRule::Multiplier(slo_multiplier));
    let mut cfg = ControllerConfig::new(
        loops,
        run.profile.clocks(telemetry::RequestClass::ALL[8], 8).into_iter().max().unwrap_or(1980),
    );
    cfg.warm_spawn = run.warm_spawn;
    cfg.retire_min_age_s = run.retire_min_age_s;
    run.tuning.apply(&mut cfg);
    cfg.objective = run.objective;
    if let Some(b) = run.power_budget {
        cfg.power_budget_w = b.power_w;
        cfg.power_budget_periods = b.periods;
        cfg.class_priority = b.class_priority;
    }
    cfg.spawn_lead_s = if run.warm_spawn { physics.lifecycle.warm_start_s } else { physics.lifecycle.cold_start_s };
    if !loops.scale && !loops.shard {
        cfg.fixed_instances = Some(run.single_pool_instances);
    }
    if loops.scale && !loops.shard && run.single_pool_instances > 0 {
        cfg.gpu_budget = 8 * run.single_pool_instances;
    }
    if !loops.scale && loops.shard && run.single_pool_instances > 0 {
        // scale-shard: the static cluster's GPUs, reshaped (the paper's ScaleShard keeps them all).
        cfg.fixed_gpus = Some(8 * run.single_pool_instances);
    }
    let future = match (policy, run.future) {
        (Policy::Oracle, Some(f)) => Some(f),
        (Policy::Oracle, None) => bail!("the oracle needs the workload's future"),
        _ => None,
    };
    let span = workload.span_s.unwrap_or(0.0).max(1.0);
    let bar = progress_bar(span as u64, quiet, "{bar:40} {percent}% of the trace replayed [{elapsed} < {eta}] {msg}");
    bar.set_message(policy.name());
    let start = Instant::now();
    let (totals, summary) = run_controlled(
        physics,
        workload,
        slo,
        cfg,
        run.profile.clone(),
        future,
        run.decisions,
        run.on_step,
        &mut |t| bar.set_position(t as u64),
    )?;
    let wall_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((SimReport::new(policy.name(), &workload.name, workload.seed, &totals, wall_s), summary))
}

/// Parse `--compare`.
pub fn parse_compare(text: &str) -> Result<Vec<Policy>> {
    if text.trim() == "all" {
        return Ok(Policy::ALL.to_vec());
    }
    let mut v: Vec<Policy> =
        text.split(',').map(|p| Policy::parse(p.trim()).map_err(anyhow::Error::msg)).collect::<Result<_>>()?;
    if !v.contains(&Policy::SinglePool) {
        v.insert(0, Policy::SinglePool);
    }
    Ok(v)
}

/// Run `dynamollm sim`.
pub fn run(args: &SimArgs) -> Result<()> {
    let mut physics = args.physics.load()?;
    if let Some(b) = args.balance {
        physics.router.balance = b;
    }
    let mut workload = args.workload.load()?;
    if !(0.0..=1.0).contains(&args.predictor_accuracy) {
        bail!("--predictor-accuracy must be between 0 and 1, got {}", args.predictor_accuracy);
    }
    workload.predictor_accuracy = args.predictor_accuracy;
    for (flag, setting, v) in [
        ("--retire-min-age-s", Tuning::RetireMinAgeS, Some(args.retire_min_age_s)),
        ("--clock-margin-floor", Tuning::ClockMarginFloor, args.clock_margin_floor),
        ("--attainment-comfort", Tuning::AttainmentComfort, args.attainment_comfort),
        ("--clock-down-sigmas", Tuning::ClockDownSigmas, args.clock_down_sigmas),
        ("--mix-hysteresis", Tuning::MixHysteresis, args.mix_hysteresis),
    ] {
        if let Some(why) = v.and_then(|v| setting.out_of_range(v)) {
            bail!("{flag} {why}");
        }
    }
    let policies = match &args.compare {
        Some(list) => parse_compare(list)?,
        None => vec![Policy::parse(&args.policy).map_err(anyhow::Error::msg)?],
    };
    let baseline = match &args.baseline {
        Some(b) => {
            let b = Policy::parse(b).map_err(anyhow::Error::msg)?;
            if !policies.contains(&b) {
                bail!("--baseline {} did not run: add it to --compare", b.name());
            }
            Some(b.name().to_string())
        }
        // A policy is not compared against itself: one run alone has no baseline.
        None => (policies.len() > 1 && policies.contains(&Policy::SinglePool))
            .then(|| Policy::SinglePool.name().to_string()),
    };
    let mut accounting = match &args.accounting {
        Some(p) => dashboards::config::AccountingConfig::load(p)?,
        None => dashboards::config::AccountingConfig::default(),
    };
    if let Some(series) = &args.intensity {
        accounting.carbon.source = dashboards::config::IntensitySourceKind::Csv;
        accounting.carbon.csv = series.clone();
    }
    let objectives = objectives(&args.objective, args.carbon_usd_per_t, &accounting, workload.span_s.unwrap_or(0.0))?;
    let profile = match &args.profile {
        Some(p) => ProfileTable::load(p)?,
        None => ProfileTable::bundled(),
    };
    for issue in profile.issues_of(Severity::Error) {
        eprintln!("{issue}");
    }
    let mut decisions: Option<Box<dyn std::io::Write>> = match &args.decisions {
        Some(p) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ))),
        None => None,
    };
    let opts = RunOptions {
        instances: args.instances.clone(),
        slo_multiplier: args.slo_multiplier,
        warm_spawn: !args.cold_spawn,
        retire_min_age_s: args.retire_min_age_s,
        tuning: LearnerTuning {
            clock_margin_floor: args.clock_margin_floor,
            attainment_comfort: args.attainment_comfort,
            clock_down_sigmas: args.clock_down_sigmas,
            mix_hysteresis: args.mix_hysteresis,
        },
        objectives,
        power_budget: match (args.power_budget_w, &args.power_budget_schedule) {
            (None, None) => {
                if args.class_priority.is_some() {
                    bail!("--class-priority ranks classes under a power budget: add --power-budget-w or --power-budget-schedule");
                }
                None
            }
            (power_w, schedule) => Some(PowerBudget {
                power_w,
                periods: parse_budget_schedule(schedule.as_deref().unwrap_or(""))?,
                class_priority: parse_class_priority(args.class_priority.as_deref().unwrap_or(""))?,
            }),
        },
        quiet: args.quiet,
        tables: true,
    };
    let reports = run_policies(
        &physics,
        &workload,
        &policies,
        &profile,
        &opts,
        decisions.as_mut().map(|w| &mut **w as &mut dyn std::io::Write),
    )?;
    if let Some(w) = decisions.as_mut() {
        w.flush().context("writing decisions")?;
    }
    // Cost and carbon of each run: the report's own figures (one computation for both).
    let source = format!("dynamollm sim, trace {}, seed {}", workload.name, workload.seed);
    let report = super::report::sim_report(&reports, baseline.as_deref(), &accounting, &source)?;
    let mut reports = reports;
    for r in &mut reports {
        if let Some(f) = report.runs.iter().find(|f| f.policy == r.policy) {
            r.cost_usd = Some(f.cost_usd);
            r.carbon_kg = Some(f.carbon_kg);
        }
    }
    if args.compare.is_some() {
        print!("{}", compare_table(&reports));
        if let Some(path) = &args.json {
            write_json(path, &serde_json::json!({ "runs": reports }))?;
        }
    } else if let Some(path) = &args.json {
        write_json(path, &reports[0])?;
    }
    if let Some(path) = &args.report {
        super::report::write_report(&report, super::report::Format::of_path(path), path)?;
        println!("\nreport: {}", path.display());
        if baseline.is_none() {
            println!(
                "  (one policy ran: the report compares it with nothing; add --compare to set policies side by side)"
            );
        }
        for r in &report.runs {
            let vs = |x: Option<f64>| {
                x.map_or(String::new(), |x| format!(" ({x:.3}× {})", baseline.as_deref().unwrap_or("")))
            };
            println!(
                "{:<12} carbon {:.1} kg{}  cost ${:.2}{}",
                r.policy,
                r.carbon_kg,
                vs(r.vs_baseline.map(|b| b.carbon_ratio)),
                r.cost_usd,
                vs(r.vs_baseline.map(|b| b.cost_ratio))
            );
        }
    }
    Ok(())
}

/// Options shared by every policy of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--instances` for the static baselines.
    pub instances: Option<String>,
    /// SLO multiplier.
    pub slo_multiplier: f64,
    /// Spawn from warm standby.
    pub warm_spawn: bool,
    /// `ControllerConfig::retire_min_age_s` (s).
    pub retire_min_age_s: f64,
    /// The learning settings `sim`'s flags may change.
    pub tuning: LearnerTuning,
    /// What the controlled policies' plans minimise: each runs once per objective (named
    /// `POLICY (OBJECTIVE)` when there are several, else `POLICY`).
    pub objectives: Vec<controller::control::Objective>,
    /// A site power budget the controlled policies keep (`ControllerConfig::power_budget_w`), with
    /// the class ranks it degrades by.
    pub power_budget: Option<PowerBudget>,
    /// No progress bars.
    pub quiet: bool,
    /// Print each policy's table as it ends (the robustness suite prints its own).
    pub tables: bool,
}

/// A site power budget for the controlled policies.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerBudget {
    /// The budget (W) outside the periods (`None`: none there).
    pub power_w: Option<f64>,
    /// Hours of the run's day with a budget of their own.
    pub periods: Vec<controller::control::BudgetPeriod>,
    /// Each class's rank (0 first; see `ControllerConfig::class_priority`).
    pub class_priority: [u8; telemetry::CLASS_COUNT],
}

/// The objectives of `--objective` (one, or a comma list of preset names) with the
/// accounting's prices over a run of `span_s` from its `sim_start`.
pub fn objectives(
    text: &str,
    carbon_usd_per_t: Option<f64>,
    accounting: &dashboards::config::AccountingConfig,
    span_s: f64,
) -> Result<Vec<controller::control::Objective>> {
    let words: Vec<&str> = if text.contains('=') {
        vec![text]
    } else {
        text.split(',').map(str::trim).filter(|w| !w.is_empty()).collect()
    };
    let specs = words
        .iter()
        .map(|w| service::objective::ObjectiveSpec::parse(w, carbon_usd_per_t))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| anyhow::anyhow!("--objective: {e}"))?;
    if specs.is_empty() {
        bail!("--objective: name one: energy, cost, carbon, or weights such as energy_kwh=1,gpu_hours=0.2");
    }
    let start = accounting.sim_start_unix_s();
    let intensity = if specs.iter().any(|s| s.weights.carbon_kg > 0.0) {
        dashboards::intensity::IntensitySeries::from_config(accounting, start, start + span_s.max(3600.0))?
    } else {
        dashboards::intensity::IntensitySeries::constant(0.0)
    };
    Ok(specs.iter().map(|s| s.build(accounting, &intensity, start)).collect())
}

/// Parse `--power-budget-schedule`: `FROM-TO=W` periods, comma separated, checked as the
/// service's `[[budget.schedule]]` is.
pub fn parse_budget_schedule(text: &str) -> Result<Vec<controller::control::BudgetPeriod>> {
    let mut raw = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("--power-budget-schedule: `{part}` is not FROM-TO=W (e.g. 16-21=40000)");
        let (hours, w) = part.split_once('=').ok_or_else(bad)?;
        let (from, to) = hours.split_once('-').ok_or_else(bad)?;
        raw.push(service::config::BudgetPeriodSection {
            from_h: from.trim().parse().map_err(|_| bad())?,
            to_h: to.trim().parse().map_err(|_| bad())?,
            power_w: w.trim().parse().map_err(|_| bad())?,
        });
    }
    service::config::budget_periods(&raw, "--power-budget-schedule").map_err(anyhow::Error::msg)
}

/// Parse `--class-priority`: class names, highest rank first; classes left out follow in their
/// default order (short prompts first). The service's `budget.priority` reads the same way.
pub fn parse_class_priority(text: &str) -> Result<[u8; telemetry::CLASS_COUNT]> {
    let names: Vec<String> = text.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect();
    service::config::class_priority(&names).map_err(|e| anyhow::anyhow!("--class-priority: {e}"))
}

impl RunOptions {
    /// Static baselines sized by replay, warm spawns, no minimum instance age.
    pub fn sized_by_replay(slo_multiplier: f64, quiet: bool) -> RunOptions {
        RunOptions {
            instances: None,
            slo_multiplier,
            warm_spawn: true,
            retire_min_age_s: 0.0,
            tuning: LearnerTuning::default(),
            objectives: vec![controller::control::Objective::energy()],
            power_budget: None,
            quiet,
            tables: true,
        }
    }
}

/// Run policies on one workload and seed, printing each one's table; returns
/// their reports in the order given (with `oracle_gap` when the oracle ran).
pub fn run_policies(
    physics: &Physics,
    workload: &Workload,
    policies: &[Policy],
    profile: &ProfileTable,
    opts: &RunOptions,
    mut decisions: Option<&mut dyn std::io::Write>,
) -> Result<Vec<SimReport>> {
    let needs_future = policies.contains(&Policy::Oracle);
    let future = if needs_future { Some(count_minutes(workload)?) } else { None };
    let mut single_counts: Option<Vec<u32>> = None;
    let mut reports: Vec<SimReport> = Vec::new();
    let mut controlled_last: Option<SimReport> = None;
    let static_first: Vec<Policy> = {
        // Static baselines run first: scale-freq reuses single-pool's layout, scale-shard and
        // scale-inst its cluster.
        let mut v: Vec<Policy> = policies.iter().copied().filter(|p| p.loops().is_none()).collect();
        let reuses_single =
            [Policy::ScaleFreq, Policy::ScaleShard, Policy::ScaleInst].iter().any(|p| policies.contains(p));
        if !v.contains(&Policy::SinglePool) && reuses_single && opts.instances.is_none() {
            v.push(Policy::SinglePool);
        }
        v.extend(policies.iter().copied().filter(|p| p.loops().is_some()));
        v
    };
    for policy in static_first {
        let report = match policy.loops() {
            None => {
                let instances = opts.instances.as_deref().map(|t| parse_instances(policy, t)).transpose()?;
                let sized = instances.is_none();
                let (report, counts) =
                    run_policy(physics, policy, workload, instances, opts.slo_multiplier, opts.quiet)?;
                if policies.contains(&policy) && opts.tables {
                    print!("{}", report.table());
                    println!(
                        "  instances: {} ({})",
                        describe_counts(policy, &counts),
                        if sized {
                            "the smallest count holding every class's P99 SLOs, found by replay"
                        } else {
                            "--instances"
                        }
                    );
                    if policy == Policy::MultiPool && opts.instances.as_deref().is_some_and(|t| !t.contains('=')) {
                        println!(
                            "  (one --instances number gives every pool that many: leave it out to size \
                             multi-pool by replay, or give per-class counts to `--policy multi-pool`, \
                             e.g. SS=2,LS=5)"
                        );
                    }
                }
                if policy == Policy::SinglePool {
                    single_counts = Some(counts);
                }
                report
            }
            Some(_) => {
                for (k, objective) in opts.objectives.iter().enumerate() {
                    let single = match (&single_counts, &opts.instances) {
                        (Some(c), _) => c[0],
                        (None, Some(t)) => parse_instances(Policy::SinglePool, t)?[0],
                        (None, None) => 0,
                    };
                    let (report, summary) = run_controlled_policy(
                        physics,
                        policy,
                        workload,
                        opts.slo_multiplier,
                        ControlledRun {
                            profile,
                            single_pool_instances: single,
                            warm_spawn: opts.warm_spawn,
                            retire_min_age_s: opts.retire_min_age_s,
                            tuning: opts.tuning,
                            power_budget: opts.power_budget.clone(),
                            objective: objective.clone(),
                            decisions: decisions.as_mut().map(|w| &mut **w as &mut dyn std::io::Write),
                            future: future.as_ref(),
                            on_step: None,
                        },
                        opts.quiet,
                    )?;
                    let mut report = report;
                    if opts.objectives.len() > 1 {
                        report.policy = format!("{} ({})", report.policy, objective.name);
                    }
                    if opts.tables {
                        print!("{}", report.table());
                        let mut acts: Vec<_> = summary.actions.iter().collect();
                        acts.sort();
                        println!(
                            "  controller: {} steps, actions {}",
                            summary.steps,
                            acts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
                        );
                    }
                    if k + 1 < opts.objectives.len() {
                        reports.push(report);
                    } else {
                        controlled_last = Some(report);
                    }
                }
                controlled_last.take().expect("at least one objective")
            }
        };
        if policies.contains(&policy) {
            reports.push(report);
        }
    }
    if let Some(oracle) = reports.iter().find(|r| r.policy == Policy::Oracle.name()).map(|r| r.energy_kwh) {
        for r in &mut reports {
            r.oracle_gap = Some(r.energy_kwh / oracle - 1.0);
        }
    }
    Ok(reports)
}

/// The comparison table: one line per policy against single-pool.
pub fn compare_table(reports: &[SimReport]) -> String {
    use std::fmt::Write as _;
    let base = reports.iter().find(|r| r.policy == Policy::SinglePool.name()).map(|r| r.energy_kwh);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{:<16} {:>11} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>11} {:>10} {:>9} {:>11}",
        "policy",
        "energy kWh",
        "vs single",
        "GPU-hours",
        "avg GPUs",
        "peak kW",
        "TTFT p99",
        "TBT p99",
        "worst class",
        "worst hour",
        "hours<99%",
        "oracle gap"
    );
    for r in reports {
        let worst = r.classes.values().map(|c| c.latency.slo_attainment).fold(1.0, f64::min);
        let _ = writeln!(
            s,
            "{:<16} {:>11.2} {:>8.3}× {:>10.1} {:>9.1} {:>9.1} {:>9.3}s {:>7.1}ms {:>10.2}% {:>10} {:>9} {:>11}{}",
            r.policy,
            r.energy_kwh,
            base.map_or(f64::NAN, |b| r.energy_kwh / b),
            r.gpu_hours,
            r.avg_gpus,
            r.peak_power_w / 1e3,
            r.latency.ttft_p99_s,
            r.latency.tbt_p99_s * 1e3,
            worst * 100.0,
            r.latency.worst_hour_attainment.map_or("-".to_string(), |w| format!("{:.2}%", w * 100.0)),
            r.latency.hours_below_p99,
            r.oracle_gap.map_or("-".to_string(), |g| format!("{:+.1}%", g * 100.0)),
            if r.all_classes_hold() { "" } else { "  MISSES a class's P99 SLO" }
        );
    }
    s
}
