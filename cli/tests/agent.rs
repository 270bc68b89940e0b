//! The node agent against the real Mosquitto that `scripts/test` starts
//! (`DYNAMOLLM_TEST_MQTT`) and a `twin serve` instance in this process as
//! its GPUs and engine: birth, telemetry, clock commands (bounded, applied
//! once per id, remembered across restarts), bad commands, shutdown.

use actuators::{Ack, Action, ActionId, Command, InstanceId, Outcome, PoolId};
use agent::AgentConfig;
mod twin_engine;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use std::time::{Duration, Instant};
use telemetry::gpu::TwinClockState;
use telemetry::mqtt::TelemetryPayload;
use tokio::sync::{mpsc, oneshot};

fn broker() -> (String, u16) {
    let hp = std::env::var("DYNAMOLLM_TEST_MQTT").unwrap_or_else(|_| {
        panic!("DYNAMOLLM_TEST_MQTT is not set: run the tests through scripts/test (it installs and starts Mosquitto)")
    });
    let (h, p) = hp.rsplit_once(':').expect("DYNAMOLLM_TEST_MQTT is host:port");
    (h.to_string(), p.parse().expect("DYNAMOLLM_TEST_MQTT port"))
}

/// A twin instance (TP4, 1980 MHz by default) served on a loopback port.
async fn twin() -> String {
    twin_engine::start(4, 1.0, "llama-2-70b").await
}

async fn clock(http: &reqwest::Client, base: &str) -> TwinClockState {
    http.get(format!("{base}/admin/clock")).send().await.unwrap().json().await.unwrap()
}

/// A plain MQTT client watching everything under one node.
struct Watcher {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
    _task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    async fn new(host: &str, port: u16, id: &str, filter: &str) -> Watcher {
        let mut o = MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 256);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Watcher { client, rx, _task: task }
    }

    /// The next message on a topic ending in `leaf` that `want` accepts (others are dropped).
    async fn wait_for(&mut self, what: &str, leaf: &str, mut want: impl FnMut(&Publish) -> bool) -> Publish {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let p = tokio::time::timeout(left, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("watcher ended");
            if p.topic.ends_with(leaf) && want(&p) {
                return p;
            }
        }
    }

    async fn ack(&mut self, id: &str) -> Ack {
        let p = self
            .wait_for(&format!("the ack of {id}"), "/ack", |p| {
                serde_json::from_slice::<Ack>(&p.payload).map(|a| a.id.0 == id).unwrap_or(false)
            })
            .await;
        serde_json::from_slice(&p.payload).unwrap()
    }
}

fn set_clock(id: &str, clock_mhz: u32) -> Vec<u8> {
    serde_json::to_vec(&Command {
        id: ActionId(id.into()),
        action: Action::SetClock { instance: InstanceId(0), clock_mhz },
        placement: None,
        issued_at_ms: 1,
    })
    .unwrap()
}

fn state(p: &Publish) -> String {
    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    v["state"].as_str().unwrap_or_default().to_string()
}

fn applied(ack: &Ack) -> String {
    match &ack.outcome {
        Outcome::Applied { detail, .. } => detail.clone(),
        other => panic!("{}: expected Applied, got {other:?}", ack.id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reports_applies_clock_commands_once_and_says_goodbye() {
    let (host, port) = broker();
    let base = twin().await;
    let http = reqwest::Client::new();
    assert_eq!(clock(&http, &base).await.clock_mhz, 1980);
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("agent{}-{}", std::process::id(), telemetry::sample::now_ms());
    let toml = format!(
        r#"
[agent]
site = "edge1"
node = "n1"
gpu = "twin"
twin_url = "{base}"
engine_url = "{base}/metrics"
interval_s = 0.2
clock_min_mhz = 1000
clock_max_mhz = 1800
state_file = "{state}"

[agent.mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"
keep_alive_s = 5
"#,
        state = dir.path().join("state/applied.json").display()
    );
    let cfg = AgentConfig::from_toml_str(&toml).unwrap();
    let cmd_topic = cfg.topic("cmd");
    let mut w = Watcher::new(&host, port, &format!("{prefix}-w"), &format!("{prefix}/edge1/n1/#")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(cfg.clone(), async {
        let _ = stopped.await;
    }));

    // Birth: alive, retained (a late subscriber gets it from the broker).
    w.wait_for("the alive state", "/state", |p| state(p) == "alive").await;
    let mut late = Watcher::new(&host, port, &format!("{prefix}-late"), &format!("{prefix}/edge1/n1/state")).await;
    let p = late.wait_for("the retained alive state", "/state", |_| true).await;
    assert!(p.retain, "the birth is retained");
    assert_eq!(state(&p), "alive");

    // Telemetry: GPU power and energy from the twin's fake device, the engine's vLLM numbers.
    let mut gpus_seen = false;
    let mut engine_seen = false;
    while !(gpus_seen && engine_seen) {
        let p = w.wait_for("telemetry", "/telemetry", |_| true).await;
        let t: TelemetryPayload = serde_json::from_slice(&p.payload).unwrap();
        if !t.gpus.is_empty() {
            assert_eq!(t.gpus.len(), 4, "{t:?}");
            assert!(t.gpus.iter().all(|g| g.power_w > 0.0 && g.energy_j.is_some()), "{t:?}");
            assert!(t.gpus.iter().all(|g| g.sm_clock_mhz == Some(1980)), "{t:?}");
            gpus_seen = true;
        }
        if let Some(e) = t.engines.first() {
            assert_eq!(e.instance, "n1");
            assert_eq!(e.model.as_deref(), Some("llama-2-70b"));
            assert_eq!(e.running, Some(0.0));
            assert_eq!(e.waiting, Some(0.0));
            assert!(e.kv_usage.is_some() && e.generation_tokens_total.is_some(), "{e:?}");
            engine_seen = true;
        }
    }

    // SetClock: applied, the twin runs at it.
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, set_clock("clk-1", 1400)).await.unwrap();
    let ack = w.ack("clk-1").await;
    assert!(applied(&ack).contains("1400 MHz"), "{ack:?}");
    assert_eq!(clock(&http, &base).await.clock_mhz, 1400);
    // Bounded by the config (max 1800) and snapped to a supported step.
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, set_clock("clk-2", 1990)).await.unwrap();
    assert!(applied(&w.ack("clk-2").await).contains("at 1800 MHz (asked 1990 MHz)"));
    assert_eq!(clock(&http, &base).await.clock_mhz, 1800);
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, set_clock("clk-3", 1290)).await.unwrap();
    applied(&w.ack("clk-3").await);
    assert_eq!(clock(&http, &base).await.clock_mhz, 1200);

    // The same id again: acknowledged Applied, not done again. The clock
    // is moved out of band first; the agent must not touch it.
    let r =
        http.post(format!("{base}/admin/clock")).json(&serde_json::json!({"clock_mhz": 1000})).send().await.unwrap();
    assert!(r.status().is_success());
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, set_clock("clk-1", 1400)).await.unwrap();
    let again = applied(&w.ack("clk-1").await);
    assert!(again.starts_with("already applied"), "{again}");
    assert_eq!(clock(&http, &base).await.clock_mhz, 1000, "a repeated id was applied again");

    // Bad input: not JSON (no id: logged only), a bad action with an id
    // (a Failed ack), an action the agent does not carry out.
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, b"{not json".to_vec()).await.unwrap();
    w.client
        .publish(&cmd_topic, QoS::AtLeastOnce, false, br#"{"id": "bad-1", "action": {"kind": "warp"}}"#.to_vec())
        .await
        .unwrap();
    match w.ack("bad-1").await.outcome {
        Outcome::Failed { reason, retryable } => {
            assert!(reason.contains("malformed command") && reason.contains("/cmd"), "{reason}");
            assert!(!retryable);
        }
        other => panic!("{other:?}"),
    }
    let spawn = Command {
        id: ActionId("spawn-1".into()),
        action: Action::Spawn {
            instance: InstanceId(7),
            pool: PoolId(0),
            tp: 4,
            clock_mhz: 1980,
            from: actuators::SpawnFrom::Cold,
        },
        placement: None,
        issued_at_ms: 2,
    };
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, serde_json::to_vec(&spawn).unwrap()).await.unwrap();
    match w.ack("spawn-1").await.outcome {
        Outcome::Failed { reason, retryable: false } => {
            assert!(reason.contains("not handled by the agent"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Still working.
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, set_clock("clk-4", 1600)).await.unwrap();
    applied(&w.ack("clk-4").await);
    assert_eq!(clock(&http, &base).await.clock_mhz, 1600);
    assert!(!agent.is_finished());

    // Shutdown: clocks reset, dead state published (and retained), clean end.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent).await.expect("the agent stops").unwrap().unwrap();
    assert_eq!(clock(&http, &base).await.clock_mhz, 1980, "clocks reset on shutdown");
    w.wait_for("the dead state", "/state", |p| state(p) == "dead").await;
    let mut late = Watcher::new(&host, port, &format!("{prefix}-late2"), &format!("{prefix}/edge1/n1/state")).await;
    let p = late.wait_for("the retained dead state", "/state", |_| true).await;
    assert!(p.retain);
    assert_eq!(state(&p), "dead");

    // Restarted, it still knows clk-1: acknowledged, not re-applied.
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(cfg, async {
        let _ = stopped.await;
    }));
    w.wait_for("the alive state after the restart", "/state", |p| state(p) == "alive").await;
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, set_clock("clk-1", 1400)).await.unwrap();
    assert!(applied(&w.ack("clk-1").await).starts_with("already applied"));
    assert_eq!(clock(&http, &base).await.clock_mhz, 1980);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent).await.expect("the agent stops").unwrap().unwrap();
}

#[test]
fn the_deploy_example_config_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dynamollm-agent.toml");
    let cfg = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.gpu, agent::GpuKind::Nvml);
    assert!(cfg.mqtt.tls);
    assert_eq!(cfg.mqtt.port, 8883);
}

/// A child process killed (and reaped) when dropped, also when a test fails.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_stops_cleanly_on_sigterm_and_its_last_will_covers_a_kill() {
    let (host, port) = broker();
    let base = twin().await;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("agentbin{}-{}", std::process::id(), telemetry::sample::now_ms());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nsite = \"edge1\"\nnode = \"n2\"\ngpu = \"twin\"\ntwin_url = \"{base}\"\ninterval_s = 0.5\n\
             state_file = \"{}\"\n[agent.mqtt]\nhost = \"{host}\"\nport = {port}\ntopic_prefix = \"{prefix}\"\n",
            dir.path().join("applied.json").display()
        ),
    )
    .unwrap();
    let mut w = Watcher::new(&host, port, &format!("{prefix}-w"), &format!("{prefix}/edge1/n2/#")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_dynamollm"))
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap(),
    );
    w.wait_for("the alive state", "/state", |p| state(p) == "alive").await;
    w.client.publish(format!("{prefix}/edge1/n2/cmd"), QoS::AtLeastOnce, false, set_clock("c1", 1200)).await.unwrap();
    applied(&w.ack("c1").await);
    assert_eq!(clock(&http, &base).await.clock_mhz, 1200);
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the agent did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert_eq!(clock(&http, &base).await.clock_mhz, 1980, "clocks reset on SIGTERM");
    w.wait_for("the dead state", "/state", |p| state(p) == "dead").await;
    assert!(std::fs::read_to_string(dir.path().join("applied.json")).unwrap().contains("\"c1\""));

    // Killed outright, it is declared dead by its last will.
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_dynamollm"))
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap(),
    );
    w.wait_for("the alive state after the restart", "/state", |p| state(p) == "alive").await;
    child.0.kill().unwrap();
    let _ = child.0.wait();
    w.wait_for("the last will's dead state", "/state", |p| state(p) == "dead").await;
}

#[test]
fn the_binary_names_the_key_of_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[agent]\nsite = \"s\"\nnode = \"n\"\ngpu = \"nvml\"\nstate_file = \"x\"\nintervl_s = 1\n[agent.mqtt]\nhost = \"h\"\n")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dynamollm"))
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("intervl_s") && err.contains("agent.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_templates_carry_out_other_actions_once_per_id() {
    let (host, port) = broker();
    let base = twin().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spawned.log");
    let prefix = format!("agentexec{}-{}", std::process::id(), telemetry::sample::now_ms());
    let toml = format!(
        r#"
[agent]
site = "edge1"
node = "n3"
gpu = "twin"
twin_url = "{base}"
interval_s = 1.0
state_file = "{state}"
[agent.mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"
[agent.exec]
spawn = ["sh", "-c", "echo {{id}} {{instance}} {{tp}} >> \"$0\"; echo '{{\"placement\": {{\"node\": \"edge1/n3\", \"gpus\": [4, 5]}}}}'", "{log}"]
retire = ["sh", "-c", "echo instance {{instance}} is busy >&2; exit 4"]
timeout_s = 10
"#,
        state = dir.path().join("applied.json").display(),
        log = log.display(),
    );
    let cfg = AgentConfig::from_toml_str(&toml).unwrap();
    let cmd_topic = cfg.topic("cmd");
    let mut w = Watcher::new(&host, port, &format!("{prefix}-w"), &format!("{prefix}/edge1/n3/#")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(cfg, async {
        let _ = stopped.await;
    }));
    w.wait_for("the alive state", "/state", |p| state(p) == "alive").await;
    let cmd = |id: &str, action: Action| {
        serde_json::to_vec(&Command { id: ActionId(id.into()), action, placement: None, issued_at_ms: 3 }).unwrap()
    };
    let spawn = Action::Spawn {
        instance: InstanceId(9),
        pool: PoolId(1),
        tp: 2,
        clock_mhz: 1980,
        from: actuators::SpawnFrom::Cold,
    };
    for _ in 0..2 {
        w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, cmd("sp-1", spawn.clone())).await.unwrap();
        match w.ack("sp-1").await.outcome {
            Outcome::Applied { placement: Some(p), .. } => {
                assert_eq!((p.node.as_str(), p.gpus), ("edge1/n3", vec![4, 5]))
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "sp-1 9 2\n", "the spawn ran once for its id");
    w.client
        .publish(&cmd_topic, QoS::AtLeastOnce, false, cmd("rt-1", Action::Retire { instance: InstanceId(9) }))
        .await
        .unwrap();
    match w.ack("rt-1").await.outcome {
        Outcome::Failed { reason, retryable: true } => {
            assert!(reason.contains("exit status: 4") && reason.contains("instance 9 is busy"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let route = Action::Route { class: "SS".into(), pool: PoolId(0) };
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, cmd("ro-1", route)).await.unwrap();
    match w.ack("ro-1").await.outcome {
        Outcome::Failed { reason, retryable: false } => {
            assert!(reason.contains("not handled by the agent"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent).await.expect("the agent stops").unwrap().unwrap();
}
