//! What an in-process cluster (the twin) reports to the service, and those
//! reports turned into the telemetry an agent would publish, for the store.
//! Nothing here needs the twin's crate: the service's loop handles reports
//! the same whether or not it is built with the `twin` feature.

use crate::core::{InstanceReport, ReportedState};
use std::collections::HashMap;
use telemetry::{RequestClass, CLASS_COUNT};

/// A twin run's totals, handed over when its workload is over.
#[cfg(feature = "twin")]
pub type TwinTotals = sim::RunTotals;
/// Without the `twin` feature no twin runs, so none finishes.
#[cfg(not(feature = "twin"))]
pub type TwinTotals = std::convert::Infallible;

/// What the twin reports.
#[derive(Debug)]
pub enum TwinEvent {
    /// A reading of the whole cluster.
    Report {
        /// Twin time (s).
        now_s: f64,
        /// Every instance not stopped, and those that stopped since the last report.
        instances: Vec<InstanceReport>,
        /// Arrivals per class since the last report.
        arrivals: [u32; CLASS_COUNT],
        /// Their tokens (prompt and output) per class.
        arrival_tokens: [f64; CLASS_COUNT],
        /// Cumulative per-class SLO counters `[ttft_ok, ttft_n, gaps_ok, gaps_n]`.
        attainment: Box<[[u64; 4]; CLASS_COUNT]>,
        /// The live `single-pool` baseline replaying the same arrivals: its energy so far (J) and power (W).
        baseline: Option<(f64, f64)>,
    },
    /// The cluster has reached a tick of the service (twin time, s): it waits
    /// until the service has decided and its commands are applied (`done`).
    Tick {
        /// Twin time (s).
        now_s: f64,
        /// Sent (or dropped) when the tick's commands are applied.
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// The workload is over and every request finished.
    Finished(Box<TwinTotals>),
}

/// The twin's reports as the telemetry an agent would publish: per GPU
/// (power split evenly over the instance's GPUs, node `twin/i<id>`) and
/// per-class arrivals, flattened into store points. Each GPU's energy
/// counter only rises, as NVML's does: it gains its share of the instance's
/// energy since the last report, also when the instance's TP degree
/// changes in place (an even split of the instance's total would drop).
#[derive(Debug, Default)]
pub struct GpuCounters {
    /// Instance id → (its energy at the last report (J), each GPU's counter (J)).
    seen: HashMap<u32, (f64, Vec<f64>)>,
}

impl GpuCounters {
    /// One report, stamped `ts_ms`; `pools` maps instance id → pool.
    pub fn samples(
        &mut self,
        ts_ms: i64,
        instances: &[InstanceReport],
        pools: &[(u32, u32)],
        arrivals: &[u32; CLASS_COUNT],
        tokens: &[f64; CLASS_COUNT],
    ) -> Vec<telemetry::sample::Point> {
        use telemetry::sample::{ArrivalSample, GpuSample, Sample, Tags};
        let mut out = Vec::new();
        self.seen.retain(|id, _| instances.iter().any(|r| r.id.0 == *id && r.state != ReportedState::Stopped));
        for r in instances.iter().filter(|r| r.state != ReportedState::Stopped) {
            let pool = pools.iter().find(|(i, _)| *i == r.id.0).map(|(_, p)| p.to_string());
            let n = r.tp.max(1);
            let (last_j, gpus) = self.seen.entry(r.id.0).or_insert((0.0, Vec::new()));
            let share_j = (r.energy_j - *last_j).max(0.0) / f64::from(n);
            *last_j = last_j.max(r.energy_j);
            gpus.resize(gpus.len().max(n as usize), 0.0);
            for (g, energy_j) in gpus.iter_mut().enumerate().take(n as usize) {
                *energy_j += share_j;
                let tags = Tags {
                    gpu: Some(g as u32),
                    instance: Some(format!("i{}", r.id.0)),
                    pool: pool.clone(),
                    ..Tags::node("twin", &format!("i{}", r.id.0))
                };
                let s = Sample::Gpu(GpuSample {
                    ts_ms,
                    tags,
                    power_w: r.power_w / f64::from(n),
                    energy_j: Some(*energy_j),
                    sm_clock_mhz: Some(r.clock_mhz),
                    util: None,
                    temperature_c: None,
                    throttle_reasons: None,
                });
                out.extend(s.points());
            }
        }
        for (c, &n) in arrivals.iter().enumerate() {
            if n > 0 {
                let tags = Tags { class: Some(RequestClass::from_index(c)), ..Tags::default() };
                out.extend(
                    Sample::Arrivals(ArrivalSample { ts_ms, tags, requests: f64::from(n), tokens: tokens[c] }).points(),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actuators::InstanceId;

    fn report(id: u32, tp: u32, energy_j: f64) -> InstanceReport {
        InstanceReport {
            id: InstanceId(id),
            state: ReportedState::Serving,
            outstanding: 0,
            waiting: 0,
            power_w: 100.0 * f64::from(tp),
            energy_j,
            clock_mhz: 1980,
            tp,
        }
    }

    /// (gpu, energy) of one instance's GPU samples.
    fn energies(points: &[telemetry::sample::Point]) -> Vec<(String, f64)> {
        points
            .iter()
            .filter(|p| p.series.field == "energy_j")
            .map(|p| (p.series.tag("gpu").unwrap().to_string(), p.value))
            .collect()
    }

    /// An instance resharded in place from TP2 to TP4: its first two GPUs'
    /// counters keep rising (an even split of the total would fall from 50
    /// to 37.5 J), the new two start from their share of what came after.
    #[test]
    fn gpu_energy_counters_only_rise_across_a_reshard() {
        let mut c = GpuCounters::default();
        let a = energies(&c.samples(0, &[report(7, 2, 100.0)], &[(7, 1)], &[0; CLASS_COUNT], &[0.0; CLASS_COUNT]));
        assert_eq!(a, [("0".to_string(), 50.0), ("1".to_string(), 50.0)]);
        let b = energies(&c.samples(1000, &[report(7, 4, 150.0)], &[(7, 1)], &[0; CLASS_COUNT], &[0.0; CLASS_COUNT]));
        assert_eq!(
            b,
            [("0".to_string(), 62.5), ("1".to_string(), 62.5), ("2".to_string(), 12.5), ("3".to_string(), 12.5)]
        );
        // Gone and back: a new instance with the id starts afresh.
        let stopped = InstanceReport { state: ReportedState::Stopped, ..report(7, 4, 150.0) };
        assert!(energies(&c.samples(2000, &[stopped], &[], &[0; CLASS_COUNT], &[0.0; CLASS_COUNT])).is_empty());
        let d = energies(&c.samples(3000, &[report(7, 2, 10.0)], &[(7, 1)], &[0; CLASS_COUNT], &[0.0; CLASS_COUNT]));
        assert_eq!(d, [("0".to_string(), 5.0), ("1".to_string(), 5.0)]);
    }
}
