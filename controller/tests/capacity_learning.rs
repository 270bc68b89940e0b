//! How a pool's capacity and clock margin are learnt from the attainment it
//! shows, driven through `Controller::step` on the small cluster model of
//! `common`: dips, comfort, evidence, and the scale kept per pool size.

mod common;

use actuators_core::{Action, InstanceId, PoolId};
use common::*;
use controller::control::plan::{Demand, Planner};
use controller::control::{
    miss_evidence, AttainmentHistory, Controller, ControllerConfig, InstanceObs, InstanceState, Loops,
    CAPACITY_EVIDENCE_SHARE, MISS_EVIDENCE_P, SIZE_SCALE_MEMORY_S,
};
use controller::profile::ProfileTable;
use std::collections::BTreeMap;
use telemetry_core::CLASS_COUNT;

/// One instance the clock loop alone runs, its clock for the load itself (without room for a
/// Poisson load's chance bursts).
fn one_clocked_instance() -> ControllerConfig {
    let mut cfg = ControllerConfig::new(Loops { scale: false, shard: false, clock: true, pools: true }, 1980);
    cfg.fixed_instances = Some(1);
    cfg.clock_down_sigmas = 0.0;
    cfg
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
    let cfg = one_clocked_instance();
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
    let cfg = one_clocked_instance();
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
    learnt_from_one_window_at(cfg, recent, plain, 0.02, None)
}

/// [`learnt_from_one_window`] with long/long arriving at `load_rps`, its window's counters
/// `counts` (`None`: not given).
fn learnt_from_one_window_at(
    cfg: &ControllerConfig,
    recent: f64,
    plain: Option<f64>,
    load_rps: f64,
    counts: Option<[u64; 4]>,
) -> (f64, f64) {
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
        obs.class_slo_counts_recent[LL] = counts.filter(|_| t > 0.0);
        for dec in ctl.step(t, &obs) {
            model.apply(t, &dec.action, false);
        }
    }
    assert!(model.instances[&id].0.clock_mhz < 1980, "the clock runs below the top");
    let st = ctl.snapshot();
    (st.clock_margin[LL], st.util_scale[LL])
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

/// The binomial tail of a window's misses for a class at exactly its 99% target, against the sum
/// of the binomial probabilities; token gaps weigh as one draw per request at their miss share.
#[test]
fn the_miss_evidence_is_the_binomial_tail_at_the_target() {
    let exact = |m: u64, n: u64| -> f64 {
        let (p, mut term, mut below) = (0.01f64, 0.99f64.powi(n as i32), 0.0);
        for k in 0..m {
            below += term;
            term *= (n - k) as f64 / (k + 1) as f64 * p / (1.0 - p);
        }
        1.0 - below
    };
    for (m, n) in [(1, 50), (2, 150), (3, 200), (8, 200), (9, 600)] {
        let got = miss_evidence([n - m, n, 0, 0]);
        assert!((got - exact(m, n)).abs() < 1e-9, "{m} of {n}: {got} against {}", exact(m, n));
    }
    assert_eq!(miss_evidence([200, 200, 5000, 5000]), 1.0, "no miss: no evidence");
    assert!(miss_evidence([197, 200, 0, 0]) > MISS_EVIDENCE_P, "3 of 200 late (98.5%) is chance");
    assert!(miss_evidence([192, 200, 0, 0]) < 0.01, "8 of 200 (96%) is not");
    // 1.5% of 100,000 gaps late among 150 requests: 2.25 draws of 150, not 1,500 of 100,000.
    let gaps = miss_evidence([150, 150, 98_500, 100_000]);
    assert!(gaps > MISS_EVIDENCE_P && gaps < 0.5, "{gaps}");
}

/// Only a window short of `attainment_min_requests` is weighed for evidence; a dip there that a
/// class at its target shows by chance teaches nothing, one it would not still does.
#[test]
fn a_short_window_s_dip_counts_only_with_evidence() {
    let cfg = one_instance_clock_only();
    let n = cfg.attainment_min_requests;
    let mut hist = AttainmentHistory::default();
    let mut k = [[0u64; 4]; CLASS_COUNT];
    hist.push(0.0, k, &cfg);
    (k[0], k[1]) = ([197, 200, 0, 0], [n - 6, n, 0, 0]);
    hist.push(cfg.attainment_window_s, k, &cfg);
    let counts = hist.recent_counts();
    assert_eq!((counts[0], counts[1], counts[2]), (Some([197, 200, 0, 0]), Some([n - 6, n, 0, 0]), None));
    // Three late of 200 (98.5%): chance. Eight of 200 (96%): not. Eight of 600 (98.7%): a window of
    // enough requests is judged by its share.
    let learnt = |counts: [u64; 4]| {
        let a = counts[0] as f64 / counts[1] as f64;
        learnt_from_one_window_at(&cfg, a, Some(a), 0.02, Some(counts))
    };
    assert_eq!(learnt([197, 200, 0, 0]), (1.0, 1.0), "chance: nothing learnt");
    assert_ne!(learnt([192, 200, 0, 0]), (1.0, 1.0), "evidence: the dip counts");
    assert!(miss_evidence([n - 8, n, 0, 0]) > MISS_EVIDENCE_P, "eight of {n} could be chance");
    assert_ne!(learnt([n - 8, n, 0, 0]), (1.0, 1.0), "but the window holds enough requests: the dip counts");
    assert_ne!(learnt_from_one_window(&cfg, 0.985, Some(0.985)), (1.0, 1.0), "no counters given: the dip counts");
}

/// The decisions a miss leads to say what the pool learnt and from what: the class's share, its
/// window's requests and the chance of as many misses at the target.
#[test]
fn a_miss_s_decisions_say_what_was_learnt_and_from_what() {
    const LL: usize = 8;
    let cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980);
    let counts = [1152, 1200, 0, 0];
    // long/long's decisions after a sharp dip (96% of 1,200 requests) at `load_rps`.
    let after_a_dip = |load_rps: f64| -> Vec<String> {
        let mut ctl = Controller::new(cfg.clone(), ProfileTable::bundled());
        let mut model = Model::new();
        let mut d = [0.0; CLASS_COUNT];
        d[LL] = load_rps;
        let mut reasons = Vec::new();
        for step in 0..3 {
            let t = step as f64 * cfg.attainment_window_s;
            let mut obs = model.observe(t, &d);
            if step == 2 {
                obs.class_attainment_recent[LL] = Some(0.96);
                obs.class_attainment_window[LL] = Some(0.96);
                obs.class_slo_counts_recent[LL] = Some(counts);
            }
            for dec in ctl.step(t, &obs) {
                model.apply(t, &dec.action, true);
                if step == 2 && dec.pool == Some(LL as u32) && !matches!(dec.action, Action::SetClock { .. }) {
                    reasons.push(dec.reason);
                }
            }
        }
        reasons
    };
    // A load one instance carries at the scale it starts with and not at the one the dip leaves.
    let reasons = (1..=40).map(|k| after_a_dip(0.25 * f64::from(k))).find(|r| !r.is_empty());
    let reasons = reasons.expect("some load needs another instance after the dip");
    let chance = miss_evidence(counts);
    assert!(chance < 1e-6, "{chance}");
    let said = format!("LL held 96.00% over 1200 requests (chance of as many misses at the 99% target: {chance:.3})");
    assert!(reasons.iter().all(|r| r.contains("learnt 0 s ago: capacity scale ") && r.contains(&said)), "{reasons:#?}");
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
    let learnt = |cfg: &ControllerConfig, a: f64, load: f64| learnt_from_one_window_at(cfg, a, Some(1.0), load, None);
    assert_eq!(learnt(&cfg, comfort - 0.001, tested), (1.0, 1.0), "below comfort: nothing");
    assert_eq!(learnt(&cfg, comfort, tested), (decayed, 1.05), "at comfort: a step tighter");
    assert_eq!(learnt(&cfg, comfort, untested), (decayed, 1.0), "comfort at a light load: the clock margin alone");
    cfg.attainment_comfort = comfort - 0.002;
    assert_eq!(learnt(&cfg, comfort - 0.001, tested), (decayed, 1.05), "a lower comfort tightens it");
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
