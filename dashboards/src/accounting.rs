//! Energy, carbon and cost of a run, interval by interval.
//!
//! Per interval and pool: facility energy = GPU energy × PUE; operational
//! carbon = facility energy × grid intensity at the interval's midpoint;
//! embodied carbon per the SCI specification, `M = TE × TS × RS` with
//! TS = interval / lifetime and RS = GPUs held / GPUs per server (summed:
//! TE × GPU-seconds / (GPUs per server × lifetime)); cost = GPU-hours × price
//! per GPU-hour + facility energy × the time-of-use tariff at the midpoint.
//!
//! Per class: the twin and the GPU counters measure energy per pool, not per
//! request, so each pool's interval figures are split among the classes in
//! proportion to the prompt + output tokens of the requests routed to the pool
//! in that interval (an idle interval by the pool's whole-run token shares; a
//! pool that never served is left unattributed).

use crate::config::AccountingConfig;
use crate::intensity::IntensitySeries;
use serde::Serialize;
use std::collections::BTreeMap;
use telemetry_core::{RequestClass, CLASS_COUNT};

/// Joules per kWh.
pub const J_PER_KWH: f64 = 3.6e6;
/// Seconds per (Julian) year.
pub const S_PER_YEAR: f64 = 365.25 * 86_400.0;

/// One pool over one interval (the accounting's input).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolInterval {
    /// GPU energy (J).
    pub energy_j: f64,
    /// GPUs held × time (GPU·s).
    pub gpu_seconds: f64,
    /// GPUs held at the end of the interval.
    pub gpus: u32,
    /// Mean clock of its serving GPUs (MHz; 0: none).
    pub clock_mhz: f64,
    /// Prompt + output tokens routed to the pool, per class.
    pub tokens_by_class: [f64; CLASS_COUNT],
}

/// One interval of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interval {
    /// Start, seconds since the run began.
    pub start_s: f64,
    /// Length (s).
    pub duration_s: f64,
    /// Per pool.
    pub pools: Vec<PoolInterval>,
    /// Requests that arrived, per class.
    pub requests_by_class: [f64; CLASS_COUNT],
}

/// A run's timeline: the input of the accounting and of the charts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunTimeline {
    /// Unix time (s) of the run's time zero.
    pub start_unix_s: f64,
    /// Pool names.
    pub pool_names: Vec<String>,
    /// Intervals in time order.
    pub intervals: Vec<Interval>,
}

/// Energy, carbon and cost of one class.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClassAccount {
    /// Requests that arrived.
    pub requests: f64,
    /// Tokens routed (prompt + output).
    pub tokens: f64,
    /// GPU energy attributed (J).
    pub gpu_energy_j: f64,
    /// Facility energy attributed (J).
    pub facility_energy_j: f64,
    /// Operational + embodied carbon attributed (g).
    pub carbon_g: f64,
    /// GPU + energy cost attributed ($).
    pub cost_usd: f64,
}

/// Energy, carbon and cost of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Account {
    /// GPU energy (J).
    pub gpu_energy_j: f64,
    /// Facility energy: GPU energy × PUE (J).
    pub facility_energy_j: f64,
    /// GPUs held × time (GPU·s).
    pub gpu_seconds: f64,
    /// Operational carbon, Σ facility energy × intensity (g).
    pub carbon_operational_g: f64,
    /// Embodied carbon share, SCI `M` (g).
    pub carbon_embodied_g: f64,
    /// Operational + embodied (g).
    pub carbon_g: f64,
    /// GPU rental: GPU-hours × price per GPU-hour ($).
    pub cost_gpu_usd: f64,
    /// Energy: facility kWh × tariff ($).
    pub cost_energy_usd: f64,
    /// GPU + energy ($).
    pub cost_usd: f64,
    /// Requests that arrived.
    pub requests: f64,
    /// Tokens routed (prompt + output).
    pub tokens: f64,
    /// SCI per request: carbon / requests (g).
    pub sci_g_per_request: f64,
    /// SCI per 1,000 tokens (g).
    pub sci_g_per_1k_tokens: f64,
    /// Energy-weighted mean intensity (gCO2e/kWh).
    pub mean_intensity_g_per_kwh: f64,
    /// GPU energy of pools that never served a token (J): in the totals, in no class.
    pub unattributed_energy_j: f64,
    /// Per class name (classes with traffic or energy).
    pub classes: BTreeMap<String, ClassAccount>,
}

/// Energy price at a Unix time ($/kWh) under the configured time-of-use tariff.
pub fn tariff_usd_per_kwh(cfg: &AccountingConfig, unix_s: f64) -> f64 {
    let local_h = ((unix_s / 3600.0 + cfg.cost.tariff_utc_offset_h).rem_euclid(24.0)).floor() as u32;
    for p in &cfg.cost.tariff {
        let inside = if p.from_h < p.to_h {
            (p.from_h..p.to_h).contains(&local_h)
        } else {
            local_h >= p.from_h || local_h < p.to_h
        };
        if inside {
            return p.usd_per_kwh;
        }
    }
    cfg.cost.default_usd_per_kwh
}

/// Embodied carbon (g) of `gpu_seconds` of GPU time: TE × TS × RS summed.
pub fn embodied_g(cfg: &AccountingConfig, gpu_seconds: f64) -> f64 {
    let s = &cfg.sci;
    s.embodied_kg_per_server * 1000.0 * gpu_seconds / (f64::from(s.gpus_per_server) * s.lifetime_years * S_PER_YEAR)
}

/// Account a run.
pub fn account(timeline: &RunTimeline, cfg: &AccountingConfig, intensity: &IntensitySeries) -> Account {
    let pools = timeline.pool_names.len();
    // Whole-run token shares per pool, for idle intervals.
    let mut run_tokens = vec![[0.0; CLASS_COUNT]; pools];
    for iv in &timeline.intervals {
        for (p, pi) in iv.pools.iter().enumerate() {
            for (acc, t) in run_tokens[p].iter_mut().zip(pi.tokens_by_class) {
                *acc += t;
            }
        }
    }
    let price_gpu_h = cfg.gpu_hour_usd();
    let pue = cfg.carbon.pue;
    let mut a = Account::default();
    let mut class = vec![ClassAccount::default(); CLASS_COUNT];
    let mut intensity_energy = 0.0;
    for iv in &timeline.intervals {
        let mid = timeline.start_unix_s + iv.start_s + iv.duration_s / 2.0;
        let g_per_kwh = intensity.at(mid);
        let usd_per_kwh = tariff_usd_per_kwh(cfg, mid);
        for (k, r) in class.iter_mut().zip(iv.requests_by_class) {
            k.requests += r;
        }
        for (p, pi) in iv.pools.iter().enumerate() {
            let facility = pi.energy_j * pue;
            let op_g = facility / J_PER_KWH * g_per_kwh;
            let emb_g = embodied_g(cfg, pi.gpu_seconds);
            let cost_gpu = pi.gpu_seconds / 3600.0 * price_gpu_h;
            let cost_energy = facility / J_PER_KWH * usd_per_kwh;
            a.gpu_energy_j += pi.energy_j;
            a.facility_energy_j += facility;
            a.gpu_seconds += pi.gpu_seconds;
            a.carbon_operational_g += op_g;
            a.carbon_embodied_g += emb_g;
            a.cost_gpu_usd += cost_gpu;
            a.cost_energy_usd += cost_energy;
            intensity_energy += facility * g_per_kwh;
            let tokens: f64 = pi.tokens_by_class.iter().sum();
            let shares = if tokens > 0.0 {
                pi.tokens_by_class
            } else if run_tokens[p].iter().sum::<f64>() > 0.0 {
                run_tokens[p]
            } else {
                a.unattributed_energy_j += pi.energy_j;
                continue;
            };
            let total: f64 = shares.iter().sum();
            for c in 0..CLASS_COUNT {
                let s = shares[c] / total;
                if s == 0.0 {
                    continue;
                }
                class[c].tokens += pi.tokens_by_class[c];
                class[c].gpu_energy_j += pi.energy_j * s;
                class[c].facility_energy_j += facility * s;
                class[c].carbon_g += (op_g + emb_g) * s;
                class[c].cost_usd += (cost_gpu + cost_energy) * s;
            }
        }
    }
    a.carbon_g = a.carbon_operational_g + a.carbon_embodied_g;
    a.cost_usd = a.cost_gpu_usd + a.cost_energy_usd;
    a.requests = class.iter().map(|c| c.requests).sum();
    a.tokens = class.iter().map(|c| c.tokens).sum();
    a.sci_g_per_request = if a.requests > 0.0 { a.carbon_g / a.requests } else { 0.0 };
    a.sci_g_per_1k_tokens = if a.tokens > 0.0 { a.carbon_g / (a.tokens / 1000.0) } else { 0.0 };
    a.mean_intensity_g_per_kwh = if a.facility_energy_j > 0.0 { intensity_energy / a.facility_energy_j } else { 0.0 };
    a.classes = RequestClass::ALL
        .iter()
        .zip(class)
        .filter(|(_, c)| c.requests > 0.0 || c.gpu_energy_j > 0.0)
        .map(|(k, c)| (k.name(), c))
        .collect();
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccountingConfig;

    fn cfg() -> AccountingConfig {
        AccountingConfig::from_toml_str(
            r#"
[carbon]
pue = 1.5
[cost]
gpu_sku = "H100"
tariff_utc_offset_h = 0
default_usd_per_kwh = 0.10
[cost.gpu_hour_usd]
H100 = 2.0
[[cost.tariff]]
from_h = 1
to_h = 2
usd_per_kwh = 0.30
[[cost.tariff]]
from_h = 22
to_h = 1
usd_per_kwh = 0.05
[sci]
embodied_kg_per_server = 8766.0
gpus_per_server = 8
lifetime_years = 1.0
"#,
            "test",
        )
        .unwrap()
    }

    fn pool(energy_kwh: f64, gpu_h: f64, tokens: &[(usize, f64)]) -> PoolInterval {
        let mut t = [0.0; CLASS_COUNT];
        for &(c, n) in tokens {
            t[c] = n;
        }
        PoolInterval {
            energy_j: energy_kwh * J_PER_KWH,
            gpu_seconds: gpu_h * 3600.0,
            gpus: 8,
            clock_mhz: 1980.0,
            tokens_by_class: t,
        }
    }

    #[test]
    fn tariff_periods_match_local_hours_and_wrap_midnight() {
        let c = cfg();
        assert_eq!(tariff_usd_per_kwh(&c, 0.5 * 3600.0), 0.05); // 00:30 in 22→1
        assert_eq!(tariff_usd_per_kwh(&c, 1.5 * 3600.0), 0.30);
        assert_eq!(tariff_usd_per_kwh(&c, 12.0 * 3600.0), 0.10);
        assert_eq!(tariff_usd_per_kwh(&c, 23.0 * 3600.0 + 86_400.0), 0.05);
        let mut c2 = c.clone();
        c2.cost.tariff_utc_offset_h = -8.0; // 09:00 UTC is 01:00 local
        assert_eq!(tariff_usd_per_kwh(&c2, 9.0 * 3600.0), 0.30);
    }

    #[test]
    fn two_hours_two_pools_by_hand() {
        // Hour 0 (00:00–01:00, 0.05 $/kWh, 100 g/kWh) and hour 1 (01:00–02:00, 0.30 $/kWh, 300 g/kWh).
        let intensity =
            IntensitySeries::from_csv_str("time,g_co2e_per_kwh,signal\n0,100,average\n3600,300,average\n", "t.csv")
                .unwrap();
        let tl = RunTimeline {
            start_unix_s: 0.0,
            pool_names: vec!["a".into(), "b".into()],
            intervals: vec![
                Interval {
                    start_s: 0.0,
                    duration_s: 3600.0,
                    pools: vec![pool(10.0, 8.0, &[(0, 300.0), (1, 100.0)]), pool(2.0, 8.0, &[])],
                    requests_by_class: {
                        let mut r = [0.0; CLASS_COUNT];
                        r[0] = 3.0;
                        r[1] = 1.0;
                        r
                    },
                },
                Interval {
                    start_s: 3600.0,
                    duration_s: 3600.0,
                    pools: vec![pool(4.0, 4.0, &[]), pool(0.0, 0.0, &[])],
                    requests_by_class: [0.0; CLASS_COUNT],
                },
            ],
        };
        let a = account(&tl, &cfg(), &intensity);
        // Energy: GPU 16 kWh; facility × 1.5 = 24 kWh.
        assert!((a.gpu_energy_j - 16.0 * J_PER_KWH).abs() < 1e-6);
        assert!((a.facility_energy_j - 24.0 * J_PER_KWH).abs() < 1e-6);
        // Operational: hour 0: (15 + 3) kWh × 100 = 1800 g; hour 1: 6 kWh × 300 = 1800 g.
        assert!((a.carbon_operational_g - 3600.0).abs() < 1e-6, "{}", a.carbon_operational_g);
        // Embodied: 8766 kg × 1000 × GPU-s / (8 × 1 year): 1 GPU-hour = 8,766,000 g / (8 × 8766 h) = 125 g; 20 GPU-h = 2500 g.
        assert!((a.carbon_embodied_g - 2500.0).abs() < 1e-6, "{}", a.carbon_embodied_g);
        assert!((a.carbon_g - 6100.0).abs() < 1e-6);
        // Cost: 20 GPU-h × $2 = $40; energy 18 kWh × 0.05 + 6 kWh × 0.30 = 0.9 + 1.8 = $2.7.
        assert!((a.cost_gpu_usd - 40.0).abs() < 1e-9);
        assert!((a.cost_energy_usd - 2.7).abs() < 1e-9, "{}", a.cost_energy_usd);
        assert!((a.cost_usd - 42.7).abs() < 1e-9);
        // Per class: pool a's hour 0 by tokens 3:1, its idle hour 1 by its run shares 3:1;
        // pool b never served: unattributed.
        assert!((a.unattributed_energy_j - 2.0 * J_PER_KWH).abs() < 1e-6);
        let ss = &a.classes["SS"];
        let sm = &a.classes["SM"];
        assert!((ss.gpu_energy_j - 10.5 * J_PER_KWH).abs() < 1e-6);
        assert!((sm.gpu_energy_j - 3.5 * J_PER_KWH).abs() < 1e-6);
        // SS carbon: 0.75 × (15 kWh × 100 + 8 GPU-h × 125) + 0.75 × (6 kWh × 300 + 4 × 125) = 0.75 × 2500 + 0.75 × 2300 = 3600.
        assert!((ss.carbon_g - 3600.0).abs() < 1e-6, "{}", ss.carbon_g);
        // SS cost: 0.75 × (16 + 15 × 0.05) + 0.75 × (8 + 6 × 0.30) = 0.75 × 16.75 + 0.75 × 9.8 = 19.9125.
        assert!((ss.cost_usd - 19.9125).abs() < 1e-9, "{}", ss.cost_usd);
        // SCI: 6100 g / 4 requests; per 1k tokens: 6100 / 0.4.
        assert!((a.sci_g_per_request - 1525.0).abs() < 1e-9);
        assert!((a.sci_g_per_1k_tokens - 15_250.0).abs() < 1e-9);
        // Energy-weighted intensity: 3600 g / 24 kWh = 150.
        assert!((a.mean_intensity_g_per_kwh - 150.0).abs() < 1e-9);
    }
}
