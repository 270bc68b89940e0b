//! One engine instance of the twin: a vLLM-like scheduler with continuous
//! batching, chunked prefill (decode tokens first, prefill fills the rest of
//! the step's token budget, FIFO), a KV cache of finite size with a waiting
//! queue, and an instance lifecycle.
//!
//! Between two changes of batch composition every step has the same shape
//! (only the decoding sequences' contexts grow, by one token a step), so the
//! instance advances a whole *phase* of steps in closed form: step times and
//! energies form arithmetic series. A phase ends when a sequence finishes
//! decoding, a prompt finishes prefilling, or something outside (an arrival,
//! a clock change) cuts it at the next step boundary.

use crate::physics::{Physics, StepCost, StepShape};
use crate::stats::Stats;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use telemetry_core::CLASS_COUNT;

/// A request as the engine holds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineRequest {
    /// Arrival time at the cluster (s).
    pub arrival_s: f64,
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Output tokens (at least 1 is generated).
    pub output_tokens: u32,
    /// Class index.
    pub class: u8,
    /// Caller's id, echoed in [`EngineEvent`]s.
    pub id: u64,
}

/// What happened to one request, for callers that stream tokens (`twin serve`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EngineEvent {
    /// The prompt finished prefilling and the first token came out.
    FirstToken {
        /// The request's id.
        id: u64,
        /// When (s).
        at_s: f64,
        /// The instance's step count at that moment: decode token `k` (1-based)
        /// comes at the end of step `step + k`.
        step: u64,
    },
    /// The last token came out.
    Finished {
        /// The request's id.
        id: u64,
        /// When (s).
        at_s: f64,
    },
}

impl EngineRequest {
    pub(crate) fn kv_tokens(&self) -> u64 {
        u64::from(self.input_tokens) + u64::from(self.output_tokens.max(1))
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lifecycle {
    /// Loading weights / starting the engine; serves from `ready_s`.
    Starting {
        /// When it will serve.
        ready_s: f64,
    },
    /// Taking requests.
    Serving,
    /// Finishing what it holds; takes nothing new; stops when empty.
    Draining,
    /// Holding its GPUs with the engine asleep.
    Standby,
    /// Changing TP degree; serves again from `ready_s`.
    Resharding {
        /// When it will serve.
        ready_s: f64,
        /// The new degree.
        tp: u32,
        /// Weights move over NVLink inside the running engine (DynamoLLM's
        /// in-place reshard): its API server stays up, so the router may
        /// still hand it requests, which wait until `ready_s`. A restart
        /// reshard takes the server down with the engine.
        in_place: bool,
    },
    /// GPUs released.
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Prefilling {
    req: EngineRequest,
    left: u32,
}

/// A decoding sequence: (step at which its last token comes, context offset, KV tokens, class, id).
type Decoding = Reverse<(u64, i64, u64, u8, u64)>;

#[derive(Debug, Clone, Copy)]
struct Phase {
    start_s: f64,
    steps: u64,
    cost: StepCost,
    prefill_tokens: u32,
}

impl Phase {
    fn time_of(&self, steps: u64) -> f64 {
        let n = steps as f64;
        n * self.cost.time_s + self.cost.time_growth_s * n * (n - 1.0) / 2.0
    }

    fn energy_of(&self, steps: u64) -> f64 {
        let n = steps as f64;
        n * self.cost.energy_j + self.cost.energy_growth_j * n * (n - 1.0) / 2.0
    }

    fn end_s(&self) -> f64 {
        self.start_s + self.time_of(self.steps)
    }

    /// Whole steps finished by `t`.
    fn steps_done_by(&self, t: f64) -> u64 {
        let dt = t - self.start_s;
        if dt <= 0.0 {
            return 0;
        }
        let (a, g) = (self.cost.time_s, self.cost.time_growth_s);
        let m = if g <= a * 1e-12 {
            (dt / a).floor()
        } else {
            // g/2 m² + (a − g/2) m − dt ≤ 0
            let b = a - g / 2.0;
            ((-b + (b * b + 2.0 * g * dt).sqrt()) / g).floor()
        };
        let mut m = (m.max(0.0) as u64).min(self.steps);
        // Guard against rounding at the boundary.
        while m > 0 && self.time_of(m) > dt {
            m -= 1;
        }
        while m < self.steps && self.time_of(m + 1) <= dt {
            m += 1;
        }
        m
    }
}

/// One engine instance.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Tensor-parallel degree (GPUs held).
    pub tp: u32,
    /// Locked SM clock.
    pub clock_mhz: u32,
    /// Lifecycle state.
    pub state: Lifecycle,
    /// Pool the instance serves.
    pub pool: usize,
    kv_capacity: u64,
    kv_reserved: u64,
    steps_done: u64,
    ctx_offset_sum: i64,
    decoding: BinaryHeap<Decoding>,
    decoding_by_class: [u32; CLASS_COUNT],
    prefilling: VecDeque<Prefilling>,
    prefill_left: u64,
    waiting: VecDeque<EngineRequest>,
    phase: Option<Phase>,
    /// Bumped whenever the scheduled phase end changes (stale events are skipped).
    pub version: u64,
    paused_until_s: f64,
    pending_clock_mhz: Option<u32>,
    /// Running requests whose client went away: dropped at the next step boundary.
    aborting: Vec<u64>,
    /// Energy spent by all its GPUs so far (J).
    pub energy_j: f64,
    accounted_s: f64,
    /// Requests finished.
    pub completed: u64,
    /// Output tokens produced.
    pub tokens_out: u64,
    /// When set, first tokens and completions are logged here.
    pub events: Option<Vec<EngineEvent>>,
}

/// What the cluster must do after an instance changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Nothing scheduled (idle, or waiting on a lifecycle timer the cluster holds).
    Idle,
    /// Call [`Instance::on_event`] at this time.
    At(f64),
}

impl Instance {
    /// A new instance in the given state at time `now_s`.
    pub fn new(physics: &Physics, tp: u32, clock_mhz: u32, pool: usize, state: Lifecycle, now_s: f64) -> Instance {
        Instance {
            tp,
            clock_mhz,
            state,
            pool,
            kv_capacity: physics.kv_capacity_tokens(tp),
            kv_reserved: 0,
            steps_done: 0,
            ctx_offset_sum: 0,
            decoding: BinaryHeap::new(),
            decoding_by_class: [0; CLASS_COUNT],
            prefilling: VecDeque::new(),
            prefill_left: 0,
            waiting: VecDeque::new(),
            phase: None,
            version: 0,
            paused_until_s: f64::NEG_INFINITY,
            pending_clock_mhz: None,
            aborting: Vec::new(),
            energy_j: 0.0,
            accounted_s: now_s,
            completed: 0,
            tokens_out: 0,
            events: None,
        }
    }

    /// GPUs this instance holds now (none once stopped).
    pub fn gpus_held(&self) -> u32 {
        match self.state {
            Lifecycle::Stopped => 0,
            Lifecycle::Resharding { tp, .. } => tp.max(self.tp),
            _ => self.tp,
        }
    }

    /// KV-cache capacity in tokens.
    pub fn kv_capacity_tokens(&self) -> u64 {
        self.kv_capacity
    }

    /// Share of the KV cache reserved.
    pub fn kv_usage(&self) -> f64 {
        self.kv_reserved as f64 / self.kv_capacity.max(1) as f64
    }

    /// Output tokens produced by time `t`, counting the steps of the phase in progress.
    pub fn tokens_out_at(&self, t: f64) -> u64 {
        self.tokens_out + self.phase.map(|p| p.steps_done_by(t) * self.decoding.len() as u64).unwrap_or(0)
    }

    /// Steps completed by time `t`, counting the phase in progress.
    pub fn steps_at(&self, t: f64) -> u64 {
        self.steps_done + self.phase.map(|p| p.steps_done_by(t)).unwrap_or(0)
    }

    /// When step number `step` (counted over the instance's life) ends, if it is in the running phase.
    pub fn step_end_s(&self, step: u64) -> Option<f64> {
        let p = self.phase?;
        let k = step.checked_sub(self.steps_done)?;
        (k >= 1 && k <= p.steps).then(|| p.start_s + p.time_of(k))
    }

    /// End of the first step that finishes after `t`, if a phase is running.
    pub fn next_step_end_s(&self, t: f64) -> Option<f64> {
        self.phase.map(|p| {
            let n = (p.steps_done_by(t) + 1).min(p.steps);
            p.start_s + p.time_of(n)
        })
    }

    /// Power per GPU at time `t`: the running step's, or the state's background power.
    pub fn power_per_gpu_w_at(&self, physics: &Physics, t: f64) -> f64 {
        match self.phase {
            Some(p) if t < p.end_s() => {
                let n = p.steps_done_by(t) as f64;
                let e = p.cost.energy_j + p.cost.energy_growth_j * n;
                let dt = p.cost.time_s + p.cost.time_growth_s * n;
                if dt > 0.0 {
                    e / dt
                } else {
                    0.0
                }
            }
            _ => self.background_power_w(physics),
        }
    }

    /// Energy so far at `t` as a power meter sees it: like [`Instance::energy_at`], with the
    /// running step counted in proportion to its time done (a step's energy spread over it).
    pub fn metered_energy_at(&self, physics: &Physics, t: f64) -> f64 {
        match self.phase {
            Some(p) => {
                let n = p.steps_done_by(t);
                let mut e = self.energy_j + p.energy_of(n) * f64::from(self.tp);
                if n < p.steps {
                    let (t0, t1) = (p.start_s + p.time_of(n), p.start_s + p.time_of(n + 1));
                    if t1 > t0 {
                        let f = ((t - t0) / (t1 - t0)).clamp(0.0, 1.0);
                        e += f * (p.energy_of(n + 1) - p.energy_of(n)) * f64::from(self.tp);
                    }
                }
                e
            }
            None => self.energy_at(physics, t),
        }
    }

    /// Energy spent by time `t` (J), counting the phase in progress and idle time.
    pub fn energy_at(&self, physics: &Physics, t: f64) -> f64 {
        match self.phase {
            Some(p) => {
                let n = p.steps_done_by(t);
                self.energy_j + p.energy_of(n) * f64::from(self.tp)
            }
            None => {
                self.energy_j
                    + self.background_power_w(physics) * f64::from(self.gpus_held()) * (t - self.accounted_s).max(0.0)
            }
        }
    }

    /// Requests held: waiting, prefilling and decoding.
    pub fn outstanding(&self) -> usize {
        self.waiting.len() + self.prefilling.len() + self.decoding.len()
    }

    /// Prompt tokens not yet prefilled: admitted prompts' remainders (as of
    /// the last phase boundary) and the prompts waiting for admission.
    pub fn queued_prompt_tokens(&self) -> u64 {
        self.prefill_left + self.waiting.iter().map(|r| u64::from(r.input_tokens)).sum::<u64>()
    }

    /// Requests running (prefilling or decoding).
    pub fn running(&self) -> usize {
        self.prefilling.len() + self.decoding.len()
    }

    /// Requests waiting for KV room.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Holds nothing and runs nothing.
    pub fn is_empty(&self) -> bool {
        self.outstanding() == 0 && self.phase.is_none()
    }

    /// Whether a request could ever fit this instance's KV cache.
    pub fn fits(&self, req: &EngineRequest) -> bool {
        req.kv_tokens() <= self.kv_capacity
    }

    /// Power per GPU when no step runs, by state.
    fn background_power_w(&self, physics: &Physics) -> f64 {
        match self.state {
            Lifecycle::Starting { .. } | Lifecycle::Resharding { .. } => physics.power.starting_w,
            Lifecycle::Standby => physics.power.standby_w,
            Lifecycle::Stopped => 0.0,
            Lifecycle::Serving | Lifecycle::Draining => physics.idle_power_w(f64::from(self.clock_mhz)),
        }
    }

    /// Account energy spent outside steps up to `now_s`.
    pub fn settle(&mut self, physics: &Physics, now_s: f64) {
        if self.phase.is_some() || now_s <= self.accounted_s {
            return;
        }
        let gpus = f64::from(self.gpus_held());
        self.energy_j += self.background_power_w(physics) * gpus * (now_s - self.accounted_s);
        self.accounted_s = now_s;
    }

    /// Hand a request to the instance at `now_s`. Returns when the cluster must call back.
    pub fn enqueue(&mut self, physics: &Physics, req: EngineRequest, now_s: f64) -> Next {
        let queued_before = !self.waiting.is_empty();
        self.waiting.push_back(req);
        match self.phase {
            None => self.start_if_ready(physics, now_s),
            Some(mut p) => {
                // It joins at the next step boundary, if it can be admitted at all.
                if queued_before || self.kv_reserved + req.kv_tokens() > self.kv_capacity {
                    return Next::At(p.end_s());
                }
                self.cut_after_current_step(&mut p, now_s)
            }
        }
    }

    /// Take back up to `max` requests that have not started: first those
    /// waiting for admission (newest first), then admitted prompts whose
    /// prefill has not begun, from the back of the prefill queue (the head
    /// and the one after it may be in the running phase's chunks, so they
    /// stay). Their KV reservations are released. A running phase ends after
    /// its current step so the next one is planned without them. Returns
    /// the requests (arrival times unchanged: their TTFT still counts from
    /// the first arrival) and when the cluster must call back.
    pub fn take_unstarted(&mut self, max: usize, now_s: f64) -> (Vec<EngineRequest>, Next) {
        let mut out = Vec::new();
        while out.len() < max {
            match self.waiting.pop_back() {
                Some(r) => out.push(r),
                None => break,
            }
        }
        while out.len() < max && self.prefilling.len() > 2 {
            let last = self.prefilling.back().expect("more than two queued prompts");
            if last.left != last.req.input_tokens {
                break;
            }
            let p = self.prefilling.pop_back().expect("checked above");
            self.kv_reserved -= p.req.kv_tokens();
            self.prefill_left -= u64::from(p.req.input_tokens);
            out.push(p.req);
        }
        let next = match self.phase {
            Some(mut p) if !out.is_empty() => self.cut_after_current_step(&mut p, now_s),
            _ => self.current_next(),
        };
        (out, next)
    }

    /// Drop the request `id` (its client went away), as vLLM aborts a
    /// request whose connection closes. One waiting for admission goes at
    /// once. One admitted (in its prefill or decoding) goes at the end of the
    /// step in progress, as an engine applies aborts between steps: the
    /// running phase ends after that step, and the request's KV reservation
    /// is free again from then. A request that finishes within that step
    /// finishes. `None` when the instance does not hold it (or it is already
    /// going); else when the cluster must call back.
    pub fn abort(&mut self, id: u64, now_s: f64) -> Option<Next> {
        if let Some(k) = self.waiting.iter().position(|r| r.id == id) {
            self.waiting.remove(k);
            return Some(self.current_next());
        }
        let held =
            self.prefilling.iter().any(|p| p.req.id == id) || self.decoding.iter().any(|&Reverse((.., d))| d == id);
        if !held || self.aborting.contains(&id) {
            return None;
        }
        self.aborting.push(id);
        Some(match self.phase {
            Some(mut ph) => self.cut_after_current_step(&mut ph, now_s),
            None => {
                self.apply_aborts();
                self.current_next()
            }
        })
    }

    /// Drop the requests [`Instance::abort`] marked (between steps only).
    fn apply_aborts(&mut self) {
        if self.aborting.is_empty() {
            return;
        }
        let gone = std::mem::take(&mut self.aborting);
        let mut freed_kv = 0;
        let mut freed_prefill = 0;
        self.prefilling.retain(|p| {
            let keep = !gone.contains(&p.req.id);
            if !keep {
                freed_kv += p.req.kv_tokens();
                freed_prefill += u64::from(p.left);
            }
            keep
        });
        let mut freed_offset = 0;
        let by_class = &mut self.decoding_by_class;
        self.decoding.retain(|&Reverse((_, offset, kv, class, id))| {
            let keep = !gone.contains(&id);
            if !keep {
                freed_kv += kv;
                freed_offset += offset;
                by_class[usize::from(class)] -= 1;
            }
            keep
        });
        self.kv_reserved -= freed_kv;
        self.prefill_left -= freed_prefill;
        self.ctx_offset_sum -= freed_offset;
    }

    /// Lock a new clock: the change takes effect after the running step, and no
    /// step runs for `lifecycle.clock_change_s`.
    pub fn set_clock(&mut self, physics: &Physics, clock_mhz: u32, now_s: f64) -> Next {
        if clock_mhz == self.clock_mhz && self.pending_clock_mhz.is_none() {
            return self.current_next();
        }
        self.pending_clock_mhz = Some(clock_mhz);
        match self.phase {
            Some(mut p) => self.cut_after_current_step(&mut p, now_s),
            None => {
                self.apply_pending_clock(physics, now_s);
                self.start_if_ready(physics, now_s)
            }
        }
    }

    /// End the running phase after the step in progress at `now_s`.
    fn cut_after_current_step(&mut self, p: &mut Phase, now_s: f64) -> Next {
        let keep = (p.steps_done_by(now_s) + 1).min(p.steps);
        if keep < p.steps {
            p.steps = keep;
            self.phase = Some(*p);
            self.version += 1;
        }
        Next::At(p.end_s())
    }

    fn apply_pending_clock(&mut self, physics: &Physics, now_s: f64) {
        if let Some(c) = self.pending_clock_mhz.take() {
            self.settle(physics, now_s);
            self.clock_mhz = c;
            self.paused_until_s = now_s + physics.lifecycle.clock_change_s;
        }
    }

    fn current_next(&self) -> Next {
        match self.phase {
            Some(p) => Next::At(p.end_s()),
            // Paused by a clock change with work in hand (waiting, or running between phases):
            // the pause's end is the next event. (Idle here lost the wake-up when the same
            // clock was asked for twice during a pause, and the running requests stalled.)
            None if self.paused_until_s.is_finite() && (!self.waiting.is_empty() || self.running() > 0) => {
                Next::At(self.paused_until_s)
            }
            None => Next::Idle,
        }
    }

    /// Change lifecycle state at `now_s` (energy up to now is settled first).
    pub fn set_state(&mut self, physics: &Physics, state: Lifecycle, now_s: f64) -> Next {
        self.settle(physics, now_s);
        if let (Lifecycle::Resharding { tp, .. }, Lifecycle::Serving) = (self.state, state) {
            self.tp = tp;
            self.kv_capacity = physics.kv_capacity_tokens(tp);
        }
        self.state = state;
        self.version += 1;
        match state {
            Lifecycle::Serving | Lifecycle::Draining => self.start_if_ready(physics, now_s),
            _ => Next::Idle,
        }
    }

    /// The scheduled phase end (or pause end) has come: apply it and plan the next.
    pub fn on_event(&mut self, physics: &Physics, stats: &mut Stats, now_s: f64) -> Next {
        if let Some(p) = self.phase.take() {
            self.finish_phase(physics, stats, p);
            self.accounted_s = p.end_s();
        }
        self.apply_aborts();
        self.apply_pending_clock(physics, now_s);
        self.start_if_ready(physics, now_s)
    }

    fn start_if_ready(&mut self, physics: &Physics, now_s: f64) -> Next {
        if !matches!(self.state, Lifecycle::Serving | Lifecycle::Draining) {
            return Next::Idle;
        }
        if now_s < self.paused_until_s {
            return Next::At(self.paused_until_s);
        }
        // Admit within both the KV cache and the sequence limit, FIFO.
        let max_seqs = physics.engine.max_num_seqs as usize;
        while self.running() < max_seqs {
            match self.waiting.front() {
                Some(r) if self.kv_reserved + r.kv_tokens() <= self.kv_capacity => self.admit_one(),
                _ => break,
            }
        }
        let d = self.decoding.len() as u32;
        let budget = physics.step_token_budget(self.tp);
        let c =
            if self.prefill_left > 0 { u64::from(budget.saturating_sub(d)).min(self.prefill_left) as u32 } else { 0 };
        if d == 0 && c == 0 {
            self.settle(physics, now_s);
            return Next::Idle;
        }
        self.settle(physics, now_s);
        let k_dec = self.decoding.peek().map(|Reverse((f, ..))| f - self.steps_done).unwrap_or(u64::MAX);
        let (k_pre, head_done) = match self.prefilling.front() {
            Some(h) if c > 0 => {
                // The chunk stays `c` tokens only while at least `c` prompt tokens are left.
                let full_steps = (self.prefill_left / u64::from(c)).max(1);
                let k = u64::from(h.left.div_ceil(c)).min(full_steps);
                (k, h.req.input_tokens - h.left)
            }
            _ => (u64::MAX, 0),
        };
        let steps = k_dec.min(k_pre).max(1);
        let shape = StepShape {
            decode_seqs: d,
            decode_context_tokens: (self.ctx_offset_sum + i64::from(d) * (self.steps_done as i64 + 1)).max(0) as f64,
            prefill_tokens: c,
            prefill_context_tokens: if c > 0 {
                f64::from(head_done) + (steps.min(1 << 20) as f64 * f64::from(c)) / 2.0
            } else {
                0.0
            },
        };
        let cost = physics.step(self.tp, self.clock_mhz, &shape);
        let phase = Phase { start_s: now_s, steps, cost, prefill_tokens: c };
        self.phase = Some(phase);
        self.version += 1;
        Next::At(phase.end_s())
    }

    fn admit_one(&mut self) {
        if let Some(r) = self.waiting.pop_front() {
            self.kv_reserved += r.kv_tokens();
            self.prefill_left += u64::from(r.input_tokens);
            self.prefilling.push_back(Prefilling { req: r, left: r.input_tokens });
        }
    }

    fn finish_phase(&mut self, physics: &Physics, stats: &mut Stats, p: Phase) {
        let n = p.steps;
        self.energy_j += p.energy_of(n) * f64::from(self.tp);
        let end_s = p.start_s + p.time_of(n);
        // Token gaps of every decoding sequence, per class.
        for (class, &count) in self.decoding_by_class.iter().enumerate() {
            if count > 0 {
                stats.gaps(class, u64::from(count), n, p.cost.time_s, p.cost.time_growth_s, end_s);
            }
        }
        self.tokens_out += n * self.decoding.len() as u64;
        self.steps_done += n;
        while let Some(&Reverse((finish, offset, kv, class, id))) = self.decoding.peek() {
            if finish > self.steps_done {
                break;
            }
            self.decoding.pop();
            if let Some(ev) = &mut self.events {
                ev.push(EngineEvent::Finished { id, at_s: end_s });
            }
            self.ctx_offset_sum -= offset;
            self.decoding_by_class[class as usize] -= 1;
            self.kv_reserved -= kv;
            self.completed += 1;
            stats.completed(class as usize);
        }
        // Prefill progress, FIFO.
        let mut consumed = (n * u64::from(p.prefill_tokens)).min(self.prefill_left);
        self.prefill_left -= consumed;
        while consumed > 0 {
            let head = self.prefilling.front_mut().expect("prefill tokens imply a queued prompt");
            if u64::from(head.left) > consumed {
                head.left -= consumed as u32;
                break;
            }
            consumed -= u64::from(head.left);
            let done = self.prefilling.pop_front().expect("checked").req;
            let class = usize::from(done.class);
            stats.ttft(class, end_s - done.arrival_s + physics.perf.request_overhead_s, end_s);
            self.tokens_out += 1;
            if let Some(ev) = &mut self.events {
                ev.push(EngineEvent::FirstToken { id: done.id, at_s: end_s, step: self.steps_done });
                if done.output_tokens <= 1 {
                    ev.push(EngineEvent::Finished { id: done.id, at_s: end_s });
                }
            }
            if done.output_tokens <= 1 {
                self.kv_reserved -= done.kv_tokens();
                self.completed += 1;
                stats.completed(class);
            } else {
                // First decode step is steps_done + 1 with context input + 1.
                let offset = i64::from(done.input_tokens) - self.steps_done as i64;
                let finish = self.steps_done + u64::from(done.output_tokens - 1);
                self.ctx_offset_sum += offset;
                self.decoding_by_class[class] += 1;
                self.decoding.push(Reverse((finish, offset, done.kv_tokens(), done.class, done.id)));
            }
        }
    }
}
