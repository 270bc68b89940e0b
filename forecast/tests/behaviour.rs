//! Behaviour of the forecaster, each test asserting a figure. Series are
//! seeded synthetic Poisson counts (see `common`), hourly or 10-minute so
//! that the tests stay fast in debug builds.

mod common;

use forecast::{
    backtest, BacktestConfig, ClassForecaster, Error, ForecastConfig, Forecaster, ModelKind, ScheduleConfig,
};

fn mape(actual: &[f64], forecast: &[f64]) -> f64 {
    let n = actual.len().min(forecast.len());
    100.0 * (0..n).map(|i| ((actual[i] - forecast[i]) / actual[i]).abs()).sum::<f64>() / n as f64
}

/// Hourly configuration: a week of trend window and of calibration, so the
/// ETS and the conformal pools see enough points.
fn hourly() -> Forecaster {
    Forecaster::new(ForecastConfig {
        trend_window_min: 7 * 1440,
        calibration_span_min: 7 * 1440,
        ..ForecastConfig::with_step_min(60)
    })
    .unwrap()
}

fn true_rates(from: usize, n: usize, step_min: usize, base: f64) -> Vec<f64> {
    (from..from + n).map(|t| common::seasonal_rate(t, step_min, base, 0.6, 0.4)).collect()
}

#[test]
fn daily_and_weekly_season_is_recovered_within_5_percent_mape() {
    // Three weeks, hourly, weekdays and weekends; forecast the next week.
    let base = 5000.0;
    let history = common::daily_weekly(21, 60, base, 1);
    let model = hourly().fit(&history, ModelKind::MstlEts).unwrap();
    assert_eq!(model.kind(), ModelKind::MstlEts);
    assert!(model.describe().contains("168"), "{}", model.describe());
    let f = model.predict(168, 0.95).unwrap();
    let err = mape(&true_rates(history.len(), 168, 60, base), &f.mean);
    assert!(err < 5.0, "MAPE over the next week {err:.2}%");
}

#[test]
fn nan_gaps_are_bridged_and_the_forecast_stays_accurate() {
    let base = 5000.0;
    let mut history = common::daily_weekly(21, 60, base, 2);
    // Every 7th point missing, a 10-hour outage, junk values.
    for (i, v) in history.iter_mut().enumerate() {
        if i % 7 == 3 {
            *v = f64::NAN;
        }
    }
    for v in &mut history[300..310] {
        *v = f64::NAN;
    }
    history[400] = -5.0;
    history[401] = f64::INFINITY;
    let mut model = hourly().fit(&history, ModelKind::MstlEts).unwrap();
    let f = model.predict(24, 0.95).unwrap();
    assert!(f.mean.iter().chain(&f.upper).all(|v| v.is_finite()));
    let err = mape(&true_rates(history.len(), 24, 60, base), &f.mean);
    assert!(err < 5.0, "MAPE with gaps {err:.2}%");
    // A gap in the live stream too: two missing hours, then a forecast.
    model.update(&[f64::NAN, f64::NAN]).unwrap();
    let f = model.predict(24, 0.95).unwrap();
    let err = mape(&true_rates(history.len() + 2, 24, 60, base), &f.mean);
    assert!(err < 5.0, "MAPE after a live gap {err:.2}%");
}

#[test]
fn history_shorter_than_a_period_falls_back_without_error() {
    // Twelve hours of one-minute data: no full day.
    let rates = vec![300.0; 720];
    let history = common::poisson_series(&rates, 3);
    let fc = Forecaster::new(ForecastConfig::default()).unwrap();
    for kind in ModelKind::ALL {
        let model = fc.fit(&history, kind).unwrap();
        assert!(matches!(model.kind(), ModelKind::Ewma | ModelKind::Holt), "{kind} fell back to {}", model.kind());
        let f = model.predict(60, 0.95).unwrap();
        let err = mape(&rates[..60], &f.mean);
        assert!(err < 5.0, "{kind}: MAPE {err:.2}%");
        assert!(f.lower.iter().zip(&f.upper).all(|(l, u)| l <= u));
    }
    // One point is still a forecast.
    let model = fc.fit(&[42.0], ModelKind::MstlEts).unwrap();
    assert_eq!(model.predict(3, 0.9).unwrap().mean, vec![42.0; 3]);
}

#[test]
fn an_all_zero_series_forecasts_zeros() {
    let mut history = vec![0.0; 3 * 1440];
    history[100] = f64::NAN;
    let fc = Forecaster::new(ForecastConfig::default()).unwrap();
    for kind in ModelKind::ALL {
        let model = fc.fit(&history, kind).unwrap();
        let f = model.predict(1440, 0.95).unwrap();
        assert!(f.mean.iter().chain(&f.lower).chain(&f.upper).all(|&v| v == 0.0), "{kind}");
        assert_eq!(f.peak(1440), 0.0);
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let fc = Forecaster::new(ForecastConfig::default()).unwrap();
    assert!(matches!(fc.fit(&[], ModelKind::MstlEts), Err(Error::EmptyHistory { len: 0 })));
    assert!(matches!(fc.fit(&[f64::NAN, -1.0], ModelKind::Ewma), Err(Error::EmptyHistory { len: 2 })));
    let model = fc.fit(&[1.0, 2.0, 3.0], ModelKind::Holt).unwrap();
    assert!(model.predict(5, 1.5).is_err());
    assert!(model.predict(5, f64::NAN).is_err());
    assert!(Forecaster::new(ForecastConfig::with_step_min(0)).is_err());
}

#[test]
fn intervals_are_calibrated_on_a_stationary_seasonal_series() {
    // Backtest a day ahead over the fourth week: 95% bands cover 90–98%.
    let history = common::daily_weekly(28, 60, 800.0, 4);
    let mut bt = BacktestConfig::new(21 * 24, 24, 60);
    bt.origin_stride_steps = 6;
    let run = backtest(&history, ModelKind::MstlEts, &hourly(), &bt).unwrap();
    let s = run.score;
    assert!((0.90..=0.98).contains(&s.coverage), "coverage {:.3} over {} points", s.coverage, s.points);
    assert!(s.peak_capture >= 0.9, "peak capture {:.3}", s.peak_capture);
    assert!(s.mase < 0.8, "MASE {:.3}", s.mase);
}

#[test]
fn after_a_level_shift_the_backtest_choice_adapts_within_a_day() {
    // Ten-minute steps, six days at one level, then the load doubles.
    let step_min = 10;
    let day = 144;
    let shift = 6 * day;
    let rates: Vec<f64> = (0..8 * day)
        .map(|t| {
            let r = common::seasonal_rate(t, step_min, 600.0, 0.5, 1.0);
            if t >= shift {
                2.0 * r
            } else {
                r
            }
        })
        .collect();
    let series = common::poisson_series(&rates, 5);
    let fc = Forecaster::new(ForecastConfig::with_step_min(step_min as u32)).unwrap();
    let schedule = ScheduleConfig {
        refit_every_min: 360,
        reselect_every_min: 360,
        selection_span_min: 720,
        selection_horizon_min: 60,
        ..ScheduleConfig::default()
    };
    let mut classes = ClassForecaster::new(fc, schedule);
    // Drive the schedule every hour from a day before the shift to a day after.
    let mut last = 0;
    let mut errors_after_a_day = Vec::new();
    for t in (shift - day..=shift + day).step_by(6) {
        let now_min = (t * step_min) as u64;
        if classes.needs_refit("SS", now_min) {
            classes.refit("SS", &series[..t], now_min).unwrap();
        } else {
            classes.observe("SS", &series[last..t]).unwrap();
        }
        last = t;
        if t >= shift + day / 2 {
            let f = classes.forecast("SS", 6, 0.95).unwrap().unwrap();
            errors_after_a_day.push(mape(&rates[t..t + 6], &f.mean));
        }
    }
    let worst = errors_after_a_day.iter().cloned().fold(0.0, f64::max);
    assert!(worst < 10.0, "worst hour-ahead MAPE from 12 h after the shift: {worst:.2}% ({errors_after_a_day:?})");
    let chosen = classes.class("SS").unwrap().kind;
    assert_ne!(chosen, ModelKind::SeasonalNaive, "still seasonal-naive a day after");
    // The schedule says when: not due right after a refit, due 6 h later.
    let now = ((shift + day) * step_min) as u64;
    assert!(!classes.needs_refit("SS", classes.class("SS").unwrap().fitted_at_min));
    assert!(classes.needs_refit("SS", now + 360));
    assert!(classes.needs_refit("unknown", now));
}
