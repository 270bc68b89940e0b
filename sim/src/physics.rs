//! The twin's physics: how long one engine step takes and how much energy each
//! GPU spends in it, for a given TP degree, SM clock and batch composition.
//! Parameters come from a TOML data file (units in key names); nothing about
//! the hardware or the model is written in code.
//!
//! Time of a step = CPU overhead + weight streaming + KV reads (memory-bound,
//! clock-insensitive above the bandwidth-saturation clock) + math (∝ 1/f) +
//! two all-reduces per layer. Energy per GPU = idle power over the step +
//! active, memory and SM power over the parts that use them; SM power scales
//! with (f/f_max)^k. A step whose power would pass the TDP runs at the clock
//! where it meets it, as the GPU's power capping does.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A physics file could not be used; names the file, the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum PhysicsError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown, missing or of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and the line).
        message: String,
    },
    /// A value is out of its physical range.
    #[error("{path}: key `{key}`: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key, e.g. `power.idle_w`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// The served model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// Model name, as it appears in profiles.
    pub name: String,
    /// Parameter count.
    pub params: f64,
    /// Bytes of weights (all GPUs together).
    pub weight_bytes: f64,
    /// Transformer layers.
    pub layers: u32,
    /// Hidden size.
    pub hidden_size: u32,
    /// KV-cache bytes per token (all layers, K and V).
    pub kv_bytes_per_token: f64,
}

/// The GPU and the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuParams {
    /// GPU name, as it appears in profiles.
    pub name: String,
    /// GPUs in one server (an instance never spans servers).
    pub gpus_per_server: u32,
    /// Memory per GPU.
    pub memory_bytes: f64,
    /// Share of memory the engine may use (weights + KV).
    pub usable_memory_fraction: f64,
    /// Dense fp16 peak per GPU.
    pub peak_flops: f64,
    /// HBM peak bandwidth per GPU.
    pub hbm_bandwidth_bytes_per_s: f64,
    /// Board power limit.
    pub tdp_w: f64,
    /// Highest SM clock.
    pub clock_max_mhz: u32,
    /// Clocks an instance may be locked to.
    pub clocks_mhz: Vec<u32>,
}

/// Performance constants.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerfParams {
    /// Share of peak FLOP/s prefill math reaches.
    pub prefill_flops_efficiency: f64,
    /// Share of peak FLOP/s decode math reaches.
    pub decode_flops_efficiency: f64,
    /// Share of peak HBM bandwidth weight/KV streaming reaches.
    pub hbm_efficiency: f64,
    /// Below this clock achievable bandwidth falls with the clock.
    pub bandwidth_saturation_clock_mhz: u32,
    /// Parallel efficiency of the math at TP2.
    pub tp2_compute_efficiency: f64,
    /// … at TP4.
    pub tp4_compute_efficiency: f64,
    /// … at TP8.
    pub tp8_compute_efficiency: f64,
    /// Fixed latency of one all-reduce (launch, synchronisation).
    pub allreduce_latency_s: f64,
    /// Latency one all-reduce adds per peer GPU beyond the first (hops of
    /// the ring or tree): TP8 synchronises seven peers, TP2 one.
    pub allreduce_latency_per_peer_s: f64,
    /// Effective all-reduce bus bandwidth.
    pub allreduce_bandwidth_bytes_per_s: f64,
    /// How far a linear layer's weight streaming and its math overlap: the
    /// step's linear time is `(t_weights^k + t_math^k)^(1/k)` (roofline).
    /// 1 = no overlap (the times add); large = a perfect max.
    pub linear_overlap_exponent: f64,
    /// CPU time per engine step during which the GPU idles.
    pub iteration_overhead_s: f64,
    /// Per-request API/tokeniser time, part of TTFT.
    pub request_overhead_s: f64,
}

/// Engine (scheduler) limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineParams {
    /// Most sequences in one batch.
    pub max_num_seqs: u32,
    /// Token budget per step at TP2 (decode tokens count one each; prefill is chunked into the rest).
    pub max_num_batched_tokens_tp2: u32,
    /// … at TP4.
    pub max_num_batched_tokens_tp4: u32,
    /// … at TP8.
    pub max_num_batched_tokens_tp8: u32,
}

/// Power model, per GPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerParams {
    /// Engine loaded, idle, at max clock.
    pub idle_w: f64,
    /// Share by which idle power falls from max clock to zero clock.
    pub idle_clock_slope: f64,
    /// Clock-independent power while kernels run.
    pub active_w: f64,
    /// HBM power at full bandwidth.
    pub memory_w_at_peak_bandwidth: f64,
    /// SMs busy (not computing) at max clock.
    pub sm_active_w: f64,
    /// Extra at full tensor-core use at max clock.
    pub sm_compute_w: f64,
    /// Exponent k of (f/f_max)^k.
    pub voltage_exponent: f64,
    /// A warm-standby instance's power per GPU.
    pub standby_w: f64,
    /// Power per GPU while an instance starts or reshards.
    pub starting_w: f64,
}

/// Reconfiguration delays.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleParams {
    /// Cold VM start.
    pub cold_start_s: f64,
    /// Start from snapshot or warm standby.
    pub warm_start_s: f64,
    /// vLLM sleep-mode wake.
    pub sleep_wake_s: f64,
    /// Reshard by restart.
    pub reshard_restart_s: f64,
    /// Reshard in place over NVLink.
    pub reshard_in_place_s: f64,
    /// Clock change (no step runs meanwhile).
    pub clock_change_s: f64,
}

/// All the twin's physics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Physics {
    /// The model.
    pub model: ModelParams,
    /// The GPU.
    pub gpu: GpuParams,
    /// Performance constants.
    pub perf: PerfParams,
    /// Engine limits.
    pub engine: EngineParams,
    /// Power model.
    pub power: PowerParams,
    /// Reconfiguration delays.
    pub lifecycle: LifecycleParams,
    /// The cluster's request router (how a pool's requests spread over its instances).
    #[serde(default)]
    pub router: RouterParams,
    /// Moving a request's KV cache between instances (prefill to decode, in phase-split pools).
    pub kv_transfer: KvTransferParams,
}

/// Moving a request's KV cache from one instance to another: each GPU of the sender holds its
/// tensor-parallel shard and sends it over its own link, so a transfer runs on as many links as
/// the smaller of the two instances has GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvTransferParams {
    /// One direction of one GPU's link to a GPU of the same server (NVLink), bytes/s.
    pub intra_server_bytes_per_s: f64,
    /// Fixed time of a transfer inside a server (s).
    pub intra_server_latency_s: f64,
    /// One GPU's share of its server's network (its NIC), bytes/s.
    pub inter_server_bytes_per_s: f64,
    /// Fixed time of a transfer between servers (s).
    pub inter_server_latency_s: f64,
    /// Power one link draws above idle while it sends (W).
    pub link_active_w: f64,
}

pub use telemetry_core::Balance;

/// The twin's request router.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterParams {
    /// How requests spread over a pool's instances.
    #[serde(default)]
    pub balance: Balance,
}

/// The default physics file, embedded so the binary runs with no files around it.
pub const DEFAULT_PHYSICS_TOML: &str = include_str!("../../profiles/twin/llama2-70b-h100.toml");
/// Where the default physics file lives in the repository.
pub const DEFAULT_PHYSICS_PATH: &str = "profiles/twin/llama2-70b-h100.toml";

/// What one engine step holds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepShape {
    /// Sequences decoding (one token each).
    pub decode_seqs: u32,
    /// Sum of the decoding sequences' context lengths (tokens whose KV is read).
    pub decode_context_tokens: f64,
    /// Prefill tokens in this step's chunk.
    pub prefill_tokens: u32,
    /// Mean context a prefill token attends to.
    pub prefill_context_tokens: f64,
}

/// Time and per-GPU energy of one step, and how both grow per step while the
/// decoding sequences' contexts grow by one token each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    /// Duration of the step.
    pub time_s: f64,
    /// Energy one GPU spends in it.
    pub energy_j: f64,
    /// Added to `time_s` for every later step of the same shape.
    pub time_growth_s: f64,
    /// Added to `energy_j` for every later step.
    pub energy_growth_j: f64,
    /// The clock the step actually ran at (below the locked clock when capped by TDP).
    pub effective_clock_mhz: f64,
}

impl StepCost {
    /// Average power per GPU over the step.
    pub fn power_w(&self) -> f64 {
        self.energy_j / self.time_s
    }
}

impl Physics {
    /// The embedded default (DGX H100 + Llama-2-70B).
    pub fn default_h100_llama70b() -> Physics {
        Physics::from_toml_str(DEFAULT_PHYSICS_TOML, Path::new(DEFAULT_PHYSICS_PATH))
            .expect("the embedded physics file is valid")
    }

    /// Read and validate a physics file.
    pub fn load(path: &Path) -> Result<Physics, PhysicsError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| PhysicsError::Io { path: path.to_path_buf(), source })?;
        Physics::from_toml_str(&text, path)
    }

    /// Parse and validate TOML text; `path` names it in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Physics, PhysicsError> {
        let p: Physics = toml::from_str(text).map_err(|e| PhysicsError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        p.validate(path)?;
        Ok(p)
    }

    fn validate(&self, path: &Path) -> Result<(), PhysicsError> {
        let bad =
            |key: &str, problem: String| PhysicsError::Invalid { path: path.to_path_buf(), key: key.into(), problem };
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(key, format!("must be a positive number, got {v}")))
            }
        };
        let fraction = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(bad(key, format!("must be in (0, 1], got {v}")))
            }
        };
        let non_negative = |key: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(bad(key, format!("must be zero or more, got {v}")))
            }
        };
        let m = &self.model;
        positive("model.params", m.params)?;
        positive("model.weight_bytes", m.weight_bytes)?;
        positive("model.layers", f64::from(m.layers))?;
        positive("model.hidden_size", f64::from(m.hidden_size))?;
        positive("model.kv_bytes_per_token", m.kv_bytes_per_token)?;
        let g = &self.gpu;
        positive("gpu.gpus_per_server", f64::from(g.gpus_per_server))?;
        positive("gpu.memory_bytes", g.memory_bytes)?;
        fraction("gpu.usable_memory_fraction", g.usable_memory_fraction)?;
        positive("gpu.peak_flops", g.peak_flops)?;
        positive("gpu.hbm_bandwidth_bytes_per_s", g.hbm_bandwidth_bytes_per_s)?;
        positive("gpu.tdp_w", g.tdp_w)?;
        positive("gpu.clock_max_mhz", f64::from(g.clock_max_mhz))?;
        if g.clocks_mhz.is_empty() {
            return Err(bad("gpu.clocks_mhz", "needs at least one clock".into()));
        }
        if let Some(c) = g.clocks_mhz.iter().find(|&&c| c == 0 || c > g.clock_max_mhz) {
            return Err(bad(
                "gpu.clocks_mhz",
                format!("clock {c} MHz is outside 1..={} (gpu.clock_max_mhz)", g.clock_max_mhz),
            ));
        }
        if !g.clocks_mhz.windows(2).all(|w| w[0] < w[1]) {
            return Err(bad("gpu.clocks_mhz", "clocks must be listed in increasing order".into()));
        }
        if g.clocks_mhz.last() != Some(&g.clock_max_mhz) {
            return Err(bad("gpu.clocks_mhz", "the list must end with gpu.clock_max_mhz".into()));
        }
        if m.weight_bytes / 8.0 >= g.memory_bytes * g.usable_memory_fraction {
            return Err(bad("model.weight_bytes", "the weights do not fit even at TP8".into()));
        }
        let p = &self.perf;
        fraction("perf.prefill_flops_efficiency", p.prefill_flops_efficiency)?;
        fraction("perf.decode_flops_efficiency", p.decode_flops_efficiency)?;
        fraction("perf.hbm_efficiency", p.hbm_efficiency)?;
        positive("perf.bandwidth_saturation_clock_mhz", f64::from(p.bandwidth_saturation_clock_mhz))?;
        fraction("perf.tp2_compute_efficiency", p.tp2_compute_efficiency)?;
        fraction("perf.tp4_compute_efficiency", p.tp4_compute_efficiency)?;
        fraction("perf.tp8_compute_efficiency", p.tp8_compute_efficiency)?;
        non_negative("perf.allreduce_latency_s", p.allreduce_latency_s)?;
        non_negative("perf.allreduce_latency_per_peer_s", p.allreduce_latency_per_peer_s)?;
        positive("perf.allreduce_bandwidth_bytes_per_s", p.allreduce_bandwidth_bytes_per_s)?;
        if !(1.0..=16.0).contains(&p.linear_overlap_exponent) {
            return Err(bad(
                "perf.linear_overlap_exponent",
                format!("must be in [1, 16], got {}", p.linear_overlap_exponent),
            ));
        }
        non_negative("perf.iteration_overhead_s", p.iteration_overhead_s)?;
        non_negative("perf.request_overhead_s", p.request_overhead_s)?;
        let k = &self.kv_transfer;
        positive("kv_transfer.intra_server_bytes_per_s", k.intra_server_bytes_per_s)?;
        non_negative("kv_transfer.intra_server_latency_s", k.intra_server_latency_s)?;
        positive("kv_transfer.inter_server_bytes_per_s", k.inter_server_bytes_per_s)?;
        non_negative("kv_transfer.inter_server_latency_s", k.inter_server_latency_s)?;
        non_negative("kv_transfer.link_active_w", k.link_active_w)?;
        let e = &self.engine;
        positive("engine.max_num_seqs", f64::from(e.max_num_seqs))?;
        for (key, v) in [
            ("engine.max_num_batched_tokens_tp2", e.max_num_batched_tokens_tp2),
            ("engine.max_num_batched_tokens_tp4", e.max_num_batched_tokens_tp4),
            ("engine.max_num_batched_tokens_tp8", e.max_num_batched_tokens_tp8),
        ] {
            if v < e.max_num_seqs {
                return Err(bad(
                    key,
                    format!("must be at least engine.max_num_seqs ({}), as vLLM requires", e.max_num_seqs),
                ));
            }
        }
        let w = &self.power;
        positive("power.idle_w", w.idle_w)?;
        if !(0.0..1.0).contains(&w.idle_clock_slope) {
            return Err(bad("power.idle_clock_slope", format!("must be in [0, 1), got {}", w.idle_clock_slope)));
        }
        non_negative("power.active_w", w.active_w)?;
        non_negative("power.memory_w_at_peak_bandwidth", w.memory_w_at_peak_bandwidth)?;
        non_negative("power.sm_active_w", w.sm_active_w)?;
        non_negative("power.sm_compute_w", w.sm_compute_w)?;
        if !(1.0..=4.0).contains(&w.voltage_exponent) {
            return Err(bad("power.voltage_exponent", format!("must be in [1, 4], got {}", w.voltage_exponent)));
        }
        positive("power.standby_w", w.standby_w)?;
        positive("power.starting_w", w.starting_w)?;
        if w.idle_w >= g.tdp_w {
            return Err(bad("power.idle_w", format!("must be below gpu.tdp_w ({})", g.tdp_w)));
        }
        let l = &self.lifecycle;
        non_negative("lifecycle.cold_start_s", l.cold_start_s)?;
        non_negative("lifecycle.warm_start_s", l.warm_start_s)?;
        non_negative("lifecycle.sleep_wake_s", l.sleep_wake_s)?;
        non_negative("lifecycle.reshard_restart_s", l.reshard_restart_s)?;
        non_negative("lifecycle.reshard_in_place_s", l.reshard_in_place_s)?;
        non_negative("lifecycle.clock_change_s", l.clock_change_s)?;
        Ok(())
    }

    /// Tensor-parallel degrees an instance may use.
    pub fn valid_tp(&self, tp: u32) -> bool {
        matches!(tp, 2 | 4 | 8) && tp <= self.gpu.gpus_per_server
    }

    fn tp_efficiency(&self, tp: u32) -> f64 {
        match tp {
            2 => self.perf.tp2_compute_efficiency,
            4 => self.perf.tp4_compute_efficiency,
            8 => self.perf.tp8_compute_efficiency,
            _ => 1.0,
        }
    }

    /// The engine's token budget per step at a TP degree.
    pub fn step_token_budget(&self, tp: u32) -> u32 {
        match tp {
            2 => self.engine.max_num_batched_tokens_tp2,
            4 => self.engine.max_num_batched_tokens_tp4,
            _ => self.engine.max_num_batched_tokens_tp8,
        }
    }

    /// Time to move the KV cache of `tokens` tokens from an instance of `from_tp` GPUs to one of
    /// `to_tp` (s): the shards travel in parallel over as many links as the smaller instance has
    /// GPUs, inside one server over NVLink, else over the servers' network.
    pub fn kv_transfer_s(&self, tokens: u64, from_tp: u32, to_tp: u32, same_server: bool) -> f64 {
        let k = &self.kv_transfer;
        let links = f64::from(from_tp.min(to_tp).max(1));
        let bytes = tokens as f64 * self.model.kv_bytes_per_token;
        let (bandwidth, latency) = if same_server {
            (k.intra_server_bytes_per_s, k.intra_server_latency_s)
        } else {
            (k.inter_server_bytes_per_s, k.inter_server_latency_s)
        };
        latency + bytes / (links * bandwidth)
    }

    /// Energy the links draw above idle for that transfer (J).
    pub fn kv_transfer_energy_j(&self, tokens: u64, from_tp: u32, to_tp: u32, same_server: bool) -> f64 {
        let links = f64::from(from_tp.min(to_tp).max(1));
        links * self.kv_transfer.link_active_w * self.kv_transfer_s(tokens, from_tp, to_tp, same_server)
    }

    /// KV-cache capacity of an instance in tokens.
    pub fn kv_capacity_tokens(&self, tp: u32) -> u64 {
        let usable = f64::from(tp) * self.gpu.memory_bytes * self.gpu.usable_memory_fraction - self.model.weight_bytes;
        (usable.max(0.0) / self.model.kv_bytes_per_token) as u64
    }

    /// Idle power per GPU at a clock (engine loaded, nothing to do).
    pub fn idle_power_w(&self, clock_mhz: f64) -> f64 {
        let r = clock_mhz / f64::from(self.gpu.clock_max_mhz);
        self.power.idle_w * (1.0 - self.power.idle_clock_slope * (1.0 - r))
    }

    /// Cost of one step at a locked clock, capped at the TDP.
    pub fn step(&self, tp: u32, clock_mhz: u32, shape: &StepShape) -> StepCost {
        let f = f64::from(clock_mhz);
        let cost = self.step_at(tp, f, shape);
        if cost.power_w() <= self.gpu.tdp_w {
            return cost;
        }
        // Power capping: the GPU lowers its clock until the step fits the TDP.
        // Power rises with the clock, so the capped clock is the root of
        // `power(f) - tdp` in [50, f]: regula falsi (Illinois), kept on the
        // side that fits.
        let tdp = self.gpu.tdp_w;
        let (mut lo, mut hi) = (50.0_f64, f);
        let mut g_lo = self.step_at(tp, lo, shape).power_w() - tdp;
        if g_lo > 0.0 {
            return self.step_at(tp, lo, shape);
        }
        let mut g_hi = cost.power_w() - tdp;
        let mut side = 0i8;
        for _ in 0..40 {
            if hi - lo < 0.01 {
                break;
            }
            let mid = (lo * g_hi - hi * g_lo) / (g_hi - g_lo);
            let mid = if mid > lo && mid < hi { mid } else { 0.5 * (lo + hi) };
            let g = self.step_at(tp, mid, shape).power_w() - tdp;
            if g > 0.0 {
                hi = mid;
                g_hi = g;
                if side == 1 {
                    g_lo *= 0.5;
                }
                side = 1;
            } else {
                lo = mid;
                g_lo = g;
                if side == -1 {
                    g_hi *= 0.5;
                }
                side = -1;
            }
        }
        self.step_at(tp, lo, shape)
    }

    /// Cost of one step at an exact (possibly fractional) clock, uncapped.
    fn step_at(&self, tp: u32, f_mhz: f64, s: &StepShape) -> StepCost {
        let m = &self.model;
        let g = &self.gpu;
        let p = &self.perf;
        let w = &self.power;
        let tpf = f64::from(tp);
        let f_max = f64::from(g.clock_max_mhz);
        let bw_share = (f_mhz / f64::from(p.bandwidth_saturation_clock_mhz)).min(1.0);
        let bw = g.hbm_bandwidth_bytes_per_s * p.hbm_efficiency * bw_share;
        let d = f64::from(s.decode_seqs);
        let c = f64::from(s.prefill_tokens);

        let t_weights = m.weight_bytes / tpf / bw;
        let t_kv = s.decode_context_tokens * m.kv_bytes_per_token / tpf / bw;
        let attn_flops_per_token_ctx = 4.0 * f64::from(m.layers) * f64::from(m.hidden_size);
        let compute_s_per_flop = (f_max / f_mhz) / (tpf * g.peak_flops * self.tp_efficiency(tp));
        // Linear layers: their math overlaps the weight streaming (roofline).
        let t_linear_math =
            2.0 * m.params * (d / p.decode_flops_efficiency + c / p.prefill_flops_efficiency) * compute_s_per_flop;
        // Prefill attention math runs in its own kernels.
        let t_attention_math =
            attn_flops_per_token_ctx * c * s.prefill_context_tokens / p.prefill_flops_efficiency * compute_s_per_flop;
        let t_comp = t_linear_math + t_attention_math;
        let t_linear = overlap(t_weights, t_linear_math, p.linear_overlap_exponent);
        let t_comm = if tp > 1 {
            let bytes = (d + c) * f64::from(m.hidden_size) * 2.0 * 2.0 * (tpf - 1.0) / tpf;
            let latency_s = p.allreduce_latency_s + (tpf - 1.0) * p.allreduce_latency_per_peer_s;
            2.0 * f64::from(m.layers) * (latency_s + bytes / p.allreduce_bandwidth_bytes_per_s)
        } else {
            0.0
        };
        let busy = t_linear + t_kv + t_attention_math + t_comm;
        let time_s = p.iteration_overhead_s + busy;

        let scale = (f_mhz / f_max).powf(w.voltage_exponent);
        let idle = self.idle_power_w(f_mhz);
        let hbm_peak = g.hbm_bandwidth_bytes_per_s;
        let bytes_per_gpu = (m.weight_bytes + s.decode_context_tokens * m.kv_bytes_per_token) / tpf;
        let energy_j = idle * time_s
            + w.active_w * busy
            + w.memory_w_at_peak_bandwidth * bytes_per_gpu / hbm_peak
            + scale * (w.sm_active_w * busy + w.sm_compute_w * t_comp);

        // Every later step reads `decode_seqs` more KV tokens.
        let kv_growth_bytes = d * m.kv_bytes_per_token / tpf;
        let time_growth_s = kv_growth_bytes / bw;
        let energy_growth_j = time_growth_s * (idle + w.active_w + scale * w.sm_active_w)
            + w.memory_w_at_peak_bandwidth * kv_growth_bytes / hbm_peak;
        StepCost { time_s, energy_j, time_growth_s, energy_growth_j, effective_clock_mhz: f_mhz }
    }
}

/// `(a^k + b^k)^(1/k)` for non-negative `a`, `b`: the time of two
/// overlapping parts (k = 1: they add; k → ∞: the longer one). Written as
/// `m · (1 + (n/m)^k)^(1/k)` with `m` the larger, with fast paths for k = 1,
/// 2 and 3 (`powf` is the costliest part of a step otherwise).
fn overlap(a: f64, b: f64, k: f64) -> f64 {
    let (m, n) = if a >= b { (a, b) } else { (b, a) };
    if m <= 0.0 {
        return 0.0;
    }
    let r = n / m;
    if k == 1.0 {
        m + n
    } else if k == 2.0 {
        m * (1.0 + r * r).sqrt()
    } else if k == 3.0 {
        m * (1.0 + r * r * r).cbrt()
    } else {
        m * (1.0 + r.powf(k)).powf(1.0 / k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_file_loads() {
        let p = Physics::default_h100_llama70b();
        assert_eq!(p.gpu.clock_max_mhz, 1980);
        assert!(p.kv_capacity_tokens(8) > 10 * p.kv_capacity_tokens(2));
    }

    #[test]
    fn a_kv_transfer_splits_over_the_smaller_instance_s_links() {
        let p = Physics::default_h100_llama70b();
        let k = p.kv_transfer;
        let bytes = 2048.0 * p.model.kv_bytes_per_token;
        let t = p.kv_transfer_s(2048, 8, 4, true);
        assert!((t - (k.intra_server_latency_s + bytes / (4.0 * k.intra_server_bytes_per_s))).abs() < 1e-12);
        assert_eq!(t, p.kv_transfer_s(2048, 4, 8, true), "the smaller side sets the links");
        let move_s = |tokens| p.kv_transfer_s(tokens, 8, 8, false) - k.inter_server_latency_s;
        assert!((move_s(4096) / move_s(2048) - 2.0).abs() < 1e-9, "twice the tokens, twice the time");
        assert!(p.kv_transfer_s(2048, 8, 8, false) > p.kv_transfer_s(2048, 8, 8, true), "the network is slower");
        let e = p.kv_transfer_energy_j(2048, 8, 8, false);
        assert!((e - 8.0 * k.link_active_w * p.kv_transfer_s(2048, 8, 8, false)).abs() < 1e-9);
    }

    #[test]
    fn a_bad_or_missing_kv_transfer_is_named() {
        let text = DEFAULT_PHYSICS_TOML.replace("inter_server_bytes_per_s = 23.75e9", "inter_server_bytes_per_s = -1");
        let err = Physics::from_toml_str(&text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("kv_transfer.inter_server_bytes_per_s"), "{err}");
        let start = DEFAULT_PHYSICS_TOML.find("[kv_transfer]").unwrap();
        let end = DEFAULT_PHYSICS_TOML.find("[router]").unwrap();
        let text = format!("{}{}", &DEFAULT_PHYSICS_TOML[..start], &DEFAULT_PHYSICS_TOML[end..]);
        let err = Physics::from_toml_str(&text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("kv_transfer"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_named() {
        let text = DEFAULT_PHYSICS_TOML.replace("idle_w = 90.0", "idle_w = 90.0\nidle_watts = 3");
        let err = Physics::from_toml_str(&text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.starts_with("x.toml:") && err.contains("idle_watts"), "{err}");
    }

    #[test]
    fn an_out_of_range_value_names_file_and_key() {
        let text = DEFAULT_PHYSICS_TOML.replace("hbm_efficiency = 0.80", "hbm_efficiency = 1.7");
        let err = Physics::from_toml_str(&text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("perf.hbm_efficiency") && err.contains("1.7"), "{err}");
        let text = DEFAULT_PHYSICS_TOML.replace("tdp_w = 700.0", "tdp_w = \"lots\"");
        let err = Physics::from_toml_str(&text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("tdp_w"), "{err}");
    }

    #[test]
    fn a_missing_key_is_named() {
        let text = DEFAULT_PHYSICS_TOML.replace("tdp_w = 700.0\n", "");
        let err = Physics::from_toml_str(&text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("tdp_w"), "{err}");
    }

    #[test]
    fn power_never_passes_the_tdp() {
        let p = Physics::default_h100_llama70b();
        let shape = StepShape {
            decode_seqs: 0,
            decode_context_tokens: 0.0,
            prefill_tokens: 8192,
            prefill_context_tokens: 4096.0,
        };
        for tp in [2, 4, 8] {
            let c = p.step(tp, 1980, &shape);
            assert!(c.power_w() <= p.gpu.tdp_w + 1e-6, "tp{tp}: {}", c.power_w());
        }
    }

    #[test]
    fn overlapping_parts_lie_between_the_longer_and_the_sum() {
        assert_eq!(overlap(2.0, 3.0, 1.0), 5.0);
        assert!((overlap(3.0, 4.0, 2.0) - 5.0).abs() < 1e-12);
        assert!((overlap(1.0, 1.0, 3.0) - 2f64.cbrt()).abs() < 1e-12);
        assert!((overlap(4.0, 3.0, 2.5) - (4f64.powf(2.5) + 3f64.powf(2.5)).powf(0.4)).abs() < 1e-12);
        assert_eq!(overlap(0.0, 0.0, 3.0), 0.0);
        for k in [1.0, 1.5, 2.0, 3.0, 7.0] {
            let t = overlap(0.02, 0.015, k);
            assert!((0.02..=0.035 + 1e-15).contains(&t), "k {k}: {t}");
        }
    }

    #[test]
    fn a_capped_step_runs_at_the_tdp() {
        let p = Physics::default_h100_llama70b();
        let shape = StepShape {
            decode_seqs: 8,
            decode_context_tokens: 8.0 * 500.0,
            prefill_tokens: 880,
            prefill_context_tokens: 600.0,
        };
        for tp in [2, 4, 8] {
            let c = p.step(tp, 1980, &shape);
            assert!(c.effective_clock_mhz < 1980.0, "tp{tp} is not capped: {}", c.power_w());
            assert!((c.power_w() - p.gpu.tdp_w).abs() < 0.5, "tp{tp}: {} W", c.power_w());
        }
    }

    #[test]
    fn lower_clocks_never_speed_a_step_up() {
        let p = Physics::default_h100_llama70b();
        let shape = StepShape {
            decode_seqs: 32,
            decode_context_tokens: 32.0 * 800.0,
            prefill_tokens: 200,
            prefill_context_tokens: 100.0,
        };
        let mut last = 0.0;
        for &c in p.gpu.clocks_mhz.iter().rev() {
            let t = p.step(8, c, &shape).time_s;
            assert!(t >= last, "{c} MHz: {t} < {last}");
            last = t;
        }
    }
}
