//! forecast: per-class load forecasts with calibrated intervals (MSTL + ETS
//! via augurs, with seasonal-naive, Holt and EWMA fallbacks) and their
//! backtests. Pure: takes plain series, does no I/O.
//!
//! - [`Forecaster::fit`] fits one [`ModelKind`] to a series (one point per
//!   `step_min`, NaN for gaps) and returns a [`FittedModel`];
//! - [`FittedModel::update`] advances it with new observations,
//!   [`FittedModel::predict`] gives a [`Forecast`] (mean, lower, upper per
//!   step) and [`Forecast::peak`] the bound on the horizon maximum;
//! - [`backtest`] scores a model by rolling origin, [`select_by_backtest`]
//!   chooses one;
//! - [`ClassForecaster`] holds each class's choice and says when to refit.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backtest;
mod calibrate;
pub mod classes;
pub mod error;
pub mod forecaster;
pub mod models;
pub mod prep;
pub mod schedule;

pub use backtest::{
    backtest, seasonal_naive_mae, select_by_backtest, BacktestConfig, BacktestRun, BacktestScore, Selection,
};
pub use classes::{ClassForecasts, Demand, MinuteCounts};
pub use error::{Error, Result};
pub use forecaster::{FittedModel, Forecast, ForecastConfig, Forecaster};
pub use models::ModelKind;
pub use prep::Transform;
pub use schedule::{ClassForecaster, ClassState, ScheduleConfig};
