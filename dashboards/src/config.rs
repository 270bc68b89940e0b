//! The `[carbon]`, `[cost]` and `[sci]` configuration of the accounting.
//!
//! Every table rejects unknown keys (the error names the key and its line);
//! every key is optional and falls back to the bundled defaults,
//! `data/accounting-defaults.toml` (where the figures' sources are cited).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The bundled defaults (`data/accounting-defaults.toml`).
pub const DEFAULTS_TOML: &str = include_str!("../../data/accounting-defaults.toml");

/// The bundled CAISO-like intensity week (`data/caiso-like-intensity.csv`).
pub const CAISO_LIKE_CSV: &str = include_str!("../../data/caiso-like-intensity.csv");

/// Name of the bundled CAISO-like series in `carbon.csv`.
pub const CAISO_LIKE: &str = "builtin:caiso-like";

/// The highest grid intensity a key may give (gCO2e/kWh; coal is about 1,000).
pub const MAX_G_PER_KWH: f64 = 10_000.0;
/// The highest energy price a key may give ($/kWh).
pub const MAX_USD_PER_KWH: f64 = 100.0;
/// The highest GPU-hour price a key may give ($).
pub const MAX_USD_PER_GPU_HOUR: f64 = 10_000.0;

/// A configuration problem: names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or mistyped key.
    #[error("{source_name}: {message}")]
    Parse {
        /// The file (or `defaults`).
        source_name: String,
        /// The parser's message (it names the key and line).
        message: String,
    },
    /// A value out of range.
    #[error("{source_name}: {key}: {problem}")]
    Invalid {
        /// The file.
        source_name: String,
        /// The key, dotted (`cost.gpu_sku`).
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// Where the grid carbon intensity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntensitySourceKind {
    /// `carbon.constant_g_per_kwh`.
    Constant,
    /// The CSV series `carbon.csv`.
    Csv,
    /// Electricity Maps v3 (`carbon.electricity_maps`).
    ElectricityMaps,
    /// WattTime v3 (`carbon.watttime`).
    Watttime,
}

/// `[carbon.electricity_maps]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElectricityMapsConfig {
    /// API base URL (default `https://api.electricitymap.org`).
    #[serde(default = "default_em_url")]
    pub url: String,
    /// Zone, e.g. `US-CAL-CISO`.
    pub zone: String,
    /// API key, sent as the `auth-token` header.
    pub token: String,
}

fn default_em_url() -> String {
    "https://api.electricitymap.org".into()
}

/// `[carbon.watttime]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WattTimeConfig {
    /// API base URL (default `https://api.watttime.org`).
    #[serde(default = "default_wt_url")]
    pub url: String,
    /// Balancing-authority region, e.g. `CAISO_NORTH`.
    pub region: String,
    /// Account name (basic auth on `/login`).
    pub username: String,
    /// Password.
    pub password: String,
}

fn default_wt_url() -> String {
    "https://api.watttime.org".into()
}

/// `[carbon]`: grid intensity and facility overhead.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarbonConfig {
    /// `constant`, `csv`, `electricity-maps` or `watttime`.
    pub source: IntensitySourceKind,
    /// Intensity for `source = "constant"` (gCO2e/kWh).
    pub constant_g_per_kwh: f64,
    /// The CSV series: a path, or `builtin:caiso-like`.
    pub csv: String,
    /// The wall-clock time (RFC 3339) a simulated replay's time zero maps to.
    pub sim_start: String,
    /// Power usage effectiveness; facility energy = GPU energy × PUE (1.0: GPU energy only).
    pub pue: f64,
    /// Electricity Maps settings (for `source = "electricity-maps"`).
    #[serde(default)]
    pub electricity_maps: Option<ElectricityMapsConfig>,
    /// WattTime settings (for `source = "watttime"`).
    #[serde(default)]
    pub watttime: Option<WattTimeConfig>,
}

/// One time-of-use period of the tariff: local hours `[from_h, to_h)`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TariffPeriod {
    /// First hour (0–23).
    pub from_h: u32,
    /// Hour after the last (1–24; may wrap past midnight when smaller than `from_h`).
    pub to_h: u32,
    /// Energy price ($/kWh).
    pub usd_per_kwh: f64,
}

/// `[cost]`: GPU rental and energy prices.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostConfig {
    /// The SKU priced (a key of `gpu_hour_usd`).
    pub gpu_sku: String,
    /// Price per GPU-hour by SKU ($).
    pub gpu_hour_usd: BTreeMap<String, f64>,
    /// Hours east of UTC of the tariff's local time.
    pub tariff_utc_offset_h: f64,
    /// Energy price outside every period ($/kWh).
    pub default_usd_per_kwh: f64,
    /// Time-of-use periods (the first that matches wins).
    #[serde(default)]
    pub tariff: Vec<TariffPeriod>,
}

/// `[sci]`: the embodied share per the Green Software Foundation's SCI
/// specification, `M = TE × TS × RS` with TS = time reserved / lifetime and
/// RS = GPUs reserved / GPUs per server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SciConfig {
    /// TE: embodied emissions of one server (kgCO2e).
    pub embodied_kg_per_server: f64,
    /// GPUs per server.
    pub gpus_per_server: u32,
    /// Expected lifetime (years).
    pub lifetime_years: f64,
}

/// The whole accounting configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountingConfig {
    /// `[carbon]`.
    pub carbon: CarbonConfig,
    /// `[cost]`.
    pub cost: CostConfig,
    /// `[sci]`.
    pub sci: SciConfig,
}

/// A number as an error shows it: `1e300`, not three hundred digits.
fn shown(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e9 || v.abs() < 1e-4) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Partial tables, as a user file gives them (merged over the defaults).
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(bv) if bv.is_table() && v.is_table() => merge(bv, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Place a schema error (about the merged document) on the user's line: the
/// key between the message's first backticks.
fn locate(user_text: &str, merged: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    // The key: named in the message, or the one on the merged document's line the span points at.
    let from_span = span
        .and_then(|r| merged.get(..r.start))
        .map(|before| {
            let start = before.rfind('\n').map_or(0, |i| i + 1);
            let line = merged[start..].lines().next().unwrap_or("");
            line.split_once('=').map(|(k, _)| k.trim().to_string()).unwrap_or_default()
        })
        .unwrap_or_default();
    // Serde names the key in backticks only for unknown, missing or duplicate fields; in
    // "invalid value: integer `-1`" the backticks hold the value.
    let names_a_field = ["unknown field", "missing field", "duplicate field"].iter().any(|p| message.starts_with(p));
    let named = if names_a_field { message.split('`').nth(1).unwrap_or("").to_string() } else { String::new() };
    let key = if named.is_empty() { from_span.as_str() } else { named.as_str() };
    let message = if named.is_empty() && !key.is_empty() { format!("`{key}`: {message}") } else { message.to_string() };
    let message = message.as_str();
    let line = (!key.is_empty())
        .then(|| {
            user_text.lines().position(|l| {
                let l = l.trim_start();
                l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        })
        .flatten();
    match line {
        Some(n) => format!("line {}: {message}", n + 1),
        None => message.to_string(),
    }
}

impl Default for AccountingConfig {
    fn default() -> Self {
        AccountingConfig::parse(DEFAULTS_TOML, "defaults").expect("the bundled defaults parse")
    }
}

impl AccountingConfig {
    /// Parse a complete configuration.
    fn parse(text: &str, source_name: &str) -> Result<AccountingConfig, ConfigError> {
        let c: AccountingConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { source_name: source_name.into(), message: e.to_string() })?;
        c.validate(source_name)?;
        Ok(c)
    }

    /// The defaults overridden by the `[carbon]`, `[cost]` and `[sci]` tables of
    /// a TOML text (other top-level tables are left to their owners).
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<AccountingConfig, ConfigError> {
        let over: toml::Value = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { source_name: source_name.into(), message: e.to_string() })?;
        let mut base: toml::Value = toml::from_str(DEFAULTS_TOML).expect("defaults parse");
        if let toml::Value::Table(t) = over {
            let mut mine = toml::map::Map::new();
            for k in ["carbon", "cost", "sci"] {
                if let Some(v) = t.get(k) {
                    mine.insert(k.to_string(), v.clone());
                }
            }
            // A tariff given replaces the default periods.
            if let Some(p) = mine.get("cost").and_then(|c| c.get("tariff")) {
                if let Some(bc) = base.get_mut("cost").and_then(|c| c.as_table_mut()) {
                    bc.insert("tariff".into(), p.clone());
                }
            }
            merge(&mut base, toml::Value::Table(mine));
        }
        let merged = toml::to_string(&base).expect("a TOML value serialises");
        let c: AccountingConfig = toml::from_str(&merged).map_err(|e| ConfigError::Parse {
            source_name: source_name.into(),
            message: locate(text, &merged, e.span(), e.message()),
        })?;
        c.validate(source_name)?;
        Ok(c)
    }

    /// Load from a file (its `[carbon]`, `[cost]`, `[sci]` tables over the defaults).
    pub fn load(path: &Path) -> Result<AccountingConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: path.to_path_buf(), source: e })?;
        AccountingConfig::from_toml_str(&text, &path.display().to_string())
    }

    /// Price per GPU-hour of the configured SKU.
    pub fn gpu_hour_usd(&self) -> f64 {
        self.cost.gpu_hour_usd[&self.cost.gpu_sku]
    }

    /// The wall-clock Unix time (s) of a simulated replay's time zero.
    pub fn sim_start_unix_s(&self) -> f64 {
        crate::intensity::parse_time(&self.carbon.sim_start).expect("validated")
    }

    fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: String| {
            Err(ConfigError::Invalid { source_name: source_name.into(), key: key.into(), problem })
        };
        // `None` when lo ≤ v ≤ hi (NaN is never in range).
        let range = |v: f64, lo: f64, hi: f64| {
            (!(lo..=hi).contains(&v)).then(|| format!("must be in [{lo}, {hi}], got {}", shown(v)))
        };
        let c = &self.carbon;
        if let Some(p) = range(c.constant_g_per_kwh, 0.0, MAX_G_PER_KWH) {
            return bad("carbon.constant_g_per_kwh", p);
        }
        if let Some(p) = range(c.pue, 1.0, 10.0) {
            return bad("carbon.pue", p);
        }
        if let Err(e) = crate::intensity::parse_time(&c.sim_start) {
            return bad("carbon.sim_start", e);
        }
        if c.source == IntensitySourceKind::ElectricityMaps && c.electricity_maps.is_none() {
            return bad("carbon.electricity_maps", "source is electricity-maps but the table is missing".into());
        }
        if c.source == IntensitySourceKind::Watttime && c.watttime.is_none() {
            return bad("carbon.watttime", "source is watttime but the table is missing".into());
        }
        let k = &self.cost;
        if !k.gpu_hour_usd.contains_key(&k.gpu_sku) {
            return bad("cost.gpu_sku", format!("`{}` has no price in cost.gpu_hour_usd", k.gpu_sku));
        }
        for (sku, p) in &k.gpu_hour_usd {
            if let Some(p) = range(*p, 0.0, MAX_USD_PER_GPU_HOUR) {
                return bad(&format!("cost.gpu_hour_usd.{sku}"), p);
            }
        }
        if let Some(p) = range(k.default_usd_per_kwh, 0.0, MAX_USD_PER_KWH) {
            return bad("cost.default_usd_per_kwh", p);
        }
        if !(-14.0..=14.0).contains(&k.tariff_utc_offset_h) {
            return bad(
                "cost.tariff_utc_offset_h",
                format!("must be within ±14, got {}", shown(k.tariff_utc_offset_h)),
            );
        }
        for (i, p) in k.tariff.iter().enumerate() {
            if p.from_h > 23 || p.to_h == 0 || p.to_h > 24 || p.from_h == p.to_h {
                return bad(&format!("cost.tariff[{i}]"), format!("hours {}..{} are not a period", p.from_h, p.to_h));
            }
            if let Some(problem) = range(p.usd_per_kwh, 0.0, MAX_USD_PER_KWH) {
                return bad(&format!("cost.tariff[{i}].usd_per_kwh"), problem);
            }
        }
        let s = &self.sci;
        if let Some(p) = range(s.embodied_kg_per_server, 0.0, 1e6) {
            return bad("sci.embodied_kg_per_server", p);
        }
        if !(1..=1024).contains(&s.gpus_per_server) {
            return bad("sci.gpus_per_server", format!("must be in [1, 1024], got {}", s.gpus_per_server));
        }
        if let Some(p) = range(s.lifetime_years, 0.1, 100.0) {
            return bad("sci.lifetime_years", p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_overrides_merge() {
        let d = AccountingConfig::default();
        assert_eq!(d.carbon.pue, 1.2);
        assert_eq!(d.gpu_hour_usd(), 2.99);
        assert_eq!(d.cost.tariff.len(), 2);
        let c = AccountingConfig::from_toml_str(
            "[carbon]\npue = 1.0\n[cost]\ngpu_sku = \"A100\"\n[[cost.tariff]]\nfrom_h = 0\nto_h = 6\nusd_per_kwh = 0.05\n[telemetry]\nx = 1\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.carbon.pue, 1.0);
        assert_eq!(c.carbon.csv, CAISO_LIKE);
        assert_eq!(c.gpu_hour_usd(), 1.29);
        assert_eq!(c.cost.tariff.len(), 1);
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = AccountingConfig::from_toml_str("# x\n[carbon]\npeu = 1.3\n", "a.toml").unwrap_err().to_string();
        assert!(e.starts_with("a.toml: line 3: unknown field `peu`"), "{e}");
        let e =
            AccountingConfig::from_toml_str("[sci]\ngpus_per_server = \"eight\"\n", "e.toml").unwrap_err().to_string();
        assert!(e.starts_with("e.toml: line 2: `gpus_per_server`: invalid type"), "{e}");
        let e = AccountingConfig::from_toml_str("[sci]\nlifetime_years = 0\n", "b.toml").unwrap_err().to_string();
        assert!(e.contains("sci.lifetime_years"), "{e}");
        // A value serde quotes in backticks is not taken for the key.
        let e = AccountingConfig::from_toml_str("[sci]\ngpus_per_server = -1\n", "f.toml").unwrap_err().to_string();
        assert!(e.starts_with("f.toml: line 2: `gpus_per_server`: invalid value"), "{e}");
        let e = AccountingConfig::from_toml_str("[sci]\ngpus_per_server = 1e300\n", "f.toml").unwrap_err().to_string();
        assert!(e.contains("gpus_per_server"), "{e}");
        for (key, v) in
            [("carbon]\npue", "1e300"), ("cost]\ndefault_usd_per_kwh", "1e300"), ("sci]\nlifetime_years", "1e-10")]
        {
            let e = AccountingConfig::from_toml_str(&format!("[{key} = {v}\n"), "g.toml").unwrap_err().to_string();
            let leaf = key.rsplit('\n').next().unwrap();
            assert!(e.contains(leaf) && e.contains(v), "{e}");
        }
        let e = AccountingConfig::from_toml_str("[cost]\ngpu_sku = \"B200\"\n", "c.toml").unwrap_err().to_string();
        assert!(e.contains("cost.gpu_sku") && e.contains("B200"), "{e}");
        let e = AccountingConfig::from_toml_str("[carbon]\nsource = \"watttime\"\n", "d.toml").unwrap_err().to_string();
        assert!(e.contains("carbon.watttime"), "{e}");
    }
}
