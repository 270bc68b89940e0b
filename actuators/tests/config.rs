//! `[actuators]` parsing and building: unknown keys refused, every key
//! documented in the module's example parses, bad values named.

use actuators::{build, ActuatorsConfig, AuditLog};
use std::sync::Arc;

fn audit(dir: &tempfile::TempDir) -> Arc<AuditLog> {
    Arc::new(AuditLog::open(&dir.path().join("a.redb")).unwrap())
}

#[tokio::test]
async fn a_full_config_builds_in_order() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("command.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    let cfg = ActuatorsConfig::from_toml(&format!(
        r#"
order = ["webhook", "exec", "mqtt"]
[exec]
spawn = "/bin/true"
retire = ["/bin/echo", "retire"]
timeout_ms = 5000
stderr_tail_chars = 100
[webhook]
url = "http://127.0.0.1:9/hook"
token = "tok-123"
attempts = 2
backoff_initial_ms = 10
backoff_max_ms = 100
timeout_ms = 1000
kinds = ["route"]
[mqtt]
client_id = "x-actuators"
ack_timeout_ms = 500
attempts = 2
default_node = "s/n"
kinds = ["set-clock"]
command_key_file = "{}"
heartbeat_interval_ms = 1000
"#,
        key.display()
    ))
    .unwrap();
    assert!(!format!("{cfg:?}").contains("tok-123"), "the token shows in Debug");
    let dir = tempfile::tempdir().unwrap();
    let settings = telemetry::mqtt::MqttSettings {
        keep_alive: std::time::Duration::from_secs(5),
        reconnect_initial: std::time::Duration::from_millis(100),
        reconnect_max: std::time::Duration::from_millis(100),
        ..telemetry::mqtt::MqttSettings::new("127.0.0.1", 1, "c", "p")
    };
    let d = build(&cfg, audit(&dir), Some(&settings)).unwrap();
    assert_eq!(d.backend_names(), ["webhook", "exec", "mqtt"]);
}

#[tokio::test]
async fn bad_configs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = ActuatorsConfig::from_toml("[exec]\nspwan = \"x\"").unwrap_err();
    assert!(e.to_string().contains("spwan"), "{e}");
    let e = ActuatorsConfig::from_toml("[nvml]\nmin_clock_mhz = 900\nmax_clock_mhz = 800\n").unwrap();
    let e = build(&e, audit(&dir), None).unwrap_err();
    assert!(e.to_string().contains("min_clock_mhz"), "{e}");
    let c = ActuatorsConfig::from_toml("[webhook]\nurl = \"http://x\"\nkinds = [\"spawnn\"]").unwrap();
    let e = build(&c, audit(&dir), None).unwrap_err();
    assert!(e.to_string().contains("actuators.webhook.kinds") && e.to_string().contains("spawnn"), "{e}");
    let c = ActuatorsConfig::from_toml("[mqtt]\n").unwrap();
    let e = build(&c, audit(&dir), None).unwrap_err();
    assert!(e.to_string().contains("[telemetry.mqtt]"), "{e}");
    // Commands to agents are signed unless the operator says otherwise, with a key long enough.
    let settings = telemetry::mqtt::MqttSettings::new("127.0.0.1", 1, "c", "p");
    let e = build(&c, audit(&dir), Some(&settings)).unwrap_err();
    assert!(e.to_string().contains("actuators.mqtt.command_key_file: required"), "{e}");
    let short = dir.path().join("short.key");
    std::fs::write(&short, "abc\n").unwrap();
    let c = ActuatorsConfig::from_toml(&format!("[mqtt]\ncommand_key_file = \"{}\"\n", short.display())).unwrap();
    let e = build(&c, audit(&dir), Some(&settings)).unwrap_err();
    assert!(e.to_string().contains("command_key_file") && e.to_string().contains("fewer than 32"), "{e}");
    let c = ActuatorsConfig::from_toml("order = [\"exec\", \"ssh\"]").unwrap();
    let e = build(&c, audit(&dir), None).unwrap_err();
    assert!(e.to_string().contains("ssh"), "{e}");
    let c =
        ActuatorsConfig::from_toml("[webhook]\nurl = \"http://x\"\ntoken_env = \"DYNAMOLLM_NO_SUCH_VAR_X\"").unwrap();
    let e = build(&c, audit(&dir), None).unwrap_err();
    assert!(e.to_string().contains("DYNAMOLLM_NO_SUCH_VAR_X"), "{e}");
    let c = ActuatorsConfig::from_toml("[exec]\nspawn = []").unwrap();
    let e = build(&c, audit(&dir), None).unwrap_err();
    assert!(e.to_string().contains("actuators.exec.spawn"), "{e}");
}

#[tokio::test]
async fn an_empty_config_builds_a_dispatcher_with_no_backends() {
    let dir = tempfile::tempdir().unwrap();
    let d = build(&ActuatorsConfig::default(), audit(&dir), None).unwrap();
    assert!(d.backend_names().is_empty());
}
