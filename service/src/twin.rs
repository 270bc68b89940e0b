//! The `twin` cluster backend, and the service's only use of the twin's crate
//! (`sim`, behind the `twin` feature): the digital twin replaying a workload
//! on its own thread, in (accelerated) service time, as the cluster `serve`
//! manages.
//! It takes actions through [`TwinActuator`] (an [`Actuator`] like any other)
//! and reports what telemetry would: every instance's state, load, power and
//! energy, per-class arrivals and SLO counters. The service learns nothing
//! else from it — no physics crosses over.

use crate::config::ServiceConfig;
use crate::core::ServiceCore;
use crate::core::{InstanceReport, ReportedState};
use crate::reports::TwinEvent;
use crate::ServiceClock;
use actuators::{Action, Actuator, Command, InstanceId, Outcome, Placement, ReshardPath, SpawnFrom};
use actuators::{AuditLog, Dispatcher};
use forecast::MinuteCounts;
use sim::engine::Lifecycle;
use sim::measure::{class_slos, SloRule};
use sim::Workload;
use sim::{ClassSlo, Cluster, ClusterSpec, Physics, PoolSpec};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;
use telemetry::{ClassBoundaries, RequestClass, CLASS_COUNT};
use tokio::sync::{mpsc, oneshot, watch};

/// Set the twin up as the service's cluster: its physics and workload from
/// `[cluster]`, the SLOs it measures against, the first minutes' rates primed
/// (the fleet the service finds at start is up already, as in `dynamollm
/// sim`), a fresh audit log (the twin is a new cluster every time), and its
/// actuator as the only backend.
#[allow(clippy::too_many_arguments)]
pub fn backend(
    cfg: &ServiceConfig,
    core: &mut ServiceCore,
    clock: ServiceClock,
    routing_rx: watch::Receiver<crate::core::Routes>,
    pools: usize,
    clock_period_s: f64,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<(Dispatcher, mpsc::UnboundedReceiver<TwinEvent>)> {
    let (physics, workload) = physics_and_workload(cfg)?;
    let c = &cfg.cluster;
    let slo = class_slos(
        &physics,
        &workload.slo_pairs,
        &ClassBoundaries::default(),
        SloRule::Multiplier(cfg.service.slo_multiplier),
    );
    // The fleet the service finds at start is up already: the first tick's spawns serve at once,
    // and the rates of the first minutes are known (as in `dynamollm sim`).
    if let Ok(Ok(first)) = workload.first_hours(5.0 / 60.0).class_arrivals().map(MinuteCounts::of) {
        core.prime_rates(first.peak(0, 5));
    }
    core.first_fleet_up();
    let settings = TwinSettings {
        physics,
        workload,
        slo,
        pools,
        tick_every_s: clock_period_s,
        report_every_s: clock_period_s / 2.0,
        baseline_instances: c.baseline_instances,
    };
    let (act, events) = start(settings, clock, routing_rx)?;
    // The twin is a new cluster every time: so is its audit log.
    let audit_dir = dir.join("twin-audit");
    let _ = std::fs::remove_dir_all(&audit_dir);
    std::fs::create_dir_all(&audit_dir)?;
    let audit = Arc::new(AuditLog::open_in_dir(&audit_dir)?);
    Ok((Dispatcher::new(audit).with_backend(act as Arc<dyn Actuator>, timeout), events))
}

/// The twin `[cluster]` describes: its physics (the router's balance as
/// `[router]` sets it) and the workload it replays. The live baseline is sized
/// on the same two.
pub fn physics_and_workload(cfg: &ServiceConfig) -> anyhow::Result<(Physics, Workload)> {
    let c = &cfg.cluster;
    let mut physics = match &c.physics {
        Some(p) => sim::Physics::load(p)?,
        None => sim::Physics::default_h100_llama70b(),
    };
    physics.router.balance = cfg.router.balance;
    let workload =
        Workload::from_options(c.trace.as_deref(), c.rates.as_deref(), c.lengths.as_deref(), c.scale, c.hours, c.seed)?;
    Ok((physics, workload))
}

type Job = (Command, oneshot::Sender<Outcome>);

/// The actuator that acts on the twin.
pub struct TwinActuator {
    tx: std_mpsc::Sender<Job>,
}

#[async_trait::async_trait]
impl Actuator for TwinActuator {
    fn name(&self) -> &str {
        "twin"
    }

    fn supports(&self, _action: &Action) -> bool {
        true
    }

    async fn apply(&self, cmd: &Command) -> Outcome {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((cmd.clone(), tx)).is_err() {
            return Outcome::Failed { reason: "the twin has stopped".into(), retryable: false };
        }
        rx.await.unwrap_or(Outcome::Failed { reason: "the twin has stopped".into(), retryable: false })
    }
}

/// Settings of the twin cluster.
#[derive(Debug, Clone)]
pub struct TwinSettings {
    /// Its physics.
    pub physics: Physics,
    /// What it replays.
    pub workload: Workload,
    /// The SLOs it measures attainment against (ground truth).
    pub slo: [ClassSlo; CLASS_COUNT],
    /// Pools (one per class, or one for all).
    pub pools: usize,
    /// How often the service ticks (twin seconds): the twin stops at each tick
    /// until the service has decided and its commands are applied.
    pub tick_every_s: f64,
    /// How often it reports (twin seconds).
    pub report_every_s: f64,
    /// The live baseline: this many `single-pool` instances (TP8 at the top
    /// clock, one pool for every class) replaying the same arrivals beside the
    /// managed cluster, as `sim` replays `single-pool`.
    pub baseline_instances: Option<u32>,
}

/// Start the twin on its own thread. Returns its actuator and its event stream;
/// `routing` carries the controller's class → pool table.
pub fn start(
    s: TwinSettings,
    clock: ServiceClock,
    routing: watch::Receiver<crate::core::Routes>,
) -> anyhow::Result<(Arc<TwinActuator>, mpsc::UnboundedReceiver<TwinEvent>)> {
    let (job_tx, job_rx) = std_mpsc::channel::<Job>();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    // Open the workload here so a bad file fails the start, not the thread.
    let _ = s.workload.arrivals()?;
    anyhow::ensure!(s.tick_every_s > 0.0 && s.report_every_s > 0.0, "the twin's tick and report periods must be > 0");
    std::thread::Builder::new().name("twin".into()).spawn(move || {
        if let Err(e) = run(s, clock, routing, job_rx, ev_tx) {
            tracing::error!("the twin stopped: {e:#}");
        }
    })?;
    Ok((Arc::new(TwinActuator { tx: job_tx }), ev_rx))
}

/// The `single-pool` layout the live baseline runs: `n` TP8 instances at the top clock, one pool.
pub fn single_pool_spec(physics: &Physics, n: u32) -> ClusterSpec {
    ClusterSpec {
        pools: vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }],
        instances: (0..n).map(|_| sim::InstanceSpec { pool: 0, tp: 8, clock_mhz: physics.gpu.clock_max_mhz }).collect(),
    }
}

/// Energy (J) and power (W) of a cluster at `t`.
fn energy_power(c: &Cluster<'_>, physics: &Physics, t: f64) -> (f64, f64) {
    c.instances.iter().fold((0.0, 0.0), |(e, p), i| {
        (e + i.energy_at(physics, t), p + i.power_per_gpu_w_at(physics, t) * f64::from(i.tp))
    })
}

/// The twin's loop, in its own time. It moves from one stop to the next (each
/// report, each tick of the service), arrivals each at its own time; at a tick
/// it hands the service its time and applies the commands of that tick before
/// it goes on. So what happens depends on the seed only, never on the speed:
/// the wall clock only paces it (it waits when it is ahead of `speed` times the
/// wall, and records its lag when it is behind).
fn run(
    s: TwinSettings,
    clock: ServiceClock,
    routing: watch::Receiver<crate::core::Routes>,
    jobs: std_mpsc::Receiver<Job>,
    events: mpsc::UnboundedSender<TwinEvent>,
) -> anyhow::Result<()> {
    let spec = ClusterSpec {
        pools: (0..s.pools)
            .map(|p| PoolSpec {
                name: if s.pools == 1 { "all".into() } else { RequestClass::from_index(p).to_string() },
                classes: if s.pools == 1 { RequestClass::ALL.to_vec() } else { vec![RequestClass::from_index(p)] },
            })
            .collect(),
        instances: vec![],
    };
    let boundaries = ClassBoundaries::default();
    let predictor_seed = s.workload.seed ^ sim::PREDICTOR_SEED;
    let mut cluster = Cluster::new(&s.physics, &spec, boundaries, s.slo);
    cluster.set_predictor_accuracy(s.workload.predictor_accuracy, predictor_seed);
    let base_spec = s.baseline_instances.map(|n| single_pool_spec(&s.physics, n));
    let mut base = base_spec.as_ref().map(|b| {
        let mut c = Cluster::new(&s.physics, b, boundaries, s.slo);
        c.set_predictor_accuracy(s.workload.predictor_accuracy, predictor_seed);
        c
    });
    let mut ids: HashMap<InstanceId, usize> = HashMap::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut arrivals = s.workload.arrivals()?.peekable();
    let mut counts = [0u32; CLASS_COUNT];
    let mut tokens = [0.0f64; CLASS_COUNT];
    let (mut next_report, mut next_tick) = (0.0f64, 0.0f64);
    let end_s = s.workload.span_s;
    let mut first_tick = true;
    loop {
        let stop = next_report.min(next_tick);
        // Paced by the wall: no further ahead than `speed` times it.
        let ahead_s = stop - clock.wall_now_s();
        if ahead_s > 0.0 {
            std::thread::sleep(clock.wall(ahead_s).min(Duration::from_millis(50)));
            continue;
        }
        // Arrivals up to the stop, in order, each at its own time.
        while let Some(r) = arrivals.peek() {
            match r {
                Ok(r) if r.arrival_s <= stop => {
                    cluster.advance_to(r.arrival_s.max(cluster.now_s()));
                    let class = boundaries.classify(r.input_tokens, r.output_tokens.max(1)).index();
                    counts[class] += 1;
                    tokens[class] += f64::from(r.input_tokens) + f64::from(r.output_tokens);
                    cluster.arrive(r);
                    if let Some(b) = base.as_mut() {
                        b.arrive(r);
                    }
                    arrivals.next();
                }
                Ok(_) => break,
                Err(_) => {
                    if let Some(Err(e)) = arrivals.next() {
                        tracing::error!("the twin's workload: {e}");
                    }
                }
            }
        }
        cluster.advance_to(stop.max(cluster.now_s()));
        if let Some(b) = base.as_mut() {
            b.advance_to(stop.max(b.now_s()));
        }
        clock.set_cluster_s(stop);
        let finished = arrivals.peek().is_none()
            && end_s.is_none_or(|e| stop >= e)
            && cluster.instances.iter().all(|i| i.is_empty());
        if stop >= next_report || finished {
            next_report = stop + s.report_every_s;
            let arrived = (std::mem::take(&mut counts), std::mem::take(&mut tokens));
            let ev = report(&s, &cluster, base.as_ref(), &mut ids, stop, arrived);
            if events.send(ev).is_err() {
                return Ok(());
            }
        }
        if finished {
            let end = end_s.unwrap_or(stop).max(stop);
            let _ = events.send(TwinEvent::Finished(Box::new(cluster.finish(end))));
            // Keep answering actions until the service lets go.
            while let Ok((_, reply)) = jobs.recv() {
                let _ = reply.send(Outcome::Failed { reason: "the twin's workload is over".into(), retryable: false });
            }
            return Ok(());
        }
        if stop >= next_tick {
            next_tick = stop + s.tick_every_s;
            // The service decides at this time; its commands are applied before the twin goes on
            // (those of the first tick at once: the fleet the service finds at start is up already).
            let (ticked_tx, mut ticked_rx) = oneshot::channel();
            if events.send(TwinEvent::Tick { now_s: stop, done: ticked_tx }).is_err() {
                return Ok(());
            }
            loop {
                match jobs.recv_timeout(Duration::from_micros(500)) {
                    Ok((cmd, reply)) => {
                        let _ = reply.send(apply(&mut cluster, &mut ids, &mut done, &cmd, first_tick));
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
                match ticked_rx.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => {}
                    // Done, or the service is gone (then the next send fails).
                    _ => break,
                }
            }
            first_tick = false;
            // Routing as the controller says, once the new pool serves (make before break).
            let routes = *routing.borrow();
            for class in RequestClass::ALL {
                // Classes the power budget sheds are turned away as they arrive.
                cluster.set_shed(class, routes.shed[class.index()]);
                let want = routes.pool[class.index()] as usize;
                if want >= cluster.pool_count() || cluster.route(class) == Some(want) {
                    continue;
                }
                let serving = |p: usize| {
                    cluster.pool_members(p).iter().any(|&i| cluster.instances[i].state == Lifecycle::Serving)
                };
                if serving(want) || !cluster.route(class).is_some_and(serving) {
                    cluster.set_route(class, Some(want));
                }
            }
        }
        if events.is_closed() {
            return Ok(());
        }
    }
}

/// A reading of the whole cluster at `now`: what telemetry would say.
fn report(
    s: &TwinSettings,
    cluster: &Cluster<'_>,
    base: Option<&Cluster<'_>>,
    ids: &mut HashMap<InstanceId, usize>,
    now: f64,
    (arrivals, arrival_tokens): ([u32; CLASS_COUNT], [f64; CLASS_COUNT]),
) -> TwinEvent {
    let mut reports = Vec::with_capacity(ids.len());
    ids.retain(|&id, &mut idx| {
        let i = &cluster.instances[idx];
        let state = match i.state {
            Lifecycle::Starting { .. } | Lifecycle::Resharding { .. } | Lifecycle::Standby => ReportedState::Starting,
            Lifecycle::Serving => ReportedState::Serving,
            Lifecycle::Draining => ReportedState::Draining,
            Lifecycle::Stopped => ReportedState::Stopped,
        };
        reports.push(InstanceReport {
            id,
            state,
            outstanding: i.outstanding() as u32,
            waiting: i.waiting() as u32,
            power_w: i.power_per_gpu_w_at(&s.physics, now) * f64::from(i.tp),
            energy_j: i.energy_at(&s.physics, now),
            clock_mhz: i.clock_mhz,
            tp: i.tp,
        });
        state != ReportedState::Stopped
    });
    let attainment = Box::new(std::array::from_fn(|c| {
        let k = &cluster.stats.classes[c];
        [k.ttft_ok, k.ttft_n, k.gaps_ok, k.gaps_n]
    }));
    let baseline = base.map(|b| energy_power(b, &s.physics, now));
    TwinEvent::Report { now_s: now, instances: reports, arrivals, arrival_tokens, attainment, baseline }
}

fn apply(
    cluster: &mut Cluster<'_>,
    ids: &mut HashMap<InstanceId, usize>,
    done: &mut HashSet<String>,
    cmd: &Command,
    instant: bool,
) -> Outcome {
    let placement = |idx: usize| Placement { node: format!("twin/{idx}"), gpus: Vec::new(), endpoint: None };
    if done.contains(&cmd.id.0) {
        let p = match cmd.action {
            Action::Spawn { instance, .. } => ids.get(&instance).map(|&i| placement(i)),
            _ => None,
        };
        return Outcome::Applied { placement: p, detail: "already applied".into() };
    }
    let unknown = |i: InstanceId| Outcome::Failed { reason: format!("no instance {}", i.0), retryable: false };
    let out = match cmd.action {
        Action::Spawn { instance, pool, tp, clock_mhz, from } => {
            if pool.0 as usize >= cluster.pool_count() {
                return Outcome::Failed { reason: format!("no pool {}", pool.0), retryable: false };
            }
            let idx = if instant {
                cluster.add_instance(pool.0 as usize, tp, clock_mhz, Lifecycle::Serving)
            } else {
                cluster.spawn(pool.0 as usize, tp, clock_mhz, from == SpawnFrom::WarmStandby)
            };
            ids.insert(instance, idx);
            Outcome::Applied { placement: Some(placement(idx)), detail: format!("TP{tp} at {clock_mhz} MHz") }
        }
        Action::Retire { instance } => match ids.get(&instance) {
            Some(&idx) => {
                cluster.retire(idx);
                Outcome::Applied { placement: None, detail: "draining".into() }
            }
            None => unknown(instance),
        },
        Action::SetClock { instance, clock_mhz } => match ids.get(&instance) {
            Some(&idx) => {
                cluster.set_clock(idx, clock_mhz);
                Outcome::Applied { placement: None, detail: format!("{clock_mhz} MHz") }
            }
            None => unknown(instance),
        },
        Action::Reshard { instance, tp, path } => match ids.get(&instance) {
            Some(&idx) => {
                cluster.reshard(idx, tp, path == ReshardPath::InPlace);
                Outcome::Applied { placement: None, detail: format!("to TP{tp}") }
            }
            None => unknown(instance),
        },
        // Routing follows the controller's table (see the loop).
        Action::Route { .. } => Outcome::Applied { placement: None, detail: "routing follows the table".into() },
        Action::MoveQueued { instance, pool, max_requests } => match ids.get(&instance) {
            Some(&idx) => {
                let moved = cluster.move_unstarted(idx, pool.0 as usize, max_requests);
                Outcome::Applied {
                    placement: None,
                    detail: format!("{moved} unstarted requests moved to pool {}", pool.0),
                }
            }
            None => unknown(instance),
        },
    };
    if out.is_applied() {
        done.insert(cmd.id.0.clone());
    }
    out
}
