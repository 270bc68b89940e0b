//! Point models in the transformed space: seasonal-naive (the reference),
//! EWMA and damped Holt (short-history fallbacks), and MSTL + AutoETS (augurs)
//! for seasonal history. Each fits on a clean series, advances its state with
//! new observations without a full refit, and gives point forecasts; the
//! intervals are added elsewhere ([`crate::calibrate`]).

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

use augurs_core::{Fit, Predict};
use augurs_ets::AutoETS;
use augurs_mstl::stlrs::MstlParams;

use crate::error::{Error, Result};

/// The forecasting models this crate offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelKind {
    /// The value one day earlier (the reference every backtest reports).
    SeasonalNaive,
    /// Exponentially weighted moving average of the level (no season).
    Ewma,
    /// Holt's damped-trend exponential smoothing (no season).
    Holt,
    /// MSTL decomposition (daily, plus weekly with two weeks of history) with
    /// an AutoETS trend on the deseasonalised series (augurs).
    MstlEts,
}

impl ModelKind {
    /// Every kind, reference first.
    pub const ALL: [ModelKind; 4] = [ModelKind::SeasonalNaive, ModelKind::Ewma, ModelKind::Holt, ModelKind::MstlEts];

    /// Stable name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::SeasonalNaive => "seasonal_naive",
            ModelKind::Ewma => "ewma",
            ModelKind::Holt => "holt",
            ModelKind::MstlEts => "mstl_ets",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelKind::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(s)).ok_or_else(|| Error::Config {
            field: "model",
            message: format!("`{s}` is not a model; expected one of {}", ModelKind::ALL.map(|k| k.name()).join(", ")),
        })
    }
}

/// Parameters of the point models, in steps (already converted from minutes).
#[derive(Debug, Clone)]
pub(crate) struct ModelParams {
    pub daily_steps: usize,
    pub weekly_steps: usize,
    pub weekly_min_history_steps: usize,
    pub mstl_max_history_steps: usize,
    pub trend_window_steps: usize,
    pub seasonal_smoothing_steps: usize,
    pub fallback_window_steps: usize,
}

/// A fitted point model with its running state.
#[derive(Debug, Clone)]
pub(crate) enum PointModel {
    /// Every forecast is zero (a class with no traffic).
    Zero,
    /// `z[t + h - k * period]`, the most recent value at the same phase.
    SeasonalNaive {
        period: usize,
        /// The last `period` values, oldest first.
        last: VecDeque<f64>,
    },
    /// Level-only exponential smoothing.
    Ewma { alpha: f64, level: f64 },
    /// Damped-trend exponential smoothing.
    Holt { alpha: f64, beta: f64, phi: f64, level: f64, slope: f64 },
    /// Seasonal profiles from MSTL plus an ETS model of the rest.
    MstlEts(Box<MstlEts>),
}

/// MSTL + ETS state.
#[derive(Clone)]
pub(crate) struct MstlEts {
    /// (period, smoothed profile of the last period; `profile[j]` is the
    /// season at absolute step `anchor + j` modulo the period).
    seasons: Vec<(usize, Vec<f64>)>,
    anchor: usize,
    /// Absolute index of the next step.
    next_step: usize,
    /// The trend: augurs' AutoETS fit, continued step by step.
    ets: EtsState,
    /// The form augurs chose, for reports.
    ets_form: String,
}

/// Damped-trend exponential smoothing state and parameters (ETS(A,Ad,N);
/// `beta = 0`, `slope = 0` is ETS(A,N,N)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct EtsState {
    pub alpha: f64,
    pub beta: f64,
    pub phi: f64,
    pub level: f64,
    pub slope: f64,
}

impl EtsState {
    fn step(&mut self, y: f64) {
        let f = self.level + self.phi * self.slope;
        let e = y - f;
        self.level = f + self.alpha * e;
        self.slope = self.phi * self.slope + self.beta * e;
    }

    fn forecast(&self, horizon: usize) -> Vec<f64> {
        let mut acc = 0.0;
        let mut ph = 1.0;
        (0..horizon)
            .map(|_| {
                ph *= self.phi;
                acc += ph;
                self.level + acc * self.slope
            })
            .collect()
    }
}

impl fmt::Debug for MstlEts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MstlEts")
            .field("periods", &self.seasons.iter().map(|s| s.0).collect::<Vec<_>>())
            .field("next_step", &self.next_step)
            .field("ets", &self.ets_form)
            .finish()
    }
}

impl MstlEts {
    fn season_at(&self, step: usize) -> f64 {
        self.seasons
            .iter()
            .map(|(p, prof)| {
                let j = (step as i64 - self.anchor as i64).rem_euclid(*p as i64) as usize;
                prof[j]
            })
            .sum()
    }
}

/// Fit the trend: augurs AutoETS with additive error and a damped additive
/// trend (AAdN; the damping keeps day-ahead forecasts from running away, and
/// a near-zero trend smoothing recovers simple exponential smoothing). The
/// fitted parameters are read back from augurs' one-step in-sample fit and
/// its forecast so that the state can be advanced without refitting.
fn fit_ets(y: &[f64]) -> Result<(EtsState, String)> {
    let model = AutoETS::new(1, "AZN").and_then(|m| m.damped(true)).map_err(|e| Error::Ets(e.to_string()))?;
    let fit = model.fit(y).map_err(|e| Error::Ets(e.to_string()))?;
    let form = format!("{}{}", fit.model().model_type(), if fit.model().damped() { " damped" } else { "" });
    let fitted = fit.predict_in_sample(None).map_err(|e| Error::Ets(e.to_string()))?.point;
    let ahead = fit.predict(3, None).map_err(|e| Error::Ets(e.to_string()))?.point;
    let state =
        recover_ets(y, &fitted, &ahead).ok_or_else(|| Error::Ets("could not read back the ETS parameters".into()))?;
    Ok((state, form))
}

/// Read ETS(A,Ad,N) parameters and the end state from one-step fitted values
/// `f` of `y` and the first three out-of-sample forecasts.
///
/// With e_t = y_t - f_t and Δ_t = f_(t+1) - f_t the model gives
/// Δ_(t+1) = φ Δ_t + c e_(t+1) + d e_t with c = α + φβ and d = φ²β - φc, a
/// linear regression that is exact for a model of this form.
fn recover_ets(y: &[f64], f: &[f64], ahead: &[f64]) -> Option<EtsState> {
    let n = y.len().min(f.len());
    if n < 8 || ahead.len() < 3 || ahead.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let e: Vec<f64> = (0..n).map(|t| y[t] - f[t]).collect();
    let d: Vec<f64> = (0..n - 1).map(|t| f[t + 1] - f[t]).collect();
    // Normal equations for [φ, c, dd].
    let mut a = [[0.0f64; 3]; 3];
    let mut b = [0.0f64; 3];
    for t in 0..n.saturating_sub(2) {
        let x = [d[t], e[t + 1], e[t]];
        let target = d[t + 1];
        if x.iter().chain([&target]).any(|v| !v.is_finite()) {
            continue;
        }
        for i in 0..3 {
            for j in 0..3 {
                a[i][j] += x[i] * x[j];
            }
            b[i] += x[i] * target;
        }
    }
    let (l1, l2, l3) = (ahead[0], ahead[1], ahead[2]);
    let solved = solve3(a, b).filter(|s| s[0] > 0.05 && s[0] <= 1.0 + 1e-9);
    let (phi, alpha, beta) = match solved {
        Some([phi, c, dd]) => {
            let beta = (dd + phi * c) / (phi * phi);
            (phi, c - phi * beta, beta)
        }
        None => {
            // No trend information: simple exponential smoothing, Δ_t = α e_t.
            let (num, den) = (0..n - 1).fold((0.0, 0.0), |(nu, de), t| (nu + d[t] * e[t], de + e[t] * e[t]));
            let alpha = if den > 0.0 { num / den } else { 0.1 };
            return Some(EtsState { alpha: alpha.clamp(1e-4, 1.0), beta: 0.0, phi: 1.0, level: l1, slope: 0.0 });
        }
    };
    // End state from the forecast: l + φb, l + (φ+φ²)b, ...
    let slope = if phi > 0.0 { (l2 - l1) / (phi * phi) } else { 0.0 };
    let _ = l3;
    let state =
        EtsState { alpha: alpha.clamp(1e-4, 1.0), beta: beta.clamp(0.0, 1.0), phi, level: l1 - phi * slope, slope };
    (state.alpha.is_finite() && state.level.is_finite() && state.slope.is_finite()).then_some(state)
}

/// Solve a 3×3 linear system by Gaussian elimination with pivoting; None
/// when (nearly) singular.
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    let scale = a.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    if scale == 0.0 || !scale.is_finite() {
        return None;
    }
    for col in 0..3 {
        let piv = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-10 * scale {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for r in col + 1..3 {
            let k = a[r][col] / a[col][col];
            let pivot_row = a[col];
            for (c, v) in a[r].iter_mut().enumerate().skip(col) {
                *v -= k * pivot_row[c];
            }
            b[r] -= k * b[col];
        }
    }
    let mut x = [0.0; 3];
    for r in (0..3).rev() {
        let s: f64 = (r + 1..3).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// Centred circular moving average of odd width `w`.
fn smooth_circular(x: &[f64], w: usize) -> Vec<f64> {
    let n = x.len();
    if w <= 1 || n < w {
        return x.to_vec();
    }
    let half = w / 2;
    let mut out = vec![0.0; n];
    let mut sum: f64 = (0..w).map(|k| x[(n - half + k) % n]).sum();
    for (i, o) in out.iter_mut().enumerate() {
        *o = sum / w as f64;
        sum += x[(i + half + 1) % n] - x[(i + n - half) % n];
    }
    out
}

/// One-step squared error of EWMA with `alpha` over `z`.
fn ewma_sse(z: &[f64], alpha: f64) -> (f64, f64) {
    let mut level = z[0];
    let mut sse = 0.0;
    for &v in &z[1..] {
        let e = v - level;
        sse += e * e;
        level += alpha * e;
    }
    (sse, level)
}

/// One-step squared error of damped Holt over `z`; returns (sse, level, slope).
fn holt_run(z: &[f64], alpha: f64, beta: f64, phi: f64) -> (f64, f64, f64) {
    let mut level = z[0];
    let mut slope = if z.len() > 1 { z[1] - z[0] } else { 0.0 };
    let mut sse = 0.0;
    for &v in &z[1..] {
        let f = level + phi * slope;
        let e = v - f;
        sse += e * e;
        level = f + alpha * e;
        slope = phi * slope + beta * e;
    }
    (sse, level, slope)
}

const ALPHAS: [f64; 10] = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0];

impl PointModel {
    /// Fit `kind` to the clean transformed series `z` (non-empty). Falls back
    /// when the history is too short: MSTL needs two days, seasonal-naive one
    /// day, Holt three points; the fallback chain ends at EWMA, which fits any
    /// non-empty series. Returns the model and the kind actually fitted.
    pub fn fit(kind: ModelKind, z: &[f64], p: &ModelParams) -> (PointModel, ModelKind) {
        let mut kind = kind;
        loop {
            match Self::try_fit(kind, z, p) {
                Ok(m) => return (m, kind),
                Err(_) => {
                    kind = match kind {
                        ModelKind::MstlEts if z.len() >= p.daily_steps => ModelKind::SeasonalNaive,
                        ModelKind::MstlEts | ModelKind::SeasonalNaive => ModelKind::Holt,
                        _ => ModelKind::Ewma,
                    }
                }
            }
        }
    }

    fn try_fit(kind: ModelKind, z: &[f64], p: &ModelParams) -> Result<PointModel> {
        let n = z.len();
        match kind {
            ModelKind::SeasonalNaive => {
                let period = p.daily_steps.max(1);
                if n < period {
                    return Err(Error::TooShort { what: "seasonal-naive", needed_steps: period, got_steps: n });
                }
                Ok(PointModel::SeasonalNaive { period, last: z[n - period..].iter().copied().collect() })
            }
            ModelKind::Ewma => {
                let z = &z[n.saturating_sub(p.fallback_window_steps.max(2))..];
                if z.is_empty() {
                    return Err(Error::EmptyHistory { len: 0 });
                }
                let (alpha, level) = ALPHAS
                    .iter()
                    .map(|&a| {
                        let (sse, level) = ewma_sse(z, a);
                        (sse, a, level)
                    })
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, a, l)| (a, l))
                    .unwrap_or((1.0, z[z.len() - 1]));
                Ok(PointModel::Ewma { alpha, level })
            }
            ModelKind::Holt => {
                let z = &z[n.saturating_sub(p.fallback_window_steps.max(3))..];
                if z.len() < 3 {
                    return Err(Error::TooShort { what: "holt", needed_steps: 3, got_steps: z.len() });
                }
                let mut best = (f64::INFINITY, 1.0, 0.0, 0.9, z[z.len() - 1], 0.0);
                for &alpha in &ALPHAS {
                    for beta in [0.0, 0.001, 0.01, 0.05, 0.1] {
                        if beta > alpha {
                            continue;
                        }
                        for phi in [0.8, 0.9, 0.98] {
                            let (sse, level, slope) = holt_run(z, alpha, beta, phi);
                            if sse < best.0 {
                                best = (sse, alpha, beta, phi, level, slope);
                            }
                        }
                    }
                }
                let (_, alpha, beta, phi, level, slope) = best;
                Ok(PointModel::Holt { alpha, beta, phi, level, slope })
            }
            ModelKind::MstlEts => Self::fit_mstl(z, p),
        }
    }

    fn fit_mstl(z: &[f64], p: &ModelParams) -> Result<PointModel> {
        let n = z.len();
        let daily = p.daily_steps;
        if daily < 2 || n < 2 * daily {
            return Err(Error::TooShort { what: "MSTL (two daily periods)", needed_steps: 2 * daily, got_steps: n });
        }
        let mut periods = vec![daily];
        if p.weekly_steps >= 2 && n >= p.weekly_min_history_steps.max(2 * p.weekly_steps) {
            periods.push(p.weekly_steps);
        }
        let start = n.saturating_sub(p.mstl_max_history_steps.max(2 * daily));
        let y = &z[start..];
        let fit = MstlParams::new().fit(y, &periods).map_err(|e| Error::Mstl(e.to_string()))?;
        let w = p.seasonal_smoothing_steps | 1;
        let seasons: Vec<(usize, Vec<f64>)> = periods
            .iter()
            .zip(fit.seasonal())
            .map(|(&period, comp)| {
                let last = &comp[comp.len() - period..];
                (period, smooth_circular(last, w))
            })
            .collect();
        // Profiles are the last period of each component: profile[j] is the
        // season at absolute step n - period + j, i.e. index (step - n) mod
        // period with anchor n.
        let window_steps = p.trend_window_steps.max(16);
        let season_at = |t: usize| -> f64 {
            seasons.iter().map(|(p, prof)| prof[(t as i64 - n as i64).rem_euclid(*p as i64) as usize]).sum()
        };
        let from = n.saturating_sub(window_steps);
        let window: Vec<f64> = (from..n).map(|t| z[t] - season_at(t)).collect();
        let (ets, ets_form) = fit_ets(&window)?;
        let state = MstlEts { seasons, anchor: n, next_step: n, ets, ets_form };
        Ok(PointModel::MstlEts(Box::new(state)))
    }

    /// Advance the state by new clean transformed observations.
    pub fn update(&mut self, z_new: &[f64]) -> Result<()> {
        if z_new.is_empty() {
            return Ok(());
        }
        match self {
            PointModel::Zero => {}
            PointModel::SeasonalNaive { period, last } => {
                for &v in z_new {
                    last.push_back(v);
                    if last.len() > *period {
                        last.pop_front();
                    }
                }
            }
            PointModel::Ewma { alpha, level } => {
                for &v in z_new {
                    *level += *alpha * (v - *level);
                }
            }
            PointModel::Holt { alpha, beta, phi, level, slope } => {
                for &v in z_new {
                    let f = *level + *phi * *slope;
                    let e = v - f;
                    *level = f + *alpha * e;
                    *slope = *phi * *slope + *beta * e;
                }
            }
            PointModel::MstlEts(s) => {
                for &v in z_new {
                    let d = v - s.season_at(s.next_step);
                    s.ets.step(d);
                    s.next_step += 1;
                }
            }
        }
        Ok(())
    }

    /// Point forecasts for steps 1..=horizon in the transformed space.
    pub fn point(&self, horizon: usize) -> Result<Vec<f64>> {
        Ok(match self {
            PointModel::Zero => vec![0.0; horizon],
            PointModel::SeasonalNaive { period, last } => (0..horizon).map(|h| last[h % *period]).collect(),
            PointModel::Ewma { level, .. } => vec![*level; horizon],
            PointModel::Holt { phi, level, slope, .. } => {
                let mut acc = 0.0;
                let mut ph = 1.0;
                (0..horizon)
                    .map(|_| {
                        ph *= *phi;
                        acc += ph;
                        *level + acc * *slope
                    })
                    .collect()
            }
            PointModel::MstlEts(s) => {
                s.ets.forecast(horizon).into_iter().enumerate().map(|(h, t)| t + s.season_at(s.next_step + h)).collect()
            }
        })
    }

    /// Human description (model form), for reports.
    pub fn describe(&self) -> String {
        match self {
            PointModel::Zero => "zero".into(),
            PointModel::SeasonalNaive { period, .. } => format!("seasonal-naive(period {period})"),
            PointModel::Ewma { alpha, .. } => format!("ewma(alpha {alpha})"),
            PointModel::Holt { alpha, beta, phi, .. } => format!("holt(alpha {alpha}, beta {beta}, phi {phi})"),
            PointModel::MstlEts(s) => format!(
                "mstl(periods {:?}) + ets {} (alpha {:.3}, beta {:.4}, phi {:.3})",
                s.seasons.iter().map(|x| x.0).collect::<Vec<_>>(),
                s.ets_form,
                s.ets.alpha,
                s.ets.beta,
                s.ets.phi
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circular_smoothing_keeps_the_mean_and_wraps() {
        let x = [0.0, 0.0, 3.0, 0.0, 0.0, 3.0];
        let s = smooth_circular(&x, 3);
        assert_eq!(s, vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn ets_parameters_are_read_back_exactly() {
        // Generate one-step fitted values from a known ETS(A,Ad,N).
        let truth = EtsState { alpha: 0.3, beta: 0.05, phi: 0.9, level: 10.0, slope: 0.5 };
        let mut st = truth;
        let mut s = 7u64;
        let (mut y, mut f) = (Vec::new(), Vec::new());
        for _ in 0..200 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let noise = ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5;
            let fc = st.level + st.phi * st.slope;
            f.push(fc);
            y.push(fc + noise);
            st.step(fc + noise);
        }
        let ahead = st.forecast(3);
        let got = recover_ets(&y, &f, &ahead).unwrap();
        for (a, b) in [
            (got.alpha, st.alpha),
            (got.beta, st.beta),
            (got.phi, st.phi),
            (got.level, st.level),
            (got.slope, st.slope),
        ] {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {st:?}");
        }
    }
}
