//! Controller speed: one scale+shard plan for a 1,250-server (10,000-GPU)
//! cluster with 9 pools, and one clock decision per instance.

use actuators_core::{InstanceId, PoolId};
use controller::control::plan::Planner;
use controller::control::{Controller, ControllerConfig, InstanceObs, InstanceState, Loops, Observations};
use controller::profile::ProfileTable;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;
use telemetry_core::CLASS_COUNT;

const SERVERS: u32 = 1250;

/// Per-class demand that needs about SERVERS TP8 instances in all, and those instances serving.
fn big_cluster(profile: &ProfileTable) -> (Observations, ControllerConfig) {
    let cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980);
    let per_pool = SERVERS / CLASS_COUNT as u32;
    let demand: [f64; CLASS_COUNT] = std::array::from_fn(|c| {
        let mut one = [0.0; CLASS_COUNT];
        one[c] = 1.0;
        let p = Planner::new(profile, &[8], &one, cfg.max_util);
        f64::from(per_pool) * p.capacity(8) * cfg.max_util
    });
    let mut instances = Vec::new();
    for pool in 0..CLASS_COUNT as u32 {
        for k in 0..per_pool {
            instances.push(InstanceObs {
                id: InstanceId(pool * 10_000 + k),
                pool: PoolId(pool),
                tp: 8,
                clock_mhz: 1980,
                state: InstanceState::Serving,
                outstanding: 10,
                waiting: 0,
                power_w: None,
            });
        }
    }
    let obs = Observations {
        now_s: 0.0,
        instances,
        class_rps_recent: demand,
        class_rps_smoothed: demand,
        class_peak_scale: Some(demand),
        class_peak_shard: Some(demand),
        observed_spawn_s: vec![],
        class_attainment_recent: [Some(1.0); CLASS_COUNT],
        class_attainment_window: [None; CLASS_COUNT],
        class_slo_counts_recent: [None; CLASS_COUNT],
    };
    (obs, cfg)
}

fn plan(c: &mut Criterion) {
    let profile = ProfileTable::bundled();
    let (obs, cfg) = big_cluster(&profile);
    let mut g = c.benchmark_group("control");
    g.sample_size(10);
    g.bench_function("scale+shard plan, 1250 servers, 9 pools (cold planner cache)", |b| {
        b.iter(|| {
            let mut ctl = Controller::new(cfg.clone(), profile.clone());
            black_box(ctl.step(0.0, black_box(&obs)))
        })
    });
    // A re-plan of the running cluster: the shard loop's mix, checked against the least-power
    // part of the fleet there is (the transition check), for every pool.
    let mut later = obs.clone();
    later.now_s = 300.0;
    g.bench_function("shard re-plan of the running 1250 servers, 9 pools (transition check)", |b| {
        b.iter_batched(
            || {
                let mut ctl = Controller::new(cfg.clone(), profile.clone());
                ctl.step(0.0, &obs);
                ctl
            },
            |mut ctl| black_box(ctl.step(300.0, black_box(&later))),
            BatchSize::LargeInput,
        )
    });
    // Clock decisions: a warmed controller whose scale and shard loops are not due.
    let mut clock_cfg = cfg.clone();
    clock_cfg.shard_period_s = 1e12;
    clock_cfg.scale_period_s = 1e12;
    let mut ctl = Controller::new(clock_cfg, profile.clone());
    ctl.step(0.0, &obs);
    let mut t = 5.0;
    g.bench_function("clock loop over 1250 instances", |b| {
        b.iter(|| {
            let mut o = obs.clone();
            o.now_s = t;
            t += 5.0;
            black_box(ctl.step(o.now_s, &o))
        })
    });
    g.finish();
}

criterion_group!(benches, plan);
criterion_main!(benches);
