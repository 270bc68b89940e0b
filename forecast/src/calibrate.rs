//! Interval calibration: split-conformal quantiles of out-of-sample forecast
//! residuals (in the transformed space), per horizon bucket, collected by a
//! rolling-origin pass over the most recent history. augurs' own intervals
//! leave out the seasonal uncertainty; these do not, because they are what
//! the whole model actually missed by.

/// Horizon buckets are powers of two: bucket `b` holds steps `2^b ..
/// 2^(b+1) - 1` (1-based steps).
pub(crate) fn bucket_of(step: usize) -> usize {
    (usize::BITS - 1 - step.max(1).leading_zeros()) as usize
}

/// Most residuals kept per bucket (evenly thinned beyond).
const MAX_PER_BUCKET: usize = 2048;

/// Residual pools per horizon bucket, for per-step intervals and for the
/// maximum over a horizon.
#[derive(Debug, Clone, Default)]
pub(crate) struct Calibration {
    /// Sorted residuals `z_actual - z_forecast` per bucket.
    step: Vec<Vec<f64>>,
    /// Mean and mean square of residuals per bucket.
    moments: Vec<(f64, f64)>,
    /// (horizon steps, sorted residuals of `z(max actual over the horizon) -
    /// max forecast over it`), ascending horizon.
    peak: Vec<(usize, Vec<f64>)>,
}

/// Collects residuals before they are frozen into a [`Calibration`].
#[derive(Debug, Default)]
pub(crate) struct Collector {
    step: Vec<Vec<f64>>,
    peak: Vec<(usize, Vec<f64>)>,
}

/// Horizons at which the peak residual is recorded: powers of two below
/// `max_steps`, then `max_steps`.
pub(crate) fn peak_horizons(max_steps: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut h = 1;
    while h < max_steps {
        v.push(h);
        h *= 2;
    }
    v.push(max_steps.max(1));
    v
}

impl Collector {
    pub fn new(max_steps: usize) -> Collector {
        Collector {
            step: vec![Vec::new(); bucket_of(max_steps.max(1)) + 1],
            peak: peak_horizons(max_steps).into_iter().map(|h| (h, Vec::new())).collect(),
        }
    }

    /// Record one origin: `forecast[k]` and `actual[k]` for step k+1, with
    /// `observed[k]` false for gaps.
    pub fn record(&mut self, forecast: &[f64], actual: &[f64], observed: &[bool]) {
        let n = forecast.len().min(actual.len()).min(observed.len());
        for k in 0..n {
            if observed[k] {
                let b = bucket_of(k + 1);
                if b < self.step.len() {
                    self.step[b].push(actual[k] - forecast[k]);
                }
            }
        }
        let mut max_f = f64::NEG_INFINITY;
        let mut max_a = f64::NEG_INFINITY;
        let mut k = 0;
        for (h, pool) in &mut self.peak {
            if *h > n {
                break;
            }
            while k < *h {
                max_f = max_f.max(forecast[k]);
                if observed[k] {
                    max_a = max_a.max(actual[k]);
                }
                k += 1;
            }
            if max_a.is_finite() {
                pool.push(max_a - max_f);
            }
        }
    }

    /// Freeze. Empty buckets borrow from the nearest non-empty one (shorter
    /// horizon first); if everything is empty, `fallback` is the pool.
    pub fn finish(self, fallback: &[f64]) -> Calibration {
        let fallback: Vec<f64> = if fallback.is_empty() { vec![0.0] } else { fallback.to_vec() };
        let step = fill_empty(self.step, &fallback);
        let peak_pools = fill_empty(self.peak.iter().map(|p| p.1.clone()).collect(), &fallback);
        let moments = step
            .iter()
            .map(|r| {
                let n = r.len().max(1) as f64;
                (r.iter().sum::<f64>() / n, r.iter().map(|x| x * x).sum::<f64>() / n)
            })
            .collect();
        Calibration { step, moments, peak: self.peak.into_iter().map(|p| p.0).zip(peak_pools).collect() }
    }
}

fn thin(mut v: Vec<f64>) -> Vec<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    if v.len() > MAX_PER_BUCKET {
        let n = v.len();
        v = (0..MAX_PER_BUCKET).map(|i| v[i * (n - 1) / (MAX_PER_BUCKET - 1)]).collect();
    }
    v
}

fn fill_empty(pools: Vec<Vec<f64>>, fallback: &[f64]) -> Vec<Vec<f64>> {
    let pools: Vec<Vec<f64>> = pools.into_iter().map(thin).collect();
    let mut out = pools.clone();
    for i in 0..pools.len() {
        if !pools[i].is_empty() {
            continue;
        }
        let lower = (0..i).rev().find(|&j| !pools[j].is_empty());
        let upper = (i + 1..pools.len()).find(|&j| !pools[j].is_empty());
        out[i] = match lower.or(upper) {
            Some(j) => pools[j].clone(),
            None => thin(fallback.to_vec()),
        };
    }
    out
}

/// Split-conformal quantile of a sorted pool: the ⌈(n+1)p⌉-th smallest.
pub(crate) fn conformal_quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let n = sorted.len();
    let p = p.clamp(0.0, 1.0);
    let rank = ((n as f64 + 1.0) * p).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

impl Calibration {
    fn bucket(&self, step: usize) -> usize {
        bucket_of(step).min(self.step.len().saturating_sub(1))
    }

    /// (lower, upper) residual quantiles at a central `level` for a 1-based step.
    pub fn band(&self, step: usize, level: f64) -> (f64, f64) {
        let pool = &self.step[self.bucket(step)];
        let tail = (1.0 - level) / 2.0;
        (conformal_quantile_lower(pool, tail), conformal_quantile(pool, 1.0 - tail))
    }

    /// Mean and mean square of the residual at a 1-based step.
    pub fn moments(&self, step: usize) -> (f64, f64) {
        self.moments[self.bucket(step)]
    }

    /// One-sided `level` quantile of the horizon-maximum residual for a
    /// horizon of `steps` (the smallest recorded horizon ≥ `steps`).
    pub fn peak_margin(&self, steps: usize, level: f64) -> f64 {
        let pool =
            self.peak.iter().find(|(h, _)| *h >= steps).or(self.peak.last()).map(|p| p.1.as_slice()).unwrap_or(&[]);
        conformal_quantile(pool, level)
    }
}

/// Lower conformal quantile: the ⌊(n+1)p⌋-th smallest (mirror of the upper).
fn conformal_quantile_lower(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let n = sorted.len();
    let rank = ((n as f64 + 1.0) * p.clamp(0.0, 1.0)).floor() as usize;
    sorted[rank.clamp(1, n) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!([1, 2, 3, 4, 7, 8, 1440].map(bucket_of), [0, 1, 1, 2, 2, 3, 10]);
    }

    #[test]
    fn conformal_quantile_is_conservative() {
        let pool: Vec<f64> = (1..=19).map(f64::from).collect();
        // (19 + 1) * 0.95 = 19: the largest.
        assert_eq!(conformal_quantile(&pool, 0.95), 19.0);
        assert_eq!(conformal_quantile(&pool, 0.5), 10.0);
        assert_eq!(conformal_quantile_lower(&pool, 0.05), 1.0);
    }

    #[test]
    fn empty_buckets_borrow_from_shorter_horizons() {
        let mut c = Collector::new(8);
        c.record(&[0.0, 0.0], &[1.0, -1.0], &[true, true]);
        let cal = c.finish(&[]);
        assert_eq!(cal.band(8, 0.5), cal.band(2, 0.5));
        assert_eq!(cal.peak_margin(8, 0.9), cal.peak_margin(2, 0.9));
    }
}
