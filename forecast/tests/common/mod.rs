//! Seeded synthetic load series shared by the tests and the bench.
#![allow(dead_code)]

use rand::SeedableRng;
use rand_distr::{Distribution, Poisson};
use rand_pcg::Pcg64Mcg;

/// Expected requests per step of a daily + weekly pattern: a daily peak in
/// the afternoon at `1 + daily_amp` times the base, weekends at `weekend`
/// times weekdays.
pub fn seasonal_rate(step: usize, step_min: usize, base: f64, daily_amp: f64, weekend: f64) -> f64 {
    let minute = (step * step_min) as f64;
    let day_frac = (minute % 1440.0) / 1440.0;
    let day = ((minute / 1440.0) as usize) % 7;
    let daily = 1.0 + daily_amp * (2.0 * std::f64::consts::PI * (day_frac - 0.35)).cos();
    let weekly = if day >= 5 { weekend } else { 1.0 };
    base * daily * weekly
}

/// The rate sampled as Poisson counts, seeded.
pub fn poisson_series(rates: &[f64], seed: u64) -> Vec<f64> {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    rates
        .iter()
        .map(|&r| if r <= 0.0 { 0.0 } else { Poisson::new(r).map(|d| d.sample(&mut rng)).unwrap_or(r) })
        .collect()
}

/// `days` of a daily + weekly Poisson series with `step_min` steps.
pub fn daily_weekly(days: usize, step_min: usize, base: f64, seed: u64) -> Vec<f64> {
    let n = days * 1440 / step_min;
    let rates: Vec<f64> = (0..n).map(|t| seasonal_rate(t, step_min, base, 0.6, 0.4)).collect();
    poisson_series(&rates, seed)
}
