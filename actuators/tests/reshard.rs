//! Make-before-break resharding with a recording fake backend: the order of
//! steps, rollback when the new instance never becomes ready or a step
//! fails, and resuming from the audit log after a crash.

mod common;

use actuators::reshard::{MakeBeforeBreak, ReshardPlan, ReshardResult};
use actuators::{
    Action, ActionId, AuditLog, Command, Dispatcher, InstanceId, Outcome, Placement, PoolId, ReshardPath, SpawnFrom,
};
use common::{FakeReadiness, Recorder};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const OLD: u32 = 3;
const NEW: u32 = 30;

fn plan(id: &str) -> ReshardPlan {
    let cmd = Command::new(
        id,
        Action::Reshard { instance: InstanceId(OLD), tp: 8, path: ReshardPath::Restart },
        Some(Placement { node: "node-3".into(), gpus: vec![0, 1, 2, 3], endpoint: None }),
    );
    ReshardPlan::from_command(&cmd, InstanceId(NEW), PoolId(2), 1980, vec!["LL".into()]).unwrap()
}

fn mbb() -> MakeBeforeBreak {
    MakeBeforeBreak {
        ready_timeout: Duration::from_millis(300),
        poll_interval: Duration::from_millis(20),
        drain: Duration::from_millis(10),
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.redb");
        Rig { _dir: dir, path }
    }
    /// A fresh process: reopen the log, a new backend.
    fn start(&self, r: Recorder) -> (Dispatcher, Arc<Recorder>, Arc<AuditLog>) {
        let log = Arc::new(AuditLog::open(&self.path).unwrap());
        let r = Arc::new(r);
        (Dispatcher::new(log.clone()).with_backend(r.clone(), Duration::from_secs(5)), r, log)
    }
}

fn events() -> Arc<Mutex<Vec<String>>> {
    Arc::default()
}

fn take(e: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    std::mem::take(&mut *e.lock().unwrap())
}

#[tokio::test]
async fn happy_path_spawns_waits_routes_then_retires_the_old() {
    let rig = Rig::new();
    let ev = events();
    let (d, _r, _log) = rig.start(Recorder::applied(ev.clone()));
    let ready = FakeReadiness::new(Some(3), ev.clone());
    let p = plan("rs-1");
    let report = mbb().run(&p, &d, &ready).await.unwrap();
    assert_eq!(take(&ev), ["spawn:30", "ready?", "route:LL", "retire:3"]);
    let ResultCheck(placement) = ResultCheck::completed(&report.result);
    assert_eq!(placement.node, "node-30");
    assert_eq!(*ready.polls.lock().unwrap(), 3);
    assert_eq!(ready.seen.lock().unwrap()[0].node, "node-30", "readiness gets the spawn's placement");
    let ids: Vec<&str> = report.steps.iter().map(|(id, _)| id.0.as_str()).collect();
    assert_eq!(ids, ["rs-1/spawn", "rs-1/route/LL", "rs-1/retire"]);
    // The retire carries the old instance's placement.
    let calls = _r.calls.lock().unwrap();
    assert_eq!(calls[2].placement.as_ref().unwrap().node, "node-3");
    assert!(matches!(calls[0].action, Action::Spawn { tp: 8, from: SpawnFrom::Cold, .. }));
}

struct ResultCheck(Placement);
impl ResultCheck {
    fn completed(r: &ReshardResult) -> ResultCheck {
        match r {
            ReshardResult::Completed { placement: Some(p) } => ResultCheck(p.clone()),
            other => panic!("expected completed: {other:?}"),
        }
    }
}

#[tokio::test]
async fn never_ready_rolls_back_and_never_retires_the_old() {
    let rig = Rig::new();
    let ev = events();
    let (d, r, _log) = rig.start(Recorder::applied(ev.clone()));
    let ready = FakeReadiness::new(None, ev.clone());
    let start = std::time::Instant::now();
    let report = mbb().run(&plan("rs-2"), &d, &ready).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(take(&ev), ["spawn:30", "ready?", "retire:30"]);
    match &report.result {
        ReshardResult::RolledBack { reason } => assert!(reason.contains("not ready"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(*ready.polls.lock().unwrap() >= 2, "polled more than once");
    let calls = r.calls.lock().unwrap();
    assert!(!calls.iter().any(|c| c.action == Action::Retire { instance: InstanceId(OLD) }));
    assert_eq!(calls.last().unwrap().id.0, "rs-2/rollback");
    assert_eq!(calls.last().unwrap().placement.as_ref().unwrap().node, "node-30", "rollback retires where it spawned");
}

#[tokio::test]
async fn a_failed_spawn_or_route_rolls_back() {
    let rig = Rig::new();
    let ev = events();
    let (d, _r, _log) = rig.start(Recorder::with(ev.clone(), |c| match c.action {
        Action::Route { .. } => Outcome::Failed { reason: "router down".into(), retryable: true },
        _ => Outcome::Applied { placement: None, detail: String::new() },
    }));
    let ready = FakeReadiness::new(Some(1), ev.clone());
    let report = mbb().run(&plan("rs-3"), &d, &ready).await.unwrap();
    assert_eq!(take(&ev), ["spawn:30", "ready?", "route:LL", "retire:30"]);
    assert!(matches!(&report.result, ReshardResult::RolledBack { reason } if reason.contains("router down")));

    let rig = Rig::new();
    let (d, _r, _log) = rig.start(Recorder::with(ev.clone(), |c| match c.action {
        Action::Spawn { .. } => Outcome::TimedOut { after_ms: 1000 },
        _ => Outcome::Applied { placement: None, detail: String::new() },
    }));
    let report = mbb().run(&plan("rs-4"), &d, &ready).await.unwrap();
    assert_eq!(take(&ev), ["spawn:30", "retire:30"]);
    assert!(matches!(&report.result, ReshardResult::RolledBack { reason } if reason.contains("spawn")));
}

#[tokio::test]
async fn resume_after_a_crash_between_route_and_retire_only_retires() {
    let rig = Rig::new();
    let p = plan("rs-5");
    {
        // The first run: spawn and route applied, then the process dies.
        let ev = events();
        let (d, _r, _log) = rig.start(Recorder::applied(ev.clone()));
        let spawn = Command::new(
            p.spawn_id().0,
            Action::Spawn { instance: p.new, pool: p.pool, tp: p.tp, clock_mhz: p.clock_mhz, from: p.from },
            None,
        );
        assert!(d.dispatch(&spawn).await.unwrap().is_applied());
        let route = Command::new(p.route_id("LL").0, Action::Route { class: "LL".into(), pool: p.pool }, None);
        assert!(d.dispatch(&route).await.unwrap().is_applied());
    }
    let ev = events();
    let (d, r, log) = rig.start(Recorder::applied(ev.clone()));
    let ready = FakeReadiness::new(None, ev.clone());
    let report = mbb().run(&p, &d, &ready).await.unwrap();
    assert_eq!(take(&ev), ["retire:3"], "no spawn, no readiness wait, no route again");
    assert_eq!(r.ids(), ["rs-5/retire"]);
    let ResultCheck(placement) = ResultCheck::completed(&report.result);
    assert_eq!(placement.node, "node-30", "the placement recorded by the first run");
    for id in ["rs-5/spawn", "rs-5/route/LL", "rs-5/retire"] {
        assert_eq!(log.applied_count(&ActionId(id.into())).unwrap(), 1, "{id}");
    }
}

#[tokio::test]
async fn resume_after_a_crash_mid_retire_resends_the_retire_with_its_id() {
    let rig = Rig::new();
    let p = plan("rs-6");
    {
        let ev = events();
        let (d, _r, log) = rig.start(Recorder::applied(ev.clone()));
        // Spawn and route applied; the retire begun (durably) and the
        // process killed before its outcome was recorded.
        let spawn = Command::new(
            p.spawn_id().0,
            Action::Spawn { instance: p.new, pool: p.pool, tp: p.tp, clock_mhz: p.clock_mhz, from: p.from },
            None,
        );
        d.dispatch(&spawn).await.unwrap();
        let route = Command::new(p.route_id("LL").0, Action::Route { class: "LL".into(), pool: p.pool }, None);
        d.dispatch(&route).await.unwrap();
        let retire = Command::new(p.retire_id().0, Action::Retire { instance: p.old }, p.old_placement.clone());
        log.begin(&retire, "recorder").unwrap();
    }
    let ev = events();
    let (d, r, log) = rig.start(Recorder::applied(ev.clone()));
    let ready = FakeReadiness::new(None, ev.clone());
    assert_eq!(log.in_flight().unwrap().len(), 1);
    let report = mbb().run(&p, &d, &ready).await.unwrap();
    assert_eq!(r.ids(), ["rs-6/retire"]);
    assert!(matches!(report.result, ReshardResult::Completed { .. }));
    let rec = log.get(&p.retire_id()).unwrap().unwrap();
    assert_eq!((rec.attempts, rec.applied), (2, 1));
}

#[tokio::test]
async fn a_completed_reshard_run_again_does_nothing() {
    let rig = Rig::new();
    let ev = events();
    let p = plan("rs-7");
    {
        let (d, _r, _log) = rig.start(Recorder::applied(ev.clone()));
        let ready = FakeReadiness::new(Some(1), ev.clone());
        mbb().run(&p, &d, &ready).await.unwrap();
    }
    take(&ev);
    let (d, r, _log) = rig.start(Recorder::applied(ev.clone()));
    let ready = FakeReadiness::new(None, ev.clone());
    let report = mbb().run(&p, &d, &ready).await.unwrap();
    assert!(r.ids().is_empty());
    assert!(take(&ev).is_empty());
    assert!(matches!(report.result, ReshardResult::Completed { .. }));
}

#[tokio::test]
async fn an_interrupted_rollback_is_carried_on_not_reversed() {
    let rig = Rig::new();
    let ev = events();
    let p = plan("rs-8");
    {
        // Rollback fails (backend refuses), leaving it recorded as failed.
        let (d, _r, _log) = rig.start(Recorder::with(ev.clone(), |c| match c.action {
            Action::Retire { .. } => Outcome::Failed { reason: "node unreachable".into(), retryable: true },
            _ => Outcome::Applied { placement: None, detail: String::new() },
        }));
        let ready = FakeReadiness::new(None, ev.clone());
        let report = mbb().run(&p, &d, &ready).await.unwrap();
        assert!(matches!(report.result, ReshardResult::RollbackFailed { .. }), "{:?}", report.result);
    }
    take(&ev);
    let (d, r, _log) = rig.start(Recorder::applied(ev.clone()));
    let ready = FakeReadiness::new(Some(1), ev.clone());
    let report = mbb().run(&p, &d, &ready).await.unwrap();
    assert_eq!(r.ids(), ["rs-8/rollback"], "only the rollback, even though the instance would now be ready");
    assert!(matches!(report.result, ReshardResult::RolledBack { .. }));
}

#[test]
fn plans_come_only_from_reshard_commands() {
    let c = Command::new("x", Action::Retire { instance: InstanceId(1) }, None);
    let e = ReshardPlan::from_command(&c, InstanceId(2), PoolId(0), 1000, vec![]).unwrap_err();
    assert!(e.contains("not a reshard"), "{e}");
    let c = Command::new("y", Action::Reshard { instance: InstanceId(1), tp: 2, path: ReshardPath::InPlace }, None);
    assert!(ReshardPlan::from_command(&c, InstanceId(1), PoolId(0), 1000, vec![]).is_err());
    let p = ReshardPlan::from_command(&c, InstanceId(5), PoolId(0), 1000, vec![]).unwrap();
    assert_eq!(p.from, SpawnFrom::WarmStandby);
}
