//! Profiling the digital twin in virtual time: each point is a steady
//! Poisson load of one class's requests on one instance, measured exactly as
//! on hardware (energy over the window, latency percentiles of the requests).

use super::sweep::{Point, Target};
use super::table::{ProfileRow, Unloaded};
use super::ClassLengths;
use anyhow::Result;
use sim::measure::{load_point_rps, unloaded};
use sim::{ClassSlo, Physics};
use telemetry::{LengthSamples, RequestClass};

/// The twin as a profiling target.
pub struct TwinTarget {
    physics: Physics,
    lengths: ClassLengths,
    /// Shortest measurement window in virtual seconds.
    pub window_s: f64,
    /// A window lasts at least long enough for this many requests.
    pub min_requests: u64,
}

impl TwinTarget {
    /// A target over `physics`, with each class's request lengths drawn from `lengths`.
    pub fn new(physics: Physics, lengths: &LengthSamples, window_s: f64, min_requests: u64) -> TwinTarget {
        TwinTarget { physics, lengths: ClassLengths::split(lengths), window_s, min_requests }
    }

    /// The request lengths per class.
    pub fn lengths(&self) -> &ClassLengths {
        &self.lengths
    }

    /// The physics profiled.
    pub fn physics(&self) -> &Physics {
        &self.physics
    }
}

impl Target for TwinTarget {
    fn model(&self) -> String {
        self.physics.model.name.clone()
    }

    fn gpu(&self) -> String {
        self.physics.gpu.name.clone()
    }

    fn engine(&self) -> String {
        format!(
            "dynamollm twin (vLLM-like, chunked prefill), virtual time, windows ≥ {} s and ≥ {} requests",
            self.window_s, self.min_requests
        )
    }

    fn max_clock_mhz(&self) -> u32 {
        self.physics.gpu.clock_max_mhz
    }

    fn concurrent(&self) -> bool {
        true
    }

    fn unloaded(&self, class: RequestClass) -> Result<Unloaded> {
        let (i, o) = self.lengths.medians[class.index()];
        let u = unloaded(&self.physics, 8, self.physics.gpu.clock_max_mhz, i, o.max(2));
        Ok(Unloaded { ttft_s: u.ttft_s, tbt_s: u.tbt_p50_s })
    }

    fn measure(&self, p: &Point, seed: u64) -> Result<ProfileRow> {
        let window_s = self.window_s.max(self.min_requests as f64 / p.load_rps);
        let mean = self.lengths.mean_tokens(p.class);
        let no_slo = ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY };
        let m = load_point_rps(
            &self.physics,
            self.lengths.of(p.class),
            p.tp,
            p.clock_mhz,
            p.load_rps,
            window_s,
            seed,
            no_slo,
        );
        Ok(ProfileRow {
            model: self.model(),
            gpu: self.gpu(),
            class: p.class,
            tp: p.tp,
            clock_mhz: p.clock_mhz,
            load_rps: p.load_rps,
            load_tok_s: p.load_rps * mean,
            energy_per_req_j: m.energy_per_req_j,
            power_per_gpu_w: m.power_per_gpu_w,
            ttft_p50_s: m.latency.ttft_p50_s,
            ttft_p99_s: m.latency.ttft_p99_s,
            tbt_p50_s: m.latency.tbt_p50_s,
            tbt_p99_s: m.latency.tbt_p99_s,
            requests: m.requests,
            window_s,
            // Both measure an engine serving both phases.
            role: telemetry::InstanceRole::Colocated,
        })
    }
}
