//! `dynamollm twin serve`: one twin instance behind the face of a real
//! engine. OpenAI-compatible `/v1/completions` and `/v1/chat/completions`
//! (SSE streaming or whole answers), token timing from the twin's engine
//! running in (optionally accelerated) real time, `/metrics` in Prometheus
//! text with vLLM's metric names plus per-GPU power and energy for the fake
//! NVML device, and `/admin/clock` to lock the instance's clock.
//!
//! One task owns the engine; HTTP handlers talk to it over channels. It
//! wakes at every step end while requests run, so each token leaves at its
//! step's time. A request reaches the engine `perf.request_overhead_s` after
//! it arrives (API and tokeniser time), as in the twin's own TTFT.

use crate::twin_metrics::EngineMetrics;
use axum::extract::{rejection::JsonRejection, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sim::engine::{EngineEvent, EngineRequest, Instance, Lifecycle, Next};
use sim::{ClassSlo, Physics, Stats};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use telemetry::gpu::TwinClockState;
use telemetry::{ClassBoundaries, CLASS_COUNT};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How to run the served twin.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The twin's physics.
    pub physics: Physics,
    /// TP degree of the instance.
    pub tp: u32,
    /// Clock at start (and after a reset).
    pub clock_mhz: u32,
    /// Virtual seconds per wall second.
    pub speed: f64,
    /// The model name served and labelled.
    pub model: String,
    /// Per-class SLOs to count first tokens and token gaps against (`dynamollm_twin_slo_total`).
    pub slo: Option<[ClassSlo; CLASS_COUNT]>,
    /// The key clients must send (`Authorization: Bearer …`) on `/v1/*` and
    /// `/tokenize`, as vLLM's `--api-key` asks; none: open.
    pub api_key: Option<String>,
}

/// A token or the end of a stream, as the engine task hands it to a handler.
#[derive(Debug, Clone)]
enum Out {
    /// A token, at the engine's time `at_s`; the first also says when its request arrived.
    Token {
        index: u32,
        at_s: f64,
        arrived_s: Option<f64>,
    },
    Done {
        prompt_tokens: u32,
        completion_tokens: u32,
    },
}

enum Cmd {
    Submit { input_tokens: u32, output_tokens: u32, tx: mpsc::UnboundedSender<Out> },
    SetClock { clock_mhz: Option<u32>, reply: oneshot::Sender<Result<(), String>> },
    Snapshot { reply: oneshot::Sender<Snapshot> },
}

/// The instance's state at one moment.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    running: usize,
    waiting: usize,
    kv_usage: f64,
    power_per_gpu_w: f64,
    energy_j: f64,
    clock_mhz: u32,
}

struct Stream {
    tx: mpsc::UnboundedSender<Out>,
    class: usize,
    input_tokens: u32,
    output_tokens: u32,
    arrival_v: f64,
    first_step: Option<u64>,
    sent: u32,
    last_v: f64,
}

struct Engine {
    physics: Physics,
    inst: Instance,
    stats: Stats,
    next_v: Option<f64>,
    pending: BinaryHeap<Reverse<(OrdF64, u64)>>,
    pending_req: HashMap<u64, EngineRequest>,
    streams: HashMap<u64, Stream>,
    next_id: u64,
    t0: Instant,
    /// When abandoned requests were last looked for (wall).
    swept: Instant,
    speed: f64,
    default_clock_mhz: u32,
    boundaries: ClassBoundaries,
    metrics: Arc<EngineMetrics>,
    slo: Option<[ClassSlo; CLASS_COUNT]>,
}

fn count_slo(metrics: &EngineMetrics, slo: &Option<[ClassSlo; CLASS_COUNT]>, class: usize, kind: &str, value_s: f64) {
    let Some(slo) = slo else { return };
    let limit = if kind == "ttft" { slo[class].ttft_s } else { slo[class].tbt_s };
    let result = if value_s <= limit + 1e-9 { "ok" } else { "miss" };
    let name = telemetry::RequestClass::from_index(class).to_string();
    metrics.slo.with_label_values(&[name.as_str(), kind, result]).inc();
}

/// An f64 ordered by `total_cmp` (all four comparisons agree).
#[derive(Debug, Clone, Copy)]
struct OrdF64(f64);
impl PartialEq for OrdF64 {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// How far past an event (engine s) the steps finished by it are looked for: rounding only.
const STEP_END_TOLERANCE_S: f64 = 1e-9;

impl Engine {
    /// A serving instance of TP `tp` at `clock_mhz`, its time starting now.
    fn new(
        physics: Physics,
        tp: u32,
        clock_mhz: u32,
        speed: f64,
        slo: Option<[ClassSlo; CLASS_COUNT]>,
        metrics: Arc<EngineMetrics>,
    ) -> Engine {
        let mut inst = Instance::new(&physics, tp, clock_mhz, 0, Lifecycle::Serving, 0.0);
        inst.events = Some(Vec::new());
        Engine {
            inst,
            stats: Stats::new([ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY }; CLASS_COUNT]),
            next_v: None,
            pending: BinaryHeap::new(),
            pending_req: HashMap::new(),
            streams: HashMap::new(),
            next_id: 0,
            t0: Instant::now(),
            swept: Instant::now(),
            speed,
            default_clock_mhz: clock_mhz,
            boundaries: ClassBoundaries::default(),
            metrics,
            slo,
            physics,
        }
    }

    fn vnow(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * self.speed
    }

    fn wall(&self, v: f64) -> Instant {
        self.t0 + Duration::from_secs_f64((v / self.speed).max(0.0))
    }

    fn schedule(&mut self, n: Next) {
        self.next_v = match n {
            Next::At(t) => Some(t),
            Next::Idle => None,
        };
    }

    fn submit(&mut self, input_tokens: u32, output_tokens: u32, tx: mpsc::UnboundedSender<Out>) {
        let now = self.vnow();
        let id = self.next_id;
        self.next_id += 1;
        let class = self.boundaries.classify(input_tokens, output_tokens).index() as u8;
        let req = EngineRequest { arrival_s: now, input_tokens, output_tokens, class, id };
        self.streams.insert(
            id,
            Stream {
                tx,
                class: class as usize,
                input_tokens,
                output_tokens,
                arrival_v: now,
                first_step: None,
                sent: 0,
                last_v: now,
            },
        );
        self.metrics.prompt_tokens.inc_by(u64::from(input_tokens));
        let due = now + self.physics.perf.request_overhead_s;
        self.pending.push(Reverse((OrdF64(due), id)));
        self.pending_req.insert(id, req);
    }

    /// Run the engine up to virtual time `now`, sending every token due by then.
    fn advance(&mut self, now: f64) {
        loop {
            let ev = self.next_v.filter(|&t| t <= now);
            let arr = self.pending.peek().map(|Reverse((t, _))| t.0).filter(|&t| t <= now);
            match (ev, arr) {
                (None, None) => break,
                (Some(e), Some(a)) if a < e => self.admit(a),
                (None, Some(a)) => self.admit(a),
                (Some(e), _) => {
                    // The phase's last step ends at `e` itself, and `steps_at(e)` may count it one
                    // short (`start + time − start` rounds): its tokens would then be stamped at
                    // the next wake-up's time, a gap as long as the engine process was late (at
                    // 15×, a millisecond's lateness is 15 ms of the engine's time).
                    self.emit_steps(e + STEP_END_TOLERANCE_S);
                    let n = self.inst.on_event(&self.physics, &mut self.stats, e);
                    self.schedule(n);
                    self.handle_events();
                }
            }
        }
        self.emit_steps(now);
    }

    fn admit(&mut self, at: f64) {
        let Some(Reverse((_, id))) = self.pending.pop() else { return };
        let Some(mut req) = self.pending_req.remove(&id) else { return };
        req.arrival_s = at;
        let n = self.inst.enqueue(&self.physics, req, at);
        self.schedule(n);
    }

    /// Tokens of decoding streams for the steps finished by `t`, each timed at its step's end.
    fn emit_steps(&mut self, t: f64) {
        let steps = self.inst.steps_at(t);
        for s in self.streams.values_mut() {
            let Some(first) = s.first_step else { continue };
            let due = (1 + steps.saturating_sub(first)).min(u64::from(s.output_tokens)) as u32;
            while s.sent < due {
                let at = self.inst.step_end_s(first + u64::from(s.sent)).unwrap_or(t);
                s.sent += 1;
                self.metrics.inter_token.observe(at - s.last_v);
                count_slo(&self.metrics, &self.slo, s.class, "tbt", at - s.last_v);
                s.last_v = at;
                let _ = s.tx.send(Out::Token { index: s.sent - 1, at_s: at, arrived_s: None });
                self.metrics.generation_tokens.inc();
            }
        }
    }

    fn handle_events(&mut self) {
        let events = std::mem::take(self.inst.events.as_mut().expect("events are on"));
        for ev in events {
            match ev {
                EngineEvent::FirstToken { id, at_s, step } => {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.first_step = Some(step);
                        s.sent = 1;
                        s.last_v = at_s;
                        self.metrics.ttft.observe(at_s - s.arrival_v);
                        count_slo(&self.metrics, &self.slo, s.class, "ttft", at_s - s.arrival_v);
                        self.metrics.generation_tokens.inc();
                        let _ = s.tx.send(Out::Token { index: 0, at_s, arrived_s: Some(s.arrival_v) });
                    }
                }
                EngineEvent::Finished { id, at_s } => {
                    if let Some(mut s) = self.streams.remove(&id) {
                        while s.sent < s.output_tokens {
                            s.sent += 1;
                            self.metrics.inter_token.observe(at_s - s.last_v);
                            count_slo(&self.metrics, &self.slo, s.class, "tbt", at_s - s.last_v);
                            s.last_v = at_s;
                            let _ = s.tx.send(Out::Token { index: s.sent - 1, at_s, arrived_s: None });
                            self.metrics.generation_tokens.inc();
                        }
                        self.metrics.e2e.observe(at_s - s.arrival_v);
                        self.metrics.request_prompt_tokens.observe(f64::from(s.input_tokens));
                        self.metrics.request_generation_tokens.observe(f64::from(s.sent));
                        self.metrics.success.inc();
                        let _ = s.tx.send(Out::Done { prompt_tokens: s.input_tokens, completion_tokens: s.sent });
                    }
                }
            }
        }
    }

    fn snapshot(&self, now: f64) -> Snapshot {
        Snapshot {
            running: self.inst.running(),
            waiting: self.inst.waiting() + self.pending.len(),
            kv_usage: self.inst.kv_usage(),
            power_per_gpu_w: self.inst.power_per_gpu_w_at(&self.physics, now),
            energy_j: self.inst.energy_at(&self.physics, now),
            clock_mhz: self.inst.clock_mhz,
        }
    }

    fn next_wake(&self, now: f64) -> Option<Instant> {
        let step =
            if self.streams.values().any(|s| s.first_step.is_some()) { self.inst.next_step_end_s(now) } else { None };
        let t = [self.next_v, step, self.pending.peek().map(|Reverse((t, _))| t.0)]
            .into_iter()
            .flatten()
            .fold(f64::INFINITY, f64::min);
        t.is_finite().then(|| self.wall(t))
    }

    /// A request whose client went away is aborted, as vLLM aborts a request
    /// whose connection closes (the router closes it when it moves the
    /// request to another instance, a client when it stops reading): at once
    /// while it waits, at the end of the step in progress once admitted.
    fn drop_abandoned(&mut self, now: f64) {
        // Looked for at most every 20 ms of wall time: a step can be far shorter, and the
        // look at every stream must not delay the tokens of the streams still served.
        if self.swept.elapsed() < std::time::Duration::from_millis(20) {
            return;
        }
        self.swept = Instant::now();
        let gone: Vec<u64> = self.streams.iter().filter(|(_, s)| s.tx.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            // Not admitted yet: its arrival event finds nothing and passes.
            let dropped = if self.pending_req.remove(&id).is_some() {
                true
            } else if let Some(n) = self.inst.abort(id, now) {
                self.schedule(n);
                true
            } else {
                false
            };
            if dropped {
                self.streams.remove(&id);
                self.metrics.aborted.inc();
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            let now = self.vnow();
            self.advance(now);
            self.drop_abandoned(now);
            let wake = self.next_wake(now);
            let cmd = match wake {
                Some(w) => tokio::select! {
                    c = rx.recv() => c,
                    _ = tokio::time::sleep_until(w) => continue,
                },
                None => rx.recv().await,
            };
            let Some(cmd) = cmd else { return };
            let now = self.vnow();
            self.advance(now);
            match cmd {
                Cmd::Submit { input_tokens, output_tokens, tx } => self.submit(input_tokens, output_tokens, tx),
                Cmd::SetClock { clock_mhz, reply } => {
                    let c = clock_mhz.unwrap_or(self.default_clock_mhz);
                    let ok = self.physics.gpu.clocks_mhz.contains(&c) || c == self.physics.gpu.clock_max_mhz;
                    if ok {
                        let n = self.inst.set_clock(&self.physics, c, now);
                        self.schedule(n);
                        let _ = reply.send(Ok(()));
                    } else {
                        let _ = reply.send(Err(format!(
                            "clock {c} MHz is not supported; supported: {:?}",
                            self.physics.gpu.clocks_mhz
                        )));
                    }
                }
                Cmd::Snapshot { reply } => {
                    let _ = reply.send(self.snapshot(now));
                }
            }
        }
    }
}

#[derive(Clone)]
struct AppState {
    tx: mpsc::Sender<Cmd>,
    model: Arc<str>,
    tp: u32,
    kv_capacity_tokens: u64,
    supported_clocks_mhz: Arc<Vec<u32>>,
    default_clock_mhz: u32,
    metrics: Arc<EngineMetrics>,
    api_key: Option<Arc<str>>,
    speed: f64,
    power_limit_w: f64,
}

/// An OpenAI-style error answer (OpenAI's error object, as vLLM answers).
fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    service::openai::error(status, message)
}

/// A request without the key the engine was started with is refused, as vLLM's `--api-key` does.
#[allow(clippy::result_large_err)] // the error is the answer itself
fn authorised(st: &AppState, headers: &axum::http::HeaderMap) -> Result<(), Response> {
    let Some(key) = &st.api_key else { return Ok(()) };
    let sent = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match sent.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(k) if k == &**key => Ok(()),
        _ => Err(api_error(StatusCode::UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer …)")),
    }
}

#[allow(clippy::result_large_err)] // the error is the answer itself, built once per bad request
fn body_json(body: Result<Json<serde_json::Value>, JsonRejection>) -> Result<serde_json::Value, Response> {
    body.map(|Json(v)| v).map_err(|e| api_error(StatusCode::BAD_REQUEST, format!("request body: {}", e.body_text())))
}

fn max_tokens(v: &serde_json::Value, default: u64) -> Result<u32, String> {
    let m = &v["max_tokens"];
    let m = if m.is_null() { &v["max_completion_tokens"] } else { m };
    if m.is_null() {
        return Ok(default as u32);
    }
    match m.as_u64() {
        Some(n) if (1..=1_000_000).contains(&n) => Ok(n as u32),
        _ => Err(format!("`max_tokens` must be a whole number from 1 to 1000000, got {m}")),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Completions,
    Chat,
}

/// The body of an authorised request, and its prompt's tokens (the BPE
/// count every request shape of the API gets, as the router falls back on).
#[allow(clippy::result_large_err)] // the error is the answer itself
fn admit(
    st: &AppState,
    headers: &axum::http::HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
    api: Api,
) -> Result<(serde_json::Value, u32), Response> {
    authorised(st, headers)?;
    let v = body_json(body)?;
    let field = if api == Api::Chat { "messages" } else { "prompt" };
    if v[field].is_null() {
        return Err(api_error(StatusCode::BAD_REQUEST, format!("the body needs `{field}`")));
    }
    let input = service::openai::prompt_tokens(&v).map_err(|m| api_error(StatusCode::BAD_REQUEST, m))?;
    Ok((v, input))
}

async fn completions(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    match admit(&st, &headers, body, Api::Completions) {
        Ok((v, input)) => generate(st, v, input, Api::Completions).await,
        Err(r) => r,
    }
}

async fn chat(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    match admit(&st, &headers, body, Api::Chat) {
        Ok((v, input)) => generate(st, v, input, Api::Chat).await,
        Err(r) => r,
    }
}

/// `POST /tokenize` as vLLM answers it: `{"count", "max_model_len"}` for a
/// `prompt` or `messages` body.
async fn tokenize(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    if let Err(r) = authorised(&st, &headers) {
        return r;
    }
    let v = match body_json(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match service::openai::prompt_tokens(&v) {
        Ok(n) => Json(serde_json::json!({ "count": n, "max_model_len": st.kv_capacity_tokens })).into_response(),
        Err(m) => api_error(StatusCode::BAD_REQUEST, m),
    }
}

async fn generate(st: AppState, v: serde_json::Value, input_tokens: u32, api: Api) -> Response {
    if let Some(m) = v["model"].as_str() {
        if m != &*st.model {
            return api_error(
                StatusCode::NOT_FOUND,
                format!("model `{m}` does not exist; this server serves `{}`", st.model),
            );
        }
    }
    let output_tokens = match max_tokens(&v, if api == Api::Chat { 256 } else { 16 }) {
        Ok(n) => n,
        Err(m) => return api_error(StatusCode::BAD_REQUEST, m),
    };
    if u64::from(input_tokens) + u64::from(output_tokens) > st.kv_capacity_tokens {
        return api_error(
            StatusCode::BAD_REQUEST,
            format!(
                "this request needs {} tokens of KV cache ({input_tokens} prompt + {output_tokens} output) but TP{} holds {}",
                u64::from(input_tokens) + u64::from(output_tokens),
                st.tp,
                st.kv_capacity_tokens
            ),
        );
    }
    // A batch of prompts (or `n` > 1) is served as one sequence of its longest
    // prompt and answered once per prompt: the twin's engine has one stream per request.
    let seqs = service::openai::sequences(&v);
    let stream = v["stream"].as_bool().unwrap_or(false);
    let include_usage = v["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    let (tx, mut rx) = mpsc::unbounded_channel();
    if st.tx.send(Cmd::Submit { input_tokens, output_tokens, tx }).await.is_err() {
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped");
    }
    let id = format!("{}-{}", if api == Api::Chat { "chatcmpl" } else { "cmpl" }, uuid_like());
    let created = chrono::Utc::now().timestamp();
    let model = st.model.clone();
    if !stream {
        let mut text = String::new();
        let mut usage = (input_tokens, 0u32);
        while let Some(o) = rx.recv().await {
            match o {
                Out::Token { index, .. } => text.push_str(&token_text(index)),
                Out::Done { prompt_tokens, completion_tokens } => usage = (prompt_tokens, completion_tokens),
            }
        }
        let choice = match api {
            Api::Completions => serde_json::json!({"index":0,"text":text,"logprobs":null,"finish_reason":"length"}),
            Api::Chat => {
                serde_json::json!({"index":0,"message":{"role":"assistant","content":text},"finish_reason":"length"})
            }
        };
        return Json(serde_json::json!({
            "id": id, "object": if api == Api::Chat { "chat.completion" } else { "text_completion" },
            "created": created, "model": &*model, "choices": each(choice, seqs),
            "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1}
        }))
        .into_response();
    }
    let object = if api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
    let events = async_stream_events(rx, move |o| match o {
        Out::Token { index, at_s, arrived_s } => {
            let choice = match api {
                Api::Completions => {
                    serde_json::json!({"index":0,"text":token_text(index),"logprobs":null,"finish_reason":null})
                }
                Api::Chat if index == 0 => {
                    serde_json::json!({"index":0,"delta":{"role":"assistant","content":token_text(index)},"finish_reason":null})
                }
                Api::Chat => serde_json::json!({"index":0,"delta":{"content":token_text(index)},"finish_reason":null}),
            };
            // Stamped with the engine's time, so that clients of a sped-up twin can tell its
            // latency from the wall's (see `telemetry::cluster_interval_s`).
            let mut chunk = serde_json::json!({"id": id, "object": object, "created": created, "model": &*model, "choices": each(choice, seqs)});
            chunk[telemetry::TWIN_TOKEN_STAMP] = serde_json::json!(at_s);
            chunk[telemetry::TWIN_SENT_STAMP] = serde_json::json!(telemetry::unix_now_s());
            if let Some(a) = arrived_s {
                chunk[telemetry::TWIN_ARRIVAL_STAMP] = serde_json::json!(a);
            }
            vec![chunk.to_string()]
        }
        Out::Done { prompt_tokens, completion_tokens } => {
            let last = match api {
                Api::Completions => serde_json::json!({"index":0,"text":"","logprobs":null,"finish_reason":"length"}),
                Api::Chat => serde_json::json!({"index":0,"delta":{},"finish_reason":"length"}),
            };
            let mut v = vec![serde_json::json!({"id": id, "object": object, "created": created, "model": &*model, "choices": each(last, seqs)}).to_string()];
            if include_usage {
                v.push(
                    serde_json::json!({"id": id, "object": object, "created": created, "model": &*model, "choices": [],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}})
                    .to_string(),
                );
            }
            v.push("[DONE]".to_string());
            v
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// One choice per sequence of a request, numbered.
fn each(choice: serde_json::Value, seqs: u32) -> Vec<serde_json::Value> {
    (0..seqs.max(1))
        .map(|i| {
            let mut c = choice.clone();
            c["index"] = serde_json::json!(i);
            c
        })
        .collect()
}

/// Turn engine outputs into SSE events, each output giving one or more `data:` lines.
fn async_stream_events<F>(
    rx: mpsc::UnboundedReceiver<Out>,
    f: F,
) -> impl futures::Stream<Item = Result<Event, Infallible>>
where
    F: FnMut(Out) -> Vec<String> + Send + 'static,
{
    use futures::StreamExt;
    futures::stream::unfold((rx, f), |(mut rx, mut f)| async move {
        let o = rx.recv().await?;
        let items: Vec<Result<Event, Infallible>> = f(o).into_iter().map(|d| Ok(Event::default().data(d))).collect();
        Some((futures::stream::iter(items), (rx, f)))
    })
    .flatten()
}

/// The text of the `index`-th token: common English words that are one BPE
/// token each, so a client counting tokens from the text counts what the engine sent.
fn token_text(index: u32) -> String {
    const WORDS: [&str; 10] = [" the", " of", " and", " to", " in", " a", " is", " that", " for", " it"];
    WORDS[index as usize % WORDS.len()].to_string()
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    format!("{:016x}", N.fetch_add(1, Ordering::Relaxed) ^ 0x5DEE_CE66_D1CE_4E5B)
}

async fn models(State(st): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Err(r) = authorised(&st, &headers) {
        return r;
    }
    Json(serde_json::json!({"object":"list","data":[{"id": &*st.model, "object":"model","owned_by":"dynamollm-twin"}]}))
        .into_response()
}

async fn snapshot(st: &AppState) -> Option<Snapshot> {
    let (reply, rx) = oneshot::channel();
    st.tx.send(Cmd::Snapshot { reply }).await.ok()?;
    rx.await.ok()
}

async fn metrics_page(State(st): State<AppState>) -> Response {
    let Some(s) = snapshot(&st).await else {
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped");
    };
    st.metrics.running.set(s.running as i64);
    st.metrics.waiting.set(s.waiting as i64);
    st.metrics.kv_usage.set(s.kv_usage);
    for g in 0..st.tp {
        let gpu = g.to_string();
        st.metrics.gpu_power_w.with_label_values(&[gpu.as_str()]).set(s.power_per_gpu_w);
        st.metrics.gpu_energy_j.with_label_values(&[gpu.as_str()]).set(s.energy_j / f64::from(st.tp));
        st.metrics.gpu_clock_mhz.with_label_values(&[gpu.as_str()]).set(f64::from(s.clock_mhz));
    }
    match st.metrics.encode() {
        Ok(text) => {
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
        }
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn clock_get(State(st): State<AppState>) -> Response {
    let Some(s) = snapshot(&st).await else {
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped");
    };
    Json(TwinClockState {
        gpus: st.tp,
        clock_mhz: s.clock_mhz,
        supported_clocks_mhz: st.supported_clocks_mhz.to_vec(),
        default_clock_mhz: st.default_clock_mhz,
        speed: Some(st.speed),
        power_limit_w: Some(st.power_limit_w),
    })
    .into_response()
}

async fn clock_post(State(st): State<AppState>, body: Result<Json<serde_json::Value>, JsonRejection>) -> Response {
    let v = match body_json(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let clock_mhz = if v["reset"].as_bool() == Some(true) {
        None
    } else {
        match v["clock_mhz"].as_u64() {
            Some(c) => Some(c as u32),
            None => return api_error(StatusCode::BAD_REQUEST, "body must be {\"clock_mhz\": N} or {\"reset\": true}"),
        }
    };
    let (reply, rx) = oneshot::channel();
    if st.tx.send(Cmd::SetClock { clock_mhz, reply }).await.is_err() {
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped");
    }
    match rx.await {
        Ok(Ok(())) => clock_get(State(st)).await,
        Ok(Err(m)) => api_error(StatusCode::BAD_REQUEST, m),
        Err(_) => api_error(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped"),
    }
}

/// Build the served twin: the router, with its engine task spawned on the current runtime.
pub fn router(cfg: ServeConfig) -> Result<Router, String> {
    if !cfg.physics.valid_tp(cfg.tp) {
        return Err(format!("TP{} is not valid for this model and server", cfg.tp));
    }
    if !(cfg.speed.is_finite() && cfg.speed > 0.0) {
        return Err(format!("--speed must be > 0, got {}", cfg.speed));
    }
    let supported = cfg.physics.gpu.clocks_mhz.clone();
    if !supported.contains(&cfg.clock_mhz) && cfg.clock_mhz != cfg.physics.gpu.clock_max_mhz {
        return Err(format!("clock {} MHz is not supported; supported: {supported:?}", cfg.clock_mhz));
    }
    let metrics = Arc::new(EngineMetrics::new(&cfg.model).map_err(|e| e.to_string())?);
    let power_limit_w = cfg.physics.gpu.tdp_w;
    let engine = Engine::new(cfg.physics, cfg.tp, cfg.clock_mhz, cfg.speed, cfg.slo, metrics.clone());
    let (tx, rx) = mpsc::channel(4096);
    let state = AppState {
        tx,
        model: cfg.model.as_str().into(),
        tp: cfg.tp,
        kv_capacity_tokens: engine.inst.kv_capacity_tokens(),
        supported_clocks_mhz: Arc::new(supported),
        default_clock_mhz: cfg.clock_mhz,
        metrics,
        api_key: cfg.api_key.as_deref().map(Arc::from),
        speed: cfg.speed,
        power_limit_w,
    };
    tokio::spawn(engine.run(rx));
    Ok(Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/metrics", get(metrics_page))
        .route("/admin/clock", get(clock_get).post(clock_post))
        .route("/health", get(|| async { StatusCode::OK }))
        .with_state(state))
}

#[cfg(test)]
mod tests;
