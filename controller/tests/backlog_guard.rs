//! The backlog guard: a backed-up instance gets the top clock and hands its
//! unstarted requests to an instance of its pool with no queue, else to the
//! next-larger class's pool. Driven through `Controller::step` alone
//! (sans-IO).

use actuators_core::{Action, InstanceId, PoolId};
use controller::control::{Controller, ControllerConfig, Decision, InstanceObs, InstanceState, Loops, Observations};
use controller::profile::ProfileTable;
use telemetry_core::CLASS_COUNT;

const TOP_MHZ: u32 = 1980;
const LL: usize = 8;
const LM: usize = 7;

fn controller(move_queued: bool) -> Controller {
    let mut cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, TOP_MHZ);
    cfg.move_queued = move_queued;
    let mut c = Controller::new(cfg, ProfileTable::bundled());
    // The first step plans the (empty) fleet.
    c.step(0.0, &obs(0.0, vec![]));
    c
}

fn obs(now_s: f64, instances: Vec<InstanceObs>) -> Observations {
    Observations { now_s, instances, class_attainment_recent: [None; CLASS_COUNT], ..Default::default() }
}

fn inst(id: u32, pool: usize, clock_mhz: u32, waiting: u32) -> InstanceObs {
    InstanceObs {
        id: InstanceId(id),
        pool: PoolId(pool as u32),
        tp: 8,
        clock_mhz,
        state: InstanceState::Serving,
        outstanding: waiting + 4,
        waiting,
        power_w: None,
    }
}

fn moves(out: &[Decision]) -> Vec<(u32, u32, u32)> {
    out.iter()
        .filter_map(|d| match d.action {
            Action::MoveQueued { instance, pool, max_requests } => Some((instance.0, pool.0, max_requests)),
            _ => None,
        })
        .collect()
}

fn clocks(out: &[Decision]) -> Vec<(u32, u32)> {
    out.iter()
        .filter_map(|d| match d.action {
            Action::SetClock { instance, clock_mhz } => Some((instance.0, clock_mhz)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_backed_up_instance_moves_half_its_queue_to_a_pool_mate_without_one() {
    let mut c = controller(true);
    assert_eq!(c.routing().pool_of[LL], LL as u32);
    let o = obs(5.0, vec![inst(100, LL, 1400, 6), inst(101, LL, 1400, 0)]);
    let out = c.step(5.0, &o);
    assert_eq!(moves(&out), vec![(100, LL as u32, 3)], "{out:#?}");
    assert!(clocks(&out).contains(&(100, TOP_MHZ)), "the backed-up instance gets the top clock: {out:#?}");
    let d = out.iter().find(|d| matches!(d.action, Action::MoveQueued { .. })).unwrap();
    assert_eq!(d.source, "backlog-guard");
    assert!(d.reason.contains("6 requests waiting"), "{}", d.reason);
    // The same observations again: nothing new for that instance.
    let again = c.step(5.0, &o);
    assert!(moves(&again).is_empty(), "moved twice on the same observations: {again:#?}");
    assert!(!clocks(&again).iter().any(|(i, _)| *i == 100), "{again:#?}");
    // A clock period later, still backed up: it moves again.
    assert_eq!(moves(&c.step(10.0, &obs(10.0, o.instances.clone()))), vec![(100, LL as u32, 3)]);
}

#[test]
fn with_no_room_in_its_pool_the_queue_goes_to_the_next_larger_class() {
    let mut c = controller(true);
    assert_eq!(c.routing().pool_of[LM], LM as u32, "LM keeps its own pool in this test");
    // LM's only instance is backed up; LL's pool (the next-larger class) has one with no queue.
    let out = c.step(5.0, &obs(5.0, vec![inst(200, LM, TOP_MHZ, 9), inst(201, LL, TOP_MHZ, 0)]));
    assert_eq!(moves(&out), vec![(200, LL as u32, 5)], "{out:#?}");
    // Already at the top clock: no clock command.
    assert!(clocks(&out).iter().all(|(i, _)| *i != 200), "{out:#?}");
    // Nobody with room anywhere: nothing to move (the queue stays; no rejection by the controller).
    let mut c = controller(true);
    let out = c.step(5.0, &obs(5.0, vec![inst(200, LM, TOP_MHZ, 9), inst(201, LL, TOP_MHZ, 7)]));
    assert!(moves(&out).iter().all(|(i, _, _)| *i != 200), "LL's pool is backed up too: {out:#?}");
}

#[test]
fn moving_is_off_when_no_backend_carries_it_out() {
    let mut c = controller(false);
    let out = c.step(5.0, &obs(5.0, vec![inst(100, LL, 1400, 6), inst(101, LL, 1400, 0)]));
    assert!(moves(&out).is_empty(), "{out:#?}");
    assert!(clocks(&out).contains(&(100, TOP_MHZ)), "the top clock still comes: {out:#?}");
}
