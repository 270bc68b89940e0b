//! Planning from profiles: a pool's capacity and power by TP degree and
//! clock, the least-power instance mix for a demand (exact enumeration of
//! TP2/TP4/TP8 counts), and the least-power clock for an instance's load.
//!
//! A pool may serve several classes. Its demand is a vector of per-class
//! rates; an instance of TP `k` at clock `f` serves the mix at a rate of
//! `1 / Σ_c p_c / cap(c, k, f)` requests/s (`p_c` the class shares, `cap` the
//! profile's max load meeting the SLO), and its power at utilisation `u` is
//! the share-weighted mean of each class's profiled power at that
//! utilisation. Requests are routed in proportion to instance capacity, so
//! every instance of a pool runs at the same utilisation.

use crate::profile::ProfileTable;
use telemetry_core::{RequestClass, CLASS_COUNT};

/// Points of the utilisation grid the power tables are kept on.
const GRID: usize = 65;

/// Up to this many candidate mixes, [`Planner::best_mix`] enumerates them all.
pub const EXACT_MIXES: usize = 20_000;

/// Per-class rates of a pool (requests/s).
pub type Demand = [f64; CLASS_COUNT];

/// What one TP degree offers a given class mix.
#[derive(Debug, Clone)]
pub struct TpOption {
    /// TP degree.
    pub tp: u32,
    /// Mix capacity at each clock (requests/s at the SLO), clocks ascending.
    pub cap_rps: Vec<f64>,
    /// Least power per instance (W) and its clock, at load `i / (GRID-1) × max_util` of the top-clock capacity.
    power: Vec<(f64, u32)>,
    /// Power per instance at each clock on the same load grid (∞ where that clock cannot carry it).
    power_by_clock: Vec<Vec<f64>>,
    /// Top-clock capacity.
    pub top_cap_rps: f64,
}

/// One planned instance type in a mix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixPart {
    /// TP degree.
    pub tp: u32,
    /// How many.
    pub count: u32,
    /// Clock each runs at.
    pub clock_mhz: u32,
    /// Load each carries (requests/s).
    pub load_rps: f64,
}

/// The least-power mix for a demand.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    /// Parts with a non-zero count.
    pub parts: Vec<MixPart>,
    /// Predicted pool power (W).
    pub power_w: f64,
    /// GPUs used.
    pub gpus: u32,
    /// Utilisation of top-clock capacity.
    pub util: f64,
}

impl Mix {
    /// Instances of a TP degree in the mix.
    pub fn count(&self, tp: u32) -> u32 {
        self.parts.iter().filter(|p| p.tp == tp).map(|p| p.count).sum()
    }
}

/// Plans for one class mix from a profile.
#[derive(Debug, Clone)]
pub struct Planner {
    /// Per TP degree.
    pub options: Vec<TpOption>,
    /// Clocks, ascending.
    pub clocks: Vec<u32>,
    /// Plan instances to at most this share of their SLO capacity.
    pub max_util: f64,
    shares: Demand,
}

impl Planner {
    /// Build the tables for a pool whose demand has these class shares (need not sum to 1).
    /// TP degrees without profile data for a class with traffic are left out.
    pub fn new(profile: &ProfileTable, tps: &[u32], shares: &Demand, max_util: f64) -> Planner {
        let total: f64 = shares.iter().sum();
        let p: Demand = if total > 0.0 {
            std::array::from_fn(|c| shares[c] / total)
        } else {
            // No traffic: plan as if for the pool's largest class only, whatever it is.
            let mut z = [0.0; CLASS_COUNT];
            z[CLASS_COUNT - 1] = 1.0;
            z
        };
        let classes: Vec<RequestClass> = RequestClass::ALL.into_iter().filter(|c| p[c.index()] > 0.0).collect();
        let mut clocks: Vec<u32> = Vec::new();
        for c in &classes {
            for tp in tps {
                for f in profile.clocks(*c, *tp) {
                    if !clocks.contains(&f) {
                        clocks.push(f);
                    }
                }
            }
        }
        clocks.sort_unstable();
        let mut options = Vec::new();
        for &tp in tps {
            if classes.iter().any(|c| profile.clocks(*c, tp).is_empty()) {
                continue;
            }
            let cap_rps: Vec<f64> = clocks
                .iter()
                .map(|&f| {
                    let inv: f64 = classes
                        .iter()
                        .map(|c| p[c.index()] / profile.max_load_meeting_slo(*c, tp, f).unwrap_or(0.0).max(1e-9))
                        .sum();
                    1.0 / inv.max(1e-12)
                })
                .collect();
            let top_cap_rps = cap_rps.iter().cloned().fold(0.0, f64::max);
            if top_cap_rps <= 1e-6 {
                continue;
            }
            let power_by_clock: Vec<Vec<f64>> = clocks
                .iter()
                .enumerate()
                .map(|(fi, &f)| {
                    (0..GRID)
                        .map(|i| {
                            let x = top_cap_rps * max_util * i as f64 / (GRID - 1) as f64;
                            if x > cap_rps[fi] * max_util + 1e-12 {
                                return f64::INFINITY;
                            }
                            let u = x / cap_rps[fi].max(1e-12);
                            classes
                                .iter()
                                .map(|c| {
                                    let cap = profile.max_load_meeting_slo(*c, tp, f).unwrap_or(0.0);
                                    let load = (u * cap).max(1e-6);
                                    p[c.index()]
                                        * profile.estimate(*c, tp, f, load).map(|e| e.power_w).unwrap_or(f64::INFINITY)
                                })
                                .sum()
                        })
                        .collect()
                })
                .collect();
            let power = (0..GRID)
                .map(|i| {
                    let mut best = (f64::INFINITY, *clocks.last().expect("clocks"));
                    for (fi, &f) in clocks.iter().enumerate() {
                        // A clock that cannot carry the next grid point's load is not chosen here either.
                        let next_ok = i + 1 >= GRID || power_by_clock[fi][i + 1].is_finite();
                        let w = power_by_clock[fi][i];
                        if next_ok && w < best.0 {
                            best = (w, f);
                        }
                    }
                    if !best.0.is_finite() {
                        // Only the point itself is carried: fall back to any clock that does.
                        for (fi, &f) in clocks.iter().enumerate() {
                            if power_by_clock[fi][i] < best.0 {
                                best = (power_by_clock[fi][i], f);
                            }
                        }
                    }
                    best
                })
                .collect();
            options.push(TpOption { tp, cap_rps, power, power_by_clock, top_cap_rps });
        }
        Planner { options, clocks, max_util, shares: p }
    }

    /// The class shares this planner was built for.
    pub fn shares(&self) -> &Demand {
        &self.shares
    }

    fn option(&self, tp: u32) -> Option<&TpOption> {
        self.options.iter().find(|o| o.tp == tp)
    }

    /// Least power (W) and its clock for one TP`tp` instance carrying `load_rps`;
    /// `None` when no clock carries it within `max_util`.
    pub fn instance_power(&self, tp: u32, load_rps: f64) -> Option<(f64, u32)> {
        let o = self.option(tp)?;
        let x = load_rps / (o.top_cap_rps * self.max_util);
        if x > 1.0 + 1e-9 {
            return None;
        }
        let pos = x.max(0.0) * (GRID - 1) as f64;
        let i = (pos.floor() as usize).min(GRID - 2);
        let t = pos - i as f64;
        let (a, b) = (o.power[i], o.power[i + 1]);
        if !a.0.is_finite() || !b.0.is_finite() {
            return None;
        }
        // The clock must carry the load: take the clock of the upper grid point (the higher load).
        Some((a.0 + t * (b.0 - a.0), if t > 0.0 { b.1 } else { a.1 }))
    }

    /// Power (W) of one TP`tp` instance at `clock_mhz` carrying `load_rps`; `None` when that clock cannot carry it.
    pub fn power_at(&self, tp: u32, clock_mhz: u32, load_rps: f64) -> Option<f64> {
        let o = self.option(tp)?;
        let fi = self.clocks.iter().position(|&c| c == clock_mhz)?;
        if load_rps > o.cap_rps[fi] * self.max_util + 1e-12 {
            return None;
        }
        let pos = (load_rps / (o.top_cap_rps * self.max_util)).max(0.0) * (GRID - 1) as f64;
        let i = (pos.floor() as usize).min(GRID - 2);
        let t = pos - i as f64;
        let (a, b) = (o.power_by_clock[fi][i], o.power_by_clock[fi][i + 1]);
        match (a.is_finite(), b.is_finite()) {
            (true, true) => Some(a + t * (b - a)),
            (true, false) => Some(a),
            _ => None,
        }
    }

    /// The share of TP`tp`'s SLO-meeting capacity at `clock_mhz` (within the utilisation
    /// limit) that `load_rps` leaves unused; negative when it is exceeded.
    pub fn headroom(&self, tp: u32, clock_mhz: u32, load_rps: f64) -> Option<f64> {
        let o = self.option(tp)?;
        let fi = self.clocks.iter().position(|&c| c == clock_mhz)?;
        let cap = o.cap_rps[fi] * self.max_util;
        (cap > 0.0).then(|| 1.0 - load_rps / cap)
    }

    /// Whether `clock_mhz` carries `load_rps` on TP`tp` within the utilisation limit.
    pub fn carries(&self, tp: u32, clock_mhz: u32, load_rps: f64) -> bool {
        let Some(o) = self.option(tp) else { return false };
        let Some(fi) = self.clocks.iter().position(|&c| c == clock_mhz) else { return false };
        load_rps <= o.cap_rps[fi] * self.max_util + 1e-12
    }

    /// The least-power clock that carries `load_rps` on a TP`tp` instance within `max_util`.
    pub fn clock_for(&self, tp: u32, load_rps: f64) -> Option<u32> {
        self.instance_power(tp, load_rps).map(|(_, f)| f)
    }

    /// Top-clock capacity of one TP`tp` instance (requests/s at the SLO).
    pub fn capacity(&self, tp: u32) -> f64 {
        self.option(tp).map(|o| o.top_cap_rps).unwrap_or(0.0)
    }

    /// The least-power mix of TP degrees carrying `demand_rps` in total, with at
    /// most `gpu_budget` GPUs and at least `min_instances` instances. `None`
    /// when no mix fits the budget.
    ///
    /// Exact enumeration over the counts of each degree when there are at
    /// most [`EXACT_MIXES`] candidates (the largest degree's count follows
    /// from the others). Beyond that (pools of hundreds of instances), the
    /// continuous relaxation's optimum is a single degree, so each degree in
    /// turn is taken as the main one (its count within ±3 of what carries the
    /// demand alone) topped up with up to 3 instances of each other degree.
    pub fn best_mix(&self, demand_rps: f64, gpu_budget: u32, min_instances: u32) -> Option<Mix> {
        self.best_mix_weighted(demand_rps, gpu_budget, min_instances, 0.0)
    }

    /// [`Planner::best_mix`] under an objective that weighs each GPU of the mix as `gpu_w`
    /// watts besides its power (see `Objective`): the mix least in `power_w + gpu_w × gpus`.
    pub fn best_mix_weighted(&self, demand_rps: f64, gpu_budget: u32, min_instances: u32, gpu_w: f64) -> Option<Mix> {
        if self.options.is_empty() {
            return None;
        }
        let mut opts: Vec<&TpOption> = self.options.iter().collect();
        opts.sort_by_key(|o| o.tp);
        let usable = |o: &TpOption| o.top_cap_rps * self.max_util;
        let alone: Vec<u32> = opts
            .iter()
            .map(|o| ((demand_rps / usable(o)).ceil() as u32).max(min_instances).min(gpu_budget / o.tp.max(1)))
            .collect();
        let last = opts.len() - 1;
        let space: f64 = alone[..last].iter().map(|&b| f64::from(b) + 1.0).product();
        let mut best: Option<(f64, Vec<u32>)> = None;
        let mut consider = |counts: &[u32]| {
            let gpus: u32 = counts.iter().zip(&opts).map(|(n, o)| n * o.tp).sum();
            let n: u32 = counts.iter().sum();
            if gpus > gpu_budget || n == 0 || n < min_instances {
                return;
            }
            if let Some(w) = self.power_of(&opts, counts, demand_rps) {
                let w = w + gpu_w * f64::from(gpus);
                if best.as_ref().is_none_or(|(b, _)| w < *b - 1e-9) {
                    best = Some((w, counts.to_vec()));
                }
            }
        };
        let top_up = |counts: &mut Vec<u32>| {
            let cap_others: f64 = (0..last).map(|k| f64::from(counts[k]) * usable(opts[k])).sum();
            let n_others: u32 = counts[..last].iter().sum();
            let need = ((demand_rps - cap_others).max(0.0) / usable(opts[last]) - 1e-9).ceil().max(0.0) as u32;
            counts[last] = need.max(min_instances.saturating_sub(n_others));
        };
        if space <= EXACT_MIXES as f64 {
            let mut counts = vec![0u32; opts.len()];
            loop {
                top_up(&mut counts);
                consider(&counts);
                let mut k = 0;
                loop {
                    if k == last {
                        return best.and_then(|(_, c)| self.evaluate(&opts, &c, demand_rps));
                    }
                    if counts[k] < alone[k] {
                        counts[k] += 1;
                        break;
                    }
                    counts[k] = 0;
                    k += 1;
                }
            }
        }
        for main in 0..opts.len() {
            let others: Vec<usize> = (0..opts.len()).filter(|&k| k != main).collect();
            for d in -3i64..=2 {
                let n_main = (i64::from(alone[main]) + d).max(0) as u32;
                // Up to 3 of each other degree: 4^(degrees−1) combinations.
                let combos = 4usize.pow(others.len() as u32);
                for mut code in 0..combos {
                    let mut counts = vec![0u32; opts.len()];
                    counts[main] = n_main;
                    for &k in &others {
                        counts[k] = (code % 4) as u32;
                        code /= 4;
                    }
                    let cap: f64 = counts.iter().zip(&opts).map(|(&n, o)| f64::from(n) * usable(o)).sum();
                    if cap + 1e-9 < demand_rps {
                        continue;
                    }
                    consider(&counts);
                }
            }
        }
        best.and_then(|(_, c)| self.evaluate(&opts, &c, demand_rps))
    }

    /// Pool power (W) of a given fleet, `count` instances per TP degree, at
    /// the demand: `None` when it cannot carry it (or has a degree the
    /// planner has no profile for).
    pub fn power_of_fleet(&self, counts: &std::collections::BTreeMap<u32, u32>, demand_rps: f64) -> Option<f64> {
        let mut opts: Vec<&TpOption> = Vec::new();
        let mut n: Vec<u32> = Vec::new();
        for (&tp, &c) in counts.iter().filter(|(_, &c)| c > 0) {
            opts.push(self.option(tp)?);
            n.push(c);
        }
        if opts.is_empty() {
            return None;
        }
        self.power_of(&opts, &n, demand_rps)
    }

    /// The least-power part of a given fleet that carries the demand, and
    /// its power (W): instances are dropped one at a time, each time the one
    /// whose going saves the most, while the rest carry it. `None` when the
    /// whole fleet cannot carry it.
    pub fn best_sub_fleet(
        &self,
        fleet: &std::collections::BTreeMap<u32, u32>,
        demand_rps: f64,
    ) -> Option<(std::collections::BTreeMap<u32, u32>, f64)> {
        self.best_sub_fleet_weighted(fleet, demand_rps, 0.0)
    }

    /// [`Planner::best_sub_fleet`] under an objective that weighs each GPU as `gpu_w` watts
    /// besides its power: returns the part and its `power_w + gpu_w × gpus`.
    pub fn best_sub_fleet_weighted(
        &self,
        fleet: &std::collections::BTreeMap<u32, u32>,
        demand_rps: f64,
        gpu_w: f64,
    ) -> Option<(std::collections::BTreeMap<u32, u32>, f64)> {
        let weighed = |f: &std::collections::BTreeMap<u32, u32>| {
            self.power_of_fleet(f, demand_rps)
                .map(|w| w + gpu_w * f64::from(f.iter().map(|(tp, n)| tp * n).sum::<u32>()))
        };
        let mut kept = fleet.clone();
        kept.retain(|_, n| *n > 0);
        let mut w = weighed(&kept)?;
        loop {
            let mut best: Option<(u32, f64)> = None;
            for &tp in kept.keys() {
                let mut fewer = kept.clone();
                *fewer.get_mut(&tp).expect("a key of kept") -= 1;
                if let Some(x) = weighed(&fewer) {
                    if x < w - 1e-9 && best.is_none_or(|(_, b)| x < b) {
                        best = Some((tp, x));
                    }
                }
            }
            let Some((tp, x)) = best else { break };
            *kept.get_mut(&tp).expect("a key of kept") -= 1;
            kept.retain(|_, n| *n > 0);
            w = x;
        }
        Some((kept, w))
    }

    /// The utilisation every instance of a mix runs at, `None` when the mix cannot carry the demand.
    fn utilisation(&self, opts: &[&TpOption], counts: &[u32], demand_rps: f64) -> Option<f64> {
        let total_cap: f64 = opts.iter().zip(counts).map(|(o, &n)| f64::from(n) * o.top_cap_rps).sum();
        let util = demand_rps / total_cap;
        (total_cap > 0.0 && util <= self.max_util + 1e-9).then_some(util)
    }

    /// Pool power of a mix (W), `None` when it cannot carry the demand.
    fn power_of(&self, opts: &[&TpOption], counts: &[u32], demand_rps: f64) -> Option<f64> {
        let util = self.utilisation(opts, counts, demand_rps)?;
        let mut w = 0.0;
        for (o, &n) in opts.iter().zip(counts) {
            if n > 0 {
                w += f64::from(n) * self.instance_power(o.tp, util * o.top_cap_rps)?.0;
            }
        }
        Some(w)
    }

    fn evaluate(&self, opts: &[&TpOption], counts: &[u32], demand_rps: f64) -> Option<Mix> {
        let util = self.utilisation(opts, counts, demand_rps)?;
        let mut parts = Vec::new();
        let mut power_w = 0.0;
        let mut gpus = 0;
        for (o, &n) in opts.iter().zip(counts) {
            if n == 0 {
                continue;
            }
            let load = util * o.top_cap_rps;
            let (p, f) = self.instance_power(o.tp, load)?;
            power_w += f64::from(n) * p;
            gpus += n * o.tp;
            parts.push(MixPart { tp: o.tp, count: n, clock_mhz: f, load_rps: load });
        }
        Some(Mix { parts, power_w, gpus, util })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(c: usize, rps: f64) -> Demand {
        let mut d = [0.0; CLASS_COUNT];
        d[c] = rps;
        d
    }

    #[test]
    fn the_best_mix_carries_the_demand_and_beats_every_single_degree() {
        let profile = ProfileTable::bundled();
        for c in [0usize, 4, 8] {
            let p = Planner::new(&profile, &[2, 4, 8], &demand(c, 1.0), 0.9);
            for rps in [0.3, 3.0, 20.0] {
                let m = p.best_mix(rps, 10_000, 1).expect("a mix exists");
                let cap: f64 = m.parts.iter().map(|x| f64::from(x.count) * p.capacity(x.tp) * 0.9).sum();
                assert!(cap >= rps - 1e-9, "class {c} {rps} rps: capacity {cap}");
                for tp in [2, 4, 8] {
                    let cap1 = p.capacity(tp) * 0.9;
                    if cap1 <= 0.0 {
                        continue;
                    }
                    let n = (rps / cap1).ceil().max(1.0) as u32;
                    if let Some((w, _)) = p.instance_power(tp, rps / f64::from(n)) {
                        assert!(m.power_w <= f64::from(n) * w + 1e-6, "class {c} {rps} rps: mix {m:?} vs {n}×TP{tp}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_weighed_gpu_trades_power_for_fewer_gpus() {
        let profile = ProfileTable::bundled();
        let mut traded = false;
        for c in [0usize, 4, 8] {
            let p = Planner::new(&profile, &[2, 4, 8], &demand(c, 1.0), 0.7);
            for rps in [0.5, 5.0, 40.0] {
                let least = p.best_mix(rps, 100_000, 1).unwrap();
                assert_eq!(p.best_mix_weighted(rps, 100_000, 1, 0.0), Some(least.clone()), "no weight: least power");
                for gpu_w in [50.0, 500.0, 20_000.0] {
                    let m = p.best_mix_weighted(rps, 100_000, 1, gpu_w).unwrap();
                    let score = |m: &Mix| m.power_w + gpu_w * f64::from(m.gpus);
                    assert!(m.gpus <= least.gpus, "class {c} {rps} rps at {gpu_w} W: {m:?} vs {least:?}");
                    assert!(m.power_w >= least.power_w - 1e-6 && score(&m) <= score(&least) + 1e-6);
                    traded |= m.gpus < least.gpus;
                    // The part of a fleet kept under the weight carries the demand, weighs what it says, and
                    // weighs no more than the whole fleet.
                    let fleet: std::collections::BTreeMap<u32, u32> = [(2, 6), (4, 3), (8, 2)].into();
                    let gpus =
                        |f: &std::collections::BTreeMap<u32, u32>| f64::from(f.iter().map(|(t, n)| t * n).sum::<u32>());
                    if let Some((b, w)) = p.best_sub_fleet_weighted(&fleet, rps, gpu_w) {
                        let own = p.power_of_fleet(&b, rps).expect("it carries the demand") + gpu_w * gpus(&b);
                        assert!((own - w).abs() < 1e-6, "{b:?}: {w} vs {own}");
                        assert!(w <= p.power_of_fleet(&fleet, rps).unwrap() + gpu_w * gpus(&fleet) + 1e-6);
                    }
                }
            }
        }
        assert!(traded, "some weight bought fewer GPUs");
    }

    #[test]
    fn a_budget_too_small_has_no_mix() {
        let profile = ProfileTable::bundled();
        let p = Planner::new(&profile, &[2, 4, 8], &demand(8, 1.0), 0.9);
        let need = p.best_mix(50.0, 100_000, 1).unwrap();
        assert!(p.best_mix(50.0, need.gpus - 1, 1).is_none_or(|m| m.gpus < need.gpus && m.power_w >= need.power_w));
        assert!(p.best_mix(50.0, 1, 1).is_none());
    }

    #[test]
    fn lower_load_never_needs_a_higher_clock() {
        let profile = ProfileTable::bundled();
        let p = Planner::new(&profile, &[8], &demand(4, 1.0), 0.9);
        let cap = p.capacity(8);
        let mut last = 0;
        for i in 1..=20 {
            let f = p.clock_for(8, cap * 0.9 * f64::from(i) / 20.0).expect("within capacity");
            assert!(f >= last, "clock fell from {last} to {f} as load rose");
            last = f;
        }
        assert!(p.clock_for(8, cap).is_none(), "above max_util no clock carries the load");
    }
}
