//! A light per-interval timeline of a replay (per minute by default): energy,
//! GPU-seconds, mean clock and routed tokens per pool, and arrivals per class.
//! Bounded: a week at one point per minute is 10,080 points. Reports chart it
//! and the accounting prices it interval by interval (carbon intensity and
//! tariffs change over the day).

use telemetry_core::CLASS_COUNT;

/// One pool over one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolInterval {
    /// GPU energy spent by the pool's instances in the interval (J).
    pub energy_j: f64,
    /// GPUs held × time in the interval (GPU·s).
    pub gpu_seconds: f64,
    /// GPUs held at the interval's end.
    pub gpus: u32,
    /// Mean locked clock of its serving instances at the interval's end, GPU-weighted (0: none serving).
    pub clock_mhz: f64,
    /// Prompt + output tokens of the requests routed to the pool in the interval, per class.
    pub tokens_by_class: [f64; CLASS_COUNT],
}

/// One interval of the whole cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelinePoint {
    /// Start of the interval (s since the replay began).
    pub start_s: f64,
    /// Length of the interval (s); the last one may be shorter.
    pub duration_s: f64,
    /// Per pool, indexed like the cluster's pools.
    pub pools: Vec<PoolInterval>,
    /// Requests that arrived in the interval, per class.
    pub requests_by_class: [u64; CLASS_COUNT],
}

/// The timeline of a replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// Interval length (s).
    pub step_s: f64,
    /// Pool names, indexed like the points' pools.
    pub pool_names: Vec<String>,
    /// The intervals, in time order.
    pub points: Vec<TimelinePoint>,
}

/// Default interval: one minute.
pub const TIMELINE_STEP_S: f64 = 60.0;

/// Cumulative counters at the previous boundary, to difference.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    pub(crate) timeline: Timeline,
    pub(crate) next_s: f64,
    pub(crate) last_s: f64,
    pub(crate) last_energy_j: Vec<f64>,
    pub(crate) last_gpu_seconds: Vec<f64>,
    pub(crate) last_requests: [u64; CLASS_COUNT],
    /// Tokens routed since the last boundary, per pool and class.
    pub(crate) tokens: Vec<[f64; CLASS_COUNT]>,
}

impl Recorder {
    pub(crate) fn new(pool_names: Vec<String>, step_s: f64) -> Recorder {
        let n = pool_names.len();
        Recorder {
            timeline: Timeline { step_s, pool_names, points: Vec::new() },
            next_s: step_s,
            last_s: 0.0,
            last_energy_j: vec![0.0; n],
            last_gpu_seconds: vec![0.0; n],
            last_requests: [0; CLASS_COUNT],
            tokens: vec![[0.0; CLASS_COUNT]; n],
        }
    }

    /// Close an interval at `t` given the cumulative counters there.
    pub(crate) fn close(
        &mut self,
        t: f64,
        energy_j: &[f64],
        gpu_seconds: &[f64],
        gpus: &[u32],
        clock_mhz: &[f64],
        requests: [u64; CLASS_COUNT],
    ) {
        let pools = (0..self.last_energy_j.len())
            .map(|p| PoolInterval {
                energy_j: (energy_j[p] - self.last_energy_j[p]).max(0.0),
                gpu_seconds: (gpu_seconds[p] - self.last_gpu_seconds[p]).max(0.0),
                gpus: gpus[p],
                clock_mhz: clock_mhz[p],
                tokens_by_class: std::mem::replace(&mut self.tokens[p], [0.0; CLASS_COUNT]),
            })
            .collect();
        self.timeline.points.push(TimelinePoint {
            start_s: self.last_s,
            duration_s: t - self.last_s,
            pools,
            requests_by_class: std::array::from_fn(|c| requests[c] - self.last_requests[c]),
        });
        self.last_s = t;
        self.last_energy_j = energy_j.to_vec();
        self.last_gpu_seconds = gpu_seconds.to_vec();
        self.last_requests = requests;
    }
}

impl Timeline {
    /// Total GPU energy over every interval and pool (J).
    pub fn energy_j(&self) -> f64 {
        self.points.iter().flat_map(|p| p.pools.iter()).map(|p| p.energy_j).sum()
    }

    /// Total GPU-seconds over every interval and pool.
    pub fn gpu_seconds(&self) -> f64 {
        self.points.iter().flat_map(|p| p.pools.iter()).map(|p| p.gpu_seconds).sum()
    }
}
