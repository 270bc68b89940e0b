//! A datacenter cluster without agents: `serve` reads each placed engine's
//! `/metrics` page itself (vLLM names, here from `twin serve` routers on
//! loopback) and learns from it that the instances serve and what they hold.

mod twin_engine;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_scrapes_the_engines_it_placed() {
    // The cluster manager: a spawn starts an engine and answers with its endpoint.
    let cm = twin_engine::cluster_manager(10.0).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = twin_engine::external_config(&cm, dir.path(), "MM = 1.0, LL = 0.5", "", "");
    let svc = service::start(cfg).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (n, serving, lag, mode) = {
            let c = svc.shared.core.lock().unwrap();
            let now = svc.shared.clock.now_s();
            let n = c.instances().count();
            let serving = c.instances().filter(|r| r.state == controller::control::InstanceState::Serving).count();
            (n, serving, c.telemetry_lag_s(now), c.mode())
        };
        if n > 0 && serving == n {
            assert!(lag < 10.0, "telemetry lag {lag} s");
            assert_eq!(mode, service::core::Mode::Auto);
            break;
        }
        assert!(Instant::now() < deadline, "{serving} of {n} instances serving: the engine pages were not read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A stream through the router counts as in flight until it ends.
    let router = format!("http://{}/v1/completions", svc.router_addr.unwrap());
    let in_flight = |svc: &service::RunningService| svc.shared.router_stats.lock().unwrap().in_flight;
    let body = serde_json::json!({"model": "llama2-70b", "prompt": vec![7; 600], "max_tokens": 400, "ignore_eos": true, "stream": true});
    let mut resp = reqwest::Client::new().post(&router).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    assert!(String::from_utf8_lossy(&first).contains("data: "), "{first:?}");
    assert_eq!(in_flight(&svc), 1, "the open stream is not counted in flight");
    while resp.chunk().await.unwrap().is_some() {}
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_flight(&svc) != 0 {
        assert!(Instant::now() < deadline, "the finished stream is still counted in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    svc.stop().await.unwrap();
}
