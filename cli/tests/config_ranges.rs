//! Every numeric setting of the shipped configs is range-checked: each number
//! of deploy/dynamollm.toml (the service's) and deploy/dynamollm-agent.toml
//! (the agent's), the set ones and the commented-out examples alike, set in
//! turn to 0, -1, 1e-10 and 1e300 makes `dynamollm check --config` exit 2
//! with an error naming the key, never a panic; only the pairs of
//! [`ALLOWED`], where the value means something, pass. The shipped files
//! themselves pass (with the files they name made here), and so does each of
//! their commented-out examples. Numeric flags are checked by clap.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_dynamollm");

/// The values every number is set to.
const VALUES: [&str; 4] = ["0", "-1", "1e-10", "1e300"];

/// (dotted key, value) pairs that `check` accepts, each with why it means something.
const ALLOWED: [(&str, &str, &str); 20] = [
    ("cluster.seed", "0", "a seed like any other"),
    ("controller.spawn_lead_s", "0", "engines that serve as soon as spawned (warm standby)"),
    ("controller.spawn_lead_s", "1e-10", "a lead time ≥ 0, however short"),
    ("controller.retire_min_age_s", "0", "documented: no minimum age"),
    ("controller.retire_min_age_s", "1e-10", "a minimum age ≥ 0, however short"),
    ("controller.clock_down_sigmas", "0", "documented: the load seen now only"),
    ("controller.clock_down_sigmas", "1e-10", "a margin ≥ 0, however small"),
    ("controller.mix_hysteresis", "0", "documented: the spawn's cost alone decides"),
    ("controller.mix_hysteresis", "1e-10", "a share in [0, 1), however small"),
    ("cluster.scrape_interval_s", "0", "documented: no scraping, engine telemetry over MQTT only"),
    ("actuators.nvml.min_clock_mhz", "0", "documented: the GPU's lowest clock"),
    ("actuators.exec.stderr_tail_chars", "0", "documented: a failure quotes no stderr (it may hold secrets)"),
    ("service.initial_class_rps.SS", "0", "a class expected to be idle at first"),
    ("service.initial_class_rps.SS", "1e-10", "a rate ≥ 0, however small"),
    ("cost.default_usd_per_kwh", "0", "energy that costs nothing (own generation)"),
    ("cost.default_usd_per_kwh", "1e-10", "a price ≥ 0, however small"),
    ("sci.embodied_kg_per_server", "0", "no embodied emissions counted"),
    ("sci.embodied_kg_per_server", "1e-10", "embodied emissions ≥ 0, however small"),
    ("objective.carbon_usd_per_t", "0", "carbon priced at nothing"),
    ("objective.carbon_usd_per_t", "1e-10", "a carbon price ≥ 0, however small"),
];

/// The other classes of `service.initial_class_rps`'s example accept what SS does.
fn allowed(key: &str, value: &str) -> bool {
    let key = match key.strip_prefix("service.initial_class_rps.") {
        Some(_) => "service.initial_class_rps.SS",
        None => key,
    };
    ALLOWED.iter().any(|(k, v, _)| *k == key && *v == value)
}

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy").join(name)
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn check(path: &Path) -> Output {
    Command::new(BIN).args(["check", "--offline", "--config"]).arg(path).output().unwrap()
}

/// The files the shipped configs name, made in `dir`: a CA and a client
/// certificate with its key (PEM), the bundled profile, secrets.
struct Fixtures {
    dir: PathBuf,
    by_key: BTreeMap<&'static str, PathBuf>,
}

impl Fixtures {
    fn new(dir: &Path) -> Fixtures {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "config_ranges test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client.distinguished_name.push(DnType::CommonName, "gpu-node-1");
        let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let secret = write("secret", "3f9a1c0e5b7d2468ace13579bdf02468ace13579bdf02468ace13579bdf0246\n");
        let mut by_key = BTreeMap::new();
        by_key.insert("ca_file", write("ca.pem", &ca_cert.pem()));
        by_key.insert("client_cert_file", write("client.pem", &client_cert.pem()));
        by_key.insert("client_key_file", write("client.key", &client_key.serialize_pem()));
        let profile = std::fs::read_to_string(repo("profiles/llama2-70b-h100.csv")).unwrap();
        by_key.insert("profile", write("profile.csv", &profile));
        by_key.insert("physics", repo("profiles/twin/llama2-70b-h100.toml"));
        by_key.insert("state_file", dir.join("agent-state").join("applied.json"));
        for k in ["token_file", "password_file", "command_key_file", "client_keys_file"] {
            by_key.insert(k, secret.clone());
        }
        Fixtures { dir: dir.to_path_buf(), by_key }
    }

    /// The file for a key naming one: its fixture, or (any other `*_file`) the secret.
    fn for_key(&self, key: &str) -> Option<&Path> {
        match self.by_key.get(key) {
            Some(p) => Some(p),
            None if key.ends_with("_file") => Some(&self.by_key["token_file"]),
            None => None,
        }
    }

    /// The text with every path the configs name (set or in an example) pointing at a fixture,
    /// and the directories the service would write under this test's directory.
    fn substitute(&self, text: &str) -> String {
        let mut out = String::new();
        for line in text.lines() {
            let mut line = line.to_string();
            if let Some((indent, commented, key, _)) = key_line(&line) {
                let path = match key.as_str() {
                    "state_dir" | "data_dir" | "spool_dir" => Some(self.dir.join(&key)),
                    k => self.for_key(k).map(Path::to_path_buf),
                };
                let is_string = line.split_once('=').is_some_and(|(_, v)| v.trim_start().starts_with('"'));
                if let (Some(p), true) = (path, is_string) {
                    let hash = if commented { "# " } else { "" };
                    line = format!("{indent}{hash}{key} = {:?}", p.display().to_string());
                }
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

/// `key = value` on a line, set or commented out (`# key = value`, a valid TOML
/// pair once uncommented): (indent, commented, key, value).
fn key_line(line: &str) -> Option<(String, bool, String, toml::Value)> {
    let indent: String = line.chars().take_while(|c| c.is_whitespace()).collect();
    let rest = line.trim_start();
    let (commented, body) = match rest.strip_prefix('#') {
        Some(b) => (true, b.trim_start()),
        None => (false, rest),
    };
    let key: String = body.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').collect();
    if key.is_empty() || !body[key.len()..].trim_start().starts_with('=') {
        return None;
    }
    let t: toml::Table = body.parse().ok()?;
    let value = t.get(&key)?.clone();
    (t.len() == 1).then_some((indent, commented, key, value))
}

/// A table header, set or commented out: (commented, name).
fn header(line: &str) -> Option<(bool, String)> {
    let rest = line.trim_start();
    let (commented, body) = match rest.strip_prefix('#') {
        Some(b) => (true, b.trim_start()),
        None => (false, rest),
    };
    let body = body.strip_prefix('[')?;
    let (name, after) = body.split_once(']')?;
    let after = after.trim_start();
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && (after.is_empty() || after.starts_with('#'));
    ok.then(|| (commented, name.to_string()))
}

/// One number of a config file: where it is and how to change it.
#[derive(Debug, Clone)]
struct Number {
    /// Dotted key (`telemetry.mqtt.port`, `service.initial_class_rps.SS`, `controller.tps`).
    key: String,
    /// What the error must name: the key's last part (the array's key for an element).
    leaf: String,
    /// The line it is on.
    line: usize,
    /// Whether the line is commented out.
    commented: bool,
    /// Its path inside the line's value (empty: the value itself).
    inner: Vec<Step>,
    /// Whether it is an integer.
    integer: bool,
    /// The lines of its commented-out table (header and examples), to uncomment with it.
    block: Vec<usize>,
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn numbers_in(v: &toml::Value, path: &mut Vec<Step>, out: &mut Vec<(Vec<Step>, bool)>) {
    match v {
        toml::Value::Integer(_) => out.push((path.clone(), true)),
        toml::Value::Float(_) => out.push((path.clone(), false)),
        toml::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(Step::Index(i));
                numbers_in(x, path, out);
                path.pop();
            }
        }
        toml::Value::Table(t) => {
            for (k, x) in t {
                path.push(Step::Key(k.clone()));
                numbers_in(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Every number of the text, set or in a commented-out example.
fn numbers(text: &str) -> Vec<Number> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut table = String::new();
    let mut block: Option<Vec<usize>> = None;
    // The commented-out tables' example lines, found first.
    let mut blocks: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut open: Option<usize> = None;
    for (i, l) in lines.iter().enumerate() {
        if let Some((commented, _)) = header(l) {
            open = commented.then_some(i);
            if commented {
                blocks.insert(i, vec![i]);
            }
        } else if let (Some(h), Some(_)) = (open, key_line(l)) {
            blocks.get_mut(&h).unwrap().push(i);
        }
    }
    for (i, l) in lines.iter().enumerate() {
        if let Some((commented, name)) = header(l) {
            table = name;
            block = if commented { blocks.get(&i).cloned() } else { None };
            continue;
        }
        let Some((_, commented, key, value)) = key_line(l) else { continue };
        let mut found = Vec::new();
        numbers_in(&value, &mut Vec::new(), &mut found);
        for (inner, integer) in found {
            let mut dotted = format!("{table}.{key}");
            let mut leaf = key.clone();
            for s in &inner {
                if let Step::Key(k) = s {
                    dotted = format!("{dotted}.{k}");
                    leaf = k.clone();
                }
            }
            out.push(Number {
                key: dotted,
                leaf,
                line: i,
                commented,
                inner,
                integer,
                block: block.clone().unwrap_or_default(),
            });
        }
    }
    out
}

fn uncomment(line: &str) -> String {
    let t = line.trim_start();
    t.strip_prefix('#').map_or(t, str::trim_start).to_string()
}

/// The text with `n` set to `value` (its line, and its table when commented out, uncommented).
fn with_value(text: &str, n: &Number, value: Option<&str>) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for &b in &n.block {
        lines[b] = uncomment(&lines[b]);
    }
    let (_, _, key, mut v) = key_line(&lines[n.line]).unwrap();
    if let Some(value) = value {
        let literal = match (n.integer, value) {
            (false, "0") => "0.0",
            (false, "-1") => "-1.0",
            (_, v) => v,
        };
        let new: toml::Value = format!("x = {literal}").parse::<toml::Table>().unwrap()["x"].clone();
        let mut at = &mut v;
        for s in &n.inner {
            at = match s {
                Step::Key(k) => at.get_mut(k.as_str()).unwrap(),
                Step::Index(i) => at.get_mut(*i).unwrap(),
            };
        }
        *at = new;
    }
    lines[n.line] = format!("{key} = {v}");
    lines.join("\n") + "\n"
}

/// Every numeric leaf of a parsed document, dotted (array elements under the array's key).
fn leaves(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Integer(_) | toml::Value::Float(_) => {
            out.insert(prefix.to_string());
        }
        toml::Value::Array(a) => a.iter().for_each(|x| leaves(prefix, x, out)),
        toml::Value::Table(t) => {
            for (k, x) in t {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaves(&p, x, out);
            }
        }
        _ => {}
    }
}

/// Check one shipped config: it passes, each example passes, each number out of range fails.
/// Returns the failures (empty: all well) and the (key, value) pairs that passed.
fn sweep(name: &str, fixtures: &Fixtures) -> (Vec<String>, BTreeSet<(String, String)>) {
    let shipped = fixtures.substitute(&std::fs::read_to_string(deploy(name)).unwrap());
    let dir = fixtures.dir.join(name.replace('.', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    let mut failures = Vec::new();
    let mut passed = BTreeSet::new();

    std::fs::write(&file, &shipped).unwrap();
    let o = check(&file);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(0), "{name} as shipped does not pass check:\n{err}");
    assert!(!err.contains("panicked"), "{err}");

    let nums = numbers(&shipped);
    // The line scan saw every number TOML sees in the file.
    let mut seen = BTreeSet::new();
    leaves("", &toml::Value::Table(shipped.parse::<toml::Table>().unwrap()), &mut seen);
    let scanned: BTreeSet<String> =
        nums.iter().filter(|n| !n.commented && n.block.is_empty()).map(|n| n.key.clone()).collect();
    for k in &seen {
        assert!(scanned.contains(k), "{name}: the line scan missed {k} (scanned {scanned:?})");
    }
    assert!(nums.len() >= seen.len(), "{name}: {} numbers found, {} in the parsed file", nums.len(), seen.len());

    let examples = nums.iter().filter(|n| n.commented).count();
    eprintln!("{name}: {} numbers ({examples} in commented-out examples), each tried at {VALUES:?}", nums.len());
    for n in &nums {
        // The example as shown passes.
        if n.commented {
            std::fs::write(&file, with_value(&shipped, n, None)).unwrap();
            let o = check(&file);
            let err = String::from_utf8_lossy(&o.stderr);
            if o.status.code() != Some(0) {
                failures.push(format!("{name}: the example {} as shown fails: {err}", n.key));
            }
        }
        for value in VALUES {
            std::fs::write(&file, with_value(&shipped, n, Some(value))).unwrap();
            let o = check(&file);
            let err = String::from_utf8_lossy(&o.stderr);
            let what = format!("{name}: {} = {value}", n.key);
            if err.contains("panicked") {
                failures.push(format!("{what}: a panic: {err}"));
                continue;
            }
            match (o.status.code(), allowed(&n.key, value)) {
                (Some(0), true) => {
                    passed.insert((n.key.clone(), value.to_string()));
                }
                (Some(0), false) => failures.push(format!("{what}: accepted (exit 0)")),
                (Some(2), false) if err.contains(&n.leaf) => {}
                (Some(2), false) => failures.push(format!("{what}: the error does not name `{}`: {err}", n.leaf)),
                (code, true) => failures.push(format!("{what}: meaningful, yet refused ({code:?}): {err}")),
                (code, false) => failures.push(format!("{what}: exit {code:?}, not 2: {err}")),
            }
        }
    }
    (failures, passed)
}

#[test]
fn every_number_of_the_shipped_configs_is_range_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = Fixtures::new(tmp.path());
    let mut failures = Vec::new();
    let mut passed = BTreeSet::new();
    for name in ["dynamollm.toml", "dynamollm-agent.toml"] {
        let (f, p) = sweep(name, &fixtures);
        failures.extend(f);
        passed.extend(p);
    }
    // Every allowed pair was tried (an entry for a key no longer shipped is stale).
    for (k, v, why) in ALLOWED {
        assert!(passed.contains(&(k.to_string(), v.to_string())), "ALLOWED ({k}, {v}: {why}) was never tried");
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn the_scan_finds_set_and_commented_numbers() {
    let text = "[a]\nx = 1 # one\n# y = 2.5   # an example\n# not = a pair, just prose\n\
                z = { P = 1, Q = [2, 3] }\n# [b]\n# w = 4\n# s = \"t\"\n[c]\nv = 1\n";
    let n = numbers(text);
    let keys: Vec<&str> = n.iter().map(|n| n.key.as_str()).collect();
    assert_eq!(keys, ["a.x", "a.y", "a.z.P", "a.z.Q", "a.z.Q", "b.w", "c.v"]);
    let w = &n[5];
    assert_eq!(w.block, vec![5, 6, 7]);
    let t = with_value(text, w, Some("1e300"));
    let doc: toml::Table = t.parse().unwrap();
    assert_eq!(doc["b"]["w"].as_float(), Some(1e300), "{t}");
    assert_eq!(doc["b"]["s"].as_str(), Some("t"), "{t}");
    let q = with_value(text, &n[4], Some("-1"));
    assert!(q.contains("z = { P = 1, Q = [2, -1] }"), "{q}");
    let y = with_value(text, &n[1], Some("0"));
    assert!(y.contains("\ny = 0.0\n"), "{y}");
}

#[test]
fn check_reports_a_missing_file_by_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = Fixtures::new(tmp.path());
    let text = fixtures.substitute(&std::fs::read_to_string(deploy("dynamollm.toml")).unwrap());
    let missing = tmp.path().join("no-such-profile.csv");
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("profile = ") {
                format!("profile = {:?}", missing.display().to_string())
            } else {
                l.into()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let file = tmp.path().join("svc.toml");
    std::fs::write(&file, text).unwrap();
    let o = check(&file);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("svc.toml") && err.contains("service.profile") && err.contains("no-such-profile.csv"),
        "{err}"
    );
}

#[test]
fn check_prints_what_would_run() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = Fixtures::new(tmp.path());
    let text = fixtures.substitute(&std::fs::read_to_string(deploy("dynamollm.toml")).unwrap());
    let file = tmp.path().join("svc.toml");
    std::fs::write(&file, text).unwrap();
    let o = check(&file);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    for says in [
        "mode:       dry-run",
        "external, 64 GPUs",
        "127.0.0.1:9464",
        "127.0.0.1:8000",
        "exec:",
        "MQTT broker.edge1.example:8883 (TLS",
    ] {
        assert!(out.contains(says), "{says}: {out}");
    }
}

#[test]
fn out_of_range_flags_are_refused_by_name() {
    let cases: [&[&str]; 9] = [
        &["demo", "--speed", "0"],
        &["demo", "--speed", "1e300"],
        &["demo", "--hours=-1"],
        &["sim", "--scale", "0"],
        &["sim", "--hours", "1e-10"],
        &["rehearse", "--speed", "0"],
        &["twin", "serve", "--speed", "0"],
        &["profile", "--out", "/nonexistent/p.csv", "--min-requests", "0"],
        &["profile", "--out", "/nonexistent/p.csv", "--loads", "1,1e300"],
    ];
    for args in cases {
        let o = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let last = args[args.len() - 1];
        let flag = last.split_once('=').map_or(args[args.len() - 2], |(f, _)| f);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag) && !err.contains("panicked"), "{args:?}: {err}");
    }
}
