//! A site power budget in the twin (`sim --power-budget-w`): the bundled
//! Conversation hour at eight times its load, under a budget of 70% and of
//! 30% of what `single-pool` (27 × TP8, what replay sizes for it) peaks at.
//! The twin's one-second power never passes the budget; at 70% every class
//! holds its P99 SLOs; at 30% the load cannot be carried, and the classes
//! ranked last (long prompts) are the ones that lose.

use std::process::Command;
mod twin_engine;

fn sim(args: &[&str]) -> serde_json::Value {
    sim_out(args).0
}

/// The run's JSON and the table it printed.
fn sim_out(args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let mut a = vec!["sim", "--scale", "8", "--quiet", "--json", json.to_str().unwrap()];
    a.extend(args);
    let out = Command::new(env!("CARGO_BIN_EXE_dynamollm")).args(&a).output().unwrap();
    assert!(out.status.success(), "{a:?}: {}", String::from_utf8_lossy(&out.stderr));
    (
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap(),
        String::from_utf8_lossy(&out.stdout).into(),
    )
}

fn attainment(run: &serde_json::Value, class: &str) -> f64 {
    run["classes"][class]["slo_attainment"].as_f64().unwrap()
}

#[test]
fn the_fleet_stays_under_the_budget_and_degrades_the_last_ranked_classes_first() {
    let single = sim(&["--policy", "single-pool", "--instances", "27"]);
    let peak_w = single["peak_power_w"].as_f64().unwrap();
    assert!(peak_w > 0.0);
    let free = sim(&["--policy", "dynamollm"]);
    for share in [0.7, 0.3] {
        let budget_w = share * peak_w;
        let (run, table) = sim_out(&["--policy", "dynamollm", "--power-budget-w", &format!("{budget_w}")]);
        let got = run["peak_power_w"].as_f64().unwrap();
        assert!(got <= budget_w, "{share}: peak {got:.0} W over the budget {budget_w:.0} W");
        if share == 0.7 {
            // The budget allows the load: every class holds.
            for (c, v) in run["classes"].as_object().unwrap() {
                let a = v["slo_attainment"].as_f64().unwrap();
                assert!(a >= 0.99, "{c} at {a} under a budget that allows the load");
            }
        } else {
            // Too little for the load: the short prompts (ranked first) hold, the long ones lose,
            // and the fleet spends less than without the budget.
            for c in ["SS", "SM", "SL"] {
                assert!(attainment(&run, c) >= 0.99, "{c} at {}", attainment(&run, c));
            }
            for c in ["LM", "LL"] {
                assert!(attainment(&run, c) < 0.9, "{c} at {} kept its share", attainment(&run, c));
            }
            assert!(run["requests_rejected"].as_u64().unwrap() > 0);
            // Turned away for the budget, and said so per class.
            let rejected = table.lines().find(|l| l.trim_start().starts_with("rejected:")).expect("a rejected line");
            assert!(rejected.contains("LL") && rejected.contains("(power-budget)"), "{rejected}");
            assert!(!rejected.contains("no-serving-instance"), "{rejected}");
            // Classes are turned away in the configured order: the ones turned away are the last-ranked.
            let order = ["SS", "SM", "SL", "MS", "MM", "ML", "LS", "LM", "LL"];
            let turned: Vec<usize> =
                (0..order.len()).filter(|&k| rejected.contains(&format!(" {} ", order[k]))).collect();
            let first = turned[0];
            assert_eq!(turned, (first..order.len()).collect::<Vec<_>>(), "not the last-ranked classes: {rejected}");
            // The classes degraded (turned away, or below their P99 SLOs) are a block from the bottom
            // of the order too: a class may lose its SLOs only once every class below it is turned
            // away or has lost them.
            let degraded: Vec<usize> =
                (0..order.len()).filter(|&k| turned.contains(&k) || attainment(&run, order[k]) < 0.99).collect();
            assert_eq!(
                degraded,
                (degraded[0]..order.len()).collect::<Vec<_>>(),
                "degraded out of order: {:?}",
                order.iter().map(|c| (c, attainment(&run, c))).collect::<Vec<_>>()
            );
            assert!(run["energy_kwh"].as_f64().unwrap() < free["energy_kwh"].as_f64().unwrap());
        }
    }
}

#[test]
fn a_class_priority_names_classes() {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamollm"))
        .args(["sim", "--policy", "dynamollm", "--power-budget-w", "50000", "--class-priority", "SS,XX", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"XX\" is not a class"));
}

#[test]
fn a_schedule_gives_its_hours_their_budget_and_leaves_the_others() {
    let single = sim(&["--policy", "single-pool", "--instances", "27"]);
    let budget_w = format!("{}", 0.5 * single["peak_power_w"].as_f64().unwrap());
    let constant = sim(&["--policy", "dynamollm", "--power-budget-w", &budget_w]);
    // The Conversation hour is hour 0 of its day: a period over it is the constant budget…
    let over = sim(&["--policy", "dynamollm", "--power-budget-schedule", &format!("23-1={budget_w}")]);
    // …and one that misses it leaves the hour without a budget.
    let free = sim(&["--policy", "dynamollm"]);
    let missed = sim(&["--policy", "dynamollm", "--power-budget-schedule", &format!("1-23={budget_w}")]);
    for k in ["energy_kwh", "peak_power_w", "gpu_hours"] {
        assert_eq!(over[k], constant[k], "{k}");
        assert_eq!(missed[k], free[k], "{k}");
    }
    assert!(constant["peak_power_w"].as_f64().unwrap() < free["peak_power_w"].as_f64().unwrap());
    for (bad, says) in [
        ("16-21", "not FROM-TO=W"),
        ("5-5=100", "not the same"),
        ("0-25=100", "0-23 to 1-24"),
        ("1-2=0", "power_w must be in"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dynamollm"))
            .args(["sim", "--policy", "dynamollm", "--quiet", "--power-budget-schedule", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{bad}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// In `serve`, a pool the site power budget holds short turns its requests
/// away with a 503 that says so (OpenAI's error object), counted apart in
/// the status and on `/metrics`; nothing is spawned past the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_says_when_the_power_budget_turns_a_request_away() {
    let cm = twin_engine::cluster_manager(10.0).await;
    let dir = tempfile::tempdir().unwrap();
    // 1 W: no instance fits, idle power alone is hundreds of watts.
    let cfg = twin_engine::external_config(&cm, dir.path(), "SS = 2.0", "hold_s = 2.0", "[budget]\npower_w = 1.0");
    let svc = service::start(cfg).await.unwrap();
    // SS is the only class with load: its pool is the one the budget holds short.
    let ss = telemetry::RequestClass::ALL.iter().position(|c| c.to_string() == "SS").unwrap();
    let pool = svc.shared.core.lock().unwrap().routing()[ss];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !svc.shared.core.lock().unwrap().power_held(pool) {
        assert!(std::time::Instant::now() < deadline, "the budget never held pool {pool} short");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let router = format!("http://{}", svc.router_addr.unwrap());
    // A short prompt with a short answer: class SS.
    let body = serde_json::json!({"model": "llama2-70b", "prompt": "hello there", "max_tokens": 8, "ignore_eos": true});
    let resp = reqwest::Client::new().post(format!("{router}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "service_unavailable_error", "{err}");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("power budget") && msg.contains(&format!("pool {pool}")), "{msg}");
    {
        let r = svc.shared.router_stats.lock().unwrap();
        assert_eq!((r.rejected, r.rejected_power_budget), (1, 1));
    }
    let api = format!("http://{}", svc.addr);
    let page = reqwest::Client::new()
        .get(format!("{api}/metrics"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.lines().any(|l| l.contains("\"router_rejected_power_budget\"") && l.ends_with(" 1")),
        "the budget's rejection is not on /metrics"
    );
    assert_eq!(svc.shared.core.lock().unwrap().instances().count(), 0, "an instance was spawned past the budget");
    svc.stop().await.unwrap();
}
