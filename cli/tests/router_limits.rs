//! The request router under abuse, over real sockets: a flood of idle
//! connections leaves the service's API answering (the router holds at most
//! `max_connections`, closes the rest as soon as it accepts them, and drops
//! the idle ones after `header_timeout_s`), client keys guard the router
//! while the engines get their own key, and heads, bodies and kept-alive
//! connections are bounded while a stream longer than every bound passes
//! whole.

use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
mod serve_support;
mod twin_engine;

use serve_support::{free_port, wait_for, Api, TOKEN};

const ENGINE_KEY: &str = "engine-key-41c9";

/// `dynamollm serve` in a shell that first sets its open-files limit (soft
/// and hard) to `nofile`, so that a flood the router did not bound would
/// exhaust it; SIGKILLed on drop.
struct Serve(std::process::Child);

impl Serve {
    fn start(config: &Path, log: &Path, nofile: u32) -> Serve {
        let err = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" serve --config \"$1\""))
            .arg(env!("CARGO_BIN_EXE_dynamollm"))
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .expect("cannot start dynamollm serve");
        Serve(child)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A counter of a `/metrics` page (its first sample whose name and labels start so).
fn sample(page: &str, prefix: &str) -> Option<f64> {
    page.lines().find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}

/// A short completion through the router (with `key` as its bearer token when given).
async fn complete(router: &str, key: Option<&str>) -> reqwest::Response {
    let body = serde_json::json!({"model": "llama2-70b", "prompt": "Say hello.", "max_tokens": 5});
    let mut req = reqwest::Client::new().post(format!("{router}/v1/completions")).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.timeout(Duration::from_secs(20)).send().await.unwrap()
}

/// Wait until the router's cluster serves: a completion gets 200.
async fn serving(router: &str, key: Option<&str>) {
    let router = router.to_string();
    let key = key.map(str::to_string);
    wait_for("an instance to serve behind the router", Duration::from_secs(60), || {
        let (router, key) = (router.clone(), key.clone());
        async move {
            let r = complete(&router, key.as_deref()).await;
            match r.status().as_u16() {
                200 => Ok(()),
                s => Err(format!("{s}: {}", r.text().await.unwrap_or_default())),
            }
        }
    })
    .await;
}

/// Whether the peer has closed a connection (EOF or reset); `false` while it is open and silent.
fn closed_by_peer(s: &TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.try_read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// An HTTP answer read off a raw connection: status, head, body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Read one HTTP/1.1 answer (with a `content-length`) from `s`, within 10 s.
async fn read_answer(s: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return Answer { status, head, body };
            }
        }
        let mut chunk = [0u8; 8192];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                panic!("the connection closed before a whole answer: {:?}", String::from_utf8_lossy(&buf))
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no whole answer within 10 s: {:?}", String::from_utf8_lossy(&buf)),
        }
    }
}

/// How long until the peer closes `s` (reading and dropping what it sends), at most `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut chunk = [0u8; 4096];
    loop {
        let left = limit.checked_sub(t.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// The error object of an OpenAI-shaped error body.
fn openai_error(body: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not an OpenAI error body ({e}): {body:?}"));
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "{v}");
    v["error"].clone()
}

/// 2,000 idle connections (TCP connects that send nothing) against a router
/// holding at most 100, in a service whose open-files limit is 1,024: the
/// API answers within a second while they are held, the state is still
/// written, the refusals are counted (and logged once), the idle ones are
/// closed after the header timeout, and the router then serves a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_leave_the_api_answering() {
    // The test's own side holds 2,000 connections (and the engines' sockets).
    let soft = service::raise_open_files_limit().expect("the open-files limit");
    assert!(soft >= 4096, "the test needs about 2,200 descriptors; this process may open {soft}");
    let cm = twin_engine::cluster_manager(10.0).await;
    let dir = tempfile::tempdir().unwrap();
    let (api_port, router_port) = (free_port(), free_port());
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[service]
listen = "127.0.0.1:{api_port}"
token = "{TOKEN}"
state_dir = "{state}"
speed = 10.0
stale_after_s = 30.0
initial_class_rps = {{ MM = 1.0 }}

[cluster]
kind = "external"
gpus = 1024
scrape_interval_s = 0.1

[router]
listen = "127.0.0.1:{router_port}"
max_connections = 100
header_timeout_s = 5.0

[actuators.webhook]
url = "{cm}"
"#,
            state = dir.path().join("state").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let svc = Serve::start(&config, &log, 1024);
    let api = Api::new(format!("127.0.0.1:{api_port}"));
    let router = format!("http://127.0.0.1:{router_port}");
    wait_for("the API", Duration::from_secs(30), || api.try_status()).await;
    serving(&router, None).await;
    // The flood would exhaust this limit were the router not bounded.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", svc.0.id())).unwrap();
    let max_open = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    assert!(max_open.split_whitespace().nth(3) == Some("1024"), "the service's limit is not 1,024: {max_open}");

    // The API, on a new connection each time (as a scrape or an operator comes):
    // it must answer within a second; returns how long it took.
    let probe = |when: &'static str| async move {
        let fresh = Api::new(format!("127.0.0.1:{api_port}"));
        let t = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(1), fresh.try_status())
            .await
            .unwrap_or_else(|_| panic!("the API did not answer within 1 s {when}"))
            .unwrap_or_else(|e| panic!("the API failed {when}: {e}"));
        let took = t.elapsed();
        assert!(status["router"]["connections"].as_u64().unwrap() <= 100, "{}", status["router"]);
        took
    };
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(2000);
    // 1,100 idle connections stopped the API when the router held them all.
    for _ in 0..1100 {
        idle.push(TcpStream::connect(("127.0.0.1", router_port)).await.unwrap());
    }
    let mut slowest = probe("under 1,100 idle connections").await;
    for _ in 1100..2000 {
        idle.push(TcpStream::connect(("127.0.0.1", router_port)).await.unwrap());
    }
    let open_took = opened.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // While they are held: the API answers within a second, every time.
    for _ in 0..5 {
        slowest = slowest.max(probe("under 2,000 idle connections").await);
    }
    let held = idle.iter().filter(|s| !closed_by_peer(s)).count();
    let since_first = opened.elapsed();
    eprintln!(
        "2,000 idle connections opened in {open_took:?}; {held} held by the router {since_first:?} after the first; \
         the API's slowest status answer: {slowest:?}"
    );
    assert!(slowest < Duration::from_secs(1), "the API took {slowest:?}");
    assert!(since_first < Duration::from_secs(5), "too slow to see them held: {since_first:?}");
    assert!((1..=100).contains(&held), "{held} idle connections held (max_connections = 100)");
    // Counted, and the state is still written (no descriptor shortage).
    let page = api.try_metrics().await.unwrap();
    let refused = sample(&page, "dynamollm_router_refused_total{reason=\"max_connections\"}").unwrap_or(0.0);
    assert!(refused >= 1000.0, "refused connections counted: {refused}\n{page}");
    assert_eq!(sample(&page, "dynamollm_service{quantity=\"state_unsaved\"}"), Some(0.0));
    let status = api.try_status().await.unwrap();
    assert_eq!(status["router"]["connections_refused"].as_f64(), Some(refused), "{}", status["router"]);

    // The idle ones are closed after the header timeout (5 s): every one of them, soon.
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let open = idle.iter().filter(|s| !closed_by_peer(s)).count();
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} idle connections still open {:?} after the first", opened.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = api.try_status().await.unwrap();
    let router_stats = &status["router"];
    assert!(router_stats["connections_timed_out"].as_u64().unwrap() >= held as u64, "{router_stats}");
    // The router serves again, with the idle clients still holding their ends.
    let r = complete(&router, None).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let page = api.try_metrics().await.unwrap();
    assert_eq!(sample(&page, "dynamollm_service{quantity=\"state_unsaved\"}"), Some(0.0));
    drop(idle);

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("open-files limit"), "the limit is not logged:\n{text}");
    assert!(!text.contains("Too many open files"), "descriptors ran out:\n{text}");
    let refusal_lines = text.lines().filter(|l| l.contains("router.max_connections were open")).count();
    assert!((1..=2).contains(&refusal_lines), "{refusal_lines} log lines for {refused} refusals:\n{text}");
}

/// With client keys, a request without one gets 401 (OpenAI's error object),
/// one with a key of `client_keys` or of `client_keys_file` goes through,
/// and the engines — which accept their own key only — get theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keys_guard_the_router_and_engines_get_their_own_key() {
    let cm = twin_engine::cluster_manager_with(10.0, 1, Some(ENGINE_KEY)).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("client-keys");
    std::fs::write(&keys, "# one key a line\n\nck-from-file-8d2e\n").unwrap();
    let router_keys = format!(
        "client_keys = [\"ck-inline-3b7a\"]\nclient_keys_file = \"{}\"\napi_key = \"{ENGINE_KEY}\"",
        keys.display()
    );
    let cfg = twin_engine::external_config(&cm, dir.path(), "MM = 1.0", &router_keys, "");
    let svc = service::start(cfg).await.unwrap();
    let router = format!("http://{}", svc.router_addr.unwrap());
    serving(&router, Some("ck-inline-3b7a")).await;

    for key in [None, Some("ck-inline-3b7b"), Some("ck-inline-3b7"), Some(ENGINE_KEY), Some("")] {
        let r = complete(&router, key).await;
        assert_eq!(r.status(), 401, "key {key:?}");
        assert_eq!(r.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"));
        let e = openai_error(&r.text().await.unwrap());
        assert_eq!(e["type"], "authentication_error", "{e}");
    }
    let r = reqwest::get(format!("{router}/v1/models")).await.unwrap();
    assert_eq!(r.status(), 401);
    // Right keys: the request goes through end to end, so the engine got its own key, not the client's.
    for key in ["ck-inline-3b7a", "ck-from-file-8d2e"] {
        let r = complete(&router, Some(key)).await;
        assert_eq!(r.status(), 200, "key {key}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["choices"][0]["text"].is_string(), "{v}");
        let r = reqwest::Client::new().get(format!("{router}/v1/models")).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // A lowercase scheme is the same scheme.
    let r = reqwest::Client::new()
        .post(format!("{router}/v1/completions"))
        .header("authorization", "bearer ck-inline-3b7a")
        .json(&serde_json::json!({"model": "llama2-70b", "prompt": "Hi.", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stats = svc.shared.router_stats.lock().unwrap().clone();
    assert!(stats.unauthorized >= 6, "{stats:?}");
    svc.stop().await.unwrap();

    // Without client keys the client's own key goes to the engine, as before: a wrong one is the engine's 401.
    let dir = tempfile::tempdir().unwrap();
    let cfg = twin_engine::external_config(&cm, dir.path(), "MM = 1.0", &format!("api_key = \"{ENGINE_KEY}\""), "");
    let svc = service::start(cfg).await.unwrap();
    let router = format!("http://{}", svc.router_addr.unwrap());
    serving(&router, None).await;
    let r = complete(&router, Some("not-the-engine-key")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers().get("www-authenticate"), None, "the router's own 401, not the engine's");
    assert_eq!(complete(&router, Some(ENGINE_KEY)).await.status(), 200);
    assert_eq!(svc.shared.router_stats.lock().unwrap().unauthorized, 0);
    svc.stop().await.unwrap();

    // Keys are checked when the config is read.
    let bad = |router: &str| {
        let text = format!("[router]\nlisten = \"127.0.0.1:0\"\n{router}\n");
        service::config::ServiceConfig::parse(&text, "bad.toml").and_then(|c| c.router_client_keys())
    };
    let e = bad("client_keys = [\"\"]").unwrap_err().to_string();
    assert!(e.contains("router.client_keys[0]") && e.contains("empty"), "{e}");
    let e = bad("client_keys = [\"two words\"]").unwrap_err().to_string();
    assert!(e.contains("router.client_keys[0]"), "{e}");
    let missing = dir.path().join("no-such-file");
    let e = bad(&format!("client_keys_file = \"{}\"", missing.display())).unwrap_err().to_string();
    assert!(e.contains("router.client_keys_file") && e.contains("no-such-file"), "{e}");
    std::fs::write(&keys, "# only a comment\n").unwrap();
    let e = bad(&format!("client_keys_file = \"{}\"", keys.display())).unwrap_err().to_string();
    assert!(e.contains("holds no key"), "{e}");
}

/// Heads and bodies are bounded (431, 413 with OpenAI's error object, 408 for
/// a body that stops), a connection that sends nothing, or stays idle after
/// its answer, is closed after `header_timeout_s`; a stream lasting longer
/// than that passes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_bodies_and_idle_connections_are_bounded_but_streams_are_not() {
    // Engines at real time: a 60-token answer streams for well over the 1 s header timeout.
    let cm = twin_engine::cluster_manager(1.0).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = "header_timeout_s = 1.0\nmax_header_bytes = 4096\nmax_body_bytes = 4096";
    let cfg = twin_engine::external_config(&cm, dir.path(), "MM = 1.0", limits, "");
    let svc = service::start(cfg).await.unwrap();
    let addr = svc.router_addr.unwrap();
    let router = format!("http://{addr}");
    serving(&router, None).await;
    let client = reqwest::Client::new();

    // A body just under the limit goes through; one over it gets 413, by its Content-Length…
    let pad = |n: usize| serde_json::json!({"model": "llama2-70b", "prompt": "a ".repeat(n / 2), "max_tokens": 2});
    let under = serde_json::to_vec(&pad(3900)).unwrap();
    assert!(under.len() <= 4096);
    let r = client.post(format!("{router}/v1/completions")).body(under).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let over = serde_json::to_vec(&pad(6000)).unwrap();
    let r = client
        .post(format!("{router}/v1/completions"))
        .header("content-type", "application/json")
        .body(over.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let e = openai_error(&r.text().await.unwrap());
    assert_eq!(e["type"], "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("router.max_body_bytes"), "{e}");
    // …before any of it is sent (a client that asks first: Expect: 100-continue)…
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n\
          content-length: 1000000000\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 413, "{}", a.head);
    assert_eq!(openai_error(&a.body)["code"], 413);
    // …and as it streams in, with no length declared.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n{:x}\r\n",
        over.len()
    )
    .into_bytes();
    req.extend_from_slice(&over);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 413, "{}", a.head);
    assert_eq!(openai_error(&a.body)["type"], "invalid_request_error");

    // A head over max_header_bytes: 431.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("GET /v1/models HTTP/1.1\r\nhost: r\r\nx-filler: {}\r\n\r\n", "f".repeat(6000));
    s.write_all(head.as_bytes()).await.unwrap();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 431, "{}", a.head);

    // A body that stops half way: 408 once it has paused for the header timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-length: 100\r\n\r\n{\"model\": ").await.unwrap();
    let t = Instant::now();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 408, "{}", a.head);
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(openai_error(&a.body)["message"].as_str().unwrap().contains("header_timeout_s"));

    // A connection that sends nothing, and one half a head, are closed after the header timeout.
    for sent in [&b""[..], b"GET /v1/models HTTP/1.1\r\nhost:"] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        let closed = closed_within(&mut s, Duration::from_secs(5)).await.expect("never closed");
        assert!(closed >= Duration::from_millis(900) && closed < Duration::from_secs(3), "closed after {closed:?}");
    }
    // A kept-alive connection: a second request on it is served; idle after its answer, it is closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: r\r\n\r\n").await.unwrap();
        let a = read_answer(&mut s).await;
        assert_eq!(a.status, 200, "{}", a.head);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let closed =
        closed_within(&mut s, Duration::from_secs(5)).await.expect("an idle kept-alive connection stayed open");
    assert!(closed < Duration::from_secs(3), "closed after {closed:?}");

    // A stream lasting several header timeouts passes whole (no total limit on answers).
    let t = Instant::now();
    let body = serde_json::json!({"model": "llama2-70b", "prompt": "Tell a story.", "max_tokens": 60,
        "ignore_eos": true, "stream": true});
    let r = client.post(format!("{router}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let took = t.elapsed();
    let tokens = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter(|v| v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()))
        .count();
    assert_eq!(tokens, 60, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert!(took > Duration::from_millis(1500), "the stream took only {took:?}: not longer than the header timeout");

    let stats = svc.shared.router_stats.lock().unwrap().clone();
    assert!(stats.bodies_too_large >= 3 && stats.heads_too_large >= 1 && stats.bodies_timed_out >= 1, "{stats:?}");
    assert!(stats.connections_timed_out >= 3, "{stats:?}");
    svc.stop().await.unwrap();

    // The limits are range-checked.
    for (key, bad) in [
        ("max_connections", "0"),
        ("header_timeout_s", "0.0"),
        ("max_header_bytes", "100"),
        ("max_body_bytes", "2000000000"),
    ] {
        let text = format!("[router]\nlisten = \"127.0.0.1:0\"\n{key} = {bad}\n");
        let e = service::config::ServiceConfig::parse(&text, "bad.toml").unwrap_err().to_string();
        assert!(e.contains(&format!("router.{key}")), "{e}");
    }
}
