//! One honest figure: the service on the twin decides in the twin's own time,
//! so a run gives the same figures at any speed; its live baseline is
//! `single-pool` as `sim` sizes it, replayed on the same arrivals, so the live
//! savings figure agrees with the result; a finished replay says so; and the
//! commands say what their output means instead of printing nonsense.

use clap::Parser;
use dynamollm::cmd::demo::{service_config, DemoArgs, DemoJson};
use sim::measure::{class_slos, SloRule};
use sim::{Cluster, Physics, Workload};
use std::process::Command;
use telemetry::ClassBoundaries;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    demo: DemoArgs,
}

/// What a run of the demo's service ends with.
struct End {
    /// The twin's totals.
    totals: std::sync::Arc<sim::RunTotals>,
    /// `/api/v1/status` after the replay.
    status: serde_json::Value,
}

async fn run_to_end(speed: f64, hours: f64, baseline_instances: Option<u32>) -> End {
    let args = Wrap::parse_from([
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--speed",
        &speed.to_string(),
        "--hours",
        &hours.to_string(),
        "--seed",
        "3",
    ])
    .demo;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = service_config(&args, "t0ken", dir.path());
    cfg.cluster.baseline_instances = baseline_instances;
    let svc = service::start(cfg).await.unwrap();
    let mut finished = svc.finished.clone();
    let totals = loop {
        finished.changed().await.expect("the twin stopped before the end");
        if let Some(t) = finished.borrow().clone() {
            break t;
        }
    };
    let status: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/api/v1/status", svc.addr))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    svc.stop().await.unwrap();
    End { totals, status }
}

/// The same seed at 40× and at 4,000× (far beyond what a debug build on
/// two cores sustains, so the twin lags the wall) makes the same decisions:
/// the same energy, GPU time and attainment, to the last bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_twins_service_gives_the_same_figures_at_any_speed() {
    let slow = run_to_end(40.0, 0.05, None).await;
    let fast = run_to_end(4000.0, 0.05, None).await;
    assert!(slow.totals.energy_j > 0.0 && slow.totals.requests_total > 100, "{}", slow.totals.requests_total);
    assert_eq!(slow.totals.requests_total, fast.totals.requests_total);
    assert_eq!(slow.totals.energy_j, fast.totals.energy_j, "energy differs between 40× and 4,000×");
    assert_eq!(slow.totals.gpu_seconds, fast.totals.gpu_seconds);
    for (a, b) in slow.totals.stats.classes.iter().zip(&fast.totals.stats.classes) {
        assert_eq!((a.ttft_ok, a.ttft_n, a.gaps_ok, a.gaps_n), (b.ttft_ok, b.ttft_n, b.gaps_ok, b.gaps_n));
    }
    // A finished replay says so: no mode acts on it and no telemetry is late.
    for s in [&slow.status, &fast.status] {
        assert_eq!(s["mode"], "finished", "{s}");
        assert_eq!(s["telemetry_lag_s"].as_f64(), Some(0.0), "{s}");
        assert!(s["status_message"].as_str().is_some_and(|m| m.contains("replay is over")), "{s}");
    }
}

/// The live baseline is `single-pool` replayed beside the cluster: at the end
/// it holds what `sim` gives for that layout over the same time, and the live
/// savings figure is the result's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_baseline_is_the_single_pool_sim_replays() {
    let n = 2;
    let end = run_to_end(400.0, 0.1, Some(n)).await;
    let physics = Physics::default_h100_llama70b();
    let workload = Workload::from_options(None, None, None, 1.0, Some(0.1), 3).unwrap();
    let slo = class_slos(&physics, &workload.slo_pairs, &ClassBoundaries::default(), SloRule::Multiplier(5.0));
    let spec = service::twin::single_pool_spec(&physics, n);
    let mut c = Cluster::new(&physics, &spec, ClassBoundaries::default(), slo);
    c.set_predictor_accuracy(workload.predictor_accuracy, workload.seed ^ sim::PREDICTOR_SEED);
    c.replay(workload.arrivals().unwrap(), |_| {}).unwrap();
    let single = c.finish(end.totals.duration_s);
    let t = &end.status["totals"];
    let live_base_j = t["baseline_energy_j"].as_f64().unwrap();
    assert!(
        (live_base_j / single.energy_j - 1.0).abs() < 0.005,
        "live baseline {live_base_j} J, single-pool replayed by sim {} J",
        single.energy_j
    );
    let live_ratio = 1.0 - t["savings_ratio"].as_f64().unwrap();
    let ratio = end.totals.energy_j / single.energy_j;
    assert!((live_ratio / ratio - 1.0).abs() < 0.02, "live {live_ratio:.4}, result {ratio:.4}");
}

fn dynamollm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dynamollm")).args(args).output().expect("the binary runs")
}

/// `demo --json F`: exactly the contract's fields, the live figure the result's.
#[test]
fn the_demo_writes_its_figures_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("demo.json");
    let out = dynamollm(&[
        "demo",
        "--hours",
        "0.05",
        "--speed",
        "500",
        "--listen",
        "127.0.0.1:0",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "classes",
            "energy_kwh",
            "gpu_hours",
            "lag_s_max",
            "live_ratio",
            "ratio",
            "sim_ratio",
            "single_pool_energy_kwh",
            "speed",
            "wall_s"
        ]
    );
    let d: DemoJson = serde_json::from_str(&text).unwrap();
    assert_eq!(d.speed, 500.0);
    assert!((d.ratio - d.energy_kwh / d.single_pool_energy_kwh).abs() < 1e-9);
    assert!((d.live_ratio / d.ratio - 1.0).abs() < 0.02, "live {} result {}", d.live_ratio, d.ratio);
    assert!(d.sim_ratio > 0.0 && d.gpu_hours > 0.0 && d.wall_s > 0.0);
    assert!(!d.classes.is_empty() && d.classes.values().all(|c| c.requests > 0 && c.slo_attainment > 0.0));
    // The terminal says the wall time it took, never "0 requests/s of wall time (0.00 s)".
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("(0.00 s)"), "{stdout}");
}

/// `sim --instances 0` is refused: a cluster with nothing in it is not a run.
#[test]
fn a_cluster_with_no_instance_is_refused() {
    for n in ["0", "SS=0,LL=0"] {
        let policy = if n == "0" { "single-pool" } else { "multi-pool" };
        let out = dynamollm(&["sim", "--policy", policy, "--instances", n, "--hours", "0.02", "--quiet"]);
        assert_eq!(out.status.code(), Some(2), "--instances {n}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no instance"), "{err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("energy -0.00"));
    }
}

/// `sim --report` with one policy compares it with nothing (it compared
/// single-pool against itself) and says so.
#[test]
fn a_report_of_one_policy_says_it_compares_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("r.json");
    let out = dynamollm(&["sim", "--instances", "2", "--hours", "0.02", "--quiet", "--report", html.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("compares it with nothing"));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&html).unwrap()).unwrap();
    assert!(r["baseline"].is_null(), "{}", r["baseline"]);
    assert!(r["runs"][0]["vs_baseline"].is_null());
}

/// `report` on the store a demo run leaves: the energy, GPU-hours and
/// requests of the demo's result (within 3%), and every class's energy
/// non-zero, the classes adding up to the total.
#[test]
fn a_report_from_the_demos_store_adds_up_to_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("demo.json");
    let state = dir.path().join("state");
    let out = dynamollm(&[
        "demo",
        "--hours",
        "0.25",
        "--speed",
        "900",
        "--listen",
        "127.0.0.1:0",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.contains("dynamollm report --store")).expect("the demo names its report");
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| words[words.iter().position(|w| *w == flag).unwrap() + 1].to_string();
    let report = dir.path().join("r.json");
    let r = dynamollm(&[
        "report",
        "--store",
        &after("--store"),
        "--from",
        &after("--from"),
        "--to",
        &after("--to"),
        "--format",
        "json",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let d: DemoJson = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let run = &v["runs"][0];
    let near = |what: &str, got: f64, want: f64| {
        assert!((got / want - 1.0).abs() < 0.03, "{what}: report {got}, demo {want}");
    };
    near("energy kWh", run["energy_kwh"].as_f64().unwrap(), d.energy_kwh);
    near("GPU-hours", run["gpu_hours"].as_f64().unwrap(), d.gpu_hours);
    let demo_requests: u64 = d.classes.values().map(|c| c.requests).sum();
    near("requests", run["requests"].as_f64().unwrap(), demo_requests as f64);
    let classes = run["classes"].as_object().unwrap();
    assert_eq!(classes.len(), d.classes.len(), "{classes:?}");
    let mut sum = 0.0;
    for (k, c) in classes {
        let e = c["energy_kwh"].as_f64().unwrap();
        assert!(e > 0.0, "class {k} has no energy: {c}");
        sum += e;
    }
    near("classes' energy", sum, run["energy_kwh"].as_f64().unwrap());
    assert!(run["sci_g_per_1k_tokens"].as_f64().unwrap() > 0.0, "{run}");
}
