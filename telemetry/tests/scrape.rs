//! Engine scrape: vLLM and SGLang pages (fixtures in `tests/fixtures/`), a
//! malformed page, and the async collector over loopback HTTP with a page that
//! changes between scrapes, so the TTFT/TBT percentiles come from the
//! histogram bucket deltas.

use axum::routing::get;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use telemetry::sample::{Sample, Tags};
use telemetry::scrape::{parse_engine_page, EngineKind, EngineTracker, ScrapeCollector, ScrapeError};

const VLLM_A: &str = include_str!("fixtures/vllm_a.txt");
const VLLM_B: &str = include_str!("fixtures/vllm_b.txt");
const VLLM_BAD: &str = include_str!("fixtures/vllm_malformed.txt");
const SGLANG: &str = include_str!("fixtures/sglang.txt");
const MODEL: &str = "meta-llama/Llama-2-70b-hf";

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn vllm_page_gives_gauges_counters_and_histograms() {
    let p = parse_engine_page(VLLM_A, "vllm_a.txt").unwrap();
    assert_eq!(p.kind, EngineKind::Vllm);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let m = &p.models[MODEL];
    assert_eq!((m.running, m.waiting, m.kv_usage), (Some(12.0), Some(3.0), Some(0.42)));
    assert_eq!((m.prompt_tokens_total, m.generation_tokens_total), (Some(123456.0), Some(654321.0)));
    let ttft = m.ttft.as_ref().unwrap();
    assert_eq!((ttft.count, ttft.sum_s), (30.0, 7.5));
    // Eight finite bounds and +Inf; `_created` lines are not buckets.
    assert_eq!(ttft.buckets.len(), 9);
    assert_eq!(ttft.buckets.last().unwrap().le_s, f64::INFINITY);
    assert!(m.tbt.is_some() && m.e2e.is_some());
}

#[test]
fn percentiles_come_from_bucket_deltas_between_pages() {
    let a = parse_engine_page(VLLM_A, "a").unwrap();
    let b = parse_engine_page(VLLM_B, "b").unwrap();
    let mut t = EngineTracker::new();
    let tags = Tags { instance: Some("i0".into()), ..Tags::node("s", "n") };
    let first = t.observe(&a, 1000, &tags);
    assert_eq!(first.len(), 1);
    assert!(first[0].ttft.is_none(), "one page has no interval");
    assert_eq!(first[0].tags.model.as_deref(), Some(MODEL));
    let s = &t.observe(&b, 2000, &tags)[0];
    // TTFT: the 10 new requests all fell in (0.25, 0.5] (bucket 0.5 went 30 → 40),
    // so the q-quantile is 0.25 + 0.25 × q.
    let ttft = s.ttft.unwrap();
    assert_eq!((ttft.count, ttft.sum_s), (10.0, 3.75));
    assert!(close(ttft.p50_s, 0.25 + 0.25 * 0.5));
    assert!(close(ttft.p90_s, 0.25 + 0.25 * 0.9));
    assert!(close(ttft.p99_s, 0.25 + 0.25 * 0.99));
    // TBT: 100 new gaps in (0.01, 0.025] and 100 in (0.025, 0.05].
    // p50 = rank 100 = top of the first; p90 = rank 180 = 80/100 into the second.
    let tbt = s.tbt.unwrap();
    assert_eq!(tbt.count, 200.0);
    assert!(close(tbt.p50_s, 0.025));
    assert!(close(tbt.p90_s, 0.025 + 0.025 * 0.8));
    assert!(close(tbt.p99_s, 0.025 + 0.025 * 0.98));
    assert_eq!((s.running, s.waiting, s.kv_usage), (Some(14.0), Some(5.0), Some(0.57)));
    // The engine restarts: counts drop, so page A after B is all new.
    let after_reset = &t.observe(&a, 3000, &tags)[0];
    assert_eq!(after_reset.ttft.unwrap().count, 30.0);
}

#[test]
fn sglang_page_uses_sglang_names() {
    let p = parse_engine_page(SGLANG, "sglang.txt").unwrap();
    assert_eq!(p.kind, EngineKind::Sglang);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let m = &p.models["meta-llama/Llama-3.1-8B-Instruct"];
    assert_eq!((m.running, m.waiting, m.kv_usage), (Some(58.0), Some(7.0), Some(0.28)));
    assert_eq!((m.prompt_tokens_total, m.generation_tokens_total), (Some(8128902.0), Some(7557572.0)));
    let ttft = m.ttft.as_ref().unwrap();
    assert_eq!(ttft.count, 60.0);
    // 10 ≤ 0.1, 20 in (0.1, 0.2], 20 in (0.2, 0.4], 10 in (0.4, 0.6]: the median
    // (rank 30) is the top of (0.1, 0.2].
    assert!(close(ttft.quantile(0.5).unwrap(), 0.2));
    assert_eq!(m.tbt.as_ref().unwrap().count, 1000.0);
    // Older SGLang calls TBT time_per_output_token.
    let old = "sglang:time_per_output_token_seconds_bucket{le=\"0.01\",model_name=\"m\"} 4\n\
               sglang:time_per_output_token_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 4\n\
               sglang:time_per_output_token_seconds_count{model_name=\"m\"} 4\n";
    let p = parse_engine_page(old, "old").unwrap();
    assert_eq!(p.models["m"].tbt.as_ref().unwrap().count, 4.0);
}

#[test]
fn malformed_lines_are_named_counted_and_spare_the_rest() {
    let p = parse_engine_page(VLLM_BAD, "http://x/metrics").unwrap();
    let lines: Vec<usize> = p
        .errors
        .iter()
        .map(|e| match e {
            ScrapeError::Line { line, .. } => *line,
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(lines, [12, 15, 31]);
    assert!(p.errors[1].to_string().starts_with("metrics page http://x/metrics line 15: byte "), "{}", p.errors[1]);
    assert!(p.errors[1].to_string().contains("\"forty-two\" is not a number"));
    let m = &p.models[MODEL];
    // The good lines around the bad ones are all there.
    assert_eq!(m.running, Some(12.0));
    assert_eq!(m.waiting, None);
    assert_eq!(m.kv_usage, None);
    assert_eq!(m.prompt_tokens_total, Some(123456.0));
    assert_eq!(m.ttft.as_ref().unwrap().count, 30.0);
    assert_eq!(m.ttft.as_ref().unwrap().buckets.len(), 8, "only the cut bucket is missing");
    // A page with no engine metric at all (an HTML error page) is an error.
    let e = parse_engine_page("<html>502 Bad Gateway</html>\n", "http://x/metrics").unwrap_err();
    assert!(e.to_string().starts_with("metrics page http://x/metrics: no vLLM or SGLang metrics in 1 lines"), "{e}");
}

#[tokio::test]
async fn collector_scrapes_over_http_and_survives_bad_pages() {
    // The page served: A, then a broken one, then B; an HTTP 500 in between.
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let n = h.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => (axum::http::StatusCode::OK, VLLM_A.to_string()),
                    1 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom".to_string()),
                    2 => (axum::http::StatusCode::OK, "garbage {{{\n".to_string()),
                    _ => (axum::http::StatusCode::OK, VLLM_B.to_string()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let url = format!("http://{addr}/metrics");
    let tags = Tags { instance: Some("i0".into()), ..Tags::default() };
    let c = ScrapeCollector::spawn(&url, Duration::from_millis(20), Duration::from_secs(2), tags, tx).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    let (Sample::Engine(a), Sample::Engine(b)) = (first, second) else { panic!("engine samples expected") };
    assert!(a.ttft.is_none());
    assert_eq!(a.running, Some(12.0));
    // Percentiles from the A → B deltas, fetched over HTTP.
    let ttft = b.ttft.unwrap();
    assert_eq!(ttft.count, 10.0);
    assert!(close(ttft.p50_s, 0.375));
    assert_eq!(b.tags.instance.as_deref(), Some("i0"));
    // The 500 and the garbage page were counted, and the collector went on.
    assert_eq!(c.stats.errors(), 2);
    assert!(c.stats.last_error().unwrap().contains(&url));
    assert!(!c.is_finished());
}
