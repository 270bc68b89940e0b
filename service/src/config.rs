//! The service's configuration file (`dynamollm serve --config FILE`):
//! `[service]`, `[controller]`, `[cluster]`, plus the `[telemetry]` and
//! `[actuators]` tables their crates define. Unknown keys are errors that
//! name the file and key. `deploy/dynamollm.toml` documents every key.

use super::core::Mode;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub use telemetry::config::Secret;

/// Whether a presented token is the secret (constant time in the token's length).
pub fn token_matches(secret: &Secret, presented: &str) -> bool {
    let (a, b) = (secret.expose().as_bytes(), presented.as_bytes());
    if a.is_empty() || a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a client key cannot be one (a header value without spaces), if it cannot.
fn client_key_flaw(k: &str) -> Option<&'static str> {
    if k.is_empty() {
        Some("is empty")
    } else if k.chars().any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii()) {
        Some("must be printable ASCII without spaces")
    } else {
        None
    }
}

/// The shortest duration in seconds a key may give (a millisecond; for
/// `router.tokenize_budget_ms`, a microsecond).
pub const MIN_S: f64 = 0.001;
/// A week (s): the longest loop period.
pub const WEEK_S: f64 = 604_800.0;
/// The highest request rate (requests/s) a key may give.
pub const MAX_RPS: f64 = 1e9;
/// The most GPUs a key may give.
pub const MAX_GPUS: u32 = 1_000_000;
/// The most instances a key may give.
pub const MAX_INSTANCES: u32 = 100_000;

/// A number as an error shows it: `1e300`, not three hundred digits.
fn shown(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e9 || v.abs() < 1e-4) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// `[service]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSection {
    /// HTTP API address.
    pub listen: String,
    /// Bearer token every endpoint but `/healthz` and `/readyz` asks for.
    pub token: Option<Secret>,
    /// A file holding the token instead (first line).
    pub token_file: Option<PathBuf>,
    /// Where the plan, the inventory and the audit log are kept.
    pub state_dir: PathBuf,
    /// Mode at start (`auto`, `dry-run`, `failsafe`); a recovered state keeps its own.
    pub mode: String,
    /// Service seconds per wall second (above 1 only to replay against an accelerated twin).
    pub speed: f64,
    /// Telemetry older than this (s) puts the service in failsafe.
    pub stale_after_s: f64,
    /// The policy (`dynamollm`, `scale-inst`, `scale-shard`, `scale-freq`, `single-pool`, `multi-pool`).
    pub policy: String,
    /// The profile table (default: the bundled one).
    pub profile: Option<PathBuf>,
    /// SLO = this × the profile's unloaded latency of each class.
    pub slo_multiplier: f64,
    /// Longest wait for an action's outcome (s).
    pub action_timeout_s: f64,
    /// Per-class request rates (requests/s, keys `SS` … `LL`) to plan the first
    /// fleet for, before the router has seen any traffic (a fresh state only).
    pub initial_class_rps: Option<std::collections::BTreeMap<String, f64>>,
    /// The highest per-class arrival rate (requests/s) telemetry is believed
    /// about; an arrivals message implying more is refused and counted
    /// (`rejected_arrivals`). Default: 4× what the fleet (`gpu_budget`, else
    /// 1,024 GPUs) could carry as TP8 instances at the profile's capacity.
    pub max_class_rps: Option<f64>,
}

impl Default for ServiceSection {
    fn default() -> Self {
        ServiceSection {
            listen: "127.0.0.1:9464".into(),
            token: None,
            token_file: None,
            state_dir: PathBuf::from("dynamollm-state"),
            mode: "auto".into(),
            speed: 1.0,
            stale_after_s: 5.0,
            policy: "dynamollm".into(),
            profile: None,
            slo_multiplier: 5.0,
            action_timeout_s: 30.0,
            initial_class_rps: None,
            max_class_rps: None,
        }
    }
}

/// `[controller]`: the loops' settings (defaults as in the paper).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSection {
    /// Scale loop period (s).
    pub scale_period_s: f64,
    /// Shard loop period (s).
    pub shard_period_s: f64,
    /// Clock loop period (s); also the service's tick.
    pub clock_period_s: f64,
    /// Plan instances to at most this share of their SLO capacity.
    pub max_util: f64,
    /// Spawn from warm standby.
    pub warm_spawn: bool,
    /// Assumed spawn-to-serving time until observed (s).
    pub spawn_lead_s: f64,
    /// Most GPUs the cluster may hold.
    pub gpu_budget: Option<u32>,
    /// Instances of `single-pool` / `scale-freq` (their fixed size).
    pub fixed_instances: Option<u32>,
    /// Hold a new clock at least this long (s) unless the SLO forces a change
    /// (each change pauses the engine for tens of milliseconds).
    pub clock_hold_s: f64,
    /// A step down to a lower clock must also carry the pool's smoothed arrival rate plus this
    /// many Poisson standard deviations of one clock period's count (≥ 0; 0: the load seen now
    /// only): damps clock flapping under a steady load; rises are not held back.
    pub clock_down_sigmas: f64,
    /// The shard loop keeps the fleet it has when a new mix needing new instances saves less than
    /// this share of the pool's predicted power (0 to below 1; 0: the spawn's cost alone decides).
    pub mix_hysteresis: f64,
    /// Keep every instance at least this long (s) from when the controller
    /// first sees it before retiring it as surplus (0: no minimum): damps
    /// spawn/retire churn where spawns are slow or can fail, at an energy cost.
    pub retire_min_age_s: f64,
    /// The lowest the clock loop's learnt margin on a pool's load may fall (0–1): below 1 a pool
    /// keeping its SLOs with room to spare runs lower clocks than the profile's one instance
    /// allows, saving energy at more GPU-hours; 1 favours GPU-hours.
    pub clock_margin_floor: f64,
    /// A pool whose classes all hold at least this share of requests within SLO (above the 99%
    /// target, at most 1) is comfortable: its learnt capacity grows and its clock margin decays a
    /// step. Lower runs pools nearer the 99% line (less energy, less room to spare).
    pub attainment_comfort: f64,
    /// TP degrees the shard loop may use (default 2, 4 and 8).
    pub tps: Option<Vec<u32>>,
    /// Whether the backlog guard hands a backed-up instance's unstarted
    /// requests to other instances (`move-queued` commands). Default: on for
    /// the in-process twin and behind the request router (which carries it
    /// out), off otherwise, where a backend (an `[actuators.exec]
    /// move_queued` command, or the webhook) must carry it out.
    pub move_queued: Option<bool>,
    /// Whether the shard loop changes a surplus instance's TP degree in place
    /// (`reshard` commands, path `in-place`) instead of spawning a new one and
    /// retiring the old. Default: on for the in-process twin, off for an
    /// external cluster, whose engines must support it (an `[actuators.exec]
    /// reshard` command, or the webhook).
    pub reshard_in_place: Option<bool>,
    /// What an external cluster's controller learns capacity and clock
    /// margins from: `clients` (the router's measurement of every answer, as
    /// its client saw it; the default with a `[router]`), `engines` (the
    /// engines' own TTFT and inter-token histograms; the default without one)
    /// or `none` (the profile as it is). `none` or `engines` are for
    /// accelerated runs on a saturated machine, where each wall millisecond
    /// of scheduling delay is `service.speed` milliseconds of measured latency.
    pub learn_from: Option<String>,
}

impl Default for ControllerSection {
    fn default() -> Self {
        ControllerSection {
            scale_period_s: 1800.0,
            shard_period_s: 300.0,
            clock_period_s: 5.0,
            max_util: 0.7,
            warm_spawn: true,
            spawn_lead_s: 30.0,
            gpu_budget: None,
            fixed_instances: None,
            clock_hold_s: 30.0,
            clock_down_sigmas: controller::control::CLOCK_DOWN_SIGMAS,
            mix_hysteresis: controller::control::MIX_HYSTERESIS,
            retire_min_age_s: 0.0,
            clock_margin_floor: 0.85,
            attainment_comfort: controller::control::ATTAINMENT_COMFORT,
            tps: None,
            move_queued: None,
            reshard_in_place: None,
            learn_from: None,
        }
    }
}

/// `[cluster]`: what the service manages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// `twin` (the digital twin replaying a workload in-process) or `external`
    /// (real engines: telemetry from `[telemetry]`, actions through `[actuators]`).
    pub kind: String,
    /// Twin: an Azure trace to replay (default: the bundled Conversation hour).
    pub trace: Option<PathBuf>,
    /// Twin: a rate curve instead (needs `lengths`).
    pub rates: Option<PathBuf>,
    /// Twin: the trace lengths are drawn from.
    pub lengths: Option<PathBuf>,
    /// Twin: load multiplier.
    pub scale: f64,
    /// Twin: hours to replay.
    pub hours: Option<f64>,
    /// Twin: seed.
    pub seed: u64,
    /// Twin: physics file (default: the embedded DGX H100 + Llama-2-70B).
    pub physics: Option<PathBuf>,
    /// Twin: the live `single-pool` baseline runs this many TP8 instances at the
    /// top clock beside the managed cluster, on the same arrivals (`dynamollm
    /// serve` and `demo` size it by replay, as `sim` does, when unset; without
    /// it the baseline is estimated from the profile, as on an external cluster).
    pub baseline_instances: Option<u32>,
    /// External: the GPUs the cluster holds (required): no plan or spawn goes
    /// past them, and the ceiling on believed arrival rates follows from them.
    pub gpus: Option<u32>,
    /// External: read every placed instance's `<endpoint>/metrics` (vLLM or
    /// SGLang) this often (wall seconds; 0: never, engine telemetry comes over MQTT only).
    pub scrape_interval_s: f64,
    /// External: NVIDIA DCGM exporters to read GPU power, energy and clocks
    /// from, one per node (`{ url = "http://node7:9400/metrics", node = "dc1/node7" }`;
    /// `node` as the spawn backend places instances, default the page's `Hostname`),
    /// read every `scrape_interval_s`.
    pub dcgm: Vec<DcgmExporter>,
}

/// One node's DCGM exporter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DcgmExporter {
    /// Its metrics page.
    pub url: String,
    /// The node's name as placements give it (default: the page's `Hostname` label).
    pub node: Option<String>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            kind: "twin".into(),
            trace: None,
            rates: None,
            lengths: None,
            scale: 1.0,
            hours: None,
            seed: 1,
            physics: None,
            baseline_instances: None,
            gpus: None,
            scrape_interval_s: 1.0,
            dcgm: Vec::new(),
        }
    }
}

/// `[router]`: the OpenAI-compatible request router in front of a real cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSection {
    /// Address of `/v1/completions` and `/v1/chat/completions` (no router when absent).
    pub listen: Option<String>,
    /// Hold a request this long (service seconds) for its pool to get a serving instance, then 503.
    pub hold_s: f64,
    /// How a pool's requests spread over its instances: `requests` (fewest in
    /// flight) or `prompt-tokens` (fewest prompt tokens sent and not yet
    /// answered, then fewest in flight). The in-process twin routes the same way.
    pub balance: telemetry::Balance,
    /// Connecting to an engine (s).
    pub connect_timeout_s: f64,
    /// From sending a request to the first byte of its answer (s): queueing
    /// and the prefill of a long prompt included, so minutes, not seconds.
    pub first_byte_timeout_s: f64,
    /// The longest pause inside an answer (s); a stream as a whole has no limit.
    pub idle_timeout_s: f64,
    /// The key sent to the engines (`Authorization: Bearer …`) when a client
    /// sends none; a client's own `Authorization` is passed on unless
    /// `client_keys` are set (then the engines get this key, or nothing).
    pub api_key: Option<Secret>,
    /// Keys clients must present (`Authorization: Bearer <key>`, compared in
    /// constant time); a request without one of them gets 401. None (and no
    /// `client_keys_file`): no client authentication. With keys, a client's
    /// key is the router's: it never reaches an engine.
    pub client_keys: Vec<Secret>,
    /// A file of client keys, one a line (blank lines and `#` lines
    /// skipped), read at start; adds to `client_keys`.
    pub client_keys_file: Option<PathBuf>,
    /// Client connections held at once; one more is closed as soon as it is
    /// accepted (and counted). Each holds a descriptor and, while its request
    /// runs, one more to the engine: lowered at start to fit the open-files
    /// limit with room left for the API and the state.
    pub max_connections: u32,
    /// A connection must send a whole request head within this (s) of
    /// opening, or of its previous answer when kept alive, or it is closed; a
    /// request body may pause no longer (408). Answers have no such limit.
    pub header_timeout_s: f64,
    /// The largest request head (request line and headers, bytes): 431 beyond.
    pub max_header_bytes: u32,
    /// The largest request body (bytes): 413 beyond.
    pub max_body_bytes: u64,
    /// How prompt tokens are counted: `engine` (the engine's `/tokenize`,
    /// exact for its model, within `tokenize_budget_ms`, else the router's
    /// BPE) or `local` (the router's BPE only).
    pub tokenize: String,
    /// The longest a `/tokenize` may take (ms) before the router counts itself.
    pub tokenize_budget_ms: f64,
}

impl Default for RouterSection {
    fn default() -> Self {
        RouterSection {
            listen: None,
            hold_s: 60.0,
            balance: telemetry::Balance::Requests,
            connect_timeout_s: 10.0,
            first_byte_timeout_s: 600.0,
            idle_timeout_s: 120.0,
            api_key: None,
            client_keys: Vec::new(),
            client_keys_file: None,
            max_connections: 16384,
            // Longer than clients keep idle connections in their pools (reqwest 90 s): a server that
            // closes a kept-alive connection just as a client reuses it fails that request (a POST is
            // not retried). max_connections and the descriptor fitting bound what idle ones may hold.
            header_timeout_s: 100.0,
            max_header_bytes: 64 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
            tokenize: "engine".into(),
            tokenize_budget_ms: 50.0,
        }
    }
}

/// A config document's text; its Debug shows only its size (it holds secrets).
#[derive(Clone, Default)]
pub struct Source(pub String);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// `[budget]`: a site power budget the controller keeps (see the operator guide).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSection {
    /// The budget (W): what the fleet may draw at its clocks and load, idle and starting
    /// instances included, stays under it. `None`: no budget.
    pub power_w: Option<f64>,
    /// The classes by rank, highest first (default short prompts first): when the budget cannot
    /// carry the load, the last-ranked classes' pools are slowed first and wait longest for instances.
    pub priority: Option<Vec<String>>,
    /// Hours of the day with a budget of their own (`[[budget.schedule]]`: `from_h`, `to_h`,
    /// `power_w`); the first holding an hour wins, other hours have `power_w` (or none).
    pub schedule: Vec<BudgetPeriodSection>,
    /// Hours east of UTC the schedule's hours count in (default 0: UTC).
    pub utc_offset_h: f64,
}

/// One `[[budget.schedule]]` period.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetPeriodSection {
    /// First hour (0–23).
    pub from_h: u32,
    /// The hour after the last (1–24; smaller than `from_h` wraps past midnight).
    pub to_h: u32,
    /// The budget in those hours (W).
    pub power_w: f64,
}

/// Check budget periods (hours and power in range; `key` names them in errors).
pub fn budget_periods(
    periods: &[BudgetPeriodSection],
    key: &str,
) -> std::result::Result<Vec<controller::control::BudgetPeriod>, String> {
    periods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.from_h > 23 || !(1..=24).contains(&p.to_h) || p.from_h == p.to_h {
                return Err(format!(
                    "{key}[{i}]: hours {}-{} must be from 0-23 to 1-24 and not the same",
                    p.from_h, p.to_h
                ));
            }
            if !(1.0..=1e9).contains(&p.power_w) {
                let shown = if p.power_w.abs() >= 1e9 { format!("{:e}", p.power_w) } else { format!("{}", p.power_w) };
                return Err(format!("{key}[{i}].power_w must be in [1, 1e9] W, got {shown}"));
            }
            Ok(controller::control::BudgetPeriod { from_h: p.from_h, to_h: p.to_h, power_w: p.power_w })
        })
        .collect()
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// `[service]`.
    pub service: ServiceSection,
    /// `[controller]`.
    pub controller: ControllerSection,
    /// `[cluster]`.
    pub cluster: ClusterSection,
    /// `[router]`.
    pub router: RouterSection,
    /// `[budget]`: a site power budget.
    pub budget: BudgetSection,
    /// `[objective]`: what the plan minimises.
    pub objective: crate::objective::ObjectiveSection,
    /// `[telemetry]` (checked by the telemetry crate).
    pub telemetry: Option<toml::Value>,
    /// `[actuators]` (checked by the actuators crate).
    pub actuators: Option<toml::Value>,
    /// `[carbon]`, `[cost]`, `[sci]`: accounting for reports (checked by the dashboards crate).
    pub carbon: Option<toml::Value>,
    /// See `carbon`.
    pub cost: Option<toml::Value>,
    /// See `carbon`.
    pub sci: Option<toml::Value>,
    /// The document it was parsed from (the other crates parse their tables from it).
    #[serde(skip)]
    pub source: Source,
    /// Where it came from (for errors).
    #[serde(skip)]
    pub origin: String,
}

impl ServiceConfig {
    /// Parse a config document; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ServiceConfig> {
        let mut cfg: ServiceConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {}", e.to_string().trim_end()))?;
        cfg.validate(origin)?;
        cfg.source = Source(text.to_string());
        cfg.origin = origin.to_string();
        // The other crates' tables, checked by their own parsers.
        cfg.telemetry_config()?;
        cfg.actuators_config()?;
        dashboards::config::AccountingConfig::from_toml_str(text, origin).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(cfg)
    }

    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<ServiceConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let s = &self.service;
        Mode::parse(&s.mode).map_err(|e| anyhow::anyhow!("{origin}: service.mode: {e}"))?;
        controller::policy::Policy::parse(&s.policy).map_err(|e| anyhow::anyhow!("{origin}: service.policy: {e}"))?;
        if s.policy == "oracle" {
            bail!("{origin}: service.policy: the oracle needs the future and runs only in `dynamollm sim`");
        }
        self.check_ranges(origin)?;
        use controller::control::Tuning;
        let c = &self.controller;
        for (key, setting, v) in [
            ("controller.retire_min_age_s", Tuning::RetireMinAgeS, c.retire_min_age_s),
            ("controller.clock_down_sigmas", Tuning::ClockDownSigmas, c.clock_down_sigmas),
            ("controller.mix_hysteresis", Tuning::MixHysteresis, c.mix_hysteresis),
            ("controller.clock_margin_floor", Tuning::ClockMarginFloor, c.clock_margin_floor),
            ("controller.attainment_comfort", Tuning::AttainmentComfort, c.attainment_comfort),
        ] {
            if let Some(why) = setting.out_of_range(v) {
                bail!("{origin}: {key} {why}");
            }
        }
        if self.cluster.kind == "external" && self.cluster.gpus.is_none() {
            bail!("{origin}: cluster.gpus: an external cluster must declare the GPUs it holds (no plan or spawn goes past them)");
        }
        if let Some(m) = &s.initial_class_rps {
            for (k, v) in m {
                if telemetry::RequestClass::parse(k).is_err() {
                    bail!("{origin}: service.initial_class_rps.{k}: not a request class (SS, SM, SL, MS, MM, ML, LS, LM, LL)");
                }
                if !(0.0..=MAX_RPS).contains(v) {
                    bail!(
                        "{origin}: service.initial_class_rps.{k} must be a rate in [0, {MAX_RPS}], got {}",
                        shown(*v)
                    );
                }
            }
        }
        if s.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!("{origin}: service.listen: {:?} is not an address like 127.0.0.1:9464", s.listen);
        }
        if let Some(t) = &self.controller.tps {
            if t.is_empty() || t.iter().any(|d| ![2, 4, 8].contains(d)) {
                bail!("{origin}: controller.tps: {t:?} must list TP degrees among 2, 4 and 8");
            }
        }
        if let Some(l) = &self.router.listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                bail!("{origin}: router.listen: {l:?} is not an address like 127.0.0.1:8000");
            }
        }
        let r = &self.router;
        for (key, v, max) in [
            ("router.hold_s", r.hold_s, 86_400.0),
            ("router.connect_timeout_s", r.connect_timeout_s, 3_600.0),
            ("router.first_byte_timeout_s", r.first_byte_timeout_s, 86_400.0),
            ("router.idle_timeout_s", r.idle_timeout_s, 86_400.0),
            ("router.tokenize_budget_ms", r.tokenize_budget_ms, 60_000.0),
            ("router.header_timeout_s", r.header_timeout_s, 3_600.0),
        ] {
            // Seconds from a millisecond, milliseconds from a microsecond: below, nothing could be done in time.
            if !(v.is_finite() && v >= MIN_S && v <= max) {
                bail!("{origin}: {key} must be a number in [{MIN_S}, {max}], got {}", shown(v));
            }
        }
        for (key, v, min, max) in [
            ("router.max_connections", u64::from(r.max_connections), 1, 1_000_000),
            ("router.max_header_bytes", u64::from(r.max_header_bytes), 1024, 256 * 1024),
            ("router.max_body_bytes", r.max_body_bytes, 1024, 1 << 30),
        ] {
            if !(min..=max).contains(&v) {
                bail!("{origin}: {key} must be a whole number in [{min}, {max}], got {v}");
            }
        }
        for (i, k) in r.client_keys.iter().enumerate() {
            if let Some(why) = client_key_flaw(k.expose()) {
                bail!("{origin}: router.client_keys[{i}] {why}");
            }
        }
        for (i, d) in self.cluster.dcgm.iter().enumerate() {
            if reqwest::Url::parse(&d.url).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                bail!("{origin}: cluster.dcgm[{i}].url: {:?} is not an http(s) URL", d.url);
            }
        }
        let every = self.cluster.scrape_interval_s;
        if !(every == 0.0 || (0.01..=86_400.0).contains(&every)) {
            bail!("{origin}: cluster.scrape_interval_s must be 0 (off) or in [0.01, 86400], got {}", shown(every));
        }
        crate::objective::ObjectiveSpec::of_section(&self.objective).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        if let Some(p) = &self.budget.priority {
            class_priority(p).map_err(|e| anyhow::anyhow!("{origin}: budget.priority: {e}"))?;
        }
        if let Some(l) = &self.controller.learn_from {
            if !matches!(l.as_str(), "clients" | "engines" | "none") {
                bail!("{origin}: controller.learn_from: {l:?} is not `clients`, `engines` or `none`");
            }
            if l == "clients" && r.listen.is_none() {
                bail!("{origin}: controller.learn_from = \"clients\" needs the router ([router] listen): it measures the clients' view");
            }
        }
        if !matches!(r.tokenize.as_str(), "engine" | "local") {
            bail!("{origin}: router.tokenize: {:?} is not `engine` or `local`", r.tokenize);
        }
        if !matches!(self.cluster.kind.as_str(), "twin" | "external") {
            bail!("{origin}: cluster.kind: {:?} is not `twin` or `external`", self.cluster.kind);
        }
        Ok(())
    }

    /// The numbers of `[service]`, `[controller]` and `[cluster]` (the
    /// router's are checked beside its other keys): each finite and within
    /// bounds, so that no duration, interval or count made from one is zero,
    /// overflows or panics. 0 passes only where it means something
    /// (`controller.spawn_lead_s`, `retire_min_age_s`, `clock_down_sigmas`,
    /// `mix_hysteresis`; `cluster.seed`).
    fn check_ranges(&self, origin: &str) -> Result<()> {
        let (s, c, k) = (&self.service, &self.controller, &self.cluster);
        let mut floats = vec![
            ("service.speed", s.speed, 0.01, 10_000.0),
            ("service.stale_after_s", s.stale_after_s, 0.1, 86_400.0),
            ("service.slo_multiplier", s.slo_multiplier, 1.0, 1_000.0),
            ("service.action_timeout_s", s.action_timeout_s, MIN_S, 86_400.0),
            ("controller.scale_period_s", c.scale_period_s, 0.01, WEEK_S),
            ("controller.shard_period_s", c.shard_period_s, 0.01, WEEK_S),
            ("controller.clock_period_s", c.clock_period_s, 0.01, 3_600.0),
            ("controller.max_util", c.max_util, 0.01, 1.0),
            ("controller.spawn_lead_s", c.spawn_lead_s, 0.0, 86_400.0),
            ("controller.clock_hold_s", c.clock_hold_s, MIN_S, 86_400.0),
            ("cluster.scale", k.scale, 0.001, 1_000.0),
        ];
        if let Some(r) = s.max_class_rps {
            floats.push(("service.max_class_rps", r, 0.001, MAX_RPS));
        }
        if let Some(h) = k.hours {
            floats.push(("cluster.hours", h, 0.001, 100_000.0));
        }
        if let Some(w) = self.budget.power_w {
            floats.push(("budget.power_w", w, 1.0, 1e9));
        }
        floats.push(("budget.utc_offset_h", self.budget.utc_offset_h, -24.0, 24.0));
        budget_periods(&self.budget.schedule, "budget.schedule").map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        for (key, v, lo, hi) in floats {
            // NaN is in no range.
            if !(lo..=hi).contains(&v) {
                bail!("{origin}: {key} must be a number in [{lo}, {hi}], got {}", shown(v));
            }
        }
        for (key, v, lo, hi) in [
            ("controller.gpu_budget", c.gpu_budget, 1, MAX_GPUS),
            ("controller.fixed_instances", c.fixed_instances, 1, MAX_INSTANCES),
            ("cluster.gpus", k.gpus, 1, MAX_GPUS),
            ("cluster.baseline_instances", k.baseline_instances, 1, MAX_INSTANCES),
        ] {
            if let Some(v) = v.filter(|v| !(lo..=hi).contains(v)) {
                bail!("{origin}: {key} must be a whole number in [{lo}, {hi}], got {v}");
            }
        }
        Ok(())
    }

    /// `[telemetry]`, parsed by the telemetry crate.
    pub fn telemetry_config(&self) -> Result<telemetry::config::TelemetryConfig> {
        // Its errors read `config <file>: telemetry.<key>: …`.
        telemetry::config::TelemetryConfig::from_toml_str_in(&self.source.0, &self.origin)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// `[actuators]`, parsed by the actuators crate.
    pub fn actuators_config(&self) -> Result<actuators::ActuatorsConfig> {
        let a = if self.source.0.is_empty() {
            // Built in code: the table as it is.
            let body = match &self.actuators {
                Some(v) => toml::to_string(v)?,
                None => String::new(),
            };
            actuators::ActuatorsConfig::from_toml(&body).map_err(|e| anyhow::anyhow!("{}: {e}", self.origin))?
        } else {
            // From the document, so that a TOML error shows the file's own line.
            #[derive(Deserialize)]
            struct Doc {
                #[serde(default)]
                actuators: Option<actuators::ActuatorsConfig>,
            }
            let doc: Doc = toml::from_str(&self.source.0)
                .map_err(|e| anyhow::anyhow!("{}: [actuators]: {}", self.origin, e.to_string().trim_end()))?;
            let a = doc.actuators.unwrap_or_default();
            a.check_ranges().map_err(|e| anyhow::anyhow!("{}: {e}", self.origin))?;
            a
        };
        a.validate().map_err(|e| anyhow::anyhow!("{}: {e}", self.origin))?;
        Ok(a)
    }

    /// Where an external cluster's controller learns from: `clients`, `engines` or `none`.
    pub fn learn_from(&self) -> &str {
        match &self.controller.learn_from {
            Some(l) => l,
            None if self.router.listen.is_some() => "clients",
            None => "engines",
        }
    }

    /// The router's client keys: `router.client_keys` and the lines of
    /// `router.client_keys_file` (empty: no client authentication).
    pub fn router_client_keys(&self) -> Result<Vec<Secret>> {
        let mut keys = self.router.client_keys.clone();
        if let Some(p) = &self.router.client_keys_file {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("router.client_keys_file: cannot read {}", p.display()))?;
            let before = keys.len();
            for (n, line) in text.lines().enumerate() {
                let k = line.trim();
                if k.is_empty() || k.starts_with('#') {
                    continue;
                }
                if let Some(why) = client_key_flaw(k) {
                    bail!("router.client_keys_file: {} line {}: the key {why}", p.display(), n + 1);
                }
                keys.push(Secret::new(k));
            }
            if keys.len() == before {
                bail!("router.client_keys_file: {} holds no key", p.display());
            }
        }
        Ok(keys)
    }

    /// The bearer token, from `token` or `token_file`.
    pub fn token(&self) -> Result<Secret> {
        if let Some(t) = &self.service.token {
            if !t.expose().is_empty() {
                return Ok(t.clone());
            }
        }
        if let Some(p) = &self.service.token_file {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("service.token_file: cannot read {}", p.display()))?;
            let t = text.lines().next().unwrap_or("").trim().to_string();
            if t.is_empty() {
                bail!("service.token_file: {} is empty", p.display());
            }
            return Ok(Secret::new(t));
        }
        bail!("service.token (or service.token_file) is required: every endpoint but /healthz and /readyz asks for it")
    }
}

/// Each class's rank from a priority list (class names, highest first; classes left out follow,
/// short prompts first).
pub fn class_priority(names: &[String]) -> std::result::Result<[u8; telemetry::CLASS_COUNT], String> {
    let mut order: Vec<usize> = Vec::new();
    for name in names {
        let c = telemetry::RequestClass::ALL
            .iter()
            .find(|c| c.name() == name.trim())
            .ok_or_else(|| format!("{name:?} is not a class (SS, SM, … LL)"))?;
        if order.contains(&c.index()) {
            return Err(format!("{name} is given twice"));
        }
        order.push(c.index());
    }
    let rest: Vec<usize> = (0..telemetry::CLASS_COUNT).filter(|c| !order.contains(c)).collect();
    order.extend(rest);
    let mut rank = [0u8; telemetry::CLASS_COUNT];
    for (r, &c) in order.iter().enumerate() {
        rank[c] = r as u8;
    }
    Ok(rank)
}
