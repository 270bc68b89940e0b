//! The power budget's last resort, driven through `Controller::step` alone
//! (sans-IO): once the clocks are as low as they go and the hour of a
//! higher-ranked class heads below its P99 target, the lowest-ranked class
//! with load is shed (its arrivals turned away), one class at a time; a shed
//! class comes back once the fleet has room for it, never before
//! `SHED_HOLD_S`.

use actuators_core::{InstanceId, PoolId};
use controller::control::budget::{SHED_HOLD_S, SHED_SETTLE_S};
use controller::control::{
    BudgetPeriod, Controller, ControllerConfig, InstanceObs, InstanceState, Loops, Observations,
};
use controller::profile::ProfileTable;
use telemetry_core::CLASS_COUNT;

const TOP_MHZ: u32 = 1980;
const SS: usize = 0;
const LM: usize = 7;
const LL: usize = 8;

/// SS, LM and LL at 2 req/s each, two TP8 instances apiece; SS holds `ss_attainment`.
fn obs(now_s: f64, ss_attainment: f64) -> Observations {
    let mut o = Observations { now_s, ..Default::default() };
    o.class_attainment_recent = [None; CLASS_COUNT];
    o.class_attainment_window = [None; CLASS_COUNT];
    for c in [SS, LM, LL] {
        o.class_rps_recent[c] = 2.0;
        o.class_rps_smoothed[c] = 2.0;
        let a = if c == SS { ss_attainment } else { 1.0 };
        o.class_attainment_recent[c] = Some(a);
        o.class_attainment_window[c] = Some(a);
    }
    o.instances = [SS, LM, LL]
        .iter()
        .flat_map(|&c| (0..2).map(move |k| (c, k)))
        .map(|(c, k)| InstanceObs {
            id: InstanceId(1000 + 10 * c as u32 + k),
            pool: PoolId(c as u32),
            tp: 8,
            clock_mhz: TOP_MHZ,
            state: InstanceState::Serving,
            outstanding: 4,
            waiting: 0,
            power_w: Some(4000.0),
        })
        .collect();
    o
}

#[test]
fn the_lowest_ranked_class_is_shed_once_a_higher_ranks_hour_suffers_and_comes_back_with_room() {
    let mut cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, TOP_MHZ);
    // The first hour: far less than even the lowest clocks draw. From the second: plenty.
    cfg.power_budget_periods = vec![BudgetPeriod { from_h: 0, to_h: 1, power_w: 5_000.0 }];
    cfg.power_budget_w = Some(1e6);
    let mut c = Controller::new(cfg, ProfileTable::bundled());
    let mut shed_at = [None; CLASS_COUNT];
    let mut back_at = [None; CLASS_COUNT];
    let mut t = 0.0;
    while t <= 7200.0 {
        // SS misses through the first hour, holds after.
        c.step(t, &obs(t, if t < 3600.0 { 0.97 } else { 1.0 }));
        for k in 0..CLASS_COUNT {
            if c.shed(k) && shed_at[k].is_none() {
                shed_at[k] = Some(t);
            }
            if !c.shed(k) && shed_at[k].is_some() && back_at[k].is_none() {
                back_at[k] = Some(t);
            }
        }
        t += 5.0;
    }
    let (Some(ll), Some(lm)) = (shed_at[LL], shed_at[LM]) else { panic!("LL and LM were not both shed: {shed_at:?}") };
    assert!(shed_at[SS].is_none(), "SS, ranked first, was shed");
    assert!(ll < lm, "LL (ranked last) shed at {ll} s, LM at {lm} s: not the lowest rank first");
    assert!(lm - ll >= SHED_SETTLE_S, "LM shed {} s after LL: the first had no time to settle", lm - ll);
    // Not before SS's hour has had minutes of misses.
    assert!(ll >= 60.0, "shed at {ll} s, before SS's hour headed below its target");
    for k in [LL, LM] {
        let back = back_at[k].unwrap_or_else(|| panic!("class {k} never came back with the budget raised"));
        assert!(back >= 3600.0, "class {k} came back at {back} s, while the budget still had no room");
        assert!(back - shed_at[k].unwrap() >= SHED_HOLD_S);
    }
}
