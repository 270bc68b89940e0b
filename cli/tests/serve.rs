//! `dynamollm serve` against the in-process twin, over real loopback sockets:
//! the bearer token on every endpoint but health, the status document, the
//! modes, the service's own metrics, secrets kept out of logs; and the core's
//! failsafe when telemetry goes stale, its saved state, its failed commands
//! decided again, an external cluster's declared baseline and the dispatch
//! lanes (virtual time, no sleeps). The core toward an external router is in
//! `serve_routes.rs`.

use actuators::{Action, Outcome, Placement};
use service::config::{Secret, ServiceConfig};
use service::core::{Mode, ServiceCore};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod core_support;
use core_support::{bundled_profile, core, core_config, samples, split_config, ss_split_back, tick_applied};
use telemetry::sample::{EngineSample, GpuSample, Sample, Tags};

const TOKEN: &str = "s3cret-token-7f1d2c";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn twin_config(dir: &std::path::Path) -> ServiceConfig {
    let text = format!(
        r#"
[service]
listen = "127.0.0.1:0"
token = "{TOKEN}"
state_dir = "{}"
speed = 60.0

[cluster]
kind = "twin"
hours = 0.5
"#,
        dir.display()
    );
    ServiceConfig::parse(&text, "test.toml").unwrap()
}

async fn get(c: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = c.get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_needs_the_token_reports_status_and_switches_modes() {
    let logs = Captured::default();
    let w = logs.clone();
    let sub = tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || w.clone()).finish();
    let _guard = tracing::subscriber::set_default(sub);

    let dir = tempfile::tempdir().unwrap();
    let cfg = twin_config(dir.path());
    assert!(!format!("{cfg:?}").contains(TOKEN), "the config's Debug shows the token");
    let svc = service::start(cfg).await.unwrap();
    let base = format!("http://{}", svc.addr);
    let c = reqwest::Client::new();

    assert_eq!(get(&c, &format!("{base}/healthz"), None).await.status(), 200);
    for path in ["/api/v1/status", "/api/v1/decisions", "/metrics", "/"] {
        assert_eq!(get(&c, &format!("{base}{path}"), None).await.status(), 401, "{path} without a token");
        assert_eq!(get(&c, &format!("{base}{path}"), Some("wrong")).await.status(), 401, "{path} with a wrong token");
    }
    // The query token is only for the live page.
    assert_eq!(get(&c, &format!("{base}/api/v1/status?token={TOKEN}"), None).await.status(), 401);
    let r = c.post(format!("{base}/api/v1/mode")).json(&serde_json::json!({"mode": "dry-run"})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let page = get(&c, &format!("{base}/?token={TOKEN}"), None).await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<html"), "the live page is HTML");

    // Ready after the first tick; the status shows the pools and the fleet.
    let mut ready = false;
    for _ in 0..100 {
        if get(&c, &format!("{base}/readyz"), None).await.status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "/readyz never became ready");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s: serde_json::Value = get(&c, &format!("{base}/api/v1/status"), Some(TOKEN)).await.json().await.unwrap();
    assert_eq!(s["mode"], "auto");
    assert_eq!(s["pools"].as_array().unwrap().len(), 9, "one pool per class under dynamollm");
    for p in s["pools"].as_array().unwrap() {
        let (scale, margin) = (p["capacity_scale"].as_f64().unwrap(), p["clock_margin"].as_f64().unwrap());
        // The clock margin lies between its floor (`clock_margin_floor`, 0.85) and the planning margin.
        assert!(scale > 0.0 && (0.85..=1.15).contains(&margin), "what the controller learnt: {p}");
        // No pool has missed yet: nothing holds a spare.
        assert_eq!(p["capacity_scale_after_miss"], serde_json::json!({}), "{p}");
        // What it last learnt, if anything has moved yet, says what moved and on what.
        if !p["learnt"].is_null() {
            let why = p["learnt"]["why"].as_str().unwrap();
            assert!(why.contains(" → ") && p["learnt"]["at_s"].as_f64().is_some(), "{p}");
        }
    }
    assert!(!s["instances"].as_array().unwrap().is_empty(), "the first tick spawned the fleet: {s}");
    assert!(s["totals"]["power_w"].as_f64().unwrap() > 0.0, "the twin reports power: {s}");
    assert_eq!(s["classes"].as_array().unwrap().len(), 9);

    // Dry run: decisions are recorded, none acts.
    let r = c
        .post(format!("{base}/api/v1/mode"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"mode": "dry-run"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{base}/api/v1/mode"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"mode": "sideways"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("auto, dry-run, failsafe"));
    let r = c.post(format!("{base}/api/v1/mode")).bearer_auth(TOKEN).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let before = svc.shared.core.lock().unwrap().decisions().count();
    let routed_at_dry_run: Vec<serde_json::Value> =
        svc.shared.core.lock().unwrap().routed().iter().map(|&p| serde_json::json!(p)).collect();
    // Commands sent in auto mode may still come back in dry-run (an ack after the switch): the
    // outcomes may grow by those, and by nothing sent since.
    let (actions_before, in_flight) = {
        let core = svc.shared.core.lock().unwrap();
        (core.counters.outcomes.values().sum::<u64>(), core.pending().count() as u64)
    };
    // Two virtual minutes pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d: serde_json::Value =
        get(&c, &format!("{base}/api/v1/decisions?limit=2000"), Some(TOKEN)).await.json().await.unwrap();
    let all = d["decisions"].as_array().unwrap();
    let after: Vec<&serde_json::Value> = all.iter().skip(before.min(all.len())).collect();
    for x in &after {
        assert_eq!(x["mode"], "dry-run", "{x}");
        assert_eq!(x["acted"], false, "{x}");
        assert!(x["id"].is_null(), "{x}");
        assert!(x["reason"].as_str().is_some_and(|r| !r.is_empty()), "every decision has a reason: {x}");
    }
    let actions_after = svc.shared.core.lock().unwrap().counters.outcomes.values().sum::<u64>();
    assert!(
        actions_after <= actions_before + in_flight,
        "an action was sent in dry-run: {actions_after} outcomes, {actions_before} before and {in_flight} in flight"
    );

    // The twin follows the table in effect itself, which dry-run does not move: nothing is held,
    // and the classes counted unrouted are those whose planned pool differs from it.
    let st: serde_json::Value = get(&c, &format!("{base}/api/v1/status"), Some(TOKEN)).await.json().await.unwrap();
    let unrouted = st["classes"].as_array().unwrap().iter().filter(|c| c["routed_pool"] != c["pool"]).count();
    assert_eq!(st["held_retires"], serde_json::json!([]));
    let in_effect: Vec<serde_json::Value> =
        st["classes"].as_array().unwrap().iter().map(|c| c["routed_pool"].clone()).collect();
    assert_eq!(in_effect, routed_at_dry_run, "the table in effect moved in dry-run");

    let m = get(&c, &format!("{base}/metrics"), Some(TOKEN)).await.text().await.unwrap();
    assert!(m.contains("dynamollm_loop_duration_seconds_count{loop=\"tick\"}"), "{m}");
    assert!(m.contains(&format!("dynamollm_service{{quantity=\"classes_unrouted\"}} {unrouted}\n")), "{m}");
    assert!(m.contains("dynamollm_actions_total{kind=\"spawn\",outcome=\"applied\"}"), "{m}");
    assert!(m.contains("dynamollm_service{quantity=\"telemetry_lag_seconds\"}"), "{m}");

    // Back to auto; the clock loop lowers some clocks; stopping puts them back to the top.
    let r = c
        .post(format!("{base}/api/v1/mode"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"mode": "auto"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let shared = svc.shared.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let low = loop {
        let low = shared.core.lock().unwrap().instances().filter(|r| r.clock_mhz < 1980).count();
        if low > 0 {
            break low;
        }
        assert!(std::time::Instant::now() < deadline, "no clock was ever lowered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    svc.stop().await.unwrap();
    {
        let core = shared.core.lock().unwrap();
        assert!(core.instances().all(|r| r.clock_mhz == 1980), "clocks left below the top after shutdown");
        let resets = core.decisions().filter(|d| d.decision.source == "shutdown").count();
        assert!(resets >= low, "{resets} shutdown clock resets for {low} lowered clocks");
    }
    drop(shared);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("API up"), "the logs were captured: {text}");
    assert!(!text.contains(TOKEN), "the token appears in the logs");
    assert!(dir.path().join("state.json").exists(), "the state is saved on shutdown");
    // Telemetry went to the embedded store: per-GPU power and energy per instance, per-class arrivals.
    // (The store closes once the service's last handle is gone.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let store = loop {
        match telemetry::store::Store::open(&service::store_dir(dir.path()), Default::default()) {
            Ok(s) => break s,
            Err(e) => assert!(std::time::Instant::now() < deadline, "the store stayed open: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let series = store.series();
    let gpu_energy: Vec<_> = series.iter().filter(|k| k.measurement == "gpu" && k.field == "energy_j").collect();
    assert!(!gpu_energy.is_empty(), "no GPU energy in the store: {series:?}");
    assert!(gpu_energy.iter().all(|k| k.tag("instance").is_some() && k.tag("pool").is_some()), "{gpu_energy:?}");
    assert!(series.iter().any(|k| k.measurement == "arrivals" && k.field == "requests" && k.tag("class").is_some()));
    let k = gpu_energy[0];
    let points = store.range(k, 0, i64::MAX).unwrap();
    assert!(points.len() > 3 && points.windows(2).all(|w| w[1].1 >= w[0].1), "energy counters rise: {points:?}");
}

/// Telemetry that stops puts the service in failsafe at the first tick after
/// it is `stale_after_s` old (within one clock period): every instance back to
/// the top clock, and no scale-in while blind. When telemetry returns, auto again.
#[test]
fn stale_telemetry_means_failsafe_within_one_clock_period() {
    let mut core = core();
    core.prime_rates([0.5; 9]);
    let mut n = 0u32;
    let mut t = 0.0;
    let mut last_sample = 0.0;
    // Ten minutes of a light, steady load with telemetry: clocks come down.
    while t <= 600.0 {
        let cmds = core.tick(t, 0);
        for c in cmds {
            let placement = match c.action {
                Action::Spawn { .. } => {
                    n += 1;
                    Some(Placement { node: format!("site/n{n}"), gpus: vec![], endpoint: None })
                }
                _ => None,
            };
            core.on_outcome(&c.id, &Outcome::Applied { placement, detail: String::new() });
        }
        core.observe_arrivals(t, &[2; 9]);
        samples(&mut core, t);
        last_sample = t;
        t += 5.0;
    }
    assert_eq!(core.mode(), Mode::Auto);
    let mut low = core.instances().filter(|r| r.clock_mhz < 1980).count();
    assert!(
        low > 0,
        "light load brings some clocks down: {:?}",
        core.instances().map(|r| r.clock_mhz).collect::<Vec<_>>()
    );
    let fleet = core.instances().count();
    // Blind from here on. Until the telemetry is `stale_after_s` old the service acts as before
    // (a clock may still come down); from the tick it enters failsafe, only top clocks.
    let mut entered = None;
    let mut retired = 0;
    let mut raised = Vec::new();
    while t <= 1200.0 {
        if entered.is_none() {
            low = core.instances().filter(|r| r.clock_mhz < 1980).count();
        }
        let cmds = core.tick(t, 0);
        let failsafe = core.mode() == Mode::Failsafe;
        for c in cmds {
            match c.action {
                Action::Retire { .. } => retired += 1,
                Action::SetClock { instance, clock_mhz } if failsafe => {
                    assert_eq!(clock_mhz, 1980, "no clock below the top in failsafe");
                    raised.push(instance);
                }
                _ => {}
            }
            core.on_outcome(&c.id, &Outcome::Applied { placement: None, detail: String::new() });
        }
        if entered.is_none() && core.mode() == Mode::Failsafe {
            entered = Some(t);
        }
        t += 5.0;
    }
    let entered = entered.expect("failsafe never entered");
    assert!(
        entered - (last_sample + 5.0) <= 5.0 + 1e-9,
        "failsafe at {entered}, telemetry stale since {}",
        last_sample + 5.0
    );
    assert!(core.stale_reason().unwrap().contains("telemetry for"), "{:?}", core.stale_reason());
    assert_eq!(retired, 0, "no scale-in while blind");
    assert_eq!(raised.len(), low, "every lowered clock goes back to the top, once");
    assert!(core.instances().all(|r| r.clock_mhz == 1980));
    assert!(core.instances().count() >= fleet);
    // Telemetry returns: auto again.
    samples(&mut core, t);
    core.observe_arrivals(t, &[2; 9]);
    core.tick(t, 0);
    assert_eq!(core.mode(), Mode::Auto);
}

/// Staleness per source: an instance whose engine page keeps coming but
/// whose GPUs went silent is stale all the same (and the other way round);
/// the reason names the instance and the source.
#[test]
fn each_source_of_an_instance_counts_on_its_own() {
    for silent in ["GPU", "engine"] {
        let mut core = core();
        core.prime_rates([0.5; 9]);
        let mut n = 0u32;
        let mut t = 0.0;
        while t <= 120.0 {
            tick_applied(&mut core, t, &mut n);
            samples(&mut core, t);
            t += 5.0;
        }
        assert_eq!(core.mode(), Mode::Auto, "{silent}");
        // From here on one source of every instance is silent, the other keeps coming.
        let mut entered = None;
        while t <= 180.0 {
            let nodes: Vec<(String, u32)> =
                core.instances().filter_map(|r| r.placement.as_ref().map(|p| (p.node.clone(), r.tp))).collect();
            for (node, tp) in nodes {
                let (site, node) = node.split_once('/').unwrap();
                let tags = Tags::node(site, node);
                if silent == "GPU" {
                    let e =
                        EngineSample { ts_ms: 0, tags, running: Some(1.0), waiting: Some(0.0), ..Default::default() };
                    core.observe_sample(t, &Sample::Engine(e));
                } else {
                    for g in 0..tp {
                        let tags = Tags { gpu: Some(g), ..tags.clone() };
                        let s = GpuSample {
                            ts_ms: 0,
                            tags,
                            power_w: 300.0,
                            energy_j: None,
                            sm_clock_mhz: None,
                            util: None,
                            temperature_c: None,
                            throttle_reasons: None,
                        };
                        core.observe_sample(t, &Sample::Gpu(s));
                    }
                }
            }
            core.tick(t, 0);
            if entered.is_none() && core.mode() == Mode::Failsafe {
                entered = Some(t);
            }
            t += 5.0;
        }
        let entered = entered.unwrap_or_else(|| panic!("{silent} telemetry stopped and no failsafe"));
        assert!(entered <= 120.0 + 5.0 + 5.0 + 1e-9, "{silent}: failsafe at {entered}");
        let why = core.stale_reason().unwrap();
        assert!(why.contains(&format!("sent no {silent} telemetry")) && why.contains("serving instance "), "{why}");
    }
}

/// The saved state round-trips: a core restored from it plans the same next step.
#[test]
fn saved_state_restores_the_plan() {
    let mut a = core();
    a.prime_rates([1.0; 9]);
    let first = a.tick(0.0, 0);
    let first_ids: std::collections::BTreeSet<_> = first.iter().map(|c| c.id.clone()).collect();
    for c in first {
        a.on_outcome(
            &c.id,
            &Outcome::Applied {
                placement: Some(Placement { node: format!("s/{}", c.id), gpus: vec![], endpoint: None }),
                detail: String::new(),
            },
        );
    }
    a.observe_arrivals(1.0, &[3; 9]);
    let saved = a.save(4.0);
    let text = serde_json::to_string(&saved).unwrap();
    let back: service::core::SavedState = serde_json::from_str(&text).unwrap();
    let mut b = ServiceCore::restore(core_config(), bundled_profile(), back, 4.0).unwrap();
    assert_eq!(a.routing(), b.routing());
    assert_eq!(a.routed(), b.routed(), "the router's acknowledged table");
    assert_eq!(a.held_retires().collect::<Vec<_>>(), b.held_retires().collect::<Vec<_>>());
    assert_eq!(a.instances().count(), b.instances().count());
    let ids_a: Vec<_> = a.tick(5.0, 0).into_iter().map(|c| (c.id, c.action)).collect();
    let ids_b: Vec<_> = b.tick(5.0, 0).into_iter().map(|c| (c.id, c.action)).collect();
    assert_eq!(ids_a, ids_b, "the restored core continues with the same ids and actions");
    // A state lost: a new core's ids are not the old ones (an agent that
    // remembers applied ids would answer the new commands "already applied").
    // The same decisions from a fresh state: the same actions, other ids.
    let mut fresh = core();
    fresh.prime_rates([1.0; 9]);
    let new_ids: Vec<_> = fresh.tick(0.0, 0).into_iter().map(|c| c.id).collect();
    assert_eq!(new_ids.len(), first_ids.len());
    assert!(new_ids.iter().all(|id| !first_ids.contains(id)), "{new_ids:?} reuses {first_ids:?}");
    // A table in effect that differs from the controller's survives too.
    let split = ss_split_back();
    let back = ServiceCore::restore(
        split_config(),
        bundled_profile(),
        serde_json::from_str(&serde_json::to_string(&split.save(0.0)).unwrap()).unwrap(),
        0.0,
    )
    .unwrap();
    assert_ne!(split.routed(), split.routing());
    assert_eq!((back.routed(), back.routing()), (split.routed(), split.routing()));
    assert!(!service::config::token_matches(&Secret::new(""), ""), "an empty token matches nothing");
}

/// A clock command that fails leaves the instance at its old clock in the
/// service's view (so the controller decides again), and one that is
/// applied moves it.
#[test]
fn a_failed_clock_command_keeps_the_old_clock() {
    let mut core = core();
    core.prime_rates([0.5; 9]);
    let mut n = 0u32;
    let (mut failed, mut applied) = (0, 0);
    let mut t = 0.0;
    while t <= 600.0 {
        for c in core.tick(t, 0) {
            match c.action {
                Action::Spawn { .. } => {
                    n += 1;
                    let placement = Some(Placement { node: format!("site/n{n}"), gpus: vec![], endpoint: None });
                    core.on_outcome(&c.id, &Outcome::Applied { placement, detail: String::new() });
                }
                Action::SetClock { instance, clock_mhz } => {
                    let before = core.instances().find(|r| r.id == instance).map(|r| r.clock_mhz);
                    assert_eq!(
                        before,
                        Some(clock_mhz),
                        "the inventory shows the clock asked for while it is in flight"
                    );
                    if failed <= applied {
                        core.on_outcome(&c.id, &Outcome::Failed { reason: "500".into(), retryable: true });
                        failed += 1;
                        let after = core.instances().find(|r| r.id == instance).unwrap().clock_mhz;
                        assert_ne!(after, clock_mhz, "a failed clock command must not count as set");
                    } else {
                        core.on_outcome(&c.id, &Outcome::Applied { placement: None, detail: String::new() });
                        applied += 1;
                        assert_eq!(core.instances().find(|r| r.id == instance).unwrap().clock_mhz, clock_mhz);
                    }
                }
                _ => core.on_outcome(&c.id, &Outcome::Applied { placement: None, detail: String::new() }),
            }
        }
        core.observe_arrivals(t, &[2; 9]);
        samples(&mut core, t);
        t += 5.0;
    }
    assert!(failed > 0 && applied > 0, "both cases ran: {failed} failed, {applied} applied");
}

/// A retire that fails leaves the instance serving in the service's view,
/// and the controller decides again: the surplus instance is retired at a
/// later plan instead of running, counted as draining, for ever.
#[test]
fn a_failed_retire_is_decided_again() {
    use controller::control::InstanceState;
    let mut core = core();
    core.prime_rates([12.0; 9]);
    let mut failed: Option<(actuators::InstanceId, f64)> = None;
    let mut retried_at = None;
    let mut t = 0.0;
    while t <= 5400.0 && retried_at.is_none() {
        let per_tick = if t < 1200.0 { [60; 9] } else { [1; 9] };
        for c in core.tick(t, 0) {
            let outcome = match c.action {
                Action::Spawn { instance, .. } => Outcome::Applied {
                    placement: Some(Placement { node: format!("site/n{}", instance.0), gpus: vec![], endpoint: None }),
                    detail: String::new(),
                },
                Action::Retire { instance } if failed.is_none() => {
                    failed = Some((instance, t));
                    Outcome::Failed { reason: "exec: exit status 1".into(), retryable: true }
                }
                Action::Retire { instance } if failed.is_some_and(|(i, _)| i == instance) => {
                    retried_at = Some(t);
                    Outcome::Applied { placement: None, detail: String::new() }
                }
                _ => Outcome::Applied { placement: None, detail: String::new() },
            };
            core.on_outcome(&c.id, &outcome);
            if let (Some((i, at)), Action::Retire { instance }) = (failed, &c.action) {
                if at == t && i == *instance {
                    let state = core.instances().find(|r| r.id == i).map(|r| r.state);
                    assert_eq!(state, Some(InstanceState::Serving), "instance {} after its retire failed", i.0);
                }
            }
        }
        core.observe_arrivals(t, &per_tick);
        samples(&mut core, t);
        t += 5.0;
    }
    let (instance, at) = failed.expect("no retire in the test");
    let again = retried_at.unwrap_or_else(|| panic!("instance {} was not retired again after {at} s", instance.0));
    assert!(again > at, "retired again at {again} s, failed at {at} s");
    assert!(core.instances().all(|r| r.id != instance), "the retired instance is gone");
    eprintln!("retire of instance {} failed at {at} s, decided again at {again} s", instance.0);
}

/// A clock command that fails is sent again while the controller still
/// wants that clock (it does not count the failed one as set).
#[test]
fn a_failed_clock_command_is_sent_again() {
    let mut core = core();
    core.prime_rates([0.5; 9]);
    let mut failed: Option<(actuators::InstanceId, u32, f64)> = None;
    let mut again_at = None;
    let mut t = 0.0;
    while t <= 900.0 && again_at.is_none() {
        for c in core.tick(t, 0) {
            let outcome = match c.action {
                Action::Spawn { instance, .. } => Outcome::Applied {
                    placement: Some(Placement { node: format!("site/n{}", instance.0), gpus: vec![], endpoint: None }),
                    detail: String::new(),
                },
                Action::SetClock { instance, clock_mhz } if clock_mhz < 1980 && failed.is_none() => {
                    failed = Some((instance, clock_mhz, t));
                    Outcome::Failed { reason: "nvml: insufficient permissions".into(), retryable: true }
                }
                Action::SetClock { instance, .. } if failed.is_some_and(|(i, _, _)| i == instance) => {
                    again_at = Some(t);
                    Outcome::Applied { placement: None, detail: String::new() }
                }
                _ => Outcome::Applied { placement: None, detail: String::new() },
            };
            core.on_outcome(&c.id, &outcome);
        }
        core.observe_arrivals(t, &[2; 9]);
        samples(&mut core, t);
        t += 5.0;
    }
    let (instance, clock_mhz, at) = failed.expect("no clock was lowered");
    let again = again_at.unwrap_or_else(|| {
        panic!("instance {}'s clock ({clock_mhz} MHz, failed at {at} s) was not sent again", instance.0)
    });
    assert!(again - at <= 60.0, "sent again at {again} s, failed at {at} s");
    eprintln!("clock {clock_mhz} MHz of instance {} failed at {at} s, sent again at {again} s", instance.0);
}

/// On an external cluster the savings are measured against the static fleet the operator
/// declares (`cluster.baseline_instances`): TP8 instances at the top clock drawing the
/// profile's power at the load seen. Without it, an estimate sized for the highest load seen.
#[test]
fn an_external_clusters_savings_are_measured_against_the_declared_static_fleet() {
    let run = |declared: Option<u32>| {
        let mut core = core();
        if let Some(n) = declared {
            core.set_baseline_instances(n);
        }
        core.prime_rates([0.5; 9]);
        let mut n = 0u32;
        let mut t = 0.0;
        while t <= 600.0 {
            tick_applied(&mut core, t, &mut n);
            core.observe_arrivals(t, &[2; 9]);
            samples(&mut core, t);
            t += 5.0;
        }
        core.totals()
    };
    let (estimate, six, twelve) = (run(None), run(Some(6)), run(Some(12)));
    // The fleet is the same; only what it is measured against changes.
    assert_eq!(estimate.energy_j, six.energy_j);
    assert!(six.energy_j > 0.0);
    // 3.6 req/s: the estimate sizes one TP8 instance for it; six draw more, twelve about twice
    // six's idle power more again.
    assert!(
        six.baseline_power_w > estimate.baseline_power_w,
        "{} vs {}",
        six.baseline_power_w,
        estimate.baseline_power_w
    );
    assert!(
        twelve.baseline_power_w > 1.5 * six.baseline_power_w,
        "{} vs {}",
        twelve.baseline_power_w,
        six.baseline_power_w
    );
    assert!(twelve.baseline_energy_j > six.baseline_energy_j && six.baseline_energy_j > estimate.baseline_energy_j);
    for t in [&estimate, &six, &twelve] {
        assert!((t.savings_ratio - (1.0 - t.energy_j / t.baseline_energy_j)).abs() < 1e-12);
    }
}

/// A tick's commands go out in lanes: the fleet's changes in one, in order, with the clock of
/// an instance spawned in the same tick after its spawn; every other instance's commands beside
/// them (a set-clock never waits behind a spawn, which takes minutes on a real cluster); routes
/// in a lane of their own.
#[test]
fn a_ticks_commands_go_out_in_lanes_the_fleet_changes_in_one() {
    use actuators::{ActionId, Command, InstanceId, PoolId, SpawnFrom};
    let cmd = |id: &str, action: Action| Command { id: ActionId(id.into()), action, placement: None, issued_at_ms: 0 };
    let (a, b, c) = (InstanceId(1), InstanceId(2), InstanceId(3));
    let cmds = vec![
        cmd(
            "spawn-a",
            Action::Spawn { instance: a, pool: PoolId(0), tp: 8, clock_mhz: 1980, from: SpawnFrom::WarmStandby },
        ),
        cmd("clock-b", Action::SetClock { instance: b, clock_mhz: 1600 }),
        cmd("clock-a", Action::SetClock { instance: a, clock_mhz: 1400 }),
        cmd("route-ss", Action::Route { class: "SS".into(), pool: PoolId(1) }),
        cmd("retire-c", Action::Retire { instance: c }),
        cmd("route-sm", Action::Route { class: "SM".into(), pool: PoolId(1) }),
        cmd(
            "spawn-d",
            Action::Spawn {
                instance: InstanceId(4),
                pool: PoolId(0),
                tp: 4,
                clock_mhz: 1980,
                from: SpawnFrom::WarmStandby,
            },
        ),
        cmd("clock-b2", Action::SetClock { instance: b, clock_mhz: 1800 }),
    ];
    let lanes: Vec<Vec<String>> =
        service::lanes(cmds).into_iter().map(|l| l.into_iter().map(|c| c.id.0).collect()).collect();
    assert_eq!(
        lanes,
        [vec!["spawn-a", "clock-a", "retire-c", "spawn-d"], vec!["clock-b", "clock-b2"], vec!["route-ss", "route-sm"]]
    );
}

/// In the twin the fleet the first tick asks for is up at once (as in `sim`): its start teaches
/// nothing of how long a spawn takes, where a real cluster's first spawns do. And the first tick
/// closes no window of arrivals: the rates primed from the trace's first minutes stand.
#[test]
fn the_twins_first_fleet_teaches_no_spawn_time_and_the_first_tick_keeps_the_primed_rates() {
    let mut leads = Vec::new();
    for up in [true, false] {
        let mut c = core();
        let lead0 = c.spawn_lead_s();
        let mut rates = [0.0; 9];
        rates[8] = 2.0;
        c.prime_rates(rates);
        if up {
            c.first_fleet_up();
        }
        let mut spawned = 0;
        tick_applied(&mut c, 0.0, &mut spawned);
        assert!(spawned > 0, "the first tick spawns a fleet");
        let st = c.status(0.0);
        let ll = st["classes"].as_array().unwrap().iter().find(|x| x["class"] == "LL").unwrap();
        let smoothed = ll["smoothed_rps"].as_f64().unwrap();
        assert_eq!(smoothed, 2.0, "the first tick keeps the primed rate");
        samples(&mut c, 2.5);
        tick_applied(&mut c, 5.0, &mut spawned);
        leads.push((lead0, c.spawn_lead_s()));
    }
    let [(before, twin), (_, real)] = leads[..] else { unreachable!() };
    assert_eq!(twin, before, "the twin's first fleet taught a spawn time");
    assert!(real < before, "a real cluster's first spawns (2.5 s) teach one: {real} from {before}");
}
