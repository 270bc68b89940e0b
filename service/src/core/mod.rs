//! The service's state machine around the sans-IO controller: it takes in
//! what telemetry reports (instances, per-class arrivals and SLO counters),
//! turns the controller's decisions into idempotent [`Command`]s with ids,
//! applies the operating mode (auto, dry-run, failsafe), tracks the
//! inventory, and answers the status page. No I/O and no clock of its own:
//! the caller passes the time, so tests drive it in virtual time.

use actuators::{Action, ActionId, Command, InstanceId, Outcome, Placement, PoolId};
use controller::control::plan::{Demand, Planner};
use controller::control::{
    Controller, ControllerConfig, ControllerState, Decision, InstanceObs, InstanceState, Observations,
};
use controller::profile::ProfileTable;
use forecast::ClassForecasts;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use telemetry::{RequestClass, CLASS_COUNT};

mod inventory;
mod observe;
mod status;
mod types;

pub use types::*;

/// The version of [`SavedState`].
pub const STATE_VERSION: u32 = 1;
const HISTORY_POINTS: usize = 720;
const DECISIONS_KEPT: usize = 2000;
const MINUTES_SAVED: usize = 7 * 1440;
const FORECAST_LEVEL_MINUTES_MIN: usize = 1;

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The controller's settings.
    pub controller: ControllerConfig,
    /// Telemetry older than this (s) puts the service in failsafe.
    pub stale_after_s: f64,
    /// Pool names (index = pool id).
    pub pool_names: Vec<String>,
    /// A retire acknowledged means the instance is gone (real clusters: the
    /// backend drains and stops it before it answers); else it drains until
    /// telemetry reports it stopped (the twin).
    pub retire_ack_means_stopped: bool,
    /// The GPUs the cluster declares it holds: no spawn or reshard takes the
    /// fleet past them (`None`: the twin, which has no such limit).
    pub declared_gpus: Option<u32>,
}

/// Counters for the service's own metrics.
#[derive(Debug, Clone, Default)]
pub struct CoreCounters {
    /// Ticks run.
    pub ticks: u64,
    /// Decisions by action kind.
    pub decisions: BTreeMap<String, u64>,
    /// Outcomes by (action kind, outcome).
    pub outcomes: BTreeMap<(String, String), u64>,
    /// Times the service entered failsafe on its own.
    pub failsafe_entries: u64,
    /// GPU and engine samples that matched no instance (unknown node, or
    /// several instances on the node and nothing to tell them apart).
    pub unmatched_samples: u64,
    /// Arrival samples refused: not a count, or a rate beyond `max_class_rps`.
    pub rejected_arrivals: u64,
    /// Commands decided but never sent: the mode changed (dry-run, failsafe) before
    /// they left, or the state that records them could not be saved.
    pub cancelled_commands: u64,
    /// Spawns and reshards not sent: they would take the fleet past the declared GPUs.
    pub refused_over_gpus: u64,
}

/// The service's state machine.
pub struct ServiceCore {
    cfg: CoreConfig,
    ctl: Controller,
    operator_mode: Mode,
    stale: Option<String>,
    instances: BTreeMap<InstanceId, InstanceRecord>,
    retired_energy_j: f64,
    seq: u64,
    /// This state's run tag, in every command id: ids stay unique after a state loss.
    run: String,
    pending: BTreeMap<ActionId, Command>,
    /// For each clock, retire or reshard command in flight, the instance as it was before it
    /// (to undo in the inventory what the command did not do).
    before: BTreeMap<ActionId, InstanceRecord>,
    window_counts: [u32; CLASS_COUNT],
    minute_counts: [u32; CLASS_COUNT],
    minute: usize,
    smoothed: Demand,
    last_recent: Demand,
    forecasts: ClassForecasts,
    att_totals: [[u64; 4]; CLASS_COUNT],
    /// Per class, the SLO counters the engines' own latency histograms gave
    /// (fractional: a histogram's bucket is interpolated at the SLO).
    engine_att: [[f64; 4]; CLASS_COUNT],
    /// The controller learns from the engines' histograms, not from the router
    /// (`controller.learn_from = "engines"`, the default without a router).
    attainment_from_engines: bool,
    /// The highest per-class arrival rate believed (req/s); an arrivals sample
    /// that would take a class's window above it is refused and counted.
    max_class_rps: f64,
    att_hist: controller::control::AttainmentHistory,
    decisions: VecDeque<DecisionRecord>,
    history: VecDeque<HistoryPoint>,
    /// When this core began listening (service s): a reading older than that counts from then.
    hear_from_s: f64,
    last_tick_s: Option<f64>,
    observed_spawn_s: Vec<f64>,
    baseline: Baseline,
    /// A backend carries out `route` (an external router told by command):
    /// the service then sends each class's route once its new pool serves,
    /// sends again a route that failed, and holds a retire until no class
    /// the backends route to its pool is left without a serving instance.
    /// Without one (the built-in router follows the table itself), no
    /// route is sent.
    routes_to_backends: bool,
    /// The routing table the backends have acknowledged (class → pool).
    routed: [u32; CLASS_COUNT],
    /// Per class: failed routes in a row, and when the last one was sent (s).
    route_failures: [(u32, f64); CLASS_COUNT],
    /// Retires held for make-before-break.
    held_retires: BTreeMap<InstanceId, HeldRetire>,
    /// The fleet the first tick asks for is up at once (the twin, as in `sim`).
    first_fleet_up: bool,
    /// Instances of that first fleet: their start teaches nothing of how long a spawn takes.
    no_spawn_lead: std::collections::BTreeSet<InstanceId>,
    /// Held retires already warned about (once each, past [`ROUTE_RETRY_MAX_S`]).
    held_warned: BTreeSet<InstanceId>,
    /// Counters for `/metrics`.
    pub counters: CoreCounters,
    /// The cluster's workload is over (a twin's replay).
    finished: bool,
    /// Why the last save of the state failed, while it fails: nothing may be sent then.
    unsaved: Option<String>,
    /// Changes whenever the mode in effect changes: a command decided in one epoch
    /// is not sent in another (see [`ServiceCore::may_send`]).
    mode_epoch: u64,
    mode_seen: Mode,
}

/// GPUs a fleet without a `gpu_budget` is taken to hold at most, for the arrival ceiling.
const CEILING_FLEET_GPUS: u32 = 1024;
/// How far above what the whole fleet could carry an arrival rate may go before it is not believed.
const CEILING_HEADROOM: f64 = 4.0;

/// The default ceiling on a class's arrival rate: `CEILING_HEADROOM` times
/// what the fleet (`gpu_budget`, else `CEILING_FLEET_GPUS`) could carry as
/// TP8 instances at the profile's capacity. A telemetry message claiming more
/// is refused, never planned for.
fn default_max_class_rps(profile: &ProfileTable, c: &ControllerConfig) -> f64 {
    let per_instance = Planner::new(profile, &[8], &[1.0; CLASS_COUNT], 1.0).capacity(8).max(1.0);
    let gpus = if c.gpu_budget > 0 && c.gpu_budget < u32::MAX { c.gpu_budget } else { CEILING_FLEET_GPUS };
    CEILING_HEADROOM * per_instance * f64::from((gpus / 8).max(1))
}

/// The longest wait before a failed route is sent again (s).
const ROUTE_RETRY_MAX_S: f64 = 300.0;

/// The `single-pool` baseline the savings are measured against, over the
/// time the service manages a serving fleet. On the twin it is replayed
/// beside the cluster (`replayed`: the twin reports its energy); on an
/// external cluster it is an estimate from the profile: TP8 at the top
/// clock, sized for the highest load seen so far, its power at the load observed.
struct Baseline {
    planner: Planner,
    max_clock_mhz: u32,
    /// The static fleet the operator declares (`cluster.baseline_instances`), else sized here.
    fixed_instances: Option<u32>,
    peak_rps: f64,
    energy_j: f64,
    power_w: f64,
    replayed: bool,
}

impl Baseline {
    fn new(profile: &ProfileTable, max_clock_mhz: u32) -> Baseline {
        let shares: Demand = [1.0; CLASS_COUNT];
        Baseline {
            planner: Planner::new(profile, &[8], &shares, 1.0),
            max_clock_mhz,
            fixed_instances: None,
            peak_rps: 0.0,
            energy_j: 0.0,
            power_w: 0.0,
            replayed: false,
        }
    }

    /// Power of the baseline cluster at `rps` (W).
    fn power(&mut self, rps: f64) -> f64 {
        self.peak_rps = self.peak_rps.max(rps);
        let cap = self.planner.capacity(8);
        if cap <= 0.0 {
            return 0.0;
        }
        let n = match self.fixed_instances {
            Some(k) => f64::from(k.max(1)),
            None => (self.peak_rps / cap).ceil().max(1.0),
        };
        let per = self.planner.power_at(8, self.max_clock_mhz, (rps / n).min(cap)).unwrap_or(0.0);
        n * per
    }
}

/// Where each class goes: the pool its requests are routed to, and whether the site power
/// budget sheds it (its arrivals turned away).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routes {
    /// Class index → pool id.
    pub pool: [u32; CLASS_COUNT],
    /// Class index → shed for the power budget.
    pub shed: [bool; CLASS_COUNT],
}

impl ServiceCore {
    /// A fresh core.
    pub fn new(cfg: CoreConfig, profile: ProfileTable, now_s: f64) -> ServiceCore {
        let max_clock = cfg.controller.max_clock_mhz;
        let baseline = Baseline::new(&profile, max_clock);
        let max_class_rps = default_max_class_rps(&profile, &cfg.controller);
        let ctl = Controller::new(cfg.controller.clone(), profile);
        let routed = ctl.routing().pool_of;
        ServiceCore {
            cfg,
            ctl,
            operator_mode: Mode::Auto,
            stale: None,
            instances: BTreeMap::new(),
            retired_energy_j: 0.0,
            seq: 0,
            run: new_run_tag(),
            pending: BTreeMap::new(),
            before: BTreeMap::new(),
            window_counts: [0; CLASS_COUNT],
            minute_counts: [0; CLASS_COUNT],
            minute: (now_s / 60.0).floor().max(0.0) as usize,
            smoothed: [0.0; CLASS_COUNT],
            last_recent: [0.0; CLASS_COUNT],
            forecasts: ClassForecasts::new(),
            att_totals: [[0; 4]; CLASS_COUNT],
            engine_att: [[0.0; 4]; CLASS_COUNT],
            attainment_from_engines: false,
            max_class_rps,
            att_hist: controller::control::AttainmentHistory::default(),
            decisions: VecDeque::new(),
            history: VecDeque::new(),
            hear_from_s: now_s,
            last_tick_s: None,
            observed_spawn_s: Vec::new(),
            baseline,
            routes_to_backends: true,
            routed,
            route_failures: [(0, f64::NEG_INFINITY); CLASS_COUNT],
            held_retires: BTreeMap::new(),
            first_fleet_up: false,
            no_spawn_lead: std::collections::BTreeSet::new(),
            held_warned: BTreeSet::new(),
            counters: CoreCounters::default(),
            finished: false,
            unsaved: None,
            mode_epoch: 0,
            mode_seen: Mode::Auto,
        }
    }

    /// A core that carries on from a saved state.
    pub fn restore(
        cfg: CoreConfig,
        profile: ProfileTable,
        saved: SavedState,
        now_s: f64,
    ) -> Result<ServiceCore, String> {
        if saved.version != STATE_VERSION {
            return Err(format!("saved state version {} is not {STATE_VERSION}", saved.version));
        }
        let mut core = ServiceCore::new(cfg.clone(), profile.clone(), now_s);
        core.ctl = Controller::restore(cfg.controller, profile, saved.controller)?;
        core.instances = saved.instances.into_iter().map(|r| (r.id, r)).collect();
        core.seq = saved.seq;
        if let Some(run) = saved.run.filter(|r| !r.is_empty()) {
            core.run = run;
        }
        core.operator_mode = saved.mode;
        core.pending = saved.pending.into_iter().map(|c| (c.id.clone(), c)).collect();
        core.retired_energy_j = saved.retired_energy_j;
        core.baseline.energy_j = saved.baseline_energy_j;
        for m in saved.minutes {
            core.forecasts.push_minute(m);
        }
        core.routed = saved.routed.unwrap_or(core.ctl.routing().pool_of);
        core.held_retires = saved.held_retires.into_iter().map(|h| (h.instance, h)).collect();
        Ok(core)
    }

    /// What to save now.
    pub fn save(&self, now_s: f64) -> SavedState {
        let h = &self.forecasts.history;
        SavedState {
            version: STATE_VERSION,
            saved_at_s: now_s,
            controller: self.ctl.snapshot(),
            instances: self.instances.values().cloned().collect(),
            seq: self.seq,
            run: Some(self.run.clone()),
            mode: self.operator_mode,
            pending: self.pending.values().cloned().collect(),
            retired_energy_j: self.retired_energy_j,
            baseline_energy_j: self.baseline.energy_j,
            minutes: h[h.len().saturating_sub(MINUTES_SAVED)..].to_vec(),
            routed: Some(self.routed),
            held_retires: self.held_retires.values().cloned().collect(),
        }
    }

    /// Start from a known per-class rate (requests/s), as if the service had
    /// watched the cluster for a while before it took over.
    pub fn prime_rates(&mut self, rps: Demand) {
        self.smoothed = rps;
    }

    /// The fleet the first tick asks for is up at once (the twin, as in `sim`): its instances'
    /// start is not a spawn time to learn from.
    pub fn first_fleet_up(&mut self) {
        self.first_fleet_up = true;
    }

    /// How long the controller takes a spawn to serve (s): configured, then learnt from the
    /// spawns it sees.
    pub fn spawn_lead_s(&self) -> f64 {
        self.ctl.config().spawn_lead_s
    }

    /// The clock loop's period (s): the service's tick.
    pub fn config_clock_period_s(&self) -> f64 {
        self.cfg.controller.clock_period_s
    }

    /// The mode in force (failsafe when telemetry is stale, whatever the operator chose).
    pub fn mode(&self) -> Mode {
        if (self.stale.is_some() || self.unsaved.is_some()) && self.operator_mode != Mode::DryRun {
            Mode::Failsafe
        } else {
            self.operator_mode
        }
    }

    /// On an external cluster: the static fleet the savings are measured against, `n` TP8
    /// instances at the top clock (the profile's power at the load seen), in place of the
    /// estimate sized from the profile for the highest load seen.
    pub fn set_baseline_instances(&mut self, n: u32) {
        self.baseline.fixed_instances = Some(n);
    }

    /// The replayed `single-pool` baseline (the twin's): its energy so far (J) and power now (W).
    pub fn observe_baseline(&mut self, energy_j: f64, power_w: f64) {
        self.baseline.replayed = true;
        self.baseline.energy_j = energy_j;
        self.baseline.power_w = power_w;
    }

    /// The cluster's workload is over (a twin's replay): nothing left to control.
    pub fn set_finished(&mut self) {
        self.finished = true;
    }

    /// Whether the cluster's workload is over.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The mode in effect may have changed: a new epoch when it did.
    fn note_mode(&mut self) {
        let m = self.mode();
        if m != self.mode_seen {
            self.mode_seen = m;
            self.mode_epoch += 1;
        }
    }

    /// The epoch of the mode in effect (see [`ServiceCore::may_send`]).
    pub fn mode_epoch(&self) -> u64 {
        self.mode_epoch
    }

    /// Whether a command decided in `epoch` may still be handed to a backend:
    /// only while the mode it was decided in holds, never in dry-run, never
    /// while the state cannot be saved.
    pub fn may_send(&self, epoch: u64) -> bool {
        epoch == self.mode_epoch && self.operator_mode != Mode::DryRun && self.unsaved.is_none()
    }

    /// A command that will not be sent: its effects on the inventory are undone
    /// as for a failed command, and it is counted.
    pub fn cancel(&mut self, id: &ActionId, reason: &str) {
        if self.pending.contains_key(id) {
            tracing::warn!(id = %id, reason, "command not sent");
            self.counters.cancelled_commands += 1;
            self.on_outcome(id, &Outcome::Failed { reason: format!("not sent: {reason}"), retryable: false });
        }
    }

    /// Saving the state failed (`Some(why)`) or succeeded again (`None`): while it
    /// fails the service is in failsafe and sends nothing.
    pub fn set_unsaved(&mut self, why: Option<String>) {
        if why.is_some() && self.unsaved.is_none() {
            self.counters.failsafe_entries += 1;
        }
        self.unsaved = why;
        self.note_mode();
    }

    /// Why the state cannot be saved, while it cannot.
    pub fn unsaved(&self) -> Option<&str> {
        self.unsaved.as_deref()
    }

    /// Why the service is in failsafe on its own (stale telemetry, or a state it cannot save).
    pub fn failsafe_reason(&self) -> Option<String> {
        match (&self.unsaved, &self.stale) {
            (Some(u), _) => Some(format!("the state cannot be saved: {u}")),
            (None, s) => s.clone(),
        }
    }

    /// Why the service is in failsafe on its own, if it is.
    pub fn stale_reason(&self) -> Option<&str> {
        self.stale.as_deref()
    }

    /// A new objective for the plan (its prices or intensity forecast read again).
    pub fn set_objective(&mut self, objective: controller::control::Objective) {
        self.cfg.controller.objective = objective.clone();
        self.ctl.set_objective(objective);
    }

    /// Set the operator's mode.
    pub fn set_mode(&mut self, mode: Mode) {
        self.operator_mode = mode;
        self.note_mode();
    }

    /// The routes in effect ([`Self::routed`]) and the classes the power budget sheds.
    pub fn routes(&self) -> Routes {
        Routes { pool: self.routed(), shed: std::array::from_fn(|c| self.ctl.shed(c)) }
    }

    /// Whether the site power budget sheds `class` (its arrivals are turned away).
    pub fn shed(&self, class: usize) -> bool {
        self.ctl.shed(class)
    }

    /// Whether the site power budget held `pool`'s last plan short (a spawn it wanted had no room).
    pub fn power_held(&self, pool: u32) -> bool {
        self.ctl.power_held(pool as usize)
    }

    /// The controller's routing: class index → pool id.
    pub fn routing(&self) -> [u32; CLASS_COUNT] {
        self.ctl.routing().pool_of
    }

    /// The routing table in effect (class → pool): with an external router,
    /// the routes it has acknowledged; with the built-in router (or the
    /// twin's), the table it follows. The controller's table once every route
    /// it changed is applied; in dry-run it stays where it was.
    pub fn routed(&self) -> [u32; CLASS_COUNT] {
        self.routed
    }

    /// The retires held until the routes away from their pools are applied.
    pub fn held_retires(&self) -> impl Iterator<Item = &HeldRetire> {
        self.held_retires.values()
    }

    /// How long the oldest held retire has waited for its routes (s; 0 when none
    /// is held): a router that never acknowledges keeps an instance up for ever,
    /// so this is the figure to alert on.
    pub fn held_retire_oldest_s(&self, now_s: f64) -> f64 {
        self.held_retires.values().map(|h| (now_s - h.since_s).max(0.0)).fold(0.0, f64::max)
    }

    /// The inventory.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceRecord> {
        self.instances.values()
    }

    /// Commands sent and not answered.
    pub fn pending(&self) -> impl Iterator<Item = &Command> {
        self.pending.values()
    }

    /// The decisions kept (newest last).
    pub fn decisions(&self) -> impl Iterator<Item = &DecisionRecord> {
        self.decisions.iter()
    }

    /// Learn SLO attainment from the engines' latency histograms (a real
    /// cluster whose requests the router does not measure, or must not).
    pub fn set_attainment_from_engines(&mut self, yes: bool) {
        self.attainment_from_engines = yes;
    }

    /// Set the ceiling on a class's believed arrival rate (req/s).
    pub fn set_max_class_rps(&mut self, rps: f64) {
        self.max_class_rps = rps;
    }

    /// The ceiling on a class's believed arrival rate (req/s).
    pub fn max_class_rps(&self) -> f64 {
        self.max_class_rps
    }

    /// Each class's SLOs, as the controller plans with them (the profile's).
    pub fn class_slos(&self) -> [telemetry::ClassSlo; CLASS_COUNT] {
        self.ctl.profile().slos()
    }

    /// How stale the cluster's telemetry is: the longest any serving instance
    /// has gone without a GPU or engine reading of its own (service s). Router
    /// traffic and arrival counts say nothing of the engines and do not count;
    /// with nothing serving there is nothing to hear from (0).
    pub fn telemetry_lag_s(&self, now_s: f64) -> f64 {
        self.stalest(now_s).map_or(0.0, |(lag, _, _)| lag.max(0.0))
    }

    /// The serving instance heard from longest ago, per source: each source
    /// an instance has reported from (its GPUs, its engine) counts on its
    /// own, so an engine page that keeps coming does not cover GPUs gone
    /// silent, nor the other way round. `(lag s, instance, source)`.
    pub fn stalest(&self, now_s: f64) -> Option<(f64, InstanceId, &'static str)> {
        let floor = |t: f64| t.max(self.hear_from_s);
        self.instances
            .values()
            .filter(|r| r.state == InstanceState::Serving && r.placement.is_some())
            .flat_map(|r| {
                let sources = [("GPU", r.last_gpu_s), ("engine", r.last_engine_s)];
                let seen: Vec<(f64, InstanceId, &'static str)> =
                    sources.iter().filter_map(|&(name, t)| t.map(|t| (now_s - floor(t), r.id, name))).collect();
                if seen.is_empty() {
                    vec![(now_s - floor(r.last_report_s.unwrap_or(r.spawned_at_s)), r.id, "any")]
                } else {
                    seen
                }
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }

    pub(super) fn next_id(&mut self) -> ActionId {
        self.seq += 1;
        ActionId(format!("a{}-{:010}", self.run, self.seq))
    }

    /// One control step: the commands to send now. Every command is also in
    /// [`ServiceCore::pending`] until its outcome comes back.
    pub fn tick(&mut self, now_s: f64, wall_ms: u64) -> Vec<Command> {
        self.roll_minutes(now_s);
        self.counters.ticks += 1;
        let period = self.last_tick_s.map_or(self.cfg.controller.clock_period_s, |t| (now_s - t).max(1e-3));
        let first = self.last_tick_s.is_none();
        self.last_tick_s = Some(now_s);
        let recent: Demand = std::array::from_fn(|c| f64::from(self.window_counts[c]) / period);
        self.window_counts = [0; CLASS_COUNT];
        // The first tick closes no window of its own: the smoothed rate (primed, or nothing yet)
        // stays as it is, as in `sim`'s loop.
        let alpha = if first { 0.0 } else { (period / 60.0).min(1.0) };
        for (s, r) in self.smoothed.iter_mut().zip(recent) {
            *s += alpha * (r - *s);
        }
        self.last_recent = recent;

        // Stale telemetry: failsafe within one tick of the deadline, per serving instance.
        let stalest = self.stalest(now_s);
        let lag = stalest.map_or(0.0, |s| s.0);
        let was_stale = self.stale.is_some();
        self.stale = stalest.filter(|s| s.0 > self.cfg.stale_after_s).map(|(lag, id, source)| {
            let what = if source == "any" { "telemetry".to_string() } else { format!("{source} telemetry") };
            format!("serving instance {} sent no {what} for {lag:.1} s (limit {:.1} s)", id.0, self.cfg.stale_after_s)
        });
        if self.stale.is_some() && !was_stale {
            self.counters.failsafe_entries += 1;
            tracing::warn!(lag_s = lag, "telemetry is stale: failsafe (top clocks, the fleet held as it is)");
        }
        self.note_mode();

        let c = &self.cfg.controller;
        let scale_min = ((c.scale_period_s + c.spawn_lead_s) / 60.0).ceil().max(1.0) as usize;
        let shard_min =
            ((c.shard_period_s + c.spawn_lead_s) / 60.0).ceil().max(FORECAST_LEVEL_MINUTES_MIN as f64) as usize;
        let peak_scale = self.forecasts.peak(scale_min);
        let peak_shard = self.forecasts.peak(shard_min);

        let class_attainment_recent = self.att_hist.push(now_s, self.att_totals, c);
        let obs = Observations {
            now_s,
            instances: self
                .instances
                .values()
                .map(|r| InstanceObs {
                    id: r.id,
                    pool: PoolId(r.pool),
                    tp: r.tp,
                    clock_mhz: r.clock_mhz,
                    state: r.state,
                    outstanding: r.outstanding,
                    waiting: r.waiting,
                    power_w: (r.last_report_s.is_some() || !r.gpus.is_empty()).then_some(r.power_w),
                })
                .collect(),
            class_rps_recent: recent,
            class_rps_smoothed: self.smoothed,
            class_peak_scale: Some(peak_scale),
            class_peak_shard: Some(peak_shard),
            observed_spawn_s: std::mem::take(&mut self.observed_spawn_s),
            class_attainment_recent,
            class_attainment_window: self.att_hist.plain_window(),
            class_slo_counts_recent: self.att_hist.recent_counts(),
        };
        let shed_before: [bool; CLASS_COUNT] = std::array::from_fn(|c| self.ctl.shed(c));
        let decisions = self.ctl.step(now_s, &obs);
        for class in telemetry::RequestClass::ALL {
            match (shed_before[class.index()], self.ctl.shed(class.index())) {
                (false, true) => tracing::warn!(
                    %class,
                    "the site power budget sheds class {class}: its requests are turned away (503) so the classes \
                     ranked above it keep their SLOs"
                ),
                (true, false) => tracing::info!(%class, "the site power budget admits class {class} again"),
                _ => {}
            }
        }
        let mode = self.mode();
        // Whether the fleet and the routes may change: not in dry-run, nor in failsafe while blind.
        let may_change = match mode {
            Mode::Auto => true,
            Mode::DryRun => false,
            Mode::Failsafe => self.stale.is_none(),
        };
        let mut out = Vec::new();
        let max_clock = self.cfg.controller.max_clock_mhz;
        for d in decisions {
            let kind = d.action.kind().to_string();
            *self.counters.decisions.entry(kind).or_default() += 1;
            let acts = match mode {
                Mode::DryRun => false,
                Mode::Auto => true,
                // No scale-in, no clock below the top; and while blind (stale
                // telemetry) no change of the fleet at all: the plan then rests on
                // load the service can no longer see.
                Mode::Failsafe => match d.action {
                    Action::Retire { .. } => false,
                    Action::SetClock { clock_mhz, .. } => clock_mhz >= max_clock,
                    Action::Spawn { .. }
                    | Action::Reshard { .. }
                    | Action::Route { .. }
                    | Action::MoveQueued { .. } => may_change,
                },
            };
            // A route changes the controller's table and is not sent itself: `follow_routing` carries
            // the table to the backends. A retire that would leave a class the backends route without
            // a serving instance waits in `held_retires` (make before break).
            let mut d = d;
            let deferred = acts
                && match d.action {
                    Action::Route { .. } => true,
                    Action::Retire { instance } if self.routes_to_backends => match self.retire_blocked(instance) {
                        Some(why) => {
                            let reason = d.reason.clone();
                            self.held_retires.insert(instance, HeldRetire { instance, since_s: now_s, reason });
                            d.reason = format!("{}; held: {why}", d.reason);
                            true
                        }
                        None => false,
                    },
                    _ => false,
                };
            // No command takes the fleet past the GPUs the cluster declares.
            let extra_gpus = match d.action {
                Action::Spawn { tp, .. } => tp,
                Action::Reshard { instance, tp, .. } => {
                    tp.saturating_sub(self.instances.get(&instance).map_or(0, |r| r.tp))
                }
                _ => 0,
            };
            let over = acts
                && !deferred
                && extra_gpus > 0
                && self.cfg.declared_gpus.is_some_and(|g| self.gpus().saturating_add(extra_gpus) > g);
            if over {
                self.counters.refused_over_gpus += 1;
                let g = self.cfg.declared_gpus.unwrap_or(0);
                tracing::warn!(action = ?d.action, declared_gpus = g, "not sent: it would take the fleet past the declared GPUs");
                d.reason = format!("{}; not sent: the fleet holds {} of the {g} GPUs declared", d.reason, self.gpus());
            }
            let sent = acts && !deferred && !over;
            let id = sent.then(|| {
                let cmd = self.issue(&d.action, now_s, wall_ms);
                let id = cmd.id.clone();
                out.push(cmd);
                id
            });
            self.push_decision(DecisionRecord { id, mode, acted: sent, decision: d });
        }
        out.extend(self.follow_routing(now_s, wall_ms, may_change));
        if mode == Mode::Auto {
            out.extend(self.release_retires(now_s, wall_ms));
        }
        if mode == Mode::Failsafe {
            // Every instance to the top clock, once (a draining one finishes as it is).
            let reason = self.failsafe_reason().unwrap_or_else(|| "the operator chose failsafe".into());
            out.extend(self.top_clocks(now_s, wall_ms, "failsafe", &format!("failsafe: {reason}; top clock"), false));
        }

        // Accounting and history.
        let power_w: f64 = self.instances.values().map(|r| r.power_w).sum();
        let total_rps: f64 = recent.iter().sum();
        // The estimate counts only while the service manages a serving fleet (a run with no
        // instance, in dry-run or before the first spawn serves, saves nothing and costs nothing).
        if !self.baseline.replayed {
            let managing = self.instances.values().any(|r| r.state == InstanceState::Serving);
            let base_w = if managing { self.baseline.power(total_rps) } else { 0.0 };
            self.baseline.energy_j += base_w * period;
            self.baseline.power_w = base_w;
        }
        self.history.push_back(HistoryPoint {
            time_s: now_s,
            power_w,
            gpus: self.gpus(),
            actual_rps: total_rps,
            forecast_rps: peak_shard.iter().sum(),
        });
        if self.history.len() > HISTORY_POINTS {
            self.history.pop_front();
        }
        out
    }
}

/// A tag for a new state: the wall clock in nanoseconds, hex. A state made
/// later never has the same, so command ids never repeat across state loss
/// (an agent that remembers an old id would answer "already applied").
fn new_run_tag() -> String {
    let ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}", ns as u64 ^ u64::from(std::process::id()).rotate_left(48))
}
