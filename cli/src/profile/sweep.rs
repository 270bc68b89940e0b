//! The profiler: sweeps request class × TP degree × clock × load on a target
//! (the twin in virtual time, or a real OpenAI-compatible endpoint), writes
//! each measured point as a profile row as soon as it has it, and resumes
//! from whatever rows the output file already holds.
//!
//! Load levels are chosen per (class, TP) from the load at which the class's
//! SLO breaks at the top clock (found by doubling, then bisection): a base
//! grid of fractions of it, cut after the first point that misses the SLO at
//! each clock, then refined where linear interpolation between neighbours
//! misses the measured midpoint by more than the tolerance, which is where
//! power and latency rise steeply.

use super::table::{unloaded_key, unloaded_value, ProfileRow, ProfileTable, Unloaded, COLUMNS};
use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use telemetry::RequestClass;

/// One point to measure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// The class whose requests are sent.
    pub class: RequestClass,
    /// TP degree.
    pub tp: u32,
    /// Clock.
    pub clock_mhz: u32,
    /// Offered requests per second.
    pub load_rps: f64,
}

/// Something that can be profiled.
pub trait Target: Sync {
    /// Model name for the rows.
    fn model(&self) -> String;
    /// GPU name for the rows.
    fn gpu(&self) -> String;
    /// The engine and how it is measured (metadata).
    fn engine(&self) -> String;
    /// The top clock (the SLO base and the capacity probe run there).
    fn max_clock_mhz(&self) -> u32;
    /// Whether points may be measured concurrently (virtual time: yes; a real engine: no).
    fn concurrent(&self) -> bool;
    /// The class's median request alone on the target.
    fn unloaded(&self, class: RequestClass) -> Result<Unloaded>;
    /// Measure one point.
    fn measure(&self, point: &Point, seed: u64) -> Result<ProfileRow>;
}

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    /// Classes.
    pub classes: Vec<RequestClass>,
    /// TP degrees.
    pub tps: Vec<u32>,
    /// Clocks, ascending.
    pub clocks_mhz: Vec<u32>,
    /// Explicit loads (requests/s) instead of the adaptive grid.
    pub loads_rps: Option<Vec<f64>>,
    /// SLO multiplier over the unloaded latencies, for the capacity probe and the grid cut.
    pub slo_multiplier: f64,
    /// Refine an interval when interpolation misses its midpoint by more than this (relative).
    pub refine_tolerance: f64,
    /// How many times an interval may be halved.
    pub refine_depth: u32,
    /// Base seed; each point's seed is derived from it and the point.
    pub seed: u64,
    /// The command line, for the metadata.
    pub made_by: String,
}

/// Fractions of the top-clock capacity in the base grid.
pub const BASE_GRID: [f64; 13] = [0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25];

/// The capacity probe's first load (it doubles from here).
pub const PROBE_START_RPS: f64 = 0.05;

/// What a sweep did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SweepSummary {
    /// Points measured now.
    pub measured: usize,
    /// Points found in the file and skipped.
    pub resumed: usize,
    /// Rows in the file at the end.
    pub rows: usize,
}

/// Parse `800:1980:200` (the top is always included) or `800,1200,1980`.
pub fn parse_clocks(s: &str) -> Result<Vec<u32>, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut v: Vec<u32> = if parts.len() == 3 {
        let n = |x: &str| x.trim().parse::<u32>().map_err(|_| format!("`{x}` in clock range `{s}` is not a number"));
        let (lo, hi, step) = (n(parts[0])?, n(parts[1])?, n(parts[2])?);
        if step == 0 || lo > hi {
            return Err(format!("clock range `{s}` must be LO:HI:STEP with LO ≤ HI and STEP > 0"));
        }
        let mut v: Vec<u32> = (lo..=hi).step_by(step as usize).collect();
        v.push(hi);
        v
    } else if parts.len() == 1 {
        s.split(',')
            .map(|x| x.trim().parse::<u32>().map_err(|_| format!("`{x}` is not a clock in MHz")))
            .collect::<Result<_, _>>()?
    } else {
        return Err(format!("clocks `{s}` must be LO:HI:STEP or a comma list"));
    };
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

fn key(p: &Point) -> (usize, u32, u32, u64) {
    (p.class.index(), p.tp, p.clock_mhz, p.load_rps.to_bits())
}

fn point_seed(base: u64, p: &Point) -> u64 {
    // SplitMix64 over the point's fields: reproducible whatever the order of measurement.
    let mut z = base ^ (p.class.index() as u64) << 56 ^ u64::from(p.tp) << 48 ^ u64::from(p.clock_mhz) << 32;
    z ^= p.load_rps.to_bits().rotate_left(17);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Format one row as CSV (floats in shortest round-trip form, so a resumed sweep asks for the same loads).
pub fn row_csv(r: &ProfileRow) -> String {
    let g = |x: f64| sig6(x);
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        r.model,
        r.gpu,
        r.class,
        r.tp,
        r.clock_mhz,
        r.load_rps,
        g(r.load_tok_s),
        g(r.energy_per_req_j),
        g(r.power_per_gpu_w),
        g(r.ttft_p50_s),
        g(r.ttft_p99_s),
        g(r.tbt_p50_s),
        g(r.tbt_p99_s),
        r.requests,
        g(r.window_s)
    )
}

/// A measurement to 6 significant digits, in shortest form.
fn sig6(x: f64) -> f64 {
    round_load(x)
}

struct Book<'a> {
    target: &'a dyn Target,
    spec: &'a SweepSpec,
    done: Mutex<HashMap<(usize, u32, u32, u64), ProfileRow>>,
    file: Mutex<std::fs::File>,
    bar: &'a ProgressBar,
    measured: Mutex<usize>,
    resumed: Mutex<usize>,
    slo: HashMap<usize, (f64, f64)>,
}

impl Book<'_> {
    fn get(&self, p: Point) -> Result<ProfileRow> {
        if let Some(r) = self.done.lock().expect("not poisoned").get(&key(&p)) {
            *self.resumed.lock().expect("not poisoned") += 1;
            return Ok(r.clone());
        }
        let row = self.target.measure(&p, point_seed(self.spec.seed, &p)).with_context(|| {
            format!("measuring {} TP{} {} MHz at {:.4} req/s", p.class, p.tp, p.clock_mhz, p.load_rps)
        })?;
        {
            let mut f = self.file.lock().expect("not poisoned");
            writeln!(f, "{}", row_csv(&row)).context("writing the profile")?;
            f.flush().context("writing the profile")?;
        }
        self.done.lock().expect("not poisoned").insert(key(&p), row.clone());
        *self.measured.lock().expect("not poisoned") += 1;
        self.bar.inc(1);
        Ok(row)
    }

    fn meets(&self, r: &ProfileRow) -> bool {
        let (ttft, tbt) = self.slo[&r.class.index()];
        r.ttft_p99_s <= ttft && r.tbt_p99_s <= tbt
    }

    /// The highest load meeting the SLO at the top clock (doubling, then bisection).
    fn capacity(&self, class: RequestClass, tp: u32, start_rps: f64) -> Result<f64> {
        let top = self.target.max_clock_mhz();
        let at = |l: f64| self.get(Point { class, tp, clock_mhz: top, load_rps: round_load(l) });
        let mut lo = round_load(start_rps);
        if !self.meets(&at(lo)?) {
            return Ok(lo);
        }
        let mut hi = lo * 2.0;
        while self.meets(&at(hi)?) {
            lo = hi;
            hi *= 2.0;
            if hi > 1e5 {
                bail!("{class} TP{tp} still meets its SLO at {hi} req/s: the SLO or the target is wrong");
            }
        }
        for _ in 0..5 {
            let mid = round_load((lo + hi) / 2.0);
            if self.meets(&at(mid)?) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    fn curve(&self, class: RequestClass, tp: u32, clock_mhz: u32, cap: f64) -> Result<()> {
        let mut pts: Vec<ProfileRow> = Vec::new();
        for f in BASE_GRID {
            let r = self.get(Point { class, tp, clock_mhz, load_rps: round_load(f * cap) })?;
            let ok = self.meets(&r);
            pts.push(r);
            if !ok && pts.len() >= 3 {
                break;
            }
        }
        for w in pts.windows(2) {
            self.refine(&w[0], &w[1], self.spec.refine_depth)?;
        }
        Ok(())
    }

    fn refine(&self, a: &ProfileRow, b: &ProfileRow, depth: u32) -> Result<()> {
        if depth == 0 || (!self.meets(a) && !self.meets(b)) {
            return Ok(());
        }
        let mid = round_load((a.load_rps + b.load_rps) / 2.0);
        if mid <= a.load_rps || mid >= b.load_rps {
            return Ok(());
        }
        let m = self.get(Point { class: a.class, tp: a.tp, clock_mhz: a.clock_mhz, load_rps: mid })?;
        let t = (mid - a.load_rps) / (b.load_rps - a.load_rps);
        let miss = |fa: f64, fb: f64, fm: f64| ((fa + t * (fb - fa)) - fm).abs() / fm.abs().max(1e-12);
        let worst = [
            miss(a.power_per_gpu_w, b.power_per_gpu_w, m.power_per_gpu_w),
            miss(a.energy_per_req_j * a.load_rps, b.energy_per_req_j * b.load_rps, m.energy_per_req_j * mid),
            miss(a.ttft_p99_s, b.ttft_p99_s, m.ttft_p99_s),
            miss(a.tbt_p99_s, b.tbt_p99_s, m.tbt_p99_s),
        ]
        .into_iter()
        .fold(0.0f64, f64::max);
        if worst > self.spec.refine_tolerance {
            self.refine(a, &m, depth - 1)?;
            self.refine(&m, b, depth - 1)?;
        }
        Ok(())
    }
}

/// Loads are kept to 6 significant digits so that files stay readable and resumes match.
pub fn round_load(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return x;
    }
    let mag = 10f64.powi(5 - x.log10().floor() as i32);
    (x * mag).round() / mag
}

/// Run a sweep into `out`, resuming from the rows it already has.
pub fn run(target: &dyn Target, spec: &SweepSpec, out: &Path, bar: &ProgressBar) -> Result<SweepSummary> {
    let mut done = HashMap::new();
    let exists = out.exists() && std::fs::metadata(out).map(|m| m.len() > 0).unwrap_or(false);
    let mut unloaded: HashMap<usize, Unloaded> = HashMap::new();
    if exists {
        let table = ProfileTable::load(out).with_context(|| format!("resuming from {}", out.display()))?;
        if table.model() != target.model() || table.gpu() != target.gpu() {
            bail!(
                "{} holds a profile of {}/{}, but the target is {}/{}; choose another --out",
                out.display(),
                table.model(),
                table.gpu(),
                target.model(),
                target.gpu()
            );
        }
        for r in &table.rows {
            let p = Point { class: r.class, tp: r.tp, clock_mhz: r.clock_mhz, load_rps: r.load_rps };
            done.insert(key(&p), r.clone());
        }
        for class in &spec.classes {
            if let Some(u) = table.unloaded(*class) {
                unloaded.insert(class.index(), u);
            }
        }
    }
    // Unloaded latencies first: they go in the header and set the SLOs.
    for class in &spec.classes {
        if let std::collections::hash_map::Entry::Vacant(e) = unloaded.entry(class.index()) {
            e.insert(target.unloaded(*class)?);
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("cannot open {}", out.display()))?;
    if !exists {
        let mut head = String::new();
        head.push_str("# dynamollm-profile: 1\n");
        head.push_str(&format!("# model: {}\n", target.model()));
        head.push_str(&format!("# gpu: {}\n", target.gpu()));
        head.push_str(&format!("# engine: {}\n", target.engine()));
        head.push_str(&format!("# date: {}\n", chrono::Utc::now().format("%Y-%m-%d")));
        head.push_str(&format!("# made-by: {}\n", spec.made_by));
        head.push_str(&format!("# slo-multiplier: {}\n", spec.slo_multiplier));
        for class in &spec.classes {
            head.push_str(&format!("# {}: {}\n", unloaded_key(*class), unloaded_value(unloaded[&class.index()])));
        }
        head.push_str(&COLUMNS.join(","));
        head.push('\n');
        file.write_all(head.as_bytes()).context("writing the profile header")?;
    }
    let slo =
        unloaded.iter().map(|(&c, u)| (c, (spec.slo_multiplier * u.ttft_s, spec.slo_multiplier * u.tbt_s))).collect();
    let resumed_rows = done.len();
    let book = Book {
        target,
        spec,
        done: Mutex::new(done),
        file: Mutex::new(file),
        bar,
        measured: Mutex::new(0),
        resumed: Mutex::new(0),
        slo,
    };
    let pairs: Vec<(RequestClass, u32)> =
        spec.classes.iter().flat_map(|&c| spec.tps.iter().map(move |&tp| (c, tp))).collect();
    let per_pair = |&(class, tp): &(RequestClass, u32)| -> Result<()> {
        if let Some(loads) = &spec.loads_rps {
            for &clock_mhz in &spec.clocks_mhz {
                for &l in loads {
                    book.get(Point { class, tp, clock_mhz, load_rps: round_load(l) })?;
                }
            }
            return Ok(());
        }
        let cap = book.capacity(class, tp, PROBE_START_RPS)?;
        let clocks = &spec.clocks_mhz;
        if target.concurrent() {
            clocks.par_iter().try_for_each(|&c| book.curve(class, tp, c, cap))
        } else {
            clocks.iter().try_for_each(|&c| book.curve(class, tp, c, cap))
        }
    };
    if target.concurrent() {
        pairs.par_iter().try_for_each(per_pair)?;
    } else {
        pairs.iter().try_for_each(per_pair)?;
    }
    let measured = *book.measured.lock().expect("not poisoned");
    let done = book.done.into_inner().expect("not poisoned");
    let rows = done.len();
    drop(book.file);
    rewrite_sorted(out, done.into_values().collect())?;
    Ok(SweepSummary { measured, resumed: resumed_rows.min(rows - measured), rows })
}

/// Once a sweep is complete, rewrite the file in a stable order (class, TP,
/// clock, load), keeping its metadata; written beside it and renamed over it.
fn rewrite_sorted(out: &Path, mut rows: Vec<ProfileRow>) -> Result<()> {
    rows.sort_by(|a, b| {
        (a.class.index(), a.tp, a.clock_mhz)
            .cmp(&(b.class.index(), b.tp, b.clock_mhz))
            .then(a.load_rps.total_cmp(&b.load_rps))
    });
    let old = std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    let mut text: String = old.lines().take_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    text.push_str(&COLUMNS.join(","));
    text.push('\n');
    for r in &rows {
        text.push_str(&row_csv(r));
        text.push('\n');
    }
    let tmp = out.with_extension("csv.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_ranges_include_the_top() {
        assert_eq!(parse_clocks("800:1980:200").unwrap(), vec![800, 1000, 1200, 1400, 1600, 1800, 1980]);
        assert_eq!(parse_clocks("1980, 800").unwrap(), vec![800, 1980]);
        assert!(parse_clocks("800:700:100").unwrap_err().contains("LO ≤ HI"));
        assert!(parse_clocks("800:x:100").unwrap_err().contains("`x`"));
    }

    #[test]
    fn loads_round_to_six_digits_and_round_trip() {
        assert_eq!(round_load(1.23456789), 1.23457);
        assert_eq!(round_load(123456.789), 123457.0);
        let x = round_load(0.3 * 7.1234567);
        assert_eq!(format!("{x}").parse::<f64>().unwrap(), x);
    }

    #[test]
    fn point_seeds_differ_by_point() {
        let p = Point { class: RequestClass::ALL[0], tp: 8, clock_mhz: 1980, load_rps: 1.0 };
        let q = Point { load_rps: 2.0, ..p };
        assert_ne!(point_seed(1, &p), point_seed(1, &q));
        assert_eq!(point_seed(1, &p), point_seed(1, &p));
    }
}
