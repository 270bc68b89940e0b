//! The backlog guard's `move-queued` on an external cluster, carried out by
//! the request router: streams that a `twin serve` engine (vLLM's API and
//! metrics) has queued without a first token are taken back — the engine
//! drops them when their connection closes, as vLLM aborts a request whose
//! client went away — and sent whole to an instance of another pool. Every
//! client still gets one complete answer.

use actuators::{Action, Command, InstanceId, Outcome, PoolId};
use controller::control::InstanceState;
use service::core::Mode;
use std::time::{Duration, Instant};
mod twin_engine;

/// A counter on an engine's `/metrics` page (summed over its label sets).
async fn counter(url: &str, name: &str) -> f64 {
    let page = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    page.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `vllm:request_success_total` of an engine by `finished_reason`.
async fn finished(url: &str, reason: &str) -> u64 {
    let page = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    page.lines()
        .filter(|l| l.starts_with("vllm:request_success_total") && l.contains(&format!("finished_reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// A service managing an external cluster of `twin serve` engines (at half
/// real time) behind its router, with `[router] balance`; once every planned
/// instance serves (in at least two pools) the controller only watches, so
/// that nothing but the test moves requests. Returns the service and its
/// instances (id, pool, endpoint).
async fn service(balance: &str) -> (service::RunningService, Vec<(u32, u32, String)>, tempfile::TempDir) {
    // The cluster manager: a spawn starts an engine and answers with its endpoint.
    let cm = twin_engine::cluster_manager(0.5).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        twin_engine::external_config(&cm, dir.path(), "MM = 1.0, LL = 0.5", &format!("balance = \"{balance}\""), "");
    let ccfg = service::controller_config(&cfg, &dynamollm::profile::ProfileTable::bundled()).unwrap();
    assert!(ccfg.move_queued, "with a router, move-queued is on by default");
    let svc = service::start(cfg).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let instances = loop {
        let serving: Vec<(u32, u32, String)> = {
            let c = svc.shared.core.lock().unwrap();
            let all: Vec<_> = c.instances().collect();
            if !all.is_empty() && all.iter().all(|r| r.state == InstanceState::Serving) {
                all.iter().filter_map(|r| Some((r.id.0, r.pool, r.placement.as_ref()?.endpoint.clone()?))).collect()
            } else {
                Vec::new()
            }
        };
        let pools: std::collections::BTreeSet<u32> = serving.iter().map(|s| s.1).collect();
        if pools.len() >= 2 {
            svc.shared.core.lock().unwrap().set_mode(Mode::DryRun);
            break serving;
        }
        assert!(Instant::now() < deadline, "no two pools served: {serving:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (svc, instances, dir)
}

/// One streamed completion through the router: (tokens received, ended with `[DONE]`).
async fn stream(client: reqwest::Client, router: String, prompt_tokens: usize) -> (usize, bool) {
    let body = serde_json::json!({"model": "llama2-70b", "prompt": vec![7; prompt_tokens], "max_tokens": 20, "ignore_eos": true, "stream": true});
    let resp = client.post(&router).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let tokens = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter(|v| v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()))
        .count();
    (tokens, text.trim_end().ends_with("data: [DONE]"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_moves_unstarted_streams_to_another_pool() {
    let (svc, instances, _dir) = service("requests").await;

    // Twenty long prompts, streamed, all of one class: they queue on the engines of its pool.
    let router = format!("http://{}/v1/completions", svc.router_addr.unwrap());
    let client = reqwest::Client::new();
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(tokio::spawn(stream(client.clone(), router.clone(), 4000)));
    }
    // Once every request has reached an engine, take the one with most still unstarted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut received = 0.0;
        for i in &instances {
            received += counter(&i.2, "vllm:prompt_tokens_total").await;
        }
        if received >= 20.0 * 4000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the engines received {received} prompt tokens of 20 × 4000");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (a_id, a_pool, a_url) =
        instances.iter().max_by_key(|i| svc.shared.unstarted.count(&i.2)).cloned().expect("instances");
    assert!(
        svc.shared.unstarted.count(&a_url) >= 6,
        "too few streams queued to move three: {:?}",
        instances.iter().map(|i| (i, svc.shared.unstarted.count(&i.2))).collect::<Vec<_>>()
    );
    let (_, b_pool, b_url) = instances.iter().find(|i| i.1 != a_pool).cloned().unwrap();
    let placement = svc.shared.core.lock().unwrap().instances().find(|r| r.id.0 == a_id).unwrap().placement.clone();
    let cmd = Command::new(
        "test-move-1",
        Action::MoveQueued { instance: InstanceId(a_id), pool: PoolId(b_pool), max_requests: 3 },
        placement,
    );
    let outcome = svc.shared.actuators.dispatch(&cmd).await.unwrap();
    match &outcome {
        Outcome::Applied { detail, .. } => {
            assert_eq!(detail, &format!("3 unstarted requests moved to pool {b_pool}"), "{outcome:?}")
        }
        other => panic!("the router did not carry out move-queued: {other:?}"),
    }

    // Every client gets its whole answer, once.
    for c in clients {
        let (tokens, done) = c.await.unwrap();
        assert_eq!(tokens, 20, "a moved stream lost or repeated tokens");
        assert!(done, "a stream did not end with [DONE]");
    }
    assert_eq!(svc.shared.router_stats.lock().unwrap().moved, 3);
    // The three ran on the other pool's engine; the first engine dropped them unstarted,
    // and ran nothing twice.
    assert_eq!(finished(&b_url, "length").await, 3, "the moved requests did not run on pool {b_pool}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut done = 0;
        for i in &instances {
            done += finished(&i.2, "length").await;
        }
        let aborted = finished(&a_url, "abort").await;
        if done + aborted >= 23 {
            assert_eq!((done, aborted), (20, 3), "an engine ran a moved request anyway");
            break;
        }
        assert!(Instant::now() < deadline, "the engines finished {done} and dropped {aborted} of 20 + 3 moved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    svc.stop().await.unwrap();
}

/// With `balance = "prompt-tokens"` the router sends prompts past an engine
/// busy with a long prompt that has no first token yet, however few requests
/// it holds; by request count they alternate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_token_balance_sends_prompts_past_a_long_queued_one() {
    for (balance, long_engine_tokens) in [("prompt-tokens", 7000.0), ("requests", 7000.0 + 1100.0)] {
        let (svc, instances, _dir) = service(balance).await;
        let router = format!("http://{}/v1/completions", svc.router_addr.unwrap());
        let client = reqwest::Client::new();
        let long = tokio::spawn(stream(client.clone(), router.clone(), 7000));
        let deadline = Instant::now() + Duration::from_secs(5);
        while svc.shared.router_stats.lock().unwrap().in_flight < 1 {
            assert!(Instant::now() < deadline, "the long prompt never went out");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Three more, one after the other, while the long one has no first token yet.
        let mut rest = Vec::new();
        for k in 0..3 {
            rest.push(tokio::spawn(stream(client.clone(), router.clone(), 1100)));
            while svc.shared.router_stats.lock().unwrap().in_flight < k + 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(long.await.unwrap(), (20, true));
        for r in rest {
            assert_eq!(r.await.unwrap(), (20, true));
        }
        // Where the prompt tokens went: the long prompt's engine, and the other engine of its pool.
        let mut received = Vec::new();
        for i in &instances {
            received.push(counter(&i.2, "vllm:prompt_tokens_total").await);
        }
        assert!(
            received.contains(&long_engine_tokens),
            "{balance}: the long prompt's engine got {received:?} prompt tokens, not {long_engine_tokens}"
        );
        svc.stop().await.unwrap();
    }
}
