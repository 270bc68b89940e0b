//! The MQTT backend against the real Mosquitto broker (`DYNAMOLLM_TEST_MQTT`,
//! started by `scripts/test`), with the test playing the edge node through a
//! plain rumqttc client: ack → applied; no ack → the same id published again,
//! then timed out; a failed ack → failed.

mod common;

use actuators::mqtt::{MqttActuator, MqttActuatorOptions};
use actuators::{Ack, Action, Actuator, Command, InstanceId, Outcome, Placement, PoolId, SpawnFrom};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telemetry::mqtt::MqttSettings;

fn broker() -> (String, u16) {
    let hp = common::require_env("DYNAMOLLM_TEST_MQTT");
    let (h, p) = hp.rsplit_once(':').expect("DYNAMOLLM_TEST_MQTT is host:port");
    (h.to_string(), p.parse().expect("DYNAMOLLM_TEST_MQTT's port is a number"))
}

fn settings(prefix: &str) -> MqttSettings {
    let (host, port) = broker();
    MqttSettings {
        keep_alive: Duration::from_secs(5),
        reconnect_initial: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        ..MqttSettings::new(&host, port, &format!("{prefix}-ctl"), prefix)
    }
}

/// What the fake edge node answers.
#[derive(Clone, Copy)]
enum Reply {
    Applied,
    Failed,
    Silent,
}

/// The edge node: subscribes to its cmd topic, records each command, and
/// answers on its ack topic.
struct Edge {
    received: Arc<Mutex<Vec<Command>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn edge(prefix: &str, site: &str, node: &str, reply: Reply) -> Edge {
    let (host, port) = broker();
    let mut o = MqttOptions::new(format!("{prefix}-{site}-{node}"), host, port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 64);
    let cmd_topic = format!("{prefix}/{site}/{node}/cmd");
    let ack_topic = format!("{prefix}/{site}/{node}/ack");
    let received = Arc::new(Mutex::new(Vec::new()));
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
    let rec = received.clone();
    let task = tokio::spawn(async move {
        let mut sub_tx = Some(sub_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(&cmd_topic, QoS::AtLeastOnce).await.unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = sub_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let cmd: Command = serde_json::from_slice(&p.payload).expect("the payload is a Command");
                    rec.lock().unwrap().push(cmd.clone());
                    let outcome = match reply {
                        Reply::Applied => Outcome::Applied {
                            placement: Some(Placement { node: "s1/n1".into(), gpus: vec![0], endpoint: None }),
                            detail: "started".into(),
                        },
                        Reply::Failed => {
                            // Late, so that a stray ack elsewhere comes first.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            Outcome::Failed { reason: "no free GPU".into(), retryable: false }
                        }
                        Reply::Silent => continue,
                    };
                    let ack = serde_json::to_vec(&Ack { id: cmd.id, outcome }).unwrap();
                    client.publish(&ack_topic, QoS::AtLeastOnce, false, ack).await.unwrap();
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("edge: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), sub_rx).await.expect("the edge node subscribed within 10 s").unwrap();
    Edge { received, task }
}

fn options(ack_ms: u64, attempts: u32) -> MqttActuatorOptions {
    MqttActuatorOptions {
        ack_timeout: Duration::from_millis(ack_ms),
        attempts,
        default_node: Some("s1/n1".into()),
        kinds: None,
        key: None,
        heartbeat: None,
    }
}

fn spawn_cmd(id: &str) -> Command {
    Command::new(
        id,
        Action::Spawn { instance: InstanceId(11), pool: PoolId(0), tp: 1, clock_mhz: 1200, from: SpawnFrom::Cold },
        None,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_makes_the_command_applied() {
    let prefix = common::unique("ack");
    let edge = edge(&prefix, "s1", "n1", Reply::Applied).await;
    let a = MqttActuator::spawn(settings(&prefix), options(3000, 3));
    // A spawn goes to the default node.
    let cmd = spawn_cmd("mq-1");
    let out = a.apply(&cmd).await;
    let Outcome::Applied { placement: Some(p), detail } = &out else { panic!("expected applied: {out:?}") };
    assert_eq!(p.node, "s1/n1");
    assert_eq!(detail, "started");
    assert_eq!(edge.received.lock().unwrap()[0], cmd, "the edge got the command as sent");

    // Another command, addressed by its placement.
    let clk = Command::new(
        "mq-2",
        Action::SetClock { instance: InstanceId(11), clock_mhz: 1000 },
        Some(Placement { node: "s1/n1".into(), gpus: vec![0], endpoint: None }),
    );
    assert!(a.apply(&clk).await.is_applied());
    assert!(edge.received.lock().unwrap().iter().any(|c| c.id.0 == "mq-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_is_retried_with_the_same_id_then_timed_out() {
    let prefix = common::unique("silent");
    let edge = edge(&prefix, "s1", "n1", Reply::Silent).await;
    let a = MqttActuator::spawn(settings(&prefix), options(300, 3));
    let start = Instant::now();
    let out = a.apply(&spawn_cmd("mq-3")).await;
    assert!(matches!(out, Outcome::TimedOut { after_ms } if after_ms >= 900), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // QoS 1 may deliver a copy twice; at least the 3 publications arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = edge.received.lock().unwrap();
    assert!(got.len() >= 3, "published {} times", got.len());
    assert!(got.iter().all(|c| c.id.0 == "mq-3"), "every re-send has the same id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_ack_is_a_failure_and_acks_from_other_nodes_do_not_count() {
    let prefix = common::unique("failed");
    let _edge = edge(&prefix, "s1", "n1", Reply::Failed).await;
    // Another node publishes an "applied" ack with the same id on its own
    // topic, over and over: it must not answer for s1/n1.
    let (host, port) = broker();
    let (rogue, mut rogue_el) = AsyncClient::new(MqttOptions::new(format!("{prefix}-rogue"), host, port), 64);
    let rogue_loop = tokio::spawn(async move { while rogue_el.poll().await.is_ok() {} });
    let stray = serde_json::to_vec(&Ack {
        id: actuators::ActionId("mq-4".into()),
        outcome: Outcome::Applied { placement: None, detail: "stray".into() },
    })
    .unwrap();
    let topic = format!("{prefix}/s2/n9/ack");
    let spam = tokio::spawn(async move {
        loop {
            let _ = rogue.publish(&topic, QoS::AtLeastOnce, false, stray.clone()).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    let a = MqttActuator::spawn(settings(&prefix), options(2000, 2));
    match a.apply(&spawn_cmd("mq-4")).await {
        Outcome::Failed { reason, retryable: false } => assert_eq!(reason, "no free GPU"),
        other => panic!("expected failed: {other:?}"),
    }
    spam.abort();
    rogue_loop.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_without_a_node_fail_clearly() {
    let prefix = common::unique("nonode");
    let a = MqttActuator::spawn(settings(&prefix), MqttActuatorOptions { default_node: None, ..options(300, 1) });
    match a.apply(&spawn_cmd("mq-5")).await {
        Outcome::Failed { reason, retryable: false } => assert!(reason.contains("names no node"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let bad = Command::new(
        "mq-6",
        Action::Retire { instance: InstanceId(1) },
        Some(Placement { node: "just-a-host".into(), gpus: vec![], endpoint: None }),
    );
    match a.apply(&bad).await {
        Outcome::Failed { reason, .. } => assert!(reason.contains("site/node"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
