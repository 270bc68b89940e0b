//! The site power budget (`ControllerConfig::power_budget_w`, or its hour's period): the fleet
//! never asks for more power than the budget less its headroom. What the
//! fleet draws is counted per pool from the profile: each instance's power at
//! its clock and its share of the pool's load (the load seen now, with the
//! planning margin), where the profile says its clock carries that share; at
//! its clock's most power where it does not (a saturated instance); and never
//! below the power it is measured drawing.
//!
//! Three mechanisms, in the configured class priority (`class_priority`):
//! - a spawn goes ahead only if the fleet, every instance at its lowest
//!   clock, still fits with one more instance's idle draw (the spawn gate, in
//!   the shard loop, pools planned highest rank first);
//! - a pool refused a spawn takes an instance from the lowest-ranked pool
//!   below it that has one (retired, drained: its classes degrade first);
//! - at the end of each step the clocks asked for are lowered until the fleet
//!   fits at its clocks (the clock pass): first every clock that still carries
//!   its share of the load, lowest-ranked pools first; then below that,
//!   lowest-ranked pools first again;
//! - before a higher rank is slowed past what its load needs, once a class of
//!   that rank or above has missed three quarters of its hour's P99 budget
//!   (the hour guard's count, `SHED_WARN_SHARE`), the lowest-ranked class
//!   with load is shed: its arrivals are
//!   turned away and nothing is planned for it, until the fleet has room for
//!   it again (`Controller::shed`).

use super::*;
use actuators_core::{Action, InstanceId};

/// Standard deviations of the fleet's power the budget keeps room for above its expected draw.
/// On the Conversation hour at --scale 8 (seeds 1–3; budgets of 70%, 50% and 30% of single-pool's
/// peak): 0 let the one-second peak pass the budget by 5%; 1, 1.5 and 2 kept every second under it
/// (the highest 0.990 of the budget); 1 degraded the fewest classes at 70%.
pub const BURST_SIGMAS: f64 = 1.0;

/// A class shed for the power budget stays shed at least this long (s): its load comes back
/// whole, and a shorter hold sheds and admits it again and again.
pub const SHED_HOLD_S: f64 = 300.0;

/// After a class is shed, the next is not shed for this long (s): the first one's requests in
/// flight finish and its instances' measured power falls.
pub const SHED_SETTLE_S: f64 = 30.0;

/// One instance's draw as the budget counts it.
#[derive(Debug, Clone, Copy)]
struct Draw {
    id: InstanceId,
    pool: usize,
    tp: u32,
    clock_mhz: u32,
    /// Serving, so its clock may be set; else starting (its spawn's clock) or draining.
    settable: bool,
    /// Index of its spawn decision in this step's output, if it was spawned this step.
    spawn_at: Option<usize>,
    /// Its clock and the power it was measured drawing there (W).
    measured: Option<(u32, f64)>,
}

/// The least and the most power per GPU each (TP, clock) of a profile shows (W).
pub(super) fn power_range_table(profile: &ProfileTable) -> BTreeMap<(u32, u32), (f64, f64)> {
    let mut t: BTreeMap<(u32, u32), (f64, f64)> = BTreeMap::new();
    for r in &profile.rows {
        let e = t.entry((r.tp, r.clock_mhz)).or_insert((f64::INFINITY, 0.0));
        *e = (e.0.min(r.power_per_gpu_w), e.1.max(r.power_per_gpu_w));
    }
    t
}

impl Controller {
    /// The most power per GPU an instance of `tp` locked at `clock_mhz` draws, as the profile
    /// saw it (W): at the lowest profiled clock at or above it; past the profile's clocks, its
    /// highest; a degree it lacks, the most of any degree.
    pub(super) fn max_power_per_gpu_w(&self, tp: u32, clock_mhz: u32) -> f64 {
        let of_tp = self.max_power.range((tp, 0)..=(tp, u32::MAX));
        of_tp
            .clone()
            .find(|((_, c), _)| *c >= clock_mhz)
            .or_else(|| of_tp.last())
            .map(|(_, &(_, w))| w)
            .unwrap_or_else(|| self.max_power.values().map(|&(_, w)| w).fold(0.0, f64::max))
    }

    /// The least power per GPU the profile shows for `tp` at its lowest clock (W): an idle instance's.
    fn idle_power_per_gpu_w(&self, tp: u32) -> f64 {
        self.max_power.range((tp, 0)..=(tp, u32::MAX)).next().map_or(0.0, |(_, &(w, _))| w)
    }

    /// The lowest clock the profile has for `tp` (the top clock where it has none).
    pub(super) fn min_clock_mhz(&self, tp: u32) -> u32 {
        self.max_power.range((tp, 0)..=(tp, u32::MAX)).next().map_or(self.cfg.max_clock_mhz, |((_, c), _)| *c)
    }

    /// The profiled clocks of `tp` below `clock_mhz`, highest first.
    fn clocks_below(&self, tp: u32, clock_mhz: u32) -> Vec<u32> {
        let mut v: Vec<u32> =
            self.max_power.range((tp, 0)..(tp, clock_mhz)).map(|((_, c), _)| *c).filter(|&c| c < clock_mhz).collect();
        v.reverse();
        v
    }

    /// A pool's rank under the budget: its best-ranked class's (`u8::MAX` when no class is routed to it).
    pub(super) fn pool_rank(&self, pool: usize) -> u8 {
        (0..telemetry_core::CLASS_COUNT)
            .filter(|&c| self.routing.pool_of[c] as usize == pool)
            .map(|c| self.cfg.class_priority[c])
            .min()
            .unwrap_or(u8::MAX)
    }

    /// The pools, highest rank first (by index without a budget).
    pub(super) fn pools_by_rank(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.plans.len()).collect();
        if self.budget_w.is_some() {
            v.sort_by_key(|&p| (self.pool_rank(p), p));
        }
        v
    }

    /// The budget less its headroom (W), when there is a budget.
    fn power_limit_w(&self) -> Option<f64> {
        self.budget_w.map(|b| b * (1.0 - self.cfg.power_headroom))
    }

    /// What the fleet is: every instance observed (at the clock asked for it
    /// this step, else the one pending, else its own) and every spawn under way.
    fn draws(&self, obs: &Observations, out: &[Decision]) -> Vec<Draw> {
        let mut asked: BTreeMap<InstanceId, u32> = BTreeMap::new();
        let mut spawned: BTreeMap<InstanceId, (usize, u32)> = BTreeMap::new();
        for (k, d) in out.iter().enumerate() {
            match d.action {
                Action::SetClock { instance, clock_mhz } => {
                    asked.insert(instance, clock_mhz);
                }
                Action::Spawn { instance, clock_mhz, .. } => {
                    spawned.insert(instance, (k, clock_mhz));
                }
                _ => {}
            }
        }
        let mut v: Vec<Draw> = obs
            .instances
            .iter()
            .map(|i| {
                let tp = self.resharding.get(&i.id).map_or(i.tp, |&(tp, _)| tp);
                let clock_mhz =
                    asked.get(&i.id).or_else(|| self.pending_clock.get(&i.id)).copied().unwrap_or(i.clock_mhz);
                Draw {
                    id: i.id,
                    pool: i.pool.0 as usize,
                    tp,
                    clock_mhz,
                    settable: i.state == InstanceState::Serving,
                    spawn_at: None,
                    measured: i.power_w.filter(|w| w.is_finite() && *w >= 0.0).map(|w| (i.clock_mhz, w)),
                }
            })
            .collect();
        for (&id, &(pool, tp, _)) in &self.spawning {
            if obs.instances.iter().any(|i| i.id == id) {
                continue;
            }
            let (spawn_at, clock_mhz) = match spawned.get(&id) {
                Some(&(k, c)) => (Some(k), c),
                None => (None, self.cfg.max_clock_mhz),
            };
            v.push(Draw { id, pool, tp, clock_mhz, settable: false, spawn_at, measured: None });
        }
        v
    }

    /// What the fleet may draw in a second (W): per pool, each instance's expected power at its
    /// clock and its share of the pool's load (by its top-clock capacity), never below what it was
    /// measured drawing at that clock, where the profile says its clock carries that share, else its
    /// clock's most power (saturated); plus [`BURST_SIGMAS`] standard deviations of the fleet's
    /// sum, each instance's spread taken as half the gap from its expected to its most power (the
    /// instances' steps do not peak together).
    fn fleet_power_w(&mut self, draws: &[Draw]) -> f64 {
        let (mut total, mut var) = (0.0, 0.0);
        let mut pools: Vec<usize> = draws.iter().map(|d| d.pool).collect();
        pools.sort_unstable();
        pools.dedup();
        for pool in pools {
            let demand = self.pool_demand(pool, &self.budget_load);
            let load: f64 = demand.iter().sum();
            let planner = self.planner(pool, &demand);
            let of_pool: Vec<&Draw> = draws.iter().filter(|d| d.pool == pool).collect();
            let cap: f64 = of_pool.iter().map(|d| planner.capacity(d.tp)).sum();
            for d in of_pool {
                let share = if cap > 0.0 { load * planner.capacity(d.tp) / cap } else { 0.0 };
                let most = f64::from(d.tp) * self.max_power_per_gpu_w(d.tp, d.clock_mhz);
                let mut w = planner.power_at(d.tp, d.clock_mhz, share).unwrap_or(most);
                if let Some((c, m)) = d.measured {
                    if c == d.clock_mhz {
                        w = w.max(m);
                    }
                }
                let sd = 0.5 * (most - w).max(0.0);
                total += w;
                var += sd * sd;
            }
        }
        total + BURST_SIGMAS * var.sqrt()
    }

    /// What the instances are measured drawing raises the most power per GPU the budget counts
    /// at their degree and clock: a saturated instance may draw more than any profiled load showed.
    pub(super) fn learn_max_power(&mut self, obs: &Observations) {
        for i in obs.instances.iter().filter(|i| i.state == InstanceState::Serving && i.tp > 0) {
            let Some(w) = i.power_w.filter(|w| w.is_finite() && *w > 0.0) else { continue };
            let per_gpu = w / f64::from(i.tp);
            if let Some(e) = self.max_power.get_mut(&(i.tp, i.clock_mhz)) {
                e.1 = e.1.max(per_gpu);
            }
        }
    }

    /// At the start of a step: the power left for spawns with every instance at its lowest
    /// clock (`None` without a budget).
    pub(super) fn power_room_at_step_start(&mut self, obs: &Observations, load: &Demand) -> Option<f64> {
        let limit = self.power_limit_w()?;
        self.budget_load = *load;
        let floor: Vec<Draw> = self
            .draws(obs, &[])
            .into_iter()
            .map(|d| Draw { clock_mhz: self.min_clock_mhz(d.tp), measured: None, ..d })
            .collect();
        Some(limit - self.fleet_power_w(&floor))
    }

    /// What one more instance of `tp` adds to its pool's draw at the lowest clock (W): its idle
    /// power (the pool's load is already counted on the others): what the spawn gate takes.
    pub(super) fn floor_draw_w(&self, tp: u32) -> f64 {
        f64::from(tp) * self.idle_power_per_gpu_w(tp)
    }

    /// A pool refused a spawn by the budget takes an instance from the lowest-ranked pool below
    /// it that has one: that instance is retired (its power comes back once it has drained).
    pub(super) fn preempt_for(
        &mut self,
        now_s: f64,
        pool: usize,
        tp: u32,
        live: &[&InstanceObs],
        out: &mut Vec<Decision>,
    ) {
        let rank = self.pool_rank(pool);
        // Already freeing power for it (an instance below draining or retiring): wait for that.
        let freeing = live.iter().any(|i| {
            self.pool_rank(i.pool.0 as usize) > rank
                && (i.state == InstanceState::Draining || self.retiring.contains_key(&i.id))
        });
        if freeing {
            return;
        }
        let victim = live
            .iter()
            .filter(|i| {
                let r = self.pool_rank(i.pool.0 as usize);
                r > rank && !self.retiring.contains_key(&i.id) && i.state != InstanceState::Draining
            })
            .max_by_key(|i| (self.pool_rank(i.pool.0 as usize), i.tp, std::cmp::Reverse(i.outstanding)));
        let Some(v) = victim else { return };
        self.retiring.insert(v.id, now_s);
        out.push(Decision {
            at_s: now_s,
            source: "power-budget",
            action: Action::Retire { instance: v.id },
            reason: format!(
                "power budget {:.0} W: pool {} (rank {rank}) needs a TP{tp} the budget has no room for; pool {} (rank {}) \
                 gives up its TP{} instance {}",
                self.budget_w.unwrap_or(0.0),
                pool_name(pool, self.cfg.loops.pools),
                pool_name(v.pool.0 as usize, self.cfg.loops.pools),
                self.pool_rank(v.pool.0 as usize),
                v.tp,
                v.id.0
            ),
            pool: Some(v.pool.0),
            planned_rps: None,
            predicted_delta_w: None,
            slo_margin: None,
        });
    }

    /// The clock pass: lower the clocks asked for (lowest-ranked pools first, every instance of a
    /// pool a step at a time) until the fleet fits the budget at its clocks.
    pub(super) fn fit_clocks_to_budget(&mut self, now_s: f64, obs: &Observations, out: &mut Vec<Decision>) {
        let Some(limit) = self.power_limit_w() else { return };
        let mut draws = self.draws(obs, out);
        let before = self.fleet_power_w(&draws);
        if before <= limit {
            return;
        }
        let mut ranks: Vec<u8> = draws.iter().map(|d| self.pool_rank(d.pool)).collect();
        ranks.sort_unstable();
        ranks.dedup();
        let mut changed: Vec<usize> = Vec::new();
        let mut total = before;
        // First the clocks that still carry their share of the load (no class loses its SLO),
        // lowest-ranked pools first; then, lowest-ranked first again, below that, each rank's
        // classes shed before a higher rank is slowed past what its load needs.
        'phases: for safe in [true, false] {
            for (at, &rank) in ranks.iter().enumerate().rev() {
                if !safe && at + 1 < ranks.len() && self.shed_below(now_s, rank) {
                    total = self.fleet_power_w(&draws);
                    if total <= limit {
                        break 'phases;
                    }
                }
                loop {
                    let mut stepped = false;
                    for k in 0..draws.len() {
                        let d = draws[k];
                        if self.pool_rank(d.pool) != rank || !(d.settable || d.spawn_at.is_some()) {
                            continue;
                        }
                        let Some(&next) = self.clocks_below(d.tp, d.clock_mhz).first() else { continue };
                        if safe && !self.carries_share(&draws, k, next) {
                            continue;
                        }
                        draws[k] = Draw { clock_mhz: next, ..d };
                        if !changed.contains(&k) {
                            changed.push(k);
                        }
                        stepped = true;
                    }
                    if !stepped {
                        break;
                    }
                    total = self.fleet_power_w(&draws);
                    if total <= limit {
                        break 'phases;
                    }
                }
            }
        }
        let why = |this: &Self, d: &Draw| {
            format!(
                "power budget {:.0} W (less {:.0}% headroom): the fleet would draw {before:.0} W at the clocks asked \
                 ({total:.0} W after); pool {} (rank {}) goes to {} MHz",
                this.budget_w.unwrap_or(0.0),
                100.0 * this.cfg.power_headroom,
                pool_name(d.pool, this.cfg.loops.pools),
                this.pool_rank(d.pool),
                d.clock_mhz
            )
        };
        // Spawns of this step first (by index, before any decision is removed).
        for &k in &changed {
            let d = draws[k];
            if let Some(at) = d.spawn_at {
                let reason = why(self, &d);
                if let Action::Spawn { clock_mhz, .. } = &mut out[at].action {
                    *clock_mhz = d.clock_mhz;
                }
                out[at].reason.push_str(&format!("; {reason}"));
            }
        }
        for &k in &changed {
            let d = draws[k];
            if d.spawn_at.is_some() {
                continue;
            }
            let reason = why(self, &d);
            let current = obs.instances.iter().find(|i| i.id == d.id).map_or(d.clock_mhz, |i| i.clock_mhz);
            out.retain(|x| !matches!(x.action, Action::SetClock { instance, .. } if instance == d.id));
            if d.clock_mhz == current {
                self.pending_clock.remove(&d.id);
                continue;
            }
            self.pending_clock.insert(d.id, d.clock_mhz);
            self.clock_since.insert(d.id, now_s);
            out.push(Decision {
                at_s: now_s,
                source: "power-budget",
                action: Action::SetClock { instance: d.id, clock_mhz: d.clock_mhz },
                reason,
                pool: Some(d.pool as u32),
                planned_rps: None,
                predicted_delta_w: None,
                slo_margin: None,
            });
        }
    }
}

impl Controller {
    /// Whether instance `k` of the fleet at `clock_mhz` still carries its share of its pool's load
    /// (the load the budget counts, shared by top-clock capacity) within the utilisation limit.
    fn carries_share(&mut self, draws: &[Draw], k: usize, clock_mhz: u32) -> bool {
        let d = draws[k];
        let demand = self.pool_demand(d.pool, &self.budget_load);
        let load: f64 = demand.iter().sum();
        let planner = self.planner(d.pool, &demand);
        let cap: f64 = draws.iter().filter(|x| x.pool == d.pool).map(|x| planner.capacity(x.tp)).sum();
        let share = if cap > 0.0 { load * planner.capacity(d.tp) / cap } else { 0.0 };
        planner.carries(d.tp, clock_mhz, share)
    }

    /// Once a class ranked `rank` or above has missed `SHED_WARN_SHARE` of its hour's P99 budget: shed the
    /// lowest-ranked class with load ranked below `rank` that is not shed yet (the power budget
    /// counts its load as gone from now on), unless a class was shed less than
    /// [`SHED_SETTLE_S`] ago: its instances still finish what they hold, and their power shows
    /// the drop only then. Whether one was.
    fn shed_below(&mut self, now_s: f64, rank: u8) -> bool {
        if self.shed_since.iter().flatten().any(|&t| now_s - t < SHED_SETTLE_S) {
            return false;
        }
        // Only once a class of this rank or above has spent most of its hour's P99 budget (the hour
        // guard's count): a dip that the hour absorbs costs nothing, a shed class loses minutes. At
        // the whole budget (the hour guard's trip) the hour is already lost.
        let missing =
            (0..telemetry_core::CLASS_COUNT).any(|c| self.hour_warned[c] && self.cfg.class_priority[c] <= rank);
        if !missing {
            return false;
        }
        let Some(c) = (0..telemetry_core::CLASS_COUNT)
            .filter(|&c| self.cfg.class_priority[c] > rank && self.shed_since[c].is_none() && self.budget_load[c] > 0.0)
            .max_by_key(|&c| self.cfg.class_priority[c])
        else {
            return false;
        };
        self.shed_since[c] = Some(now_s);
        self.budget_load[c] = 0.0;
        true
    }

    /// At the start of a step: the highest-ranked shed class comes back once it has been shed
    /// [`SHED_HOLD_S`] and the fleet at its present clocks, plus the least power that carries the
    /// class's load alone in its pool (the profile's best mix for it), fits the budget.
    pub(super) fn unshed(&mut self, now_s: f64, obs: &Observations, load: &Demand) {
        let Some(limit) = self.power_limit_w() else {
            self.shed_since = [None; telemetry_core::CLASS_COUNT];
            return;
        };
        let Some(c) = (0..telemetry_core::CLASS_COUNT)
            .filter(|&c| self.shed_since[c].is_some_and(|t| now_s - t >= SHED_HOLD_S))
            .min_by_key(|&c| self.cfg.class_priority[c])
        else {
            return;
        };
        let saved = self.budget_load;
        self.budget_load = std::array::from_fn(|k| if self.shed_since[k].is_some() { 0.0 } else { load[k] });
        let draws = self.draws(obs, &[]);
        let now_w = self.fleet_power_w(&draws);
        self.budget_load = saved;
        let pool = self.routing.pool_of[c] as usize;
        let mut alone = [0.0; telemetry_core::CLASS_COUNT];
        alone[c] = load[c];
        let need_w = if load[c] > 0.0 {
            self.planner(pool, &alone).best_mix(load[c], u32::MAX, 1).map_or(f64::INFINITY, |m| m.power_w)
        } else {
            0.0
        };
        if now_w + need_w <= limit {
            self.shed_since[c] = None;
        }
    }
}

/// The spawn gate: takes `need_w` from the power left (`free`); false (taking nothing) when it does
/// not fit. Always true without a budget (`None`).
pub(super) fn take_power(free: &mut Option<f64>, need_w: f64) -> bool {
    match free {
        None => true,
        Some(room) if *room >= need_w => {
            *room -= need_w;
            true
        }
        Some(_) => false,
    }
}
