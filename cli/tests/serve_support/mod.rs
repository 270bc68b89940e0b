//! Shared by `serve_faults.rs` and `serve_crash.rs`: a fake external cluster
//! the service drives (an exec script that keeps one file per node and logs
//! every call) and whose telemetry the test publishes over the real
//! Mosquitto, the service's config, and its HTTP API.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telemetry::mqtt::{ArrivalEntry, EdgePublisher, EngineEntry, GpuEntry, MqttSettings, TelemetryPayload};
use telemetry::RequestClass;

pub const TOKEN: &str = "faults-token-5b1e";

/// The shared broker `scripts/test` starts.
pub fn broker() -> (String, u16) {
    let hp = std::env::var("DYNAMOLLM_TEST_MQTT").unwrap_or_else(|_| {
        panic!("DYNAMOLLM_TEST_MQTT is not set: run the tests through scripts/test (it installs and starts Mosquitto)")
    });
    let (h, p) = hp.rsplit_once(':').expect("DYNAMOLLM_TEST_MQTT is host:port");
    (h.to_string(), p.parse().expect("DYNAMOLLM_TEST_MQTT port"))
}

/// A topic prefix no other test uses.
pub fn unique_prefix(tag: &str) -> String {
    format!("{tag}{}x{}", std::process::id(), telemetry::sample::now_ms())
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The fake cluster's files: `nodes/n<instance>` (content: `<tp> <spawn id>`)
/// for every instance that runs, and `exec.log` with one line per call start
/// and end: `<action id> <kind> <instance> start` / `… done <note>`.
#[derive(Clone)]
pub struct FakeCluster {
    pub dir: PathBuf,
    pub script: PathBuf,
}

impl FakeCluster {
    /// Write the script into `dir`. A spawn sleeps the seconds in
    /// `dir/spawn_sleep` (when present) before it creates the node; with
    /// `dir/hang-first` present, the first spawn hangs for 30 s.
    /// Idempotent by instance: a spawn of a node that exists creates nothing.
    pub fn new(dir: &Path) -> FakeCluster {
        std::fs::create_dir_all(dir.join("nodes")).unwrap();
        let script = dir.join("act.sh");
        let d = dir.display();
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/sh
D="{d}"
I="${{DYNAMOLLM_INSTANCE:--}}"
echo "$DYNAMOLLM_ACTION_ID $DYNAMOLLM_ACTION_KIND $I start" >> "$D/exec.log"
note=ok
case "$DYNAMOLLM_ACTION_KIND" in
  spawn)
    if [ -f "$D/hang-first" ] && mkdir "$D/hung" 2>/dev/null; then sleep 30; fi
    if [ -f "$D/nodes/n$I" ]; then
      note=exists
    else
      s=$(cat "$D/spawn_sleep" 2>/dev/null || echo 0)
      sleep "$s"
      echo "$DYNAMOLLM_TP $DYNAMOLLM_ACTION_ID" > "$D/nodes/.n$I" && mv "$D/nodes/.n$I" "$D/nodes/n$I"
      note=created
    fi
    # Logged before the reply: an orphan whose service was killed dies of SIGPIPE at the echo.
    echo "$DYNAMOLLM_ACTION_ID $DYNAMOLLM_ACTION_KIND $I done $note" >> "$D/exec.log"
    echo "{{\"placement\":{{\"node\":\"site/n$I\",\"endpoint\":null}}}}"
    exit 0
    ;;
  retire)
    rm -f "$D/nodes/n$I"
    note=removed
    ;;
esac
echo "$DYNAMOLLM_ACTION_ID $DYNAMOLLM_ACTION_KIND $I done $note" >> "$D/exec.log"
"#
            ),
        )
        .unwrap();
        FakeCluster { dir: dir.to_path_buf(), script }
    }

    /// The exec log's lines, split in words.
    pub fn log(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.dir.join("exec.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    }

    /// Instance → TP of the nodes that run.
    pub fn nodes(&self) -> BTreeMap<u32, u32> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(self.dir.join("nodes")).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(i) = name.strip_prefix('n').and_then(|n| n.parse::<u32>().ok()) else { continue };
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tp = text.split_whitespace().next().and_then(|t| t.parse().ok()).unwrap_or(1);
            out.insert(i, tp);
        }
        out
    }
}

/// What the service's config varies by test.
pub struct Opts {
    pub state_dir: PathBuf,
    pub listen: String,
    pub speed: f64,
    pub stale_after_s: f64,
    pub mqtt: (String, u16),
    pub prefix: String,
    pub exec_timeout_ms: u64,
    /// `[actuators.webhook]` lines (url, attempts, kinds…), taking set-clock from exec.
    pub webhook: Option<String>,
    /// `[cluster] gpus`.
    pub gpus: u32,
}

impl Opts {
    pub fn new(state_dir: &Path, mqtt: (String, u16), prefix: &str) -> Opts {
        Opts {
            state_dir: state_dir.to_path_buf(),
            listen: "127.0.0.1:0".into(),
            speed: 10.0,
            stale_after_s: 5.0,
            mqtt,
            prefix: prefix.to_string(),
            exec_timeout_ms: 20_000,
            webhook: None,
            gpus: 1024,
        }
    }
}

/// The service's config: the dynamollm policy on an external cluster, loops
/// fast enough to act within seconds of wall time.
pub fn config_text(o: &Opts, cluster: &FakeCluster) -> String {
    let script = cluster.script.display();
    let set_clock = if o.webhook.is_some() { String::new() } else { format!("set_clock = \"sh {script}\"") };
    let webhook = o.webhook.as_ref().map(|w| format!("[actuators.webhook]\n{w}\n")).unwrap_or_default();
    format!(
        r#"
[service]
listen = "{listen}"
token = "{TOKEN}"
state_dir = "{state}"
speed = {speed}
stale_after_s = {stale}
policy = "dynamollm"

[controller]
scale_period_s = 30.0
shard_period_s = 30.0
clock_period_s = 5.0
spawn_lead_s = 10.0

[cluster]
kind = "external"
gpus = {gpus}

[telemetry.mqtt]
host = "{host}"
port = {port}
client_id = "{prefix}-svc"
topic_prefix = "{prefix}"
keep_alive_s = 5
reconnect_initial_ms = 50
reconnect_max_ms = 300

[actuators]
order = ["exec", "webhook"]

[actuators.exec]
spawn = "sh {script}"
retire = "sh {script}"
route = "sh {script}"
{set_clock}
timeout_ms = {timeout}

{webhook}
"#,
        listen = o.listen,
        state = o.state_dir.display(),
        speed = o.speed,
        stale = o.stale_after_s,
        host = o.mqtt.0,
        port = o.mqtt.1,
        prefix = o.prefix,
        timeout = o.exec_timeout_ms,
        gpus = o.gpus,
    )
}

/// The test's side of the cluster: every `interval`, one telemetry payload
/// per running node (an engine reading and its GPUs) over MQTT, plus the
/// per-class arrivals at `rate_rps` (service requests/s) from a gateway node.
pub struct Feeder {
    /// Publishing on/off.
    pub on: Arc<AtomicBool>,
    /// Per-class arrivals (requests per service second).
    pub rate_rps: Arc<Mutex<f64>>,
    /// Payloads handed to the clients.
    pub published: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Feeder {
    pub fn start(
        mqtt: (String, u16),
        prefix: &str,
        nodes_of: impl Fn() -> BTreeMap<u32, u32> + Send + 'static,
        interval: Duration,
        speed: f64,
        rate_rps: f64,
    ) -> Feeder {
        let on = Arc::new(AtomicBool::new(true));
        let rate = Arc::new(Mutex::new(rate_rps));
        let published = Arc::new(AtomicU64::new(0));
        let (on2, rate2, pub2, prefix) = (on.clone(), rate.clone(), published.clone(), prefix.to_string());
        let settings = move |id: &str| {
            let mut s = MqttSettings::new(&mqtt.0, mqtt.1, &format!("{prefix}-{id}"), &prefix);
            s.reconnect_initial = Duration::from_millis(50);
            s.reconnect_max = Duration::from_millis(300);
            s.keep_alive = Duration::from_secs(5);
            s
        };
        let task = tokio::spawn(async move {
            let gateway = EdgePublisher::spawn(settings("gw"), "site", "gw");
            let mut pubs: BTreeMap<u32, EdgePublisher> = BTreeMap::new();
            let mut carry = 0.0f64;
            let mut tick = tokio::time::interval(interval);
            let t0 = Instant::now();
            loop {
                tick.tick().await;
                if !on2.load(Ordering::SeqCst) {
                    continue;
                }
                let ts_ms = telemetry::sample::now_ms();
                let secs = t0.elapsed().as_secs_f64() * speed;
                for (i, tp) in nodes_of() {
                    let p = pubs
                        .entry(i)
                        .or_insert_with(|| EdgePublisher::spawn(settings(&format!("n{i}")), "site", &format!("n{i}")));
                    let payload = TelemetryPayload {
                        ts_ms,
                        gpus: (0..tp)
                            .map(|g| GpuEntry {
                                gpu: g,
                                ts_ms: None,
                                power_w: 300.0,
                                energy_j: Some(300.0 * secs),
                                sm_clock_mhz: None,
                                util: None,
                                temperature_c: None,
                                throttle_reasons: None,
                            })
                            .collect(),
                        engines: vec![EngineEntry {
                            instance: i.to_string(),
                            ts_ms: None,
                            pool: None,
                            model: None,
                            ttft: None,
                            tbt: None,
                            running: Some(1.0),
                            waiting: Some(0.0),
                            kv_usage: None,
                            prompt_tokens_total: None,
                            generation_tokens_total: None,
                        }],
                        arrivals: vec![],
                    };
                    if p.try_publish(&payload).is_ok() {
                        pub2.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // Whole requests per payload; the remainder carries over.
                carry += *rate2.lock().unwrap() * interval.as_secs_f64() * speed;
                let n = carry.floor();
                carry -= n;
                if n > 0.0 {
                    let payload = TelemetryPayload {
                        ts_ms,
                        arrivals: RequestClass::ALL
                            .iter()
                            .map(|&class| ArrivalEntry {
                                class,
                                ts_ms: None,
                                pool: None,
                                requests: n,
                                tokens: n * 500.0,
                            })
                            .collect(),
                        ..Default::default()
                    };
                    if gateway.try_publish(&payload).is_ok() {
                        pub2.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        Feeder { on, rate_rps: rate, published, task }
    }
}

/// The service's HTTP API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(addr: impl std::fmt::Display) -> Api {
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap(),
        }
    }

    async fn get_json(&self, path: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("GET {path}: {}", r.status()));
        }
        r.json().await.map_err(|e| format!("GET {path}: {e}"))
    }

    pub async fn try_status(&self) -> Result<Value, String> {
        self.get_json("/api/v1/status").await
    }

    pub async fn status(&self) -> Value {
        self.try_status().await.unwrap()
    }

    /// The audit log, oldest first.
    pub async fn actions(&self) -> Vec<Value> {
        let v = self.get_json("/api/v1/actions?limit=100000").await.unwrap();
        v["actions"].as_array().unwrap().clone()
    }

    pub async fn decisions(&self) -> Vec<Value> {
        let v = self.get_json("/api/v1/decisions?limit=2000").await.unwrap();
        v["decisions"].as_array().unwrap().clone()
    }

    pub async fn try_metrics(&self) -> Result<String, String> {
        let r = self.http.get(format!("{}/metrics", self.base)).bearer_auth(TOKEN).send().await;
        r.map_err(|e| e.to_string())?.text().await.map_err(|e| e.to_string())
    }

    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.base)).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap()
    }
}

/// Poll `f` every 50 ms until it gives `Some`, or fail after `limit` naming `what`
/// and the last thing `describe` saw.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}; last seen: {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Instances of a status document: id → (pool, tp, clock, state).
pub fn instances(status: &Value) -> BTreeMap<u64, (u64, u64, u64, String)> {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_u64().unwrap(),
                (
                    i["pool"].as_u64().unwrap(),
                    i["tp"].as_u64().unwrap(),
                    i["clock_mhz"].as_u64().unwrap(),
                    i["state"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// An audit record's action kind and instance.
pub fn kind(rec: &Value) -> &str {
    rec["action"]["kind"].as_str().unwrap_or("")
}

pub fn instance(rec: &Value) -> Option<u64> {
    rec["action"]["instance"].as_u64()
}

/// `dynamollm serve` as a child process, SIGKILLed on drop.
pub struct Proc(Option<std::process::Child>);

impl Proc {
    /// Start `bin serve --config config`, its log appended to `log`.
    pub fn start(bin: &str, config: &Path, log: &Path) -> Proc {
        let err = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = std::process::Command::new(bin)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .expect("cannot start dynamollm serve");
        Proc(Some(child))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A private Mosquitto (no persistence) that can be killed and started again on its port.
pub struct Broker {
    bin: PathBuf,
    conf: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    pub fn new(dir: &Path) -> Broker {
        let bin = PathBuf::from(std::env::var("DYNAMOLLM_TEST_MOSQUITTO_BIN").unwrap_or_else(|_| {
            panic!(
                "DYNAMOLLM_TEST_MOSQUITTO_BIN is not set: run the tests through scripts/test (it installs Mosquitto)"
            )
        }));
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")).unwrap();
        let mut b = Broker { bin, conf, port, child: None };
        b.start();
        b
    }

    pub fn start(&mut self) {
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "mosquitto did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A series' value on a `/metrics` page (the first line starting with `series`).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}
