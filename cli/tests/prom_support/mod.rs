//! A Prometheus of a test's own (Debian's `prometheus`, installed by
//! `scripts/test`, its path in `DYNAMOLLM_TEST_PROMETHEUS_BIN`), scraping
//! the given targets every second, with its own config and data directory.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn prometheus_bin() -> String {
    std::env::var("DYNAMOLLM_TEST_PROMETHEUS_BIN").unwrap_or_else(|_| {
        panic!("DYNAMOLLM_TEST_PROMETHEUS_BIN is not set: run the tests through scripts/test (it installs Prometheus)")
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Prometheus of this test's own, killed (and waited for) on drop.
pub struct Prometheus {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Start it scraping `targets` (`host:port`) every second, its data in `dir`.
    pub fn start(dir: &Path, targets: &[String]) -> Prometheus {
        let port = free_port();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: engines\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let child = std::process::Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start prometheus");
        Prometheus { child, base: format!("http://127.0.0.1:{port}"), log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query's JSON answer.
    pub async fn query(&self, http: &reqwest::Client, q: &str) -> Result<Value, String> {
        let r = http
            .post(format!("{}/api/v1/query", self.base))
            .form(&[("query", q)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        r.json().await.map_err(|e| e.to_string())
    }

    /// Wait until every target is up (scraped at least once).
    pub async fn wait_up(&mut self, http: &reqwest::Client, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if let Ok(v) = self.query(http, "up == 1").await {
                if v["data"]["result"].as_array().is_some_and(|r| r.len() == n) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "prometheus did not scrape the {n} engines:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
