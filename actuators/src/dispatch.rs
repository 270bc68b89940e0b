//! The [`Dispatcher`]: routes each command to the first backend that
//! supports it, bounds it with that backend's timeout, and records it in the
//! [`AuditLog`] before and after (see [`crate::audit`] for the contract).

use crate::audit::{AuditError, AuditLog, AuditRecord, AuditState};
use crate::{Action, ActionId, Actuator, Command, Outcome};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A command could not be dispatched safely.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The audit log failed: the command was not sent (when `begin` failed)
    /// or its outcome is not recorded (when `finish` failed).
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The id was used before for a different action.
    #[error("action id {id} was already used for a different action ({recorded}); ids must be unique per action")]
    Conflict {
        /// The id.
        id: ActionId,
        /// The action recorded under it, as JSON.
        recorded: String,
    },
}

struct Backend {
    actuator: Arc<dyn Actuator>,
    timeout: Duration,
}

/// Counters of dispatched commands by action kind and outcome, for the
/// service's Prometheus export.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatcherStats {
    /// `(kind, outcome) → count`. `kind` is [`crate::Action::kind`];
    /// `outcome` is [`Outcome::label`] (`applied`, `failed`, `timed-out`) or
    /// `already-applied` (an applied id dispatched again; the backend was
    /// not called) or `no-backend`.
    pub outcomes: BTreeMap<(String, String), u64>,
    /// Re-sends of commands found `issued`, `failed` or `timed-out` in the
    /// audit log.
    pub resent: u64,
    /// Audit log errors.
    pub audit_errors: u64,
}

/// Routes commands to backends, with timeouts and the audit log.
pub struct Dispatcher {
    backends: Vec<Backend>,
    audit: Arc<AuditLog>,
    stats: Mutex<DispatcherStats>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("backends", &self.backends.iter().map(|b| (b.actuator.name(), b.timeout)).collect::<Vec<_>>())
            .field("audit", &self.audit)
            .finish()
    }
}

impl Dispatcher {
    /// A dispatcher with no backends, recording into `audit`.
    pub fn new(audit: Arc<AuditLog>) -> Dispatcher {
        Dispatcher { backends: Vec::new(), audit, stats: Mutex::new(DispatcherStats::default()) }
    }

    /// Add a backend after those already there; `timeout` bounds each of
    /// its `apply` calls.
    pub fn push(&mut self, actuator: Arc<dyn Actuator>, timeout: Duration) {
        self.backends.push(Backend { actuator, timeout });
    }

    /// Add a backend before those already there (it is asked first).
    pub fn push_front(&mut self, actuator: Arc<dyn Actuator>, timeout: Duration) {
        self.backends.insert(0, Backend { actuator, timeout });
    }

    /// [`Dispatcher::push`], builder style.
    pub fn with_backend(mut self, actuator: Arc<dyn Actuator>, timeout: Duration) -> Dispatcher {
        self.push(actuator, timeout);
        self
    }

    /// The backends' names, in order.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.actuator.name().to_string()).collect()
    }

    /// Whether a backend carries out actions of `action`'s kind.
    pub fn carries(&self, action: &Action) -> bool {
        self.backends.iter().any(|b| b.actuator.supports(action))
    }

    /// The audit log.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DispatcherStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn count(&self, kind: &str, outcome: &str) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        *s.outcomes.entry((kind.to_string(), outcome.to_string())).or_default() += 1;
    }

    fn count_audit_error(&self) {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).audit_errors += 1;
    }

    async fn audit_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AuditLog) -> Result<T, AuditError> + Send + 'static,
    ) -> Result<T, AuditError> {
        let audit = self.audit.clone();
        let path = audit.path().to_path_buf();
        let r = tokio::task::spawn_blocking(move || f(&audit))
            .await
            .unwrap_or_else(|e| Err(AuditError::Storage { path, what: "audit task", problem: e.to_string() }));
        if r.is_err() {
            self.count_audit_error();
        }
        r
    }

    /// Carry out one command:
    ///
    /// * an id the audit log has as applied is not sent again: its recorded
    ///   outcome is returned;
    /// * an id recorded as `issued` (a crash mid-action), `failed` or
    ///   `timed-out` is sent again with the same id, and its attempts grow;
    /// * otherwise the first backend that supports the action gets it, after
    ///   `begin` is committed, within that backend's timeout; the outcome is
    ///   committed with `finish`.
    ///
    /// No backend → `Failed` (not retryable), recorded too.
    ///
    /// Dispatch one id from one task at a time: two concurrent dispatches
    /// of the same id may both reach the backend (harmless for idempotent
    /// backends, but counted twice in `attempts`).
    pub async fn dispatch(&self, cmd: &Command) -> Result<Outcome, DispatchError> {
        let kind = cmd.action.kind();
        let id = cmd.id.clone();
        let prev: Option<AuditRecord> = self.audit_call(move |a| a.get(&id)).await?;
        if let Some(rec) = &prev {
            if rec.action != cmd.action {
                return Err(DispatchError::Conflict {
                    id: cmd.id.clone(),
                    recorded: serde_json::to_string(&rec.action).unwrap_or_default(),
                });
            }
            if rec.state == AuditState::Applied {
                if let Some(outcome) = &rec.outcome {
                    tracing::info!(id = %cmd.id, kind, "already applied; not sent again");
                    self.count(kind, "already-applied");
                    return Ok(outcome.clone());
                }
            }
            tracing::warn!(id = %cmd.id, kind, state = ?rec.state, attempts = rec.attempts, "sending again with the same id");
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).resent += 1;
        }
        let Some(backend) = self.backends.iter().find(|b| b.actuator.supports(&cmd.action)) else {
            let outcome = Outcome::Failed {
                reason: format!(
                    "no backend carries out {kind} actions (configured: {})",
                    if self.backends.is_empty() { "none".to_string() } else { self.backend_names().join(", ") }
                ),
                retryable: false,
            };
            let (c, o) = (cmd.clone(), outcome.clone());
            self.audit_call(move |a| {
                a.begin(&c, "none")?;
                a.finish(&c.id, &o)
            })
            .await?;
            self.count(kind, "no-backend");
            return Ok(outcome);
        };
        let name = backend.actuator.name().to_string();
        let c = cmd.clone();
        let n = name.clone();
        self.audit_call(move |a| a.begin(&c, &n)).await?;

        let started = Instant::now();
        let actuator = backend.actuator.clone();
        let c = cmd.clone();
        let mut task = tokio::spawn(async move { actuator.apply(&c).await });
        let outcome = match tokio::time::timeout(backend.timeout, &mut task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => Outcome::Failed { reason: format!("backend {name} crashed: {e}"), retryable: true },
            Err(_) => {
                task.abort();
                Outcome::TimedOut { after_ms: started.elapsed().as_millis() as u64 }
            }
        };
        match &outcome {
            Outcome::Applied { .. } => tracing::info!(id = %cmd.id, kind, backend = %name, "applied"),
            Outcome::Failed { reason, .. } => tracing::warn!(id = %cmd.id, kind, backend = %name, %reason, "failed"),
            Outcome::TimedOut { after_ms } => {
                tracing::warn!(id = %cmd.id, kind, backend = %name, after_ms, "timed out")
            }
        }
        let (id, o) = (cmd.id.clone(), outcome.clone());
        self.audit_call(move |a| a.finish(&id, &o)).await?;
        self.count(kind, outcome.label());
        Ok(outcome)
    }

    /// After a restart: send every command the audit log has in flight again
    /// (same ids), oldest first, and return their outcomes.
    pub async fn recover(&self) -> Result<Vec<(ActionId, Outcome)>, DispatchError> {
        let pending = self.audit_call(|a| a.in_flight()).await?;
        let mut out = Vec::with_capacity(pending.len());
        for rec in pending {
            let outcome = self.dispatch(&rec.command).await?;
            out.push((rec.id, outcome));
        }
        Ok(out)
    }

    /// Put every backend back to its safe state (clocks reset); returns the
    /// backends that failed and why.
    pub async fn reset_all(&self) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for b in &self.backends {
            if let Err(e) = b.actuator.reset().await {
                tracing::error!(backend = b.actuator.name(), error = %e, "reset failed");
                failed.push((b.actuator.name().to_string(), e));
            }
        }
        failed
    }
}
