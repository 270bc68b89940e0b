//! dashboards: carbon and cost accounting, reports (HTML with charts,
//! CSV/JSON), Grafana dashboards and the live page.
#![forbid(unsafe_code)]
