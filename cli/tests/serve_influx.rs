//! `serve` with `[telemetry.influx]` pointed at a private VictoriaMetrics
//! (from `DYNAMOLLM_TEST_VICTORIA_METRICS_BIN`, which `scripts/test` sets),
//! stopped for 10 s while the service runs: the sink spools what it cannot
//! send, sends it once the server is back, and in the end the server holds
//! every point the service produced.

mod serve_support;

use serve_support::metric;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "influx-test-token";

/// A private VictoriaMetrics that can be stopped and started again on its port and data.
struct Vm {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Vm {
    fn new(dir: &Path) -> Vm {
        let bin = PathBuf::from(std::env::var("DYNAMOLLM_TEST_VICTORIA_METRICS_BIN").unwrap_or_else(|_| {
            panic!("DYNAMOLLM_TEST_VICTORIA_METRICS_BIN is not set: run the tests through scripts/test (it installs VictoriaMetrics)")
        }));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut vm = Vm { bin, dir: dir.to_path_buf(), port, child: None };
        vm.start();
        vm
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let child = Command::new(&self.bin)
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            .arg(format!("-storageDataPath={}", self.dir.display()))
            .arg("-retentionPeriod=100y")
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let t = Instant::now();
        while reqwest::blocking::get(format!("{}/health", self.base())).map_or(true, |r| !r.status().is_success()) {
            assert!(t.elapsed() < Duration::from_secs(20), "victoria-metrics did not answer on {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: VictoriaMetrics flushes what it took before it goes.
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(15) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Samples the server holds, over every series.
    fn samples(&self) -> usize {
        let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let _ = c.get(format!("{}/internal/force_flush", self.base())).send();
        let text = c
            .get(format!("{}/api/v1/export", self.base()))
            // The twin's samples are stamped in its own (faster) time: up to minutes ahead of the wall.
            .query(&[("match[]", "{__name__=~\".+\"}"), ("start", "0"), ("end", "4102444800")])
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["timestamps"].as_array().unwrap().len())
            .sum()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_influx_sink_spools_through_a_10_s_outage_and_delivers_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let vm_dir = dir.path().join("vm");
    let mut vm = tokio::task::block_in_place(|| Vm::new(&vm_dir));
    let text = format!(
        r#"
[service]
listen = "127.0.0.1:0"
token = "{TOKEN}"
state_dir = "{state}"
speed = 30.0

[cluster]
kind = "twin"
hours = 0.25

[telemetry.influx]
url = "{url}"
batch_points = 500
batch_interval_ms = 200
timeout_ms = 1000
retry_initial_ms = 100
retry_max_ms = 500
"#,
        state = dir.path().join("state").display(),
        url = vm.base(),
    );
    let cfg = service::config::ServiceConfig::parse(&text, "influx.toml").unwrap();
    let svc = service::start(cfg).await.unwrap();
    let base = format!("http://{}", svc.addr);
    let http = reqwest::Client::new();
    let metrics =
        || async { http.get(format!("{base}/metrics")).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap() };
    // Running and writing; then the server goes for 10 s.
    let t0 = Instant::now();
    while metric(&metrics().await, "dynamollm_influx_points_written_total") == 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no point reached the server");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| vm.stop());
    let down = Instant::now();
    let mut spooled_max = 0.0f64;
    while down.elapsed() < Duration::from_secs(10) {
        spooled_max = spooled_max.max(metric(&metrics().await, "dynamollm_influx_spool_bytes"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(spooled_max > 0.0, "nothing went to the spool while the server was away");
    tokio::task::block_in_place(|| vm.start());

    // The replay ends; the spool drains.
    let mut finished = svc.finished.clone();
    tokio::time::timeout(Duration::from_secs(120), finished.wait_for(|f| f.is_some()))
        .await
        .expect("the replay did not end within 120 s")
        .unwrap();
    let t1 = Instant::now();
    let page = loop {
        let page = metrics().await;
        let settled = metric(&page, "dynamollm_influx_spool_bytes") == 0.0
            && metric(&page, "dynamollm_influx_lag_ms") == 0.0
            && metric(&page, "dynamollm_influx_points_written_total")
                == metric(&page, "dynamollm_influx_points_in_total");
        if settled {
            break page;
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "the spool did not drain:\n{page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let points_in = metric(&page, "dynamollm_influx_points_in_total");
    assert!(points_in > 1000.0, "{points_in} points");
    assert_eq!(metric(&page, "dynamollm_influx_points_dropped_total"), 0.0);
    assert!(metric(&page, "dynamollm_influx_write_failures_total") > 0.0, "the outage was not seen");
    let held = tokio::task::block_in_place(|| vm.samples());
    eprintln!(
        "{points_in} points in, {held} held by the server; spool peaked at {spooled_max} bytes during the outage"
    );
    assert_eq!(held as f64, points_in, "the server does not hold every point the service produced");
    svc.stop().await.unwrap();
}
