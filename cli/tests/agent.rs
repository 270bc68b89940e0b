//! The node agent against the real Mosquitto that `scripts/test` starts
//! (`DYNAMOLLM_TEST_MQTT`) and a `twin serve` instance in this process as
//! its GPUs and engine: birth, telemetry, clock commands (bounded, applied
//! once per id, remembered across restarts), bad commands, shutdown.

use actuators::signed::{self, CommandKey};
use actuators::{Ack, Action, Command, InstanceId, Outcome, PoolId};
use agent::AgentConfig;
mod serve_support;
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
        // It sees the oversized messages the tests send too.
        o.set_max_packet_size(16 << 20, 16 << 20);
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
        let p = self.wait_for(&format!("the ack of {id}"), "/ack", |p| open_ack(p).is_some_and(|a| a.id.0 == id)).await;
        open_ack(&p).unwrap()
    }
}

/// The command key of these tests (the agents read it from a file).
const KEY: &str = "0f3c9a8e1d2b4c6f8a0e2d4c6b8a0f1e3d5c7b9a1f3e5d7c9b1a3f5e7d9c1b3a";

fn key() -> CommandKey {
    CommandKey::new(KEY).unwrap()
}

/// Write the key where an agent config can name it.
fn key_file(dir: &std::path::Path) -> String {
    let path = dir.join("command.key");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    path.display().to_string()
}

/// A command as the controller sends it: issued now, signed.
fn signed_cmd(id: &str, action: Action) -> Vec<u8> {
    signed::seal(&Command::new(id, action, None), Some(&key())).unwrap()
}

fn set_clock(id: &str, clock_mhz: u32) -> Vec<u8> {
    signed_cmd(id, Action::SetClock { instance: InstanceId(0), clock_mhz })
}

/// An ack as the agent publishes it: signed with the same key.
fn open_ack(p: &Publish) -> Option<Ack> {
    signed::open::<Ack>(&p.payload, Some(&key())).ok()
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
command_key_file = "{key}"

[agent.mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"
keep_alive_s = 5
"#,
        state = dir.path().join("state/applied.json").display(),
        key = key_file(dir.path()),
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

    // Bad input: not JSON (no id: logged only), a signed bad action with an
    // id (a Failed ack), an action the agent does not carry out.
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, b"{not json".to_vec()).await.unwrap();
    let bad = signed::seal(&serde_json::json!({"id": "bad-1", "action": {"kind": "warp"}}), Some(&key())).unwrap();
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, bad).await.unwrap();
    match w.ack("bad-1").await.outcome {
        Outcome::Failed { reason, retryable } => {
            assert!(reason.contains("malformed command") && reason.contains("/cmd"), "{reason}");
            assert!(!retryable);
        }
        other => panic!("{other:?}"),
    }
    let spawn = Action::Spawn {
        instance: InstanceId(7),
        pool: PoolId(0),
        tp: 4,
        clock_mhz: 1980,
        from: actuators::SpawnFrom::Cold,
    };
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, signed_cmd("spawn-1", spawn)).await.unwrap();
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

/// An agent config file for the binary: site `edge1`, node `node`, the twin at `base` as its
/// GPUs, the shared broker, the tests' command key; `extra` lines go into `[agent]`.
fn binary_config(
    dir: &std::path::Path,
    base: &str,
    node: &str,
    interval_s: f64,
    extra: &str,
    prefix: &str,
) -> std::path::PathBuf {
    let (host, port) = broker();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nsite = \"edge1\"\nnode = \"{node}\"\ngpu = \"twin\"\ntwin_url = \"{base}\"\ninterval_s = {interval_s}\n\
             state_file = \"{}\"\ncommand_key_file = \"{}\"\n{extra}\
             [agent.mqtt]\nhost = \"{host}\"\nport = {port}\ntopic_prefix = \"{prefix}\"\n",
            dir.join("applied.json").display(),
            key_file(dir),
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_stops_cleanly_on_sigterm_and_its_last_will_covers_a_kill() {
    let (host, port) = broker();
    let base = twin().await;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("agentbin{}-{}", std::process::id(), telemetry::sample::now_ms());
    let config = binary_config(dir.path(), &base, "n2", 0.5, "", &prefix);
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

/// An agent run in this process from a config, with a watcher on its node's topics, alive.
struct InProcess {
    w: Watcher,
    cmd_topic: String,
    stop: oneshot::Sender<()>,
    agent: tokio::task::JoinHandle<Result<(), agent::AgentError>>,
}

async fn run_agent(toml: &str, host: &str, port: u16, prefix: &str) -> InProcess {
    let cfg = AgentConfig::from_toml_str(toml).unwrap();
    let cmd_topic = cfg.topic("cmd");
    let node_topics = format!("{}/{}/{}/#", cfg.mqtt.topic_prefix, cfg.site, cfg.node);
    let mut w = Watcher::new(host, port, &format!("{prefix}-w"), &node_topics).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(cfg, async {
        let _ = stopped.await;
    }));
    w.wait_for("the alive state", "/state", |p| state(p) == "alive").await;
    InProcess { w, cmd_topic, stop, agent }
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
command_key_file = "{key}"
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
        key = key_file(dir.path()),
    );
    let InProcess { mut w, cmd_topic, stop, agent } = run_agent(&toml, &host, port, &prefix).await;
    let cmd = signed_cmd;
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

/// Every ack on the node's ack topic until the one of `last` (inclusive), by id.
async fn acks_until(w: &mut Watcher, last: &str) -> Vec<Ack> {
    let mut seen = Vec::new();
    loop {
        let p = w.wait_for(&format!("acks up to {last}"), "/ack", |_| true).await;
        let ack = open_ack(&p).unwrap_or_else(|| panic!("an ack not signed with the key: {:?}", p.payload));
        let done = ack.id.0 == last;
        seen.push(ack);
        if done {
            return seen;
        }
    }
}

/// The binary, as deployed: broker write access alone cannot command the
/// GPU. Unsigned and wrongly signed commands are refused without an ack; an
/// expired one is refused with one; a replay is not applied again (and past
/// the TTL is refused as expired); each refusal is in the log at the default
/// level. Oversized messages on the command topic (1 MiB, 5 MB) are dropped,
/// logged, and telemetry goes on within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_unsigned_forged_expired_and_replayed_commands() {
    let (host, port) = broker();
    let base = twin().await;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("agentsec{}-{}", std::process::id(), telemetry::sample::now_ms());
    let config = binary_config(dir.path(), &base, "n5", 0.2, "command_ttl_s = 2\n", &prefix);
    let log_path = dir.path().join("agent.log");
    let mut w = Watcher::new(&host, port, &format!("{prefix}-w"), &format!("{prefix}/edge1/n5/#")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_dynamollm"))
            .args(["agent", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(&log_path).unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    w.wait_for("the alive state", "/state", |p| state(p) == "alive").await;
    let topic = format!("{prefix}/edge1/n5/cmd");
    let client = w.client.clone();
    let publish = |body: Vec<u8>| {
        let (c, t) = (client.clone(), topic.clone());
        async move { c.publish(t, QoS::AtLeastOnce, false, body).await.unwrap() }
    };

    let ok0 = set_clock("ok-0", 1400);
    publish(ok0.clone()).await;
    applied(&w.ack("ok-0").await);
    assert_eq!(clock(&http, &base).await.clock_mhz, 1400);

    // An intruder: unsigned, then signed with a key of its own; an old command, signed.
    let clock_cmd =
        |id: &str, mhz: u32| Command::new(id, Action::SetClock { instance: InstanceId(0), clock_mhz: mhz }, None);
    publish(serde_json::to_vec(&clock_cmd("x-unsigned", 100)).unwrap()).await;
    let other = CommandKey::new(&"intruder".repeat(5)).unwrap();
    publish(signed::seal(&clock_cmd("x-forged", 100), Some(&other)).unwrap()).await;
    let mut old = clock_cmd("x-expired", 100);
    old.issued_at_ms -= 600_000;
    publish(signed::seal(&old, Some(&key())).unwrap()).await;
    // A replay of ok-0, within the TTL, after the clock was moved out of band.
    let r =
        http.post(format!("{base}/admin/clock")).json(&serde_json::json!({"clock_mhz": 1000})).send().await.unwrap();
    assert!(r.status().is_success());
    publish(ok0.clone()).await;
    publish(set_clock("ok-1", 1600)).await;
    let acks = acks_until(&mut w, "ok-1").await;
    let ids: Vec<&str> = acks.iter().map(|a| a.id.0.as_str()).collect();
    assert_eq!(ids, ["x-expired", "ok-0", "ok-1"], "forged commands are not answered: {acks:?}");
    match &acks[0].outcome {
        Outcome::Failed { reason, retryable: false } => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(applied(&acks[1]).starts_with("already applied"), "{acks:?}");
    assert_eq!(clock(&http, &base).await.clock_mhz, 1600, "only ok-0 and ok-1 moved the clock");

    // The same replay past the TTL: refused as expired.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publish(ok0).await;
    match w.ack("ok-0").await.outcome {
        Outcome::Failed { reason, .. } => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("a replay past the TTL was taken: {other:?}"),
    }

    // Oversized messages on the command topic: dropped, and telemetry goes on.
    for bytes in [1 << 20, 5_000_000] {
        let sent = telemetry::sample::now_ms();
        publish(vec![b'x'; bytes + 16]).await;
        let t0 = Instant::now();
        w.wait_for("telemetry after an oversized command", "/telemetry", |p| {
            serde_json::from_slice::<TelemetryPayload>(&p.payload).is_ok_and(|t| t.ts_ms > sent + 200)
        })
        .await;
        assert!(t0.elapsed() < Duration::from_secs(5), "telemetry took {:?} after {bytes} bytes", t0.elapsed());
    }
    publish(set_clock("ok-2", 1200)).await;
    applied(&w.ack("ok-2").await);
    assert_eq!(clock(&http, &base).await.clock_mhz, 1200, "commands still flow after the oversized ones");

    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let _ = child.0.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    for want in
        ["not signed", "bad signature", "command x-expired refused: expired", "already applied", "byte limit: dropped"]
    {
        assert!(log.contains(want), "the log (default level) has no {want:?}:\n{log}");
    }
    assert!(!log.contains("panicked"), "{log}");
}

/// Wait until the twin's clock reads `mhz`; how long it took.
async fn clock_reaches(http: &reqwest::Client, base: &str, mhz: u32, within: Duration) -> Duration {
    let t0 = Instant::now();
    while clock(http, base).await.clock_mhz != mhz {
        assert!(t0.elapsed() < within, "the clock did not reach {mhz} MHz within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// The agent's own failsafe: while the controller's heartbeat comes the
/// locked clock holds; when the controller goes silent, or the broker goes
/// away, the GPUs are back at their top clock within `failsafe_after_s`.
/// The controller here is the service's real MQTT backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fails_safe_when_the_controller_or_the_broker_goes() {
    use actuators::mqtt::{MqttActuator, MqttActuatorOptions};
    use actuators::Actuator;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = serve_support::Broker::new(dir.path());
    let port = broker.port;
    let base = twin().await;
    let http = reqwest::Client::new();
    let prefix = format!("agentfs{}", std::process::id());
    let toml = format!(
        "[agent]\nsite = \"edge1\"\nnode = \"n4\"\ngpu = \"twin\"\ntwin_url = \"{base}\"\ninterval_s = 0.2\n\
         state_file = \"{}\"\ncommand_key_file = \"{}\"\nfailsafe_after_s = 2\n\
         [agent.mqtt]\nhost = \"127.0.0.1\"\nport = {port}\ntopic_prefix = \"{prefix}\"\nkeep_alive_s = 5\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 200\n",
        dir.path().join("applied.json").display(),
        key_file(dir.path()),
    );
    let cfg = AgentConfig::from_toml_str(&toml).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(cfg, async {
        let _ = stopped.await;
    }));
    let controller = || {
        let settings = telemetry::mqtt::MqttSettings {
            keep_alive: Duration::from_secs(5),
            reconnect_initial: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(200),
            ..telemetry::mqtt::MqttSettings::new("127.0.0.1", port, &format!("{prefix}-ctl"), &prefix)
        };
        MqttActuator::spawn(
            settings,
            MqttActuatorOptions {
                ack_timeout: Duration::from_secs(2),
                attempts: 5,
                default_node: None,
                kinds: None,
                key: Some(key()),
                heartbeat: Some(Duration::from_millis(200)),
            },
        )
    };
    let lock_1200 = |id: &str| {
        Command::new(
            id,
            Action::SetClock { instance: InstanceId(0), clock_mhz: 1200 },
            Some(actuators::Placement { node: "edge1/n4".into(), gpus: vec![], endpoint: None }),
        )
    };

    let ctl = controller();
    let outcome = ctl.apply(&lock_1200("fs-1")).await;
    assert!(outcome.is_applied(), "{outcome:?}");
    assert_eq!(clock(&http, &base).await.clock_mhz, 1200);
    // Heartbeats keep the lock well past failsafe_after_s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(clock(&http, &base).await.clock_mhz, 1200, "the agent failed safe while the controller was there");

    // The controller goes (its backend dropped, the broker stays).
    drop(ctl);
    // Within failsafe_after_s of the last heartbeat (plus the reset's own call and this poll).
    let silent = clock_reaches(&http, &base, 1980, Duration::from_millis(2400)).await;
    eprintln!("controller silent: top clocks after {silent:?} (failsafe_after_s = 2)");

    // It comes back and locks again; then the broker goes.
    let ctl = controller();
    let outcome = ctl.apply(&lock_1200("fs-2")).await;
    assert!(outcome.is_applied(), "{outcome:?}");
    assert_eq!(clock(&http, &base).await.clock_mhz, 1200);
    broker.kill();
    let lost = clock_reaches(&http, &base, 1980, Duration::from_millis(2400)).await;
    eprintln!("broker lost: top clocks after {lost:?} (failsafe_after_s = 2)");
    drop(ctl);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent).await.expect("the agent stops").unwrap().unwrap();
}

/// A long exec action runs beside the telemetry: no reading is late while a
/// 3 s spawn runs, a retry of the same id while it runs does not start it
/// twice, and its ack comes when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_actions_run_beside_telemetry() {
    let (host, port) = broker();
    let base = twin().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spawned.log");
    let prefix = format!("agentslow{}-{}", std::process::id(), telemetry::sample::now_ms());
    let toml = format!(
        r#"
[agent]
site = "edge1"
node = "n6"
gpu = "twin"
twin_url = "{base}"
interval_s = 0.2
state_file = "{state}"
command_key_file = "{key}"
[agent.mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"
[agent.exec]
spawn = ["sh", "-c", "echo {{id}} >> \"$0\"; sleep 3; echo started", "{log}"]
timeout_s = 10
"#,
        state = dir.path().join("applied.json").display(),
        log = log.display(),
        key = key_file(dir.path()),
    );
    let InProcess { mut w, cmd_topic, stop, agent } = run_agent(&toml, &host, port, &prefix).await;
    let spawn = Action::Spawn {
        instance: InstanceId(3),
        pool: PoolId(0),
        tp: 4,
        clock_mhz: 1980,
        from: actuators::SpawnFrom::Cold,
    };
    let body = signed_cmd("slow-1", spawn);
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, body.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.client.publish(&cmd_topic, QoS::AtLeastOnce, false, body).await.unwrap();
    let t0 = Instant::now();
    let mut last = Instant::now();
    let mut widest = Duration::ZERO;
    let mut readings = 0;
    let ack = loop {
        let p = w
            .wait_for("telemetry or the ack", "", |p| p.topic.ends_with("/telemetry") || p.topic.ends_with("/ack"))
            .await;
        if p.topic.ends_with("/ack") {
            break open_ack(&p).expect("a signed ack");
        }
        widest = widest.max(last.elapsed());
        last = Instant::now();
        readings += 1;
    };
    assert_eq!(ack.id.0, "slow-1");
    assert!(ack.outcome.is_applied(), "{ack:?}");
    assert!(t0.elapsed() >= Duration::from_secs(2), "the spawn took its 3 s ({:?})", t0.elapsed());
    assert!(readings >= 8, "{readings} readings while the spawn ran");
    assert!(widest < Duration::from_secs(1), "a {widest:?} gap in telemetry while the spawn ran (interval 0.2 s)");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "slow-1\n", "a retry while it ran started it again");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent).await.expect("the agent stops").unwrap().unwrap();
}
