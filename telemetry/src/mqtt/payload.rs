//! The MQTT payloads of an edge site: the telemetry a node publishes (GPU,
//! engine and arrival entries), topic names, the node state, and how a
//! payload is read — each entry on its own, a bad one an error naming the
//! topic and byte (or entry) that costs only itself.

use crate::sample::{ArrivalSample, EngineSample, GpuSample, LatencySummary, Sample, Tags};
use serde::{Deserialize, Serialize};

/// A bad MQTT message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MqttError {
    /// The payload is not valid JSON or not the schema.
    #[error("mqtt topic {topic}: payload byte {byte}: {problem}")]
    Payload {
        /// The topic.
        topic: String,
        /// 1-based byte offset of the problem.
        byte: usize,
        /// What is wrong.
        problem: String,
    },
    /// One entry of a payload is bad; the other entries are kept.
    #[error("mqtt topic {topic}: {entry}: {problem}")]
    Entry {
        /// The topic.
        topic: String,
        /// `gpus[2]`, `engines[0]`, …
        entry: String,
        /// What is wrong.
        problem: String,
    },
    /// A topic outside the layout.
    #[error("mqtt topic {topic}: {problem}")]
    Topic {
        /// The topic.
        topic: String,
        /// What is wrong.
        problem: String,
    },
    /// The connection to the broker.
    #[error("mqtt broker {broker}: {problem}")]
    Connection {
        /// host:port.
        broker: String,
        /// What happened.
        problem: String,
    },
}

/// One GPU in a telemetry payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuEntry {
    /// GPU index on the node.
    pub gpu: u32,
    /// Time of the reading, ms (default: the payload's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<i64>,
    /// Board power.
    pub power_w: f64,
    /// Energy counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_j: Option<f64>,
    /// SM clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    /// Utilisation 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub util: Option<f64>,
    /// Temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f64>,
    /// NVML throttle reason bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_reasons: Option<u64>,
}

/// One engine instance in a telemetry payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineEntry {
    /// Instance id.
    pub instance: String,
    /// Time of the reading, ms (default: the payload's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<i64>,
    /// Pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// TTFT over the node's last interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft: Option<LatencySummary>,
    /// TBT over the node's last interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tbt: Option<LatencySummary>,
    /// Requests running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    /// Requests waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<f64>,
    /// KV usage 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_usage: Option<f64>,
    /// Prompt token counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_total: Option<f64>,
    /// Generation token counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_tokens_total: Option<f64>,
}

/// Arrivals of one class in a telemetry payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrivalEntry {
    /// Request class (`SS` … `LL`).
    pub class: crate::class::RequestClass,
    /// Interval start, ms (default: the payload's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<i64>,
    /// Pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Requests.
    pub requests: f64,
    /// Tokens.
    pub tokens: f64,
}

/// The JSON an edge node publishes on `<prefix>/<site>/<node>/telemetry`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryPayload {
    /// Time of the readings, Unix ms.
    pub ts_ms: i64,
    /// GPU readings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuEntry>,
    /// Engine readings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<EngineEntry>,
    /// Per-class arrivals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arrivals: Vec<ArrivalEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoosePayload {
    ts_ms: i64,
    #[serde(default)]
    gpus: Vec<serde_json::Value>,
    #[serde(default)]
    engines: Vec<serde_json::Value>,
    #[serde(default)]
    arrivals: Vec<serde_json::Value>,
}

pub(super) fn byte_offset(text: &[u8], line: usize, column: usize) -> usize {
    if line <= 1 {
        return column.max(1);
    }
    let mut l = 1;
    for (i, &b) in text.iter().enumerate() {
        if b == b'\n' {
            l += 1;
            if l == line {
                return i + 1 + column.max(1);
            }
        }
    }
    text.len().max(1)
}

/// What a topic is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    /// `…/telemetry`.
    Telemetry,
    /// `…/state`.
    State,
}

/// Split `<prefix>/<site>/<node>/<kind>`.
pub fn parse_topic(prefix: &str, topic: &str) -> Result<(String, String, TopicKind), MqttError> {
    let bad = |problem: &str| MqttError::Topic { topic: topic.into(), problem: problem.into() };
    let rest = topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| bad(&format!("not under {prefix}/")))?;
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() != 3 || parts[0].is_empty() || parts[1].is_empty() {
        return Err(bad("expected <prefix>/<site>/<node>/telemetry or …/state"));
    }
    let kind = match parts[2] {
        "telemetry" => TopicKind::Telemetry,
        "state" => TopicKind::State,
        _ => return Err(bad("expected …/telemetry or …/state")),
    };
    Ok((parts[0].into(), parts[1].into(), kind))
}

/// Parse a telemetry payload from `site`/`node` into samples. Entries that
/// fail are returned as errors; the rest of the payload is kept. A payload
/// that is not JSON, or not an object of the schema, gives no samples.
pub fn parse_payload(topic: &str, site: &str, node: &str, payload: &[u8]) -> (Vec<Sample>, Vec<MqttError>) {
    let loose: LoosePayload = match serde_json::from_slice(payload) {
        Ok(p) => p,
        Err(e) => {
            let byte = byte_offset(payload, e.line(), e.column());
            let problem = e.to_string();
            // serde_json appends " at line L column C": the byte says it.
            let problem = problem.split(" at line ").next().unwrap_or(&problem).to_string();
            return (Vec::new(), vec![MqttError::Payload { topic: topic.into(), byte, problem }]);
        }
    };
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    let base = Tags::node(site, node);
    let entry_err = |kind: &str, i: usize, e: String| MqttError::Entry {
        topic: topic.into(),
        entry: format!("{kind}[{i}]"),
        problem: e,
    };
    let finite = |name: &str, v: f64| if v.is_finite() { Ok(()) } else { Err(format!("{name} is not finite")) };
    for (i, v) in loose.gpus.into_iter().enumerate() {
        match serde_json::from_value::<GpuEntry>(v) {
            Ok(g) => match finite("power_w", g.power_w) {
                Ok(()) => samples.push(Sample::Gpu(GpuSample {
                    ts_ms: g.ts_ms.unwrap_or(loose.ts_ms),
                    tags: Tags { gpu: Some(g.gpu), ..base.clone() },
                    power_w: g.power_w,
                    energy_j: g.energy_j,
                    sm_clock_mhz: g.sm_clock_mhz,
                    util: g.util,
                    temperature_c: g.temperature_c,
                    throttle_reasons: g.throttle_reasons,
                })),
                Err(e) => errors.push(entry_err("gpus", i, e)),
            },
            Err(e) => errors.push(entry_err("gpus", i, e.to_string())),
        }
    }
    for (i, v) in loose.engines.into_iter().enumerate() {
        match serde_json::from_value::<EngineEntry>(v) {
            Ok(e) => samples.push(Sample::Engine(EngineSample {
                ts_ms: e.ts_ms.unwrap_or(loose.ts_ms),
                tags: Tags { instance: Some(e.instance), pool: e.pool, model: e.model, ..base.clone() },
                ttft: e.ttft,
                tbt: e.tbt,
                running: e.running,
                waiting: e.waiting,
                kv_usage: e.kv_usage,
                prompt_tokens_total: e.prompt_tokens_total,
                generation_tokens_total: e.generation_tokens_total,
            })),
            Err(e) => errors.push(entry_err("engines", i, e.to_string())),
        }
    }
    for (i, v) in loose.arrivals.into_iter().enumerate() {
        match serde_json::from_value::<ArrivalEntry>(v) {
            Ok(a) => match finite("requests", a.requests).and(finite("tokens", a.tokens)) {
                Ok(()) => samples.push(Sample::Arrivals(ArrivalSample {
                    ts_ms: a.ts_ms.unwrap_or(loose.ts_ms),
                    tags: Tags { class: Some(a.class), pool: a.pool, ..base.clone() },
                    requests: a.requests,
                    tokens: a.tokens,
                })),
                Err(e) => errors.push(entry_err("arrivals", i, e)),
            },
            Err(e) => errors.push(entry_err("arrivals", i, e.to_string())),
        }
    }
    (samples, errors)
}

/// A node's state as its retained `state` topic says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Connected.
    Alive,
    /// Its last will fired (or it said goodbye).
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StatePayload {
    pub(super) state: NodeState,
}

/// The state payload a node publishes (`{"state":"alive"}` / `{"state":"dead"}`).
pub fn state_payload(state: NodeState) -> Vec<u8> {
    serde_json::to_vec(&StatePayload { state }).expect("serialisable")
}
