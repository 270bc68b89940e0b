//! Grid carbon intensity (gCO2e/kWh) over time: a constant, a CSV series, or
//! the Electricity Maps and WattTime APIs.

use crate::config::{AccountingConfig, ElectricityMapsConfig, IntensitySourceKind, WattTimeConfig, CAISO_LIKE};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// Grams per pound.
pub const G_PER_LB: f64 = 453.592_37;

/// An intensity problem: names the source and the line or field.
#[derive(Debug, thiserror::Error)]
pub enum IntensityError {
    /// A CSV series is unreadable or malformed.
    #[error("{source_name} line {line}: {problem}")]
    Csv {
        /// The file.
        source_name: String,
        /// 1-based line (0: the file as a whole).
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// An HTTP call failed or answered an error.
    #[error("{source_name}: {url}: {problem}")]
    Http {
        /// `electricity-maps` or `watttime`.
        source_name: String,
        /// The URL called.
        url: String,
        /// What happened.
        problem: String,
    },
    /// A response lacks a field or has one of the wrong type.
    #[error("{source_name}: {endpoint}: field `{field}`: {problem}")]
    Field {
        /// `electricity-maps` or `watttime`.
        source_name: String,
        /// The endpoint.
        endpoint: String,
        /// The JSON field (path).
        field: String,
        /// What is wrong.
        problem: String,
    },
}

/// Whether intensities are of the average generation mix or of the marginal generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    /// Average intensity of the mix.
    Average,
    /// Marginal (MOER) intensity.
    Marginal,
}

/// Parse a time: RFC 3339, or Unix seconds.
pub fn parse_time(text: &str) -> Result<f64, String> {
    let t = text.trim();
    if let Ok(s) = t.parse::<f64>() {
        return Ok(s);
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_millis() as f64 / 1000.0)
        .map_err(|e| format!("`{t}` is neither RFC 3339 nor Unix seconds ({e})"))
}

/// An intensity series: a step function (each value holds until the next
/// point). A lookup outside the series repeats it with the period of its span
/// (a typical week stands for any week).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IntensitySeries {
    /// Where it came from, for reports.
    pub source: String,
    /// Average or marginal.
    pub signal: Signal,
    /// `(Unix s, gCO2e/kWh)`, in time order, at least one point.
    pub points: Vec<(f64, f64)>,
}

impl IntensitySeries {
    /// A constant intensity.
    pub fn constant(g_per_kwh: f64) -> IntensitySeries {
        IntensitySeries {
            source: format!("constant {g_per_kwh} gCO2e/kWh"),
            signal: Signal::Average,
            points: vec![(0.0, g_per_kwh)],
        }
    }

    /// The series' period: its span plus one step.
    fn period_s(&self) -> f64 {
        let n = self.points.len();
        if n < 2 {
            return f64::INFINITY;
        }
        let step = self.points[n - 1].0 - self.points[n - 2].0;
        self.points[n - 1].0 - self.points[0].0 + step
    }

    /// Intensity at Unix time `t` (gCO2e/kWh).
    pub fn at(&self, t: f64) -> f64 {
        let t0 = self.points[0].0;
        let period = self.period_s();
        let t = if period.is_finite() { t0 + (t - t0).rem_euclid(period) } else { t };
        let i = self.points.partition_point(|p| p.0 <= t);
        self.points[i.saturating_sub(1)].1
    }

    /// Mean over the series' points.
    pub fn mean(&self) -> f64 {
        self.points.iter().map(|p| p.1).sum::<f64>() / self.points.len() as f64
    }

    /// Parse `time,g_co2e_per_kwh,signal` rows (`#` comments allowed; time RFC 3339 or Unix s;
    /// signal `average` or `marginal`, the same on every row).
    pub fn from_csv_str(text: &str, source_name: &str) -> Result<IntensitySeries, IntensityError> {
        let err = |line: usize, problem: String| IntensityError::Csv { source_name: source_name.into(), line, problem };
        let mut points = Vec::new();
        let mut signal = None;
        let mut header = false;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let cols: Vec<&str> = l.split(',').map(str::trim).collect();
            if !header {
                if cols != ["time", "g_co2e_per_kwh", "signal"] {
                    return Err(err(line, format!("header must be `time,g_co2e_per_kwh,signal`, got `{l}`")));
                }
                header = true;
                continue;
            }
            if cols.len() != 3 {
                return Err(err(line, format!("expected 3 columns, got {}", cols.len())));
            }
            let t = parse_time(cols[0]).map_err(|e| err(line, format!("time: {e}")))?;
            let v: f64 =
                cols[1].parse().map_err(|_| err(line, format!("g_co2e_per_kwh: `{}` is not a number", cols[1])))?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(err(line, format!("g_co2e_per_kwh must be ≥ 0, got {v}")));
            }
            let s = match cols[2] {
                "average" => Signal::Average,
                "marginal" => Signal::Marginal,
                o => return Err(err(line, format!("signal must be `average` or `marginal`, got `{o}`"))),
            };
            if signal.is_some_and(|x| x != s) {
                return Err(err(line, "signal changes within the series".into()));
            }
            signal = Some(s);
            if let Some(&(prev, _)) = points.last() {
                if t <= prev {
                    return Err(err(line, "times must increase".into()));
                }
            }
            points.push((t, v));
        }
        if points.is_empty() {
            return Err(err(0, "no data rows".into()));
        }
        Ok(IntensitySeries { source: source_name.into(), signal: signal.unwrap_or(Signal::Average), points })
    }

    /// Read a CSV file (or `builtin:caiso-like`).
    pub fn from_csv(path: &str) -> Result<IntensitySeries, IntensityError> {
        if path == CAISO_LIKE {
            return IntensitySeries::from_csv_str(
                crate::config::CAISO_LIKE_CSV,
                "data/caiso-like-intensity.csv (synthesised CAISO-like week)",
            );
        }
        let text = std::fs::read_to_string(Path::new(path)).map_err(|e| IntensityError::Csv {
            source_name: path.into(),
            line: 0,
            problem: e.to_string(),
        })?;
        IntensitySeries::from_csv_str(&text, path)
    }

    /// The series a configuration names. From the APIs: Electricity Maps' `history`
    /// (its last 24 hours) and WattTime's MOER `forecast`; like any series, they
    /// repeat outside their span, so a period far from now is better served by a CSV
    /// export. `from_s`/`to_s` (Unix s) are the period wanted.
    pub fn from_config(cfg: &AccountingConfig, from_s: f64, to_s: f64) -> Result<IntensitySeries, IntensityError> {
        let c = &cfg.carbon;
        match c.source {
            IntensitySourceKind::Constant => Ok(IntensitySeries::constant(c.constant_g_per_kwh)),
            IntensitySourceKind::Csv => IntensitySeries::from_csv(&c.csv),
            IntensitySourceKind::ElectricityMaps => {
                let em = ElectricityMaps::new(c.electricity_maps.clone().expect("validated"));
                em.history(from_s, to_s)
            }
            IntensitySourceKind::Watttime => {
                let wt = WattTime::new(c.watttime.clone().expect("validated"));
                wt.forecast()
            }
        }
    }
}

impl IntensitySeries {
    /// The intensity a plan looks ahead with: an API source's forecast (Electricity Maps'
    /// `forecast`, WattTime's MOER `forecast`), else the configured series. Like any series it
    /// repeats outside its span.
    pub fn outlook_from_config(
        cfg: &AccountingConfig,
        from_s: f64,
        to_s: f64,
    ) -> Result<IntensitySeries, IntensityError> {
        match cfg.carbon.source {
            IntensitySourceKind::ElectricityMaps => {
                ElectricityMaps::new(cfg.carbon.electricity_maps.clone().expect("validated")).forecast()
            }
            _ => IntensitySeries::from_config(cfg, from_s, to_s),
        }
    }

    /// Whether the configured source changes while a service runs (an API): a plan's outlook
    /// from it is read again from time to time.
    pub fn source_is_live(cfg: &AccountingConfig) -> bool {
        matches!(cfg.carbon.source, IntensitySourceKind::ElectricityMaps | IntensitySourceKind::Watttime)
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(20)).build().expect("an HTTP client builds")
}

fn get_json(
    source: &str,
    req: reqwest::blocking::RequestBuilder,
    url: &str,
) -> Result<serde_json::Value, IntensityError> {
    let http = |problem: String| IntensityError::Http { source_name: source.into(), url: url.into(), problem };
    let resp = req.send().map_err(|e| http(e.to_string()))?;
    let status = resp.status();
    let body = resp.text().map_err(|e| http(e.to_string()))?;
    if !status.is_success() {
        return Err(http(format!("HTTP {status}: {}", body.chars().take(200).collect::<String>())));
    }
    serde_json::from_str(&body).map_err(|e| http(format!("response is not JSON: {e}")))
}

fn field<'a>(
    source: &str,
    endpoint: &str,
    v: &'a serde_json::Value,
    path: &str,
) -> Result<&'a serde_json::Value, IntensityError> {
    v.get(path).ok_or_else(|| IntensityError::Field {
        source_name: source.into(),
        endpoint: endpoint.into(),
        field: path.into(),
        problem: "missing".into(),
    })
}

fn num(source: &str, endpoint: &str, v: &serde_json::Value, name: &str) -> Result<f64, IntensityError> {
    field(source, endpoint, v, name)?.as_f64().ok_or_else(|| IntensityError::Field {
        source_name: source.into(),
        endpoint: endpoint.into(),
        field: name.into(),
        problem: format!("not a number: {}", v[name]),
    })
}

fn time_field(source: &str, endpoint: &str, v: &serde_json::Value, name: &str) -> Result<f64, IntensityError> {
    let bad = |problem: String| IntensityError::Field {
        source_name: source.into(),
        endpoint: endpoint.into(),
        field: name.into(),
        problem,
    };
    let s = field(source, endpoint, v, name)?.as_str().ok_or_else(|| bad("not a string".into()))?;
    parse_time(s).map_err(bad)
}

/// The Electricity Maps v3 API (`auth-token` header).
#[derive(Debug, Clone)]
pub struct ElectricityMaps {
    cfg: ElectricityMapsConfig,
    http: reqwest::blocking::Client,
}

const EM: &str = "electricity-maps";

impl ElectricityMaps {
    /// A client.
    pub fn new(cfg: ElectricityMapsConfig) -> ElectricityMaps {
        ElectricityMaps { cfg, http: client() }
    }

    fn get(&self, endpoint: &str) -> Result<serde_json::Value, IntensityError> {
        let url = format!("{}/v3/carbon-intensity/{endpoint}", self.cfg.url.trim_end_matches('/'));
        let req = self.http.get(&url).query(&[("zone", self.cfg.zone.as_str())]).header("auth-token", &self.cfg.token);
        get_json(EM, req, &url)
    }

    fn point(endpoint: &str, v: &serde_json::Value) -> Result<(f64, f64), IntensityError> {
        Ok((time_field(EM, endpoint, v, "datetime")?, num(EM, endpoint, v, "carbonIntensity")?))
    }

    fn list(&self, endpoint: &str, key: &str) -> Result<IntensitySeries, IntensityError> {
        let v = self.get(endpoint)?;
        let arr = field(EM, endpoint, &v, key)?.as_array().ok_or_else(|| IntensityError::Field {
            source_name: EM.into(),
            endpoint: endpoint.into(),
            field: key.into(),
            problem: "not an array".into(),
        })?;
        let mut points = Vec::with_capacity(arr.len());
        for (i, p) in arr.iter().enumerate() {
            let pt = Self::point(endpoint, p).map_err(|e| match e {
                IntensityError::Field { source_name, endpoint, field, problem } => {
                    IntensityError::Field { source_name, endpoint, field: format!("{key}[{i}].{field}"), problem }
                }
                e => e,
            })?;
            points.push(pt);
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points.dedup_by(|a, b| a.0 == b.0);
        if points.is_empty() {
            return Err(IntensityError::Field {
                source_name: EM.into(),
                endpoint: endpoint.into(),
                field: key.into(),
                problem: "empty".into(),
            });
        }
        Ok(IntensitySeries {
            source: format!("Electricity Maps {endpoint} {}", self.cfg.zone),
            signal: Signal::Average,
            points,
        })
    }

    /// `GET /v3/carbon-intensity/latest`: `(Unix s, gCO2e/kWh)`.
    pub fn latest(&self) -> Result<(f64, f64), IntensityError> {
        Self::point("latest", &self.get("latest")?)
    }

    /// `GET /v3/carbon-intensity/history` (the last 24 hours, hourly).
    pub fn history(&self, _from_s: f64, _to_s: f64) -> Result<IntensitySeries, IntensityError> {
        self.list("history", "history")
    }

    /// `GET /v3/carbon-intensity/forecast`.
    pub fn forecast(&self) -> Result<IntensitySeries, IntensityError> {
        self.list("forecast", "forecast")
    }
}

/// The WattTime v3 API: a bearer token from `/login` (basic auth), then
/// `signal-index` (a 0–100 percentile) and `forecast` (MOER).
#[derive(Debug, Clone)]
pub struct WattTime {
    cfg: WattTimeConfig,
    http: reqwest::blocking::Client,
    token: std::cell::RefCell<Option<String>>,
}

const WT: &str = "watttime";

/// MOER units WattTime answers with, to gCO2e/kWh.
fn moer_to_g_per_kwh(units: &str, v: f64) -> Option<f64> {
    match units {
        "lbs_co2_per_mwh" | "lbs/MWh" => Some(v * G_PER_LB / 1000.0),
        "g_co2_per_kwh" | "gCO2/kWh" => Some(v),
        "kg_co2_per_mwh" => Some(v),
        _ => None,
    }
}

impl WattTime {
    /// A client (logs in on first use).
    pub fn new(cfg: WattTimeConfig) -> WattTime {
        WattTime { cfg, http: client(), token: std::cell::RefCell::new(None) }
    }

    fn base(&self) -> &str {
        self.cfg.url.trim_end_matches('/')
    }

    /// `GET /login` with basic auth: the bearer token.
    pub fn login(&self) -> Result<String, IntensityError> {
        if let Some(t) = self.token.borrow().as_ref() {
            return Ok(t.clone());
        }
        let url = format!("{}/login", self.base());
        let req = self.http.get(&url).basic_auth(&self.cfg.username, Some(&self.cfg.password));
        let v = get_json(WT, req, &url)?;
        let t = field(WT, "login", &v, "token")?
            .as_str()
            .ok_or_else(|| IntensityError::Field {
                source_name: WT.into(),
                endpoint: "login".into(),
                field: "token".into(),
                problem: "not a string".into(),
            })?
            .to_string();
        *self.token.borrow_mut() = Some(t.clone());
        Ok(t)
    }

    fn get(&self, endpoint: &str) -> Result<serde_json::Value, IntensityError> {
        let token = self.login()?;
        let url = format!("{}/v3/{endpoint}", self.base());
        let req = self
            .http
            .get(&url)
            .query(&[("region", self.cfg.region.as_str()), ("signal_type", "co2_moer")])
            .bearer_auth(token);
        get_json(WT, req, &url)
    }

    fn data(&self, endpoint: &str) -> Result<(Vec<(f64, f64)>, String), IntensityError> {
        let v = self.get(endpoint)?;
        let units = field(WT, endpoint, &v, "meta")
            .and_then(|m| field(WT, endpoint, m, "units"))
            .map_err(|_| IntensityError::Field {
                source_name: WT.into(),
                endpoint: endpoint.into(),
                field: "meta.units".into(),
                problem: "missing".into(),
            })?
            .as_str()
            .unwrap_or("")
            .to_string();
        let arr = field(WT, endpoint, &v, "data")?.as_array().ok_or_else(|| IntensityError::Field {
            source_name: WT.into(),
            endpoint: endpoint.into(),
            field: "data".into(),
            problem: "not an array".into(),
        })?;
        let mut out = Vec::with_capacity(arr.len());
        for (i, p) in arr.iter().enumerate() {
            let rename = |e: IntensityError| match e {
                IntensityError::Field { source_name, endpoint, field, problem } => {
                    IntensityError::Field { source_name, endpoint, field: format!("data[{i}].{field}"), problem }
                }
                e => e,
            };
            let t = time_field(WT, endpoint, p, "point_time").map_err(rename)?;
            let x = num(WT, endpoint, p, "value").map_err(rename)?;
            out.push((t, x));
        }
        if out.is_empty() {
            return Err(IntensityError::Field {
                source_name: WT.into(),
                endpoint: endpoint.into(),
                field: "data".into(),
                problem: "empty".into(),
            });
        }
        Ok((out, units))
    }

    /// `GET /v3/signal-index`: `(Unix s, percentile 0–100)` of the current MOER.
    pub fn signal_index(&self) -> Result<(f64, f64), IntensityError> {
        let (d, _) = self.data("signal-index")?;
        Ok(d[0])
    }

    /// `GET /v3/forecast`: the MOER forecast in gCO2e/kWh (converted from lbs/MWh).
    pub fn forecast(&self) -> Result<IntensitySeries, IntensityError> {
        let (d, units) = self.data("forecast")?;
        let mut points = Vec::with_capacity(d.len());
        for (t, v) in d {
            let g = moer_to_g_per_kwh(&units, v).ok_or_else(|| IntensityError::Field {
                source_name: WT.into(),
                endpoint: "forecast".into(),
                field: "meta.units".into(),
                problem: format!("unknown units `{units}`"),
            })?;
            points.push((t, g));
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(IntensitySeries {
            source: format!("WattTime forecast {}", self.cfg.region),
            signal: Signal::Marginal,
            points,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_series_steps_wraps_and_names_bad_lines() {
        let s = IntensitySeries::from_csv_str(
            "# c\ntime,g_co2e_per_kwh,signal\n0,100,marginal\n3600,200,marginal\n7200,300,marginal\n",
            "x.csv",
        )
        .unwrap();
        assert_eq!(s.signal, Signal::Marginal);
        assert_eq!(s.at(0.0), 100.0);
        assert_eq!(s.at(3599.0), 100.0);
        assert_eq!(s.at(3600.0), 200.0);
        assert_eq!(s.at(10_799.0), 300.0);
        // Period 3 h: 3 h later is the start again, and before the start wraps too.
        assert_eq!(s.at(10_800.0), 100.0);
        assert_eq!(s.at(-1.0), 300.0);
        let e = IntensitySeries::from_csv_str("time,g_co2e_per_kwh,signal\n0,1,average\n10,x,average\n", "y.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("y.csv line 3") && e.contains("not a number"), "{e}");
        let e = IntensitySeries::from_csv_str("time,g_co2e_per_kwh,signal\n0,1,average\n10,2,marginal\n", "z.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        let e = IntensitySeries::from_csv_str("t,v\n", "h.csv").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("header"), "{e}");
    }

    #[test]
    fn the_caiso_like_week_has_a_duck_curve() {
        let s = IntensitySeries::from_csv(CAISO_LIKE).unwrap();
        assert_eq!(s.points.len(), 168);
        let t0 = s.points[0].0; // Monday 00:00 PDT
        let noon = s.at(t0 + 13.0 * 3600.0);
        let evening = s.at(t0 + 20.0 * 3600.0);
        assert!(noon < 120.0 && evening > 290.0, "{noon} {evening}");
        assert!((150.0..300.0).contains(&s.mean()));
    }

    #[test]
    fn moer_converts_from_pounds_per_megawatt_hour() {
        assert!((moer_to_g_per_kwh("lbs_co2_per_mwh", 1000.0).unwrap() - 453.59237).abs() < 1e-9);
        assert!(moer_to_g_per_kwh("furlongs", 1.0).is_none());
    }
}
