//! Properties of the sans-IO controller, driven by a small cluster model:
//! spawns serve after a lead time, retires leave at once, clocks apply at
//! once; demand follows a random (seeded) trajectory.

mod common;

use actuators_core::{Action, InstanceId, PoolId};
use common::*;
use controller::control::plan::{Demand, Planner};
use controller::control::{Controller, ControllerConfig, InstanceState, Loops, MAX_CAPACITY_SCALE};
use controller::profile::ProfileTable;
use proptest::prelude::*;
use std::collections::BTreeMap;
use telemetry_core::CLASS_COUNT;

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
