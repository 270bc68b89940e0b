//! telemetry: the machinery that moves measurements — collectors (NVML or the
//! twin's fake GPU, engine `/metrics` scrapes, MQTT from edge nodes), the
//! embedded store (the default) and the InfluxDB v2 sink. The vocabulary they
//! carry (request classes, SLOs, traces, typed samples) lives in
//! `telemetry-core`, which has no IO, and is re-exported here under the same
//! paths.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod collect;
pub mod config;
pub mod dcgm;
pub mod gpu;
pub mod histogram;
pub mod ingest;
pub mod mqtt;
pub mod prom_history;
pub mod prom_query;
pub mod scrape;
pub mod sink;
pub mod stats;
pub mod store;

pub use telemetry_core::{class, sample, series, slo, trace};
pub use telemetry_core::{
    cluster_interval_s, stamped_gap_s, unix_now_s, ROUTER_HELD_HEADER, TWIN_ARRIVAL_STAMP, TWIN_SENT_STAMP,
    TWIN_TOKEN_STAMP,
};
pub use telemetry_core::{
    Balance, ClassBoundaries, ClassSlo, InstanceRole, LengthBand, LengthSamples, Request, RequestClass, SloRule,
    TraceError, CLASS_COUNT, P99_ATTAINMENT,
};
