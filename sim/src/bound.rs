//! The least-energy static pool for one class at one steady load, found by
//! replay in the twin: for each TP degree and clock, the fewest identical
//! instances whose pool (behind the twin's router) holds a share of the
//! class's requests within its SLOs, and of those the one spending the least
//! energy per request. `dynamollm bound` sums these over a workload's
//! windows: a hindsight reference for the controller, measured on the twin's
//! physics (which the controller never reads).

use crate::cluster::{Cluster, ClusterSpec, InstanceSpec, PoolSpec};
use crate::measure::steady_arrivals;
use crate::physics::Physics;
use crate::stats::ClassSlo;
use telemetry_core::{ClassBoundaries, LengthSamples, RequestClass, CLASS_COUNT};

/// Shortest replay of one candidate pool (virtual seconds).
pub const MIN_REPLAY_S: f64 = 1800.0;
/// A replay lasts long enough for this many requests (a P99 over fewer is noise)…
pub const MIN_REPLAY_REQUESTS: f64 = 5000.0;
/// …but no longer than this (virtual seconds).
pub const MAX_REPLAY_S: f64 = 6.0 * 3600.0;

/// A class needs at least this many requests in a replay before its own attainment is judged
/// (a pool serving several classes): fewer are judged only within the pool's total.
pub const MIN_CLASS_REQUESTS: u64 = 200;

/// What one search is for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchSpec {
    /// Each class's SLOs (a pool may serve several classes).
    pub slo: [ClassSlo; CLASS_COUNT],
    /// Share of the requests (and of the token gaps) that must meet them, e.g. 0.995: of the
    /// pool's as a whole and of each class's with at least [`MIN_CLASS_REQUESTS`] in the replay.
    pub attainment: f64,
    /// Most GPUs one pool may hold.
    pub max_gpus: u32,
    /// Seed of the Poisson arrivals (the same for every candidate).
    pub seed: u64,
}

/// One measured homogeneous pool.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StaticPool {
    /// Tensor-parallel degree of every instance.
    pub tp: u32,
    /// Locked clock of every instance.
    pub clock_mhz: u32,
    /// Instances.
    pub instances: u32,
    /// GPUs held (instances × TP).
    pub gpus: u32,
    /// GPU energy per finished request (every GPU of the pool, idle time included).
    pub energy_per_req_j: f64,
    /// Mean power of the pool.
    pub power_w: f64,
    /// The smaller of the TTFT and TBT attainments measured: over the pool's requests, and
    /// of each class with at least [`MIN_CLASS_REQUESTS`] of them, the lowest.
    pub attainment: f64,
    /// Share of the requests no instance could take (too large for the KV cache at this TP
    /// degree): more instances do not help them.
    #[serde(skip)]
    pub too_large_share: f64,
}

/// Doubling a pool that raises its attainment by less than this has reached
/// what the clock and TP degree allow.
const PLATEAU: f64 = 1e-4;
/// …unless it holds almost nothing: an overloaded pool's backlog grows until
/// nearly every request misses, whether it has one instance or two.
const PLATEAU_FLOOR: f64 = 0.05;

/// How long a candidate is replayed at `rate_rps`.
pub fn replay_s(rate_rps: f64) -> f64 {
    (MIN_REPLAY_REQUESTS / rate_rps.max(1e-9)).clamp(MIN_REPLAY_S, MAX_REPLAY_S)
}

/// Replay a steady Poisson load of `rate_rps` (lengths from `lengths`: one class's, or the mix
/// of the classes a pool serves) on `instances` identical TP`tp` instances at `clock_mhz`
/// behind the twin's router.
pub fn measure_pool(
    physics: &Physics,
    lengths: &LengthSamples,
    spec: &SearchSpec,
    rate_rps: f64,
    tp: u32,
    clock_mhz: u32,
    instances: u32,
) -> StaticPool {
    let layout = ClusterSpec {
        pools: vec![PoolSpec { name: "pool".into(), classes: RequestClass::ALL.to_vec() }],
        instances: (0..instances).map(|_| InstanceSpec { pool: 0, tp, clock_mhz }).collect(),
    };
    let duration_s = replay_s(rate_rps);
    let mut c = Cluster::new(physics, &layout, ClassBoundaries::default(), spec.slo);
    c.set_timeline_step(f64::INFINITY);
    c.replay(steady_arrivals(lengths, rate_rps, duration_s, spec.seed).map(Ok), |_| {})
        .expect("synthetic arrivals cannot fail");
    let t = c.finish(duration_s);
    let share = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    let (mut ok, mut n, mut gaps_ok, mut gaps, mut done, mut too_large) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut worst_class = 1.0f64;
    for s in &t.stats.classes {
        too_large += s.rejected_for(crate::stats::RejectReason::TooLarge);
        ok += s.ttft_ok;
        n += s.ttft_n + s.rejected;
        gaps_ok += s.gaps_ok;
        gaps += s.gaps_n;
        done += s.completed;
        if s.ttft_n + s.rejected >= MIN_CLASS_REQUESTS {
            worst_class = worst_class.min(share(s.ttft_ok, s.ttft_n + s.rejected).min(share(s.gaps_ok, s.gaps_n)));
        }
    }
    StaticPool {
        tp,
        clock_mhz,
        instances,
        gpus: instances * tp,
        energy_per_req_j: if done == 0 { f64::INFINITY } else { t.energy_j / done as f64 },
        power_w: t.energy_j / t.duration_s.max(1e-9),
        attainment: share(ok, n).min(share(gaps_ok, gaps)).min(worst_class),
        too_large_share: if n == 0 { 0.0 } else { too_large as f64 / n as f64 },
    }
}

/// The fewest TP`tp` instances at `clock_mhz` that hold `spec.attainment` at
/// `rate_rps` (doubling, then bisection), or `None` within `spec.max_gpus`.
/// The doubling gives up early where more instances cannot help: requests too
/// large for the instance's KV cache, or an attainment that doubling the pool
/// no longer raises (requests that miss even on an idle instance).
pub fn fewest_instances(
    physics: &Physics,
    lengths: &LengthSamples,
    spec: &SearchSpec,
    rate_rps: f64,
    tp: u32,
    clock_mhz: u32,
) -> Option<StaticPool> {
    search_fewest(spec.max_gpus / tp.max(1), spec.attainment, |n| {
        measure_pool(physics, lengths, spec, rate_rps, tp, clock_mhz, n)
    })
}

/// The search behind [`fewest_instances`], over any measurement of an `n`-instance pool: the
/// fewest instances (at most `max_n`) whose pool holds `attainment`.
pub fn search_fewest(max_n: u32, attainment: f64, mut measure: impl FnMut(u32) -> StaticPool) -> Option<StaticPool> {
    let holds = |p: &StaticPool| p.attainment >= attainment;
    let (mut lo, mut hi) = (0u32, 1u32);
    let mut last = f64::NEG_INFINITY;
    let mut best = loop {
        if hi > max_n {
            // One last try at the limit itself.
            if lo >= max_n {
                return None;
            }
            let p = measure(max_n);
            if !holds(&p) {
                return None;
            }
            hi = max_n;
            break p;
        }
        let p = measure(hi);
        if holds(&p) {
            break p;
        }
        if p.too_large_share > 1.0 - attainment || (p.attainment >= PLATEAU_FLOOR && p.attainment <= last + PLATEAU) {
            return None;
        }
        last = p.attainment;
        lo = hi;
        hi *= 2;
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let p = measure(mid);
        if holds(&p) {
            hi = mid;
            best = p;
        } else {
            lo = mid;
        }
    }
    Some(best)
}

/// The least-energy homogeneous pool over these TP degrees and clocks, each
/// with its fewest instances; `None` when none holds the attainment.
pub fn best_static(
    physics: &Physics,
    lengths: &LengthSamples,
    spec: &SearchSpec,
    rate_rps: f64,
    tps: &[u32],
    clocks_mhz: &[u32],
) -> Option<StaticPool> {
    let mut best: Option<StaticPool> = None;
    for &tp in tps {
        for &f in clocks_mhz {
            if let Some(p) = fewest_instances(physics, lengths, spec, rate_rps, tp, f) {
                if best.is_none_or(|b| p.energy_per_req_j < b.energy_per_req_j) {
                    best = Some(p);
                }
            }
        }
    }
    best
}
