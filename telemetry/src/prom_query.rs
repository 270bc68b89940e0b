//! Engine and GPU telemetry from a Prometheus-compatible query API
//! (Prometheus, Thanos, VictoriaMetrics) that already scrapes the engines and
//! the DCGM exporters: one instant query (`/api/v1/query`) for the latest
//! value of every series the engine page and the GPU pages are read from,
//! its answer turned back into those pages (the same samples a page's lines
//! give, so one computation, [`crate::scrape::EngineTracker`] included, makes
//! the engine and GPU samples either way), grouped by what they belong to:
//!
//! - an engine series (vLLM's or SGLang's names), and a `twin serve` engine's
//!   own GPU series, by the value of the instance label (`instance`: the
//!   `host:port` Prometheus scraped, which [`endpoint_host_port`] gives for a
//!   placement's endpoint);
//! - a DCGM exporter's GPU series by the node label (`Hostname`), else the
//!   host of its instance label, and its `gpu` label.
//!
//! Every input is hostile: the answer's size is bounded, a request times
//! out, a whole answer that cannot be read is one error naming the URL, and
//! a series that cannot be read (or holds an impossible value) is an error
//! naming the URL and the series that costs only itself.

use crate::config::{PrometheusConfig, Secret};
use crate::dcgm::{gpu_page_from, GpuPage, GpuSeries, DCGM, TWIN};
use crate::scrape::{engine_page_from, is_engine_series, EnginePage, SampleLine, ScrapeError};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::time::Duration;

/// One series of an answer: its name, its other labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Metric name (the `__name__` label).
    pub name: String,
    /// The other labels, in the answer's order.
    pub labels: Vec<(String, String)>,
    /// The value at the query's time.
    pub value: f64,
}

impl Series {
    /// A label's value.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(l, _)| l == name).map(|(_, v)| v.as_str())
    }

    /// `name{label="value",…}`, as errors name it (cut short past 300 characters).
    pub fn describe(&self) -> String {
        describe(&self.name, self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    fn sample_line(&self) -> SampleLine<'_> {
        SampleLine {
            name: &self.name,
            labels: self.labels.iter().map(|(k, v)| (k.as_str(), v.clone())).collect(),
            value: self.value,
        }
    }
}

fn describe<'a>(name: &str, labels: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    const MAX: usize = 300;
    let mut s = String::from(name);
    let mut first = true;
    for (k, v) in labels {
        s.push(if first { '{' } else { ',' });
        first = false;
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
        if s.len() > MAX {
            break;
        }
    }
    if !first {
        s.push('}');
    }
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// A query's answer: the series read, and those that could not be (and the
/// server's warnings, such as a partial answer's).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Answer {
    /// The series read.
    pub series: Vec<Series>,
    /// Series that could not be read, and the server's warnings.
    pub errors: Vec<ScrapeError>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    status: String,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, borrow)]
    data: Option<Data<'a>>,
    #[serde(default)]
    warnings: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Data<'a> {
    #[serde(rename = "resultType")]
    result_type: String,
    #[serde(borrow)]
    result: &'a RawValue,
}

#[derive(Deserialize)]
struct Element {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    value: Option<(serde_json::Value, String)>,
    #[serde(default)]
    histogram: Option<serde::de::IgnoredAny>,
}

/// The elements of a query answer of result type `want` (`vector`, `matrix`), and
/// the server's warnings as errors naming `url`. An answer that is not one (not
/// JSON, `status: error`, another result type) is an error naming `url`; `what`
/// names the wanted type in it ("an instant vector").
pub(crate) fn answer_elements<'a>(
    body: &'a str,
    url: &str,
    want: &str,
    what: &str,
) -> Result<(Vec<&'a RawValue>, Vec<ScrapeError>), ScrapeError> {
    let page_err = |problem: String| ScrapeError::Page { page: url.into(), problem };
    let env: Envelope<'_> =
        serde_json::from_str(body).map_err(|e| page_err(format!("not a query answer (JSON: {e})")))?;
    if env.status != "success" {
        let what = env.error_type.as_deref().unwrap_or("error");
        let why = env.error.as_deref().unwrap_or("(no message)");
        return Err(page_err(format!("the query failed: {what}: {}", cut(why, 500))));
    }
    let data = env.data.ok_or_else(|| page_err("a successful answer without data".into()))?;
    if data.result_type != want {
        return Err(page_err(format!("result type {:?}, not {what}", cut(&data.result_type, 40))));
    }
    let elements: Vec<&RawValue> = serde_json::from_str(data.result.get())
        .map_err(|e| page_err(format!("the result is not a list of series (JSON: {e})")))?;
    let warnings = env
        .warnings
        .unwrap_or_default()
        .iter()
        .take(10)
        .map(|w| page_err(format!("the server warns: {}", cut(w, 500))))
        .collect();
    Ok((elements, warnings))
}

/// Read the JSON answer of an instant query (`/api/v1/query`, result type
/// `vector`). An answer that is not one (not JSON, `status: error`, another
/// result type) is an error naming `url`; an element that is not a series
/// with a number (a native histogram, a value that is not a number, no
/// `__name__`) is an error naming `url` and the series, and only it is left out.
pub fn parse_answer(body: &str, url: &str) -> Result<Answer, ScrapeError> {
    let (elements, errors) = answer_elements(body, url, "vector", "an instant vector")?;
    let mut out = Answer { series: Vec::with_capacity(elements.len()), errors };
    for (i, raw) in elements.into_iter().enumerate() {
        let series_err = |series: String, problem: String| ScrapeError::Series { url: url.into(), series, problem };
        let e: Element = match serde_json::from_str(raw.get()) {
            Ok(e) => e,
            Err(err) => {
                out.errors.push(series_err(format!("#{}", i + 1), format!("not a series (JSON: {err})")));
                continue;
            }
        };
        let mut metric = e.metric;
        let Some(name) = metric.remove("__name__") else {
            let d = describe("", metric.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            out.errors.push(series_err(format!("#{} {d}", i + 1), "has no __name__".into()));
            continue;
        };
        let labels: Vec<(String, String)> = metric.into_iter().collect();
        let d = || describe(&name, labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let Some((_, text)) = e.value else {
            let problem = if e.histogram.is_some() { "a native histogram; not read" } else { "has no value" };
            out.errors.push(series_err(d(), problem.into()));
            continue;
        };
        let value = match text.as_str() {
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            t => match t.parse::<f64>() {
                Ok(v) => v,
                Err(_) => {
                    out.errors.push(series_err(d(), format!("value {:?} is not a number", cut(t, 40))));
                    continue;
                }
            },
        };
        out.series.push(Series { name, labels, value });
    }
    Ok(out)
}

pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Which labels place a series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// The label holding an engine series' `host:port` (`instance`).
    pub instance: String,
    /// The label holding a DCGM series' node (`Hostname`).
    pub node: String,
}

impl Default for LabelMap {
    fn default() -> Self {
        LabelMap { instance: "instance".into(), node: "Hostname".into() }
    }
}

/// An answer turned back into pages: what one scrape of every engine's page
/// and every node's DCGM exporter would have given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Pages {
    /// Engine pages, by their instance label's value (lowercase).
    pub engines: BTreeMap<String, EnginePage>,
    /// The GPUs a `twin serve` engine's page carries, by its instance label's value (lowercase).
    pub engine_gpus: BTreeMap<String, GpuPage>,
    /// DCGM exporter pages, by node (the node label, else the instance label's host; lowercase).
    pub node_gpus: BTreeMap<String, GpuPage>,
    /// Series that could not be read or placed.
    pub errors: Vec<ScrapeError>,
}

/// Turn an answer's series into pages (see [`Pages`]): each group of series
/// through the same reading as a page's lines. A series without the label
/// that places it is an error naming it; series of no engine or GPU are passed over.
pub fn pages(answer: &Answer, url: &str, labels: &LabelMap) -> Pages {
    let mut out = Pages { errors: answer.errors.clone(), ..Pages::default() };
    let (mut engines, mut twin, mut dcgm): (Groups, Groups, Groups) = Default::default();
    let is_gpu = |n: &GpuSeries, name: &str| {
        name == n.power_w
            || name == n.energy.0
            || name == n.sm_clock_mhz
            || n.util.is_some_and(|u| u.0 == name)
            || n.temperature_c == Some(name)
    };
    for (i, s) in answer.series.iter().enumerate() {
        let instance = s.label(&labels.instance).map(str::to_ascii_lowercase);
        let (groups, key, wants) = if is_engine_series(&s.name) {
            (&mut engines, instance, &labels.instance)
        } else if is_gpu(&TWIN, &s.name) {
            (&mut twin, instance, &labels.instance)
        } else if is_gpu(&DCGM, &s.name) {
            let node = s.label(&labels.node).map(str::to_ascii_lowercase).or_else(|| instance.map(|i| host_of(&i)));
            (&mut dcgm, node, &labels.node)
        } else {
            continue;
        };
        match key.filter(|k| !k.is_empty()) {
            Some(k) => groups.entry(k).or_default().push(i),
            None => out.errors.push(ScrapeError::Series {
                url: url.into(),
                series: s.describe(),
                problem: format!("has no {wants} label to place it by"),
            }),
        }
    }
    let err = |i: usize, problem: String| ScrapeError::Series {
        url: url.into(),
        series: answer.series.get(i).map_or_else(|| format!("#{i}"), Series::describe),
        problem,
    };
    let lines = |idx: &[usize]| idx.iter().map(|&i| (i, Ok(answer.series[i].sample_line()))).collect::<Vec<_>>();
    for (key, idx) in engines {
        match engine_page_from(lines(&idx), &err) {
            Ok(mut page) => {
                out.errors.append(&mut page.errors);
                out.engines.insert(key, page);
            }
            Err(mut errors) => out.errors.append(&mut errors),
        }
    }
    for (names, groups, into) in [(&TWIN, twin, &mut out.engine_gpus), (&DCGM, dcgm, &mut out.node_gpus)] {
        for (key, idx) in groups {
            let mut page = gpu_page_from(lines(&idx), names, &err);
            out.errors.append(&mut page.errors);
            if !page.gpus.is_empty() {
                into.insert(key, page);
            }
        }
    }
    out
}

type Groups = BTreeMap<String, Vec<usize>>;

/// The host of a `host:port` (IPv6 in brackets kept as it is).
fn host_of(host_port: &str) -> String {
    match host_port.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.is_empty() => h.to_string(),
        _ => host_port.to_string(),
    }
}

/// The `host:port` Prometheus scrapes an engine endpoint at, as its
/// `instance` label gives it: the URL's host in lowercase and its port, or
/// the scheme's when it names none. `None` for what is not an http(s) URL.
pub fn endpoint_host_port(endpoint: &str) -> Option<String> {
    let u = reqwest::Url::parse(endpoint).ok()?;
    if !matches!(u.scheme(), "http" | "https") {
        return None;
    }
    let host = u.host_str()?.to_ascii_lowercase();
    Some(format!("{host}:{}", u.port_or_known_default()?))
}

/// The keys an instance label may name an endpoint by: its `host:port`, and
/// its bare host when the port is the scheme's own (Prometheus 3 no longer
/// adds a default port to a target that names none).
pub fn endpoint_keys(endpoint: &str) -> Vec<String> {
    let Some(hp) = endpoint_host_port(endpoint) else { return Vec::new() };
    let mut keys = vec![hp.clone()];
    if let Ok(u) = reqwest::Url::parse(endpoint) {
        if u.port().is_none() {
            keys.push(host_of(&hp));
        }
    }
    keys
}

/// The name of a placement's node that a DCGM exporter's `Hostname` gives:
/// what follows the site (`dc1/node7` → `node7`), in lowercase.
pub fn node_host(node: &str) -> String {
    node.rsplit('/').next().unwrap_or(node).to_ascii_lowercase()
}

/// The query: the latest value of every series an engine page, a DCGM page
/// or a twin engine's GPUs are read from, with the extra `selector` matchers.
pub fn query_text(selector: &str) -> String {
    let mut names = crate::scrape::engine_series_names();
    for n in [&DCGM, &TWIN] {
        names.extend([n.power_w, n.energy.0, n.sm_clock_mhz].map(str::to_string));
        names.extend(n.util.map(|u| u.0.to_string()));
        names.extend(n.temperature_c.map(str::to_string));
    }
    names.sort();
    names.dedup();
    // RE2 metacharacters would need escaping; the names hold none but `:`/`_`.
    let alternatives: Vec<String> = names.iter().map(|n| regex_escape(n)).collect();
    let sel = selector.trim().trim_matches(',');
    let extra = if sel.is_empty() { String::new() } else { format!(",{sel}") };
    format!("{{__name__=~\"{}\"{extra}}}", alternatives.join("|"))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            // In a PromQL string, a backslash is itself escaped.
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

/// A Prometheus-compatible query API to read telemetry from (`[telemetry.prometheus]`).
#[derive(Debug, Clone)]
pub struct PromSource {
    client: reqwest::Client,
    /// `<url>/api/v1/query`.
    pub url: String,
    /// The query sent.
    pub query: String,
    token: Option<Secret>,
    max_bytes: usize,
    /// Which labels place a series.
    pub labels: LabelMap,
    /// How often to ask.
    pub interval: Duration,
}

impl PromSource {
    /// The source `[telemetry.prometheus]` describes, `None` when it has no
    /// `url`. The token file is read now; errors name the key.
    pub fn from_config(cfg: &PrometheusConfig) -> Result<Option<PromSource>, String> {
        let Some(base) = &cfg.url else { return Ok(None) };
        let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
        reqwest::Url::parse(&url).map_err(|e| format!("prometheus.url: {base:?}: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
            .build()
            .map_err(|e| format!("prometheus: {e}"))?;
        Ok(Some(PromSource {
            client,
            url,
            query: query_text(&cfg.selector),
            token: cfg.bearer()?,
            max_bytes: usize::try_from(cfg.max_response_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
            labels: LabelMap { instance: cfg.instance_label.clone(), node: cfg.node_label.clone() },
            interval: cfg.interval(),
        }))
    }

    /// Ask once: the answer as it came (see [`parse_answer`]); errors name the URL.
    pub async fn query(&self) -> Result<Answer, ScrapeError> {
        let page_err = |problem: String| ScrapeError::Page { page: self.url.clone(), problem };
        let mut req = self.client.post(&self.url).form(&[("query", self.query.as_str())]);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let resp = req.send().await.map_err(|e| page_err(error_chain(&e)))?;
        let status = resp.status();
        let body = read_bounded(resp, self.max_bytes).await.map_err(page_err)?;
        if !status.is_success() {
            // The API's own error answer says why (bad_data, timeout, …).
            let why = match parse_answer(&body, &self.url) {
                Err(ScrapeError::Page { problem, .. }) if problem.starts_with("the query failed") => problem,
                _ => cut(body.trim(), 300),
            };
            return Err(page_err(format!("HTTP {status}: {why}")));
        }
        parse_answer(&body, &self.url)
    }

    /// Ask once and turn the answer into pages (see [`pages`]).
    pub async fn read(&self) -> Result<Pages, ScrapeError> {
        let answer = self.query().await?;
        Ok(pages(&answer, &self.url, &self.labels))
    }
}

/// An error and its sources, one line (reqwest's own says only "error sending request").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A response's body as text, refused past `max` bytes (by its declared
/// length, or as it arrives).
pub(crate) async fn read_bounded(mut resp: reqwest::Response, max: usize) -> Result<String, String> {
    let too_big = |n: String| format!("the answer is {n} bytes, over the {} MiB read (max_response_mb)", max >> 20);
    if let Some(n) = resp.content_length().filter(|&n| n > max as u64) {
        return Err(too_big(n.to_string()));
    }
    let mut buf = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if buf.len() + c.len() > max {
            return Err(too_big(format!("over {}", buf.len() + c.len())));
        }
        buf.extend_from_slice(&c);
    }
    String::from_utf8(buf).map_err(|e| format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to() + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_give_the_instance_label_prometheus_would() {
        assert_eq!(endpoint_host_port("http://127.0.0.1:8000").as_deref(), Some("127.0.0.1:8000"));
        assert_eq!(endpoint_host_port("http://Node7:8000/v1/").as_deref(), Some("node7:8000"));
        assert_eq!(endpoint_host_port("https://e.example").as_deref(), Some("e.example:443"));
        assert_eq!(endpoint_host_port("http://[::1]:9000").as_deref(), Some("[::1]:9000"));
        assert_eq!(endpoint_host_port("node7:8000"), None);
        assert_eq!(endpoint_keys("http://e.example"), ["e.example:80", "e.example"]);
        assert_eq!(endpoint_keys("http://e:8000"), ["e:8000"]);
        assert_eq!(node_host("dc1/Node7"), "node7");
        assert_eq!(node_host("node7"), "node7");
        assert_eq!(host_of("[::1]:9400"), "[::1]");
        assert_eq!(host_of("node7"), "node7");
    }

    #[test]
    fn the_query_asks_for_every_series_read_and_the_selector() {
        let q = query_text("job=\"vllm\"");
        assert!(q.starts_with("{__name__=~\"") && q.ends_with(",job=\"vllm\"}"), "{q}");
        for n in ["vllm:num_requests_running", "vllm:time_to_first_token_seconds_bucket", "sglang:num_queue_reqs"] {
            assert!(q.contains(n), "{n}");
        }
        assert!(q.contains("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") && q.contains("dynamollm_twin_gpu_power_watts"));
        assert!(!query_text("").contains(",}"));
    }

    #[test]
    fn a_hostile_answer_is_an_error_naming_the_url_or_the_series() {
        let url = "http://prom:9090/api/v1/query";
        for (body, says) in [
            ("<html>502</html>", "not a query answer"),
            (r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#, "bad_data: parse error"),
            (r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#, "not an instant vector"),
            (r#"{"status":"success","data":{"resultType":"vector","result":{}}}"#, "not a list of series"),
        ] {
            let e = parse_answer(body, url).unwrap_err().to_string();
            assert!(e.contains(url) && e.contains(says), "{e}");
        }
        let body = r#"{"status":"success","warnings":["partial"],"data":{"resultType":"vector","result":[
            {"metric":{"__name__":"vllm:num_requests_running","instance":"a:1"},"value":[1.5,"3"]},
            {"metric":{"__name__":"vllm:num_requests_waiting","instance":"a:1"},"value":[1.5,"many"]},
            {"metric":{"instance":"a:1"},"value":[1.5,"1"]},
            {"metric":{"__name__":"vllm:x","instance":"a:1"},"histogram":[1.5,{}]},
            7,
            {"metric":{"__name__":"vllm:num_requests_running"},"value":[1.5,"1"]},
            {"metric":{"__name__":"vllm:num_requests_waiting","instance":"a:1"},"value":[1.5,"-2"]}
        ]}}"#;
        let a = parse_answer(body, url).unwrap();
        assert_eq!(a.series.len(), 3);
        let e: Vec<String> = a.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(e.len(), 5, "{e:#?}");
        assert!(e[0].contains("partial"), "{e:#?}");
        assert!(e[1].contains("series vllm:num_requests_waiting{instance=\"a:1\"}: value \"many\""), "{e:#?}");
        assert!(e[2].contains("has no __name__") && e[3].contains("native histogram") && e[4].contains("#5"));
        let p = pages(&a, url, &LabelMap::default());
        let m = &p.engines["a:1"].models[""];
        assert_eq!((m.running, m.waiting), (Some(3.0), None));
        let e: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        assert!(e.iter().any(|e| e.contains("has no instance label")), "{e:#?}");
        assert!(e
            .iter()
            .any(|e| e.contains("num_requests_waiting{instance=\"a:1\"}: vllm:num_requests_waiting is negative")));
    }

    #[test]
    fn descriptions_are_escaped_and_bounded() {
        let s = Series { name: "x".into(), labels: vec![("a".into(), "q\"\\\n".into())], value: 1.0 };
        assert_eq!(s.describe(), "x{a=\"q\\\"\\\\\\n\"}");
        let long = Series { name: "x".into(), labels: vec![("a".into(), "é".repeat(400))], value: 1.0 };
        assert!(long.describe().chars().count() < 320 && long.describe().ends_with('…'));
    }
}
