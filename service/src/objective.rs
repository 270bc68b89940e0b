//! The plan's objective from prices: `[objective]` in the service config and
//! `sim --objective`. One builder for both.
//!
//! An objective weighs four quantities of a run: GPU energy (kWh), GPU-hours,
//! carbon (kg, operational at the grid's intensity plus the embodied share of
//! the GPUs held) and cost ($, GPU rental plus energy at the time-of-use
//! tariff). The presets: `energy` (energy alone, the default), `cost` (cost,
//! plus carbon at `carbon_usd_per_t` where given), `carbon` (carbon). Explicit
//! weights name any mix (`energy_kwh=1,gpu_hours=0.2`).
//!
//! The controller sees what one GPU held weighs in watts of GPU power, hour by
//! hour: the objective's price of a GPU-second over its price of a joule of
//! GPU energy at that hour (facility energy is GPU energy × PUE).

use anyhow::{bail, Result};
use controller::control::Objective;
use dashboards::accounting::{embodied_g, tariff_usd_per_kwh, J_PER_KWH};
use dashboards::config::AccountingConfig;
use dashboards::intensity::IntensitySeries;
use serde::Deserialize;
use std::time::Duration;

use crate::config::ServiceConfig;

/// What one GPU may weigh at most (W): an objective of GPU-hours alone (no energy term)
/// weighs a GPU as this, so that power only breaks ties between mixes of as many GPUs.
pub const MAX_GPU_W: f64 = 1e6;

/// The largest weight or carbon price taken (a guard against typos such as `1e300`).
pub const MAX_WEIGHT: f64 = 1e6;

/// An objective as configured: the weight of each quantity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectiveWeights {
    /// Per kWh of GPU energy.
    pub energy_kwh: f64,
    /// Per GPU-hour held.
    pub gpu_hours: f64,
    /// Per kg of carbon (operational + embodied).
    pub carbon_kg: f64,
    /// Per $ of cost (GPU rental + energy).
    pub cost_usd: f64,
}

/// `[objective]` in the service config.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveSection {
    /// `energy` (default), `cost`, `carbon`, or `weights` (the four weights below).
    pub kind: Option<String>,
    /// A price of carbon ($ per tonne) added to `cost`.
    pub carbon_usd_per_t: Option<f64>,
    /// For `kind = "weights"`: per kWh of GPU energy.
    pub energy_kwh: Option<f64>,
    /// For `kind = "weights"`: per GPU-hour.
    pub gpu_hours: Option<f64>,
    /// For `kind = "weights"`: per kg of carbon.
    pub carbon_kg: Option<f64>,
    /// For `kind = "weights"`: per $ of cost.
    pub cost_usd: Option<f64>,
}

/// A named objective: its name and weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveSpec {
    /// `energy`, `cost`, `carbon` or `weights`.
    pub name: String,
    /// The weights.
    pub weights: ObjectiveWeights,
}

fn checked(key: &str, v: f64) -> Result<f64> {
    if !(0.0..=MAX_WEIGHT).contains(&v) {
        let shown = if v.abs() >= 1e9 { format!("{v:e}") } else { format!("{v}") };
        bail!("{key} must be in [0, {MAX_WEIGHT:e}], got {shown}");
    }
    Ok(v)
}

impl ObjectiveSpec {
    /// Energy alone.
    pub fn energy() -> ObjectiveSpec {
        ObjectiveSpec::preset("energy", None).expect("a preset")
    }

    /// A preset by name (`energy`, `cost`, `carbon`), with an optional carbon price ($/t) for `cost`.
    pub fn preset(name: &str, carbon_usd_per_t: Option<f64>) -> Result<ObjectiveSpec> {
        let price = checked("carbon_usd_per_t", carbon_usd_per_t.unwrap_or(0.0))?;
        let w = |energy_kwh, carbon_kg, cost_usd| ObjectiveWeights { energy_kwh, gpu_hours: 0.0, carbon_kg, cost_usd };
        let weights = match name.trim() {
            "energy" => w(1.0, 0.0, 0.0),
            "cost" => w(0.0, price / 1000.0, 1.0),
            "carbon" => w(0.0, 1.0, 0.0),
            other => bail!(
                "`{other}` is not an objective: energy, cost, carbon, or weights such as energy_kwh=1,gpu_hours=0.2"
            ),
        };
        if carbon_usd_per_t.is_some() && name.trim() != "cost" {
            bail!(
                "a carbon price applies to the cost objective only (it prices carbon in $), not to `{}`",
                name.trim()
            );
        }
        Ok(ObjectiveSpec { name: name.trim().to_string(), weights })
    }

    /// `energy_kwh=W,gpu_hours=W,carbon_kg=W,cost_usd=W` (any of them; the rest 0).
    pub fn parse_weights(text: &str) -> Result<ObjectiveSpec> {
        let mut w = ObjectiveWeights { energy_kwh: 0.0, gpu_hours: 0.0, carbon_kg: 0.0, cost_usd: 0.0 };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                bail!("`{part}` is not KEY=WEIGHT (keys: energy_kwh, gpu_hours, carbon_kg, cost_usd)");
            };
            let v: f64 = v.trim().parse().map_err(|_| anyhow::anyhow!("`{part}`: `{}` is not a number", v.trim()))?;
            let slot = match k.trim() {
                "energy_kwh" => &mut w.energy_kwh,
                "gpu_hours" => &mut w.gpu_hours,
                "carbon_kg" => &mut w.carbon_kg,
                "cost_usd" => &mut w.cost_usd,
                other => bail!("`{other}` is not a weight: energy_kwh, gpu_hours, carbon_kg or cost_usd"),
            };
            *slot = checked(k.trim(), v)?;
        }
        if w.energy_kwh + w.gpu_hours + w.carbon_kg + w.cost_usd <= 0.0 {
            bail!("`{text}`: at least one weight must be above 0");
        }
        Ok(ObjectiveSpec { name: "weights".into(), weights: w })
    }

    /// A `sim --objective` word: a preset name or a weights list.
    pub fn parse(text: &str, carbon_usd_per_t: Option<f64>) -> Result<ObjectiveSpec> {
        if text.contains('=') {
            if carbon_usd_per_t.is_some() {
                bail!("a carbon price goes with the cost objective; with weights, weigh carbon_kg instead");
            }
            ObjectiveSpec::parse_weights(text)
        } else {
            ObjectiveSpec::preset(text, carbon_usd_per_t)
        }
    }

    /// The service config's `[objective]`.
    pub fn of_section(s: &ObjectiveSection) -> Result<ObjectiveSpec> {
        let any_weight = [s.energy_kwh, s.gpu_hours, s.carbon_kg, s.cost_usd].iter().any(Option::is_some);
        match s.kind.as_deref().unwrap_or("energy") {
            "weights" => {
                let mut w = ObjectiveWeights { energy_kwh: 0.0, gpu_hours: 0.0, carbon_kg: 0.0, cost_usd: 0.0 };
                for (k, v, slot) in [
                    ("energy_kwh", s.energy_kwh, &mut w.energy_kwh),
                    ("gpu_hours", s.gpu_hours, &mut w.gpu_hours),
                    ("carbon_kg", s.carbon_kg, &mut w.carbon_kg),
                    ("cost_usd", s.cost_usd, &mut w.cost_usd),
                ] {
                    *slot = checked(&format!("objective.{k}"), v.unwrap_or(0.0))?;
                }
                if w.energy_kwh + w.gpu_hours + w.carbon_kg + w.cost_usd <= 0.0 {
                    bail!("objective.kind = \"weights\" needs at least one of energy_kwh, gpu_hours, carbon_kg, cost_usd above 0");
                }
                if s.carbon_usd_per_t.is_some() {
                    bail!(
                        "objective.carbon_usd_per_t goes with kind = \"cost\"; with weights, weigh carbon_kg instead"
                    );
                }
                Ok(ObjectiveSpec { name: "weights".into(), weights: w })
            }
            kind => {
                if let Some(p) = s.carbon_usd_per_t {
                    checked("objective.carbon_usd_per_t", p)?;
                }
                if any_weight {
                    bail!("objective.energy_kwh, gpu_hours, carbon_kg and cost_usd go with kind = \"weights\", not \"{kind}\"");
                }
                ObjectiveSpec::preset(kind, s.carbon_usd_per_t).map_err(|e| anyhow::anyhow!("objective.kind: {e}"))
            }
        }
    }

    /// The controller's objective: the weight of a GPU in watts for each hour of a week from
    /// `start_unix_s` (the controller's time zero), from the accounting's prices and an
    /// intensity series.
    pub fn build(&self, acc: &AccountingConfig, intensity: &IntensitySeries, start_unix_s: f64) -> Objective {
        let w = self.weights;
        let pue = acc.carbon.pue;
        let step_s = 3600.0;
        let per_gpu_s = w.gpu_hours / 3600.0
            + w.carbon_kg * embodied_g(acc, 1.0) / 1000.0
            + w.cost_usd * acc.gpu_hour_usd() / 3600.0;
        let gpu_w: Vec<f64> = (0..168)
            .map(|k| {
                let unix = start_unix_s + (f64::from(k) + 0.5) * step_s;
                let per_j = w.energy_kwh / J_PER_KWH
                    + w.carbon_kg * intensity.at(unix) * pue / 1000.0 / J_PER_KWH
                    + w.cost_usd * tariff_usd_per_kwh(acc, unix) * pue / J_PER_KWH;
                match (per_gpu_s > 0.0, per_j > 0.0) {
                    (false, _) => 0.0,
                    (true, false) => MAX_GPU_W,
                    (true, true) => (per_gpu_s / per_j).min(MAX_GPU_W),
                }
            })
            .collect();
        let span = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f64> = (0..168).map(|k| f(start_unix_s + (f64::from(k) + 0.5) * step_s)).collect();
            let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            if (hi - lo).abs() < 1e-12 {
                format!("{lo}")
            } else {
                format!("{lo}–{hi}")
            }
        };
        let terms = match self.name.as_str() {
            "energy" => "energy alone".to_string(),
            "cost" => format!(
                "${}/GPU-h against ${}/kWh × PUE {pue}{}",
                acc.gpu_hour_usd(),
                span(&|u| tariff_usd_per_kwh(acc, u)),
                if w.carbon_kg > 0.0 { format!(", carbon at ${:.0}/t", w.carbon_kg * 1000.0) } else { String::new() }
            ),
            "carbon" => format!(
                "embodied {:.1} g/GPU-h against {} g/kWh × PUE {pue}",
                embodied_g(acc, 3600.0),
                span(&|u| intensity.at(u).round())
            ),
            _ => format!(
                "energy_kwh={}, gpu_hours={}, carbon_kg={}, cost_usd={}",
                w.energy_kwh, w.gpu_hours, w.carbon_kg, w.cost_usd
            ),
        };
        Objective { name: self.name.clone(), terms, step_s, gpu_w }
    }
}

/// The controller's objective from `[objective]` and the accounting's prices (`[carbon]`,
/// `[cost]`, `[sci]`), hour by hour from `start_unix_s` (service time zero). The intensity
/// is read only for an objective that weighs carbon: an API source's forecast, asked here
/// (and again every hour by the running service, [`OBJECTIVE_REFRESH`]).
pub async fn objective_of(cfg: &ServiceConfig, start_unix_s: f64) -> Result<controller::control::Objective> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || objective_blocking(&cfg, start_unix_s)).await?
}

/// [`objective_of`] on the calling thread: it may wait on an intensity API, so off the
/// async runtime only (`dynamollm check` calls it for the other sources).
pub fn objective_blocking(cfg: &ServiceConfig, start_unix_s: f64) -> Result<controller::control::Objective> {
    let spec = ObjectiveSpec::of_section(&cfg.objective)?;
    if spec.name == "energy" {
        return Ok(controller::control::Objective::energy());
    }
    let acc = AccountingConfig::from_toml_str(&cfg.source.0, &cfg.origin).map_err(|e| anyhow::anyhow!("{e}"))?;
    let intensity = if spec.weights.carbon_kg > 0.0 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        IntensitySeries::outlook_from_config(&acc, now, now + 7.0 * 86_400.0)
            .map_err(|e| anyhow::anyhow!("objective {}: the carbon intensity: {e}", spec.name))?
    } else {
        IntensitySeries::constant(0.0)
    };
    Ok(spec.build(&acc, &intensity, start_unix_s))
}

/// How often a running service reads an API intensity source's forecast again for its objective.
pub const OBJECTIVE_REFRESH: Duration = Duration::from_secs(3600);

/// Whether the objective reads a live intensity source (an API) and so wants refreshing.
pub fn objective_is_live(cfg: &ServiceConfig) -> bool {
    let Ok(spec) = ObjectiveSpec::of_section(&cfg.objective) else { return false };
    spec.weights.carbon_kg > 0.0
        && dashboards::config::AccountingConfig::from_toml_str(&cfg.source.0, &cfg.origin)
            .is_ok_and(|a| dashboards::intensity::IntensitySeries::source_is_live(&a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_weigh_a_gpu_by_their_prices() {
        let acc = AccountingConfig::default();
        let flat = IntensitySeries::constant(250.0);
        let start = acc.sim_start_unix_s();
        let e = ObjectiveSpec::energy().build(&acc, &flat, start);
        assert!(!e.weighs_gpus());
        // cost: $2.99/GPU-h over (tariff $/kWh × PUE): tens of kW, more where energy is cheaper.
        let c = ObjectiveSpec::preset("cost", None).unwrap().build(&acc, &flat, start);
        let (lo, hi) = c.gpu_w.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        let at = |usd: f64| 2.99 / (usd * acc.carbon.pue / 1000.0);
        assert!((lo - at(0.20)).abs() < 1e-6 && (hi - at(0.09)).abs() < 1e-6, "{lo} {hi}");
        // carbon: the embodied grams of a GPU-hour over the grams of a watt-hour at 250 g/kWh.
        let k = ObjectiveSpec::preset("carbon", None).unwrap().build(&acc, &flat, start);
        let want = embodied_g(&acc, 3600.0) / (250.0 * acc.carbon.pue / 1000.0);
        assert!(k.gpu_w.iter().all(|w| (w - want).abs() < 1e-9), "{:?} vs {want}", &k.gpu_w[..3]);
        assert!(k.terms.contains("g/GPU-h") && k.terms.contains("250 g/kWh"), "{}", k.terms);
        // GPU-hours alone: a GPU outweighs any power.
        let g = ObjectiveSpec::parse_weights("gpu_hours=1").unwrap().build(&acc, &flat, start);
        assert!(g.gpu_w.iter().all(|&w| w == MAX_GPU_W));
    }

    #[test]
    fn bad_objectives_are_named() {
        let e = |t: &str, p: Option<f64>| ObjectiveSpec::parse(t, p).unwrap_err().to_string();
        assert!(e("speed", None).contains("`speed` is not an objective"));
        assert!(e("energy_kwh=x", None).contains("`x` is not a number"));
        assert!(e("watts=1", None).contains("`watts` is not a weight"));
        assert!(e("energy_kwh=-1", None).contains("must be in [0"));
        assert!(e("energy_kwh=0", None).contains("at least one weight"));
        assert!(e("carbon", Some(80.0)).contains("cost objective only"));
        assert!(e("cost", Some(1e300)).contains("1e300"));
        let s = ObjectiveSection { kind: Some("cost".into()), gpu_hours: Some(1.0), ..Default::default() };
        assert!(ObjectiveSpec::of_section(&s).unwrap_err().to_string().contains("go with kind = \"weights\""));
        let s = ObjectiveSection { kind: Some("cost".into()), carbon_usd_per_t: Some(85.0), ..Default::default() };
        assert_eq!(ObjectiveSpec::of_section(&s).unwrap().weights.carbon_kg, 0.085);
    }
}
