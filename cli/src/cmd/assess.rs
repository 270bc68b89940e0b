//! `dynamollm assess`: what dynamollm would have saved on a fleet, from its
//! history in Prometheus. The workload (per-minute requests, lengths from the
//! engines' histograms) is replayed in the twin under the fleet's own static
//! layout and under `dynamollm`; the fleet's measured energy stands beside
//! both, so the first replay says how far to trust the second.

use super::report::{run_input_of, write_report, Format};
use super::sim::{run_controlled_policy, ControlledRun};
use super::{write_json, PhysicsArgs};
use crate::assess::{layout, read_history, FleetHistory, HistoryQuery, Layout};
use crate::baseline;
use crate::profile::ProfileTable;
use crate::report::SimReport;
use ::sim::measure::{class_slos, SloRule};
use ::sim::workload::{Source, Workload};
use ::sim::{ClusterSpec, InstanceSpec, PoolSpec};
use anyhow::{bail, Context, Result};
use controller::policy::Policy;
use dashboards::config::AccountingConfig;
use dashboards::intensity::{parse_time, IntensitySeries};
use dashboards::report::{Report, RunInput};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use telemetry::{ClassBoundaries, RequestClass};

/// Options of `dynamollm assess`.
#[derive(Debug, Clone, clap::Args)]
pub struct AssessArgs {
    /// The Prometheus-compatible query API that scrapes the fleet's vLLM engines and DCGM
    /// exporters (Prometheus, Thanos, VictoriaMetrics), e.g. `http://prometheus:9090`.
    #[arg(long, value_name = "URL")]
    pub prometheus: String,
    /// Start of the window: RFC 3339 or Unix seconds.
    #[arg(long, value_name = "TIME")]
    pub from: String,
    /// End of the window: RFC 3339 or Unix seconds.
    #[arg(long, value_name = "TIME")]
    pub to: String,
    /// Label matchers every series read must carry, e.g. `job="vllm",cluster="eu1"`.
    #[arg(long, value_name = "MATCHERS", default_value = "")]
    pub selector: String,
    /// The profile the dynamollm replay plans with (default: the bundled Llama-2-70B / H100 profile).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Write the assessment as a report: HTML (self-contained, with charts), JSON or CSV by the extension.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Write the assessment as one JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// A file holding a bearer token for the query API.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// GPUs per engine, when the GPUs seen are not all the engines' (default: GPUs ÷ engines).
    #[arg(long, value_name = "N")]
    pub tp: Option<u32>,
    /// The engines' clock (default: the GPUs' mean SM clock over the window).
    #[arg(long, value_name = "MHZ")]
    pub clock_mhz: Option<u32>,
    /// How many times real time the engines ran: 1 for a real fleet; a rehearsal's
    /// `twin serve --speed` for a history recorded from twin engines (0.01 to 10000).
    #[arg(long, default_value_t = 1.0, value_parser = super::flag::speed)]
    pub speed: f64,
    /// SLO multiplier the replays judge attainment by (1 to 1000).
    #[arg(long, default_value_t = 5.0, value_parser = super::flag::slo_multiplier)]
    pub slo_multiplier: f64,
    /// Seed of the replays' arrivals and length pairing.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A TOML file whose `[carbon]`, `[cost]` and `[sci]` tables override the report's defaults.
    #[arg(long, value_name = "FILE")]
    pub accounting: Option<PathBuf>,
    /// Each query's time limit (s).
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// The largest answer read (MiB).
    #[arg(long, default_value_t = 512)]
    pub max_response_mb: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// Length pairs the replays draw from.
const LENGTH_PAIRS: usize = 20_000;

/// The assessment (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Assessment {
    /// Window start (Unix s).
    pub from_unix_s: f64,
    /// Window end (Unix s).
    pub to_unix_s: f64,
    /// How many times real time the engines ran.
    pub speed: f64,
    /// The window in the fleet's time (s).
    pub span_s: f64,
    /// Requests finished in the window.
    pub requests: f64,
    /// The fleet's layout, as replayed.
    pub layout: Layout,
    /// GPUs seen.
    pub gpus_seen: usize,
    /// Whose GPU series were read: `dcgm` or `twin`.
    pub gpu_source: String,
    /// Mean prompt length measured (the histogram's sum ÷ count) and drawn.
    pub prompt_tokens_mean: (Option<f64>, f64),
    /// Mean output length measured and drawn.
    pub output_tokens_mean: (Option<f64>, f64),
    /// Each class's share of the drawn length pairs.
    pub class_mix: BTreeMap<String, f64>,
    /// The fleet's GPU energy over the window, measured (kWh).
    pub measured_energy_kwh: f64,
    /// The twin's replay of the fleet's static layout.
    pub static_replay: SimReport,
    /// The twin's replay under dynamollm.
    pub dynamollm: SimReport,
    /// Static replay ÷ measured: how well the twin stands for this fleet (1: exactly).
    pub static_replay_ratio: f64,
    /// dynamollm's energy ÷ the measured energy.
    pub dynamollm_ratio: f64,
    /// dynamollm's energy ÷ the static replay's: the saving the twin predicts on its own terms.
    pub dynamollm_vs_static_replay: f64,
    /// How the workload and the layout were built.
    pub assumptions: Vec<String>,
    /// Series that could not be read, and the server's warnings.
    pub warnings: Vec<String>,
}

fn time_s(flag: &str, text: &str) -> Result<f64> {
    parse_time(text).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

/// The workload a history describes.
pub fn workload_of(h: &FleetHistory, seed: u64) -> Workload {
    let lengths = h.length_samples(LENGTH_PAIRS, seed);
    Workload {
        name: "Prometheus history".into(),
        slo_pairs: lengths.pairs().to_vec(),
        source: Source::Rates { curve: h.rate_curve(), lengths },
        scale: 1.0,
        hours: None,
        seed,
        span_s: Some(h.span_s()),
        predictor_accuracy: 1.0,
    }
}

/// The fleet's static layout as the twin's cluster: one pool serving every class.
pub fn static_spec(l: &Layout) -> ClusterSpec {
    ClusterSpec {
        pools: vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }],
        instances: (0..l.instances).map(|_| InstanceSpec { pool: 0, tp: l.tp, clock_mhz: l.clock_mhz }).collect(),
    }
}

/// Run `dynamollm assess`.
pub fn run(args: &AssessArgs) -> Result<Assessment> {
    let (from_s, to_s) = (time_s("from", &args.from)?, time_s("to", &args.to)?);
    if to_s <= from_s {
        bail!("--to must be after --from");
    }
    if (to_s - from_s) * args.speed > 31.0 * 86_400.0 {
        bail!("the window is over 31 days of the fleet's time: assess a shorter one");
    }
    let physics = args.physics.load()?;
    let profile = match &args.profile {
        Some(p) => ProfileTable::load(p)?,
        None => ProfileTable::bundled(),
    };
    let accounting = match &args.accounting {
        Some(p) => AccountingConfig::load(p)?,
        None => AccountingConfig::default(),
    };
    let token = match &args.token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p).with_context(|| format!("--token-file {}", p.display()))?;
            Some(telemetry::config::Secret::new(t.trim()))
        }
        None => None,
    };
    let api = telemetry::prom_history::PromHistory::new(
        &args.prometheus,
        token,
        Duration::from_secs(args.timeout_s.max(1)),
        args.max_response_mb.max(1),
    )
    .map_err(anyhow::Error::msg)?;
    let query = HistoryQuery { from_s, to_s, selector: args.selector.clone(), speed: args.speed };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let history = rt.block_on(read_history(&api, &query))?;
    let l = layout(&history, &physics, args.tp, args.clock_mhz)?;
    let workload = workload_of(&history, args.seed);
    let slo = class_slos(
        &physics,
        &workload.slo_pairs,
        &ClassBoundaries::default(),
        SloRule::Multiplier(args.slo_multiplier),
    );

    let bar = super::progress_bar(
        history.span_s() as u64,
        args.quiet,
        "{bar:40} {percent}% replayed [{elapsed} < {eta}] {msg}",
    );
    bar.set_message("the fleet's static layout");
    let started = Instant::now();
    let totals = baseline::run(&physics, &static_spec(&l), &workload, slo, &mut |t| bar.set_position(t as u64))?;
    bar.finish_and_clear();
    let static_replay =
        SimReport::new("static-replay", &workload.name, args.seed, &totals, started.elapsed().as_secs_f64());
    let run = ControlledRun {
        single_pool_instances: if l.tp == 8 { l.instances } else { 0 },
        ..ControlledRun::new(&profile)
    };
    let (dynamollm, _) =
        run_controlled_policy(&physics, Policy::DynamoLlm, &workload, args.slo_multiplier, run, args.quiet)?;

    let measured_kwh = history.energy_j / 3.6e6;
    let boundaries = ClassBoundaries::default();
    let mut mix: BTreeMap<String, f64> = BTreeMap::new();
    for &(p, o) in workload.slo_pairs.iter() {
        *mix.entry(boundaries.classify(p, o.max(1)).to_string()).or_default() += 1.0 / workload.slo_pairs.len() as f64;
    }
    let measured_mean = |h: &crate::assess::LengthHistogram| h.sum.map(|s| s / h.total().max(1.0));
    let assumptions = vec![
        format!(
            "Requests: {} finished in the window ({} with finished_reason other than abort; between an edge and \
             the nearest scrape, at the rate of the scrapes beside it), binned by the minute they finished in, \
             replayed as Poisson arrivals at each minute's count.",
            history.requests().round(),
            crate::assess::REQUESTS
        ),
        format!(
            "Lengths: {LENGTH_PAIRS} pairs drawn from {} and {}, the two drawn independently (the engines keep no \
             joint histogram); inside a bucket, lengths follow density ∝ x^a (prompts a = {:.2}, outputs a = {:.2}; \
             −1 is log-uniform), fitted so the drawn mean is the histogram's _sum ÷ count where the open top bucket \
             is empty, else the top bucket takes the mean the _sum leaves for it.",
            crate::assess::PROMPT_TOKENS,
            crate::assess::OUTPUT_TOKENS,
            history.prompt.shape,
            history.output.shape
        ),
        format!(
            "Layout: {} engines (series of {}), {} GPUs ({} series), so TP{}; clock {} MHz ({}), held all window.",
            l.instances,
            crate::assess::ENGINE_GAUGE,
            history.gpus,
            history.gpu_source,
            l.tp,
            l.clock_mhz,
            match (args.clock_mhz, history.clock_mhz) {
                (Some(_), _) => "--clock-mhz".to_string(),
                (None, Some(c)) => format!("the GPUs' mean SM clock {c:.0} MHz, to the nearest lockable clock"),
                (None, None) => "no clock series: the top clock".to_string(),
            }
        ),
        format!(
            "Measured energy: the rise of each GPU's energy counter over the window, its edges at the rate beside them; \
             SLOs: P99 TTFT and TBT within {}× of a class's median request alone on TP8 at the top clock; dynamollm \
             plans with {}.",
            args.slo_multiplier,
            args.profile.as_ref().map_or("the bundled profile".to_string(), |p| p.display().to_string())
        ),
    ];
    let a = Assessment {
        from_unix_s: from_s,
        to_unix_s: to_s,
        speed: args.speed,
        span_s: history.span_s(),
        requests: history.requests(),
        layout: l,
        gpus_seen: history.gpus,
        gpu_source: history.gpu_source.to_string(),
        prompt_tokens_mean: (measured_mean(&history.prompt), history.prompt.drawn_mean()),
        output_tokens_mean: (measured_mean(&history.output), history.output.drawn_mean()),
        class_mix: mix,
        measured_energy_kwh: measured_kwh,
        static_replay_ratio: static_replay.energy_kwh / measured_kwh,
        dynamollm_ratio: dynamollm.energy_kwh / measured_kwh,
        dynamollm_vs_static_replay: dynamollm.energy_kwh / static_replay.energy_kwh,
        static_replay,
        dynamollm,
        assumptions,
        warnings: history.warnings.clone(),
    };
    println!("{}", table(&a));
    if let Some(p) = &args.json {
        write_json(p, &a)?;
    }
    if let Some(p) = &args.report {
        let report = report_of(&a, &history, &accounting)?;
        write_report(&report, Format::of_path(p), p)?;
        println!("report: {}", p.display());
    }
    Ok(a)
}

/// The printed summary.
pub fn table(a: &Assessment) -> String {
    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    let worst = |r: &SimReport| {
        r.classes
            .iter()
            .map(|(k, c)| (k.clone(), c.latency.slo_attainment))
            .min_by(|x, y| x.1.total_cmp(&y.1))
            .map_or("-".into(), |(k, v)| format!("{k} {}", pct(v)))
    };
    let mut s = format!(
        "fleet: {} engines × TP{} at {} MHz ({} GPUs, {}), {:.0} requests over {:.1} min\n\n",
        a.layout.instances,
        a.layout.tp,
        a.layout.clock_mhz,
        a.gpus_seen,
        a.gpu_source,
        a.requests,
        a.span_s / 60.0
    );
    s += &format!("{:<16} {:>11} {:>12} {:>16}\n", "", "energy kWh", "vs measured", "worst class");
    s += &format!("{:<16} {:>11.3} {:>12} {:>16}\n", "measured", a.measured_energy_kwh, "1.000", "-");
    for r in [&a.static_replay, &a.dynamollm] {
        s += &format!(
            "{:<16} {:>11.3} {:>12.3} {:>16}\n",
            r.policy,
            r.energy_kwh,
            r.energy_kwh / a.measured_energy_kwh,
            worst(r)
        );
    }
    s += &format!(
        "\nThe twin replays the fleet's own layout at {:.3}× the measured energy; dynamollm would have spent {:.3}× \
         of the static replay.",
        a.static_replay_ratio, a.dynamollm_vs_static_replay
    );
    s
}

/// The report: the measured fleet, the static replay and dynamollm side by side, measured as the baseline.
fn report_of(a: &Assessment, h: &FleetHistory, cfg: &AccountingConfig) -> Result<Report> {
    let start = a.from_unix_s;
    let span_end = start + a.span_s;
    let intensity = IntensitySeries::from_config(cfg, start, span_end)?;
    let replay = run_input_of(&a.static_replay, start).context("the static replay kept no timeline")?;
    let dyn_run = run_input_of(&a.dynamollm, start).context("the dynamollm replay kept no timeline")?;
    // The measured run: the fleet's energy and GPUs per minute; its per-class tokens and
    // requests (for attributing energy to classes) are the static replay's, the same workload.
    let mut measured = RunInput {
        name: "measured".into(),
        timeline: replay.timeline.clone(),
        slo_attainment: None,
        class_attainment: BTreeMap::new(),
        worst_class_by_hour: Vec::new(),
        requests_rejected: 0,
        peak_gpus: a.gpus_seen as u32,
        peak_power_w: None,
    };
    for (m, iv) in measured.timeline.intervals.iter_mut().enumerate() {
        let energy_j = h.energy_j_per_minute.get(m).copied().unwrap_or(0.0);
        let gpus = h.gpus_per_minute.get(m).copied().unwrap_or(0.0);
        for (k, p) in iv.pools.iter_mut().enumerate() {
            // One pool, as the static layout; a second would only hold zeros.
            p.energy_j = if k == 0 { energy_j } else { 0.0 };
            p.gpu_seconds = if k == 0 { gpus * iv.duration_s } else { 0.0 };
            p.gpus = if k == 0 { gpus as u32 } else { 0 };
            p.clock_mhz = if k == 0 { h.clock_mhz.unwrap_or(0.0) } else { 0.0 };
        }
    }
    let mut notes = a.assumptions.clone();
    notes.push(format!(
        "Per minute, the measured energy is the energy counters' rise in that minute ({:.3} kWh in all); per-class \
         figures of the measured run split its energy by the static replay's tokens per class.",
        a.measured_energy_kwh
    ));
    let source = format!("Prometheus history from {} to {} (speed {})", a.from_unix_s, a.to_unix_s, a.speed);
    Ok(Report::build(
        "dynamollm assess: the fleet measured, replayed, and under dynamollm",
        &source,
        vec![measured, replay, dyn_run],
        Some("measured"),
        cfg,
        &intensity,
        &notes,
    ))
}
