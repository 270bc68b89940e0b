//! The service under faults, against the real Mosquitto (`DYNAMOLLM_TEST_MQTT`,
//! and a private one from `DYNAMOLLM_TEST_MOSQUITTO_BIN` for the broker
//! restart): an exec action that times out, a webhook answering 500, a
//! broker restart, and telemetry going stale. Each runs `dynamollm serve` in
//! this process on an external cluster the test plays (see `serve_support`),
//! with an accelerated service clock; every wait is a poll with a deadline.

mod serve_support;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use serve_support::*;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telemetry::RequestClass;

async fn start(opts: &Opts, cluster: &FakeCluster) -> (service::RunningService, Api) {
    let cfg = service::config::ServiceConfig::parse(&config_text(opts, cluster), "faults.toml").unwrap();
    let svc = service::start(cfg).await.unwrap();
    let api = Api::new(svc.addr);
    (svc, api)
}

fn feeder(opts: &Opts, cluster: &FakeCluster, rate_rps: f64) -> Feeder {
    let c = cluster.clone();
    Feeder::start(opts.mqtt.clone(), &opts.prefix, move || c.nodes(), Duration::from_millis(100), opts.speed, rate_rps)
}

/// The fleet the first plan asks for is up: every instance serving, none pending.
async fn fleet_serving(api: &Api, want_low_clock: bool) -> Value {
    wait_for("the first fleet to serve", Duration::from_secs(30), || async {
        let s = api.try_status().await?;
        let inst = instances(&s);
        let ok = !inst.is_empty()
            && inst.values().all(|i| i.3 == "serving")
            && s["pending_actions"] == 0
            && s["mode"] == "auto"
            && (!want_low_clock || inst.values().any(|i| i.2 < 1980));
        if ok {
            Ok(s)
        } else {
            Err(format!("mode {} pending {} instances {inst:?}", s["mode"], s["pending_actions"]))
        }
    })
    .await
}

/// An exec spawn that outlives `[actuators.exec] timeout_ms`: recorded
/// timed-out, its instance forgotten, the controller plans it again with a
/// new id, and /metrics counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_is_recorded_forgotten_and_planned_again() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    std::fs::write(cluster.dir.join("hang-first"), "").unwrap();
    let mut opts = Opts::new(&dir.path().join("state"), broker(), &unique_prefix("tmo"));
    opts.stale_after_s = 600.0;
    opts.exec_timeout_ms = 800;
    let (svc, api) = start(&opts, &cluster).await;
    let _feed = feeder(&opts, &cluster, 0.5);

    let hung = wait_for("a spawn recorded timed-out", Duration::from_secs(15), || async {
        let a = api.actions().await;
        a.iter()
            .find(|r| kind(r) == "spawn" && r["state"] == "timed-out")
            .cloned()
            .ok_or_else(|| format!("{:?}", a.iter().map(|r| (&r["id"], kind(r), &r["state"])).collect::<Vec<_>>()))
    })
    .await;
    let id = hung["id"].as_str().unwrap().to_string();
    let lost = instance(&hung).unwrap();
    let pool = hung["action"]["pool"].as_u64().unwrap();
    let after_ms = hung["outcome"]["after_ms"].as_u64().unwrap();
    assert!((800..10_000).contains(&after_ms), "timed out after {after_ms} ms; exec timeout_ms is 800: {hung}");
    assert_eq!(hung["outcome"]["outcome"], "timed-out", "{hung}");
    assert_eq!(hung["applied"], 0, "{hung}");
    // The hung command was killed: it started and never finished, and no node came up.
    let log = cluster.log();
    assert!(log.iter().any(|l| l[0] == id && l[3] == "start"), "{log:?}");
    assert!(!log.iter().any(|l| l[0] == id && l[3] == "done"), "the timed-out spawn was not killed: {log:?}");
    assert!(!cluster.nodes().contains_key(&(lost as u32)), "the timed-out spawn made a node");

    // Forgotten by the service...
    wait_for("the timed-out instance to leave the inventory", Duration::from_secs(5), || async {
        let s = api.try_status().await?;
        if instances(&s).contains_key(&lost) {
            Err(format!("instance {lost} still listed: {:?}", instances(&s)))
        } else {
            Ok(())
        }
    })
    .await;
    // ...and planned again: a new spawn, new id, new instance, applied and serving, in the pool
    // that serves the lost one's class now (its own, or the one it merged into meanwhile: a pool
    // per class at first, so pool N is class N's).
    let class = RequestClass::from_index(pool as usize).to_string();
    let again = wait_for("a replacement spawn for the lost pool's class", Duration::from_secs(20), || async {
        let a = api.actions().await;
        let s = api.try_status().await?;
        let inst = instances(&s);
        let host = s["pools"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["classes"].as_array().is_some_and(|c| c.iter().any(|x| *x == *class))))
            .map(|p| p["id"].clone())
            .ok_or_else(|| format!("no pool serves {class}: {}", s["pools"]))?;
        a.iter()
            .find(|r| {
                kind(r) == "spawn"
                    && r["id"].as_str().unwrap() > id.as_str()
                    && r["action"]["pool"] == host
                    && r["issued_at_ms"].as_u64() >= hung["finished_at_ms"].as_u64()
                    && r["state"] == "applied"
                    && inst.get(&instance(r).unwrap()).is_some_and(|i| i.3 == "serving")
            })
            .cloned()
            .ok_or_else(|| {
                format!(
                    "spawns {:?}; instances {inst:?}",
                    a.iter()
                        .filter(|r| kind(r) == "spawn")
                        .map(|r| (&r["id"], &r["action"], &r["state"]))
                        .collect::<Vec<_>>()
                )
            })
    })
    .await;
    assert_ne!(instance(&again), Some(lost), "the replacement reuses the lost instance id: {again}");
    // The plan may have moved meanwhile (its demand and learnt capacity do): the
    // replacement is whatever the planner asked for then, with its reason.
    let d = api.decisions().await;
    let why = d
        .iter()
        .find(|x| x["id"] == again["id"])
        .unwrap_or_else(|| panic!("no decision issued {}: {d:?}", again["id"]));
    assert_eq!(why["source"], "shard-loop", "{why}");
    let planned = format!("×TP{} for", again["action"]["tp"]);
    assert!(why["reason"].as_str().unwrap().contains(&planned), "the replacement is not the planned TP: {why}");
    assert!(again["issued_at_ms"].as_u64() >= hung["finished_at_ms"].as_u64(), "planned again only after the timeout");

    let m = api.metrics().await;
    assert_eq!(metric(&m, "dynamollm_actions_total{kind=\"spawn\",outcome=\"timed-out\"}"), 1.0, "{m}");
    assert!(metric(&m, "dynamollm_actions_total{kind=\"spawn\",outcome=\"applied\"}") >= 3.0, "{m}");
    svc.stop().await.unwrap();
    eprintln!("exec timeout test: {:?} wall", started.elapsed());
}

/// What the loopback orchestrator saw: (Idempotency-Key, command id in the body).
#[derive(Clone, Default)]
struct Hook {
    seen: Arc<Mutex<Vec<(String, String)>>>,
    always_fail: bool,
}

async fn hook(State(h): State<Hook>, headers: HeaderMap, body: String) -> (StatusCode, String) {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let id = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .unwrap_or_default();
    let n = {
        let mut s = h.seen.lock().unwrap();
        s.push((key.clone(), id));
        s.iter().filter(|(k, _)| *k == key).count()
    };
    if h.always_fail || n == 1 {
        (StatusCode::INTERNAL_SERVER_ERROR, "orchestrator on fire".into())
    } else {
        (StatusCode::OK, String::new())
    }
}

async fn webhook_server(always_fail: bool) -> (String, Hook) {
    let h = Hook { always_fail, ..Hook::default() };
    let app = axum::Router::new().route("/dynamollm", axum::routing::post(hook)).with_state(h.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dynamollm", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, h)
}

async fn webhook_service(always_fail: bool) -> (service::RunningService, Api, Hook, tempfile::TempDir, Feeder) {
    let (url, h) = webhook_server(always_fail).await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    let mut opts = Opts::new(&dir.path().join("state"), broker(), &unique_prefix("hook"));
    opts.stale_after_s = 600.0;
    opts.webhook = Some(format!(
        "url = \"{url}\"\nattempts = 3\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\ntimeout_ms = 5000\nkinds = [\"set-clock\"]"
    ));
    let (svc, api) = start(&opts, &cluster).await;
    let feed = feeder(&opts, &cluster, 0.5);
    (svc, api, h, dir, feed)
}

/// A webhook that answers 500 once per command, then 200: every clock
/// command is applied after one retry with the same Idempotency-Key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_500_then_200_is_retried_with_the_same_key_and_applied() {
    let started = Instant::now();
    let (svc, api, h, _dir, _feed) = webhook_service(false).await;
    fleet_serving(&api, true).await;
    // One consistent view while the service keeps running: the actions, what the webhook saw, the
    // status and /metrics, taken while no clock command was issued or settled (the same set-clock
    // records before and after).
    let clock_records = |a: &[Value]| -> Vec<Value> { a.iter().filter(|r| kind(r) == "set-clock").cloned().collect() };
    let (clocks, seen, s, m) = wait_for("a settled view of the clock commands", Duration::from_secs(20), || async {
        let before = clock_records(&api.actions().await);
        let seen = h.seen.lock().unwrap().clone();
        let s = api.try_status().await?;
        let m = api.metrics().await;
        let after = clock_records(&api.actions().await);
        if before.is_empty() || before != after || before.iter().any(|r| r["state"] != "applied") {
            return Err(format!("clock commands moving or none yet: {after:?}"));
        }
        Ok((after, seen, s, m))
    })
    .await;
    let inst = instances(&s);
    for r in &clocks {
        let id = r["id"].as_str().unwrap();
        assert_eq!(r["state"], "applied", "{r}");
        assert_eq!(r["backend"], "webhook", "{r}");
        assert_eq!(r["attempts"], 1, "one dispatch; the retry is the webhook's own: {r}");
        let reqs: Vec<&(String, String)> = seen.iter().filter(|(k, _)| k == id).collect();
        assert_eq!(reqs.len(), 2, "{id}: one 500 then one 200, same key: {seen:?}");
        assert!(reqs.iter().all(|(_, body_id)| body_id == id), "the body carries the same id: {reqs:?}");
        assert!(r["detail"].as_str().unwrap().contains("after 2 attempt"), "{r}");
        // The status shows the clock that was set last on each instance still listed.
        let i = instance(r).unwrap();
        let last = clocks.iter().rev().find(|x| instance(x) == Some(i)).unwrap();
        if std::ptr::eq(last, r) && inst.contains_key(&i) {
            let want = r["action"]["clock_mhz"].as_u64().unwrap();
            assert_eq!(inst[&i].2, want, "instance {i} clock in the status: {inst:?}");
        }
    }
    assert!(seen.iter().all(|(k, _)| clocks.iter().any(|r| r["id"] == *k)), "only set-clock goes to the webhook");
    assert_eq!(
        metric(&m, "dynamollm_actions_total{kind=\"set-clock\",outcome=\"applied\"}"),
        clocks.len() as f64,
        "{m}"
    );
    assert!(!m.contains("kind=\"set-clock\",outcome=\"failed\""), "{m}");
    svc.stop().await.unwrap();
    eprintln!("webhook retry test: {:?} wall", started.elapsed());
}

/// A webhook that always answers 500: the command is recorded failed
/// (retryable) after exactly the configured 3 attempts, all with one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_always_500_is_recorded_failed_after_the_configured_attempts() {
    let started = Instant::now();
    let (svc, api, h, _dir, _feed) = webhook_service(true).await;
    let failed = wait_for("a set-clock recorded failed", Duration::from_secs(20), || async {
        let a = api.actions().await;
        let f: Vec<Value> = a.iter().filter(|r| kind(r) == "set-clock" && r["state"] == "failed").cloned().collect();
        if f.is_empty() {
            Err(format!("{:?}", a.iter().map(|r| (&r["id"], kind(r), &r["state"])).collect::<Vec<_>>()))
        } else {
            Ok(f)
        }
    })
    .await;
    let seen = h.seen.lock().unwrap().clone();
    for r in &failed {
        let id = r["id"].as_str().unwrap();
        assert_eq!(seen.iter().filter(|(k, _)| k == id).count(), 3, "{id}: three requests, one key: {seen:?}");
        assert_eq!(r["applied"], 0, "{r}");
        assert_eq!(r["outcome"]["outcome"], "failed", "{r}");
        assert_eq!(r["outcome"]["retryable"], true, "{r}");
        let d = r["detail"].as_str().unwrap();
        assert!(d.contains("500") && d.contains("gave up after 3 attempts"), "{r}");
    }
    // The failure is counted and leaves nothing pending; the service carries on in auto.
    let s = wait_for("the failed commands to leave the pending set", Duration::from_secs(10), || async {
        let s = api.try_status().await?;
        if s["pending_actions"] == 0 {
            Ok(s)
        } else {
            Err(format!("pending {}", s["pending_actions"]))
        }
    })
    .await;
    assert_eq!(s["mode"], "auto", "{s}");
    let m = api.metrics().await;
    assert!(metric(&m, "dynamollm_actions_total{kind=\"set-clock\",outcome=\"failed\"}") >= failed.len() as f64, "{m}");
    assert!(!m.contains("kind=\"set-clock\",outcome=\"applied\""), "{m}");
    svc.stop().await.unwrap();
    eprintln!("webhook failure test: {:?} wall", started.elapsed());
}

/// The status once the service is in failsafe (within 10 s of wall time).
async fn failsafe(api: &Api) -> Value {
    wait_for("failsafe", Duration::from_secs(10), || async {
        let s = api.try_status().await?;
        if s["mode"] == "failsafe" {
            Ok(s)
        } else {
            Err(format!("mode {} lag {}", s["mode"], s["telemetry_lag_s"]))
        }
    })
    .await
}

/// Telemetry that stops puts the service in failsafe no later than
/// `stale_after_s` + one clock period (5 s) of service time after the last
/// sample: every lowered clock back to 1980, no retire while blind; auto
/// again when telemetry returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_telemetry_means_failsafe_within_a_clock_period() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    let opts = Opts::new(&dir.path().join("state"), broker(), &unique_prefix("stale"));
    let (svc, api) = start(&opts, &cluster).await;
    let feed = feeder(&opts, &cluster, 0.5);
    let before = fleet_serving(&api, true).await;
    let low: BTreeMap<u64, u64> =
        instances(&before).into_iter().filter(|(_, i)| i.2 < 1980).map(|(id, i)| (id, i.2)).collect();
    assert!(!low.is_empty());

    feed.on.store(false, Ordering::SeqCst);
    let stopped_ms = actuators::now_ms();
    let fs = failsafe(&api).await;
    let last_sample_s = fs["time_s"].as_f64().unwrap() - fs["telemetry_lag_s"].as_f64().unwrap();
    assert!(fs["failsafe_reason"].as_str().unwrap().contains("telemetry for"), "{fs}");
    // When it happened: the tick of the first failsafe decision.
    let d = api.decisions().await;
    let entered = d
        .iter()
        .filter(|x| x["source"] == "failsafe")
        .map(|x| x["at_s"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    let stale = opts.stale_after_s;
    assert!(
        entered - last_sample_s > stale && entered - last_sample_s <= stale + 5.0 + 1e-6,
        "failsafe at {entered:.2} s, last sample at {last_sample_s:.2} s: want within ({stale}, {stale} + 5] s"
    );

    // Blind for 60 more service seconds (two shard periods): the load is gone
    // from the service's view, but nothing scales in.
    let fs_end = wait_for("60 s of failsafe", Duration::from_secs(15), || async {
        let s = api.try_status().await?;
        if s["time_s"].as_f64().unwrap() >= entered + 60.0 {
            Ok(s)
        } else {
            Err(format!("time {}", s["time_s"]))
        }
    })
    .await;
    assert_eq!(fs_end["mode"], "failsafe", "{fs_end}");
    let a = api.actions().await;
    for (id, clock) in &low {
        let raised = a.iter().find(|r| {
            kind(r) == "set-clock"
                && instance(r) == Some(*id)
                && r["action"]["clock_mhz"] == 1980
                && r["issued_at_ms"].as_u64().unwrap() >= stopped_ms
        });
        let r = raised.unwrap_or_else(|| panic!("instance {id} was at {clock} MHz and got no set-clock 1980: {a:?}"));
        assert_eq!(r["state"], "applied", "{r}");
    }
    let retires: Vec<&Value> =
        a.iter().filter(|r| kind(r) == "retire" && r["issued_at_ms"].as_u64().unwrap() >= stopped_ms).collect();
    assert!(retires.is_empty(), "retire sent while blind: {retires:?}");
    let inst = instances(&fs_end);
    assert_eq!(inst.keys().collect::<Vec<_>>(), instances(&before).keys().collect::<Vec<_>>(), "the fleet changed");
    assert!(inst.values().all(|i| i.2 == 1980), "clocks not at the top: {inst:?}");
    let held: Vec<Value> = api
        .decisions()
        .await
        .into_iter()
        .filter(|x| x["mode"] == "failsafe" && x["action"]["kind"] == "retire")
        .collect();
    assert!(held.iter().all(|x| x["acted"] == false && x["id"].is_null()), "{held:?}");
    let m = api.metrics().await;
    assert_eq!(metric(&m, "dynamollm_service{quantity=\"failsafe\"}"), 1.0);

    // Telemetry again: auto.
    feed.on.store(true, Ordering::SeqCst);
    wait_for("auto after telemetry returns", Duration::from_secs(10), || async {
        let s = api.try_status().await?;
        if s["mode"] == "auto" {
            Ok(())
        } else {
            Err(format!("mode {}", s["mode"]))
        }
    })
    .await;
    svc.stop().await.unwrap();
    eprintln!("stale test: {:?} wall ({} retire decisions held back)", started.elapsed(), held.len());
}

/// Engines that go silent while arrivals keep coming (router traffic, a
/// gateway's counts): arrivals say nothing of the engines, so the service
/// goes to failsafe and stays there, and no clock goes down while blind.
/// (Any arrival used to refresh one global timestamp: 20 router requests
/// took a service with its only engine frozen back to auto, and it lowered
/// a clock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_engines_with_traffic_still_mean_failsafe() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    let opts = Opts::new(&dir.path().join("state"), broker(), &unique_prefix("frozen"));
    let (svc, api) = start(&opts, &cluster).await;
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c, f) = (cluster.clone(), frozen.clone());
    let nodes = move || if f.load(Ordering::SeqCst) { BTreeMap::new() } else { c.nodes() };
    let _feed = Feeder::start(opts.mqtt.clone(), &opts.prefix, nodes, Duration::from_millis(100), opts.speed, 0.5);
    fleet_serving(&api, true).await;
    // The engines freeze; the gateway's arrivals go on.
    frozen.store(true, Ordering::SeqCst);
    let frozen_ms = actuators::now_ms();
    let blind_after_ms = (opts.stale_after_s / opts.speed * 1000.0).ceil() as u64;
    let fs = failsafe(&api).await;
    let entered = fs["time_s"].as_f64().unwrap();
    // 60 service seconds of traffic with the engines silent: failsafe all along.
    loop {
        let s = api.status().await;
        assert_eq!(s["mode"], "failsafe", "arrivals took the service out of failsafe: {s}");
        if s["time_s"].as_f64().unwrap() >= entered + 60.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lowered: Vec<Value> = api
        .actions()
        .await
        .into_iter()
        .filter(|r| {
            kind(r) == "set-clock"
                && r["action"]["clock_mhz"].as_u64().unwrap_or(1980) < 1980
                // Until stale_after_s has passed the readings are still fresh by the rule: decisions
                // then are made on them. From that moment no clock may go down.
                && r["issued_at_ms"].as_u64().unwrap() >= frozen_ms + blind_after_ms
        })
        .collect();
    assert!(lowered.is_empty(), "a clock went down while the engines were silent: {lowered:?}");
    let m = api.metrics().await;
    assert_eq!(metric(&m, "dynamollm_service{quantity=\"failsafe\"}"), 1.0);
    svc.stop().await.unwrap();
}

/// The broker dies and comes back on its port: failsafe while it is away
/// longer than `stale_after_s`, then the collector reconnects, telemetry flows
/// again (small lag) and the service is back in auto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_failsafe_then_reconnect() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(dir.path());
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    let opts = Opts::new(&dir.path().join("state"), ("127.0.0.1".into(), broker.port), &unique_prefix("brk"));
    let (svc, api) = start(&opts, &cluster).await;
    let _feed = feeder(&opts, &cluster, 0.5);
    let before = fleet_serving(&api, false).await;
    assert!(before["telemetry_lag_s"].as_f64().unwrap() < 2.0, "{before}");

    broker.kill();
    let down = wait_for("failsafe while the broker is down", Duration::from_secs(10), || async {
        let s = api.try_status().await?;
        if s["mode"] == "failsafe" {
            Ok(s)
        } else {
            Err(format!("mode {} lag {}", s["mode"], s["telemetry_lag_s"]))
        }
    })
    .await;
    let lag = down["telemetry_lag_s"].as_f64().unwrap();
    assert!(lag > opts.stale_after_s, "failsafe with a lag of {lag} s: {down}");
    assert!(down["failsafe_reason"].as_str().unwrap().contains("telemetry for"), "{down}");

    broker.start();
    let back_at = Instant::now();
    let up = wait_for("telemetry and auto after the broker restart", Duration::from_secs(15), || async {
        let s = api.try_status().await?;
        let lag = s["telemetry_lag_s"].as_f64().unwrap();
        if s["mode"] == "auto" && lag < 2.0 {
            Ok(s)
        } else {
            Err(format!("mode {} lag {lag}", s["mode"]))
        }
    })
    .await;
    assert!(up["failsafe_reason"].is_null(), "{up}");
    assert_eq!(
        instances(&up).keys().collect::<Vec<_>>(),
        instances(&before).keys().collect::<Vec<_>>(),
        "the fleet survives the outage"
    );
    let a = api.actions().await;
    assert!(
        !a.iter().any(|r| kind(r) == "retire"),
        "nothing retired across the outage: {:?}",
        a.iter().map(|r| (&r["id"], kind(r))).collect::<Vec<_>>()
    );
    svc.stop().await.unwrap();
    eprintln!("broker restart test: {:?} wall, recovered {:?} after the restart", started.elapsed(), back_at.elapsed());
}
