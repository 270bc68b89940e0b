//! `dynamollm assess` on a real Prometheus's history: `twin serve` engines in
//! a static layout (4 × TP8 at the top clock, what `sim --policy single-pool`
//! sizes for it) serve the bundled Conversation hour
//! (Azure LLM inference trace 2023, CC-BY 4.0; see `data/README.md`) at 20×
//! real time while Debian's Prometheus scrapes them every second; `assess`
//! then reads that hour back from Prometheus alone (request counts, the
//! prompt and output length histograms, the engines, the GPUs' energy
//! counters and clocks), replays it in the twin under the same static layout
//! and under dynamollm, and writes its report. The fleet's measured energy
//! and the twin's replay of its layout agree within 5%; the report opens in
//! headless Chromium with no console error.

mod prom_support;

use dashboards::browser::{check_page, chromium_from_env};
use prom_support::Prometheus;
use serde_json::Value;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SPEED: f64 = 20.0;
/// What `sim --policy single-pool` sizes for the hour: 4 × TP8 at the top clock.
const ENGINES: usize = 4;

/// A twin engine: TP8 at the top clock, `SPEED`× real time; its base URL.
async fn engine() -> String {
    let cfg = dynamollm::twin_serve::ServeConfig {
        physics: sim::Physics::default_h100_llama70b(),
        tp: 8,
        clock_mhz: 1980,
        speed: SPEED,
        model: "llama2-70b".into(),
        slo: None,
        api_key: None,
    };
    let app = dynamollm::twin_serve::router(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Replay the bundled hour at `SPEED`× against the engines, each request to the
/// engine with the fewest in flight, every answer read; the requests sent.
async fn replay(engines: &[String]) -> usize {
    let requests: Vec<telemetry::Request> =
        sim::Workload::bundled_conversation(1).arrivals().unwrap().collect::<Result<_, _>>().unwrap();
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
    let in_flight: Arc<Vec<AtomicU32>> = Arc::new(engines.iter().map(|_| AtomicU32::new(0)).collect());
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for r in &requests {
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(r.arrival_s / SPEED)).await;
        let k = (0..engines.len()).min_by_key(|&k| in_flight[k].load(Ordering::SeqCst)).unwrap();
        in_flight[k].fetch_add(1, Ordering::SeqCst);
        let (http, url, in_flight) = (http.clone(), format!("{}/v1/completions", engines[k]), in_flight.clone());
        let body = serde_json::json!({
            "model": "llama2-70b",
            "prompt": dynamollm::loadgen::prompt_ids(r.input_tokens),
            "max_tokens": r.output_tokens.max(1),
            "min_tokens": r.output_tokens.max(1),
            "ignore_eos": true,
        });
        tasks.push(tokio::spawn(async move {
            let resp = http.post(&url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let _ = resp.bytes().await.unwrap();
            in_flight[k].fetch_sub(1, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    requests.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assess_reads_an_hour_from_prometheus_and_replays_it_within_five_percent() {
    let dir = tempfile::tempdir().unwrap();
    let mut engines = Vec::new();
    for _ in 0..ENGINES {
        engines.push(engine().await);
    }
    let targets: Vec<String> = engines.iter().map(|e| e.trim_start_matches("http://").to_string()).collect();
    let mut prom = Prometheus::start(dir.path(), &targets);
    let http = reqwest::Client::new();
    prom.wait_up(&http, ENGINES).await;
    // The window opens on an idle fleet: its first scrapes (1 s apart) come before the first answer,
    // as an operator's window opens before the traffic it assesses (at 0 s one run lost the two
    // requests that finished before the first scrape inside it).
    let from = unix_now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let wall = Instant::now();
    let sent = replay(&engines).await;
    // The engines idle after the last answer long enough for a scrape (1 s apart) to see its counters
    // even on a busy machine (at 1 s one run lost the last request's increment), then two scrapes more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let to = unix_now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("replayed {sent} requests in {:.1} s wall", wall.elapsed().as_secs_f64());

    let json = dir.path().join("assess.json");
    let html = dir.path().join("assess.html");
    let exe = env!("CARGO_BIN_EXE_dynamollm");
    let args = [
        "assess".to_string(),
        "--prometheus".into(),
        prom.base.clone(),
        "--from".into(),
        format!("{from:.3}"),
        "--to".into(),
        format!("{to:.3}"),
        "--selector".into(),
        "job=\"engines\"".into(),
        "--speed".into(),
        SPEED.to_string(),
        "--json".into(),
        json.display().to_string(),
        "--report".into(),
        html.display().to_string(),
        "--quiet".into(),
    ];
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(exe).args(&args).output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), prom.log());
    eprintln!("{stdout}");
    let a: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    // The fleet as Prometheus saw it: every request, the layout it ran.
    assert_eq!(a["requests"].as_f64().unwrap().round() as usize, sent, "{a:#}");
    assert_eq!(a["layout"]["instances"], ENGINES as u64);
    assert_eq!(a["layout"]["tp"], 8);
    assert_eq!(a["layout"]["clock_mhz"], 1980);
    assert_eq!(a["gpus_seen"], 8 * ENGINES as u64);
    assert_eq!(a["gpu_source"], "twin");
    // The drawn lengths keep the measured means (the open top bucket is fitted to the sum).
    for k in ["prompt_tokens_mean", "output_tokens_mean"] {
        let (m, d) = (a[k][0].as_f64().unwrap(), a[k][1].as_f64().unwrap());
        assert!((d / m - 1.0).abs() < 0.05, "{k}: measured {m}, drawn {d}");
    }
    // The twin replays the fleet's own layout within 5% of its measured energy.
    let ratio = a["static_replay_ratio"].as_f64().unwrap();
    assert!((0.95..=1.05).contains(&ratio), "static replay / measured = {ratio}\n{stdout}");
    let measured = a["measured_energy_kwh"].as_f64().unwrap();
    assert!(measured > 0.0);
    // dynamollm's estimate stands beside it, below the static layout's energy.
    let d = a["dynamollm_vs_static_replay"].as_f64().unwrap();
    assert!(d < 1.0, "dynamollm / static replay = {d}");
    assert!(a["assumptions"].as_array().unwrap().len() >= 4);

    // The report opens in Chromium with no console error, its figures the JSON's.
    let png = dir.path().join("assess.png");
    let url = format!("file://{}", html.display());
    let c = tokio::task::spawn_blocking(move || check_page(&chromium_from_env(), &url, &png).unwrap()).await.unwrap();
    assert!(
        c.console_errors.is_empty() && c.network_errors.is_empty(),
        "{:?} {:?}",
        c.console_errors,
        c.network_errors
    );
    for run in ["measured", "static-replay", "dynamollm"] {
        assert!(c.dom.contains(&format!("id=\"energy-kwh-{run}\"")), "{run} is not in the report");
    }
    // One number, one computation: the report's measured energy is the JSON's.
    let at = c.dom.find("id=\"energy-kwh-measured\"").unwrap();
    let shown: f64 = c.dom[at..].split_once("data-value=\"").unwrap().1.split_once('"').unwrap().0.parse().unwrap();
    assert!((shown / measured - 1.0).abs() < 1e-9, "report {shown} kWh, JSON {measured} kWh");
}
