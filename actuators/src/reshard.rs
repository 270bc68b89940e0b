//! Reshard as make-before-break: bring up the new configuration, wait until
//! it serves, shift routing, drain and retire the old one. On failure or a
//! readiness timeout the new instance is retired and the old one keeps
//! serving.
//!
//! Every step is a [`Command`] with an id derived from the reshard's id, so
//! that the [`AuditLog`](crate::AuditLog) is the only state:
//!
//! | step | id | action |
//! | --- | --- | --- |
//! | spawn the new config | `<id>/spawn` | `Spawn { new, pool, tp, clock_mhz, from }` |
//! | shift routing | `<id>/route/<class>` | `Route { class, pool }`, one per class |
//! | retire the old (drains) | `<id>/retire` | `Retire { old }` |
//! | rollback | `<id>/rollback` | `Retire { new }` |
//!
//! Readiness (between spawn and route) is polled through the caller's
//! [`Readiness`]; it is not a command and is not recorded.
//!
//! **Resuming.** Running the same plan again after a crash continues where
//! it stopped: the dispatcher returns the recorded outcome of every step
//! already applied without calling a backend, re-sends a step caught
//! mid-flight with the same id, and the readiness wait is skipped when a
//! later step (a route or the retire) was already begun. A rollback once
//! begun is carried on, never reversed.

use crate::audit::{AuditError, AuditRecord, AuditState};
use crate::dispatch::{DispatchError, Dispatcher};
use crate::{Action, ActionId, Command, InstanceId, Outcome, Placement, PoolId, SpawnFrom};
use std::time::Duration;

/// Whether a newly spawned instance serves (e.g. its `/health` answers and a
/// test request completes). Supplied by the caller.
#[async_trait::async_trait]
pub trait Readiness: Send + Sync {
    /// Whether the instance at `placement` is ready. The placement is the
    /// one the spawn reported, or the spawn command's own placement, or an
    /// empty one when neither is known.
    async fn is_ready(&self, placement: &Placement) -> bool;
}

/// One reshard: instance `old` is replaced by `new` at TP `tp`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReshardPlan {
    /// The reshard's id; step ids derive from it.
    pub id: ActionId,
    /// The instance being replaced.
    pub old: InstanceId,
    /// Where it lives (sent with its retire).
    pub old_placement: Option<Placement>,
    /// The new instance's id.
    pub new: InstanceId,
    /// The pool both serve.
    pub pool: PoolId,
    /// The new tensor-parallel degree.
    pub tp: u32,
    /// The new instance's clock.
    pub clock_mhz: u32,
    /// Cold start or warm standby.
    pub from: SpawnFrom,
    /// A placement hint sent with the spawn (e.g. the edge node for MQTT).
    pub spawn_placement: Option<Placement>,
    /// Request classes routed to the pool once the new instance is ready.
    pub classes: Vec<String>,
}

impl ReshardPlan {
    /// A plan from the controller's `reshard` command: the new instance's
    /// id, pool, clock and the classes to route are the caller's. The spawn
    /// is cold for `path = restart` and warm standby for `in-place`.
    pub fn from_command(
        cmd: &Command,
        new: InstanceId,
        pool: PoolId,
        clock_mhz: u32,
        classes: Vec<String>,
    ) -> Result<ReshardPlan, String> {
        let Action::Reshard { instance, tp, path } = &cmd.action else {
            return Err(format!("command {} is a {}, not a reshard", cmd.id, cmd.action.kind()));
        };
        if *instance == new {
            return Err(format!("command {}: the new instance must differ from the old ({})", cmd.id, instance.0));
        }
        Ok(ReshardPlan {
            id: cmd.id.clone(),
            old: *instance,
            old_placement: cmd.placement.clone(),
            new,
            pool,
            tp: *tp,
            clock_mhz,
            from: match path {
                crate::ReshardPath::Restart => SpawnFrom::Cold,
                crate::ReshardPath::InPlace => SpawnFrom::WarmStandby,
            },
            spawn_placement: None,
            classes,
        })
    }

    /// The spawn step's id.
    pub fn spawn_id(&self) -> ActionId {
        ActionId(format!("{}/spawn", self.id))
    }

    /// The route step's id for a class.
    pub fn route_id(&self, class: &str) -> ActionId {
        ActionId(format!("{}/route/{class}", self.id))
    }

    /// The retire-the-old step's id.
    pub fn retire_id(&self) -> ActionId {
        ActionId(format!("{}/retire", self.id))
    }

    /// The rollback (retire the new) step's id.
    pub fn rollback_id(&self) -> ActionId {
        ActionId(format!("{}/rollback", self.id))
    }
}

/// How a reshard ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ReshardResult {
    /// The new instance serves; the old one is retired.
    Completed {
        /// Where the new instance lives, as its spawn reported.
        placement: Option<Placement>,
    },
    /// The new instance was retired; the old one keeps serving.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// The new instance serves, but retiring the old one failed: run the
    /// plan again to retry the retire only.
    RetireOldFailed {
        /// Why.
        reason: String,
    },
    /// Rolling back failed too: the new instance may still run. Run the plan
    /// again to retry the rollback.
    RollbackFailed {
        /// Why the reshard was rolled back.
        reason: String,
        /// Why the rollback failed.
        rollback: String,
    },
}

/// The reshard's outcome and the steps dispatched (in order; steps already
/// applied before a restart are listed with their recorded outcome).
#[derive(Debug, Clone, PartialEq)]
pub struct ReshardReport {
    /// How it ended.
    pub result: ReshardResult,
    /// `(step id, outcome)` in order.
    pub steps: Vec<(ActionId, Outcome)>,
}

/// The make-before-break orchestrator (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MakeBeforeBreak {
    /// Give up waiting for the new instance after this long (then roll back).
    pub ready_timeout: Duration,
    /// Ask [`Readiness`] this often.
    pub poll_interval: Duration,
    /// Wait this long after shifting routing before retiring the old
    /// instance (in-flight requests finish; the retire drains too).
    pub drain: Duration,
}

impl Default for MakeBeforeBreak {
    fn default() -> Self {
        MakeBeforeBreak {
            ready_timeout: Duration::from_secs(600),
            poll_interval: Duration::from_secs(2),
            drain: Duration::from_secs(0),
        }
    }
}

fn failure(o: &Outcome) -> String {
    match o {
        Outcome::Applied { .. } => "applied".into(),
        Outcome::Failed { reason, .. } => reason.clone(),
        Outcome::TimedOut { after_ms } => format!("no answer within {after_ms} ms"),
    }
}

impl MakeBeforeBreak {
    async fn record(&self, d: &Dispatcher, id: &ActionId) -> Result<Option<AuditRecord>, DispatchError> {
        let audit = d.audit().clone();
        let path = audit.path().to_path_buf();
        let id = id.clone();
        let rec = tokio::task::spawn_blocking(move || audit.get(&id))
            .await
            .unwrap_or_else(|e| Err(AuditError::Storage { path, what: "audit task", problem: e.to_string() }))?;
        Ok(rec)
    }

    async fn began(&self, d: &Dispatcher, id: &ActionId) -> Result<Option<AuditState>, DispatchError> {
        Ok(self.record(d, id).await?.map(|r| r.state))
    }

    async fn wait_ready(&self, readiness: &dyn Readiness, placement: &Placement) -> bool {
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        loop {
            match tokio::time::timeout_at(deadline, readiness.is_ready(placement)).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(_) => return false,
            }
            if tokio::time::Instant::now() + self.poll_interval >= deadline {
                return false;
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    async fn rollback(
        &self,
        plan: &ReshardPlan,
        d: &Dispatcher,
        new_placement: Option<Placement>,
        reason: String,
        steps: &mut Vec<(ActionId, Outcome)>,
    ) -> Result<ReshardReport, DispatchError> {
        tracing::warn!(reshard = %plan.id, %reason, "rolling back: retiring the new instance");
        let cmd = Command::new(plan.rollback_id().0, Action::Retire { instance: plan.new }, new_placement);
        let o = d.dispatch(&cmd).await?;
        steps.push((cmd.id.clone(), o.clone()));
        let result = if o.is_applied() {
            ReshardResult::RolledBack { reason }
        } else {
            ReshardResult::RollbackFailed { reason, rollback: failure(&o) }
        };
        Ok(ReshardReport { result, steps: std::mem::take(steps) })
    }

    /// Carry out (or resume) a reshard through `d`.
    pub async fn run(
        &self,
        plan: &ReshardPlan,
        d: &Dispatcher,
        readiness: &dyn Readiness,
    ) -> Result<ReshardReport, DispatchError> {
        let mut steps = Vec::new();
        // A rollback once begun is carried on.
        if self.began(d, &plan.rollback_id()).await?.is_some() {
            let placement = self.record(d, &plan.spawn_id()).await?.and_then(|r| r.placement);
            return self.rollback(plan, d, placement, "resumed an interrupted rollback".into(), &mut steps).await;
        }

        // 1. Spawn the new configuration.
        let spawn = Command::new(
            plan.spawn_id().0,
            Action::Spawn {
                instance: plan.new,
                pool: plan.pool,
                tp: plan.tp,
                clock_mhz: plan.clock_mhz,
                from: plan.from,
            },
            plan.spawn_placement.clone(),
        );
        let o = d.dispatch(&spawn).await?;
        steps.push((spawn.id.clone(), o.clone()));
        let new_placement = o.placement().cloned().or_else(|| plan.spawn_placement.clone());
        if !o.is_applied() {
            return self.rollback(plan, d, new_placement, format!("spawn: {}", failure(&o)), &mut steps).await;
        }

        // 2. Wait until it serves, unless a later step shows it did.
        let mut later_begun = self.began(d, &plan.retire_id()).await?.is_some();
        for class in &plan.classes {
            later_begun |= self.began(d, &plan.route_id(class)).await?.is_some();
        }
        if !later_begun {
            let p = new_placement.clone().unwrap_or_default();
            if !self.wait_ready(readiness, &p).await {
                let reason = format!("instance {} not ready within {:?}", plan.new.0, self.ready_timeout);
                return self.rollback(plan, d, new_placement, reason, &mut steps).await;
            }
            tracing::info!(reshard = %plan.id, instance = plan.new.0, "new instance ready");
        }

        // 3. Shift routing.
        for class in &plan.classes {
            let route =
                Command::new(plan.route_id(class).0, Action::Route { class: class.clone(), pool: plan.pool }, None);
            let o = d.dispatch(&route).await?;
            steps.push((route.id.clone(), o.clone()));
            if !o.is_applied() {
                let reason = format!("route {class}: {}", failure(&o));
                return self.rollback(plan, d, new_placement, reason, &mut steps).await;
            }
        }

        // 4. Drain and retire the old instance.
        if self.began(d, &plan.retire_id()).await?.is_none() && !self.drain.is_zero() {
            tokio::time::sleep(self.drain).await;
        }
        let retire =
            Command::new(plan.retire_id().0, Action::Retire { instance: plan.old }, plan.old_placement.clone());
        let o = d.dispatch(&retire).await?;
        steps.push((retire.id.clone(), o.clone()));
        let result = if o.is_applied() {
            ReshardResult::Completed { placement: new_placement }
        } else {
            ReshardResult::RetireOldFailed { reason: failure(&o) }
        };
        Ok(ReshardReport { result, steps })
    }
}
