//! The webhook backend against a loopback axum server: headers, retries with
//! backoff on 5xx, no retry on 4xx, the overall timeout.

use actuators::webhook::{Backoff, WebhookActuator};
use actuators::{Action, Actuator, Command, InstanceId, Outcome, PoolId, Secret, SpawnFrom};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "s3cret-token";

/// (authorization, idempotency key, body) of one request.
type Seen = (Option<String>, Option<String>, Command);

#[derive(Default)]
struct Server {
    /// Status per request, in order; the last repeats.
    script: Vec<u16>,
    delay: Duration,
    /// (authorization, idempotency key, body) per request.
    seen: Mutex<Vec<Seen>>,
}

async fn hook(State(s): State<Arc<Server>>, headers: HeaderMap, body: String) -> (StatusCode, String) {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let cmd: Command = serde_json::from_str(&body).expect("the body is a Command");
    let n = {
        let mut seen = s.seen.lock().unwrap();
        seen.push((h("authorization"), h("idempotency-key"), cmd));
        seen.len()
    };
    tokio::time::sleep(s.delay).await;
    if h("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return (StatusCode::UNAUTHORIZED, "bad token".into());
    }
    let status = *s.script.get(n - 1).or(s.script.last()).unwrap_or(&200);
    let body = if status == 200 {
        r#"{"placement": {"node": "vm-12", "gpus": [0, 1], "endpoint": "http://vm-12:8000"}, "detail": "vm started"}"#
            .to_string()
    } else {
        format!("status {status}")
    };
    (StatusCode::from_u16(status).unwrap(), body)
}

async fn serve(script: Vec<u16>, delay: Duration) -> (String, Arc<Server>) {
    let state = Arc::new(Server { script, delay, ..Default::default() });
    let app = axum::Router::new().route("/hook", post(hook)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), state)
}

fn actuator(url: &str, token: Option<&str>, attempts: u32, timeout: Duration) -> WebhookActuator {
    let backoff = Backoff { attempts, initial: Duration::from_millis(20), max: Duration::from_millis(80) };
    WebhookActuator::new(url, token.map(Secret::new), backoff, timeout, None).unwrap()
}

fn spawn_cmd(id: &str) -> Command {
    Command::new(
        id,
        Action::Spawn {
            instance: InstanceId(4),
            pool: PoolId(1),
            tp: 2,
            clock_mhz: 1600,
            from: SpawnFrom::WarmStandby,
        },
        None,
    )
}

#[tokio::test]
async fn a_500_then_200_is_retried_with_the_same_key_and_applied() {
    let (url, server) = serve(vec![500, 200], Duration::ZERO).await;
    let a = actuator(&url, Some(TOKEN), 4, Duration::from_secs(10));
    let cmd = spawn_cmd("wh-1");
    let out = a.apply(&cmd).await;
    let Outcome::Applied { placement: Some(p), detail } = &out else { panic!("expected applied: {out:?}") };
    assert_eq!(p.node, "vm-12");
    assert_eq!(p.gpus, vec![0, 1]);
    assert_eq!(detail, "vm started");
    let seen = server.seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "attempts");
    for (auth, key, body) in seen.iter() {
        assert_eq!(auth.as_deref(), Some("Bearer s3cret-token"));
        assert_eq!(key.as_deref(), Some("wh-1"));
        assert_eq!(body, &cmd);
    }
}

#[tokio::test]
async fn always_500_fails_after_the_configured_attempts() {
    let (url, server) = serve(vec![500], Duration::ZERO).await;
    let a = actuator(&url, Some(TOKEN), 3, Duration::from_secs(10));
    match a.apply(&spawn_cmd("wh-2")).await {
        Outcome::Failed { reason, retryable } => {
            assert!(retryable);
            assert!(reason.contains("500"), "{reason}");
            assert!(reason.contains("3 attempts"), "{reason}");
        }
        other => panic!("expected failed: {other:?}"),
    }
    assert_eq!(server.seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_429_is_retried() {
    let (url, server) = serve(vec![429, 429, 200], Duration::ZERO).await;
    let a = actuator(&url, Some(TOKEN), 5, Duration::from_secs(10));
    assert!(a.apply(&spawn_cmd("wh-429")).await.is_applied());
    assert_eq!(server.seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_401_fails_at_once_without_retry() {
    let (url, server) = serve(vec![200], Duration::ZERO).await;
    let a = actuator(&url, Some("wrong-token"), 4, Duration::from_secs(10));
    match a.apply(&spawn_cmd("wh-3")).await {
        Outcome::Failed { reason, retryable } => {
            assert!(!retryable);
            assert!(reason.contains("401"), "{reason}");
            assert!(reason.contains("token was refused"), "{reason}");
            assert!(!reason.contains("wrong-token"), "the token leaked into {reason}");
        }
        other => panic!("expected failed: {other:?}"),
    }
    assert_eq!(server.seen.lock().unwrap().len(), 1);
    assert!(!format!("{a:?}").contains("wrong-token"), "Debug shows the token: {a:?}");

    // No token configured: no Authorization header, a clear reason.
    let a = actuator(&url, None, 4, Duration::from_secs(10));
    match a.apply(&spawn_cmd("wh-4")).await {
        Outcome::Failed { reason, retryable: false } => assert!(reason.contains("no bearer token"), "{reason}"),
        other => panic!("expected failed: {other:?}"),
    }
    let seen = server.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].0, None, "no Authorization header without a token");
}

#[tokio::test]
async fn a_slow_server_times_out_within_the_timeout() {
    let (url, _server) = serve(vec![200], Duration::from_secs(5)).await;
    let a = actuator(&url, Some(TOKEN), 4, Duration::from_millis(300));
    let start = Instant::now();
    let out = a.apply(&spawn_cmd("wh-5")).await;
    assert!(matches!(out, Outcome::TimedOut { after_ms } if (290..2000).contains(&after_ms)), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn connection_refused_is_retried_then_failed() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let a = actuator(&format!("http://127.0.0.1:{port}/hook"), Some(TOKEN), 2, Duration::from_secs(10));
    match a.apply(&spawn_cmd("wh-6")).await {
        Outcome::Failed { reason, retryable: true } => assert!(reason.contains("2 attempts"), "{reason}"),
        other => panic!("expected failed: {other:?}"),
    }
}

#[test]
fn bad_urls_are_clear_errors() {
    let b = Backoff { attempts: 1, initial: Duration::ZERO, max: Duration::ZERO };
    let e = WebhookActuator::new("not a url", None, b, Duration::from_secs(1), None).unwrap_err();
    assert!(e.contains("not a url"), "{e}");
    let e = WebhookActuator::new("ftp://x/y", None, b, Duration::from_secs(1), None).unwrap_err();
    assert!(e.contains("the scheme must be http"), "{e}");
    let e = WebhookActuator::new("https://x/y", None, b, Duration::from_secs(1), None).unwrap_err();
    assert!(e.contains("without TLS"), "{e}");
}
