//! The MQTT backend (controller side) for edge sites.
//!
//! Publishes the [`Command`] JSON at QoS 1 on `<prefix>/<site>/<node>/cmd`,
//! where `site/node` is the command's `placement.node` (or the configured
//! default node, for a spawn that has no placement yet), and waits for the
//! node's [`Ack`] with the same id on `<prefix>/<site>/<node>/ack` (it
//! subscribes to `<prefix>/+/+/ack`, persistent session). No ack within the
//! ack timeout → the same command (same id; edge nodes are idempotent by id)
//! is published again, up to the configured attempts; then timed out.
//! The broker connection comes from [`MqttSettings::options`] (credentials
//! and TLS included), with this backend's own client id.
//!
//! With a command key ([`crate::signed`]) every command goes signed and only
//! acks signed with the same key are believed (an ack from anyone else is
//! logged and ignored). While it runs it publishes the controller's
//! heartbeat on `<prefix>/controller/heartbeat` (QoS 0, signed): agents that
//! hear neither it nor a command for their `failsafe_after_s` unlock their
//! clocks on their own.

use crate::signed::{self, CommandKey, Heartbeat};
use crate::{Ack, Action, ActionId, Actuator, Command, Outcome};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::time::{Duration, Instant};
use telemetry::mqtt::MqttSettings;
use tokio::sync::{broadcast, watch};

/// Behaviour of the MQTT backend.
#[derive(Debug, Clone)]
pub struct MqttActuatorOptions {
    /// How long to wait for an ack before publishing again.
    pub ack_timeout: Duration,
    /// Publications per command in all, the first included (at least 1).
    pub attempts: u32,
    /// `site/node` for commands without a placement (spawns).
    pub default_node: Option<String>,
    /// Action kinds carried out (all when `None`).
    pub kinds: Option<Vec<String>>,
    /// The key commands are signed with and acks checked against (none: unsigned).
    pub key: Option<CommandKey>,
    /// How often the heartbeat goes out (none: no heartbeat).
    pub heartbeat: Option<Duration>,
}

/// The MQTT backend (see the module documentation). Dropping it stops its
/// connection task.
pub struct MqttActuator {
    client: AsyncClient,
    prefix: String,
    options: MqttActuatorOptions,
    acks: broadcast::Sender<(String, Ack)>,
    subscribed: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for MqttActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttActuator").field("prefix", &self.prefix).field("options", &self.options).finish()
    }
}

impl Drop for MqttActuator {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(h) = &self.heartbeat {
            h.abort();
        }
    }
}

/// Split `site/node` (as in `Placement::node` for edge sites).
pub fn split_site_node(node: &str) -> Result<(&str, &str), String> {
    match node.split_once('/') {
        Some((site, n)) if !site.is_empty() && !n.is_empty() && !n.contains('/') && !node.contains(['+', '#']) => {
            Ok((site, n))
        }
        _ => Err(format!("node {node:?} is not of the form site/node")),
    }
}

impl MqttActuator {
    /// Connect (in the background, on the current tokio runtime) with
    /// `settings`, and subscribe to the acks.
    pub fn spawn(settings: MqttSettings, options: MqttActuatorOptions) -> MqttActuator {
        let (client, mut eventloop) = AsyncClient::new(settings.options(), 256);
        let (acks, _) = broadcast::channel(1024);
        let (sub_tx, subscribed) = watch::channel(false);
        let prefix = settings.topic_prefix.trim_end_matches('/').to_string();
        let (tx, c, p) = (acks.clone(), client.clone(), prefix.clone());
        let broker = format!("{}:{}", settings.host, settings.port);
        let client_id = settings.client_id.clone();
        let key = options.key.clone();
        let task = tokio::spawn(async move {
            let mut backoff = telemetry::sink::Backoff::new(settings.reconnect_initial, settings.reconnect_max);
            let filter = format!("{p}/+/+/ack");
            let mut flaps = telemetry::mqtt::FlapWatch::new(&client_id);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        flaps.connected();
                        tracing::info!(%broker, "MQTT actuator connected");
                        if let Err(e) = c.try_subscribe(&filter, QoS::AtLeastOnce) {
                            tracing::warn!(%broker, error = %e, "cannot subscribe to acks");
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(msg))) => {
                        match signed::open::<Ack>(&msg.payload, key.as_ref()) {
                            Ok(ack) => {
                                let _ = tx.send((msg.topic.clone(), ack));
                            }
                            Err(e) => tracing::warn!(topic = %msg.topic, "ack ignored: {e}"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = sub_tx.send(false);
                        let problem = telemetry::mqtt::connection_problem(&e);
                        tracing::warn!(%broker, "MQTT actuator connection error: {problem}");
                        if let Some(hint) = flaps.dropped() {
                            tracing::warn!(%broker, "{hint}");
                        }
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        });
        let heartbeat = options.heartbeat.map(|every| {
            let (c, topic, key) = (client.clone(), signed::heartbeat_topic(&prefix), options.key.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Ok(body) = signed::seal(&Heartbeat { ts_ms: crate::now_ms() }, key.as_ref()) else { continue };
                    // QoS 0, not queued for long: a heartbeat is only worth its freshness.
                    if let Err(e) = c.try_publish(&topic, QoS::AtMostOnce, false, body) {
                        tracing::debug!(%topic, "heartbeat not sent: {e}");
                    }
                }
            })
        });
        MqttActuator {
            client,
            prefix,
            options: MqttActuatorOptions { attempts: options.attempts.max(1), ..options },
            acks,
            subscribed,
            task,
            heartbeat,
        }
    }

    fn target(&self, cmd: &Command) -> Result<(String, String), String> {
        let node = match (&cmd.placement, &self.options.default_node) {
            (Some(p), _) if !p.node.is_empty() => p.node.as_str(),
            (_, Some(d)) => d.as_str(),
            _ => return Err(format!("mqtt: command {} names no node and no default_node is configured", cmd.id)),
        };
        let (site, node) = split_site_node(node).map_err(|e| format!("mqtt: command {}: {e}", cmd.id))?;
        Ok((format!("{}/{site}/{node}/cmd", self.prefix), format!("{}/{site}/{node}/ack", self.prefix)))
    }

    async fn wait_ack(
        &self,
        rx: &mut broadcast::Receiver<(String, Ack)>,
        id: &ActionId,
        ack_topic: &str,
        within: Duration,
    ) -> Option<Outcome> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok((topic, ack))) if &ack.id == id && topic == ack_topic => return Some(ack.outcome),
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    tracing::warn!(skipped = n, "MQTT actuator fell behind on acks")
                }
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
            }
        }
    }
}

#[async_trait::async_trait]
impl Actuator for MqttActuator {
    fn name(&self) -> &str {
        "mqtt"
    }

    fn supports(&self, action: &Action) -> bool {
        self.options.kinds.as_ref().is_none_or(|k| k.iter().any(|k| k == action.kind()))
    }

    async fn apply(&self, cmd: &Command) -> Outcome {
        let (topic, ack_topic) = match self.target(cmd) {
            Ok(t) => t,
            Err(reason) => return Outcome::Failed { reason, retryable: false },
        };
        let body = match signed::seal(cmd, self.options.key.as_ref()) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed { reason: format!("mqtt: {e}"), retryable: false },
        };
        let started = Instant::now();
        // Acks are only seen once subscribed: wait for it (bounded).
        let mut sub = self.subscribed.clone();
        let budget = self.options.ack_timeout * self.options.attempts;
        if tokio::time::timeout(budget, sub.wait_for(|s| *s)).await.is_err() {
            return Outcome::TimedOut { after_ms: started.elapsed().as_millis() as u64 };
        }
        let mut rx = self.acks.subscribe();
        for attempt in 1..=self.options.attempts {
            if let Err(e) = self.client.publish(topic.as_str(), QoS::AtLeastOnce, false, body.clone()).await {
                tracing::warn!(id = %cmd.id, attempt, error = %e, "cannot publish the command");
            } else {
                tracing::debug!(id = %cmd.id, attempt, %topic, "command published");
            }
            if let Some(outcome) = self.wait_ack(&mut rx, &cmd.id, &ack_topic, self.options.ack_timeout).await {
                return outcome;
            }
            tracing::warn!(id = %cmd.id, attempt, "no ack within {:?}", self.options.ack_timeout);
        }
        Outcome::TimedOut { after_ms: started.elapsed().as_millis() as u64 }
    }
}
