//! The profile table: what the controller knows of the hardware. For each
//! request class, TP degree, GPU clock and load level, the energy per request
//! and the P50/P99 TTFT and TBT measured by `dynamollm profile`.
//!
//! The file is CSV with a header (units in column names) after `#` metadata
//! lines (`# key: value`). Loading validates every row; a bad row is reported
//! with its file and line and skipped, never taking the good rows with it.
//! The interpolator is piecewise linear across load and clock, on a monotone
//! envelope of the data: latencies and power never fall as load rises, and a
//! row where the measured data does gets a warning naming its line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use telemetry_core::ClassSlo;
use telemetry_core::{InstanceRole, RequestClass, CLASS_COUNT};

/// The columns every profile has, in this order.
pub const COLUMNS: [&str; 15] = [
    "model",
    "gpu",
    "class",
    "tp",
    "clock_mhz",
    "load_rps",
    "load_tok_s",
    "energy_per_req_j",
    "power_per_gpu_w",
    "ttft_p50_s",
    "ttft_p99_s",
    "tbt_p50_s",
    "tbt_p99_s",
    "requests",
    "window_s",
];

/// An optional column: the role the measured instance served (`colocated`, `prefill` or
/// `decode`); a table without it measured colocated instances.
pub const ROLE_COLUMN: &str = "role";

/// Relative fall of a latency or power between two load points tolerated as
/// measurement noise before a warning.
pub const MONOTONE_TOLERANCE: f64 = 0.03;

/// One measured point.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileRow {
    /// Model served.
    pub model: String,
    /// GPU type.
    pub gpu: String,
    /// Request class (e.g. `SM`).
    pub class: RequestClass,
    /// Tensor-parallel degree.
    pub tp: u32,
    /// Locked SM clock.
    pub clock_mhz: u32,
    /// Requests per second offered.
    pub load_rps: f64,
    /// Prompt + output tokens per second offered.
    pub load_tok_s: f64,
    /// GPU energy per finished request (all GPUs of the instance).
    pub energy_per_req_j: f64,
    /// Mean power per GPU over the window.
    pub power_per_gpu_w: f64,
    /// Median time to first token.
    pub ttft_p50_s: f64,
    /// P99 time to first token.
    pub ttft_p99_s: f64,
    /// Median time between tokens.
    pub tbt_p50_s: f64,
    /// P99 time between tokens.
    pub tbt_p99_s: f64,
    /// Requests finished in the window.
    pub requests: u64,
    /// Measurement window.
    pub window_s: f64,
    /// The role the measured instance served (the optional `role` column).
    #[serde(default)]
    pub role: InstanceRole,
}

/// A class's median request alone on TP8 at max clock: the base of its SLOs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unloaded {
    /// Its TTFT.
    pub ttft_s: f64,
    /// Its median token gap.
    pub tbt_s: f64,
}

/// How bad a profile problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The row was skipped.
    Error,
    /// The row was used (perhaps adjusted).
    Warning,
}

/// A problem found while loading, with where.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileIssue {
    /// Error or warning.
    pub severity: Severity,
    /// The file.
    pub path: PathBuf,
    /// 1-based line, when the problem has one.
    pub line: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ProfileIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match self.line {
            Some(l) => write!(f, "{}:{l}: {sev}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {sev}: {}", self.path.display(), self.message),
        }
    }
}

/// A profile that cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Reading the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The header lacks a column.
    #[error("{path}:{line}: header has no column `{column}` (a profile needs {})", COLUMNS.join(", "))]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// Header line.
        line: u64,
        /// The missing column.
        column: String,
    },
    /// Nothing usable.
    #[error("{path}: no usable rows ({errors} rows had errors; first: {first})")]
    Empty {
        /// The file.
        path: PathBuf,
        /// Rows rejected.
        errors: usize,
        /// The first problem.
        first: String,
    },
    /// A query for a configuration the profile does not cover.
    #[error("the profile has no data for class {class} at TP{tp}")]
    NotProfiled {
        /// The class.
        class: RequestClass,
        /// TP degree.
        tp: u32,
    },
}

/// What the profile predicts for one configuration at one load.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// GPU energy per request (all GPUs of the instance).
    pub energy_per_req_j: f64,
    /// Power per GPU.
    pub power_per_gpu_w: f64,
    /// Power of the whole instance.
    pub power_w: f64,
    /// Median TTFT.
    pub ttft_p50_s: f64,
    /// P99 TTFT.
    pub ttft_p99_s: f64,
    /// Median TBT.
    pub tbt_p50_s: f64,
    /// P99 TBT.
    pub tbt_p99_s: f64,
    /// Both P99s within the class's SLO, inside the profiled load range.
    pub meets_slo: bool,
    /// The load is beyond the highest profiled for this clock: latencies are the last
    /// point's; power goes on rising at the curve's mean marginal power per request/s.
    pub beyond_profile: bool,
}

/// Metric curves along load for one (class, TP, clock), monotone envelopes.
#[derive(Debug, Clone)]
struct Curve {
    loads: Vec<f64>,
    /// energy_per_req × load_rps: interpolated linearly, divided by load after.
    energy_rate: Vec<f64>,
    power: Vec<f64>,
    ttft50: Vec<f64>,
    ttft99: Vec<f64>,
    tbt50: Vec<f64>,
    tbt99: Vec<f64>,
}

fn lerp(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    debug_assert_eq!(xs.len(), ys.len());
    if xs.len() == 1 || x <= xs[0] {
        return ys[0];
    }
    let i = xs.partition_point(|&v| v < x);
    if i >= xs.len() {
        return ys[ys.len() - 1];
    }
    let (x0, x1, y0, y1) = (xs[i - 1], xs[i], ys[i - 1], ys[i]);
    if x1 <= x0 {
        return y1;
    }
    y0 + (y1 - y0) * (x - x0) / (x1 - x0)
}

impl Curve {
    fn at(&self, load: f64, tp: u32, slo: ClassSlo) -> Estimate {
        let load_c = load.max(0.0);
        let max = *self.loads.last().expect("curves are never empty");
        let beyond = load_c > max * (1.0 + 1e-9);
        let l = load_c.min(max);
        let n = self.loads.len();
        let power = if l < self.loads[0] && n >= 2 {
            // Below the lowest point: extend the first segment, never below half the first power.
            let slope = (self.power[1] - self.power[0]) / (self.loads[1] - self.loads[0]).max(1e-12);
            (self.power[0] - slope * (self.loads[0] - l)).max(0.5 * self.power[0])
        } else if beyond && n >= 2 {
            // Beyond the last point (a pool whose learnt capacity exceeds one instance's): power
            // keeps rising with the work, at the curve's mean marginal power from first to last point.
            let slope = ((self.power[n - 1] - self.power[0]) / (max - self.loads[0]).max(1e-12)).max(0.0);
            self.power[n - 1] + slope * (load_c - max)
        } else {
            lerp(&self.loads, &self.power, l)
        };
        let energy_per_req_j = if l < self.loads[0] {
            power * f64::from(tp) / l.max(1e-9)
        } else if beyond && n >= 2 {
            power * f64::from(tp) / load_c
        } else {
            lerp(&self.loads, &self.energy_rate, l) / l.max(1e-9)
        };
        let ttft_p99_s = lerp(&self.loads, &self.ttft99, l);
        let tbt_p99_s = lerp(&self.loads, &self.tbt99, l);
        Estimate {
            energy_per_req_j,
            power_per_gpu_w: power,
            power_w: power * f64::from(tp),
            ttft_p50_s: lerp(&self.loads, &self.ttft50, l),
            ttft_p99_s,
            tbt_p50_s: lerp(&self.loads, &self.tbt50, l),
            tbt_p99_s,
            meets_slo: !beyond && ttft_p99_s <= slo.ttft_s && tbt_p99_s <= slo.tbt_s,
            beyond_profile: beyond,
        }
    }

    /// The highest load whose interpolated P99s stay within `slo`.
    fn max_load(&self, slo: ClassSlo) -> f64 {
        let ok = |i: usize| self.ttft99[i] <= slo.ttft_s && self.tbt99[i] <= slo.tbt_s;
        let Some(first_bad) = (0..self.loads.len()).find(|&i| !ok(i)) else {
            return *self.loads.last().expect("non-empty");
        };
        if first_bad == 0 {
            return 0.0;
        }
        let (a, b) = (first_bad - 1, first_bad);
        // Where each failing metric's segment crosses its bound; the earliest wins.
        let cross = |ys: &[f64], bound: f64| -> f64 {
            if ys[b] <= bound {
                1.0
            } else {
                ((bound - ys[a]) / (ys[b] - ys[a])).clamp(0.0, 1.0)
            }
        };
        let t = cross(&self.ttft99, slo.ttft_s).min(cross(&self.tbt99, slo.tbt_s));
        self.loads[a] + t * (self.loads[b] - self.loads[a])
    }
}

/// A loaded profile with its interpolator.
#[derive(Debug, Clone)]
pub struct ProfileTable {
    /// Where it came from.
    pub path: PathBuf,
    /// `# key: value` metadata, in file order of keys.
    pub meta: BTreeMap<String, String>,
    /// Every usable row of colocated instances, in file order: what the planner interpolates.
    pub rows: Vec<ProfileRow>,
    /// Every usable row of prefill-role and decode-role instances, in file order (for
    /// phase-split pools; the planner does not read them).
    pub role_rows: Vec<ProfileRow>,
    /// Problems found (skipped rows, non-monotone data, missing classes).
    pub issues: Vec<ProfileIssue>,
    unloaded: [Option<Unloaded>; CLASS_COUNT],
    slo: [ClassSlo; CLASS_COUNT],
    /// (class, tp) → clocks ascending with their curves.
    curves: BTreeMap<(usize, u32), Vec<(u32, Curve)>>,
}

/// The metadata key holding a class's unloaded latencies: `unloaded.SS`.
pub fn unloaded_key(class: RequestClass) -> String {
    format!("unloaded.{class}")
}

/// Format unloaded latencies as a metadata value.
pub fn unloaded_value(u: Unloaded) -> String {
    format!("ttft_s={:.6} tbt_s={:.6}", u.ttft_s, u.tbt_s)
}

fn parse_unloaded(v: &str) -> Option<Unloaded> {
    let mut ttft = None;
    let mut tbt = None;
    for part in v.split_whitespace() {
        let (k, x) = part.split_once('=')?;
        let x: f64 = x.parse().ok().filter(|x: &f64| x.is_finite() && *x > 0.0)?;
        match k {
            "ttft_s" => ttft = Some(x),
            "tbt_s" => tbt = Some(x),
            _ => return None,
        }
    }
    Some(Unloaded { ttft_s: ttft?, tbt_s: tbt? })
}

/// The default SLO multiplier (the paper's 5×).
pub const DEFAULT_SLO_MULTIPLIER: f64 = 5.0;

impl ProfileTable {
    /// Load and validate a profile file.
    pub fn load(path: &Path) -> Result<ProfileTable, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io { path: path.into(), source })?;
        ProfileTable::parse(&text, path)
    }

    /// The profile shipped with dynamollm (Llama-2-70B on DGX H100, from the twin).
    pub fn bundled() -> ProfileTable {
        ProfileTable::parse(BUNDLED_PROFILE_CSV, Path::new(BUNDLED_PROFILE_PATH)).expect("the bundled profile is valid")
    }

    /// Parse profile text; `path` names it in messages.
    pub fn parse(text: &str, path: &Path) -> Result<ProfileTable, ProfileError> {
        let mut meta = BTreeMap::new();
        let mut issues = Vec::new();
        let issue = |severity, line: Option<u64>, message: String| ProfileIssue {
            severity,
            path: path.to_path_buf(),
            line,
            message,
        };
        // Metadata: leading `# key: value` lines.
        let mut header_line = 1u64;
        for (i, l) in text.lines().enumerate() {
            let t = l.trim();
            if let Some(rest) = t.strip_prefix('#') {
                if let Some((k, v)) = rest.split_once(':') {
                    meta.insert(k.trim().to_string(), v.trim().to_string());
                }
                continue;
            }
            if t.is_empty() {
                continue;
            }
            header_line = i as u64 + 1;
            break;
        }
        // No quoting: profiles never quote, and a stray `"` must not swallow the lines after it.
        let mut rdr = csv::ReaderBuilder::new()
            .comment(Some(b'#'))
            .quoting(false)
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let headers = rdr.headers().map_err(|e| ProfileError::MissingColumn {
            path: path.into(),
            line: header_line,
            column: format!("(unreadable header: {e})"),
        })?;
        let mut col = [0usize; COLUMNS.len()];
        for (k, name) in COLUMNS.iter().enumerate() {
            col[k] = headers.iter().position(|h| h == *name).ok_or_else(|| ProfileError::MissingColumn {
                path: path.into(),
                line: header_line,
                column: name.to_string(),
            })?;
        }
        let role_col = headers.iter().position(|h| h == ROLE_COLUMN);
        let mut rows: Vec<(u64, ProfileRow)> = Vec::new();
        let mut bad = 0usize;
        let mut first_bad = String::new();
        for rec in rdr.records() {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map(|p| record_line(text.as_bytes(), p));
                    let is = issue(Severity::Error, line, format!("unreadable row: {e}"));
                    if first_bad.is_empty() {
                        first_bad = is.to_string();
                    }
                    bad += 1;
                    issues.push(is);
                    continue;
                }
            };
            let line = rec.position().map(|p| record_line(text.as_bytes(), p)).unwrap_or(0);
            match parse_row(&rec, &col, role_col) {
                Ok(r) => rows.push((line, r)),
                Err(m) => {
                    let is = issue(Severity::Error, Some(line), m);
                    if first_bad.is_empty() {
                        first_bad = is.to_string();
                    }
                    bad += 1;
                    issues.push(is);
                }
            }
        }
        if rows.is_empty() {
            return Err(ProfileError::Empty {
                path: path.into(),
                errors: bad,
                first: if first_bad.is_empty() { "the file has no rows".into() } else { first_bad },
            });
        }
        // One model and GPU per file.
        let (model, gpu) = (rows[0].1.model.clone(), rows[0].1.gpu.clone());
        rows.retain(|(line, r)| {
            if r.model != model || r.gpu != gpu {
                issues.push(issue(
                    Severity::Error,
                    Some(*line),
                    format!("row is for {}/{} but the file is for {model}/{gpu}", r.model, r.gpu),
                ));
                false
            } else {
                true
            }
        });
        // Rows of a phase's own instances are kept aside: the planner interpolates colocated ones.
        let role_rows: Vec<ProfileRow> =
            rows.iter().filter(|(_, r)| r.role != InstanceRole::Colocated).map(|(_, r)| r.clone()).collect();
        rows.retain(|(_, r)| r.role == InstanceRole::Colocated);
        if rows.is_empty() {
            return Err(ProfileError::Empty {
                path: path.into(),
                errors: bad,
                first: format!(
                    "the file has {} prefill- or decode-role rows and no colocated ones (the planner needs them)",
                    role_rows.len()
                ),
            });
        }
        // Group, check duplicates and monotonicity, build envelopes.
        type Key = (usize, u32, u32);
        let mut groups: BTreeMap<Key, Vec<(u64, &ProfileRow)>> = BTreeMap::new();
        for (line, r) in &rows {
            groups.entry((r.class.index(), r.tp, r.clock_mhz)).or_default().push((*line, r));
        }
        let mut curves: BTreeMap<(usize, u32), Vec<(u32, Curve)>> = BTreeMap::new();
        let mut dropped_lines = Vec::new();
        for ((class, tp, clock), mut pts) in groups {
            pts.sort_by(|a, b| a.1.load_rps.total_cmp(&b.1.load_rps));
            let mut kept: Vec<(u64, &ProfileRow)> = Vec::with_capacity(pts.len());
            for (line, r) in pts {
                if let Some((pl, p)) = kept.last() {
                    if (r.load_rps - p.load_rps).abs() <= 1e-9 * r.load_rps.max(1.0) {
                        issues.push(issue(
                            Severity::Error,
                            Some(line),
                            format!("duplicate point (same class, tp, clock and load as line {pl}); skipped"),
                        ));
                        dropped_lines.push(line);
                        continue;
                    }
                }
                kept.push((line, r));
            }
            let mut c = Curve {
                loads: Vec::new(),
                energy_rate: Vec::new(),
                power: Vec::new(),
                ttft50: Vec::new(),
                ttft99: Vec::new(),
                tbt50: Vec::new(),
                tbt99: Vec::new(),
            };
            for (k, (line, r)) in kept.iter().enumerate() {
                c.loads.push(r.load_rps);
                c.energy_rate.push(r.energy_per_req_j * r.load_rps);
                let metrics: [(&str, f64, &mut Vec<f64>); 5] = [
                    ("power_per_gpu_w", r.power_per_gpu_w, &mut c.power),
                    ("ttft_p50_s", r.ttft_p50_s, &mut c.ttft50),
                    ("ttft_p99_s", r.ttft_p99_s, &mut c.ttft99),
                    ("tbt_p50_s", r.tbt_p50_s, &mut c.tbt50),
                    ("tbt_p99_s", r.tbt_p99_s, &mut c.tbt99),
                ];
                for (name, v, ys) in metrics {
                    let prev = if k == 0 { f64::NEG_INFINITY } else { ys[k - 1] };
                    if v < prev * (1.0 - MONOTONE_TOLERANCE) {
                        issues.push(issue(
                            Severity::Warning,
                            Some(*line),
                            format!(
                                "{name} falls as load rises ({v:.6} at {:.4} rps after {prev:.6} at {:.4} rps); \
                                 the interpolator holds {prev:.6}",
                                r.load_rps,
                                kept[k - 1].1.load_rps
                            ),
                        ));
                    }
                    ys.push(v.max(prev));
                }
            }
            curves.entry((class, tp)).or_default().push((clock, c));
        }
        let rows: Vec<ProfileRow> =
            rows.into_iter().filter(|(l, _)| !dropped_lines.contains(l)).map(|(_, r)| r).collect();
        // Missing classes and unloaded latencies.
        let mut unloaded = [None; CLASS_COUNT];
        for class in RequestClass::ALL {
            let has_rows = curves.keys().any(|(c, _)| *c == class.index());
            if !has_rows {
                issues.push(issue(
                    Severity::Warning,
                    None,
                    format!("no rows for class {class}; the controller cannot place it on its own pool"),
                ));
            }
            match meta.get(&unloaded_key(class)) {
                Some(v) => match parse_unloaded(v) {
                    Some(u) => unloaded[class.index()] = Some(u),
                    None => issues.push(issue(
                        Severity::Error,
                        None,
                        format!("metadata `{}: {v}` is not `ttft_s=X tbt_s=Y`", unloaded_key(class)),
                    )),
                },
                None if has_rows => issues.push(issue(
                    Severity::Warning,
                    None,
                    format!(
                        "no `{}` metadata: class {class}'s SLO falls back to its lowest-load TP8 point",
                        unloaded_key(class)
                    ),
                )),
                None => {}
            }
        }
        let mut table = ProfileTable {
            path: path.into(),
            meta,
            rows,
            role_rows,
            issues,
            unloaded,
            slo: [ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY }; CLASS_COUNT],
            curves,
        };
        table.set_slo_multiplier(DEFAULT_SLO_MULTIPLIER);
        Ok(table)
    }

    /// Problems of one severity.
    pub fn issues_of(&self, severity: Severity) -> impl Iterator<Item = &ProfileIssue> {
        self.issues.iter().filter(move |i| i.severity == severity)
    }

    /// The model the profile is for.
    pub fn model(&self) -> &str {
        &self.rows[0].model
    }

    /// The GPU the profile is for.
    pub fn gpu(&self) -> &str {
        &self.rows[0].gpu
    }

    /// A class's unloaded latencies (from metadata, else its lowest-load TP8 top-clock point).
    pub fn unloaded(&self, class: RequestClass) -> Option<Unloaded> {
        self.unloaded[class.index()].or_else(|| {
            let clocks = self.curves.get(&(class.index(), 8))?;
            let (_, c) = clocks.last()?;
            Some(Unloaded { ttft_s: c.ttft50[0], tbt_s: c.tbt50[0] })
        })
    }

    /// Set every class's SLO to `k` × its unloaded latencies.
    pub fn set_slo_multiplier(&mut self, k: f64) {
        for class in RequestClass::ALL {
            if let Some(u) = self.unloaded(class) {
                self.slo[class.index()] = ClassSlo { ttft_s: k * u.ttft_s, tbt_s: k * u.tbt_s };
            }
        }
    }

    /// Set SLOs explicitly.
    pub fn set_slos(&mut self, slo: [ClassSlo; CLASS_COUNT]) {
        self.slo = slo;
    }

    /// The SLOs in force.
    pub fn slos(&self) -> [ClassSlo; CLASS_COUNT] {
        self.slo
    }

    /// Classes that have rows.
    pub fn classes(&self) -> Vec<RequestClass> {
        let mut v: Vec<RequestClass> = self.curves.keys().map(|(c, _)| RequestClass::from_index(*c)).collect();
        v.dedup();
        v
    }

    /// TP degrees profiled for a class, ascending.
    pub fn tps(&self, class: RequestClass) -> Vec<u32> {
        self.curves.keys().filter(|(c, _)| *c == class.index()).map(|(_, tp)| *tp).collect()
    }

    /// Clocks profiled for a class at a TP degree, ascending.
    pub fn clocks(&self, class: RequestClass, tp: u32) -> Vec<u32> {
        self.curves.get(&(class.index(), tp)).map(|v| v.iter().map(|(c, _)| *c).collect()).unwrap_or_default()
    }

    fn bracket(&self, class: RequestClass, tp: u32, clock_mhz: u32) -> Result<[(f64, &Curve); 2], ProfileError> {
        let v = self.curves.get(&(class.index(), tp)).ok_or(ProfileError::NotProfiled { class, tp })?;
        let i = v.partition_point(|(c, _)| *c < clock_mhz);
        Ok(if i == 0 {
            [(1.0, &v[0].1), (0.0, &v[0].1)]
        } else if i >= v.len() {
            let last = &v[v.len() - 1].1;
            [(1.0, last), (0.0, last)]
        } else if v[i].0 == clock_mhz {
            [(1.0, &v[i].1), (0.0, &v[i].1)]
        } else {
            let (c0, c1) = (f64::from(v[i - 1].0), f64::from(v[i].0));
            let w1 = (f64::from(clock_mhz) - c0) / (c1 - c0);
            [(1.0 - w1, &v[i - 1].1), (w1, &v[i].1)]
        })
    }

    /// What the profile predicts for `class` on a TP`tp` instance at `clock_mhz`
    /// carrying `load_rps` requests per second of that class.
    pub fn estimate(
        &self,
        class: RequestClass,
        tp: u32,
        clock_mhz: u32,
        load_rps: f64,
    ) -> Result<Estimate, ProfileError> {
        let slo = self.slo[class.index()];
        let [(w0, c0), (w1, c1)] = self.bracket(class, tp, clock_mhz)?;
        let a = c0.at(load_rps, tp, slo);
        if w1 == 0.0 {
            return Ok(a);
        }
        let b = c1.at(load_rps, tp, slo);
        let mix = |x: f64, y: f64| w0 * x + w1 * y;
        let ttft_p99_s = mix(a.ttft_p99_s, b.ttft_p99_s);
        let tbt_p99_s = mix(a.tbt_p99_s, b.tbt_p99_s);
        let beyond = a.beyond_profile || b.beyond_profile;
        Ok(Estimate {
            energy_per_req_j: mix(a.energy_per_req_j, b.energy_per_req_j),
            power_per_gpu_w: mix(a.power_per_gpu_w, b.power_per_gpu_w),
            power_w: mix(a.power_w, b.power_w),
            ttft_p50_s: mix(a.ttft_p50_s, b.ttft_p50_s),
            ttft_p99_s,
            tbt_p50_s: mix(a.tbt_p50_s, b.tbt_p50_s),
            tbt_p99_s,
            meets_slo: !beyond && ttft_p99_s <= slo.ttft_s && tbt_p99_s <= slo.tbt_s,
            beyond_profile: beyond,
        })
    }

    /// The highest load (requests/s) of `class` a TP`tp` instance at
    /// `clock_mhz` carries within the class's SLO.
    pub fn max_load_meeting_slo(&self, class: RequestClass, tp: u32, clock_mhz: u32) -> Result<f64, ProfileError> {
        let slo = self.slo[class.index()];
        let [(w0, c0), (w1, c1)] = self.bracket(class, tp, clock_mhz)?;
        let a = c0.max_load(slo);
        Ok(if w1 == 0.0 { a } else { (w0 * a + w1 * c1.max_load(slo)).min(a.max(c1.max_load(slo))) })
    }
}

/// The line a record starts on. The csv reader positions a record where the
/// previous one ended, before the blank and comment lines it skips: step over them.
fn record_line(text: &[u8], pos: &csv::Position) -> u64 {
    let mut line = pos.line();
    let mut b = pos.byte() as usize;
    while b < text.len() {
        match text[b] {
            b'\n' => {
                line += 1;
                b += 1;
            }
            b'\r' => b += 1,
            b'#' => match text[b..].iter().position(|&c| c == b'\n') {
                Some(n) => b += n,
                None => break,
            },
            _ => break,
        }
    }
    line
}

fn parse_row(rec: &csv::StringRecord, col: &[usize; COLUMNS.len()], role: Option<usize>) -> Result<ProfileRow, String> {
    let field = |k: usize| rec.get(col[k]).ok_or_else(|| format!("missing column `{}`", COLUMNS[k]));
    let num = |k: usize| -> Result<f64, String> {
        let s = field(k)?;
        let v: f64 = s.parse().map_err(|_| format!("`{}` is not a number: {s:?}", COLUMNS[k]))?;
        if !v.is_finite() || v < 0.0 {
            return Err(format!("`{}` must be a finite number ≥ 0, got {s}", COLUMNS[k]));
        }
        Ok(v)
    };
    let int = |k: usize| -> Result<u64, String> {
        let s = field(k)?;
        s.parse().map_err(|_| format!("`{}` is not a whole number: {s:?}", COLUMNS[k]))
    };
    let class = RequestClass::parse(field(2)?).map_err(|e| format!("`class`: {e}"))?;
    let tp = int(3)?;
    if tp == 0 || tp > 64 {
        return Err(format!("`tp` must be 1–64, got {tp}"));
    }
    let clock = int(4)?;
    if clock == 0 || clock > 10_000 {
        return Err(format!("`clock_mhz` must be 1–10000, got {clock}"));
    }
    let row = ProfileRow {
        model: field(0)?.to_string(),
        gpu: field(1)?.to_string(),
        class,
        tp: tp as u32,
        clock_mhz: clock as u32,
        load_rps: num(5)?,
        load_tok_s: num(6)?,
        energy_per_req_j: num(7)?,
        power_per_gpu_w: num(8)?,
        ttft_p50_s: num(9)?,
        ttft_p99_s: num(10)?,
        tbt_p50_s: num(11)?,
        tbt_p99_s: num(12)?,
        requests: int(13)?,
        window_s: num(14)?,
        role: match role {
            Some(k) => {
                InstanceRole::parse(rec.get(k).ok_or("missing column `role`")?).map_err(|e| format!("`role`: {e}"))?
            }
            None => InstanceRole::Colocated,
        },
    };
    if row.model.is_empty() || row.gpu.is_empty() {
        return Err("`model` and `gpu` must not be empty".into());
    }
    if row.load_rps <= 0.0 {
        return Err(format!("`load_rps` must be > 0, got {}", row.load_rps));
    }
    if row.ttft_p99_s < row.ttft_p50_s || row.tbt_p99_s < row.tbt_p50_s {
        return Err("a P99 is below its P50".into());
    }
    Ok(row)
}

/// Where the bundled profile lives in the source tree.
pub const BUNDLED_PROFILE_PATH: &str = "profiles/llama2-70b-h100.csv";

/// The bundled profile's text.
pub const BUNDLED_PROFILE_CSV: &str = include_str!("../../../profiles/llama2-70b-h100.csv");
