//! Reading history back from an InfluxDB 2.x server with Flux.

use super::*;

/// Reads history back from an InfluxDB 2.x server with Flux (warm start of
/// the forecaster). Servers that only implement the write API (such as
/// VictoriaMetrics) do not answer Flux.
pub struct InfluxHistory {
    client: influxdb2::Client,
    url: String,
    bucket: String,
}

impl InfluxHistory {
    /// A reader for `bucket` on the server at `url`.
    pub fn new(url: &str, org: &str, token: &str, bucket: &str) -> Result<InfluxHistory, SinkError> {
        // The crate panics on a bad URL: check first.
        reqwest::Url::parse(url).map_err(|e| SinkError::Config(format!("url {url:?}: {e}")))?;
        let client = influxdb2::ClientBuilder::new(url, org, token)
            .build()
            .map_err(|e| SinkError::Config(format!("influxdb2 client: {e}")))?;
        Ok(InfluxHistory { client, url: url.into(), bucket: bucket.into() })
    }

    /// The Flux query for per-class per-minute arrivals over `[from_ms, to_ms)`.
    pub fn class_minute_query(&self, from_ms: i64, to_ms: i64) -> String {
        let t = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
        };
        format!(
            "from(bucket: {bucket:?})\n  |> range(start: {start}, stop: {stop})\n  \
             |> filter(fn: (r) => r._measurement == \"{m}\" and (r._field == \"requests\" or r._field == \"tokens\"))\n  \
             |> group(columns: [\"class\", \"_field\"])\n  \
             |> aggregateWindow(every: 1m, fn: sum, timeSrc: \"_start\", createEmpty: false)",
            bucket = self.bucket,
            start = t(from_ms),
            stop = t(to_ms),
            m = measurement::ARRIVALS,
        )
    }

    /// Per-class per-minute arrivals over `[from_ms, to_ms)`, the same shape
    /// as [`crate::store::Store::class_minute_series`].
    pub async fn class_minute_series(&self, from_ms: i64, to_ms: i64) -> Result<ClassSeries, SinkError> {
        use influxdb2_structmap::value::Value;
        let q = influxdb2::models::Query::new(self.class_minute_query(from_ms, to_ms));
        let records = self
            .client
            .query_raw(Some(q))
            .await
            .map_err(|e| SinkError::Query { url: self.url.clone(), problem: e.to_string() })?;
        let from = from_ms.div_euclid(60_000) * 60_000;
        let n = ((to_ms - from).max(0) + 59_999) / 60_000;
        let mut out = ClassSeries {
            step_s: 60.0,
            requests: std::array::from_fn(|_| vec![0.0; n as usize]),
            tokens: std::array::from_fn(|_| vec![0.0; n as usize]),
        };
        for r in records {
            let get = |k: &str| r.values.get(k);
            let class = match get("class") {
                Some(Value::String(c)) => match RequestClass::parse(c) {
                    Ok(c) => c,
                    Err(_) => continue,
                },
                _ => continue,
            };
            let ts = match get("_time") {
                Some(Value::TimeRFC(t)) => t.timestamp_millis(),
                _ => continue,
            };
            let v = match get("_value") {
                Some(Value::Double(v)) => v.into_inner(),
                Some(Value::Long(v)) => *v as f64,
                Some(Value::UnsignedLong(v)) => *v as f64,
                _ => continue,
            };
            let bin = (ts - from).div_euclid(60_000);
            if bin < 0 || bin >= n {
                continue;
            }
            match get("_field") {
                Some(Value::String(f)) if f == "requests" => out.requests[class.index()][bin as usize] += v,
                Some(Value::String(f)) if f == "tokens" => out.tokens[class.index()][bin as usize] += v,
                _ => {}
            }
        }
        Ok(out)
    }
}
