//! End to end over real sockets: `dynamollm serve` manages a cluster of
//! `dynamollm twin serve` engine processes, each with a `dynamollm agent`
//! beside it publishing the node's GPU and engine telemetry over the real
//! Mosquitto broker and taking clock commands from it. A cluster manager
//! (this test, behind the service's webhook backend) starts and stops the
//! engine and agent processes on spawn and retire, draining before it
//! stops one. The bundled Conversation hour is replayed in accelerated time
//! through the service's request router (OpenAI streaming), with the
//! controller's default settings, learning from what the clients see. It is
//! held to the bounds of `dynamollm rehearse`: every class holds its P99
//! SLOs as the clients measured them, no request fails, the engines' GPU
//! energy is at most 1.10× `sim`'s dynamollm on the same trace and seed,
//! and a pool learnt from the clients' view.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use dynamollm::cmd::rehearse::{client_classes, count_answer, learnt, sim_reference, Counts, SLO_MULTIPLIER};
use dynamollm::loadgen::stream_completion;
use service::config::ServiceConfig;
use sim::Workload;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telemetry::{ClassBoundaries, SloRule, CLASS_COUNT};

const BIN: &str = env!("CARGO_BIN_EXE_dynamollm");
const CM_TOKEN: &str = "cluster-manager-token";
const SVC_TOKEN: &str = "service-token";

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn broker() -> (String, u16) {
    let v = std::env::var("DYNAMOLLM_TEST_MQTT")
        .expect("DYNAMOLLM_TEST_MQTT must name the test Mosquitto broker (host:port); scripts/test starts one");
    let (h, p) = v.rsplit_once(':').expect("DYNAMOLLM_TEST_MQTT is host:port");
    (h.to_string(), p.parse().expect("DYNAMOLLM_TEST_MQTT port"))
}

struct Engine {
    twin: Child,
    agent: Child,
    url: String,
}

struct Manager {
    dir: PathBuf,
    speed: f64,
    prefix: String,
    broker: (String, u16),
    engines: Mutex<BTreeMap<u32, Engine>>,
    /// Ids of the commands carried out, and how often each came.
    seen: Mutex<HashMap<String, u32>>,
    finals: Mutex<Vec<String>>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        for e in self.engines.get_mut().unwrap().values_mut() {
            let _ = e.agent.kill();
            let _ = e.twin.kill();
            let _ = e.agent.wait();
            let _ = e.twin.wait();
        }
    }
}

fn metric_sum(page: &str, name: &str, filter: &dyn Fn(&str) -> bool) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && filter(l))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

impl Manager {
    fn spawn(&self, id: u32, tp: u64, clock: u64) -> Result<String, String> {
        let mut twin = Command::new(BIN)
            .args([
                "twin",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--tp",
                &tp.to_string(),
                "--clock-mhz",
                &clock.to_string(),
            ])
            .args(["--speed", &self.speed.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(twin.stderr.take().unwrap()).read_line(&mut line).map_err(|e| e.to_string())?;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .ok_or(format!("twin said {line:?}"))?
            .to_string();
        let cfg = self.dir.join(format!("agent-{id}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[agent]\nsite = \"e2e\"\nnode = \"i{id}\"\ngpu = \"twin\"\ntwin_url = \"{url}\"\nengine_url = \"{url}/metrics\"\n\
                 instance = \"i{id}\"\ninterval_s = 0.05\nstate_file = \"{}\"\ncommand_key_file = \"{}\"\n\n[agent.mqtt]\nhost = \"{}\"\nport = {}\n\
                 topic_prefix = \"{}\"\n",
                self.dir.join(format!("agent-{id}.state")).display(),
                self.dir.join("command.key").display(),
                self.broker.0,
                self.broker.1,
                self.prefix
            ),
        )
        .map_err(|e| e.to_string())?;
        let agent = Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.engines.lock().unwrap().insert(id, Engine { twin, agent, url: url.clone() });
        Ok(url)
    }
}

async fn actions(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Json(cmd): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {CM_TOKEN}")) {
        return (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"error": "token"})));
    }
    let id = cmd["id"].as_str().unwrap_or("").to_string();
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert_eq!(key, id, "the Idempotency-Key is the action id");
    *m.seen.lock().unwrap().entry(id.clone()).or_default() += 1;
    let a = &cmd["action"];
    let instance = a["instance"].as_u64().unwrap_or(u64::MAX) as u32;
    match a["kind"].as_str() {
        Some("spawn") => {
            let existing = m.engines.lock().unwrap().get(&instance).map(|e| e.url.clone());
            let url = match existing {
                Some(u) => u,
                None => {
                    let (m2, tp, clock) = (m.clone(), a["tp"].as_u64().unwrap(), a["clock_mhz"].as_u64().unwrap());
                    match tokio::task::spawn_blocking(move || m2.spawn(instance, tp, clock)).await.unwrap() {
                        Ok(u) => u,
                        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({"error": e}))),
                    }
                }
            };
            (
                StatusCode::OK,
                Json(serde_json::json!({"placement": {"node": format!("e2e/i{instance}"), "endpoint": url}})),
            )
        }
        Some("retire") => {
            let url = m.engines.lock().unwrap().get(&instance).map(|e| e.url.clone());
            if let Some(url) = url {
                // Drain: the router sends it nothing new; wait for what it holds.
                let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut page = String::new();
                // Empty twice, 200 ms apart: a request the router sent just before the
                // instance was marked draining has reached it by then.
                let mut empty = 0;
                while Instant::now() < deadline && empty < 2 {
                    page = match http.get(format!("{url}/metrics")).send().await {
                        Ok(r) => r.text().await.unwrap_or_default(),
                        Err(e) => panic!("{url}/metrics while draining: {e}"),
                    };
                    let held = metric_sum(&page, "vllm:num_requests_running", &|_| true)
                        + metric_sum(&page, "vllm:num_requests_waiting", &|_| true);
                    empty = if held == 0.0 { empty + 1 } else { 0 };
                    tokio::time::sleep(Duration::from_millis(if empty > 0 { 200 } else { 20 })).await;
                }
                let mut e = m.engines.lock().unwrap().remove(&instance).unwrap();
                // SIGTERM to the agent first (it resets the clock on the live engine and says goodbye),
                // then to the engine (it finishes the streams in flight); SIGKILL after 10 s.
                let _ = tokio::task::spawn_blocking(move || {
                    for child in [&mut e.agent, &mut e.twin] {
                        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while child.try_wait().ok().flatten().is_none() {
                            if Instant::now() > deadline {
                                eprintln!("e2e: process {} ignored SIGTERM; killed", child.id());
                                let _ = child.kill();
                                let _ = child.wait();
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
                .await;
                m.finals.lock().unwrap().push(page);
            }
            (StatusCode::OK, Json(serde_json::json!({})))
        }
        // The router follows the service's routing table.
        _ => (StatusCode::OK, Json(serde_json::json!({}))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_manages_twin_engines_and_agents_over_mqtt_for_an_hour() {
    // 10×: the debug binaries (router, service, engines, agents) load 2 cores,
    // and the clients count the router's part of each TTFT at the wall's rate.
    // At 15× one run held every class at 99.30% or more, the next had MS's first
    // tokens at 98.75% where the engines' own stamps said 99.91% (load average 6);
    // 10× held the lowest class at 99.39% (energy 1.047× the sim's).
    let speed = env_f64("DYNAMOLLM_E2E_SPEED", 10.0);
    // 0.3: single-pool needs two TP8 instances. Below it one TP8 instance
    // carries the whole hour, and dynamollm's pools (one per prompt band, so a
    // short prompt never queues behind a long prefill) cannot beat it.
    let scale = env_f64("DYNAMOLLM_E2E_SCALE", 0.3);
    let seed = 1;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("e2e{}", std::process::id());
    // Clock commands to the agents go signed with this key (both sides read it).
    let command_key = dir.path().join("command.key");
    std::fs::write(&command_key, "e2e-command-key-0123456789abcdef0123456789abcdef\n").unwrap();
    let manager = Arc::new(Manager {
        dir: dir.path().to_path_buf(),
        speed,
        prefix: prefix.clone(),
        broker: broker(),
        engines: Mutex::new(BTreeMap::new()),
        seen: Mutex::new(HashMap::new()),
        finals: Mutex::new(Vec::new()),
    });
    let app = Router::new().route("/actions", post(actions)).with_state(manager.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cm = format!("http://{}/actions", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (host, port) = broker();
    // The operator knows today's load: the first fleet is planned for the first minutes' rates.
    let workload = Workload::from_options(None, None, None, scale, None, seed).unwrap();
    let first =
        dynamollm::closed_loop::count_minutes(&Workload { hours: Some(5.0 / 60.0), ..workload.clone() }).unwrap();
    let initial: Vec<String> =
        telemetry::RequestClass::ALL.iter().map(|c| format!("{c} = {}", first.peak(0, 5)[c.index()])).collect();
    let cfg = ServiceConfig::parse(
        &format!(
            r#"
[service]
listen = "127.0.0.1:0"
token = "{SVC_TOKEN}"
state_dir = "{state}"
speed = {speed}
stale_after_s = 60.0
slo_multiplier = {slo_multiplier}
initial_class_rps = {{ {initial} }}

[cluster]
kind = "external"
gpus = 1024

[router]
listen = "127.0.0.1:0"

[telemetry.mqtt]
host = "{host}"
port = {port}
client_id = "{prefix}-service"
topic_prefix = "{prefix}"

[actuators]
order = ["mqtt", "webhook"]

[actuators.webhook]
url = "{cm}"
token = "{CM_TOKEN}"
timeout_ms = 120000

[actuators.mqtt]
kinds = ["set-clock"]
ack_timeout_ms = 3000
command_key_file = "{command_key}"
"#,
            state = dir.path().join("state").display(),
            command_key = command_key.display(),
            initial = initial.join(", "),
            slo_multiplier = SLO_MULTIPLIER,
        ),
        "e2e.toml",
    )
    .unwrap();
    let svc = service::start(cfg).await.unwrap();
    let api = format!("http://{}", svc.addr);
    let router = format!("http://{}", svc.router_addr.unwrap());
    // No request may hang the test: a stalled stream becomes an error naming it.
    let http = reqwest::Client::builder().read_timeout(Duration::from_secs(60)).build().unwrap();
    let status = |http: reqwest::Client, api: String| async move {
        http.get(format!("{api}/api/v1/status"))
            .bearer_auth(SVC_TOKEN)
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };

    // The cluster is up before traffic comes (the service starts on an idle cluster).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(http.clone(), api.clone()).await;
        let inst = s["instances"].as_array().unwrap();
        if !inst.is_empty() && inst.iter().all(|i| i["state"] == "serving") {
            break;
        }
        assert!(Instant::now() < deadline, "the first fleet never served: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The replay: the bundled hour, scaled, each request at its time over the router.
    let requests: Vec<_> = workload.arrivals().unwrap().map(|r| r.unwrap()).collect();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for r in &requests {
        let at = started + Duration::from_secs_f64(r.arrival_s / speed);
        tokio::time::sleep_until(at.into()).await;
        let (http, router, input, output) = (http.clone(), router.clone(), r.input_tokens, r.output_tokens.max(1));
        tasks.push(tokio::spawn(async move { stream_completion(&http, &router, "llama2-70b", input, output).await }));
    }
    // Each answer judged as its client saw it, as `dynamollm rehearse` judges them.
    let physics = sim::Physics::default_h100_llama70b();
    let boundaries = ClassBoundaries::default();
    let slo = sim::measure::class_slos(&physics, &workload.slo_pairs, &boundaries, SloRule::Multiplier(SLO_MULTIPLIER));
    let mut counts: Counts = [[0; 4]; CLASS_COUNT];
    let mut errors = Vec::new();
    let mut tokens = 0u64;
    for (t, r) in tasks.into_iter().zip(&requests) {
        let class = boundaries.classify(r.input_tokens, r.output_tokens.max(1));
        match t.await.unwrap() {
            Ok(timing) => {
                tokens += u64::from(timing.tokens);
                count_answer(&mut counts, class, &timing, slo[class.index()], speed);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let replay_wall_s = started.elapsed().as_secs_f64();
    let s = status(http.clone(), api.clone()).await;
    let mut actions: HashMap<String, u64> = HashMap::new();
    let audit: serde_json::Value = http
        .get(format!("{api}/api/v1/actions?limit=100000"))
        .bearer_auth(SVC_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for a in audit["actions"].as_array().unwrap() {
        *actions
            .entry(format!("{}:{}", a["action"]["kind"].as_str().unwrap(), a["state"].as_str().unwrap()))
            .or_default() += 1;
    }
    // How long the control step took on the wall (the router waits for the core while it decides).
    let service_page =
        http.get(format!("{api}/metrics")).bearer_auth(SVC_TOKEN).send().await.unwrap().text().await.unwrap();
    let is_tick = |l: &str| l.contains("loop=\"tick\"");
    let (tick_s, ticks) = (
        metric_sum(&service_page, "dynamollm_loop_duration_seconds_sum", &is_tick),
        metric_sum(&service_page, "dynamollm_loop_duration_seconds_count", &is_tick),
    );
    svc.stop().await.unwrap();

    // Energy and SLO counters of every engine, retired or still up.
    let mut pages: Vec<String> = manager.finals.lock().unwrap().clone();
    let live: Vec<String> = manager.engines.lock().unwrap().values().map(|e| e.url.clone()).collect();
    for url in live {
        pages.push(http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap());
    }
    let energy_j: f64 = pages.iter().map(|p| metric_sum(p, "dynamollm_twin_gpu_energy_joules_total", &|_| true)).sum();
    let mut table = String::new();
    for class in telemetry::RequestClass::ALL {
        let c = format!("class=\"{class}\"");
        let count = |kind: &str, result: &str| -> f64 {
            pages
                .iter()
                .map(|p| {
                    metric_sum(p, "dynamollm_twin_slo_total", &|l| {
                        l.contains(&c)
                            && l.contains(&format!("kind=\"{kind}\""))
                            && l.contains(&format!("result=\"{result}\""))
                    })
                })
                .sum()
        };
        let (t_ok, t_miss, g_ok, g_miss) =
            (count("ttft", "ok"), count("ttft", "miss"), count("tbt", "ok"), count("tbt", "miss"));
        if t_ok + t_miss == 0.0 {
            continue;
        }
        table += &format!(
            "  {class}: {} requests, TTFT ok {:.4}, TBT ok {:.4}\n",
            t_ok + t_miss,
            t_ok / (t_ok + t_miss),
            g_ok / (g_ok + g_miss).max(1.0)
        );
    }

    // single-pool and dynamollm on the same trace and seed, in the twin, with the service's settings.
    let (base_kwh, sim_kwh) = sim_reference(&physics, &workload, true).unwrap();
    let kwh = energy_j / 3.6e6;
    let classes = client_classes(&counts);
    let learnt = learnt(&s);
    let repeated: Vec<_> =
        manager.seen.lock().unwrap().iter().filter(|(_, &n)| n > 1).map(|(k, n)| (k.clone(), *n)).collect();
    let clients: String = classes
        .iter()
        .map(|(c, k)| {
            format!(
                "  {c}: {} requests, clients: TTFT ok {:.4}, TBT ok {:.4}\n",
                k.requests, k.ttft_attainment, k.tbt_attainment
            )
        })
        .collect();
    eprintln!(
        "e2e: {} requests (scale {scale}, speed {speed}×, {replay_wall_s:.1} s wall), {tokens} tokens, {} errors\n\
         e2e: energy {kwh:.3} kWh vs sim dynamollm {sim_kwh:.3} kWh (ratio {:.3}) and single-pool {base_kwh:.3} kWh ({:.3}×)\n\
         {clients}e2e: the engines' own counters:\n{table}\
         e2e: {ticks} control steps, {:.1} ms each on the wall\n\
         e2e: learnt {learnt:?}\n\
         e2e: actions {actions:?}; router {}; webhook commands seen twice: {repeated:?}",
        requests.len(),
        errors.len(),
        kwh / sim_kwh,
        kwh / base_kwh,
        1e3 * tick_s / ticks.max(1.0),
        s["router"],
    );
    // The bounds `dynamollm rehearse` is held to (README, docs/results.md).
    assert!(errors.is_empty(), "{} requests failed, e.g. {:?}", errors.len(), &errors[..errors.len().min(3)]);
    assert_eq!(s["router"]["rejected"], 0, "the router turned requests away: {}", s["router"]);
    for (c, k) in &classes {
        assert!(
            k.slo_attainment >= 0.99,
            "class {c} holds its P99 SLOs only {:.4} of the time: {k:?}",
            k.slo_attainment
        );
    }
    assert!(kwh > 0.0 && kwh <= 1.10 * sim_kwh, "energy {kwh:.3} kWh is over 1.10× sim dynamollm's {sim_kwh:.3} kWh");
    assert!(
        learnt.values().any(|l| l.capacity_scale.is_some_and(|v| v != 1.0) || l.clock_margin.is_some_and(|v| v != 1.0)),
        "no pool learnt anything from the clients' view: {learnt:?}"
    );
    // The status says what a pool learnt and on what: a class's share over its window's requests.
    let said: Vec<&str> = s["pools"].as_array().unwrap().iter().filter_map(|p| p["learnt"]["why"].as_str()).collect();
    assert!(
        said.iter().any(|w| w.contains(" held ") && w.contains(" requests (chance of as many misses")),
        "no pool says what it learnt from: {said:?}"
    );
    assert!(
        actions.keys().any(|k| k.starts_with("set-clock:applied")),
        "clock commands went over MQTT to the agents: {actions:?}"
    );
    assert!(repeated.is_empty(), "a command reached the cluster manager twice: {repeated:?}");
}
