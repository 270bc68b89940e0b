//! The backlog guard, every step: an instance whose queue heads past its SLO
//! gets the top clock and hands unstarted requests to a pool mate or the
//! next-larger pool; its pool is re-planned.

use super::*;
use actuators_core::{Action, InstanceId, PoolId};
use telemetry_core::{RequestClass, CLASS_COUNT};

impl Controller {
    /// The backlog guard, every step: an instance with `backlog_waiting`
    /// requests waiting for admission gets the top clock at once and (with
    /// `move_queued`) hands up to half of them on, see [`Self::move_queued`].
    /// Returns the instances guarded: the clock loop leaves them be this
    /// step and their pools are re-planned at once. A dip in a pool's SLO
    /// attainment is left to capacity learning (top clocks on every dip cost
    /// energy for no attainment). The controller never rejects; the cluster
    /// does, as the last resort, when no instance can take a request.
    pub(super) fn backlog_guard(&mut self, now_s: f64, obs: &Observations, out: &mut Vec<Decision>) -> Vec<InstanceId> {
        let mut hit = Vec::new();
        for i in &obs.instances {
            if i.state != InstanceState::Serving || i.waiting < self.cfg.backlog_waiting {
                continue;
            }
            hit.push(i.id);
            let current = self.pending_clock.get(&i.id).copied().unwrap_or(i.clock_mhz);
            if current != self.cfg.max_clock_mhz {
                self.pending_clock.insert(i.id, self.cfg.max_clock_mhz);
                self.clock_since.insert(i.id, now_s);
                out.push(Decision {
                    at_s: now_s,
                    source: "backlog-guard",
                    action: Action::SetClock { instance: i.id, clock_mhz: self.cfg.max_clock_mhz },
                    reason: format!("{} requests waiting for KV room: top clock and re-plan the pool", i.waiting),
                    pool: Some(i.pool.0),
                    planned_rps: None,
                    predicted_delta_w: None,
                    slo_margin: None,
                });
            }
            if self.cfg.move_queued {
                self.move_queued(now_s, i, obs, out);
            }
        }
        self.moved_at.retain(|id, _| obs.instances.iter().any(|i| i.id == *id));
        hit
    }

    /// Hand half of an instance's queue to its pool (when another instance
    /// there has no queue) or else to the next-larger class's pool, at most
    /// once per clock period (the same observations twice move nothing new).
    pub(super) fn move_queued(&mut self, now_s: f64, i: &InstanceObs, obs: &Observations, out: &mut Vec<Decision>) {
        if self.moved_at.get(&i.id).is_some_and(|&t| now_s - t < self.cfg.clock_period_s - 1e-9) {
            return;
        }
        let has_room = |pool: u32, except: InstanceId| {
            obs.instances
                .iter()
                .any(|o| o.pool.0 == pool && o.id != except && o.state == InstanceState::Serving && o.waiting == 0)
        };
        let own = i.pool.0;
        let target = if has_room(own, i.id) {
            Some((own, "another instance of its pool has no queue".to_string()))
        } else {
            // The next-larger class of the pool's largest class that another pool serves.
            let largest = (0..CLASS_COUNT).rev().find(|&c| self.routing.pool_of[c] == own);
            let mut t = largest.and_then(|c| merge_target(RequestClass::from_index(c)));
            let mut found = None;
            while let Some(tc) = t {
                let p = self.routing.pool_of[tc.index()];
                if p != own {
                    found = has_room(p, i.id).then(|| (p, format!("its pool is backed up; {tc}'s pool has room")));
                    break;
                }
                t = merge_target(tc);
            }
            found
        };
        let Some((pool, why)) = target else { return };
        let n = i.waiting.div_ceil(2);
        self.moved_at.insert(i.id, now_s);
        out.push(Decision {
            at_s: now_s,
            source: "backlog-guard",
            action: Action::MoveQueued { instance: i.id, pool: PoolId(pool), max_requests: n },
            reason: format!("{} requests waiting for KV room: move up to {n} unstarted ones ({why})", i.waiting),
            pool: Some(pool),
            planned_rps: None,
            predicted_delta_w: None,
            slo_margin: None,
        });
    }
}
