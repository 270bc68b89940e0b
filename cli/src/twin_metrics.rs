//! The Prometheus metrics `twin serve` exposes: vLLM's names and bucket
//! boundaries (so any vLLM scraper reads the twin unchanged), plus per-GPU
//! power, energy and clock for the fake NVML device.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};
use telemetry::gpu::twin_metrics as gpu_names;

/// The per-class SLO counter's name.
pub const SLO_TOTAL: &str = "dynamollm_twin_slo_total";

/// vLLM's TTFT buckets (s).
pub const TTFT_BUCKETS_S: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets (s).
pub const ITL_BUCKETS_S: [f64; 19] =
    [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's end-to-end latency buckets (s).
pub const E2E_BUCKETS_S: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

/// vLLM's request-length buckets (`build_1_2_5_buckets(max_model_len)`), for a
/// context of 8,192 tokens: 1, 2, 5, 10, … 5,000 tokens.
pub const LENGTH_BUCKETS_TOKENS: [f64; 12] =
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

/// Every metric of one served engine.
pub struct EngineMetrics {
    registry: Registry,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `vllm:inter_token_latency_seconds`.
    pub inter_token: Histogram,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e: Histogram,
    /// `vllm:request_prompt_tokens`: each finished request's prompt length.
    pub request_prompt_tokens: Histogram,
    /// `vllm:request_generation_tokens`: each finished request's output length.
    pub request_generation_tokens: Histogram,
    /// `vllm:num_requests_running`.
    pub running: IntGauge,
    /// `vllm:num_requests_waiting`.
    pub waiting: IntGauge,
    /// `vllm:kv_cache_usage_perc` (a fraction 0–1, as vLLM reports it).
    pub kv_usage: Gauge,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens: IntCounter,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: IntCounter,
    /// `vllm:request_success_total{finished_reason="length"}`.
    pub success: IntCounter,
    /// `vllm:request_success_total{finished_reason="abort"}`: requests dropped
    /// unstarted because their client went away.
    pub aborted: IntCounter,
    /// Per-GPU power.
    pub gpu_power_w: GaugeVec,
    /// Per-GPU energy counter (J).
    pub gpu_energy_j: GaugeVec,
    /// Per-GPU SM clock.
    pub gpu_clock_mhz: GaugeVec,
    /// Per-class SLO counters (only with SLOs configured).
    pub slo: prometheus::IntCounterVec,
}

impl EngineMetrics {
    /// Register every metric, labelled with the model name.
    pub fn new(model: &str) -> prometheus::Result<EngineMetrics> {
        let registry = Registry::new();
        let labelled = |o: Opts| o.const_label("model_name", model);
        let hist = |name: &str, help: &str, buckets: &[f64]| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).const_label("model_name", model).buckets(buckets.to_vec()),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let ttft =
            hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", &TTFT_BUCKETS_S)?;
        let inter_token =
            hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", &ITL_BUCKETS_S)?;
        let e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            &E2E_BUCKETS_S,
        )?;
        let request_prompt_tokens =
            hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", &LENGTH_BUCKETS_TOKENS)?;
        let request_generation_tokens =
            hist("vllm:request_generation_tokens", "Number of generation tokens processed.", &LENGTH_BUCKETS_TOKENS)?;
        let running = IntGauge::with_opts(labelled(Opts::new(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
        )))?;
        let waiting = IntGauge::with_opts(labelled(Opts::new(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
        )))?;
        let kv_usage = Gauge::with_opts(labelled(Opts::new(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
        )))?;
        let prompt_tokens = IntCounter::with_opts(labelled(Opts::new(
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
        )))?;
        let generation_tokens = IntCounter::with_opts(labelled(Opts::new(
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
        )))?;
        let success = IntCounter::with_opts(labelled(
            Opts::new("vllm:request_success_total", "Count of successfully processed requests.")
                .const_label("finished_reason", "length"),
        ))?;
        let aborted = IntCounter::with_opts(labelled(
            Opts::new("vllm:request_success_total", "Count of successfully processed requests.")
                .const_label("finished_reason", "abort"),
        ))?;
        let gpu_power_w = GaugeVec::new(Opts::new(gpu_names::POWER_W, "Twin GPU board power in watts."), &["gpu"])?;
        let gpu_energy_j =
            GaugeVec::new(Opts::new(gpu_names::ENERGY_J, "Twin GPU energy since start in joules."), &["gpu"])?;
        let gpu_clock_mhz = GaugeVec::new(Opts::new(gpu_names::SM_CLOCK_MHZ, "Twin GPU SM clock in MHz."), &["gpu"])?;
        let slo = prometheus::IntCounterVec::new(
            Opts::new(
                SLO_TOTAL,
                "First tokens (kind=ttft) and token gaps (kind=tbt) per request class, within the class's SLO or not.",
            ),
            &["class", "kind", "result"],
        )?;
        registry.register(Box::new(slo.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(kv_usage.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generation_tokens.clone()))?;
        registry.register(Box::new(success.clone()))?;
        registry.register(Box::new(aborted.clone()))?;
        registry.register(Box::new(gpu_power_w.clone()))?;
        registry.register(Box::new(gpu_energy_j.clone()))?;
        registry.register(Box::new(gpu_clock_mhz.clone()))?;
        Ok(EngineMetrics {
            registry,
            ttft,
            inter_token,
            e2e,
            request_prompt_tokens,
            request_generation_tokens,
            running,
            waiting,
            kv_usage,
            prompt_tokens,
            generation_tokens,
            success,
            aborted,
            gpu_power_w,
            gpu_energy_j,
            gpu_clock_mhz,
            slo,
        })
    }

    /// The page in Prometheus text format.
    pub fn encode(&self) -> Result<String, String> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).map_err(|e| e.to_string())?;
        String::from_utf8(buf).map_err(|e| e.to_string())
    }
}
