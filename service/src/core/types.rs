//! The core's plain types: the operating mode, instance reports and records,
//! decisions, totals, history points and the saved state.

use super::*;

/// How the service acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Decide and act.
    Auto,
    /// Decide and record, act on nothing.
    DryRun,
    /// Every clock at its top, no scale-in; the controller's spawns and routes
    /// still act unless telemetry is stale (then the fleet is held as it is).
    Failsafe,
}

impl Mode {
    /// Parse `auto`, `dry-run` or `failsafe`.
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "dry-run" => Ok(Mode::DryRun),
            "failsafe" => Ok(Mode::Failsafe),
            other => Err(format!("unknown mode {other:?}; valid: auto, dry-run, failsafe")),
        }
    }

    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::DryRun => "dry-run",
            Mode::Failsafe => "failsafe",
        }
    }
}

/// An instance's state as telemetry reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportedState {
    /// Coming up.
    Starting,
    /// Taking requests.
    Serving,
    /// Finishing its requests.
    Draining,
    /// Gone.
    Stopped,
}

/// One instance's reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// Which.
    pub id: InstanceId,
    /// Lifecycle.
    pub state: ReportedState,
    /// Requests it holds (running and waiting).
    pub outstanding: u32,
    /// Requests waiting for room.
    pub waiting: u32,
    /// Power of all its GPUs.
    pub power_w: f64,
    /// GPU energy since it started.
    pub energy_j: f64,
    /// Its clock.
    pub clock_mhz: u32,
    /// Its TP degree (GPUs).
    #[serde(default)]
    pub tp: u32,
}

/// What the service knows of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Which.
    pub id: InstanceId,
    /// Its pool.
    pub pool: u32,
    /// TP degree.
    pub tp: u32,
    /// Clock asked for (or reported).
    pub clock_mhz: u32,
    /// Lifecycle.
    pub state: InstanceState,
    /// Where it lives, once its spawn is acknowledged.
    pub placement: Option<Placement>,
    /// Requests it holds.
    pub outstanding: u32,
    /// Requests waiting.
    pub waiting: u32,
    /// Power of its GPUs.
    pub power_w: f64,
    /// Its GPU energy so far.
    pub energy_j: f64,
    /// When it was asked for (s).
    pub spawned_at_s: f64,
    /// Last report (s).
    pub last_report_s: Option<f64>,
    /// Last GPU reading of its own (s), once it has had one.
    #[serde(default)]
    pub last_gpu_s: Option<f64>,
    /// Last engine reading of its own (s), once it has had one.
    #[serde(default)]
    pub last_engine_s: Option<f64>,
    /// Per GPU index: the last power (W) and energy counter (J) telemetry gave.
    #[serde(default)]
    pub gpus: BTreeMap<u32, (f64, f64)>,
    /// Per model its engine serves (the page's `model_name`; `""` without
    /// one): requests running and waiting, as its last page said.
    #[serde(default)]
    pub queues: BTreeMap<String, (u32, u32)>,
}

/// A decision as the service keeps it (the controller's, plus the command id and what the mode did).
/// A route decision changes the controller's table and is never sent itself: the records of the
/// `routing` source carry the table to the backends, and send the retires held until they have.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// The command's id (none when the mode kept it from acting).
    pub id: Option<ActionId>,
    /// The mode at the time.
    pub mode: Mode,
    /// Whether it was sent to the actuators.
    pub acted: bool,
    /// The controller's decision.
    #[serde(flatten)]
    pub decision: Decision,
}

/// The totals of the status document.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Totals {
    /// GPU energy of every instance so far, retired ones included (J).
    pub energy_j: f64,
    /// The `single-pool` estimate's energy over the same time (J).
    pub baseline_energy_j: f64,
    /// The estimate's power now (W).
    pub baseline_power_w: f64,
    /// GPU power now (W).
    pub power_w: f64,
    /// GPUs held.
    pub gpus: u32,
    /// Share of the estimate's energy saved.
    pub savings_ratio: f64,
}

/// One point of the status history.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// When (s).
    pub time_s: f64,
    /// Total GPU power.
    pub power_w: f64,
    /// GPUs held.
    pub gpus: u32,
    /// Arrivals over the last period (requests/s).
    pub actual_rps: f64,
    /// Forecast peak for the coming shard period (requests/s).
    pub forecast_rps: f64,
}

/// What the service saves after every tick, and recovers from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedState {
    /// Format version.
    pub version: u32,
    /// Service time of the save (s).
    pub saved_at_s: f64,
    /// The controller's plan and what it learnt.
    pub controller: ControllerState,
    /// The inventory.
    pub instances: Vec<InstanceRecord>,
    /// The last command sequence number used.
    pub seq: u64,
    /// The run tag in command ids (absent in older saves: a new one).
    #[serde(default)]
    pub run: Option<String>,
    /// The operator's mode.
    pub mode: Mode,
    /// Commands sent and not yet answered (re-sent with the same ids after a restart).
    pub pending: Vec<Command>,
    /// Energy of instances gone (J).
    pub retired_energy_j: f64,
    /// Baseline energy so far (J).
    pub baseline_energy_j: f64,
    /// Per-class minute history for the forecaster (the last days).
    pub minutes: Vec<[f64; CLASS_COUNT]>,
    /// The routing table the backends have acknowledged (class → pool);
    /// absent in older saves (then the controller's table).
    #[serde(default)]
    pub routed: Option<[u32; CLASS_COUNT]>,
    /// Retires decided and held until the backends route no class to the
    /// instance's pool without another serving instance.
    #[serde(default)]
    pub held_retires: Vec<HeldRetire>,
}

/// A retire the controller decided that waits for the routes away from its pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldRetire {
    /// The instance.
    pub instance: InstanceId,
    /// Held since (s).
    pub since_s: f64,
    /// The controller's reason for the retire.
    pub reason: String,
}
