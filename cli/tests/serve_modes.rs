//! Modes that mean what they say, and write-ahead or nothing, on an external
//! cluster the test plays (slow exec spawns, real Mosquitto for telemetry):
//! - `dry-run` during a spawn storm: the commands not yet handed to a backend
//!   are not sent (counted as cancelled); a restart from a state saved in
//!   dry-run with commands in flight sends none of them;
//! - a state directory the service cannot write: nothing is sent, the service
//!   is in failsafe and says why on the status API and `/metrics`, and acts
//!   again once the state saves;
//! - one telemetry message claiming 1e12 arrivals, and a real flood: the
//!   message is refused and counted, the process stays small, and no spawn
//!   takes the fleet past the GPUs the cluster declares.

mod serve_support;

use serve_support::*;
use std::time::Duration;

fn spawn_starts(cluster: &FakeCluster) -> usize {
    cluster.log().iter().filter(|l| l[1] == "spawn" && l[3] == "start").count()
}

async fn set_mode(api: &Api, mode: &str) {
    let r = api
        .http
        .post(format!("{}/api/v1/mode", api.base))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "mode": mode }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "POST mode {mode}: {}", r.status());
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("dynamollm_service") && l.contains(&format!("\"{name}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_stops_the_storm_and_a_restart_in_dry_run_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    // Every spawn takes 3 s: the commands of one tick queue behind each other.
    std::fs::write(cluster.dir.join("spawn_sleep"), "3").unwrap();
    let state_dir = dir.path().join("state");
    let mut opts = Opts::new(&state_dir, broker(), &unique_prefix("modes"));
    opts.listen = format!("127.0.0.1:{}", free_port());
    opts.stale_after_s = 600.0;
    let config = dir.path().join("dynamollm.toml");
    std::fs::write(&config, config_text(&opts, &cluster)).unwrap();
    let log = dir.path().join("service.log");
    let api = Api::new(&opts.listen);
    let bin = env!("CARGO_BIN_EXE_dynamollm");
    let mut svc = Proc::start(bin, &config, &log);
    let c = cluster.clone();
    let _feed =
        Feeder::start(opts.mqtt.clone(), &opts.prefix, move || c.nodes(), Duration::from_millis(100), opts.speed, 8.0);

    // The storm: a spawn running, more waiting behind it.
    wait_for("spawns queued behind a running one", Duration::from_secs(40), || async {
        let s = api.try_status().await?;
        let (started, pending) = (spawn_starts(&cluster), s["pending_actions"].as_u64().unwrap_or(0));
        if started >= 1 && pending >= 3 {
            Ok(())
        } else {
            Err(format!("{started} spawns started, {pending} pending"))
        }
    })
    .await;
    set_mode(&api, "dry-run").await;
    let at_switch = spawn_starts(&cluster);
    // The one in flight ends (3 s); what waited behind it is cancelled, not sent.
    wait_for("nothing pending in dry-run", Duration::from_secs(20), || async {
        let s = api.try_status().await?;
        if s["pending_actions"] == 0 {
            Ok(())
        } else {
            Err(format!("{} pending", s["pending_actions"]))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = spawn_starts(&cluster);
    // One command may have been on its way to the backend as the switch came.
    assert!(after <= at_switch + 1, "{} spawns started after the switch to dry-run", after - at_switch);
    let m = api.metrics().await;
    assert!(gauge(&m, "cancelled_commands") >= 2.0, "{m}");

    // Back to auto: the storm again; then the service dies with commands in flight, and the
    // state it left says dry-run (an operator's switch, saved just before the crash).
    set_mode(&api, "auto").await;
    wait_for("spawns in flight again", Duration::from_secs(40), || async {
        let s = api.try_status().await?;
        let pending = s["pending_actions"].as_u64().unwrap_or(0);
        if pending >= 2 {
            Ok(())
        } else {
            Err(format!("{pending} pending"))
        }
    })
    .await;
    svc.kill9();
    let path = state_dir.join("state.json");
    let mut saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(saved["pending"].as_array().is_some_and(|p| !p.is_empty()), "nothing pending in {saved}");
    saved["mode"] = serde_json::json!("dry-run");
    std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();
    // The orphaned script may still finish what it started; it starts nothing new.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_restart = spawn_starts(&cluster);
    let _svc = Proc::start(bin, &config, &log);
    let s = wait_for("the restarted service in dry-run", Duration::from_secs(20), || async {
        let s = api.try_status().await?;
        if s["operator_mode"] == "dry-run" && s["pending_actions"] == 0 {
            Ok(s)
        } else {
            Err(format!("{s}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(spawn_starts(&cluster), before_restart, "a restart in dry-run sent commands; status {s}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("not sent"), "the log does not say the commands were not sent:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_cannot_be_saved_means_nothing_sent_and_failsafe_said() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    let state_dir = dir.path().join("state");
    // The temporary file the state is written to is a directory: every save fails
    // (as a full disk or no file descriptors would make it).
    std::fs::create_dir_all(state_dir.join("state.json.tmp")).unwrap();
    let mut opts = Opts::new(&state_dir, broker(), &unique_prefix("unsaved"));
    opts.stale_after_s = 600.0;
    let cfg = service::config::ServiceConfig::parse(&config_text(&opts, &cluster), "unsaved.toml").unwrap();
    let svc = service::start(cfg).await.unwrap();
    let api = Api::new(svc.addr);
    let c = cluster.clone();
    let _feed =
        Feeder::start(opts.mqtt.clone(), &opts.prefix, move || c.nodes(), Duration::from_millis(100), opts.speed, 4.0);
    let s = wait_for("failsafe for the unsaved state", Duration::from_secs(20), || async {
        let s = api.try_status().await?;
        let why = s["failsafe_reason"].as_str().unwrap_or("");
        if s["mode"] == "failsafe" && s["state_saved"] == false && why.contains("state cannot be saved") {
            Ok(s)
        } else {
            Err(format!("{s}"))
        }
    })
    .await;
    // Three scale periods (30 s of service time each at 10×): the controller wanted a fleet, none was sent.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(cluster.log().len(), 0, "commands left without their write-ahead record; status {s}");
    let m = api.metrics().await;
    assert_eq!(gauge(&m, "state_unsaved"), 1.0);
    assert!(gauge(&m, "cancelled_commands") >= 1.0, "{m}");
    // The disk is writable again: the service saves, leaves failsafe and acts.
    std::fs::remove_dir(state_dir.join("state.json.tmp")).unwrap();
    wait_for("spawns once the state saves", Duration::from_secs(40), || async {
        let s = api.try_status().await?;
        if s["state_saved"] == true && s["mode"] == "auto" && spawn_starts(&cluster) > 0 {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    })
    .await;
    assert!(state_dir.join("state.json").exists());
    svc.stop().await.unwrap();
}

/// Peak resident memory of a process (kB), from `/proc/PID/status`.
fn peak_rss_kb(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_arrivals_is_refused_and_the_fleet_stays_within_its_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    let mut opts = Opts::new(&dir.path().join("state"), broker(), &unique_prefix("flood"));
    opts.listen = format!("127.0.0.1:{}", free_port());
    opts.stale_after_s = 600.0;
    opts.gpus = 16;
    let config = dir.path().join("dynamollm.toml");
    std::fs::write(&config, config_text(&opts, &cluster)).unwrap();
    let log = dir.path().join("service.log");
    let api = Api::new(&opts.listen);
    let svc = Proc::start(env!("CARGO_BIN_EXE_dynamollm"), &config, &log);
    wait_for("the API", Duration::from_secs(20), || async { api.try_status().await.map(|_| ()) }).await;
    // One message claiming 1e12 requests (it grew the service to 23.7 GB and killed it).
    let mut s =
        telemetry::mqtt::MqttSettings::new(&opts.mqtt.0, opts.mqtt.1, &format!("{}-evil", opts.prefix), &opts.prefix);
    s.reconnect_initial = Duration::from_millis(50);
    let evil = telemetry::mqtt::EdgePublisher::spawn(s, "site", "evil");
    let flood = br#"{"ts_ms": 0, "arrivals": [{"class": "LL", "requests": 1e12, "tokens": 1e15}]}"#;
    wait_for("the flood published", Duration::from_secs(10), || async {
        evil.publish_raw(flood.to_vec()).await.map_err(|e| e.to_string())
    })
    .await;
    wait_for("the flood refused", Duration::from_secs(20), || async {
        let m = api.try_metrics().await?;
        if gauge(&m, "rejected_arrivals") >= 1.0 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    // And a real flood below the ceiling: 10 requests/s of every class, far more than 16 GPUs carry, for 10 s.
    let c = cluster.clone();
    let _feed =
        Feeder::start(opts.mqtt.clone(), &opts.prefix, move || c.nodes(), Duration::from_millis(100), opts.speed, 10.0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let nodes = cluster.nodes();
    let gpus: u32 = nodes.values().sum();
    assert!(gpus <= 16, "the fleet holds {gpus} GPUs of the 16 declared: {nodes:?}");
    let kb = peak_rss_kb(svc.pid());
    assert!(kb < 200 * 1024, "peak RSS {kb} kB");
    let m = api.metrics().await;
    assert!(gauge(&m, "rejected_arrivals") >= 1.0, "{m}");
    // The plan wanted more (each pool may plan up to 16 GPUs): the spawns past them were not sent.
    assert!(gauge(&m, "refused_over_gpus") >= 1.0, "{m}");
}
