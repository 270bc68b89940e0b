//! The request router of a real cluster: an OpenAI-compatible front
//! (`POST /v1/completions`, `POST /v1/chat/completions`) that classifies each
//! request at admission (prompt length, and the output band predicted from
//! `max_tokens` and what completed requests taught it), sends it to its
//! class's pool as the controller routes it — switching a class to a new pool
//! only once that pool serves (make before break) — and within the pool to the
//! serving instance with the fewest requests in flight, or (`[router] balance =
//! "prompt-tokens"`) the fewest prompt tokens sent and not yet answered (a
//! long prompt delays the first token of every prompt behind it). It counts per-class
//! arrivals for the forecaster and streams the engine's answer back untouched.
//!
//! It also carries out the backlog guard's `move-queued` for engines that
//! cannot hand requests over themselves ([`RouterMover`]): a streaming
//! request whose engine has not yet sent a first token may be taken back —
//! its upstream connection closed, which makes vLLM and SGLang abort it —
//! and sent again, whole, to an instance of another pool. The client sees
//! one answer; its time to first token counts from its first arrival.

use super::Shared;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use controller::control::InstanceState;
use controller::predict::OutputPredictor;
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
    /// Requests taken back from an engine before their first token and sent to another instance (`move-queued`).
    pub moved: u64,
}

/// The streaming requests the router has sent that have no first token yet,
/// per engine endpoint, oldest first: the ones `move-queued` may take back.
#[derive(Debug, Default)]
pub struct Unstarted {
    inner: Mutex<UnstartedInner>,
}

#[derive(Debug, Default)]
struct UnstartedInner {
    next_id: u64,
    by_endpoint: HashMap<String, Vec<(u64, tokio::sync::oneshot::Sender<u32>)>>,
}

impl Unstarted {
    fn lock(&self) -> std::sync::MutexGuard<'_, UnstartedInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a request just sent to `endpoint`; the receiver yields the pool it is moved to.
    fn add(&self, endpoint: &str) -> (u64, tokio::sync::oneshot::Receiver<u32>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut g = self.lock();
        g.next_id += 1;
        let id = g.next_id;
        g.by_endpoint.entry(endpoint.to_string()).or_default().push((id, tx));
        (id, rx)
    }

    /// The request has its first token (or failed): it is no longer movable.
    fn remove(&self, endpoint: &str, id: u64) {
        let mut g = self.lock();
        if let Some(v) = g.by_endpoint.get_mut(endpoint) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                g.by_endpoint.remove(endpoint);
            }
        }
    }

    /// How many requests sent to `endpoint` have no first token yet.
    pub fn count(&self, endpoint: &str) -> usize {
        self.lock().by_endpoint.get(endpoint).map_or(0, Vec::len)
    }

    /// Move up to `max` of `endpoint`'s unstarted requests to `pool`, the
    /// most recently sent first (they are at the back of the engine's queue
    /// and would wait longest). Returns how many were moved.
    pub fn move_to(&self, endpoint: &str, pool: u32, max: u32) -> u32 {
        let mut g = self.lock();
        let Some(v) = g.by_endpoint.get_mut(endpoint) else { return 0 };
        let mut moved = 0;
        while moved < max {
            let Some((_, tx)) = v.pop() else { break };
            // A request that finished meanwhile has dropped its receiver: not counted.
            if tx.send(pool).is_ok() {
                moved += 1;
            }
        }
        if v.is_empty() {
            g.by_endpoint.remove(endpoint);
        }
        moved
    }
}

/// The actuator backend of `move-queued` on an external cluster behind the
/// router: it takes unstarted streams back from the instance's engine (by
/// its placement's endpoint) and the router sends them to the target pool.
pub struct RouterMover {
    unstarted: Arc<Unstarted>,
}

impl RouterMover {
    /// A mover over the router's unstarted requests.
    pub fn new(unstarted: Arc<Unstarted>) -> RouterMover {
        RouterMover { unstarted }
    }
}

#[async_trait::async_trait]
impl actuators::Actuator for RouterMover {
    fn name(&self) -> &str {
        "router"
    }

    fn supports(&self, action: &actuators::Action) -> bool {
        matches!(action, actuators::Action::MoveQueued { .. })
    }

    async fn apply(&self, cmd: &actuators::Command) -> actuators::Outcome {
        let actuators::Action::MoveQueued { instance, pool, max_requests } = cmd.action else {
            return actuators::Outcome::Failed {
                reason: format!("the router carries out move-queued only, not {}", cmd.action.kind()),
                retryable: false,
            };
        };
        let Some(endpoint) = cmd.placement.as_ref().and_then(|p| p.endpoint.as_deref()) else {
            return actuators::Outcome::Failed {
                reason: format!("instance {} has no known endpoint: the router cannot tell its requests", instance.0),
                retryable: false,
            };
        };
        let moved = self.unstarted.move_to(endpoint, pool.0, max_requests);
        actuators::Outcome::Applied {
            placement: None,
            detail: format!("{moved} unstarted requests moved to pool {}", pool.0),
        }
    }
}

/// The router's state.
pub struct RouterState {
    shared: Arc<Shared>,
    client: reqwest::Client,
    predictor: Mutex<OutputPredictor>,
    boundaries: ClassBoundaries,
    in_flight: Mutex<HashMap<String, u32>>,
    /// Per endpoint, the prompt tokens of requests sent with no first token (or answer) yet.
    queued_tokens: Mutex<HashMap<String, u64>>,
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
        queued_tokens: Mutex::new(HashMap::new()),
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
    // A streaming request may be moved until its first token comes; an answer
    // that is not streamed shows nothing before it is whole, so it is not moved.
    let movable = v["stream"].as_bool().unwrap_or(false);
    let mut queued = Queued::new(st.clone(), endpoint.clone(), input);
    let mut endpoint = endpoint;
    let (resp, first) = loop {
        let url = format!("{}{path}", endpoint.trim_end_matches('/'));
        let attempt = async {
            let mut resp =
                st.client.post(&url).header(header::CONTENT_TYPE, "application/json").body(body.clone()).send().await?;
            let first = resp.chunk().await?;
            Ok::<_, reqwest::Error>((resp, first))
        };
        let result = if movable {
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
            Err(e) => {
                st.shared.router_stats.lock().map(|mut r| r.errors += 1).ok();
                return error(StatusCode::BAD_GATEWAY, format!("{url}: {e}"));
            }
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
