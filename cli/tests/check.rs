//! `dynamollm check --config F` as an operator runs it: a good agent config
//! against the real Mosquitto of `scripts/test` and a `twin serve` engine
//! passes; each kind of problem (a missing file, a wrong type, an
//! out-of-range value, an unreachable broker, an engine endpoint that is not
//! there or is not an engine) is named with its key, exit 2.

mod twin_engine;

use std::path::Path;
use std::process::Output;

const BIN: &str = env!("CARGO_BIN_EXE_dynamollm");

fn broker() -> (String, u16) {
    let hp = std::env::var("DYNAMOLLM_TEST_MQTT").unwrap_or_else(|_| {
        panic!("DYNAMOLLM_TEST_MQTT is not set: run the tests through scripts/test (it installs and starts Mosquitto)")
    });
    let (h, p) = hp.rsplit_once(':').expect("host:port");
    (h.to_string(), p.parse().unwrap())
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn check(dir: &Path, text: &str) -> Output {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    std::process::Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap()
}

fn agent_config(dir: &Path, mqtt_port: u16, engine_url: &str, twin: &str) -> String {
    let key = dir.join("command.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    let (host, _) = broker();
    format!(
        "[agent]\nsite = \"s\"\nnode = \"n\"\ngpu = \"twin\"\ntwin_url = \"{twin}\"\nengine_url = \"{engine_url}\"\n\
         interval_s = 1.0\nstate_file = \"{}\"\ncommand_key_file = \"{}\"\n[agent.mqtt]\nhost = \"{host}\"\nport = {mqtt_port}\n",
        dir.join("applied.json").display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_kind_of_problem_and_passes_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let engine = twin_engine::start(4, 1.0, "llama-2-70b").await;
    let (_, port) = broker();
    let good = agent_config(dir.path(), port, &format!("{engine}/metrics"), &engine);
    let run = |text: String| {
        let d = dir.path().to_path_buf();
        tokio::task::block_in_place(move || check(&d, &text))
    };
    let out = run(good.clone());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("no problem found"), "{stdout}");

    let cases: Vec<(&str, String, &str)> = vec![
        ("a missing file", good.replace("command.key", "no-such.key"), "agent.command_key_file"),
        ("a wrong type", good.replace("interval_s = 1.0", "interval_s = \"fast\""), "interval_s"),
        ("an out-of-range value", good.replace("interval_s = 1.0", "interval_s = 1e300"), "interval_s"),
        (
            "an unreachable broker",
            good.replace(&format!("port = {port}"), &format!("port = {}", closed_port())),
            "agent.mqtt.host: cannot connect to the broker",
        ),
        (
            "an engine endpoint with nothing there",
            good.replace(&format!("{engine}/metrics"), &format!("http://127.0.0.1:{}/metrics", closed_port())),
            "agent.engine_url",
        ),
        (
            "an endpoint that is not an engine's page",
            good.replace(&format!("{engine}/metrics"), &format!("{engine}/v1/models")),
            "no vLLM or SGLang metrics",
        ),
    ];
    for (what, text, named) in cases {
        let out = run(text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(stderr.contains(named), "{what}: the error does not name {named:?}:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
    // --offline checks the file only: the unreachable broker is not tried.
    let path = dir.path().join("offline.toml");
    std::fs::write(&path, good.replace(&format!("port = {port}"), &format!("port = {}", closed_port()))).unwrap();
    let out = std::process::Command::new(BIN).args(["check", "--offline", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_service_config_names_its_unreachable_broker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.toml");
    std::fs::write(
        &path,
        format!(
            "[service]\ntoken = \"t0123456789\"\nstate_dir = \"{}\"\n[cluster]\nkind = \"twin\"\n\
             [telemetry.mqtt]\nhost = \"127.0.0.1\"\nport = {}\n",
            dir.path().join("state").display(),
            closed_port()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("telemetry.mqtt.host: cannot connect to the broker 127.0.0.1:"), "{stderr}");
}
