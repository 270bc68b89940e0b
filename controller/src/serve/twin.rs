//! The `twin` cluster backend: the digital twin replaying a workload on its
//! own thread, in (accelerated) service time, as the cluster `serve` manages.
//! It takes actions through [`TwinActuator`] (an [`Actuator`] like any other)
//! and reports what telemetry would: every instance's state, load, power and
//! energy, per-class arrivals and SLO counters. The service learns nothing
//! else from it — no physics crosses over.

use super::core::{InstanceReport, ReportedState};
use super::ServiceClock;
use crate::workload::Workload;
use actuators::{Action, Actuator, Command, InstanceId, Outcome, Placement, ReshardPath, SpawnFrom};
use sim::engine::Lifecycle;
use sim::{ClassSlo, Cluster, ClusterSpec, Physics, PoolSpec, RunTotals};
use std::collections::{HashMap, HashSet};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;
use telemetry::{ClassBoundaries, RequestClass, CLASS_COUNT};
use tokio::sync::{mpsc, oneshot, watch};

/// What the twin reports.
#[derive(Debug, Clone)]
pub enum TwinEvent {
    /// A reading of the whole cluster.
    Report {
        /// Twin time (s).
        now_s: f64,
        /// Every instance not stopped, and those that stopped since the last report.
        instances: Vec<InstanceReport>,
        /// Arrivals per class since the last report.
        arrivals: [u32; CLASS_COUNT],
        /// Cumulative per-class SLO counters `[ttft_ok, ttft_n, gaps_ok, gaps_n]`.
        attainment: Box<[[u64; 4]; CLASS_COUNT]>,
    },
    /// The workload is over and every request finished.
    Finished(Box<RunTotals>),
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
    /// How often it reports (twin seconds).
    pub report_every_s: f64,
}

/// Start the twin on its own thread. Returns its actuator and its event stream;
/// `routing` carries the controller's class → pool table.
pub fn start(
    s: TwinSettings,
    clock: ServiceClock,
    routing: watch::Receiver<[u32; CLASS_COUNT]>,
) -> anyhow::Result<(Arc<TwinActuator>, mpsc::UnboundedReceiver<TwinEvent>)> {
    let (job_tx, job_rx) = std_mpsc::channel::<Job>();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    // Open the workload here so a bad file fails the start, not the thread.
    let _ = s.workload.arrivals()?;
    std::thread::Builder::new().name("twin".into()).spawn(move || {
        if let Err(e) = run(s, clock, routing, job_rx, ev_tx) {
            tracing::error!("the twin stopped: {e:#}");
        }
    })?;
    Ok((Arc::new(TwinActuator { tx: job_tx }), ev_rx))
}

fn run(
    s: TwinSettings,
    clock: ServiceClock,
    routing: watch::Receiver<[u32; CLASS_COUNT]>,
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
    let mut cluster = Cluster::new(&s.physics, &spec, boundaries, s.slo);
    cluster.set_predictor_accuracy(s.workload.predictor_accuracy, s.workload.seed ^ crate::policy::PREDICTOR_SEED);
    let mut ids: HashMap<InstanceId, usize> = HashMap::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut arrivals = s.workload.arrivals()?.peekable();
    let mut counts = [0u32; CLASS_COUNT];
    let mut next_report = 0.0;
    let end_s = s.workload.span_s;
    // The fleet the service finds at start is up already: the replay waits for
    // the service's first commands, and the instances they spawn serve at once.
    if let Ok(first) = jobs.recv_timeout(Duration::from_secs(10)) {
        let mut job = Some(first);
        while let Some((cmd, reply)) = job.take() {
            let _ = reply.send(apply(&mut cluster, &mut ids, &mut done, &cmd, true));
            job = jobs.recv_timeout(Duration::from_millis(20)).ok();
        }
    }
    loop {
        let now = clock.now_s();
        // Actions.
        while let Ok((cmd, reply)) = jobs.try_recv() {
            let outcome = apply(&mut cluster, &mut ids, &mut done, &cmd, false);
            let _ = reply.send(outcome);
        }
        // Routing as the controller says, once the new pool serves (make before break).
        let table = *routing.borrow();
        for class in RequestClass::ALL {
            let want = table[class.index()] as usize;
            if want >= cluster.pool_count() || cluster.route(class) == Some(want) {
                continue;
            }
            let serving =
                |p: usize| cluster.pool_members(p).iter().any(|&i| cluster.instances[i].state == Lifecycle::Serving);
            if serving(want) || !cluster.route(class).is_some_and(serving) {
                cluster.set_route(class, Some(want));
            }
        }
        // Arrivals up to now, in order, each at its own time.
        while let Some(r) = arrivals.peek() {
            match r {
                Ok(r) if r.arrival_s <= now => {
                    cluster.advance_to(r.arrival_s.max(cluster.now_s()));
                    counts[boundaries.classify(r.input_tokens, r.output_tokens.max(1)).index()] += 1;
                    cluster.arrive(r);
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
        cluster.advance_to(now.max(cluster.now_s()));
        if now >= next_report {
            next_report = now + s.report_every_s;
            let mut reports = Vec::with_capacity(ids.len());
            ids.retain(|&id, &mut idx| {
                let i = &cluster.instances[idx];
                let state = match i.state {
                    Lifecycle::Starting { .. } | Lifecycle::Resharding { .. } | Lifecycle::Standby => {
                        ReportedState::Starting
                    }
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
            let ev = TwinEvent::Report { now_s: now, instances: reports, arrivals: counts, attainment };
            counts = [0; CLASS_COUNT];
            if events.send(ev).is_err() {
                return Ok(());
            }
        }
        let finished = arrivals.peek().is_none()
            && end_s.is_none_or(|e| now >= e)
            && cluster.instances.iter().all(|i| i.is_empty());
        if finished {
            let end = end_s.unwrap_or(now).max(now);
            let _ = events.send(TwinEvent::Finished(Box::new(cluster.finish(end))));
            // Keep answering actions until the service lets go.
            while let Ok((_, reply)) = jobs.recv() {
                let _ = reply.send(Outcome::Failed { reason: "the twin's workload is over".into(), retryable: false });
            }
            return Ok(());
        }
        if events.is_closed() {
            return Ok(());
        }
        // Wake about every 10 twin-milliseconds of wall time, at most 100 times a wall second.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The twin's reports as the telemetry an agent would publish: per GPU
/// (power split evenly over the instance's GPUs, node `twin/i<id>`) and
/// per-class arrivals, flattened into store points. Each GPU's energy
/// counter only rises, as NVML's does: it gains its share of the instance's
/// energy since the last report, also when the instance's TP degree
/// changes in place (an even split of the instance's total would drop).
#[derive(Debug, Default)]
pub struct GpuCounters {
    /// Instance id → (its energy at the last report (J), each GPU's counter (J)).
    seen: HashMap<u32, (f64, Vec<f64>)>,
}

impl GpuCounters {
    /// One report, stamped `ts_ms`; `pools` maps instance id → pool.
    pub fn samples(
        &mut self,
        ts_ms: i64,
        instances: &[InstanceReport],
        pools: &[(u32, u32)],
        arrivals: &[u32; CLASS_COUNT],
    ) -> Vec<telemetry::sample::Point> {
        use telemetry::sample::{ArrivalSample, GpuSample, Sample, Tags};
        let mut out = Vec::new();
        self.seen.retain(|id, _| instances.iter().any(|r| r.id.0 == *id && r.state != ReportedState::Stopped));
        for r in instances.iter().filter(|r| r.state != ReportedState::Stopped) {
            let pool = pools.iter().find(|(i, _)| *i == r.id.0).map(|(_, p)| p.to_string());
            let n = r.tp.max(1);
            let (last_j, gpus) = self.seen.entry(r.id.0).or_insert((0.0, Vec::new()));
            let share_j = (r.energy_j - *last_j).max(0.0) / f64::from(n);
            *last_j = last_j.max(r.energy_j);
            gpus.resize(gpus.len().max(n as usize), 0.0);
            for (g, energy_j) in gpus.iter_mut().enumerate().take(n as usize) {
                *energy_j += share_j;
                let tags = Tags {
                    gpu: Some(g as u32),
                    instance: Some(format!("i{}", r.id.0)),
                    pool: pool.clone(),
                    ..Tags::node("twin", &format!("i{}", r.id.0))
                };
                let s = Sample::Gpu(GpuSample {
                    ts_ms,
                    tags,
                    power_w: r.power_w / f64::from(n),
                    energy_j: Some(*energy_j),
                    sm_clock_mhz: Some(r.clock_mhz),
                    util: None,
                    temperature_c: None,
                    throttle_reasons: None,
                });
                out.extend(s.points());
            }
        }
        for (c, &n) in arrivals.iter().enumerate() {
            if n > 0 {
                let tags = Tags { class: Some(RequestClass::from_index(c)), ..Tags::default() };
                out.extend(
                    Sample::Arrivals(ArrivalSample { ts_ms, tags, requests: f64::from(n), tokens: 0.0 }).points(),
                );
            }
        }
        out
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: u32, tp: u32, energy_j: f64) -> InstanceReport {
        InstanceReport {
            id: InstanceId(id),
            state: ReportedState::Serving,
            outstanding: 0,
            waiting: 0,
            power_w: 100.0 * f64::from(tp),
            energy_j,
            clock_mhz: 1980,
            tp,
        }
    }

    /// (gpu, energy) of one instance's GPU samples.
    fn energies(points: &[telemetry::sample::Point]) -> Vec<(String, f64)> {
        points
            .iter()
            .filter(|p| p.series.field == "energy_j")
            .map(|p| (p.series.tag("gpu").unwrap().to_string(), p.value))
            .collect()
    }

    /// An instance resharded in place from TP2 to TP4: its first two GPUs'
    /// counters keep rising (an even split of the total would fall from 50
    /// to 37.5 J), the new two start from their share of what came after.
    #[test]
    fn gpu_energy_counters_only_rise_across_a_reshard() {
        let mut c = GpuCounters::default();
        let a = energies(&c.samples(0, &[report(7, 2, 100.0)], &[(7, 1)], &[0; CLASS_COUNT]));
        assert_eq!(a, [("0".to_string(), 50.0), ("1".to_string(), 50.0)]);
        let b = energies(&c.samples(1000, &[report(7, 4, 150.0)], &[(7, 1)], &[0; CLASS_COUNT]));
        assert_eq!(
            b,
            [("0".to_string(), 62.5), ("1".to_string(), 62.5), ("2".to_string(), 12.5), ("3".to_string(), 12.5)]
        );
        // Gone and back: a new instance with the id starts afresh.
        let stopped = InstanceReport { state: ReportedState::Stopped, ..report(7, 4, 150.0) };
        assert!(energies(&c.samples(2000, &[stopped], &[], &[0; CLASS_COUNT])).is_empty());
        let d = energies(&c.samples(3000, &[report(7, 2, 10.0)], &[(7, 1)], &[0; CLASS_COUNT]));
        assert_eq!(d, [("0".to_string(), 5.0), ("1".to_string(), 5.0)]);
    }
}
