//! What the plan minimises. By default energy alone; an [`Objective`] adds
//! the GPUs held, weighed against energy at each hour, so that a plan may
//! spend more energy on fewer GPUs where GPU-hours cost more than the energy
//! they save (a GPU-hour price, or the embodied carbon of the hardware held),
//! and the other way round.
//!
//! The loops see one number per moment: what one GPU held weighs, in watts of
//! GPU power (`gpu_w`). A pool's plan then minimises `power_w + gpu_w × GPUs`
//! in place of `power_w`. The number follows from the objective's prices
//! (`cost`: the GPU-hour price against the time-of-use tariff; `carbon`: the
//! embodied carbon of a GPU-hour against the grid's intensity) and changes
//! with the hour; the plan takes its mean over the coming scale period, the
//! horizon it plans for. The clock loop, which changes no GPU count, is the
//! same under every objective.

use serde::Serialize;

/// A plan objective: the weight of a GPU held, in watts, hour by hour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Objective {
    /// `energy`, `cost`, `carbon` or `weights`.
    pub name: String,
    /// The prices behind the weights, in words (for the decisions' reasons).
    pub terms: String,
    /// Length of one step of `gpu_w` (s).
    pub step_s: f64,
    /// The weight of one GPU held (W), one value per step from the controller's time zero; the
    /// steps repeat after the last (a week of hours stands for any week).
    pub gpu_w: Vec<f64>,
}

impl Objective {
    /// Energy alone: today's behaviour.
    pub fn energy() -> Objective {
        Objective { name: "energy".into(), terms: "energy alone".into(), step_s: 3600.0, gpu_w: vec![0.0] }
    }

    /// Whether GPUs weigh anything at any hour.
    pub fn weighs_gpus(&self) -> bool {
        self.gpu_w.iter().any(|&w| w > 0.0)
    }

    /// The weight at controller time `t_s` (W per GPU).
    pub fn gpu_w_at(&self, t_s: f64) -> f64 {
        if self.gpu_w.is_empty() {
            return 0.0;
        }
        let k = (t_s / self.step_s.max(1e-9)).floor();
        let n = self.gpu_w.len() as f64;
        self.gpu_w[k.rem_euclid(n) as usize]
    }

    /// The time-mean weight over `[from_s, to_s]` (W per GPU).
    pub fn gpu_w_over(&self, from_s: f64, to_s: f64) -> f64 {
        if to_s <= from_s || self.step_s <= 0.0 {
            return self.gpu_w_at(from_s);
        }
        let mut t = from_s;
        let mut sum = 0.0;
        while t < to_s {
            let next = (((t / self.step_s).floor() + 1.0) * self.step_s).min(to_s);
            sum += self.gpu_w_at(t) * (next - t);
            t = next;
        }
        sum / (to_s - from_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_steps_repeats_and_averages_over_the_horizon() {
        let o = Objective { name: "cost".into(), terms: String::new(), step_s: 3600.0, gpu_w: vec![10.0, 30.0] };
        assert_eq!(o.gpu_w_at(0.0), 10.0);
        assert_eq!(o.gpu_w_at(3600.0), 30.0);
        assert_eq!(o.gpu_w_at(7200.0 + 5.0), 10.0, "the steps repeat");
        assert!((o.gpu_w_over(1800.0, 5400.0) - 20.0).abs() < 1e-9);
        assert!((o.gpu_w_over(0.0, 1800.0) - 10.0).abs() < 1e-9);
        assert!(!Objective::energy().weighs_gpus());
        assert_eq!(Objective::energy().gpu_w_over(0.0, 1e6), 0.0);
    }
}
