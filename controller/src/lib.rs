//! controller: the brain of dynamollm, sans-IO. The three control loops
//! (scale, shard, clock) and the backlog guard as one state machine,
//! `Controller::step(now, observations) -> actions`; the planner that picks
//! least-energy pool layouts from the profile table and its interpolation;
//! what it learns from SLO attainment; the policies it can run; and the
//! output-length predictor the router classes requests with.
//!
//! No async runtime, no sockets, no dependency on the twin: the service
//! drives it from tokio timers, the command line drives it in the twin's
//! virtual time, and both see the same decisions for the same inputs. It
//! knows the hardware only through profile tables and the observations it is
//! given.
#![forbid(unsafe_code)]

pub mod control;
pub mod policy;
pub mod predict;
pub mod profile;
