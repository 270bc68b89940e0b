//! The shard loop: per pool, the least-power TP mix for the predicted load
//! within its budget, the transition check that keeps the fleet when a new
//! mix is not worth its cost, and make-before-break: spawns (or in-place
//! reshards) first, retires once the target serves and the rest carries the
//! load and the plan.

use super::plan::{self, Demand, Planner};
use super::*;
use actuators_core::{Action, InstanceId, PoolId, SpawnFrom};
use std::collections::BTreeMap;

impl Controller {
    /// The transition check of the shard loop: a change of mix that needs new
    /// instances is applied only when its predicted gain over the coming
    /// period exceeds its cost from the overhead table (each new instance
    /// holds its GPUs at the learnt starting power for the learnt spawn
    /// lead before it serves, while the old fleet keeps serving). The gain
    /// is counted against the best that needs no new instance: the
    /// least-power part of the fleet there is (with its spawns under way)
    /// that carries the plan. An instance that grows in place to a wanted
    /// degree is not counted as new. Returns that part and its predicted
    /// power when the change does not pay; `None` when the change goes
    /// ahead: it needs no new instance, or the fleet cannot carry the plan,
    /// or it pays.
    pub(super) fn held_fleet(
        &self,
        pool: usize,
        members: &[&InstanceObs],
        planner: &Planner,
        target: &BTreeMap<u32, u32>,
        demand_rps: f64,
        target_w: f64,
    ) -> Option<(BTreeMap<u32, u32>, f64)> {
        let mut current: BTreeMap<u32, u32> = BTreeMap::new();
        for i in members {
            if matches!(i.state, InstanceState::Serving | InstanceState::Starting) && !self.retiring.contains_key(&i.id)
            {
                *current.entry(i.tp).or_default() += 1;
            }
        }
        for &(p, tp, _) in self.spawning.values() {
            if p == pool {
                *current.entry(tp).or_default() += 1;
            }
        }
        // What an in-place reshard supplies costs no spawn: the instance is out only while its
        // weights move (~0.1 s). The rest of what is missing is spawned.
        let mut growable: Vec<u32> =
            self.in_place_surplus(members.iter().copied(), target).iter().map(|i| i.tp).collect();
        let mut new_gpus = 0;
        for (&tp, &n) in target {
            for _ in current.get(&tp).copied().unwrap_or(0)..n {
                match growable.iter().position(|&k| k < tp) {
                    Some(k) => {
                        growable.remove(k);
                    }
                    None => new_gpus += tp,
                }
            }
        }
        if new_gpus == 0 {
            return None;
        }
        // Under an objective that weighs GPUs, each GPU counts `gpu_w` besides its power, the new
        // ones' too while they start.
        let gpu_w = self.gpu_w;
        let (kept, kept_score) = planner.best_sub_fleet_weighted(&current, demand_rps, gpu_w)?;
        let kept_w = kept_score - gpu_w * f64::from(kept.iter().map(|(tp, n)| tp * n).sum::<u32>());
        let target_score = target_w + gpu_w * f64::from(target.iter().map(|(tp, n)| tp * n).sum::<u32>());
        let gain_j = (kept_score - target_score) * (self.cfg.shard_period_s - self.cfg.spawn_lead_s).max(0.0);
        let cost_j = f64::from(new_gpus) * (self.starting_w_per_gpu + gpu_w) * self.cfg.spawn_lead_s;
        // A new mix that saves less than `mix_hysteresis` of the power is not worth the churn either:
        // the load that made it look better a period ago often turns back the next.
        let small = kept_score - target_score < self.cfg.mix_hysteresis * kept_score;
        (gain_j <= cost_j || small).then_some((kept, kept_w))
    }

    /// Under an objective that weighs GPUs, what decided a pool's mix, for the reasons: the
    /// weight of a GPU this hour and the prices behind it, and the least-power mix it was
    /// chosen over where they differ. Empty under energy alone.
    fn objective_terms(
        &self,
        planner: &Planner,
        mix: &plan::Mix,
        total: f64,
        budget: u32,
        min_instances: u32,
    ) -> String {
        if self.gpu_w <= 0.0 || !self.cfg.loops.shard {
            return String::new();
        }
        let o = &self.cfg.objective;
        let budget = budget.max(planner.options.iter().map(|o| o.tp).min().unwrap_or(8));
        let versus = match planner.best_mix(total, budget, min_instances) {
            Some(e) if e.gpus != mix.gpus || (e.power_w - mix.power_w).abs() > 1e-6 => format!(
                ": {} GPUs at {:.0} W chosen over the least-power {} GPUs at {:.0} W",
                mix.gpus, mix.power_w, e.gpus, e.power_w
            ),
            _ => ": the least-power mix is also the objective's".to_string(),
        };
        format!("; objective {} ({}): a GPU weighs {:.0} W this period{versus}", o.name, o.terms, self.gpu_w)
    }

    /// What the pool last learnt from its attainment, and when, for the decisions' reasons (empty
    /// when it has learnt nothing since the controller started).
    pub(super) fn learnt_terms(&self, pool: usize, now_s: f64) -> String {
        match self.learnt_note.get(pool).and_then(Option::as_ref) {
            Some((t, note)) => format!("; learnt {:.0} s ago: {note}", (now_s - t).max(0.0)),
            None => String::new(),
        }
    }

    /// Serving instances of a degree beyond its target, fewest requests
    /// first: the candidates to grow in place to a larger wanted degree.
    /// Empty unless in-place resharding is on and the controller has started.
    pub(super) fn in_place_surplus<'a>(
        &self,
        members: impl Iterator<Item = &'a InstanceObs> + Clone,
        target: &BTreeMap<u32, u32>,
    ) -> Vec<&'a InstanceObs> {
        let mut surplus: Vec<&InstanceObs> = Vec::new();
        if !(self.cfg.reshard_in_place && self.cfg.loops.shard && self.started) {
            return surplus;
        }
        let live = members.filter(|i| !self.retiring.contains_key(&i.id));
        for tp in live.clone().map(|i| i.tp).collect::<std::collections::BTreeSet<_>>() {
            let of_tp = live.clone().filter(|i| i.tp == tp);
            let extra = of_tp
                .clone()
                .filter(|i| matches!(i.state, InstanceState::Serving | InstanceState::Starting))
                .count()
                .saturating_sub(*target.get(&tp).unwrap_or(&0) as usize);
            let mut c: Vec<&InstanceObs> = of_tp.filter(|i| i.state == InstanceState::Serving).collect();
            c.sort_by_key(|i| i.outstanding);
            surplus.extend(c.into_iter().take(extra));
        }
        surplus.sort_by_key(|i| i.outstanding);
        surplus
    }

    pub(super) fn shard_pool(
        &mut self,
        now_s: f64,
        pool: usize,
        plan: &Demand,
        live: &[&InstanceObs],
        obs: &Observations,
        out: &mut Vec<Decision>,
    ) {
        let d = self.pool_demand(pool, plan);
        let total: f64 = d.iter().sum();
        let members: Vec<&InstanceObs> = live.iter().copied().filter(|i| i.pool.0 as usize == pool).collect();
        if self.cfg.loops.pools && !self.routing.pool_of.iter().any(|&p| p as usize == pool) {
            self.retire_orphans(now_s, pool, &members, live, out);
            return;
        }
        let planner = self.planner(pool, &d);
        let budget = self.plans[pool].budget_gpus;
        let has_traffic = total > 0.0;
        let min_instances = u32::from(has_traffic);
        let gpu_w = self.gpu_w;
        let mix = if self.cfg.loops.shard {
            let budget = budget.max(planner.options.iter().map(|o| o.tp).min().unwrap_or(8));
            planner.best_mix_weighted(total, budget, min_instances, gpu_w)
        } else {
            // TP8 only: with the scale loop what the demand needs, within the cluster (`gpu_budget`);
            // without it the fixed count, or the budget's and at least what the demand needs.
            let need = (total / (planner.capacity(8) * planner.max_util).max(1e-9)).ceil() as u32;
            let n = match (self.cfg.loops.scale, self.cfg.fixed_instances) {
                (true, _) => need.max(min_instances).min((self.cfg.gpu_budget / 8).max(min_instances)),
                (false, Some(n)) => n,
                (false, None) => (budget / 8).max(need),
            };
            Some(plan::Mix {
                parts: vec![plan::MixPart { tp: 8, count: n, clock_mhz: self.cfg.max_clock_mhz, load_rps: 0.0 }],
                power_w: 0.0,
                gpus: 8 * n,
                util: 0.0,
            })
        };
        let Some(mix) = mix else { return };
        let why_objective =
            self.objective_terms(&planner, &mix, total, budget, min_instances) + &self.learnt_terms(pool, now_s);
        let mut target: BTreeMap<u32, u32> = BTreeMap::new();
        for p in &mix.parts {
            *target.entry(p.tp).or_default() += p.count;
        }
        let mut predicted_w = mix.power_w;
        if self.cfg.loops.scale && self.cfg.loops.shard && self.started {
            if let Some((current, w)) = self.held_fleet(pool, &members, &planner, &target, total, mix.power_w) {
                target = current;
                predicted_w = w;
            }
        }
        // scale-shard alone holds its budget (a fixed cluster's share, else its first plan's GPUs): the
        // mix is topped up to it. (Not the GPUs its instances hold now: those include the ones this fill
        // spawned, which grew without end.)
        if !self.cfg.loops.scale && self.cfg.loops.shard && (self.started || self.cfg.fixed_gpus.is_some()) {
            let used: u32 = target.iter().map(|(tp, n)| tp * n).sum();
            let mut spare = budget.saturating_sub(used);
            // Top up with the mix's own degrees, largest first: spare capacity the router may use
            // (a smaller degree could not hold the pool's SLO), then smaller ones for what is left.
            let smallest_in_mix = target.keys().copied().min().unwrap_or(u32::MAX);
            let mut degrees: Vec<u32> = target.keys().copied().collect();
            degrees.extend(planner.options.iter().map(|o| o.tp).filter(|&tp| tp < smallest_in_mix));
            degrees.sort_unstable_by(|a, b| b.cmp(a));
            degrees.dedup();
            for tp in degrees {
                if tp > 0 && spare >= tp {
                    *target.entry(tp).or_default() += spare / tp;
                    spare %= tp;
                }
            }
        }
        let mix_margin = (mix.util > 0.0).then(|| 1.0 - mix.util / planner.max_util);
        let old_w = self.plans[pool].power_w;
        self.plans[pool] =
            PoolPlan { target: target.clone(), budget_gpus: budget, planned_rps: total, power_w: predicted_w };
        // Make before break: spawn what is missing first.
        let by_tp = |tp: u32, states: &[InstanceState]| {
            members
                .iter()
                .filter(|i| i.tp == tp && states.contains(&i.state) && !self.retiring.contains_key(&i.id))
                .count() as u32
        };
        // Serving instances of a degree beyond its target, fewest requests first: in-place reshard candidates.
        // Only to a larger degree, which adds capacity: a smaller one would take capacity away with no new
        // instance covering the gap, where spawning first and retiring after (make before break) keeps it
        // (measured on the week-long Coding run: shrinking in place too cost 0.7–1.8% more energy).
        let mut surplus = self.in_place_surplus(members.iter().copied(), &target);
        let mut all_target_serving = true;
        // GPUs the spawns that found the fixed cluster full wanted.
        let mut short_gpus: u32 = 0;
        // A degree the power budget had no room for.
        let mut short_power: Option<u32> = None;
        for (&tp, &n) in &target {
            let pending = self.spawning.values().filter(|(p, t, _)| *p == pool && *t == tp).count() as u32;
            let mut have = by_tp(tp, &[InstanceState::Serving, InstanceState::Starting]) + pending;
            if by_tp(tp, &[InstanceState::Serving]) < n {
                all_target_serving = false;
            }
            // In place first: a smaller surplus instance grows to the wanted degree. It is out for
            // the moment the weights move (DynamoLLM's in-place path: ~80 ms, its requests wait), where
            // a new instance would take the spawn lead time (30 s warm) to add anything.
            while have < n {
                let Some(k) = surplus.iter().position(|i| i.tp < tp && take_gpus(&mut self.free_gpus, tp - i.tp))
                else {
                    break;
                };
                let i = surplus.remove(k);
                self.resharding.insert(i.id, (tp, now_s));
                have += 1;
                out.push(Decision {
                    at_s: now_s,
                    source: "shard-loop",
                    action: Action::Reshard { instance: i.id, tp, path: actuators_core::ReshardPath::InPlace },
                    reason: format!(
                        "pool {} needs {n}×TP{tp} for {total:.2} req/s planned; TP{} instance {} is beyond the target {:?}: it grows in place, no new instance{why_objective}",
                        pool_name(pool, self.cfg.loops.pools),
                        i.tp,
                        i.id.0,
                        target
                    ),
                    pool: Some(pool as u32),
                    planned_rps: Some(total),
                    predicted_delta_w: Some(predicted_w - old_w),
                    slo_margin: mix_margin,
                });
            }
            for _ in have..n {
                let need_w = self.floor_draw_w(tp);
                if !super::budget::take_power(&mut self.free_power_w, need_w) {
                    // The power budget has no room: a lower-ranked pool gives up an instance (below).
                    short_power.get_or_insert(tp);
                    break;
                }
                if !take_gpus(&mut self.free_gpus, tp) {
                    // The fixed cluster is full: what is beyond the target goes first (below).
                    short_gpus += tp;
                    continue;
                }
                let id = InstanceId(self.next_id);
                self.next_id += 1;
                self.spawning.insert(id, (pool, tp, now_s));
                let clock_mhz = self.cfg.max_clock_mhz;
                out.push(Decision {
                    at_s: now_s,
                    source: if self.started { "shard-loop" } else { "initial-plan" },
                    action: Action::Spawn {
                        instance: id,
                        pool: PoolId(pool as u32),
                        tp,
                        clock_mhz,
                        from: if self.cfg.warm_spawn { SpawnFrom::WarmStandby } else { SpawnFrom::Cold },
                    },
                    reason: format!(
                        "pool {} needs {n}×TP{tp} for {total:.2} req/s planned (forecast peak over the next {:.0} s + lead {:.0} s){why_objective}",
                        pool_name(pool, self.cfg.loops.pools),
                        self.cfg.shard_period_s,
                        self.cfg.spawn_lead_s
                    ),
                    pool: Some(pool as u32),
                    planned_rps: Some(total),
                    predicted_delta_w: Some(predicted_w - old_w),
                    slo_margin: mix_margin,
                });
            }
        }
        if let Some(tp) = short_power {
            self.preempt_wanted.push((pool, tp));
            self.power_short.insert(pool);
        } else {
            self.power_short.remove(&pool);
        }
        // Break: retire extras only when the target mix is serving and the rest carries the current load.
        // On a full fixed cluster the extras go first (while the rest carries the current load), as
        // the new mix has no GPUs to come up on until they are freed.
        if short_gpus > 0 {
            self.short_of_gpus.insert(pool);
        } else {
            self.short_of_gpus.remove(&pool);
        }
        if !all_target_serving && short_gpus == 0 {
            return;
        }
        // On a full cluster, no more than the spawns waiting need (GPUs free or being freed count).
        let freeing: u32 = obs
            .instances
            .iter()
            .filter(|i| {
                i.pool.0 as usize == pool && (i.state == InstanceState::Draining || self.retiring.contains_key(&i.id))
            })
            .map(|i| i.tp)
            .sum();
        let mut to_free: Option<u32> =
            (!all_target_serving).then(|| short_gpus.saturating_sub(self.free_gpus.unwrap_or(0) + freeing));
        let current_rps: f64 =
            self.pool_demand(pool, &obs.class_rps_smoothed).iter().sum::<f64>() * self.cfg.observed_margin;
        for (tp, extra) in members
            .iter()
            .map(|i| i.tp)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|tp| {
                (
                    tp,
                    by_tp(tp, &[InstanceState::Serving, InstanceState::Starting])
                        .saturating_sub(*target.get(&tp).unwrap_or(&0)),
                )
            })
            .collect::<Vec<_>>()
        {
            if extra == 0 {
                continue;
            }
            let mut cands: Vec<&&InstanceObs> = members
                .iter()
                .filter(|i| i.tp == tp && !self.retiring.contains_key(&i.id) && i.state != InstanceState::Draining)
                .collect();
            if to_free.is_none() {
                // Instances younger than `retire_min_age_s` stay (an older one of the degree may go).
                cands.retain(|i| !self.too_young(now_s, i.id));
            }
            cands.sort_by_key(|i| (i.state == InstanceState::Serving, i.outstanding));
            for i in cands.into_iter().take(extra as usize) {
                if to_free == Some(0) {
                    break;
                }
                // A pool the hour guard holds keeps its instances: its hour has no room for a cut
                // that turns out one too far (a full fixed cluster's new mix still takes their GPUs).
                if has_traffic && to_free.is_none() && self.hour_guarded(pool) {
                    continue;
                }
                // Capacity left after this one goes must carry the current load…
                let rest = members.iter().filter(|m| {
                    m.state == InstanceState::Serving && m.id != i.id && !self.retiring.contains_key(&m.id)
                });
                let left: f64 = rest.clone().map(|m| planner.capacity(m.tp) * planner.max_util).sum();
                let left_n = rest.count() as u32;
                if has_traffic && left < current_rps {
                    continue;
                }
                // …and the plan, at the capacity scale a miss last left the pool with when it had as
                // few instances as would be left: a pool behind a router carries more per instance
                // the more instances it has, so a scale learnt with two of them overrates one alone.
                let held = self.scale_ratio_at_size(pool, now_s, left_n).is_some_and(|r| left * r < total - 1e-9);
                if has_traffic && to_free.is_none() && held {
                    continue;
                }
                self.retiring.insert(i.id, now_s);
                let why = match to_free {
                    Some(f) => {
                        to_free = Some(f.saturating_sub(tp));
                        format!(", retired before the new mix serves: the fixed cluster has no GPUs for {short_gpus} it wants")
                    }
                    None => String::new(),
                };
                out.push(Decision {
                    at_s: now_s,
                    source: if self.cfg.loops.scale { "scale-loop" } else { "shard-loop" },
                    action: Action::Retire { instance: i.id },
                    reason: format!(
                        "pool {} target is {:?} for {total:.2} req/s; TP{tp} instance not needed (remaining capacity {left:.2} req/s ≥ current {current_rps:.2}){why}{why_objective}",
                        pool_name(pool, self.cfg.loops.pools),
                        target
                    ),
                    pool: Some(pool as u32),
                    planned_rps: Some(total),
                    predicted_delta_w: Some(predicted_w - old_w),
                    slo_margin: mix_margin,
                });
            }
        }
    }

    /// A pool no class is routed to any more: once every pool that serves a
    /// class has a serving instance (so routing has moved), retire its instances.
    pub(super) fn retire_orphans(
        &mut self,
        now_s: f64,
        pool: usize,
        members: &[&InstanceObs],
        live: &[&InstanceObs],
        out: &mut Vec<Decision>,
    ) {
        self.plans[pool] = PoolPlan::default();
        let hosts_serve = self.routing.pool_of.iter().all(|&p| {
            live.iter().any(|i| i.pool.0 == p && i.state == InstanceState::Serving)
                || !self.plans_have_traffic(p as usize)
        });
        if !hosts_serve {
            return;
        }
        for i in members {
            if self.retiring.contains_key(&i.id) || self.too_young(now_s, i.id) {
                continue;
            }
            self.retiring.insert(i.id, now_s);
            out.push(Decision {
                at_s: now_s,
                source: "scale-loop",
                action: Action::Retire { instance: i.id },
                reason: format!("pool {} serves no class any more (merged)", pool_name(pool, true)),
                pool: Some(pool as u32),
                planned_rps: Some(0.0),
                predicted_delta_w: None,
                slo_margin: None,
            });
        }
    }

    /// The capacity scale a miss last left pool `pool` with at `n` serving instances, within
    /// [`SIZE_SCALE_MEMORY_S`], as a share of the one it plans with now (at most 1); `None`
    /// when there is no such record or it is not below the present one.
    pub(super) fn scale_ratio_at_size(&self, pool: usize, now_s: f64, n: u32) -> Option<f64> {
        let s_now = self.util_scale[pool];
        self.scale_recorded(pool, now_s, n).filter(|&s| s < s_now).map(|s| s / s_now)
    }

    /// Whether an instance has been up less than `retire_min_age_s`.
    pub(super) fn too_young(&self, now_s: f64, id: InstanceId) -> bool {
        self.cfg.retire_min_age_s > 0.0
            && self.first_seen.get(&id).is_some_and(|&t| now_s - t < self.cfg.retire_min_age_s - 1e-9)
    }
}
