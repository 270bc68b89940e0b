//! Profiling a real engine (or `dynamollm twin serve`) over its
//! OpenAI-compatible streaming endpoint: Poisson load of one class's
//! requests, TTFT and TBT timed from the stream, energy from the GPUs'
//! energy counters, clocks locked through the GPU device and restored after.

use super::sweep::{Point, Target};
use super::table::{ProfileRow, Unloaded};
use super::ClassLengths;
use crate::loadgen::{poisson_run, stream_completion};
use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telemetry::gpu::{GpuDevice, NvmlDevice, TwinDevice};
use telemetry::{LengthSamples, RequestClass};

/// How to reach and measure the target.
pub struct HttpTargetOptions<'a> {
    /// Base URL of the engine (`http://host:port`).
    pub base_url: String,
    /// `nvml` or `twin`.
    pub gpu: String,
    /// Model to request (default: the target's first).
    pub model: Option<String>,
    /// GPU name for the rows (default: the device's).
    pub gpu_name: Option<String>,
    /// First GPU of the instance.
    pub first_gpu: u32,
    /// The engine's TP degree (GPUs it uses).
    pub tp: u32,
    /// Lock clocks per point (else record the current clock).
    pub set_clocks: bool,
    /// Measurement window per point.
    pub window: Duration,
    /// Request lengths, split by class.
    pub lengths: &'a LengthSamples,
    /// The engine's API key (sent as `Authorization: Bearer …` on every request).
    pub api_key: Option<String>,
}

/// A real endpoint as a profiling target.
pub struct HttpTarget {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base_url: String,
    model: String,
    gpu_name: String,
    device: Arc<dyn GpuDevice>,
    gpus: Vec<u32>,
    tp: u32,
    set_clocks: bool,
    window: Duration,
    lengths: ClassLengths,
    locked_mhz: Mutex<Option<u32>>,
}

fn q_s(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 * 1e-6
    }
}

/// A GPU's measured mean power against its limit: a few percent over is the
/// counter's and the timer's noise; beyond, the energy counter and the wall
/// clock disagree (a sped-up engine, a counter of other GPUs), and no row is
/// better than a false one.
pub fn check_power(power_per_gpu_w: f64, limit_w: f64) -> Result<()> {
    if !power_per_gpu_w.is_finite() || power_per_gpu_w > limit_w * 1.05 {
        bail!(
            "measured {power_per_gpu_w:.0} W per GPU, above the GPU's {limit_w:.0} W limit: the energy counter \
             and the wall clock disagree"
        );
    }
    Ok(())
}

impl HttpTarget {
    /// Connect: find the model, open the GPU device, check the GPUs exist.
    pub fn connect(o: HttpTargetOptions<'_>) -> Result<HttpTarget> {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(k) = &o.api_key {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {k}"))
                .map_err(|_| anyhow!("--api-key holds characters an HTTP header cannot carry"))?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(3600))
            .build()
            .context("building the HTTP client")?;
        let base_url = o.base_url.trim_end_matches('/').to_string();
        let model = match o.model {
            Some(m) => m,
            None => rt.block_on(async {
                let url = format!("{base_url}/v1/models");
                let resp = client.get(&url).send().await.with_context(|| format!("GET {url}"))?;
                let status = resp.status();
                if !status.is_success() {
                    let body = resp.text().await.unwrap_or_default();
                    let hint = if status.as_u16() == 401 { " (the engine wants a key: --api-key)" } else { "" };
                    bail!("GET {url} answered {status}{hint}: {}", body.chars().take(300).collect::<String>());
                }
                let v: serde_json::Value = resp.json().await.with_context(|| format!("GET {url}: not JSON"))?;
                v["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| anyhow!("GET {url}: no model listed"))
            })?,
        };
        let device: Arc<dyn GpuDevice> = match o.gpu.as_str() {
            "nvml" => Arc::new(NvmlDevice::init()?),
            "twin" => Arc::new(TwinDevice::new(&base_url)?),
            other => bail!("--gpu must be `nvml` or `twin`, got `{other}`"),
        };
        // The profile is of the engine's time: a twin running faster than the wall would
        // give energy per wall second (power many times the GPU's) and latencies too short.
        let scale = device.time_scale()?;
        if (scale - 1.0).abs() > 1e-9 {
            bail!(
                "the engine at {base_url} runs at {scale}× the wall clock (`twin serve --speed {scale}`): a profile \
                 needs it in real time; start it with --speed 1"
            );
        }
        let count = device.count()?;
        let gpus: Vec<u32> = (o.first_gpu..o.first_gpu + o.tp).collect();
        if gpus.iter().any(|&g| g >= count) {
            bail!("the instance needs GPUs {:?} but the device has {count}", gpus);
        }
        let gpu_name = o.gpu_name.unwrap_or_else(|| device.describe());
        let lengths = ClassLengths::split(o.lengths);
        Ok(HttpTarget {
            rt,
            client,
            base_url,
            model,
            gpu_name,
            device,
            gpus,
            tp: o.tp,
            set_clocks: o.set_clocks,
            window: o.window,
            lengths,
            locked_mhz: Mutex::new(None),
        })
    }

    /// The SM clock of the instance's first GPU now.
    pub fn current_clock_mhz(&self) -> Result<u32> {
        Ok(self.device.sm_clock_mhz(self.gpus[0])?)
    }

    /// Check that every clock can be set (unless clocks are left alone).
    pub fn check_clocks(&self, clocks: &[u32]) -> Result<()> {
        if !self.set_clocks {
            return Ok(());
        }
        let supported = self.device.supported_sm_clocks_mhz(self.gpus[0])?;
        for &c in clocks {
            telemetry::gpu::check_clock(self.gpus[0], c, &supported)?;
        }
        // Prove we may lock clocks before spending time: lock to the top and keep it.
        let top = *clocks.iter().max().ok_or_else(|| anyhow!("no clocks to profile"))?;
        self.lock(top).context("cannot set GPU clocks (run as root, or profile with `--clocks current`)")?;
        Ok(())
    }

    fn lock(&self, clock_mhz: u32) -> Result<()> {
        let mut locked = self.locked_mhz.lock().expect("not poisoned");
        if *locked == Some(clock_mhz) {
            return Ok(());
        }
        for &g in &self.gpus {
            self.device.set_locked_clocks(g, clock_mhz, clock_mhz)?;
        }
        *locked = Some(clock_mhz);
        Ok(())
    }

    /// Undo clock locking (call when the sweep ends, also on failure).
    pub fn restore_clocks(&self) -> Result<()> {
        let mut locked = self.locked_mhz.lock().expect("not poisoned");
        if locked.is_none() {
            return Ok(());
        }
        for &g in &self.gpus {
            self.device.reset_locked_clocks(g)?;
        }
        *locked = None;
        Ok(())
    }

    fn energy_j(&self) -> Result<f64> {
        let mut mj = 0u64;
        for &g in &self.gpus {
            mj += self.device.energy_mj(g)?;
        }
        Ok(mj as f64 / 1000.0)
    }
}

impl Target for HttpTarget {
    fn model(&self) -> String {
        self.model.clone()
    }

    fn gpu(&self) -> String {
        self.gpu_name.clone()
    }

    fn engine(&self) -> String {
        format!(
            "OpenAI-compatible endpoint {} (streaming /v1/completions), {} s windows, energy from {}",
            self.base_url,
            self.window.as_secs_f64(),
            self.device.describe()
        )
    }

    fn max_clock_mhz(&self) -> u32 {
        self.device
            .supported_sm_clocks_mhz(self.gpus[0])
            .ok()
            .and_then(|v| v.into_iter().max())
            .unwrap_or_else(|| self.current_clock_mhz().unwrap_or(0))
    }

    fn concurrent(&self) -> bool {
        false
    }

    fn unloaded(&self, class: RequestClass) -> Result<Unloaded> {
        if self.set_clocks {
            self.lock(self.max_clock_mhz())?;
        }
        let (i, o) = self.lengths.medians[class.index()];
        self.rt.block_on(async {
            let mut ttft = Vec::new();
            let mut tbt = Vec::new();
            for _ in 0..3 {
                let t = stream_completion(&self.client, &self.base_url, &self.model, i, o.max(2)).await?;
                ttft.push(t.ttft.as_secs_f64());
                let mut g: Vec<f64> = t.gaps.iter().map(Duration::as_secs_f64).collect();
                g.sort_by(f64::total_cmp);
                tbt.push(g.get(g.len() / 2).copied().unwrap_or(0.0));
            }
            ttft.sort_by(f64::total_cmp);
            tbt.sort_by(f64::total_cmp);
            Ok(Unloaded { ttft_s: ttft[1], tbt_s: tbt[1].max(1e-6) })
        })
    }

    fn measure(&self, p: &Point, seed: u64) -> Result<ProfileRow> {
        if p.tp != self.tp {
            bail!("the endpoint serves TP{}, not TP{}", self.tp, p.tp);
        }
        if self.set_clocks {
            self.lock(p.clock_mhz)?;
        }
        let e0 = self.energy_j()?;
        let t0 = Instant::now();
        let lengths = self.lengths.of(p.class);
        let drain = self.window.max(Duration::from_secs(30)) * 4;
        let run = self.rt.block_on(poisson_run(
            &self.client,
            &self.base_url,
            &self.model,
            lengths,
            p.load_rps,
            self.window,
            drain,
            seed,
        ))?;
        let elapsed = t0.elapsed().as_secs_f64();
        let e1 = self.energy_j()?;
        if run.failed * 100 > run.sent.max(1) {
            bail!("{} of {} requests failed: {}", run.failed, run.sent, run.errors.join("; "));
        }
        let mut ttft = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        let mut tbt = ttft.clone();
        for t in &run.timings {
            ttft.saturating_record(t.ttft.as_micros() as u64);
            for g in &t.gaps {
                tbt.saturating_record(g.as_micros() as u64);
            }
        }
        let done = run.timings.len() as u64;
        let energy_j = (e1 - e0).max(0.0);
        let power_per_gpu_w = energy_j / elapsed / f64::from(p.tp);
        if let Some(limit) = self.device.power_limit_w(self.gpus[0])? {
            check_power(power_per_gpu_w, limit)
                .with_context(|| format!("{} TP{} at {} MHz, {} req/s", p.class, p.tp, p.clock_mhz, p.load_rps))?;
        }
        Ok(ProfileRow {
            model: self.model.clone(),
            gpu: self.gpu_name.clone(),
            class: p.class,
            tp: p.tp,
            clock_mhz: p.clock_mhz,
            load_rps: p.load_rps,
            load_tok_s: p.load_rps * self.lengths.mean_tokens(p.class),
            energy_per_req_j: energy_j / done.max(1) as f64,
            power_per_gpu_w,
            ttft_p50_s: q_s(&ttft, 0.5),
            ttft_p99_s: q_s(&ttft, 0.99),
            tbt_p50_s: q_s(&tbt, 0.5),
            tbt_p99_s: q_s(&tbt, 0.99),
            requests: done,
            window_s: self.window.as_secs_f64(),
            // Both measure an engine serving both phases.
            role: telemetry::InstanceRole::Colocated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::check_power;

    /// 1,039 W per GPU on a 700 W H100 (a twin profiled at 10×) is an error naming both;
    /// 690 W and 720 W (within the noise) are readings.
    #[test]
    fn power_above_the_gpus_limit_is_an_error() {
        let e = check_power(1039.0, 700.0).unwrap_err().to_string();
        assert!(e.contains("1039 W") && e.contains("700 W"), "{e}");
        assert!(check_power(690.0, 700.0).is_ok() && check_power(720.0, 700.0).is_ok());
        assert!(check_power(f64::NAN, 700.0).is_err());
    }
}
