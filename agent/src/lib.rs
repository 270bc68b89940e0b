//! agent: the node agent of an edge site (`dynamollm agent`). It runs on one GPU node,
//! publishes the node's GPU and engine telemetry over MQTT, and carries out
//! the controller's commands that concern the node's hardware.
//!
//! Topics, under the `[agent.mqtt]` prefix (default `dynamollm`):
//!
//! - `<prefix>/<site>/<node>/state`: retained `{"state":"alive"}` on every
//!   connect, `{"state":"dead"}` on a clean shutdown and as the last will.
//! - `<prefix>/<site>/<node>/telemetry`: a [`TelemetryPayload`] every
//!   `interval_s` (GPU power, energy, clock; the engine's queue, KV usage,
//!   token counters and TTFT/TBT since the previous reading), QoS 1.
//! - `<prefix>/<site>/<node>/cmd`: [`actuators::Command`] JSON, subscribed at QoS 1.
//! - `<prefix>/<site>/<node>/ack`: [`actuators::Ack`] JSON, QoS 1, one per command.
//!
//! `SetClock` is applied here through the [`GpuDevice`] (NVML, or the
//! twin's fake device): the clock is bounded by `clock_min_mhz`/
//! `clock_max_mhz` and snapped to the nearest clock the GPU supports. Other
//! actions (spawn, retire, reshard, route) are carried out by the commands
//! of `[agent.exec]` ([`exec`]) when it has one for their kind, and
//! otherwise answered `Failed` ("not handled by the agent"). Commands are idempotent
//! by id: the ids applied are kept in `state_file` (across restarts), and
//! an id seen again is acknowledged `Applied` without doing it again. On
//! shutdown the agent unlocks the clocks it locked, publishes the dead
//! state and disconnects.
//!
//! ```toml
//! [agent]
//! site = "edge1"
//! node = "gpu-node-3"
//! gpu = "nvml"                       # or "twin", with twin_url
//! engine_url = "http://127.0.0.1:8000/metrics"
//! interval_s = 1.0
//! clock_min_mhz = 800
//! clock_max_mhz = 1980
//! state_file = "/var/lib/dynamollm-agent/applied.json"
//!
//! [agent.mqtt]                       # as [telemetry.mqtt]
//! host = "broker.edge1.example"
//! port = 8883
//! ```

#![forbid(unsafe_code)]

mod config;
pub mod exec;

pub use config::{AgentConfig, AgentError, GpuKind};

use actuators::signed::{self, CommandKey, Heartbeat};
use actuators::{Ack, Action, ActionId, Command, Outcome, Placement};
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use telemetry::collect::GpuReader;
use telemetry::gpu::{GpuDevice, NvmlDevice, TwinDevice};
use telemetry::mqtt::{EdgePublisher, EngineEntry, GpuEntry, TelemetryPayload};
use telemetry::sample::{now_ms, EngineSample, GpuSample, Tags};
use telemetry::scrape::{parse_engine_page, EngineTracker};

/// How many applied action ids the state file remembers (oldest forgotten first).
pub const REMEMBERED_IDS: usize = 10_000;

/// One remembered action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AppliedEntry {
    id: ActionId,
    at_ms: i64,
    detail: String,
    #[serde(default)]
    placement: Option<Placement>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateDoc {
    applied: Vec<AppliedEntry>,
}

/// The ids of applied actions, kept in a JSON file (the newest
/// [`REMEMBERED_IDS`]); written to a temporary file and renamed, so a crash
/// leaves the old or the new list, never half of one.
#[derive(Debug)]
pub struct AppliedIds {
    path: PathBuf,
    order: VecDeque<AppliedEntry>,
    index: HashMap<ActionId, usize>,
    base: usize,
}

impl AppliedIds {
    /// Load the file (absent: empty).
    pub fn load(path: &Path) -> Result<AppliedIds, AgentError> {
        let err = |problem: String| AgentError::State { path: path.into(), problem };
        let doc: StateDoc = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                err(format!("corrupt ({e}); move it aside to start afresh (applied ids would be re-applied)"))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateDoc::default(),
            Err(e) => return Err(err(format!("cannot read: {e}"))),
        };
        let mut ids = AppliedIds { path: path.into(), order: VecDeque::new(), index: HashMap::new(), base: 0 };
        for e in doc.applied {
            ids.push(e);
        }
        Ok(ids)
    }

    fn push(&mut self, e: AppliedEntry) {
        if self.index.contains_key(&e.id) {
            return;
        }
        self.index.insert(e.id.clone(), self.base + self.order.len());
        self.order.push_back(e);
        while self.order.len() > REMEMBERED_IDS {
            if let Some(old) = self.order.pop_front() {
                self.index.remove(&old.id);
                self.base += 1;
            }
        }
    }

    fn get(&self, id: &ActionId) -> Option<&AppliedEntry> {
        self.index.get(id).and_then(|&i| self.order.get(i - self.base))
    }

    /// Whether this id has been applied.
    pub fn contains(&self, id: &ActionId) -> bool {
        self.index.contains_key(id)
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn record(&mut self, e: AppliedEntry) -> Result<(), AgentError> {
        self.push(e);
        self.save()
    }

    fn save(&self) -> Result<(), AgentError> {
        let err = |problem: String| AgentError::State { path: self.path.clone(), problem };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let doc = StateDoc { applied: self.order.iter().cloned().collect() };
        let body = serde_json::to_vec_pretty(&doc).map_err(|e| err(e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, body).map_err(|e| err(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| err(format!("cannot rename {} over it: {e}", tmp.display())))
    }
}

/// The clock to lock for an ask: raised/lowered into the config's bounds,
/// then the nearest supported clock inside them (ties go to the lower, the
/// cheaper one). `None` when no supported clock lies inside the bounds.
pub fn snap_clock(asked_mhz: u32, min_mhz: Option<u32>, max_mhz: Option<u32>, supported: &[u32]) -> Option<u32> {
    let lo = min_mhz.unwrap_or(0);
    let hi = max_mhz.unwrap_or(u32::MAX);
    let target = asked_mhz.clamp(lo, hi);
    supported.iter().copied().filter(|c| (lo..=hi).contains(c)).min_by_key(|&c| (c.abs_diff(target), c))
}

fn gpu_entry(s: GpuSample) -> GpuEntry {
    GpuEntry {
        gpu: s.tags.gpu.unwrap_or(0),
        ts_ms: Some(s.ts_ms),
        power_w: s.power_w,
        energy_j: s.energy_j,
        sm_clock_mhz: s.sm_clock_mhz,
        util: s.util,
        temperature_c: s.temperature_c,
        throttle_reasons: s.throttle_reasons,
    }
}

fn engine_entry(s: EngineSample, instance: &str) -> EngineEntry {
    EngineEntry {
        instance: s.tags.instance.unwrap_or_else(|| instance.to_string()),
        ts_ms: Some(s.ts_ms),
        pool: s.tags.pool,
        model: s.tags.model,
        ttft: s.ttft,
        tbt: s.tbt,
        running: s.running,
        waiting: s.waiting,
        kv_usage: s.kv_usage,
        prompt_tokens_total: s.prompt_tokens_total,
        generation_tokens_total: s.generation_tokens_total,
    }
}

/// Run a blocking device call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    dev: &Arc<dyn GpuDevice>,
    f: impl FnOnce(&dyn GpuDevice) -> T + Send + 'static,
) -> Result<T, String> {
    let dev = dev.clone();
    tokio::task::spawn_blocking(move || f(dev.as_ref())).await.map_err(|e| format!("device task failed: {e}"))
}

/// The agent's state while it runs.
struct Node {
    cfg: AgentConfig,
    dev: Arc<dyn GpuDevice>,
    applied: AppliedIds,
    /// GPUs this run locked (unlocked on shutdown and in failsafe).
    locked: BTreeSet<u32>,
    /// Exec commands running now.
    in_flight: std::collections::HashSet<ActionId>,
}

impl Node {
    async fn set_clock(&mut self, asked_mhz: u32, placement: Option<&Placement>) -> Outcome {
        let failed = |reason: String, retryable: bool| Outcome::Failed { reason, retryable };
        let gpus: Vec<u32> = match placement.map(|p| p.gpus.clone()).filter(|g| !g.is_empty()) {
            Some(g) => g,
            None => match blocking(&self.dev, |d| d.count()).await {
                Ok(Ok(n)) => (0..n).collect(),
                Ok(Err(e)) => return failed(e.to_string(), true),
                Err(e) => return failed(e, true),
            },
        };
        let (lo, hi) = (self.cfg.clock_min_mhz, self.cfg.clock_max_mhz);
        let targets = gpus.clone();
        let result = blocking(&self.dev, move |d| -> Result<Vec<(u32, u32)>, String> {
            let mut done = Vec::new();
            for g in targets {
                let supported = d.supported_sm_clocks_mhz(g).map_err(|e| e.to_string())?;
                let clock = snap_clock(asked_mhz, lo, hi, &supported).ok_or_else(|| {
                    format!(
                        "GPU {g}: no supported clock within the agent's bounds {}–{} MHz (supported: {supported:?})",
                        lo.unwrap_or(0),
                        hi.map(|h| h.to_string()).unwrap_or_else(|| "∞".into())
                    )
                })?;
                d.set_locked_clocks(g, clock, clock).map_err(|e| e.to_string())?;
                done.push((g, clock));
            }
            Ok(done)
        })
        .await;
        match result {
            Ok(Ok(done)) => {
                self.locked.extend(done.iter().map(|&(g, _)| g));
                let clocks: BTreeSet<u32> = done.iter().map(|&(_, c)| c).collect();
                let clocks: Vec<String> = clocks.iter().map(|c| format!("{c} MHz")).collect();
                Outcome::Applied {
                    placement: None,
                    detail: format!("locked GPUs {gpus:?} at {} (asked {asked_mhz} MHz)", clocks.join(", ")),
                }
            }
            // Some GPUs may be locked already: say so; the same id may be retried.
            Ok(Err(e)) => failed(e, true),
            Err(e) => failed(e, true),
        }
    }

    /// Start a command: its outcome now (clocks, refusals, a repeated id),
    /// or `None` when it runs beside the loop (exec actions), its outcome
    /// then coming on `done`.
    async fn start(
        &mut self,
        cmd: Command,
        done: &tokio::sync::mpsc::UnboundedSender<(Command, Outcome)>,
    ) -> Option<Outcome> {
        if let Some(seen) = self.applied.get(&cmd.id) {
            tracing::info!(id = %cmd.id, "command already applied (a retry or a replay); acknowledged again, not re-applied");
            return Some(Outcome::Applied {
                placement: seen.placement.clone(),
                detail: format!("already applied at {} ms (not re-applied): {}", seen.at_ms, seen.detail),
            });
        }
        match &cmd.action {
            Action::SetClock { clock_mhz, .. } => {
                let outcome = self.set_clock(*clock_mhz, cmd.placement.as_ref()).await;
                self.finish(&cmd, &outcome);
                Some(outcome)
            }
            other => match self.cfg.exec.as_ref().and_then(|x| x.argv(&cmd).map(|argv| (x.clone(), argv))) {
                Some((x, argv)) => {
                    if !self.in_flight.insert(cmd.id.clone()) {
                        tracing::info!(id = %cmd.id, "command still running; its ack comes when it ends");
                        return None;
                    }
                    let (node, is_spawn, done) = (
                        format!("{}/{}", self.cfg.site, self.cfg.node),
                        matches!(other, Action::Spawn { .. }),
                        done.clone(),
                    );
                    tokio::spawn(async move {
                        let outcome = match x.run(&cmd, &argv).await {
                            // A spawn's instance lives here unless the program says otherwise.
                            Outcome::Applied { placement: None, detail } if is_spawn => {
                                Outcome::Applied { placement: Some(Placement { node, ..Placement::default() }), detail }
                            }
                            o => o,
                        };
                        let _ = done.send((cmd, outcome));
                    });
                    None
                }
                None => {
                    let kind = other.kind();
                    Some(Outcome::Failed {
                        reason: format!(
                            "{kind} is not handled by the agent (no [agent.exec] {kind} command; or use an orchestrator backend)"
                        ),
                        retryable: false,
                    })
                }
            },
        }
    }

    /// Remember an applied command's id (so a retry is not applied again).
    fn finish(&mut self, cmd: &Command, outcome: &Outcome) {
        self.in_flight.remove(&cmd.id);
        if let Outcome::Applied { placement, detail } = outcome {
            let entry = AppliedEntry {
                id: cmd.id.clone(),
                at_ms: now_ms(),
                detail: detail.clone(),
                placement: placement.clone(),
            };
            if let Err(e) = self.applied.record(entry) {
                // Applied but not remembered: a retry of this id would apply it again.
                tracing::error!(id = %cmd.id, "{e}");
            }
        }
    }

    async fn reset_clocks(&mut self) {
        let gpus: Vec<u32> = std::mem::take(&mut self.locked).into_iter().collect();
        if gpus.is_empty() {
            return;
        }
        match blocking(&self.dev, move |d| gpus.iter().map(|&g| (g, d.reset_locked_clocks(g))).collect::<Vec<_>>())
            .await
        {
            Ok(results) => {
                for (g, r) in results {
                    match r {
                        Ok(()) => tracing::info!(gpu = g, "clock unlocked"),
                        Err(e) => tracing::error!(gpu = g, "cannot unlock the clock: {e}"),
                    }
                }
            }
            Err(e) => tracing::error!("cannot unlock the clocks: {e}"),
        }
    }
}

/// A command message the agent does not carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why, naming the topic.
    pub problem: String,
    /// The id to answer `Failed` to: only for a message the controller
    /// really sent (correctly signed, or any when no key is held) that the
    /// agent cannot carry out. A forged message is never answered, so it
    /// cannot fail a real command that shares its id.
    pub ack_id: Option<ActionId>,
}

/// Read a command message: signed with `key` (when held), parsed, and issued
/// within `ttl_ms` of `now_ms`.
pub fn read_command(
    topic: &str,
    payload: &[u8],
    key: Option<&CommandKey>,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Command, Refused> {
    let cmd: Command = signed::open(payload, key).map_err(|e| {
        let ack_id = match e {
            signed::Refusal::Malformed(_) => signed::payload_id(payload).map(ActionId),
            _ => None,
        };
        let problem = match &e {
            signed::Refusal::Malformed(m) => format!("mqtt topic {topic}: malformed command: {m}"),
            other => format!("mqtt topic {topic}: command refused: {other}"),
        };
        Refused { problem, ack_id }
    })?;
    if !signed::fresh(cmd.issued_at_ms, now_ms, ttl_ms) {
        let age_s = (now_ms as f64 - cmd.issued_at_ms as f64) / 1000.0;
        return Err(Refused {
            problem: format!(
                "mqtt topic {topic}: command {} refused: expired (issued {age_s:.1} s from now by the agent's clock; commands are taken within {:.0} s)",
                cmd.id,
                ttl_ms as f64 / 1000.0
            ),
            ack_id: Some(cmd.id),
        });
    }
    Ok(cmd)
}

fn now_ms_u64() -> u64 {
    actuators::now_ms()
}

fn log_outcome(id: &ActionId, outcome: &Outcome) {
    match outcome {
        Outcome::Applied { detail, .. } => tracing::info!(%id, "applied: {detail}"),
        Outcome::Failed { reason, .. } => tracing::warn!(%id, "failed: {reason}"),
        Outcome::TimedOut { .. } => {}
    }
}

/// Run the agent until `shutdown` completes, then unlock the clocks it
/// locked, publish the dead state and disconnect.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let settings = cfg.mqtt_settings()?;
    let key = match &cfg.command_key_file {
        Some(path) => Some(CommandKey::load(path).map_err(|problem| AgentError::Value {
            origin: "[agent]".into(),
            key: "command_key_file".into(),
            problem,
        })?),
        None => {
            tracing::warn!("insecure_unsigned_commands: commands are taken unsigned; anyone who can publish on the broker can command this node's GPUs");
            None
        }
    };
    let applied = AppliedIds::load(&cfg.state_file)?;
    let (kind, twin_url) = (cfg.gpu, cfg.twin_url.clone());
    // The device is built (and later dropped) off the async threads: the
    // twin's blocking HTTP client may not live on them.
    let dev: Arc<dyn GpuDevice> = tokio::task::spawn_blocking(move || -> Result<Arc<dyn GpuDevice>, AgentError> {
        match kind {
            GpuKind::Nvml => Ok(Arc::new(NvmlDevice::init().map_err(|e| AgentError::Gpu(e.to_string()))?)),
            GpuKind::Twin => {
                let url = twin_url.unwrap_or_default();
                Ok(Arc::new(TwinDevice::new(&url).map_err(|e| AgentError::Gpu(e.to_string()))?))
            }
        }
    })
    .await
    .map_err(|e| AgentError::Gpu(e.to_string()))??;
    let describe = blocking(&dev, |d| d.describe()).await.unwrap_or_default();
    tracing::info!(site = %cfg.site, node = %cfg.node, device = %describe, broker = %settings.broker(),
        remembered_ids = applied.len(), "agent starting");

    let cmd_topic = cfg.topic("cmd");
    let ack_topic = cfg.topic("ack");
    let state_topic = cfg.topic("state");
    let heartbeat_topic = signed::heartbeat_topic(&cfg.mqtt.topic_prefix);
    let (in_tx, mut in_rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = EdgePublisher::spawn_with(
        settings,
        &cfg.site,
        &cfg.node,
        &[cmd_topic.clone(), heartbeat_topic.clone()],
        Some(in_tx),
    );

    let http =
        reqwest::Client::builder().timeout(Duration::from_millis(cfg.scrape_timeout_ms)).build().map_err(|e| {
            AgentError::Value { origin: "[agent]".into(), key: "engine_url".into(), problem: e.to_string() }
        })?;
    let instance = cfg.instance.clone().unwrap_or_else(|| cfg.node.clone());
    let tags = Tags { instance: Some(instance.clone()), pool: cfg.pool.clone(), ..Tags::node(&cfg.site, &cfg.node) };
    let mut gpu_reader = Some(GpuReader::new());
    let mut engine = EngineTracker::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(cfg.interval_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ttl_ms = (cfg.command_ttl_s * 1000.0) as u64;
    let failsafe_after = Duration::from_secs_f64(cfg.failsafe_after_s);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(Command, Outcome)>();
    let mut node = Node { cfg, dev, applied, locked: BTreeSet::new(), in_flight: Default::default() };
    // The controller gets `failsafe_after_s` from the start to be heard.
    let mut heard = tokio::time::Instant::now();
    let mut last_heartbeat_ms = 0u64;
    let mut failsafe = false;
    let mut refused = 0u64;
    tokio::pin!(shutdown);

    loop {
        let ack = tokio::select! {
            () = &mut shutdown => break,
            finished = done_rx.recv() => {
                let Some((cmd, outcome)) = finished else { continue };
                node.finish(&cmd, &outcome);
                log_outcome(&cmd.id, &outcome);
                Some(Ack { id: cmd.id, outcome })
            }
            msg = in_rx.recv() => {
                let Some(p) = msg else { break };
                if p.topic == heartbeat_topic {
                    match signed::open::<Heartbeat>(&p.payload, key.as_ref()) {
                        Ok(hb) if hb.ts_ms > last_heartbeat_ms && signed::fresh(hb.ts_ms, now_ms_u64(), ttl_ms) => {
                            last_heartbeat_ms = hb.ts_ms;
                            heard = tokio::time::Instant::now();
                        }
                        Ok(hb) => tracing::debug!(ts_ms = hb.ts_ms, "a stale or repeated heartbeat; ignored"),
                        Err(e) => {
                            refused += 1;
                            tracing::warn!(topic = %p.topic, refused, "heartbeat refused: {e}");
                        }
                    }
                    None
                } else if p.topic != cmd_topic {
                    tracing::warn!(topic = %p.topic, "message on an unexpected topic; ignored");
                    None
                } else {
                    match read_command(&p.topic, &p.payload, key.as_ref(), now_ms_u64(), ttl_ms) {
                        Ok(cmd) => {
                            heard = tokio::time::Instant::now();
                            if failsafe {
                                failsafe = false;
                                tracing::info!("the controller is heard again: commands are applied");
                            }
                            tracing::info!(id = %cmd.id, action = ?cmd.action, "command");
                            let id = cmd.id.clone();
                            node.start(cmd, &done_tx).await.map(|outcome| {
                                log_outcome(&id, &outcome);
                                Ack { id, outcome }
                            })
                        }
                        Err(r) => {
                            refused += 1;
                            tracing::warn!(refused, "{}", r.problem);
                            r.ack_id.map(|id| Ack { id, outcome: Outcome::Failed { reason: r.problem, retryable: false } })
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(heard + failsafe_after), if !failsafe => {
                failsafe = true;
                let why = match publisher.last_error.lock().ok().and_then(|l| l.clone()) {
                    Some(e) if publisher.errors.load(std::sync::atomic::Ordering::Relaxed) > 0 => format!("; the broker: {e}"),
                    _ => String::new(),
                };
                tracing::warn!(
                    "failsafe: no heartbeat or command from the controller for {:.1} s{why}; unlocking the clocks (top clocks) until it is heard again",
                    heard.elapsed().as_secs_f64()
                );
                node.reset_clocks().await;
                None
            }
            _ = tick.tick() => {
                let ts = now_ms();
                let mut payload = TelemetryPayload { ts_ms: ts, ..TelemetryPayload::default() };
                let mut reader = gpu_reader.take().unwrap_or_default();
                let t = tags.clone();
                match blocking(&node.dev, move |d| {
                    let (s, e) = reader.read(d, ts, &Tags { instance: None, pool: None, ..t });
                    (reader, s, e)
                }).await {
                    Ok((r, samples, errors)) => {
                        gpu_reader = Some(r);
                        for e in errors {
                            tracing::warn!("GPU: {e}");
                        }
                        payload.gpus = samples.into_iter().map(gpu_entry).collect();
                    }
                    Err(e) => tracing::warn!("GPU: {e}"),
                }
                if let Some(url) = &node.cfg.engine_url {
                    match telemetry::scrape::fetch(&http, url).await {
                        Ok(text) => match parse_engine_page(&text, url) {
                            Ok(page) => {
                                for e in &page.errors {
                                    tracing::debug!("{e}");
                                }
                                payload.engines = engine
                                    .observe(&page, ts, &tags)
                                    .into_iter()
                                    .map(|s| engine_entry(s, &instance))
                                    .collect();
                            }
                            Err(e) => tracing::warn!("{e}"),
                        },
                        Err(problem) => tracing::warn!(page = %url, "engine scrape: {problem}"),
                    }
                }
                if !(payload.gpus.is_empty() && payload.engines.is_empty()) {
                    if let Err(e) = publisher.try_publish(&payload) {
                        tracing::warn!("telemetry dropped: {e}");
                    }
                }
                None
            }
        };
        if let Some(ack) = ack {
            match signed::seal(&ack, key.as_ref()) {
                Ok(body) => {
                    // Not awaited: a full queue (a long outage) must not stall the loop;
                    // the controller times out and retries the same id, which is re-acked.
                    if let Err(e) = publisher.client().try_publish(&ack_topic, QoS::AtLeastOnce, false, body) {
                        tracing::error!(topic = %ack_topic, "cannot publish the ack: {e}");
                    }
                }
                Err(e) => tracing::error!("cannot encode the ack: {e}"),
            }
        }
    }

    tracing::info!("agent stopping: unlocking clocks, publishing the dead state");
    node.reset_clocks().await;
    publisher.shutdown(&state_topic, Duration::from_secs(3)).await;
    let dev = node.dev;
    let _ = tokio::task::spawn_blocking(move || drop(dev)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_snap_into_bounds_and_onto_supported_steps() {
        let s = [800, 1000, 1200, 1400, 1600, 1800, 1980];
        assert_eq!(snap_clock(1400, None, None, &s), Some(1400));
        assert_eq!(snap_clock(1450, None, None, &s), Some(1400));
        assert_eq!(snap_clock(1500, None, None, &s), Some(1400), "a tie goes to the lower clock");
        assert_eq!(snap_clock(2500, None, Some(1700), &s), Some(1600));
        assert_eq!(snap_clock(100, Some(1100), None, &s), Some(1200));
        assert_eq!(snap_clock(1000, Some(1410), Some(1590), &s), None);
    }

    #[test]
    fn config_errors_name_the_key() {
        let base = "[agent]\nsite = \"s\"\nnode = \"n\"\ngpu = \"twin\"\ntwin_url = \"http://127.0.0.1:1\"\nstate_file = \"x.json\"\ninsecure_unsigned_commands = true\n[agent.mqtt]\nhost = \"127.0.0.1\"\n";
        let cfg = AgentConfig::from_toml_str(base).unwrap();
        assert_eq!(cfg.mqtt.client_id, "dynamollm-agent-s-n");
        assert_eq!(cfg.topic("cmd"), "dynamollm/s/n/cmd");
        let e =
            AgentConfig::from_toml_str(&base.replace("gpu = \"twin\"", "gpu = \"twin\"\ninterval = 1")).unwrap_err();
        assert!(e.to_string().contains("interval"), "{e}");
        let e = AgentConfig::from_toml_str(&base.replace("node = \"n\"", "node = \"a/b\"")).unwrap_err();
        assert!(e.to_string().starts_with("config <string>: agent.node: "), "{e}");
        let e = AgentConfig::from_toml_str(&base.replace("twin_url = \"http://127.0.0.1:1\"\n", "")).unwrap_err();
        assert_eq!(e.to_string(), "config <string>: agent.twin_url: required with gpu = \"twin\"");
        let e =
            AgentConfig::from_toml_str(&base.replace("host = \"127.0.0.1\"", "host = \"h\"\ntls = true")).unwrap_err();
        assert!(e.to_string().starts_with("config <string>: agent.mqtt.ca_file: required"), "{e}");
        let e = AgentConfig::from_toml_str(&base.replace("insecure_unsigned_commands = true\n", "")).unwrap_err();
        assert!(e.to_string().starts_with("config <string>: agent.command_key_file: required"), "{e}");
        let e =
            AgentConfig::from_toml_str(&base.replace("state_file", "failsafe_after_s = 0.5\nstate_file")).unwrap_err();
        assert!(
            e.to_string().contains("agent.failsafe_after_s: must be a number of seconds in [1, 86400], got 0.5"),
            "{e}"
        );
        let e = AgentConfig::from_toml_str(&format!("{base}clock_min_mhz = 900\n")).unwrap_err();
        assert!(e.to_string().contains("clock_min_mhz"), "{e}");
    }

    #[test]
    fn commands_are_taken_signed_fresh_and_parsed() {
        let key = CommandKey::new(&"k".repeat(40)).unwrap();
        let now = 1_000_000;
        let cmd = |id: &str, at: u64| Command {
            id: ActionId(id.into()),
            action: Action::SetClock { instance: actuators::InstanceId(0), clock_mhz: 1200 },
            placement: None,
            issued_at_ms: at,
        };
        let good = signed::seal(&cmd("a-1", now - 5_000), Some(&key)).unwrap();
        assert_eq!(read_command("t", &good, Some(&key), now, 60_000).unwrap().id.0, "a-1");
        // Unsigned, or signed with another key: refused, never answered.
        let bare = serde_json::to_vec(&cmd("a-2", now)).unwrap();
        let r = read_command("p/s/n/cmd", &bare, Some(&key), now, 60_000).unwrap_err();
        assert!(r.problem.contains("not signed") && r.problem.contains("p/s/n/cmd"), "{r:?}");
        assert_eq!(r.ack_id, None);
        let other = signed::seal(&cmd("a-3", now), Some(&CommandKey::new(&"x".repeat(40)).unwrap())).unwrap();
        let r = read_command("t", &other, Some(&key), now, 60_000).unwrap_err();
        assert!(r.problem.contains("bad signature") && r.ack_id.is_none(), "{r:?}");
        // Expired (and from the future): refused and answered.
        let old = signed::seal(&cmd("a-4", now - 61_000), Some(&key)).unwrap();
        let r = read_command("t", &old, Some(&key), now, 60_000).unwrap_err();
        assert!(r.problem.contains("expired"), "{r:?}");
        assert_eq!(r.ack_id, Some(ActionId("a-4".into())));
        let ahead = signed::seal(&cmd("a-5", now + 61_000), Some(&key)).unwrap();
        assert!(read_command("t", &ahead, Some(&key), now, 60_000).unwrap_err().problem.contains("expired"));
        // Signed but not a command we know: answered with its id.
        let sealed = signed::seal(&serde_json::json!({"id": "a-6", "action": {"kind": "warp"}}), Some(&key)).unwrap();
        let r = read_command("t", &sealed, Some(&key), now, 60_000).unwrap_err();
        assert!(r.problem.contains("malformed command"), "{r:?}");
        assert_eq!(r.ack_id, Some(ActionId("a-6".into())));
        // Without a key (insecure): bare commands go, garbage has no id.
        assert!(read_command("t", &bare, None, now, 60_000).is_ok());
        assert_eq!(read_command("t", b"\xff not json", None, now, 60_000).unwrap_err().ack_id, None);
    }

    #[test]
    fn applied_ids_survive_a_reload_and_the_oldest_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/applied.json");
        let mut ids = AppliedIds::load(&path).unwrap();
        for i in 0..REMEMBERED_IDS + 5 {
            ids.push(AppliedEntry { id: ActionId(format!("a{i}")), at_ms: 1, detail: String::new(), placement: None });
        }
        ids.save().unwrap();
        let ids = AppliedIds::load(&path).unwrap();
        assert_eq!(ids.len(), REMEMBERED_IDS);
        assert!(!ids.contains(&ActionId("a4".into())));
        assert!(ids.contains(&ActionId("a5".into())));
        assert!(ids.get(&ActionId(format!("a{}", REMEMBERED_IDS + 4))).is_some());
        std::fs::write(&path, "{oops").unwrap();
        let e = AppliedIds::load(&path).unwrap_err().to_string();
        assert!(e.contains("applied.json") && e.contains("corrupt"), "{e}");
    }
}
