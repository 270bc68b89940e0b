//! How well a profile predicts what it did not measure: fresh measurements
//! at loads between the profiled ones (a third of the way along each
//! interval, so never a point the sweep's halving refinement measured), with
//! a seed the sweep did not use, against the profile's estimates.

use super::sweep::{Point, Target};
use super::table::ProfileTable;
use anyhow::Result;
use rayon::prelude::*;
use telemetry::RequestClass;

/// Where held-out loads sit inside each profiled interval.
pub const HELD_OUT_POSITION: f64 = 1.0 / 3.0;

/// One held-out comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldOut {
    /// Class.
    pub class: String,
    /// TP degree.
    pub tp: u32,
    /// Clock.
    pub clock_mhz: u32,
    /// Load.
    pub load_rps: f64,
    /// Measured and estimated energy per request.
    pub energy_per_req_j: (f64, f64),
    /// Measured and estimated P99 TTFT.
    pub ttft_p99_s: (f64, f64),
    /// Measured and estimated P99 TBT.
    pub tbt_p99_s: (f64, f64),
}

impl HeldOut {
    fn ape(pair: (f64, f64)) -> f64 {
        (pair.1 - pair.0).abs() / pair.0.abs().max(1e-12)
    }
}

/// Mean absolute percentage errors over a set of held-out points.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Mape {
    /// Points compared.
    pub points: usize,
    /// Energy per request (%).
    pub energy_per_req_pct: f64,
    /// P99 TTFT (%).
    pub ttft_p99_pct: f64,
    /// P99 TBT (%).
    pub tbt_p99_pct: f64,
}

impl Mape {
    /// The MAPEs of `pts`.
    pub fn of<'a>(pts: impl IntoIterator<Item = &'a HeldOut>) -> Mape {
        let mut m = Mape::default();
        for p in pts {
            m.points += 1;
            m.energy_per_req_pct += HeldOut::ape(p.energy_per_req_j);
            m.ttft_p99_pct += HeldOut::ape(p.ttft_p99_s);
            m.tbt_p99_pct += HeldOut::ape(p.tbt_p99_s);
        }
        let n = m.points.max(1) as f64;
        m.energy_per_req_pct *= 100.0 / n;
        m.ttft_p99_pct *= 100.0 / n;
        m.tbt_p99_pct *= 100.0 / n;
        m
    }
}

/// Held-out loads: inside every profiled interval whose upper end still meets
/// the SLO (the range the controller plans in).
pub fn held_out_points(table: &ProfileTable) -> Vec<Point> {
    let slo = table.slos();
    let mut out = Vec::new();
    for class in table.classes() {
        for tp in table.tps(class) {
            for clock in table.clocks(class, tp) {
                let mut rows: Vec<_> =
                    table.rows.iter().filter(|r| r.class == class && r.tp == tp && r.clock_mhz == clock).collect();
                rows.sort_by(|a, b| a.load_rps.total_cmp(&b.load_rps));
                let s = slo[class.index()];
                for w in rows.windows(2) {
                    if w[1].ttft_p99_s > s.ttft_s || w[1].tbt_p99_s > s.tbt_s {
                        break;
                    }
                    let load_rps = w[0].load_rps + HELD_OUT_POSITION * (w[1].load_rps - w[0].load_rps);
                    out.push(Point { class, tp, clock_mhz: clock, load_rps });
                }
            }
        }
    }
    out
}

/// Measure each held-out point on `target` (seed `seed`) and compare with the profile.
pub fn evaluate(table: &ProfileTable, target: &dyn Target, points: &[Point], seed: u64) -> Result<Vec<HeldOut>> {
    let one = |p: &Point| -> Result<HeldOut> {
        let m = target.measure(p, seed ^ p.load_rps.to_bits())?;
        let e = table.estimate(p.class, p.tp, p.clock_mhz, p.load_rps)?;
        Ok(HeldOut {
            class: p.class.to_string(),
            tp: p.tp,
            clock_mhz: p.clock_mhz,
            load_rps: p.load_rps,
            energy_per_req_j: (m.energy_per_req_j, e.energy_per_req_j),
            ttft_p99_s: (m.ttft_p99_s, e.ttft_p99_s),
            tbt_p99_s: (m.tbt_p99_s, e.tbt_p99_s),
        })
    };
    if target.concurrent() {
        points.par_iter().map(one).collect()
    } else {
        points.iter().map(one).collect()
    }
}

/// MAPEs per class, then over everything.
pub fn by_class(held: &[HeldOut]) -> Vec<(String, Mape)> {
    let mut out: Vec<(String, Mape)> = RequestClass::ALL
        .iter()
        .map(|c| c.to_string())
        .filter_map(|c| {
            let pts: Vec<&HeldOut> = held.iter().filter(|h| h.class == c).collect();
            (!pts.is_empty()).then(|| (c, Mape::of(pts)))
        })
        .collect();
    out.push(("all".into(), Mape::of(held)));
    out
}
