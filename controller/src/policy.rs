//! The static baselines of the paper: `single-pool` (one pool, every instance
//! TP8 at max clock, sized for the trace's peak) and `multi-pool` (one pool
//! per class, TP8 at max clock, each sized for its class's peak). Sizing is
//! found by replay: the smallest instance count whose run holds every class's
//! P99 SLOs.

use crate::workload::Workload;
use anyhow::{bail, Result};
use sim::{ClassSlo, Cluster, ClusterSpec, InstanceSpec, Physics, PoolSpec, RunTotals};
use telemetry::{ClassBoundaries, RequestClass, CLASS_COUNT};

/// Mixed into the workload seed for the injected misclassification.
pub const PREDICTOR_SEED: u64 = 0x0075_7470_7574;

/// Attainment a class needs to hold its P99 SLOs.
pub const P99_ATTAINMENT: f64 = sim::stats::P99_ATTAINMENT;

/// A policy `dynamollm sim --policy` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// One pool of TP8 instances at max clock for every class.
    SinglePool,
    /// One pool per class, TP8 at max clock.
    MultiPool,
    /// One pool; instance count follows the forecast (TP8, top clock).
    ScaleInst,
    /// A pool per class; TP degrees change within a fixed cluster's GPUs (`sim` gives it
    /// single-pool's, sized for the peak), shared among the pools by need; no scale-in, top clock.
    ScaleShard,
    /// The single-pool layout; clocks follow the load.
    ScaleFreq,
    /// A pool per class; all three loops.
    DynamoLlm,
    /// DynamoLLM knowing the future and reconfiguring for free: the reference below it.
    Oracle,
}

impl Policy {
    /// Every policy, in the order comparisons list them.
    pub const ALL: [Policy; 7] = [
        Policy::SinglePool,
        Policy::MultiPool,
        Policy::ScaleInst,
        Policy::ScaleShard,
        Policy::ScaleFreq,
        Policy::DynamoLlm,
        Policy::Oracle,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::SinglePool => "single-pool",
            Policy::MultiPool => "multi-pool",
            Policy::ScaleInst => "scale-inst",
            Policy::ScaleShard => "scale-shard",
            Policy::ScaleFreq => "scale-freq",
            Policy::DynamoLlm => "dynamollm",
            Policy::Oracle => "oracle",
        }
    }

    /// The controller loops a controlled policy runs (`None` for the static baselines).
    pub fn loops(self) -> Option<crate::control::Loops> {
        use crate::control::Loops;
        match self {
            Policy::SinglePool | Policy::MultiPool => None,
            Policy::ScaleInst => Some(Loops { scale: true, shard: false, clock: false, pools: false }),
            Policy::ScaleShard => Some(Loops { scale: false, shard: true, clock: false, pools: true }),
            Policy::ScaleFreq => Some(Loops { scale: false, shard: false, clock: true, pools: false }),
            Policy::DynamoLlm | Policy::Oracle => Some(Loops { scale: true, shard: true, clock: true, pools: true }),
        }
    }

    /// Parse a name; an unknown one lists the valid ones.
    pub fn parse(s: &str) -> Result<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown policy `{s}`; valid policies: {}",
                Policy::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Number of pools the policy runs.
    pub fn pool_count(self) -> usize {
        match self {
            Policy::MultiPool => CLASS_COUNT,
            _ => 1,
        }
    }

    /// The pool serving a class.
    pub fn pool_of(self, class: RequestClass) -> usize {
        match self {
            Policy::MultiPool => class.index(),
            _ => 0,
        }
    }

    /// The cluster layout with `counts[p]` TP8 instances in pool `p`.
    pub fn spec(self, physics: &Physics, counts: &[u32]) -> ClusterSpec {
        let pools = match self {
            Policy::MultiPool => {
                RequestClass::ALL.iter().map(|c| PoolSpec { name: c.name(), classes: vec![*c] }).collect()
            }
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
        run(physics, &policy.spec(physics, counts), workload, slo, &mut |_| {})
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
