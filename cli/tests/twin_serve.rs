//! `dynamollm twin serve` over real loopback sockets: 256 concurrent
//! streams against its vLLM-named `/metrics`, the OpenAI answers and errors,
//! clock admin through the fake GPU device, and the acceptance check of the
//! HTTP profiling path against the virtual-time sweep.

use dynamollm::loadgen::{stream_completion, StreamTiming};
use dynamollm::profile::{ProfileRow, ProfileTable};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use prometheus_parse::{Scrape, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use telemetry::gpu::{GpuDevice, GpuError, TwinClockState, TwinDevice};

const BIN: &str = env!("CARGO_BIN_EXE_dynamollm");

/// Tests whose figures depend on wall-clock timing run one at a time.
static TIMED: Mutex<()> = Mutex::new(());

fn timed() -> std::sync::MutexGuard<'static, ()> {
    TIMED.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `twin serve` child process, killed when dropped (also when a test fails).
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let child = Command::new(BIN)
            .args(["twin", "serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary runs");
        let mut server = Server { child, base: String::new() };
        let mut lines = BufReader::new(server.child.stderr.take().unwrap()).lines();
        let prefix = "twin serve: listening on ";
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(url) = line.strip_prefix(prefix) {
                server.base = url.trim().to_string();
                break;
            }
            seen.push(line);
        }
        assert!(server.base.starts_with("http://127.0.0.1:"), "no address announced: {seen:?}");
        assert!(!server.base.ends_with(":0"), "{}", server.base);
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let client = reqwest::blocking::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client.get(format!("{}/health", server.base)).send() {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                other => panic!("{} never became healthy: {other:?}", server.base),
            }
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn model_of(server: &Server) -> String {
    let v: serde_json::Value = reqwest::blocking::get(server.url("/v1/models")).unwrap().json().unwrap();
    v["data"][0]["id"].as_str().unwrap().to_string()
}

/// A strict check of the Prometheus text exposition format (names may hold
/// colons, as vLLM's do); returns the sample lines.
fn check_exposition(text: &str) -> Vec<&str> {
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    };
    let value_ok = |v: &str| v.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&v);
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(name_ok(rest.split(' ').next().unwrap()), "{line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let parts: Vec<&str> = rest.split(' ').collect();
            assert!(parts.len() == 2 && name_ok(parts[0]), "{line}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&parts[1]), "{line}");
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            assert!(value_ok(value), "{line}");
            let name = match series.split_once('{') {
                Some((n, labels)) => {
                    let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                    for kv in labels.split(',') {
                        let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{line}"));
                        assert!(name_ok(k) && !k.contains(':'), "{line}");
                        assert!(v.len() >= 2 && v.starts_with('"') && v.ends_with('"'), "{line}");
                    }
                    n
                }
                None => series,
            };
            assert!(name_ok(name), "{line}");
            samples.push(line);
        }
    }
    samples
}

/// Parse `/metrics` with prometheus-parse. Its name pattern is `\w+`, which
/// drops every name with a colon (legal in the format, and all of vLLM's),
/// so `vllm:` becomes `vllm_` first; the strict check above covers the rest.
fn scrape(text: &str) -> Scrape {
    let samples = check_exposition(text);
    let mapped = text.replace("vllm:", "vllm_");
    let s = Scrape::parse(mapped.lines().map(|l| Ok(l.to_string()))).expect("the page parses");
    // Every sample line is accounted for: plain samples one each, histogram buckets grouped.
    let buckets: usize = s.samples.iter().map(|x| if let Value::Histogram(h) = &x.value { h.len() } else { 1 }).sum();
    assert_eq!(buckets, samples.len(), "prometheus-parse dropped sample lines");
    s
}

fn scalar(s: &Scrape, name: &str) -> f64 {
    one_scalar(s, name, |_| true)
}

/// The one sample of `name` whose label `key` is `value`.
fn scalar_where(s: &Scrape, name: &str, key: &str, value: &str) -> f64 {
    one_scalar(s, name, |x| x.labels.get(key) == Some(value))
}

fn one_scalar(s: &Scrape, name: &str, keep: impl Fn(&prometheus_parse::Sample) -> bool) -> f64 {
    let hits: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && keep(x))
        .map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{name} is not a scalar"),
        })
        .collect();
    assert_eq!(hits.len(), 1, "{name}: {hits:?}");
    hits[0]
}

fn histogram<'a>(s: &'a Scrape, name: &str) -> &'a [prometheus_parse::HistogramCount] {
    match s.samples.iter().find(|x| x.metric == name).map(|x| &x.value) {
        Some(Value::Histogram(h)) => h,
        other => panic!("{name}: {other:?}"),
    }
}

fn metrics(server: &Server) -> Scrape {
    scrape(&reqwest::blocking::get(server.url("/metrics")).unwrap().text().unwrap())
}

#[test]
fn holds_256_concurrent_streams_and_its_histograms_agree_with_the_clients() {
    let _t = timed();
    let server = Server::start(&[]);
    let model = model_of(&server);
    const N: usize = 256;
    const PROMPT: u32 = 200;
    const OUT: u32 = 64;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let timings: Vec<StreamTiming> = rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(N).build().unwrap();
        // Open the connections first, so that the clocks below time the engine, not TCP handshakes.
        let warm = (0..N).map(|_| client.get(format!("{}/health", server.base)).send());
        for r in futures::future::join_all(warm).await {
            assert!(r.unwrap().status().is_success());
        }
        let reqs = (0..N).map(|_| stream_completion(&client, &server.base, &model, PROMPT, OUT));
        futures::future::join_all(reqs).await.into_iter().map(|r| r.expect("every stream succeeds")).collect()
    });
    assert_eq!(timings.len(), N);
    for t in &timings {
        assert_eq!(t.tokens, OUT);
        assert_eq!(t.gaps.len(), OUT as usize - 1);
    }
    let s = metrics(&server);
    let n = N as f64;
    assert_eq!(scalar(&s, "vllm_time_to_first_token_seconds_count"), n);
    assert_eq!(scalar(&s, "vllm_inter_token_latency_seconds_count"), n * f64::from(OUT - 1));
    assert_eq!(scalar(&s, "vllm_e2e_request_latency_seconds_count"), n);
    assert_eq!(scalar(&s, "vllm_generation_tokens_total"), n * f64::from(OUT));
    assert_eq!(scalar(&s, "vllm_prompt_tokens_total"), n * f64::from(PROMPT));
    assert_eq!(scalar_where(&s, "vllm_request_success_total", "finished_reason", "length"), n);
    assert_eq!(scalar_where(&s, "vllm_request_success_total", "finished_reason", "abort"), 0.0);
    assert_eq!(scalar(&s, "vllm_num_requests_running"), 0.0);
    assert_eq!(scalar(&s, "vllm_num_requests_waiting"), 0.0);
    // Means: the server's histogram sums against what the clients timed.
    let client_ttft: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64()).collect();
    let client_ttft_mean = client_ttft.iter().sum::<f64>() / n;
    let server_ttft_mean = scalar(&s, "vllm_time_to_first_token_seconds_sum") / n;
    let gaps: Vec<f64> = timings.iter().flat_map(|t| t.gaps.iter().map(Duration::as_secs_f64)).collect();
    let client_gap_mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let server_gap_mean =
        scalar(&s, "vllm_inter_token_latency_seconds_sum") / scalar(&s, "vllm_inter_token_latency_seconds_count");
    eprintln!(
        "mean TTFT: clients {client_ttft_mean:.4} s, /metrics {server_ttft_mean:.4} s ({:+.1}%); \
         mean gap: clients {client_gap_mean:.5} s, /metrics {server_gap_mean:.5} s ({:+.1}%)",
        100.0 * (server_ttft_mean / client_ttft_mean - 1.0),
        100.0 * (server_gap_mean / client_gap_mean - 1.0)
    );
    assert!((server_ttft_mean / client_ttft_mean - 1.0).abs() <= 0.10);
    assert!((server_gap_mean / client_gap_mean - 1.0).abs() <= 0.05);
    // The TTFT histogram's CDF against the clients' empirical CDF at every bucket bound.
    let mut worst = 0.0f64;
    for b in histogram(&s, "vllm_time_to_first_token_seconds") {
        let server_cdf = b.count / n;
        let client_cdf = client_ttft.iter().filter(|&&x| x <= b.less_than).count() as f64 / n;
        assert!(
            (server_cdf - client_cdf).abs() <= 0.05,
            "TTFT ≤ {} s: /metrics {server_cdf:.3}, clients {client_cdf:.3}",
            b.less_than
        );
        worst = worst.max((server_cdf - client_cdf).abs());
    }
    eprintln!("TTFT CDF: largest gap between /metrics and the clients {worst:.3}");
    let e2e = histogram(&s, "vllm_e2e_request_latency_seconds");
    assert_eq!(e2e.last().unwrap().count, n);
    assert!(e2e.windows(2).all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count));
}

async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    resp.bytes_stream().eventsource().map(|e| e.expect("a well-formed event stream").data).collect().await
}

#[test]
fn openai_answers_and_errors() {
    let server = Server::start(&[]);
    let model = model_of(&server);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        // Chat, streamed: role first, one content delta per token, `length`, then [DONE].
        let body = serde_json::json!({
            "model": model, "stream": true, "max_tokens": 5,
            "messages": [{"role": "user", "content": "say five words please"}],
            "stream_options": {"include_usage": true},
        });
        let resp = client.post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let events = sse_events(resp).await;
        assert_eq!(events.last().unwrap(), "[DONE]", "{events:?}");
        let chunks: Vec<serde_json::Value> =
            events[..events.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let deltas: Vec<&serde_json::Value> =
            chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].is_string()).collect();
        assert_eq!(deltas.len(), 5, "{chunks:#?}");
        assert_eq!(deltas[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["model"] == model.as_str()));
        let finish: Vec<&serde_json::Value> =
            chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
        assert_eq!(finish.len(), 1);
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], 5, "{usage}");

        // A whole completion with usage; the prompt's length is its BPE token count (a word each here).
        let body = serde_json::json!({"model": model, "prompt": "one two three four", "max_tokens": 7});
        let resp = client.post(server.url("/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap().split_whitespace().count(), 7);
        assert_eq!(v["usage"], serde_json::json!({"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}));
        // An explicit token count: the ids.
        let body = serde_json::json!({"prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9], "max_tokens": 2});
        let v: serde_json::Value =
            client.post(server.url("/v1/completions")).json(&body).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 9);

        // Bad bodies: 400 or 404 with an OpenAI-style error naming the problem.
        let bad: [(&str, reqwest::RequestBuilder, u16, &str); 6] = [
            (
                "invalid JSON",
                client
                    .post(server.url("/v1/completions"))
                    .header("content-type", "application/json")
                    .body("{\"prompt\": \"hi\",\n \"max_tokens\": }"),
                400,
                "line 2 column",
            ),
            (
                "max_tokens 0",
                client.post(server.url("/v1/completions")).json(&serde_json::json!({"prompt": "hi", "max_tokens": 0})),
                400,
                "`max_tokens` must be a whole number from 1 to 1000000, got 0",
            ),
            (
                "prompt of the wrong type",
                client.post(server.url("/v1/completions")).json(&serde_json::json!({"prompt": {"text": "hi"}})),
                400,
                "`prompt` must be a string",
            ),
            (
                "no prompt",
                client.post(server.url("/v1/completions")).json(&serde_json::json!({"max_tokens": 3})),
                400,
                "the body needs `prompt`",
            ),
            (
                "messages not an array",
                client.post(server.url("/v1/chat/completions")).json(&serde_json::json!({"messages": "hi"})),
                400,
                "`messages` must be an array",
            ),
            (
                "unknown model",
                client
                    .post(server.url("/v1/chat/completions"))
                    .json(&serde_json::json!({"model": "gpt-nope", "messages": [{"role": "user", "content": "hi"}]})),
                404,
                "model `gpt-nope` does not exist",
            ),
        ];
        for (what, req, status, says) in bad {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), status, "{what}");
            let v: serde_json::Value = resp.json().await.unwrap();
            let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{what}: {v}"));
            assert!(msg.contains(says), "{what}: `{msg}` should say `{says}`");
        }
    });
    // The failures were never counted as requests.
    let s = metrics(&server);
    assert_eq!(scalar_where(&s, "vllm_request_success_total", "finished_reason", "length"), 3.0);
    assert_eq!(scalar_where(&s, "vllm_request_success_total", "finished_reason", "abort"), 0.0);
    assert_eq!(scalar(&s, "vllm_generation_tokens_total"), 14.0);
}

fn clock_state(server: &Server) -> TwinClockState {
    reqwest::blocking::get(server.url("/admin/clock")).unwrap().json().unwrap()
}

fn clock_gauges(server: &Server) -> Vec<f64> {
    let s = metrics(server);
    let mut g: Vec<(u32, f64)> = s
        .samples
        .iter()
        .filter(|x| x.metric == "dynamollm_twin_gpu_sm_clock_mhz")
        .map(|x| match x.value {
            Value::Gauge(v) => (x.labels.get("gpu").unwrap().parse().unwrap(), v),
            _ => panic!("not a gauge"),
        })
        .collect();
    g.sort_by_key(|p| p.0);
    assert_eq!(g.iter().map(|p| p.0).collect::<Vec<_>>(), (0..g.len() as u32).collect::<Vec<_>>());
    g.into_iter().map(|p| p.1).collect()
}

#[test]
fn clock_admin_and_the_fake_gpu_device() {
    let server = Server::start(&["--tp", "4", "--clock-mhz", "1800"]);
    let client = reqwest::blocking::Client::new();
    let state = clock_state(&server);
    assert_eq!((state.gpus, state.clock_mhz, state.default_clock_mhz), (4, 1800, 1800));
    assert!(state.supported_clocks_mhz.contains(&1400));
    let r = client.post(server.url("/admin/clock")).json(&serde_json::json!({"clock_mhz": 1400})).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<TwinClockState>().unwrap().clock_mhz, 1400);
    assert_eq!(clock_state(&server).clock_mhz, 1400);
    assert_eq!(clock_gauges(&server), vec![1400.0; 4]);
    for bad in [serde_json::json!({"clock_mhz": 1234}), serde_json::json!({"clock": 1400})] {
        let r = client.post(server.url("/admin/clock")).json(&bad).send().unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let v: serde_json::Value = r.json().unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    assert_eq!(clock_state(&server).clock_mhz, 1400);
    let r = client.post(server.url("/admin/clock")).json(&serde_json::json!({"reset": true})).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(clock_state(&server).clock_mhz, 1800);
    assert_eq!(clock_gauges(&server), vec![1800.0; 4]);

    // The fake NVML device over the same endpoints (a blocking client: a plain thread is fine).
    let dev = TwinDevice::new(&server.base).unwrap();
    assert_eq!(dev.count().unwrap(), 4);
    assert_eq!(dev.supported_sm_clocks_mhz(3).unwrap(), state.supported_clocks_mhz);
    assert!(matches!(dev.supported_sm_clocks_mhz(4), Err(GpuError::NoSuchGpu { index: 4, count: 4 })));
    let e0: Vec<u64> = (0..4).map(|g| dev.energy_mj(g).unwrap()).collect();
    let idle_w = dev.power_w(0).unwrap();
    assert!(idle_w > 0.0);
    // Work raises every GPU's energy counter.
    let body = serde_json::json!({"prompt": "a b c", "max_tokens": 32});
    assert_eq!(client.post(server.url("/v1/completions")).json(&body).send().unwrap().status(), 200);
    let e1: Vec<u64> = (0..4).map(|g| dev.energy_mj(g).unwrap()).collect();
    for g in 0..4 {
        assert!(e1[g] > e0[g], "GPU {g}: {} → {}", e0[g], e1[g]);
    }
    let e = dev.energy_mj(7).unwrap_err();
    assert!(e.to_string().contains("gpu=\"7\""), "{e}");
    dev.set_locked_clocks(2, 1200, 1200).unwrap();
    assert_eq!(dev.sm_clock_mhz(0).unwrap(), 1200);
    assert_eq!(clock_state(&server).clock_mhz, 1200);
    let e = dev.set_locked_clocks(0, 2500, 2500).unwrap_err();
    assert!(matches!(e, GpuError::ClockOutOfRange { clock_mhz: 2500, .. }), "{e}");
    assert!(matches!(dev.set_locked_clocks(5, 1400, 1400), Err(GpuError::NoSuchGpu { index: 5, count: 4 })));
    assert_eq!(dev.sm_clock_mhz(1).unwrap(), 1200);
    dev.reset_locked_clocks(0).unwrap();
    assert_eq!(dev.sm_clock_mhz(3).unwrap(), 1800);
    let e2 = dev.energy_mj(0).unwrap();
    assert!(e2 >= e1[0]);
}

fn row(t: &ProfileTable, clock: u32) -> &ProfileRow {
    let hits: Vec<&ProfileRow> = t.rows.iter().filter(|r| r.clock_mhz == clock).collect();
    assert_eq!(hits.len(), 1, "{:?}", t.rows);
    hits[0]
}

fn run_profile(args: &[&str], out: &Path) {
    let o = Command::new(BIN)
        .arg("profile")
        .args(args)
        .args(["--quiet", "--out", out.to_str().unwrap()])
        .output()
        .expect("the binary runs");
    assert!(o.status.success(), "profile {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("twin_serve").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn profiling_over_http_matches_the_virtual_time_sweep() {
    let _t = timed();
    // Start at a clock the profile does not use, so that restoring it is visible.
    let server = Server::start(&["--tp", "8", "--clock-mhz", "1600"]);
    let dir = scratch("http");
    let (http, twin) = (dir.join("http.csv"), dir.join("twin.csv"));
    let common = ["--tp", "8", "--classes", "SS", "--clocks", "1400,1980", "--loads", "8", "--window-s", "40"];
    let mut args = vec!["--target", server.base.as_str(), "--gpu", "twin"];
    args.extend(common);
    run_profile(&args, &http);
    let mut args = vec!["--target", "twin", "--min-requests", "1"];
    args.extend(common);
    run_profile(&args, &twin);
    let (a, b) = (ProfileTable::load(&http).unwrap(), ProfileTable::load(&twin).unwrap());
    assert_eq!((a.rows.len(), b.rows.len()), (2, 2));
    assert!(a.meta["engine"].contains(&server.base), "{:?}", a.meta);
    for clock in [1400, 1980] {
        let (h, v) = (row(&a, clock), row(&b, clock));
        assert_eq!(h.load_rps, 8.0);
        let pairs = [
            ("energy_per_req_j", h.energy_per_req_j, v.energy_per_req_j),
            ("power_per_gpu_w", h.power_per_gpu_w, v.power_per_gpu_w),
            ("ttft_p50_s", h.ttft_p50_s, v.ttft_p50_s),
            ("ttft_p99_s", h.ttft_p99_s, v.ttft_p99_s),
            ("tbt_p50_s", h.tbt_p50_s, v.tbt_p50_s),
            ("tbt_p99_s", h.tbt_p99_s, v.tbt_p99_s),
        ];
        let shown: Vec<String> = pairs.iter().map(|(n, x, y)| format!("{n} {:.3}", x / y)).collect();
        eprintln!("{clock} MHz, HTTP / virtual: {}; requests {} / {}", shown.join(", "), h.requests, v.requests);
        // The very same request sequence: the same count finished.
        assert_eq!(h.requests, v.requests, "{clock} MHz");
        for (name, x, y) in pairs {
            // Over HTTP a first token also crosses the loopback and the
            // scheduler of a busy machine: a few milliseconds more, whatever
            // the TTFT, on top of the 10%. So does every token, and the TBT
            // P99 is where the worst of that lands (a fresh-clone CI run on
            // 2 cores read 26.7 ms against 22.3 ms at 1400 MHz).
            let slack_s = if name.starts_with("ttft") || name == "tbt_p99_s" { 0.005 } else { 0.0 };
            assert!((x - y).abs() <= 0.10 * y + slack_s, "{clock} MHz {name}: HTTP {x} vs virtual {y}");
        }
    }
    // The profiler put the clock back.
    let state = clock_state(&server);
    assert_eq!((state.clock_mhz, state.default_clock_mhz), (1600, 1600));
}

/// Profiling a sped-up twin would measure energy per wall second (at
/// `--speed 10`, 1,039 W per GPU, above the H100's 700 W) and latencies ten
/// times too short: the profiler refuses it, naming the speed, and the twin
/// says its speed and its GPUs' power limit.
#[test]
fn the_profiler_refuses_a_sped_up_engine_naming_its_speed() {
    let _t = timed();
    let server = Server::start(&["--tp", "8", "--speed", "10"]);
    let state = clock_state(&server);
    assert_eq!((state.speed, state.power_limit_w), (Some(10.0), Some(700.0)));
    let dir = scratch("sped-up");
    let out = dir.join("p.csv");
    let o = Command::new(BIN)
        .args(["profile", "--target", server.base.as_str(), "--gpu", "twin", "--tp", "8", "--classes", "SS"])
        .args(["--clocks", "1980", "--loads", "2", "--window-s", "5", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a profile of a 10× engine was written");
    assert!(err.contains("10×") && err.contains("--speed 1"), "{err}");
    assert!(!out.exists());
}

/// The telemetry crate's engine scrape reads `twin serve` as it would read
/// vLLM: the page parses without errors, counters move by what was sent, and
/// the TTFT quantile from the bucket deltas between two scrapes lands in the
/// bucket of what the clients measured.
#[test]
fn the_engine_scrape_reads_twin_serve() {
    use telemetry::scrape::{parse_engine_page, EngineKind};
    let _t = timed();
    let server = Server::start(&[]);
    let model = model_of(&server);
    let page = |what: &str| {
        let text = reqwest::blocking::get(server.url("/metrics")).unwrap().text().unwrap();
        parse_engine_page(&text, what).expect("the page has engine metrics")
    };
    let a = page("before");
    assert_eq!(a.kind, EngineKind::Vllm);
    assert!(a.errors.is_empty(), "{:?}", a.errors);
    let ma = a.models.get(&model).expect("metrics labelled with the model").clone();
    const N: usize = 32;
    const PROMPT: u32 = 300;
    const OUT: u32 = 32;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let timings: Vec<StreamTiming> = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut out = Vec::new();
        // Sequential bursts of 4, so TTFTs spread over a few buckets.
        for _ in 0..N / 4 {
            let reqs = (0..4).map(|_| stream_completion(&client, &server.base, &model, PROMPT, OUT));
            for r in futures::future::join_all(reqs).await {
                out.push(r.expect("the stream succeeds"));
            }
        }
        out
    });
    let b = page("after");
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    let mb = b.models.get(&model).unwrap();
    let n = N as f64;
    assert_eq!(mb.prompt_tokens_total.unwrap() - ma.prompt_tokens_total.unwrap(), n * f64::from(PROMPT));
    assert_eq!(mb.generation_tokens_total.unwrap() - ma.generation_tokens_total.unwrap(), n * f64::from(OUT));
    assert_eq!(mb.running, Some(0.0));
    assert_eq!(mb.waiting, Some(0.0));
    let ttft = mb.ttft.as_ref().unwrap().delta(ma.ttft.as_ref().unwrap());
    assert_eq!(ttft.count, n);
    let tbt = mb.tbt.as_ref().unwrap().delta(ma.tbt.as_ref().unwrap());
    assert_eq!(tbt.count, n * f64::from(OUT - 1));
    let mut client: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64()).collect();
    client.sort_by(f64::total_cmp);
    let median = client[N / 2];
    let est = ttft.quantile(0.5).unwrap();
    // The buckets holding the clients' median, allowing the clients up to 5 ms of HTTP
    // on top of the engine's time: the estimate must interpolate inside them.
    let upper = ttft.buckets.iter().map(|b| b.le_s).find(|&le| le >= median).unwrap();
    let lower = ttft.buckets.iter().map(|b| b.le_s).filter(|&le| le < median - 0.005).fold(0.0, f64::max);
    eprintln!("TTFT median: clients {median:.4} s, from /metrics bucket deltas {est:.4} s (bucket {lower}–{upper} s)");
    assert!(est >= lower && est <= upper, "estimate {est} outside the clients' buckets {lower}–{upper}");
    let client_gap_mean: f64 =
        timings.iter().flat_map(|t| t.gaps.iter().map(Duration::as_secs_f64)).sum::<f64>() / (n * f64::from(OUT - 1));
    assert!((tbt.sum_s / tbt.count / client_gap_mean - 1.0).abs() < 0.05);
}

/// A client that goes away mid-stream gets its request aborted, as vLLM
/// aborts a request whose connection closes: it stops running (its KV and
/// its share of the step are free again), it counts as `abort`, no more of
/// its tokens are made, and the engine serves the next request to its end.
#[test]
fn a_stream_whose_client_leaves_is_aborted_while_decoding() {
    let server = Server::start(&[]);
    let model = model_of(&server);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let body = serde_json::json!({
            "model": model, "stream": true, "max_tokens": 4000, "prompt": "tell me a very long story",
        });
        let resp = client.post(server.url("/v1/completions")).json(&body).send().await.unwrap();
        assert!(resp.status().is_success());
        let mut events = resp.bytes_stream().eventsource();
        for _ in 0..5 {
            events.next().await.expect("a token event").expect("a well-formed event");
        }
        drop(events);
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            let s = scrape(&client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap());
            if scalar(&s, "vllm_num_requests_running") == 0.0 {
                break s;
            }
            assert!(Instant::now() < deadline, "the abandoned stream still runs after 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(scalar_where(&s, "vllm_request_success_total", "finished_reason", "abort"), 1.0);
        assert_eq!(scalar_where(&s, "vllm_request_success_total", "finished_reason", "length"), 0.0);
        let made = scalar(&s, "vllm_generation_tokens_total");
        // At about 12 ms a token, 4000 tokens take 48 s: the abort came long before.
        assert!((5.0..2000.0).contains(&made), "{made} tokens made for the abandoned stream");
        // The engine goes on: the next request is served whole, and no more of the first one's tokens come.
        let body = serde_json::json!({ "model": model, "max_tokens": 8, "prompt": "and a short one" });
        let answer: serde_json::Value =
            client.post(server.url("/v1/completions")).json(&body).send().await.unwrap().json().await.unwrap();
        assert_eq!(answer["usage"]["completion_tokens"], 8, "{answer}");
        let s = scrape(&client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap());
        assert_eq!(scalar(&s, "vllm_generation_tokens_total"), made + 8.0);
        assert_eq!(scalar_where(&s, "vllm_request_success_total", "finished_reason", "length"), 1.0);
    });
}
