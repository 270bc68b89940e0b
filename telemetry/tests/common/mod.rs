//! Helpers shared by the integration tests: the services `scripts/test`
//! starts, and private instances of their binaries for tests that stop them.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An environment variable `scripts/test` sets; a clear failure without it.
pub fn require_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test (it installs and starts the test services)")
    })
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Wait until something listens on the port.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < timeout, "nothing listening on 127.0.0.1:{port} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (and reaped) on drop.
pub struct Service {
    pub child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    args: Vec<String>,
}

fn launch(bin: &Path, args: &[String], port: u16) -> Child {
    let child = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    wait_for_port(port, Duration::from_secs(20));
    child
}

impl Service {
    fn spawn(bin: &Path, args: &[String], port: u16) -> Service {
        let child = launch(bin, args, port);
        Service { child: Some(child), port, bin: bin.into(), args: args.to_vec() }
    }

    /// Stop gracefully (SIGTERM) and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again with the same arguments (same port, same data).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.child = Some(launch(&self.bin, &self.args, self.port));
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A private VictoriaMetrics on a free port, data in `dir`.
pub fn victoria_metrics(dir: &Path) -> Service {
    let bin = require_env("DYNAMOLLM_TEST_VICTORIA_METRICS_BIN");
    let port = free_port();
    let args = vec![
        format!("-httpListenAddr=127.0.0.1:{port}"),
        format!("-storageDataPath={}", dir.display()),
        "-retentionPeriod=1d".to_string(),
        "-loggerLevel=ERROR".to_string(),
    ];
    Service::spawn(Path::new(&bin), &args, port)
}

/// A private Mosquitto with persistence on (so queued QoS 1 messages and
/// sessions survive its restart), on a free port, state in `dir`.
pub fn mosquitto(dir: &Path) -> Service {
    let bin = require_env("DYNAMOLLM_TEST_MOSQUITTO_BIN");
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    // Started as root, Mosquitto drops to its own user: it must be able to
    // write its persistence file (and log) here, or nothing survives a restart.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\n",
            dir.display()
        ),
    )
    .unwrap();
    Service::spawn(Path::new(&bin), &["-c".to_string(), conf.display().to_string()], port)
}

/// A private Mosquitto on a free port with the config `conf(port)` (the
/// whole file: listeners, auth, TLS). `dir` is made world-readable, since
/// Mosquitto started as root drops to its own user before reading the
/// password, ACL and certificate files kept there.
pub fn mosquitto_with(dir: &Path, conf: impl FnOnce(u16) -> String) -> Service {
    let bin = require_env("DYNAMOLLM_TEST_MOSQUITTO_BIN");
    let port = free_port();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, conf(port)).unwrap();
    Service::spawn(Path::new(&bin), &["-c".to_string(), path.display().to_string()], port)
}

/// Count, per series name, the samples VictoriaMetrics holds for metric names
/// matching `regex`, through `/api/v1/export` (after a forced flush).
/// One exported series: labels, timestamps (ms), values.
pub type Exported = (std::collections::BTreeMap<String, String>, Vec<i64>, Vec<f64>);

pub fn vm_export(base: &str, regex: &str) -> Vec<Exported> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let _ = client.get(format!("{base}/internal/force_flush")).send();
    let resp = client
        .get(format!("{base}/api/v1/export"))
        .query(&[("match[]", format!("{{__name__=~\"{regex}\"}}")), ("start", "0".to_string())])
        .send()
        .unwrap();
    assert!(resp.status().is_success(), "export: HTTP {}", resp.status());
    let text = resp.text().unwrap();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let labels = v["metric"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        let ts = v["timestamps"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
        let vals = v["values"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap_or(f64::NAN)).collect();
        out.push((labels, ts, vals));
    }
    out
}
