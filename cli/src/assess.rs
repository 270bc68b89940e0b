//! What `dynamollm assess` makes of a fleet's history: the workload (per-minute
//! request counts, and request lengths drawn from the engines' prompt and
//! generation length histograms), the fleet's static layout (engines, GPUs,
//! TP, clock) and its measured energy, read from a Prometheus-compatible API
//! that scrapes vLLM engines and the DCGM exporter (or `twin serve` engines).
//!
//! The assumptions, each stated in the assessment it makes:
//! - Requests are counted when they finish (`vllm:request_success_total`,
//!   aborted requests left out), in the minute they finished.
//! - Prompt and output lengths are drawn independently from their two
//!   histograms (the engines keep no joint one). The histogram's `_sum`
//!   decides what its buckets cannot: with requests in the open top bucket,
//!   finite buckets are log-uniform inside and the top bucket is spread
//!   evenly around the mean the sum leaves for it; with none there, lengths
//!   inside every bucket follow the one power law (density ∝ xᵃ) whose mean
//!   gives the sum.
//! - The fleet is static over the window: its engine count, GPUs per engine
//!   and clock (the GPUs' time-averaged SM clock, to the nearest clock the
//!   twin's GPU may lock) are those of the whole window.

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{BTreeMap, BTreeSet};
use telemetry::prom_history::{PromHistory, RangeAnswer, RangeSeries};
use telemetry::trace::{RateCurve, RateRow};
use telemetry::LengthSamples;

/// The request counter read (vLLM's).
pub const REQUESTS: &str = "vllm:request_success_total";
/// The prompt length histogram (vLLM's).
pub const PROMPT_TOKENS: &str = "vllm:request_prompt_tokens";
/// The output length histogram (vLLM's).
pub const OUTPUT_TOKENS: &str = "vllm:request_generation_tokens";
/// The gauge whose series count the engines.
pub const ENGINE_GAUGE: &str = "vllm:num_requests_running";

/// A GPU family of series: energy counter (and its unit in joules), power, SM clock.
#[derive(Debug, Clone, Copy)]
pub struct GpuNames {
    /// Energy counter.
    pub energy: &'static str,
    /// Joules per unit of the counter.
    pub energy_j_per_unit: f64,
    /// Power (W).
    pub power_w: &'static str,
    /// SM clock (MHz).
    pub sm_clock_mhz: &'static str,
}

/// NVIDIA's DCGM exporter (energy in mJ).
pub const DCGM: GpuNames = GpuNames {
    energy: "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    energy_j_per_unit: 1e-3,
    power_w: "DCGM_FI_DEV_POWER_USAGE",
    sm_clock_mhz: "DCGM_FI_DEV_SM_CLOCK",
};

/// A `twin serve` engine's own GPU series (energy in J).
pub const TWIN: GpuNames = GpuNames {
    energy: telemetry::gpu::twin_metrics::ENERGY_J,
    energy_j_per_unit: 1.0,
    power_w: telemetry::gpu::twin_metrics::POWER_W,
    sm_clock_mhz: telemetry::gpu::twin_metrics::SM_CLOCK_MHZ,
};

/// A length histogram: finite upper edges and each bucket's count (one more
/// than the edges: the last is the open `+Inf` bucket), the sum of the
/// lengths observed, and the shape lengths take inside a bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct LengthHistogram {
    /// Upper edges of the finite buckets, rising.
    pub edges: Vec<f64>,
    /// Count per bucket (not cumulative); `edges.len() + 1` of them.
    pub counts: Vec<f64>,
    /// Sum of every length observed (the histogram's `_sum`), when read.
    pub sum: Option<f64>,
    /// Inside a finite bucket `(lo, hi]`, lengths are drawn with density ∝ xᵃ, this a:
    /// −1 (log-uniform) unless the sum says otherwise (see [`LengthHistogram::from_cumulative`]).
    pub shape: f64,
}

/// The exponents a within-bucket shape is fitted among (−3: piled at the lower
/// edge; 2: piled at the upper).
const SHAPE_RANGE: (f64, f64) = (-3.0, 2.0);

/// The mean of density ∝ xᵃ on `[lo, hi]`.
fn power_mean(lo: f64, hi: f64, a: f64) -> f64 {
    if hi <= lo * (1.0 + 1e-9) {
        return hi;
    }
    // ∫x^(a+1) / ∫x^a, each integral in a form that holds at a = −1 and a = −2.
    let int = |k: f64| if k.abs() < 1e-9 { (hi / lo).ln() } else { (hi.powf(k) - lo.powf(k)) / k };
    int(a + 2.0) / int(a + 1.0)
}

/// The `f`-quantile (0–1) of density ∝ xᵃ on `[lo, hi]`.
fn power_quantile(lo: f64, hi: f64, a: f64, f: f64) -> f64 {
    if hi <= lo * (1.0 + 1e-9) {
        return hi;
    }
    let k = a + 1.0;
    if k.abs() < 1e-9 {
        lo * (hi / lo).powf(f)
    } else {
        (lo.powf(k) + f * (hi.powf(k) - lo.powf(k))).powf(1.0 / k)
    }
}

impl LengthHistogram {
    /// From cumulative `le` counts (`le` → count at or below it, `+Inf`
    /// included) and the histogram's sum. The sum decides what the buckets
    /// cannot: with requests in the open top bucket, their mean (what the sum
    /// leaves after log-uniform finite buckets); with none there, the
    /// within-bucket shape whose mean gives the sum.
    pub fn from_cumulative(cumulative: &BTreeMap<String, f64>, sum: Option<f64>) -> Result<LengthHistogram> {
        let mut finite: Vec<(f64, f64)> = Vec::new();
        let mut inf = None;
        for (le, &c) in cumulative {
            match le.as_str() {
                "+Inf" | "Inf" => inf = Some(c),
                t => match t.parse::<f64>() {
                    Ok(e) if e.is_finite() && e > 0.0 => finite.push((e, c)),
                    _ => bail!("bucket le={t:?} is not a positive number"),
                },
            }
        }
        let Some(inf) = inf else { bail!("the histogram has no +Inf bucket") };
        finite.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut counts = Vec::with_capacity(finite.len() + 1);
        let mut below = 0.0;
        for &(_, c) in &finite {
            // A cumulative count that falls (series from different engines cut
            // at different times) is read as no requests in that bucket.
            counts.push((c - below).max(0.0));
            below = below.max(c);
        }
        counts.push((inf - below).max(0.0));
        let edges = finite.into_iter().map(|(e, _)| e).collect();
        let mut h = LengthHistogram { edges, counts, sum: sum.filter(|s| s.is_finite() && *s >= 0.0), shape: -1.0 };
        let top = h.counts.len() - 1;
        if let Some(sum) = h.sum {
            if h.counts[top] <= 0.0 && h.total() > 0.0 {
                // The finite buckets hold every length: the shape whose mean is the sum's.
                let (mut lo, mut hi) = SHAPE_RANGE;
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if h.finite_sum(mid) < sum {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                h.shape = 0.5 * (lo + hi);
            }
        }
        Ok(h)
    }

    /// Requests counted.
    pub fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// Finite bucket `i`'s range: from its lower edge (1 token for the first) to its upper.
    fn range(&self, i: usize) -> (f64, f64) {
        let hi = self.edges[i];
        let lo = if i == 0 { hi.min(1.0) } else { self.edges[i - 1] };
        (lo, hi)
    }

    /// The finite buckets' lengths summed, with within-bucket shape `a`.
    fn finite_sum(&self, a: f64) -> f64 {
        (0..self.edges.len())
            .map(|i| {
                let (lo, hi) = self.range(i);
                self.counts[i] * power_mean(lo, hi, a)
            })
            .sum()
    }

    /// The mean of the open top bucket: what the sum leaves for it, at least 5% over its lower edge.
    pub fn top_mean(&self) -> f64 {
        let top = self.counts.len() - 1;
        let lo = self.edges.last().copied().unwrap_or(1.0);
        match self.sum {
            Some(sum) if self.counts[top] > 0.0 => {
                ((sum - self.finite_sum(self.shape)) / self.counts[top]).max(lo * 1.05)
            }
            _ => lo * 1.5,
        }
    }

    /// The mean length the draws give.
    pub fn drawn_mean(&self) -> f64 {
        let n = self.total();
        if n <= 0.0 {
            return 0.0;
        }
        (self.finite_sum(self.shape) + self.counts[self.counts.len() - 1] * self.top_mean()) / n
    }

    /// `n` lengths at the quantiles (k + ½)/n of the histogram (a stratified
    /// sample: the histogram's shape with no sampling noise), whole tokens, at least 1.
    pub fn quantile_draws(&self, n: usize) -> Vec<u32> {
        let total = self.total();
        let top = self.counts.len() - 1;
        let top_mean = self.top_mean();
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        let mut below = 0.0;
        for k in 0..n {
            let q = (k as f64 + 0.5) / n as f64 * total;
            while i < top && below + self.counts[i] < q {
                below += self.counts[i];
                i += 1;
            }
            let f = if self.counts[i] > 0.0 { ((q - below) / self.counts[i]).clamp(0.0, 1.0) } else { 0.5 };
            let v = if i == top {
                // Spread evenly around the top mean.
                let lo = self.edges.last().copied().unwrap_or(1.0);
                lo + f * 2.0 * (top_mean - lo)
            } else {
                let (lo, hi) = self.range(i);
                power_quantile(lo, hi, self.shape, f)
            };
            // Up to a whole token: a length in (lo, hi] stays in its bucket.
            out.push(v.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
        }
        out
    }
}

/// Length pairs with the two histograms' shapes, paired independently (seeded).
pub fn length_pairs(prompt: &LengthHistogram, output: &LengthHistogram, n: usize, seed: u64) -> Vec<(u32, u32)> {
    let p = prompt.quantile_draws(n);
    let mut o = output.quantile_draws(n);
    o.shuffle(&mut rand_pcg::Pcg64Mcg::seed_from_u64(seed ^ 0x6173_7365_7373));
    p.into_iter().zip(o).collect()
}

/// A fleet's history over a window, as read.
#[derive(Debug, Clone)]
pub struct FleetHistory {
    /// Window start (Unix s).
    pub from_s: f64,
    /// Window end (Unix s).
    pub to_s: f64,
    /// How many times real time the history's engines ran (1 for a real fleet).
    pub speed: f64,
    /// Requests finished per minute of the fleet's time.
    pub requests_per_minute: Vec<f64>,
    /// Prompt lengths.
    pub prompt: LengthHistogram,
    /// Output lengths.
    pub output: LengthHistogram,
    /// Engines seen.
    pub engines: usize,
    /// GPUs seen.
    pub gpus: usize,
    /// Which GPU series were read (`dcgm` or `twin`).
    pub gpu_source: &'static str,
    /// Energy of every GPU seen over the window (J).
    pub energy_j: f64,
    /// Energy per minute of the fleet's time (J).
    pub energy_j_per_minute: Vec<f64>,
    /// GPUs reporting per minute.
    pub gpus_per_minute: Vec<f64>,
    /// The GPUs' time-averaged SM clock (MHz), when read.
    pub clock_mhz: Option<f64>,
    /// Series that could not be read, and the server's warnings.
    pub warnings: Vec<String>,
}

impl FleetHistory {
    /// The window in the fleet's time (s).
    pub fn span_s(&self) -> f64 {
        (self.to_s - self.from_s) * self.speed
    }

    /// Requests over the window.
    pub fn requests(&self) -> f64 {
        self.requests_per_minute.iter().sum()
    }

    /// The minute of the fleet's time a Unix time falls in, if inside the window.
    fn minute_of(&self, t: f64) -> Option<usize> {
        let m = ((t - self.from_s) * self.speed / 60.0).floor();
        (m >= 0.0 && t <= self.to_s).then_some(m as usize)
    }

    fn minutes(&self) -> usize {
        (self.span_s() / 60.0).ceil().max(1.0) as usize
    }

    /// The rate curve of the requests: one row in the middle of each minute.
    pub fn rate_curve(&self) -> RateCurve {
        let rows = self
            .requests_per_minute
            .iter()
            .enumerate()
            .map(|(m, &r)| RateRow { minute: m as f64 + 0.5, rate_lo: r, rate_mid: r, rate_hi: r })
            .collect();
        RateCurve::from_rows("prometheus history", rows)
    }

    /// Length samples for the replay: `n` pairs from the histograms.
    pub fn length_samples(&self, n: usize, seed: u64) -> LengthSamples {
        LengthSamples::from_pairs("prometheus histograms", length_pairs(&self.prompt, &self.output, n, seed))
    }
}

/// How to read a fleet's history.
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    /// Window start (Unix s).
    pub from_s: f64,
    /// Window end (Unix s).
    pub to_s: f64,
    /// Extra label matchers every series must carry (`job="vllm"`).
    pub selector: String,
    /// How many times real time the engines ran.
    pub speed: f64,
}

fn texts(answer: &RangeAnswer) -> impl Iterator<Item = String> + '_ {
    answer.errors.iter().map(|e| e.to_string())
}

/// Read everything an assessment needs.
pub async fn read_history(api: &PromHistory, q: &HistoryQuery) -> Result<FleetHistory> {
    let window = (q.to_s - q.from_s).ceil().max(1.0) as u64;
    let mut h = FleetHistory {
        from_s: q.from_s,
        to_s: q.to_s,
        speed: q.speed,
        requests_per_minute: Vec::new(),
        prompt: LengthHistogram { edges: vec![], counts: vec![0.0], sum: None, shape: -1.0 },
        output: LengthHistogram { edges: vec![], counts: vec![0.0], sum: None, shape: -1.0 },
        engines: 0,
        gpus: 0,
        gpu_source: "",
        energy_j: 0.0,
        energy_j_per_minute: Vec::new(),
        gpus_per_minute: Vec::new(),
        clock_mhz: None,
        warnings: Vec::new(),
    };
    let minutes = h.minutes();
    let range = |metric: &'static str| api.range(metric, &q.selector, q.to_s, window);

    // Requests per minute, aborted ones left out.
    let requests = range(REQUESTS).await?;
    h.warnings.extend(texts(&requests));
    let mut per_minute = vec![0.0; minutes];
    for s in requests.series.iter().filter(|s| s.label("finished_reason") != Some("abort")) {
        // As the energy counters: the edges of the window at the rate beside them (the requests
        // that finished between `from` and a series' first scrape in the window count too).
        for (t, d) in window_increments(s, q.from_s, q.to_s) {
            if let Some(m) = h.minute_of(t) {
                per_minute[m.min(minutes - 1)] += d;
            }
        }
    }
    h.requests_per_minute = per_minute;
    if h.requests() < 1.0 {
        bail!(
            "no finished request in {REQUESTS}{} between the two times: is the window right, and are vLLM engines scraped?",
            if q.selector.is_empty() { String::new() } else { format!("{{{}}}", q.selector) }
        );
    }

    // Length histograms.
    h.prompt = histogram(api, q, window, PROMPT_TOKENS, &mut h.warnings).await?;
    h.output = histogram(api, q, window, OUTPUT_TOKENS, &mut h.warnings).await?;

    // Engines: the series of their running gauge.
    let engines = range(ENGINE_GAUGE).await?;
    h.warnings.extend(texts(&engines));
    h.engines = engines.series.len();

    // GPUs: DCGM's series, else a twin engine's own.
    for names in [DCGM, TWIN] {
        let energy = range(names.energy).await?;
        if energy.series.is_empty() {
            continue;
        }
        h.warnings.extend(texts(&energy));
        h.gpu_source = if names.energy == DCGM.energy { "dcgm" } else { "twin" };
        h.gpus = energy.series.len();
        h.energy_j_per_minute = vec![0.0; minutes];
        h.gpus_per_minute = vec![0.0; minutes];
        for s in &energy.series {
            // One computation for the total and the minutes: the window's pieces.
            for (t, d) in window_increments(s, q.from_s, q.to_s) {
                let j = d * names.energy_j_per_unit;
                h.energy_j += j;
                if let Some(m) = h.minute_of(t) {
                    h.energy_j_per_minute[m.min(minutes - 1)] += j;
                }
            }
            let reported: BTreeSet<usize> = s.samples.iter().filter_map(|&(t, _)| h.minute_of(t)).collect();
            for m in reported {
                h.gpus_per_minute[m.min(minutes - 1)] += 1.0;
            }
        }
        let clocks = range(names.sm_clock_mhz).await?;
        h.warnings.extend(texts(&clocks));
        let means: Vec<f64> = clocks.series.iter().filter_map(RangeSeries::time_mean).collect();
        if !means.is_empty() {
            h.clock_mhz = Some(means.iter().sum::<f64>() / means.len() as f64);
        }
        break;
    }
    if h.gpus == 0 {
        bail!(
            "no GPU energy counter ({} or {}) in the window: the fleet's energy cannot be measured",
            DCGM.energy,
            TWIN.energy
        );
    }
    Ok(h)
}

/// What a counter rose by over `[from_s, to_s]`, piece by piece: each rise
/// between two samples inside the window at the later one's time, and the
/// stretches between the window's edges and the first and last samples, at
/// the rate of the interval beside each, at the edges' times. The pieces are
/// what both the total and the per-minute figures are summed from.
pub fn window_increments(s: &RangeSeries, from_s: f64, to_s: f64) -> Vec<(f64, f64)> {
    let inside: Vec<(f64, f64)> = s.samples.iter().copied().filter(|&(t, _)| t >= from_s && t <= to_s).collect();
    let series = RangeSeries { name: s.name.clone(), labels: Default::default(), samples: inside };
    let mut out: Vec<(f64, f64)> = series.increments().collect();
    let smp = &series.samples;
    if smp.len() >= 2 {
        let rate = |a: (f64, f64), b: (f64, f64)| if b.1 >= a.1 { (b.1 - a.1) / (b.0 - a.0) } else { 0.0 };
        let n = smp.len();
        out.insert(0, (from_s, rate(smp[0], smp[1]) * (smp[0].0 - from_s)));
        out.push((to_s, rate(smp[n - 2], smp[n - 1]) * (to_s - smp[n - 1].0)));
    }
    out
}

/// What a counter rose by over `[from_s, to_s]` (the sum of [`window_increments`]).
pub fn counter_over_window(s: &RangeSeries, from_s: f64, to_s: f64) -> f64 {
    window_increments(s, from_s, to_s).iter().map(|(_, d)| d).sum()
}

async fn histogram(
    api: &PromHistory,
    q: &HistoryQuery,
    window: u64,
    name: &'static str,
    warnings: &mut Vec<String>,
) -> Result<LengthHistogram> {
    let bucket_name = format!("{name}_bucket");
    let sum_name = format!("{name}_sum");
    let buckets = api.range(&bucket_name, &q.selector, q.to_s, window).await?;
    warnings.extend(texts(&buckets));
    let mut cumulative: BTreeMap<String, f64> = BTreeMap::new();
    for s in &buckets.series {
        let Some(le) = s.label("le") else {
            warnings.push(format!("{bucket_name}: a series without an le label, left out"));
            continue;
        };
        *cumulative.entry(le.to_string()).or_default() += counter_over_samples(s, q.from_s, q.to_s);
    }
    if cumulative.is_empty() {
        bail!("no {bucket_name} series in the window: the request lengths cannot be read");
    }
    let sums = api.range(&sum_name, &q.selector, q.to_s, window).await?;
    warnings.extend(texts(&sums));
    let sum =
        (!sums.series.is_empty()).then(|| sums.series.iter().map(|s| counter_over_samples(s, q.from_s, q.to_s)).sum());
    LengthHistogram::from_cumulative(&cumulative, sum).map_err(|e| anyhow::anyhow!("{bucket_name}: {e}"))
}

/// A counter's rise between its samples inside the window (no edge stretch:
/// requests are whole events, counted where they were seen).
fn counter_over_samples(s: &RangeSeries, from_s: f64, to_s: f64) -> f64 {
    s.increments().filter(|&(t, _)| t >= from_s && t <= to_s).map(|(_, d)| d).sum()
}

/// The fleet's layout: engines, TP, clock.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Layout {
    /// Engines (instances).
    pub instances: u32,
    /// GPUs per engine.
    pub tp: u32,
    /// Clock (MHz), one the twin's GPU may lock.
    pub clock_mhz: u32,
}

/// The layout a history shows, unless `tp` or `clock_mhz` say otherwise.
pub fn layout(h: &FleetHistory, physics: &sim::Physics, tp: Option<u32>, clock_mhz: Option<u32>) -> Result<Layout> {
    if h.engines == 0 {
        bail!("no {ENGINE_GAUGE} series in the window: the engines cannot be counted");
    }
    let engines = u32::try_from(h.engines).unwrap_or(u32::MAX);
    let tp = match tp {
        Some(t) => t,
        None => {
            if h.gpus % h.engines != 0 {
                bail!("{} GPUs for {} engines is not a whole TP degree: give --tp", h.gpus, h.engines);
            }
            u32::try_from(h.gpus / h.engines).unwrap_or(0)
        }
    };
    if !physics.valid_tp(tp) {
        bail!("TP {tp} is not one the twin's model runs at (2, 4 or 8)");
    }
    let clocks = &physics.gpu.clocks_mhz;
    let want = clock_mhz.map(f64::from).or(h.clock_mhz).unwrap_or(f64::from(physics.gpu.clock_max_mhz));
    let clock = clocks
        .iter()
        .copied()
        .min_by(|a, b| (f64::from(*a) - want).abs().total_cmp(&(f64::from(*b) - want).abs()))
        .unwrap_or(physics.gpu.clock_max_mhz);
    Ok(Layout { instances: engines, tp, clock_mhz: clock })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(pairs: &[(&str, f64)], sum: Option<f64>) -> LengthHistogram {
        let m: BTreeMap<String, f64> = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        LengthHistogram::from_cumulative(&m, sum).unwrap()
    }

    #[test]
    fn buckets_come_from_cumulative_counts() {
        let h = hist(&[("100", 10.0), ("1000", 70.0), ("+Inf", 100.0)], None);
        assert_eq!(h.edges, [100.0, 1000.0]);
        assert_eq!(h.counts, [10.0, 60.0, 30.0]);
        assert_eq!(h.total(), 100.0);
        let e = LengthHistogram::from_cumulative(&BTreeMap::from([("10".to_string(), 1.0)]), None).unwrap_err();
        assert!(e.to_string().contains("+Inf"), "{e}");
        let e = LengthHistogram::from_cumulative(&BTreeMap::from([("x".to_string(), 1.0)]), None).unwrap_err();
        assert!(e.to_string().contains("\"x\""), "{e}");
    }

    #[test]
    fn the_power_shapes_have_the_means_and_quantiles_they_should() {
        // Uniform, log-uniform and 1/x² on [1, 100].
        assert!((power_mean(1.0, 100.0, 0.0) - 50.5).abs() < 1e-9);
        assert!((power_mean(1.0, 100.0, -1.0) - 99.0 / 100f64.ln()).abs() < 1e-9);
        assert!((power_mean(1.0, 100.0, -2.0) - 100f64.ln() / 0.99).abs() < 1e-9);
        assert!((power_quantile(1.0, 100.0, 0.0, 0.5) - 50.5).abs() < 1e-9);
        assert!((power_quantile(1.0, 100.0, -1.0, 0.5) - 10.0).abs() < 1e-9);
        assert!(power_mean(1.0, 100.0, -1.5) < power_mean(1.0, 100.0, -0.5));
    }

    #[test]
    fn draws_keep_each_bucket_share_and_the_sum() {
        // 20% in (0, 100], 50% in (100, 1000], 30% above 1000 with mean 3000.
        let log = |lo: f64, hi: f64| power_mean(lo, hi, -1.0);
        let sum = 20.0 * log(1.0, 100.0) + 50.0 * log(100.0, 1000.0) + 30.0 * 3000.0;
        let h = hist(&[("100", 20.0), ("1000", 70.0), ("+Inf", 100.0)], Some(sum));
        assert_eq!(h.shape, -1.0);
        assert!((h.top_mean() - 3000.0).abs() < 1e-6, "{}", h.top_mean());
        let d = h.quantile_draws(10_000);
        let share = |lo: u32, hi: u32| d.iter().filter(|&&v| v > lo && v <= hi).count() as f64 / d.len() as f64;
        assert!((share(0, 100) - 0.2).abs() < 0.002 && (share(100, 1000) - 0.5).abs() < 0.002);
        assert!((share(1000, u32::MAX) - 0.3).abs() < 0.002);
        let mean = d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len() as f64;
        assert!((mean / (sum / 100.0) - 1.0).abs() < 0.01, "drawn mean {mean} vs {}", sum / 100.0);
        assert!((h.drawn_mean() / (sum / 100.0) - 1.0).abs() < 1e-9);
        assert!(d.iter().all(|&v| v >= 1));
    }

    #[test]
    fn with_an_empty_top_bucket_the_sum_decides_the_shape_inside_buckets() {
        // Every length in (100, 1000], uniformly: mean 550, above log-uniform's 391.
        let h = hist(&[("100", 0.0), ("1000", 100.0), ("+Inf", 100.0)], Some(55_000.0));
        assert!((h.shape - 0.0).abs() < 0.01, "shape {}", h.shape);
        assert!((h.drawn_mean() - 550.0).abs() < 0.5);
        let d = h.quantile_draws(1000);
        let mean = d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len() as f64;
        assert!((mean - 550.0).abs() < 2.0, "{mean}");
        assert!(d.iter().all(|&v| (101..=1000).contains(&v)));
        // No sum: log-uniform.
        assert_eq!(hist(&[("100", 0.0), ("1000", 100.0), ("+Inf", 100.0)], None).shape, -1.0);
    }

    #[test]
    fn pairs_are_seeded_and_keep_both_marginals() {
        let p = hist(&[("100", 50.0), ("+Inf", 100.0)], Some(50.0 * 30.0 + 50.0 * 400.0));
        let o = hist(&[("10", 90.0), ("+Inf", 100.0)], None);
        let a = length_pairs(&p, &o, 1000, 7);
        assert_eq!(a, length_pairs(&p, &o, 1000, 7));
        assert_ne!(a, length_pairs(&p, &o, 1000, 8));
        assert_eq!(a.iter().filter(|(x, _)| *x <= 100).count(), 500);
        assert_eq!(a.iter().filter(|(_, y)| *y <= 10).count(), 900);
    }

    #[test]
    fn a_counter_over_a_window_adds_the_edges_at_the_rate_beside_them() {
        let s = RangeSeries {
            name: "e".into(),
            labels: Default::default(),
            samples: vec![(9.0, 0.0), (11.0, 20.0), (12.0, 30.0), (13.0, 60.0), (15.0, 90.0)],
        };
        // Inside [10, 14]: 11 → 13 rises 40; 10 → 11 at 10/s (from 11 → 12) and 13 → 14 at 30/s.
        assert_eq!(counter_over_window(&s, 10.0, 14.0), 40.0 + 10.0 + 30.0);
    }
}
