//! The service core toward an external router, in virtual time: routes sent
//! make-before-break, a class split back to its own pool routed once the new
//! pool serves, and no route sent to the built-in router in dry-run.

use actuators::{Action, Outcome, Placement};
use service::core::{Mode, ServiceCore};
use std::collections::{BTreeMap, BTreeSet};

mod core_support;
use core_support::{bundled_profile, core, core_config, samples, samples_of, ss_split_back};

/// Make-before-break with an external router told by `route` commands, in
/// virtual time: a spawn serves 60 s after it is acknowledged; the first
/// route of each class fails (retryable), and so does every route for the
/// 15 minutes after the load drops from heavy to light, when pools merge.
/// Every route is sent only once its new pool serves (or its old one does
/// not); every class that moves is routed, the ones riding along with a
/// merge included; a failed route is sent again; no retire leaves a class
/// the router sends to its pool without another serving instance (retires
/// wait); and at the end the router's table is the controller's. The split
/// case is `a_split_class_is_routed_once_its_new_pool_serves`.
#[test]
fn routes_reach_an_external_router_make_before_break() {
    let mut core = core();
    core.prime_rates([12.0; 9]);
    // The router's table, as the routes it applied leave it (the service starts from the same one).
    let mut table = core.routed();
    assert_eq!(table, core.routing());
    let mut pool_of: BTreeMap<u32, u32> = BTreeMap::new();
    let mut up_at: BTreeMap<u32, f64> = BTreeMap::new();
    let mut failed_once: BTreeSet<String> = BTreeSet::new();
    let (mut routes, mut applied, mut retires, mut held) = (0, 0, 0, 0);
    // Every (class, pool) the controller's own route decisions named; a route outside it rode along.
    let mut named: BTreeSet<(String, u32)> = BTreeSet::new();
    let mut rode_along = 0;
    let mut oldest_held_s: f64 = 0.0;
    let mut t = 0.0;
    while t <= 5400.0 {
        let per_tick = if t < 1200.0 { [60; 9] } else { [1; 9] };
        let serving = |i: &u32, up_at: &BTreeMap<u32, f64>| up_at.get(i).is_some_and(|&u| u <= t);
        let cmds = core.tick(t, 0);
        named.extend(core.decisions().filter(|d| d.decision.at_s == t && d.decision.source != "routing").filter_map(
            |d| match &d.decision.action {
                Action::Route { class, pool } => Some((class.clone(), pool.0)),
                _ => None,
            },
        ));
        for c in cmds {
            let outcome = match &c.action {
                Action::Spawn { instance, pool, .. } => {
                    pool_of.insert(instance.0, pool.0);
                    up_at.insert(instance.0, t + 60.0);
                    let node = format!("site/n{}", instance.0);
                    Outcome::Applied {
                        placement: Some(Placement { node, gpus: vec![], endpoint: None }),
                        detail: String::new(),
                    }
                }
                Action::Route { class, pool } => {
                    let idx = telemetry::RequestClass::parse(class).unwrap().index();
                    let to_serves = pool_of.iter().any(|(i, &p)| p == pool.0 && serving(i, &up_at));
                    let from_serves = pool_of.iter().any(|(i, &p)| p == table[idx] && serving(i, &up_at));
                    assert!(
                        to_serves || !from_serves,
                        "at {t} s: {class} routed to pool {} before it serves (from pool {}, which serves)",
                        pool.0,
                        table[idx]
                    );
                    routes += 1;
                    let router_down = (1200.0..2100.0).contains(&t);
                    if failed_once.insert(class.clone()) || router_down {
                        Outcome::Failed { reason: "router busy".into(), retryable: true }
                    } else {
                        applied += 1;
                        table[idx] = pool.0;
                        rode_along += usize::from(!named.contains(&(class.clone(), pool.0)));
                        Outcome::Applied { placement: None, detail: String::new() }
                    }
                }
                Action::Retire { instance } => {
                    let pool = pool_of[&instance.0];
                    for (k, &p) in table.iter().enumerate() {
                        if p == pool {
                            assert!(
                                pool_of.iter().any(|(i, &q)| q == pool && *i != instance.0 && serving(i, &up_at)),
                                "at {t} s: instance {} retired while the router sends class {k} to its pool {pool}, \
                                 which has no other serving instance",
                                instance.0
                            );
                        }
                    }
                    pool_of.remove(&instance.0);
                    up_at.remove(&instance.0);
                    retires += 1;
                    Outcome::Applied { placement: None, detail: String::new() }
                }
                _ => Outcome::Applied { placement: None, detail: String::new() },
            };
            core.on_outcome(&c.id, &outcome);
        }
        let now_held = core.held_retires().count();
        if now_held > held {
            // What is held, and what the router has acknowledged, survive a restart.
            let text = serde_json::to_string(&core.save(t)).unwrap();
            let back = ServiceCore::restore(core_config(), bundled_profile(), serde_json::from_str(&text).unwrap(), t);
            let back = back.unwrap();
            assert_eq!(back.held_retires().collect::<Vec<_>>(), core.held_retires().collect::<Vec<_>>());
            assert_eq!(back.routed(), core.routed());
        }
        held = held.max(now_held);
        let oldest = core.held_retire_oldest_s(t);
        if now_held == 0 {
            assert_eq!(oldest, 0.0, "at {t} s nothing is held");
        }
        oldest_held_s = oldest_held_s.max(oldest);
        core.observe_arrivals(t, &per_tick);
        let up: BTreeSet<String> = up_at.iter().filter(|(_, &u)| u <= t).map(|(i, _)| format!("site/n{i}")).collect();
        samples_of(&mut core, t, |node| up.contains(node));
        t += 5.0;
    }
    assert_eq!(table, core.routing(), "the router's table is the controller's at the end");
    assert_eq!(core.routed(), core.routing());
    assert!(applied > 0 && routes > applied, "routes sent: {routes}, applied (each after a failure): {applied}");
    assert!(rode_along > 0, "no class rode along with a merge: the test lost its point");
    assert!(retires > 0 && held > 0, "retires: {retires}; the most held at once: {held}");
    // The router was down for 15 minutes while pools merged: a retire waited most of that.
    assert!((300.0..=900.0).contains(&oldest_held_s), "the longest hold: {oldest_held_s} s");
    assert_eq!(core.held_retire_oldest_s(t), 0.0, "a retire is still held at the end");
    eprintln!("routes {routes} ({applied} applied, {rode_along} rode along), retires {retires}, held at most {held}, the longest {oldest_held_s} s");
}

/// A class split off to a pool of its own (the controller's table) reaches
/// an external router only once that pool has a serving instance: until
/// then its requests stay on the merged pool that serves them.
#[test]
fn a_split_class_is_routed_once_its_new_pool_serves() {
    let mut core = ss_split_back();
    let load = [5, 5, 0, 0, 0, 0, 0, 0, 0];
    let routes = |cmds: &[actuators::Command]| -> Vec<(String, u32)> {
        cmds.iter()
            .filter_map(|c| match &c.action {
                Action::Route { class, pool } => Some((class.clone(), pool.0)),
                _ => None,
            })
            .collect()
    };
    for t in [5.0, 10.0, 15.0] {
        samples_of(&mut core, t, |n| n == "site/n1");
        core.observe_arrivals(t, &load);
        let cmds = core.tick(t, 0);
        assert!(routes(&cmds).is_empty(), "at {t} s, pool 0 does not serve yet: {cmds:?}");
        assert_eq!(core.routed()[0], 1);
    }
    // Instance 2 answers: SS moves to pool 0, once.
    samples(&mut core, 20.0);
    core.observe_arrivals(20.0, &load);
    let cmds = core.tick(20.0, 0);
    assert_eq!(routes(&cmds), [("SS".to_string(), 0)], "{cmds:?}");
    assert!(routes(&core.tick(25.0, 0)).is_empty(), "one route in flight per class");
    core.on_outcome(
        &cmds.iter().find(|c| c.action.kind() == "route").unwrap().id,
        &Outcome::Applied { placement: None, detail: String::new() },
    );
    assert_eq!(core.routed()[0], 0);
}

/// With the built-in router (no backend routes), the table in effect is the
/// controller's in auto mode and does not move in dry-run, nor in failsafe
/// while telemetry is stale: the router moves no class the operator only
/// wanted to watch being planned.
#[test]
fn dry_run_moves_no_class_with_the_built_in_router() {
    let mut core = ss_split_back();
    core.set_routes_to_backends(false);
    let load = [5, 5, 0, 0, 0, 0, 0, 0, 0];
    core.set_mode(Mode::DryRun);
    for t in [5.0, 10.0, 15.0] {
        samples(&mut core, t);
        core.observe_arrivals(t, &load);
        assert!(core.tick(t, 0).is_empty(), "dry-run sends nothing");
        assert_eq!((core.routing()[0], core.routed()[0]), (0, 1), "at {t} s in dry-run");
    }
    // Blind: failsafe holds the table too.
    core.set_mode(Mode::Auto);
    core.tick(100.0, 0);
    assert_eq!(core.mode(), Mode::Failsafe);
    assert_eq!(core.routed()[0], 1, "failsafe while blind moved SS");
    // Telemetry again, auto: the table in effect is the controller's at once (the router makes before breaking).
    samples(&mut core, 105.0);
    core.observe_arrivals(105.0, &load);
    assert!(core.tick(105.0, 0).iter().all(|c| c.action.kind() != "route"), "the built-in router is sent no route");
    assert_eq!(core.mode(), Mode::Auto);
    assert_eq!(core.routed(), core.routing());
    assert_eq!(core.routed()[0], 0);
}
