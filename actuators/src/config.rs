//! `[actuators]`: which backends run, and how; [`build`] turns it into a
//! [`Dispatcher`].
//!
//! ```toml
//! [actuators]
//! order = ["nvml", "exec", "webhook", "mqtt"]   # the dispatch order (this is the default)
//!
//! [actuators.nvml]
//! min_clock_mhz = 800         # lowest clock ever locked (0–100000; default 0: the GPU's lowest)
//! max_clock_mhz = 1980        # highest clock ever locked (1–100000; default: the GPU's highest)
//! twin_url = "http://127.0.0.1:8000"   # use the twin's fake GPUs instead of NVML
//! timeout_ms = 10000          # per command (1 ms–1 h)
//!
//! [actuators.exec]
//! spawn = "/opt/dynamollm/spawn.sh"           # a shell line (sh -c) …
//! retire = ["/opt/dynamollm/retire", "--now"] # … or an argv list
//! reshard = "…"
//! set_clock = "…"
//! route = "…"
//! move_queued = "…"
//! timeout_ms = 600000         # per command (1 ms–1 day); the process group is killed after it
//! stderr_tail_chars = 2000    # stderr quoted in a failure (0–1000000; 0: none)
//!
//! [actuators.webhook]
//! url = "http://orchestrator:9000/dynamollm"
//! token = "…"                 # bearer token (or token_env = "NAME" to read it from the environment)
//! attempts = 4                # requests in all per command (1–100)
//! backoff_initial_ms = 200     # 1 ms–1 h
//! backoff_max_ms = 5000        # backoff_initial_ms–1 h
//! timeout_ms = 30000          # per command, retries included (1 ms–1 h)
//! kinds = ["spawn", "retire"] # action kinds it carries out (default all)
//!
//! [actuators.mqtt]            # the broker is [telemetry.mqtt]'s
//! client_id = "dynamollm-actuators"   # default: the telemetry client id + "-actuators"
//! ack_timeout_ms = 5000       # wait for an ack before publishing again (1 ms–1 h)
//! attempts = 3                # publications per command in all (1–100)
//! default_node = "site1/node1"        # where spawns (no placement yet) go
//! kinds = ["spawn", "retire", "set-clock"]
//! ```

use crate::audit::AuditLog;
use crate::exec::{CommandLine, ExecActuator, ExecTemplates};
use crate::mqtt::{MqttActuator, MqttActuatorOptions};
use crate::nvml::NvmlActuator;
use crate::webhook::{Backoff, WebhookActuator};
use crate::{Dispatcher, Secret};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use telemetry::gpu::{GpuDevice, GpuError, NvmlDevice, TwinDevice};
use telemetry::mqtt::MqttSettings;

/// The action kinds, as `kinds` lists name them.
pub const KINDS: [&str; 6] = ["spawn", "retire", "reshard", "route", "set-clock", "move-queued"];

/// Backend names, as `order` names them.
pub const BACKENDS: [&str; 4] = ["nvml", "exec", "webhook", "mqtt"];

/// Added to each backend's own timeout for the dispatcher's outer bound, so
/// that the backend reports its own (more precise) timeout first.
pub const DISPATCH_GRACE: Duration = Duration::from_secs(2);

/// `[actuators]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActuatorsConfig {
    /// Dispatch order by backend name; the first configured backend that
    /// carries out an action kind gets it. Default `nvml, exec, webhook, mqtt`.
    #[serde(default)]
    pub order: Option<Vec<String>>,
    /// `[actuators.nvml]`: GPU clocks.
    #[serde(default)]
    pub nvml: Option<NvmlConfig>,
    /// `[actuators.exec]`: commands per action kind.
    #[serde(default)]
    pub exec: Option<ExecConfig>,
    /// `[actuators.webhook]`: HTTP POST per action.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// `[actuators.mqtt]`: commands to edge nodes over MQTT.
    #[serde(default)]
    pub mqtt: Option<MqttActuatorConfig>,
}

/// `[actuators.nvml]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmlConfig {
    /// Lowest clock locked (requests below are raised to it).
    #[serde(default)]
    pub min_clock_mhz: u32,
    /// Highest clock locked (requests above are lowered to it).
    #[serde(default = "max_clock")]
    pub max_clock_mhz: u32,
    /// Lock the twin's fake GPUs at this URL instead of real ones.
    #[serde(default)]
    pub twin_url: Option<String>,
    /// Per-command timeout.
    #[serde(default = "nvml_timeout")]
    pub timeout_ms: u64,
}

fn max_clock() -> u32 {
    u32::MAX
}
fn nvml_timeout() -> u64 {
    10_000
}

/// `[actuators.exec]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Command for `spawn`.
    #[serde(default)]
    pub spawn: Option<CommandLine>,
    /// Command for `retire`.
    #[serde(default)]
    pub retire: Option<CommandLine>,
    /// Command for `reshard`.
    #[serde(default)]
    pub reshard: Option<CommandLine>,
    /// Command for `set-clock`.
    #[serde(default)]
    pub set_clock: Option<CommandLine>,
    /// Command for `route`.
    #[serde(default)]
    pub route: Option<CommandLine>,
    /// Command for `move-queued` (the backlog guard's hand-over of unstarted requests).
    #[serde(default)]
    pub move_queued: Option<CommandLine>,
    /// Per-command timeout; past it the process group is killed.
    #[serde(default = "exec_timeout")]
    pub timeout_ms: u64,
    /// How much of stderr a failure quotes.
    #[serde(default = "stderr_tail")]
    pub stderr_tail_chars: usize,
}

fn exec_timeout() -> u64 {
    600_000
}
fn stderr_tail() -> usize {
    2000
}

/// `[actuators.webhook]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The URL commands are POSTed to.
    pub url: String,
    /// Bearer token (never logged).
    #[serde(default)]
    pub token: Option<Secret>,
    /// Read the bearer token from this environment variable instead.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Requests per command in all.
    #[serde(default = "webhook_attempts")]
    pub attempts: u32,
    /// First retry delay.
    #[serde(default = "backoff_initial")]
    pub backoff_initial_ms: u64,
    /// Longest retry delay.
    #[serde(default = "backoff_max")]
    pub backoff_max_ms: u64,
    /// Per-command timeout, retries included.
    #[serde(default = "webhook_timeout")]
    pub timeout_ms: u64,
    /// Action kinds carried out (all when absent).
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
}

fn webhook_attempts() -> u32 {
    4
}
fn backoff_initial() -> u64 {
    200
}
fn backoff_max() -> u64 {
    5000
}
fn webhook_timeout() -> u64 {
    30_000
}

/// `[actuators.mqtt]` (the broker connection is `[telemetry.mqtt]`'s).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttActuatorConfig {
    /// Client id; default the telemetry client id with `-actuators`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Wait this long for an ack before publishing again.
    #[serde(default = "ack_timeout")]
    pub ack_timeout_ms: u64,
    /// Publications per command in all.
    #[serde(default = "mqtt_attempts")]
    pub attempts: u32,
    /// `site/node` for spawns (commands without a placement).
    #[serde(default)]
    pub default_node: Option<String>,
    /// Action kinds carried out (all when absent).
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
    /// The key commands are signed with (a file, first line, at least 32
    /// characters); the agents hold the same. Required unless
    /// `insecure_unsigned_commands`.
    #[serde(default)]
    pub command_key_file: Option<std::path::PathBuf>,
    /// Send commands unsigned (any client that can publish could then
    /// command the GPUs): only for a broker no one else can write to.
    #[serde(default)]
    pub insecure_unsigned_commands: bool,
    /// How often the controller's heartbeat goes out (agents fail safe without it).
    #[serde(default = "heartbeat_interval")]
    pub heartbeat_interval_ms: u64,
}

fn heartbeat_interval() -> u64 {
    5000
}

fn ack_timeout() -> u64 {
    5000
}
fn mqtt_attempts() -> u32 {
    3
}

/// The configuration cannot be built into backends.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A key has a bad value.
    #[error("[actuators] {key}: {problem}")]
    Invalid {
        /// The key (`actuators.webhook.url`).
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// The GPU device cannot be opened.
    #[error("[actuators.nvml]: {0}")]
    Gpu(#[from] GpuError),
}

fn invalid(key: &str, problem: impl Into<String>) -> BuildError {
    BuildError::Invalid { key: key.into(), problem: problem.into() }
}

fn check_kinds(key: &str, kinds: &Option<Vec<String>>) -> Result<(), BuildError> {
    for k in kinds.iter().flatten() {
        if !KINDS.contains(&k.as_str()) {
            return Err(invalid(key, format!("unknown action kind {k:?} (known: {})", KINDS.join(", "))));
        }
    }
    Ok(())
}

fn positive(key: &str, ms: u64) -> Result<Duration, BuildError> {
    if ms == 0 {
        return Err(invalid(key, "must be more than 0"));
    }
    Ok(Duration::from_millis(ms))
}

/// The longest timeout, delay or backoff in milliseconds a key may give (an hour);
/// an exec command may run for up to a day ([`MAX_EXEC_TIMEOUT_MS`]).
pub const MAX_MS: u64 = 3_600_000;

/// The longest `[actuators.exec] timeout_ms` (a day: a cold spawn may download weights for long).
pub const MAX_EXEC_TIMEOUT_MS: u64 = 86_400_000;

/// The most `attempts` a webhook or MQTT command may make.
pub const MAX_ATTEMPTS: u32 = 100;

/// The highest clock (MHz) `[actuators.nvml]` may name.
pub const MAX_CLOCK_MHZ: u32 = 100_000;

fn in_range(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), BuildError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(invalid(key, format!("must be in [{lo}, {hi}], got {v}")))
    }
}

impl ActuatorsConfig {
    /// Parse the `[actuators]` table's body from TOML, and check every
    /// number is in range ([`ActuatorsConfig::check_ranges`]).
    pub fn from_toml(text: &str) -> Result<ActuatorsConfig, BuildError> {
        let c: ActuatorsConfig = toml::from_str(text).map_err(|e| invalid("actuators", e.to_string()))?;
        c.check_ranges()?;
        Ok(c)
    }

    /// Every numeric key in range; the error names the key
    /// (`actuators.webhook.attempts: must be in [1, 100], got 0`).
    pub fn check_ranges(&self) -> Result<(), BuildError> {
        if let Some(c) = &self.nvml {
            // 0: the GPU's lowest clock; the default max (u32::MAX): the GPU's highest.
            in_range("actuators.nvml.min_clock_mhz", c.min_clock_mhz.into(), 0, MAX_CLOCK_MHZ.into())?;
            if c.max_clock_mhz != max_clock() {
                in_range("actuators.nvml.max_clock_mhz", c.max_clock_mhz.into(), 1, MAX_CLOCK_MHZ.into())?;
            }
            in_range("actuators.nvml.timeout_ms", c.timeout_ms, 1, MAX_MS)?;
        }
        if let Some(c) = &self.exec {
            in_range("actuators.exec.timeout_ms", c.timeout_ms, 1, MAX_EXEC_TIMEOUT_MS)?;
            // 0: a failure quotes no stderr (it may carry secrets).
            in_range("actuators.exec.stderr_tail_chars", c.stderr_tail_chars as u64, 0, 1_000_000)?;
        }
        if let Some(c) = &self.webhook {
            in_range("actuators.webhook.attempts", c.attempts.into(), 1, MAX_ATTEMPTS.into())?;
            in_range("actuators.webhook.backoff_initial_ms", c.backoff_initial_ms, 1, MAX_MS)?;
            in_range("actuators.webhook.backoff_max_ms", c.backoff_max_ms, c.backoff_initial_ms.max(1), MAX_MS)?;
            in_range("actuators.webhook.timeout_ms", c.timeout_ms, 1, MAX_MS)?;
        }
        if let Some(c) = &self.mqtt {
            in_range("actuators.mqtt.ack_timeout_ms", c.ack_timeout_ms, 1, MAX_MS)?;
            in_range("actuators.mqtt.attempts", c.attempts.into(), 1, MAX_ATTEMPTS.into())?;
            in_range("actuators.mqtt.heartbeat_interval_ms", c.heartbeat_interval_ms, 1, MAX_MS)?;
        }
        Ok(())
    }

    /// Everything [`build`] checks that needs no device, environment or
    /// broker: the ranges, `order`, the clock bounds' order, the action
    /// kinds, empty exec commands, `token` with `token_env`, and
    /// `default_node`. Errors name the key.
    pub fn validate(&self) -> Result<(), BuildError> {
        self.check_ranges()?;
        if let Some(order) = &self.order {
            for (i, name) in order.iter().enumerate() {
                if !BACKENDS.contains(&name.as_str()) {
                    return Err(invalid(
                        "actuators.order",
                        format!("unknown backend {name:?} (known: {})", BACKENDS.join(", ")),
                    ));
                }
                if order[..i].contains(name) {
                    return Err(invalid("actuators.order", format!("{name:?} is listed twice")));
                }
            }
        }
        if let Some(c) = &self.nvml {
            if c.min_clock_mhz > c.max_clock_mhz {
                return Err(invalid(
                    "actuators.nvml.min_clock_mhz",
                    format!("{} is above max_clock_mhz {}", c.min_clock_mhz, c.max_clock_mhz),
                ));
            }
        }
        if let Some(c) = &self.exec {
            check_exec_commands(c)?;
        }
        if let Some(c) = &self.webhook {
            check_kinds("actuators.webhook.kinds", &c.kinds)?;
            if c.token.is_some() && c.token_env.is_some() {
                return Err(invalid("actuators.webhook.token_env", "set token or token_env, not both"));
            }
        }
        if let Some(c) = &self.mqtt {
            check_kinds("actuators.mqtt.kinds", &c.kinds)?;
            if let Some(n) = &c.default_node {
                crate::mqtt::split_site_node(n).map_err(|e| invalid("actuators.mqtt.default_node", e))?;
            }
        }
        Ok(())
    }
}

fn check_exec_commands(c: &ExecConfig) -> Result<(), BuildError> {
    for (k, v) in [
        ("spawn", &c.spawn),
        ("retire", &c.retire),
        ("reshard", &c.reshard),
        ("set_clock", &c.set_clock),
        ("route", &c.route),
        ("move_queued", &c.move_queued),
    ] {
        match v {
            Some(CommandLine::Argv(a)) if a.is_empty() => {
                return Err(invalid(&format!("actuators.exec.{k}"), "the argv list is empty"))
            }
            Some(CommandLine::Shell(s)) if s.trim().is_empty() => {
                return Err(invalid(&format!("actuators.exec.{k}"), "the command is empty"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Build the dispatcher: the configured backends in `order`, recording into
/// `audit`. `mqtt` is the broker connection (from `[telemetry.mqtt]`),
/// needed only when `[actuators.mqtt]` is set. Backends connect lazily; the
/// MQTT one starts its connection task, so call this inside a tokio runtime.
pub fn build(
    cfg: &ActuatorsConfig,
    audit: Arc<AuditLog>,
    mqtt: Option<&MqttSettings>,
) -> Result<Dispatcher, BuildError> {
    cfg.check_ranges()?;
    let default_order: Vec<String> = BACKENDS.iter().map(|s| s.to_string()).collect();
    let order = cfg.order.clone().unwrap_or(default_order);
    let mut seen = Vec::new();
    let mut d = Dispatcher::new(audit);
    for name in &order {
        if seen.contains(name) {
            return Err(invalid("actuators.order", format!("{name:?} is listed twice")));
        }
        seen.push(name.clone());
        match name.as_str() {
            "nvml" => {
                let Some(c) = &cfg.nvml else { continue };
                if c.min_clock_mhz > c.max_clock_mhz {
                    return Err(invalid(
                        "actuators.nvml.min_clock_mhz",
                        format!("{} is above max_clock_mhz {}", c.min_clock_mhz, c.max_clock_mhz),
                    ));
                }
                let timeout = positive("actuators.nvml.timeout_ms", c.timeout_ms)?;
                let device: Arc<dyn GpuDevice> = match &c.twin_url {
                    Some(url) => Arc::new(TwinDevice::new(url)?),
                    None => Arc::new(NvmlDevice::init()?),
                };
                d.push(Arc::new(NvmlActuator::new(device, c.min_clock_mhz, c.max_clock_mhz)), timeout + DISPATCH_GRACE);
            }
            "exec" => {
                let Some(c) = &cfg.exec else { continue };
                let timeout = positive("actuators.exec.timeout_ms", c.timeout_ms)?;
                let templates = ExecTemplates {
                    spawn: c.spawn.clone(),
                    retire: c.retire.clone(),
                    reshard: c.reshard.clone(),
                    set_clock: c.set_clock.clone(),
                    route: c.route.clone(),
                    move_queued: c.move_queued.clone(),
                };
                check_exec_commands(c)?;
                d.push(Arc::new(ExecActuator::new(templates, timeout, c.stderr_tail_chars)), timeout + DISPATCH_GRACE);
            }
            "webhook" => {
                let Some(c) = &cfg.webhook else { continue };
                check_kinds("actuators.webhook.kinds", &c.kinds)?;
                let timeout = positive("actuators.webhook.timeout_ms", c.timeout_ms)?;
                let token = match (&c.token, &c.token_env) {
                    (Some(_), Some(_)) => {
                        return Err(invalid("actuators.webhook.token_env", "set token or token_env, not both"))
                    }
                    (Some(t), None) => Some(t.clone()),
                    (None, Some(var)) => Some(Secret::new(std::env::var(var).map_err(|_| {
                        invalid("actuators.webhook.token_env", format!("the environment variable {var} is not set"))
                    })?)),
                    (None, None) => None,
                };
                let backoff = Backoff {
                    attempts: c.attempts.max(1),
                    initial: Duration::from_millis(c.backoff_initial_ms),
                    max: Duration::from_millis(c.backoff_max_ms.max(c.backoff_initial_ms)),
                };
                let w = WebhookActuator::new(&c.url, token, backoff, timeout, c.kinds.clone())
                    .map_err(|e| invalid("actuators.webhook.url", e))?;
                d.push(Arc::new(w), timeout + DISPATCH_GRACE);
            }
            "mqtt" => {
                let Some(c) = &cfg.mqtt else { continue };
                check_kinds("actuators.mqtt.kinds", &c.kinds)?;
                let Some(settings) = mqtt else {
                    return Err(invalid("actuators.mqtt", "needs a broker: set [telemetry.mqtt] host"));
                };
                if let Some(n) = &c.default_node {
                    crate::mqtt::split_site_node(n).map_err(|e| invalid("actuators.mqtt.default_node", e))?;
                }
                let ack_timeout = positive("actuators.mqtt.ack_timeout_ms", c.ack_timeout_ms)?;
                let mut settings = settings.clone();
                settings.client_id = c.client_id.clone().unwrap_or_else(|| format!("{}-actuators", settings.client_id));
                let attempts = c.attempts.max(1);
                let key = match (&c.command_key_file, c.insecure_unsigned_commands) {
                    (Some(path), _) => Some(
                        crate::signed::CommandKey::load(path)
                            .map_err(|e| invalid("actuators.mqtt.command_key_file", e))?,
                    ),
                    (None, true) => {
                        tracing::warn!("[actuators.mqtt] insecure_unsigned_commands: commands go unsigned; anyone who can publish on the broker can command the GPUs");
                        None
                    }
                    (None, false) => {
                        return Err(invalid(
                            "actuators.mqtt.command_key_file",
                            "required: the key commands are signed with (the agents hold the same; `openssl rand -hex 32`), or insecure_unsigned_commands = true",
                        ))
                    }
                };
                let heartbeat = positive("actuators.mqtt.heartbeat_interval_ms", c.heartbeat_interval_ms)?;
                let options = MqttActuatorOptions {
                    ack_timeout,
                    attempts,
                    default_node: c.default_node.clone(),
                    kinds: c.kinds.clone(),
                    key,
                    heartbeat: Some(heartbeat),
                };
                d.push(Arc::new(MqttActuator::spawn(settings, options)), ack_timeout * attempts + DISPATCH_GRACE);
            }
            other => {
                return Err(invalid(
                    "actuators.order",
                    format!("unknown backend {other:?} (known: {})", BACKENDS.join(", ")),
                ))
            }
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_out_of_range_name_the_key() {
        for (table, key, v) in [
            ("nvml", "min_clock_mhz", "100001"),
            ("nvml", "max_clock_mhz", "0"),
            ("nvml", "timeout_ms", "0"),
            ("exec", "timeout_ms", "0"),
            ("exec", "timeout_ms", "86400001"),
            ("exec", "stderr_tail_chars", "1000001"),
            ("mqtt", "ack_timeout_ms", "0"),
            ("mqtt", "attempts", "0"),
            ("mqtt", "attempts", "101"),
            ("mqtt", "heartbeat_interval_ms", "0"),
        ] {
            let e = ActuatorsConfig::from_toml(&format!("[{table}]\n{key} = {v}\n")).unwrap_err().to_string();
            assert!(e.contains(&format!("actuators.{table}.{key}")) && e.contains(v), "{e}");
        }
        for (key, v) in [("attempts", "0"), ("backoff_initial_ms", "0"), ("backoff_max_ms", "1"), ("timeout_ms", "0")] {
            let e = ActuatorsConfig::from_toml(&format!("[webhook]\nurl = \"http://x\"\n{key} = {v}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("actuators.webhook.{key}")), "{e}");
        }
        // 0 means something here: the GPU's lowest clock, no stderr quoted.
        ActuatorsConfig::from_toml("[nvml]\nmin_clock_mhz = 0\n[exec]\nstderr_tail_chars = 0\n").unwrap();
    }
}
