//! `dynamollm report`: energy, carbon and cost of a period from the telemetry
//! store, as HTML, JSON or CSV; and the `--report` of `dynamollm sim`.
//!
//! From the store: per minute, each GPU's energy is the rise of its energy
//! counter (`gpu.energy_j`; without one, its mean `gpu.power_w` × the time it
//! reported), a GPU counts as held for the share of the minute it reported in
//! (its samples over a full minute's), its pool is its
//! `pool` tag (`all` without one), and the classes' tokens come from the
//! `arrivals` samples (split among pools by their energy share).
//! The `single-pool` baseline is estimated, not measured: the peak GPUs seen,
//! rounded up to whole TP8 instances, at the profile's highest clock, each
//! minute carrying an equal share of the observed per-class load, with the
//! profile's power at that load (`ProfileTable::estimate`).

use crate::report::SimReport;
use anyhow::{bail, Context, Result};
use controller::profile::ProfileTable;
use dashboards::accounting::{Interval, PoolInterval, RunTimeline};
use dashboards::config::AccountingConfig;
use dashboards::intensity::{parse_time, IntensitySeries};
use dashboards::report::{Report, RunInput};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use telemetry::sample::{measurement, SeriesKey};
use telemetry::store::{Resolution, Store};
use telemetry::{RequestClass, CLASS_COUNT};

/// Options of `dynamollm report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Start of the period: RFC 3339 or Unix seconds.
    #[arg(long, value_name = "T")]
    pub from: String,
    /// End of the period: RFC 3339 or Unix seconds.
    #[arg(long, value_name = "T")]
    pub to: String,
    /// Compare with an estimated baseline (only `single-pool`).
    #[arg(long, value_name = "POLICY")]
    pub baseline: Option<String>,
    /// html, json or csv.
    #[arg(long, default_value = "html")]
    pub format: String,
    /// Where to write the report.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Config file: its `[telemetry.store]` names the store; its `[carbon]`, `[cost]`, `[sci]` the accounting.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The store's directory (instead of the config's).
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// The profile the baseline is estimated with (default: the bundled one).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Self-contained HTML.
    Html,
    /// JSON figures.
    Json,
    /// CSV figures.
    Csv,
}

impl Format {
    /// Parse `html`, `json` or `csv`.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "html" => Ok(Format::Html),
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            o => bail!("--format must be html, json or csv, got `{o}`"),
        }
    }

    /// By a file's extension (`.json`, `.csv`; anything else HTML).
    pub fn of_path(p: &Path) -> Format {
        match p.extension().and_then(|e| e.to_str()) {
            Some("json") => Format::Json,
            Some("csv") => Format::Csv,
            _ => Format::Html,
        }
    }
}

/// Write a report in a format, naming the file on failure.
pub fn write_report(report: &Report, format: Format, path: &Path) -> Result<()> {
    let text = match format {
        Format::Html => report.to_html(),
        Format::Json => report.to_json(),
        Format::Csv => report.to_csv(),
    };
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A sim run's timeline as the accounting's input.
pub fn run_input_of(r: &SimReport, start_unix_s: f64) -> Option<RunInput> {
    let tl = r.timeline.as_ref()?;
    let intervals = tl
        .points
        .iter()
        .map(|p| Interval {
            start_s: p.start_s,
            duration_s: p.duration_s,
            pools: p
                .pools
                .iter()
                .map(|q| PoolInterval {
                    energy_j: q.energy_j,
                    gpu_seconds: q.gpu_seconds,
                    gpus: q.gpus,
                    clock_mhz: q.clock_mhz,
                    tokens_by_class: q.tokens_by_class,
                })
                .collect(),
            requests_by_class: std::array::from_fn(|c| p.requests_by_class[c] as f64),
        })
        .collect();
    Some(RunInput {
        name: r.policy.clone(),
        timeline: RunTimeline { start_unix_s, pool_names: tl.pool_names.clone(), intervals },
        slo_attainment: Some(r.latency.slo_attainment),
        class_attainment: r.classes.iter().map(|(k, c)| (k.clone(), c.latency.slo_attainment)).collect(),
        worst_class_by_hour: r.worst_class_by_hour.clone(),
        requests_rejected: r.requests_rejected,
        peak_gpus: r.peak_gpus,
        peak_power_w: Some(r.peak_power_w),
    })
}

/// The report of sim runs (`dynamollm sim --report`).
pub fn sim_report(
    reports: &[SimReport],
    baseline: Option<&str>,
    cfg: &AccountingConfig,
    source: &str,
) -> Result<Report> {
    let start = cfg.sim_start_unix_s();
    let span: f64 = reports.iter().map(|r| r.duration_s).fold(0.0, f64::max);
    let intensity = IntensitySeries::from_config(cfg, start, start + span)?;
    let runs: Vec<RunInput> = reports.iter().filter_map(|r| run_input_of(r, start)).collect();
    let notes = vec![format!(
        "Simulated in the digital twin; its time zero is placed at {} for the intensity and tariff.",
        cfg.carbon.sim_start
    )];
    Ok(Report::build("dynamollm: energy, carbon and cost", source, runs, baseline, cfg, &intensity, &notes))
}

const MINUTE_MS: i64 = 60_000;

/// The store's per-minute timeline over `[from_ms, to_ms)`, and the peak GPUs seen.
pub fn store_timeline(store: &Store, from_ms: i64, to_ms: i64) -> Result<(RunTimeline, u32)> {
    let from = from_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let n = ((to_ms - from).max(0) + MINUTE_MS - 1) / MINUTE_MS;
    let n = n as usize;
    let mut pools: BTreeMap<String, usize> = BTreeMap::new();
    // Per pool, per minute: energy, GPUs reporting, clock sum.
    let mut energy: Vec<Vec<f64>> = Vec::new();
    let mut gpus: Vec<Vec<u32>> = Vec::new();
    let mut held: Vec<Vec<f64>> = Vec::new();
    let mut clock: Vec<Vec<(f64, f64)>> = Vec::new();
    let keys = store.series();
    let power_keys: Vec<&SeriesKey> =
        keys.iter().filter(|k| k.measurement == measurement::GPU && k.field == "power_w").collect();
    let mut power_aggs = Vec::with_capacity(power_keys.len());
    for key in &power_keys {
        power_aggs.push(store.range_agg(key, Resolution::Minute, from, to_ms)?);
    }
    // A GPU is held for the share of a minute it reported in: its samples over a full
    // minute's (the most any GPU had in a minute), so partial minutes count partly.
    let full = power_aggs.iter().flatten().map(|a| a.count).max().unwrap_or(1).max(1) as f64;
    for (key, aggs) in power_keys.into_iter().zip(power_aggs) {
        let pool = key.tag("pool").unwrap_or("all").to_string();
        let next = pools.len();
        let p = *pools.entry(pool).or_insert(next);
        if p == energy.len() {
            energy.push(vec![0.0; n]);
            gpus.push(vec![0; n]);
            held.push(vec![0.0; n]);
            clock.push(vec![(0.0, 0.0); n]);
        }
        // Energy from the GPU's own counter where it has one (its rise minute over minute,
        // exact across minutes), else its mean power × the minute.
        let ek = SeriesKey { field: "energy_j".into(), ..key.clone() };
        let counter = store.range_agg(&ek, Resolution::Minute, from, to_ms)?;
        let mut prev: Option<f64> = None;
        let mut rise = BTreeMap::new();
        for a in &counter {
            let d = match prev {
                Some(p) if a.max >= p => a.max - p,
                // The first minute, or the counter restarted (a new instance on the GPU).
                _ => a.max - a.min,
            };
            prev = Some(a.max);
            rise.insert(a.ts_ms, d);
        }
        for a in aggs {
            let m = ((a.ts_ms - from) / MINUTE_MS) as usize;
            if m < n {
                let held_s = 60.0 * (a.count as f64 / full).min(1.0);
                energy[p][m] += rise.get(&a.ts_ms).copied().unwrap_or(a.mean() * held_s);
                held[p][m] += held_s;
                gpus[p][m] += 1;
            }
        }
        let ck = SeriesKey { field: "sm_clock_mhz".into(), ..key.clone() };
        for a in store.range_agg(&ck, Resolution::Minute, from, to_ms)? {
            let m = ((a.ts_ms - from) / MINUTE_MS) as usize;
            if m < n {
                clock[p][m].0 += a.mean();
                clock[p][m].1 += 1.0;
            }
        }
    }
    if pools.is_empty() {
        bail!("store {}: no `gpu` power_w samples at all", store.path().display());
    }
    let classes = store.class_minute_series(from, to_ms)?;
    let mut names = vec![String::new(); pools.len()];
    for (k, &v) in &pools {
        names[v] = k.clone();
    }
    let mut peak = 0;
    let mut any = false;
    let intervals = (0..n)
        .map(|m| {
            let total_e: f64 = energy.iter().map(|e| e[m]).sum();
            let g: u32 = gpus.iter().map(|g| g[m]).sum();
            peak = peak.max(g);
            any |= g > 0;
            Interval {
                start_s: (m as i64 * MINUTE_MS) as f64 / 1000.0,
                duration_s: 60.0,
                pools: (0..names.len())
                    .map(|p| {
                        let share = if total_e > 0.0 { energy[p][m] / total_e } else { 0.0 };
                        PoolInterval {
                            energy_j: energy[p][m],
                            gpu_seconds: held[p][m],
                            gpus: gpus[p][m],
                            clock_mhz: if clock[p][m].1 > 0.0 { clock[p][m].0 / clock[p][m].1 } else { 0.0 },
                            tokens_by_class: std::array::from_fn(|c| {
                                classes.tokens[c].get(m).copied().unwrap_or(0.0) * share
                            }),
                        }
                    })
                    .collect(),
                requests_by_class: std::array::from_fn(|c| classes.requests[c].get(m).copied().unwrap_or(0.0)),
            }
        })
        .collect();
    if !any {
        bail!("store {}: no GPU samples between the given times", store.path().display());
    }
    Ok((RunTimeline { start_unix_s: from as f64 / 1000.0, pool_names: names, intervals }, peak))
}

/// The estimated `single-pool` baseline of an observed timeline (see the module docs).
pub fn estimate_single_pool(observed: &RunTimeline, peak_gpus: u32, profile: &ProfileTable) -> Result<RunTimeline> {
    let instances = peak_gpus.div_ceil(8).max(1);
    let mut intervals = Vec::with_capacity(observed.intervals.len());
    for iv in &observed.intervals {
        let total: f64 = iv.requests_by_class.iter().sum();
        let mut power_w = 0.0;
        let mut clock = 0u32;
        for c in RequestClass::ALL {
            let max_clock = profile.clocks(c, 8).into_iter().max();
            let Some(max_clock) = max_clock else { continue };
            clock = clock.max(max_clock);
            let share = if total > 0.0 { iv.requests_by_class[c.index()] / total } else { 1.0 / CLASS_COUNT as f64 };
            let rps = total / iv.duration_s.max(1e-9) / f64::from(instances);
            let e = profile.estimate(c, 8, max_clock, rps)?;
            power_w += share * e.power_w;
        }
        let tokens: [f64; CLASS_COUNT] =
            std::array::from_fn(|c| iv.pools.iter().map(|p| p.tokens_by_class[c]).sum::<f64>());
        intervals.push(Interval {
            start_s: iv.start_s,
            duration_s: iv.duration_s,
            pools: vec![PoolInterval {
                energy_j: power_w * f64::from(instances) * iv.duration_s,
                gpu_seconds: f64::from(instances * 8) * iv.duration_s,
                gpus: instances * 8,
                clock_mhz: f64::from(clock),
                tokens_by_class: tokens,
            }],
            requests_by_class: iv.requests_by_class,
        });
    }
    Ok(RunTimeline { start_unix_s: observed.start_unix_s, pool_names: vec!["all".into()], intervals })
}

fn time_ms(flag: &str, text: &str) -> Result<i64> {
    parse_time(text).map(|s| (s * 1000.0).round() as i64).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

/// Run `dynamollm report`.
pub fn run(args: &ReportArgs) -> Result<()> {
    let format = Format::parse(&args.format)?;
    let (from_ms, to_ms) = (time_ms("from", &args.from)?, time_ms("to", &args.to)?);
    if to_ms <= from_ms {
        bail!("--to must be after --from");
    }
    if let Some(b) = args.baseline.as_deref() {
        if b != "single-pool" {
            bail!("--baseline: only `single-pool` can be estimated from the store, got `{b}`");
        }
    }
    let (cfg, store_dir) = match &args.config {
        Some(p) => {
            let t = telemetry::config::TelemetryConfig::load(p)?;
            (AccountingConfig::load(p)?, t.store.data_dir)
        }
        None => (AccountingConfig::default(), telemetry::config::TelemetryConfig::default().store.data_dir),
    };
    let store_dir = args.store.clone().unwrap_or(store_dir);
    if !store_dir.join(telemetry::store::FILE_NAME).exists() {
        bail!("no telemetry store in {}", store_dir.display());
    }
    let store = Store::open(&store_dir, telemetry::config::StoreConfig::default().retention())?;
    let (observed, peak) = store_timeline(&store, from_ms, to_ms)?;
    let intensity = IntensitySeries::from_config(&cfg, from_ms as f64 / 1000.0, to_ms as f64 / 1000.0)?;
    let mut runs = vec![RunInput {
        name: "observed".into(),
        timeline: observed.clone(),
        slo_attainment: None,
        class_attainment: BTreeMap::new(),
        worst_class_by_hour: Vec::new(),
        requests_rejected: 0,
        peak_gpus: peak,
        peak_power_w: None,
    }];
    let mut notes = vec![
        "From the telemetry store: per minute, a GPU's energy is the rise of its energy counter (its mean power × \
         the time it reported without one) and a GPU counts as held for the share of the minute it reported in; per-class energy is split by the tokens of the \
         arrival samples."
            .to_string(),
        "SLO attainment is not in the store's samples; see the engine latency series.".to_string(),
    ];
    if args.baseline.is_some() {
        let profile = match &args.profile {
            Some(p) => ProfileTable::load(p)?,
            None => ProfileTable::bundled(),
        };
        let base = estimate_single_pool(&observed, peak, &profile)?;
        notes.push(format!(
            "single-pool is estimated: {} TP8 instances (the peak {} GPUs rounded up) at the profile's highest clock, \
             each minute's observed load shared equally, power from the profile at that load.",
            peak.div_ceil(8).max(1),
            peak
        ));
        runs.push(RunInput {
            name: "single-pool".into(),
            timeline: base,
            slo_attainment: None,
            class_attainment: BTreeMap::new(),
            worst_class_by_hour: Vec::new(),
            requests_rejected: 0,
            peak_gpus: peak.div_ceil(8).max(1) * 8,
            peak_power_w: None,
        });
    }
    let source = format!("telemetry store {} from {} to {}", store_dir.display(), args.from, args.to);
    let report = Report::build(
        "dynamollm: energy, carbon and cost",
        &source,
        runs,
        args.baseline.as_deref(),
        &cfg,
        &intensity,
        &notes,
    );
    write_report(&report, format, &args.out)?;
    println!("report written to {}", args.out.display());
    Ok(())
}
