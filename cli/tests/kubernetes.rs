//! The Kubernetes example (deploy/kubernetes/): every manifest validates
//! against the Kubernetes 1.30 schemas (`kubernetes-validate --strict`,
//! which ships them: no network), the kustomization lists every manifest,
//! the configs in its ConfigMaps pass `dynamollm check` as the pods would
//! see them (the agent's as its initContainer writes it), every file they
//! name is under a volume the pod mounts, shellcheck finds nothing in the
//! scripts, and spawn.sh / retire.sh keep the exec backend's contract
//! against a fake `kubectl` that records its calls: the calls made, in
//! order, and the placement a spawn prints (through `ExecActuator` too).
//!
//! Needs `DYNAMOLLM_TEST_PYTHON` (a Python with `kubernetes_validate`) and
//! `DYNAMOLLM_TEST_SHELLCHECK`: `scripts/test` installs both.

use actuators::exec::{command_env, CommandLine, ExecActuator, ExecTemplates};
use actuators::{Action, ActionId, Actuator, Command, InstanceId, Outcome, Placement, PoolId, SpawnFrom};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_dynamollm");

fn kdir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy").join("kubernetes")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(kdir().join(name)).unwrap_or_else(|e| panic!("deploy/kubernetes/{name}: {e}"))
}

fn tool(var: &str, what: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: run the tests through scripts/test (it installs {what})"))
}

/// The manifests: every .yaml of deploy/kubernetes but the kustomization.
fn manifests() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(kdir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    names.sort();
    names
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let python = tool("DYNAMOLLM_TEST_PYTHON", "a Python with the kubernetes-validate package");
    let names = manifests();
    for expected in ["agent.yaml", "engines.yaml", "rbac.yaml", "service.yaml", "service-config.yaml"] {
        assert!(names.iter().any(|n| n == expected), "deploy/kubernetes/{expected} is missing");
    }
    let available = std::process::Command::new(&python)
        .args(["-c", "import kubernetes_validate"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        available.status.success(),
        "{python} has no kubernetes_validate module: run the tests through scripts/test (it pip-installs kubernetes-validate): {}",
        String::from_utf8_lossy(&available.stderr)
    );
    for name in &names {
        let out = std::process::Command::new(&python)
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.30.0"])
            .arg(kdir().join(name))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "deploy/kubernetes/{name} does not validate:\n{text}");
        // A resource it could not find a schema for passes with a warning: none here.
        assert!(!text.contains("WARN"), "deploy/kubernetes/{name}: {text}");
        assert!(text.contains("passed for resource"), "deploy/kubernetes/{name}: nothing validated:\n{text}");
    }
}

#[test]
fn the_validator_catches_a_misspelt_field() {
    // The check above can fail: a manifest with a field Kubernetes does not have is refused.
    let python = tool("DYNAMOLLM_TEST_PYTHON", "a Python with the kubernetes-validate package");
    let dir = tempfile::tempdir().unwrap();
    let bad = read("service.yaml").replacen("terminationGracePeriodSeconds:", "terminationGracePeriodSecs:", 1);
    let path = dir.path().join("service.yaml");
    std::fs::write(&path, bad).unwrap();
    let out = std::process::Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.30.0"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt field passed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("terminationGracePeriodSecs"));
}

#[test]
fn the_kustomization_lists_every_manifest_and_the_scripts() {
    let k = read("kustomization.yaml");
    let listed: Vec<String> = k
        .lines()
        .skip_while(|l| l.trim() != "resources:")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim_start()[2..].trim().to_string())
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, manifests(), "kustomization.yaml's resources are not the manifests of deploy/kubernetes");
    // The namespace goes first.
    assert_eq!(listed.first().map(String::as_str), Some("namespace.yaml"));
    for script in ["scripts/spawn.sh", "scripts/retire.sh"] {
        assert!(k.contains(&format!("- {script}")), "kustomization.yaml does not generate {script} into a ConfigMap");
        assert!(kdir().join(script).is_file());
    }
    assert!(read("service.yaml").contains("name: dynamollm-scripts"));
}

/// The literal block (`key: |`) whose line ends with `marker`, without its indentation.
fn block(yaml: &str, marker: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end().ends_with(marker))
        .unwrap_or_else(|| panic!("no line ending with {marker:?}"));
    let body = &lines[start + 1..];
    let indent =
        body.iter().find(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).expect("an empty block");
    let mut out = String::new();
    for l in body {
        if !l.trim().is_empty() && l.len() - l.trim_start().len() < indent {
            break;
        }
        out.push_str(l.get(indent..).unwrap_or(""));
        out.push('\n');
    }
    out
}

/// The `mountPath:` values of a manifest.
fn mount_paths(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix("mountPath:"))
        .map(|p| p.trim().trim_matches('"').to_string())
        .collect()
}

/// Every string value under a key naming a file or directory, with its dotted key.
fn paths_in(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::String(s) if k.ends_with("_file") || k.ends_with("_dir") => out.push((key, s.clone())),
                toml::Value::Table(_) => paths_in(&key, v, out),
                _ => {}
            }
        }
    }
}

/// Each file or directory the config names lies under a volume `yaml` mounts.
fn assert_mounted(config: &str, yaml_name: &str) -> Vec<(String, String)> {
    let doc: toml::Value = toml::Value::Table(config.parse().unwrap());
    let mut paths = Vec::new();
    paths_in("", &doc, &mut paths);
    let mounts = mount_paths(&read(yaml_name));
    for (key, p) in &paths {
        assert!(
            mounts.iter().any(|m| Path::new(p).starts_with(m)),
            "{key} = {p:?} is under none of {yaml_name}'s volume mounts {mounts:?}"
        );
    }
    paths
}

/// A CA certificate (PEM), for `ca_file`.
fn ca_pem() -> String {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "kubernetes test CA");
    ca.self_signed(&key).unwrap().pem()
}

const SECRET: &str = "3f9a1c0e5b7d2468ace13579bdf02468ace13579bdf02468ace13579bdf0246\n";

/// Puts the file the pod would see at `path` under `root`.
fn put(root: &Path, path: &str, text: &str) {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// The text with the pod's absolute paths moved under `root`.
fn rooted(text: &str, root: &Path) -> String {
    let r = root.display().to_string();
    text.replace("\"/etc/dynamollm/", &format!("\"{r}/etc/dynamollm/"))
        .replace("\"/var/lib/", &format!("\"{r}/var/lib/"))
        .replace("\"/opt/dynamollm/", &format!("\"{r}/opt/dynamollm/"))
}

/// `dynamollm check` of the file alone: the broker and endpoints it names are
/// cluster-internal names (`--offline`, where `check` would otherwise try them).
fn check(path: &Path) -> (bool, String) {
    static OFFLINE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let offline = *OFFLINE.get_or_init(|| {
        let help = std::process::Command::new(BIN).args(["check", "--help"]).output().unwrap();
        String::from_utf8_lossy(&help.stdout).contains("--offline")
    });
    let mut c = std::process::Command::new(BIN);
    c.arg("check");
    if offline {
        c.arg("--offline");
    }
    let out = c.arg("--config").arg(path).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_service_config_passes_check_as_the_pod_sees_it() {
    let config = block(&read("service-config.yaml"), "dynamollm.toml: |");
    assert!(config.contains("kind = \"external\""), "{config}");
    let paths = assert_mounted(&config, "service.yaml");
    let keys: Vec<&str> = paths.iter().map(|(k, _)| k.as_str()).collect();
    for k in [
        "service.token_file",
        "telemetry.mqtt.password_file",
        "telemetry.mqtt.ca_file",
        "actuators.mqtt.command_key_file",
    ] {
        assert!(keys.contains(&k), "{k} is not set: {keys:?}");
    }
    // The files the Secrets and ConfigMaps put there, as the pod sees them.
    let root = tempfile::tempdir().unwrap();
    for (key, p) in &paths {
        if key.ends_with("ca_file") {
            put(root.path(), p, &ca_pem());
        } else if key.ends_with("_file") {
            put(root.path(), p, SECRET);
        }
    }
    // The exec backend runs the scripts where service.yaml mounts them.
    let doc: toml::Table = config.parse().unwrap();
    let exec = doc["actuators"]["exec"].as_table().unwrap();
    let mounts = mount_paths(&read("service.yaml"));
    for (kind, script) in [("spawn", "spawn.sh"), ("retire", "retire.sh")] {
        let argv: Vec<&str> = exec[kind].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(argv.len(), 2, "{kind}: {argv:?}");
        assert_eq!(argv[0], "/bin/sh");
        let path = Path::new(argv[1]);
        assert_eq!(path.file_name().unwrap(), script);
        assert!(mounts.iter().any(|m| path.parent() == Some(Path::new(m))), "{kind}: {argv:?} is not under a mount");
        put(root.path(), argv[1], &read(&format!("scripts/{script}")));
    }
    let file = root.path().join("dynamollm.toml");
    std::fs::write(&file, rooted(&config, root.path())).unwrap();
    let (ok, out) = check(&file);
    assert!(ok, "dynamollm check refuses service-config.yaml's config:\n{out}");
    assert!(out.contains("external"), "{out}");
    assert!(out.contains("exec: spawn, retire"), "{out}");
    assert!(!out.contains("does not exist on this machine"), "{out}");
    // And it can fail: the same without the command key.
    std::fs::remove_file(root.path().join("etc/dynamollm/secrets/command-key/command-key")).unwrap();
    let (ok, out) = check(&file);
    assert!(!ok && out.contains("command_key_file"), "{out}");
}

/// The agent's initContainer script (agent.yaml), as the pod runs it.
fn agent_init_script() -> String {
    let yaml = read("agent.yaml");
    let init = &yaml[yaml.find("initContainers:").expect("agent.yaml has an initContainer")..];
    block(init, "- |")
}

#[test]
fn the_agent_config_its_init_container_writes_passes_check() {
    let template = block(&read("agent-config.yaml"), "dynamollm-agent.toml: |");
    assert!(template.contains("node = \"@NODE_NAME@\""), "{template}");
    let script = agent_init_script();
    let root = tempfile::tempdir().unwrap();
    // What the pod mounts: the template, this node's broker password, the command key, the CA.
    put(root.path(), "/etc/dynamollm/template/dynamollm-agent.toml", &template);
    put(root.path(), "/etc/dynamollm/secrets/mqtt/gpu-node-7", "node-7-password\n");
    std::fs::create_dir_all(root.path().join("etc/dynamollm/config")).unwrap();
    let run = |node: &str| {
        std::process::Command::new("sh")
            .args(["-c", &script.replace("/etc/dynamollm/", &format!("{}/etc/dynamollm/", root.path().display()))])
            .env("NODE_NAME", node)
            .output()
            .unwrap()
    };
    // A node without a password: refused, naming the Secret.
    let out = run("gpu-node-8");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dynamollm-agent-mqtt"));
    let out = run("gpu-node-7");
    assert!(out.status.success(), "the initContainer failed: {}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(root.path().join("etc/dynamollm/config/dynamollm-agent.toml")).unwrap();
    assert!(!written.contains("@NODE_NAME@"), "{written}");
    assert!(written.contains("node = \"gpu-node-7\""), "{written}");
    assert!(written.contains("username = \"gpu-node-7\""), "{written}");
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/dynamollm/config/mqtt-password")).unwrap(),
        "node-7-password\n"
    );
    // The agent container's mounts hold every file it names.
    let paths = assert_mounted(&written, "agent.yaml");
    for (key, p) in &paths {
        if key.ends_with("ca_file") {
            put(root.path(), p, &ca_pem());
        } else if key.ends_with("command_key_file") {
            put(root.path(), p, SECRET);
        }
    }
    let file = root.path().join("agent.toml");
    std::fs::write(&file, rooted(&written, root.path())).unwrap();
    let (ok, out) = check(&file);
    assert!(ok, "dynamollm check refuses the agent config of agent-config.yaml:\n{out}");
    assert!(out.contains("k8s/gpu-node-7"), "{out}");
    // The agent's site is the one spawn.sh reports placements under.
    assert!(read("service.yaml").contains("name: DYNAMOLLM_K8S_SITE\n              value: \"k8s\""));
}

#[test]
fn shellcheck_finds_nothing_in_the_scripts() {
    let shellcheck = tool("DYNAMOLLM_TEST_SHELLCHECK", "shellcheck");
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("agent-init.sh");
    std::fs::write(&init, format!("#!/bin/sh\n{}", agent_init_script())).unwrap();
    let out = std::process::Command::new(&shellcheck)
        .args(["--shell=sh", "--severity=style"])
        .arg(kdir().join("scripts/spawn.sh"))
        .arg(kdir().join("scripts/retire.sh"))
        .arg(&init)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shellcheck}: {e} (scripts/test installs shellcheck)"));
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it can fail.
    let bad = dir.path().join("bad.sh");
    std::fs::write(&bad, "#!/bin/sh\nrm -rf $1/\n").unwrap();
    let out = std::process::Command::new(&shellcheck).arg(&bad).output().unwrap();
    assert!(!out.status.success());
}

// ---- the scripts against a fake kubectl ----

/// A fake `kubectl` in a temporary directory: each call's arguments are
/// appended to `calls`; the first arm whose pattern is in the arguments
/// answers (its outputs in turn, the last one repeated; on stderr when its
/// exit code is not 0). A call no arm matches fails the script.
struct Kubectl {
    dir: tempfile::TempDir,
}

struct Arm {
    pattern: &'static str,
    outputs: Vec<String>,
    code: i32,
}

fn arm(pattern: &'static str, outputs: &[&str]) -> Arm {
    Arm { pattern, outputs: outputs.iter().map(|s| s.to_string()).collect(), code: 0 }
}

impl Kubectl {
    fn new(arms: Vec<Arm>) -> Kubectl {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let mut s = format!("#!/bin/sh\nprintf '%s\\n' \"$*\" >>'{d}/calls'\ncase \"$*\" in\n");
        for (i, a) in arms.iter().enumerate() {
            for text in std::iter::once(a.pattern).chain(a.outputs.iter().map(String::as_str)) {
                assert!(!text.contains('\''), "no single quotes in the fake's texts: {text}");
            }
            s += &format!("  *'{}'*)\n    n=$(cat '{d}/count{i}' 2>/dev/null || echo 0)\n", a.pattern);
            s += &format!("    echo $((n + 1)) >'{d}/count{i}'\n    case $n in\n");
            for (j, o) in a.outputs.iter().enumerate() {
                let out = if a.code == 0 { "" } else { " >&2" };
                let which = if j + 1 == a.outputs.len() { "*".to_string() } else { j.to_string() };
                s += &format!("      {which}) printf '%s' '{o}'{out} ;;\n");
            }
            s += &format!("    esac\n    exit {}\n    ;;\n", a.code);
        }
        s += "  *) echo \"fake kubectl: unexpected call: $*\" >&2; exit 3 ;;\nesac\n";
        // Written by a child process: an executable this process held open for
        // writing could be inherited by a fork in another test thread (ETXTBSY).
        let path = dir.path().join("kubectl");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "cat >\"$1\" && chmod 755 \"$1\"", "sh"])
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        Kubectl { dir }
    }

    /// PATH with the fake first.
    fn path(&self) -> String {
        format!("{}:{}", self.dir.path().display(), std::env::var("PATH").unwrap_or_default())
    }

    /// The calls made, each cut before its `-o` (the output format) and without `-n dynamollm`.
    fn ops(&self) -> Vec<String> {
        self.calls()
            .iter()
            .map(|c| {
                let c = c.strip_prefix("-n dynamollm ").unwrap_or_else(|| panic!("kubectl without -n dynamollm: {c}"));
                c.split(" -o ").next().unwrap().to_string()
            })
            .collect()
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default().lines().map(str::to_string).collect()
    }
}

fn spawn_cmd(instance: u32, pool: u32, tp: u32) -> Command {
    Command {
        id: ActionId(format!("a-spawn-{instance}")),
        action: Action::Spawn {
            instance: InstanceId(instance),
            pool: PoolId(pool),
            tp,
            clock_mhz: 1980,
            from: SpawnFrom::WarmStandby,
        },
        placement: None,
        issued_at_ms: 1,
    }
}

fn retire_cmd(instance: u32) -> Command {
    Command {
        id: ActionId(format!("a-retire-{instance}")),
        action: Action::Retire { instance: InstanceId(instance) },
        placement: Some(Placement {
            node: "k8s/gpu-node-3".into(),
            gpus: vec![],
            endpoint: Some("http://10.0.0.7:8000".into()),
        }),
        issued_at_ms: 1,
    }
}

/// The settings service.yaml gives the scripts, polling without pause.
const SETTINGS: [(&str, &str); 4] = [
    ("DYNAMOLLM_K8S_NAMESPACE", "dynamollm"),
    ("DYNAMOLLM_K8S_SITE", "k8s"),
    ("DYNAMOLLM_K8S_ENGINE_PREFIX", "vllm"),
    ("DYNAMOLLM_K8S_POLL_S", "0"),
];

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs a script as the exec backend does: the Command JSON on stdin, its
/// `command_env` variables, the fake kubectl first on PATH.
fn run_script(script: &str, cmd: &Command, kubectl: &Kubectl, extra: &[(&str, &str)]) -> Run {
    let mut c = std::process::Command::new("sh");
    c.arg(kdir().join("scripts").join(script))
        .env_clear()
        .env("PATH", kubectl.path())
        .envs(command_env(cmd))
        .envs(SETTINGS)
        .envs(extra.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let _ = child.stdin.take().unwrap().write_all(&serde_json::to_vec(cmd).unwrap());
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The placement on stdout's last non-empty line, checked as the contract says.
fn placement(stdout: &str) -> Placement {
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).expect("no stdout");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{last:?}: {e}"));
    let p = &v["placement"];
    assert!(p["node"].is_string() && p["gpus"].is_array() && p["endpoint"].is_string(), "{last}");
    serde_json::from_value(p.clone()).unwrap()
}

const NEW_POD: &str = "vllm-pool0-tp4-5d8f9-new";

/// A spawn of instance 7 in pool 0 at TP4: the Deployment has 1 replica; the
/// new pod appears on the second look (beside one being deleted, never
/// claimed), and is Ready on the second look at it.
fn spawn_arms() -> Vec<Arm> {
    vec![
        arm("get deployment vllm-pool0-tp4 -o jsonpath={.spec.replicas}", &["1"]),
        arm("get pods -l dynamollm.io/instance=7 ", &[""]),
        arm("scale deployment vllm-pool0-tp4 --current-replicas=1 --replicas=2", &["deployment.apps/vllm-pool0-tp4 scaled\n"]),
        arm(
            "get pods -l dynamollm.io/deployment=vllm-pool0-tp4,!dynamollm.io/instance ",
            &[
                "vllm-pool0-tp4-5d8f9-old|90|gpu-node-1|10.0.0.2|False|2030-01-01T00:00:00Z\n",
                "vllm-pool0-tp4-5d8f9-old|90|gpu-node-1|10.0.0.2|False|2030-01-01T00:00:00Z\nvllm-pool0-tp4-5d8f9-new|4242|||False|\n",
            ],
        ),
        arm("label pod vllm-pool0-tp4-5d8f9-new dynamollm.io/instance=7 --resource-version=4242", &["pod/x labeled\n"]),
        arm(
            "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
            &["vllm-pool0-tp4-5d8f9-new|4250|gpu-node-3||False|\n", "vllm-pool0-tp4-5d8f9-new|4260|gpu-node-3|10.0.0.7|True|\n"],
        ),
    ]
}

const SPAWN_OPS: [&str; 8] = [
    "get deployment vllm-pool0-tp4",
    "get pods -l dynamollm.io/instance=7",
    "scale deployment vllm-pool0-tp4 --current-replicas=1 --replicas=2",
    "get pods -l dynamollm.io/deployment=vllm-pool0-tp4,!dynamollm.io/instance",
    "get pods -l dynamollm.io/deployment=vllm-pool0-tp4,!dynamollm.io/instance",
    "label pod vllm-pool0-tp4-5d8f9-new dynamollm.io/instance=7 --resource-version=4242",
    "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
    "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
];

#[test]
fn spawn_scales_up_claims_the_new_pod_and_prints_its_placement() {
    let k = Kubectl::new(spawn_arms());
    let r = run_script("spawn.sh", &spawn_cmd(7, 0, 4), &k, &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(k.ops(), SPAWN_OPS);
    // The pods are read with the fields the script parses.
    assert!(k.calls()[1].contains("-o jsonpath={range .items[*]}{.metadata.name}{\"|\"}"), "{:?}", k.calls());
    let p = placement(&r.stdout);
    assert_eq!(
        p,
        Placement { node: "k8s/gpu-node-3".into(), gpus: vec![], endpoint: Some("http://10.0.0.7:8000".into()) }
    );
    assert!(r.stdout.trim_end().ends_with(&format!("\"detail\": \"pod {NEW_POD} of deployment vllm-pool0-tp4\"}}")));
}

#[test]
fn the_exec_backend_takes_the_scripts_placement() {
    let k = Kubectl::new(spawn_arms());
    let script = kdir().join("scripts");
    let settings: String = SETTINGS.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    let line = |name: &str| {
        CommandLine::Shell(format!("PATH='{}' {settings}exec sh '{}'", k.path(), script.join(name).display()))
    };
    let templates =
        ExecTemplates { spawn: Some(line("spawn.sh")), retire: Some(line("retire.sh")), ..Default::default() };
    let exec = ExecActuator::new(templates, Duration::from_secs(60), 2000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match rt.block_on(exec.apply(&spawn_cmd(7, 0, 4))) {
        Outcome::Applied { placement: Some(p), detail } => {
            assert_eq!(p.node, "k8s/gpu-node-3");
            assert_eq!(p.endpoint.as_deref(), Some("http://10.0.0.7:8000"));
            assert!(detail.contains(NEW_POD), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(k.ops(), SPAWN_OPS);

    let k = Kubectl::new(retire_arms(&[RETIRED_READY], &[RETIRED_READY_AND_OTHER], &["pod/x\n", ""]));
    let line = |name: &str| {
        CommandLine::Shell(format!("PATH='{}' {settings}exec sh '{}'", k.path(), script.join(name).display()))
    };
    let templates = ExecTemplates { retire: Some(line("retire.sh")), ..Default::default() };
    let exec = ExecActuator::new(templates, Duration::from_secs(60), 2000);
    match rt.block_on(exec.apply(&retire_cmd(7))) {
        Outcome::Applied { .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(k.ops().iter().any(|o| o.starts_with("scale deployment vllm-pool0-tp4")), "{:?}", k.ops());
}

#[test]
fn a_spawn_tried_again_finds_its_pod_and_scales_nothing() {
    let k = Kubectl::new(vec![
        arm("get deployment vllm-pool0-tp4 -o jsonpath={.spec.replicas}", &["2"]),
        arm("get pods -l dynamollm.io/instance=7 ", &["vllm-pool0-tp4-5d8f9-new|4250|gpu-node-3||False|\n"]),
        arm(
            "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
            &["vllm-pool0-tp4-5d8f9-new|4260|gpu-node-3|fd00::7|True|\n"],
        ),
    ]);
    let r = run_script("spawn.sh", &spawn_cmd(7, 0, 4), &k, &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(
        k.ops(),
        [
            "get deployment vllm-pool0-tp4",
            "get pods -l dynamollm.io/instance=7",
            "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found"
        ]
    );
    // An IPv6 pod address is bracketed.
    assert_eq!(placement(&r.stdout).endpoint.as_deref(), Some("http://[fd00::7]:8000"));
}

#[test]
fn a_spawn_without_its_deployment_fails_naming_it() {
    let k = Kubectl::new(vec![Arm {
        pattern: "get deployment vllm-pool3-tp8 ",
        outputs: vec!["Error from server (NotFound): deployments.apps \"vllm-pool3-tp8\" not found\n".into()],
        code: 1,
    }]);
    let r = run_script("spawn.sh", &spawn_cmd(9, 3, 8), &k, &[]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("no Deployment vllm-pool3-tp8 in namespace dynamollm"), "{}", r.stderr);
    assert!(r.stdout.trim().is_empty(), "{}", r.stdout);
    assert_eq!(k.ops(), ["get deployment vllm-pool3-tp8"]);
}

#[test]
fn a_spawn_refuses_what_is_not_an_exec_spawn() {
    let k = Kubectl::new(vec![]);
    let mut cmd = spawn_cmd(7, 0, 4);
    cmd.action = Action::Retire { instance: InstanceId(7) };
    let r = run_script("spawn.sh", &cmd, &k, &[]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("DYNAMOLLM_POOL"), "{}", r.stderr);
    assert!(k.calls().is_empty());
}

#[test]
fn a_spawn_past_its_timeout_gives_the_pod_back() {
    // The claimed pod is never Ready: with a timeout of 0 s the spawn gives
    // up at once and retires the pod it claimed (retire.sh: annotate, scale down).
    let k = Kubectl::new(vec![
        // spawn.sh reads 1 replica, retire.sh 2.
        arm("get deployment vllm-pool0-tp4 -o jsonpath={.spec.replicas}", &["1", "2"]),
        arm(RETIRE_BY_INSTANCE, &[RETIRED_STARTING]),
        arm("get pods -l dynamollm.io/instance=7 ", &[""]),
        arm("scale deployment vllm-pool0-tp4 --current-replicas=1 --replicas=2", &["scaled\n"]),
        arm(
            "get pods -l dynamollm.io/deployment=vllm-pool0-tp4,!dynamollm.io/instance ",
            &["vllm-pool0-tp4-5d8f9-new|4242|||False|\n"],
        ),
        arm("label pod vllm-pool0-tp4-5d8f9-new dynamollm.io/instance=7 --resource-version=4242", &["labeled\n"]),
        arm("get pods -l dynamollm.io/deployment=vllm-pool0-tp4 -o", &[RETIRED_STARTING]),
        arm("annotate pod vllm-pool0-tp4-5d8f9-new", &["annotated\n"]),
        arm("scale deployment vllm-pool0-tp4 --current-replicas=2 --replicas=1", &["scaled\n"]),
        arm("get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found -o name", &[""]),
    ]);
    let r = run_script("spawn.sh", &spawn_cmd(7, 0, 4), &k, &[("DYNAMOLLM_K8S_SPAWN_TIMEOUT_S", "0")]);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    assert!(r.stdout.trim().is_empty(), "a failed spawn printed {}", r.stdout);
    assert!(r.stderr.contains("no Ready pod of vllm-pool0-tp4 within 0 s"), "{}", r.stderr);
    assert_eq!(
        k.ops(),
        [
            "get deployment vllm-pool0-tp4",
            "get pods -l dynamollm.io/instance=7",
            "scale deployment vllm-pool0-tp4 --current-replicas=1 --replicas=2",
            "get pods -l dynamollm.io/deployment=vllm-pool0-tp4,!dynamollm.io/instance",
            "label pod vllm-pool0-tp4-5d8f9-new dynamollm.io/instance=7 --resource-version=4242",
            // retire.sh
            "get pods -l dynamollm.io/instance=7",
            "get pods -l dynamollm.io/deployment=vllm-pool0-tp4",
            "annotate pod vllm-pool0-tp4-5d8f9-new controller.kubernetes.io/pod-deletion-cost=-1000 dynamollm.io/retiring=a-spawn-7 --overwrite --resource-version=4250",
            "get deployment vllm-pool0-tp4",
            "scale deployment vllm-pool0-tp4 --current-replicas=2 --replicas=1",
            "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
        ]
    );
}

/// retire.sh's look for the instance's pod (its fields: name|rv|Deployment|retiring|Ready|deleting).
const RETIRE_BY_INSTANCE: &str =
    "get pods -l dynamollm.io/instance=7 -o jsonpath={range .items[*]}{.metadata.name}{\"|\"}{.metadata.resourceVersion}{\"|\"}{.metadata.labels";
const RETIRED_READY: &str = "vllm-pool0-tp4-5d8f9-new|4250|vllm-pool0-tp4||True|\n";
const RETIRED_STARTING: &str = "vllm-pool0-tp4-5d8f9-new|4250|vllm-pool0-tp4||False|\n";
const RETIRED_READY_AND_OTHER: &str =
    "vllm-pool0-tp4-5d8f9-new|4250|vllm-pool0-tp4||True|\nvllm-pool0-tp4-5d8f9-abc|3000|vllm-pool0-tp4||True|\n";

/// A retire of instance 7: its pod and the Deployment's pods as given, 2 replicas.
fn retire_arms(by_instance: &[&str], by_deployment: &[&str], gone: &[&str]) -> Vec<Arm> {
    vec![
        arm(RETIRE_BY_INSTANCE, by_instance),
        arm("get pods -l dynamollm.io/deployment=vllm-pool0-tp4 -o", by_deployment),
        arm("annotate pod vllm-pool0-tp4-5d8f9-new", &["pod/vllm-pool0-tp4-5d8f9-new annotated\n"]),
        arm("get deployment vllm-pool0-tp4 -o jsonpath={.spec.replicas}", &["2"]),
        arm(
            "scale deployment vllm-pool0-tp4 --current-replicas=2 --replicas=1",
            &["deployment.apps/vllm-pool0-tp4 scaled\n"],
        ),
        arm("get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found -o name", gone),
    ]
}

#[test]
fn retire_marks_the_pod_cheapest_then_scales_down_and_waits_for_it() {
    let k = Kubectl::new(retire_arms(
        &[RETIRED_READY],
        &[RETIRED_READY_AND_OTHER],
        &["pod/vllm-pool0-tp4-5d8f9-new\n", ""],
    ));
    let r = run_script("retire.sh", &retire_cmd(7), &k, &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(
        k.ops(),
        [
            "get pods -l dynamollm.io/instance=7",
            "get pods -l dynamollm.io/deployment=vllm-pool0-tp4",
            // The pod the ReplicaSet should take, only if it is unchanged since read.
            "annotate pod vllm-pool0-tp4-5d8f9-new controller.kubernetes.io/pod-deletion-cost=-1000 dynamollm.io/retiring=a-retire-7 --overwrite --resource-version=4250",
            "get deployment vllm-pool0-tp4",
            "scale deployment vllm-pool0-tp4 --current-replicas=2 --replicas=1",
            "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
            "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
        ]
    );
    assert!(r.stderr.contains("is gone"), "{}", r.stderr);
}

#[test]
fn retire_waits_while_another_pod_is_starting() {
    // The ReplicaSet would take a pod that is not Ready before the cheapest Ready one.
    let starting =
        "vllm-pool0-tp4-5d8f9-new|4250|vllm-pool0-tp4||True|\nvllm-pool0-tp4-5d8f9-abc|3000|vllm-pool0-tp4||False|\n";
    let k = Kubectl::new(retire_arms(&[RETIRED_READY], &[starting, RETIRED_READY_AND_OTHER], &[""]));
    let r = run_script("retire.sh", &retire_cmd(7), &k, &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let ops = k.ops();
    let look = ["get pods -l dynamollm.io/instance=7", "get pods -l dynamollm.io/deployment=vllm-pool0-tp4"];
    assert_eq!(ops[..4].to_vec(), [look, look].concat(), "{ops:?}");
    assert!(ops[4].starts_with("annotate pod vllm-pool0-tp4-5d8f9-new"), "{ops:?}");
    assert!(r.stderr.contains("vllm-pool0-tp4-5d8f9-abc"), "{}", r.stderr);

    // Never Ready within the timeout: retryable, nothing annotated or scaled.
    let k = Kubectl::new(retire_arms(&[RETIRED_READY], &[starting], &[""]));
    let r = run_script("retire.sh", &retire_cmd(7), &k, &[("DYNAMOLLM_K8S_RETIRE_TIMEOUT_S", "0")]);
    assert_eq!(r.code, Some(75), "stderr: {}", r.stderr);
    assert!(k.ops().iter().all(|o| o.starts_with("get ")), "{:?}", k.ops());
}

#[test]
fn a_retire_tried_again_does_not_scale_down_twice() {
    let annotated = "vllm-pool0-tp4-5d8f9-new|4251|vllm-pool0-tp4|a-retire-7|True|\n";
    let k = Kubectl::new(retire_arms(&[annotated], &[RETIRED_READY_AND_OTHER], &["pod/x\n", ""]));
    let r = run_script("retire.sh", &retire_cmd(7), &k, &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(
        k.ops(),
        [
            "get pods -l dynamollm.io/instance=7",
            "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
            "get pod vllm-pool0-tp4-5d8f9-new --ignore-not-found",
        ]
    );
}

#[test]
fn retiring_an_instance_without_a_pod_is_done() {
    let k = Kubectl::new(retire_arms(&[""], &[""], &[""]));
    let r = run_script("retire.sh", &retire_cmd(7), &k, &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(k.ops(), ["get pods -l dynamollm.io/instance=7"]);
}
