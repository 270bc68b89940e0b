//! How the shard loop changes the fleet between scale periods. In-place
//! resharding: a surplus instance of a smaller TP degree grows to the wanted
//! larger one (`reshard`, path `in-place`) instead of a new instance being
//! spawned; a larger one is never shrunk in place (spawn first, retire
//! after). Scale-out: load seen above what the pool's GPU budget carries
//! grows the budget at the next shard period, not the next scale period.
//! scale-shard: on a fixed cluster it shares the cluster's GPUs among the
//! pools; without one it reshapes within its first plan's GPUs. The
//! transition check: a new mix that needs a spawn goes ahead only when its
//! gain over the coming period pays for the spawn (learnt spawn time and
//! starting power; an instance that grows in place is no spawn); else the
//! fleet there is keeps what carries the load.
//! Driven through `Controller::step` alone.

use actuators_core::{Action, InstanceId, PoolId, ReshardPath};
use controller::control::{Controller, ControllerConfig, Decision, InstanceObs, InstanceState, Loops, Observations};
use controller::profile::ProfileTable;
use telemetry_core::CLASS_COUNT;

const TOP_MHZ: u32 = 1980;
const LL: usize = 8;

fn controller(in_place: bool) -> Controller {
    let mut cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, TOP_MHZ);
    cfg.reshard_in_place = in_place;
    Controller::new(cfg, ProfileTable::bundled())
}

/// Observations with `ll_rps` of long/long traffic and nothing else.
fn obs(now_s: f64, instances: Vec<InstanceObs>, ll_rps: f64) -> Observations {
    let mut d = [0.0; CLASS_COUNT];
    d[LL] = ll_rps;
    Observations {
        now_s,
        instances,
        class_rps_recent: d,
        class_rps_smoothed: d,
        class_attainment_recent: [None; CLASS_COUNT],
        ..Default::default()
    }
}

fn inst(id: u32, tp: u32) -> InstanceObs {
    InstanceObs {
        id: InstanceId(id),
        pool: PoolId(LL as u32),
        tp,
        clock_mhz: TOP_MHZ,
        state: InstanceState::Serving,
        outstanding: 1,
        waiting: 0,
        power_w: None,
    }
}

fn spawns(out: &[Decision]) -> Vec<(u32, u32)> {
    out.iter()
        .filter_map(|d| match d.action {
            Action::Spawn { instance, tp, .. } => Some((instance.0, tp)),
            _ => None,
        })
        .collect()
}

fn reshards(out: &[Decision]) -> Vec<(u32, u32)> {
    out.iter()
        .filter_map(|d| match d.action {
            Action::Reshard { instance, tp, path } => {
                assert_eq!(path, ReshardPath::InPlace);
                Some((instance.0, tp))
            }
            _ => None,
        })
        .collect()
}

/// The first plan for 5 req/s of long/long traffic is two TP8 instances (ids 0 and 1).
fn planned_for_two_tp8(in_place: bool) -> Controller {
    let mut c = controller(in_place);
    let out = c.step(0.0, &obs(0.0, vec![], 5.0));
    assert_eq!(spawns(&out), vec![(0, 8), (1, 8)], "the bundled profile's plan changed: {out:#?}");
    c
}

#[test]
fn a_smaller_surplus_instance_grows_in_place_instead_of_a_spawn() {
    let mut c = planned_for_two_tp8(true);
    // One TP8 serves; a TP4 (not in the plan) serves too; the other TP8 never came.
    let o = obs(300.0, vec![inst(0, 8), inst(7, 4)], 5.0);
    let out = c.step(300.0, &o);
    assert_eq!(reshards(&out), vec![(7, 8)], "{out:#?}");
    assert!(spawns(&out).is_empty(), "spawned although an instance could grow in place: {out:#?}");
    let d = out.iter().find(|d| matches!(d.action, Action::Reshard { .. })).unwrap();
    assert_eq!(d.source, "shard-loop");
    assert!(d.reason.contains("grows in place"), "{}", d.reason);
    // While it moves its weights it counts as a TP8 coming up: nothing new on the same observations.
    for t in [300.0, 305.0] {
        let again = c.step(t, &obs(t, o.instances.clone(), 5.0));
        assert!(reshards(&again).is_empty() && spawns(&again).is_empty(), "at {t} s: {again:#?}");
    }
    // A reshard not seen done after twice the spawn lead plus a minute is taken as lost: asked again.
    let retry = c.step(600.0, &obs(600.0, o.instances.clone(), 5.0));
    assert_eq!(reshards(&retry), vec![(7, 8)], "{retry:#?}");
    // Done: it serves as TP8, the plan holds, and nothing is retired.
    let done = c.step(900.0, &obs(900.0, vec![inst(0, 8), inst(7, 8)], 5.0));
    assert!(reshards(&done).is_empty() && spawns(&done).is_empty(), "{done:#?}");
    assert!(!done.iter().any(|d| matches!(d.action, Action::Retire { .. })), "{done:#?}");
}

#[test]
fn a_larger_instance_is_never_shrunk_in_place() {
    let mut c = controller(true);
    let first = c.step(0.0, &obs(0.0, vec![], 0.2));
    assert_eq!(spawns(&first), vec![(0, 4)], "the bundled profile's plan changed: {first:#?}");
    // A TP8 serves where one TP4 is planned: a TP4 is spawned; the TP8 is not resharded.
    let out = c.step(300.0, &obs(300.0, vec![inst(9, 8)], 0.2));
    assert!(reshards(&out).is_empty(), "{out:#?}");
    assert_eq!(spawns(&out).iter().map(|s| s.1).collect::<Vec<_>>(), vec![4], "{out:#?}");
}

#[test]
fn without_in_place_resharding_the_missing_instance_is_spawned() {
    let mut c = planned_for_two_tp8(false);
    let out = c.step(300.0, &obs(300.0, vec![inst(0, 8), inst(7, 4)], 5.0));
    assert!(reshards(&out).is_empty(), "{out:#?}");
    assert_eq!(spawns(&out).iter().map(|s| s.1).collect::<Vec<_>>(), vec![8], "{out:#?}");
}

/// scale-shard (no scale loop) keeps the GPUs of its first plan: when load
/// falls it reshapes within them, once, instead of adding small instances
/// on every shard period.
#[test]
fn scale_shard_reshapes_within_its_first_budget() {
    let cfg = ControllerConfig::new(Loops { scale: false, shard: true, clock: false, pools: true }, TOP_MHZ);
    let mut c = Controller::new(cfg, ProfileTable::bundled());
    let first = spawns(&c.step(0.0, &obs(0.0, vec![], 5.0)));
    let budget: u32 = first.iter().map(|s| s.1).sum();
    assert!(budget > 0);
    let mut fleet: Vec<InstanceObs> = first.iter().map(|&(id, tp)| inst(id, tp)).collect();
    let mut later = Vec::new();
    for k in 1..=6 {
        let t = 300.0 * f64::from(k);
        let out = c.step(t, &obs(t, fleet.clone(), 1.0));
        for (id, tp) in spawns(&out) {
            later.push((k, id, tp));
            fleet.push(inst(id, tp));
        }
        let retired: Vec<u32> = out
            .iter()
            .filter_map(|d| match d.action {
                Action::Retire { instance } => Some(instance.0),
                _ => None,
            })
            .collect();
        fleet.retain(|i| !retired.contains(&i.id.0));
    }
    assert!(later.iter().all(|&(k, ..)| k == 1), "spawned again after the first reshape: {later:?}");
    let held: u32 = fleet.iter().map(|i| i.tp).sum();
    assert!(held <= budget, "holds {held} GPUs, its first plan {budget}: {fleet:?}");
}

/// A rise the forecast missed: the observed load needs more GPUs than the
/// budget the scale loop set; the next shard period (not the next scale
/// period, 30 min on) scales out.
#[test]
fn observed_load_above_the_budget_scales_out_at_the_next_shard_period() {
    let mut c = controller(true);
    let first = spawns(&c.step(0.0, &obs(0.0, vec![], 1.0)));
    assert_eq!(first.len(), 1, "{first:?}");
    let mut fleet: Vec<InstanceObs> = first.iter().map(|&(id, tp)| inst(id, tp)).collect();
    // Load as planned: nothing changes at the shard period.
    assert!(spawns(&c.step(300.0, &obs(300.0, fleet.clone(), 1.0))).is_empty());
    // Five times the load: the next shard period adds instances, long before the scale period at 1800 s.
    let out = c.step(600.0, &obs(600.0, fleet.clone(), 5.0));
    let more = spawns(&out);
    assert!(!more.is_empty(), "no scale-out at the shard period: {out:#?}");
    fleet.extend(more.iter().map(|&(id, tp)| inst(id, tp)));
    let gpus: u32 = fleet.iter().map(|i| i.tp).sum();
    assert!(gpus >= 16, "{gpus} GPUs for 5 req/s of long/long, which the plan gives two TP8");
}

/// A rise the plan did not expect, between shard periods: when the load seen
/// now (smoothed, with its margin) passes `rise_replan` times what the pool
/// was planned for, the pool is re-planned at that step, not at the next
/// shard period minutes on. Below that multiple nothing happens; the same
/// observations twice add nothing.
#[test]
fn a_rise_past_the_plan_is_re_planned_at_once_between_shard_periods() {
    let mut c = controller(true);
    let margin = c.config().observed_margin;
    let rise = c.config().rise_replan;
    assert!(rise > 1.0 && c.config().shard_period_s >= 60.0);
    let first = spawns(&c.step(0.0, &obs(0.0, vec![], 1.0)));
    assert_eq!(first.len(), 1, "{first:?}");
    let fleet: Vec<InstanceObs> = first.iter().map(|&(id, tp)| inst(id, tp)).collect();
    // Planned for 1 req/s with its margin: a load just under `rise_replan` times that changes nothing.
    let under = 0.98 * rise;
    assert!(spawns(&c.step(5.0, &obs(5.0, fleet.clone(), under))).is_empty(), "re-planned at {under} req/s");
    // Five times the load 10 s in: instances are spawned at once, the shard period being 300 s.
    let out = c.step(10.0, &obs(10.0, fleet.clone(), 5.0));
    let more = spawns(&out);
    assert!(!more.is_empty(), "no re-plan on the rise: {out:#?}");
    let gpus: u32 = fleet.iter().map(|i| i.tp).sum::<u32>() + more.iter().map(|&(_, tp)| tp).sum::<u32>();
    assert!(gpus >= 16, "{gpus} GPUs for 5 req/s of long/long, which the plan gives two TP8");
    let planned = c.plans()[LL].planned_rps;
    assert!(planned >= 5.0 * margin - 1e-9, "planned for {planned} req/s");
    // The same observations again: the plan covers them, nothing new.
    assert!(spawns(&c.step(10.0, &obs(10.0, fleet, 5.0))).is_empty());
}

/// scale-shard on a fixed cluster (`sim` gives it single-pool's GPUs): every
/// pool's share of the GPUs is in proportion to what its plan needs, all of
/// them are held from the first step, and when one pool's load rises it takes
/// GPUs from the others instead of growing the cluster.
#[test]
fn scale_shard_on_a_fixed_cluster_holds_and_shares_its_gpus() {
    const TOTAL: u32 = 64;
    let mut cfg = ControllerConfig::new(Loops { scale: false, shard: true, clock: false, pools: true }, TOP_MHZ);
    cfg.fixed_gpus = Some(TOTAL);
    let mut c = Controller::new(cfg, ProfileTable::bundled());
    // Long/long at 0.5 req/s and short/short at 2 req/s.
    let two = |now_s: f64, fleet: Vec<InstanceObs>, ll: f64, ss: f64| {
        let mut o = obs(now_s, fleet, ll);
        o.class_rps_recent[0] = ss;
        o.class_rps_smoothed[0] = ss;
        o
    };
    let planned =
        |c: &Controller| -> u32 { c.plans().iter().map(|p| p.target.iter().map(|(tp, n)| tp * n).sum::<u32>()).sum() };
    let budgets = |c: &Controller| -> Vec<u32> { c.plans().iter().map(|p| p.budget_gpus).collect() };
    let first = spawns(&c.step(0.0, &two(0.0, vec![], 0.5, 2.0)));
    let held: u32 = first.iter().map(|s| s.1).sum();
    assert!(held <= TOTAL && held + 8 > TOTAL, "the first step holds {held} of the cluster's {TOTAL} GPUs: {first:?}");
    assert_eq!(planned(&c), held);
    let before = budgets(&c);
    assert!(before.iter().sum::<u32>() <= TOTAL, "{before:?}");
    // Long/long load rises 24-fold: its pool's share grows, another's shrinks, the total stays.
    c.step(300.0, &two(300.0, vec![], 12.0, 2.0));
    let after = budgets(&c);
    assert!(after.iter().sum::<u32>() <= TOTAL, "{after:?}");
    assert!(after[LL] > before[LL], "long/long's share did not grow: {before:?} -> {after:?}");
    assert!((0..after.len()).any(|p| after[p] < before[p]), "no pool gave GPUs up: {before:?} -> {after:?}");
    let p = planned(&c);
    assert!(p <= TOTAL && p + 16 > TOTAL, "plans {p} of {TOTAL} GPUs");
}

fn retires(out: &[Decision]) -> Vec<u32> {
    out.iter()
        .filter_map(|d| match d.action {
            Action::Retire { instance } => Some(instance.0),
            _ => None,
        })
        .collect()
}

/// Two TP8 serve 5 req/s of long/long; the load falls to 0.2 req/s, which
/// one TP4 carries for the least power. With warm spawns (30 s) the TP4 is
/// spawned (and the TP8s retired once it serves). With cold spawns learnt
/// (7 min: longer than the 5 min period, so no gain before the next plan)
/// no instance is spawned and one TP8, the least-power part of the fleet
/// that carries 0.2 req/s, stays: the other is retired at once. With warm
/// spawns but starting instances seen drawing 10 kW per GPU, the spawn does
/// not pay either. A fleet that cannot carry the load grows regardless.
#[test]
fn a_mix_change_that_does_not_pay_for_its_spawn_is_held() {
    let fleet = vec![inst(0, 8), inst(1, 8)];
    // Warm spawns: the better mix goes ahead.
    let mut warm = planned_for_two_tp8(false);
    let out = warm.step(300.0, &obs(300.0, fleet.clone(), 0.2));
    assert_eq!(spawns(&out).iter().map(|s| s.1).collect::<Vec<_>>(), vec![4], "{out:#?}");
    assert!(retires(&out).is_empty(), "retired before the TP4 serves: {out:#?}");

    // Cold spawns, learnt from what the instances took to come up.
    let mut cold = planned_for_two_tp8(false);
    let mut o = obs(300.0, fleet.clone(), 0.2);
    o.observed_spawn_s = vec![420.0; 16];
    let out = cold.step(300.0, &o);
    assert!(spawns(&out).is_empty(), "spawned a TP4 that cannot pay for its 7 min start: {out:#?}");
    assert_eq!(retires(&out).len(), 1, "the second TP8 is not needed: {out:#?}");
    // The kept TP8 carries 0.2 req/s: the next periods change nothing while the load holds.
    let kept: Vec<InstanceObs> = fleet.iter().copied().filter(|i| !retires(&out).contains(&i.id.0)).collect();
    for k in 2..=4 {
        let t = 300.0 * f64::from(k);
        let again = cold.step(t, &obs(t, kept.clone(), 0.2));
        assert!(spawns(&again).is_empty() && retires(&again).is_empty(), "at {t} s: {again:#?}");
    }
    // Cold, and the load rises past what one TP8 carries: it grows although spawns are slow.
    let out = cold.step(1500.0, &obs(1500.0, kept.clone(), 5.0));
    assert!(!spawns(&out).is_empty(), "the pool did not grow for a load its fleet cannot carry: {out:#?}");

    // Warm spawns, but starting instances draw 10 kW per GPU: the spawn costs 8 × 10 kW × 30 s = 2.4 MJ.
    let mut hot = planned_for_two_tp8(false);
    let mut starting = inst(5, 8);
    starting.state = InstanceState::Starting;
    starting.power_w = Some(80_000.0);
    for k in 0..40 {
        let t = 5.0 * f64::from(k) + 100.0;
        hot.step(t, &obs(t, vec![inst(0, 8), inst(1, 8), starting], 5.0));
    }
    let out = hot.step(300.0, &obs(300.0, fleet.clone(), 0.2));
    assert!(spawns(&out).is_empty(), "spawned although starting power makes it cost more than it saves: {out:#?}");
}

/// The transition check counts an instance that grows in place as no
/// spawn. Four TP4 serve 1 req/s of long/long, for which one TP8 is the
/// least power; spawns are learnt cold (7 min). Without in-place resharding
/// the TP8 would be a spawn that cannot pay, so the TP4s stay; with it, one
/// TP4 grows to TP8 (nothing spawned) and the other three retire once it
/// serves.
#[test]
fn a_mix_change_an_in_place_reshard_supplies_is_not_charged_a_spawn() {
    let run = |in_place: bool| {
        let mut c = controller(in_place);
        assert_eq!(spawns(&c.step(0.0, &obs(0.0, vec![], 0.2))), vec![(0, 4)], "the bundled profile's plan changed");
        let fleet: Vec<InstanceObs> = [0, 21, 22, 23].into_iter().map(|id| inst(id, 4)).collect();
        let mut o = obs(300.0, fleet, 1.0);
        o.observed_spawn_s = vec![420.0; 16];
        (c.step(300.0, &o), c)
    };
    let (held, _) = run(false);
    assert!(spawns(&held).is_empty() && retires(&held).is_empty(), "{held:#?}");
    let (out, mut c) = run(true);
    assert!(spawns(&out).is_empty(), "{out:#?}");
    assert_eq!(reshards(&out), vec![(0, 8)], "{out:#?}");
    assert!(retires(&out).is_empty(), "retired before the TP8 serves: {out:#?}");
    let fleet: Vec<InstanceObs> = vec![inst(0, 8), inst(21, 4), inst(22, 4), inst(23, 4)];
    let done = c.step(600.0, &obs(600.0, fleet, 1.0));
    let mut gone = retires(&done);
    gone.sort_unstable();
    assert_eq!(gone, vec![21, 22, 23], "{done:#?}");
    assert!(spawns(&done).is_empty() && reshards(&done).is_empty(), "{done:#?}");
}

/// scale-shard on a fixed cluster that its first plan fills (two TP8 on 16
/// GPUs for 5 req/s of long/long): when the load falls to 0.2 req/s and
/// four TP4 become the mix, the cluster has no GPUs for them, so a TP8 goes
/// first (the other carries the load), the TP4s come up on the GPUs it
/// freed as soon as it has stopped (not a shard period later), and so on
/// until the new mix serves. The cluster never holds more than its GPUs and
/// some instance always serves.
#[test]
fn scale_shard_on_a_full_fixed_cluster_breaks_before_it_makes() {
    const TOTAL: u32 = 16;
    let mut cfg = ControllerConfig::new(Loops { scale: false, shard: true, clock: false, pools: true }, TOP_MHZ);
    cfg.fixed_gpus = Some(TOTAL);
    let mut c = Controller::new(cfg, ProfileTable::bundled());
    assert_eq!(
        spawns(&c.step(0.0, &obs(0.0, vec![], 5.0))),
        vec![(0, 8), (1, 8)],
        "the bundled profile's plan changed"
    );
    let mut fleet = vec![inst(0, 8), inst(1, 8)];
    let mut first_tp4_at = None;
    for k in 0..=60 {
        let t = 300.0 + 5.0 * f64::from(k);
        // What was starting serves now; what was draining has stopped.
        fleet.retain(|i| i.state != InstanceState::Draining);
        for i in &mut fleet {
            i.state = InstanceState::Serving;
        }
        let out = c.step(t, &obs(t, fleet.clone(), 0.2));
        for id in retires(&out) {
            fleet.iter_mut().find(|i| i.id.0 == id).expect("retired an instance it has").state =
                InstanceState::Draining;
        }
        for (id, tp) in spawns(&out) {
            assert_eq!(tp, 4, "{out:#?}");
            first_tp4_at.get_or_insert(t);
            fleet.push(InstanceObs { state: InstanceState::Starting, ..inst(id, tp) });
        }
        let held: u32 = fleet.iter().map(|i| i.tp).sum();
        assert!(held <= TOTAL, "at {t} s the cluster holds {held} of its {TOTAL} GPUs: {fleet:?}");
        assert!(fleet.iter().any(|i| i.state == InstanceState::Serving), "at {t} s nothing serves: {fleet:?}");
    }
    assert_eq!(first_tp4_at, Some(305.0), "the TP4s did not come up as soon as the TP8's GPUs were free");
    let mut end: Vec<u32> = fleet.iter().map(|i| i.tp).collect();
    end.sort_unstable();
    assert_eq!(end, vec![4, 4, 4, 4], "{fleet:?}");
}

/// `retire_min_age_s`: two TP8 carry 5 req/s of long/long (TP8 only, so the
/// smaller load's mix is one of them); the load falls to 0.5 req/s at the
/// first shard period. Without a minimum age one TP8 is retired at once; with
/// 900 s neither goes before it is 900 s past the step that first saw it
/// (5 s): not at the shard periods at 300, 600 and 900 s, but at 1200 s. The
/// age survives a snapshot and restore (a controller that forgot it would
/// count the instances as new at the restore and keep them).
#[test]
fn an_instance_younger_than_the_minimum_age_is_not_retired() {
    let run = |min_age_s: f64| {
        let mut cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: false, pools: true }, TOP_MHZ);
        cfg.tps = vec![8];
        cfg.retire_min_age_s = min_age_s;
        let mut c = Controller::new(cfg, ProfileTable::bundled());
        assert_eq!(spawns(&c.step(0.0, &obs(0.0, vec![], 5.0))), vec![(0, 8), (1, 8)]);
        let fleet = vec![inst(0, 8), inst(1, 8)];
        // First seen serving at 5 s.
        assert!(retires(&c.step(5.0, &obs(5.0, fleet.clone(), 5.0))).is_empty());
        (c, fleet)
    };
    let (mut free, fleet) = run(0.0);
    let now = retires(&free.step(300.0, &obs(300.0, fleet.clone(), 0.5)));
    assert_eq!(now.len(), 1, "without a minimum age one TP8 goes at once: {now:?}");

    let (mut held, _) = run(900.0);
    for t in [300.0, 600.0, 900.0] {
        let out = held.step(t, &obs(t, fleet.clone(), 0.5));
        assert!(retires(&out).is_empty(), "retired at {t} s, younger than 900 s: {out:#?}");
        assert!(spawns(&out).is_empty(), "{out:#?}");
    }
    let saved = serde_json::to_string(&held.snapshot()).unwrap();
    let mut restored =
        Controller::restore(held.config().clone(), ProfileTable::bundled(), serde_json::from_str(&saved).unwrap())
            .unwrap();
    let out = restored.step(1200.0, &obs(1200.0, fleet.clone(), 0.5));
    assert_eq!(retires(&out).len(), 1, "at the first shard period past 900 s of age one TP8 goes: {out:#?}");
    let d = out.iter().find(|d| matches!(d.action, Action::Retire { .. })).unwrap();
    assert!(d.reason.contains("not needed"), "{}", d.reason);
}

/// An action reported failed is not counted as under way: a failed spawn
/// is no longer capacity coming, a failed reshard no longer an instance
/// coming up at its new degree (the next plan starts from what serves).
#[test]
fn a_failed_spawn_or_reshard_is_not_counted_as_under_way() {
    let mut c = planned_for_two_tp8(false);
    let failed = Action::Spawn {
        instance: InstanceId(1),
        pool: PoolId(LL as u32),
        tp: 8,
        clock_mhz: TOP_MHZ,
        from: actuators_core::SpawnFrom::WarmStandby,
    };
    let still = c.step(5.0, &obs(5.0, vec![inst(0, 8)], 5.0));
    assert!(spawns(&still).is_empty(), "instance 1 is still on its way: {still:#?}");
    c.action_failed(&failed);
    assert!(!c.snapshot().spawning.contains_key(&InstanceId(1)));

    let mut c = planned_for_two_tp8(true);
    let o = obs(300.0, vec![inst(0, 8), inst(7, 4)], 5.0);
    let out = c.step(300.0, &o);
    assert_eq!(reshards(&out), vec![(7, 8)], "{out:#?}");
    let d = out.iter().find(|d| matches!(d.action, Action::Reshard { .. })).unwrap();
    c.action_failed(&d.action);
    assert!(c.snapshot().resharding.is_empty(), "{:?}", c.snapshot().resharding);
}
