//! Per-class model choice and refit schedule: which model each request class
//! uses, when to refit it and when to choose again. No timers: the caller
//! asks [`ClassForecaster::needs_refit`] with its own clock.

use std::collections::BTreeMap;

use crate::backtest::{select_by_backtest, BacktestConfig, BacktestScore};
use crate::error::Result;
use crate::forecaster::{FittedModel, Forecast, Forecaster};
use crate::models::ModelKind;

/// When to refit and how to choose.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// Refit a class's model this often, minutes.
    pub refit_every_min: u64,
    /// Choose the model again (by backtest) this often, minutes.
    pub reselect_every_min: u64,
    /// Recent history the choice is backtested on, minutes.
    pub selection_span_min: u32,
    /// Horizon the choice is scored on, minutes.
    pub selection_horizon_min: u32,
    /// Models to choose from.
    pub candidates: Vec<ModelKind>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            refit_every_min: 60,
            reselect_every_min: 360,
            selection_span_min: 1440,
            selection_horizon_min: 30,
            candidates: ModelKind::ALL.to_vec(),
        }
    }
}

/// One class's state.
#[derive(Debug, Clone)]
pub struct ClassState {
    /// The chosen kind.
    pub kind: ModelKind,
    /// The fitted model, advanced by observations since.
    pub model: FittedModel,
    /// When it was fitted (caller's minutes).
    pub fitted_at_min: u64,
    /// When the kind was chosen (caller's minutes).
    pub selected_at_min: u64,
    /// Scores of the last choice (empty when no choice was possible yet).
    pub scores: Vec<BacktestScore>,
}

/// Per-class forecasters with their model choices.
#[derive(Debug, Clone)]
pub struct ClassForecaster {
    forecaster: Forecaster,
    schedule: ScheduleConfig,
    classes: BTreeMap<String, ClassState>,
}

impl ClassForecaster {
    /// A set of class forecasters sharing one configuration.
    pub fn new(forecaster: Forecaster, schedule: ScheduleConfig) -> ClassForecaster {
        ClassForecaster { forecaster, schedule, classes: BTreeMap::new() }
    }

    /// True when `class` has no model yet or its model is older than the
    /// refit period at `now_min`.
    pub fn needs_refit(&self, class: &str, now_min: u64) -> bool {
        match self.classes.get(class) {
            None => true,
            Some(s) => now_min.saturating_sub(s.fitted_at_min) >= self.schedule.refit_every_min,
        }
    }

    /// The known classes due for a refit at `now_min`.
    pub fn due(&self, now_min: u64) -> Vec<String> {
        self.classes.keys().filter(|c| self.needs_refit(c, now_min)).cloned().collect()
    }

    /// Refit `class` on its full `history` (one point per step, oldest
    /// first, ending at `now_min`), choosing the model again by backtest when
    /// the choice is due (or the class is new).
    pub fn refit(&mut self, class: &str, history: &[f64], now_min: u64) -> Result<&ClassState> {
        let cfg = &self.forecaster.config;
        let reselect = match self.classes.get(class) {
            None => true,
            Some(s) => now_min.saturating_sub(s.selected_at_min) >= self.schedule.reselect_every_min,
        };
        let (kind, selected_at, scores) = if reselect {
            let span = cfg.steps(self.schedule.selection_span_min);
            let horizon = cfg.steps(self.schedule.selection_horizon_min);
            let mut bt = BacktestConfig::new(history.len().saturating_sub(span), horizon, cfg.step_min);
            bt.origin_stride_steps = horizon;
            bt.refit_every_steps = usize::MAX;
            match select_by_backtest(history, &self.schedule.candidates, &self.forecaster, &bt) {
                Ok(sel) => (sel.best, now_min, sel.scores),
                // Not enough history to compare: the richest model, which
                // falls back on its own.
                Err(_) => (ModelKind::MstlEts, now_min, Vec::new()),
            }
        } else {
            let s = &self.classes[class];
            (s.kind, s.selected_at_min, s.scores.clone())
        };
        let model = self.forecaster.fit(history, kind)?;
        let state = ClassState { kind, model, fitted_at_min: now_min, selected_at_min: selected_at, scores };
        self.classes.insert(class.to_string(), state);
        Ok(&self.classes[class])
    }

    /// Advance `class` with new observations (no-op for an unknown class).
    pub fn observe(&mut self, class: &str, new_values: &[f64]) -> Result<()> {
        match self.classes.get_mut(class) {
            Some(s) => s.model.update(new_values),
            None => Ok(()),
        }
    }

    /// Forecast `class` (None for an unknown class).
    pub fn forecast(&self, class: &str, horizon_steps: usize, level: f64) -> Option<Result<Forecast>> {
        self.classes.get(class).map(|s| s.model.predict(horizon_steps, level))
    }

    /// One class's state.
    pub fn class(&self, class: &str) -> Option<&ClassState> {
        self.classes.get(class)
    }
}
