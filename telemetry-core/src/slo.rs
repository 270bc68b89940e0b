//! Latency objectives and the router's balance rule: the words the twin, the
//! controller and the service share about what a request class is promised
//! and how a pool's requests spread over its instances.

use serde::{Deserialize, Serialize};

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
