//! service: the always-on service (`dynamollm serve`). Telemetry → store →
//! forecaster → controller → actuators on tokio timers, around the sans-IO
//! `controller` crate ([`core::ServiceCore`] wraps it with the inventory,
//! modes and command ids); the OpenAI-compatible request router
//! ([`router`]); the HTTP API and the live page's server side ([`api`]).
//! The in-process twin as a cluster ([`twin`], behind the default `twin`
//! feature) is its only use of the twin's crate.
//!
//! - Every clock period the core ticks: it builds the observations, steps the
//!   controller and returns commands. The state (plan, inventory, commands in
//!   flight) is written to `state_dir/state.json` **before** any command is
//!   sent, and every command goes through the audit log, so a restart after
//!   kill -9 re-sends what was in flight with the same ids and repeats nothing.
//! - Telemetry older than `stale_after_s` puts the service in failsafe (top
//!   clocks, the fleet held as it is) at the next tick; shutdown resets clocks.
//! - The HTTP API (axum) is in [`api`].
#![forbid(unsafe_code)]

pub use state::{audit_path, load_state, save_state, state_path, store_dir};

pub mod api;
pub mod config;
pub mod core;
mod dispatch;
pub mod objective;
pub use dispatch::lanes;
use dispatch::{dispatch_if_allowed, send};
pub use objective::{objective_is_live, objective_of, OBJECTIVE_REFRESH};
pub mod openai;
pub mod reports;
pub mod router;
pub mod scrape;
mod state;
#[cfg(feature = "twin")]
pub mod twin;

use actuators::{ActionId, AuditLog, Command, Dispatcher, Outcome};
use anyhow::{Context, Result};
use config::{Secret, ServiceConfig};
use controller::control::{ControllerConfig, Loops};
use controller::policy::Policy;
use controller::profile::ProfileTable;
use core::{CoreConfig, Mode, ServiceCore};
use reports::{TwinEvent, TwinTotals};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telemetry::{RequestClass, CLASS_COUNT};
use tokio::sync::{mpsc, oneshot, watch};

/// Service time: seconds since an origin. On a real cluster it advances
/// `speed` times faster than the wall clock (tokio's clock, so tests can pause
/// it). On the in-process twin it is the cluster's own time: the twin sets it
/// as it advances, the service ticks when the twin reaches each tick, and a
/// run makes the same decisions at any speed the machine sustains.
#[derive(Debug, Clone)]
pub struct ServiceClock {
    start: tokio::time::Instant,
    speed: f64,
    offset_s: f64,
    /// The cluster's time (f64 bits), when the cluster keeps it.
    cluster_s: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The largest lag of the cluster's time behind the wall's (f64 bits).
    lag_max_s: Arc<std::sync::atomic::AtomicU64>,
}

impl ServiceClock {
    /// A clock that reads `offset_s` now.
    pub fn new(speed: f64, offset_s: f64) -> ServiceClock {
        ServiceClock {
            start: tokio::time::Instant::now(),
            speed,
            offset_s,
            cluster_s: None,
            lag_max_s: Arc::new(std::sync::atomic::AtomicU64::new(0f64.to_bits())),
        }
    }

    /// A clock the cluster sets (see [`ServiceClock::set_cluster_s`]), reading `offset_s` at first.
    pub fn cluster_kept(speed: f64, offset_s: f64) -> ServiceClock {
        let mut c = ServiceClock::new(speed, offset_s);
        c.cluster_s = Some(Arc::new(std::sync::atomic::AtomicU64::new(offset_s.to_bits())));
        c
    }

    /// Service seconds now: the cluster's time where it keeps it, else the wall's times `speed`.
    pub fn now_s(&self) -> f64 {
        match &self.cluster_s {
            Some(t) => f64::from_bits(t.load(Ordering::Acquire)),
            None => self.wall_now_s(),
        }
    }

    /// Where service time would be if it followed the wall clock at `speed`.
    pub fn wall_now_s(&self) -> f64 {
        self.offset_s + self.start.elapsed().as_secs_f64() * self.speed
    }

    /// The cluster has reached `s` (a clock the cluster keeps); records its lag behind the wall.
    pub fn set_cluster_s(&self, s: f64) {
        if let Some(t) = &self.cluster_s {
            t.store(s.to_bits(), Ordering::Release);
        }
        let lag = (self.wall_now_s() - s).max(0.0);
        if lag > self.lag_max_s() {
            self.lag_max_s.store(lag.to_bits(), Ordering::Relaxed);
        }
    }

    /// The largest lag of the cluster's time behind the wall's so far (service seconds).
    pub fn lag_max_s(&self) -> f64 {
        f64::from_bits(self.lag_max_s.load(Ordering::Relaxed))
    }

    /// Wall time for `s` service seconds.
    pub fn wall(&self, s: f64) -> Duration {
        Duration::from_secs_f64((s / self.speed).max(0.0))
    }

    /// Service seconds per wall second.
    pub fn speed(&self) -> f64 {
        self.speed
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What the service shares between its loop and its API.
pub struct Shared {
    /// The core.
    pub core: Mutex<ServiceCore>,
    /// Service time.
    pub clock: ServiceClock,
    /// The API's bearer token.
    pub token: Secret,
    /// Set after the first tick.
    pub ready: AtomicBool,
    /// The service's own metrics.
    pub metrics: api::ServiceMetrics,
    /// The actuator backends behind the audit log.
    pub actuators: Dispatcher,
    /// What the request router did.
    pub router_stats: Mutex<router::RouterStats>,
    /// The router's streaming requests with no first token yet (what `move-queued` may take back).
    pub unstarted: Arc<router::Unstarted>,
    /// How long the router holds a request for a pool with no serving instance (service seconds).
    pub router_hold_s: f64,
    /// How the router spreads a pool's requests over its instances.
    pub router_balance: telemetry::Balance,
    /// Where telemetry goes: the embedded store (`[telemetry.store]`), when enabled.
    pub store: Option<telemetry::ingest::StoreWriter>,
    /// And the InfluxDB v2 sink (`[telemetry.influx]` with a `url`), with its spool.
    pub influx: Option<telemetry::sink::InfluxSink>,
    /// Wall time (ms since the Unix epoch) of service time zero: samples are stamped from it.
    pub epoch_ms: i64,
}

/// A running service.
pub struct RunningService {
    /// The API's address.
    pub addr: std::net::SocketAddr,
    /// The request router's address, when `[router]` is set.
    pub router_addr: Option<std::net::SocketAddr>,
    /// Its shared state.
    pub shared: Arc<Shared>,
    /// Set when a twin cluster's workload is over (with the twin's totals).
    pub finished: watch::Receiver<Option<Arc<TwinTotals>>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningService {
    /// Stop: no more ticks, clocks reset, state saved.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        self.task.await.context("the service task panicked")?
    }

    /// Wait until the service ends by itself (it does not, unless it fails).
    pub async fn wait(self) -> Result<()> {
        let RunningService { task, shutdown, .. } = self;
        let r = task.await.context("the service task panicked")?;
        drop(shutdown);
        r
    }
}

/// Raise this process's soft open-files limit to its hard limit (each of the
/// router's client connections, and each engine connection, is a
/// descriptor), logged; returns the soft limit now (`None` where unknown).
pub fn raise_open_files_limit() -> Option<u64> {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => {
            tracing::info!(soft, hard = before.map(|b| b.1), was = before.map(|b| b.0), "open-files limit");
            Some(soft)
        }
        Err(e) => {
            tracing::warn!(soft = before.map(|b| b.0), "cannot raise the open-files limit: {e}");
            before.map(|b| b.0)
        }
    }
}

/// The controller settings a policy implies.
pub fn controller_config(cfg: &ServiceConfig, profile: &ProfileTable) -> Result<ControllerConfig> {
    let policy = Policy::parse(&cfg.service.policy).map_err(anyhow::Error::msg)?;
    let loops =
        policy.loops().unwrap_or(Loops { scale: false, shard: false, clock: false, pools: policy.pool_count() > 1 });
    let max_clock = profile.clocks(RequestClass::ALL[8], 8).into_iter().max().unwrap_or(1980);
    let mut c = ControllerConfig::new(loops, max_clock);
    let s = &cfg.controller;
    c.scale_period_s = s.scale_period_s;
    c.shard_period_s = s.shard_period_s;
    c.clock_period_s = s.clock_period_s;
    c.max_util = s.max_util;
    c.warm_spawn = s.warm_spawn;
    c.spawn_lead_s = s.spawn_lead_s;
    c.clock_hold_s = s.clock_hold_s;
    c.clock_down_sigmas = s.clock_down_sigmas;
    c.mix_hysteresis = s.mix_hysteresis;
    c.retire_min_age_s = s.retire_min_age_s;
    c.clock_margin_floor = s.clock_margin_floor;
    c.attainment_comfort = s.attainment_comfort;
    // On where something carries it out: the in-process twin, or the request router.
    c.move_queued = s.move_queued.unwrap_or(cfg.cluster.kind == "twin" || cfg.router.listen.is_some());
    c.reshard_in_place = s.reshard_in_place.unwrap_or(cfg.cluster.kind == "twin");
    if let (Some(t), true) = (&s.tps, loops.shard) {
        c.tps = t.clone();
    }
    if let Some(b) = s.gpu_budget {
        c.gpu_budget = b;
    }
    // An external cluster's declared GPUs bound every pool's plan (and the core every spawn).
    if let (Some(g), false) = (cfg.cluster.gpus, cfg.cluster.kind == "twin") {
        c.gpu_budget = c.gpu_budget.min(g);
    }
    if !loops.scale && !loops.shard {
        c.fixed_instances = Some(s.fixed_instances.unwrap_or(4));
    }
    c.power_budget_w = cfg.budget.power_w;
    c.power_budget_periods =
        config::budget_periods(&cfg.budget.schedule, "budget.schedule").map_err(anyhow::Error::msg)?;
    if let Some(p) = &cfg.budget.priority {
        c.class_priority = config::class_priority(p).map_err(|e| anyhow::anyhow!("budget.priority: {e}"))?;
    }
    Ok(c)
}

/// Start the service: bind the API, recover or create the state, start the
/// cluster backend and the loop. Returns once the API listens.
pub async fn start(cfg: ServiceConfig) -> Result<RunningService> {
    let token = cfg.token()?;
    let open_files = raise_open_files_limit();
    let mut profile = match &cfg.service.profile {
        Some(p) => ProfileTable::load(p)?,
        None => ProfileTable::bundled(),
    };
    profile.set_slo_multiplier(cfg.service.slo_multiplier);
    let ccfg = controller_config(&cfg, &profile)?;
    let pools = if ccfg.loops.pools { CLASS_COUNT } else { 1 };
    let mut core_cfg = CoreConfig {
        controller: ccfg.clone(),
        stale_after_s: cfg.service.stale_after_s,
        pool_names: (0..pools)
            .map(|p| if pools == 1 { "all".to_string() } else { RequestClass::from_index(p).to_string() })
            .collect(),
        retire_ack_means_stopped: cfg.cluster.kind != "twin",
        declared_gpus: cfg.cluster.gpus.filter(|_| cfg.cluster.kind != "twin"),
    };
    let dir = cfg.service.state_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create state_dir {}", dir.display()))?;
    let twin = cfg.cluster.kind == "twin";
    // A twin starts afresh every time (it is the cluster); a real cluster's state is recovered.
    let saved = if twin { None } else { load_state(&dir)? };
    let offset = saved.as_ref().map_or(0.0, |s| s.saved_at_s);
    // The objective's hours: service time zero is `offset` seconds before now.
    let unix_now_s =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let objective = match objective_of(&cfg, unix_now_s - offset).await {
        Ok(o) => o,
        // An intensity API that does not answer at start does not stop the service: it plans for
        // energy alone until the hourly read succeeds.
        Err(e) if objective_is_live(&cfg) => {
            tracing::error!(error = %e, "the objective's intensity forecast could not be read: energy alone until it can (read again every hour)");
            controller::control::Objective::energy()
        }
        Err(e) => return Err(e),
    };
    if objective.weighs_gpus() {
        tracing::info!(objective = %objective.name, terms = %objective.terms, "the plan weighs GPUs held against energy");
    }
    core_cfg.controller.objective = objective;
    // The budget schedule's hours: the local time of day at service time zero.
    core_cfg.controller.budget_day_offset_s =
        (unix_now_s - offset + cfg.budget.utc_offset_h * 3600.0).rem_euclid(86_400.0);
    let clock = if twin {
        ServiceClock::cluster_kept(cfg.service.speed, offset)
    } else {
        ServiceClock::new(cfg.service.speed, offset)
    };
    let (mut core, recovered) = match saved {
        Some(s) => {
            tracing::info!(pending = s.pending.len(), instances = s.instances.len(), "recovered the saved state");
            (ServiceCore::restore(core_cfg, profile.clone(), s, offset).map_err(anyhow::Error::msg)?, true)
        }
        None => (ServiceCore::new(core_cfg, profile.clone(), 0.0), false),
    };
    if let Some(r) = cfg.service.max_class_rps {
        core.set_max_class_rps(r);
    }
    if let (false, Some(n)) = (twin, cfg.cluster.baseline_instances) {
        core.set_baseline_instances(n);
        tracing::info!(
            instances = n,
            "savings are measured against a static fleet of this many TP8 instances at the top clock"
        );
    }
    tracing::info!(max_class_rps = core.max_class_rps(), "arrival telemetry beyond this rate per class is refused");
    if !recovered {
        core.set_mode(Mode::parse(&cfg.service.mode).map_err(anyhow::Error::msg)?);
        if let Some(m) = &cfg.service.initial_class_rps {
            let mut d = [0.0; CLASS_COUNT];
            for (k, v) in m {
                if let Ok(c) = RequestClass::parse(k) {
                    d[c.index()] = *v;
                }
            }
            core.prime_rates(d);
        }
    }
    let (routing_tx, routing_rx) = watch::channel(core.routes());
    let timeout = Duration::from_secs_f64(cfg.service.action_timeout_s / cfg.service.speed.max(1.0))
        .max(Duration::from_millis(50));
    // The embedded store (default under state_dir): telemetry, and the audit log of a real cluster.
    let tcfg = cfg.telemetry_config()?;
    let store = if tcfg.store.enabled {
        let explicit = cfg.telemetry.as_ref().and_then(|t| t.get("store")).and_then(|s| s.get("data_dir")).is_some();
        let data_dir = if explicit { tcfg.store.data_dir.clone() } else { store_dir(&dir) };
        let s = telemetry::store::Store::open(&data_dir, tcfg.store.retention())
            .with_context(|| format!("telemetry store in {}", data_dir.display()))?;
        Some(Arc::new(s))
    } else {
        None
    };
    // The InfluxDB v2 sink: every point the store gets goes there too, through its spool
    // (a relative spool_dir lives under state_dir).
    let influx = match telemetry::sink::SinkOptions::from_config(&tcfg.influx) {
        Some(mut o) => {
            if o.spool_dir.is_relative() {
                o.spool_dir = dir.join(&o.spool_dir);
            }
            tracing::info!(url = %o.url, bucket = %o.bucket, spool = %o.spool_dir.display(), "InfluxDB sink on");
            Some(telemetry::sink::InfluxSink::spawn(o).with_context(|| format!("{}: telemetry.influx", cfg.origin))?)
        }
        None => None,
    };
    let unstarted = Arc::new(router::Unstarted::default());
    let mut samples_rx: Option<mpsc::Receiver<telemetry::sample::Sample>> = None;
    let mut scrape_tx: Option<(mpsc::Sender<telemetry::sample::Sample>, Duration)> = None;
    let mut prom_tx: Option<(mpsc::Sender<telemetry::sample::Sample>, telemetry::prom_query::PromSource)> = None;
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let (dispatcher, twin_events) = if twin {
        let (d, events) =
            twin_backend(&cfg, &mut core, clock.clone(), routing_rx, pools, ccfg.clock_period_s, &dir, timeout)?;
        (d, Some(events))
    } else {
        let mut mqtt = telemetry::mqtt::MqttSettings::from_config(&tcfg.mqtt)
            .map_err(|e| anyhow::anyhow!("{}: telemetry.{e}", cfg.origin))?;
        // Left at its default, the client id is this process's own: two controllers on one
        // broker with the shipped id would throw each other off. (The agents' ids are their
        // site and node: stable, so the broker keeps their commands while they are away.)
        if let Some(m) = mqtt.as_mut() {
            if tcfg.mqtt.client_id == telemetry::config::MqttConfig::default().client_id {
                m.client_id = telemetry::mqtt::process_client_id(&m.client_id);
            }
        }
        let audit = Arc::new(match &store {
            Some(s) => AuditLog::in_store(s.clone())?,
            None => AuditLog::open_in_dir(&dir)?,
        });
        let mut d = actuators::build(&cfg.actuators_config()?, audit, mqtt.as_ref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.origin))?;
        if d.backend_names().is_empty() {
            anyhow::bail!("{}: cluster.kind = \"external\" needs at least one [actuators] backend", cfg.origin);
        }
        if cfg.router.listen.is_some() {
            // The router holds the streams: it carries out move-queued, before any backend.
            d.push_front(Arc::new(router::RouterMover::new(unstarted.clone())), timeout);
        }
        let (tx, rx) = mpsc::channel(4096);
        if cfg.cluster.scrape_interval_s > 0.0 {
            scrape_tx = Some((tx.clone(), Duration::from_secs_f64(cfg.cluster.scrape_interval_s)));
        }
        if let Some(src) = telemetry::prom_query::PromSource::from_config(&tcfg.prometheus)
            .map_err(|e| anyhow::anyhow!("{}: telemetry.{e}", cfg.origin))?
        {
            prom_tx = Some((tx.clone(), src));
        }
        if let Some(m) = mqtt {
            let mut m = m;
            m.client_id = format!("{}-collector", m.client_id);
            keep.push(Box::new(telemetry::mqtt::MqttCollector::spawn(m, tx.clone())));
        }
        samples_rx = Some(rx);
        (d, None)
    };
    // An external router told by `route` commands gets each class's route once its new pool serves,
    // and retires wait for it; the built-in router and the twin follow the table in effect themselves.
    let probe = actuators::Action::Route { class: RequestClass::from_index(0).to_string(), pool: actuators::PoolId(0) };
    core.set_routes_to_backends(!twin && cfg.router.listen.is_none() && dispatcher.carries(&probe));
    // A real cluster's attainment: what the router measures, else the engines' own histograms.
    core.set_attainment_from_engines(!twin && cfg.learn_from() == "engines");
    let shared = Arc::new(Shared {
        core: Mutex::new(core),
        clock,
        token,
        ready: AtomicBool::new(false),
        metrics: api::ServiceMetrics::new()?,
        actuators: dispatcher,
        router_stats: Mutex::new(router::RouterStats::default()),
        unstarted,
        router_hold_s: cfg.router.hold_s,
        router_balance: cfg.router.balance,
        store: store.map(|s| {
            telemetry::ingest::StoreWriter::spawn(
                s,
                tcfg.store.flush_interval(),
                Duration::from_secs(tcfg.store.maintenance_interval_s.max(1)),
            )
        }),
        influx,
        epoch_ms: wall_ms() as i64,
    });
    if let Some(sink) = &shared.influx {
        shared.metrics.register(|r| sink.stats.register(r)).context("InfluxDB sink metrics")?;
    }
    if let Some((tx, every)) = scrape_tx {
        for d in cfg.cluster.dcgm.clone() {
            keep.push(Box::new(AbortOnDrop(tokio::spawn(scrape::dcgm(d, tx.clone(), every)))));
        }
        keep.push(Box::new(AbortOnDrop(tokio::spawn(scrape::engines(shared.clone(), tx, every)))));
    }
    if objective_is_live(&cfg) {
        let (c, sh, t0) = (cfg.clone(), shared.clone(), unix_now_s - offset);
        keep.push(Box::new(AbortOnDrop(tokio::spawn(async move {
            let mut every = tokio::time::interval(OBJECTIVE_REFRESH);
            // The first tick is now, and the objective was built a moment ago.
            every.tick().await;
            loop {
                every.tick().await;
                match objective_of(&c, t0).await {
                    Ok(o) => {
                        tracing::info!(objective = %o.name, terms = %o.terms, "the objective's intensity forecast read again");
                        if let Ok(mut core) = sh.core.lock() {
                            core.set_objective(o);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "the objective's intensity forecast could not be read again; the last one stays"),
                }
            }
        }))));
    }
    if let Some((tx, src)) = prom_tx {
        tracing::info!(url = %src.url, every_s = src.interval.as_secs_f64(), "engine and GPU telemetry from Prometheus");
        if cfg.cluster.scrape_interval_s > 0.0 {
            tracing::warn!(
                "telemetry.prometheus and cluster.scrape_interval_s both read the engines: each engine's \
                 samples arrive twice (set scrape_interval_s = 0 to read them from Prometheus only)"
            );
        }
        if src.interval.as_secs_f64() * cfg.service.speed >= cfg.service.stale_after_s {
            tracing::warn!(
                interval_s = src.interval.as_secs_f64(),
                stale_after_s = cfg.service.stale_after_s,
                "telemetry.prometheus.interval_s is not below service.stale_after_s: expect failsafe between queries"
            );
        }
        keep.push(Box::new(AbortOnDrop(tokio::spawn(scrape::prometheus(shared.clone(), tx, src)))));
    }
    let listener = tokio::net::TcpListener::bind(&cfg.service.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.service.listen))?;
    let addr = listener.local_addr()?;
    let app = api::router(shared.clone());
    let (stop_api_tx, stop_api_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_api_rx.await;
            })
            .await;
    });
    let router_addr = match &cfg.router.listen {
        Some(l) => {
            let listener =
                tokio::net::TcpListener::bind(l).await.with_context(|| format!("router: cannot listen on {l}"))?;
            let addr = listener.local_addr()?;
            let app = router::router(shared.clone(), router::RouterSettings::from_config(&cfg)?);
            let limits = router::conn::ConnLimits::from_config(&cfg.router, open_files);
            tracing::info!(
                %addr,
                max_connections = limits.max_connections,
                client_keys = !cfg.router.client_keys.is_empty() || cfg.router.client_keys_file.is_some(),
                "router up"
            );
            tokio::spawn(router::conn::serve(listener, app, limits, shared.clone()));
            Some(addr)
        }
        None => None,
    };
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let shared2 = shared.clone();
    let (finished_tx, finished_rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let r =
            run_loop(shared2, dir, twin_events, samples_rx, routing_tx, shutdown_rx, finished_tx, stop_api_tx).await;
        drop(keep);
        r
    });
    tracing::info!(%addr, "dynamollm serve: API up");
    Ok(RunningService { addr, router_addr, shared, finished: finished_rx, shutdown: Some(shutdown_tx), task })
}

/// The in-process twin as the cluster (`cluster.kind = "twin"`): see [`twin::backend`].
#[cfg(feature = "twin")]
#[allow(clippy::too_many_arguments)]
fn twin_backend(
    cfg: &ServiceConfig,
    core: &mut ServiceCore,
    clock: ServiceClock,
    routing: watch::Receiver<crate::core::Routes>,
    pools: usize,
    clock_period_s: f64,
    dir: &Path,
    timeout: Duration,
) -> Result<(Dispatcher, mpsc::UnboundedReceiver<TwinEvent>)> {
    twin::backend(cfg, core, clock, routing, pools, clock_period_s, dir, timeout)
}

/// Built without the twin: `cluster.kind = "twin"` is refused, naming the feature.
#[cfg(not(feature = "twin"))]
#[allow(clippy::too_many_arguments)]
fn twin_backend(
    cfg: &ServiceConfig,
    _core: &mut ServiceCore,
    _clock: ServiceClock,
    _routing: watch::Receiver<crate::core::Routes>,
    _pools: usize,
    _clock_period_s: f64,
    _dir: &Path,
    _timeout: Duration,
) -> Result<(Dispatcher, mpsc::UnboundedReceiver<TwinEvent>)> {
    anyhow::bail!("{}: cluster.kind = \"twin\" needs the service built with its `twin` feature", cfg.origin)
}

/// Telemetry points to the embedded store and the InfluxDB sink (one copy each).
async fn write_points(shared: &Shared, points: Vec<telemetry::sample::Point>) {
    if let Some(sink) = &shared.influx {
        // Never holds up the loop: a sink that far behind drops (and counts) the points.
        sink.try_send(points.clone());
    }
    if let Some(w) = &shared.store {
        w.write(points).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_loop(
    shared: Arc<Shared>,
    dir: PathBuf,
    mut twin_events: Option<mpsc::UnboundedReceiver<TwinEvent>>,
    mut samples: Option<mpsc::Receiver<telemetry::sample::Sample>>,
    routing_tx: watch::Sender<crate::core::Routes>,
    mut shutdown: oneshot::Receiver<()>,
    finished: watch::Sender<Option<Arc<TwinTotals>>>,
    stop_api: oneshot::Sender<()>,
) -> Result<()> {
    let clock = shared.clock.clone();
    let period_s = shared.core.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.config_clock_period_s();
    let mut tick = tokio::time::interval(clock.wall(period_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<(ActionId, Outcome)>();
    let cluster_ticks = twin_events.is_some();
    let mut gpu_counters = reports::GpuCounters::default();
    // Commands left in flight by a previous run go out again, same ids; in dry-run none does
    // (they are forgotten, as commands never sent).
    let (resend, epoch) = {
        let mut core = shared.core.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let pending: Vec<Command> = core.pending().cloned().collect();
        if !pending.is_empty() && !core.may_send(core.mode_epoch()) {
            tracing::warn!(
                n = pending.len(),
                mode = core.mode().name(),
                "the commands in flight before the restart are not sent"
            );
            let why = format!("restarted in {}", core.mode().name());
            for c in &pending {
                core.cancel(&c.id, &why);
            }
            let now = clock.now_s();
            save_state(&dir, &core.save(now))?;
            (Vec::new(), core.mode_epoch())
        } else {
            (pending, core.mode_epoch())
        }
    };
    if !resend.is_empty() {
        tracing::info!(n = resend.len(), "re-sending the commands in flight before the restart");
        send(&shared, resend, epoch, &out_tx);
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // On a real cluster the service ticks on the wall clock (the twin ticks it in its own time).
            _ = tick.tick(), if !cluster_ticks => {
                let (cmds, epoch) = tick_once(&shared, &dir, &routing_tx, clock.now_s()).await;
                send(&shared, cmds, epoch, &out_tx);
            }
            Some((id, outcome)) = out_rx.recv() => {
                if let Ok(mut core) = shared.core.lock() {
                    core.on_outcome(&id, &outcome);
                }
            }
            Some(sample) = async { match samples.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                let now = clock.now_s();
                if let Ok(mut core) = shared.core.lock() {
                    core.observe_sample(now, &sample);
                }
                write_points(&shared, sample.points()).await;
            }
            Some(ev) = async { match twin_events.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                match ev {
                    TwinEvent::Report { now_s, instances, arrivals, arrival_tokens, attainment, baseline } => {
                        let pools: Vec<(u32, u32)> = if let Ok(mut core) = shared.core.lock() {
                            core.observe_arrivals(now_s, &arrivals);
                            core.observe_attainment(*attainment);
                            for r in &instances {
                                core.observe_instance(now_s, r);
                            }
                            if let Some((energy_j, power_w)) = baseline {
                                core.observe_baseline(energy_j, power_w);
                            }
                            core.instances().map(|r| (r.id.0, r.pool)).collect()
                        } else {
                            Vec::new()
                        };
                        if shared.store.is_some() || shared.influx.is_some() {
                            let ts_ms = shared.epoch_ms + (now_s * 1000.0) as i64;
                            write_points(&shared, gpu_counters.samples(ts_ms, &instances, &pools, &arrivals, &arrival_tokens)).await;
                        }
                    }
                    TwinEvent::Tick { now_s, done } => {
                        // The twin waits: decide, then apply every command of this tick, in order.
                        let (cmds, epoch) = tick_once(&shared, &dir, &routing_tx, now_s).await;
                        for cmd in cmds {
                            if let Some(outcome) = dispatch_if_allowed(&shared, &cmd, epoch).await {
                                if let Ok(mut core) = shared.core.lock() {
                                    core.on_outcome(&cmd.id, &outcome);
                                }
                            }
                        }
                        let _ = done.send(());
                    }
                    TwinEvent::Finished(totals) => {
                        if let Ok(mut core) = shared.core.lock() {
                            core.set_finished();
                        }
                        finished.send_replace(Some(Arc::from(totals)));
                        twin_events = None;
                    }
                }
            }
        }
    }
    // Graceful: every instance back to the top clock (through the backends that set
    // clocks, edge agents included), each backend's own reset, state saved, API down.
    let now = clock.now_s();
    let cmds = shared.core.lock().map(|mut c| c.shutdown_commands(now, wall_ms())).unwrap_or_default();
    if !cmds.is_empty() {
        let saved = shared.core.lock().map(|c| c.save(now)).map_err(|_| anyhow::anyhow!("poisoned"))?;
        save_state(&dir, &saved)?;
        let all = async {
            for cmd in &cmds {
                let outcome = shared
                    .actuators
                    .dispatch(cmd)
                    .await
                    .unwrap_or_else(|e| Outcome::Failed { reason: e.to_string(), retryable: true });
                if let Ok(mut core) = shared.core.lock() {
                    core.on_outcome(&cmd.id, &outcome);
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), all).await.is_err() {
            tracing::error!("shutdown: not every clock was reset within 10 s");
        }
    }
    for (backend, e) in shared.actuators.reset_all().await {
        tracing::error!(backend, "reset at shutdown failed: {e}");
    }
    let now = clock.now_s();
    let saved = shared.core.lock().map(|c| c.save(now)).map_err(|_| anyhow::anyhow!("poisoned"))?;
    save_state(&dir, &saved)?;
    if let Some(sink) = &shared.influx {
        // What the server does not take in time stays in the spool for the next start.
        if tokio::time::timeout(Duration::from_secs(5), sink.flush()).await.is_err() {
            tracing::warn!(
                "shutdown: the InfluxDB server did not take everything within 5 s; the rest waits in the spool"
            );
        }
    }
    if let Some(w) = &shared.store {
        if let Err(e) = w.flush().await {
            tracing::error!("shutdown: the telemetry store did not flush: {e}");
        }
    }
    let _ = stop_api.send(());
    Ok(())
}

/// A task aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One control step at `now` (service seconds): the core decides, the state
/// is saved (write-ahead: the plan and the commands are on disk before
/// anything acts), the routing table published. Returns the commands to send
/// and the mode epoch they were decided in. When the state cannot be saved,
/// nothing is sent: the tick's commands are cancelled and the service is in
/// failsafe, saying why, until a save succeeds.
///
/// The core is locked only to decide and to take the snapshot: the file is
/// written and synced on a blocking thread with the lock released, so the
/// router (which takes the lock on every request) never waits for a disk.
async fn tick_once(
    shared: &Shared,
    dir: &Path,
    routing_tx: &watch::Sender<crate::core::Routes>,
    now: f64,
) -> (Vec<Command>, u64) {
    let started = std::time::Instant::now();
    let (mut cmds, saved) = {
        let Ok(mut core) = shared.core.lock() else { return (Vec::new(), 0) };
        let cmds = core.tick(now, wall_ms());
        (cmds, core.save(now))
    };
    let written = {
        let dir = dir.to_path_buf();
        match tokio::task::spawn_blocking(move || save_state(&dir, &saved)).await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the state writer failed: {e}")),
        }
    };
    let Ok(mut core) = shared.core.lock() else { return (Vec::new(), 0) };
    match written {
        Ok(()) => {
            if core.unsaved().is_some() {
                tracing::info!("the state is saved again: failsafe lifted");
                core.set_unsaved(None);
            }
        }
        Err(e) => {
            let why = format!("{e:#}");
            if core.unsaved().is_none() {
                tracing::error!("cannot save the state, so nothing is sent (failsafe): {why}");
            }
            core.set_unsaved(Some(why));
            for c in cmds.drain(..) {
                core.cancel(&c.id, "the state that records it could not be saved");
            }
        }
    }
    let (routing, epoch) = (core.routes(), core.mode_epoch());
    drop(core);
    routing_tx.send_replace(routing);
    shared.metrics.observe_tick(started.elapsed());
    shared.ready.store(true, Ordering::Relaxed);
    (cmds, epoch)
}
