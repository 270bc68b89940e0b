//! The per-class plumbing between the arrivals and the controller: minute
//! counts of a whole workload (what the oracle knows), and the running
//! per-class forecasts the controller's scale and shard loops plan from
//! (MSTL + ETS once a day of history is known; before, the recent peak).

use crate::{FittedModel, Forecaster, ModelKind};
use std::collections::HashMap;
use telemetry_core::{RequestClass, CLASS_COUNT};

/// Requests per second per class.
pub type Demand = [f64; CLASS_COUNT];

/// Per-minute per-class arrival counts of a whole workload.
#[derive(Debug, Clone)]
pub struct MinuteCounts(pub Vec<[u32; CLASS_COUNT]>);

impl MinuteCounts {
    /// Count arrivals (time in seconds, class), in one streaming pass.
    pub fn of<E>(arrivals: impl IntoIterator<Item = Result<(f64, RequestClass), E>>) -> Result<MinuteCounts, E> {
        let mut v: Vec<[u32; CLASS_COUNT]> = Vec::new();
        for a in arrivals {
            let (arrival_s, class) = a?;
            let m = (arrival_s / 60.0) as usize;
            if v.len() <= m {
                v.resize(m + 1, [0; CLASS_COUNT]);
            }
            v[m][class.index()] += 1;
        }
        Ok(MinuteCounts(v))
    }

    /// The highest per-class rate (requests/s) over minutes `[from, to)`.
    pub fn peak(&self, from: usize, to: usize) -> Demand {
        let mut d = [0.0; CLASS_COUNT];
        for m in from..to.min(self.0.len()) {
            for (c, x) in d.iter_mut().enumerate() {
                *x = f64::max(*x, f64::from(self.0[m][c]) / 60.0);
            }
        }
        d
    }
}

const FORECAST_LEVEL: f64 = 0.95;
/// History needed before the forecaster is used (minutes); before, recent peaks are.
const FORECAST_MIN_HISTORY_MIN: usize = 24 * 60;
/// Refit the forecast models this often (minutes).
const FORECAST_REFIT_MIN: usize = 6 * 60;
/// Fallback before the forecaster has its history: the highest minute rate
/// over as many recent minutes as the horizon asked for, at most this many.
/// (With the re-plan on a rise, `ControllerConfig::rise_replan`, the shard
/// loop's 6 minutes rather than 15 took the Conversation hour from 0.577× to
/// 0.554× of single-pool at ×2.25 and from 0.552× to 0.524× at ×8, every
/// class holding.)
const RECENT_PEAK_MIN: usize = 15;

/// Per-class forecasts from the minute history, as the controller is fed:
/// the twin's closed loop and the service keep one each.
pub struct ClassForecasts {
    /// Requests per minute per class, oldest first.
    pub history: Vec<[f64; CLASS_COUNT]>,
    models: Vec<Option<FittedModel>>,
    fitted_at: usize,
    forecaster: Forecaster,
    /// Peaks by horizon; they change only when a minute is pushed.
    peaks: std::cell::RefCell<HashMap<usize, Demand>>,
}

impl ClassForecasts {
    /// No history yet.
    #[allow(clippy::new_without_default)]
    pub fn new() -> ClassForecasts {
        ClassForecasts {
            history: Vec::new(),
            models: vec![None; CLASS_COUNT],
            fitted_at: 0,
            forecaster: Forecaster::default(),
            peaks: std::cell::RefCell::new(HashMap::new()),
        }
    }

    /// Add one minute of per-class request counts (refits the models every few hours once a day is known).
    pub fn push_minute(&mut self, counts: [f64; CLASS_COUNT]) {
        self.peaks.get_mut().clear();
        self.history.push(counts);
        let n = self.history.len();
        if n >= FORECAST_MIN_HISTORY_MIN && (self.models[0].is_none() || n - self.fitted_at >= FORECAST_REFIT_MIN) {
            let keep = n.saturating_sub(28 * 1440);
            for c in 0..CLASS_COUNT {
                let series: Vec<f64> = self.history[keep..].iter().map(|m| m[c]).collect();
                self.models[c] = self.forecaster.fit(&series, ModelKind::MstlEts).ok();
            }
            self.fitted_at = n;
        } else {
            for (c, m) in self.models.iter_mut().enumerate() {
                if let Some(m) = m {
                    if m.update(&[counts[c]]).is_err() {
                        *m = self.forecaster.fit(&[counts[c]], ModelKind::Ewma).expect("an EWMA fits any series");
                    }
                }
            }
        }
    }

    /// Peak per-class rate (requests/s) over the next `minutes`.
    pub fn peak(&self, minutes: usize) -> Demand {
        if let Some(d) = self.peaks.borrow().get(&minutes) {
            return *d;
        }
        let d = self.compute_peak(minutes);
        self.peaks.borrow_mut().insert(minutes, d);
        d
    }

    fn compute_peak(&self, minutes: usize) -> Demand {
        let n = self.history.len();
        let recent = |c: usize| {
            self.history[n.saturating_sub(RECENT_PEAK_MIN.min(minutes.max(1)))..]
                .iter()
                .map(|m| m[c])
                .fold(0.0, f64::max)
                / 60.0
        };
        std::array::from_fn(|c| {
            let f = self.models[c].as_ref().and_then(|m| m.peak(minutes.max(1), FORECAST_LEVEL).ok()).map(|x| x / 60.0);
            match f {
                Some(x) => x.max(0.0),
                None => recent(c) * 1.2,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before the forecaster has a day of history, the peak for a horizon is
    /// the highest minute over as many recent minutes (at most 15), with a
    /// 20% margin: a burst ten minutes back still counts for the scale loop's
    /// half hour, not for the shard loop's next six minutes.
    #[test]
    fn the_fallback_peak_looks_back_as_far_as_the_horizon_looks_ahead() {
        let mut f = ClassForecasts::new();
        for m in 0..20 {
            let mut counts = [0.0; CLASS_COUNT];
            counts[0] = if m == 10 { 600.0 } else { 60.0 };
            f.push_minute(counts);
        }
        assert!((f.peak(6)[0] - 1.2).abs() < 1e-9, "{:?}", f.peak(6));
        assert!((f.peak(31)[0] - 12.0).abs() < 1e-9, "{:?}", f.peak(31));
        assert!((f.peak(10)[0] - 12.0).abs() < 1e-9, "{:?}", f.peak(10));
        assert_eq!(f.peak(6)[1], 0.0);
    }
}
