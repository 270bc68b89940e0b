//! actuators: the vocabulary of action (spawn, retire, reshard, set clock,
//! route) that the controller emits and every backend (the twin, NVML clocks,
//! exec/webhook, MQTT) carries out.
//!
//! - The vocabulary: [`Action`], [`Command`] (an action with its idempotency
//!   [`ActionId`]), [`Outcome`], [`Ack`], [`Placement`] (from
//!   `actuators-core`, which has no IO, re-exported here), and the
//!   [`Actuator`] trait every backend implements.
//! - Backends: [`nvml`] (GPU clocks), [`exec`] (operator commands),
//!   [`webhook`] (HTTP POST), [`mqtt`] (edge sites).
//! - [`Dispatcher`]: routes commands to backends with timeouts, recording
//!   each in the redb [`AuditLog`] before and after (crash-safe, no action
//!   repeated), with counters for Prometheus.
//! - [`reshard::MakeBeforeBreak`]: resharding as spawn → ready → route →
//!   retire, rolled back on failure, resumable from the audit log.
//! - [`signed`]: HMAC-signed commands, acks and heartbeats for edge agents.
//! - [`config`]: the `[actuators]` TOML table and [`build`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod config;
pub mod dispatch;
pub mod exec;
pub mod mqtt;
pub mod nvml;
pub mod reshard;
pub mod secret;
pub mod signed;
pub mod webhook;

pub use audit::{AuditError, AuditLog, AuditRecord, AuditState};
pub use config::{build, ActuatorsConfig, BuildError};
pub use dispatch::{DispatchError, Dispatcher, DispatcherStats};
pub use secret::Secret;

pub use actuators_core::{
    now_ms, Ack, Action, ActionId, Command, InstanceId, Outcome, Placement, PoolId, ReshardPath, SpawnFrom,
};

/// A backend that carries out actions. `apply` must be idempotent by
/// `Command::id` and must return within its own timeout.
#[async_trait::async_trait]
pub trait Actuator: Send + Sync {
    /// The backend's name (`twin`, `nvml`, `exec`, `webhook`, `mqtt`).
    fn name(&self) -> &str;
    /// Whether this backend carries out this kind of action.
    fn supports(&self, action: &Action) -> bool;
    /// Carry out one command.
    async fn apply(&self, cmd: &Command) -> Outcome;
    /// Put the hardware back to its safe state (clocks reset), on shutdown.
    async fn reset(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The last `max_chars` characters of `s` (for stderr tails and response
/// bodies in error messages), cut on a character boundary.
pub fn tail(s: &str, max_chars: usize) -> String {
    let s = s.trim();
    let n = s.chars().count();
    if n <= max_chars {
        s.to_string()
    } else {
        let skip = n - max_chars;
        format!("…{}", s.chars().skip(skip).collect::<String>())
    }
}
