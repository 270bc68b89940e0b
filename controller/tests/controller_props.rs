//! Properties of the sans-IO controller, driven by a small cluster model:
//! spawns serve after a lead time, retires leave at once, clocks apply at
//! once; demand follows a random (seeded) trajectory.

use actuators_core::{Action, InstanceId, PoolId};
use controller::control::plan::{Demand, Planner};
use controller::control::{
    AttainmentHistory, Controller, ControllerConfig, InstanceObs, InstanceState, Loops, Observations,
    CAPACITY_EVIDENCE_SHARE, MAX_CAPACITY_SCALE, SIZE_SCALE_MEMORY_S,
};
use controller::profile::ProfileTable;
use proptest::prelude::*;
use std::collections::BTreeMap;
use telemetry_core::CLASS_COUNT;

const STEP_S: f64 = 5.0;
const LEAD_S: f64 = 30.0;

struct Model {
    instances: BTreeMap<InstanceId, (InstanceObs, f64)>,
}

impl Model {
    fn new() -> Model {
        Model { instances: BTreeMap::new() }
    }

    fn observe(&mut self, now: f64, demand: &Demand) -> Observations {
        for (o, ready) in self.instances.values_mut() {
            if o.state == InstanceState::Starting && now >= *ready {
                o.state = InstanceState::Serving;
            }
        }
        Observations {
            now_s: now,
            instances: self.instances.values().map(|(o, _)| *o).collect(),
            class_rps_recent: *demand,
            class_rps_smoothed: *demand,
            class_peak_scale: Some(*demand),
            class_peak_shard: Some(*demand),
            observed_spawn_s: vec![],
            class_attainment_recent: [Some(1.0); CLASS_COUNT],
            class_attainment_window: [None; CLASS_COUNT],
        }
    }

    fn apply(&mut self, now: f64, action: &Action, first: bool) {
        match *action {
            Action::Spawn { instance, pool, tp, clock_mhz, .. } => {
                let state = if first { InstanceState::Serving } else { InstanceState::Starting };
                let o =
                    InstanceObs { id: instance, pool, tp, clock_mhz, state, outstanding: 0, waiting: 0, power_w: None };
                self.instances.insert(instance, (o, now + LEAD_S));
            }
            Action::Retire { instance } => {
                self.instances.remove(&instance);
            }
            Action::SetClock { instance, clock_mhz } => {
                if let Some((o, _)) = self.instances.get_mut(&instance) {
                    o.clock_mhz = clock_mhz;
                }
            }
            Action::Reshard { .. } | Action::Route { .. } | Action::MoveQueued { .. } => {}
        }
    }

    fn gpus(&self) -> u32 {
        self.instances.values().map(|(o, _)| o.tp).sum()
    }
}

/// A TP8 instance serving one request at the top clock.
fn serving_tp8(id: InstanceId, pool: PoolId) -> InstanceObs {
    InstanceObs {
        id,
        pool,
        tp: 8,
        clock_mhz: 1980,
        state: InstanceState::Serving,
        outstanding: 1,
        waiting: 0,
        power_w: None,
    }
}

fn config() -> ControllerConfig {
    let mut cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980);
    cfg.spawn_lead_s = LEAD_S;
    cfg
}

/// Serving capacity of a pool for its own demand mix (requests/s within the planning limit).
fn serving_capacity(profile: &ProfileTable, model: &Model, pool: PoolId, shares: &Demand, max_util: f64) -> f64 {
    let p = Planner::new(profile, &[2, 4, 8], shares, max_util);
    model
        .instances
        .values()
        .filter(|(o, _)| o.pool == pool && o.state == InstanceState::Serving)
        .map(|(o, _)| p.capacity(o.tp) * max_util)
        .sum()
}

fn demand_at(base: &[f64; CLASS_COUNT], wave: &[f64], step: usize) -> Demand {
    let f = wave[(step / 60) % wave.len()];
    std::array::from_fn(|c| base[c] * f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, rng_seed: proptest::test_runner::RngSeed::Fixed(7), ..ProptestConfig::default() })]

    /// A retire never leaves a pool's serving capacity (as the controller has
    /// learnt it) below its current demand.
    #[test]
    fn capacity_never_below_need_during_reconfiguration(
        base in proptest::array::uniform9(0.0f64..3.0),
        wave in proptest::collection::vec(0.05f64..1.0, 4..8),
    ) {
        let profile = ProfileTable::bundled();
        let mut ctl = Controller::new(config(), profile.clone());
        let mut model = Model::new();
        for step in 0..(8 * 60) {
            let now = step as f64 * STEP_S;
            let d = demand_at(&base, &wave, step);
            let obs = model.observe(now, &d);
            let out = ctl.step(now, &obs);
            for dec in &out {
                if let Action::Retire { instance } = dec.action {
                    let pool = model.instances[&instance].0.pool;
                    let shares: Demand = std::array::from_fn(|c| if ctl.routing().pool_of[c] == pool.0 { d[c] } else { 0.0 });
                    let need: f64 = shares.iter().sum();
                    model.apply(now, &dec.action, false);
                    // The capacity the controller plans with: the profile's, times what it has
                    // learnt from the pool's SLO attainment (here always met, so it grows).
                    let max_util = ctl.config().max_util * ctl.snapshot().util_scale[pool.0 as usize];
                    let left = serving_capacity(&profile, &model, pool, &shares, max_util);
                    prop_assert!(left + 1e-9 >= need, "t={now}: retiring {instance:?} leaves {left:.3} req/s for {need:.3}");
                } else {
                    model.apply(now, &dec.action, step == 0);
                }
            }
        }
    }
}

#[test]
fn a_second_step_on_the_same_observations_asks_for_nothing_new() {
    let profile = ProfileTable::bundled();
    let mut ctl = Controller::new(config(), profile);
    let mut model = Model::new();
    let base = [0.2, 1.0, 0.05, 1.5, 0.7, 0.9, 1.2, 0.5, 2.5];
    let wave = [1.0, 0.4, 0.8, 0.2];
    let mut checked = 0;
    for step in 0..(6 * 60) {
        let now = step as f64 * STEP_S;
        let d = demand_at(&base, &wave, step);
        let obs = model.observe(now, &d);
        let out = ctl.step(now, &obs);
        let again = ctl.step(now, &obs);
        assert!(
            again.is_empty(),
            "t={now}: the repeated step asked for {:?}",
            again.iter().map(|d| &d.action).collect::<Vec<_>>()
        );
        checked += usize::from(!out.is_empty());
        for dec in &out {
            model.apply(now, &dec.action, step == 0);
        }
    }
    assert!(checked > 5, "the trajectory should make the controller act several times, it acted {checked} times");
}

/// Under constant load an instance's clock may settle (and follow the capacity and
/// clock margin the controller learns, which only move one way when every window
/// meets the SLO), but once pools and what is learnt stop changing it never goes
/// back and forth.
#[test]
fn constant_load_does_not_make_clocks_thrash() {
    let profile = ProfileTable::bundled();
    let mut ctl = Controller::new(config(), profile);
    let mut model = Model::new();
    let d: Demand = [0.2, 1.0, 0.05, 1.5, 0.7, 0.9, 1.2, 0.5, 2.5];
    let mut sets: Vec<(f64, InstanceId, u32)> = Vec::new();
    let mut last_route_s = 0.0;
    // Every window meets the SLO here, so the learnt capacity grows 5% a window up
    // to its cap, and pools may shrink until then; give that a scale period more,
    // and watch the clocks for an hour after.
    let learning_s = (MAX_CAPACITY_SCALE.ln() / 1.05f64.ln()).ceil() * ctl.config().attainment_window_s;
    let settled_s = learning_s + ctl.config().scale_period_s;
    let horizon_s = settled_s + 3600.0;
    for step in 0..((horizon_s / STEP_S) as usize) {
        let now = step as f64 * STEP_S;
        let obs = model.observe(now, &d);
        for dec in ctl.step(now, &obs) {
            match dec.action {
                Action::SetClock { instance, clock_mhz } => sets.push((now, instance, clock_mhz)),
                // Pools changing shape (merges, scale-in) move loads between instances.
                Action::Route { .. } | Action::Spawn { .. } | Action::Retire { .. } => last_route_s = now,
                _ => {}
            }
            model.apply(now, &dec.action, step == 0);
        }
    }
    assert!(
        last_route_s <= settled_s,
        "pools should stop changing once the capacity is learnt ({settled_s} s) under constant load; last change at {last_route_s} s"
    );
    // While the capacity grows the power each clock is predicted to draw at a load changes (it is
    // read at the load's share of the learnt capacity), and a clock may follow it down and back
    // up; with the clock margin learnt below 1 that happened before the capacity reached its cap.
    // Once both the pools and what is learnt hold still, no clock goes back and forth.
    let still_s = last_route_s.max(learning_s);
    let mut clocks: BTreeMap<InstanceId, Vec<u32>> = BTreeMap::new();
    for &(t, id, c) in &sets {
        if t > still_s {
            clocks.entry(id).or_default().push(c);
        }
    }
    assert!(!sets.is_empty(), "the clock loop should lower some clocks below the top");
    for (id, seq) in &clocks {
        let ups = seq.windows(2).any(|w| w[1] > w[0]);
        let downs = seq.windows(2).any(|w| w[1] < w[0]);
        assert!(!(ups && downs), "{id:?} went back and forth under constant load: {seq:?}");
        assert!(seq.len() <= 8, "{id:?} changed clock {} times under constant load: {seq:?}", seq.len());
    }
}

#[test]
fn a_class_without_traffic_does_not_stall_scale_in() {
    let profile = ProfileTable::bundled();
    let mut ctl = Controller::new(config(), profile);
    let mut model = Model::new();
    let mut high: Demand = [3.0, 4.0, 0.5, 6.0, 3.0, 2.0, 4.0, 2.0, 8.0];
    high[2] = 0.0; // SL never has traffic
    let low: Demand = std::array::from_fn(|c| high[c] * 0.1);
    let mut gpus_at_peak = 0;
    for step in 0..(4 * 3600 / 5) {
        let now = step as f64 * STEP_S;
        let d = if now < 3600.0 { high } else { low };
        let obs = model.observe(now, &d);
        for dec in ctl.step(now, &obs) {
            model.apply(now, &dec.action, step == 0);
        }
        if (now - 3595.0).abs() < 1e-9 {
            gpus_at_peak = model.gpus();
        }
    }
    let end = model.gpus();
    assert!(gpus_at_peak > 0);
    assert!(
        end * 2 <= gpus_at_peak,
        "three hours at a tenth of the load: {end} GPUs against {gpus_at_peak} at the peak"
    );
}

/// The clock loop sets a clock for the load seen now. In a pool of one
/// prompt band it adds no planning margin (that covers the spawn lead; a
/// clock follows the load within 5 s); in a pool mixing prompt bands (here
/// the single pool of scale-freq and scale-inst) it keeps the margin, as
/// short prompts there wait behind long prefills the profile does not see.
/// The same long/long load on the same TP8 instance therefore gets the
/// clock the profile gives that load in the first case and the clock it
/// gives the load times the margin in the second.
#[test]
fn the_clock_follows_the_load_seen_now_with_the_margin_only_where_prompt_bands_mix() {
    const LL: usize = 8;
    let profile = ProfileTable::bundled();
    let cfg = |pools: bool| {
        let mut c = ControllerConfig::new(Loops { scale: false, shard: false, clock: true, pools }, 1980);
        c.fixed_instances = Some(1);
        // The clock for the load itself, without room for a Poisson load's chance bursts.
        c.clock_down_sigmas = 0.0;
        c
    };
    let margin = cfg(true).observed_margin;
    assert!(margin > 1.0);
    let mut shares = [0.0; CLASS_COUNT];
    shares[LL] = 1.0;
    let planner = Planner::new(&profile, &cfg(true).tps, &shares, cfg(true).max_util);
    // A load whose clock differs with and without the margin, both below the top clock.
    let cap = planner.capacity(8) * planner.max_util;
    let (load, bare, padded) = (1..200)
        .map(|k| cap * f64::from(k) / 200.0)
        .find_map(|l| {
            let a = planner.clock_for(8, l)?;
            let b = planner.clock_for(8, l * margin)?;
            (a < b && b < 1980).then_some((l, a, b))
        })
        .expect("the bundled profile has a load whose clock the margin raises");
    let clock_set = |pools: bool| {
        let mut ctl = Controller::new(cfg(pools), profile.clone());
        let pool = PoolId(if pools { LL as u32 } else { 0 });
        let mut d = [0.0; CLASS_COUNT];
        d[LL] = load;
        let mut model = Model::new();
        model.instances.insert(InstanceId(1000), (serving_tp8(InstanceId(1000), pool), 0.0));
        let mut obs = model.observe(0.0, &d);
        obs.class_attainment_recent = [None; CLASS_COUNT];
        ctl.step(0.0, &obs)
            .into_iter()
            .find_map(|dec| match dec.action {
                Action::SetClock { instance: InstanceId(1000), clock_mhz } => Some(clock_mhz),
                _ => None,
            })
            .expect("the clock loop lowers the top clock")
    };
    assert_eq!(clock_set(true), bare, "long/long's own pool at {load:.3} req/s");
    assert_eq!(clock_set(false), padded, "the single pool at {load:.3} req/s");
}

/// A pool of one prompt band whose attainment dips while its clocks run
/// below the top first raises the clock loop's margin on its load (×1.05 a
/// window, up to the planning margin), which costs power, before its
/// capacity shrinks, which costs GPUs; comfortable windows take the margin
/// back down (×0.93, to 1) as the capacity grows. The clock follows: it
/// always carries the load times the margin, so it ends above the clock the
/// bare load got. The margin survives a restart from a snapshot.
#[test]
fn a_dip_raises_the_clock_margin_before_the_capacity_shrinks() {
    const LL: usize = 8;
    let profile = ProfileTable::bundled();
    let mut cfg = ControllerConfig::new(Loops { scale: false, shard: false, clock: true, pools: true }, 1980);
    cfg.fixed_instances = Some(1);
    // The clock for the load itself, without room for a Poisson load's chance bursts.
    cfg.clock_down_sigmas = 0.0;
    let (step, decay, ceiling, window, floor) = (
        cfg.clock_margin_step,
        cfg.clock_margin_decay,
        cfg.observed_margin,
        cfg.attainment_window_s,
        cfg.clock_margin_floor,
    );
    let mut shares = [0.0; CLASS_COUNT];
    shares[LL] = 1.0;
    let planner = Planner::new(&profile, &cfg.tps, &shares, cfg.max_util);
    // A load whose bare clock cannot carry it with the whole margin, which a clock below the top can.
    let cap = planner.capacity(8) * planner.max_util;
    let load = (1..200)
        .map(|k| cap * f64::from(k) / 200.0)
        .find(|&l| match (planner.clock_for(8, l), planner.clock_for(8, l * ceiling)) {
            (Some(a), Some(c)) => !planner.carries(8, a, l * ceiling) && c < 1980,
            _ => false,
        })
        .expect("the bundled profile has such a load");
    let bare = planner.clock_for(8, load).unwrap();
    let mut d = [0.0; CLASS_COUNT];
    d[LL] = load;
    let mut ctl = Controller::new(cfg.clone(), profile.clone());
    let mut model = Model::new();
    let id = InstanceId(1000);
    let o = serving_tp8(id, PoolId(LL as u32));
    model.instances.insert(id, (o, 0.0));
    let reasons = std::cell::RefCell::new(Vec::<String>::new());
    let run = |ctl: &mut Controller, model: &mut Model, t: f64, attainment: Option<f64>| -> u32 {
        let mut obs = model.observe(t, &d);
        obs.class_attainment_recent = [None; CLASS_COUNT];
        obs.class_attainment_recent[LL] = attainment;
        for dec in ctl.step(t, &obs) {
            model.apply(t, &dec.action, false);
            if matches!(dec.action, Action::SetClock { instance, .. } if instance == id) {
                reasons.borrow_mut().push(dec.reason);
            }
        }
        model.instances[&id].0.clock_mhz
    };
    let mut t = 0.0;
    assert_eq!(run(&mut ctl, &mut model, t, None), bare, "the bare load's clock at first");
    let state = |ctl: &Controller| (ctl.snapshot().clock_margin[LL], ctl.snapshot().util_scale[LL]);
    assert_eq!(state(&ctl), (1.0, 1.0));
    // Dips: the margin rises a step a window while the clock is below the top; the capacity holds.
    let mut want = 1.0_f64;
    while want < ceiling - 1e-9 {
        t += window;
        let clock = run(&mut ctl, &mut model, t, Some(0.98));
        want = (want * step).min(ceiling);
        let (m, s) = state(&ctl);
        assert!((m - want).abs() < 1e-9 && s == 1.0, "at {t} s: margin {m}, capacity scale {s}, want {want}");
        assert!(clock < 1980 && planner.carries(8, clock, load * m), "at {t} s: {clock} MHz for {load} × {m}");
    }
    assert!(model.instances[&id].0.clock_mhz > bare, "the margin raised the clock");
    let early = reasons.borrow().clone();
    let raised = early.last().unwrap();
    assert!(raised.contains(&format!("× {ceiling:.3}, the margin learnt from attainment")), "{raised}");
    assert!(!early[0].contains("margin"), "the first clock had none: {}", early[0]);
    assert_eq!(ctl.learnt(LL), Some((1.0, ceiling)));
    // At the ceiling, a dip shrinks the capacity.
    t += window;
    run(&mut ctl, &mut model, t, Some(0.98));
    assert_eq!(state(&ctl), (ceiling, 0.85));
    // A restart keeps what was learnt.
    let back = Controller::restore(cfg, profile.clone(), ctl.snapshot()).unwrap();
    assert_eq!(state(&back), state(&ctl));
    // Comfortable windows: the margin comes back down as the capacity grows.
    t += window;
    run(&mut ctl, &mut model, t, Some(1.0));
    let (m, s) = state(&ctl);
    assert!((m - ceiling * decay).abs() < 1e-9 && (s - 0.85 * 1.05).abs() < 1e-9, "margin {m}, capacity scale {s}");
    let mut margins = vec![];
    for _ in 0..40 {
        t += window;
        run(&mut ctl, &mut model, t, Some(1.0));
        margins.push(state(&ctl).0);
    }
    // Past 1 and on down to the floor (what that does to the clock: the next test).
    assert!(floor < 1.0, "the default floor lets the margin below 1");
    assert!(margins.iter().any(|m| *m < 1.0 && *m > floor), "{margins:?}");
    assert_eq!(*margins.last().unwrap(), floor, "the margin settles at the floor");
    assert!(margins.windows(2).all(|w| w[1] <= w[0] + 1e-12), "it only falls: {margins:?}");

    // A pool mixing prompt bands (scale-freq's single pool) keeps the planning margin on its
    // clocks, so a dip there shrinks its capacity at once (which raises its clocks).
    let mut cfg = ControllerConfig::new(Loops { scale: false, shard: false, clock: true, pools: false }, 1980);
    cfg.fixed_instances = Some(1);
    let mut ctl = Controller::new(cfg, profile);
    let mut obs = Model::new().observe(0.0, &[0.05; CLASS_COUNT]);
    obs.class_attainment_recent = [None; CLASS_COUNT];
    ctl.step(0.0, &obs);
    obs.instances = vec![InstanceObs { pool: PoolId(0), clock_mhz: 1200, ..o }];
    obs.now_s = window;
    obs.class_attainment_recent = [Some(0.98); CLASS_COUNT];
    ctl.step(window, &obs);
    let st = ctl.snapshot();
    assert_eq!((st.clock_margin[0], st.util_scale[0]), (1.0, 0.85), "the mixed pool's dip");
    assert_eq!(ctl.learnt(0), Some((0.85, ceiling)), "a mixed pool's clocks carry the planning margin");
}

/// Comfortable windows take a one-band pool's clock margin below 1, down to the floor: the pool
/// keeps its SLOs with room to spare, so its clock goes under what the profile's one instance
/// needs for the load seen, and the decision's reason names the margin.
#[test]
fn comfort_takes_the_clock_margin_below_one_and_the_clock_below_the_bare_loads() {
    const LL: usize = 8;
    let profile = ProfileTable::bundled();
    let mut cfg = ControllerConfig::new(Loops { scale: false, shard: false, clock: true, pools: true }, 1980);
    cfg.fixed_instances = Some(1);
    // The clock for the load itself, without room for a Poisson load's chance bursts.
    cfg.clock_down_sigmas = 0.0;
    let floor = cfg.clock_margin_floor;
    assert!(floor < 1.0);
    let mut shares = [0.0; CLASS_COUNT];
    shares[LL] = 1.0;
    let planner = Planner::new(&profile, &cfg.tps, &shares, cfg.max_util);
    let cap = planner.capacity(8) * planner.max_util;
    let power = |f: u32, l: f64| planner.power_at(8, f, l).unwrap_or(f64::INFINITY);
    // A load whose floor-lightened share runs a lower clock, saving more than the hysteresis asks.
    let load = (1..200)
        .map(|k| cap * f64::from(k) / 200.0)
        .find(|&l| match (planner.clock_for(8, l), planner.clock_for(8, l * floor)) {
            (Some(a), Some(b)) => {
                b < a && power(a, l * floor) - power(b, l * floor) > cfg.clock_hysteresis * power(a, l * floor)
            }
            _ => false,
        })
        .expect("the bundled profile has such a load");
    let bare = planner.clock_for(8, load).unwrap();
    let mut d = [0.0; CLASS_COUNT];
    d[LL] = load;
    let mut ctl = Controller::new(cfg.clone(), profile);
    let mut model = Model::new();
    let id = InstanceId(1000);
    model.instances.insert(id, (serving_tp8(id, PoolId(LL as u32)), 0.0));
    let mut reason = String::new();
    for w in 0..=40 {
        let t = f64::from(w) * cfg.attainment_window_s;
        let mut obs = model.observe(t, &d);
        obs.class_attainment_recent = [None; CLASS_COUNT];
        obs.class_attainment_recent[LL] = (w > 0).then_some(1.0);
        for dec in ctl.step(t, &obs) {
            model.apply(t, &dec.action, false);
            if matches!(dec.action, Action::SetClock { instance, .. } if instance == id) {
                reason = dec.reason;
            }
        }
        if w == 0 {
            assert_eq!(model.instances[&id].0.clock_mhz, bare, "the bare load's clock at first");
        }
    }
    assert_eq!(ctl.snapshot().clock_margin[LL], floor, "the margin settles at the floor");
    let clock = model.instances[&id].0.clock_mhz;
    assert!(clock < bare && planner.carries(8, clock, load * floor), "{clock} MHz (bare {bare})");
    assert!(reason.contains("the margin learnt from attainment") && reason.contains("(the load seen × 0."), "{reason}");
}

/// A class's attainment window reaches back until it holds `attainment_min_requests` requests
/// (a big class's is just the window), and never past `attainment_lookback_s`.
#[test]
fn a_small_class_is_judged_over_enough_requests_and_no_further_back_than_the_lookback() {
    let cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980);
    let (window, min, lookback) = (cfg.attainment_window_s, cfg.attainment_min_requests, cfg.attainment_lookback_s);
    let step = 5.0;
    let (big, small) = (0usize, 1usize);
    let mut hist = AttainmentHistory::default();
    let mut k = [[0u64; 4]; CLASS_COUNT];
    let mut t = 0.0;
    assert_eq!(hist.push(t, k, &cfg), [None; CLASS_COUNT], "no requests yet");
    let advance = |hist: &mut AttainmentHistory,
                   k: &mut [[u64; 4]; CLASS_COUNT],
                   t: &mut f64,
                   miss_big: bool,
                   miss_small: bool| {
        *t += step;
        // The big class: 100 requests a step; the small one: 1.
        k[big] = [k[big][0] + if miss_big { 0 } else { 100 }, k[big][1] + 100, 0, 0];
        k[small] = [k[small][0] + u64::from(!miss_small), k[small][1] + 1, 0, 0];
        hist.push(*t, *k, &cfg)
    };
    // An early step where both classes miss everything, then a while of clean steps.
    let mut last = advance(&mut hist, &mut k, &mut t, true, true);
    assert_eq!((last[big], last[small]), (Some(0.0), Some(0.0)));
    while t < window + 2.0 * step {
        last = advance(&mut hist, &mut k, &mut t, false, false);
    }
    assert_eq!(last[big], Some(1.0), "the big class's window is just the last {window} s");
    assert_eq!(hist.plain_window()[small], Some(1.0), "the small class's plain window holds no miss");
    assert_eq!((last[2], hist.plain_window()[2]), (None, Some(1.0)), "a class without requests: no miss either");
    let n = (t / step) as u64;
    assert!(n < min);
    let want = (n - 1) as f64 / n as f64;
    assert!((last[small].unwrap() - want).abs() < 1e-12, "the small class reaches back to its miss: {last:?}");
    // Far enough on, the small class has its requests within the lookback and the miss is gone.
    while t < lookback + window {
        last = advance(&mut hist, &mut k, &mut t, false, false);
    }
    assert_eq!(last[small], Some(1.0));
    // A new miss of the small class counts in its window at once, and stays while it is among
    // the last `min` requests.
    last = advance(&mut hist, &mut k, &mut t, false, true);
    let got = last[small].unwrap();
    assert!(got < 1.0 && got >= 1.0 - 1.0 / min as f64 - 1e-12, "{got}");
    assert!(hist.plain_window()[small].unwrap() < 1.0, "the new miss is in the plain window too");
    assert_eq!(hist.latest().unwrap(), k);
}

/// One TP8 instance of long/long's own pool at 1400 MHz carrying a light load (its clock stays
/// below the top); after a first step, a step one attainment window later sees `recent` over the
/// class's longer window and `plain` over the plain one. What the pool learnt: (clock margin,
/// capacity scale).
fn learnt_from_one_window(cfg: &ControllerConfig, recent: f64, plain: Option<f64>) -> (f64, f64) {
    learnt_from_one_window_at(cfg, recent, plain, 0.02)
}

/// [`learnt_from_one_window`] with long/long arriving at `load_rps`.
fn learnt_from_one_window_at(cfg: &ControllerConfig, recent: f64, plain: Option<f64>, load_rps: f64) -> (f64, f64) {
    const LL: usize = 8;
    let mut ctl = Controller::new(cfg.clone(), ProfileTable::bundled());
    let mut model = Model::new();
    let id = InstanceId(1000);
    model.instances.insert(id, (InstanceObs { clock_mhz: 1400, ..serving_tp8(id, PoolId(LL as u32)) }, 0.0));
    let mut d = [0.0; CLASS_COUNT];
    d[LL] = load_rps;
    for t in [0.0, cfg.attainment_window_s] {
        let mut obs = model.observe(t, &d);
        obs.class_attainment_recent = [None; CLASS_COUNT];
        obs.class_attainment_recent[LL] = (t > 0.0).then_some(recent);
        obs.class_attainment_window[LL] = plain.filter(|_| t > 0.0);
        for dec in ctl.step(t, &obs) {
            model.apply(t, &dec.action, false);
        }
    }
    assert!(model.instances[&id].0.clock_mhz < 1980, "the clock runs below the top");
    let st = ctl.snapshot();
    (st.clock_margin[LL], st.util_scale[LL])
}

fn one_instance_clock_only() -> ControllerConfig {
    let mut cfg = ControllerConfig::new(Loops { scale: false, shard: false, clock: true, pools: true }, 1980);
    cfg.fixed_instances = Some(1);
    cfg
}

/// A dip over a small class's longer window counts only while its plain window holds a miss of
/// its own: one old miss is not counted again each window while it stays in view.
#[test]
fn a_dip_without_a_new_miss_teaches_nothing() {
    let cfg = one_instance_clock_only();
    let learnt = |plain: Option<f64>| learnt_from_one_window(&cfg, 0.985, plain);
    assert_eq!(learnt(Some(1.0)), (1.0, 1.0), "no miss in the plain window: nothing learnt");
    assert_ne!(learnt(Some(0.99)), (1.0, 1.0), "a miss of its own: the dip counts");
    assert_ne!(learnt(None), (1.0, 1.0), "no plain window given: the dip counts");
}

/// A dip is sharp when a class's plain window falls below `sharp_dip_attainment`: the pool's
/// capacity shrinks at once (its clock margin rises too), where a mild dip in a pool running below
/// the top clock raises the margin alone. A plain window above the threshold but with a miss is
/// mild; the sharp rule needs the longer window below target as well.
#[test]
fn a_sharp_dip_shrinks_the_capacity_at_once() {
    let cfg = one_instance_clock_only();
    let (step, sharp) = (cfg.clock_margin_step, cfg.sharp_dip_attainment);
    assert!(sharp > 0.9 && sharp < 0.99, "{sharp}");
    let learnt = |recent: f64, plain: f64| learnt_from_one_window(&cfg, recent, Some(plain));
    assert_eq!(learnt(0.985, sharp + 0.005), (step, 1.0), "a mild dip: the clock margin first");
    assert_eq!(learnt(0.985, sharp - 0.005), (step, 0.85), "a sharp dip: the capacity too");
    assert_eq!(learnt(0.995, sharp - 0.005), (1.0, 1.0), "the longer window holds the target: nothing");
}

/// Between the 99% target and `attainment_comfort` a pool holds still; at or above it, its clock
/// margin decays a step, and its learnt capacity grows a step where the pool carried at least
/// `CAPACITY_EVIDENCE_SHARE` of what it is credited with (below that, comfort has not tested the
/// capacity). A lower comfort tightens a pool that a higher one leaves alone.
#[test]
fn comfort_sets_where_a_pool_starts_to_tighten() {
    let mut cfg = one_instance_clock_only();
    let comfort = cfg.attainment_comfort;
    assert!(comfort > 0.99 && comfort < 1.0, "{comfort}");
    let mut shares = [0.0; CLASS_COUNT];
    shares[8] = 1.0;
    let planner = Planner::new(&ProfileTable::bundled(), &cfg.tps, &shares, cfg.max_util);
    let credited = planner.capacity(8) * planner.max_util;
    let (tested, untested) = ((CAPACITY_EVIDENCE_SHARE + 0.05) * credited, (CAPACITY_EVIDENCE_SHARE - 0.05) * credited);
    let decayed = (cfg.clock_margin_decay).max(cfg.clock_margin_floor);
    let learnt = |cfg: &ControllerConfig, a: f64, load: f64| learnt_from_one_window_at(cfg, a, Some(1.0), load);
    assert_eq!(learnt(&cfg, comfort - 0.001, tested), (1.0, 1.0), "below comfort: nothing");
    assert_eq!(learnt(&cfg, comfort, tested), (decayed, 1.05), "at comfort: a step tighter");
    assert_eq!(learnt(&cfg, comfort, untested), (decayed, 1.0), "comfort at a light load: the clock margin alone");
    cfg.attainment_comfort = comfort - 0.002;
    assert_eq!(learnt(&cfg, comfort - 0.001, tested), (decayed, 1.05), "a lower comfort tightens it");
}

/// One TP8 instance serving long/long alone (clock loop only) at `rate_rps`, with the load seen
/// as the twin and the service see it: each clock period's arrivals counted from a seeded Poisson
/// process, and smoothed over a minute. Returns the clock changes over `hours`.
fn clock_changes_under_poisson(cfg: &ControllerConfig, rate_rps: f64, hours: f64, seed: u64) -> usize {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Poisson};
    const LL: usize = 8;
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let arrivals = Poisson::new(rate_rps * STEP_S).expect("a positive rate");
    let mut ctl = Controller::new(cfg.clone(), ProfileTable::bundled());
    let mut model = Model::new();
    let id = InstanceId(1000);
    model.instances.insert(id, (serving_tp8(id, PoolId(LL as u32)), 0.0));
    let alpha = STEP_S / 60.0;
    let mut smoothed = rate_rps;
    let mut changes = 0;
    for step in 0..((hours * 3600.0 / STEP_S) as usize) {
        let now = step as f64 * STEP_S;
        let recent = arrivals.sample(&mut rng) / STEP_S;
        smoothed += alpha * (recent - smoothed);
        let mut obs = model.observe(now, &[0.0; CLASS_COUNT]);
        obs.class_rps_recent[LL] = recent;
        obs.class_rps_smoothed[LL] = smoothed;
        // Nothing learnt from attainment: the clock follows the load alone.
        obs.class_attainment_recent = [None; CLASS_COUNT];
        for dec in ctl.step(now, &obs) {
            // The first step takes the instance down from the top clock it started at.
            if matches!(dec.action, Action::SetClock { .. }) && step > 0 {
                changes += 1;
            }
            model.apply(now, &dec.action, false);
        }
    }
    changes
}

/// The load (requests/s) at which the least-power clock for long/long on one TP8 instance steps
/// up from one clock below the top to the next: where a steady load's chance bursts cross.
fn ll_clock_step_load(cfg: &ControllerConfig) -> f64 {
    let mut shares = [0.0; CLASS_COUNT];
    shares[8] = 1.0;
    let planner = Planner::new(&ProfileTable::bundled(), &cfg.tps, &shares, cfg.max_util);
    let cap = planner.capacity(8) * planner.max_util;
    let clocks: Vec<(f64, u32)> =
        (1..400).map(|k| cap * f64::from(k) / 400.0).filter_map(|l| Some((l, planner.clock_for(8, l)?))).collect();
    clocks
        .windows(2)
        .find(|w| w[1].1 > w[0].1 && w[1].1 < cfg.max_clock_mhz && w[0].0 > 0.1 * cap)
        .map(|w| w[1].0)
        .expect("the bundled profile steps the clock below the top")
}

/// A steady Poisson load near a clock step: counted over 5 s periods its rate jumps by tens of
/// percent from one period to the next, and every period above the clock step takes the clock up
/// at once. When a step down needs only carry the load seen in the period it is taken in, the
/// clock goes back down a hold later and flaps all the time; when it must carry the smoothed rate
/// plus `clock_down_sigmas` standard deviations of a period's count too, it mostly stays up.
#[test]
fn chance_bursts_of_a_steady_poisson_load_flip_the_clock_far_less_often() {
    let cfg = one_instance_clock_only();
    assert_eq!(cfg.clock_down_sigmas, controller::control::CLOCK_DOWN_SIGMAS);
    let rate = 0.9 * ll_clock_step_load(&cfg);
    let bare = ControllerConfig { clock_down_sigmas: 0.0, ..cfg.clone() };
    for seed in [1, 2, 3] {
        let (damped, flapping) =
            (clock_changes_under_poisson(&cfg, rate, 2.0, seed), clock_changes_under_poisson(&bare, rate, 2.0, seed));
        assert!(
            flapping >= 200,
            "seed {seed}: with steps down on the load seen alone the clock should flap at {rate:.3} req/s; {flapping} changes in 2 h"
        );
        assert!(damped * 3 <= flapping, "seed {seed}: {damped} changes in 2 h against {flapping} without the band");
    }
}

/// Rises are not held back: a period well above the smoothed rate raises the clock in that very
/// step. A step down stops at the least-power clock that also carries the smoothed rate plus
/// `clock_down_sigmas` standard deviations of one period's count: a steady rate just below a clock
/// step, whose chance bursts cross it, settles at the clock above the step, where without the band
/// it settles below it.
#[test]
fn a_surge_raises_the_clock_at_once_and_a_step_down_leaves_room_for_chance_bursts() {
    const LL: usize = 8;
    let cfg = one_instance_clock_only();
    let step_load = ll_clock_step_load(&cfg);
    let rate = 0.9 * step_load;
    let sd = (rate / cfg.clock_period_s).sqrt();
    assert!(rate + sd > step_load, "one deviation up must cross the clock step for this to test anything");
    let mut shares = [0.0; CLASS_COUNT];
    shares[LL] = 1.0;
    let planner = Planner::new(&ProfileTable::bundled(), &cfg.tps, &shares, cfg.max_util);
    // Settle at the steady rate past the hold, then see one period at `surge` req/s.
    let run = |cfg: &ControllerConfig, surge: f64| -> (u32, bool) {
        let mut ctl = Controller::new(cfg.clone(), ProfileTable::bundled());
        let mut model = Model::new();
        let id = InstanceId(1000);
        model.instances.insert(id, (serving_tp8(id, PoolId(LL as u32)), 0.0));
        let mut d = [0.0; CLASS_COUNT];
        d[LL] = rate;
        for step in 0..20 {
            let now = step as f64 * STEP_S;
            let mut obs = model.observe(now, &d);
            obs.class_attainment_recent = [None; CLASS_COUNT];
            for dec in ctl.step(now, &obs) {
                model.apply(now, &dec.action, false);
            }
        }
        let settled = model.instances[&id].0.clock_mhz;
        let now = 20.0 * STEP_S;
        let mut obs = model.observe(now, &d);
        obs.class_rps_recent[LL] = surge;
        obs.class_attainment_recent = [None; CLASS_COUNT];
        let raised = ctl
            .step(now, &obs)
            .into_iter()
            .any(|dec| matches!(dec.action, Action::SetClock { clock_mhz, .. } if clock_mhz > settled));
        (settled, raised)
    };
    let bare = ControllerConfig { clock_down_sigmas: 0.0, ..cfg.clone() };
    let (with_band, without) = (run(&cfg, rate).0, run(&bare, rate).0);
    assert_eq!(without, planner.clock_for(8, rate).unwrap(), "without the band: the load seen");
    assert_eq!(with_band, planner.clock_for(8, rate + cfg.clock_down_sigmas * sd).unwrap(), "with it: room for bursts");
    assert!(with_band > without, "{with_band} MHz against {without}");
    assert!(with_band < cfg.max_clock_mhz);
    assert!(run(&cfg, 3.0 * rate).1, "a surge to three times the rate raises the clock in its first period");
}

/// A pool settled on the best mix for its load sees the load move a little, to where another
/// mix that needs a new instance would draw less power than the fleet it has. With a saving
/// below `mix_hysteresis` the shard loop keeps the fleet; with the hysteresis at 0 it spawns for
/// the new mix (the spawn's cost, made negligible here, is the only check then).
#[test]
fn a_new_mix_saving_less_than_the_mix_hysteresis_spawns_nothing() {
    const LL: usize = 8;
    let mut cfg = config();
    cfg.observed_margin = 1.0;
    cfg.spawn_lead_s = 1.0;
    assert!(cfg.mix_hysteresis > 0.0 && cfg.mix_hysteresis < 0.1, "{}", cfg.mix_hysteresis);
    let profile = ProfileTable::bundled();
    let mut shares = [0.0; CLASS_COUNT];
    shares[LL] = 1.0;
    let planner = Planner::new(&profile, &cfg.tps, &shares, cfg.max_util);
    let counts = |m: &controller::control::plan::Mix| {
        m.parts.iter().fold(BTreeMap::new(), |mut c: BTreeMap<u32, u32>, p| {
            *c.entry(p.tp).or_default() += p.count;
            c
        })
    };
    // A load whose best mix the next load up (within 3%) replaces, for a saving below the
    // hysteresis, with an instance of a degree the fleet lacks.
    let cap8 = planner.capacity(8) * planner.max_util;
    let (d1, d2, fleet) = (1..2000)
        .map(|k| cap8 * f64::from(k) / 200.0)
        .find_map(|d1| {
            let fleet = counts(&planner.best_mix(d1, u32::MAX, 1)?);
            (1..=30).map(|j| d1 * (1.0 + f64::from(j) / 1000.0)).find_map(|d2| {
                let kept_w = planner.power_of_fleet(&fleet, d2)?;
                let best = planner.best_mix(d2, u32::MAX, 1)?;
                let lacks = counts(&best).iter().any(|(tp, n)| fleet.get(tp).copied().unwrap_or(0) < *n);
                let saving = (kept_w - best.power_w) / kept_w;
                (lacks && saving > 0.005 && saving < 0.9 * cfg.mix_hysteresis).then(|| (d1, d2, fleet.clone()))
            })
        })
        .expect("the bundled profile has such a pair of loads");
    let spawns_after_the_move = |cfg: &ControllerConfig| {
        let mut ctl = Controller::new(cfg.clone(), profile.clone());
        let mut model = Model::new();
        let mut d = [0.0; CLASS_COUNT];
        d[LL] = d1;
        let mut obs = model.observe(0.0, &d);
        obs.class_attainment_recent = [None; CLASS_COUNT];
        for dec in ctl.step(0.0, &obs) {
            model.apply(0.0, &dec.action, true);
        }
        let settled: BTreeMap<u32, u32> = model.instances.values().filter(|(o, _)| o.pool == PoolId(LL as u32)).fold(
            BTreeMap::new(),
            |mut c, (o, _)| {
                *c.entry(o.tp).or_default() += 1;
                c
            },
        );
        assert_eq!(settled, fleet, "the pool starts on the best mix for {d1:.3} req/s");
        d[LL] = d2;
        let now = cfg.shard_period_s;
        let mut obs = model.observe(now, &d);
        obs.class_attainment_recent = [None; CLASS_COUNT];
        ctl.step(now, &obs).into_iter().filter(|dec| matches!(dec.action, Action::Spawn { .. })).count()
    };
    assert_eq!(
        spawns_after_the_move(&cfg),
        0,
        "{d1:.3} → {d2:.3} req/s on {fleet:?}: the saving is below the hysteresis"
    );
    let bare = ControllerConfig { mix_hysteresis: 0.0, ..cfg.clone() };
    assert!(
        spawns_after_the_move(&bare) > 0,
        "{d1:.3} → {d2:.3} req/s on {fleet:?}: without it the new mix is spawned"
    );
}

/// One TP8 pool of long/long requests that missed with one instance (a sharp dip: its learnt
/// capacity shrank) and grew to two. Two instances behind the router hold the SLO comfortably
/// under a load that tests them (three quarters of what they are credited with), so the capacity
/// it learns grows; when the load falls back, the plan wants one instance again. The one left
/// would then carry what the pool learnt one instance does not: the controller keeps both while
/// the demand stays above what the scale earned with one carries, retires the spare once it falls
/// below, and forgets that lesson after `SIZE_SCALE_MEMORY_S`.
struct SizeRun {
    ctl: Controller,
    model: Model,
    d: Demand,
    cap1: f64,
}

const LL: usize = 8;

impl SizeRun {
    /// Starts at `load` × one TP8 instance's planning capacity at the profile's own scale, then dips.
    fn new(load: f64) -> SizeRun {
        let mut cfg = config();
        cfg.tps = vec![8];
        cfg.observed_margin = 1.0;
        let profile = ProfileTable::bundled();
        let mut shares = [0.0; CLASS_COUNT];
        shares[LL] = 1.0;
        let planner = Planner::new(&profile, &cfg.tps, &shares, cfg.max_util);
        let cap1 = planner.capacity(8) * planner.max_util;
        let mut run = SizeRun { ctl: Controller::new(cfg, profile), model: Model::new(), d: [0.0; CLASS_COUNT], cap1 };
        run.d[LL] = load * cap1;
        // t = 0: nothing measured yet; one instance carries the plan.
        run.step(0.0, None, None);
        assert_eq!(run.serving(), 1, "one instance carries {load} of its capacity");
        // One window later a sharp dip: the capacity shrinks at once and the pool grows.
        let w = run.ctl.config().attainment_window_s;
        run.step(w, Some(0.97), Some(0.97));
        let s1 = run.ctl.snapshot().util_scale[LL];
        assert!(s1 < 1.0 && load > s1, "the dip shrank the capacity to {s1}: one instance no longer carries {load}");
        run
    }

    fn step(&mut self, now: f64, recent: Option<f64>, plain: Option<f64>) {
        let mut obs = self.model.observe(now, &self.d);
        obs.class_attainment_recent = [None; CLASS_COUNT];
        obs.class_attainment_recent[LL] = recent;
        obs.class_attainment_window[LL] = plain;
        for dec in self.ctl.step(now, &obs) {
            self.model.apply(now, &dec.action, now == 0.0);
        }
    }

    /// Comfortable windows (every class at 100%) from `from` to `to`, every `every` seconds.
    fn comfortable(&mut self, from: f64, to: f64, every: f64) -> Vec<u32> {
        self.comfortable_loaded(from, to, every, None)
    }

    /// [`SizeRun::comfortable`], with the demand at `used` of what the serving instances are
    /// credited with at each step (where given).
    fn comfortable_loaded(&mut self, from: f64, to: f64, every: f64, used: Option<f64>) -> Vec<u32> {
        let mut counts = Vec::new();
        let mut t = from;
        while t < to {
            if let Some(u) = used {
                let s = self.ctl.learnt(LL).unwrap().0;
                self.d[LL] = u * f64::from(self.serving()) * self.cap1 * s;
            }
            self.step(t, Some(1.0), None);
            counts.push(self.serving());
            t += every;
        }
        counts
    }

    fn serving(&self) -> u32 {
        self.model.instances.values().filter(|(o, _)| o.state == InstanceState::Serving).count() as u32
    }
}

#[test]
fn a_spare_instance_stays_while_the_scale_learnt_with_fewer_cannot_carry_the_plan() {
    let mut run = SizeRun::new(0.95);
    let w = run.ctl.config().attainment_window_s;
    // Two hours of tested comfort with two instances: the learnt capacity grows past what one needs…
    run.comfortable_loaded(w + STEP_S, w + 7200.0, STEP_S, Some(0.75));
    let st = run.ctl.snapshot();
    assert!(st.util_scale[LL] > 1.2, "comfort raised the learnt capacity to {}", st.util_scale[LL]);
    assert!(!st.scale_by_size[LL].contains_key(&2), "two hours of comfort with two instances record nothing");
    let s1 = st.scale_by_size[LL][&1].0;
    assert!(s1 < 0.95, "the scale earned with one instance: {s1}");
    // …so at the first load again the plan wants one instance…
    run.d[LL] = 0.95 * run.cap1;
    let (from, to) = (w + 7200.0, w + 7200.0 + 3600.0);
    let counts = run.comfortable(from, to, STEP_S);
    assert_eq!(run.ctl.plans()[LL].target, BTreeMap::from([(8, 1)]), "the plan wants one instance again");
    // …yet the second instance stays: one carried less than the plan when it last ran alone.
    assert!(counts.iter().all(|&n| n == 2), "serving instances over the hour: {counts:?}");
    // Once the demand falls below what the scale earned with one carries, the spare goes.
    run.d[LL] = 0.8 * s1 * run.cap1;
    let after = run.comfortable(to, to + 2.0 * run.ctl.config().shard_period_s, STEP_S);
    assert_eq!(after.last(), Some(&1), "at {:.3} req/s one instance is enough: {after:?}", run.d[LL]);
}

#[test]
fn the_scale_learnt_with_fewer_instances_is_forgotten_after_a_day() {
    let mut run = SizeRun::new(0.95);
    let w = run.ctl.config().attainment_window_s;
    let s1 = run.ctl.snapshot().util_scale[LL];
    assert_eq!(run.ctl.scale_after_miss(LL, w), BTreeMap::from([(1, s1)]), "the dip's record, as status shows it");
    run.comfortable_loaded(w + STEP_S, w + 7200.0, 60.0, Some(0.75));
    run.d[LL] = 0.95 * run.cap1;
    let mid = run.comfortable(w + 7200.0, 0.5 * SIZE_SCALE_MEMORY_S, 60.0);
    assert_eq!(mid.last(), Some(&2), "half a day on, the lesson still holds");
    assert_eq!(run.ctl.scale_after_miss(LL, 0.5 * SIZE_SCALE_MEMORY_S), BTreeMap::from([(1, s1)]));
    let end = run.comfortable(0.5 * SIZE_SCALE_MEMORY_S, SIZE_SCALE_MEMORY_S + 2.0 * w, 60.0);
    assert_eq!(end.last(), Some(&1), "a day on, the plan's one instance is all that serves");
    assert!(run.ctl.scale_after_miss(LL, SIZE_SCALE_MEMORY_S + 2.0 * w).is_empty(), "and status shows no record");
}

/// What a pool learnt per size was learnt on its class mix: a merge or a split forgets it for
/// both pools it touches.
#[test]
fn a_merge_forgets_what_both_pools_learnt_per_size() {
    const LS: usize = 6;
    const LM: usize = 7;
    let mut cfg = config();
    cfg.tps = vec![8];
    let period = cfg.scale_period_s;
    let mut ctl = Controller::new(cfg, ProfileTable::bundled());
    let mut model = Model::new();
    let mut d = [0.0; CLASS_COUNT];
    (d[LS], d[LM]) = (15.0, 3.0);
    let mut merged_at = None;
    let mut t = 0.0;
    while t < 4.0 * period && merged_at.is_none() {
        if t >= period {
            d[LS] = 0.01; // LS's pool can no longer justify an instance of its own
        }
        let mut obs = model.observe(t, &d);
        if t == 600.0 {
            // A sharp dip in both pools: each records the capacity it fell back to at its size.
            for c in [LS, LM] {
                (obs.class_attainment_recent[c], obs.class_attainment_window[c]) = (Some(0.97), Some(0.97));
            }
        }
        let before = ctl.snapshot().scale_by_size;
        for dec in ctl.step(t, &obs) {
            if matches!(dec.action, Action::Route { .. }) && t > 0.0 {
                let sizes = |p: usize| before.get(p).map_or(0, |m| m.len());
                assert!(sizes(LS) > 0 && sizes(LM) > 0, "both pools had learnt per size before the merge");
                merged_at = Some(t);
            }
            model.apply(t, &dec.action, t == 0.0);
        }
        t += STEP_S;
    }
    let at = merged_at.expect("LS merges into LM's pool once its load falls");
    let after = ctl.snapshot().scale_by_size;
    assert!(
        after[LS].is_empty() && after[LM].is_empty(),
        "after the merge at {at} s: {:?} / {:?}",
        after[LS],
        after[LM]
    );
}
