//! `dynamollm serve` against the in-process twin, over real loopback sockets:
//! the bearer token on every endpoint but health, the status document, the
//! modes, the service's own metrics, secrets kept out of logs; and the core's
//! failsafe when telemetry goes stale (virtual time, no sleeps).

use actuators::{Action, Outcome, Placement};
use dynamollm::control::{ControllerConfig, Loops};
use dynamollm::profile::ProfileTable;
use dynamollm::serve::config::{Secret, ServiceConfig};
use dynamollm::serve::core::{CoreConfig, Mode, ServiceCore};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    let svc = dynamollm::serve::start(cfg).await.unwrap();
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

    let m = get(&c, &format!("{base}/metrics"), Some(TOKEN)).await.text().await.unwrap();
    assert!(m.contains("dynamollm_loop_duration_seconds_count{loop=\"tick\"}"), "{m}");
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
        match telemetry::store::Store::open(&dynamollm::serve::store_dir(dir.path()), Default::default()) {
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

fn core() -> ServiceCore {
    let mut profile = ProfileTable::bundled();
    profile.set_slo_multiplier(5.0);
    let cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980);
    ServiceCore::new(
        CoreConfig {
            controller: cfg,
            stale_after_s: 5.0,
            pool_names: (0..9).map(|p| format!("p{p}")).collect(),
            retire_ack_means_stopped: true,
        },
        profile,
        0.0,
    )
}

fn samples(core: &mut ServiceCore, now: f64) {
    let nodes: Vec<(String, u32)> =
        core.instances().filter_map(|r| r.placement.as_ref().map(|p| (p.node.clone(), r.tp))).collect();
    for (node, tp) in nodes {
        let (site, n) = node.split_once('/').unwrap();
        let tags = Tags::node(site, n);
        core.observe_sample(
            now,
            &Sample::Engine(EngineSample {
                ts_ms: 0,
                tags: tags.clone(),
                running: Some(1.0),
                waiting: Some(0.0),
                ..Default::default()
            }),
        );
        for g in 0..tp {
            let t = Tags { gpu: Some(g), ..tags.clone() };
            core.observe_sample(
                now,
                &Sample::Gpu(GpuSample {
                    ts_ms: 0,
                    tags: t,
                    power_w: 300.0,
                    energy_j: Some(300.0 * now),
                    sm_clock_mhz: None,
                    util: None,
                    temperature_c: None,
                    throttle_reasons: None,
                }),
            );
        }
    }
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
    let low = core.instances().filter(|r| r.clock_mhz < 1980).count();
    assert!(
        low > 0,
        "light load brings some clocks down: {:?}",
        core.instances().map(|r| r.clock_mhz).collect::<Vec<_>>()
    );
    let fleet = core.instances().count();
    // Blind from here on.
    let mut entered = None;
    let mut retired = 0;
    let mut raised = Vec::new();
    while t <= 1200.0 {
        for c in core.tick(t, 0) {
            match c.action {
                Action::Retire { .. } => retired += 1,
                Action::SetClock { instance, clock_mhz } => {
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
    assert!(core.stale_reason().unwrap().contains("no telemetry"));
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

/// The saved state round-trips: a core restored from it plans the same next step.
#[test]
fn saved_state_restores_the_plan() {
    let mut a = core();
    a.prime_rates([1.0; 9]);
    for c in a.tick(0.0, 0) {
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
    let back: dynamollm::serve::core::SavedState = serde_json::from_str(&text).unwrap();
    let mut profile = ProfileTable::bundled();
    profile.set_slo_multiplier(5.0);
    let mut b = ServiceCore::restore(
        CoreConfig {
            controller: ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980),
            stale_after_s: 5.0,
            pool_names: (0..9).map(|p| format!("p{p}")).collect(),
            retire_ack_means_stopped: true,
        },
        profile,
        back,
        4.0,
    )
    .unwrap();
    assert_eq!(a.routing(), b.routing());
    assert_eq!(a.instances().count(), b.instances().count());
    let ids_a: Vec<_> = a.tick(5.0, 0).into_iter().map(|c| (c.id, c.action)).collect();
    let ids_b: Vec<_> = b.tick(5.0, 0).into_iter().map(|c| (c.id, c.action)).collect();
    assert_eq!(ids_a, ids_b, "the restored core continues with the same ids and actions");
    assert!(!dynamollm::serve::config::token_matches(&Secret::new(""), ""), "an empty token matches nothing");
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
