//! The service on a real cluster's terms, over real sockets: `twin serve`
//! engines behind a cluster manager that places two TP4 engines on each
//! 8-GPU node, engines that require an API key, the router driven by the
//! official `openai` Python client, and the per-class SLO attainment the
//! router measures fed to the controller as the twin's loop feeds it.

use service::RunningService;
use std::time::{Duration, Instant};
mod twin_engine;

const KEY: &str = "engine-key-7f3a";

async fn start(cm: &str, dir: &std::path::Path, rates: &str) -> RunningService {
    let cfg = twin_engine::external_config(cm, dir, rates, "", "[controller]\ntps = [4]");
    service::start(cfg).await.unwrap()
}

/// Wait until at least `n` instances exist and every one serves.
async fn all_serving(svc: &RunningService, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (count, serving) = {
            let c = svc.shared.core.lock().unwrap();
            let serving = c.instances().filter(|r| r.state == controller::control::InstanceState::Serving).count();
            (c.instances().count(), serving)
        };
        if count >= n && serving == count {
            return;
        }
        assert!(Instant::now() < deadline, "{serving} of {count} instances serving (wanted {n})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stream(router: &str, prompt: serde_json::Value, max_tokens: u32) -> String {
    let body = serde_json::json!({"model": "llama2-70b", "prompt": prompt, "max_tokens": max_tokens,
        "ignore_eos": true, "stream": true});
    let resp = reqwest::Client::new().post(format!("{router}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// Two TP4 engines on one node both become serving, each with its own
/// queue, power and energy (matched by instance, never by node alone); the
/// router's measurement of every streamed answer reaches the controller as
/// per-class attainment, shown in the status and on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tp4_engines_on_one_node_serve_apart_and_the_router_measures_attainment() {
    let cm = twin_engine::cluster_manager_with(10.0, 2, None).await;
    let dir = tempfile::tempdir().unwrap();
    // LM: the long answer below (2,000 prompt tokens, 300 output tokens with `ignore_eos`) is LM.
    let svc = start(&cm, dir.path(), "MS = 1.0, LM = 0.5").await;
    all_serving(&svc, 2).await;
    let router = format!("http://{}", svc.router_addr.unwrap());
    // A long answer keeps one engine busy while the other idles.
    let long = tokio::spawn({
        let r = router.clone();
        async move { stream(&r, serde_json::json!(vec![11; 2000]), 300).await }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let (pair, busy) = loop {
        let recs: Vec<_> = svc.shared.core.lock().unwrap().instances().cloned().collect();
        let same_node: Vec<_> = recs
            .iter()
            .filter(|a| {
                recs.iter()
                    .filter(|b| b.placement.as_ref().map(|p| &p.node) == a.placement.as_ref().map(|p| &p.node))
                    .count()
                    == 2
            })
            .cloned()
            .collect();
        assert!(same_node.len() >= 2, "no node holds two engines: {recs:?}");
        let busy = same_node.iter().filter(|r| r.outstanding > 0).count();
        if busy == 1 && same_node.iter().all(|r| r.energy_j > 0.0 && r.power_w > 0.0) {
            break (same_node, busy);
        }
        assert!(Instant::now() < deadline, "queues, power or energy not per engine: {same_node:?}");
        drop(same_node);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(busy, 1);
    for r in &pair {
        assert_eq!(r.state, controller::control::InstanceState::Serving, "{r:?}");
        assert_eq!(r.gpus.len(), 4, "each TP4 engine reports its own four GPUs: {r:?}");
    }
    assert_ne!(pair[0].energy_j, pair[1].energy_j, "one engine's counters went to both");
    long.await.unwrap();
    for _ in 0..4 {
        stream(&router, serde_json::json!(vec![5; 300]), 40).await;
    }
    // The router's counters reached the controller: attainment per class, in the status and on /metrics.
    let api = format!("http://{}", svc.addr);
    let http = reqwest::Client::new();
    // The controller takes the counters at its next tick (0.5 s of wall time at 10×).
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status: serde_json::Value =
            http.get(format!("{api}/api/v1/status")).bearer_auth("t").send().await.unwrap().json().await.unwrap();
        if status["classes"].as_array().unwrap().iter().any(|c| !c["attainment"].is_null()) {
            break status;
        }
        let counts = svc.shared.router_stats.lock().unwrap().slo_counts;
        assert!(Instant::now() < deadline, "no class shows attainment: {}; router {counts:?}", status["classes"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let counts = svc.shared.router_stats.lock().unwrap().slo_counts;
    let measured: Vec<&serde_json::Value> =
        status["classes"].as_array().unwrap().iter().filter(|c| !c["attainment"].is_null()).collect();
    let total_requests: u64 = counts.iter().map(|c| c[1]).sum();
    let total_gaps: u64 = counts.iter().map(|c| c[3]).sum();
    assert_eq!(total_requests, 5, "{counts:?}");
    assert!(total_gaps >= 299 + 4 * 39, "{counts:?}");
    for c in &measured {
        let a = c["attainment"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{c}");
    }
    let page = http.get(format!("{api}/metrics")).bearer_auth("t").send().await.unwrap().text().await.unwrap();
    assert!(
        page.lines().any(|l| l.starts_with("dynamollm_class_slo_attainment{class=") && !l.ends_with("NaN")),
        "no measured attainment on /metrics"
    );
    svc.stop().await.unwrap();
}

/// The official `openai` Python client through the router to engines that
/// require a key: every call works, the key passes through, a wrong key is
/// the engine's 401, and prompts land in the class their tokens give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_drives_the_router_to_keyed_engines() {
    let python = std::env::var("DYNAMOLLM_TEST_PYTHON")
        .expect("DYNAMOLLM_TEST_PYTHON must name a Python with the `openai` package; scripts/test installs it");
    let cm = twin_engine::cluster_manager_with(20.0, 2, Some(KEY)).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&cm, dir.path(), "SS = 0.5, LS = 0.5").await;
    all_serving(&svc, 2).await;
    let router = format!("http://{}", svc.router_addr.unwrap());
    // Without a key the engines refuse, and the router says so as OpenAI would.
    let r = reqwest::Client::new()
        .post(format!("{router}/v1/completions"))
        .json(&serde_json::json!({"model": "llama2-70b", "prompt": "hi", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(err["error"]["type"], "authentication_error", "{err}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = tokio::process::Command::new(&python).args([script, &router, KEY]).output().await.unwrap();
    assert!(out.status.success(), "the openai client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"], serde_json::json!(["llama2-70b"]), "{v}");
    assert_eq!(v["completion"]["choices"], 1, "{v}");
    assert_eq!(v["completion"]["usage"], 12, "{v}");
    assert_eq!(v["batch_choices"], serde_json::json!([0, 1]), "{v}");
    assert_eq!(v["chat"]["role"], "assistant", "{v}");
    assert!(v["tool_history"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    assert_eq!(v["stream"]["usage"], 20, "{v}");
    assert!(v["stream"]["text"].as_str().unwrap().split_whitespace().count() >= 20, "{v}");
    assert_eq!(v["wrong_key"], 401, "{v}");
    // A Chinese prompt of 2,000 characters and a 1,500-token English one are long prompts.
    let client = reqwest::Client::new();
    let before = svc.shared.router_stats.lock().unwrap().per_class.clone();
    let chinese = "深度学习模型在推理时消耗大量能源。".repeat(118);
    let english =
        "The controller plans each pool's instances, tensor parallelism and clocks ahead of the load. ".repeat(83);
    let n = service::openai::text_tokens(&english);
    assert!((1400..=1600).contains(&n), "the English prompt has {n} tokens");
    assert_eq!(chinese.split_whitespace().count(), 1, "one \"word\" by the old rule");
    for prompt in [chinese, english] {
        let r = client
            .post(format!("{router}/v1/completions"))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"model": "llama2-70b", "prompt": prompt, "max_tokens": 20}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let after = svc.shared.router_stats.lock().unwrap().per_class.clone();
    let added = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    assert_eq!(added("LS"), 2, "before {before:?}, after {after:?}");
    let stats = svc.shared.router_stats.lock().unwrap().clone();
    assert!(stats.tokenized_by_engine > 0, "the engines' /tokenize was never used: {stats:?}");
    svc.stop().await.unwrap();
}
