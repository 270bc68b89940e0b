//! actuators: the vocabulary of action (spawn, retire, reshard, set clock,
//! route) that the controller emits and every backend (the twin, NVML clocks,
//! exec/webhook, MQTT) carries out.
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
