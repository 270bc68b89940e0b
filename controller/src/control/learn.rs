//! Learning a pool's real capacity from the SLO attainment it shows: a miss
//! shrinks the capacity scale (or first raises the clock margin), a
//! comfortable window grows it where the pool carried at least
//! [`CAPACITY_EVIDENCE_SHARE`] of what it is credited with (or serves
//! [`UNTESTED_GROWTH_MIN_INSTANCES`] or more, none of them spare); a miss also
//! records the scale at the pool's size. Touches only the learnt scales,
//! margins and their timestamps.

use super::*;
use telemetry_core::CLASS_COUNT;

impl Controller {
    /// Learn each pool's real capacity from the SLO attainment it shows.
    /// Returns the pools that fell short (they are re-planned at once).
    pub(super) fn learn_capacity(&mut self, obs: &Observations) -> Vec<usize> {
        let mut short = Vec::new();
        let (step, decay, ceiling) =
            (self.cfg.clock_margin_step, self.cfg.clock_margin_decay, self.cfg.observed_margin.max(1.0));
        let floor = self.margin_floor();
        let comfort = self.cfg.attainment_comfort;
        for pool in 0..self.plans.len() {
            // The pool's lowest class (attainment, class): a dip the window's sample cannot tell
            // from a class at its target counts as neither a miss nor comfort.
            let min_requests = self.cfg.attainment_min_requests;
            let lowest = (0..CLASS_COUNT)
                .filter(|&c| self.routing.pool_of[c] as usize == pool)
                .filter_map(|c| {
                    let a = obs.class_attainment_recent[c]?;
                    let stale_dip = a < ATTAINMENT_TARGET && obs.class_attainment_window[c].is_some_and(|w| w >= 1.0);
                    let chance = a < ATTAINMENT_TARGET
                        && obs.class_slo_counts_recent[c]
                            .is_some_and(|k| k[1] < min_requests && miss_evidence(k) > MISS_EVIDENCE_P);
                    (!stale_dip).then_some((if chance { ATTAINMENT_TARGET } else { a }, c))
                })
                .fold(None, |a: Option<(f64, usize)>, x| Some(a.map_or(x, |a| if x.0 < a.0 { x } else { a })));
            let worst = lowest.map(|(a, _)| a);
            let before = (self.util_scale[pool], self.clock_margin[pool]);
            // A pool the hour guard has just taken: its capacity drops at once (window or not).
            let cut = self.hour_guard_capacity(pool, obs);
            // At most one adjustment per attainment window: the window's samples must be new.
            if !cut && obs.now_s - self.learnt_at[pool] < self.cfg.attainment_window_s - 1e-9 {
                continue;
            }
            // On a dip, clocks below the top in a pool whose clock margin is learnt (one prompt
            // band): the clock loop may have cut too close.
            // A pool on the hour guard has no hour left for a margin that climbs a step a window:
            // a dip there shrinks its capacity.
            let guarded = self.hour_guarded(pool);
            let lowered = worst.is_some_and(|a| a < ATTAINMENT_TARGET)
                && !guarded
                && !self.mixes_bands(pool)
                && obs.instances.iter().any(|i| {
                    i.pool.0 as usize == pool
                        && i.state == InstanceState::Serving
                        && i.clock_mhz < self.cfg.max_clock_mhz
                });
            let sharp = (0..CLASS_COUNT)
                .filter(|&c| self.routing.pool_of[c] as usize == pool)
                .any(|c| obs.class_attainment_window[c].is_some_and(|w| w < self.cfg.sharp_dip_attainment));
            let used = self.used_share(pool, obs);
            // Comfort says something of the capacity only where the pool carried enough of it, or
            // where the growth can retire an instance whose load the others take up a third more at
            // most (a pool at its plan's size of `UNTESTED_GROWTH_MIN_INSTANCES` or more).
            let serving =
                obs.instances.iter().filter(|i| i.pool.0 as usize == pool && i.state == InstanceState::Serving).count()
                    as u32;
            let planned: u32 = self.plans[pool].target.values().sum();
            let tested = used.is_some_and(|u| u >= CAPACITY_EVIDENCE_SHARE)
                || (serving >= UNTESTED_GROWTH_MIN_INSTANCES && serving <= planned);
            let s = &mut self.util_scale[pool];
            let margin = &mut self.clock_margin[pool];
            match worst {
                _ if cut => {
                    self.learnt_at[pool] = obs.now_s;
                    short.push(pool);
                }
                // A sharp dip: fewer instances than the load needs now.
                Some(a) if a < ATTAINMENT_TARGET && sharp => {
                    *margin = (*margin * step).min(ceiling);
                    *s = (*s * 0.85).max(0.4);
                    self.learnt_at[pool] = obs.now_s;
                    short.push(pool);
                }
                // Higher clocks first: they cost some power, where a smaller capacity costs whole
                // instances (their GPUs and idle power).
                Some(a) if a < ATTAINMENT_TARGET && lowered && *margin < ceiling - 1e-9 => {
                    *margin = (*margin * step).min(ceiling);
                    self.learnt_at[pool] = obs.now_s;
                }
                Some(a) if a < ATTAINMENT_TARGET => {
                    *s = (*s * 0.85).max(0.4);
                    self.learnt_at[pool] = obs.now_s;
                    short.push(pool);
                }
                // Not while the hour guard holds the pool: its hour has no room for a step back.
                Some(a) if a >= comfort && !guarded && (*s < MAX_CAPACITY_SCALE || *margin > floor + 1e-12) => {
                    *margin = (*margin * decay).max(floor);
                    // A pool of instances behind least-outstanding routing queues less than the one
                    // instance the profile measured: let live telemetry raise the capacity too.
                    if tested {
                        *s = (*s * 1.05).min(MAX_CAPACITY_SCALE);
                    }
                    self.learnt_at[pool] = obs.now_s;
                }
                _ => {}
            }
            let after = (self.util_scale[pool], self.clock_margin[pool]);
            if after != before {
                let seen = match lowest {
                    _ if cut => "the hour guard took the pool".to_string(),
                    Some((_, c)) => window_words(c, obs),
                    None => "no window".to_string(),
                };
                let mut moved = Vec::new();
                if after.0 != before.0 {
                    moved.push(format!("capacity scale {:.3} → {:.3}", before.0, after.0));
                }
                if after.1 != before.1 {
                    moved.push(format!("clock margin {:.3} → {:.3}", before.1, after.1));
                }
                self.learnt_note[pool] = Some((obs.now_s, format!("{}: {seen}", moved.join(", "))));
            }
            // A miss shrank the capacity: what the pool can be credited with at its present size.
            // (Comfort is no such evidence: a scale grows with time as well as with pool size.)
            if short.last() == Some(&pool) && serving > 0 {
                self.scale_by_size[pool].insert(serving, (self.util_scale[pool], obs.now_s));
            }
        }
        short
    }

    /// The share of what pool `pool`'s serving instances are credited with (at its learnt scale)
    /// that its load now takes; `None` without serving instances or load.
    pub(super) fn used_share(&mut self, pool: usize, obs: &Observations) -> Option<f64> {
        let d: Demand = std::array::from_fn(|c| {
            if self.routing.pool_of[c] as usize == pool {
                obs.class_rps_smoothed[c].max(obs.class_rps_recent[c])
            } else {
                0.0
            }
        });
        let load: f64 = d.iter().sum();
        let carried = self.credited_rps(pool, &d, obs);
        (carried > 0.0 && load > 0.0).then(|| load / carried)
    }

    /// What pool `pool`'s serving instances are credited with carrying (req/s) for the class mix
    /// of `d`: the profile's capacity at the utilisation limit and the learnt scale.
    pub(super) fn credited_rps(&mut self, pool: usize, d: &Demand, obs: &Observations) -> f64 {
        let planner = self.planner(pool, d);
        obs.instances
            .iter()
            .filter(|i| i.pool.0 as usize == pool && i.state == InstanceState::Serving)
            .map(|i| planner.capacity(i.tp) * planner.max_util)
            .sum()
    }
}

/// What class `c`'s recent window showed, in words, with the chance that a class at exactly its
/// target would show as many misses (for the decisions' reasons).
fn window_words(c: usize, obs: &Observations) -> String {
    let class = telemetry_core::RequestClass::from_index(c);
    let a = obs.class_attainment_recent[c].unwrap_or(1.0);
    match obs.class_slo_counts_recent[c] {
        Some(k) => format!(
            "{class} held {:.2}% over {} requests (chance of as many misses at the 99% target: {:.3})",
            100.0 * a,
            k[1],
            miss_evidence(k)
        ),
        None => format!("{class} held {:.2}%", 100.0 * a),
    }
}
