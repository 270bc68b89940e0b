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
use crate::sample::Sample;
use crate::sink::Backoff;
use crate::stats::CollectorStats;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

mod payload;
pub use payload::*;
use payload::{byte_offset, StatePayload};

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
        rumqttc::ConnectionError::Tls(e) => format!(
            "TLS: {e} (check that ca_file is the CA that signed the broker's certificate, that the host name is in \
             that certificate, and the client certificate and key when the broker asks for one)"
        ),
        other => other.to_string(),
    }
}

/// `<base>-<host>-<pid>`: a client id of this process's own.
pub fn process_client_id(base: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect::<String>())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("{base}-{host}-{}", std::process::id())
}

/// Tells a taken client id from other trouble: a broker drops the older of
/// two connections with the same client id, so two processes sharing one
/// take turns being thrown off just after they connect. Fed every ConnAck
/// and every connection error; says so once, naming the id.
#[derive(Debug)]
pub struct FlapWatch {
    client_id: String,
    connected_at: Option<std::time::Instant>,
    quick_drops: u32,
    said: bool,
}

impl FlapWatch {
    /// Drops within this long of a ConnAck count as quick.
    pub const QUICK: Duration = Duration::from_secs(3);
    /// Quick drops in a row before the hint.
    pub const IN_A_ROW: u32 = 3;

    /// A watch for the client id `client_id`.
    pub fn new(client_id: &str) -> FlapWatch {
        FlapWatch { client_id: client_id.to_string(), connected_at: None, quick_drops: 0, said: false }
    }

    /// A ConnAck came.
    pub fn connected(&mut self) {
        self.connected_at = Some(std::time::Instant::now());
    }

    /// The connection failed: the hint, once, when it has failed quickly after connecting
    /// [`Self::IN_A_ROW`] times in a row.
    pub fn dropped(&mut self) -> Option<String> {
        match self.connected_at.take() {
            Some(t) if t.elapsed() < Self::QUICK => self.quick_drops += 1,
            Some(_) => self.quick_drops = 0,
            None => {}
        }
        (self.quick_drops >= Self::IN_A_ROW && !self.said).then(|| {
            self.said = true;
            format!(
                "the broker closed the connection {} times right after accepting it: another client is probably \
                 connected with the same client id {:?} (a broker drops the older of two); give each process its \
                 own client_id",
                self.quick_drops, self.client_id
            )
        })
    }
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
        o.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        if let Some(user) = &self.username {
            o.set_credentials(user, self.password.as_ref().map(Secret::expose).unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.config.clone())));
        }
        o
    }
}

/// The largest MQTT payload taken (bytes): the shipped broker's
/// `message_size_limit` (`deploy/mosquitto/edge-site.conf`). A larger one is
/// dropped and counted.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// The largest packet the clients read or write (bytes): well above the
/// largest payload the shipped broker lets through, so an oversized message
/// is read whole and dropped. A limit at the payload's size would make one
/// message just under the broker's limit a protocol error: the connection
/// drops, and the persistent session hands the same message back at every
/// reconnect, for ever.
pub const MAX_PACKET_BYTES: usize = 8 << 20;

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
            let mut flaps = FlapWatch::new(&settings.client_id);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        flaps.connected();
                        if cn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                            tracing::info!(%broker, client_id = %settings.client_id, "MQTT collector connected");
                        } else {
                            tracing::info!(%broker, "MQTT collector connected again");
                        }
                        for t in ["telemetry", "state"] {
                            if let Err(e) = client.try_subscribe(format!("{prefix}/+/+/{t}"), QoS::AtLeastOnce) {
                                st.record_error(&MqttError::Connection {
                                    broker: broker.clone(),
                                    problem: e.to_string(),
                                });
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.payload.len() > MAX_PAYLOAD_BYTES => {
                        st.record_error(&MqttError::Payload {
                            topic: p.topic.clone(),
                            byte: MAX_PAYLOAD_BYTES + 1,
                            problem: format!(
                                "{} bytes, above the {MAX_PAYLOAD_BYTES}-byte limit: dropped",
                                p.payload.len()
                            ),
                        });
                        if let Err(e) = client.try_ack(&p) {
                            st.record_error(&MqttError::Connection { broker: broker.clone(), problem: e.to_string() });
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
                        if let Some(hint) = flaps.dropped() {
                            tracing::warn!(%broker, "{hint}");
                        }
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
            let mut flaps = FlapWatch::new(&settings.client_id);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        flaps.connected();
                        if cn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                            tracing::info!(%broker, client_id = %settings.client_id, "MQTT connected");
                        } else {
                            tracing::info!(%broker, "MQTT connected again");
                        }
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
                    Ok(Event::Incoming(Packet::Publish(p))) if p.payload.len() > MAX_PAYLOAD_BYTES => {
                        er.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(
                            topic = %p.topic,
                            bytes = p.payload.len(),
                            "an MQTT message above the {MAX_PAYLOAD_BYTES}-byte limit: dropped"
                        );
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
                        if let Some(hint) = flaps.dropped() {
                            tracing::warn!(%broker, "{hint}");
                        }
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
    #[test]
    fn only_quick_drops_in_a_row_mean_a_taken_client_id() {
        let mut w = super::FlapWatch::new("ctl-1");
        w.connected();
        assert_eq!(w.dropped(), None);
        assert_eq!(w.dropped(), None, "a drop with no connection before it counts for nothing");
        w.connected();
        assert_eq!(w.dropped(), None);
        w.connected();
        let hint = w.dropped().expect("three quick drops in a row");
        assert!(hint.contains("same client id \"ctl-1\"") && hint.contains("3 times"), "{hint}");
        w.connected();
        assert_eq!(w.dropped(), None, "said once");
        let id = super::process_client_id("dynamollm-controller");
        assert!(id.starts_with("dynamollm-controller-") && id.ends_with(&format!("-{}", std::process::id())), "{id}");
    }

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
