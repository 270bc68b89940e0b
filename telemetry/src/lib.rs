//! telemetry: the vocabulary of measurement shared by every dynamollm crate —
//! request classes, request traces and the arrival streams made from them, and
//! (later) samples, collectors and stores.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod class;
pub mod gpu;
pub mod series;
pub mod trace;

pub use class::{ClassBoundaries, LengthBand, RequestClass, CLASS_COUNT};
pub use trace::{LengthSamples, Request, TraceError};
