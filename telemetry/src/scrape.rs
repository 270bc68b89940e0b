//! Engine scrape: the Prometheus text pages of vLLM and SGLang (and of
//! `dynamollm twin serve`, which uses vLLM's names), parsed into per-model
//! engine metrics; TTFT/TBT percentiles from the histogram bucket deltas
//! between two scrapes, interpolated inside the bucket as Prometheus'
//! `histogram_quantile` does; counter resets handled.
//!
//! The line parser is our own, small and strict, because the page must be read
//! line by line: a malformed line is an error naming the page and line, is
//! counted, and the good lines around it are kept. (`prometheus-parse`, used
//! elsewhere for the twin's GPU page, rejects the `:` that both vLLM and SGLang
//! put in metric names, splits labels on every comma, and fails whole pages.)

use crate::sample::{EngineSample, Sample, Tags};
use crate::stats::CollectorStats;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A scrape that failed or a line that could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScrapeError {
    /// One line of the page is malformed; the rest of the page is still read.
    #[error("metrics page {page} line {line}: {problem}")]
    Line {
        /// The page (URL or file).
        page: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The page as a whole: unreachable, an HTTP error, or no engine metrics in it.
    #[error("metrics page {page}: {problem}")]
    Page {
        /// The page.
        page: String,
        /// What is wrong.
        problem: String,
    },
    /// One series of a Prometheus query's answer; the other series are still read.
    #[error("query {url} series {series}: {problem}")]
    Series {
        /// The query API's URL.
        url: String,
        /// The series (`name{label="value",…}`, cut short when long).
        series: String,
        /// What is wrong.
        problem: String,
    },
}

/// The engine that wrote a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// vLLM (and the twin).
    Vllm,
    /// SGLang.
    Sglang,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Field {
    Ttft,
    Tbt,
    E2e,
    Running,
    Waiting,
    KvUsage,
    PromptTokens,
    GenerationTokens,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Bucket,
    Sum,
    Count,
    Value,
}

/// Metric names of each engine. Older names come after newer ones.
const NAMES: &[(&str, EngineKind, Field)] = &[
    ("vllm:time_to_first_token_seconds", EngineKind::Vllm, Field::Ttft),
    ("vllm:inter_token_latency_seconds", EngineKind::Vllm, Field::Tbt),
    ("vllm:time_per_output_token_seconds", EngineKind::Vllm, Field::Tbt),
    ("vllm:e2e_request_latency_seconds", EngineKind::Vllm, Field::E2e),
    ("vllm:num_requests_running", EngineKind::Vllm, Field::Running),
    ("vllm:num_requests_waiting", EngineKind::Vllm, Field::Waiting),
    ("vllm:kv_cache_usage_perc", EngineKind::Vllm, Field::KvUsage),
    ("vllm:gpu_cache_usage_perc", EngineKind::Vllm, Field::KvUsage),
    ("vllm:prompt_tokens_total", EngineKind::Vllm, Field::PromptTokens),
    ("vllm:generation_tokens_total", EngineKind::Vllm, Field::GenerationTokens),
    ("sglang:time_to_first_token_seconds", EngineKind::Sglang, Field::Ttft),
    ("sglang:inter_token_latency_seconds", EngineKind::Sglang, Field::Tbt),
    ("sglang:time_per_output_token_seconds", EngineKind::Sglang, Field::Tbt),
    ("sglang:e2e_request_latency_seconds", EngineKind::Sglang, Field::E2e),
    ("sglang:num_running_reqs", EngineKind::Sglang, Field::Running),
    ("sglang:num_queue_reqs", EngineKind::Sglang, Field::Waiting),
    ("sglang:token_usage", EngineKind::Sglang, Field::KvUsage),
    ("sglang:prompt_tokens_total", EngineKind::Sglang, Field::PromptTokens),
    ("sglang:generation_tokens_total", EngineKind::Sglang, Field::GenerationTokens),
];

/// Every series name an engine page is read from (histograms as their
/// `_bucket`, `_sum` and `_count` series): what a query for engine metrics asks for.
pub fn engine_series_names() -> Vec<String> {
    let mut out = Vec::new();
    for &(base, _, field) in NAMES {
        if matches!(field, Field::Ttft | Field::Tbt | Field::E2e) {
            out.extend(["_bucket", "_sum", "_count"].map(|p| format!("{base}{p}")));
        } else {
            out.push(base.to_string());
        }
    }
    out
}

/// Whether a series is one an engine page is read from.
pub(crate) fn is_engine_series(name: &str) -> bool {
    classify(name).is_some()
}

fn classify(name: &str) -> Option<(usize, EngineKind, Field, Part)> {
    for (i, &(base, kind, field)) in NAMES.iter().enumerate() {
        let histogram = matches!(field, Field::Ttft | Field::Tbt | Field::E2e);
        if let Some(rest) = name.strip_prefix(base) {
            let part = match rest {
                "" if !histogram => Part::Value,
                "_bucket" if histogram => Part::Bucket,
                "_sum" if histogram => Part::Sum,
                "_count" if histogram => Part::Count,
                _ => continue,
            };
            return Some((i, kind, field, part));
        }
    }
    None
}

pub use crate::histogram::{Bucket, Histogram};

/// The engine metrics of one model on a page (summed over other labels, such
/// as vLLM's `engine`; KV usage takes the highest).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineMetrics {
    /// TTFT histogram.
    pub ttft: Option<Histogram>,
    /// TBT (inter-token latency) histogram.
    pub tbt: Option<Histogram>,
    /// End-to-end latency histogram.
    pub e2e: Option<Histogram>,
    /// Requests running.
    pub running: Option<f64>,
    /// Requests waiting.
    pub waiting: Option<f64>,
    /// KV cache usage, 0–1.
    pub kv_usage: Option<f64>,
    /// Prompt token counter.
    pub prompt_tokens_total: Option<f64>,
    /// Generation token counter.
    pub generation_tokens_total: Option<f64>,
}

/// A parsed page.
#[derive(Debug, Clone, PartialEq)]
pub struct EnginePage {
    /// The engine, from the metric names.
    pub kind: EngineKind,
    /// Metrics per `model_name` label (`""` when the page has none).
    pub models: BTreeMap<String, EngineMetrics>,
    /// Malformed lines, skipped.
    pub errors: Vec<ScrapeError>,
}

/// One sample line: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleLine<'a> {
    /// Metric name.
    pub name: &'a str,
    /// Labels in page order, values unescaped.
    pub labels: Vec<(&'a str, String)>,
    /// Value.
    pub value: f64,
}

/// Parse one line of the Prometheus text format. `Ok(None)` for blank and
/// comment lines; `Err((byte, problem))` for a malformed one.
pub fn parse_line(line: &str) -> Result<Option<SampleLine<'_>>, (usize, String)> {
    let s = line.trim_end_matches('\r');
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b'\t') {
        i += 1;
    }
    if i == bytes.len() || bytes[i] == b'#' {
        return Ok(None);
    }
    let start = i;
    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
        i += 1;
    }
    if i == start || bytes[start].is_ascii_digit() {
        return Err((start, "expected a metric name".into()));
    }
    let name = &s[start..i];
    let mut labels = Vec::new();
    if i < bytes.len() && bytes[i] == b'{' {
        i += 1;
        loop {
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            if i < bytes.len() && bytes[i] == b'}' {
                i += 1;
                break;
            }
            let ls = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            if i == ls {
                return Err((i, "expected a label name or '}'".into()));
            }
            let lname = &s[ls..i];
            if i >= bytes.len() || bytes[i] != b'=' {
                return Err((i, format!("expected '=' after label {lname}")));
            }
            i += 1;
            if i >= bytes.len() || bytes[i] != b'"' {
                return Err((i, format!("expected '\"' to open the value of label {lname}")));
            }
            i += 1;
            let mut value = String::new();
            let mut closed = false;
            let mut chars = s[i..].char_indices();
            while let Some((off, c)) = chars.next() {
                match c {
                    '"' => {
                        i += off + 1;
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((o, other)) => return Err((i + o, format!("unknown escape \\{other} in label {lname}"))),
                        None => break,
                    },
                    c => value.push(c),
                }
            }
            if !closed {
                return Err((bytes.len(), format!("unterminated value of label {lname}")));
            }
            labels.push((lname, value));
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            match bytes.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Err((i, "expected ',' or '}' after a label".into())),
            }
        }
    }
    if i >= bytes.len() || !(bytes[i] == b' ' || bytes[i] == b'\t') {
        return Err((i, format!("expected a space and a value after {name}")));
    }
    let rest = &s[i..];
    let mut parts = rest.split_ascii_whitespace();
    let vtext = parts.next().ok_or((i, format!("missing value after {name}")))?;
    let value = match vtext {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        t => t.parse::<f64>().map_err(|_| (i + 1, format!("value {t:?} is not a number")))?,
    };
    if let Some(ts) = parts.next() {
        ts.parse::<i64>().map_err(|_| (i, format!("timestamp {ts:?} is not an integer")))?;
    }
    if let Some(extra) = parts.next() {
        return Err((i, format!("unexpected {extra:?} after the value")));
    }
    Ok(Some(SampleLine { name, labels, value }))
}

/// Parse a vLLM or SGLang `/metrics` page. `page` names it in errors (a URL
/// or a file). Malformed lines are skipped and listed in
/// [`EnginePage::errors`]; the page is an error only when it holds no engine
/// metric at all.
pub fn parse_engine_page(text: &str, page: &str) -> Result<EnginePage, ScrapeError> {
    let line_err = |n: usize, problem: String| ScrapeError::Line { page: page.into(), line: n + 1, problem };
    engine_page_from(page_samples(text), &line_err).map_err(|errors| {
        let lines = text.lines().count();
        let first = errors.first().map(|e| format!(" (first error: {e})")).unwrap_or_default();
        ScrapeError::Page { page: page.into(), problem: format!("no vLLM or SGLang metrics in {lines} lines{first}") }
    })
}

/// The samples of a page's lines, each with its 0-based line number, or why
/// the line could not be read (blank and comment lines left out).
pub(crate) fn page_samples(text: &str) -> impl Iterator<Item = (usize, Result<SampleLine<'_>, String>)> {
    text.lines().enumerate().filter_map(|(n, line)| match parse_line(line) {
        Ok(Some(s)) => Some((n, Ok(s))),
        Ok(None) => None,
        Err((byte, problem)) => Some((n, Err(format!("byte {}: {problem}", byte + 1)))),
    })
}

/// The engine metrics of a set of samples (a page's lines, or the series of
/// a Prometheus query's answer): one computation for both. Each sample comes
/// with its place (a line's or a series' index) or why it could not be read;
/// `err` turns a place and a problem into the error that names it. A sample
/// that cannot be read, or holds an impossible value, costs only itself.
/// `Err` (with the errors met) when no sample is an engine metric.
pub(crate) fn engine_page_from<'a>(
    samples: impl IntoIterator<Item = (usize, Result<SampleLine<'a>, String>)>,
    err: &dyn Fn(usize, String) -> ScrapeError,
) -> Result<EnginePage, Vec<ScrapeError>> {
    let mut kind = None;
    let mut models: BTreeMap<String, EngineMetrics> = BTreeMap::new();
    let mut errors = Vec::new();
    // First pass: every engine line, checked. Which name each field is read
    // from and which tensor-parallel rank stands for its replica are decided
    // once the whole page is known.
    struct Read<'a> {
        name: usize,
        kind: EngineKind,
        field: Field,
        part: Part,
        model: String,
        le: Option<f64>,
        v: f64,
        labels: Vec<(&'a str, String)>,
    }
    let mut read: Vec<Read<'_>> = Vec::new();
    for (n, sample) in samples {
        let sample = match sample {
            Ok(s) => s,
            Err(problem) => {
                errors.push(err(n, problem));
                continue;
            }
        };
        let Some((name, k, field, part)) = classify(sample.name) else { continue };
        let model = sample.labels.iter().find(|(l, _)| *l == "model_name").map(|(_, v)| v.clone()).unwrap_or_default();
        let v = sample.value;
        if part != Part::Bucket && !v.is_finite() {
            errors.push(err(n, format!("{} is {v}", sample.name)));
            continue;
        }
        if v < 0.0 {
            errors.push(err(n, format!("{} is negative ({v})", sample.name)));
            continue;
        }
        let le = if part == Part::Bucket {
            match sample.labels.iter().find(|(l, _)| *l == "le").map(|(_, v)| v.as_str()) {
                Some("+Inf") | Some("Inf") => Some(f64::INFINITY),
                Some(t) => match t.parse::<f64>() {
                    Ok(x) if !x.is_nan() => Some(x),
                    _ => {
                        errors.push(err(n, format!("bucket bound le={t:?} is not a number")));
                        continue;
                    }
                },
                None => {
                    errors.push(err(n, format!("{} has no le label", sample.name)));
                    continue;
                }
            }
        } else {
            None
        };
        read.push(Read { name, kind: k, field, part, model, le, v, labels: sample.labels });
    }
    // A field exported under two names (vLLM 0.10 writes both
    // `inter_token_latency_seconds` and the older `time_per_output_token_seconds`
    // for the same gaps) is read from the newest name on the page only.
    let mut newest: HashMap<(EngineKind, Field), usize> = HashMap::new();
    for r in &read {
        let e = newest.entry((r.kind, r.field)).or_insert(r.name);
        *e = (*e).min(r.name);
    }
    // Every tensor-parallel (and pipeline) rank of one replica reports the same
    // requests (SGLang labels them `tp_rank`, `pp_rank`): a series counts once,
    // from the lowest rank of its replica (the other labels, `dp_rank` included).
    let replica = |r: &Read<'_>| -> String {
        let mut key: Vec<String> = r
            .labels
            .iter()
            .filter(|(l, _)| *l != "tp_rank" && *l != "pp_rank")
            .map(|(l, v)| format!("{l}={v}"))
            .collect();
        key.sort();
        format!("{}|{}", NAMES[r.name].0, key.join(","))
    };
    let rank = |r: &Read<'_>| -> (u64, u64) {
        let get = |name: &str| {
            r.labels.iter().find(|(l, _)| *l == name).and_then(|(_, v)| v.parse::<u64>().ok()).unwrap_or(0)
        };
        (get("pp_rank"), get("tp_rank"))
    };
    let mut lowest: HashMap<String, (u64, u64)> = HashMap::new();
    for r in &read {
        let e = lowest.entry(replica(r)).or_insert(rank(r));
        *e = (*e).min(rank(r));
    }
    for r in &read {
        if newest.get(&(r.kind, r.field)) != Some(&r.name) || lowest.get(&replica(r)) != Some(&rank(r)) {
            continue;
        }
        let (k, field, part, le, v) = (r.kind, r.field, r.part, r.le, r.v);
        let model = r.model.clone();
        kind.get_or_insert(k);
        let m = models.entry(model).or_default();
        let hist = |h: &mut Option<Histogram>| {
            let h = h.get_or_insert_with(Histogram::default);
            match (part, le) {
                (Part::Bucket, Some(le)) => h.add_bucket(le, v),
                (Part::Sum, _) => h.sum_s += v,
                (Part::Count, _) => h.count += v,
                _ => {}
            }
        };
        let add = |slot: &mut Option<f64>| *slot = Some(slot.unwrap_or(0.0) + v);
        match field {
            Field::Ttft => hist(&mut m.ttft),
            Field::Tbt => hist(&mut m.tbt),
            Field::E2e => hist(&mut m.e2e),
            Field::Running => add(&mut m.running),
            Field::Waiting => add(&mut m.waiting),
            Field::KvUsage => m.kv_usage = Some(m.kv_usage.unwrap_or(0.0).max(v)),
            Field::PromptTokens => add(&mut m.prompt_tokens_total),
            Field::GenerationTokens => add(&mut m.generation_tokens_total),
        }
    }
    for m in models.values_mut() {
        for h in [&mut m.ttft, &mut m.tbt, &mut m.e2e].into_iter().flatten() {
            h.finish();
        }
    }
    let Some(kind) = kind else {
        return Err(errors);
    };
    Ok(EnginePage { kind, models, errors })
}

/// Turns successive pages of one engine into samples: gauges and counters as
/// read, TTFT/TBT from the histogram deltas since the previous page (so the
/// first page gives no latency summary).
#[derive(Debug, Default)]
pub struct EngineTracker {
    prev: HashMap<String, (Option<Histogram>, Option<Histogram>)>,
    /// Per model, the TTFT and TBT histograms' deltas of the last page
    /// observed (what judging them against an SLO needs).
    pub last_deltas: Vec<(String, Option<Histogram>, Option<Histogram>)>,
}

impl EngineTracker {
    /// A tracker with no history.
    pub fn new() -> EngineTracker {
        EngineTracker::default()
    }

    /// Samples of one page read at `ts_ms`; `tags` are the instance's tags
    /// (the page's `model_name` becomes the `model` tag).
    pub fn observe(&mut self, page: &EnginePage, ts_ms: i64, tags: &Tags) -> Vec<EngineSample> {
        let mut out = Vec::with_capacity(page.models.len());
        self.last_deltas.clear();
        for (model, m) in &page.models {
            let delta = |cur: &Option<Histogram>, prev: Option<&Option<Histogram>>| match (cur, prev) {
                (Some(c), Some(Some(p))) => Some(c.delta(p)),
                _ => None,
            };
            let prev = self.prev.get(model);
            let (d_ttft, d_tbt) = (delta(&m.ttft, prev.map(|p| &p.0)), delta(&m.tbt, prev.map(|p| &p.1)));
            let ttft = d_ttft.as_ref().and_then(Histogram::summary);
            let tbt = d_tbt.as_ref().and_then(Histogram::summary);
            self.last_deltas.push((model.clone(), d_ttft, d_tbt));
            self.prev.insert(model.clone(), (m.ttft.clone(), m.tbt.clone()));
            let mut tags = tags.clone();
            if !model.is_empty() {
                tags.model = Some(model.clone());
            }
            out.push(EngineSample {
                ts_ms,
                tags,
                ttft,
                tbt,
                running: m.running,
                waiting: m.waiting,
                kv_usage: m.kv_usage,
                prompt_tokens_total: m.prompt_tokens_total,
                generation_tokens_total: m.generation_tokens_total,
            });
        }
        out
    }
}

/// A running collector task: its counters, and the task (stopped on drop).
#[derive(Debug)]
pub struct CollectorHandle {
    /// The collector's counters.
    pub stats: Arc<CollectorStats>,
    task: tokio::task::JoinHandle<()>,
}

impl CollectorHandle {
    /// Wrap a spawned task.
    pub fn new(stats: Arc<CollectorStats>, task: tokio::task::JoinHandle<()>) -> CollectorHandle {
        CollectorHandle { stats, task }
    }

    /// True once the task has ended (its output channel closed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for CollectorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The engine scrape collector: fetches one `/metrics` page every
/// `interval`, sends [`Sample::Engine`]s to `out`. Failed fetches and
/// malformed lines are counted in its [`CollectorStats`] (named
/// `scrape:<url>`) and never stop it; it ends when `out` is closed.
pub struct ScrapeCollector;

impl ScrapeCollector {
    /// Start scraping `url` (a `/metrics` page) on the current tokio runtime.
    pub fn spawn(
        url: &str,
        interval: Duration,
        timeout: Duration,
        tags: Tags,
        out: mpsc::Sender<Sample>,
    ) -> Result<CollectorHandle, ScrapeError> {
        let page_err = |problem: String| ScrapeError::Page { page: url.into(), problem };
        reqwest::Url::parse(url).map_err(|e| page_err(format!("bad URL: {e}")))?;
        let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| page_err(e.to_string()))?;
        let stats = CollectorStats::new(&format!("scrape:{url}"));
        let url = url.to_string();
        let st = stats.clone();
        let task = tokio::spawn(async move {
            let mut tracker = EngineTracker::new();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let text = match fetch(&client, &url).await {
                    Ok(t) => t,
                    Err(problem) => {
                        st.record_error(&ScrapeError::Page { page: url.clone(), problem });
                        continue;
                    }
                };
                let page = match parse_engine_page(&text, &url) {
                    Ok(p) => p,
                    Err(e) => {
                        st.record_error(&e);
                        continue;
                    }
                };
                for e in &page.errors {
                    st.record_error(e);
                }
                let samples = tracker.observe(&page, crate::sample::now_ms(), &tags);
                st.add_samples(samples.len());
                for s in samples {
                    if out.send(Sample::Engine(s)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(CollectorHandle::new(stats, task))
    }
}

/// GET a metrics page: its text, or the error as text.
pub async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let mut resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let too_big = || format!("the page is over {} MiB; not read", MAX_PAGE_BYTES >> 20);
    if resp.content_length().is_some_and(|n| n > MAX_PAGE_BYTES as u64) {
        return Err(too_big());
    }
    let mut buf = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| e.to_string())? {
        buf.extend_from_slice(&c);
        if buf.len() > MAX_PAGE_BYTES {
            return Err(too_big());
        }
    }
    String::from_utf8(buf).map_err(|e| format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to() + 1))
}

/// The largest metrics page read (a page of a few thousand series is well under 1 MiB).
pub const MAX_PAGE_BYTES: usize = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn hist(buckets: &[(f64, f64)], sum: f64) -> Histogram {
        let mut h = Histogram::default();
        for &(le, c) in buckets {
            h.add_bucket(le, c);
        }
        h.count = buckets.last().map(|b| b.1).unwrap_or(0.0);
        h.sum_s = sum;
        h.finish();
        h
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket_like_prometheus() {
        // 10 observations ≤ 0.1, 10 more in (0.1, 0.5], none above.
        let h = hist(&[(0.1, 10.0), (0.5, 20.0), (f64::INFINITY, 20.0)], 3.0);
        // rank 10 → exactly the top of the first bucket.
        assert_eq!(h.quantile(0.5), Some(0.1));
        // rank 15 → halfway through (0.1, 0.5].
        assert!((h.quantile(0.75).unwrap() - 0.3).abs() < 1e-12);
        // rank 2 → 0 + 0.1 × 2/10 (the first bucket starts at 0).
        assert!((h.quantile(0.1).unwrap() - 0.02).abs() < 1e-12);
        // Ranks in +Inf answer the highest finite bound.
        let tail = hist(&[(0.1, 1.0), (f64::INFINITY, 10.0)], 3.0);
        assert_eq!(tail.quantile(0.99), Some(0.1));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    /// Within a bucket the count below a bound is interpolated; at a bucket's
    /// bound it is exact; past the last finite bound `+Inf`'s share is out.
    #[test]
    fn count_within_interpolates_like_the_quantile() {
        let h = hist(&[(0.1, 10.0), (0.2, 30.0), (f64::INFINITY, 40.0)], 5.0);
        assert!(close(h.count_within(0.1), 10.0));
        assert!(close(h.count_within(0.15), 20.0));
        assert!(close(h.count_within(0.05), 5.0));
        assert!(close(h.count_within(9.0), 30.0));
        assert!(close(h.count_within(h.quantile(0.5).unwrap()), 20.0));
    }

    #[test]
    fn delta_subtracts_and_a_reset_starts_over() {
        let a = hist(&[(0.1, 10.0), (0.5, 20.0), (f64::INFINITY, 20.0)], 3.0);
        let b = hist(&[(0.1, 10.0), (0.5, 30.0), (f64::INFINITY, 30.0)], 7.0);
        let d = b.delta(&a);
        assert_eq!(d.count, 10.0);
        assert_eq!(d.sum_s, 4.0);
        assert_eq!(d.buckets[0].cumulative, 0.0);
        // All ten new observations are in (0.1, 0.5]: the median is mid-bucket.
        assert!((d.quantile(0.5).unwrap() - 0.3).abs() < 1e-12);
        // The engine restarted: its counts went down, so the new page is all new.
        let restarted = hist(&[(0.1, 2.0), (0.5, 2.0), (f64::INFINITY, 2.0)], 0.1);
        assert_eq!(restarted.delta(&b), restarted);
    }

    #[test]
    fn lines_parse_with_escapes_and_errors_give_the_byte() {
        let l = parse_line(r#"vllm:x_bucket{le="0.5",model_name="a \"b\"\\c"} 3 1700000000000"#).unwrap().unwrap();
        assert_eq!(l.name, "vllm:x_bucket");
        assert_eq!(l.labels, vec![("le", "0.5".to_string()), ("model_name", "a \"b\"\\c".to_string())]);
        assert_eq!(l.value, 3.0);
        assert_eq!(parse_line("# HELP x y").unwrap(), None);
        assert_eq!(parse_line("   ").unwrap(), None);
        assert_eq!(parse_line("x{a=\"1\"} abc").unwrap_err().1, "value \"abc\" is not a number");
        assert_eq!(parse_line("x{a=1} 2").unwrap_err(), (4, "expected '\"' to open the value of label a".into()));
        assert!(parse_line("x{a=\"1} 2").is_err());
        assert!(parse_line("x 1 2 3").is_err());
    }
}
