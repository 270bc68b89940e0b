//! MQTT ingest against Mosquitto: QoS 1 through a broker restart (a private
//! broker with persistence), bad payloads among good ones, and the last will.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use telemetry::class::RequestClass;
use telemetry::mqtt::{ArrivalEntry, EdgePublisher, MqttCollector, MqttSettings, NodeState, TelemetryPayload};
use telemetry::sample::Sample;
use tokio::sync::mpsc;

fn settings(host: &str, port: u16, id: &str, prefix: &str) -> MqttSettings {
    MqttSettings {
        keep_alive: Duration::from_secs(5),
        reconnect_initial: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        ..MqttSettings::new(host, port, id, prefix)
    }
}

fn shared_broker() -> (String, u16) {
    let hp = common::require_env("DYNAMOLLM_TEST_MQTT");
    let (h, p) = hp.rsplit_once(':').expect("DYNAMOLLM_TEST_MQTT is host:port");
    (h.to_string(), p.parse().unwrap())
}

fn unique(tag: &str) -> String {
    format!("t{}-{}-{tag}", std::process::id(), telemetry::sample::now_ms())
}

fn payload(seq: i64) -> TelemetryPayload {
    TelemetryPayload {
        ts_ms: 1_700_000_000_000 + seq,
        arrivals: vec![ArrivalEntry {
            class: RequestClass::parse("SM").unwrap(),
            ts_ms: None,
            pool: None,
            requests: seq as f64,
            tokens: 1.0,
        }],
        ..TelemetryPayload::default()
    }
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_samples_all_arrive_through_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = common::mosquitto(dir.path());
    let prefix = unique("restart");
    let (tx, mut rx) = mpsc::channel(4096);
    let collector = MqttCollector::spawn(settings("127.0.0.1", broker.port, &format!("{prefix}-c"), &prefix), tx);
    let edge = EdgePublisher::spawn(settings("127.0.0.1", broker.port, &format!("{prefix}-e"), &prefix), "s1", "n1");
    let nodes = collector.nodes.clone();
    wait_until("the node to be alive", Duration::from_secs(10), || {
        nodes.lock().unwrap().get(&("s1".into(), "n1".into())) == Some(&NodeState::Alive)
    })
    .await;
    const N: i64 = 1500;
    let received = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let r = received.clone();
    let drain = tokio::spawn(async move {
        while let Some(s) = rx.recv().await {
            if let Sample::Arrivals(a) = s {
                assert_eq!(a.tags.node.as_deref(), Some("n1"));
                r.lock().unwrap().insert(a.requests as i64);
            }
        }
    });
    for seq in 0..N {
        edge.publish(&payload(seq)).await.unwrap();
        if seq == 500 {
            // Mid-stream: the broker stops (saving its sessions) and comes back.
            tokio::task::block_in_place(|| broker.stop());
            tokio::time::sleep(Duration::from_millis(500)).await;
            tokio::task::block_in_place(|| broker.start());
        }
        if seq % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let start = Instant::now();
    while received.lock().unwrap().len() < N as usize && start.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received.lock().unwrap().clone();
    let missing: Vec<i64> = (0..N).filter(|s| !got.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} of {N} samples missing (first {:?}); publisher acked {}, errors {}; collector errors {}: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)],
        edge.acked.load(std::sync::atomic::Ordering::Relaxed),
        edge.errors.load(std::sync::atomic::Ordering::Relaxed),
        collector.stats.errors(),
        collector.stats.last_error()
    );
    // Both sides reconnected; the collector subscribed again on its second ConnAck.
    assert!(collector.connects.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert!(edge.errors.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    drop(collector);
    drain.abort();
}

#[tokio::test]
async fn bad_payloads_are_counted_and_spare_their_neighbours() {
    let (host, port) = shared_broker();
    let prefix = unique("bad");
    let (tx, mut rx) = mpsc::channel(64);
    let collector = MqttCollector::spawn(settings(&host, port, &format!("{prefix}-c"), &prefix), tx);
    let edge = EdgePublisher::spawn(settings(&host, port, &format!("{prefix}-e"), &prefix), "s1", "n2");
    let nodes = collector.nodes.clone();
    wait_until("the node to be alive", Duration::from_secs(10), || !nodes.lock().unwrap().is_empty()).await;
    edge.publish(&payload(1)).await.unwrap();
    edge.publish_raw(b"{\"ts_ms\": 12, \"arrivals\": [".to_vec()).await.unwrap();
    let one_bad_entry = br#"{"ts_ms": 5, "arrivals": [{"class": "XX", "requests": 1, "tokens": 1},
        {"class": "LL", "requests": 2, "tokens": 3}]}"#;
    edge.publish_raw(one_bad_entry.to_vec()).await.unwrap();
    edge.publish(&payload(3)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let s = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        if let Sample::Arrivals(a) = s {
            got.push((a.tags.class.unwrap().to_string(), a.requests));
        }
    }
    assert_eq!(got, vec![("SM".to_string(), 1.0), ("LL".to_string(), 2.0), ("SM".to_string(), 3.0)]);
    assert_eq!(collector.stats.errors(), 2);
    assert_eq!(collector.stats.samples(), 3);
}

#[tokio::test]
async fn a_vanished_node_is_marked_dead_by_its_last_will() {
    let (host, port) = shared_broker();
    let prefix = unique("will");
    let (tx, _rx) = mpsc::channel(64);
    let collector = MqttCollector::spawn(settings(&host, port, &format!("{prefix}-c"), &prefix), tx);
    let edge = EdgePublisher::spawn(settings(&host, port, &format!("{prefix}-e"), &prefix), "s9", "n9");
    let nodes = collector.nodes.clone();
    let key = ("s9".to_string(), "n9".to_string());
    wait_until("alive", Duration::from_secs(10), || nodes.lock().unwrap().get(&key) == Some(&NodeState::Alive)).await;
    // The node's connection drops without a DISCONNECT: the broker publishes the will.
    drop(edge);
    wait_until("dead", Duration::from_secs(15), || nodes.lock().unwrap().get(&key) == Some(&NodeState::Dead)).await;
}

/// A payload of 1 MiB (the broker's limit; its packet is larger) and one of
/// 5 MB on a node's telemetry topic: each is read, dropped and counted, the
/// connection stays up (no reconnect), and the node's telemetry after them
/// arrives within 5 s. With the client's packet limit at 1 MiB the first one
/// broke the connection at every reconnect, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_dropped_and_counted_and_telemetry_goes_on() {
    let (host, port) = shared_broker();
    let prefix = unique("big");
    let (tx, mut rx) = mpsc::channel(64);
    let collector = MqttCollector::spawn(settings(&host, port, &format!("{prefix}-c"), &prefix), tx);
    let edge = EdgePublisher::spawn(settings(&host, port, &format!("{prefix}-e"), &prefix), "s1", "n2");
    let nodes = collector.nodes.clone();
    wait_until("the node to be alive", Duration::from_secs(10), || !nodes.lock().unwrap().is_empty()).await;
    // A hostile client that may write large packets.
    let mut o = rumqttc::MqttOptions::new(format!("{prefix}-x"), &host, port);
    o.set_max_packet_size(16 << 20, 16 << 20);
    let (hostile, mut ev) = rumqttc::AsyncClient::new(o, 16);
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let topic = format!("{prefix}/s1/n2/telemetry");
    for size in [telemetry::mqtt::MAX_PAYLOAD_BYTES, 5_000_000] {
        hostile.publish(&topic, rumqttc::QoS::AtLeastOnce, false, vec![b'x'; size]).await.unwrap();
    }
    wait_until("both big messages counted", Duration::from_secs(10), || collector.stats.errors() >= 2).await;
    let t0 = Instant::now();
    edge.publish(&payload(7)).await.unwrap();
    loop {
        let s = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("telemetry stopped").unwrap();
        if let Sample::Arrivals(a) = s {
            assert_eq!(a.requests, 7.0);
            break;
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(collector.stats.errors(), 2, "{:?}", collector.stats.last_error());
    assert_eq!(collector.connects.load(std::sync::atomic::Ordering::Relaxed), 1, "the collector reconnected");
    pump.abort();
}

/// Logs captured in memory (the test's own subscriber).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Two processes with one client id take turns being thrown off by the
/// broker: the log says so and names the id, instead of only "connection
/// closed" over and over. (A single client with its own id says nothing of the kind.)
#[tokio::test]
async fn two_clients_with_one_client_id_are_told_why_they_keep_dropping() {
    let logs = Captured::default();
    let w = logs.clone();
    let sub = tracing_subscriber::fmt().with_ansi(false).with_writer(move || w.clone()).finish();
    let _guard = tracing::subscriber::set_default(sub);
    let (host, port) = shared_broker();
    let prefix = unique("flap");
    let id = format!("{prefix}-twin-id");
    let a = EdgePublisher::spawn(settings(&host, port, &id, &prefix), "s", "a");
    let b = EdgePublisher::spawn(settings(&host, port, &id, &prefix), "s", "b");
    let own = EdgePublisher::spawn(settings(&host, port, &format!("{prefix}-own"), &prefix), "s", "c");
    let text = || String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    wait_until("the taken-client-id hint", Duration::from_secs(20), || text().contains("same client id")).await;
    let log = text();
    assert!(log.contains(&format!("same client id \"{id}\"")), "{log}");
    assert!(log.matches("same client id").count() <= 2, "said more than once per client: {log}");
    assert!(!log.contains(&format!("{prefix}-own\" ")), "the client with its own id was blamed: {log}");
    drop((a, b, own));
}
