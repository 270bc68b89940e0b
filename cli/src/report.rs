//! The result of a `dynamollm sim` run: the JSON contract (exactly the fields
//! other tools script against) and the table on stdout.

use serde::Serialize;
use sim::{LatencySummary, RunTotals};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use telemetry::RequestClass;

/// Latency and attainment of one class, plus its request count.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassReport {
    /// Requests that arrived.
    pub requests: u64,
    /// Latency percentiles and SLO attainment.
    #[serde(flatten)]
    pub latency: LatencySummary,
}

/// One `dynamollm sim` run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SimReport {
    /// Policy name.
    pub policy: String,
    /// The workload.
    pub trace: String,
    /// The seed.
    pub seed: u64,
    /// Simulated time (s).
    pub duration_s: f64,
    /// Requests that arrived.
    pub requests_total: u64,
    /// Requests turned away.
    pub requests_rejected: u64,
    /// GPU energy (kWh).
    pub energy_kwh: f64,
    /// GPUs provisioned × time, idle and warm included (h).
    pub gpu_hours: f64,
    /// Mean GPUs held.
    pub avg_gpus: f64,
    /// Most GPUs held at once.
    pub peak_gpus: u32,
    /// The highest one-second mean of the cluster's GPU power (W).
    pub peak_power_w: f64,
    /// Cost, GPU-hours and energy, by the accounting's prices ($; `sim` fills it, from the same
    /// computation as its `--report`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Carbon, operational and embodied, by the accounting's intensity series (kg; `sim` fills it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carbon_kg: Option<f64>,
    /// Latency percentiles and attainment over all classes.
    #[serde(flatten)]
    pub latency: LatencySummary,
    /// Per class (only classes with traffic).
    pub classes: BTreeMap<String, ClassReport>,
    /// Wall-clock time of the replay (s).
    pub wall_s: f64,
    /// Simulated requests per wall-clock second.
    pub sim_requests_per_s: f64,
    /// Energy over the oracle's on the same trace and seed, minus one (when an oracle ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_gap: Option<f64>,
    /// The replay's per-minute timeline, for `--report` (not part of the JSON).
    #[serde(skip)]
    pub timeline: Option<std::sync::Arc<sim::Timeline>>,
    /// Per clock hour, the lowest SLO attainment of a class with enough requests that hour, for
    /// `--report` (not part of the JSON).
    #[serde(skip)]
    pub worst_class_by_hour: Vec<Option<f64>>,
    /// Requests turned away, per class and reason (class name, reason, count;
    /// printed under the table, not part of the JSON).
    #[serde(skip)]
    pub rejections: Vec<(String, sim::RejectReason, u64)>,
}

impl SimReport {
    /// Build from a replay's totals.
    pub fn new(policy: &str, trace: &str, seed: u64, totals: &RunTotals, wall_s: f64) -> SimReport {
        let all = LatencySummary::of_all(&totals.stats.classes);
        let classes = RequestClass::ALL
            .iter()
            .filter(|c| totals.stats.classes[c.index()].requests > 0)
            .map(|c| {
                let s = &totals.stats.classes[c.index()];
                (c.name(), ClassReport { requests: s.requests, latency: LatencySummary::of_class(s) })
            })
            .collect();
        let hours = totals.duration_s / 3600.0;
        SimReport {
            policy: policy.to_string(),
            trace: trace.to_string(),
            seed,
            duration_s: totals.duration_s,
            requests_total: totals.requests_total,
            requests_rejected: totals.requests_rejected,
            energy_kwh: totals.energy_j / 3.6e6,
            gpu_hours: totals.gpu_seconds / 3600.0,
            avg_gpus: if hours > 0.0 { totals.gpu_seconds / totals.duration_s } else { 0.0 },
            peak_gpus: totals.peak_gpus,
            peak_power_w: totals.peak_power_w,
            cost_usd: None,
            carbon_kg: None,
            latency: all,
            classes,
            wall_s,
            sim_requests_per_s: if wall_s > 0.0 { totals.requests_total as f64 / wall_s } else { 0.0 },
            oracle_gap: None,
            timeline: Some(std::sync::Arc::new(totals.timeline.clone())),
            worst_class_by_hour: totals.stats.worst_class_by_hour(),
            rejections: RequestClass::ALL
                .iter()
                .flat_map(|c| {
                    let s = &totals.stats.classes[c.index()];
                    sim::RejectReason::ALL
                        .into_iter()
                        .map(|r| (c.name(), r, s.rejected_for(r)))
                        .filter(|(_, _, n)| *n > 0)
                        .collect::<Vec<_>>()
                })
                .collect(),
        }
    }

    /// Every class with traffic holds its P99 SLOs.
    pub fn all_classes_hold(&self) -> bool {
        self.classes.values().all(|c| c.latency.slo_attainment >= telemetry::P99_ATTAINMENT)
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "policy {}  trace {}  seed {}", self.policy, self.trace, self.seed);
        let speed = if self.wall_s > 0.0 {
            format!(", {:.0} requests/s of wall time ({:.2} s)", self.sim_requests_per_s, self.wall_s)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  {:.0} s simulated, {} requests ({} rejected){speed}",
            self.duration_s, self.requests_total, self.requests_rejected
        );
        if self.requests_total == 0 {
            let _ = writeln!(s, "  no request arrived: there is nothing to measure");
        } else if self.requests_rejected == self.requests_total {
            let _ = writeln!(s, "  every request was turned away: nothing was served");
        }
        let _ = writeln!(
            s,
            "  energy {:.2} kWh   GPU-hours {:.1}   GPUs avg {:.1} peak {}",
            self.energy_kwh, self.gpu_hours, self.avg_gpus, self.peak_gpus
        );
        let _ = writeln!(
            s,
            "  {:<5} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>10} {:>9}",
            "class",
            "requests",
            "TTFT p50",
            "TTFT p99",
            "TBT p50",
            "TBT p99",
            "TTFT ok",
            "TBT ok",
            "SLO ok",
            "worst hour",
            "hours<99%"
        );
        let mut row = |name: &str, requests: u64, c: &LatencySummary| {
            let _ = writeln!(
                s,
                "  {:<5} {:>8} {:>8.3}s {:>8.3}s {:>7.1}ms {:>7.1}ms {:>6.2}% {:>6.2}% {:>6.2}% {:>10} {:>9}{}",
                name,
                requests,
                c.ttft_p50_s,
                c.ttft_p99_s,
                c.tbt_p50_s * 1e3,
                c.tbt_p99_s * 1e3,
                c.ttft_attainment * 100.0,
                c.tbt_attainment * 100.0,
                c.slo_attainment * 100.0,
                c.worst_hour_attainment.map_or("-".to_string(), |w| format!("{:.2}%", w * 100.0)),
                c.hours_below_p99,
                if c.slo_attainment >= telemetry::P99_ATTAINMENT { "" } else { "  MISSES P99 SLO" }
            );
        };
        for c in RequestClass::ALL {
            if let Some(r) = self.classes.get(&c.name()) {
                row(&c.name(), r.requests, &r.latency);
            }
        }
        row("all", self.requests_total, &self.latency);
        if !self.rejections.is_empty() {
            let list: Vec<String> =
                self.rejections.iter().map(|(c, r, n)| format!("{c} {n} ({})", r.as_str())).collect();
            let _ = writeln!(s, "  rejected: {}", list.join(", "));
        }
        s
    }
}
