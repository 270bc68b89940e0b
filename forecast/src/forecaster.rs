//! Fitting and prediction: [`Forecaster::fit`] cleans a series, fits a point
//! model, calibrates its intervals on the most recent history, and returns a
//! [`FittedModel`] that advances with new observations and predicts a mean,
//! a band and a horizon peak per step.

use crate::calibrate::{Calibration, Collector};
use crate::error::{Error, Result};
use crate::models::{ModelKind, ModelParams, PointModel};
use crate::prep::{prepare, usable, Transform};

/// How to fit. Durations are in minutes; the series step is `step_min`.
#[derive(Debug, Clone)]
pub struct ForecastConfig {
    /// Minutes between points of the series.
    pub step_min: u32,
    /// Variance-stabilising transform. `Log1p` (default) suits bursty load
    /// whose spread grows with its level; `Sqrt` suits pure Poisson counts.
    pub transform: Transform,
    /// Length of the daily season, minutes.
    pub daily_period_min: u32,
    /// Length of the weekly season, minutes.
    pub weekly_period_min: u32,
    /// History needed before the weekly season is modelled, minutes (two weeks).
    pub weekly_min_history_min: u32,
    /// Most history MSTL decomposes, minutes (older points are ignored).
    pub mstl_max_history_min: u32,
    /// Deseasonalised history the ETS trend is fitted on, minutes.
    pub trend_window_min: u32,
    /// Width of the moving average applied to each seasonal profile, minutes
    /// (removes per-minute noise that STL leaves in the season).
    pub seasonal_smoothing_min: u32,
    /// History the EWMA/Holt fallbacks are fitted on, minutes.
    pub fallback_window_min: u32,
    /// Recent history used to calibrate the intervals, minutes.
    pub calibration_span_min: u32,
    /// Minutes between calibration origins.
    pub calibration_stride_min: u32,
    /// Longest horizon the intervals are calibrated for, minutes (longer
    /// horizons reuse the last bucket).
    pub max_horizon_min: u32,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        ForecastConfig {
            step_min: 1,
            transform: Transform::Log1p,
            daily_period_min: 1440,
            weekly_period_min: 7 * 1440,
            weekly_min_history_min: 14 * 1440,
            mstl_max_history_min: 28 * 1440,
            trend_window_min: 720,
            seasonal_smoothing_min: 15,
            fallback_window_min: 1440,
            calibration_span_min: 1440,
            calibration_stride_min: 10,
            max_horizon_min: 1440,
        }
    }
}

impl ForecastConfig {
    /// Default configuration for a series with `step_min` minutes per point.
    pub fn with_step_min(step_min: u32) -> ForecastConfig {
        ForecastConfig { step_min, ..ForecastConfig::default() }
    }

    /// Check ranges; names the field that is wrong.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("step_min", self.step_min),
            ("daily_period_min", self.daily_period_min),
            ("weekly_period_min", self.weekly_period_min),
            ("calibration_stride_min", self.calibration_stride_min),
            ("max_horizon_min", self.max_horizon_min),
            ("trend_window_min", self.trend_window_min),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::Config { field, message: "must be at least 1 minute".into() });
            }
        }
        Ok(())
    }

    /// Minutes to steps (at least 1).
    pub fn steps(&self, minutes: u32) -> usize {
        (minutes as usize / self.step_min.max(1) as usize).max(1)
    }

    pub(crate) fn model_params(&self) -> ModelParams {
        ModelParams {
            daily_steps: self.steps(self.daily_period_min),
            weekly_steps: self.steps(self.weekly_period_min),
            weekly_min_history_steps: self.steps(self.weekly_min_history_min),
            mstl_max_history_steps: self.steps(self.mstl_max_history_min),
            trend_window_steps: self.steps(self.trend_window_min),
            seasonal_smoothing_steps: self.seasonal_smoothing_min as usize / self.step_min.max(1) as usize,
            fallback_window_steps: self.steps(self.fallback_window_min),
        }
    }
}

/// Fits models with one configuration.
#[derive(Debug, Clone, Default)]
pub struct Forecaster {
    /// The configuration every fit uses.
    pub config: ForecastConfig,
}

/// A forecast over steps 1..=len after the last observation.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    /// Minutes between steps.
    pub step_min: u32,
    /// Central coverage of `lower..=upper` (e.g. 0.95).
    pub level: f64,
    /// Expected load per step.
    pub mean: Vec<f64>,
    /// Lower bound per step.
    pub lower: Vec<f64>,
    /// Upper bound per step.
    pub upper: Vec<f64>,
    /// `peak_upper[k]`: bound on the maximum over steps 1..=k+1.
    peak_upper: Vec<f64>,
}

impl Forecast {
    /// Number of steps.
    pub fn len(&self) -> usize {
        self.mean.len()
    }

    /// True when there are no steps.
    pub fn is_empty(&self) -> bool {
        self.mean.is_empty()
    }

    /// The load the maximum over the next `horizon_steps` steps stays under
    /// with probability about `level` (one-sided): the larger of the highest
    /// per-step upper bound and the calibrated quantile of the horizon
    /// maximum. Horizons past the forecast use its whole length; 0 gives 0.
    pub fn peak(&self, horizon_steps: usize) -> f64 {
        if horizon_steps == 0 || self.peak_upper.is_empty() {
            return 0.0;
        }
        self.peak_upper[horizon_steps.min(self.peak_upper.len()) - 1]
    }
}

/// A fitted model: point model, calibration and running state.
#[derive(Debug, Clone)]
pub struct FittedModel {
    requested: ModelKind,
    kind: ModelKind,
    point: PointModel,
    calibration: Calibration,
    config: ForecastConfig,
    /// Last transformed value seen (to fill gaps in updates).
    steps_seen: usize,
}

impl Forecaster {
    /// A forecaster with `config`.
    pub fn new(config: ForecastConfig) -> Result<Forecaster> {
        config.validate()?;
        Ok(Forecaster { config })
    }

    /// Fit `kind` to `series` (one point per `config.step_min`, oldest
    /// first; NaN, infinite or negative points are gaps). Short histories
    /// fall back (MSTL → seasonal-naive → Holt → EWMA); a series of zeros
    /// forecasts zeros. Errors only when no point is usable or the
    /// configuration is invalid.
    pub fn fit(&self, series: &[f64], kind: ModelKind) -> Result<FittedModel> {
        self.config.validate()?;
        let cfg = &self.config;
        let prep = prepare(series, cfg.transform)?;
        let params = cfg.model_params();
        if prep.all_zero {
            return Ok(FittedModel {
                requested: kind,
                kind,
                point: PointModel::Zero,
                calibration: Collector::new(1).finish(&[0.0]),
                config: cfg.clone(),
                steps_seen: series.len(),
            });
        }
        let z = &prep.z;
        let n = z.len();
        let max_h = cfg.steps(cfg.max_horizon_min);
        // Calibrate on the most recent span (at most a third of the history,
        // so the calibration model still has most of it to learn from).
        let span = cfg.steps(cfg.calibration_span_min).min(n / 3);
        let stride = cfg.steps(cfg.calibration_stride_min);
        let mut collector = Collector::new(max_h);
        if span >= 1 {
            let train_end = n - span;
            let (mut model, _) = PointModel::fit(kind, &z[..train_end], &params);
            let mut at = train_end;
            let mut origin = train_end;
            while origin < n {
                model.update(&z[at..origin])?;
                at = origin;
                let h = max_h.min(n - origin);
                let f = model.point(h)?;
                collector.record(&f, &z[origin..origin + h], &prep.observed[origin..origin + h]);
                origin += stride;
            }
        }
        // Fallback pool for tiny histories: one-step changes.
        let diffs: Vec<f64> = z.windows(2).map(|w| w[1] - w[0]).collect();
        let calibration = collector.finish(&diffs);
        let (point, fitted_kind) = PointModel::fit(kind, z, &params);
        Ok(FittedModel { requested: kind, kind: fitted_kind, point, calibration, config: cfg.clone(), steps_seen: n })
    }
}

impl FittedModel {
    /// The kind that was asked for.
    pub fn requested_kind(&self) -> ModelKind {
        self.requested
    }

    /// The kind actually fitted (differs after a short-history fallback).
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// A one-line description of the fitted form.
    pub fn describe(&self) -> String {
        self.point.describe()
    }

    /// Steps observed so far (fit history plus updates).
    pub fn steps_seen(&self) -> usize {
        self.steps_seen
    }

    /// The configuration it was fitted with.
    pub fn config(&self) -> &ForecastConfig {
        &self.config
    }

    /// Advance with new observations (one per step, oldest first; NaN,
    /// infinite or negative points are gaps, filled with the model's own
    /// forecast). Seasonal phases and smoothing states move on; the
    /// parameters and seasonal profiles stay until the next fit, except the
    /// MSTL model's ETS trend, which is re-fitted on its recent window.
    pub fn update(&mut self, new_values: &[f64]) -> Result<()> {
        if new_values.is_empty() {
            return Ok(());
        }
        if matches!(self.point, PointModel::Zero) {
            self.steps_seen += new_values.len();
            if new_values.iter().any(|&v| usable(v) && v > 0.0) {
                // Traffic appeared: start from the mean level seen.
                let seen: Vec<f64> = new_values.iter().copied().filter(|&v| usable(v)).collect();
                let level = seen.iter().sum::<f64>() / seen.len().max(1) as f64;
                self.point = PointModel::Ewma { alpha: 0.3, level: self.config.transform.forward(level) };
                self.kind = ModelKind::Ewma;
                let diffs: Vec<f64> = seen
                    .windows(2)
                    .map(|w| self.config.transform.forward(w[1]) - self.config.transform.forward(w[0]))
                    .chain([self.config.transform.forward(level)])
                    .collect();
                self.calibration = Collector::new(1).finish(&diffs);
            }
            return Ok(());
        }
        let t = self.config.transform;
        let mut z = Vec::with_capacity(new_values.len());
        let mut pending = 0usize;
        for &v in new_values {
            if usable(v) {
                if pending > 0 {
                    self.point.update(&z)?;
                    z.clear();
                    let fill = self.point.point(pending)?;
                    self.point.update(&fill)?;
                    pending = 0;
                }
                z.push(t.forward(v));
            } else {
                if !z.is_empty() {
                    self.point.update(&z)?;
                    z.clear();
                }
                pending += 1;
            }
        }
        if !z.is_empty() {
            self.point.update(&z)?;
        }
        if pending > 0 {
            let fill = self.point.point(pending)?;
            self.point.update(&fill)?;
        }
        self.steps_seen += new_values.len();
        Ok(())
    }

    /// Forecast steps 1..=`horizon_steps` with a central `level` band (0 <
    /// level < 1; e.g. 0.95).
    pub fn predict(&self, horizon_steps: usize, level: f64) -> Result<Forecast> {
        if !(level > 0.0 && level < 1.0) {
            return Err(Error::Config {
                field: "level",
                message: format!("must be strictly between 0 and 1, got {level}"),
            });
        }
        let t = self.config.transform;
        let z = self.point.point(horizon_steps)?;
        let zero = matches!(self.point, PointModel::Zero);
        let bias_correct = !matches!(self.point, PointModel::SeasonalNaive { .. });
        let mut mean = Vec::with_capacity(horizon_steps);
        let mut lower = Vec::with_capacity(horizon_steps);
        let mut upper = Vec::with_capacity(horizon_steps);
        let mut peak_upper = Vec::with_capacity(horizon_steps);
        let noise_var = {
            let (mu, m2) = self.calibration.moments(1);
            (m2 - mu * mu).max(0.0)
        };
        let mut max_z = f64::NEG_INFINITY;
        let mut max_upper: f64 = 0.0;
        for (k, &zk) in z.iter().enumerate() {
            let step = k + 1;
            if zero {
                mean.push(0.0);
                lower.push(0.0);
                upper.push(0.0);
                peak_upper.push(0.0);
                continue;
            }
            let (lo, hi) = self.calibration.band(step, level);
            // Mean of the back-transformed forecast: the point plus the
            // one-step (noise) variance. Longer-horizon residual variance is
            // mostly level error, which is not a bias to correct.
            let m = if bias_correct {
                match t {
                    Transform::Sqrt => zk.max(0.0).powi(2) + noise_var,
                    Transform::Log1p => (zk + noise_var / 2.0).exp_m1().max(0.0),
                    Transform::Identity => zk.max(0.0),
                }
            } else {
                t.inverse(zk)
            };
            let u = t.inverse(zk + hi);
            mean.push(m);
            lower.push(t.inverse(zk + lo).min(m));
            upper.push(u.max(m));
            max_z = max_z.max(zk);
            max_upper = max_upper.max(u.max(m));
            let calibrated = t.inverse(max_z + self.calibration.peak_margin(step, level));
            peak_upper.push(calibrated.max(max_upper));
        }
        // Keep the peak non-decreasing in the horizon.
        for k in 1..peak_upper.len() {
            if peak_upper[k] < peak_upper[k - 1] {
                peak_upper[k] = peak_upper[k - 1];
            }
        }
        Ok(Forecast { step_min: self.config.step_min, level, mean, lower, upper, peak_upper })
    }

    /// The bound on the maximum load over the next `horizon_steps` steps at
    /// one-sided `level` (see [`Forecast::peak`]): what the scale loop
    /// provisions for.
    pub fn peak(&self, horizon_steps: usize, level: f64) -> Result<f64> {
        Ok(self.predict(horizon_steps, level)?.peak(horizon_steps))
    }
}
