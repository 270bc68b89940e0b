//! The service's state machine around the sans-IO controller: it takes in
//! what telemetry reports (instances, per-class arrivals and SLO counters),
//! turns the controller's decisions into idempotent [`Command`]s with ids,
//! applies the operating mode (auto, dry-run, failsafe), tracks the
//! inventory, and answers the status page. No I/O and no clock of its own:
//! the caller passes the time, so tests drive it in virtual time.

use crate::closed_loop::ClassForecasts;
use crate::control::plan::{Demand, Planner};
use crate::control::{
    Controller, ControllerConfig, ControllerState, Decision, InstanceObs, InstanceState, Observations,
};
use crate::profile::ProfileTable;
use actuators::{Action, ActionId, Command, InstanceId, Outcome, Placement, PoolId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use telemetry::{RequestClass, CLASS_COUNT};

/// How the service acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Decide and act.
    Auto,
    /// Decide and record, act on nothing.
    DryRun,
    /// Every clock at its top, no scale-in; the controller's spawns and routes
    /// still act unless telemetry is stale (then the fleet is held as it is).
    Failsafe,
}

impl Mode {
    /// Parse `auto`, `dry-run` or `failsafe`.
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "dry-run" => Ok(Mode::DryRun),
            "failsafe" => Ok(Mode::Failsafe),
            other => Err(format!("unknown mode {other:?}; valid: auto, dry-run, failsafe")),
        }
    }

    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::DryRun => "dry-run",
            Mode::Failsafe => "failsafe",
        }
    }
}

/// An instance's state as telemetry reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportedState {
    /// Coming up.
    Starting,
    /// Taking requests.
    Serving,
    /// Finishing its requests.
    Draining,
    /// Gone.
    Stopped,
}

/// One instance's reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// Which.
    pub id: InstanceId,
    /// Lifecycle.
    pub state: ReportedState,
    /// Requests it holds (running and waiting).
    pub outstanding: u32,
    /// Requests waiting for room.
    pub waiting: u32,
    /// Power of all its GPUs.
    pub power_w: f64,
    /// GPU energy since it started.
    pub energy_j: f64,
    /// Its clock.
    pub clock_mhz: u32,
    /// Its TP degree (GPUs).
    #[serde(default)]
    pub tp: u32,
}

/// What the service knows of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Which.
    pub id: InstanceId,
    /// Its pool.
    pub pool: u32,
    /// TP degree.
    pub tp: u32,
    /// Clock asked for (or reported).
    pub clock_mhz: u32,
    /// Lifecycle.
    pub state: InstanceState,
    /// Where it lives, once its spawn is acknowledged.
    pub placement: Option<Placement>,
    /// Requests it holds.
    pub outstanding: u32,
    /// Requests waiting.
    pub waiting: u32,
    /// Power of its GPUs.
    pub power_w: f64,
    /// Its GPU energy so far.
    pub energy_j: f64,
    /// When it was asked for (s).
    pub spawned_at_s: f64,
    /// Last report (s).
    pub last_report_s: Option<f64>,
    /// Per GPU index: the last power (W) and energy counter (J) telemetry gave.
    #[serde(default)]
    pub gpus: BTreeMap<u32, (f64, f64)>,
}

/// A decision as the service keeps it (the controller's, plus the command id and what the mode did).
/// A route decision changes the controller's table and is never sent itself: the records of the
/// `routing` source carry the table to the backends, and send the retires held until they have.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// The command's id (none when the mode kept it from acting).
    pub id: Option<ActionId>,
    /// The mode at the time.
    pub mode: Mode,
    /// Whether it was sent to the actuators.
    pub acted: bool,
    /// The controller's decision.
    #[serde(flatten)]
    pub decision: Decision,
}

/// The totals of the status document.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Totals {
    /// GPU energy of every instance so far, retired ones included (J).
    pub energy_j: f64,
    /// The `single-pool` estimate's energy over the same time (J).
    pub baseline_energy_j: f64,
    /// The estimate's power now (W).
    pub baseline_power_w: f64,
    /// GPU power now (W).
    pub power_w: f64,
    /// GPUs held.
    pub gpus: u32,
    /// Share of the estimate's energy saved.
    pub savings_ratio: f64,
}

/// One point of the status history.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// When (s).
    pub time_s: f64,
    /// Total GPU power.
    pub power_w: f64,
    /// GPUs held.
    pub gpus: u32,
    /// Arrivals over the last period (requests/s).
    pub actual_rps: f64,
    /// Forecast peak for the coming shard period (requests/s).
    pub forecast_rps: f64,
}

/// What the service saves after every tick, and recovers from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedState {
    /// Format version.
    pub version: u32,
    /// Service time of the save (s).
    pub saved_at_s: f64,
    /// The controller's plan and what it learnt.
    pub controller: ControllerState,
    /// The inventory.
    pub instances: Vec<InstanceRecord>,
    /// The last command sequence number used.
    pub seq: u64,
    /// The operator's mode.
    pub mode: Mode,
    /// Commands sent and not yet answered (re-sent with the same ids after a restart).
    pub pending: Vec<Command>,
    /// Energy of instances gone (J).
    pub retired_energy_j: f64,
    /// Baseline energy so far (J).
    pub baseline_energy_j: f64,
    /// Per-class minute history for the forecaster (the last days).
    pub minutes: Vec<[f64; CLASS_COUNT]>,
    /// The routing table the backends have acknowledged (class → pool);
    /// absent in older saves (then the controller's table).
    #[serde(default)]
    pub routed: Option<[u32; CLASS_COUNT]>,
    /// Retires decided and held until the backends route no class to the
    /// instance's pool without another serving instance.
    #[serde(default)]
    pub held_retires: Vec<HeldRetire>,
}

/// A retire the controller decided that waits for the routes away from its pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldRetire {
    /// The instance.
    pub instance: InstanceId,
    /// Held since (s).
    pub since_s: f64,
    /// The controller's reason for the retire.
    pub reason: String,
}

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
    att_hist: crate::control::AttainmentHistory,
    decisions: VecDeque<DecisionRecord>,
    history: VecDeque<HistoryPoint>,
    last_telemetry_s: f64,
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
    /// Held retires already warned about (once each, past [`ROUTE_RETRY_MAX_S`]).
    held_warned: BTreeSet<InstanceId>,
    /// Counters for `/metrics`.
    pub counters: CoreCounters,
}

/// The longest wait before a failed route is sent again (s).
const ROUTE_RETRY_MAX_S: f64 = 300.0;

/// The `single-pool` baseline estimated from the profile: TP8 at the top
/// clock, sized for the highest load seen so far, its power at the observed load.
struct Baseline {
    planner: Planner,
    max_clock_mhz: u32,
    peak_rps: f64,
    energy_j: f64,
    power_w: f64,
}

impl Baseline {
    fn new(profile: &ProfileTable, max_clock_mhz: u32) -> Baseline {
        let shares: Demand = [1.0; CLASS_COUNT];
        Baseline {
            planner: Planner::new(profile, &[8], &shares, 1.0),
            max_clock_mhz,
            peak_rps: 0.0,
            energy_j: 0.0,
            power_w: 0.0,
        }
    }

    /// Power of the baseline cluster at `rps` (W).
    fn power(&mut self, rps: f64) -> f64 {
        self.peak_rps = self.peak_rps.max(rps);
        let cap = self.planner.capacity(8);
        if cap <= 0.0 {
            return 0.0;
        }
        let n = (self.peak_rps / cap).ceil().max(1.0);
        let per = self.planner.power_at(8, self.max_clock_mhz, (rps / n).min(cap)).unwrap_or(0.0);
        n * per
    }
}

impl ServiceCore {
    /// A fresh core.
    pub fn new(cfg: CoreConfig, profile: ProfileTable, now_s: f64) -> ServiceCore {
        let max_clock = cfg.controller.max_clock_mhz;
        let baseline = Baseline::new(&profile, max_clock);
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
            pending: BTreeMap::new(),
            before: BTreeMap::new(),
            window_counts: [0; CLASS_COUNT],
            minute_counts: [0; CLASS_COUNT],
            minute: (now_s / 60.0).floor().max(0.0) as usize,
            smoothed: [0.0; CLASS_COUNT],
            last_recent: [0.0; CLASS_COUNT],
            forecasts: ClassForecasts::new(),
            att_totals: [[0; 4]; CLASS_COUNT],
            att_hist: crate::control::AttainmentHistory::default(),
            decisions: VecDeque::new(),
            history: VecDeque::new(),
            last_telemetry_s: now_s,
            last_tick_s: None,
            observed_spawn_s: Vec::new(),
            baseline,
            routes_to_backends: true,
            routed,
            route_failures: [(0, f64::NEG_INFINITY); CLASS_COUNT],
            held_retires: BTreeMap::new(),
            held_warned: BTreeSet::new(),
            counters: CoreCounters::default(),
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

    /// The clock loop's period (s): the service's tick.
    pub fn config_clock_period_s(&self) -> f64 {
        self.cfg.controller.clock_period_s
    }

    /// The mode in force (failsafe when telemetry is stale, whatever the operator chose).
    pub fn mode(&self) -> Mode {
        if self.stale.is_some() && self.operator_mode != Mode::DryRun {
            Mode::Failsafe
        } else {
            self.operator_mode
        }
    }

    /// Why the service is in failsafe on its own, if it is.
    pub fn stale_reason(&self) -> Option<&str> {
        self.stale.as_deref()
    }

    /// Set the operator's mode.
    pub fn set_mode(&mut self, mode: Mode) {
        self.operator_mode = mode;
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

    /// Seconds since the last telemetry.
    pub fn telemetry_lag_s(&self, now_s: f64) -> f64 {
        (now_s - self.last_telemetry_s).max(0.0)
    }

    /// Requests that arrived, per class.
    pub fn observe_arrivals(&mut self, now_s: f64, counts: &[u32; CLASS_COUNT]) {
        self.roll_minutes(now_s);
        for (c, &n) in counts.iter().enumerate() {
            self.window_counts[c] += n;
            self.minute_counts[c] += n;
        }
        self.last_telemetry_s = self.last_telemetry_s.max(now_s);
    }

    /// Cumulative per-class SLO counters: `[ttft_ok, ttft_n, gaps_ok, gaps_n]`.
    pub fn observe_attainment(&mut self, totals: [[u64; 4]; CLASS_COUNT]) {
        self.att_totals = totals;
    }

    /// One instance's reading.
    pub fn observe_instance(&mut self, now_s: f64, r: &InstanceReport) {
        self.last_telemetry_s = self.last_telemetry_s.max(now_s);
        if r.state == ReportedState::Stopped {
            if let Some(rec) = self.instances.remove(&r.id) {
                self.retired_energy_j += r.energy_j.max(rec.energy_j);
            }
            return;
        }
        let Some(rec) = self.instances.get_mut(&r.id) else { return };
        let state = match r.state {
            ReportedState::Starting => InstanceState::Starting,
            ReportedState::Serving => InstanceState::Serving,
            _ => InstanceState::Draining,
        };
        if rec.state == InstanceState::Starting && state == InstanceState::Serving {
            self.observed_spawn_s.push(now_s - rec.spawned_at_s);
        }
        // A retire asked for stays asked for, whatever a late reading says.
        if rec.state != InstanceState::Draining {
            rec.state = state;
        }
        rec.outstanding = r.outstanding;
        rec.waiting = r.waiting;
        rec.power_w = r.power_w;
        rec.energy_j = r.energy_j;
        rec.clock_mhz = r.clock_mhz;
        rec.last_report_s = Some(now_s);
    }

    /// A telemetry sample from a real cluster (MQTT or a scrape). GPU and
    /// engine samples are matched to the instance whose placement is on the
    /// sample's `site/node` (and, for GPUs, holds that GPU index); arrivals
    /// samples count per class. Samples of nodes the service did not place
    /// anything on are ignored.
    pub fn observe_sample(&mut self, now_s: f64, sample: &telemetry::sample::Sample) {
        use telemetry::sample::Sample;
        let tags = match sample {
            Sample::Gpu(g) => &g.tags,
            Sample::Engine(e) => &e.tags,
            Sample::Arrivals(a) => {
                if let Some(c) = a.tags.class {
                    let mut counts = [0u32; CLASS_COUNT];
                    counts[c.index()] = a.requests.max(0.0).round() as u32;
                    self.observe_arrivals(now_s, &counts);
                }
                return;
            }
        };
        let node = match (&tags.site, &tags.node) {
            (Some(s), Some(n)) => format!("{s}/{n}"),
            (None, Some(n)) => n.clone(),
            _ => return,
        };
        let gpu = tags.gpu;
        let Some(rec) = self.instances.values_mut().find(|r| {
            r.placement
                .as_ref()
                .is_some_and(|p| p.node == node && (p.gpus.is_empty() || gpu.is_none_or(|g| p.gpus.contains(&g))))
        }) else {
            return;
        };
        self.last_telemetry_s = self.last_telemetry_s.max(now_s);
        rec.last_report_s = Some(now_s);
        match sample {
            Sample::Gpu(g) => {
                let e = g.energy_j.unwrap_or(rec.gpus.get(&g.tags.gpu.unwrap_or(0)).map_or(0.0, |x| x.1));
                rec.gpus.insert(g.tags.gpu.unwrap_or(0), (g.power_w, e));
                rec.power_w = rec.gpus.values().map(|x| x.0).sum();
                rec.energy_j = rec.gpus.values().map(|x| x.1).sum();
                if let Some(c) = g.sm_clock_mhz {
                    rec.clock_mhz = c;
                }
            }
            Sample::Engine(e) => {
                let running = e.running.unwrap_or(0.0).max(0.0) as u32;
                let waiting = e.waiting.unwrap_or(0.0).max(0.0) as u32;
                rec.outstanding = running + waiting;
                rec.waiting = waiting;
                // An engine that answers serves (unless it was asked to retire).
                if rec.state == InstanceState::Starting {
                    rec.state = InstanceState::Serving;
                    self.observed_spawn_s.push(now_s - rec.spawned_at_s);
                }
            }
            Sample::Arrivals(_) => {}
        }
    }

    fn roll_minutes(&mut self, now_s: f64) {
        while ((self.minute + 1) as f64) * 60.0 <= now_s {
            self.forecasts.push_minute(std::array::from_fn(|c| f64::from(self.minute_counts[c])));
            self.minute_counts = [0; CLASS_COUNT];
            self.minute += 1;
        }
    }

    fn next_id(&mut self) -> ActionId {
        self.seq += 1;
        ActionId(format!("a{:010}", self.seq))
    }

    /// One control step: the commands to send now. Every command is also in
    /// [`ServiceCore::pending`] until its outcome comes back.
    pub fn tick(&mut self, now_s: f64, wall_ms: u64) -> Vec<Command> {
        self.roll_minutes(now_s);
        self.counters.ticks += 1;
        let period = self.last_tick_s.map_or(self.cfg.controller.clock_period_s, |t| (now_s - t).max(1e-3));
        self.last_tick_s = Some(now_s);
        let recent: Demand = std::array::from_fn(|c| f64::from(self.window_counts[c]) / period);
        self.window_counts = [0; CLASS_COUNT];
        let alpha = (period / 60.0).min(1.0);
        for (s, r) in self.smoothed.iter_mut().zip(recent) {
            *s += alpha * (r - *s);
        }
        self.last_recent = recent;

        // Stale telemetry: failsafe within one tick of the deadline (nothing placed yet: nothing to hear from).
        if !self.instances.values().any(|r| r.placement.is_some()) {
            self.last_telemetry_s = self.last_telemetry_s.max(now_s);
        }
        let lag = self.telemetry_lag_s(now_s);
        let was_stale = self.stale.is_some();
        self.stale = (lag > self.cfg.stale_after_s)
            .then(|| format!("no telemetry for {lag:.1} s (limit {:.1} s)", self.cfg.stale_after_s));
        if self.stale.is_some() && !was_stale {
            self.counters.failsafe_entries += 1;
            tracing::warn!(lag_s = lag, "telemetry is stale: failsafe (top clocks, the fleet held as it is)");
        }

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
        };
        let decisions = self.ctl.step(now_s, &obs);
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
            let sent = acts && !deferred;
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
            let reason = self.stale.clone().unwrap_or_else(|| "the operator chose failsafe".into());
            out.extend(self.top_clocks(now_s, wall_ms, "failsafe", &format!("failsafe: {reason}; top clock"), false));
        }

        // Accounting and history.
        let power_w: f64 = self.instances.values().map(|r| r.power_w).sum();
        let total_rps: f64 = recent.iter().sum();
        let base_w = self.baseline.power(total_rps);
        self.baseline.energy_j += base_w * period;
        self.baseline.power_w = base_w;
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

    /// Carry the controller's routing table to the backends, class by class:
    /// a class goes to its new pool once that pool has a serving instance
    /// (or at once when its old pool has none); one route per class in
    /// flight; a route that failed is sent again after a wait that doubles
    /// up to [`ROUTE_RETRY_MAX_S`]; nothing is sent unless `act`. Without
    /// a backend that routes, the built-in router (or the twin's) follows
    /// [`ServiceCore::routed`] itself, making before breaking: the table
    /// becomes it at once when `act`, and not at all otherwise (dry-run, or
    /// failsafe while blind, moves no class).
    fn follow_routing(&mut self, now_s: f64, wall_ms: u64, act: bool) -> Vec<Command> {
        let table = self.ctl.routing().pool_of;
        if !self.routes_to_backends {
            if act {
                self.routed = table;
            }
            return Vec::new();
        }
        if !act {
            return Vec::new();
        }
        let in_flight: Vec<String> = self
            .pending
            .values()
            .filter_map(|c| match &c.action {
                Action::Route { class, .. } => Some(class.clone()),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for class in RequestClass::ALL {
            let c = class.index();
            let (want, from) = (table[c], self.routed[c]);
            let name = class.to_string();
            if want == from || in_flight.contains(&name) {
                continue;
            }
            let (failures, last_s) = self.route_failures[c];
            let wait_s = if failures == 0 {
                0.0
            } else {
                (self.cfg.controller.clock_period_s * 2f64.powi(failures.min(30) as i32 - 1)).min(ROUTE_RETRY_MAX_S)
            };
            if now_s - last_s < wait_s - 1e-9 {
                continue;
            }
            let (new_serves, old_serves) = (self.pool_serves(want, None), self.pool_serves(from, None));
            if !new_serves && old_serves {
                continue;
            }
            self.route_failures[c].1 = now_s;
            let action = Action::Route { class: name, pool: PoolId(want) };
            let again = if failures > 0 { format!(" (again, after {failures} failed)") } else { String::new() };
            let reason = if new_serves {
                format!("{class} from pool {from} to pool {want}, which serves{again}")
            } else {
                format!("{class} from pool {from} to pool {want}: neither serves yet{again}")
            };
            out.push(self.issue_own(action, now_s, wall_ms, "routing", reason, Some(want)));
        }
        out
    }

    /// Whether a pool has a serving instance other than `except`, not itself held for retiring.
    fn pool_serves(&self, pool: u32, except: Option<InstanceId>) -> bool {
        self.instances.values().any(|r| {
            r.pool == pool
                && r.state == InstanceState::Serving
                && Some(r.id) != except
                && !(except.is_some() && self.held_retires.contains_key(&r.id))
        })
    }

    /// Why retiring `instance` now would break make-before-break: the classes
    /// the backends still route to its pool, which has no other serving
    /// instance. `None` when it may go.
    fn retire_blocked(&self, instance: InstanceId) -> Option<String> {
        let pool = self.instances.get(&instance)?.pool;
        let classes: Vec<String> =
            RequestClass::ALL.iter().filter(|c| self.routed[c.index()] == pool).map(|c| c.to_string()).collect();
        if classes.is_empty() || self.pool_serves(pool, Some(instance)) {
            return None;
        }
        Some(format!(
            "the backends still route {} to pool {pool}, which has no other serving instance",
            classes.join(", ")
        ))
    }

    /// Send the held retires that may go now; forget those of instances gone.
    fn release_retires(&mut self, now_s: f64, wall_ms: u64) -> Vec<Command> {
        let held: Vec<InstanceId> = self.held_retires.keys().copied().collect();
        let mut out = Vec::new();
        for instance in held {
            let Some(pool) = self.instances.get(&instance).map(|r| r.pool) else {
                self.held_retires.remove(&instance);
                self.held_warned.remove(&instance);
                continue;
            };
            if let Some(why) = self.retire_blocked(instance) {
                let waited_s = self.held_retires.get(&instance).map_or(0.0, |h| now_s - h.since_s);
                if waited_s > ROUTE_RETRY_MAX_S && self.held_warned.insert(instance) {
                    tracing::warn!(instance = instance.0, pool, waited_s, "a retire is still held: {why}");
                }
                continue;
            }
            self.held_warned.remove(&instance);
            let Some(h) = self.held_retires.remove(&instance) else { continue };
            let reason = format!(
                "{}; held {:.0} s until the backends routed its classes away from pool {pool}",
                h.reason,
                now_s - h.since_s
            );
            out.push(self.issue_own(Action::Retire { instance }, now_s, wall_ms, "routing", reason, Some(pool)));
        }
        out
    }

    /// Whether a backend carries out `route` commands (an external router):
    /// see the field's doc. On by default.
    pub fn set_routes_to_backends(&mut self, yes: bool) {
        self.routes_to_backends = yes;
    }

    /// The instance a clock, retire or reshard command changes, as it is before, to undo it if it fails.
    fn remember_before(&mut self, id: &ActionId, action: &Action) {
        if let Action::SetClock { instance, .. } | Action::Retire { instance } | Action::Reshard { instance, .. } =
            action
        {
            if let Some(r) = self.instances.get(instance) {
                self.before.insert(id.clone(), r.clone());
            }
        }
    }

    /// Make a command of an action: a new id, the inventory updated, pending
    /// until its outcome comes back.
    fn issue(&mut self, action: &Action, now_s: f64, wall_ms: u64) -> Command {
        let id = self.next_id();
        self.remember_before(&id, action);
        self.apply_to_inventory(action, now_s);
        let cmd = Command {
            id: id.clone(),
            action: action.clone(),
            placement: self.placement_of(action),
            issued_at_ms: wall_ms,
        };
        self.pending.insert(id, cmd.clone());
        cmd
    }

    /// Issue a command the service decides itself (not the controller), recorded as a decision of `source`.
    fn issue_own(
        &mut self,
        action: Action,
        now_s: f64,
        wall_ms: u64,
        source: &'static str,
        reason: String,
        pool: Option<u32>,
    ) -> Command {
        let cmd = self.issue(&action, now_s, wall_ms);
        self.push_decision(DecisionRecord {
            id: Some(cmd.id.clone()),
            mode: self.mode(),
            acted: true,
            decision: Decision {
                at_s: now_s,
                source,
                action,
                reason,
                pool,
                planned_rps: None,
                predicted_delta_w: None,
                slo_margin: None,
            },
        });
        cmd
    }

    /// Every instance below the top clock back to it, each command recorded as a decision of `source`.
    fn top_clocks(
        &mut self,
        now_s: f64,
        wall_ms: u64,
        source: &'static str,
        reason: &str,
        draining_too: bool,
    ) -> Vec<Command> {
        let max_clock = self.cfg.controller.max_clock_mhz;
        let low: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|r| r.clock_mhz < max_clock && (draining_too || r.state != InstanceState::Draining))
            .map(|r| r.id)
            .collect();
        let mut out = Vec::with_capacity(low.len());
        for instance in low {
            let action = Action::SetClock { instance, clock_mhz: max_clock };
            out.push(self.issue_own(action, now_s, wall_ms, source, reason.to_string(), None));
        }
        out
    }

    /// On shutdown: every instance below the top clock goes back to it (the
    /// cluster is left as a static cluster would run it). The commands are
    /// pending like any other; a dry run sends nothing.
    pub fn shutdown_commands(&mut self, now_s: f64, wall_ms: u64) -> Vec<Command> {
        if self.operator_mode == Mode::DryRun {
            return Vec::new();
        }
        self.top_clocks(now_s, wall_ms, "shutdown", "the service is stopping: top clock", true)
    }

    fn push_decision(&mut self, d: DecisionRecord) {
        self.decisions.push_back(d);
        if self.decisions.len() > DECISIONS_KEPT {
            self.decisions.pop_front();
        }
    }

    fn gpus(&self) -> u32 {
        self.instances.values().map(|r| r.tp).sum()
    }

    fn placement_of(&self, action: &Action) -> Option<Placement> {
        let id = match action {
            Action::Retire { instance }
            | Action::Reshard { instance, .. }
            | Action::SetClock { instance, .. }
            | Action::MoveQueued { instance, .. } => instance,
            Action::Spawn { .. } | Action::Route { .. } => return None,
        };
        self.instances.get(id).and_then(|r| r.placement.clone())
    }

    fn apply_to_inventory(&mut self, action: &Action, now_s: f64) {
        match *action {
            Action::Spawn { instance, pool, tp, clock_mhz, .. } => {
                self.instances.insert(
                    instance,
                    InstanceRecord {
                        id: instance,
                        pool: pool.0,
                        tp,
                        clock_mhz,
                        state: InstanceState::Starting,
                        placement: None,
                        outstanding: 0,
                        waiting: 0,
                        power_w: 0.0,
                        energy_j: 0.0,
                        spawned_at_s: now_s,
                        last_report_s: None,
                        gpus: BTreeMap::new(),
                    },
                );
            }
            Action::Retire { instance } => {
                if let Some(r) = self.instances.get_mut(&instance) {
                    r.state = InstanceState::Draining;
                }
            }
            Action::SetClock { instance, clock_mhz } => {
                if let Some(r) = self.instances.get_mut(&instance) {
                    r.clock_mhz = clock_mhz;
                }
            }
            Action::Reshard { instance, tp, .. } => {
                if let Some(r) = self.instances.get_mut(&instance) {
                    r.tp = tp;
                    r.state = InstanceState::Starting;
                    r.spawned_at_s = now_s;
                }
            }
            Action::Route { .. } | Action::MoveQueued { .. } => {}
        }
    }

    /// What became of a command.
    pub fn on_outcome(&mut self, id: &ActionId, outcome: &Outcome) {
        let Some(cmd) = self.pending.remove(id) else { return };
        let before = self.before.remove(id);
        let kind = cmd.action.kind().to_string();
        let tag = match outcome {
            Outcome::Applied { .. } => "applied",
            Outcome::Failed { .. } => "failed",
            Outcome::TimedOut { .. } => "timed-out",
        };
        *self.counters.outcomes.entry((kind, tag.to_string())).or_default() += 1;
        match (&cmd.action, outcome) {
            (Action::Spawn { instance, .. }, Outcome::Applied { placement, .. }) => {
                if let Some(r) = self.instances.get_mut(instance) {
                    if placement.is_some() {
                        r.placement = placement.clone();
                    }
                }
            }
            (Action::Spawn { instance, .. }, _) => {
                // It never came up: forget it (the controller plans again, without counting it as coming).
                self.instances.remove(instance);
                self.ctl.action_failed(&cmd.action);
            }
            // A clock that was not set is still the old one (the controller decides again).
            (Action::SetClock { instance, clock_mhz }, Outcome::Failed { .. } | Outcome::TimedOut { .. }) => {
                if let (Some(r), Some(b)) = (self.instances.get_mut(instance), before) {
                    if r.clock_mhz == *clock_mhz {
                        r.clock_mhz = b.clock_mhz;
                    }
                }
                self.ctl.action_failed(&cmd.action);
            }
            (Action::Retire { instance }, Outcome::Applied { .. }) if self.cfg.retire_ack_means_stopped => {
                self.forget(*instance);
            }
            // A retire that did not happen: the instance serves as before, and the controller decides
            // again (else it would run, counted as draining, for ever).
            (Action::Retire { instance }, Outcome::Failed { .. } | Outcome::TimedOut { .. }) => {
                if let (Some(r), Some(b)) = (self.instances.get_mut(instance), before) {
                    if r.state == InstanceState::Draining {
                        r.state = b.state;
                    }
                }
                self.ctl.action_failed(&cmd.action);
            }
            // A reshard that did not happen (a make-before-break backend rolls it back): the old degree.
            (Action::Reshard { instance, tp, .. }, Outcome::Failed { .. } | Outcome::TimedOut { .. }) => {
                if let (Some(r), Some(b)) = (self.instances.get_mut(instance), before) {
                    if r.tp == *tp {
                        r.tp = b.tp;
                        r.state = b.state;
                        r.spawned_at_s = b.spawned_at_s;
                    }
                }
                self.ctl.action_failed(&cmd.action);
            }
            (Action::Route { class, pool }, outcome) => {
                if let Ok(c) = RequestClass::parse(class) {
                    let c = c.index();
                    match outcome {
                        Outcome::Applied { .. } => {
                            self.routed[c] = pool.0;
                            self.route_failures[c].0 = 0;
                        }
                        // Sending it again will not help: counted as routed, so no retire waits for it for ever.
                        Outcome::Failed { reason, retryable: false } => {
                            tracing::error!(id = %id, class, pool = pool.0, %reason, "the route cannot be carried out; counted as routed");
                            self.routed[c] = pool.0;
                            self.route_failures[c].0 = 0;
                        }
                        _ => self.route_failures[c].0 += 1,
                    }
                }
            }
            _ => {}
        }
    }

    /// Forget an instance a backend retired for good (energy kept in the totals).
    pub fn forget(&mut self, id: InstanceId) {
        if let Some(r) = self.instances.remove(&id) {
            self.retired_energy_j += r.energy_j;
        }
    }

    /// Energy, power and GPUs so far, against the `single-pool` estimate.
    pub fn totals(&self) -> Totals {
        let energy_j = self.retired_energy_j + self.instances.values().map(|r| r.energy_j).sum::<f64>();
        let base = self.baseline.energy_j;
        Totals {
            energy_j,
            baseline_energy_j: base,
            baseline_power_w: self.baseline.power_w,
            power_w: self.instances.values().map(|r| r.power_w).sum(),
            gpus: self.gpus(),
            savings_ratio: if base > 0.0 { 1.0 - energy_j / base } else { 0.0 },
        }
    }

    /// The status document of `/api/v1/status`.
    pub fn status(&self, now_s: f64) -> serde_json::Value {
        let routing = self.ctl.routing().pool_of;
        let plans = self.ctl.plans();
        let pools: Vec<serde_json::Value> = (0..self.ctl.pool_count())
            .map(|p| {
                let members: Vec<&InstanceRecord> = self.instances.values().filter(|r| r.pool as usize == p).collect();
                let classes: Vec<String> = RequestClass::ALL
                    .iter()
                    .filter(|c| routing[c.index()] as usize == p)
                    .map(|c| c.to_string())
                    .collect();
                serde_json::json!({
                    "id": p,
                    "name": self.cfg.pool_names.get(p).cloned().unwrap_or_else(|| format!("pool{p}")),
                    "classes": classes,
                    "instances": members.len(),
                    "gpus": members.iter().map(|r| r.tp).sum::<u32>(),
                    "power_w": members.iter().map(|r| r.power_w).sum::<f64>(),
                    "planned_rps": plans.get(p).map_or(0.0, |x| x.planned_rps),
                    "capacity_scale": self.ctl.learnt(p).map(|l| l.0),
                    "clock_margin": self.ctl.learnt(p).map(|l| l.1),
                    "capacity_scale_after_miss": self.ctl.scale_after_miss(p, now_s),
                    "target": plans.get(p).map(|x| x.target.clone()).unwrap_or_default(),
                })
            })
            .collect();
        let instances: Vec<serde_json::Value> = self
            .instances
            .values()
            .map(|r| {
                serde_json::json!({
                    "id": r.id.0,
                    "pool": r.pool,
                    "tp": r.tp,
                    "clock_mhz": r.clock_mhz,
                    "state": match r.state {
                        InstanceState::Starting => "starting",
                        InstanceState::Serving => "serving",
                        InstanceState::Draining => "draining",
                    },
                    "power_w": r.power_w,
                    "energy_j": r.energy_j,
                    "outstanding": r.outstanding,
                    "placement": r.placement,
                })
            })
            .collect();
        let shard_min =
            ((self.cfg.controller.shard_period_s + self.cfg.controller.spawn_lead_s) / 60.0).ceil().max(1.0) as usize;
        let forecast = self.forecasts.peak(shard_min);
        let last = self.att_hist.latest().unwrap_or(self.att_totals);
        let classes: Vec<serde_json::Value> = RequestClass::ALL
            .iter()
            .map(|c| {
                let att = crate::control::slo_attainment(last[c.index()]);
                serde_json::json!({
                    "class": c.to_string(),
                    "pool": routing[c.index()],
                    "routed_pool": self.routed[c.index()],
                    "actual_rps": self.last_recent[c.index()],
                    "smoothed_rps": self.smoothed[c.index()],
                    "forecast_rps": forecast[c.index()],
                    "attainment": att,
                })
            })
            .collect();
        serde_json::json!({
            "mode": self.mode().name(),
            "operator_mode": self.operator_mode.name(),
            "failsafe_reason": self.stale,
            "time_s": now_s,
            "telemetry_lag_s": self.telemetry_lag_s(now_s),
            "pools": pools,
            "instances": instances,
            "classes": classes,
            "pending_actions": self.pending.len(),
            "held_retires": self.held_retires.values().collect::<Vec<_>>(),
            "totals": self.totals(),
            "history": self.history,
        })
    }
}
