//! Measurements made in the twin the way one would make them on real
//! hardware: a single request on an idle instance, and a steady Poisson load
//! on one instance at a fixed TP degree and clock. The SLO definition, the
//! calibration anchors and the profiler all use these.

use crate::cluster::{Cluster, ClusterSpec, InstanceSpec, PoolSpec};
use crate::physics::Physics;
use crate::stats::{ClassSlo, LatencySummary};
use telemetry_core::trace::{PoissonArrivals, RateCurve, RateRow};
use telemetry_core::{ClassBoundaries, LengthSamples, Request, RequestClass, CLASS_COUNT};

const NO_SLO: ClassSlo = ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY };

fn one_instance(tp: u32, clock_mhz: u32) -> ClusterSpec {
    ClusterSpec {
        pools: vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }],
        instances: vec![InstanceSpec { pool: 0, tp, clock_mhz }],
    }
}

/// Latency of a request alone on an idle instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unloaded {
    /// Time to first token.
    pub ttft_s: f64,
    /// Median gap between tokens.
    pub tbt_p50_s: f64,
    /// Arrival to last token.
    pub e2e_s: f64,
}

/// Run one request of these lengths alone on an idle instance.
pub fn unloaded(physics: &Physics, tp: u32, clock_mhz: u32, input_tokens: u32, output_tokens: u32) -> Unloaded {
    let mut c = Cluster::new(physics, &one_instance(tp, clock_mhz), ClassBoundaries::default(), [NO_SLO; CLASS_COUNT]);
    c.arrive(&Request { arrival_s: 0.0, input_tokens, output_tokens });
    c.drain();
    let e2e_s = c.now_s();
    let all = LatencySummary::of_all(&c.stats.classes);
    Unloaded { ttft_s: all.ttft_p50_s, tbt_p50_s: all.tbt_p50_s, e2e_s }
}

/// The median (prompt, output) lengths of each class in a workload; `None` for a class it lacks.
pub fn class_medians(pairs: &[(u32, u32)], boundaries: &ClassBoundaries) -> [Option<(u32, u32)>; CLASS_COUNT] {
    let mut by: [Vec<(u32, u32)>; CLASS_COUNT] = std::array::from_fn(|_| Vec::new());
    for &(i, o) in pairs {
        by[boundaries.classify(i, o.max(1)).index()].push((i, o.max(1)));
    }
    std::array::from_fn(|c| {
        let v = &mut by[c];
        if v.is_empty() {
            return None;
        }
        let mid = v.len() / 2;
        let mut ins: Vec<u32> = v.iter().map(|p| p.0).collect();
        let mut outs: Vec<u32> = v.iter().map(|p| p.1).collect();
        ins.sort_unstable();
        outs.sort_unstable();
        Some((ins[mid], outs[mid]))
    })
}

/// A representative request of a class when the workload has none: the
/// middle of each band (the long bands use twice their cut point).
pub fn representative(class: RequestClass, b: &ClassBoundaries) -> (u32, u32) {
    use telemetry_core::LengthBand::*;
    let i = match class.input {
        Short => b.input_medium_min_tokens / 2,
        Medium => (b.input_medium_min_tokens + b.input_long_min_tokens) / 2,
        Long => b.input_long_min_tokens * 2,
    };
    let o = match class.output {
        Short => b.output_medium_min_tokens / 2,
        Medium => (b.output_medium_min_tokens + b.output_long_min_tokens) / 2,
        Long => b.output_long_min_tokens * 2,
    };
    (i.max(1), o.max(1))
}

pub use telemetry_core::SloRule;

/// Per-class SLOs for a workload (its length pairs), by the paper's definition.
pub fn class_slos(
    physics: &Physics,
    pairs: &[(u32, u32)],
    boundaries: &ClassBoundaries,
    rule: SloRule,
) -> [ClassSlo; CLASS_COUNT] {
    let medians = class_medians(pairs, boundaries);
    std::array::from_fn(|c| match rule {
        SloRule::Absolute(s) => s,
        SloRule::Multiplier(k) => {
            let (i, o) = medians[c].unwrap_or_else(|| representative(RequestClass::from_index(c), boundaries));
            let u = unloaded(physics, 8, physics.gpu.clock_max_mhz, i, o.max(2));
            ClassSlo { ttft_s: k * u.ttft_s, tbt_s: k * u.tbt_p50_s }
        }
    })
}

/// What one steady-load run on one instance measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPoint {
    /// Requests per second offered.
    pub load_rps: f64,
    /// Prompt + output tokens per second offered.
    pub load_tok_s: f64,
    /// GPU energy per finished request.
    pub energy_per_req_j: f64,
    /// Mean power per GPU over the run.
    pub power_per_gpu_w: f64,
    /// Latency and attainment against the SLO given.
    pub latency: LatencySummary,
    /// Requests finished.
    pub requests: u64,
}

/// Mean prompt + output tokens of a length sample.
pub fn mean_tokens(lengths: &LengthSamples) -> f64 {
    lengths.pairs().iter().map(|&(i, o)| f64::from(i) + f64::from(o.max(1))).sum::<f64>() / lengths.pairs().len() as f64
}

/// A steady Poisson stream of `load_rps` requests/s for `duration_s`, lengths drawn from `lengths`.
/// The profiler's HTTP load generator sends this very sequence, so a real
/// endpoint and the twin see the same requests at the same times.
pub fn steady_arrivals(
    lengths: &LengthSamples,
    load_rps: f64,
    duration_s: f64,
    seed: u64,
) -> impl Iterator<Item = Request> {
    let per_min = load_rps * 60.0;
    let minutes = duration_s / 60.0;
    let curve = RateCurve::from_rows(
        "steady load",
        vec![
            RateRow { minute: 0.0, rate_lo: per_min, rate_mid: per_min, rate_hi: per_min },
            RateRow { minute: minutes, rate_lo: per_min, rate_mid: per_min, rate_hi: per_min },
        ],
    );
    PoissonArrivals::new(curve, lengths.clone(), seed)
        .map(|r| r.expect("synthetic arrivals cannot fail"))
        .take_while(move |r| r.arrival_s < duration_s)
}

/// Offer a steady Poisson load of `load_tok_s` tokens/s (lengths drawn from
/// `lengths`) to one instance for `duration_s`, and measure it.
#[allow(clippy::too_many_arguments)]
pub fn load_point(
    physics: &Physics,
    lengths: &LengthSamples,
    tp: u32,
    clock_mhz: u32,
    load_tok_s: f64,
    duration_s: f64,
    seed: u64,
    slo: ClassSlo,
) -> LoadPoint {
    let mean_tokens = mean_tokens(lengths);
    let mut p = load_point_rps(physics, lengths, tp, clock_mhz, load_tok_s / mean_tokens, duration_s, seed, slo);
    p.load_tok_s = load_tok_s;
    p
}

/// [`load_point`] with the load in requests per second.
#[allow(clippy::too_many_arguments)]
pub fn load_point_rps(
    physics: &Physics,
    lengths: &LengthSamples,
    tp: u32,
    clock_mhz: u32,
    load_rps: f64,
    duration_s: f64,
    seed: u64,
    slo: ClassSlo,
) -> LoadPoint {
    let mean_tokens = mean_tokens(lengths);
    let mut c = Cluster::new(physics, &one_instance(tp, clock_mhz), ClassBoundaries::default(), [slo; CLASS_COUNT]);
    c.replay(steady_arrivals(lengths, load_rps, duration_s, seed).map(Ok), |_| {})
        .expect("synthetic arrivals cannot fail");
    let totals = c.finish(duration_s);
    let done: u64 = totals.stats.classes.iter().map(|c| c.completed).sum();
    LoadPoint {
        load_rps,
        load_tok_s: load_rps * mean_tokens,
        energy_per_req_j: totals.energy_j / done.max(1) as f64,
        power_per_gpu_w: totals.energy_j / totals.duration_s / f64::from(tp),
        latency: LatencySummary::of_all(&totals.stats.classes),
        requests: done,
    }
}
