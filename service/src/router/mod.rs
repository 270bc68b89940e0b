//! The request router of a real cluster: an OpenAI-compatible front
//! (`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`)
//! that classifies each request at admission (its prompt's tokens, counted by
//! the engine's own `/tokenize` within a latency budget or by the BPE of
//! [`crate::openai`], and the output band predicted from `max_tokens` and
//! what completed requests taught it), sends it to its class's pool as the
//! controller routes it — switching a class to a new pool only once that pool
//! serves (make before break) — and within the pool to the serving instance
//! with the fewest requests in flight, or (`[router] balance =
//! "prompt-tokens"`) the fewest prompt tokens sent and not yet answered. The
//! body goes to the engine unchanged (every request shape of the two APIs:
//! batched prompts, tool calls, `content: null`, `n`, `logprobs`, images) with
//! the client's `Authorization` (or the configured engine key), and the answer
//! comes back untouched, with no limit on a stream's length: only connecting,
//! the first byte and a pause inside a stream have timeouts.
//!
//! It holds under abuse ([`conn`]): at most `max_connections` client
//! connections at once (one more is closed as soon as it is accepted, so it
//! holds no descriptor, and counted), a request head within
//! `header_timeout_s` of opening or of the previous answer (else the
//! connection is closed), heads and bodies of bounded size (431, 413) and a
//! body that pauses no longer than `header_timeout_s` (408). With
//! `client_keys` set, every request must carry one of them as its bearer
//! token (401 otherwise), and the engines get the configured engine key, or
//! no `Authorization`, never the client's.
//!
//! It measures what the client sees ([`stream`]): each streamed answer's time
//! to first token and token gaps, judged against the class's SLOs, fed to the
//! controller as the per-class SLO counters it learns capacity and clock
//! margins from — the same counters the twin feeds it. It counts per-class
//! arrivals for the forecaster.
//!
//! It also carries out the backlog guard's `move-queued` for engines that
//! cannot hand requests over themselves ([`mover`]): a streaming request
//! whose engine has not yet sent a first token may be taken back — its
//! upstream connection closed, which makes vLLM and SGLang abort it — and sent
//! again, whole, to an instance of another pool. The client sees one answer;
//! its time to first token counts from its first arrival.

pub mod conn;
pub mod mover;
pub mod stream;

pub use mover::{RouterMover, Unstarted};

use crate::config::RouterSection;
use crate::openai;
use crate::Shared;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use controller::control::InstanceState;
use controller::predict::OutputPredictor;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stream::{Measure, Verdict};
use telemetry::{ClassBoundaries, CLASS_COUNT};

/// Prompt token counts remembered (by prompt), so a repeated prompt costs no second `/tokenize`.
const TOKEN_CACHE_ENTRIES: usize = 4096;
/// How long the models an engine lists are served from memory.
const MODELS_TTL: Duration = Duration::from_secs(30);

/// What the router did (in `/api/v1/status` as `router`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RouterStats {
    /// Requests sent to an instance.
    pub requests: u64,
    /// Requests per pool.
    pub per_pool: std::collections::BTreeMap<u32, u64>,
    /// Requests per class, as admission classed them (prompt tokens, predicted output band).
    pub per_class: std::collections::BTreeMap<String, u64>,
    /// Requests held (more than a wall millisecond) until an instance of their pool served.
    pub held: u64,
    /// Longest hold (service seconds).
    pub held_max_s: f64,
    /// Requests turned away: no instance served their pool within the hold limit.
    pub rejected: u64,
    /// Of `rejected`, those the site power budget (`[budget]`) turned away: their class shed, or
    /// their pool held short of the instances it needed.
    pub rejected_power_budget: u64,
    /// Requests whose instance could not be reached, or did not answer in time.
    pub errors: u64,
    /// Requests streaming now.
    pub in_flight: u64,
    /// Requests taken back from an engine before their first token and sent to another instance (`move-queued`).
    pub moved: u64,
    /// Prompts counted by an engine's `/tokenize`.
    pub tokenized_by_engine: u64,
    /// Prompts counted by the router's own BPE (no engine, `/tokenize` absent, or over its budget).
    pub tokenized_locally: u64,
    /// Per class, the SLO counters measured on the answers (`[ttft_ok, ttft_n, gaps_ok, gaps_n]`).
    pub slo_counts: [[u64; 4]; CLASS_COUNT],
    /// Client connections open now.
    pub connections: u64,
    /// Connections closed as soon as accepted: `max_connections` were open.
    pub connections_refused: u64,
    /// Connections closed for sending no whole request head within `header_timeout_s`
    /// (of opening, or of the previous answer).
    pub connections_timed_out: u64,
    /// Requests whose head was over `max_header_bytes` (431).
    pub heads_too_large: u64,
    /// Requests without one of the client keys (401).
    pub unauthorized: u64,
    /// Requests whose body was over `max_body_bytes` (413).
    pub bodies_too_large: u64,
    /// Requests whose body paused longer than `header_timeout_s` (408).
    pub bodies_timed_out: u64,
}

/// The router's settings, from `[router]`.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// Connecting to an engine.
    pub connect_timeout: Duration,
    /// From sending a request to the answer's first byte (queueing and prefill included).
    pub first_byte_timeout: Duration,
    /// The longest pause inside an answer.
    pub idle_timeout: Duration,
    /// The key sent to engines when the client sends no `Authorization` (always, with client keys).
    pub api_key: Option<actuators::Secret>,
    /// The keys clients must present (empty: none asked for).
    pub client_keys: Vec<actuators::Secret>,
    /// The largest request body (bytes).
    pub max_body_bytes: usize,
    /// The longest pause inside a request body (the head's limit: `header_timeout_s`).
    pub body_timeout: Duration,
    /// Ask the engine's `/tokenize` for prompt lengths.
    pub tokenize_on_engine: bool,
    /// How long a `/tokenize` may take before the router counts itself.
    pub tokenize_budget: Duration,
    /// Hand the controller what the router measures (`controller.learn_from = "clients"`).
    pub feed_attainment: bool,
}

impl RouterSettings {
    /// From the `[router]` table (and where the controller learns from);
    /// fails when `client_keys_file` cannot be read.
    pub fn from_config(cfg: &crate::config::ServiceConfig) -> anyhow::Result<RouterSettings> {
        let r: &RouterSection = &cfg.router;
        Ok(RouterSettings {
            connect_timeout: Duration::from_secs_f64(r.connect_timeout_s),
            first_byte_timeout: Duration::from_secs_f64(r.first_byte_timeout_s),
            idle_timeout: Duration::from_secs_f64(r.idle_timeout_s),
            api_key: r.api_key.clone(),
            client_keys: cfg.router_client_keys()?,
            max_body_bytes: usize::try_from(r.max_body_bytes).unwrap_or(usize::MAX),
            body_timeout: Duration::from_secs_f64(r.header_timeout_s),
            tokenize_on_engine: r.tokenize == "engine",
            tokenize_budget: Duration::from_secs_f64(r.tokenize_budget_ms / 1000.0),
            feed_attainment: cfg.learn_from() == "clients",
        })
    }
}

/// The router's state.
pub struct RouterState {
    shared: Arc<Shared>,
    settings: RouterSettings,
    client: reqwest::Client,
    predictor: Mutex<OutputPredictor>,
    boundaries: ClassBoundaries,
    in_flight: Mutex<HashMap<String, u32>>,
    /// Per endpoint, the prompt tokens of requests sent with no first token (or answer) yet.
    queued_tokens: Mutex<HashMap<String, u64>>,
    current: Mutex<[Option<u32>; CLASS_COUNT]>,
    token_cache: Mutex<HashMap<u64, u32>>,
    models: Mutex<Option<(std::time::Instant, Option<String>, Bytes)>>,
    /// Each class's SLOs (the profile's; they do not change while the service runs).
    slos: [telemetry::ClassSlo; CLASS_COUNT],
}

/// The router's axum app.
pub fn router(shared: Arc<Shared>, settings: RouterSettings) -> Router {
    // The BPE's tables load on first use (a second or more): before the first request, not in it.
    tokio::task::spawn_blocking(|| openai::text_tokens("warm"));
    let slos = shared
        .core
        .lock()
        .map(|c| c.class_slos())
        .unwrap_or([telemetry::ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY }; CLASS_COUNT]);
    let st = Arc::new(RouterState {
        slos,
        shared,
        // No whole-request timeout: a stream lasts as long as its answer. A
        // stalled engine fails the request after the idle timeout instead.
        client: reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.idle_timeout)
            .build()
            .unwrap_or_default(),
        settings,
        predictor: Mutex::new(OutputPredictor::new(ClassBoundaries::default())),
        boundaries: ClassBoundaries::default(),
        in_flight: Mutex::new(HashMap::new()),
        queued_tokens: Mutex::new(HashMap::new()),
        current: Mutex::new([None; CLASS_COUNT]),
        token_cache: Mutex::new(HashMap::new()),
        models: Mutex::new(None),
    });
    let (max_body, body_timeout) = (st.settings.max_body_bytes, st.settings.body_timeout);
    Router::new()
        .route("/v1/completions", post(|s, h, b| forward(s, h, b, "/v1/completions")))
        .route("/v1/chat/completions", post(|s, h, b| forward(s, h, b, "/v1/chat/completions")))
        .route("/v1/models", get(models))
        .layer(middleware::from_fn_with_state(st.clone(), admit))
        // Bodies are read whole (the class needs the prompt) up to this many bytes.
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(body_timeout))
        .with_state(st)
}

/// Before a body is read: a request without one of the client keys (when
/// there are some) gets 401; one that declares a body over the limit, 413.
async fn admit(State(st): State<Arc<RouterState>>, req: Request, next: Next) -> Response {
    if !st.settings.client_keys.is_empty() {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        // Every key is compared (no early exit), each in constant time.
        let known = presented.is_some_and(|p| {
            st.settings.client_keys.iter().fold(false, |any, k| any | crate::config::token_matches(k, p))
        });
        if !known {
            st.refused(conn::Refusal::Unauthorized);
            let mut r = openai::error(
                StatusCode::UNAUTHORIZED,
                "missing or unknown API key: send `Authorization: Bearer <key>` with a key the router was given",
            );
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.settings.max_body_bytes as u64) {
        return st.body_too_large();
    }
    next.run(req).await
}

/// The `Authorization` an engine gets: the client's, else the configured
/// key; with client keys, the configured key only (the client's key is the router's).
fn upstream_auth(st: &RouterState, headers: &HeaderMap) -> Option<String> {
    let engine_key = || st.settings.api_key.as_ref().map(|k| format!("Bearer {}", k.expose()));
    if !st.settings.client_keys.is_empty() {
        return engine_key();
    }
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string).or_else(engine_key)
}
impl RouterState {
    /// Count a request or connection turned away (status and `/metrics`).
    fn refused(&self, why: conn::Refusal) {
        conn::count_refusal(&self.shared, why);
    }

    /// 413 for a body over `max_body_bytes`, counted.
    fn body_too_large(&self) -> Response {
        self.refused(conn::Refusal::BodyTooLarge);
        openai::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {} bytes (router.max_body_bytes)", self.settings.max_body_bytes),
        )
    }

    /// A body that could not be read, in OpenAI's shape: over the limit (413),
    /// paused too long (408), or cut off.
    fn body_error(&self, e: BytesRejection) -> Response {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return self.body_too_large();
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if c.is::<tower_http::timeout::TimeoutError>() {
                self.refused(conn::Refusal::BodyTimedOut);
                return openai::error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body paused longer than {:.0} s (router.header_timeout_s)",
                        self.settings.body_timeout.as_secs_f64()
                    ),
                );
            }
            cause = c.source();
        }
        openai::error(e.status(), e.body_text())
    }

    /// Add one answer's SLO verdict to its class's counters and hand the
    /// cumulative counters to the controller (as the twin does).
    fn record(&self, class: usize, v: Verdict) {
        let totals = match self.shared.router_stats.lock() {
            Ok(mut r) => {
                for (t, d) in r.slo_counts[class].iter_mut().zip(v.counts) {
                    *t = t.saturating_add(d);
                }
                r.slo_counts
            }
            Err(_) => return,
        };
        if !self.settings.feed_attainment {
            return;
        }
        if let Ok(mut core) = self.shared.core.lock() {
            core.observe_attainment(totals);
        }
    }

    /// Any serving instance's endpoint (for `/tokenize` and `/v1/models`).
    fn any_endpoint(&self) -> Option<String> {
        let core = self.shared.core.lock().ok()?;
        let e = core
            .instances()
            .filter(|r| r.state == InstanceState::Serving)
            .find_map(|r| r.placement.as_ref().and_then(|p| p.endpoint.clone()));
        e
    }

    /// The prompt's tokens: the engine's `/tokenize` within the budget (cached
    /// by prompt), else the router's own BPE count (counted in the stats).
    async fn prompt_tokens(&self, v: &serde_json::Value, auth: Option<&str>) -> Result<u32, String> {
        let local = || {
            self.shared.router_stats.lock().map(|mut r| r.tokenized_locally += 1).ok();
            openai::prompt_tokens(v)
        };
        // A batch has several prompts; its class follows the longest, which the BPE gives.
        let single = v["prompt"].is_string() || v["messages"].is_array();
        if !(self.settings.tokenize_on_engine && single) {
            return local();
        }
        let body = if v["prompt"].is_string() {
            serde_json::json!({ "model": v["model"], "prompt": v["prompt"] })
        } else {
            serde_json::json!({ "model": v["model"], "messages": v["messages"] })
        };
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            body.to_string().hash(&mut h);
            h.finish()
        };
        if let Some(n) = self.token_cache.lock().ok().and_then(|c| c.get(&key).copied()) {
            self.shared.router_stats.lock().map(|mut r| r.tokenized_by_engine += 1).ok();
            return Ok(n);
        }
        let asked = async {
            let endpoint = self.any_endpoint()?;
            let mut req = self.client.post(format!("{}/tokenize", endpoint.trim_end_matches('/'))).json(&body);
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            let resp = req.send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let j: serde_json::Value = resp.json().await.ok()?;
            j["count"].as_u64().or_else(|| j["tokens"].as_array().map(|t| t.len() as u64))
        };
        match tokio::time::timeout(self.settings.tokenize_budget, asked).await {
            Ok(Some(n)) => {
                let n = n.clamp(1, u64::from(u32::MAX)) as u32;
                if let Ok(mut c) = self.token_cache.lock() {
                    if c.len() >= TOKEN_CACHE_ENTRIES {
                        c.clear();
                    }
                    c.insert(key, n);
                }
                self.shared.router_stats.lock().map(|mut r| r.tokenized_by_engine += 1).ok();
                Ok(n)
            }
            // No engine, no `/tokenize`, an error (a malformed body, which the BPE names), or over budget.
            _ => local(),
        }
    }

    /// The pool a class goes to now: the table in effect (the controller's,
    /// except in dry-run: [`super::core::ServiceCore::routed`]) once that pool serves;
    /// until then where it went before, or — when that does not serve either —
    /// the pool of the next-larger class of the same prompt band that serves
    /// (where a merged class would go).
    fn pool_for(&self, class: usize, serving: &dyn Fn(u32) -> bool) -> u32 {
        let table = self.shared.core.lock().map(|c| c.routed()).unwrap_or([0; CLASS_COUNT]);
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
        while let Some(next) = controller::control::merge_target(c) {
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

    /// The serving instance of a pool the balance picks (its endpoint): the
    /// fewest requests in flight, or the fewest prompt tokens waiting for a
    /// first token and then the fewest in flight.
    fn pick(&self, pool: u32) -> Option<String> {
        let core = self.shared.core.lock().ok()?;
        let flights = self.in_flight.lock().ok()?;
        let queued = self.queued_tokens.lock().ok()?;
        core.instances()
            .filter(|r| r.pool == pool && r.state == InstanceState::Serving)
            .filter_map(|r| r.placement.as_ref().and_then(|p| p.endpoint.clone()))
            .min_by_key(|e| {
                let tokens = match self.shared.router_balance {
                    telemetry::Balance::Requests => 0,
                    telemetry::Balance::PromptTokens => queued.get(e).copied().unwrap_or(0),
                };
                (tokens, flights.get(e).copied().unwrap_or(0))
            })
    }

    fn add_queued(&self, endpoint: &str, tokens: i64) {
        if let Ok(mut q) = self.queued_tokens.lock() {
            let n = q.entry(endpoint.to_string()).or_default();
            *n = n.saturating_add_signed(tokens);
            if *n == 0 {
                q.remove(endpoint);
            }
        }
    }

    /// A request taken back from its engine goes to `to`: counted in flight,
    /// and its prompt counted queued, there instead.
    fn moved(&self, flight: &mut Flight, queued: &mut Queued, to: String) {
        if let Ok(mut f) = self.in_flight.lock() {
            if let Some(n) = f.get_mut(&flight.endpoint) {
                *n = n.saturating_sub(1);
            }
            *f.entry(to.clone()).or_default() += 1;
        }
        queued.move_to(to.clone());
        flight.endpoint = to;
        self.shared.router_stats.lock().map(|mut r| r.moved += 1).ok();
    }
}

/// A request's prompt tokens, counted in its engine's queue until its first token (or answer) comes.
struct Queued {
    st: Arc<RouterState>,
    endpoint: String,
    tokens: i64,
}

impl Queued {
    fn new(st: Arc<RouterState>, endpoint: String, tokens: u32) -> Queued {
        let tokens = i64::from(tokens);
        st.add_queued(&endpoint, tokens);
        Queued { st, endpoint, tokens }
    }

    fn move_to(&mut self, to: String) {
        self.st.add_queued(&self.endpoint, -self.tokens);
        self.st.add_queued(&to, self.tokens);
        self.endpoint = to;
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.st.add_queued(&self.endpoint, -self.tokens);
    }
}

struct Flight {
    st: Arc<RouterState>,
    endpoint: String,
    input_tokens: u32,
    class: usize,
    /// The answer's measurement (streamed answers only).
    measure: Option<Measure>,
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
        if let Some(m) = self.measure.take() {
            let v = m.finish();
            self.st.record(self.class, v);
            if v.output_tokens > 0 {
                if let Ok(mut p) = self.st.predictor.lock() {
                    p.learn(self.input_tokens, v.output_tokens);
                }
            }
        }
    }
}

/// `GET /v1/models`: what a serving engine lists (asked with the key [`upstream_auth`] gives),
/// kept for [`MODELS_TTL`]; 503 while no instance serves.
async fn models(State(st): State<Arc<RouterState>>, headers: HeaderMap) -> Response {
    let auth = upstream_auth(&st, &headers);
    if let Some((at, a, body)) = st.models.lock().ok().and_then(|m| m.clone()) {
        if at.elapsed() < MODELS_TTL && a == auth {
            return json_response(StatusCode::OK, body);
        }
    }
    let Some(endpoint) = st.any_endpoint() else {
        return openai::error(StatusCode::SERVICE_UNAVAILABLE, "no instance serves yet: no model to list; try again");
    };
    let url = format!("{}/v1/models", endpoint.trim_end_matches('/'));
    let mut req = st.client.get(&url);
    if let Some(a) = &auth {
        req = req.header(header::AUTHORIZATION, a.as_str());
    }
    let resp = match tokio::time::timeout(st.settings.first_byte_timeout, req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return openai::error(StatusCode::BAD_GATEWAY, format!("{url}: {e}")),
        Err(_) => return openai::error(StatusCode::GATEWAY_TIMEOUT, format!("{url}: no answer in time")),
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return openai::error(StatusCode::BAD_GATEWAY, format!("{url}: {e}")),
    };
    if status.is_success() {
        if let Ok(mut m) = st.models.lock() {
            *m = Some((std::time::Instant::now(), auth, body.clone()));
        }
    }
    json_response(status, body)
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

async fn forward(
    State(st): State<Arc<RouterState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    path: &'static str,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return st.body_error(e),
    };
    let arrived = st.shared.clock.now_s();
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return openai::error(
                StatusCode::BAD_REQUEST,
                format!("request body, line {} column {}: {e}", e.line(), e.column()),
            )
        }
    };
    let auth = upstream_auth(&st, &headers);
    let input = match st.prompt_tokens(&v, auth.as_deref()).await {
        Ok(n) => n,
        Err(m) => return openai::error(StatusCode::BAD_REQUEST, m),
    };
    let max_tokens = v["max_tokens"]
        .as_u64()
        .or_else(|| v["max_completion_tokens"].as_u64())
        .map(|m| m.min(u64::from(u32::MAX)) as u32);
    // A lower bound the client guarantees: vLLM's `min_tokens`, or all of `max_tokens` with `ignore_eos`.
    let min_tokens = v["min_tokens"]
        .as_u64()
        .map(|m| m.min(u64::from(u32::MAX)) as u32)
        .or_else(|| max_tokens.filter(|_| v["ignore_eos"].as_bool() == Some(true)));
    let class = st
        .predictor
        .lock()
        .map(|p| p.predict_within(input, min_tokens, max_tokens))
        .unwrap_or_else(|_| st.boundaries.classify(input, 1));
    let slo = Some(st.slos[class.index()]);
    st.shared.router_stats.lock().map(|mut r| *r.per_class.entry(class.to_string()).or_default() += 1).ok();
    let now = st.shared.clock.now_s();
    let shed = if let Ok(mut core) = st.shared.core.lock() {
        let mut counts = [0u32; CLASS_COUNT];
        counts[class.index()] = 1;
        core.observe_arrivals(now, &counts);
        core.shed(class.index())
    } else {
        false
    };
    if shed {
        st.shared
            .router_stats
            .lock()
            .map(|mut r| {
                r.rejected += 1;
                r.rejected_power_budget += 1;
            })
            .ok();
        st.record(class.index(), Verdict::missed());
        return openai::error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "class {class} is shed by the site power budget ([budget]): the classes ranked above it keep the \
                 power; try again later"
            ),
        );
    }
    // A pool scaled from nothing: hold the request until an instance serves (as long as `hold_s`).
    let clock = st.shared.clock.clone();
    let hold_s = st.shared.router_hold_s;
    let hold_from = clock.now_s();
    let mut waited_for_instance = false;
    let (pool, endpoint) = loop {
        let serving = |pool: u32| st.pick(pool).is_some();
        let pool = st.pool_for(class.index(), &serving);
        if let Some(e) = st.pick(pool) {
            break (pool, e);
        }
        let waited = clock.now_s() - arrived;
        if waited >= hold_s {
            let budget = st.shared.core.lock().map(|c| c.power_held(pool)).unwrap_or(false);
            st.shared
                .router_stats
                .lock()
                .map(|mut r| {
                    r.rejected += 1;
                    r.rejected_power_budget += u64::from(budget);
                })
                .ok();
            st.record(class.index(), Verdict::missed());
            let why = if budget {
                "; the site power budget ([budget]) holds the pool short of the instances it needs, so lower-ranked \
                 classes are turned away"
            } else {
                "; try again"
            };
            return openai::error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no instance of pool {pool} serves class {class} after {waited:.1} s{why}"),
            );
        }
        waited_for_instance = true;
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let held = clock.now_s() - arrived;
    // The wait for a serving instance is the cluster's (service time); the rest is the router's work.
    let held_for_instance = if waited_for_instance { clock.now_s() - hold_from } else { 0.0 };
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
    // A streaming request may be moved until its first token comes; an answer
    // that is not streamed shows nothing before it is whole, so it is not moved
    // (nor judged: its client sees no first token before the last).
    let streamed = v["stream"].as_bool().unwrap_or(false);
    let measure = match (streamed, slo) {
        (true, Some(slo)) => {
            Some(Measure::new(slo, arrived, openai::sequences(&v)).with_time(clock.speed(), held_for_instance))
        }
        _ => None,
    };
    let mut flight =
        Flight { st: st.clone(), endpoint: endpoint.clone(), input_tokens: input, class: class.index(), measure };
    if let Ok(mut r) = st.shared.router_stats.lock() {
        r.in_flight += 1;
    }
    let mut queued = Queued::new(st.clone(), endpoint.clone(), input);
    let mut endpoint = endpoint;
    let (resp, first) = loop {
        let url = format!("{}{path}", endpoint.trim_end_matches('/'));
        let attempt = async {
            let mut req = st.client.post(&url).header(header::CONTENT_TYPE, "application/json").body(body.clone());
            if let Some(a) = &auth {
                req = req.header(header::AUTHORIZATION, a.as_str());
            }
            let send = async {
                let mut resp = req.send().await?;
                let first = resp.chunk().await?;
                Ok::<_, reqwest::Error>((resp, first))
            };
            match tokio::time::timeout(st.settings.first_byte_timeout, send).await {
                Ok(r) => r.map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string())),
                Err(_) => Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "no answer within {:.0} s (router.first_byte_timeout_s)",
                        st.settings.first_byte_timeout.as_secs_f64()
                    ),
                )),
            }
        };
        let result = if streamed {
            let (id, moved) = st.shared.unstarted.add(&endpoint);
            tokio::pin!(attempt);
            tokio::select! {
                r = &mut attempt => {
                    st.shared.unstarted.remove(&endpoint, id);
                    r
                }
                Ok(to_pool) = moved => {
                    // Dropping the attempt closes the upstream connection: the engine aborts it.
                    // With no instance serving either pool, it goes again where it was.
                    endpoint = st.pick(to_pool).or_else(|| st.pick(pool)).unwrap_or(endpoint);
                    st.moved(&mut flight, &mut queued, endpoint.clone());
                    continue;
                }
            }
        } else {
            attempt.await
        };
        match result {
            Ok(r) => {
                // Answered: its prompt is no longer queued there.
                drop(queued);
                break r;
            }
            Err((status, e)) => {
                st.shared.router_stats.lock().map(|mut r| r.errors += 1).ok();
                // The flight's measurement saw no token: a TTFT miss, recorded as it drops.
                return openai::error(status, format!("{url}: {e}"));
            }
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if !status.is_success() {
        // An engine's refusal (a bad request, a wrong key) is the client's to see, not an SLO miss.
        flight.measure = None;
    }
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    // The stream owns the whole flight (not just the counter it updates): the
    // request counts as in flight, and is measured and learnt from, until the stream ends.
    let rest = futures::stream::unfold(Some(resp), |resp| async move {
        let mut resp = resp?;
        match resp.chunk().await {
            Ok(Some(b)) => Some((Ok(b), Some(resp))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    let stream = futures::stream::iter(first.map(Ok)).chain(rest).map(move |chunk| {
        let f = &mut flight;
        if let (Ok(b), Some(m)) = (&chunk, f.measure.as_mut()) {
            m.chunk(clock.now_s(), b);
        }
        chunk
    });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    if let Ok(h) = header::HeaderValue::from_str(&ctype) {
        r.headers_mut().insert(header::CONTENT_TYPE, h);
    }
    if let Ok(h) = header::HeaderValue::from_str(&format!("{held_for_instance:.6}")) {
        r.headers_mut().insert(telemetry::ROUTER_HELD_HEADER, h);
    }
    r
}
