//! `[actuators]`: which backends run, and how; [`build`] turns it into a
//! [`Dispatcher`].
//!
//! ```toml
//! [actuators]
//! order = ["nvml", "exec", "webhook", "mqtt"]   # the dispatch order (this is the default)
//!
//! [actuators.nvml]
//! min_clock_mhz = 800         # lowest clock ever locked (default 0: the GPU's lowest)
//! max_clock_mhz = 1980        # highest clock ever locked (default: the GPU's highest)
//! twin_url = "http://127.0.0.1:8000"   # use the twin's fake GPUs instead of NVML
//! timeout_ms = 10000          # per command
//!
//! [actuators.exec]
//! spawn = "/opt/dynamollm/spawn.sh"           # a shell line (sh -c) …
//! retire = ["/opt/dynamollm/retire", "--now"] # … or an argv list
//! reshard = "…"
//! set_clock = "…"
//! route = "…"
//! move_queued = "…"
//! timeout_ms = 600000         # per command; the process group is killed after it
//! stderr_tail_chars = 2000    # stderr quoted in a failure
//!
//! [actuators.webhook]
//! url = "http://orchestrator:9000/dynamollm"
//! token = "…"                 # bearer token (or token_env = "NAME" to read it from the environment)
//! attempts = 4                # requests in all per command
//! backoff_initial_ms = 200
//! backoff_max_ms = 5000
//! timeout_ms = 30000          # per command, retries included
//! kinds = ["spawn", "retire"] # action kinds it carries out (default all)
//!
//! [actuators.mqtt]            # the broker is [telemetry.mqtt]'s
//! client_id = "dynamollm-actuators"   # default: the telemetry client id + "-actuators"
//! ack_timeout_ms = 5000       # wait for an ack before publishing again
//! attempts = 3                # publications per command in all
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

impl ActuatorsConfig {
    /// Parse the `[actuators]` table's body from TOML.
    pub fn from_toml(text: &str) -> Result<ActuatorsConfig, BuildError> {
        toml::from_str(text).map_err(|e| invalid("actuators", e.to_string()))
    }
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
                let options = MqttActuatorOptions {
                    ack_timeout,
                    attempts,
                    default_node: c.default_node.clone(),
                    kinds: c.kinds.clone(),
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
