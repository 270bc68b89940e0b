//! `dynamollm demo`: the main job on embedded defaults, as the whole closed
//! loop. `serve` runs against the digital twin replaying the bundled
//! Conversation hour in accelerated time, with its API and live page up and a
//! live summary in the terminal; at the end the run is set beside `single-pool`
//! replayed on the same trace and seed. No server, no GPU, no files needed.
//! `--compare` instead replays the hour with every policy and prints the table.

use super::sim::{compare_table, run_policies, run_policy, RunOptions};
use super::PhysicsArgs;
use crate::report::SimReport;
use anyhow::Result;
use controller::policy::Policy;
use controller::profile::ProfileTable;
use service::{self as serve, config::ServiceConfig};
use sim::workload::Workload;
use std::io::IsTerminal;
use std::time::Duration;

/// Options of `dynamollm demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Multiply the load of the Conversation hour (0.001 to 1000).
    #[arg(long, default_value_t = 1.0, value_parser = super::flag::scale)]
    pub scale: f64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Twin seconds per wall second (60: the hour in a minute; 0.01 to 10000).
    #[arg(long, default_value_t = 60.0, value_parser = super::flag::speed)]
    pub speed: f64,
    /// Replay only this many hours of the trace (0.001 to 100000).
    #[arg(long, value_parser = super::flag::hours)]
    pub hours: Option<f64>,
    /// The API and live page address (port 0: any free port).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// The API token (default: a fresh random one, printed).
    #[arg(long)]
    pub token: Option<String>,
    /// Keep the API up after the replay until Ctrl-C.
    #[arg(long)]
    pub linger: bool,
    /// Instead of the closed loop: replay the hour with every policy and compare.
    #[arg(long)]
    pub compare: bool,
    /// No progress bars or live summary.
    #[arg(long)]
    pub quiet: bool,
    /// Also write the run's figures to this file as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
    /// Keep the service's state and telemetry store here (default: a temporary
    /// directory, removed at the end); `dynamollm report --store DIR/telemetry`
    /// reads it afterwards.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub physics: PhysicsArgs,
}

const SLO_MULTIPLIER: f64 = 5.0;
/// The demo's API address (another free port when it is taken).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

fn fresh_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    let a = h.finish();
    h.write_u64(a);
    format!("{:016x}{:016x}", a, h.finish())
}

/// The figures of one demo run (`--json`): the contract other people script against.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DemoJson {
    /// Twin seconds per wall second asked for.
    pub speed: f64,
    /// GPU energy of the closed loop (`serve` managing the twin), kWh.
    pub energy_kwh: f64,
    /// `single-pool` sized by replay on the same trace and seed, kWh.
    pub single_pool_energy_kwh: f64,
    /// `energy_kwh / single_pool_energy_kwh`.
    pub ratio: f64,
    /// The live page's figure at the end, as a ratio (1 − its savings).
    pub live_ratio: f64,
    /// `sim --policy dynamollm` over `sim --policy single-pool`, same trace and seed.
    pub sim_ratio: f64,
    /// GPU-hours of the closed loop.
    pub gpu_hours: f64,
    /// Per class with traffic: its requests and SLO attainment in the closed loop.
    pub classes: std::collections::BTreeMap<String, DemoClass>,
    /// The largest lag of the service's loop behind the cluster's time asked for (twin seconds).
    pub lag_s_max: f64,
    /// Wall time of the closed loop (s).
    pub wall_s: f64,
}

/// One class in [`DemoJson`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DemoClass {
    /// Requests that arrived.
    pub requests: u64,
    /// Share of its requests within both P99 SLOs' terms (TTFT and every gap).
    pub slo_attainment: f64,
}

/// A lag behind the speed asked for beyond this share of the replay is said plainly.
const LAG_NOTICE_SHARE: f64 = 0.05;

/// Run the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    if args.compare {
        return compare(args);
    }
    anyhow::ensure!(
        args.speed.is_finite() && args.speed > 0.0,
        "--speed must be a positive number (got {})",
        args.speed
    );
    let physics = args.physics.load()?;
    let workload = Workload::from_options(None, None, None, args.scale, args.hours, args.seed)?;
    let (state, keep_state) = match &args.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), true)
        }
        None => (tempfile_dir()?, false),
    };
    let token = args.token.clone().unwrap_or_else(fresh_token);
    let span_s = workload.span_s.unwrap_or(3600.0);
    println!(
        "dynamollm demo: `serve` managing the digital twin (DGX H100, Llama-2-70B) as it replays the bundled Azure \
         Conversation hour ({}, CC-BY 4.0) at {}× speed; per-class P99 SLOs are 5× each class's median request alone \
         on TP8 at max clock.",
        workload.name, args.speed
    );
    // The comparison first: `single-pool` sized by replay (its layout is also the live page's
    // baseline, replayed beside the managed cluster) and `sim --policy dynamollm`.
    println!("Sizing single-pool by replay and running `sim` on the same trace and seed for comparison…");
    let opts = RunOptions::sized_by_replay(SLO_MULTIPLIER, args.quiet);
    let (single, counts) = run_policy(&physics, Policy::SinglePool, &workload, None, SLO_MULTIPLIER, args.quiet)?;
    let mut sim_rows = run_policies(&physics, &workload, &[Policy::DynamoLlm], &ProfileTable::bundled(), &opts, None)?;
    let mut sim_dyn = sim_rows.remove(0);
    sim_dyn.policy = "dynamollm (sim)".into();
    let mut cfg = service_config(args, &token, &state);
    cfg.cluster.baseline_instances = counts.first().copied();
    let rt = tokio::runtime::Runtime::new()?;
    let started = std::time::Instant::now();
    let (totals, live_ratio, lag_s_max, epoch_ms) = rt.block_on(async {
        let svc = match serve::start(cfg.clone()).await {
            // The default port is taken: any free one will do for a demo.
            Err(e) if args.listen == DEFAULT_LISTEN && format!("{e:#}").contains("cannot listen") => {
                let mut cfg = cfg;
                cfg.service.listen = "127.0.0.1:0".into();
                serve::start(cfg).await?
            }
            r => r?,
        };
        println!("  live page: http://{}/?token={token}", svc.addr);
        println!("  API:       curl -H 'Authorization: Bearer {token}' http://{}/api/v1/status\n", svc.addr);
        let bar = super::progress_bar(span_s as u64, args.quiet, "{bar:30} {msg}");
        let show = !args.quiet && std::io::stdout().is_terminal();
        let mut finished = svc.finished.clone();
        let mut every = tokio::time::interval(Duration::from_millis(500));
        let mut next_line_s = 600.0;
        let mut lag_warned = false;
        let totals = loop {
            tokio::select! {
                _ = every.tick() => {
                    let now = svc.shared.clock.now_s();
                    let line = summary(&svc.shared, now);
                    let lag = svc.shared.clock.lag_max_s();
                    if !lag_warned && lag > LAG_NOTICE_SHARE * span_s {
                        lag_warned = true;
                        bar.suspend(|| println!(
                            "  this machine does not keep up with --speed {}: the twin runs up to {lag:.0} s behind; \
                             the service ticks in the twin's time, so the results are those of any speed, only later",
                            args.speed
                        ));
                    }
                    if show {
                        bar.set_position(now.min(span_s) as u64);
                        bar.set_message(line);
                    } else if !args.quiet && now >= next_line_s {
                        println!("  {line}");
                        next_line_s += 600.0;
                    }
                }
                r = finished.changed() => {
                    if r.is_err() {
                        anyhow::bail!("the twin stopped before the end of the trace");
                    }
                    let done = finished.borrow().clone();
                    if let Some(t) = done {
                        break t;
                    }
                }
                _ = super::serve::shutdown_signal() => anyhow::bail!("interrupted"),
            }
        };
        bar.finish_and_clear();
        let live_ratio = svc.shared.core.lock().map(|c| 1.0 - c.totals().savings_ratio).unwrap_or(f64::NAN);
        let lag_s_max = svc.shared.clock.lag_max_s();
        let epoch_ms = svc.shared.epoch_ms;
        if args.linger {
            println!("  the replay is over; the API stays up until Ctrl-C");
            super::serve::shutdown_signal().await;
        }
        svc.stop().await?;
        Ok::<_, anyhow::Error>((totals, live_ratio, lag_s_max, epoch_ms))
    })?;
    let wall_s = started.elapsed().as_secs_f64();
    if !keep_state {
        let _ = std::fs::remove_dir_all(&state);
    }
    let closed = SimReport::new("dynamollm", &workload.name, args.seed, &totals, wall_s);
    print!("{}", closed.table());
    let effective = span_s / wall_s.max(1e-9);
    if lag_s_max > LAG_NOTICE_SHARE * span_s {
        println!(
            "  the machine sustained about {effective:.0}× (asked {}×; largest lag {lag_s_max:.0} s): the figures \
             are the same as at a speed it sustains, because the service ticks in the twin's time",
            args.speed
        );
    }
    let out = DemoJson {
        speed: args.speed,
        energy_kwh: closed.energy_kwh,
        single_pool_energy_kwh: single.energy_kwh,
        ratio: closed.energy_kwh / single.energy_kwh,
        live_ratio,
        sim_ratio: sim_dyn.energy_kwh / single.energy_kwh,
        gpu_hours: closed.gpu_hours,
        classes: closed
            .classes
            .iter()
            .map(|(k, c)| (k.clone(), DemoClass { requests: c.requests, slo_attainment: c.latency.slo_attainment }))
            .collect(),
        lag_s_max,
        wall_s,
    };
    let rows = vec![single, sim_dyn, closed];
    print!("{}", compare_table(&rows));
    println!(
        "  (dynamollm: the closed loop above, `serve` managing the twin; single-pool {} TP8 instances sized by replay \
         and dynamollm (sim): replayed by `sim`)",
        counts.first().copied().unwrap_or(0)
    );
    println!(
        "  energy {:.3}× single-pool; the live page said {:.3}×; `sim` gives {:.3}×",
        out.ratio, out.live_ratio, out.sim_ratio
    );
    let missing: Vec<&str> = rows.iter().filter(|r| !r.all_classes_hold()).map(|r| r.policy.as_str()).collect();
    if !missing.is_empty() {
        println!("  (missing a class's P99 SLO: {})", missing.join(", "));
    }
    if keep_state {
        // The store is stamped in the twin's time from the start of the run.
        let from_s = epoch_ms.div_euclid(1000);
        let to_s = from_s + totals.duration_s.ceil() as i64 + 1;
        println!(
            "  the run's telemetry: dynamollm report --store {} --from {from_s} --to {to_s} --out report.html",
            serve::store_dir(&state).display()
        );
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&out)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

/// The service the demo runs: `serve` on the twin replaying the bundled hour.
pub fn service_config(args: &DemoArgs, token: &str, state_dir: &std::path::Path) -> ServiceConfig {
    let mut cfg = ServiceConfig::default();
    cfg.service.listen = args.listen.clone();
    cfg.service.token = Some(serve::config::Secret::new(token));
    cfg.service.state_dir = state_dir.to_path_buf();
    cfg.service.speed = args.speed;
    cfg.service.slo_multiplier = SLO_MULTIPLIER;
    cfg.cluster.scale = args.scale;
    cfg.cluster.seed = args.seed;
    cfg.cluster.hours = args.hours;
    cfg.cluster.physics = args.physics.physics.clone();
    cfg
}

fn summary(shared: &serve::Shared, now: f64) -> String {
    let Ok(core) = shared.core.lock() else { return String::new() };
    let s = core.status(now);
    let t = &s["totals"];
    let min_att = s["classes"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["attainment"].as_f64()).fold(f64::INFINITY, f64::min))
        .unwrap_or(f64::INFINITY);
    format!(
        "{:02}:{:02} {} · {} instances, {} GPUs, {:.1} kW · {:.2} kWh vs {:.2} kWh single-pool (replayed) · worst class SLO attainment {}",
        (now / 60.0) as u64,
        (now % 60.0) as u64,
        s["mode"].as_str().unwrap_or("?"),
        s["instances"].as_array().map_or(0, |a| a.len()),
        t["gpus"].as_u64().unwrap_or(0),
        t["power_w"].as_f64().unwrap_or(0.0) / 1e3,
        t["energy_j"].as_f64().unwrap_or(0.0) / 3.6e6,
        t["baseline_energy_j"].as_f64().unwrap_or(0.0) / 3.6e6,
        if min_att.is_finite() { format!("{min_att:.3}") } else { "–".into() },
    )
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("dynamollm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn compare(args: &DemoArgs) -> Result<()> {
    let physics = args.physics.load()?;
    let workload = Workload::from_options(None, None, None, args.scale, args.hours, args.seed)?;
    println!(
        "dynamollm demo --compare: the bundled Azure Conversation hour ({}, CC-BY 4.0) through the digital twin \
         (DGX H100, Llama-2-70B), the static baselines sized by replay to hold each class's P99 SLOs (5× the class's \
         median request alone on TP8 at max clock), the controlled policies planning from the bundled profile.\n",
        workload.name
    );
    let opts = RunOptions::sized_by_replay(SLO_MULTIPLIER, args.quiet);
    let rows = run_policies(&physics, &workload, &Policy::ALL, &ProfileTable::bundled(), &opts, None)?;
    print!("{}", compare_table(&rows));
    let holds: Vec<&str> = rows.iter().filter(|r| !r.all_classes_hold()).map(|r| r.policy.as_str()).collect();
    if !holds.is_empty() {
        println!("  (policies missing a class's P99 SLO: {})", holds.join(", "));
    }
    Ok(())
}
