//! sim: the digital twin — DGX H100 servers serving Llama-2-70B with a
//! vLLM-like engine (continuous batching, chunked prefill, paged KV cache),
//! per-GPU power with exactly integrated energy, instance lifecycle with the
//! reconfiguration delays of the twin's calibration anchors (docs/twin.md), and trace replay in virtual
//! time. Its physics is read from a data file; the controller never reads it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod engine;
pub mod physics;
pub mod stats;
pub mod timeline;

pub use cluster::{Cluster, ClusterSpec, InstanceSpec, PoolSpec, RunTotals};
pub use engine::{EngineEvent, EngineRequest, Instance, Lifecycle, Next};
pub use physics::{Balance, Physics, PhysicsError, StepCost, StepShape};
pub use stats::{ClassSlo, LatencySummary, RejectReason, Stats};
pub use timeline::{PoolInterval, Timeline, TimelinePoint};
pub mod anchors;
pub mod bound;
pub mod measure;
pub mod workload;

pub use workload::{Workload, PREDICTOR_SEED};
