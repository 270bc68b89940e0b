//! dynamollm: the controller (profiles, SLO model, optimiser, the three
//! control loops, policies) and the commands of the `dynamollm` binary.
#![forbid(unsafe_code)]

pub mod cmd;
pub mod policy;
pub mod report;
pub mod workload;
