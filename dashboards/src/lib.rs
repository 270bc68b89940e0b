//! dashboards: carbon and cost accounting, reports (HTML with charts,
//! CSV/JSON), Grafana dashboards and the live page.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accounting;
pub mod browser;
pub mod config;
pub mod intensity;
pub mod live;
pub mod report;
pub mod svg;
