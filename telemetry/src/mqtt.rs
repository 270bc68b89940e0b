//! MQTT ingest from edge nodes (rumqttc).
//!
//! Topics, under a prefix (default `dynamollm`):
//!
//! - `<prefix>/<site>/<node>/telemetry`: JSON [`TelemetryPayload`], QoS 1.
//! - `<prefix>/<site>/<node>/state`: retained JSON `{"state": "alive"}`,
//!   published by the node on every connect; the node's last will publishes
//!   `{"state": "dead"}` (retained) when it vanishes.
//!
//! The collector subscribes to both with a persistent session (a stable
//! client id, clean session off) and acknowledges each message only after its
//! samples are handed on, so the broker keeps QoS 1 messages for it while it
//! is away. It reconnects with backoff and subscribes again on every ConnAck.
//! A malformed payload is an error naming the topic and byte (or entry), is
//! counted, and costs only itself: each entry of a payload is read on its own.

use crate::config::Secret;
use crate::sample::{ArrivalSample, EngineSample, GpuSample, LatencySummary, Sample, Tags};
use crate::sink::Backoff;
use crate::stats::CollectorStats;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

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

fn byte_offset(text: &[u8], line: usize, column: usize) -> usize {
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
struct StatePayload {
    state: NodeState,
}

/// A readable account of a connection failure: a refused CONNECT says why
/// (bad user name or password, not authorised) rather than a return code.
pub fn connection_problem(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::ConnectReturnCode as C;
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                C::BadUserNamePassword => "bad user name or password",
                C::NotAuthorized => "not authorised (wrong or missing credentials, or the ACL refuses this client)",
                C::BadClientId => "client id rejected",
                C::ServiceUnavailable => "service unavailable",
                C::RefusedProtocolVersion => "protocol version refused",
                C::Success => "success (unexpected)",
            };
            format!("the broker refused the connection: {why}")
        }
        other => other.to_string(),
    }
}

/// The state payload a node publishes (`{"state":"alive"}` / `{"state":"dead"}`).
pub fn state_payload(state: NodeState) -> Vec<u8> {
    serde_json::to_vec(&StatePayload { state }).expect("serialisable")
}

/// A bad MQTT connection setting: names the key (`mqtt.ca_file`, …) and,
/// in the problem, the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct MqttConfigError {
    /// The key, relative to the table holding the `mqtt` table (`mqtt.ca_file`).
    pub key: &'static str,
    /// What is wrong (with the file's path where a file is involved).
    pub problem: String,
}

/// TLS to the broker: a rustls client config built from the CA (and
/// client certificate) files, which were read and checked when it was built.
#[derive(Clone)]
pub struct MqttTls {
    /// The CA file the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// The client certificate, when the broker wants one.
    pub client_cert_file: Option<PathBuf>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTls")
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .finish_non_exhaustive()
    }
}

fn read_pem_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, MqttConfigError> {
    let bad = |problem: String| MqttConfigError { key, problem: format!("{}: {problem}", path.display()) };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    Ok(certs)
}

impl MqttTls {
    /// Read the CA file (and the client certificate and key, both or
    /// neither) and build the TLS client config. Errors name the key and file.
    pub fn load(
        ca_file: &Path,
        client_cert_file: Option<&Path>,
        client_key_file: Option<&Path>,
    ) -> Result<MqttTls, MqttConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_pem_certs("mqtt.ca_file", ca_file)? {
            roots.add(cert).map_err(|e| MqttConfigError {
                key: "mqtt.ca_file",
                problem: format!("{}: not a usable CA certificate: {e}", ca_file.display()),
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| MqttConfigError { key: "mqtt.tls", problem: e.to_string() })?
            .with_root_certificates(roots);
        let config = match (client_cert_file, client_key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_pem_certs("mqtt.client_cert_file", cert)?;
                let bad = |problem: String| MqttConfigError {
                    key: "mqtt.client_key_file",
                    problem: format!("{}: {problem}", key.display()),
                };
                let bytes = std::fs::read(key).map_err(|e| bad(format!("cannot read: {e}")))?;
                let pk = rustls_pemfile::private_key(&mut bytes.as_slice())
                    .map_err(|e| bad(format!("bad PEM: {e}")))?
                    .ok_or_else(|| bad("no PEM private key in it".into()))?;
                builder
                    .with_client_auth_cert(chain, pk)
                    .map_err(|e| bad(format!("does not go with client_cert_file {}: {e}", cert.display())))?
            }
            (Some(_), None) => {
                return Err(MqttConfigError {
                    key: "mqtt.client_key_file",
                    problem: "client_cert_file and client_key_file go together".into(),
                })
            }
            (None, Some(_)) => {
                return Err(MqttConfigError {
                    key: "mqtt.client_cert_file",
                    problem: "client_cert_file and client_key_file go together".into(),
                })
            }
        };
        Ok(MqttTls {
            ca_file: ca_file.into(),
            client_cert_file: client_cert_file.map(Into::into),
            config: Arc::new(config),
        })
    }
}

/// Broker connection settings (from `[telemetry.mqtt]` or set by hand).
/// `Debug` shows the password as `***`.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id (stable, so the broker keeps the session).
    pub client_id: String,
    /// Topic prefix.
    pub topic_prefix: String,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// First reconnect delay.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// User name (none: anonymous).
    pub username: Option<String>,
    /// Password of `username`.
    pub password: Option<Secret>,
    /// TLS (none: plain TCP).
    pub tls: Option<MqttTls>,
}

impl MqttSettings {
    /// Plain, anonymous settings with the config's defaults for the rest
    /// (keep-alive 10 s, reconnect 100 ms–5 s).
    pub fn new(host: &str, port: u16, client_id: &str, topic_prefix: &str) -> MqttSettings {
        MqttSettings {
            host: host.into(),
            port,
            client_id: client_id.into(),
            topic_prefix: topic_prefix.into(),
            keep_alive: Duration::from_secs(10),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_millis(5000),
            username: None,
            password: None,
            tls: None,
        }
    }

    /// Settings from `[telemetry.mqtt]`; `Ok(None)` when no host is set.
    /// Reads the password file and the TLS files now, so a bad one is an
    /// error at start naming the key and file, not a failed connection later.
    pub fn from_config(c: &crate::config::MqttConfig) -> Result<Option<MqttSettings>, MqttConfigError> {
        c.check()?;
        let Some(host) = c.host.clone() else { return Ok(None) };
        let password = match (&c.password, &c.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| MqttConfigError {
                    key: "mqtt.password_file",
                    problem: format!("{}: cannot read: {e}", path.display()),
                })?;
                Some(Secret::new(text.lines().next().unwrap_or_default()))
            }
            (None, None) => None,
        };
        let tls = match (c.tls, &c.ca_file) {
            (true, Some(ca)) => Some(MqttTls::load(ca, c.client_cert_file.as_deref(), c.client_key_file.as_deref())?),
            _ => None,
        };
        Ok(Some(MqttSettings {
            host,
            port: c.port,
            client_id: c.client_id.clone(),
            topic_prefix: c.topic_prefix.clone(),
            keep_alive: Duration::from_secs(c.keep_alive_s.max(1)),
            reconnect_initial: Duration::from_millis(c.reconnect_initial_ms.max(1)),
            reconnect_max: Duration::from_millis(c.reconnect_max_ms.max(c.reconnect_initial_ms.max(1))),
            username: c.username.clone(),
            password,
            tls,
        }))
    }

    /// `host:port` (for messages).
    pub fn broker(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The rumqttc options for these settings (credentials and TLS included).
    /// Do not log them: rumqttc's `Debug` of the options shows the password.
    pub fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_clean_session(false);
        o.set_max_packet_size(1 << 20, 1 << 20);
        if let Some(user) = &self.username {
            o.set_credentials(user, self.password.as_ref().map(Secret::expose).unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.config.clone())));
        }
        o
    }
}

/// The MQTT collector: subscribes to every node's telemetry and state under
/// the prefix and sends [`Sample`]s to `out`. Ends when `out` is closed.
pub struct MqttCollector {
    /// Samples delivered and errors (bad payloads, connection drops).
    pub stats: Arc<CollectorStats>,
    /// Last known state per `(site, node)`.
    pub nodes: Arc<Mutex<BTreeMap<(String, String), NodeState>>>,
    /// ConnAcks seen (1 + reconnects).
    pub connects: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MqttCollector {
    /// Start the collector on the current tokio runtime.
    pub fn spawn(settings: MqttSettings, out: mpsc::Sender<Sample>) -> MqttCollector {
        let stats = CollectorStats::new("mqtt");
        let nodes = Arc::new(Mutex::new(BTreeMap::new()));
        let connects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut opts = settings.options();
        opts.set_manual_acks(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let (st, nd, cn) = (stats.clone(), nodes.clone(), connects.clone());
        let broker = format!("{}:{}", settings.host, settings.port);
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::new(settings.reconnect_initial, settings.reconnect_max);
            let prefix = settings.topic_prefix.clone();
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        cn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        for t in ["telemetry", "state"] {
                            if let Err(e) = client.try_subscribe(format!("{prefix}/+/+/{t}"), QoS::AtLeastOnce) {
                                st.record_error(&MqttError::Connection {
                                    broker: broker.clone(),
                                    problem: e.to_string(),
                                });
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        match parse_topic(&prefix, &p.topic) {
                            Ok((site, node, TopicKind::Telemetry)) => {
                                let (samples, errors) = parse_payload(&p.topic, &site, &node, &p.payload);
                                for e in &errors {
                                    st.record_error(e);
                                }
                                st.add_samples(samples.len());
                                for s in samples {
                                    if out.send(s).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Ok((site, node, TopicKind::State)) => {
                                match serde_json::from_slice::<StatePayload>(&p.payload) {
                                    Ok(s) => {
                                        if let Ok(mut n) = nd.lock() {
                                            n.insert((site, node), s.state);
                                        }
                                    }
                                    Err(e) => st.record_error(&MqttError::Payload {
                                        topic: p.topic.clone(),
                                        byte: byte_offset(&p.payload, e.line(), e.column()),
                                        problem: e.to_string(),
                                    }),
                                }
                            }
                            Err(e) => st.record_error(&e),
                        }
                        // Acknowledge only once handed on: unacknowledged QoS 1
                        // messages are sent again after a reconnect.
                        if let Err(e) = client.try_ack(&p) {
                            st.record_error(&MqttError::Connection { broker: broker.clone(), problem: e.to_string() });
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        st.record_error(&MqttError::Connection {
                            broker: broker.clone(),
                            problem: connection_problem(&e),
                        });
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        });
        MqttCollector { stats, nodes, connects, task }
    }
}

/// The edge node's side: publishes telemetry at QoS 1 and its retained
/// state, with a last will that marks it dead. Keeps its session across
/// reconnects, so publishes not yet acknowledged by the broker are sent again.
pub struct EdgePublisher {
    client: AsyncClient,
    topic: String,
    /// Connection errors met (each followed by a reconnect).
    pub errors: Arc<std::sync::atomic::AtomicU64>,
    /// Publishes the broker acknowledged.
    pub acked: Arc<std::sync::atomic::AtomicU64>,
    /// The last connection error (see [`connection_problem`]).
    pub last_error: Arc<Mutex<Option<MqttError>>>,
    /// ConnAcks seen (1 + reconnects).
    pub connects: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EdgePublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EdgePublisher {
    /// Connect as node `node` of `site` (the client id is the settings' id).
    pub fn spawn(settings: MqttSettings, site: &str, node: &str) -> EdgePublisher {
        Self::spawn_with(settings, site, node, &[], None)
    }

    /// Like [`EdgePublisher::spawn`], and also subscribes (QoS 1) to
    /// `subscribe` on every ConnAck (so the subscriptions survive a broker
    /// that lost its sessions), sending each incoming PUBLISH to `incoming`.
    pub fn spawn_with(
        settings: MqttSettings,
        site: &str,
        node: &str,
        subscribe: &[String],
        incoming: Option<mpsc::UnboundedSender<rumqttc::Publish>>,
    ) -> EdgePublisher {
        let subscribe = subscribe.to_vec();
        let prefix = &settings.topic_prefix;
        let state_topic = format!("{prefix}/{site}/{node}/state");
        let mut opts = settings.options();
        opts.set_last_will(LastWill::new(&state_topic, state_payload(NodeState::Dead), QoS::AtLeastOnce, true));
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let connects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let last_error = Arc::new(Mutex::new(None));
        let (er, ak, cn, le, c) = (errors.clone(), acked.clone(), connects.clone(), last_error.clone(), client.clone());
        let broker = settings.broker();
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::new(settings.reconnect_initial, settings.reconnect_max);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        cn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = c.try_publish(&state_topic, QoS::AtLeastOnce, true, state_payload(NodeState::Alive));
                        for t in &subscribe {
                            if let Err(e) = c.try_subscribe(t, QoS::AtLeastOnce) {
                                tracing::warn!(topic = %t, "cannot subscribe: {e}");
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        ak.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(tx) = &incoming {
                            let _ = tx.send(p);
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                        // Asked to go: let the DISCONNECT reach the broker, then stop.
                        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        er.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let e = MqttError::Connection { broker: broker.clone(), problem: connection_problem(&e) };
                        tracing::warn!("{e}");
                        if let Ok(mut l) = le.lock() {
                            *l = Some(e);
                        }
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        });
        EdgePublisher {
            client,
            topic: format!("{prefix}/{site}/{node}/telemetry"),
            errors,
            acked,
            last_error,
            connects,
            task,
        }
    }

    /// The underlying client (to subscribe, or publish on other topics).
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Say goodbye: publish the retained `{"state":"dead"}` (QoS 1) and
    /// disconnect cleanly (so the last will is not needed), waiting up to
    /// `timeout` for the broker to take both.
    pub async fn shutdown(&self, state_topic: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let before = self.acked.load(std::sync::atomic::Ordering::Relaxed);
        // try_*: a full request queue (a long outage) must not hold up the exit.
        if let Err(e) = self.client.try_publish(state_topic, QoS::AtLeastOnce, true, state_payload(NodeState::Dead)) {
            tracing::warn!(topic = %state_topic, "cannot publish the dead state ({e}); the last will says it");
        } else {
            // Wait for a PUBACK (the dead state's, or an earlier one: the
            // DISCONNECT goes after the state on the same connection anyway).
            while self.acked.load(std::sync::atomic::Ordering::Relaxed) == before
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout_at(deadline, async {
            while !self.task.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// Publish one payload at QoS 1 without waiting: an error (and nothing
    /// sent) when the client's request queue is full, as after a long
    /// outage, so a periodic publisher never stalls its loop.
    pub fn try_publish(&self, payload: &TelemetryPayload) -> Result<(), MqttError> {
        let body = serde_json::to_vec(payload).map_err(|e| MqttError::Payload {
            topic: self.topic.clone(),
            byte: 0,
            problem: e.to_string(),
        })?;
        self.client
            .try_publish(&self.topic, QoS::AtLeastOnce, false, body)
            .map_err(|e| MqttError::Connection { broker: self.topic.clone(), problem: e.to_string() })
    }

    /// Publish one payload at QoS 1 (queued while disconnected).
    pub async fn publish(&self, payload: &TelemetryPayload) -> Result<(), MqttError> {
        let body = serde_json::to_vec(payload).expect("serialisable");
        self.client
            .publish(&self.topic, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| MqttError::Connection { broker: self.topic.clone(), problem: e.to_string() })
    }

    /// Publish raw bytes on the telemetry topic (for tests of bad input).
    pub async fn publish_raw(&self, body: Vec<u8>) -> Result<(), MqttError> {
        self.client
            .publish(&self.topic, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| MqttError::Connection { broker: self.topic.clone(), problem: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_split_into_site_node_and_kind() {
        assert_eq!(
            parse_topic("dynamollm", "dynamollm/s1/n2/telemetry").unwrap(),
            ("s1".into(), "n2".into(), TopicKind::Telemetry)
        );
        assert_eq!(parse_topic("dynamollm", "dynamollm/s1/n2/state").unwrap().2, TopicKind::State);
        assert!(parse_topic("dynamollm", "dynamollm/s1/telemetry").is_err());
        assert!(parse_topic("dynamollm", "other/s1/n2/telemetry").is_err());
    }

    #[test]
    fn payload_becomes_tagged_samples() {
        let body = br#"{"ts_ms": 1000,
            "gpus": [{"gpu": 1, "power_w": 300.5, "energy_j": 10.0}],
            "engines": [{"instance": "i0", "waiting": 3}],
            "arrivals": [{"class": "SL", "requests": 4, "tokens": 900}]}"#;
        let (s, e) = parse_payload("t", "s1", "n1", body);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(s.len(), 3);
        match &s[0] {
            Sample::Gpu(g) => {
                assert_eq!(g.tags.gpu, Some(1));
                assert_eq!(g.tags.site.as_deref(), Some("s1"));
                assert_eq!(g.power_w, 300.5);
            }
            other => panic!("{other:?}"),
        }
        match &s[2] {
            Sample::Arrivals(a) => assert_eq!((a.tags.class.unwrap().to_string(), a.requests), ("SL".into(), 4.0)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_payload_names_topic_and_byte_and_bad_entries_spare_the_rest() {
        let (s, e) = parse_payload("dynamollm/a/b/telemetry", "a", "b", b"{\"ts_ms\": 5, \"gpus\": [}");
        assert!(s.is_empty());
        assert_eq!(e.len(), 1);
        assert!(e[0].to_string().starts_with("mqtt topic dynamollm/a/b/telemetry: payload byte 23: "), "{}", e[0]);
        let body = br#"{"ts_ms": 5, "gpus": [{"gpu": 0, "power_w": 1}, {"gpu": "x"}, {"gpu": 2, "power_w": 3}]}"#;
        let (s, e) = parse_payload("t", "a", "b", body);
        assert_eq!(s.len(), 2);
        assert_eq!(e.len(), 1);
        assert!(e[0].to_string().starts_with("mqtt topic t: gpus[1]: "), "{}", e[0]);
    }
}
