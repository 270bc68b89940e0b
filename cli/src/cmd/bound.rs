//! `dynamollm bound`: a hindsight reference for a workload. Every window
//! (30 min by default) each class (or, with `--pool-by band`, each prompt
//! band's classes together, or with `--pool-by one` every class) gets its
//! least-energy static pool (one TP degree, one clock, the fewest instances
//! holding the attainment asked for) at the window's mean rate, found by
//! replay in the twin and reconfigured for free. What the controller could
//! reach with perfect knowledge of each window's load and none of the costs of
//! changing; not a proven lower bound (mixed pools, other groupings or clocks
//! changed within a window could do better, and a window's bursts are averaged
//! away). `--against` sets the policies of a `sim --report` of the same
//! workload beside it, pool by pool.

use super::{progress_bar, write_json, PhysicsArgs, WorkloadArgs};
use crate::profile::ClassLengths;
use anyhow::{bail, Context, Result};
use forecast::MinuteCounts;
use serde::Serialize;
use sim::bound::{best_static, SearchSpec, StaticPool};
use sim::measure::{class_slos, SloRule};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use telemetry::{ClassBoundaries, LengthSamples, RequestClass, CLASS_COUNT};

/// `dynamollm bound` options.
#[derive(Debug, clap::Args)]
pub struct BoundArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Share of each class's requests (and of its token gaps) that must meet its SLOs in every window.
    #[arg(long, default_value_t = 0.995)]
    pub attainment: f64,
    /// Window length (minutes): each window gets its own pools, sized for its mean rate.
    #[arg(long, value_name = "MIN", default_value_t = 30)]
    pub window_min: u32,
    /// Leave out clocks below this: low clocks save energy with many more instances (GPU-hours).
    #[arg(long, value_name = "MHZ")]
    pub min_clock_mhz: Option<u32>,
    /// TP degrees searched.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub tp: Vec<u32>,
    /// Rates searched per class: a geometric grid from the quietest to the busiest window with
    /// this ratio between neighbours; energy per request is interpolated between them.
    #[arg(long, default_value_t = 1.5)]
    pub grid_ratio: f64,
    /// Which classes share a pool: each class its own (`class`), the classes of one prompt band
    /// (`band`: `S*`, `M*`, `L*`, as `dynamollm`'s pools merge), or all of them (`one`). A shared
    /// pool is searched with its classes' lengths mixed as in the whole workload.
    #[arg(long, value_enum, default_value_t = PoolBy::Class)]
    pub pool_by: PoolBy,
    /// Most GPUs one pool may hold (1 to 1000000).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_gpus: u32,
    /// SLO multiplier: P99 TTFT and TBT within this multiple of the class's median request alone on TP8 at max clock
    /// (1 to 1000).
    #[arg(long, default_value_t = 5.0, value_parser = super::flag::slo_multiplier)]
    pub slo_multiplier: f64,
    /// Energy (kWh) of a run to compare with, e.g. `single-pool`'s from `dynamollm sim`.
    #[arg(long, value_name = "KWH", value_parser = super::flag::kwh)]
    pub baseline_kwh: Option<f64>,
    /// A `dynamollm sim --report` of the same workload (`.json` or `.csv`): every policy in it is
    /// set beside the reference pool by pool (its classes' energy summed).
    #[arg(long, value_name = "REPORT")]
    pub against: Option<PathBuf>,
    /// Write the estimate as one JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Chart each pool's least energy per request against its load (SVG), every searched point
    /// labelled with its clock.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

/// Which classes share a pool in `dynamollm bound`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolBy {
    /// Each class its own pool.
    Class,
    /// The classes of one prompt band (`S*`, `M*`, `L*`) share a pool.
    Band,
    /// One pool for every class.
    One,
}

impl PoolBy {
    /// The pools: each one's name and the classes it serves (every class, traffic or not).
    pub fn groups(self) -> Vec<(String, Vec<usize>)> {
        match self {
            PoolBy::Class => (0..CLASS_COUNT).map(|c| (RequestClass::from_index(c).name(), vec![c])).collect(),
            PoolBy::Band => (0..CLASS_COUNT / 3)
                .map(|b| {
                    let band = RequestClass::from_index(3 * b).name().chars().next().expect("a two-letter name");
                    (format!("{band}*"), (3 * b..3 * b + 3).collect())
                })
                .collect(),
            PoolBy::One => vec![("**".to_string(), (0..CLASS_COUNT).collect())],
        }
    }
}

/// The lengths a pool serving `classes` (at least one) is searched with: one class's own
/// samples, or for several, about `MIX_SAMPLES` pairs drawn from each class in proportion to
/// `requests` (its requests in the workload; at least one pair for each with any), in the order
/// of its samples. A pool without requests gets its first class's samples (it is not searched).
pub fn pool_lengths(lengths: &ClassLengths, classes: &[usize], requests: &[u64; CLASS_COUNT]) -> LengthSamples {
    let with: Vec<usize> = classes.iter().copied().filter(|&c| requests[c] > 0).collect();
    match with[..] {
        [] => return lengths.of(RequestClass::from_index(classes[0])).clone(),
        [c] => return lengths.of(RequestClass::from_index(c)).clone(),
        _ => {}
    }
    let total: u64 = with.iter().map(|&c| requests[c]).sum();
    let mut pairs = Vec::new();
    for &c in &with {
        let own = lengths.of(RequestClass::from_index(c)).pairs();
        let k = ((MIX_SAMPLES as f64 * requests[c] as f64 / total.max(1) as f64).round() as usize).max(1);
        pairs.extend(own.iter().cycle().take(k).copied());
    }
    let names: Vec<String> = with.iter().map(|&c| RequestClass::from_index(c).name()).collect();
    LengthSamples::from_pairs(format!("mix of {}", names.join(", ")), pairs)
}

/// About this many length pairs stand for a pool's class mix.
pub const MIX_SAMPLES: usize = 20_000;

/// One searched rate of a class.
#[derive(Debug, Clone, Serialize)]
pub struct BoundPoint {
    /// Steady load searched (requests/s).
    pub rate_rps: f64,
    /// Its least-energy pool; absent when none within `--max-gpus` holds the attainment.
    pub pool: Option<StaticPool>,
}

/// One pool's estimate (a class's, with `--pool-by class`).
#[derive(Debug, Clone, Serialize)]
pub struct ClassBound {
    /// The classes with requests that the pool serves.
    pub serves: Vec<String>,
    /// Requests of those classes in the workload.
    pub requests: u64,
    /// Energy over every window (absent when some window's rate cannot be held).
    pub energy_kwh: Option<f64>,
    /// Energy per request.
    pub energy_per_req_j: Option<f64>,
    /// GPUs held × time: each window holds the pool of the nearest searched rate at or above its own.
    pub gpu_hours: Option<f64>,
    /// The busiest window's mean rate (requests/s).
    pub peak_rate_rps: f64,
    /// The searched rates and their pools, ascending.
    pub points: Vec<BoundPoint>,
}

/// The whole estimate (the `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct Bound {
    /// Workload name.
    pub trace: String,
    /// Seed of the workload and of the searches.
    pub seed: u64,
    /// The attainment each window holds.
    pub attainment: f64,
    /// Window length (minutes).
    pub window_min: u32,
    /// Lowest clock searched (MHz).
    pub min_clock_mhz: u32,
    /// TP degrees searched.
    pub tp: Vec<u32>,
    /// Which classes share a pool (`class`, `band` or `one`).
    pub pool_by: PoolBy,
    /// Requests in the workload.
    pub requests: u64,
    /// Energy of every pool (absent when a pool cannot be held).
    pub energy_kwh: Option<f64>,
    /// GPU-hours of every pool.
    pub gpu_hours: Option<f64>,
    /// Most GPUs held at once (window by window, summed over pools).
    pub peak_gpus: Option<u32>,
    /// `energy_kwh` over `--baseline-kwh`.
    pub ratio_to_baseline: Option<f64>,
    /// Per pool, by its name: a class (`SS` … `LL`), a prompt band (`S*`, `M*`, `L*`) or `**`
    /// for one pool of every class; only pools with requests.
    pub classes: BTreeMap<String, ClassBound>,
    /// The policies of `--against`'s report, beside the reference (absent without it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub against: Vec<PolicyAgainst>,
}

/// A policy's energy beside the reference's, from a `sim --report`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyAgainst {
    /// The policy.
    pub policy: String,
    /// Its energy over every class.
    pub energy_kwh: f64,
    /// That over the reference's (absent when the reference cannot hold some pool).
    pub ratio_to_bound: Option<f64>,
    /// Per pool of the reference: the energy of the pool's classes under the policy.
    pub pools: BTreeMap<String, f64>,
}

/// One policy of a `sim --report`: its name, and per class its requests and energy (kWh).
pub type ReportRun = (String, BTreeMap<String, (u64, f64)>);

/// Every policy of a `sim --report` (JSON or CSV, by the file's extension).
pub fn read_report(path: &Path) -> Result<Vec<ReportRun>> {
    #[derive(serde::Deserialize)]
    struct Class {
        requests: f64,
        energy_kwh: f64,
    }
    #[derive(serde::Deserialize)]
    struct Run {
        policy: String,
        classes: BTreeMap<String, Class>,
    }
    #[derive(serde::Deserialize)]
    struct Report {
        runs: Vec<Run>,
    }
    #[derive(serde::Deserialize)]
    struct Row {
        policy: String,
        class: String,
        requests: f64,
        energy_kwh: f64,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out: Vec<ReportRun> = Vec::new();
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("json") => {
            let r: Report = serde_json::from_str(&text).with_context(|| {
                format!("{}: not a `dynamollm sim --report` JSON (runs[].policy, runs[].classes)", path.display())
            })?;
            for run in r.runs {
                let classes = run.classes.into_iter().map(|(k, c)| (k, (c.requests as u64, c.energy_kwh))).collect();
                out.push((run.policy, classes));
            }
        }
        Some("csv") => {
            let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
            for (i, row) in reader.deserialize::<Row>().enumerate() {
                // Line i + 2: the header is line 1.
                let row =
                    row.with_context(|| format!("{} line {}: not a `sim --report` CSV row", path.display(), i + 2))?;
                if row.class == "all" {
                    continue;
                }
                match out.iter_mut().find(|(p, _)| *p == row.policy) {
                    Some((_, classes)) => {
                        classes.insert(row.class, (row.requests as u64, row.energy_kwh));
                    }
                    None => {
                        out.push((row.policy, BTreeMap::from([(row.class, (row.requests as u64, row.energy_kwh))])))
                    }
                }
            }
        }
        _ => bail!("{}: --against takes a `sim --report` written as .json or .csv", path.display()),
    }
    if out.is_empty() {
        bail!("{}: the report holds no run", path.display());
    }
    for (policy, classes) in &out {
        if let Some(bad) = classes.keys().find(|k| RequestClass::parse(k).is_err()) {
            bail!("{}: policy {policy}: `{bad}` is not a request class", path.display());
        }
    }
    Ok(out)
}

/// Each policy of a report beside the reference's pools. The report must be of the same workload:
/// each class's requests within 0.1% of the reference's (`requests_by_class`).
fn set_against(
    path: &Path,
    report: Vec<ReportRun>,
    groups: &[(String, Vec<usize>)],
    requests_by_class: &[u64; CLASS_COUNT],
    bound_kwh: Option<f64>,
) -> Result<Vec<PolicyAgainst>> {
    let mut out = Vec::new();
    for (policy, classes) in report {
        for (c, &want) in requests_by_class.iter().enumerate() {
            let name = RequestClass::from_index(c).name();
            let got = classes.get(&name).map_or(0, |x| x.0);
            if got.abs_diff(want) as f64 > 1e-3 * want.max(1) as f64 {
                bail!(
                    "{}: policy {policy} has {got} {name} requests, the workload here {want}: not the same workload \
                     (give bound the trace, rates, --scale, --hours and --seed the sim ran with)",
                    path.display()
                );
            }
        }
        let energy_of = |cs: &[usize]| -> f64 {
            cs.iter().filter_map(|&c| classes.get(&RequestClass::from_index(c).name())).map(|x| x.1).sum()
        };
        let pools: BTreeMap<String, f64> = groups
            .iter()
            .filter(|(_, cs)| cs.iter().any(|&c| requests_by_class[c] > 0))
            .map(|(name, cs)| (name.clone(), energy_of(cs)))
            .collect();
        let energy_kwh: f64 = classes.values().map(|x| x.1).sum();
        out.push(PolicyAgainst {
            policy,
            energy_kwh,
            ratio_to_bound: bound_kwh.filter(|b| *b > 0.0).map(|b| energy_kwh / b),
            pools,
        });
    }
    Ok(out)
}

/// Each window's length (s; the last one may be shorter) and requests per class.
fn window_counts(minutes: &MinuteCounts, window_min: usize) -> Vec<(f64, [u64; CLASS_COUNT])> {
    minutes
        .0
        .chunks(window_min)
        .map(|w| (w.len() as f64 * 60.0, std::array::from_fn(|c| w.iter().map(|m| u64::from(m[c])).sum())))
        .collect()
}

/// Rates from `lo` to `hi` (both included), each `ratio` times the one before.
pub fn rate_grid(lo: f64, hi: f64, ratio: f64) -> Vec<f64> {
    let mut v = vec![lo];
    let mut r = lo;
    while r * ratio < hi * (1.0 - 1e-9) {
        r *= ratio;
        v.push(r);
    }
    if hi > lo * (1.0 + 1e-9) {
        v.push(hi);
    }
    v
}

/// Energy per request at `rate`, interpolated between searched points (ascending rates, all held).
fn energy_per_req_at(points: &[(f64, StaticPool)], rate: f64) -> f64 {
    let i = points.partition_point(|(r, _)| *r < rate);
    if i == 0 {
        return points[0].1.energy_per_req_j;
    }
    if i >= points.len() {
        return points[points.len() - 1].1.energy_per_req_j;
    }
    let ((r0, a), (r1, b)) = (&points[i - 1], &points[i]);
    let t = (rate - r0) / (r1 - r0).max(1e-12);
    a.energy_per_req_j + t * (b.energy_per_req_j - a.energy_per_req_j)
}

/// GPUs of the pool searched at the nearest rate at or above `rate`.
fn gpus_at(points: &[(f64, StaticPool)], rate: f64) -> u32 {
    let i = points.partition_point(|(r, _)| *r < rate * (1.0 - 1e-9));
    points[i.min(points.len() - 1)].1.gpus
}

/// Run `dynamollm bound`.
pub fn run(args: &BoundArgs) -> Result<()> {
    if !(args.attainment > 0.0 && args.attainment < 1.0) {
        bail!("--attainment must be between 0 and 1 (exclusive), got {}", args.attainment);
    }
    if args.window_min == 0 {
        bail!("--window-min must be at least 1 (minutes), got {}", args.window_min);
    }
    if !(args.grid_ratio.is_finite() && args.grid_ratio > 1.0) {
        bail!("--grid-ratio must be a number above 1, got {}", args.grid_ratio);
    }
    if let Some(&bad) = args.tp.iter().find(|&&t| !matches!(t, 1 | 2 | 4 | 8)) {
        bail!("--tp: {bad} is not a TP degree of one server (1, 2, 4 or 8)");
    }
    if let Some(b) = args.baseline_kwh {
        if !(b.is_finite() && b > 0.0) {
            bail!("--baseline-kwh must be a positive number, got {b}");
        }
    }
    let report = args.against.as_deref().map(read_report).transpose()?;
    let physics = args.physics.load()?;
    let workload = args.workload.load()?;
    let boundaries = ClassBoundaries::default();
    let slo = class_slos(&physics, &workload.slo_pairs, &boundaries, SloRule::Multiplier(args.slo_multiplier));
    let lengths = ClassLengths::split(&LengthSamples::from_pairs(workload.name.clone(), workload.slo_pairs.clone()));
    let windows = window_counts(&crate::closed_loop::count_minutes(&workload)?, args.window_min as usize);
    let min_clock = args.min_clock_mhz.unwrap_or(0);
    let clocks: Vec<u32> = physics.gpu.clocks_mhz.iter().copied().filter(|&f| f >= min_clock).collect();
    if clocks.is_empty() {
        bail!("--min-clock-mhz {min_clock}: the physics has no clock that high");
    }

    let requests_by_class: [u64; CLASS_COUNT] = std::array::from_fn(|c| windows.iter().map(|(_, w)| w[c]).sum());
    let groups = args.pool_by.groups();
    let group_lengths: Vec<LengthSamples> =
        groups.iter().map(|(_, classes)| pool_lengths(&lengths, classes, &requests_by_class)).collect();
    let in_group = |g: usize, w: &[u64; CLASS_COUNT]| -> u64 { groups[g].1.iter().map(|&c| w[c]).sum() };

    // The rates to search: per pool, a grid over its windows' mean rates.
    let mut jobs: Vec<(usize, f64)> = Vec::new();
    for g in 0..groups.len() {
        let rates: Vec<f64> = windows.iter().map(|(s, w)| in_group(g, w) as f64 / s).filter(|&r| r > 0.0).collect();
        if let (Some(lo), Some(hi)) = (rates.iter().copied().reduce(f64::min), rates.iter().copied().reduce(f64::max)) {
            jobs.extend(rate_grid(lo, hi, args.grid_ratio).into_iter().map(|r| (g, r)));
        }
    }
    let bar = progress_bar(jobs.len() as u64, args.quiet, "{bar:40} {pos}/{len} rates searched [{elapsed} < {eta}]");
    let results: Mutex<Vec<Option<StaticPool>>> = Mutex::new(vec![None; jobs.len()]);
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(g, rate)) = jobs.get(j) else { break };
                let spec =
                    SearchSpec { slo, attainment: args.attainment, max_gpus: args.max_gpus, seed: workload.seed };
                let best = best_static(&physics, &group_lengths[g], &spec, rate, &args.tp, &clocks);
                results.lock().expect("no worker panics holding the lock")[j] = best;
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    let results = results.into_inner().expect("no worker panics holding the lock");

    let mut classes = BTreeMap::new();
    let mut gpus_by_window = vec![Some(0u32); windows.len()];
    for (g, (name, members)) in groups.iter().enumerate() {
        let requests: u64 = in_group(g, &requests_by_class);
        if requests == 0 {
            continue;
        }
        let points: Vec<BoundPoint> = jobs
            .iter()
            .zip(&results)
            .filter(|((jg, _), _)| *jg == g)
            .map(|((_, r), p)| BoundPoint { rate_rps: *r, pool: *p })
            .collect();
        let held: Option<Vec<(f64, StaticPool)>> = points.iter().map(|p| p.pool.map(|q| (p.rate_rps, q))).collect();
        let (mut energy_j, mut gpu_s) = (0.0, 0.0);
        for (wi, (window_s, w)) in windows.iter().enumerate() {
            let n = in_group(g, w);
            let Some(h) = held.as_ref() else {
                gpus_by_window[wi] = None;
                continue;
            };
            if n == 0 {
                continue;
            }
            let rate = n as f64 / window_s;
            energy_j += n as f64 * energy_per_req_at(h, rate);
            let g = gpus_at(h, rate);
            gpu_s += f64::from(g) * window_s;
            if let Some(t) = gpus_by_window[wi].as_mut() {
                *t += g;
            }
        }
        let peak_rate_rps = windows.iter().map(|(s, w)| in_group(g, w) as f64 / s).fold(0.0, f64::max);
        classes.insert(
            name.clone(),
            ClassBound {
                serves: members
                    .iter()
                    .filter(|&&c| requests_by_class[c] > 0)
                    .map(|&c| RequestClass::from_index(c).name())
                    .collect(),
                requests,
                energy_kwh: held.as_ref().map(|_| energy_j / 3.6e6),
                energy_per_req_j: held.as_ref().map(|_| energy_j / requests as f64),
                gpu_hours: held.as_ref().map(|_| gpu_s / 3600.0),
                peak_rate_rps,
                points,
            },
        );
    }
    let sum = |f: fn(&ClassBound) -> Option<f64>| classes.values().map(f).sum::<Option<f64>>();
    let energy_kwh = sum(|c| c.energy_kwh);
    let mut bound = Bound {
        trace: workload.name.clone(),
        seed: workload.seed,
        attainment: args.attainment,
        window_min: args.window_min,
        min_clock_mhz: clocks[0],
        tp: args.tp.clone(),
        pool_by: args.pool_by,
        requests: classes.values().map(|c| c.requests).sum(),
        energy_kwh,
        gpu_hours: sum(|c| c.gpu_hours),
        peak_gpus: gpus_by_window
            .iter()
            .copied()
            .collect::<Option<Vec<u32>>>()
            .map(|v| v.into_iter().max().unwrap_or(0)),
        ratio_to_baseline: energy_kwh.zip(args.baseline_kwh).map(|(e, b)| e / b),
        classes,
        against: Vec::new(),
    };
    if let (Some(path), Some(report)) = (&args.against, report) {
        bound.against = set_against(path, report, &groups, &requests_by_class, bound.energy_kwh)?;
    }
    print!("{}", table(&bound));
    if let Some(path) = &args.json {
        write_json(path, &bound)?;
    }
    if let Some(path) = &args.svg {
        chart(path, &bound).with_context(|| format!("writing the chart {}", path.display()))?;
    }
    Ok(())
}

/// Each pool's least energy per request (J, log scale) against its load (requests/s, log
/// scale): one line per pool through its searched rates, each point labelled with its clock
/// and instances.
pub fn chart(path: &Path, b: &Bound) -> Result<()> {
    use plotters::prelude::*;
    let e = |e: plotters::drawing::DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("{e}");
    let lines: Vec<(&String, Vec<(f64, StaticPool)>)> = b
        .classes
        .iter()
        .map(|(name, c)| (name, c.points.iter().filter_map(|p| p.pool.map(|q| (p.rate_rps, q))).collect::<Vec<_>>()))
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    if lines.is_empty() {
        bail!("no pool holds any searched rate: nothing to chart");
    }
    let all = lines.iter().flat_map(|(_, pts)| pts.iter());
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (r, q) in all {
        (x_lo, x_hi) = (x_lo.min(*r), x_hi.max(*r));
        (y_lo, y_hi) = (y_lo.min(q.energy_per_req_j), y_hi.max(q.energy_per_req_j));
    }
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "least energy per request by load, {:.1}% held (labels: MHz, instances × TP)",
                100.0 * b.attainment
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo / 1.3..x_hi * 1.3).log_scale(), (y_lo / 1.3..y_hi * 1.3).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("load (requests/s)")
        .y_desc("energy per request (J)")
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(e)?;
    // Tableau's ten: distinct on white, one per class at most.
    const COLORS: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (214, 39, 40),
        (44, 160, 44),
        (148, 103, 189),
        (255, 127, 14),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    for (k, (name, pts)) in lines.iter().enumerate() {
        let (r, g, bl) = COLORS[k % COLORS.len()];
        let color = RGBColor(r, g, bl).to_rgba();
        let xy: Vec<(f64, f64)> = pts.iter().map(|(r, q)| (*r, q.energy_per_req_j)).collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color.stroke_width(2)));
        chart.draw_series(xy.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(e)?;
        chart
            .draw_series(pts.iter().map(|(r, q)| {
                let label = format!("{} ({}×TP{})", q.clock_mhz, q.instances, q.tp);
                Text::new(label, (*r, q.energy_per_req_j * 1.06), ("sans-serif", 10))
            }))
            .map_err(e)?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// The printed table.
pub fn table(b: &Bound) -> String {
    use std::fmt::Write;
    let (who, head) = match b.pool_by {
        PoolBy::Class => ("each class its", "class"),
        PoolBy::Band => ("the classes of each prompt band one", "pool "),
        PoolBy::One => ("every class one", "pool "),
    };
    let mut s = format!(
        "bound: every {} min window, {who} least-energy static pool (one TP degree, one clock ≥ {} MHz) \
         holding {:.2}% of its requests within SLO at the window's mean rate, reconfigured for free\n",
        b.window_min,
        b.min_clock_mhz,
        100.0 * b.attainment
    );
    let _ = writeln!(s, "{head}   requests  energy kWh    J/req  GPU-hours  busiest window");
    let opt = |x: Option<f64>, w: usize, p: usize| x.map_or(format!("{:>w$}", "-"), |v| format!("{v:>w$.p$}"));
    for (name, c) in &b.classes {
        let busiest = match c.points.last() {
            Some(BoundPoint { rate_rps, pool: Some(p) }) => format!(
                "{}×TP{} @ {} MHz for {rate_rps:.2} req/s ({} GPUs, {:.2}% held)",
                p.instances,
                p.tp,
                p.clock_mhz,
                p.gpus,
                100.0 * p.attainment
            ),
            Some(BoundPoint { rate_rps, pool: None }) => format!("no pool holds {rate_rps:.2} req/s"),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "{name:<5} {:>10}  {}  {}  {}  {busiest}",
            c.requests,
            opt(c.energy_kwh, 10, 2),
            opt(c.energy_per_req_j, 7, 0),
            opt(c.gpu_hours, 9, 1),
        );
    }
    let _ = writeln!(
        s,
        "all   {:>10}  {}           {}  peak {} GPUs",
        b.requests,
        opt(b.energy_kwh, 10, 2),
        opt(b.gpu_hours, 9, 1),
        b.peak_gpus.map_or("-".to_string(), |g| g.to_string())
    );
    if let Some(r) = b.ratio_to_baseline {
        let _ = writeln!(s, "vs the baseline's energy: {r:.3}×");
    }
    if !b.against.is_empty() {
        let _ = writeln!(s, "beside the reference (kWh, and its ratio to the reference's):");
        let _ = write!(s, "{head}   reference kWh");
        for p in &b.against {
            let _ = write!(s, "  {:>22}", p.policy);
        }
        let _ = writeln!(s);
        let ratio = |x: f64, r: Option<f64>| match r.filter(|r| *r > 0.0) {
            Some(r) => format!("{x:.2} ({:.3}×)", x / r),
            None => format!("{x:.2}"),
        };
        for (name, c) in &b.classes {
            let _ = write!(s, "{name:<5}   {}", opt(c.energy_kwh, 13, 2));
            for p in &b.against {
                let _ = write!(s, "  {:>22}", ratio(p.pools.get(name).copied().unwrap_or(0.0), c.energy_kwh));
            }
            let _ = writeln!(s);
        }
        let _ = write!(s, "all     {}", opt(b.energy_kwh, 13, 2));
        for p in &b.against {
            let _ = write!(s, "  {:>22}", ratio(p.energy_kwh, b.energy_kwh));
        }
        let _ = writeln!(s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(gpus: u32, energy_per_req_j: f64) -> StaticPool {
        StaticPool {
            tp: 8,
            clock_mhz: 1600,
            instances: gpus / 8,
            gpus,
            energy_per_req_j,
            power_w: 0.0,
            attainment: 0.999,
            too_large_share: 0.0,
        }
    }

    #[test]
    fn the_grid_spans_quietest_to_busiest_window_geometrically() {
        assert_eq!(rate_grid(1.0, 10.0, 2.0), vec![1.0, 2.0, 4.0, 8.0, 10.0]);
        assert_eq!(rate_grid(1.0, 8.0, 2.0), vec![1.0, 2.0, 4.0, 8.0]);
        assert_eq!(rate_grid(3.0, 3.0, 1.5), vec![3.0]);
    }

    #[test]
    fn windows_between_searched_rates_interpolate_energy_and_hold_the_larger_pool() {
        let pts = [(1.0, pool(8, 2000.0)), (3.0, pool(16, 1000.0))];
        assert!((energy_per_req_at(&pts, 2.0) - 1500.0).abs() < 1e-9);
        assert_eq!(energy_per_req_at(&pts, 1.0), 2000.0);
        assert_eq!(energy_per_req_at(&pts, 3.0), 1000.0);
        assert_eq!(gpus_at(&pts, 1.0), 8);
        assert_eq!(gpus_at(&pts, 1.5), 16, "a window between two rates holds the pool of the busier one");
        assert_eq!(gpus_at(&pts, 3.0), 16);
    }

    #[test]
    fn pools_by_band_hold_the_three_classes_of_each_prompt_band() {
        let names = |g: Vec<(String, Vec<usize>)>| -> Vec<(String, Vec<String>)> {
            g.into_iter()
                .map(|(n, cs)| (n, cs.into_iter().map(|c| RequestClass::from_index(c).name()).collect()))
                .collect()
        };
        let band = names(PoolBy::Band.groups());
        assert_eq!(band.len(), 3);
        for (name, classes) in &band {
            let letter = &name[..1];
            assert_eq!(name, &format!("{letter}*"));
            assert_eq!(classes.len(), 3, "{name}: {classes:?}");
            assert!(classes.iter().all(|c| c.starts_with(letter)), "{name}: {classes:?}");
        }
        assert_eq!(PoolBy::Class.groups().len(), CLASS_COUNT);
        assert!(PoolBy::Class
            .groups()
            .iter()
            .all(|(n, cs)| cs.len() == 1 && RequestClass::from_index(cs[0]).name() == *n));
        assert_eq!(PoolBy::One.groups(), vec![("**".to_string(), (0..CLASS_COUNT).collect())]);
    }

    #[test]
    fn a_shared_pool_is_searched_with_its_classes_mixed_as_in_the_workload() {
        let b = ClassBoundaries::default();
        // Two L-band classes, LS nine times as many requests as LM; LL has none.
        let pairs: Vec<(u32, u32)> = vec![(2000, 20), (3000, 50), (1500, 200), (1200, 120), (4000, 600)];
        let lengths = ClassLengths::split(&LengthSamples::from_pairs("t", pairs));
        let class = |s: &str| RequestClass::parse(s).unwrap().index();
        let mut requests = [0u64; CLASS_COUNT];
        requests[class("LS")] = 900;
        requests[class("LM")] = 100;
        let mix = pool_lengths(&lengths, &[class("LS"), class("LM"), class("LL")], &requests);
        let count = |c: &str| mix.pairs().iter().filter(|&&(i, o)| b.classify(i, o).index() == class(c)).count();
        assert_eq!(count("LS"), MIX_SAMPLES * 9 / 10);
        assert_eq!(count("LM"), MIX_SAMPLES / 10);
        assert_eq!(count("LL"), 0, "a class without requests adds none (its stand-in is not a sample)");
        // Each class's own pairs, in their order, repeated.
        let ls: Vec<(u32, u32)> =
            mix.pairs().iter().copied().filter(|&(i, o)| b.classify(i, o).index() == class("LS")).collect();
        assert_eq!(&ls[..4], &[(2000, 20), (3000, 50), (2000, 20), (3000, 50)]);
        // A pool of one class (or of one class with requests) is searched with that class's samples.
        let only = pool_lengths(&lengths, &[class("LS"), class("LL")], &requests);
        assert_eq!(only.pairs(), lengths.of(RequestClass::parse("LS").unwrap()).pairs());
        // A band without requests (it is not searched) still has lengths, its first class's.
        let none = pool_lengths(&lengths, &[class("SS"), class("SM")], &requests);
        assert_eq!(none.pairs(), lengths.of(RequestClass::parse("SS").unwrap()).pairs());
    }

    #[test]
    fn minutes_add_up_into_windows_with_a_shorter_last_one() {
        let m = MinuteCounts((0..5u32).map(|i| std::array::from_fn(|c| i + c as u32)).collect());
        let w = window_counts(&m, 2);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], (120.0, std::array::from_fn(|c| 1 + 2 * c as u64)));
        assert_eq!(w[1].1[2], 2 + 2 + 3 + 2);
        assert_eq!(w[2], (60.0, std::array::from_fn(|c| 4 + c as u64)));
    }
}
