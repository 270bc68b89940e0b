//! dynamollm: the controller (profiles, SLO model, optimiser, the three
//! control loops, policies) and the commands of the `dynamollm` binary.
#![forbid(unsafe_code)]

pub mod agent;
pub mod closed_loop;
pub mod cmd;
pub mod control;
pub mod loadgen;
pub mod policy;
pub mod predict;
pub mod profile;
pub mod report;
pub mod serve;
pub mod twin_metrics;
pub mod twin_serve;
pub mod workload;
