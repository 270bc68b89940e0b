//! What the controller sees each step: per-instance windows, per-class
//! arrivals and attainment ([`Observations`]), and the attainment history
//! `sim` and `serve` keep to fill them.

use super::plan::Demand;
use super::{ControllerConfig, ATTAINMENT_TARGET};
use actuators_core::{InstanceId, PoolId};
use serde::{Deserialize, Serialize};
use telemetry_core::CLASS_COUNT;

/// An instance's lifecycle as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Coming up.
    Starting,
    /// Taking requests.
    Serving,
    /// Finishing its requests before stopping.
    Draining,
}

/// One instance, observed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct InstanceObs {
    /// Its id.
    pub id: InstanceId,
    /// Its pool.
    pub pool: PoolId,
    /// TP degree.
    pub tp: u32,
    /// Locked clock.
    pub clock_mhz: u32,
    /// Lifecycle.
    pub state: InstanceState,
    /// Requests it holds.
    pub outstanding: u32,
    /// Requests waiting for KV room.
    pub waiting: u32,
    /// Power its GPUs draw together (W), where telemetry gives it.
    pub power_w: Option<f64>,
}

/// What the controller is told at each step.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    /// When (s).
    pub now_s: f64,
    /// Every instance not stopped.
    pub instances: Vec<InstanceObs>,
    /// Per-class arrival rate over the last clock period (requests/s).
    pub class_rps_recent: Demand,
    /// Per-class arrival rate smoothed over the last minutes (requests/s).
    pub class_rps_smoothed: Demand,
    /// Per-class forecast of the peak rate over the next scale period plus lead (requests/s), if any.
    pub class_peak_scale: Option<Demand>,
    /// Per-class forecast of the peak rate over the next shard period plus lead (requests/s), if any.
    pub class_peak_shard: Option<Demand>,
    /// Seconds from spawn to serving of the instances that came up since the last step.
    pub observed_spawn_s: Vec<f64>,
    /// Per class, the share of requests and token gaps within the SLO over its recent window (None:
    /// no samples): `attainment_window_s`, reaching further back for a class with few requests
    /// ([`AttainmentHistory`]).
    pub class_attainment_recent: [Option<f64>; CLASS_COUNT],
    /// Each class's attainment over the plain window, where `class_attainment_recent` reaches
    /// further back for enough requests ([`AttainmentHistory`]); `None`: not given. A dip over the
    /// longer window counts only while the plain window holds a miss of its own, so a small class's
    /// one miss is not counted again and again while it stays in view.
    pub class_attainment_window: [Option<f64>; CLASS_COUNT],
    /// Per class, the counters (`[ttft_ok, ttft_n, gaps_ok, gaps_n]`) over the window of
    /// `class_attainment_recent`; `None`: not given. Where the window holds fewer than
    /// `attainment_min_requests` requests, a dip counts only if a class at its target would show
    /// it by chance with at most [`MISS_EVIDENCE_P`](super::MISS_EVIDENCE_P) ([`miss_evidence`]).
    pub class_slo_counts_recent: [Option<[u64; 4]>; CLASS_COUNT],
}

/// SLO attainment from counters `[ttft_ok, ttft_n, gaps_ok, gaps_n]`: the
/// smaller of the TTFT and token-gap shares (None without samples).
pub fn slo_attainment(k: [u64; 4]) -> Option<f64> {
    let t = (k[1] > 0).then(|| k[0] as f64 / k[1] as f64);
    let g = (k[3] > 0).then(|| k[2] as f64 / k[3] as f64);
    match (t, g) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How likely a class holding exactly the P99 target would show at least the misses of counters
/// `[ttft_ok, ttft_n, gaps_ok, gaps_n]` (a binomial tail: near 1 for a miss or two among a few
/// hundred requests, tiny for a real shortfall); 1 without samples. Late first tokens are
/// independent draws, one per request. Token gaps are not: the gaps of one step are late
/// together, so their misses are weighed as if the window held one draw per request, at the
/// gaps' miss share. The smaller of the two tails.
pub fn miss_evidence(k: [u64; 4]) -> f64 {
    draws(k).into_iter().flatten().map(|(m, n)| at_least(m, n)).fold(1.0, f64::min)
}

/// The window's (misses, draws) of first tokens and of token gaps (one draw per request at the
/// gaps' miss share); `None` for a part without samples.
fn draws(k: [u64; 4]) -> [Option<(f64, f64)>; 2] {
    let requests = k[1] as f64;
    let ttft = (k[1] > 0).then(|| (k[1].saturating_sub(k[0]) as f64, requests));
    let gaps = (k[3] > 0).then(|| {
        let share = k[3].saturating_sub(k[2]) as f64 / k[3] as f64;
        let draws = requests.max(1.0);
        (share * draws, draws)
    });
    [ttft, gaps]
}

/// P(X ≥ m) for X ~ Binomial(n, 1 − target), continuous in m (the regularised incomplete beta).
fn at_least(m: f64, n: f64) -> f64 {
    if m <= 0.0 {
        return 1.0;
    }
    if m > n {
        return 0.0;
    }
    statrs::function::beta::checked_beta_reg(m, n - m + 1.0, 1.0 - ATTAINMENT_TARGET).unwrap_or(1.0).clamp(0.0, 1.0)
}

/// Per-class SLO counters (`[ttft_ok, ttft_n, gaps_ok, gaps_n]`, cumulative)
/// as they stood at each step, for the attainment the controller learns from.
/// Each class's window spans at least `attainment_window_s` and reaches
/// further back, up to `attainment_lookback_s`, until it holds
/// `attainment_min_requests` requests.
#[derive(Debug, Clone, Default)]
pub struct AttainmentHistory {
    snapshots: std::collections::VecDeque<(f64, [[u64; 4]; CLASS_COUNT])>,
    plain: [Option<f64>; CLASS_COUNT],
    recent: [Option<[u64; 4]>; CLASS_COUNT],
}

impl AttainmentHistory {
    /// Each class's attainment over the plain window alone, as of the latest [`push`](Self::push);
    /// 1 where the window has no samples (it holds no miss).
    pub fn plain_window(&self) -> [Option<f64>; CLASS_COUNT] {
        self.plain
    }

    /// Each class's counters over its window as of the latest [`push`](Self::push) (`None`
    /// without samples).
    pub fn recent_counts(&self) -> [Option<[u64; 4]>; CLASS_COUNT] {
        self.recent
    }

    /// The counters as of the latest step.
    pub fn latest(&self) -> Option<[[u64; 4]; CLASS_COUNT]> {
        self.snapshots.back().map(|(_, k)| *k)
    }

    /// Record the counters at `now_s` and return each class's attainment over its window.
    pub fn push(
        &mut self,
        now_s: f64,
        totals: [[u64; 4]; CLASS_COUNT],
        cfg: &ControllerConfig,
    ) -> [Option<f64>; CLASS_COUNT] {
        self.snapshots.push_back((now_s, totals));
        let horizon = cfg.attainment_lookback_s.max(cfg.attainment_window_s);
        while self.snapshots.front().is_some_and(|(t, _)| now_s - t > horizon + 1e-9) {
            self.snapshots.pop_front();
        }
        // The newest snapshot at least a window old (else the oldest kept).
        let window_start = self.snapshots.partition_point(|(t, _)| *t <= now_s - cfg.attainment_window_s + 1e-9);
        let base = window_start.saturating_sub(1);
        let snaps = &self.snapshots;
        let from: [usize; CLASS_COUNT] = std::array::from_fn(|c| {
            let requests_now = totals[c][1];
            let enough = requests_now.saturating_sub(cfg.attainment_min_requests);
            if requests_now.saturating_sub(snaps[base].1[c][1]) >= cfg.attainment_min_requests {
                base
            } else {
                // Counters only grow: the snapshots before `reach` are at least `min_requests` behind.
                snaps.partition_point(|(_, k)| k[c][1] <= enough).saturating_sub(1).min(base)
            }
        });
        let counts = |c: usize, i: usize| -> [u64; 4] {
            let then = snaps[i].1[c];
            std::array::from_fn(|j| totals[c][j].saturating_sub(then[j]))
        };
        let over = |c: usize, i: usize| slo_attainment(counts(c, i));
        // A plain window without samples has no miss of its own.
        self.plain = std::array::from_fn(|c| over(c, base).or(Some(1.0)));
        self.recent = std::array::from_fn(|c| over(c, from[c]).map(|_| counts(c, from[c])));
        std::array::from_fn(|c| over(c, from[c]))
    }
}
