//! The `[telemetry]` section of the dynamollm TOML config. Every key has a
//! default, so no config is needed; an unknown key is an error that names it
//! (and the file, when loading from one).
//!
//! ```toml
//! [telemetry]
//! site = "dc1"
//! node = "controller-0"
//!
//! [telemetry.store]          # the embedded store (default on)
//! data_dir = "data/telemetry"
//! flush_interval_ms = 1000
//! raw_retention_h = 48
//! minute_retention_d = 35
//! hour_retention_d = 730
//!
//! [telemetry.influx]         # the InfluxDB v2 sink (off unless url is set)
//! url = "http://127.0.0.1:8086"
//! org = "dynamollm"
//! bucket = "telemetry"
//! token = ""
//!
//! [telemetry.mqtt]           # MQTT ingest from edge nodes (off unless host is set)
//! host = "127.0.0.1"
//! port = 8883
//! username = "controller"    # with password or password_file (printed as ***)
//! password_file = "/run/credentials/dynamollm.service/mqtt-password"
//! tls = true                 # with ca_file; client_cert_file + client_key_file optional
//! ca_file = "/etc/dynamollm/ca.pem"
//!
//! [telemetry.gpu]            # NVML (or the twin's fake device)
//! interval_ms = 1000
//!
//! [telemetry.prometheus]     # engine and GPU telemetry from a query API (off unless url is set)
//! url = "http://prometheus:9090"
//! interval_s = 1.0
//!
//! [[telemetry.engines]]      # engine /metrics pages to scrape
//! url = "http://127.0.0.1:8000/metrics"
//! instance = "i0"
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A bad telemetry config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or ill-typed key.
    #[error("config {origin}: {message}")]
    Invalid {
        /// The file, or `<string>`.
        origin: String,
        /// TOML's message: names the key, line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("config {origin}: telemetry.{key}: {problem}")]
    Value {
        /// The file, or `<string>`.
        origin: String,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The `[telemetry]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// This controller's site tag.
    pub site: String,
    /// This controller's node tag.
    pub node: String,
    /// The embedded store.
    pub store: StoreConfig,
    /// The InfluxDB v2 sink.
    pub influx: InfluxConfig,
    /// MQTT ingest.
    pub mqtt: MqttConfig,
    /// GPU collector.
    pub gpu: GpuConfig,
    /// Engine pages to scrape.
    pub engines: Vec<EngineTarget>,
    /// Engine and GPU telemetry from a Prometheus-compatible query API.
    pub prometheus: PrometheusConfig,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            site: "local".into(),
            node: "controller".into(),
            store: StoreConfig::default(),
            influx: InfluxConfig::default(),
            mqtt: MqttConfig::default(),
            gpu: GpuConfig::default(),
            engines: Vec::new(),
            prometheus: PrometheusConfig::default(),
        }
    }
}

/// `[telemetry.store]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Keep telemetry in the embedded store.
    pub enabled: bool,
    /// Directory of the store's files.
    pub data_dir: PathBuf,
    /// Commit interval: a crash loses at most this much.
    pub flush_interval_ms: u64,
    /// Raw samples are kept this long.
    pub raw_retention_h: u64,
    /// 1-minute rollups are kept this long.
    pub minute_retention_d: u64,
    /// 1-hour rollups are kept this long.
    pub hour_retention_d: u64,
    /// Interval of rollup and retention passes.
    pub maintenance_interval_s: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            enabled: true,
            data_dir: PathBuf::from("data/telemetry"),
            flush_interval_ms: 1000,
            raw_retention_h: 48,
            minute_retention_d: 35,
            hour_retention_d: 730,
            maintenance_interval_s: 60,
        }
    }
}

impl StoreConfig {
    /// The commit interval.
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    /// Retention of raw, minute and hour data.
    pub fn retention(&self) -> crate::store::Retention {
        crate::store::Retention {
            raw: Duration::from_secs(self.raw_retention_h * 3600),
            minute: Duration::from_secs(self.minute_retention_d * 86_400),
            hour: Duration::from_secs(self.hour_retention_d * 86_400),
        }
    }
}

/// `[telemetry.influx]`: the InfluxDB v2 sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxConfig {
    /// Server URL (`http://host:8086`); the sink is off when absent.
    pub url: Option<String>,
    /// Organisation.
    pub org: String,
    /// Bucket.
    pub bucket: String,
    /// API token (empty: no `Authorization` header).
    pub token: String,
    /// A batch is sent when it holds this many points…
    pub batch_points: usize,
    /// …or when its oldest point is this old.
    pub batch_interval_ms: u64,
    /// Gzip request bodies.
    pub gzip: bool,
    /// Timeout of one write request.
    pub timeout_ms: u64,
    /// First retry delay after a failed write.
    pub retry_initial_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Where batches wait during an outage.
    pub spool_dir: PathBuf,
    /// The spool's size limit; past it the oldest batches are dropped (and counted).
    pub spool_max_mb: u64,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        InfluxConfig {
            url: None,
            org: "dynamollm".into(),
            bucket: "telemetry".into(),
            token: String::new(),
            batch_points: 5000,
            batch_interval_ms: 1000,
            gzip: true,
            timeout_ms: 10_000,
            retry_initial_ms: 250,
            retry_max_ms: 10_000,
            spool_dir: PathBuf::from("data/telemetry/spool"),
            spool_max_mb: 1024,
        }
    }
}

/// A secret (a password) from the config: its `Debug` and `Display` print
/// `***`, so it never reaches a log; [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself (for the one place that needs it: the wire).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `[telemetry.mqtt]`: MQTT ingest (and, reused as `[agent.mqtt]`, an edge
/// node's broker connection).
///
/// Credentials: `username` with either `password` or `password_file` (the
/// file's first line; suits systemd's `LoadCredential=`). TLS: `tls = true`
/// with `ca_file` (PEM, the CA that signed the broker's certificate) and,
/// for client-certificate authentication, `client_cert_file` and
/// `client_key_file` (PEM) together. The files are read when the settings
/// are built ([`crate::mqtt::MqttSettings::from_config`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host; MQTT is off when absent.
    pub host: Option<String>,
    /// Broker port (1883 plain, 8883 is usual for TLS).
    pub port: u16,
    /// User name for the broker (none: anonymous).
    pub username: Option<String>,
    /// Password for `username` (printed as `***`).
    pub password: Option<Secret>,
    /// A file holding the password (first line), instead of `password`.
    pub password_file: Option<PathBuf>,
    /// Connect over TLS.
    pub tls: bool,
    /// PEM file of the CA certificate(s) the broker's certificate must chain to (required with `tls`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), for brokers that require one.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Client id (the broker keeps the session, and queues QoS 1 messages, across reconnects).
    /// Left at its default, `serve` makes it its own (`dynamollm-controller-<host>-<pid>`) and
    /// the agent `dynamollm-agent-<site>-<node>`.
    pub client_id: String,
    /// First topic level.
    pub topic_prefix: String,
    /// MQTT keep-alive.
    pub keep_alive_s: u64,
    /// First reconnect delay.
    pub reconnect_initial_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_max_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: None,
            port: 1883,
            username: None,
            password: None,
            password_file: None,
            tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            client_id: "dynamollm-controller".into(),
            topic_prefix: "dynamollm".into(),
            keep_alive_s: 10,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 5000,
        }
    }
}

impl MqttConfig {
    /// Checks that need no file: `password`/`password_file` go with
    /// `username` (and not both), `tls` needs `ca_file`, the client
    /// certificate and key come together, the TLS files are only set
    /// with `tls`, and the numbers are in range (`port` 1–65535,
    /// `keep_alive_s` 1–65535, `reconnect_initial_ms` 1 ms–1 h,
    /// `reconnect_max_ms` from `reconnect_initial_ms` to 1 h). Errors name
    /// the key (`mqtt.…`).
    pub fn check(&self) -> Result<(), crate::mqtt::MqttConfigError> {
        let bad = |key: &'static str, problem: &str| crate::mqtt::MqttConfigError { key, problem: problem.into() };
        if self.password.is_some() && self.password_file.is_some() {
            return Err(bad("mqtt.password_file", "set either password or password_file, not both"));
        }
        if self.username.is_none() && (self.password.is_some() || self.password_file.is_some()) {
            return Err(bad("mqtt.username", "a password is set but no username"));
        }
        if self.tls && self.ca_file.is_none() {
            return Err(bad("mqtt.ca_file", "required when tls = true (the CA that signed the broker's certificate)"));
        }
        if !self.tls {
            for (key, v) in [
                ("mqtt.ca_file", &self.ca_file),
                ("mqtt.client_cert_file", &self.client_cert_file),
                ("mqtt.client_key_file", &self.client_key_file),
            ] {
                if v.is_some() {
                    return Err(bad(key, "set but tls is false (set tls = true to use it)"));
                }
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            let key = if self.client_cert_file.is_some() { "mqtt.client_key_file" } else { "mqtt.client_cert_file" };
            return Err(bad(key, "client_cert_file and client_key_file go together"));
        }
        for (key, v, lo, hi) in [
            ("mqtt.port", u64::from(self.port), 1, 65_535),
            // MQTT carries the keep-alive as 16-bit seconds; rumqttc wants at least 1.
            ("mqtt.keep_alive_s", self.keep_alive_s, 1, 65_535),
            ("mqtt.reconnect_initial_ms", self.reconnect_initial_ms, 1, MAX_INTERVAL_MS),
            ("mqtt.reconnect_max_ms", self.reconnect_max_ms, self.reconnect_initial_ms.max(1), MAX_INTERVAL_MS),
        ] {
            if let Some(problem) = out_of_range(v, lo, hi) {
                return Err(bad(key, &problem));
            }
        }
        Ok(())
    }
}

/// `[telemetry.gpu]`: the GPU collector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Collect GPU samples.
    pub enabled: bool,
    /// Sampling interval.
    pub interval_ms: u64,
    /// Read the twin's fake device at this URL instead of NVML.
    pub twin_url: Option<String>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig { enabled: true, interval_ms: 1000, twin_url: None }
    }
}

/// `[[telemetry.engines]]`: one engine `/metrics` page.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineTarget {
    /// The page (`http://host:port/metrics`).
    pub url: String,
    /// Instance tag.
    pub instance: String,
    /// Pool tag.
    #[serde(default)]
    pub pool: Option<String>,
    /// Scrape interval.
    #[serde(default = "default_scrape_ms")]
    pub interval_ms: u64,
    /// Request timeout.
    #[serde(default = "default_scrape_timeout_ms")]
    pub timeout_ms: u64,
}

/// `[telemetry.prometheus]`: engine and GPU telemetry read from a
/// Prometheus-compatible query API (Prometheus, Thanos, VictoriaMetrics) that
/// already scrapes the engines (and the DCGM exporters), instead of (or
/// beside) the service's own scrapes; off unless `url` is set.
///
/// Every `interval_s` the service asks `<url>/api/v1/query` for the latest
/// value of each series it reads (vLLM's and SGLang's engine series, DCGM's
/// and the twin's GPU series). An engine series belongs to the placed
/// instance whose endpoint's `host:port` equals its `instance_label`; a DCGM
/// series to the instance placed on the node whose name (after the site,
/// `dc1/node7` → `node7`) equals its `node_label` and that holds its `gpu`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Base URL of the query API (`http://prometheus:9090`; a path prefix,
    /// such as VictoriaMetrics cluster's `/select/0/prometheus`, is kept).
    pub url: Option<String>,
    /// Bearer token sent with every query (printed as `***`).
    pub token: Option<Secret>,
    /// A file holding the token (first line), instead of `token`.
    pub token_file: Option<PathBuf>,
    /// Query interval (s); keep it below `service.stale_after_s`.
    pub interval_s: f64,
    /// Timeout of one query.
    pub timeout_ms: u64,
    /// The label holding an engine series' `host:port` (Prometheus' `instance`).
    pub instance_label: String,
    /// The label holding a DCGM series' node name (the exporter's `Hostname`);
    /// a series without it is placed by its `instance_label`'s host.
    pub node_label: String,
    /// Extra label matchers every query carries (`job="vllm", cluster="prod"`):
    /// for a server that holds more than this cluster, or the same engine twice.
    pub selector: String,
    /// The largest answer read (MiB); a larger one is refused, naming its size.
    pub max_response_mb: u64,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            url: None,
            token: None,
            token_file: None,
            interval_s: 1.0,
            timeout_ms: 2000,
            instance_label: "instance".into(),
            node_label: "Hostname".into(),
            selector: String::new(),
            max_response_mb: 64,
        }
    }
}

impl PrometheusConfig {
    /// The query interval.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval_s)
    }

    /// The bearer token: `token`, or the first line of `token_file` (read now;
    /// an unreadable or empty file is an error naming it). `None`: no header.
    pub fn bearer(&self) -> Result<Option<Secret>, String> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        let Some(p) = &self.token_file else { return Ok(None) };
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("prometheus.token_file: cannot read {}: {e}", p.display()))?;
        let t = text.lines().next().unwrap_or("").trim();
        if t.is_empty() {
            return Err(format!("prometheus.token_file: {} is empty", p.display()));
        }
        Ok(Some(Secret::new(t)))
    }

    /// Checks that need no file; errors name the key (`prometheus.…`).
    fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(url) = &self.url {
            if reqwest::Url::parse(url).map_or(true, |u| !matches!(u.scheme(), "http" | "https") || u.host().is_none())
            {
                return Err(("prometheus.url", format!("{url:?} is not an http(s) URL")));
            }
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err(("prometheus.token_file", "set either token or token_file, not both".into()));
        }
        if self.token.as_ref().is_some_and(|t| {
            t.expose().is_empty() || t.expose().chars().any(|c| c.is_control() || c.is_whitespace() || !c.is_ascii())
        }) {
            return Err(("prometheus.token", "must be printable ASCII without spaces".into()));
        }
        let i = self.interval_s;
        if !(0.1..=3_600.0).contains(&i) {
            return Err(("prometheus.interval_s", format!("must be in [0.1, 3600], got {i}")));
        }
        for (key, v, lo, hi) in [
            ("prometheus.timeout_ms", self.timeout_ms, 1, MAX_INTERVAL_MS),
            ("prometheus.max_response_mb", self.max_response_mb, 1, 4096),
        ] {
            if let Some(problem) = out_of_range(v, lo, hi) {
                return Err((key, problem));
            }
        }
        for (key, l) in
            [("prometheus.instance_label", &self.instance_label), ("prometheus.node_label", &self.node_label)]
        {
            let ok = l.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err((key, format!("{l:?} is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)")));
            }
        }
        if self.selector.contains(['{', '}']) || self.selector.chars().any(char::is_control) {
            return Err((
                "prometheus.selector",
                format!("{:?} must be label matchers without braces, like job=\"vllm\"", self.selector),
            ));
        }
        Ok(())
    }
}

fn default_scrape_ms() -> u64 {
    1000
}

fn default_scrape_timeout_ms() -> u64 {
    2000
}

/// The longest interval, delay or timeout in milliseconds a key may give (an hour).
pub const MAX_INTERVAL_MS: u64 = 3_600_000;

/// `None` when `lo <= v <= hi`, else what is wrong (`must be in [lo, hi], got v`).
pub fn out_of_range(v: u64, lo: u64, hi: u64) -> Option<String> {
    (!(lo..=hi).contains(&v)).then(|| format!("must be in [{lo}, {hi}], got {v}"))
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    telemetry: Option<TelemetryConfig>,
}

impl TelemetryConfig {
    /// Parse the `[telemetry]` table of a whole config document (other tables
    /// are other crates' business). A document without it gives the defaults.
    pub fn from_toml_str(text: &str) -> Result<TelemetryConfig, ConfigError> {
        Self::parse(text, "<string>")
    }

    /// As [`TelemetryConfig::from_toml_str`], with `origin` (the file) named in errors.
    pub fn from_toml_str_in(text: &str, origin: &str) -> Result<TelemetryConfig, ConfigError> {
        Self::parse(text, origin)
    }

    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<TelemetryConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, origin: &str) -> Result<TelemetryConfig, ConfigError> {
        let doc: Document = toml::from_str(text)
            .map_err(|e| ConfigError::Invalid { origin: origin.into(), message: e.to_string().trim_end().into() })?;
        let cfg = doc.telemetry.unwrap_or_default();
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &'static str, problem: &str| ConfigError::Value {
            origin: origin.into(),
            key,
            problem: problem.into(),
        };
        let (s, i) = (&self.store, &self.influx);
        for (key, v, lo, hi) in [
            ("store.flush_interval_ms", s.flush_interval_ms, 1, MAX_INTERVAL_MS),
            ("store.raw_retention_h", s.raw_retention_h, 1, 87_600),
            ("store.minute_retention_d", s.minute_retention_d, 1, 36_500),
            ("store.hour_retention_d", s.hour_retention_d, 1, 36_500),
            ("store.maintenance_interval_s", s.maintenance_interval_s, 1, 86_400),
            ("influx.batch_points", i.batch_points as u64, 1, 100_000),
            ("influx.batch_interval_ms", i.batch_interval_ms, 1, MAX_INTERVAL_MS),
            ("influx.timeout_ms", i.timeout_ms, 1, MAX_INTERVAL_MS),
            ("influx.retry_initial_ms", i.retry_initial_ms, 1, MAX_INTERVAL_MS),
            ("influx.retry_max_ms", i.retry_max_ms, i.retry_initial_ms.max(1), MAX_INTERVAL_MS),
            ("influx.spool_max_mb", i.spool_max_mb, 1, 1 << 20),
            ("gpu.interval_ms", self.gpu.interval_ms, 1, MAX_INTERVAL_MS),
        ] {
            if let Some(problem) = out_of_range(v, lo, hi) {
                return Err(bad(key, &problem));
            }
        }
        if let Some(url) = &self.influx.url {
            if reqwest::Url::parse(url).is_err() {
                return Err(bad("influx.url", &format!("{url:?} is not a URL")));
            }
        }
        if let Err(e) = self.mqtt.check() {
            return Err(ConfigError::Value { origin: origin.into(), key: e.key, problem: e.problem });
        }
        if let Err((key, problem)) = self.prometheus.check() {
            return Err(bad(key, &problem));
        }
        for e in &self.engines {
            if reqwest::Url::parse(&e.url).is_err() {
                return Err(bad("engines.url", &format!("{:?} is not a URL", e.url)));
            }
            for (key, v) in [("engines.interval_ms", e.interval_ms), ("engines.timeout_ms", e.timeout_ms)] {
                if let Some(problem) = out_of_range(v, 1, MAX_INTERVAL_MS) {
                    return Err(bad(key, &format!("{problem} (engine {})", e.url)));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_table_gives_the_defaults() {
        let cfg = TelemetryConfig::from_toml_str("[other]\nx = 1\n").unwrap();
        assert_eq!(cfg, TelemetryConfig::default());
        assert!(cfg.store.enabled);
        assert_eq!(cfg.influx.url, None);
    }

    #[test]
    fn keys_are_read_and_unset_ones_default() {
        let cfg = TelemetryConfig::from_toml_str(
            r#"
[telemetry]
site = "dc1"
[telemetry.influx]
url = "http://127.0.0.1:8086"
batch_points = 100
[[telemetry.engines]]
url = "http://127.0.0.1:8000/metrics"
instance = "i0"
"#,
        )
        .unwrap();
        assert_eq!(cfg.site, "dc1");
        assert_eq!(cfg.node, "controller");
        assert_eq!(cfg.influx.batch_points, 100);
        assert_eq!(cfg.influx.batch_interval_ms, 1000);
        assert_eq!(cfg.engines[0].interval_ms, 1000);
    }

    #[test]
    fn unknown_key_is_an_error_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dynamollm.toml");
        std::fs::write(&path, "[telemetry.influx]\nurl = \"http://x:1\"\nbatch_pointz = 5\n").unwrap();
        let e = TelemetryConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("batch_pointz"), "{e}");
        assert!(e.contains("dynamollm.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn numbers_out_of_range_name_the_key() {
        for (table, key, v) in [
            ("store", "flush_interval_ms", "0"),
            ("store", "raw_retention_h", "9999999999999"),
            ("store", "maintenance_interval_s", "0"),
            ("influx", "batch_points", "100000000"),
            ("influx", "retry_max_ms", "100"),
            ("influx", "spool_max_mb", "0"),
            ("mqtt", "port", "0"),
            ("mqtt", "keep_alive_s", "0"),
            ("mqtt", "keep_alive_s", "70000"),
            ("mqtt", "reconnect_max_ms", "50"),
            ("gpu", "interval_ms", "0"),
        ] {
            let e = TelemetryConfig::from_toml_str_in(&format!("[telemetry.{table}]\n{key} = {v}\n"), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("t.toml") && e.contains(&format!("telemetry.{table}.{key}")) && e.contains(v), "{e}");
        }
        let e = TelemetryConfig::from_toml_str(
            "[[telemetry.engines]]\nurl = \"http://e:8000/metrics\"\ninstance = \"i\"\ntimeout_ms = 0\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("telemetry.engines.timeout_ms"), "{e}");
    }

    #[test]
    fn prometheus_keys_are_read_and_checked() {
        let cfg = TelemetryConfig::from_toml_str(
            "[telemetry.prometheus]\nurl = \"http://prom:9090\"\ntoken = \"t0k\"\ninterval_s = 0.5\nselector = 'job=\"vllm\"'\n",
        )
        .unwrap();
        let p = &cfg.prometheus;
        assert_eq!(p.url.as_deref(), Some("http://prom:9090"));
        assert_eq!((p.interval_s, p.timeout_ms, p.max_response_mb), (0.5, 2000, 64));
        assert_eq!((p.instance_label.as_str(), p.node_label.as_str()), ("instance", "Hostname"));
        assert_eq!(format!("{:?}", p.token), "Some(***)");
        assert_eq!(TelemetryConfig::default().prometheus.url, None);
        for (line, key) in [
            ("url = \"prom:9090\"", "prometheus.url"),
            ("url = \"ftp://prom\"", "prometheus.url"),
            ("interval_s = 0.0", "prometheus.interval_s"),
            ("interval_s = nan", "prometheus.interval_s"),
            ("timeout_ms = 0", "prometheus.timeout_ms"),
            ("max_response_mb = 0", "prometheus.max_response_mb"),
            ("instance_label = \"in stance\"", "prometheus.instance_label"),
            ("node_label = \"\"", "prometheus.node_label"),
            ("selector = \"}} or vector(1) {{\"", "prometheus.selector"),
            ("token = \"a b\"", "prometheus.token"),
            ("token = \"x\"\ntoken_file = \"/t\"", "prometheus.token_file"),
            ("instance_lable = \"x\"", "instance_lable"),
        ] {
            let e = TelemetryConfig::from_toml_str_in(&format!("[telemetry.prometheus]\n{line}\n"), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("t.toml") && e.contains(key), "{line}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\nignored\n").unwrap();
        let p = PrometheusConfig { token_file: Some(f.clone()), ..PrometheusConfig::default() };
        assert_eq!(p.bearer().unwrap().unwrap().expose(), "s3cret");
        std::fs::write(&f, "\n").unwrap();
        assert!(p.bearer().unwrap_err().contains("is empty"));
        let gone = PrometheusConfig { token_file: Some(dir.path().join("no")), ..PrometheusConfig::default() };
        assert!(gone.bearer().unwrap_err().contains("prometheus.token_file: cannot read"));
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = TelemetryConfig::from_toml_str("[telemetry.influx]\nurl = \"not a url\"\n").unwrap_err();
        assert_eq!(e.to_string(), "config <string>: telemetry.influx.url: \"not a url\" is not a URL");
        let e = TelemetryConfig::from_toml_str("[telemetry.store]\nflush_interval_ms = \"1s\"\n").unwrap_err();
        assert!(e.to_string().contains("flush_interval_ms"), "{e}");
    }
}
