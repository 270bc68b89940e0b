//! The static baselines of the paper, sized by replay in the twin:
//! `single-pool` (one pool, every instance TP8 at max clock, sized for the
//! trace's peak) and `multi-pool` (one pool per class, TP8 at max clock, each
//! sized for its class's peak): the smallest instance count whose run holds
//! every class's P99 SLOs. The policies themselves are the controller's
//! ([`controller::policy::Policy`]).

use anyhow::{bail, Result};
use controller::policy::Policy;
use sim::{ClassSlo, Cluster, ClusterSpec, InstanceSpec, Physics, PoolSpec, RunTotals, Workload, PREDICTOR_SEED};
use telemetry::{ClassBoundaries, RequestClass, CLASS_COUNT};

/// Attainment a class needs to hold its P99 SLOs.
pub const P99_ATTAINMENT: f64 = telemetry::P99_ATTAINMENT;

/// The cluster layout with `counts[p]` TP8 instances in pool `p`.
pub fn spec(policy: Policy, physics: &Physics, counts: &[u32]) -> ClusterSpec {
    let pools = match policy {
        Policy::MultiPool => RequestClass::ALL.iter().map(|c| PoolSpec { name: c.name(), classes: vec![*c] }).collect(),
        _ => vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }],
    };
    let clock_mhz = physics.gpu.clock_max_mhz;
    let instances = counts
        .iter()
        .enumerate()
        .flat_map(|(pool, &n)| (0..n).map(move |_| InstanceSpec { pool, tp: 8, clock_mhz }))
        .collect();
    ClusterSpec { pools, instances }
}

/// Replay a workload on a layout.
pub fn run(
    physics: &Physics,
    spec: &ClusterSpec,
    workload: &Workload,
    slo: [ClassSlo; CLASS_COUNT],
    progress: &mut dyn FnMut(f64),
) -> Result<RunTotals> {
    let mut cluster = Cluster::new(physics, spec, ClassBoundaries::default(), slo);
    cluster.set_predictor_accuracy(workload.predictor_accuracy, workload.seed ^ PREDICTOR_SEED);
    cluster.replay(workload.arrivals()?, progress)?;
    Ok(cluster.finish(workload.span_s.unwrap_or(0.0)))
}

/// Which pools fail: a pool fails when any class routed to it has traffic and misses its P99 SLOs.
fn failing_pools(policy: Policy, totals: &RunTotals) -> Vec<bool> {
    let mut fail = vec![false; policy.pool_count()];
    for c in RequestClass::ALL {
        let s = &totals.stats.classes[c.index()];
        if s.requests > 0 && s.slo_attainment() < P99_ATTAINMENT {
            fail[policy.pool_of(c)] = true;
        }
    }
    fail
}

/// Pools that get any traffic.
fn active_pools(policy: Policy, totals: &RunTotals) -> Vec<bool> {
    let mut active = vec![false; policy.pool_count()];
    for c in RequestClass::ALL {
        if totals.stats.classes[c.index()].requests > 0 {
            active[policy.pool_of(c)] = true;
        }
    }
    active
}

/// The smallest per-pool instance counts whose replay holds every class's
/// P99 SLOs: doubling until each pool holds, then bisection, pools in
/// parallel (they do not share instances). `on_probe` hears each tried layout.
pub fn size(
    policy: Policy,
    physics: &Physics,
    workload: &Workload,
    slo: [ClassSlo; CLASS_COUNT],
    on_probe: &mut dyn FnMut(&[u32]),
) -> Result<Vec<u32>> {
    const MAX_INSTANCES: u32 = 4096;
    let pools = policy.pool_count();
    let mut probe = |counts: &[u32]| -> Result<RunTotals> {
        on_probe(counts);
        run(physics, &spec(policy, physics, counts), workload, slo, &mut |_| {})
    };
    // Find the pools with traffic using one instance each.
    let first = probe(&vec![1; pools])?;
    let active = active_pools(policy, &first);
    let mut lo = vec![0u32; pools]; // largest count known to fail
    let mut hi: Vec<Option<u32>> = vec![None; pools]; // smallest count known to hold
    let mut cur: Vec<u32> = active.iter().map(|&a| u32::from(a)).collect();
    let mut totals = first;
    loop {
        let fail = failing_pools(policy, &totals);
        let mut done = true;
        for p in 0..pools {
            if !active[p] {
                continue;
            }
            if fail[p] {
                lo[p] = lo[p].max(cur[p]);
            } else {
                hi[p] = Some(hi[p].map_or(cur[p], |h| h.min(cur[p])));
            }
            cur[p] = match hi[p] {
                None => {
                    if cur[p] >= MAX_INSTANCES {
                        bail!("pool {p} misses its SLOs even with {MAX_INSTANCES} instances");
                    }
                    (cur[p] * 2).min(MAX_INSTANCES)
                }
                Some(h) if h > lo[p] + 1 => lo[p] + (h - lo[p]) / 2,
                Some(h) => h,
            };
            if hi[p] != Some(cur[p]) {
                done = false;
            }
        }
        if done {
            return Ok(cur);
        }
        totals = probe(&cur)?;
    }
}
