//! telemetry: the vocabulary of measurement shared by every dynamollm crate —
//! request classes, request traces and the arrival streams made from them,
//! typed samples — and the machinery that moves them: collectors (NVML or the
//! twin's fake GPU, engine `/metrics` scrapes, MQTT from edge nodes), the
//! embedded store (the default) and the InfluxDB v2 sink.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod class;
pub mod collect;
pub mod config;
pub mod gpu;
pub mod ingest;
pub mod mqtt;
pub mod sample;
pub mod scrape;
pub mod series;
pub mod sink;
pub mod stats;
pub mod store;
pub mod trace;

pub use class::{ClassBoundaries, LengthBand, RequestClass, CLASS_COUNT};
pub use trace::{LengthSamples, Request, TraceError};
