//! `dynamollm check --config FILE`: load and validate a config file as
//! `serve` or `agent` would, without starting anything. A file with an
//! `[agent]` table is an agent's; any other a service's. Every key is
//! range-checked by its crate's parser; the files the config names (keys
//! ending in `_file`, and `profile`, `physics`, `trace`, `rates`,
//! `lengths`, `carbon.csv`) must exist and be readable, and those with a
//! form (profile, physics, PEM certificates and keys, tokens) must parse.
//! Then, unless `--offline`, it tries what the config names, each within a
//! few seconds: the MQTT broker (a real CONNECT with the config's
//! credentials and TLS, under a client id of its own), the InfluxDB server
//! (`/health`), Prometheus (a query), the webhook's and DCGM exporters' hosts, and an agent's
//! engine page (which must read as a vLLM or SGLang page) and twin. Prints a
//! summary of what would run and exits 0; on a problem prints each found to
//! stderr, naming the file and key, and exits 2.

use anyhow::{bail, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Options of `dynamollm check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The config file: the service's (see deploy/dynamollm.toml) or a node agent's (an `[agent]`
    /// table; see deploy/dynamollm-agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Check the file only: do not try the broker, the store or any endpoint it names.
    #[arg(long)]
    pub offline: bool,
}

/// What a check found: problems (the file would not run) and notes (it would, but look).
#[derive(Debug, Default)]
struct Findings {
    problems: Vec<String>,
    notes: Vec<String>,
}

/// Check the file; print the summary (stdout) or the problems (stderr).
pub fn run(args: &CheckArgs) -> Result<()> {
    let path = &args.config;
    let origin = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => bail!("{origin}: cannot read: {e}"),
    };
    let is_agent = text.parse::<toml::Table>().map(|t| t.contains_key("agent")).unwrap_or(false);
    let mut f = Findings::default();
    let summary = if is_agent { check_agent(path, &origin, &mut f) } else { check_service(path, &origin, &mut f) };
    if f.problems.is_empty() && !args.offline {
        let probes = if is_agent { agent_probes(path) } else { service_probes(path) };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        for (key, probe) in probes {
            if let Err(problem) = rt.block_on(probe.run()) {
                f.problems.push(format!("{origin}: {key}: {problem}"));
            }
        }
    }
    for n in &f.notes {
        eprintln!("note: {n}");
    }
    if !f.problems.is_empty() {
        for p in &f.problems {
            eprintln!("error: {p}");
        }
        let n = f.problems.len();
        let what = if is_agent { "agent" } else { "service" };
        bail!("{origin}: {n} problem{} found; the {what} would not start", if n == 1 { "" } else { "s" });
    }
    print!("{}", summary.unwrap_or_default());
    Ok(())
}

/// Every string in `table` under a key that names a file, with its dotted key.
fn named_files(prefix: &str, v: &toml::Value, out: &mut Vec<(String, PathBuf)>) {
    const FILE_KEYS: [&str; 5] = ["profile", "physics", "trace", "rates", "lengths"];
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                // `state_file` is written, not read (created when absent).
                toml::Value::String(s)
                    if (k.ends_with("_file") && k != "state_file") || FILE_KEYS.contains(&k.as_str()) =>
                {
                    out.push((key, PathBuf::from(s)));
                }
                toml::Value::String(s) if key == "carbon.csv" && !s.starts_with("builtin:") => {
                    out.push((key, PathBuf::from(s)));
                }
                toml::Value::Table(_) => named_files(&key, v, out),
                _ => {}
            }
        }
    }
}

/// Each named file exists and can be read.
fn check_files_readable(origin: &str, doc: &toml::Value, f: &mut Findings) {
    let mut files = Vec::new();
    named_files("", doc, &mut files);
    for (key, p) in files {
        match std::fs::File::open(&p).and_then(|file| file.metadata()) {
            Ok(m) if m.is_file() => {}
            Ok(_) => f.problems.push(format!("{origin}: {key}: {} is not a file", p.display())),
            Err(e) => f.problems.push(format!("{origin}: {key}: {}: cannot read: {e}", p.display())),
        }
    }
}

/// What `[objective]` makes the plan minimise, and what a GPU weighs under it over the week
/// (an intensity API source is not asked here: the service reads it at start).
fn objective_line(cfg: &service::config::ServiceConfig) -> String {
    if service::objective_is_live(cfg) {
        return format!(
            "{}; the carbon intensity is read from its API when the service starts",
            cfg.objective.kind.as_deref().unwrap_or("energy")
        );
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    match service::objective::objective_blocking(cfg, now) {
        Ok(o) if o.name == "energy" => "energy alone (the default)".into(),
        Ok(o) => {
            let (lo, hi) = o.gpu_w.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &w| (a.min(w), b.max(w)));
            format!("{} ({}): a GPU held weighs {lo:.0}–{hi:.0} W of GPU power over the week", o.name, o.terms)
        }
        Err(e) => format!("{e}"),
    }
}

fn check_service(path: &Path, origin: &str, f: &mut Findings) -> Option<String> {
    let cfg = match service::config::ServiceConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            f.problems.push(format!("{e:#}"));
            return None;
        }
    };
    let doc: toml::Value =
        cfg.source.0.parse::<toml::Table>().map(toml::Value::Table).unwrap_or(toml::Value::Boolean(false));
    check_files_readable(origin, &doc, f);
    let unreadable = |f: &Findings, key: &str| f.problems.iter().any(|p| p.contains(&format!(": {key}: ")));
    let token = match cfg.token() {
        Ok(_) if cfg.service.token.as_ref().is_some_and(|t| !t.expose().is_empty()) => "token".to_string(),
        Ok(_) => "token_file".to_string(),
        Err(e) => {
            if !unreadable(f, "service.token_file") {
                f.problems.push(format!("{origin}: {e:#}"));
            }
            String::new()
        }
    };
    let mut profile_note = "the bundled Llama-2-70B / H100 profile".to_string();
    if let Some(p) = &cfg.service.profile {
        profile_note = p.display().to_string();
        if !unreadable(f, "service.profile") {
            if let Err(e) = controller::profile::ProfileTable::load(p) {
                f.problems.push(format!("{origin}: service.profile: {e}"));
            }
        }
    }
    let twin = cfg.cluster.kind == "twin";
    if twin {
        let files_ok =
            ["cluster.physics", "cluster.trace", "cluster.rates", "cluster.lengths"].iter().all(|k| !unreadable(f, k));
        if files_ok {
            if let Err(e) = service::twin::physics_and_workload(&cfg) {
                f.problems.push(format!("{origin}: cluster (physics, trace, rates, lengths): {e:#}"));
            }
        }
    }
    let tcfg = cfg.telemetry_config().ok();
    let mqtt = tcfg.as_ref().and_then(|t| {
        let files = ["password_file", "ca_file", "client_cert_file", "client_key_file"];
        if files.iter().any(|k| unreadable(f, &format!("telemetry.mqtt.{k}"))) {
            return None;
        }
        match telemetry::mqtt::MqttSettings::from_config(&t.mqtt) {
            Ok(s) => s,
            Err(e) => {
                f.problems.push(format!("{origin}: telemetry.{e}"));
                None
            }
        }
    });
    if !unreadable(f, "router.client_keys_file") {
        if let Err(e) = cfg.router_client_keys() {
            f.problems.push(format!("{origin}: {e:#}"));
        }
    }
    let acts = cfg.actuators_config().ok();
    let mut backends = Vec::new();
    if let Some(a) = &acts {
        let order: Vec<String> =
            a.order.clone().unwrap_or_else(|| actuators::config::BACKENDS.iter().map(|s| s.to_string()).collect());
        for name in &order {
            match name.as_str() {
                "nvml" => {
                    if let Some(c) = &a.nvml {
                        let clocks = if c.max_clock_mhz == u32::MAX {
                            format!("clocks from {} MHz to the GPU's top", c.min_clock_mhz)
                        } else {
                            format!("clocks {}–{} MHz", c.min_clock_mhz, c.max_clock_mhz)
                        };
                        let device = match &c.twin_url {
                            Some(u) => {
                                if reqwest::Url::parse(u).is_err() {
                                    f.problems.push(format!("{origin}: actuators.nvml.twin_url: {u:?} is not a URL"));
                                }
                                format!("the twin's GPUs at {u}")
                            }
                            None => "this host's GPUs (NVML; needs root or CAP_SYS_ADMIN)".into(),
                        };
                        backends.push(format!("nvml: set-clock on {device}, {clocks}"));
                    }
                }
                "exec" => {
                    if let Some(c) = &a.exec {
                        let mut kinds = Vec::new();
                        for (kind, cmd) in [
                            ("spawn", &c.spawn),
                            ("retire", &c.retire),
                            ("reshard", &c.reshard),
                            ("set-clock", &c.set_clock),
                            ("route", &c.route),
                            ("move-queued", &c.move_queued),
                        ] {
                            let Some(cmd) = cmd else { continue };
                            kinds.push(kind);
                            if let actuators::exec::CommandLine::Argv(argv) = cmd {
                                let program = Path::new(&argv[0]);
                                if program.is_absolute() && !program.is_file() {
                                    f.notes.push(format!(
                                        "{origin}: actuators.exec.{}: {} does not exist on this machine",
                                        kind.replace('-', "_"),
                                        program.display()
                                    ));
                                }
                            }
                        }
                        backends.push(format!("exec: {} (timeout {} ms)", kinds.join(", "), c.timeout_ms));
                    }
                }
                "webhook" => {
                    if let Some(c) = &a.webhook {
                        if reqwest::Url::parse(&c.url).is_err() {
                            f.problems.push(format!("{origin}: actuators.webhook.url: {:?} is not a URL", c.url));
                        }
                        if let Some(var) = &c.token_env {
                            if std::env::var_os(var).is_none() {
                                f.notes.push(format!(
                                    "{origin}: actuators.webhook.token_env: {var} is not set here (serve needs it in its environment)"
                                ));
                            }
                        }
                        let kinds = c.kinds.as_ref().map_or("every kind".to_string(), |k| k.join(", "));
                        backends.push(format!("webhook: {kinds} to {}", c.url));
                    }
                }
                "mqtt" => {
                    if let Some(c) = &a.mqtt {
                        if tcfg.as_ref().is_some_and(|t| t.mqtt.host.is_none()) {
                            f.problems
                                .push(format!("{origin}: actuators.mqtt: needs a broker: set [telemetry.mqtt] host"));
                        }
                        let kinds = c.kinds.as_ref().map_or("every kind".to_string(), |k| k.join(", "));
                        backends.push(format!("mqtt: {kinds} to the edge agents (ack within {} ms)", c.ack_timeout_ms));
                    }
                }
                _ => {}
            }
        }
    }
    if !twin && acts.is_some() && backends.is_empty() {
        f.problems.push(format!("{origin}: cluster.kind = \"external\" needs at least one [actuators] backend"));
    }
    if !cfg.service.state_dir.exists() {
        f.notes.push(format!(
            "{origin}: service.state_dir: {} does not exist yet (serve creates it)",
            cfg.service.state_dir.display()
        ));
    }
    if !f.problems.is_empty() {
        return None;
    }

    let (s, c, k) = (&cfg.service, &cfg.controller, &cfg.cluster);
    let mut out = String::new();
    let _ = writeln!(out, "{origin}: a service config (`dynamollm serve`); no problem found");
    let _ = writeln!(out, "  (the broker, store and endpoints it names answered, unless --offline)");
    let _ = writeln!(out, "  mode:       {}", s.mode);
    let _ = writeln!(
        out,
        "  policy:     {} (SLO {}× each class's unloaded latency; profile: {profile_note})",
        s.policy, s.slo_multiplier
    );
    let _ = writeln!(
        out,
        "  loops:      clock every {} s, shard every {} s, scale every {} s (service seconds; speed {}×)",
        c.clock_period_s, c.shard_period_s, c.scale_period_s, s.speed
    );
    let _ = writeln!(out, "  objective:  {}", objective_line(&cfg));
    if let Some(w) = cfg.budget.power_w {
        let order = cfg.budget.priority.as_ref().map_or("short prompts first".to_string(), |p| p.join(" > "));
        let _ = writeln!(out, "  budget:     {w:.0} W of power; classes ranked {order}");
    }
    if twin {
        let what = match (&k.trace, &k.rates) {
            (Some(t), _) => format!("trace {}", t.display()),
            (None, Some(r)) => format!("rate curve {}", r.display()),
            (None, None) => "the bundled Conversation hour".into(),
        };
        let _ = writeln!(out, "  cluster:    twin (in-process), replaying {what} at scale {}", k.scale);
    } else {
        let scrape = if k.scrape_interval_s > 0.0 {
            format!("engines' /metrics every {} s", k.scrape_interval_s)
        } else {
            "no scraping (engine telemetry over MQTT only)".into()
        };
        let _ = writeln!(
            out,
            "  cluster:    external, {} GPUs; {scrape}; {} DCGM exporter(s); learns from {}",
            k.gpus.unwrap_or(0),
            k.dcgm.len(),
            cfg.learn_from()
        );
    }
    let _ = writeln!(out, "  API:        http://{} (bearer token from service.{token})", s.listen);
    match &cfg.router.listen {
        Some(l) => {
            let _ = writeln!(
                out,
                "  router:     http://{l}/v1 (balance {}, tokenize {}, hold {} s)",
                serde_json::to_value(cfg.router.balance)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                cfg.router.tokenize,
                cfg.router.hold_s
            );
        }
        None => {
            let _ = writeln!(out, "  router:     none");
        }
    }
    if twin {
        let _ = writeln!(out, "  actuators:  the twin itself");
    } else if backends.is_empty() {
        let _ = writeln!(out, "  actuators:  none");
    } else {
        let _ = writeln!(out, "  actuators:  {}", backends.join("; "));
    }
    if let Some(t) = &tcfg {
        // What `serve` reads: MQTT, engine pages and DCGM on an external cluster; the twin itself.
        let mut sources = Vec::new();
        if twin {
            sources.push("the twin".to_string());
        } else {
            if let Some(m) = &mqtt {
                let tls = if m.tls.is_some() { "TLS" } else { "plain" };
                sources.push(format!("MQTT {} ({tls}, prefix {})", m.broker(), m.topic_prefix));
            }
            if k.scrape_interval_s > 0.0 {
                sources.push("engine /metrics".into());
                if !k.dcgm.is_empty() {
                    sources.push("DCGM".into());
                }
            }
        }
        let _ = writeln!(out, "  telemetry:  {}", if sources.is_empty() { "none".into() } else { sources.join(", ") });
        let store = if t.store.enabled { "embedded store" } else { "no store" };
        let influx = t.influx.url.as_deref().map_or("no InfluxDB".to_string(), |u| format!("InfluxDB {u}"));
        let _ = writeln!(out, "  keeps:      {store}, {influx}; state in {}", s.state_dir.display());
    }
    Some(out)
}

fn check_agent(path: &Path, origin: &str, f: &mut Findings) -> Option<String> {
    let cfg = match agent::AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            f.problems.push(e.to_string());
            return None;
        }
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let doc: toml::Value = text.parse::<toml::Table>().map(toml::Value::Table).unwrap_or(toml::Value::Boolean(false));
    check_files_readable(origin, &doc, f);
    let mqtt_files = ["password_file", "ca_file", "client_cert_file", "client_key_file"];
    let broker = if mqtt_files.iter().any(|k| f.problems.iter().any(|p| p.contains(&format!("agent.mqtt.{k}: ")))) {
        None
    } else {
        match cfg.mqtt_settings() {
            Ok(s) => Some(s),
            Err(e) => {
                f.problems.push(format!("{origin}: {e}"));
                None
            }
        }
    };
    if let Some(parent) = cfg.state_file.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            f.notes.push(format!(
                "{origin}: agent.state_file: its directory {} does not exist yet (the agent's systemd unit creates it)",
                parent.display()
            ));
        }
    }
    if let Some(e) = &cfg.exec {
        for argv in [&e.spawn, &e.retire, &e.reshard, &e.route].into_iter().flatten() {
            let program = Path::new(&argv[0]);
            if program.is_absolute() && !program.is_file() {
                f.notes.push(format!("{origin}: agent.exec: {} does not exist on this machine", program.display()));
            }
        }
    }
    if !f.problems.is_empty() {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(out, "{origin}: a node agent config (`dynamollm agent`); no problem found");
    let _ = writeln!(out, "  (the broker, store and endpoints it names answered, unless --offline)");
    let _ = writeln!(out, "  node:       {}/{} (topics {})", cfg.site, cfg.node, cfg.topic("…"));
    if let Some(b) = &broker {
        let tls = if b.tls.is_some() { "TLS" } else { "plain" };
        let user = b.username.as_deref().map_or("anonymous".to_string(), |u| format!("user {u}"));
        let _ = writeln!(out, "  broker:     {} ({tls}, {user}, client id {})", b.broker(), b.client_id);
    }
    let gpu = match (&cfg.gpu, &cfg.twin_url) {
        (agent::GpuKind::Twin, Some(u)) => format!("the twin's fake GPUs at {u}"),
        _ => "this node's GPUs (NVML)".to_string(),
    };
    let clocks = match (cfg.clock_min_mhz, cfg.clock_max_mhz) {
        (None, None) => "the GPU's own clock range".to_string(),
        (lo, hi) => format!(
            "clocks {}–{} MHz",
            lo.map_or("GPU min".into(), |v| v.to_string()),
            hi.map_or("GPU max".into(), |v| v.to_string())
        ),
    };
    let _ = writeln!(out, "  GPU:        {gpu}, SetClock within {clocks}");
    let engine = cfg.engine_url.as_deref().map_or("none (GPU telemetry only)".to_string(), |u| u.to_string());
    let _ = writeln!(out, "  telemetry:  every {} s; engine page {engine}", cfg.interval_s);
    let exec = match &cfg.exec {
        Some(e) => {
            let kinds: Vec<&str> =
                [("spawn", &e.spawn), ("retire", &e.retire), ("reshard", &e.reshard), ("route", &e.route)]
                    .into_iter()
                    .filter_map(|(k, v)| v.as_ref().map(|_| k))
                    .collect();
            format!("{} (timeout {} s)", kinds.join(", "), e.timeout_s)
        }
        None => "none (spawn, retire, reshard and route are answered Failed)".into(),
    };
    let _ = writeln!(out, "  exec:       {exec}");
    let _ = writeln!(out, "  state file: {}", cfg.state_file.display());
    Some(out)
}

/// How long one probe may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// Something the config names, to be tried.
enum Probe {
    /// An MQTT broker: CONNECT with the config's credentials and TLS.
    Broker(Box<telemetry::mqtt::MqttSettings>),
    /// An HTTP URL that must answer (any status but a server error).
    Http(String),
    /// A host:port that must accept a TCP connection (no request: a webhook would act on one).
    Tcp(String),
    /// An engine's metrics page: must answer 200 and read as a vLLM or SGLang page.
    EnginePage(String),
}

impl Probe {
    async fn run(self) -> Result<(), String> {
        let http = || reqwest::Client::builder().timeout(PROBE_TIMEOUT).build().map_err(|e| e.to_string());
        match self {
            Probe::Broker(s) => {
                let mut s = *s;
                use rumqttc::{AsyncClient, Event, Packet};
                // A session of its own, clean: the service's queued messages are not touched.
                s.client_id = format!("{}-check-{}", s.client_id, std::process::id());
                let broker = s.broker();
                let mut o = s.options();
                o.set_clean_session(true);
                let (client, mut el) = AsyncClient::new(o, 8);
                let r = tokio::time::timeout(PROBE_TIMEOUT, async {
                    loop {
                        match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                            Ok(_) => {}
                            Err(e) => return Err(telemetry::mqtt::connection_problem(&e)),
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())));
                let _ = client.try_disconnect();
                r.map_err(|e| format!("cannot connect to the broker {broker}: {e}"))
            }
            Probe::Http(url) => match http()?.get(&url).send().await {
                Ok(r) if r.status().is_server_error() => Err(format!("{url} answered {}", r.status())),
                Ok(_) => Ok(()),
                Err(e) => Err(format!("cannot reach {url}: {e}")),
            },
            Probe::Tcp(url) => {
                let u = reqwest::Url::parse(&url).map_err(|e| format!("{url:?}: {e}"))?;
                let host = u.host_str().unwrap_or_default().to_string();
                let port = u.port_or_known_default().unwrap_or(80);
                match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port))).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("cannot reach {host}:{port} ({url}): {e}")),
                    Err(_) => Err(format!("no answer from {host}:{port} ({url}) within {} s", PROBE_TIMEOUT.as_secs())),
                }
            }
            Probe::EnginePage(url) => {
                let text = telemetry::scrape::fetch(&http()?, &url).await.map_err(|e| format!("{url}: {e}"))?;
                telemetry::scrape::parse_engine_page(&text, &url).map(|_| ()).map_err(|e| e.to_string())
            }
        }
    }
}

fn service_probes(path: &Path) -> Vec<(String, Probe)> {
    let mut out = Vec::new();
    let Ok(cfg) = service::config::ServiceConfig::load(path) else { return out };
    if let Ok(t) = cfg.telemetry_config() {
        if let Ok(Some(s)) = telemetry::mqtt::MqttSettings::from_config(&t.mqtt) {
            out.push(("telemetry.mqtt.host".to_string(), Probe::Broker(Box::new(s))));
        }
        if let Some(url) = &t.influx.url {
            out.push(("telemetry.influx.url".into(), Probe::Http(format!("{}/health", url.trim_end_matches('/')))));
        }
        if let Some(url) = &t.prometheus.url {
            let q = format!("{}/api/v1/query?query=1", url.trim_end_matches('/'));
            out.push(("telemetry.prometheus.url".into(), Probe::Http(q)));
        }
    }
    for (i, d) in cfg.cluster.dcgm.iter().enumerate() {
        out.push((format!("cluster.dcgm[{i}].url"), Probe::Http(d.url.clone())));
    }
    if let Ok(a) = cfg.actuators_config() {
        if let Some(w) = &a.webhook {
            out.push(("actuators.webhook.url".into(), Probe::Tcp(w.url.clone())));
        }
    }
    out
}

fn agent_probes(path: &Path) -> Vec<(String, Probe)> {
    let mut out = Vec::new();
    let Ok(cfg) = agent::AgentConfig::load(path) else { return out };
    if let Ok(s) = cfg.mqtt_settings() {
        out.push(("agent.mqtt.host".to_string(), Probe::Broker(Box::new(s))));
    }
    if let Some(u) = &cfg.engine_url {
        out.push(("agent.engine_url".into(), Probe::EnginePage(u.clone())));
    }
    if let Some(u) = &cfg.twin_url {
        out.push(("agent.twin_url".into(), Probe::Http(format!("{}/admin/clock", u.trim_end_matches('/')))));
    }
    out
}
