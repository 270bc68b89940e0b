//! The live page at `/` of `dynamollm serve`: a self-contained HTML + JS page
//! (no external resources) that polls `GET api/v1/status` every 2 s, sending
//! `Authorization: Bearer <token>` from the page URL's `?token=`, and renders
//! the mode, pools, instances with clocks, power, GPUs, forecast against
//! actual per class, savings so far, and sparklines of power and requests/s.
//!
//! The status JSON it reads:
//! `{"mode","time_s","telemetry_lag_s","pools":[{"id","name","classes","instances","gpus","power_w","planned_rps",
//! "capacity_scale","capacity_scale_after_miss","clock_margin"}],
//! "instances":[{"id","pool","tp","clock_mhz","state","power_w"}],"classes":[{"class","actual_rps","forecast_rps","attainment"}],
//! "totals":{"energy_j","baseline_energy_j","power_w","gpus","savings_ratio"},"history":[{"time_s","power_w","gpus","actual_rps","forecast_rps"}]}`.
//! `savings_ratio` is the share of energy saved against the baseline (0.35: 35% less).
//! A 401 or 403 shows a visible "unauthorised" message; an unreachable
//! controller shows "cannot reach the controller". Element ids for tests:
//! `mode`, `total-power-w`, `total-gpus`, `energy-kwh`, `baseline-energy-kwh`,
//! `savings-pct`, `status-message`, tables `pools`, `instances`, `classes`.

/// The page.
pub const PAGE_HTML: &str = include_str!("live.html");

/// What the live page showed in the browser.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveCheck {
    /// The page check (console errors, DOM).
    pub page: crate::browser::PageCheck,
    /// Text of `#mode`.
    pub mode: String,
    /// Text of `#total-power-w` (e.g. `6446 W`).
    pub power: String,
    /// Text of `#total-gpus`.
    pub gpus: String,
    /// Text of `#savings-pct` (e.g. `35.0%`).
    pub savings: String,
    /// Text of `#status-message` (empty when the last poll succeeded).
    pub message: String,
}

/// Text content of the first element with this id in a serialised DOM (up to its first child tag).
pub fn text_of(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    Some(dom[at..].split_once('>')?.1.split('<').next()?.to_string())
}

/// Load the live page of a server (`{base_url}/?token=…`) in headless Chromium
/// and read what it shows: for the tests of `serve` and `demo`.
pub fn check_live(
    chromium: &std::path::Path,
    base_url: &str,
    token: Option<&str>,
    out_png: &std::path::Path,
) -> anyhow::Result<LiveCheck> {
    let url = match token {
        Some(t) => format!("{}/?token={t}", base_url.trim_end_matches('/')),
        None => format!("{}/", base_url.trim_end_matches('/')),
    };
    let page = crate::browser::check_page(chromium, &url, out_png)?;
    let get = |id: &str| text_of(&page.dom, id).unwrap_or_default();
    Ok(LiveCheck {
        mode: get("mode"),
        power: get("total-power-w"),
        gpus: get("total-gpus"),
        savings: get("savings-pct"),
        message: get("status-message"),
        page,
    })
}
