//! `dynamollm rehearse`: the whole product on real sockets, as an operator
//! would run it on a cluster. The service (`serve`, in this process) manages
//! an external cluster through the exec backend, whose cluster-manager
//! script (`deploy/twin-cluster-manager.py`, run exactly as an operator's
//! would be) starts and stops `dynamollm twin serve` engine processes that
//! require an API key, placed `--engines-per-node` per 8-GPU node (clocks are
//! set straight at the engine, as an operator's fast path would). The
//! service reads each engine's `/metrics` (queue, latency histograms, the
//! twin's GPU power and energy) and routes every request through its
//! OpenAI-compatible router, which measures what clients see and feeds the
//! controller's learning. A load generator replays the trace through the
//! router with streaming clients; then the same trace and seed run in `sim`
//! under `single-pool` and `dynamollm` with the same controller settings.

use super::sim::{run_policies, RunOptions};
use super::{progress_bar, write_json, WorkloadArgs};
use crate::loadgen::stream_completion;
use anyhow::{bail, Context, Result};
use controller::policy::Policy;
use controller::profile::ProfileTable;
use serde::Serialize;
use service::config::ServiceConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use telemetry::{ClassBoundaries, RequestClass, SloRule, CLASS_COUNT};

/// The SLO multiplier the service, the engines and `sim` all use.
pub const SLO_MULTIPLIER: f64 = 5.0;
/// The cluster manager, shipped in `deploy/` as an operator's example.
const MANAGER_PY: &str = include_str!("../../../deploy/twin-cluster-manager.py");

/// `dynamollm rehearse`.
#[derive(Debug, clap::Args)]
pub struct RehearseArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Service seconds per wall second: the engines, the service and the replay all run this much faster
    /// (0.01 to 100).
    #[arg(long, default_value_t = 15.0, value_parser = speed)]
    pub speed: f64,
    /// Engines on one 8-GPU node at most (2: two TP4 engines share a node; 1 to 8).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub engines_per_node: u32,
    /// Write the figures as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// What the clients measured of one class.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientClass {
    /// Requests answered.
    pub requests: u64,
    /// Share of requests whose first token came within the class's TTFT SLO.
    pub ttft_attainment: f64,
    /// Share of token gaps within the class's TBT SLO.
    pub tbt_attainment: f64,
    /// The lower of the two (the P99 SLOs hold at 0.99 and above).
    pub slo_attainment: f64,
}

/// What a pool learnt, at the end.
#[derive(Debug, Clone, Serialize)]
pub struct Learnt {
    /// The capacity scale (1: as the profile says).
    pub capacity_scale: Option<f64>,
    /// The clock margin.
    pub clock_margin: Option<f64>,
}

/// The JSON of a rehearsal (exactly these fields).
#[derive(Debug, Clone, Serialize)]
pub struct Rehearsal {
    /// The engines' GPU energy (sum of their energy counters), kWh.
    pub energy_kwh: f64,
    /// GPU-hours the engines held (service time).
    pub gpu_hours: f64,
    /// `sim`'s dynamollm on the same trace and seed, kWh.
    pub sim_dynamollm_energy_kwh: f64,
    /// `sim`'s single-pool on the same trace and seed, kWh.
    pub sim_single_pool_energy_kwh: f64,
    /// `energy_kwh` over `sim_dynamollm_energy_kwh`.
    pub ratio_to_sim: f64,
    /// Requests sent.
    pub requests_total: u64,
    /// Requests that failed at the router (no answer, or an error status).
    pub router_errors: u64,
    /// Per class, as the clients measured.
    pub classes: BTreeMap<String, ClientClass>,
    /// Per pool (by name), what it learnt.
    pub learnt: BTreeMap<String, Learnt>,
    /// The savings ratio the service's status showed at the end.
    pub live_savings_ratio: f64,
    /// Wall seconds of the whole rehearsal.
    pub wall_s: f64,
}

/// `--speed`: 0.01 to 100 (past it the machine, not the cluster, sets the latencies).
fn speed(s: &str) -> Result<f64, String> {
    let v = super::flag::speed(s)?;
    if v > 100.0 {
        return Err("must be a number in [0.01, 100]".into());
    }
    Ok(v)
}

/// Per class `[ttft_ok, ttft_n, gaps_ok, gaps_n]` as clients measured.
pub type Counts = [[u64; 4]; CLASS_COUNT];

/// Count one answer of `class` as its client saw it (`speed`× accelerated
/// service time) against the class's SLOs.
pub fn count_answer(
    counts: &mut Counts,
    class: RequestClass,
    t: &crate::loadgen::StreamTiming,
    slo: telemetry::ClassSlo,
    speed: f64,
) {
    let c = &mut counts[class.index()];
    c[0] += u64::from(t.ttft_s(speed) <= slo.ttft_s);
    c[1] += 1;
    c[2] += t.gaps_s(speed).filter(|g| *g <= slo.tbt_s).count() as u64;
    c[3] += t.gaps.len() as u64;
}

/// Per class (by name, classes with requests only), the attainment the clients measured.
pub fn client_classes(counts: &Counts) -> BTreeMap<String, ClientClass> {
    RequestClass::ALL
        .iter()
        .filter(|c| counts[c.index()][1] > 0)
        .map(|c| {
            let k = counts[c.index()];
            let t = k[0] as f64 / k[1] as f64;
            let g = if k[3] > 0 { k[2] as f64 / k[3] as f64 } else { 1.0 };
            (
                c.to_string(),
                ClientClass { requests: k[1], ttft_attainment: t, tbt_attainment: g, slo_attainment: t.min(g) },
            )
        })
        .collect()
}

/// Per pool (by name), what the service's status (`/api/v1/status`) says it learnt.
pub fn learnt(status: &serde_json::Value) -> BTreeMap<String, Learnt> {
    status["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["instances"].as_u64().unwrap_or(0) > 0 || !p["capacity_scale"].is_null())
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_string(),
                Learnt { capacity_scale: p["capacity_scale"].as_f64(), clock_margin: p["clock_margin"].as_f64() },
            )
        })
        .collect()
}

/// What a rehearsal is measured against: `sim`'s `single-pool` (sized by replay) and `dynamollm`
/// on the same trace and seed, with the service's default settings; their energy (kWh).
pub fn sim_reference(physics: &sim::Physics, workload: &sim::Workload, quiet: bool) -> Result<(f64, f64)> {
    let opts = RunOptions::sized_by_replay(SLO_MULTIPLIER, quiet);
    let sims = run_policies(
        physics,
        workload,
        &[Policy::SinglePool, Policy::DynamoLlm],
        &ProfileTable::bundled(),
        &opts,
        None,
    )?;
    Ok((sims[0].energy_kwh, sims[1].energy_kwh))
}

/// Run it.
pub fn run(args: &RehearseArgs) -> Result<()> {
    if !(args.speed.is_finite() && args.speed > 0.0 && args.speed <= 100.0) {
        bail!("--speed must be in (0, 100], got {}", args.speed);
    }
    if !(1..=8).contains(&args.engines_per_node) {
        bail!("--engines-per-node must be 1 to 8 (an 8-GPU node), got {}", args.engines_per_node);
    }
    let wall = Instant::now();
    if !std::process::Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success()) {
        bail!("rehearse sets the engines' clocks with curl, and no curl runs here: install it (apt-get install curl)");
    }
    let workload = args.workload.load()?;
    let physics = sim::Physics::default_h100_llama70b();
    let slo = sim::measure::class_slos(
        &physics,
        &workload.slo_pairs,
        &ClassBoundaries::default(),
        SloRule::Multiplier(SLO_MULTIPLIER),
    );
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let manager = dir.path().join("twin-cluster-manager.py");
    std::fs::write(&manager, MANAGER_PY)?;
    let state = dir.path().join("cluster");
    std::fs::create_dir_all(&state)?;
    let key = random_hex();
    let token = random_hex();
    let exe = std::env::current_exe().context("the dynamollm binary")?;
    let line = format!(
        "DYNAMOLLM_TWIN_STATE='{}' DYNAMOLLM_TWIN_BIN='{}' DYNAMOLLM_TWIN_SPEED={} DYNAMOLLM_TWIN_API_KEY={key} \
         DYNAMOLLM_ENGINES_PER_NODE={} python3 '{}'",
        state.display(),
        exe.display(),
        args.speed,
        args.engines_per_node,
        manager.display()
    );
    // The operator knows today's load: the first fleet is planned for the first minutes' rates.
    let first = crate::closed_loop::count_minutes(&workload.first_hours(5.0 / 60.0))?.peak(0, 5);
    let initial: Vec<String> = RequestClass::ALL.iter().map(|c| format!("{c} = {}", first[c.index()])).collect();
    // The live savings are measured against the static fleet sim sizes for the trace (the
    // smallest TP8 count whose replay holds every class's P99), as `demo` and `serve` on the twin do.
    let single = super::sim::size_by_replay(&physics, Policy::SinglePool, &workload, SLO_MULTIPLIER, true)?;
    let toml = format!(
        r#"
[service]
listen = "127.0.0.1:0"
token = "{token}"
state_dir = "{state_dir}"
speed = {speed}
stale_after_s = 60.0
slo_multiplier = {SLO_MULTIPLIER}
initial_class_rps = {{ {initial} }}

[cluster]
kind = "external"
gpus = 4096
scrape_interval_s = {scrape}
baseline_instances = {baseline}

[router]
listen = "127.0.0.1:0"
api_key = "{key}"

[actuators]
order = ["exec"]

[actuators.exec]
spawn = "{line}"
retire = "{line}"
reshard = "{line}"
set_clock = "{set_clock}"
timeout_ms = 900000
"#,
        state_dir = dir.path().join("service").display(),
        speed = args.speed,
        initial = initial.join(", "),
        scrape = (1.0 / args.speed).max(0.05),
        baseline = single.first().copied().unwrap_or(1),
        line = toml_escape(&line),
        set_clock = toml_escape(SET_CLOCK),
    );
    let cfg = ServiceConfig::parse(&toml, "rehearse")?;
    let requests: Vec<telemetry::Request> = workload.arrivals()?.collect::<Result<_, _>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = rt.block_on(rehearse(cfg, &requests, slo, args, &physics.model.name));
    // Whatever happened, no engine outlives the rehearsal.
    let engines = stop_all(&line)?;
    let (counts, errors, status) = outcome?;
    let energy_j: f64 = engines.values().map(|e| e["energy_j"].as_f64().unwrap_or(0.0)).sum();
    let gpu_s_wall: f64 = engines
        .values()
        .map(|e| {
            let held = e["stopped"].as_f64().unwrap_or(0.0) - e["started"].as_f64().unwrap_or(0.0);
            e["gpu_seconds"].as_f64().unwrap_or(0.0) + e["tp"].as_f64().unwrap_or(0.0) * held.max(0.0)
        })
        .sum();
    let (single_kwh, dynamollm_kwh) = sim_reference(&physics, &workload, args.quiet)?;
    let classes = client_classes(&counts);
    let learnt = learnt(&status);
    let energy_kwh = energy_j / 3.6e6;
    let r = Rehearsal {
        energy_kwh,
        gpu_hours: gpu_s_wall * args.speed / 3600.0,
        sim_dynamollm_energy_kwh: dynamollm_kwh,
        sim_single_pool_energy_kwh: single_kwh,
        ratio_to_sim: energy_kwh / dynamollm_kwh,
        requests_total: requests.len() as u64,
        router_errors: errors,
        classes,
        learnt,
        live_savings_ratio: status["totals"]["savings_ratio"].as_f64().unwrap_or(f64::NAN),
        wall_s: wall.elapsed().as_secs_f64(),
    };
    println!("{}", table(&r));
    if let Some(p) = &args.json {
        write_json(p, &r)?;
    }
    Ok(())
}

/// The printed summary.
fn table(r: &Rehearsal) -> String {
    let mut s = format!(
        "rehearsal: {} requests, {} router errors, {:.1} s wall\n\
         energy {:.3} kWh on the engines vs sim dynamollm {:.3} kWh (ratio {:.3}) and single-pool {:.3} kWh ({:.3}x)\n\
         GPU-hours {:.1}; live savings ratio at the end {:.3}\n\nclass  requests   TTFT ok    TBT ok       SLO\n",
        r.requests_total,
        r.router_errors,
        r.wall_s,
        r.energy_kwh,
        r.sim_dynamollm_energy_kwh,
        r.ratio_to_sim,
        r.sim_single_pool_energy_kwh,
        r.energy_kwh / r.sim_single_pool_energy_kwh,
        r.gpu_hours,
        r.live_savings_ratio,
    );
    for (c, k) in &r.classes {
        let miss = if k.slo_attainment < telemetry::P99_ATTAINMENT { "  MISSES P99 SLO" } else { "" };
        s += &format!(
            "{c:<5} {:>9} {:>8.2}% {:>8.2}% {:>8.2}%{miss}\n",
            k.requests,
            100.0 * k.ttft_attainment,
            100.0 * k.tbt_attainment,
            100.0 * k.slo_attainment
        );
    }
    s += "\npool   capacity scale  clock margin\n";
    for (p, l) in &r.learnt {
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
        s += &format!("{p:<5} {:>15} {:>13}\n", f(l.capacity_scale), f(l.clock_margin));
    }
    s
}

/// The service, the fleet coming up, the replay through the router, the status at the end.
async fn rehearse(
    cfg: ServiceConfig,
    requests: &[telemetry::Request],
    slo: [telemetry::ClassSlo; CLASS_COUNT],
    args: &RehearseArgs,
    model: &str,
) -> Result<(Counts, u64, serde_json::Value)> {
    let token = cfg.token()?;
    let svc = service::start(cfg).await?;
    let router = format!("http://{}", svc.router_addr.context("the router did not start")?);
    let api = format!("http://{}", svc.addr);
    let http = reqwest::Client::builder().pool_max_idle_per_host(4096).build()?;
    // The fleet the service plans for the first minutes comes up before traffic does.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = svc.shared.core.lock().map(|c| {
            let n = c.instances().count();
            n > 0 && c.instances().all(|r| r.state == controller::control::InstanceState::Serving)
        });
        if ready.unwrap_or(false) {
            break;
        }
        if Instant::now() > deadline {
            svc.stop().await?;
            bail!("the first fleet did not serve within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bar = progress_bar(requests.len() as u64, args.quiet, "{bar:40} {pos}/{len} requests {elapsed} {msg}");
    let speed = args.speed;
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let boundaries = ClassBoundaries::default();
    let mut results = Vec::with_capacity(requests.len());
    for r in requests {
        tokio::time::sleep_until(started + Duration::from_secs_f64(r.arrival_s / speed)).await;
        let (http, router, model) = (http.clone(), router.clone(), model.to_string());
        let (input, output) = (r.input_tokens, r.output_tokens.max(1));
        let class = boundaries.classify(input, output);
        tasks.spawn(async move { (class, stream_completion(&http, &router, &model, input, output).await) });
        while let Some(done) = tasks.try_join_next() {
            results.push(done?);
            bar.inc(1);
        }
    }
    let mut counts: Counts = [[0; 4]; CLASS_COUNT];
    let mut engine_view = [[0u64; 2]; CLASS_COUNT];
    let mut errors = 0u64;
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        results.push(done?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    for (class, r) in results {
        let c = class.index();
        let s = slo[c];
        match r {
            Ok(t) => {
                count_answer(&mut counts, class, &t, s, speed);
                engine_view[c][0] += t.engine_gaps_s.iter().filter(|g| **g <= s.tbt_s).count() as u64;
                engine_view[c][1] += t.engine_gaps_s.len() as u64;
            }
            Err(e) => {
                counts[c][1] += 1;
                errors += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("rehearse: {errors} requests failed, the first: {e}");
    }
    // What the path to the clients added: the same gaps by the engines' stamps alone.
    let shares: Vec<String> = RequestClass::ALL
        .iter()
        .filter(|c| engine_view[c.index()][1] > 0)
        .map(|c| {
            let (k, e) = (counts[c.index()], engine_view[c.index()]);
            format!(
                "{c} {:.2}% (clients {:.2}%)",
                100.0 * e[0] as f64 / e[1] as f64,
                100.0 * k[2] as f64 / k[3].max(1) as f64
            )
        })
        .collect();
    if !shares.is_empty() {
        println!("TBT within the SLO by the engines' own stamps: {}", shares.join(", "));
    }
    let status: serde_json::Value =
        http.get(format!("{api}/api/v1/status")).bearer_auth(token.expose()).send().await?.json().await?;
    svc.stop().await?;
    Ok((counts, errors, status))
}

/// A clock is set the way an operator's fast path would (`nvidia-smi -lgc` on a GPU node): one
/// small command straight to the engine the placement names. Through the cluster manager it
/// would start Python for every command (0.15–0.3 s of wall time, one 5 s clock period of
/// service time at 15×), where a real fleet's command takes a fraction of its period.
const SET_CLOCK: &str = r#"curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' -d "{\"clock_mhz\": $DYNAMOLLM_CLOCK_MHZ}" "$DYNAMOLLM_ENDPOINT/admin/clock" > /dev/null"#;

/// A string as the inside of a TOML basic string.
fn toml_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Stop every engine through the cluster manager; what each ran and spent.
fn stop_all(line: &str) -> Result<BTreeMap<String, serde_json::Value>> {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("DYNAMOLLM_ACTION_KIND=stop-all {line}")])
        .output()
        .context("running the cluster manager's stop-all")?;
    if !out.status.success() {
        bail!("the cluster manager's stop-all failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("the cluster manager's stop-all printed no JSON")
}

/// A fresh random hex string (keys and tokens of one rehearsal).
fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let s = std::collections::hash_map::RandomState::new();
    let mut out = String::new();
    for i in 0..2u64 {
        let mut h = s.build_hasher();
        h.write_u64(i ^ std::process::id() as u64);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        out += &format!("{:016x}", h.finish());
    }
    out
}
