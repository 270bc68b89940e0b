//! The inventory and the commands: the routing the backends follow, retires
//! held for make-before-break, commands issued with their ids, and what their
//! outcomes change.

use super::*;

impl ServiceCore {
    /// Carry the controller's routing table to the backends, class by class:
    /// a class goes to its new pool once that pool has a serving instance
    /// (or at once when its old pool has none); one route per class in
    /// flight; a route that failed is sent again after a wait that doubles
    /// up to [`ROUTE_RETRY_MAX_S`]; nothing is sent unless `act`. Without
    /// a backend that routes, the built-in router (or the twin's) follows
    /// [`ServiceCore::routed`] itself, making before breaking: the table
    /// becomes it at once when `act`, and not at all otherwise (dry-run, or
    /// failsafe while blind, moves no class).
    pub(super) fn follow_routing(&mut self, now_s: f64, wall_ms: u64, act: bool) -> Vec<Command> {
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
    pub(super) fn pool_serves(&self, pool: u32, except: Option<InstanceId>) -> bool {
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
    pub(super) fn retire_blocked(&self, instance: InstanceId) -> Option<String> {
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
    pub(super) fn release_retires(&mut self, now_s: f64, wall_ms: u64) -> Vec<Command> {
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
    pub(super) fn remember_before(&mut self, id: &ActionId, action: &Action) {
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
    pub(super) fn issue(&mut self, action: &Action, now_s: f64, wall_ms: u64) -> Command {
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
    pub(super) fn issue_own(
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
    pub(super) fn top_clocks(
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

    pub(super) fn push_decision(&mut self, d: DecisionRecord) {
        self.decisions.push_back(d);
        if self.decisions.len() > DECISIONS_KEPT {
            self.decisions.pop_front();
        }
    }

    pub(super) fn gpus(&self) -> u32 {
        self.instances.values().map(|r| r.tp).sum()
    }

    pub(super) fn placement_of(&self, action: &Action) -> Option<Placement> {
        let id = match action {
            Action::Retire { instance }
            | Action::Reshard { instance, .. }
            | Action::SetClock { instance, .. }
            | Action::MoveQueued { instance, .. } => instance,
            Action::Spawn { .. } | Action::Route { .. } => return None,
        };
        self.instances.get(id).and_then(|r| r.placement.clone())
    }

    pub(super) fn apply_to_inventory(&mut self, action: &Action, now_s: f64) {
        match *action {
            Action::Spawn { instance, pool, tp, clock_mhz, .. } => {
                if self.first_fleet_up && self.counters.ticks <= 1 {
                    self.no_spawn_lead.insert(instance);
                }
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
                        last_gpu_s: None,
                        last_engine_s: None,
                        gpus: BTreeMap::new(),
                        queues: BTreeMap::new(),
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
}
