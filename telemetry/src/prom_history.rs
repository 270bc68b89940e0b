//! A fleet's history from a Prometheus-compatible query API: every raw
//! sample of a series over a window (an instant query of a range vector,
//! `selector[Ns]`, whose answer is a `matrix`), and what counters and
//! histograms rose by over it, counter resets (an engine restarting) taken
//! as Prometheus's own `increase()` takes them.
//!
//! Raw samples rather than `rate()` or `increase()` answers: no
//! extrapolation to the window's edges, every increment binned where it
//! happened. Every input is hostile: the answer's size is bounded, the
//! request times out, an answer that cannot be read is one error naming the
//! URL, and a series that cannot be read is an error naming the series that
//! costs only itself.

use crate::config::Secret;
use crate::prom_query::{answer_elements, cut};
use crate::scrape::ScrapeError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The most samples one answer may hold (about 600 engines' series at a 15 s
/// scrape over an hour): past it, narrow the selector or the window.
pub const MAX_SAMPLES: usize = 20_000_000;

/// One series over a window: its name, its other labels and its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeSeries {
    /// Metric name (the `__name__` label).
    pub name: String,
    /// The other labels.
    pub labels: BTreeMap<String, String>,
    /// `(Unix s, value)` in time order.
    pub samples: Vec<(f64, f64)>,
}

impl RangeSeries {
    /// A label's value.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }

    /// What the series rose by over its samples, as a counter: a fall is a
    /// reset, after which the new value is all rise.
    pub fn increase(&self) -> f64 {
        self.increments().map(|(_, d)| d).sum()
    }

    /// Each rise between two samples, at the later sample's time (a reset's
    /// rise is the value after it).
    pub fn increments(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.samples.windows(2).map(|w| {
            let (a, b) = (w[0].1, w[1].1);
            (w[1].0, if b >= a { b - a } else { b })
        })
    }

    /// The mean of the values, each weighted by the time to the next sample
    /// (a gauge's time average over the samples' span); the last value alone
    /// when there is one sample.
    pub fn time_mean(&self) -> Option<f64> {
        match self.samples.as_slice() {
            [] => None,
            [one] => Some(one.1),
            s => {
                let span = s[s.len() - 1].0 - s[0].0;
                if span <= 0.0 {
                    return Some(s[s.len() - 1].1);
                }
                Some(s.windows(2).map(|w| w[0].1 * (w[1].0 - w[0].0)).sum::<f64>() / span)
            }
        }
    }
}

/// An answer: the series read, and those that could not be (and the server's warnings).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RangeAnswer {
    /// The series read.
    pub series: Vec<RangeSeries>,
    /// Series that could not be read, and the server's warnings.
    pub errors: Vec<ScrapeError>,
}

#[derive(Deserialize)]
struct Element {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    values: Option<Vec<(f64, String)>>,
    #[serde(default)]
    histograms: Option<serde::de::IgnoredAny>,
}

/// Read the JSON answer of a range-vector query (result type `matrix`). An
/// answer that is not one is an error naming `url`; a series that cannot be
/// read (a native histogram, a value that is not a finite number, times out
/// of order, no `__name__`) is an error naming `url` and the series, and only
/// it is left out. More than [`MAX_SAMPLES`] samples in all is an error.
pub fn parse_matrix(body: &str, url: &str) -> Result<RangeAnswer, ScrapeError> {
    let page_err = |problem: String| ScrapeError::Page { page: url.into(), problem };
    let (elements, errors) = answer_elements(body, url, "matrix", "a range vector")?;
    let mut out = RangeAnswer { series: Vec::new(), errors };
    let mut total = 0usize;
    for (i, raw) in elements.into_iter().enumerate() {
        let series_err = |series: String, problem: String| ScrapeError::Series { url: url.into(), series, problem };
        let e: Element = match serde_json::from_str(raw.get()) {
            Ok(e) => e,
            Err(err) => {
                out.errors.push(series_err(format!("#{}", i + 1), format!("not a series (JSON: {err})")));
                continue;
            }
        };
        let mut labels = e.metric;
        let name = labels.remove("__name__");
        let d = || describe(name.as_deref().unwrap_or(""), &labels);
        let Some(name) = name.clone() else {
            out.errors.push(series_err(format!("#{} {}", i + 1, d()), "has no __name__".into()));
            continue;
        };
        let Some(values) = e.values else {
            let problem = if e.histograms.is_some() { "a native histogram; not read" } else { "has no values" };
            out.errors.push(series_err(d(), problem.into()));
            continue;
        };
        total += values.len();
        if total > MAX_SAMPLES {
            return Err(page_err(format!(
                "over {MAX_SAMPLES} samples in the answer: narrow the selector or the window"
            )));
        }
        let mut samples = Vec::with_capacity(values.len());
        let mut bad = None;
        for (t, text) in &values {
            let v = match text.parse::<f64>() {
                Ok(v) if v.is_finite() => v,
                _ => {
                    bad = Some(format!("value {:?} at {t} is not a finite number", cut(text, 40)));
                    break;
                }
            };
            if !t.is_finite() || samples.last().is_some_and(|&(p, _): &(f64, f64)| *t <= p) {
                bad = Some(format!("sample time {t} is not after the one before it"));
                break;
            }
            samples.push((*t, v));
        }
        if let Some(problem) = bad {
            out.errors.push(series_err(d(), problem));
            continue;
        }
        out.series.push(RangeSeries { name, labels, samples });
    }
    Ok(out)
}

fn describe(name: &str, labels: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={:?}", cut(v, 80))).collect();
    cut(&format!("{name}{{{}}}", inner.join(",")), 300)
}

/// The range query for `metric` with the extra `selector` matchers over the
/// `window_s` seconds before the query's time.
pub fn range_query(metric: &str, selector: &str, window_s: u64) -> String {
    let sel = selector.trim().trim_matches(',');
    let extra = if sel.is_empty() { String::new() } else { format!(",{sel}") };
    format!("{{__name__=\"{metric}\"{extra}}}[{}s]", window_s.max(1))
}

/// A Prometheus-compatible query API to read a fleet's history from.
#[derive(Debug, Clone)]
pub struct PromHistory {
    client: reqwest::Client,
    /// `<url>/api/v1/query`.
    pub url: String,
    token: Option<Secret>,
    max_bytes: usize,
}

impl PromHistory {
    /// A reader of `base` (`http://prometheus:9090`), answers bounded to
    /// `max_response_mb`, each request to `timeout`.
    pub fn new(
        base: &str,
        token: Option<Secret>,
        timeout: Duration,
        max_response_mb: u64,
    ) -> Result<PromHistory, String> {
        let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
        reqwest::Url::parse(&url).map_err(|e| format!("--prometheus {base:?}: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| format!("prometheus: {e}"))?;
        let max_bytes = usize::try_from(max_response_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        Ok(PromHistory { client, url, token, max_bytes })
    }

    /// Every sample of `metric` (with the `selector` matchers) in the `window_s`
    /// seconds up to `at_s` (Unix s).
    pub async fn range(
        &self,
        metric: &str,
        selector: &str,
        at_s: f64,
        window_s: u64,
    ) -> Result<RangeAnswer, ScrapeError> {
        let query = range_query(metric, selector, window_s);
        let page_err = |problem: String| ScrapeError::Page { page: self.url.clone(), problem };
        let time = format!("{at_s:.3}");
        let mut req = self.client.post(&self.url).form(&[("query", query.as_str()), ("time", time.as_str())]);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let resp = req.send().await.map_err(|e| page_err(crate::prom_query::error_chain(&e)))?;
        let status = resp.status();
        let body = crate::prom_query::read_bounded(resp, self.max_bytes).await.map_err(page_err)?;
        if !status.is_success() {
            let why = match parse_matrix(&body, &self.url) {
                Err(ScrapeError::Page { problem, .. }) if problem.starts_with("the query failed") => problem,
                _ => cut(body.trim(), 300),
            };
            return Err(page_err(format!("HTTP {status} for {query}: {why}")));
        }
        parse_matrix(&body, &self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(samples: &[(f64, f64)]) -> RangeSeries {
        RangeSeries { name: "c".into(), labels: BTreeMap::new(), samples: samples.to_vec() }
    }

    #[test]
    fn counters_rise_through_resets_as_prometheus_counts_them() {
        let s = series(&[(0.0, 5.0), (1.0, 7.0), (2.0, 10.0), (3.0, 2.0), (4.0, 6.0)]);
        assert_eq!(s.increase(), 2.0 + 3.0 + 2.0 + 4.0);
        let inc: Vec<(f64, f64)> = s.increments().collect();
        assert_eq!(inc, [(1.0, 2.0), (2.0, 3.0), (3.0, 2.0), (4.0, 4.0)]);
        assert_eq!(series(&[(0.0, 5.0)]).increase(), 0.0);
        assert_eq!(series(&[]).time_mean(), None);
        // 100 W for 1 s, then 300 W for 3 s.
        let g = series(&[(0.0, 100.0), (1.0, 300.0), (4.0, 0.0)]);
        assert_eq!(g.time_mean(), Some(250.0));
    }

    #[test]
    fn the_range_query_names_the_metric_and_the_selector() {
        assert_eq!(
            range_query("vllm:request_success_total", "", 3600),
            "{__name__=\"vllm:request_success_total\"}[3600s]"
        );
        assert_eq!(range_query("x", "job=\"vllm\",", 0), "{__name__=\"x\",job=\"vllm\"}[1s]");
    }

    #[test]
    fn a_hostile_answer_is_an_error_naming_the_url_or_the_series() {
        let url = "http://prom:9090/api/v1/query";
        for (body, says) in [
            ("<html>502</html>", "not a query answer"),
            (r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#, "bad_data: parse error"),
            (r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#, "not a range vector"),
            (r#"{"status":"success","data":{"resultType":"matrix","result":7}}"#, "not a list of series"),
        ] {
            let e = parse_matrix(body, url).unwrap_err().to_string();
            assert!(e.contains(url) && e.contains(says), "{e}");
        }
        let body = r#"{"status":"success","warnings":["partial"],"data":{"resultType":"matrix","result":[
            {"metric":{"__name__":"vllm:request_success_total","instance":"a:1"},"values":[[1,"3"],[2,"5"]]},
            {"metric":{"__name__":"vllm:request_success_total","instance":"b:1"},"values":[[1,"3"],[2,"lots"]]},
            {"metric":{"__name__":"vllm:request_success_total","instance":"c:1"},"values":[[2,"3"],[1,"5"]]},
            {"metric":{"__name__":"vllm:request_success_total","instance":"d:1"},"values":[[1,"NaN"]]},
            {"metric":{"instance":"e:1"},"values":[[1,"1"]]},
            {"metric":{"__name__":"h"},"histograms":[[1,{}]]},
            7
        ]}}"#;
        let a = parse_matrix(body, url).unwrap();
        assert_eq!(a.series.len(), 1);
        assert_eq!(a.series[0].label("instance"), Some("a:1"));
        assert_eq!(a.series[0].increase(), 2.0);
        let e: Vec<String> = a.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(e.len(), 7, "{e:#?}");
        assert!(e[0].contains("partial"), "{e:#?}");
        assert!(e[1].contains("instance=\"b:1\"") && e[1].contains("\"lots\""), "{e:#?}");
        assert!(e[2].contains("instance=\"c:1\"") && e[2].contains("not after"), "{e:#?}");
        assert!(e[3].contains("instance=\"d:1\"") && e[3].contains("finite"), "{e:#?}");
        assert!(e[4].contains("has no __name__") && e[5].contains("native histogram") && e[6].contains("#7"));
    }
}
