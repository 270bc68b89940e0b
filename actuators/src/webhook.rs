//! The webhook backend: `POST <url>` with the [`Command`] as the JSON body,
//! `Authorization: Bearer <token>` (when a token is configured) and
//! `Idempotency-Key: <action id>`.
//!
//! 2xx → applied; a non-empty body may be `{"placement": {…}, "detail": "…"}`
//! (for a spawn, a body that is not that JSON is a failure naming the
//! problem; for other kinds the body is ignored). Connection errors, request
//! timeouts, 5xx and 429 are retried with exponential backoff (a 429/503's
//! `Retry-After` seconds are honoured, capped at the backoff maximum) up to
//! the configured attempts, with the same idempotency key; then failed
//! (retryable). Other 4xx → failed at once, not retryable. Past the overall
//! timeout → timed out.

use crate::{Action, Actuator, Command, Outcome, Placement, Secret};
use serde::Deserialize;
use std::time::{Duration, Instant};

/// Retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Requests in all, the first included (at least 1).
    pub attempts: u32,
    /// Delay before the second request.
    pub initial: Duration,
    /// Longest delay (each delay doubles up to this).
    pub max: Duration,
}

/// The webhook backend (see the module documentation).
#[derive(Debug, Clone)]
pub struct WebhookActuator {
    url: String,
    token: Option<Secret>,
    backoff: Backoff,
    timeout: Duration,
    kinds: Option<Vec<String>>,
    client: reqwest::Client,
}

#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(default)]
    placement: Option<Placement>,
    #[serde(default)]
    detail: Option<String>,
}

impl WebhookActuator {
    /// A backend posting to `url`. `timeout` bounds one command, retries
    /// included; `kinds` limits the action kinds it carries out (all when
    /// `None`).
    pub fn new(
        url: &str,
        token: Option<Secret>,
        backoff: Backoff,
        timeout: Duration,
        kinds: Option<Vec<String>>,
    ) -> Result<WebhookActuator, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("webhook url {url:?}: {e}"))?;
        match parsed.scheme() {
            "http" => {}
            "https" => {
                return Err(format!(
                    "webhook url {url:?}: https is not supported by this build (reqwest is built without TLS); \
                     use http to a local TLS-terminating proxy"
                ))
            }
            _ => return Err(format!("webhook url {url:?}: the scheme must be http")),
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("webhook url {url:?}: cannot build the HTTP client: {e}"))?;
        Ok(WebhookActuator {
            url: url.to_string(),
            token,
            backoff: Backoff { attempts: backoff.attempts.max(1), ..backoff },
            timeout,
            kinds,
            client,
        })
    }

    async fn post(&self, cmd: &Command) -> Outcome {
        let mut delay = self.backoff.initial;
        let mut last = String::new();
        for attempt in 1..=self.backoff.attempts {
            if attempt > 1 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.backoff.max);
            }
            let mut req = self.client.post(&self.url).header("Idempotency-Key", cmd.id.0.as_str()).json(cmd);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t.expose());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = format!("POST {}: {e}", self.url);
                    tracing::warn!(id = %cmd.id, attempt, error = %last, "webhook request failed; will retry");
                    continue;
                }
            };
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(self.backoff.max));
            let body = resp.text().await.unwrap_or_default();
            if status.is_success() {
                let reply = if body.trim().is_empty() {
                    None
                } else {
                    match serde_json::from_str::<Reply>(&body) {
                        Ok(r) => Some(r),
                        Err(e) if matches!(cmd.action, Action::Spawn { .. }) => {
                            return Outcome::Failed {
                                reason: format!(
                                    "webhook {}: {status} but the body is not {{\"placement\": {{…}}}}: {e} (body: {})",
                                    self.url,
                                    crate::tail(&body, 200)
                                ),
                                retryable: false,
                            }
                        }
                        Err(_) => None,
                    }
                };
                let detail = reply.as_ref().and_then(|r| r.detail.clone());
                return Outcome::Applied {
                    placement: reply.and_then(|r| r.placement),
                    detail: detail.unwrap_or_else(|| format!("webhook answered {status} after {attempt} attempt(s)")),
                };
            }
            if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                last = format!("webhook {} answered {status}: {}", self.url, crate::tail(&body, 500));
                tracing::warn!(id = %cmd.id, attempt, %status, "webhook error; will retry");
                if let Some(d) = retry_after {
                    delay = delay.max(d);
                }
                continue;
            }
            let hint = if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
                if self.token.is_some() {
                    " (the bearer token was refused)"
                } else {
                    " (no bearer token is configured)"
                }
            } else {
                ""
            };
            return Outcome::Failed {
                reason: format!("webhook {} answered {status}{hint}: {}", self.url, crate::tail(&body, 500)),
                retryable: false,
            };
        }
        Outcome::Failed {
            reason: format!("{last} (gave up after {} attempts)", self.backoff.attempts),
            retryable: true,
        }
    }
}

#[async_trait::async_trait]
impl Actuator for WebhookActuator {
    fn name(&self) -> &str {
        "webhook"
    }

    fn supports(&self, action: &Action) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.iter().any(|k| k == action.kind()))
    }

    async fn apply(&self, cmd: &Command) -> Outcome {
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, self.post(cmd)).await {
            Ok(o) => o,
            Err(_) => Outcome::TimedOut { after_ms: started.elapsed().as_millis() as u64 },
        }
    }
}
