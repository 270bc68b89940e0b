//! A load generator for OpenAI-compatible streaming endpoints (vLLM, SGLang,
//! `dynamollm twin serve`): sends completions with a prompt of exactly N
//! tokens (as token ids) and `max_tokens` = M with `ignore_eos`, and times
//! the stream: TTFT from send to the first token, TBT between tokens.

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
    let mut events = resp.bytes_stream().eventsource();
    let mut first: Option<Instant> = None;
    let mut last = sent;
    let mut gaps = Vec::with_capacity(output_tokens as usize);
    let mut tokens = 0u32;
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| anyhow!("{url}: broken event stream: {e}"))?;
        let now = Instant::now();
        if ev.data.trim() == "[DONE]" {
            break;
        }
        let v: serde_json::Value =
            serde_json::from_str(&ev.data).with_context(|| format!("{url}: event is not JSON: {:?}", ev.data))?;
        let has_text = v["choices"]
            .as_array()
            .map(|c| c.iter().any(|ch| ch["text"].as_str().is_some_and(|t| !t.is_empty())))
            .unwrap_or(false);
        if !has_text {
            continue;
        }
        tokens += 1;
        match first {
            None => first = Some(now),
            Some(_) => gaps.push(now - last),
        }
        last = now;
    }
    let first = first.ok_or_else(|| anyhow!("{url}: the stream ended without a token"))?;
    Ok(StreamTiming { ttft: first - sent, gaps, tokens, e2e: last - sent })
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
