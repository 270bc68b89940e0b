//! The cumulative (Prometheus-style) histograms of an engine's TTFT and
//! inter-token latency: deltas between scrapes, quantiles and the share
//! within a bound, interpolated inside a bucket as Prometheus does.

use crate::sample::LatencySummary;

/// One bucket of a cumulative histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Upper bound (`le`), seconds; `f64::INFINITY` for `+Inf`.
    pub le_s: f64,
    /// Observations at or below the bound.
    pub cumulative: f64,
}

/// A Prometheus histogram: cumulative buckets sorted by bound, count and sum.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    /// Buckets, ascending bound, ending with `+Inf` once the page is read.
    pub buckets: Vec<Bucket>,
    /// Observations.
    pub count: f64,
    /// Sum of observations, seconds.
    pub sum_s: f64,
}

impl Histogram {
    pub(crate) fn add_bucket(&mut self, le_s: f64, v: f64) {
        match self.buckets.iter_mut().find(|b| b.le_s == le_s) {
            Some(b) => b.cumulative += v,
            None => self.buckets.push(Bucket { le_s, cumulative: v }),
        }
    }

    pub(crate) fn finish(&mut self) {
        self.buckets.sort_by(|a, b| a.le_s.total_cmp(&b.le_s));
        if self.buckets.last().is_none_or(|b| b.le_s != f64::INFINITY) {
            self.buckets.push(Bucket { le_s: f64::INFINITY, cumulative: self.count });
        }
    }

    /// What was observed since `prev`. A counter reset (a count or bucket
    /// going down, or a different bucket layout) means the engine restarted:
    /// everything in `self` is new.
    pub fn delta(&self, prev: &Histogram) -> Histogram {
        let same_layout = self.buckets.len() == prev.buckets.len()
            && self.buckets.iter().zip(&prev.buckets).all(|(a, b)| a.le_s == b.le_s);
        let reset = !same_layout
            || self.count < prev.count
            || self.buckets.iter().zip(&prev.buckets).any(|(a, b)| a.cumulative < b.cumulative);
        if reset {
            return self.clone();
        }
        Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&prev.buckets)
                .map(|(a, b)| Bucket { le_s: a.le_s, cumulative: a.cumulative - b.cumulative })
                .collect(),
            count: self.count - prev.count,
            sum_s: self.sum_s - prev.sum_s,
        }
    }

    /// The `q`-quantile (0–1) as Prometheus' `histogram_quantile` computes
    /// it: find the bucket holding rank `q × count` and interpolate linearly
    /// inside it (the first bucket starts at 0; a rank in `+Inf` answers the
    /// highest finite bound). `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let q = q.clamp(0.0, 1.0);
        let n = self.buckets.len();
        if n < 2 || self.buckets[n - 1].le_s != f64::INFINITY {
            return None;
        }
        // Make the cumulative counts monotonic, as Prometheus does.
        let mut cum: Vec<f64> = Vec::with_capacity(n);
        let mut max = 0.0f64;
        for b in &self.buckets {
            max = max.max(b.cumulative);
            cum.push(max);
        }
        let observations = cum[n - 1];
        if observations <= 0.0 || !observations.is_finite() {
            return None;
        }
        let mut rank = q * observations;
        let b = cum.iter().position(|&c| c >= rank).unwrap_or(n - 1);
        if b == n - 1 {
            return Some(self.buckets[n - 2].le_s);
        }
        if b == 0 && self.buckets[0].le_s <= 0.0 {
            return Some(self.buckets[0].le_s);
        }
        let (start, mut count) = if b == 0 { (0.0, cum[0]) } else { (self.buckets[b - 1].le_s, cum[b] - cum[b - 1]) };
        if b > 0 {
            rank -= cum[b - 1];
        }
        if count <= 0.0 {
            count = 1.0;
        }
        Some(start + (self.buckets[b].le_s - start) * (rank / count))
    }

    /// How many observations were at most `bound_s`, interpolating linearly
    /// inside the bucket that holds the bound (as [`Histogram::quantile`] does
    /// the other way round); past the highest finite bound, every observation
    /// but those in `+Inf` counts.
    pub fn count_within(&self, bound_s: f64) -> f64 {
        let mut below = (0.0f64, 0.0f64); // (bound, cumulative) of the bucket below
        for b in &self.buckets {
            if b.le_s.is_infinite() {
                return below.1;
            }
            if bound_s <= b.le_s {
                let width = b.le_s - below.0;
                let share = if width > 0.0 { ((bound_s - below.0) / width).clamp(0.0, 1.0) } else { 1.0 };
                return below.1 + (b.cumulative - below.1).max(0.0) * share;
            }
            below = (b.le_s, b.cumulative.max(below.1));
        }
        below.1
    }

    /// Count, sum and p50/p90/p99; `None` without observations.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.count <= 0.0 {
            return None;
        }
        Some(LatencySummary {
            count: self.count,
            sum_s: self.sum_s,
            p50_s: self.quantile(0.5)?,
            p90_s: self.quantile(0.9)?,
            p99_s: self.quantile(0.99)?,
        })
    }
}
