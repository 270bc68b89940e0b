//! telemetry-core: the vocabulary of measurement, with no IO runtime — request
//! classes and their boundaries, latency objectives, request traces and the
//! arrival streams made from them, typed samples and per-class series. Every
//! dynamollm crate speaks it; the sans-IO controller depends on it alone, and
//! `telemetry` re-exports it beside the collectors and stores.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod class;
pub mod sample;
pub mod series;
pub mod slo;
pub mod trace;

pub use class::{ClassBoundaries, InstanceRole, LengthBand, RequestClass, CLASS_COUNT};
pub use slo::{
    cluster_interval_s, stamped_gap_s, unix_now_s, Balance, ClassSlo, SloRule, P99_ATTAINMENT, ROUTER_HELD_HEADER,
    TWIN_ARRIVAL_STAMP, TWIN_SENT_STAMP, TWIN_TOKEN_STAMP,
};
pub use trace::{LengthSamples, Request, TraceError};
