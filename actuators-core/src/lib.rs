//! actuators-core: the vocabulary of action, with no IO — what the
//! controller emits (spawn, retire, reshard, set clock, route, move queued
//! requests), the [`Command`] that carries an action with its idempotency
//! [`ActionId`], and what became of it ([`Outcome`], [`Ack`]). The sans-IO
//! controller depends on it alone; `actuators` re-exports it beside the
//! backends that carry actions out.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

/// Identifies an engine instance within a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceId(pub u32);

/// Identifies a request pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PoolId(pub u32);

/// How a new instance comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpawnFrom {
    /// A cold VM: download weights, start the engine.
    Cold,
    /// A warm standby (snapshot or sleeping engine).
    WarmStandby,
}

/// How a reshard is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReshardPath {
    /// Stop the engine and start it again with the new TP degree.
    Restart,
    /// Move weights over NVLink in place (DynamoLLM's fast path).
    InPlace,
}

/// One thing the controller asks the cluster to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Action {
    /// Start a new instance in a pool.
    Spawn {
        /// The new instance's id.
        instance: InstanceId,
        /// The pool it will serve.
        pool: PoolId,
        /// Tensor-parallel degree (GPUs).
        tp: u32,
        /// GPU clock to run at.
        clock_mhz: u32,
        /// Cold or from warm standby.
        from: SpawnFrom,
    },
    /// Stop routing to an instance, let it drain, release its GPUs.
    Retire {
        /// The instance.
        instance: InstanceId,
    },
    /// Change an instance's tensor-parallel degree.
    Reshard {
        /// The instance.
        instance: InstanceId,
        /// New degree.
        tp: u32,
        /// How.
        path: ReshardPath,
    },
    /// Send a request class to a pool (pools merge and split this way).
    Route {
        /// The class (e.g. `SS`).
        class: String,
        /// The pool that serves it from now on.
        pool: PoolId,
    },
    /// Lock an instance's GPUs to a clock.
    SetClock {
        /// The instance.
        instance: InstanceId,
        /// The clock.
        clock_mhz: u32,
    },
    /// Backlog guard: hand requests an instance has not started (queued,
    /// no prefill done) to the least-loaded other instances of a pool (its
    /// own, or the next-larger class's). They keep their arrival time.
    MoveQueued {
        /// The instance whose queue is too long.
        instance: InstanceId,
        /// The pool that takes them.
        pool: PoolId,
        /// At most this many.
        max_requests: u32,
    },
}

impl Action {
    /// The action's kind, as in its JSON `kind` tag: `spawn`, `retire`,
    /// `reshard`, `route`, `set-clock` or `move-queued`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Spawn { .. } => "spawn",
            Action::Retire { .. } => "retire",
            Action::Reshard { .. } => "reshard",
            Action::Route { .. } => "route",
            Action::SetClock { .. } => "set-clock",
            Action::MoveQueued { .. } => "move-queued",
        }
    }

    /// The instance the action concerns (none for a route).
    pub fn instance(&self) -> Option<InstanceId> {
        match self {
            Action::Spawn { instance, .. }
            | Action::Retire { instance }
            | Action::Reshard { instance, .. }
            | Action::SetClock { instance, .. }
            | Action::MoveQueued { instance, .. } => Some(*instance),
            Action::Route { .. } => None,
        }
    }

    /// The pool the action concerns, where it names one.
    pub fn pool(&self) -> Option<PoolId> {
        match self {
            Action::Spawn { pool, .. } | Action::Route { pool, .. } | Action::MoveQueued { pool, .. } => Some(*pool),
            _ => None,
        }
    }
}

/// A unique, stable id for one action. Backends use it as the idempotency key:
/// the same id applied twice does the thing once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ActionId(pub String);

impl std::fmt::Display for ActionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an instance lives, as the backend that spawned it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Placement {
    /// The node (host name, or `site/node` for an edge site).
    pub node: String,
    /// GPU indices on that node.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// The engine's base URL (OpenAI-compatible API and `/metrics`), once known.
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// An action with its id, as dispatched to a backend (and as sent over MQTT
/// on `dynamollm/<site>/<node>/cmd`, and as the exec/webhook JSON body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// The idempotency key.
    pub id: ActionId,
    /// What to do.
    pub action: Action,
    /// Where the instance the action concerns lives (none for a spawn).
    #[serde(default)]
    pub placement: Option<Placement>,
    /// When it was issued, milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Done (or found already done: the id had been applied).
    Applied {
        /// For a spawn: where the new instance lives.
        #[serde(default)]
        placement: Option<Placement>,
        /// A short human-readable note.
        #[serde(default)]
        detail: String,
    },
    /// The backend refused or failed.
    Failed {
        /// Why.
        reason: String,
        /// Whether trying again (same id) may succeed.
        retryable: bool,
    },
    /// No acknowledgement within the timeout.
    TimedOut {
        /// How long it waited.
        after_ms: u64,
    },
}

impl Outcome {
    /// The outcome's name, as in its JSON `outcome` tag: `applied`, `failed`
    /// or `timed-out`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Failed { .. } => "failed",
            Outcome::TimedOut { .. } => "timed-out",
        }
    }

    /// The placement an applied outcome reports, if any.
    pub fn placement(&self) -> Option<&Placement> {
        match self {
            Outcome::Applied { placement, .. } => placement.as_ref(),
            _ => None,
        }
    }

    /// Whether the action took effect.
    pub fn is_applied(&self) -> bool {
        matches!(self, Outcome::Applied { .. })
    }
}

/// The acknowledgement an edge node publishes on `dynamollm/<site>/<node>/ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The command's id.
    pub id: ActionId,
    /// What became of it.
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Command {
    /// A command issued now.
    pub fn new(id: impl Into<String>, action: Action, placement: Option<Placement>) -> Command {
        Command { id: ActionId(id.into()), action, placement, issued_at_ms: now_ms() }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
