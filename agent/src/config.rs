//! The `[agent]` config: its keys, their checks, and the broker settings they give.

use crate::exec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use telemetry::config::MqttConfig;
use telemetry::mqtt::MqttSettings;

/// A bad agent config, or a failure to start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Malformed TOML, or an unknown or ill-typed key (TOML's message names it).
    #[error("config {origin}: {message}")]
    Invalid {
        /// The file, or `<string>`.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A value is wrong.
    #[error("config {origin}: agent.{key}: {problem}")]
    Value {
        /// The file, or `<string>`.
        origin: String,
        /// The key under `[agent]`.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// The state file is unreadable or corrupt.
    #[error("state file {path}: {problem}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The GPU device could not be opened.
    #[error("agent.gpu: {0}")]
    Gpu(String),
}

/// Which GPU device the agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuKind {
    /// The node's real GPUs through NVML (clock locking needs root or CAP_SYS_ADMIN).
    Nvml,
    /// The fake device of a `dynamollm twin serve` instance at `twin_url`.
    Twin,
}

/// The `[agent]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The site (second topic level).
    pub site: String,
    /// This node (third topic level).
    pub node: String,
    /// `nvml` or `twin`.
    pub gpu: GpuKind,
    /// The twin's base URL (`http://127.0.0.1:8000`), with `gpu = "twin"`.
    #[serde(default)]
    pub twin_url: Option<String>,
    /// The local engine's `/metrics` page (vLLM or SGLang); none: GPU telemetry only.
    #[serde(default)]
    pub engine_url: Option<String>,
    /// Instance tag of the engine's samples (default: the node's name).
    #[serde(default)]
    pub instance: Option<String>,
    /// Pool tag of the engine's samples.
    #[serde(default)]
    pub pool: Option<String>,
    /// Telemetry interval.
    #[serde(default = "default_interval_s")]
    pub interval_s: f64,
    /// Timeout of one engine scrape.
    #[serde(default = "default_scrape_timeout_ms")]
    pub scrape_timeout_ms: u64,
    /// Lowest clock a SetClock may lock (lower asks are raised to it).
    #[serde(default)]
    pub clock_min_mhz: Option<u32>,
    /// Highest clock a SetClock may lock (higher asks are lowered to it).
    #[serde(default)]
    pub clock_max_mhz: Option<u32>,
    /// Where the ids of applied actions are kept (JSON, rewritten atomically).
    pub state_file: PathBuf,
    /// The broker (keys as `[telemetry.mqtt]`: host, port, username,
    /// password/password_file, tls, ca_file, client_cert_file,
    /// client_key_file, client_id, topic_prefix, keep_alive_s, reconnect_*).
    /// A `client_id` left at its default becomes `dynamollm-agent-<site>-<node>`.
    pub mqtt: MqttConfig,
    /// Commands that carry out spawn/retire/reshard/route on this node
    /// (none: those actions are refused).
    #[serde(default)]
    pub exec: Option<exec::ExecConfig>,
    /// The key the controller signs commands with (a file, first line, at
    /// least 32 characters; the controller's `[actuators.mqtt]
    /// command_key_file` holds the same). Required unless
    /// `insecure_unsigned_commands`.
    #[serde(default)]
    pub command_key_file: Option<PathBuf>,
    /// Take unsigned commands (any client that can publish on the broker
    /// could then command this node's GPUs).
    #[serde(default)]
    pub insecure_unsigned_commands: bool,
    /// A command issued longer ago than this (or this far in the future, by
    /// the agent's clock) is refused as expired.
    #[serde(default = "default_command_ttl_s")]
    pub command_ttl_s: f64,
    /// No heartbeat or command from the controller for this long (a broker
    /// outage included): the agent unlocks the clocks it locked (the GPUs go
    /// back to their top clocks) until the controller is heard again.
    #[serde(default = "default_failsafe_after_s")]
    pub failsafe_after_s: f64,
}

fn default_command_ttl_s() -> f64 {
    60.0
}

fn default_failsafe_after_s() -> f64 {
    30.0
}

fn default_interval_s() -> f64 {
    1.0
}

fn default_scrape_timeout_ms() -> u64 {
    2000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    agent: Option<AgentConfig>,
}

impl AgentConfig {
    /// Parse a config document holding an `[agent]` table.
    pub fn from_toml_str(text: &str) -> Result<AgentConfig, AgentError> {
        Self::parse(text, "<string>")
    }

    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<AgentConfig, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentError::Read { path: path.into(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, origin: &str) -> Result<AgentConfig, AgentError> {
        let doc: Document = toml::from_str(text)
            .map_err(|e| AgentError::Invalid { origin: origin.into(), message: e.to_string().trim_end().into() })?;
        let mut cfg = doc
            .agent
            .ok_or_else(|| AgentError::Invalid { origin: origin.into(), message: "no [agent] table".into() })?;
        if cfg.mqtt.client_id == MqttConfig::default().client_id {
            cfg.mqtt.client_id = format!("dynamollm-agent-{}-{}", cfg.site, cfg.node);
        }
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), AgentError> {
        let bad = |key: &str, problem: String| AgentError::Value { origin: origin.into(), key: key.into(), problem };
        for (key, v) in [("site", &self.site), ("node", &self.node)] {
            if v.is_empty() || v.contains(['/', '+', '#']) || v.chars().any(char::is_whitespace) {
                return Err(bad(key, format!("{v:?} must be a non-empty topic level (no '/', '+', '#' or spaces)")));
            }
        }
        match (self.gpu, &self.twin_url) {
            (GpuKind::Twin, None) => return Err(bad("twin_url", "required with gpu = \"twin\"".into())),
            (GpuKind::Twin, Some(u)) if reqwest::Url::parse(u).is_err() => {
                return Err(bad("twin_url", format!("{u:?} is not a URL")))
            }
            (GpuKind::Nvml, Some(_)) => return Err(bad("twin_url", "only used with gpu = \"twin\"".into())),
            _ => {}
        }
        if let Some(u) = &self.engine_url {
            if reqwest::Url::parse(u).is_err() {
                return Err(bad("engine_url", format!("{u:?} is not a URL")));
            }
        }
        let i = self.interval_s;
        if !(0.05..=3_600.0).contains(&i) {
            let shown = if i != 0.0 && (i.abs() >= 1e9 || i.abs() < 1e-4) { format!("{i:e}") } else { format!("{i}") };
            return Err(bad("interval_s", format!("must be a number of seconds in [0.05, 3600], got {shown}")));
        }
        if !(1..=600_000).contains(&self.scrape_timeout_ms) {
            return Err(bad("scrape_timeout_ms", format!("must be in [1, 600000], got {}", self.scrape_timeout_ms)));
        }
        for (key, v) in [("clock_min_mhz", self.clock_min_mhz), ("clock_max_mhz", self.clock_max_mhz)] {
            // Left out: the GPU's own bound.
            if let Some(v) = v.filter(|v| !(1..=100_000).contains(v)) {
                return Err(bad(key, format!("must be a clock in MHz in [1, 100000] (or left out), got {v}")));
            }
        }
        if let (Some(lo), Some(hi)) = (self.clock_min_mhz, self.clock_max_mhz) {
            if lo > hi {
                return Err(bad("clock_min_mhz", format!("{lo} is above clock_max_mhz {hi}")));
            }
        }
        if self.mqtt.host.is_none() {
            return Err(bad("mqtt.host", "required (the site's broker)".into()));
        }
        if let Err(e) = self.mqtt.check() {
            return Err(bad(e.key, e.problem));
        }
        if let Some(Err((key, problem))) = self.exec.as_ref().map(exec::ExecConfig::check) {
            return Err(bad(&key, problem));
        }
        if self.state_file.as_os_str().is_empty() {
            return Err(bad("state_file", "must be a file path".into()));
        }
        if self.command_key_file.is_none() && !self.insecure_unsigned_commands {
            return Err(bad(
                "command_key_file",
                "required: the key the controller signs commands with (`openssl rand -hex 32`, the same file as the controller's [actuators.mqtt] command_key_file), or insecure_unsigned_commands = true".into(),
            ));
        }
        for (key, v, lo, hi) in [
            ("command_ttl_s", self.command_ttl_s, 1.0, 86_400.0),
            ("failsafe_after_s", self.failsafe_after_s, 1.0, 86_400.0),
        ] {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return Err(bad(key, format!("must be a number of seconds in [{lo}, {hi}], got {v}")));
            }
        }
        Ok(())
    }

    /// The broker settings (reads the password and TLS files).
    pub fn mqtt_settings(&self) -> Result<MqttSettings, AgentError> {
        let bad =
            |key: &str, problem: String| AgentError::Value { origin: "[agent.mqtt]".into(), key: key.into(), problem };
        match MqttSettings::from_config(&self.mqtt) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(bad("mqtt.host", "required (the site's broker)".into())),
            Err(e) => Err(bad(e.key, e.problem)),
        }
    }

    /// `<prefix>/<site>/<node>/<leaf>`.
    pub fn topic(&self, leaf: &str) -> String {
        format!("{}/{}/{}/{leaf}", self.mqtt.topic_prefix, self.site, self.node)
    }
}
