//! The dispatcher and its redb audit log: crash safety (a command begun and
//! never finished is re-sent with its id after a restart; an applied id is
//! never sent again), timeouts, conflicts, routing, counters.

mod common;

use actuators::{
    Action, ActionId, Actuator, AuditLog, AuditState, Command, DispatchError, Dispatcher, InstanceId, Outcome, PoolId,
};
use common::Recorder;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn retire(id: &str, instance: u32) -> Command {
    Command::new(id, Action::Retire { instance: InstanceId(instance) }, None)
}

fn dispatcher(log: Arc<AuditLog>, r: Arc<Recorder>) -> Dispatcher {
    Dispatcher::new(log).with_backend(r, Duration::from_secs(5))
}

#[tokio::test]
async fn a_command_begun_before_a_kill_9_is_resent_once_with_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.redb");
    let cmd = retire("act-42", 3);
    {
        // The process begins the command durably, calls the backend, and dies
        // before it can record the outcome.
        let log = AuditLog::open(&path).unwrap();
        log.begin(&cmd, "recorder").unwrap();
    }
    let log = Arc::new(AuditLog::open(&path).unwrap());
    let pending = log.in_flight().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, cmd.id);
    assert_eq!(pending[0].state, AuditState::Issued);
    assert_eq!(pending[0].command, cmd);

    let r = Arc::new(Recorder::applied(Default::default()));
    let d = dispatcher(log.clone(), r.clone());
    assert!(d.dispatch(&cmd).await.unwrap().is_applied());
    assert_eq!(r.ids(), ["act-42"], "sent again, same id");
    let rec = log.get(&cmd.id).unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts, rec.applied), (AuditState::Applied, 2, 1));
    assert!(rec.finished_at_ms.is_some());
    assert!(log.in_flight().unwrap().is_empty());

    // Dispatching the applied id again does not call the backend.
    assert!(d.dispatch(&cmd).await.unwrap().is_applied());
    assert_eq!(r.ids(), ["act-42"]);
    assert_eq!(log.applied_count(&cmd.id).unwrap(), 1);
    let s = d.stats();
    assert_eq!(s.outcomes.get(&("retire".into(), "applied".into())), Some(&1));
    assert_eq!(s.outcomes.get(&("retire".into(), "already-applied".into())), Some(&1));
    assert_eq!(s.resent, 1);
}

#[tokio::test]
async fn an_applied_command_survives_a_restart_and_is_not_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.redb");
    let spawn = Command::new(
        "sp-1",
        Action::Spawn {
            instance: InstanceId(9),
            pool: PoolId(1),
            tp: 4,
            clock_mhz: 1980,
            from: actuators::SpawnFrom::Cold,
        },
        None,
    );
    let first = {
        let log = Arc::new(AuditLog::open(&path).unwrap());
        let r = Arc::new(Recorder::applied(Default::default()));
        dispatcher(log, r).dispatch(&spawn).await.unwrap()
    };
    let log = Arc::new(AuditLog::open(&path).unwrap());
    let r = Arc::new(Recorder::applied(Default::default()));
    let d = dispatcher(log.clone(), r.clone());
    let again = d.dispatch(&spawn).await.unwrap();
    assert_eq!(again, first, "the recorded outcome, placement included");
    assert_eq!(again.placement().unwrap().node, "node-9");
    assert!(r.ids().is_empty(), "the backend was not called");
    let rec = log.get(&spawn.id).unwrap().unwrap();
    assert_eq!(rec.placement.unwrap().node, "node-9", "the spawn's placement is recorded");
}

#[tokio::test]
async fn recover_resends_every_in_flight_command_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.redb");
    {
        let log = AuditLog::open(&path).unwrap();
        let mut a = retire("a", 1);
        a.issued_at_ms = 1000;
        let mut b = retire("b", 2);
        b.issued_at_ms = 2000;
        let mut c = retire("c", 3);
        c.issued_at_ms = 1500;
        for cmd in [&b, &a, &c] {
            log.begin(cmd, "recorder").unwrap();
        }
        log.finish(&c.id, &Outcome::Applied { placement: None, detail: String::new() }).unwrap();
    }
    let log = Arc::new(AuditLog::open(&path).unwrap());
    let r = Arc::new(Recorder::applied(Default::default()));
    let d = dispatcher(log.clone(), r.clone());
    let done = d.recover().await.unwrap();
    assert_eq!(done.iter().map(|(id, _)| id.0.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(r.ids(), ["a", "b"]);
    assert!(log.in_flight().unwrap().is_empty());
    // list: by issue time, from since_ms, up to limit.
    let all = log.list(0, 10).unwrap();
    assert_eq!(all.iter().map(|r| r.id.0.as_str()).collect::<Vec<_>>(), ["a", "c", "b"]);
    let some = log.list(1200, 1).unwrap();
    assert_eq!(some.iter().map(|r| r.id.0.as_str()).collect::<Vec<_>>(), ["c"]);
}

#[tokio::test]
async fn a_slow_backend_times_out_and_the_id_is_retried_later() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(&dir.path().join("a.redb")).unwrap());
    let mut slow = Recorder::applied(Default::default());
    slow.delay = Duration::from_secs(5);
    let slow = Arc::new(slow);
    let d = Dispatcher::new(log.clone()).with_backend(slow.clone(), Duration::from_millis(200));
    let cmd = retire("slow-1", 1);
    let out = d.dispatch(&cmd).await.unwrap();
    assert!(matches!(out, Outcome::TimedOut { after_ms } if (190..2000).contains(&after_ms)), "{out:?}");
    let rec = log.get(&cmd.id).unwrap().unwrap();
    assert_eq!(rec.state, AuditState::TimedOut);
    assert!(rec.detail.contains("no answer"), "{}", rec.detail);

    // The next dispatch of the same id tries again (same id).
    let fast = Arc::new(Recorder::applied(Default::default()));
    let d = Dispatcher::new(log.clone()).with_backend(fast.clone(), Duration::from_secs(5));
    assert!(d.dispatch(&cmd).await.unwrap().is_applied());
    assert_eq!(fast.ids(), ["slow-1"]);
    let rec = log.get(&cmd.id).unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts, rec.applied), (AuditState::Applied, 2, 1));
}

#[tokio::test]
async fn commands_go_to_the_first_backend_that_supports_them() {
    struct ClocksOnly(Arc<Mutex<Vec<String>>>);
    #[async_trait::async_trait]
    impl Actuator for ClocksOnly {
        fn name(&self) -> &str {
            "clocks"
        }
        fn supports(&self, a: &Action) -> bool {
            matches!(a, Action::SetClock { .. })
        }
        async fn apply(&self, c: &Command) -> Outcome {
            self.0.lock().unwrap().push(c.id.0.clone());
            Outcome::Applied { placement: None, detail: String::new() }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(&dir.path().join("a.redb")).unwrap());
    let clocks = Arc::new(Mutex::new(Vec::new()));
    let rest = Arc::new(Recorder::applied(Default::default()));
    let d = Dispatcher::new(log.clone())
        .with_backend(Arc::new(ClocksOnly(clocks.clone())), Duration::from_secs(1))
        .with_backend(rest.clone(), Duration::from_secs(1));
    assert_eq!(d.backend_names(), ["clocks", "recorder"]);
    d.dispatch(&Command::new("k", Action::SetClock { instance: InstanceId(1), clock_mhz: 1000 }, None)).await.unwrap();
    d.dispatch(&retire("r", 1)).await.unwrap();
    assert_eq!(*clocks.lock().unwrap(), ["k"]);
    assert_eq!(rest.ids(), ["r"]);
    assert_eq!(log.get(&ActionId("k".into())).unwrap().unwrap().backend, "clocks");

    // No backend for an action: a recorded, non-retryable failure.
    let d = Dispatcher::new(log.clone()).with_backend(Arc::new(ClocksOnly(clocks)), Duration::from_secs(1));
    match d.dispatch(&retire("orphan", 2)).await.unwrap() {
        Outcome::Failed { reason, retryable: false } => {
            assert!(reason.contains("no backend carries out retire"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(log.get(&ActionId("orphan".into())).unwrap().unwrap().state, AuditState::Failed);
    assert_eq!(d.stats().outcomes.get(&("retire".into(), "no-backend".into())), Some(&1));
}

#[tokio::test]
async fn an_id_reused_for_another_action_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(&dir.path().join("a.redb")).unwrap());
    let r = Arc::new(Recorder::applied(Default::default()));
    let d = dispatcher(log, r.clone());
    d.dispatch(&retire("dup", 1)).await.unwrap();
    let err = d.dispatch(&retire("dup", 2)).await.unwrap_err();
    assert!(matches!(err, DispatchError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("dup"), "{err}");
    assert_eq!(r.ids(), ["dup"]);
}

#[tokio::test]
async fn a_panicking_backend_is_a_failure_not_a_crash() {
    struct Panics;
    #[async_trait::async_trait]
    impl Actuator for Panics {
        fn name(&self) -> &str {
            "panics"
        }
        fn supports(&self, _: &Action) -> bool {
            true
        }
        async fn apply(&self, _: &Command) -> Outcome {
            panic!("backend bug")
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(&dir.path().join("a.redb")).unwrap());
    let d = Dispatcher::new(log.clone()).with_backend(Arc::new(Panics), Duration::from_secs(1));
    match d.dispatch(&retire("p", 1)).await.unwrap() {
        Outcome::Failed { reason, retryable: true } => assert!(reason.contains("panics"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(log.get(&ActionId("p".into())).unwrap().unwrap().state, AuditState::Failed);
}

#[tokio::test]
async fn the_audit_log_shares_the_telemetry_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(telemetry::store::Store::open(dir.path(), Default::default()).unwrap());
    let log = Arc::new(AuditLog::in_store(store.clone()).unwrap());
    assert_eq!(log.path(), store.path());
    let r = Arc::new(Recorder::applied(Default::default()));
    let d = dispatcher(log.clone(), r);
    assert!(d.dispatch(&retire("s-1", 1)).await.unwrap().is_applied());
    assert_eq!(log.applied_count(&ActionId("s-1".into())).unwrap(), 1);
    // The store still works alongside.
    assert!(store.raw_len().is_ok());
    drop(d);
    drop(log);
    drop(store);
    let store = Arc::new(telemetry::store::Store::open(dir.path(), Default::default()).unwrap());
    let log = AuditLog::in_store(store).unwrap();
    assert_eq!(log.get(&ActionId("s-1".into())).unwrap().unwrap().state, AuditState::Applied);
}

#[test]
fn an_unwritable_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let e = AuditLog::open(&file.join("audit.redb")).unwrap_err();
    assert!(e.to_string().contains("plain-file"), "{e}");
    let log = AuditLog::open(&dir.path().join("a.redb")).unwrap();
    let e = log.finish(&ActionId("never".into()), &Outcome::TimedOut { after_ms: 1 }).unwrap_err();
    assert!(e.to_string().contains("no command never was begun"), "{e}");
}
