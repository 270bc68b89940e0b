//! The controller's sans-IO core: `Controller::step(now, &Observations)`
//! returns the actions to take, each with its reason. Nothing inside sleeps
//! or does I/O; the twin drives it in virtual time and `serve` on timers.
//!
//! Three loops, as in DynamoLLM:
//! - **scale** (default every 30 min): the GPUs each pool may hold, from the
//!   forecast peak over the coming period plus the spawn lead time; pools
//!   whose load cannot justify an instance merge into the next-larger
//!   class's pool and split off again when load returns; GPUs are released
//!   only at scale-loop boundaries after load stayed low (hysteresis);
//! - **shard** (every 5 min): per pool, the least-energy mix of TP2/TP4/TP8
//!   for the predicted load within that budget (exact enumeration over
//!   profiles), applied make-before-break: new instances first, old ones
//!   retired only once the new ones serve, and only when the predicted gain
//!   over the coming period exceeds the transition's cost;
//! - **clock** (every 5 s): per instance, the least-power clock whose profile
//!   meets the SLO at its current load, with hysteresis;
//!
//! and a **backlog guard** every step: an instance whose queue grows gets the
//! top clock at once, hands half its unstarted requests to a pool mate with
//! no queue (else to the next-larger class's pool), and its pool is re-planned;
//! and an **hour guard** every step: a class whose misses over the last hour
//! pass its P99 budget puts its pool on guard (capacity cut to what its fleet
//! shows, re-planned at once, no retires) until the hour recovers.
//!
//! This file holds the controller's state and `step`, which runs the loops in
//! order; each loop lives in a module of its own: `scale` (budgets, merging
//! and splitting), `shard` (mixes, transitions, spawns and retires), `clock`,
//! `guard`, and `learn` (capacity and clock margin from attainment). `plan`
//! computes from profiles; `config` and `observe` hold the settings and what
//! the controller is given each step.

pub mod budget;
mod clock;
mod config;
mod guard;
mod learn;
mod objective;
mod observe;
pub mod plan;
mod scale;
mod shard;

pub use config::*;
pub use objective::Objective;
pub use observe::*;

use crate::profile::ProfileTable;
use actuators_core::{Action, InstanceId};
use plan::{Demand, Planner};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use telemetry_core::{RequestClass, CLASS_COUNT};

/// An action with its reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// When (s).
    pub at_s: f64,
    /// Which loop decided.
    pub source: &'static str,
    /// What to do.
    pub action: Action,
    /// Why, in words.
    pub reason: String,
    /// The pool concerned.
    pub pool: Option<u32>,
    /// The demand planned for (requests/s).
    pub planned_rps: Option<f64>,
    /// Predicted power change of the pool (W, negative saves).
    pub predicted_delta_w: Option<f64>,
    /// SLO margin at the planned load: the share of the profile's SLO-meeting
    /// capacity (within the utilisation limit) left unused.
    pub slo_margin: Option<f64>,
}

/// Routing of classes to pools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    /// Pool of each class (class index → pool id).
    pub pool_of: [u32; CLASS_COUNT],
}

/// The next-larger class a small pool merges into: the next output band of
/// the same input band (prompts of similar length share a pool, so a short
/// prompt never waits behind a long prefill it was not planned with).
pub fn merge_target(class: RequestClass) -> Option<RequestClass> {
    let i = class.index();
    let (input, output) = (i / 3, i % 3);
    (output < 2).then(|| RequestClass::from_index(input * 3 + output + 1))
}

/// What the controller plans for one pool (for status pages and tests).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolPlan {
    /// Target count per TP degree.
    pub target: BTreeMap<u32, u32>,
    /// GPUs the scale loop allows.
    pub budget_gpus: u32,
    /// Demand planned for (requests/s).
    pub planned_rps: f64,
    /// Predicted power of the target mix (W).
    pub power_w: f64,
}

/// Everything the controller has learnt and planned, for a service to
/// persist and recover after a crash (`Controller::snapshot` / `restore`).
/// Infinite times (never) are stored as `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerState {
    /// Routing of classes to pools.
    pub routing: Routing,
    /// Each pool's plan.
    pub plans: Vec<PoolPlan>,
    /// The next instance id to hand out.
    pub next_id: u32,
    /// Last run of each loop (s): scale, shard, clock.
    pub last_run_s: [Option<f64>; 3],
    /// When each instance's clock last changed (s).
    pub clock_since: BTreeMap<InstanceId, f64>,
    /// Clock changes asked for and not yet observed.
    pub pending_clock: BTreeMap<InstanceId, u32>,
    /// Instances asked to retire, and when.
    pub retiring: BTreeMap<InstanceId, f64>,
    /// Spawns asked for and not yet observed: id → (pool, tp, when).
    pub spawning: BTreeMap<InstanceId, (usize, u32, f64)>,
    /// In-place reshards asked for and not yet observed done: id → (new TP, when).
    #[serde(default)]
    pub resharding: BTreeMap<InstanceId, (u32, f64)>,
    /// When each instance was first observed (s), for `retire_min_age_s`.
    #[serde(default)]
    pub first_seen: BTreeMap<InstanceId, f64>,
    /// Per pool, the capacity scale a miss last left with each count of serving instances, and when (s).
    #[serde(default)]
    pub scale_by_size: Vec<BTreeMap<u32, (f64, f64)>>,
    /// Whether the first step has run.
    pub started: bool,
    /// Per pool, since when its load has been low (s).
    pub low_since: Vec<Option<f64>>,
    /// Per pool, the learnt capacity scale.
    pub util_scale: Vec<f64>,
    /// Per pool, when the capacity was last learnt (s).
    pub learnt_at: Vec<Option<f64>>,
    /// Per pool, the clock loop's learnt margin on the load (see `ControllerConfig::clock_margin_step`).
    #[serde(default)]
    pub clock_margin: Vec<f64>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The controller.
pub struct Controller {
    cfg: ControllerConfig,
    profile: ProfileTable,
    routing: Routing,
    plans: Vec<PoolPlan>,
    next_id: u32,
    last_scale_s: f64,
    last_shard_s: f64,
    last_clock_s: f64,
    clock_since: BTreeMap<InstanceId, f64>,
    pending_clock: BTreeMap<InstanceId, u32>,
    /// Instances asked to retire (they keep draining until stopped).
    retiring: BTreeMap<InstanceId, f64>,
    /// Spawns asked for and not yet observed: id → (pool, tp, when).
    spawning: BTreeMap<InstanceId, (usize, u32, f64)>,
    /// In-place reshards asked for and not yet observed done: id → (new TP, when).
    resharding: BTreeMap<InstanceId, (u32, f64)>,
    /// When each instance was first observed (s).
    first_seen: BTreeMap<InstanceId, f64>,
    /// Per pool, the capacity scale a miss last left with each count of serving instances, and
    /// when: a pool behind a router carries more per instance the more instances it has.
    scale_by_size: Vec<BTreeMap<u32, (f64, f64)>>,
    started: bool,
    low_since: Vec<Option<f64>>,
    /// Per pool, the multiple of the profile's capacity that live telemetry shows it really has.
    util_scale: Vec<f64>,
    learnt_at: Vec<f64>,
    /// Per pool, when its learnt scale or margin last moved and why, in words (for the reasons of
    /// the decisions that follow; not saved).
    learnt_note: Vec<Option<(f64, String)>>,
    /// Per pool, the clock loop's margin on the load, learnt from attainment.
    clock_margin: Vec<f64>,
    planners: std::collections::HashMap<[u16; CLASS_COUNT], std::sync::Arc<Planner>>,
    /// When the backlog guard last moved requests off each instance.
    moved_at: BTreeMap<InstanceId, f64>,
    /// The overhead table's power of a starting instance, per GPU (W): from
    /// the profile's least-loaded top-clock rows at first, then learnt from
    /// the power of instances seen starting.
    starting_w_per_gpu: f64,
    /// On a fixed cluster without the scale loop: the GPUs no instance holds
    /// this step (spawns and in-place growth take from them; none may exceed
    /// the cluster). `None` where the cluster may grow.
    free_gpus: Option<u32>,
    /// Pools with spawns waiting for a full fixed cluster's GPUs: re-planned
    /// every step until the GPUs freed for them are taken.
    short_of_gpus: std::collections::BTreeSet<usize>,
    /// The least and the most power per GPU the profile shows at each (TP, clock) (W): what the power budget counts.
    max_power: BTreeMap<(u32, u32), (f64, f64)>,
    /// The load the power budget counts this step (per class, requests/s).
    budget_load: Demand,
    /// Under a power budget: the power left this step for spawns, every instance at its lowest
    /// clock (W). `None` without a budget.
    free_power_w: Option<f64>,
    /// Pools the spawn gate refused this step, and the degree each wanted.
    preempt_wanted: Vec<(usize, u32)>,
    /// Pools whose last plan the spawn gate cut short (the power budget had no room).
    power_short: std::collections::BTreeSet<usize>,
    /// Classes shed for the power budget (their arrivals turned away), and since when (s).
    shed_since: [Option<f64>; CLASS_COUNT],
    /// The hour guard's steps over the last hour (see [`Controller::hour_guard`]; not persisted:
    /// a restarted controller watches a fresh hour).
    hour_log: std::collections::VecDeque<guard::HourSample>,
    /// Each class's arrivals since the controller began (estimated from its rates).
    hour_arrived: [f64; CLASS_COUNT],
    /// When the hour guard last sampled (s).
    hour_last_s: f64,
    /// Per pool, the class whose hour heads below the P99 target, if any.
    hour_short: Vec<Option<guard::HourShort>>,
    /// Per pool, whether the hour guard put it on guard this step.
    hour_tripped: Vec<bool>,
    /// Per class, whether its misses over the last hour passed [`guard::SHED_WARN_SHARE`] of the
    /// hour's P99 budget (the power budget sheds below it from then on).
    hour_warned: [bool; CLASS_COUNT],
    /// What one GPU held weighs this step (W): the objective's mean over the coming scale period.
    gpu_w: f64,
    /// The power budget this step (W), if any (`ControllerConfig::power_budget_at`).
    budget_w: Option<f64>,
}

impl Controller {
    /// A controller over a profile.
    pub fn new(cfg: ControllerConfig, profile: ProfileTable) -> Controller {
        let pools = if cfg.loops.pools { CLASS_COUNT } else { 1 };
        let pool_of = std::array::from_fn(|c| if cfg.loops.pools { c as u32 } else { 0 });
        // A starting instance holds its GPUs at about the power of a lightly loaded one at the top
        // clock (its clock until the clock loop sees it): the least such power the profile has.
        let least = |top_only: bool| {
            profile
                .rows
                .iter()
                .filter(|r| !top_only || r.clock_mhz == cfg.max_clock_mhz)
                .map(|r| r.power_per_gpu_w)
                .fold(f64::INFINITY, f64::min)
        };
        let starting_w_per_gpu = [least(true), least(false), 0.0].into_iter().find(|w| w.is_finite()).unwrap_or(0.0);
        let max_power = budget::power_range_table(&profile);
        Controller {
            cfg,
            profile,
            routing: Routing { pool_of },
            plans: vec![PoolPlan::default(); pools],
            next_id: 0,
            last_scale_s: f64::NEG_INFINITY,
            last_shard_s: f64::NEG_INFINITY,
            last_clock_s: f64::NEG_INFINITY,
            clock_since: BTreeMap::new(),
            pending_clock: BTreeMap::new(),
            retiring: BTreeMap::new(),
            spawning: BTreeMap::new(),
            resharding: BTreeMap::new(),
            first_seen: BTreeMap::new(),
            scale_by_size: vec![BTreeMap::new(); pools],
            started: false,
            low_since: vec![None; pools],
            util_scale: vec![1.0; pools],
            learnt_at: vec![f64::NEG_INFINITY; pools],
            learnt_note: vec![None; pools],
            clock_margin: vec![1.0; pools],
            planners: std::collections::HashMap::new(),
            moved_at: BTreeMap::new(),
            starting_w_per_gpu,
            free_gpus: None,
            short_of_gpus: std::collections::BTreeSet::new(),
            max_power,
            budget_load: [0.0; CLASS_COUNT],
            free_power_w: None,
            preempt_wanted: Vec::new(),
            power_short: std::collections::BTreeSet::new(),
            shed_since: [None; CLASS_COUNT],
            hour_log: std::collections::VecDeque::new(),
            hour_arrived: [0.0; CLASS_COUNT],
            hour_last_s: f64::NEG_INFINITY,
            hour_short: vec![None; pools],
            hour_tripped: vec![false; pools],
            hour_warned: [false; CLASS_COUNT],
            gpu_w: 0.0,
            budget_w: None,
        }
    }

    /// What the controller has learnt and planned (to persist).
    pub fn snapshot(&self) -> ControllerState {
        ControllerState {
            routing: self.routing.clone(),
            plans: self.plans.clone(),
            next_id: self.next_id,
            last_run_s: [finite(self.last_scale_s), finite(self.last_shard_s), finite(self.last_clock_s)],
            clock_since: self.clock_since.clone(),
            pending_clock: self.pending_clock.clone(),
            retiring: self.retiring.clone(),
            spawning: self.spawning.clone(),
            resharding: self.resharding.clone(),
            first_seen: self.first_seen.clone(),
            scale_by_size: self.scale_by_size.clone(),
            started: self.started,
            low_since: self.low_since.clone(),
            util_scale: self.util_scale.clone(),
            learnt_at: self.learnt_at.iter().map(|&x| finite(x)).collect(),
            clock_margin: self.clock_margin.clone(),
        }
    }

    /// A controller that carries on from a snapshot. Fails when the snapshot
    /// was taken with a different pool layout.
    pub fn restore(cfg: ControllerConfig, profile: ProfileTable, st: ControllerState) -> Result<Controller, String> {
        let mut c = Controller::new(cfg, profile);
        let n = c.plans.len();
        if st.plans.len() != n || st.low_since.len() != n || st.util_scale.len() != n || st.learnt_at.len() != n {
            return Err(format!(
                "the saved controller state has {} pools, the configuration {n}; start with a fresh state directory",
                st.plans.len()
            ));
        }
        let never = |x: Option<f64>| x.unwrap_or(f64::NEG_INFINITY);
        c.routing = st.routing;
        c.plans = st.plans;
        c.next_id = st.next_id;
        c.last_scale_s = never(st.last_run_s[0]);
        c.last_shard_s = never(st.last_run_s[1]);
        c.last_clock_s = never(st.last_run_s[2]);
        c.clock_since = st.clock_since;
        c.pending_clock = st.pending_clock;
        c.retiring = st.retiring;
        c.spawning = st.spawning;
        c.resharding = st.resharding;
        c.first_seen = st.first_seen;
        // A state saved before the scale was kept per pool size starts it afresh.
        if st.scale_by_size.len() == n {
            c.scale_by_size = st.scale_by_size;
        }
        c.started = st.started;
        c.low_since = st.low_since;
        c.util_scale = st.util_scale;
        c.learnt_at = st.learnt_at.into_iter().map(never).collect();
        // A state saved before the margin was learnt starts it afresh.
        let floor = c.cfg.clock_margin_floor.min(1.0);
        if st.clock_margin.len() == n && st.clock_margin.iter().all(|m| m.is_finite() && *m >= floor - 1e-12) {
            c.clock_margin = st.clock_margin;
        }
        Ok(c)
    }

    /// Whether the power budget cut `pool`'s last plan short (a spawn it wanted had no room):
    /// what it turns away while it has no serving instance is turned away for the budget.
    pub fn power_held(&self, pool: usize) -> bool {
        self.power_short.contains(&pool)
    }

    /// Whether the power budget sheds `class` (its arrivals are turned away, reason `power-budget`).
    pub fn shed(&self, class: usize) -> bool {
        self.shed_since.get(class).is_some_and(|s| s.is_some())
    }

    /// A new objective (prices or an intensity forecast read again); the next step plans with it.
    pub fn set_objective(&mut self, objective: Objective) {
        self.cfg.objective = objective;
    }

    /// The settings.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// An action it decided did not happen (failed or timed out): forget
    /// that it is under way, so the next step decides from what is observed.
    /// A spawn no longer counts as capacity coming, a retired instance as
    /// going, a reshard as starting at its new degree, and a clock as set
    /// (the clock loop sends it again while it still wants it).
    pub fn action_failed(&mut self, action: &Action) {
        match action {
            Action::Spawn { instance, .. } => {
                self.spawning.remove(instance);
            }
            Action::Retire { instance } => {
                self.retiring.remove(instance);
            }
            Action::Reshard { instance, tp, .. } => {
                if self.resharding.get(instance).is_some_and(|&(t, _)| t == *tp) {
                    self.resharding.remove(instance);
                }
            }
            Action::SetClock { instance, clock_mhz } => {
                if self.pending_clock.get(instance) == Some(clock_mhz) {
                    self.pending_clock.remove(instance);
                }
            }
            Action::Route { .. } | Action::MoveQueued { .. } => {}
        }
    }

    /// Number of pools.
    pub fn pool_count(&self) -> usize {
        self.plans.len()
    }

    /// Current routing.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// The current plan of every pool.
    pub fn plans(&self) -> &[PoolPlan] {
        &self.plans
    }

    /// When pool `pool`'s learnt capacity scale or clock margin last moved, and what it moved on
    /// (the class's share over its window, the window's requests, and the chance of as many
    /// misses at the target), in words; `None` before it first moves.
    pub fn learnt_why(&self, pool: usize) -> Option<(f64, &str)> {
        self.learnt_note.get(pool)?.as_ref().map(|(t, why)| (*t, why.as_str()))
    }

    /// What live telemetry has taught the controller about a pool: the
    /// multiple of the profile's capacity it plans with, and the clock loop's
    /// margin on its load (the planning margin in a pool mixing prompt bands).
    pub fn learnt(&self, pool: usize) -> Option<(f64, f64)> {
        (pool < self.plans.len()).then(|| (self.util_scale[pool], self.clock_margin_of(pool)))
    }

    /// Per count of serving instances, the capacity scale a miss last left pool `pool` with,
    /// where it still speaks at `now_s` (within [`SIZE_SCALE_MEMORY_S`]): a surplus instance is
    /// retired only when the ones left carry the plan at that scale.
    pub fn scale_after_miss(&self, pool: usize, now_s: f64) -> BTreeMap<u32, f64> {
        self.scale_by_size
            .get(pool)
            .map(|m| m.keys().filter_map(|&n| Some((n, self.scale_recorded(pool, now_s, n)?))).collect())
            .unwrap_or_default()
    }

    /// The capacity scale a miss left pool `pool` with at `n` serving instances, while it still
    /// speaks at `now_s` (within [`SIZE_SCALE_MEMORY_S`]).
    fn scale_recorded(&self, pool: usize, now_s: f64, n: u32) -> Option<f64> {
        self.scale_by_size.get(pool)?.get(&n).filter(|&&(_, at)| now_s - at < SIZE_SCALE_MEMORY_S).map(|&(s, _)| s)
    }

    /// The clock loop's margin on a pool's load: the planning margin where prompt bands mix (short
    /// prompts there wait behind long prefills the single-class profile rows do not see), else the
    /// one learnt from its attainment (`learn_capacity`).
    fn clock_margin_of(&self, pool: usize) -> f64 {
        if self.mixes_bands(pool) {
            self.cfg.observed_margin
        } else {
            self.clock_margin[pool].max(self.margin_floor())
        }
    }

    /// The lowest the learnt clock margin goes now: `clock_margin_floor`, or 1 while the
    /// objective weighs a GPU above [`FLOOR_EXCHANGE_W`]. A margin below 1 lowers clocks
    /// below what the profile allows for the load, which saves energy but dips attainment
    /// more often, and each dip costs GPUs: where GPUs weigh more than that energy, clocks
    /// stay where the profile puts them.
    fn margin_floor(&self) -> f64 {
        if self.gpu_w > FLOOR_EXCHANGE_W {
            1.0
        } else {
            self.cfg.clock_margin_floor.min(1.0)
        }
    }

    /// The profile in use.
    pub fn profile(&self) -> &ProfileTable {
        &self.profile
    }

    fn pool_demand(&self, pool: usize, d: &Demand) -> Demand {
        std::array::from_fn(|c| if self.routing.pool_of[c] as usize == pool { d[c] } else { 0.0 })
    }

    /// The planner for a pool's class mix (cached by the mix rounded to 5%), with the pool's learnt capacity scale.
    fn planner(&mut self, pool: usize, shares: &Demand) -> std::sync::Arc<Planner> {
        let total: f64 = shares.iter().sum();
        let shares: Demand = if total > 0.0 {
            *shares
        } else {
            // An idle pool: plan with its own classes' shape.
            std::array::from_fn(|c| if self.routing.pool_of[c] as usize == pool { 1.0 } else { 0.0 })
        };
        self.planner_for(&shares, self.cfg.max_util * self.util_scale.get(pool).copied().unwrap_or(1.0))
    }

    fn planner_for(&mut self, shares: &Demand, max_util: f64) -> std::sync::Arc<Planner> {
        let total: f64 = shares.iter().sum::<f64>().max(1e-12);
        let mut key: [u16; CLASS_COUNT] = std::array::from_fn(|c| {
            let q = (shares[c] / total * 20.0).round() as u16;
            if shares[c] > 0.0 {
                q.max(1)
            } else {
                0
            }
        });
        // The utilisation limit is part of the key (in 1% steps).
        key[0] |= ((max_util * 100.0).round() as u16) << 8;
        if let Some(p) = self.planners.get(&key) {
            return p.clone();
        }
        let q: Demand = std::array::from_fn(|c| f64::from(key[c] & 0xff));
        let p = std::sync::Arc::new(Planner::new(&self.profile, &self.cfg.tps, &q, max_util));
        self.planners.insert(key, p.clone());
        p
    }

    /// Whether a pool serves classes of more than one prompt band.
    fn mixes_bands(&self, pool: usize) -> bool {
        let mut bands = (0..CLASS_COUNT)
            .filter(|&c| self.routing.pool_of[c] as usize == pool)
            .map(|c| RequestClass::from_index(c).input);
        bands.next().is_some_and(|first| bands.any(|b| b != first))
    }

    /// One control step at time `now_s`.
    pub fn step(&mut self, now_s: f64, obs: &Observations) -> Vec<Decision> {
        let mut out = Vec::new();
        self.gpu_w = self.cfg.objective.gpu_w_over(now_s, now_s + self.cfg.scale_period_s);
        self.budget_w = self.cfg.power_budget_at(now_s);
        for &s in &obs.observed_spawn_s {
            // The overhead table learns the spawn time (EWMA).
            self.cfg.spawn_lead_s = 0.7 * self.cfg.spawn_lead_s + 0.3 * s;
        }
        // …and the power of an instance coming up, from the instances seen starting.
        for i in obs.instances.iter().filter(|i| i.state == InstanceState::Starting && i.tp > 0) {
            if let Some(w) = i.power_w.filter(|w| w.is_finite() && *w >= 0.0) {
                self.starting_w_per_gpu = 0.9 * self.starting_w_per_gpu + 0.1 * w / f64::from(i.tp);
            }
        }
        let short = if self.cfg.loops.scale || self.cfg.loops.shard || self.cfg.loops.clock {
            self.hour_guard(now_s, obs);
            self.learn_capacity(obs)
        } else {
            Vec::new()
        };
        self.retiring.retain(|id, _| obs.instances.iter().any(|i| i.id == *id));
        if self.cfg.retire_min_age_s > 0.0 {
            let present: std::collections::HashSet<InstanceId> = obs.instances.iter().map(|i| i.id).collect();
            self.first_seen.retain(|id, _| present.contains(id));
            for i in &obs.instances {
                self.first_seen.entry(i.id).or_insert(now_s);
            }
        } else {
            self.first_seen.clear();
        }
        // A spawn counts as starting until the instance shows up (or clearly failed).
        let give_up_s = 2.0 * self.cfg.spawn_lead_s + 60.0;
        self.spawning.retain(|id, (_, _, at)| !obs.instances.iter().any(|i| i.id == *id) && now_s - *at < give_up_s);
        // A reshard counts as starting at its new degree until the instance serves at it.
        self.resharding.retain(|id, (tp, at)| {
            obs.instances.iter().any(|i| i.id == *id && !(i.tp == *tp && i.state == InstanceState::Serving))
                && now_s - *at < give_up_s
        });
        let seen: Vec<InstanceObs> = obs
            .instances
            .iter()
            .map(|i| match self.resharding.get(&i.id) {
                Some(&(tp, _)) => InstanceObs { tp, state: InstanceState::Starting, ..*i },
                None => *i,
            })
            .collect();
        let live: Vec<&InstanceObs> = seen.iter().filter(|i| i.state != InstanceState::Draining).collect();
        // A fixed cluster holds no more than its GPUs: what every instance holds (draining ones and
        // in-place growth included) and what the spawns under way will hold.
        self.free_gpus = match (self.cfg.loops.scale, self.cfg.fixed_gpus) {
            (false, Some(total)) if self.started => {
                let held: u32 =
                    seen.iter().map(|i| i.tp).sum::<u32>() + self.spawning.values().map(|&(_, tp, _)| tp).sum::<u32>();
                Some(total.saturating_sub(held))
            }
            _ => None,
        };
        let scale_due = now_s - self.last_scale_s >= self.cfg.scale_period_s - 1e-9;
        let shard_due = !self.started || now_s - self.last_shard_s >= self.cfg.shard_period_s - 1e-9;
        let clock_due = now_s - self.last_clock_s >= self.cfg.clock_period_s - 1e-9;
        // Demand for planning: forecast peaks, never below what is observed now (with margin).
        let recent: Demand =
            std::array::from_fn(|c| obs.class_rps_recent[c].max(obs.class_rps_smoothed[c]) * self.cfg.observed_margin);
        let plan_scale: Demand = std::array::from_fn(|c| obs.class_peak_scale.map_or(0.0, |p| p[c]).max(recent[c]));
        let plan_shard: Demand = std::array::from_fn(|c| obs.class_peak_shard.map_or(0.0, |p| p[c]).max(recent[c]));
        if self.budget_w.is_some() {
            self.learn_max_power(obs);
        }
        // Classes shed for the power budget are turned away: nothing is planned for them.
        self.unshed(now_s, obs, &recent);
        let unshed =
            |d: Demand| -> Demand { std::array::from_fn(|c| if self.shed_since[c].is_some() { 0.0 } else { d[c] }) };
        let (recent, plan_scale, plan_shard) = (unshed(recent), unshed(plan_scale), unshed(plan_shard));
        self.free_power_w = self.power_room_at_step_start(obs, &recent);
        let guard = self.backlog_guard(now_s, obs, &mut out);
        if scale_due || !self.started {
            self.last_scale_s = now_s;
            if self.cfg.loops.pools {
                self.replan_routing(now_s, &plan_scale, &mut out);
            }
            for pool in 0..self.plans.len() {
                let d = self.pool_demand(pool, &plan_scale);
                let total: f64 = d.iter().sum();
                let budget = if self.cfg.loops.scale || !self.started {
                    let gpu_w = self.gpu_w;
                    self.planner(pool, &d)
                        .best_mix_weighted(total, self.cfg.gpu_budget, u32::from(total > 0.0), gpu_w)
                        .map(|m| m.gpus)
                        .unwrap_or(0)
                } else {
                    self.plans[pool].budget_gpus
                };
                // Hysteresis: grow at once, shrink only after a whole period of low load.
                let old = self.plans[pool].budget_gpus;
                let b = if budget >= old || !self.started {
                    self.low_since[pool] = None;
                    budget
                } else {
                    match self.low_since[pool] {
                        Some(t) if now_s - t >= self.cfg.scale_period_s - 1e-9 => {
                            self.low_since[pool] = Some(now_s);
                            budget
                        }
                        Some(_) => old,
                        None => {
                            self.low_since[pool] = Some(now_s);
                            old
                        }
                    }
                };
                self.plans[pool].budget_gpus = b;
            }
        }
        if shard_due || !guard.is_empty() {
            self.last_shard_s = now_s;
            if self.cfg.loops.scale && self.started {
                // Scale out at once, between scale periods too, when the load seen now (with its
                // margin) needs more GPUs than the pool's budget: the forecast missed a rise.
                for pool in 0..self.plans.len() {
                    if self.grow_budget(pool, &recent) {
                        self.low_since[pool] = None;
                    }
                }
            }
            if !self.cfg.loops.scale {
                if let Some(total) = self.cfg.fixed_gpus {
                    self.share_fixed_gpus(total, &plan_shard);
                }
            }
            for pool in self.pools_by_rank() {
                self.shard_pool(now_s, pool, &plan_shard, &live, obs, &mut out);
            }
        } else if self.cfg.loops.scale {
            // A pool missing its SLO is re-planned now with its learnt capacity (its budget may grow at
            // once); so is a pool whose load seen now (smoothed, with its margin) has passed what it was
            // planned for: the forecast missed a rise, and the next shard period may be minutes away.
            let seen_now: Demand = std::array::from_fn(|c| obs.class_rps_smoothed[c] * self.cfg.observed_margin);
            let mut short = short;
            for pool in 0..self.plans.len() {
                let load: f64 = self.pool_demand(pool, &seen_now).iter().sum();
                if self.started
                    && load > self.plans[pool].planned_rps * self.cfg.rise_replan + 1e-9
                    && !short.contains(&pool)
                {
                    short.push(pool);
                }
            }
            for &pool in &short {
                self.grow_budget(pool, &plan_scale);
                self.shard_pool(now_s, pool, &plan_shard, &live, obs, &mut out);
            }
        } else {
            // A fixed cluster's pool whose new mix waits for GPUs takes them as soon as they are freed.
            for pool in self.short_of_gpus.clone() {
                self.shard_pool(now_s, pool, &plan_shard, &live, obs, &mut out);
            }
        }
        if self.cfg.loops.clock && clock_due {
            self.last_clock_s = now_s;
            // The load seen now, without the planning margin (except in a pool mixing prompt bands, see
            // `clock_loop`): that covers what may come before new capacity is up (the spawn lead); a clock
            // follows the load within a period (5 s), and the backlog guard takes an instance to the top
            // clock at once.
            let load_now: Demand = std::array::from_fn(|c| obs.class_rps_recent[c].max(obs.class_rps_smoothed[c]));
            self.clock_loop(now_s, obs, &load_now, &guard, &mut out);
        }
        for (pool, tp) in std::mem::take(&mut self.preempt_wanted) {
            self.preempt_for(now_s, pool, tp, &live, &mut out);
        }
        self.fit_clocks_to_budget(now_s, obs, &mut out);
        self.started = true;
        out
    }

    fn plans_have_traffic(&self, pool: usize) -> bool {
        self.plans.get(pool).is_some_and(|p| p.planned_rps > 0.0)
    }
}

fn pool_name(pool: usize, per_class: bool) -> String {
    if per_class {
        RequestClass::from_index(pool).to_string()
    } else {
        "all".into()
    }
}

/// Takes `gpus` from a fixed cluster's free GPUs; false (taking none) when
/// too few are free. Always true where the cluster may grow (`None`).
fn take_gpus(free_gpus: &mut Option<u32>, gpus: u32) -> bool {
    match free_gpus {
        None => true,
        Some(free) if *free >= gpus => {
            *free -= gpus;
            true
        }
        Some(_) => false,
    }
}
