//! Latency objectives and the router's balance rule: the words the twin, the
//! controller and the service share about what a request class is promised
//! and how a pool's requests spread over its instances.

use serde::{Deserialize, Serialize};

/// An interval a client measured on the wall, in the cluster's time.
///
/// A twin engine runs `speed` times faster than the wall and stamps what it
/// does with its own time (`dynamollm_twin_t_s` on every streamed token,
/// `dynamollm_twin_arrived_s` on the first): `engine_s` is the part of the
/// interval inside the engine by those stamps, `held_s` the part the router
/// held the request for a serving instance (a wait in cluster time). What is
/// left of the wall interval (sockets, the router's own work, the scheduler of
/// a busy machine) is counted as it was, at the wall's rate: sped up, a
/// millisecond of it would count as `speed` milliseconds, a quarter of a TBT
/// SLO at 15×. Without stamps (a real engine) the interval is `wall_s × speed`.
pub fn cluster_interval_s(wall_s: f64, engine_s: Option<f64>, held_s: f64, speed: f64) -> f64 {
    let speed = if speed.is_finite() && speed > 0.0 { speed } else { 1.0 };
    match engine_s {
        Some(e) if e.is_finite() && e >= 0.0 => {
            let held_s = held_s.max(0.0);
            e + held_s + (wall_s - (e + held_s) / speed).max(0.0)
        }
        _ => wall_s * speed,
    }
}

/// A gap between two tokens of a stamped twin engine, as a client would see
/// it at real speed: the engine's gap by its own clock, plus how much longer
/// the second token took than the first to travel from the engine to the
/// client (`transport_s`: the wall time from the engine's send to the
/// client's receipt, each token's, both read from the same machine's clock).
/// An engine process late to send (a twin starved of CPU at 15×) delays both
/// ends alike and counts nothing; a late router or client counts as it was.
pub fn stamped_gap_s(engine_gap_s: f64, transport_s: f64, prev_transport_s: f64) -> f64 {
    (engine_gap_s + transport_s - prev_transport_s).max(0.0)
}

/// The stamp field of a twin engine's streamed token: when it was sent, by the wall
/// (seconds since the Unix epoch).
pub const TWIN_SENT_STAMP: &str = "dynamollm_twin_sent_unix_s";

/// Seconds since the Unix epoch now, by the wall.
pub fn unix_now_s() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The stamp field of a twin engine's streamed token (its time, s).
pub const TWIN_TOKEN_STAMP: &str = "dynamollm_twin_t_s";
/// The stamp field of a twin engine's first token: when the request reached it (its time, s).
pub const TWIN_ARRIVAL_STAMP: &str = "dynamollm_twin_arrived_s";
/// The response header in which the router says how long it held a request
/// for a serving instance (service seconds).
pub const ROUTER_HELD_HEADER: &str = "x-dynamollm-held-s";

/// The SLO of one class: P99 TTFT and P99 TBT bounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassSlo {
    /// A request meets its TTFT SLO when its TTFT is at most this.
    pub ttft_s: f64,
    /// A token gap meets the TBT SLO when it is at most this.
    pub tbt_s: f64,
}

/// How SLOs are set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SloRule {
    /// Each bound is this multiple of the class's median request alone on TP8 at max clock.
    Multiplier(f64),
    /// Absolute bounds for every class.
    Absolute(ClassSlo),
}

/// Attainment a class needs to hold its P99 SLOs (over a run, or over one of its clock hours).
pub const P99_ATTAINMENT: f64 = 0.99;

/// How a router picks the instance of a pool for a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// The serving instance with the fewest requests outstanding (least-loaded by count).
    #[default]
    Requests,
    /// The one with the fewest prompt tokens queued ahead of the request (not yet
    /// prefilled), then the fewest requests: a long prompt delays the first token
    /// of every prompt behind it.
    PromptTokens,
}

impl Balance {
    /// Parse a name (`requests` or `prompt-tokens`).
    pub fn parse(s: &str) -> Result<Balance, String> {
        match s {
            "requests" => Ok(Balance::Requests),
            "prompt-tokens" => Ok(Balance::PromptTokens),
            other => Err(format!("unknown balance `{other}`; valid: requests, prompt-tokens")),
        }
    }
}
