//! The twin's cluster: pools of engine instances on DGX servers, request
//! routing (a pool serves one or more classes; inside it, the least-loaded
//! serving instance takes the request), instance lifecycle timers, and the
//! discrete-event loop that replays an arrival stream in virtual time.

use crate::engine::{EngineRequest, Instance, Lifecycle, Next};
use crate::physics::Physics;
use crate::stats::{ClassSlo, RejectReason, Stats};
use crate::timeline::{Recorder, Timeline, TIMELINE_STEP_S};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use telemetry_core::{ClassBoundaries, Request, RequestClass, TraceError, CLASS_COUNT};

/// A pool: the classes it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    /// Name for tables (e.g. `all`, `SS`).
    pub name: String,
    /// Classes routed to it.
    pub classes: Vec<RequestClass>,
}

/// An instance present when the run starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceSpec {
    /// Index of its pool.
    pub pool: usize,
    /// Tensor-parallel degree.
    pub tp: u32,
    /// Locked clock.
    pub clock_mhz: u32,
}

/// A cluster layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// The pools.
    pub pools: Vec<PoolSpec>,
    /// The instances serving at time zero.
    pub instances: Vec<InstanceSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Time(f64);
impl Eq for Time {}
impl PartialOrd for Time {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Time {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EventKind {
    /// An instance's phase (or pause) ends; valid if the version matches.
    Step { version: u64 },
    /// A lifecycle timer (start or reshard done).
    Ready,
}

type Event = Reverse<(Time, u64, usize, EventKind)>;

#[derive(Debug, Clone)]
struct Pool {
    members: Vec<usize>,
}

/// Totals of a finished replay.
#[derive(Debug, Clone)]
pub struct RunTotals {
    /// Per-class statistics.
    pub stats: Stats,
    /// GPU energy of every instance in every state (J).
    pub energy_j: f64,
    /// GPUs held × time (GPU·s).
    pub gpu_seconds: f64,
    /// Most GPUs held at once.
    pub peak_gpus: u32,
    /// From time zero to the last completion (or the span, if later) (s).
    pub duration_s: f64,
    /// Requests that arrived.
    pub requests_total: u64,
    /// Requests turned away.
    pub requests_rejected: u64,
    /// Per-minute timeline (energy, GPUs, clocks, tokens per pool; arrivals per class).
    pub timeline: Timeline,
    /// The highest one-second mean of the cluster's GPU power (W): each whole
    /// second's energy, idle and starting instances included.
    pub peak_power_w: f64,
}

/// A cluster being simulated.
pub struct Cluster<'p> {
    physics: &'p Physics,
    boundaries: ClassBoundaries,
    /// Every instance ever created (stopped ones stay, holding nothing).
    pub instances: Vec<Instance>,
    pools: Vec<Pool>,
    class_pool: [Option<usize>; CLASS_COUNT],
    /// Per pool: whether the controller holds it without instances for the power budget.
    power_held: Vec<bool>,
    /// Classes the controller sheds for the site power budget: their arrivals are turned away.
    shed: [bool; CLASS_COUNT],
    events: BinaryHeap<Event>,
    seq: u64,
    /// Statistics so far.
    pub stats: Stats,
    now_s: f64,
    gpus_held: u32,
    peak_gpus: u32,
    gpu_seconds: f64,
    gpus_since_s: f64,
    requests_total: u64,
    requests_rejected: u64,
    misroute: Option<(f64, rand_pcg::Pcg64Mcg)>,
    /// Per pool: GPUs held × time so far, and final energy of its stopped instances.
    pool_gpu_seconds: Vec<f64>,
    pool_gpus: Vec<u32>,
    pool_stopped_energy_j: Vec<f64>,
    recorder: Recorder,
    /// The next whole second the peak power is measured at, the cluster's energy at the one
    /// before (J), and the highest one-second mean power so far (W).
    peak_next_s: f64,
    peak_last_energy_j: f64,
    peak_power_w: f64,
}

impl<'p> Cluster<'p> {
    /// Route by a predicted output class that is right with probability
    /// `accuracy` (else another output band of the same prompt band, at
    /// random); statistics stay by the true class. Seeded.
    pub fn set_predictor_accuracy(&mut self, accuracy: f64, seed: u64) {
        use rand::SeedableRng;
        self.misroute = (accuracy < 1.0).then(|| (accuracy.clamp(0.0, 1.0), rand_pcg::Pcg64Mcg::seed_from_u64(seed)));
    }

    fn route_class(&mut self, class: usize) -> usize {
        use rand::Rng;
        let Some((acc, rng)) = self.misroute.as_mut() else { return class };
        if rng.random::<f64>() < *acc {
            return class;
        }
        let (input, output) = (class / 3, class % 3);
        let other = (output + rng.random_range(1..3usize)) % 3;
        input * 3 + other
    }

    /// Build a cluster from a layout, every instance serving at time zero.
    pub fn new(
        physics: &'p Physics,
        spec: &ClusterSpec,
        boundaries: ClassBoundaries,
        slo: [ClassSlo; CLASS_COUNT],
    ) -> Self {
        let mut class_pool = [None; CLASS_COUNT];
        for (i, p) in spec.pools.iter().enumerate() {
            for c in &p.classes {
                class_pool[c.index()] = Some(i);
            }
        }
        let mut cluster = Cluster {
            physics,
            boundaries,
            instances: Vec::new(),
            pools: spec.pools.iter().map(|_| Pool { members: Vec::new() }).collect(),
            class_pool,
            power_held: vec![false; spec.pools.len()],
            shed: [false; CLASS_COUNT],
            events: BinaryHeap::new(),
            seq: 0,
            stats: Stats::new(slo),
            now_s: 0.0,
            gpus_held: 0,
            peak_gpus: 0,
            gpu_seconds: 0.0,
            gpus_since_s: 0.0,
            requests_total: 0,
            requests_rejected: 0,
            misroute: None,
            pool_gpu_seconds: vec![0.0; spec.pools.len()],
            pool_gpus: vec![0; spec.pools.len()],
            pool_stopped_energy_j: vec![0.0; spec.pools.len()],
            recorder: Recorder::new(spec.pools.iter().map(|p| p.name.clone()).collect(), TIMELINE_STEP_S),
            peak_next_s: 1.0,
            peak_last_energy_j: 0.0,
            peak_power_w: 0.0,
        };
        for s in &spec.instances {
            cluster.add_instance(s.pool, s.tp, s.clock_mhz, Lifecycle::Serving);
        }
        cluster
    }

    /// Set the timeline's interval (default one minute; infinity records
    /// only the closing interval). Call before the first arrival.
    pub fn set_timeline_step(&mut self, step_s: f64) {
        let names = std::mem::take(&mut self.recorder.timeline.pool_names);
        self.recorder = Recorder::new(names, step_s);
    }

    /// Virtual time now.
    pub fn now_s(&self) -> f64 {
        self.now_s
    }

    /// GPUs held now.
    pub fn gpus_held(&self) -> u32 {
        self.gpus_held
    }

    /// Route a class to a pool (or nowhere: its requests are rejected).
    pub fn set_route(&mut self, class: RequestClass, pool: Option<usize>) {
        self.class_pool[class.index()] = pool;
    }

    /// The controller holds `pool` short of instances for the site power budget (or no longer):
    /// while it has no serving instance, its requests are turned away for the budget.
    pub fn set_power_held(&mut self, pool: usize, held: bool) {
        if let Some(h) = self.power_held.get_mut(pool) {
            *h = held;
        }
    }

    /// The controller sheds `class` for the site power budget (or no longer): while it does, the
    /// class's arrivals are turned away for the budget.
    pub fn set_shed(&mut self, class: RequestClass, shed: bool) {
        self.shed[class.index()] = shed;
    }

    /// The pool a class is routed to.
    pub fn route(&self, class: RequestClass) -> Option<usize> {
        self.class_pool[class.index()]
    }

    /// The instances of a pool that have not stopped.
    pub fn pool_members(&self, pool: usize) -> &[usize] {
        &self.pools[pool].members
    }

    /// Number of pools.
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// Forget stopped instances in pool member lists (they hold nothing).
    fn prune(&mut self, inst: usize) {
        let pool = self.instances[inst].pool;
        self.pool_stopped_energy_j[pool] += self.instances[inst].energy_j;
        self.pools[pool].members.retain(|&m| m != inst);
    }

    fn regpu(&mut self) {
        let dt = self.now_s - self.gpus_since_s;
        self.gpu_seconds += f64::from(self.gpus_held) * dt;
        for (s, g) in self.pool_gpu_seconds.iter_mut().zip(&self.pool_gpus) {
            *s += f64::from(*g) * dt;
        }
        self.gpus_since_s = self.now_s;
        self.pool_gpus.iter_mut().for_each(|g| *g = 0);
        for i in &self.instances {
            self.pool_gpus[i.pool] += i.gpus_held();
        }
        self.gpus_held = self.pool_gpus.iter().sum();
        self.peak_gpus = self.peak_gpus.max(self.gpus_held);
    }

    /// Close the timeline's interval at `t` (no event pending before `t`).
    fn record(&mut self, t: f64) {
        let saved = self.now_s;
        self.now_s = t;
        self.regpu();
        self.now_s = saved;
        let pools = self.pools.len();
        let mut energy = self.pool_stopped_energy_j.clone();
        let mut clock_sum = vec![0.0; pools];
        let mut clock_gpus = vec![0.0; pools];
        for (p, pool) in self.pools.iter().enumerate() {
            for &m in &pool.members {
                let i = &self.instances[m];
                energy[p] += i.energy_at(self.physics, t);
                if i.state == Lifecycle::Serving {
                    clock_sum[p] += f64::from(i.clock_mhz) * f64::from(i.tp);
                    clock_gpus[p] += f64::from(i.tp);
                }
            }
        }
        let clock: Vec<f64> =
            (0..pools).map(|p| if clock_gpus[p] > 0.0 { clock_sum[p] / clock_gpus[p] } else { 0.0 }).collect();
        let requests = std::array::from_fn(|c| self.stats.classes[c].requests);
        self.recorder.close(t, &energy, &self.pool_gpu_seconds, &self.pool_gpus, &clock, requests);
    }

    /// Close every timeline interval ending at or before `t`, and measure
    /// the power of every whole second ending by then.
    #[inline]
    fn record_until(&mut self, t: f64) {
        while self.recorder.next_s <= t {
            let at = self.recorder.next_s;
            self.record(at);
            self.recorder.next_s += self.recorder.timeline.step_s;
        }
        while self.peak_next_s <= t {
            let at = self.peak_next_s;
            let e = self.energy_at(at);
            self.peak_power_w = self.peak_power_w.max(e - self.peak_last_energy_j);
            self.peak_last_energy_j = e;
            self.peak_next_s += 1.0;
        }
    }

    /// The cluster's GPU energy at `t` (J; no event pending before `t`): its
    /// stopped instances' and its live ones' so far, running steps metered in part.
    fn energy_at(&self, t: f64) -> f64 {
        let live: f64 = self
            .pools
            .iter()
            .flat_map(|p| p.members.iter())
            .map(|&m| self.instances[m].metered_energy_at(self.physics, t))
            .sum();
        self.pool_stopped_energy_j.iter().sum::<f64>() + live
    }

    fn schedule(&mut self, inst: usize, next: Next) {
        if let Next::At(t) = next {
            self.seq += 1;
            let version = self.instances[inst].version;
            self.events.push(Reverse((Time(t), self.seq, inst, EventKind::Step { version })));
        }
    }

    /// Add an instance to a pool in the given state (a starting one gets a
    /// ready timer). Returns its index.
    pub fn add_instance(&mut self, pool: usize, tp: u32, clock_mhz: u32, state: Lifecycle) -> usize {
        let inst = Instance::new(self.physics, tp, clock_mhz, pool, state, self.now_s);
        self.instances.push(inst);
        let idx = self.instances.len() - 1;
        self.pools[pool].members.push(idx);
        if let Lifecycle::Starting { ready_s } = state {
            self.seq += 1;
            self.events.push(Reverse((Time(ready_s), self.seq, idx, EventKind::Ready)));
        }
        self.regpu();
        idx
    }

    /// Start a new instance: cold (`lifecycle.cold_start_s`) or warm (`warm_start_s`).
    pub fn spawn(&mut self, pool: usize, tp: u32, clock_mhz: u32, warm: bool) -> usize {
        let l = &self.physics.lifecycle;
        let delay = if warm { l.warm_start_s } else { l.cold_start_s };
        self.add_instance(pool, tp, clock_mhz, Lifecycle::Starting { ready_s: self.now_s + delay })
    }

    /// Wake a warm-standby (sleeping) instance: it serves after `lifecycle.sleep_wake_s`.
    pub fn wake(&mut self, inst: usize) {
        let ready_s = self.now_s + self.physics.lifecycle.sleep_wake_s;
        let physics = self.physics;
        let now = self.now_s;
        self.instances[inst].set_state(physics, Lifecycle::Starting { ready_s }, now);
        self.seq += 1;
        self.events.push(Reverse((Time(ready_s), self.seq, inst, EventKind::Ready)));
        self.regpu();
    }

    /// Stop routing to an instance; it stops (releasing its GPUs) once empty.
    pub fn retire(&mut self, inst: usize) {
        let physics = self.physics;
        let now = self.now_s;
        let i = &mut self.instances[inst];
        i.settle(physics, now);
        if i.is_empty() {
            i.set_state(physics, Lifecycle::Stopped, now);
            self.prune(inst);
        } else {
            let next = i.set_state(physics, Lifecycle::Draining, now);
            self.schedule(inst, next);
        }
        self.regpu();
    }

    /// Change an instance's TP degree by restart or in place; it serves
    /// nothing meanwhile (its waiting requests are routed elsewhere first).
    pub fn reshard(&mut self, inst: usize, tp: u32, in_place: bool) {
        let l = &self.physics.lifecycle;
        let delay = if in_place { l.reshard_in_place_s } else { l.reshard_restart_s };
        let ready_s = self.now_s + delay;
        let physics = self.physics;
        let now = self.now_s;
        let i = &mut self.instances[inst];
        i.set_state(physics, Lifecycle::Resharding { ready_s, tp, in_place }, now);
        self.seq += 1;
        self.events.push(Reverse((Time(ready_s), self.seq, inst, EventKind::Ready)));
        self.regpu();
    }

    /// Lock an instance to a clock.
    pub fn set_clock(&mut self, inst: usize, clock_mhz: u32) {
        let next = self.instances[inst].set_clock(self.physics, clock_mhz, self.now_s);
        self.schedule(inst, next);
    }

    /// The serving instance of a pool (other than `except`) the router's
    /// balance picks: the fewest requests outstanding, or the fewest prompt
    /// tokens queued ahead of a new request and then the fewest requests.
    /// With no serving instance that fits, an instance resharding in place
    /// (its API server is up) takes the request into its queue if it fits
    /// the new degree's KV cache; it is served from the reshard's end.
    fn least_loaded(&self, pool: usize, req: &EngineRequest, except: Option<usize>) -> Option<usize> {
        self.least_loaded_in(pool, req, except, false).or_else(|| self.least_loaded_in(pool, req, except, true))
    }

    fn least_loaded_in(
        &self,
        pool: usize,
        req: &EngineRequest,
        except: Option<usize>,
        resharding: bool,
    ) -> Option<usize> {
        let mut best: Option<(usize, (u64, usize))> = None;
        for &m in &self.pools[pool].members {
            let i = &self.instances[m];
            let takes = match i.state {
                Lifecycle::Serving => !resharding && i.fits(req),
                Lifecycle::Resharding { tp, in_place: true, .. } => {
                    resharding && req.kv_tokens() <= self.physics.kv_capacity_tokens(tp)
                }
                _ => false,
            };
            if !takes || Some(m) == except {
                continue;
            }
            let load = match self.physics.router.balance {
                crate::physics::Balance::Requests => (0, i.outstanding()),
                crate::physics::Balance::PromptTokens => (i.queued_prompt_tokens(), i.outstanding()),
            };
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((m, load));
            }
        }
        best.map(|(m, _)| m)
    }

    /// Route one arriving request (time must not go backwards).
    pub fn arrive(&mut self, r: &Request) {
        self.advance_to(r.arrival_s);
        let class = self.boundaries.classify(r.input_tokens, r.output_tokens).index();
        self.requests_total += 1;
        self.stats.arrived(class);
        let req = EngineRequest {
            arrival_s: r.arrival_s,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens.max(1),
            class: class as u8,
            id: self.requests_total,
        };
        let routed = self.route_class(class);
        let target = match self.class_pool[routed] {
            _ if self.shed[class] => Err(RejectReason::PowerBudget),
            None => Err(RejectReason::NoPool),
            Some(p) => self.least_loaded(p, &req, None).ok_or_else(|| self.why_none(p)),
        };
        match target {
            Ok(inst) => self.place(inst, req),
            Err(why) => {
                self.requests_rejected += 1;
                self.stats.rejected(class, why, r.arrival_s);
            }
        }
    }

    fn place(&mut self, inst: usize, req: EngineRequest) {
        let pool = self.instances[inst].pool;
        self.recorder.tokens[pool][req.class as usize] += f64::from(req.input_tokens) + f64::from(req.output_tokens);
        let next = self.instances[inst].enqueue(self.physics, req, self.now_s);
        self.schedule(inst, next);
    }

    /// Why no instance of `pool` takes a request: none serves, or none has the KV room.
    fn why_none(&self, pool: usize) -> RejectReason {
        let serving = self.pools[pool].members.iter().any(|&m| self.instances[m].state == Lifecycle::Serving);
        if serving {
            RejectReason::TooLarge
        } else if self.power_held.get(pool).copied().unwrap_or(false) {
            RejectReason::PowerBudget
        } else {
            RejectReason::NoServingInstance
        }
    }

    /// Abort request `id` on instance `inst` (its client went away; see
    /// [`Instance::abort`]). Returns whether the instance held it.
    pub fn abort(&mut self, inst: usize, id: u64) -> bool {
        let Some(i) = self.instances.get_mut(inst) else { return false };
        match i.abort(id, self.now_s) {
            Some(next) => {
                self.schedule(inst, next);
                true
            }
            None => false,
        }
    }

    /// Move up to `max` requests that `from` has not started (see
    /// [`Instance::take_unstarted`]) to the least-loaded serving instances of
    /// `to_pool` other than `from`; each keeps its arrival time. A request no
    /// instance there can hold goes back to `from`. Returns how many moved.
    pub fn move_unstarted(&mut self, from: usize, to_pool: usize, max: u32) -> u32 {
        if to_pool >= self.pools.len() || from >= self.instances.len() {
            return 0;
        }
        let has_other =
            self.pools[to_pool].members.iter().any(|&m| m != from && self.instances[m].state == Lifecycle::Serving);
        if !has_other || max == 0 {
            return 0;
        }
        let (reqs, next) = self.instances[from].take_unstarted(max as usize, self.now_s);
        self.schedule(from, next);
        let mut moved = 0;
        let old_pool = self.instances[from].pool;
        for req in reqs {
            let inst = match self.least_loaded(to_pool, &req, Some(from)) {
                Some(inst) => {
                    moved += 1;
                    if to_pool != old_pool {
                        // The tokens move with the request to the other pool's account.
                        let tokens = f64::from(req.input_tokens) + f64::from(req.output_tokens);
                        self.recorder.tokens[old_pool][req.class as usize] -= tokens;
                        self.recorder.tokens[to_pool][req.class as usize] += tokens;
                    }
                    inst
                }
                None => from,
            };
            let next = self.instances[inst].enqueue(self.physics, req, self.now_s);
            self.schedule(inst, next);
        }
        moved
    }

    /// Process every event up to and including time `t`, then set the clock to `t`.
    pub fn advance_to(&mut self, t: f64) {
        while let Some(&Reverse((Time(et), _, inst, kind))) = self.events.peek() {
            if et > t {
                break;
            }
            self.record_until(et);
            self.events.pop();
            self.now_s = self.now_s.max(et);
            self.handle(inst, kind);
        }
        self.record_until(t);
        self.now_s = self.now_s.max(t);
    }

    /// Time of the next pending event, if any.
    pub fn next_event_s(&self) -> Option<f64> {
        self.events.peek().map(|Reverse((Time(t), ..))| *t)
    }

    fn handle(&mut self, inst: usize, kind: EventKind) {
        let physics = self.physics;
        let now = self.now_s;
        match kind {
            EventKind::Step { version } => {
                if self.instances[inst].version != version {
                    return;
                }
                let next = self.instances[inst].on_event(physics, &mut self.stats, now);
                self.schedule(inst, next);
                let i = &mut self.instances[inst];
                if i.state == Lifecycle::Draining && i.is_empty() {
                    i.set_state(physics, Lifecycle::Stopped, now);
                    self.prune(inst);
                    self.regpu();
                }
            }
            EventKind::Ready => {
                let i = &self.instances[inst];
                let due = match i.state {
                    Lifecycle::Starting { ready_s } | Lifecycle::Resharding { ready_s, .. } => ready_s <= now,
                    _ => false,
                };
                if due {
                    let next = self.instances[inst].set_state(physics, Lifecycle::Serving, now);
                    self.schedule(inst, next);
                    self.regpu();
                }
            }
        }
    }

    /// Run every pending event to completion (all requests finish).
    pub fn drain(&mut self) {
        while let Some(t) = self.next_event_s() {
            self.advance_to(t);
        }
    }

    /// Replay a whole stream, then let every request finish. `progress` is
    /// called now and then with the arrival time reached.
    pub fn replay<I, F>(&mut self, arrivals: I, mut progress: F) -> Result<(), TraceError>
    where
        I: Iterator<Item = Result<Request, TraceError>>,
        F: FnMut(f64),
    {
        let mut n = 0u64;
        for r in arrivals {
            let r = r?;
            self.arrive(&r);
            n += 1;
            if n % 65_536 == 0 {
                progress(r.arrival_s);
            }
        }
        let last_arrival = self.now_s;
        progress(last_arrival);
        // Let the in-flight requests finish, but not lifecycle timers far beyond.
        while let Some(t) = self.next_event_s() {
            if self.instances.iter().all(Instance::is_empty) {
                break;
            }
            self.advance_to(t);
        }
        Ok(())
    }

    /// Close the books at `end_s` (at least now): settle idle energy and GPU time.
    pub fn finish(mut self, end_s: f64) -> RunTotals {
        let end = end_s.max(self.now_s);
        self.record_until(end);
        self.now_s = end;
        for i in &mut self.instances {
            i.settle(self.physics, end);
        }
        self.regpu();
        if self.recorder.last_s < end {
            self.record(end);
        }
        RunTotals {
            energy_j: self.instances.iter().map(|i| i.energy_j).sum(),
            gpu_seconds: self.gpu_seconds,
            peak_gpus: self.peak_gpus,
            duration_s: end,
            requests_total: self.requests_total,
            requests_rejected: self.requests_rejected,
            stats: self.stats,
            timeline: self.recorder.timeline,
            peak_power_w: self.peak_power_w,
        }
    }
}
