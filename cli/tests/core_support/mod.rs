//! The service core as the core tests drive it: the bundled profile, a core
//! with every loop on, and the telemetry of its placed instances.

#![allow(dead_code)]

use actuators::Placement;
use controller::control::{ControllerConfig, Loops};
use dynamollm::profile::ProfileTable;
use service::core::{CoreConfig, ServiceCore};
use std::collections::BTreeMap;
use telemetry::sample::{EngineSample, GpuSample, Sample, Tags};

pub fn bundled_profile() -> ProfileTable {
    let mut profile = ProfileTable::bundled();
    profile.set_slo_multiplier(5.0);
    profile
}

pub fn core_config() -> CoreConfig {
    CoreConfig {
        controller: ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980),
        stale_after_s: 5.0,
        pool_names: (0..9).map(|p| format!("p{p}")).collect(),
        retire_ack_means_stopped: true,
        declared_gpus: None,
    }
}

pub fn core() -> ServiceCore {
    ServiceCore::new(core_config(), bundled_profile(), 0.0)
}

pub fn samples(core: &mut ServiceCore, now: f64) {
    samples_of(core, now, |_| true)
}

/// One tick at `t` with every command acknowledged as applied, each spawn placed on a node
/// of its own (`site/n<k>`, `spawned` counting them).
pub fn tick_applied(core: &mut ServiceCore, t: f64, spawned: &mut u32) {
    for c in core.tick(t, 0) {
        let placement = matches!(c.action, actuators::Action::Spawn { .. }).then(|| {
            *spawned += 1;
            Placement { node: format!("site/n{spawned}"), gpus: vec![], endpoint: None }
        });
        core.on_outcome(&c.id, &actuators::Outcome::Applied { placement, detail: String::new() });
    }
}

/// Telemetry of the placed instances whose node `up` says answers.
pub fn samples_of(core: &mut ServiceCore, now: f64, up: impl Fn(&str) -> bool) {
    let nodes: Vec<(String, u32)> = core
        .instances()
        .filter_map(|r| r.placement.as_ref().map(|p| (p.node.clone(), r.tp)))
        .filter(|(node, _)| up(node))
        .collect();
    for (node, tp) in nodes {
        let (site, n) = node.split_once('/').unwrap();
        let tags = Tags::node(site, n);
        core.observe_sample(
            now,
            &Sample::Engine(EngineSample {
                ts_ms: 0,
                tags: tags.clone(),
                running: Some(1.0),
                waiting: Some(0.0),
                ..Default::default()
            }),
        );
        for g in 0..tp {
            let t = Tags { gpu: Some(g), ..tags.clone() };
            core.observe_sample(
                now,
                &Sample::Gpu(GpuSample {
                    ts_ms: 0,
                    tags: t,
                    power_w: 300.0,
                    energy_j: Some(300.0 * now),
                    sm_clock_mhz: None,
                    util: None,
                    temperature_c: None,
                    throttle_reasons: None,
                }),
            );
        }
    }
}

/// No loop changes the fleet or the table: the tests set both.
pub fn split_config() -> CoreConfig {
    CoreConfig {
        controller: ControllerConfig::new(Loops { scale: false, shard: false, clock: false, pools: true }, 1980),
        stale_after_s: 60.0,
        ..core_config()
    }
}

/// A core restored with SS split back to its own pool 0 (the controller's
/// table) while the backends still route it to SM's pool 1: instance 1 serves
/// pool 1, instance 2 of pool 0 is starting, and no loop changes the fleet
/// or the table (the tests set both).
pub fn ss_split_back() -> ServiceCore {
    use controller::control::InstanceState;
    use service::core::InstanceRecord;
    let profile = bundled_profile();
    let cfg = split_config();
    let mut saved = ServiceCore::new(cfg.clone(), profile.clone(), 0.0).save(0.0);
    let record = |id: u32, pool: u32, state: InstanceState| InstanceRecord {
        id: actuators::InstanceId(id),
        pool,
        tp: 8,
        clock_mhz: 1980,
        state,
        placement: Some(Placement { node: format!("site/n{id}"), gpus: vec![], endpoint: None }),
        outstanding: 0,
        waiting: 0,
        power_w: 0.0,
        energy_j: 0.0,
        spawned_at_s: 0.0,
        last_report_s: None,
        last_gpu_s: None,
        last_engine_s: None,
        gpus: BTreeMap::new(),
        queues: BTreeMap::new(),
    };
    saved.instances = vec![record(1, 1, InstanceState::Serving), record(2, 0, InstanceState::Starting)];
    // The router sends SS to SM's pool 1; the controller has split it back to pool 0.
    let mut routed: [u32; 9] = std::array::from_fn(|c| c as u32);
    routed[0] = 1;
    saved.routed = Some(routed);
    saved.controller.started = true;
    // Every loop ran at 0 s: none is due again within the test.
    saved.controller.last_run_s = [Some(0.0); 3];
    let mut core = ServiceCore::restore(cfg, profile, saved, 0.0).unwrap();
    core.prime_rates([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!((core.routing()[0], core.routed()[0]), (0, 1));
    core
}
