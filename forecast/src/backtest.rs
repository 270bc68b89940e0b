//! Rolling-origin backtests and model choice: fit on the history up to an
//! origin, forecast a horizon, score against what happened, move the origin
//! on (refitting on a schedule, advancing the model in between, as the
//! controller does), and pick the model with the lowest MASE.

use crate::error::{Error, Result};
use crate::forecaster::{Forecast, Forecaster};
use crate::models::ModelKind;
use crate::prep::usable;

/// How to run a backtest, in steps of the series.
#[derive(Debug, Clone)]
pub struct BacktestConfig {
    /// Steps of history before the first origin (the training span).
    pub train_steps: usize,
    /// Steps forecast from each origin.
    pub horizon_steps: usize,
    /// Steps between origins.
    pub origin_stride_steps: usize,
    /// Refit from scratch every this many steps; in between the model is
    /// advanced with the new observations.
    pub refit_every_steps: usize,
    /// Central level of the band scored for coverage, and one-sided level of
    /// the peak scored for peak capture.
    pub level: f64,
    /// Season of the MASE scale (one day in steps).
    pub season_steps: usize,
}

impl BacktestConfig {
    /// A backtest with `train_steps` of training and `horizon_steps` forecasts,
    /// origins every min(horizon, 60) steps, refit daily, at 95%, for a series
    /// of `step_min` minutes per point.
    pub fn new(train_steps: usize, horizon_steps: usize, step_min: u32) -> BacktestConfig {
        let day = (1440 / step_min.max(1) as usize).max(1);
        BacktestConfig {
            train_steps,
            horizon_steps,
            origin_stride_steps: horizon_steps.clamp(1, (60 / step_min.max(1) as usize).max(1)),
            refit_every_steps: day,
            level: 0.95,
            season_steps: day,
        }
    }
}

/// Scores of one model over a backtest.
#[derive(Debug, Clone, PartialEq)]
pub struct BacktestScore {
    /// The model asked for.
    pub kind: ModelKind,
    /// Mean absolute error over the in-sample one-season seasonal-naive MAE
    /// of the training span (below 1: better than that naive error).
    pub mase: f64,
    /// Symmetric MAPE, percent (0–200); steps where actual and forecast are
    /// both zero count as 0.
    pub smape_pct: f64,
    /// Share of observed steps inside the band.
    pub coverage: f64,
    /// Share of origins whose actual maximum over the horizon stayed at or
    /// under the forecast peak.
    pub peak_capture: f64,
    /// Mean absolute error in load units.
    pub mae: f64,
    /// Origins scored.
    pub origins: usize,
    /// Steps scored.
    pub points: usize,
}

/// A backtest's scores and, per origin, its forecast (for charts).
#[derive(Debug, Clone)]
pub struct BacktestRun {
    /// The scores.
    pub score: BacktestScore,
    /// (origin step, forecast from it), in order.
    pub forecasts: Vec<(usize, Forecast)>,
}

/// In-sample MAE of the seasonal-naive forecast with lag `season` (lag 1 when
/// the span is shorter than a season) over observed points.
pub fn seasonal_naive_mae(series: &[f64], season: usize) -> f64 {
    let lag = if series.len() > season { season } else { 1 };
    let (sum, n) = series
        .iter()
        .skip(lag)
        .zip(series)
        .filter(|(a, b)| usable(**a) && usable(**b))
        .fold((0.0, 0usize), |(s, n), (a, b)| (s + (a - b).abs(), n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Run a rolling-origin backtest of `kind` on `series`.
pub fn backtest(
    series: &[f64],
    kind: ModelKind,
    forecaster: &Forecaster,
    config: &BacktestConfig,
) -> Result<BacktestRun> {
    let n = series.len();
    let h = config.horizon_steps;
    if h == 0 || config.origin_stride_steps == 0 {
        return Err(Error::Config { field: "horizon_steps/origin_stride_steps", message: "must be at least 1".into() });
    }
    if config.train_steps == 0 || config.train_steps + h > n {
        return Err(Error::TooShort {
            what: "backtest (training span plus one horizon)",
            needed_steps: config.train_steps.max(1) + h,
            got_steps: n,
        });
    }
    let scale = seasonal_naive_mae(&series[..config.train_steps], config.season_steps);
    let mut model = forecaster.fit(&series[..config.train_steps], kind)?;
    let mut fitted_at = config.train_steps;
    let mut at = config.train_steps;
    let (mut abs_err, mut smape, mut covered, mut points) = (0.0, 0.0, 0usize, 0usize);
    let (mut captured, mut origins) = (0usize, 0usize);
    let mut forecasts = Vec::new();
    let mut origin = config.train_steps;
    while origin + h <= n {
        if origin - fitted_at >= config.refit_every_steps.max(1) {
            model = forecaster.fit(&series[..origin], kind)?;
            fitted_at = origin;
        } else {
            model.update(&series[at..origin])?;
        }
        at = origin;
        let f = model.predict(h, config.level)?;
        let mut max_actual = f64::NEG_INFINITY;
        for k in 0..h {
            let y = series[origin + k];
            if !usable(y) {
                continue;
            }
            let m = f.mean[k];
            abs_err += (y - m).abs();
            let denom = y.abs() + m.abs();
            if denom > 0.0 {
                smape += 200.0 * (y - m).abs() / denom;
            }
            if f.lower[k] <= y && y <= f.upper[k] {
                covered += 1;
            }
            points += 1;
            max_actual = max_actual.max(y);
        }
        if max_actual.is_finite() {
            origins += 1;
            if max_actual <= f.peak(h) {
                captured += 1;
            }
        }
        forecasts.push((origin, f));
        origin += config.origin_stride_steps;
    }
    let pts = points.max(1) as f64;
    let mae = abs_err / pts;
    let mase = if scale > 0.0 {
        mae / scale
    } else if mae == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    Ok(BacktestRun {
        score: BacktestScore {
            kind,
            mase,
            smape_pct: smape / pts,
            coverage: covered as f64 / pts,
            peak_capture: captured as f64 / origins.max(1) as f64,
            mae,
            origins,
            points,
        },
        forecasts,
    })
}

/// The outcome of a model choice.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The kind with the lowest MASE.
    pub best: ModelKind,
    /// Every candidate's scores, in the order given.
    pub scores: Vec<BacktestScore>,
}

/// Backtest each candidate on `series` and choose the one with the lowest
/// MASE (ties go to the earlier candidate). Candidates whose backtest fails
/// are left out; errors only if all fail.
pub fn select_by_backtest(
    series: &[f64],
    candidates: &[ModelKind],
    forecaster: &Forecaster,
    config: &BacktestConfig,
) -> Result<Selection> {
    let mut scores = Vec::new();
    let mut last_err = None;
    for &kind in candidates {
        match backtest(series, kind, forecaster, config) {
            Ok(run) => scores.push(run.score),
            Err(e) => last_err = Some(e),
        }
    }
    let best = scores
        .iter()
        .filter(|s| s.mase.is_finite())
        .min_by(|a, b| a.mase.total_cmp(&b.mase))
        .or(scores.first())
        .map(|s| s.kind);
    match best {
        Some(best) => Ok(Selection { best, scores }),
        None => {
            Err(last_err.unwrap_or(Error::Config { field: "candidates", message: "no model to choose from".into() }))
        }
    }
}
