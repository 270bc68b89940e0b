//! Reports of one or more runs: figures (JSON, CSV) and a self-contained HTML
//! page with inline SVG charts (no scripts, no external resources).
//!
//! Key figures carry stable element ids, `<figure>-<run>` (e.g.
//! `energy-kwh-dynamollm`, `carbon-ratio-dynamollm`), with the exact value in
//! `data-value` and [`figure_text`] of it as the text.

use crate::accounting::{account, Account, RunTimeline, J_PER_KWH};
use crate::config::AccountingConfig;
use crate::intensity::{IntensitySeries, Signal};
use crate::svg::{bar_chart, downsample, esc, line_chart, line_chart_from, Line};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One run to report: its timeline and latency outcome.
#[derive(Debug, Clone)]
pub struct RunInput {
    /// Name (the policy).
    pub name: String,
    /// Per-interval energy, GPUs, clocks and tokens.
    pub timeline: RunTimeline,
    /// Share of requests and token gaps within SLO, over all classes (None: not measured).
    pub slo_attainment: Option<f64>,
    /// The same per class name.
    pub class_attainment: BTreeMap<String, f64>,
    /// Per clock hour since the run began, the lowest SLO attainment of a class that hour (`None`:
    /// no class had enough requests to tell); empty where not measured.
    pub worst_class_by_hour: Vec<Option<f64>>,
    /// Requests turned away.
    pub requests_rejected: u64,
    /// Most GPUs held at once.
    pub peak_gpus: u32,
    /// The highest one-second mean of the run's GPU power (W), where measured.
    pub peak_power_w: Option<f64>,
}

/// Ratios of a run to the baseline's (1.0: the same; 0.62: 38% less).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratios {
    /// GPU energy.
    pub energy_ratio: f64,
    /// Carbon (operational + embodied).
    pub carbon_ratio: f64,
    /// Cost (GPU + energy).
    pub cost_ratio: f64,
}

/// The figures of one class of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassFigures {
    /// Requests.
    pub requests: f64,
    /// GPU energy attributed (kWh).
    pub energy_kwh: f64,
    /// Carbon attributed (kg).
    pub carbon_kg: f64,
    /// Cost attributed ($).
    pub cost_usd: f64,
    /// SLO attainment, when measured.
    pub slo_attainment: Option<f64>,
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunFigures {
    /// Run (policy) name.
    pub policy: String,
    /// Length (s).
    pub duration_s: f64,
    /// Requests that arrived.
    pub requests: f64,
    /// Requests turned away.
    pub requests_rejected: u64,
    /// GPU energy (kWh).
    pub energy_kwh: f64,
    /// Facility energy, GPU × PUE (kWh).
    pub facility_energy_kwh: f64,
    /// GPU-hours held.
    pub gpu_hours: f64,
    /// Mean GPUs held.
    pub avg_gpus: f64,
    /// Most GPUs held.
    pub peak_gpus: u32,
    /// The highest one-second mean of the GPU power (W), where measured.
    pub peak_power_w: Option<f64>,
    /// Carbon, operational + embodied (kg).
    pub carbon_kg: f64,
    /// Operational carbon (kg).
    pub carbon_operational_kg: f64,
    /// Embodied carbon (kg).
    pub carbon_embodied_kg: f64,
    /// Cost, GPU + energy ($).
    pub cost_usd: f64,
    /// GPU rental ($).
    pub cost_gpu_usd: f64,
    /// Energy ($).
    pub cost_energy_usd: f64,
    /// SCI per request (g).
    pub sci_g_per_request: f64,
    /// SCI per 1,000 tokens (g).
    pub sci_g_per_1k_tokens: f64,
    /// Energy-weighted mean grid intensity (gCO2e/kWh).
    pub mean_intensity_g_per_kwh: f64,
    /// SLO attainment over all classes, when measured.
    pub slo_attainment: Option<f64>,
    /// The class with the lowest SLO attainment (when measured) and that attainment:
    /// an overall figure can hide one class below its P99 SLO.
    pub worst_class: Option<(String, f64)>,
    /// Some class with traffic misses its P99 SLO.
    pub misses_slo: bool,
    /// Against the baseline, when one ran.
    pub vs_baseline: Option<Ratios>,
    /// Per class.
    pub classes: BTreeMap<String, ClassFigures>,
}

/// The report: figures of every run, and how they were computed.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Title.
    pub title: String,
    /// What was measured (the command, the trace, the store).
    pub source: String,
    /// The carbon intensity source.
    pub intensity_source: String,
    /// `average` or `marginal`.
    pub intensity_signal: Signal,
    /// PUE applied.
    pub pue: f64,
    /// GPU SKU priced.
    pub gpu_sku: String,
    /// Its price per GPU-hour ($).
    pub gpu_hour_usd: f64,
    /// SCI TE per server (kg).
    pub embodied_kg_per_server: f64,
    /// SCI lifetime (years).
    pub lifetime_years: f64,
    /// The baseline run, when one ran.
    pub baseline: Option<String>,
    /// How per-class figures are attributed, and other caveats.
    pub notes: Vec<String>,
    /// One per run.
    pub runs: Vec<RunFigures>,
    #[serde(skip)]
    inputs: Vec<RunInput>,
    #[serde(skip)]
    intensity: IntensitySeries,
}

/// The note on per-class attribution every report carries.
pub const ATTRIBUTION_NOTE: &str = "Energy is measured per pool; per-class energy, carbon and cost split each pool's \
figures among its classes in proportion to the prompt + output tokens routed to it in each interval.";

/// Stable element-id form of a name.
pub fn id_of(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect()
}

/// The text a figure is shown with in the HTML.
pub fn figure_text(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "–".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn figures(run: &RunInput, a: &Account) -> RunFigures {
    let duration_s: f64 = run.timeline.intervals.iter().map(|i| i.duration_s).sum();
    RunFigures {
        policy: run.name.clone(),
        duration_s,
        requests: a.requests,
        requests_rejected: run.requests_rejected,
        energy_kwh: a.gpu_energy_j / J_PER_KWH,
        facility_energy_kwh: a.facility_energy_j / J_PER_KWH,
        gpu_hours: a.gpu_seconds / 3600.0,
        avg_gpus: if duration_s > 0.0 { a.gpu_seconds / duration_s } else { 0.0 },
        peak_gpus: run.peak_gpus,
        peak_power_w: run.peak_power_w,
        carbon_kg: a.carbon_g / 1000.0,
        carbon_operational_kg: a.carbon_operational_g / 1000.0,
        carbon_embodied_kg: a.carbon_embodied_g / 1000.0,
        cost_usd: a.cost_usd,
        cost_gpu_usd: a.cost_gpu_usd,
        cost_energy_usd: a.cost_energy_usd,
        sci_g_per_request: a.sci_g_per_request,
        sci_g_per_1k_tokens: a.sci_g_per_1k_tokens,
        mean_intensity_g_per_kwh: a.mean_intensity_g_per_kwh,
        slo_attainment: run.slo_attainment,
        worst_class: worst_class(&run.class_attainment),
        misses_slo: worst_class(&run.class_attainment).is_some_and(|(_, a)| a < telemetry_core::P99_ATTAINMENT),
        vs_baseline: None,
        classes: a
            .classes
            .iter()
            .map(|(k, c)| {
                (
                    k.clone(),
                    ClassFigures {
                        requests: c.requests,
                        energy_kwh: c.gpu_energy_j / J_PER_KWH,
                        carbon_kg: c.carbon_g / 1000.0,
                        cost_usd: c.cost_usd,
                        slo_attainment: run.class_attainment.get(k).copied(),
                    },
                )
            })
            .collect(),
    }
}

/// The class with the lowest attainment.
fn worst_class(by_class: &BTreeMap<String, f64>) -> Option<(String, f64)> {
    by_class.iter().filter(|(_, a)| a.is_finite()).min_by(|a, b| a.1.total_cmp(b.1)).map(|(k, a)| (k.clone(), *a))
}

impl Report {
    /// Account every run and compare each to `baseline` (a run name; ignored when no run has it).
    pub fn build(
        title: &str,
        source: &str,
        runs: Vec<RunInput>,
        baseline: Option<&str>,
        cfg: &AccountingConfig,
        intensity: &IntensitySeries,
        extra_notes: &[String],
    ) -> Report {
        let mut figs: Vec<RunFigures> =
            runs.iter().map(|r| figures(r, &account(&r.timeline, cfg, intensity))).collect();
        let baseline = baseline.filter(|b| figs.iter().any(|f| f.policy == *b)).map(str::to_string);
        if let Some(b) = &baseline {
            let base = figs.iter().find(|f| &f.policy == b).cloned().expect("present");
            let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
            for f in &mut figs {
                f.vs_baseline = Some(Ratios {
                    energy_ratio: ratio(f.energy_kwh, base.energy_kwh),
                    carbon_ratio: ratio(f.carbon_kg, base.carbon_kg),
                    cost_ratio: ratio(f.cost_usd, base.cost_usd),
                });
            }
        }
        let mut notes = vec![ATTRIBUTION_NOTE.to_string()];
        notes.push(format!(
            "Carbon = facility energy (GPU energy × PUE {}) × grid intensity at each interval's midpoint, plus the \
             embodied share M = TE × TS × RS (SCI; TE {} kgCO2e per {}-GPU server, lifetime {} years). GPU energy \
             only: host CPUs, memory and network are not metered.",
            cfg.carbon.pue, cfg.sci.embodied_kg_per_server, cfg.sci.gpus_per_server, cfg.sci.lifetime_years
        ));
        notes.push(format!(
            "Cost = GPU-hours × ${}/GPU-hour ({}) + facility energy × the time-of-use tariff (UTC{:+}).",
            cfg.gpu_hour_usd(),
            cfg.cost.gpu_sku,
            cfg.cost.tariff_utc_offset_h
        ));
        notes.extend(extra_notes.iter().cloned());
        Report {
            title: title.into(),
            source: source.into(),
            intensity_source: intensity.source.clone(),
            intensity_signal: intensity.signal,
            pue: cfg.carbon.pue,
            gpu_sku: cfg.cost.gpu_sku.clone(),
            gpu_hour_usd: cfg.gpu_hour_usd(),
            embodied_kg_per_server: cfg.sci.embodied_kg_per_server,
            lifetime_years: cfg.sci.lifetime_years,
            baseline,
            notes,
            runs: figs,
            inputs: runs,
            intensity: intensity.clone(),
        }
    }

    /// The figures as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serialises") + "\n"
    }

    /// The figures as CSV: one row per run and class, class `all` for the run's totals.
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "policy,class,requests,energy_kwh,facility_energy_kwh,gpu_hours,carbon_kg,carbon_operational_kg,\
carbon_embodied_kg,cost_usd,cost_gpu_usd,cost_energy_usd,sci_g_per_request,sci_g_per_1k_tokens,slo_attainment,\
energy_ratio,carbon_ratio,cost_ratio\n",
        );
        let o = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        for r in &self.runs {
            let b = r.vs_baseline;
            let _ = writeln!(
                s,
                "{},all,{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                r.policy,
                r.requests,
                r.energy_kwh,
                r.facility_energy_kwh,
                r.gpu_hours,
                r.carbon_kg,
                r.carbon_operational_kg,
                r.carbon_embodied_kg,
                r.cost_usd,
                r.cost_gpu_usd,
                r.cost_energy_usd,
                r.sci_g_per_request,
                r.sci_g_per_1k_tokens,
                o(r.slo_attainment),
                o(b.map(|b| b.energy_ratio)),
                o(b.map(|b| b.carbon_ratio)),
                o(b.map(|b| b.cost_ratio)),
            );
            for (k, c) in &r.classes {
                let _ = writeln!(
                    s,
                    "{},{k},{},{},,,{},,,{},,,,,{},,,",
                    r.policy,
                    c.requests,
                    c.energy_kwh,
                    c.carbon_kg,
                    c.cost_usd,
                    o(c.slo_attainment)
                );
            }
        }
        s
    }

    /// The self-contained HTML page.
    pub fn to_html(&self) -> String {
        let mut h = String::with_capacity(256 * 1024);
        let _ = write!(
            h,
            r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<link rel="icon" href="data:,">
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1600px}}
table{{border-collapse:collapse;margin:8px 0 16px}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th:first-child,td:first-child{{text-align:left}} .charts{{display:flex;flex-wrap:wrap;gap:12px}}
.chart{{border:1px solid #eee}} .note{{color:#555;font-size:13px}} .good{{color:#1a7f37}} .bad{{color:#b42318}}
td.miss,tr.misses-slo td:first-child{{color:#b42318;font-weight:600}}
</style></head><body>
<h1 id="title">{t}</h1>
<p class="note">Source: {src}. Carbon intensity: {isrc} ({sig}, energy-weighted mean shown per run). Baseline: {base}.</p>
"#,
            t = esc(&self.title),
            src = esc(&self.source),
            isrc = esc(&self.intensity_source),
            sig = match self.intensity_signal {
                Signal::Average => "average",
                Signal::Marginal => "marginal",
            },
            base = esc(self.baseline.as_deref().unwrap_or("none"))
        );
        // Key figures.
        h.push_str("<h2>Key figures</h2>\n<table id=\"key-figures\"><tr><th>policy</th><th>energy kWh</th><th>carbon kg</th><th>cost $</th><th>SLO attainment</th><th>worst class</th><th>energy vs baseline</th><th>carbon vs baseline</th><th>cost vs baseline</th><th>GPU-hours</th><th>peak kW</th><th>SCI g/request</th><th>SCI g/1k tokens</th><th>mean gCO2e/kWh</th></tr>\n");
        for r in &self.runs {
            let id = id_of(&r.policy);
            let cell = |name: &str, v: Option<f64>| match v {
                Some(v) => format!(r#"<td id="{name}-{id}" data-value="{v}">{}</td>"#, figure_text(v)),
                None => format!(r#"<td id="{name}-{id}">–</td>"#),
            };
            let b = r.vs_baseline;
            let worst = match &r.worst_class {
                Some((k, a)) => format!(
                    r#"<td id="worst-class-{id}" data-value="{a}"{}>{} {}{}</td>"#,
                    if r.misses_slo { r#" class="miss""# } else { "" },
                    esc(k),
                    figure_text(*a),
                    if r.misses_slo { " — misses its P99 SLO" } else { "" }
                ),
                None => format!(r#"<td id="worst-class-{id}">–</td>"#),
            };
            let _ = writeln!(
                h,
                "<tr{}><td>{}{}</td>{}{}{}{}{}{}{}{}{}{}{}{}{}</tr>",
                if r.misses_slo { r#" class="misses-slo""# } else { "" },
                esc(&r.policy),
                if r.misses_slo { " ✗" } else { "" },
                cell("energy-kwh", Some(r.energy_kwh)),
                cell("carbon-kg", Some(r.carbon_kg)),
                cell("cost-usd", Some(r.cost_usd)),
                cell("slo-attainment", r.slo_attainment),
                worst,
                cell("energy-ratio", b.map(|b| b.energy_ratio)),
                cell("carbon-ratio", b.map(|b| b.carbon_ratio)),
                cell("cost-ratio", b.map(|b| b.cost_ratio)),
                cell("gpu-hours", Some(r.gpu_hours)),
                cell("peak-kw", r.peak_power_w.map(|w| w / 1e3)),
                cell("sci-g-per-request", Some(r.sci_g_per_request)),
                cell("sci-g-per-1k-tokens", Some(r.sci_g_per_1k_tokens)),
                cell("mean-intensity", Some(r.mean_intensity_g_per_kwh)),
            );
        }
        h.push_str("</table>\n");
        if self.baseline.is_some() {
            h.push_str("<p id=\"savings\">");
            for r in &self.runs {
                if let Some(b) = r.vs_baseline {
                    if Some(&r.policy) == self.baseline.as_ref() {
                        continue;
                    }
                    let pct = |x: f64| format!("{:+.1}%", (x - 1.0) * 100.0);
                    let _ = write!(
                        h,
                        "<b>{}</b>: energy {}, carbon {}, cost {} against {}. ",
                        esc(&r.policy),
                        pct(b.energy_ratio),
                        pct(b.carbon_ratio),
                        pct(b.cost_ratio),
                        esc(self.baseline.as_deref().unwrap_or(""))
                    );
                }
            }
            h.push_str("</p>\n");
        }
        if self.runs.len() > 1 {
            h.push_str("<h2>Side by side</h2><div class=\"charts\">\n");
            h.push_str(&self.side_by_side_chart());
            h.push_str("</div>\n");
        }
        h.push_str("<h2>Over time</h2><div class=\"charts\">\n");
        h.push_str(&self.time_charts());
        h.push_str("</div>\n<h2>By class</h2><div class=\"charts\">\n");
        h.push_str(&self.class_charts());
        h.push_str("</div>\n");
        // Per-run detail.
        for (r, input) in self.runs.iter().zip(&self.inputs) {
            let id = id_of(&r.policy);
            let _ = write!(
                h,
                "<h2 id=\"run-{id}\">{p}</h2><p class=\"note\">{:.1} h, {} requests ({} rejected), facility energy {:.2} kWh, GPUs avg {:.1} peak {}, carbon {:.3} kg operational + {:.3} kg embodied, cost ${:.2} GPUs + ${:.2} energy.</p>\n<div class=\"charts\">",
                r.duration_s / 3600.0,
                r.requests,
                r.requests_rejected,
                r.facility_energy_kwh,
                r.avg_gpus,
                r.peak_gpus,
                r.carbon_operational_kg,
                r.carbon_embodied_kg,
                r.cost_gpu_usd,
                r.cost_energy_usd,
                p = esc(&r.policy)
            );
            h.push_str(&pool_charts(&id, &r.policy, &input.timeline));
            h.push_str("</div>\n<table><tr><th>class</th><th>requests</th><th>energy kWh</th><th>carbon kg</th><th>cost $</th><th>SLO attainment</th></tr>\n");
            for (k, c) in &r.classes {
                let _ = writeln!(
                    h,
                    "<tr><td>{k}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    c.requests,
                    figure_text(c.energy_kwh),
                    figure_text(c.carbon_kg),
                    figure_text(c.cost_usd),
                    c.slo_attainment.map(figure_text).unwrap_or_else(|| "–".into())
                );
            }
            h.push_str("</table>\n");
        }
        h.push_str("<h2>Method</h2><ul class=\"note\">");
        for n in &self.notes {
            let _ = write!(h, "<li>{}</li>", esc(n));
        }
        h.push_str("</ul>\n</body></html>\n");
        h
    }

    fn time_charts(&self) -> String {
        let mut s = String::new();
        let series = |f: &dyn Fn(&crate::accounting::Interval) -> f64| -> Vec<Line> {
            self.inputs
                .iter()
                .map(|r| Line {
                    name: r.name.clone(),
                    points: downsample(
                        &r.timeline
                            .intervals
                            .iter()
                            .map(|i| ((i.start_s + i.duration_s / 2.0) / 3600.0, f(i)))
                            .collect::<Vec<_>>(),
                        500,
                    ),
                })
                .collect()
        };
        let power = |i: &crate::accounting::Interval| {
            i.pools.iter().map(|p| p.energy_j).sum::<f64>() / i.duration_s.max(1e-9) / 1000.0
        };
        s.push_str(&line_chart("chart-power", "GPU power by policy", "hours", "kW", &series(&power)));
        let gpus = |i: &crate::accounting::Interval| i.pools.iter().map(|p| f64::from(p.gpus)).sum::<f64>();
        s.push_str(&line_chart("chart-gpus", "GPUs in use by policy", "hours", "GPUs", &series(&gpus)));
        let clock = |i: &crate::accounting::Interval| {
            let g: f64 = i.pools.iter().filter(|p| p.clock_mhz > 0.0).map(|p| f64::from(p.gpus)).sum();
            let c: f64 = i.pools.iter().filter(|p| p.clock_mhz > 0.0).map(|p| p.clock_mhz * f64::from(p.gpus)).sum();
            if g > 0.0 {
                c / g
            } else {
                0.0
            }
        };
        s.push_str(&line_chart("chart-clocks", "Mean GPU clock by policy", "hours", "MHz", &series(&clock)));
        if let Some(hours) = self.inputs.iter().map(|r| r.worst_class_by_hour.len()).max().filter(|&h| h > 0) {
            let mut lines: Vec<Line> = self
                .inputs
                .iter()
                .filter(|r| !r.worst_class_by_hour.is_empty())
                .map(|r| Line {
                    name: r.name.clone(),
                    points: r
                        .worst_class_by_hour
                        .iter()
                        .enumerate()
                        .filter_map(|(h, a)| a.map(|a| (h as f64 + 0.5, a * 100.0)))
                        .collect(),
                })
                .collect();
            // The axis from a whole percent below the lowest hour (at most 98%) to 100%.
            let lowest = lines.iter().flat_map(|l| l.points.iter()).map(|p| p.1).fold(98.0, f64::min);
            lines.push(Line { name: "P99 SLO (99%)".into(), points: vec![(0.0, 99.0), (hours as f64, 99.0)] });
            s.push_str(&line_chart_from(
                "chart-slo-hourly",
                "SLO attainment of the worst class, hour by hour",
                "hours",
                "%",
                &lines,
                (lowest - 0.5).floor().max(0.0),
            ));
        }
        if let Some(r) = self.inputs.first() {
            let pts: Vec<(f64, f64)> = r
                .timeline
                .intervals
                .iter()
                .map(|i| {
                    let mid = i.start_s + i.duration_s / 2.0;
                    (mid / 3600.0, self.intensity.at(r.timeline.start_unix_s + mid))
                })
                .collect();
            s.push_str(&line_chart(
                "chart-intensity",
                "Grid carbon intensity",
                "hours",
                "gCO2e/kWh",
                &[Line { name: "intensity".into(), points: downsample(&pts, 500) }],
            ));
        }
        if self.baseline.is_some() {
            let cats = vec!["energy".to_string(), "carbon".to_string(), "cost".to_string()];
            let series: Vec<(String, Vec<f64>)> = self
                .runs
                .iter()
                .filter_map(|r| {
                    r.vs_baseline.map(|b| (r.policy.clone(), vec![b.energy_ratio, b.carbon_ratio, b.cost_ratio]))
                })
                .collect();
            s.push_str(&bar_chart(
                "chart-savings",
                &format!("Against {} (1 = the same)", self.baseline.as_deref().unwrap_or("")),
                "ratio",
                &cats,
                &series,
            ));
        }
        s
    }

    /// Every run's energy, GPU-hours, carbon, cost and peak power as a share of the baseline's
    /// (else the first run's), with each run's worst class attainment: runs under different
    /// objectives (or policies) set against each other on every measure at once.
    fn side_by_side_chart(&self) -> String {
        let base =
            self.baseline.as_ref().and_then(|b| self.runs.iter().find(|r| &r.policy == b)).unwrap_or(&self.runs[0]);
        let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
        let mut categories: Vec<String> =
            ["energy", "GPU-hours", "carbon", "cost"].iter().map(|s| s.to_string()).collect();
        let with_peak = self.runs.iter().all(|r| r.peak_power_w.is_some());
        if with_peak {
            categories.push("peak power".into());
        }
        let with_slo = self.runs.iter().all(|r| r.worst_class.is_some());
        if with_slo {
            categories.push("worst class SLO".into());
        }
        let series: Vec<(String, Vec<f64>)> = self
            .runs
            .iter()
            .map(|r| {
                let mut v = vec![
                    ratio(r.energy_kwh, base.energy_kwh),
                    ratio(r.gpu_hours, base.gpu_hours),
                    ratio(r.carbon_kg, base.carbon_kg),
                    ratio(r.cost_usd, base.cost_usd),
                ];
                if with_peak {
                    v.push(ratio(r.peak_power_w.unwrap_or(0.0), base.peak_power_w.unwrap_or(0.0)));
                }
                if with_slo {
                    v.push(r.worst_class.as_ref().map_or(0.0, |w| w.1));
                }
                (r.policy.clone(), v)
            })
            .collect();
        bar_chart(
            "chart-side-by-side",
            &format!("Each run against {} (SLO: the worst class's attainment)", base.policy),
            "share",
            &categories,
            &series,
        )
    }

    fn class_charts(&self) -> String {
        let mut classes: Vec<String> = self.runs.iter().flat_map(|r| r.classes.keys().cloned()).collect();
        classes.sort_by_key(|c| telemetry_core::RequestClass::parse(c).map(|k| k.index()).unwrap_or(99));
        classes.dedup();
        let by = |f: &dyn Fn(&ClassFigures) -> f64| -> Vec<(String, Vec<f64>)> {
            self.runs
                .iter()
                .map(|r| (r.policy.clone(), classes.iter().map(|c| r.classes.get(c).map(f).unwrap_or(0.0)).collect()))
                .collect()
        };
        let mut s = String::new();
        s.push_str(&bar_chart("chart-class-energy", "GPU energy by class", "kWh", &classes, &by(&|c| c.energy_kwh)));
        s.push_str(&bar_chart("chart-class-carbon", "Carbon by class", "kg CO2e", &classes, &by(&|c| c.carbon_kg)));
        s.push_str(&bar_chart("chart-class-cost", "Cost by class", "$", &classes, &by(&|c| c.cost_usd)));
        if self.runs.iter().any(|r| r.classes.values().any(|c| c.slo_attainment.is_some())) {
            s.push_str(&bar_chart(
                "chart-class-slo",
                "SLO attainment by class",
                "share",
                &classes,
                &by(&|c| c.slo_attainment.unwrap_or(0.0)),
            ));
        }
        s
    }
}

fn pool_charts(id: &str, name: &str, tl: &RunTimeline) -> String {
    // Pools that ever held a GPU.
    let used: Vec<usize> = (0..tl.pool_names.len())
        .filter(|&p| tl.intervals.iter().any(|i| i.pools.get(p).is_some_and(|x| x.gpu_seconds > 0.0)))
        .collect();
    let line = |p: usize, f: &dyn Fn(&crate::accounting::PoolInterval, f64) -> f64| Line {
        name: tl.pool_names[p].clone(),
        points: downsample(
            &tl.intervals
                .iter()
                .map(|i| ((i.start_s + i.duration_s / 2.0) / 3600.0, f(&i.pools[p], i.duration_s)))
                .collect::<Vec<_>>(),
            400,
        ),
    };
    let power: Vec<Line> = used.iter().map(|&p| line(p, &|x, d| x.energy_j / d.max(1e-9) / 1000.0)).collect();
    let gpus: Vec<Line> = used.iter().map(|&p| line(p, &|x, _| f64::from(x.gpus))).collect();
    let clocks: Vec<Line> = used.iter().map(|&p| line(p, &|x, _| x.clock_mhz)).collect();
    let mut s = line_chart(&format!("chart-power-{id}"), &format!("{name}: power per pool"), "hours", "kW", &power);
    s.push_str(&line_chart(&format!("chart-gpus-{id}"), &format!("{name}: GPUs per pool"), "hours", "GPUs", &gpus));
    s.push_str(&line_chart(&format!("chart-clocks-{id}"), &format!("{name}: clock per pool"), "hours", "MHz", &clocks));
    s
}
