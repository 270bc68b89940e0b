//! [`Secret`]: a string (a bearer token) that never shows in `Debug` output
//! or logs. The one type the whole workspace uses, from the telemetry crate
//! (MQTT passwords are secrets too).

pub use telemetry::config::Secret;
