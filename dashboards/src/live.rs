//! The live page at `/` of `dynamollm serve`: a self-contained HTML + JS page
//! (no external resources) that polls `GET api/v1/status` every 2 s, sending
//! `Authorization: Bearer <token>` from the page URL's `?token=`, and renders
//! the mode, pools, instances with clocks, power, GPUs, forecast against
//! actual per class, savings so far, and sparklines of power and requests/s.
//!
//! The status JSON it reads:
//! `{"mode","time_s","telemetry_lag_s","pools":[{"id","name","classes","instances","gpus","power_w","planned_rps"}],
//! "instances":[{"id","pool","tp","clock_mhz","state","power_w"}],"classes":[{"class","actual_rps","forecast_rps","attainment"}],
//! "totals":{"energy_j","baseline_energy_j","power_w","gpus","savings_ratio"},"history":[{"time_s","power_w","gpus","actual_rps","forecast_rps"}]}`.
//! `savings_ratio` is the share of energy saved against the baseline (0.35: 35% less).
//! A 401 or 403 shows a visible "unauthorised" message; an unreachable
//! controller shows "cannot reach the controller". Element ids for tests:
//! `mode`, `total-power-w`, `total-gpus`, `energy-kwh`, `baseline-energy-kwh`,
//! `savings-pct`, `status-message`, tables `pools`, `instances`, `classes`.

/// The page.
pub const PAGE_HTML: &str = include_str!("live.html");
