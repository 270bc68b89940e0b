//! The clock loop (every 5 s): per serving instance, the least-power clock
//! whose profile meets the SLO at its share of the pool's load, with the
//! learnt margin, a burst allowance on steps down, and hysteresis. Emits
//! only set-clock actions.

use super::plan::Demand;
use super::*;
use actuators_core::{Action, InstanceId};

impl Controller {
    pub(super) fn clock_loop(
        &mut self,
        now_s: f64,
        obs: &Observations,
        recent: &Demand,
        guard: &[InstanceId],
        out: &mut Vec<Decision>,
    ) {
        let period_s = self.cfg.clock_period_s.max(1e-9);
        for pool in 0..self.plans.len() {
            let d = self.pool_demand(pool, recent);
            // What a step down must carry as well: the smoothed rate plus the chance bursts of one
            // period's Poisson count (at least one request a period: a pool whose smoothed rate is
            // near zero still leaves room for the next request).
            let smoothed: f64 = self.pool_demand(pool, &obs.class_rps_smoothed).iter().sum();
            let burst_rps = self.cfg.clock_down_sigmas * (smoothed.max(1.0 / period_s) / period_s).sqrt();
            // Without the planning margin where prompt bands mix, scale-freq's single pool missed the
            // MS class's P99 TTFT at --scale 2 and 2.25.
            let mixed = self.mixes_bands(pool);
            let margin = self.clock_margin_of(pool);
            let total: f64 = d.iter().sum::<f64>() * margin;
            let why_load = match ((margin - 1.0).abs() > 1e-9, mixed) {
                (false, _) => String::new(),
                (true, true) => format!(" (the load seen × {margin:.2}, the planning margin: prompt bands mix here)"),
                (true, false) => format!(" (the load seen × {margin:.3}, the margin learnt from attainment)"),
            };
            let planner = self.planner(pool, &d);
            let serving: Vec<&InstanceObs> = obs
                .instances
                .iter()
                .filter(|i| i.pool.0 as usize == pool && i.state == InstanceState::Serving)
                .collect();
            let cap_total: f64 = serving.iter().map(|i| planner.capacity(i.tp)).sum();
            for i in serving {
                if guard.contains(&i.id) {
                    continue;
                }
                let share = if cap_total > 0.0 { planner.capacity(i.tp) / cap_total } else { 0.0 };
                let load = total * share;
                let load_down = total.max((smoothed + burst_rps) * margin) * share;
                let current = self.pending_clock.get(&i.id).copied().unwrap_or(i.clock_mhz);
                let want = planner.instance_power(i.tp, load);
                let (target, why) = match want {
                    None => {
                        (self.cfg.max_clock_mhz, "the load exceeds what any clock carries within the SLO".to_string())
                    }
                    Some((w, f)) => {
                        let cur_ok = planner.carries(i.tp, current, load);
                        let since = self.clock_since.get(&i.id).copied().unwrap_or(f64::NEG_INFINITY);
                        if !cur_ok {
                            (
                                f.max(current),
                                format!("TP{} at {current} MHz would miss the SLO at {load:.2} req/s{why_load}", i.tp),
                            )
                        } else if f == current || now_s - since < self.cfg.clock_hold_s {
                            continue;
                        } else {
                            // A step down goes no lower than the least-power clock carrying the bursts too.
                            let (w, f, why_burst) = match (f < current, planner.instance_power(i.tp, load_down)) {
                                (false, _) => (w, f, String::new()),
                                (true, Some((_, fb))) if fb > f && fb < current => {
                                    match planner.power_at(i.tp, fb, load) {
                                        Some(wb) => {
                                            (wb, fb, format!("; {fb} MHz carries its bursts ({load_down:.2} req/s)"))
                                        }
                                        None => continue,
                                    }
                                }
                                (true, Some((_, fb))) if fb < current => (w, f, String::new()),
                                (true, _) => continue,
                            };
                            let cur_w = planner.power_at(i.tp, current, load).unwrap_or(f64::INFINITY);
                            if cur_w - w < self.cfg.clock_hysteresis * cur_w {
                                continue;
                            }
                            (
                                f,
                                format!(
                                    "least power meeting the SLO at {load:.2} req/s{why_load}: {w:.0} W vs {cur_w:.0} W at {current} MHz{why_burst}"
                                ),
                            )
                        }
                    }
                };
                if target == current {
                    continue;
                }
                self.pending_clock.insert(i.id, target);
                self.clock_since.insert(i.id, now_s);
                out.push(Decision {
                    at_s: now_s,
                    source: "clock-loop",
                    action: Action::SetClock { instance: i.id, clock_mhz: target },
                    reason: why,
                    pool: Some(pool as u32),
                    planned_rps: Some(load),
                    predicted_delta_w: None,
                    slo_margin: planner.headroom(i.tp, target, load),
                });
            }
        }
        // Forget clocks the instances now report.
        self.pending_clock.retain(|id, c| obs.instances.iter().any(|i| i.id == *id && i.clock_mhz != *c));
    }
}
