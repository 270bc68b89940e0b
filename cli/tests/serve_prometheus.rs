//! Prometheus as a telemetry source: two `twin serve` engines on loopback, a
//! real Prometheus (Debian's, started here with its own config and data
//! directory) scraping them every second, and two services managing the same
//! two engines at once: one reading each engine's `/metrics` itself
//! (`[cluster] scrape_interval_s`), the other only from Prometheus
//! (`[telemetry.prometheus]`, `scrape_interval_s = 0`). Under a steady load
//! both see the same queue (running and waiting) on each engine; after the
//! load both have the same SLO attainment from the engines' TTFT and TBT
//! histograms, the same power and clock, and energy within what the engines
//! burn between two readings. Without Prometheus, the service reading from it
//! goes to failsafe.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod prom_support;

use prom_support::Prometheus;

const TOKEN: &str = "prom-token-7c1";

/// A twin engine whose batch holds at most `max_seqs` requests (more wait),
/// at `speed`× real time; its base URL.
async fn engine(max_seqs: u32, speed: f64) -> String {
    let mut physics = sim::Physics::default_h100_llama70b();
    physics.engine.max_num_seqs = max_seqs;
    let cfg = dynamollm::twin_serve::ServeConfig {
        physics,
        tp: 8,
        clock_mhz: 1980,
        speed,
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

/// A cluster manager (the webhook) that places the k-th spawn on the k-th
/// of `endpoints` (node `dc1/node<k>`, GPUs 0–7) and refuses spawns past them.
async fn cluster_manager(endpoints: Vec<String>) -> String {
    use axum::routing::post;
    use axum::Json;
    let placed = Arc::new(AtomicUsize::new(0));
    let endpoints = Arc::new(endpoints);
    let app = axum::Router::new().route(
        "/actions",
        post(move |Json(cmd): Json<Value>| {
            let (placed, endpoints) = (placed.clone(), endpoints.clone());
            async move {
                if cmd["action"]["kind"].as_str() != Some("spawn") {
                    return (axum::http::StatusCode::OK, Json(serde_json::json!({})));
                }
                let k = placed.fetch_add(1, Ordering::SeqCst);
                match endpoints.get(k) {
                    Some(url) => (
                        axum::http::StatusCode::OK,
                        Json(serde_json::json!({"placement": {"node": format!("dc1/node{k}"), "gpus": (0..8).collect::<Vec<u32>>(), "endpoint": url}})),
                    ),
                    None => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        Json(serde_json::json!({"error": "no engine left to place"})),
                    ),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/actions", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A service managing two TP8 instances (`single-pool`, fixed at 2) placed
/// by the cluster manager at `cm`, learning attainment from the engines.
async fn service(dir: &Path, cm: &str, scrape_interval_s: f64, prometheus: &str) -> service::RunningService {
    let text = format!(
        r#"
[service]
listen = "127.0.0.1:0"
token = "{TOKEN}"
state_dir = "{state}"
speed = 10.0
stale_after_s = 60.0
policy = "single-pool"

[controller]
fixed_instances = 2
learn_from = "engines"

[cluster]
kind = "external"
gpus = 1024
scrape_interval_s = {scrape_interval_s}

[actuators.webhook]
url = "{cm}"

{prometheus}
"#,
        state = dir.display()
    );
    service::start(service::config::ServiceConfig::parse(&text, "prometheus-test.toml").unwrap()).await.unwrap()
}

async fn status(http: &reqwest::Client, svc: &service::RunningService) -> Value {
    let r = http.get(format!("http://{}/api/v1/status", svc.addr)).bearer_auth(TOKEN).send().await.unwrap();
    assert!(r.status().is_success(), "status: {}", r.status());
    r.json().await.unwrap()
}

/// The status document's instances by engine endpoint.
fn by_endpoint(status: &Value) -> BTreeMap<String, Value> {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| Some((i["placement"]["endpoint"].as_str()?.to_string(), i.clone())))
        .collect()
}

/// Each placed engine's (requests in flight, of them waiting), as the core holds them.
fn queues(svc: &service::RunningService) -> BTreeMap<String, (u32, u32)> {
    let core = svc.shared.core.lock().unwrap();
    core.instances()
        .filter_map(|r| Some((r.placement.as_ref()?.endpoint.clone()?, (r.outstanding, r.waiting))))
        .collect()
}

/// Send `n` completions of `prompt` tokens and `max_tokens` to `engine` at
/// once, each read to its end in its own task; the tasks.
fn load(
    http: &reqwest::Client,
    engine: &str,
    n: usize,
    prompt: usize,
    max_tokens: u32,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|k| {
            let (http, url) = (http.clone(), format!("{engine}/v1/completions"));
            // A spread of prompt lengths: some prefills are long, so queueing shows in TTFT.
            let body = serde_json::json!({
                "model": "llama2-70b", "prompt": vec![7; prompt + 97 * k], "max_tokens": max_tokens,
                "ignore_eos": true, "stream": true,
            });
            tokio::spawn(async move {
                let mut r = http.post(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                while r.chunk().await.unwrap().is_some() {}
            })
        })
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_gives_the_same_telemetry_as_the_scrapes() {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    // Engine A holds 4 requests in its batch, B 8: A's extra requests wait.
    let (a, b) = (engine(4, 2.0).await, engine(8, 2.0).await);
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = [&a, &b].iter().map(|u| u.trim_start_matches("http://").to_string()).collect();
    let mut prom = Prometheus::start(dir.path(), &targets);
    prom.wait_up(&http, 2).await;

    let (da, db) = (dir.path().join("scrape"), dir.path().join("prom"));
    let scraping = service(&da, &cluster_manager(vec![a.clone(), b.clone()]).await, 0.5, "").await;
    let prom_table = format!("[telemetry.prometheus]\nurl = \"{}\"\ninterval_s = 0.5\ntimeout_ms = 2000\n", prom.base);
    let querying = service(&db, &cluster_manager(vec![a.clone(), b.clone()]).await, 0.0, &prom_table).await;

    // Both place the two engines and see them serve.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s1, s2) = (status(&http, &scraping).await, status(&http, &querying).await);
        let serving = |s: &Value| by_endpoint(s).values().filter(|i| i["state"] == "serving").count();
        if serving(&s1) == 2 && serving(&s2) == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not both engines serving: scrape {:#} / prometheus {:#}\nprometheus log:\n{}",
            s1["instances"],
            s2["instances"],
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A steady load: 7 long streams on A (4 running, 3 waiting), 3 on B.
    let mut tasks = load(&http, &a, 7, 600, 800);
    tasks.extend(load(&http, &b, 3, 600, 800));
    let want = BTreeMap::from([(a.clone(), (7, 3)), (b.clone(), (3, 0))]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (q1, q2) = loop {
        let (q1, q2) = (queues(&scraping), queues(&querying));
        if q1 == want && q2 == want {
            break (q1, q2);
        }
        assert!(Instant::now() < deadline, "queues: scrape {q1:?} / prometheus {q2:?}, want {want:?} on both");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Once the prompts are in (the prefill draws more than the decode), the power each
    // reads is the engines' (8 GPUs each) decoding the same batch, and the queues hold.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s1, s2) = (status(&http, &scraping).await, status(&http, &querying).await);
    assert_eq!((queues(&scraping), queues(&querying)), (want.clone(), want.clone()), "the load is not steady");
    let (i1, i2) = (by_endpoint(&s1), by_endpoint(&s2));
    let mut loaded = Vec::new();
    for e in [&a, &b] {
        let (p1, p2) = (i1[e]["power_w"].as_f64().unwrap(), i2[e]["power_w"].as_f64().unwrap());
        assert!(p1 > 0.0 && close(p1, p2, 0.05 * p1), "{e}: power {p1} W (scrape) vs {p2} W (prometheus)");
        assert_eq!(i1[e]["outstanding"], i2[e]["outstanding"], "{e}");
        loaded.push((p1, p2));
    }
    println!("under load: queues (in flight, waiting) scrape {q1:?} / prometheus {q2:?}; power W {loaded:?}");

    // Then a burst of short requests (queueing behind each other), and the load ends.
    for t in tasks {
        t.await.unwrap();
    }
    let mut tasks = load(&http, &a, 24, 300, 40);
    tasks.extend(load(&http, &b, 12, 300, 40));
    for t in tasks {
        t.await.unwrap();
    }
    // Both have read the engines' last counters (Prometheus scrapes every second,
    // is asked every half second) and ticked (every 0.5 s) with them.
    let idle = BTreeMap::from([(a.clone(), (0, 0)), (b.clone(), (0, 0))]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while queues(&scraping) != idle || queues(&querying) != idle {
        assert!(
            Instant::now() < deadline,
            "the engines did not go idle: {:?} / {:?}",
            queues(&scraping),
            queues(&querying)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (s1, s2) = (status(&http, &scraping).await, status(&http, &querying).await);

    // The same attainment per class, from the same histograms' deltas.
    let att = |s: &Value| -> Vec<(String, Option<f64>)> {
        s["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["class"].as_str().unwrap().to_string(), c["attainment"].as_f64()))
            .collect()
    };
    let (t1, t2) = (att(&s1), att(&s2));
    println!("attainment per class: scrape {t1:?}\n                      prometheus {t2:?}");
    assert!(t1.iter().all(|(_, v)| v.is_some()), "no attainment from the engines: {t1:?}");
    assert!(t1.iter().any(|(_, v)| v.unwrap() < 0.999), "the burst should miss some SLOs: {t1:?}");
    for ((c, x), (_, y)) in t1.iter().zip(&t2) {
        let (x, y) = (x.unwrap(), y.unwrap_or(f64::NAN));
        assert!(close(x, y, 0.002), "class {c}: attainment {x} (scrape) vs {y} (prometheus)");
    }

    // The same idle power and clock; energy within what the engines burn between two readings.
    let (i1, i2) = (by_endpoint(&s1), by_endpoint(&s2));
    for e in [&a, &b] {
        let (x, y) = (&i1[e], &i2[e]);
        let (p1, p2) = (x["power_w"].as_f64().unwrap(), y["power_w"].as_f64().unwrap());
        let (e1, e2) = (x["energy_j"].as_f64().unwrap(), y["energy_j"].as_f64().unwrap());
        println!(
            "{e}: idle power {p1} / {p2} W, energy {e1:.0} / {e2:.0} J, clock {} / {}",
            x["clock_mhz"], y["clock_mhz"]
        );
        assert!(p1 > 0.0 && close(p1, p2, 0.01 * p1), "{e}: idle power {p1} W vs {p2} W");
        assert_eq!(x["clock_mhz"], y["clock_mhz"], "{e}");
        assert_eq!((x["state"].as_str(), x["outstanding"].as_u64()), (y["state"].as_str(), y["outstanding"].as_u64()));
        // Readings up to 2.5 s apart (scrape 0.5 s; Prometheus 1 s + query 0.5 s), at the engine's speed 2.
        assert!(e1 > 0.0 && close(e1, e2, p1 * 2.5 * 2.0 + 1.0), "{e}: energy {e1} J vs {e2} J");
    }

    // Record the query's answer and engine A's page now, for the telemetry crate's fixture.
    if let Ok(to) = std::env::var("DYNAMOLLM_RECORD_PROMETHEUS_FIXTURE") {
        let q = telemetry::prom_query::query_text("");
        let answer = http
            .post(format!("{}/api/v1/query", prom.base))
            .form(&[("query", q.as_str())])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let page = http.get(format!("{a}/metrics")).send().await.unwrap().text().await.unwrap();
        let to = Path::new(&to);
        std::fs::write(to.join("prometheus_query.json"), answer).unwrap();
        let key = a.trim_start_matches("http://");
        std::fs::write(to.join("prometheus_engine_page.txt"), format!("# instance {key}\n{page}")).unwrap();
        println!("recorded the fixture in {}", to.display());
    }

    // Prometheus gone: the service that reads from it is blind, and goes to failsafe; the other reads on.
    drop(prom);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s2 = status(&http, &querying).await;
        if s2["mode"] == "failsafe" {
            println!("Prometheus stopped: failsafe ({})", s2["failsafe_reason"]);
            break;
        }
        assert!(Instant::now() < deadline, "no failsafe without Prometheus: {s2:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status(&http, &scraping).await["mode"], "auto");

    scraping.stop().await.unwrap();
    querying.stop().await.unwrap();
}
