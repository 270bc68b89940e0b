//! A load generator for OpenAI-compatible streaming endpoints (vLLM, SGLang,
//! `dynamollm twin serve`): sends completions with a prompt of exactly N
//! tokens (as token ids) and `max_tokens` = M with `ignore_eos`, and times
//! the stream: TTFT from send to the first token, TBT between tokens. An
//! event may carry several tokens (speculative decoding): its tokens are
//! counted from its text and rescaled to the engine's final `usage`, and an
//! event of k tokens after a gap g is k gaps of g/k.

use anyhow::{anyhow, bail, Context, Result};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use sim::measure::steady_arrivals;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::LengthSamples;

/// What one streamed request measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamTiming {
    /// Send to first token.
    pub ttft: Duration,
    /// Gaps between consecutive tokens.
    pub gaps: Vec<Duration>,
    /// Tokens received.
    pub tokens: u32,
    /// Send to last token.
    pub e2e: Duration,
    /// A twin engine's part of the TTFT by its own stamps (its seconds), when it stamps its tokens.
    pub engine_ttft_s: Option<f64>,
    /// Each gap (aligned with `gaps`) in the engine's time plus the change in the
    /// tokens' travel time ([`telemetry::stamped_gap_s`]), when the engine stamps its tokens.
    pub stamped_gaps_s: Vec<f64>,
    /// Each gap by the engine's stamps alone (its own view, without the path to the client).
    pub engine_gaps_s: Vec<f64>,
    /// How long the router held the request for a serving instance (its `x-dynamollm-held-s`, service s).
    pub held_s: f64,
}

impl StreamTiming {
    /// The TTFT in the cluster's time, `speed` times the wall's (see [`telemetry::cluster_interval_s`]).
    pub fn ttft_s(&self, speed: f64) -> f64 {
        telemetry::cluster_interval_s(self.ttft.as_secs_f64(), self.engine_ttft_s, self.held_s, speed)
    }

    /// Every gap in the cluster's time: by the engine's stamps where it stamps its tokens,
    /// else the wall's gap times `speed`.
    pub fn gaps_s(&self, speed: f64) -> Box<dyn Iterator<Item = f64> + '_> {
        if self.stamped_gaps_s.len() == self.gaps.len() && !self.gaps.is_empty() {
            Box::new(self.stamped_gaps_s.iter().copied())
        } else {
            Box::new(self.gaps.iter().map(move |g| g.as_secs_f64() * speed))
        }
    }
}

/// Prompt token ids for a prompt of `n` tokens (ordinary ids, not special tokens).
pub fn prompt_ids(n: u32) -> Vec<u32> {
    (0..n).map(|k| 1000 + (k % 20_000)).collect()
}

/// Stream one completion and time it.
pub async fn stream_completion(
    client: &reqwest::Client,
    base_url: &str,
    model: &str,
    input_tokens: u32,
    output_tokens: u32,
) -> Result<StreamTiming> {
    let body = serde_json::json!({
        "model": model,
        "prompt": prompt_ids(input_tokens),
        "max_tokens": output_tokens,
        "min_tokens": output_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": { "include_usage": true },
        "temperature": 0.0,
    });
    let url = format!("{}/v1/completions", base_url.trim_end_matches('/'));
    let sent = Instant::now();
    let resp = client.post(&url).json(&body).send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("POST {url} answered {status}: {}", text.chars().take(300).collect::<String>());
    }
    let held_s = resp
        .headers()
        .get(telemetry::ROUTER_HELD_HEADER)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<f64>().ok())
        .filter(|h| h.is_finite() && *h >= 0.0)
        .unwrap_or(0.0);
    let mut events = resp.bytes_stream().eventsource();
    // (arrival, tokens counted in its text, the engine's stamp, its travel time) of each event with text.
    let mut seen: Vec<(Instant, u32, Option<f64>, Option<f64>)> = Vec::with_capacity(output_tokens as usize);
    let mut engine_arrived_s: Option<f64> = None;
    let mut usage: Option<u32> = None;
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| anyhow!("{url}: broken event stream: {e}"))?;
        let now = Instant::now();
        if ev.data.trim() == "[DONE]" {
            break;
        }
        let v: serde_json::Value =
            serde_json::from_str(&ev.data).with_context(|| format!("{url}: event is not JSON: {:?}", ev.data))?;
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            usage = Some(u.min(u64::from(u32::MAX)) as u32);
        }
        let k: u32 = v["choices"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|ch| ch["text"].as_str().filter(|t| !t.is_empty()))
                    .map(|t| service::openai::text_tokens(t).max(1))
                    .sum()
            })
            .unwrap_or(0);
        if let Some(a) = v[telemetry::TWIN_ARRIVAL_STAMP].as_f64() {
            engine_arrived_s.get_or_insert(a);
        }
        if k > 0 {
            let transport = v[telemetry::TWIN_SENT_STAMP].as_f64().map(|s| (telemetry::unix_now_s() - s).max(0.0));
            seen.push((now, k, v[telemetry::TWIN_TOKEN_STAMP].as_f64(), transport));
        }
    }
    let Some(&(first, _, first_stamp, _)) = seen.first() else { bail!("{url}: the stream ended without a token") };
    let counted: u32 = seen.iter().map(|e| e.1).sum();
    let scale = usage.filter(|_| counted > 0).map_or(1.0, |u| f64::from(u) / f64::from(counted));
    let mut gaps = Vec::with_capacity(output_tokens as usize);
    let stamped = seen.iter().all(|e| e.2.is_some() && e.3.is_some());
    let mut stamped_gaps_s = Vec::new();
    let mut engine_gaps_s = Vec::new();
    for w in seen.windows(2) {
        let k = ((f64::from(w[1].1) * scale).round() as u32).max(1);
        let gap = (w[1].0 - w[0].0) / k;
        gaps.extend(std::iter::repeat_n(gap, k as usize));
        if let (true, Some(a), Some(b), Some(ta), Some(tb)) = (stamped, w[0].2, w[1].2, w[0].3, w[1].3) {
            let g = telemetry::stamped_gap_s(b - a, tb, ta) / f64::from(k);
            stamped_gaps_s.extend(std::iter::repeat_n(g, k as usize));
            engine_gaps_s.extend(std::iter::repeat_n((b - a).max(0.0) / f64::from(k), k as usize));
        }
    }
    let last = seen.last().map_or(first, |e| e.0);
    Ok(StreamTiming {
        ttft: first - sent,
        gaps,
        tokens: usage.unwrap_or(counted),
        e2e: last - sent,
        engine_ttft_s: first_stamp.zip(engine_arrived_s).map(|(t, a)| (t - a).max(0.0)),
        stamped_gaps_s,
        engine_gaps_s,
        held_s,
    })
}

/// Results of a Poisson run.
#[derive(Debug, Default)]
pub struct RunResult {
    /// Timings of the requests that succeeded.
    pub timings: Vec<StreamTiming>,
    /// Requests sent.
    pub sent: u64,
    /// Errors, as messages (the first few).
    pub errors: Vec<String>,
    /// Requests that failed.
    pub failed: u64,
    /// From the first send to the last completion.
    pub span: Duration,
}

/// Offer Poisson arrivals at `load_rps` for `window`, lengths drawn from `lengths`
/// (the same sequence the twin's profiler replays for this seed), and wait (at most `drain_limit`) for every request to finish.
#[allow(clippy::too_many_arguments)]
pub async fn poisson_run(
    client: &reqwest::Client,
    base_url: &str,
    model: &str,
    lengths: &LengthSamples,
    load_rps: f64,
    window: Duration,
    drain_limit: Duration,
    seed: u64,
) -> Result<RunResult> {
    if !(load_rps.is_finite() && load_rps > 0.0) {
        bail!("load must be > 0 req/s, got {load_rps}");
    }
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let base: Arc<str> = base_url.into();
    let model: Arc<str> = model.into();
    let mut sent = 0u64;
    for r in steady_arrivals(lengths, load_rps, window.as_secs_f64(), seed) {
        let (i, o) = (r.input_tokens, r.output_tokens);
        tokio::time::sleep_until(start + Duration::from_secs_f64(r.arrival_s)).await;
        let (c, b, m) = (client.clone(), base.clone(), model.clone());
        tasks.spawn(async move { stream_completion(&c, &b, &m, i, o.max(1)).await });
        sent += 1;
    }
    let mut out = RunResult { sent, ..RunResult::default() };
    let deadline = tokio::time::Instant::now() + drain_limit;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(timing)))) => out.timings.push(timing),
            Ok(Some(Ok(Err(e)))) => {
                out.failed += 1;
                if out.errors.len() < 5 {
                    out.errors.push(format!("{e:#}"));
                }
            }
            Ok(Some(Err(e))) => {
                out.failed += 1;
                if out.errors.len() < 5 {
                    out.errors.push(e.to_string());
                }
            }
            Ok(None) => break,
            Err(_) => {
                let left = tasks.len() as u64;
                tasks.abort_all();
                out.failed += left;
                out.errors.push(format!("{left} requests still running {drain_limit:?} after the window closed"));
                break;
            }
        }
    }
    out.span = start.elapsed();
    Ok(out)
}
