//! Typed samples, with units in field names, and the scalar [`Point`]s they
//! flatten into for the stores.
//!
//! A sample is one reading of one thing (a GPU, an engine instance, the
//! arrivals of one request class) at one time. Stores keep scalar series: a
//! series is a measurement, a field and a set of tags ([`SeriesKey`]), named
//! `measurement_field` — the same name InfluxDB-compatible stores such as
//! VictoriaMetrics give the line-protocol point `measurement,tags field=value`.

use crate::class::RequestClass;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a sample comes from. Every tag is optional; absent tags are not
/// written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    /// Site (data centre or edge location).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Node (server) within the site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// GPU index on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
    /// Engine instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Pool the instance serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Request class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<RequestClass>,
    /// Model served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Tags {
    /// Tags of one site and node.
    pub fn node(site: &str, node: &str) -> Tags {
        Tags { site: Some(site.into()), node: Some(node.into()), ..Tags::default() }
    }

    /// The present tags as `(key, value)`, sorted by key.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(7);
        if let Some(c) = self.class {
            out.push(("class".to_string(), c.to_string()));
        }
        if let Some(g) = self.gpu {
            out.push(("gpu".to_string(), g.to_string()));
        }
        let strings = [("instance", &self.instance), ("model", &self.model), ("node", &self.node)];
        for (k, v) in strings {
            if let Some(v) = v {
                out.push((k.to_string(), v.clone()));
            }
        }
        for (k, v) in [("pool", &self.pool), ("site", &self.site)] {
            if let Some(v) = v {
                out.push((k.to_string(), v.clone()));
            }
        }
        out
    }
}

/// One reading of one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSample {
    /// Unix time of the reading, milliseconds.
    pub ts_ms: i64,
    /// Site, node and GPU index.
    #[serde(default)]
    pub tags: Tags,
    /// Board power. From the energy counter's delta when there is one.
    pub power_w: f64,
    /// Energy counter (monotonic, since the driver loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_j: Option<f64>,
    /// SM clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    /// GPU utilisation, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub util: Option<f64>,
    /// GPU temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f64>,
    /// NVML clock throttle reasons bit mask (`nvmlClocksThrottleReason*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_reasons: Option<u64>,
}

/// Latency distribution over one scrape interval, from histogram bucket deltas.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySummary {
    /// Observations in the interval.
    pub count: f64,
    /// Sum of the observations in the interval.
    pub sum_s: f64,
    /// Median.
    pub p50_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
    /// 99th percentile.
    pub p99_s: f64,
}

/// One reading of one engine instance (vLLM, SGLang, or the twin).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSample {
    /// Unix time of the reading, milliseconds.
    pub ts_ms: i64,
    /// Site, node, instance, pool and model.
    #[serde(default)]
    pub tags: Tags,
    /// Time to first token since the previous reading (absent without new requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft: Option<LatencySummary>,
    /// Time between tokens since the previous reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tbt: Option<LatencySummary>,
    /// Requests running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    /// Requests waiting (queue depth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<f64>,
    /// KV cache usage, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_usage: Option<f64>,
    /// Prompt token counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_total: Option<f64>,
    /// Generation token counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_tokens_total: Option<f64>,
}

/// Arrivals of one request class over one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrivalSample {
    /// Unix time of the interval's start, milliseconds.
    pub ts_ms: i64,
    /// Site, node, pool; `class` is set.
    #[serde(default)]
    pub tags: Tags,
    /// Requests that arrived.
    pub requests: f64,
    /// Prompt + output tokens of those requests.
    pub tokens: f64,
}

/// Any sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// A GPU reading.
    Gpu(GpuSample),
    /// An engine reading.
    Engine(EngineSample),
    /// Per-class arrivals.
    Arrivals(ArrivalSample),
}

/// Measurement names.
pub mod measurement {
    /// GPU samples.
    pub const GPU: &str = "gpu";
    /// Engine samples.
    pub const ENGINE: &str = "engine";
    /// Arrival samples.
    pub const ARRIVALS: &str = "arrivals";
}

impl Sample {
    /// Unix time of the sample, milliseconds.
    pub fn ts_ms(&self) -> i64 {
        match self {
            Sample::Gpu(s) => s.ts_ms,
            Sample::Engine(s) => s.ts_ms,
            Sample::Arrivals(s) => s.ts_ms,
        }
    }

    /// The sample as scalar points, one per present field.
    pub fn points(&self) -> Vec<Point> {
        let mut fields: Vec<(&'static str, f64)> = Vec::with_capacity(16);
        let (m, tags, ts_ms) = match self {
            Sample::Gpu(s) => {
                fields.push(("power_w", s.power_w));
                opt(&mut fields, "energy_j", s.energy_j);
                opt(&mut fields, "sm_clock_mhz", s.sm_clock_mhz.map(f64::from));
                opt(&mut fields, "util", s.util);
                opt(&mut fields, "temperature_c", s.temperature_c);
                opt(&mut fields, "throttle_reasons", s.throttle_reasons.map(|b| b as f64));
                (measurement::GPU, &s.tags, s.ts_ms)
            }
            Sample::Engine(s) => {
                for (prefix, l) in [("ttft", &s.ttft), ("tbt", &s.tbt)] {
                    if let Some(l) = l {
                        let names: [&'static str; 5] = if prefix == "ttft" {
                            ["ttft_count", "ttft_sum_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s"]
                        } else {
                            ["tbt_count", "tbt_sum_s", "tbt_p50_s", "tbt_p90_s", "tbt_p99_s"]
                        };
                        for (n, v) in names.into_iter().zip([l.count, l.sum_s, l.p50_s, l.p90_s, l.p99_s]) {
                            fields.push((n, v));
                        }
                    }
                }
                opt(&mut fields, "running", s.running);
                opt(&mut fields, "waiting", s.waiting);
                opt(&mut fields, "kv_usage", s.kv_usage);
                opt(&mut fields, "prompt_tokens_total", s.prompt_tokens_total);
                opt(&mut fields, "generation_tokens_total", s.generation_tokens_total);
                (measurement::ENGINE, &s.tags, s.ts_ms)
            }
            Sample::Arrivals(s) => {
                fields.push(("requests", s.requests));
                fields.push(("tokens", s.tokens));
                (measurement::ARRIVALS, &s.tags, s.ts_ms)
            }
        };
        let tags = tags.pairs();
        fields
            .into_iter()
            .map(|(f, value)| Point {
                series: SeriesKey { measurement: m.to_string(), field: f.to_string(), tags: tags.clone() },
                ts_ms,
                value,
            })
            .collect()
    }
}

fn opt(fields: &mut Vec<(&'static str, f64)>, name: &'static str, v: Option<f64>) {
    if let Some(v) = v {
        fields.push((name, v));
    }
}

/// A scalar series: measurement, field and tags (sorted by key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeriesKey {
    /// Measurement (`gpu`, `engine`, `arrivals`, …).
    pub measurement: String,
    /// Field (`power_w`, …).
    pub field: String,
    /// Tags, sorted by key, keys unique.
    pub tags: Vec<(String, String)>,
}

impl SeriesKey {
    /// A series key; sorts the tags.
    pub fn new(measurement: &str, field: &str, tags: &[(&str, &str)]) -> SeriesKey {
        let mut tags: Vec<(String, String)> = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        tags.sort();
        SeriesKey { measurement: measurement.into(), field: field.into(), tags }
    }

    /// `measurement_field`, the metric name InfluxDB-compatible stores use.
    pub fn name(&self) -> String {
        format!("{}_{}", self.measurement, self.field)
    }

    /// The value of one tag.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for SeriesKey {
    /// `measurement_field{k="v",…}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}{{", self.measurement, self.field)?;
        for (i, (k, v)) in self.tags.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v:?}")?;
        }
        f.write_str("}")
    }
}

/// One value of one series at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The series.
    pub series: SeriesKey,
    /// Unix time, milliseconds.
    pub ts_ms: i64,
    /// The value.
    pub value: f64,
}

/// Unix time now, milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_sample_flattens_into_named_points_with_sorted_tags() {
        let s = Sample::Gpu(GpuSample {
            ts_ms: 1000,
            tags: Tags { gpu: Some(3), ..Tags::node("s1", "n1") },
            power_w: 350.0,
            energy_j: Some(12.5),
            sm_clock_mhz: Some(1980),
            util: None,
            temperature_c: None,
            throttle_reasons: Some(4),
        });
        let p = s.points();
        let names: Vec<String> = p.iter().map(|p| p.series.name()).collect();
        assert_eq!(names, ["gpu_power_w", "gpu_energy_j", "gpu_sm_clock_mhz", "gpu_throttle_reasons"]);
        assert_eq!(p[0].series.to_string(), r#"gpu_power_w{gpu="3",node="n1",site="s1"}"#);
        assert_eq!(p[2].value, 1980.0);
        assert!(p.iter().all(|p| p.ts_ms == 1000));
    }
}
