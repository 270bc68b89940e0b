//! The small cluster model the controller's property tests drive: spawns
//! serve after a lead time, retires leave at once, clocks apply at once.

#![allow(dead_code)]

use actuators_core::{Action, InstanceId, PoolId};
use controller::control::plan::Demand;
use controller::control::{ControllerConfig, InstanceObs, InstanceState, Loops, Observations};
use std::collections::BTreeMap;
use telemetry_core::CLASS_COUNT;

pub const STEP_S: f64 = 5.0;
pub const LEAD_S: f64 = 30.0;

pub struct Model {
    pub instances: BTreeMap<InstanceId, (InstanceObs, f64)>,
}

impl Model {
    pub fn new() -> Model {
        Model { instances: BTreeMap::new() }
    }

    pub fn observe(&mut self, now: f64, demand: &Demand) -> Observations {
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
            class_slo_counts_recent: [None; CLASS_COUNT],
        }
    }

    pub fn apply(&mut self, now: f64, action: &Action, first: bool) {
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

    pub fn gpus(&self) -> u32 {
        self.instances.values().map(|(o, _)| o.tp).sum()
    }
}

/// A TP8 instance serving one request at the top clock.
pub fn serving_tp8(id: InstanceId, pool: PoolId) -> InstanceObs {
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

pub fn config() -> ControllerConfig {
    let mut cfg = ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980);
    cfg.spawn_lead_s = LEAD_S;
    cfg
}

/// One instance of each pool, the clock loop alone.
pub fn one_instance_clock_only() -> ControllerConfig {
    let mut cfg = ControllerConfig::new(Loops { scale: false, shard: false, clock: true, pools: true }, 1980);
    cfg.fixed_instances = Some(1);
    cfg
}
