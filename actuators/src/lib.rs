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
