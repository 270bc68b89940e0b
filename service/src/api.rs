//! The service's HTTP API (axum):
//! - `GET /healthz` (always 200 while the process answers) and `GET /readyz`
//!   (200 once the first tick ran) need no token;
//! - everything else needs `Authorization: Bearer <token>` (401 otherwise):
//!   `GET /metrics` (the service's own Prometheus metrics), `GET /api/v1/status`,
//!   `GET /api/v1/decisions?limit=N`, `GET /api/v1/actions?since_ms=T&limit=N` (the audit log), `POST /api/v1/mode {"mode": "auto"|"dry-run"|"failsafe"}`,
//!   and `GET /` (the live page; a browser may pass the token as `?token=`).

use super::core::Mode;
use super::Shared;
use actuators::Outcome;
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The service's own metrics.
pub struct ServiceMetrics {
    registry: Registry,
    loop_seconds: HistogramVec,
    actions: IntCounterVec,
    gauges: GaugeVec,
    attainment: GaugeVec,
    router_refused: IntCounterVec,
}

impl ServiceMetrics {
    /// Register them.
    pub fn new() -> prometheus::Result<ServiceMetrics> {
        let registry = Registry::new();
        let loop_seconds = HistogramVec::new(
            HistogramOpts::new("dynamollm_loop_duration_seconds", "Wall time of one pass of a control loop.")
                .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
            &["loop"],
        )?;
        let actions = IntCounterVec::new(
            Opts::new("dynamollm_actions_total", "Actions sent to the actuators, by kind and outcome."),
            &["kind", "outcome"],
        )?;
        let gauges = GaugeVec::new(
            Opts::new("dynamollm_service", "The service's state, one series per quantity."),
            &["quantity"],
        )?;
        registry.register(Box::new(loop_seconds.clone()))?;
        registry.register(Box::new(actions.clone()))?;
        let attainment = GaugeVec::new(
            Opts::new(
                "dynamollm_class_slo_attainment",
                "Each class's SLO attainment so far (the lower of TTFT and TBT), as the router or the twin measured it.",
            ),
            &["class"],
        )?;
        registry.register(Box::new(gauges.clone()))?;
        registry.register(Box::new(attainment.clone()))?;
        let router_refused = IntCounterVec::new(
            Opts::new(
                "dynamollm_router_refused_total",
                "Connections and requests the request router turned away, by reason (max_connections, \
                 header_timeout, head_too_large, unauthorized, body_too_large, body_timeout).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(router_refused.clone()))?;
        Ok(ServiceMetrics { registry, loop_seconds, actions, gauges, attainment, router_refused })
    }

    /// Export another part's metrics (the InfluxDB sink's) on `/metrics`.
    pub fn register(&self, f: impl FnOnce(&Registry) -> prometheus::Result<()>) -> prometheus::Result<()> {
        f(&self.registry)
    }

    /// The router turned a connection or a request away.
    pub fn observe_router_refused(&self, reason: &str) {
        self.router_refused.with_label_values(&[reason]).inc();
    }

    /// Show a reason's counter at 0 before anything is refused for it.
    pub fn observe_router_refused_zero(&self, reason: &str) {
        self.router_refused.with_label_values(&[reason]);
    }

    /// One tick took this long.
    pub fn observe_tick(&self, d: Duration) {
        self.loop_seconds.with_label_values(&["tick"]).observe(d.as_secs_f64());
    }

    /// An action's outcome.
    pub fn observe_action(&self, kind: &str, o: &Outcome) {
        let tag = match o {
            Outcome::Applied { .. } => "applied",
            Outcome::Failed { .. } => "failed",
            Outcome::TimedOut { .. } => "timed-out",
        };
        self.actions.with_label_values(&[kind, tag]).inc();
    }
}

/// The API router.
pub fn router(shared: Arc<Shared>) -> Router {
    let guarded = Router::new()
        .route("/", get(live_page))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/decisions", get(decisions))
        .route("/api/v1/actions", get(actions))
        .route("/api/v1/mode", post(set_mode))
        .layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(shared)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn auth(State(st): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let header_token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    // The live page may carry the token in its URL (a browser cannot set a header on navigation).
    let query_token = (req.uri().path() == "/")
        .then(|| req.uri().query())
        .flatten()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
        .map(str::to_string);
    let ok = header_token.or(query_token).is_some_and(|t| super::config::token_matches(&st.token, &t));
    if !ok {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return r;
    }
    next.run(req).await
}

async fn readyz(State(st): State<Arc<Shared>>) -> Response {
    if st.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "the first control tick has not run yet")
    }
}

async fn live_page() -> Html<&'static str> {
    Html(dashboards::live::PAGE_HTML)
}

async fn status(State(st): State<Arc<Shared>>) -> Response {
    let now = st.clock.now_s();
    let router = st.router_stats.lock().map(|r| r.clone()).unwrap_or_default();
    match st.core.lock() {
        Ok(c) => {
            let mut s = c.status(now);
            s["router"] = serde_json::to_value(router).unwrap_or_default();
            Json(s).into_response()
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the service state is poisoned"),
    }
}

#[derive(serde::Deserialize)]
struct ActionsQuery {
    since_ms: Option<u64>,
    limit: Option<usize>,
}

/// The audit log: every command sent and what became of it.
async fn actions(State(st): State<Arc<Shared>>, Query(q): Query<ActionsQuery>) -> Response {
    let audit = st.actuators.audit().clone();
    let (since, limit) = (q.since_ms.unwrap_or(0), q.limit.unwrap_or(1000).min(100_000));
    match tokio::task::spawn_blocking(move || audit.list(since, limit)).await {
        Ok(Ok(records)) => Json(serde_json::json!({ "actions": records })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct DecisionsQuery {
    limit: Option<usize>,
}

async fn decisions(State(st): State<Arc<Shared>>, Query(q): Query<DecisionsQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(2000);
    match st.core.lock() {
        Ok(c) => {
            let all: Vec<_> = c.decisions().collect();
            let from = all.len().saturating_sub(limit);
            Json(serde_json::json!({ "decisions": &all[from..] })).into_response()
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the service state is poisoned"),
    }
}

async fn set_mode(
    State(st): State<Arc<Shared>>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(v)) = body else {
        return error(StatusCode::BAD_REQUEST, "body must be JSON like {\"mode\": \"auto\"}");
    };
    let Some(m) = v.get("mode").and_then(|m| m.as_str()) else {
        return error(StatusCode::BAD_REQUEST, "body must be JSON like {\"mode\": \"auto\"}: field `mode` missing");
    };
    let mode = match Mode::parse(m) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    match st.core.lock() {
        Ok(mut c) => {
            c.set_mode(mode);
            tracing::info!(mode = mode.name(), "mode set by the operator");
            Json(serde_json::json!({ "mode": c.mode().name(), "operator_mode": mode.name() })).into_response()
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the service state is poisoned"),
    }
}

async fn metrics(State(st): State<Arc<Shared>>) -> Response {
    let now = st.clock.now_s();
    if let Ok(c) = st.core.lock() {
        let t = c.totals();
        let g = &st.metrics.gauges;
        g.with_label_values(&["telemetry_lag_seconds"]).set(c.telemetry_lag_s(now));
        g.with_label_values(&["power_watts"]).set(t.power_w);
        g.with_label_values(&["gpus"]).set(f64::from(t.gpus));
        g.with_label_values(&["energy_joules"]).set(t.energy_j);
        g.with_label_values(&["baseline_energy_joules"]).set(t.baseline_energy_j);
        g.with_label_values(&["instances"]).set(c.instances().count() as f64);
        g.with_label_values(&["pending_actions"]).set(c.pending().count() as f64);
        let behind = c.routing().iter().zip(c.routed()).filter(|(want, got)| **want != *got).count();
        g.with_label_values(&["classes_unrouted"]).set(behind as f64);
        g.with_label_values(&["held_retires"]).set(c.held_retires().count() as f64);
        g.with_label_values(&["held_retire_oldest_seconds"]).set(c.held_retire_oldest_s(now));
        g.with_label_values(&["failsafe"]).set(if c.mode() == Mode::Failsafe { 1.0 } else { 0.0 });
        g.with_label_values(&["time_seconds"]).set(now);
        g.with_label_values(&["unmatched_samples"]).set(c.counters.unmatched_samples as f64);
        g.with_label_values(&["rejected_arrivals"]).set(c.counters.rejected_arrivals as f64);
        g.with_label_values(&["cancelled_commands"]).set(c.counters.cancelled_commands as f64);
        g.with_label_values(&["refused_over_gpus"]).set(c.counters.refused_over_gpus as f64);
        g.with_label_values(&["state_unsaved"]).set(if c.unsaved().is_some() { 1.0 } else { 0.0 });
        for (class, att) in c.class_attainment() {
            st.metrics.attainment.with_label_values(&[&class]).set(att.unwrap_or(f64::NAN));
        }
    }
    if let Ok(r) = st.router_stats.lock() {
        st.metrics.gauges.with_label_values(&["router_connections"]).set(r.connections as f64);
        st.metrics.gauges.with_label_values(&["router_rejected"]).set(r.rejected as f64);
        st.metrics.gauges.with_label_values(&["router_rejected_power_budget"]).set(r.rejected_power_budget as f64);
    }
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&st.metrics.registry.gather(), &mut buf) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], buf).into_response()
}
