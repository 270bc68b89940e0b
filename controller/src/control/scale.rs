//! The scale loop's share: each pool's GPU budget from the forecast peak
//! (or a fixed cluster's GPUs shared by need), and pools merging into the
//! next output band's pool and splitting off again (routing changes).

use super::plan::Demand;
use super::*;
use actuators_core::{Action, PoolId};
use telemetry_core::{RequestClass, CLASS_COUNT};

impl Controller {
    /// Raise a pool's GPU budget to what its best mix for `plan` needs, if that
    /// is more (with the pool's learnt capacity). Returns whether it grew.
    pub(super) fn grow_budget(&mut self, pool: usize, plan: &Demand) -> bool {
        match self.needed_gpus(pool, plan, self.cfg.gpu_budget) {
            Some(Some(gpus)) if gpus > self.plans[pool].budget_gpus => {
                self.plans[pool].budget_gpus = gpus;
                true
            }
            _ => false,
        }
    }

    /// The GPUs of a pool's least-power mix for its share of `plan` within
    /// `gpu_budget`: `None` when the pool has no demand, `Some(None)` when no
    /// mix within the budget carries it.
    pub(super) fn needed_gpus(&mut self, pool: usize, plan: &Demand, gpu_budget: u32) -> Option<Option<u32>> {
        let d = self.pool_demand(pool, plan);
        let total: f64 = d.iter().sum();
        let gpu_w = self.gpu_w;
        (total > 0.0).then(|| self.planner(pool, &d).best_mix_weighted(total, gpu_budget, 1, gpu_w).map(|m| m.gpus))
    }

    /// A fixed cluster's GPUs shared among the pools: each pool's share of
    /// `total_gpus` is in proportion to the GPUs its best mix for `plan`
    /// needs (pools with no class get none), so a pool that needs more takes
    /// GPUs from the others and the cluster holds all of them.
    pub(super) fn share_fixed_gpus(&mut self, total_gpus: u32, plan: &Demand) {
        let need: Vec<u32> = (0..self.plans.len())
            .map(|pool| {
                // A pool serving no class has no demand; one whose demand no mix carries asks for everything.
                self.needed_gpus(pool, plan, total_gpus).map_or(0, |g| g.unwrap_or(total_gpus))
            })
            .collect();
        let sum: u32 = need.iter().sum();
        if sum == 0 {
            return;
        }
        // Largest remainders: the shares add up to the cluster exactly.
        let exact: Vec<f64> = need.iter().map(|&n| f64::from(n) * f64::from(total_gpus) / f64::from(sum)).collect();
        let mut share: Vec<u32> = exact.iter().map(|x| x.floor() as u32).collect();
        let mut order: Vec<usize> = (0..share.len()).filter(|&p| need[p] > 0).collect();
        order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
        let left = total_gpus.saturating_sub(share.iter().sum());
        for &p in order.iter().cycle().take(left as usize) {
            share[p] += 1;
        }
        for (plan, s) in self.plans.iter_mut().zip(share) {
            plan.budget_gpus = s;
        }
    }

    /// Power of the best mix for a demand vector (W), or ∞ when none fits. Merging and splitting
    /// pools weighs power alone under every objective: with GPUs weighed in, one pool for two
    /// classes nearly always looks cheaper (fewer partly used instances), and merged output
    /// bands hold their SLOs worse than the profile says (measured on the Conversation hour at
    /// ×8: the cost objective merged five pools and missed a class's P99 with more GPU-hours).
    pub(super) fn mix_power(&mut self, d: &Demand) -> f64 {
        let total: f64 = d.iter().sum();
        if total <= 0.0 {
            return 0.0;
        }
        let p = self.planner_for(d, self.cfg.max_util);
        p.best_mix(total, self.cfg.gpu_budget, 1).map_or(f64::INFINITY, |m| m.power_w)
    }

    /// Merge a class's pool into the next-larger class's pool when one pool
    /// for both needs less power than two; split it off again when two would
    /// need clearly less than one.
    pub(super) fn replan_routing(&mut self, now_s: f64, plan: &Demand, out: &mut Vec<Decision>) {
        for class in RequestClass::ALL {
            let c = class.index();
            let own_pool = self.routing.pool_of[c] as usize;
            // Where it would go: the first larger class that keeps its own pool.
            let mut t = merge_target(class);
            while let Some(tc) = t {
                if self.routing.pool_of[tc.index()] as usize == tc.index() && tc.index() != c {
                    break;
                }
                t = merge_target(tc);
            }
            let merged = own_pool != c;
            let host = if merged { Some(own_pool) } else { t.map(|x| x.index()) };
            let Some(host) = host else { continue };
            // Demand of the host pool without this class, and with it.
            let host_d: Demand =
                std::array::from_fn(|k| if self.routing.pool_of[k] as usize == host && k != c { plan[k] } else { 0.0 });
            // Classes merged into c's own pool move with it.
            let own_d: Demand = std::array::from_fn(|k| {
                if k == c || (!merged && self.routing.pool_of[k] as usize == c) {
                    plan[k]
                } else {
                    0.0
                }
            });
            let both: Demand = std::array::from_fn(|k| host_d[k] + own_d[k]);
            let separate = self.mix_power(&host_d) + self.mix_power(&own_d);
            let together = self.mix_power(&both);
            let (action_pool, why) = if !merged && together < 0.95 * separate {
                for k in 0..CLASS_COUNT {
                    if self.routing.pool_of[k] as usize == c {
                        self.routing.pool_of[k] = host as u32;
                    }
                }
                // What either pool learnt per size was learnt on another class mix.
                self.scale_by_size[host].clear();
                self.scale_by_size[c].clear();
                (
                    host,
                    format!(
                        "one pool for {class} and {} needs {together:.0} W, two need {separate:.0} W: merge",
                        RequestClass::from_index(host)
                    ),
                )
            } else if merged && separate < 0.85 * together && plan[c] > 0.0 {
                let was = self.routing.pool_of[c] as usize;
                self.routing.pool_of[c] = c as u32;
                self.scale_by_size[was].clear();
                self.scale_by_size[c].clear();
                (c, format!("{class} on its own pool: {separate:.0} W against {together:.0} W shared: split"))
            } else {
                continue;
            };
            out.push(Decision {
                at_s: now_s,
                source: "scale-loop",
                action: Action::Route { class: class.to_string(), pool: PoolId(action_pool as u32) },
                reason: why,
                pool: Some(action_pool as u32),
                planned_rps: Some(plan[c]),
                predicted_delta_w: Some(if action_pool == c { separate - together } else { together - separate }),
                slo_margin: None,
            });
        }
    }
}
