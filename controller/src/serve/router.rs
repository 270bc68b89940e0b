//! The request router of a real cluster: an OpenAI-compatible front
//! (`POST /v1/completions`, `POST /v1/chat/completions`) that classifies each
//! request at admission (prompt length, and the output band predicted from
//! `max_tokens` and what completed requests taught it), sends it to its
//! class's pool as the controller routes it — switching a class to a new pool
//! only once that pool serves (make before break) — and within the pool to the
//! serving instance with the fewest requests in flight. It counts per-class
//! arrivals for the forecaster and streams the engine's answer back untouched.

use super::Shared;
use crate::control::InstanceState;
use crate::predict::OutputPredictor;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use telemetry::{ClassBoundaries, CLASS_COUNT};

/// What the router did (in `/api/v1/status` as `router`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RouterStats {
    /// Requests sent to an instance.
    pub requests: u64,
    /// Requests per pool.
    pub per_pool: std::collections::BTreeMap<u32, u64>,
    /// Requests held (more than a wall millisecond) until an instance of their pool served.
    pub held: u64,
    /// Longest hold (service seconds).
    pub held_max_s: f64,
    /// Requests turned away: no instance served their pool within the hold limit.
    pub rejected: u64,
    /// Requests whose instance could not be reached.
    pub errors: u64,
    /// Requests streaming now.
    pub in_flight: u64,
}

/// The router's state.
pub struct RouterState {
    shared: Arc<Shared>,
    client: reqwest::Client,
    predictor: Mutex<OutputPredictor>,
    boundaries: ClassBoundaries,
    in_flight: Mutex<HashMap<String, u32>>,
    current: Mutex<[Option<u32>; CLASS_COUNT]>,
}

/// The router's axum app.
pub fn router(shared: Arc<Shared>) -> Router {
    let st = Arc::new(RouterState {
        shared,
        // A stalled engine fails the request instead of holding it forever.
        client: reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .unwrap_or_default(),
        predictor: Mutex::new(OutputPredictor::new(ClassBoundaries::default())),
        boundaries: ClassBoundaries::default(),
        in_flight: Mutex::new(HashMap::new()),
        current: Mutex::new([None; CLASS_COUNT]),
    });
    Router::new()
        .route("/v1/completions", post(|s, b| forward(s, b, "/v1/completions")))
        .route("/v1/chat/completions", post(|s, b| forward(s, b, "/v1/chat/completions")))
        .with_state(st)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": { "message": message.into(), "type": "invalid_request_error", "code": status.as_u16() } });
    (status, Json(body)).into_response()
}

/// Prompt tokens: token ids count one each; text counts whitespace-separated words (as the twin's engine does).
fn input_tokens(v: &serde_json::Value) -> Result<u32, String> {
    fn prompt(p: &serde_json::Value) -> Result<u32, String> {
        match p {
            serde_json::Value::String(s) => Ok(s.split_whitespace().count().max(1) as u32),
            serde_json::Value::Array(a) if a.iter().all(|x| x.is_u64()) => Ok(a.len().max(1) as u32),
            serde_json::Value::Array(a) if a.len() == 1 => prompt(&a[0]),
            _ => Err("`prompt` must be a string, an array of token ids, or a one-element array of either".into()),
        }
    }
    if !v["prompt"].is_null() {
        return prompt(&v["prompt"]);
    }
    let msgs = v["messages"].as_array().ok_or("the body needs `prompt` or `messages`")?;
    let mut n = 0u32;
    for (i, m) in msgs.iter().enumerate() {
        match &m["content"] {
            serde_json::Value::String(s) => n += s.split_whitespace().count() as u32 + 4,
            serde_json::Value::Array(parts) => {
                n += parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .map(|t| t.split_whitespace().count() as u32)
                    .sum::<u32>()
                    + 4
            }
            _ => return Err(format!("`messages[{i}].content` must be a string or an array of parts")),
        }
    }
    Ok(n.max(1))
}

impl RouterState {
    /// The pool a class goes to now: the controller's choice once it serves;
    /// until then where it went before, or — when that does not serve either —
    /// the pool of the next-larger class of the same prompt band that serves
    /// (where a merged class would go).
    fn pool_for(&self, class: usize, serving: &dyn Fn(u32) -> bool) -> u32 {
        let table = self.shared.core.lock().map(|c| c.routing()).unwrap_or([0; CLASS_COUNT]);
        let want = table[class];
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if serving(want) {
            cur[class] = Some(want);
            return want;
        }
        if let Some(old) = cur[class].filter(|&o| serving(o)) {
            return old;
        }
        let mut chain = Vec::new();
        let mut c = telemetry::RequestClass::from_index(class);
        while let Some(next) = crate::control::merge_target(c) {
            chain.push(table[next.index()]);
            c = next;
        }
        match chain.into_iter().find(|&p| serving(p)) {
            Some(p) => {
                cur[class] = Some(p);
                p
            }
            None => want,
        }
    }

    /// The serving instance of a pool with the fewest requests in flight (its endpoint).
    fn pick(&self, pool: u32) -> Option<String> {
        let core = self.shared.core.lock().ok()?;
        let flights = self.in_flight.lock().ok()?;
        core.instances()
            .filter(|r| r.pool == pool && r.state == InstanceState::Serving)
            .filter_map(|r| r.placement.as_ref().and_then(|p| p.endpoint.clone()))
            .min_by_key(|e| flights.get(e).copied().unwrap_or(0))
    }
}

struct Flight {
    st: Arc<RouterState>,
    endpoint: String,
    input_tokens: u32,
    output_tokens: u32,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Ok(mut r) = self.st.shared.router_stats.lock() {
            r.in_flight = r.in_flight.saturating_sub(1);
        }
        if let Ok(mut f) = self.st.in_flight.lock() {
            if let Some(n) = f.get_mut(&self.endpoint) {
                *n = n.saturating_sub(1);
            }
        }
        if self.output_tokens > 0 {
            if let Ok(mut p) = self.st.predictor.lock() {
                p.learn(self.input_tokens, self.output_tokens);
            }
        }
    }
}

async fn forward(State(st): State<Arc<RouterState>>, body: Bytes, path: &'static str) -> Response {
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("request body, line {} column {}: {e}", e.line(), e.column()),
            )
        }
    };
    let input = match input_tokens(&v) {
        Ok(n) => n,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let max_tokens = v["max_tokens"]
        .as_u64()
        .or_else(|| v["max_completion_tokens"].as_u64())
        .map(|m| m.min(u64::from(u32::MAX)) as u32);
    let class =
        st.predictor.lock().map(|p| p.predict(input, max_tokens)).unwrap_or_else(|_| st.boundaries.classify(input, 1));
    let now = st.shared.clock.now_s();
    if let Ok(mut core) = st.shared.core.lock() {
        let mut counts = [0u32; CLASS_COUNT];
        counts[class.index()] = 1;
        core.observe_arrivals(now, &counts);
    }
    // A pool scaled from nothing: hold the request until an instance serves (as long as `hold_s`).
    let clock = st.shared.clock;
    let arrived = clock.now_s();
    let hold_s = st.shared.router_hold_s;
    let (pool, endpoint) = loop {
        let serving = |pool: u32| st.pick(pool).is_some();
        let pool = st.pool_for(class.index(), &serving);
        if let Some(e) = st.pick(pool) {
            break (pool, e);
        }
        let waited = clock.now_s() - arrived;
        if waited >= hold_s {
            st.shared.router_stats.lock().map(|mut r| r.rejected += 1).ok();
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no instance of pool {pool} serves class {class} after {waited:.1} s; try again"),
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    let held = clock.now_s() - arrived;
    if let Ok(mut r) = st.shared.router_stats.lock() {
        r.requests += 1;
        r.per_pool.entry(pool).and_modify(|n| *n += 1).or_insert(1);
        if held > 1e-3 * clock.speed() {
            r.held += 1;
            r.held_max_s = r.held_max_s.max(held);
        }
    }
    if let Ok(mut f) = st.in_flight.lock() {
        *f.entry(endpoint.clone()).or_default() += 1;
    }
    let mut flight = Flight { st: st.clone(), endpoint: endpoint.clone(), input_tokens: input, output_tokens: 0 };
    if let Ok(mut r) = st.shared.router_stats.lock() {
        r.in_flight += 1;
    }
    let url = format!("{}{path}", endpoint.trim_end_matches('/'));
    let resp = match st.client.post(&url).header(header::CONTENT_TYPE, "application/json").body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            st.shared.router_stats.lock().map(|mut r| r.errors += 1).ok();
            return error(StatusCode::BAD_GATEWAY, format!("{url}: {e}"));
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let streaming = ctype.starts_with("text/event-stream");
    // The stream owns the whole flight (not just the counter it updates): the
    // request counts as in flight, and is learnt from, until the stream ends.
    let stream = resp.bytes_stream().map(move |chunk| {
        let f = &mut flight;
        if let Ok(b) = &chunk {
            if streaming {
                // One SSE event per token: count them to learn the output length.
                f.output_tokens += b.windows(6).filter(|w| w == b"data: ").count() as u32;
            }
        }
        chunk
    });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    if let Ok(h) = header::HeaderValue::from_str(&ctype) {
        r.headers_mut().insert(header::CONTENT_TYPE, h);
    }
    r
}
