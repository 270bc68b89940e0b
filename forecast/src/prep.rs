//! Input preparation: turns a raw load series (NaN gaps, negative or infinite
//! junk allowed) into a clean, gap-free series in a variance-stabilised space,
//! and back.

use crate::error::{Error, Result};

/// Variance-stabilising transform applied before modelling. Counts (requests
/// per minute) have a variance that grows with their level; in the
/// transformed space errors are roughly the same size at peak and valley.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transform {
    /// `sqrt(y)`: stabilises pure Poisson counts.
    Sqrt,
    /// `ln(1 + y)`: stabilises bursty load whose spread is proportional to
    /// its level (production traffic, tokens per minute); the default.
    #[default]
    Log1p,
    /// No transform.
    Identity,
}

impl Transform {
    /// Into the modelling space. `y` must be finite and not negative.
    pub fn forward(self, y: f64) -> f64 {
        match self {
            Transform::Sqrt => y.max(0.0).sqrt(),
            Transform::Log1p => y.max(0.0).ln_1p(),
            Transform::Identity => y,
        }
    }

    /// Back to load units; never negative.
    pub fn inverse(self, z: f64) -> f64 {
        let y = match self {
            Transform::Sqrt => {
                let z = z.max(0.0);
                z * z
            }
            Transform::Log1p => z.exp_m1(),
            Transform::Identity => z,
        };
        if y.is_finite() {
            y.max(0.0)
        } else if y > 0.0 {
            f64::MAX
        } else {
            0.0
        }
    }
}

/// A cleaned series in the transformed space.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    /// Gap-free transformed values.
    pub z: Vec<f64>,
    /// True where the input had a usable value (not a filled gap).
    pub observed: Vec<bool>,
    /// True when every usable value is zero.
    pub all_zero: bool,
}

/// A usable observation: finite and not negative.
pub(crate) fn usable(y: f64) -> bool {
    y.is_finite() && y >= 0.0
}

/// Clean `y`: unusable points (NaN, ±inf, negative) become gaps, gaps are
/// filled by linear interpolation in the transformed space (held flat at the
/// ends). Errors only when no point is usable.
pub(crate) fn prepare(y: &[f64], transform: Transform) -> Result<Prepared> {
    let observed: Vec<bool> = y.iter().map(|&v| usable(v)).collect();
    let first = observed.iter().position(|&o| o).ok_or(Error::EmptyHistory { len: y.len() })?;
    let mut z: Vec<f64> = y.iter().map(|&v| if usable(v) { transform.forward(v) } else { f64::NAN }).collect();
    interpolate_gaps(&mut z, first);
    let all_zero = y.iter().all(|&v| !usable(v) || v == 0.0);
    Ok(Prepared { z, observed, all_zero })
}

/// Fill NaNs linearly between neighbours; flat before `first` and after the
/// last value.
fn interpolate_gaps(z: &mut [f64], first: usize) {
    let head = z[first];
    for v in &mut z[..first] {
        *v = head;
    }
    let mut last = first;
    let mut i = first + 1;
    while i < z.len() {
        if z[i].is_nan() {
            i += 1;
            continue;
        }
        if i > last + 1 {
            let (a, b) = (z[last], z[i]);
            let span = (i - last) as f64;
            for (k, v) in z.iter_mut().enumerate().take(i).skip(last + 1) {
                *v = a + (b - a) * (k - last) as f64 / span;
            }
        }
        last = i;
        i += 1;
    }
    let tail = z[last];
    for v in &mut z[last + 1..] {
        *v = tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_filled_linearly_and_ends_held_flat() {
        let p = prepare(&[f64::NAN, 4.0, f64::NAN, -1.0, 16.0, f64::INFINITY], Transform::Sqrt).unwrap();
        let want = [2.0, 2.0, 8.0 / 3.0, 10.0 / 3.0, 4.0, 4.0];
        assert!(p.z.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{:?}", p.z);
        assert_eq!(p.observed, vec![false, true, false, false, true, false]);
    }

    #[test]
    fn nothing_usable_is_an_error() {
        assert!(matches!(prepare(&[f64::NAN, -3.0], Transform::Sqrt), Err(Error::EmptyHistory { len: 2 })));
        assert!(prepare(&[], Transform::Sqrt).is_err());
    }

    #[test]
    fn transforms_round_trip_and_never_go_negative() {
        for t in [Transform::Sqrt, Transform::Log1p, Transform::Identity] {
            assert!((t.inverse(t.forward(123.0)) - 123.0).abs() < 1e-9);
            assert!(t.inverse(-5.0) >= 0.0);
        }
    }
}
