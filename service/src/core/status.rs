//! What the core shows: the totals against the `single-pool` estimate and the
//! status document of `/api/v1/status`.

use super::*;

impl ServiceCore {
    /// Energy, power and GPUs so far, against the `single-pool` estimate.
    pub fn totals(&self) -> Totals {
        let energy_j = self.retired_energy_j + self.instances.values().map(|r| r.energy_j).sum::<f64>();
        let base = self.baseline.energy_j;
        Totals {
            energy_j,
            baseline_energy_j: base,
            baseline_power_w: self.baseline.power_w,
            power_w: self.instances.values().map(|r| r.power_w).sum(),
            gpus: self.gpus(),
            savings_ratio: if base > 0.0 { 1.0 - energy_j / base } else { 0.0 },
        }
    }

    /// Each class's SLO attainment so far (`None` before any of its requests
    /// was measured): what the status and `/metrics` show.
    pub fn class_attainment(&self) -> Vec<(String, Option<f64>)> {
        let last = self.att_hist.latest().unwrap_or(self.att_totals);
        RequestClass::ALL
            .iter()
            .map(|c| (c.to_string(), controller::control::slo_attainment(last[c.index()])))
            .collect()
    }

    /// The status document of `/api/v1/status`.
    pub fn status(&self, now_s: f64) -> serde_json::Value {
        let routing = self.ctl.routing().pool_of;
        let plans = self.ctl.plans();
        let pools: Vec<serde_json::Value> = (0..self.ctl.pool_count())
            .map(|p| {
                let members: Vec<&InstanceRecord> = self.instances.values().filter(|r| r.pool as usize == p).collect();
                let classes: Vec<String> = RequestClass::ALL
                    .iter()
                    .filter(|c| routing[c.index()] as usize == p)
                    .map(|c| c.to_string())
                    .collect();
                serde_json::json!({
                    "id": p,
                    "name": self.cfg.pool_names.get(p).cloned().unwrap_or_else(|| format!("pool{p}")),
                    "classes": classes,
                    "instances": members.len(),
                    "gpus": members.iter().map(|r| r.tp).sum::<u32>(),
                    "power_w": members.iter().map(|r| r.power_w).sum::<f64>(),
                    "planned_rps": plans.get(p).map_or(0.0, |x| x.planned_rps),
                    "capacity_scale": self.ctl.learnt(p).map(|l| l.0),
                    "clock_margin": self.ctl.learnt(p).map(|l| l.1),
                    "capacity_scale_after_miss": self.ctl.scale_after_miss(p, now_s),
                    "learnt": self.ctl.learnt_why(p).map(|(at_s, why)| serde_json::json!({"at_s": at_s, "why": why})),
                    "target": plans.get(p).map(|x| x.target.clone()).unwrap_or_default(),
                })
            })
            .collect();
        let instances: Vec<serde_json::Value> = self
            .instances
            .values()
            .map(|r| {
                serde_json::json!({
                    "id": r.id.0,
                    "pool": r.pool,
                    "tp": r.tp,
                    "clock_mhz": r.clock_mhz,
                    "state": match r.state {
                        InstanceState::Starting => "starting",
                        InstanceState::Serving => "serving",
                        InstanceState::Draining => "draining",
                    },
                    "power_w": r.power_w,
                    "energy_j": r.energy_j,
                    "outstanding": r.outstanding,
                    "placement": r.placement,
                })
            })
            .collect();
        let shard_min =
            ((self.cfg.controller.shard_period_s + self.cfg.controller.spawn_lead_s) / 60.0).ceil().max(1.0) as usize;
        let forecast = self.forecasts.peak(shard_min);
        let attainment = self.class_attainment();
        let classes: Vec<serde_json::Value> = RequestClass::ALL
            .iter()
            .map(|c| {
                let att = attainment[c.index()].1;
                serde_json::json!({
                    "class": c.to_string(),
                    "pool": routing[c.index()],
                    "routed_pool": self.routed[c.index()],
                    "actual_rps": self.last_recent[c.index()],
                    "smoothed_rps": self.smoothed[c.index()],
                    "forecast_rps": forecast[c.index()],
                    "attainment": att,
                    "shed": self.ctl.shed(c.index()),
                })
            })
            .collect();
        // A finished replay is said so: no mode acts on it, no telemetry is late.
        let mode = if self.finished() { "finished" } else { self.mode().name() };
        let lag = if self.finished() { 0.0 } else { self.telemetry_lag_s(now_s) };
        serde_json::json!({
            "mode": mode,
            "status_message": self.finished().then_some("the replay is over: nothing left to control"),
            "operator_mode": self.operator_mode.name(),
            "failsafe_reason": self.failsafe_reason(),
            "state_saved": self.unsaved().is_none(),
            "time_s": now_s,
            "telemetry_lag_s": lag,
            "pools": pools,
            "instances": instances,
            "classes": classes,
            "pending_actions": self.pending.len(),
            "held_retires": self.held_retires.values().collect::<Vec<_>>(),
            "totals": self.totals(),
            "history": self.history,
        })
    }
}
