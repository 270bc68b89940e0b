//! MQTT credentials and TLS against real Mosquitto instances started here:
//! a broker that wants a user name and password (right ones: telemetry
//! flows; a wrong one: a clear refusal, no panic), a TLS listener with a CA
//! and server certificate made for the test (and one that also wants a
//! client certificate), and secrets kept out of `Debug`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use telemetry::config::{MqttConfig, Secret, TelemetryConfig};
use telemetry::mqtt::{EdgePublisher, MqttCollector, MqttSettings, NodeState, TelemetryPayload};
use telemetry::sample::Sample;
use tokio::sync::mpsc;

const PASSWORD: &str = "s3cret-hunter2-Pw";

fn unique(tag: &str) -> String {
    format!("t{}-{}-{tag}", std::process::id(), telemetry::sample::now_ms())
}

fn fast(s: MqttSettings) -> MqttSettings {
    MqttSettings {
        keep_alive: Duration::from_secs(5),
        reconnect_initial: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        ..s
    }
}

/// `mosquitto_passwd`, from `DYNAMOLLM_TEST_MOSQUITTO_PASSWD_BIN`, beside
/// the Mosquitto binary, or on the PATH (it ships in the mosquitto package).
fn mosquitto_passwd() -> PathBuf {
    if let Ok(p) = std::env::var("DYNAMOLLM_TEST_MOSQUITTO_PASSWD_BIN") {
        return p.into();
    }
    let broker = PathBuf::from(common::require_env("DYNAMOLLM_TEST_MOSQUITTO_BIN"));
    let mut dirs: Vec<PathBuf> = broker.parent().into_iter().map(Path::to_path_buf).collect();
    dirs.extend(["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join("mosquitto_passwd"))
        .find(|p| p.is_file())
        .expect("mosquitto_passwd not found (it comes with the mosquitto package that scripts/test installs)")
}

fn world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn payload(seq: i64) -> TelemetryPayload {
    TelemetryPayload {
        ts_ms: 1_700_000_000_000 + seq,
        gpus: vec![telemetry::mqtt::GpuEntry {
            gpu: 0,
            ts_ms: None,
            power_w: 100.0 + seq as f64,
            energy_j: None,
            sm_clock_mhz: None,
            util: None,
            temperature_c: None,
            throttle_reasons: None,
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

/// One edge node publishes, the collector must see its GPU power.
async fn round_trip(collector_settings: MqttSettings, edge_settings: MqttSettings) {
    let (tx, mut rx) = mpsc::channel(64);
    let collector = MqttCollector::spawn(collector_settings, tx);
    let edge = EdgePublisher::spawn(edge_settings, "s1", "n1");
    let nodes = collector.nodes.clone();
    wait_until("the node to be alive", Duration::from_secs(15), || {
        nodes.lock().unwrap().get(&("s1".into(), "n1".into())) == Some(&NodeState::Alive)
    })
    .await;
    edge.publish(&payload(7)).await.unwrap();
    let got = loop {
        let s = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no sample; collector: {:?}", collector.stats.last_error()))
            .unwrap();
        if let Sample::Gpu(g) = s {
            break g;
        }
    };
    assert_eq!(got.power_w, 107.0);
    assert_eq!(got.tags.node.as_deref(), Some("n1"));
    assert_eq!(collector.stats.errors(), 0, "{:?}", collector.stats.last_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_broker_takes_the_right_credentials_and_refuses_a_wrong_password() {
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("passwd");
    let status = Command::new(mosquitto_passwd())
        .args(["-b", "-c"])
        .arg(&pwfile)
        .args(["edge", PASSWORD])
        .status()
        .expect("mosquitto_passwd runs");
    assert!(status.success(), "mosquitto_passwd failed: {status}");
    world_readable(&pwfile);
    let _broker = common::mosquitto_with(dir.path(), |port| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\n",
            pwfile.display()
        )
    });
    let port = _broker.port;
    let prefix = unique("pw");
    // Through the config, as a deployment would: password and password_file.
    let secret_file = dir.path().join("edge.password");
    std::fs::write(&secret_file, format!("{PASSWORD}\n")).unwrap();
    let toml = format!(
        "[telemetry.mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nusername = \"edge\"\npassword_file = \"{}\"\n\
         client_id = \"{prefix}-c\"\ntopic_prefix = \"{prefix}\"\n",
        secret_file.display()
    );
    let cfg = TelemetryConfig::from_toml_str(&toml).unwrap();
    let collector = MqttSettings::from_config(&cfg.mqtt).unwrap().unwrap();
    assert_eq!(collector.password.as_ref().map(Secret::expose), Some(PASSWORD));
    let edge = MqttSettings {
        username: Some("edge".into()),
        password: Some(Secret::new(PASSWORD)),
        ..MqttSettings::new("127.0.0.1", port, &format!("{prefix}-e"), &prefix)
    };
    round_trip(fast(collector), fast(edge)).await;

    // A wrong password: refused, said clearly, retried with backoff, no panic.
    let wrong = MqttSettings {
        username: Some("edge".into()),
        password: Some(Secret::new("not-the-password")),
        ..MqttSettings::new("127.0.0.1", port, &format!("{prefix}-bad"), &prefix)
    };
    let edge = EdgePublisher::spawn(fast(wrong.clone()), "s1", "bad");
    let le = edge.last_error.clone();
    wait_until("the refusal", Duration::from_secs(10), || le.lock().unwrap().is_some()).await;
    let e = le.lock().unwrap().clone().unwrap().to_string();
    assert!(e.starts_with(&format!("mqtt broker 127.0.0.1:{port}: the broker refused the connection: ")), "{e}");
    assert!(e.contains("user name or password") || e.contains("not authorised"), "{e}");
    eprintln!("refusal: {e}");
    assert!(!e.contains("not-the-password"), "{e}");
    assert_eq!(edge.connects.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The collector side says the same through its stats.
    let (tx, _rx) = mpsc::channel(4);
    let c = MqttCollector::spawn(fast(MqttSettings { client_id: format!("{prefix}-badc"), ..wrong }), tx);
    let stats = c.stats.clone();
    wait_until("the collector's refusal", Duration::from_secs(10), || stats.errors() > 0).await;
    assert!(stats.last_error().unwrap().contains("refused the connection"), "{:?}", stats.last_error());
    // No credentials at all: refused too.
    let anon = EdgePublisher::spawn(
        fast(MqttSettings::new("127.0.0.1", port, &format!("{prefix}-anon"), &prefix)),
        "s1",
        "anon",
    );
    let le = anon.last_error.clone();
    wait_until("the anonymous refusal", Duration::from_secs(10), || le.lock().unwrap().is_some()).await;
}

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, both signed by it, written as PEM files into `dir`.
fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "dynamollm test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    server.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client.distinguished_name.push(DnType::CommonName, "edge-n1");
    let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key).unwrap();

    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        world_readable(&p);
        p
    };
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server_cert.pem()),
        server_key: write("server.key", server_key.serialize_pem()),
        client_cert: write("client.pem", client_cert.pem()),
        client_key: write("client.key", client_key.serialize_pem()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_round_trips_over_tls_with_and_without_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let mtls_port = common::free_port();
    let broker = common::mosquitto_with(dir.path(), |port| {
        format!(
            "allow_anonymous true\npersistence false\n\
             listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
             listener {mtls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n",
            ca = pki.ca.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
        )
    });
    common::wait_for_port(mtls_port, Duration::from_secs(10));
    let prefix = unique("tls");
    let tls_config = |port: u16, id: &str, client_cert: bool| MqttConfig {
        host: Some("127.0.0.1".into()),
        port,
        client_id: format!("{prefix}-{id}"),
        topic_prefix: prefix.clone(),
        tls: true,
        ca_file: Some(pki.ca.clone()),
        client_cert_file: client_cert.then(|| pki.client_cert.clone()),
        client_key_file: client_cert.then(|| pki.client_key.clone()),
        ..MqttConfig::default()
    };
    let settings = |c: MqttConfig| fast(MqttSettings::from_config(&c).unwrap().unwrap());
    round_trip(settings(tls_config(broker.port, "c", false)), settings(tls_config(broker.port, "e", false))).await;

    // The listener that wants a client certificate: with one, it works…
    let prefix2 = format!("{prefix}-m");
    let m = |id: &str, cert: bool| MqttSettings {
        topic_prefix: prefix2.clone(),
        ..settings(tls_config(mtls_port, id, cert))
    };
    round_trip(m("mc", true), m("me", true)).await;
    // …without one, the handshake fails and is reported, no panic.
    let edge = EdgePublisher::spawn(m("nocert", false), "s1", "nocert");
    let le = edge.last_error.clone();
    wait_until("the handshake failure", Duration::from_secs(10), || le.lock().unwrap().is_some()).await;
    assert_eq!(edge.connects.load(std::sync::atomic::Ordering::Relaxed), 0);

    // Plain TCP to a TLS listener never connects either.
    let plain = EdgePublisher::spawn(
        fast(MqttSettings::new("127.0.0.1", broker.port, &format!("{prefix}-p"), &prefix)),
        "s1",
        "p",
    );
    let le = plain.last_error.clone();
    wait_until("the plain client's failure", Duration::from_secs(10), || le.lock().unwrap().is_some()).await;
    assert_eq!(plain.connects.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn tls_and_credential_mistakes_name_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let base = MqttConfig { host: Some("127.0.0.1".into()), tls: true, ..MqttConfig::default() };
    let e = MqttSettings::from_config(&base).unwrap_err().to_string();
    assert!(e.starts_with("mqtt.ca_file: required when tls = true"), "{e}");
    let e = MqttSettings::from_config(&MqttConfig { ca_file: Some(missing.clone()), ..base.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.starts_with(&format!("mqtt.ca_file: {}: cannot read", missing.display())), "{e}");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    let e =
        MqttSettings::from_config(&MqttConfig { ca_file: Some(junk.clone()), ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("mqtt.ca_file") && e.contains("junk.pem") && e.contains("no PEM certificate"), "{e}");
    let pki = make_pki(dir.path());
    // A key that is not the certificate's.
    let e = MqttSettings::from_config(&MqttConfig {
        ca_file: Some(pki.ca.clone()),
        client_cert_file: Some(pki.client_cert.clone()),
        client_key_file: Some(pki.server_key.clone()),
        ..base.clone()
    });
    let e = e.unwrap_err().to_string();
    assert!(e.starts_with("mqtt.client_key_file: ") && e.contains("does not go with client_cert_file"), "{e}");
    let e = MqttSettings::from_config(&MqttConfig {
        ca_file: Some(pki.ca.clone()),
        client_cert_file: Some(pki.client_cert.clone()),
        ..base.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("mqtt.client_key_file: "), "{e}");
    // Through the TOML parser the key is named in full.
    let e = TelemetryConfig::from_toml_str("[telemetry.mqtt]\nhost = \"h\"\ntls = true\n").unwrap_err().to_string();
    assert_eq!(
        e,
        "config <string>: telemetry.mqtt.ca_file: required when tls = true (the CA that signed the broker's certificate)"
    );
    let e =
        TelemetryConfig::from_toml_str("[telemetry.mqtt]\nhost = \"h\"\npassword = \"x\"\n").unwrap_err().to_string();
    assert!(e.contains("telemetry.mqtt.username"), "{e}");
    assert!(!e.contains("\"x\""), "{e}");
}

#[test]
fn debug_output_never_shows_the_password() {
    let toml = format!("[telemetry.mqtt]\nhost = \"127.0.0.1\"\nusername = \"edge\"\npassword = \"{PASSWORD}\"\n");
    let cfg = TelemetryConfig::from_toml_str(&toml).unwrap();
    assert_eq!(cfg.mqtt.password.as_ref().unwrap().expose(), PASSWORD);
    let settings = MqttSettings::from_config(&cfg.mqtt).unwrap().unwrap();
    for text in [
        format!("{cfg:?}"),
        format!("{cfg:#?}"),
        format!("{:?}", cfg.mqtt),
        format!("{settings:?}"),
        format!("{settings:#?}"),
        format!("{}", settings.password.as_ref().unwrap()),
    ] {
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
        assert!(!text.contains("hunter2"), "the password leaked: {text}");
    }
    assert!(format!("{settings:?}").contains("***"));
}

/// deploy/mosquitto/edge-site.conf and its ACL, with the paths swapped for
/// this test's: TLS and passwords required, each node confined to its own
/// topics, the controller reading all and commanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_site_broker_config_confines_each_node_to_its_own_topics() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let pwfile = dir.path().join("passwd");
    for (i, user) in ["controller", "gpu-node-1", "gpu-node-2"].iter().enumerate() {
        let mut c = Command::new(mosquitto_passwd());
        c.arg("-b");
        if i == 0 {
            c.arg("-c");
        }
        let status = c.arg(&pwfile).args([user.to_string(), format!("{user}-{PASSWORD}")]).status().unwrap();
        assert!(status.success(), "mosquitto_passwd failed: {status}");
    }
    world_readable(&pwfile);
    let acl = dir.path().join("acl");
    std::fs::copy(deploy.join("acl"), &acl).unwrap();
    world_readable(&acl);
    let original = std::fs::read_to_string(deploy.join("edge-site.conf")).unwrap();
    let broker = common::mosquitto_with(dir.path(), |port| {
        let swaps = [
            ("listener", format!("{port} 127.0.0.1")),
            ("cafile", pki.ca.display().to_string()),
            ("certfile", pki.server_cert.display().to_string()),
            ("keyfile", pki.server_key.display().to_string()),
            ("password_file", pwfile.display().to_string()),
            ("acl_file", acl.display().to_string()),
            ("persistence_location", format!("{}/", dir.path().display())),
            ("log_dest", "stderr".to_string()),
        ];
        let mut seen = BTreeSet::new();
        let conf: Vec<String> = original
            .lines()
            .map(|line| {
                let key = line.split_whitespace().next().unwrap_or_default();
                match swaps.iter().find(|(k, _)| *k == key) {
                    Some((k, v)) => {
                        seen.insert(*k);
                        format!("{k} {v}")
                    }
                    None => line.to_string(),
                }
            })
            .collect();
        assert_eq!(seen.len(), swaps.len(), "edge-site.conf lost one of {:?}", swaps.map(|s| s.0));
        for must in ["allow_anonymous false", "persistence true", "per_listener_settings false"] {
            assert!(conf.iter().any(|l| l == must), "edge-site.conf lacks {must:?}");
        }
        conf.join("\n") + "\n"
    });
    let user = |name: &str, client_id: &str| {
        fast(
            MqttSettings::from_config(&MqttConfig {
                host: Some("127.0.0.1".into()),
                port: broker.port,
                client_id: client_id.into(),
                username: Some(name.into()),
                password: Some(Secret::new(format!("{name}-{PASSWORD}"))),
                tls: true,
                ca_file: Some(pki.ca.clone()),
                ..MqttConfig::default()
            })
            .unwrap()
            .unwrap(),
        )
    };
    let (tx, mut rx) = mpsc::channel(64);
    let collector = MqttCollector::spawn(user("controller", "controller"), tx);
    let n1_cmd = "dynamollm/edge1/gpu-node-1/cmd".to_string();
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    let node1 = EdgePublisher::spawn_with(
        user("gpu-node-1", "gpu-node-1"),
        "edge1",
        "gpu-node-1",
        std::slice::from_ref(&n1_cmd),
        Some(cmd_tx),
    );
    // Node 1's credentials posing as node 3: its state and telemetry are refused.
    let forger = EdgePublisher::spawn(user("gpu-node-1", "forger"), "edge1", "gpu-node-3");
    let (spy_tx, mut spy_rx) = mpsc::unbounded_channel();
    let spy = EdgePublisher::spawn_with(
        user("gpu-node-2", "gpu-node-2"),
        "edge1",
        "gpu-node-2",
        std::slice::from_ref(&n1_cmd),
        Some(spy_tx),
    );
    let nodes = collector.nodes.clone();
    wait_until("node 1 to be alive", Duration::from_secs(15), || {
        nodes.lock().unwrap().contains_key(&("edge1".into(), "gpu-node-1".into()))
    })
    .await;
    let (fc, sc) = (forger.connects.clone(), spy.connects.clone());
    wait_until("the forger and the spy to connect", Duration::from_secs(15), || {
        fc.load(std::sync::atomic::Ordering::Relaxed) > 0 && sc.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    forger.publish(&payload(2)).await.unwrap();
    node1.publish(&payload(3)).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(&("gpu-node-1".to_string(), 103.0)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Sample::Gpu(g))) => seen.push((g.tags.node.clone().unwrap_or_default(), g.power_w)),
            Ok(Some(_)) => {}
            _ => panic!("node 1's telemetry never came; saw {seen:?}; {:?}", collector.stats.last_error()),
        }
    }
    // Anything the forger got through would have arrived by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(s) = rx.try_recv() {
        if let Sample::Gpu(g) = s {
            seen.push((g.tags.node.clone().unwrap_or_default(), g.power_w));
        }
    }
    assert!(seen.iter().all(|(n, _)| n == "gpu-node-1"), "forged telemetry got through: {seen:?}");
    assert!(!nodes.lock().unwrap().contains_key(&("edge1".into(), "gpu-node-3".into())), "a forged state got through");
    // Node 2's own state is its own to publish.
    assert!(nodes.lock().unwrap().contains_key(&("edge1".into(), "gpu-node-2".into())));

    // The controller commands node 1; node 2 cannot read node 1's commands.
    let (ctl, mut el) = rumqttc::AsyncClient::new(user("controller", "controller-cmd").options(), 16);
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    ctl.publish(&n1_cmd, rumqttc::QoS::AtLeastOnce, false, b"{\"hello\":1}".to_vec()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), cmd_rx.recv()).await.expect("node 1 gets its command");
    assert_eq!(got.unwrap().payload.as_ref(), b"{\"hello\":1}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(spy_rx.try_recv().is_err(), "node 2 read node 1's command");
    pump.abort();
}
