//! GPUs as dynamollm sees them: a small trait over the NVML calls it needs
//! (the energy counter, power, clocks, and locking clocks), the real NVML
//! backend through `nvml-wrapper`, and a fake device that reads the digital
//! twin's `twin serve` endpoint so that CI runs every path without a GPU.
//!
//! The calls are blocking (NVML is a C library); async code runs them with
//! `tokio::task::spawn_blocking`.

use nvml_wrapper::enum_wrappers::device::Clock;
use nvml_wrapper::enums::device::GpuLockedClocksSetting;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use serde::Deserialize;
use std::time::Duration;

/// A GPU call that failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The NVML library or the driver is not there.
    #[error("NVML is not available ({0}); is the NVIDIA driver installed and libnvidia-ml.so on the library path?")]
    DriverMissing(String),
    /// The process may not do this (clock locking needs root).
    #[error("GPU {index}: not permitted: {what} (locking clocks needs root or CAP_SYS_ADMIN)")]
    NoPermission {
        /// The GPU.
        index: u32,
        /// What was refused.
        what: String,
    },
    /// This GPU does not support the call.
    #[error("GPU {index}: {what} is not supported on this device")]
    NotSupported {
        /// The GPU.
        index: u32,
        /// What is unsupported.
        what: String,
    },
    /// A clock outside what the device supports.
    #[error("GPU {index}: clock {clock_mhz} MHz is outside the supported {min_mhz}–{max_mhz} MHz")]
    ClockOutOfRange {
        /// The GPU.
        index: u32,
        /// The clock asked for.
        clock_mhz: u32,
        /// Lowest supported.
        min_mhz: u32,
        /// Highest supported.
        max_mhz: u32,
    },
    /// No GPU with this index.
    #[error("no GPU {index} (the device has {count})")]
    NoSuchGpu {
        /// The index asked for.
        index: u32,
        /// GPUs there are.
        count: u32,
    },
    /// Any other NVML error.
    #[error("GPU {index}: {what}: {source}")]
    Nvml {
        /// The GPU.
        index: u32,
        /// The call.
        what: &'static str,
        /// NVML's error.
        source: NvmlError,
    },
    /// The fake device could not reach or understand the twin.
    #[error("twin GPU at {url}: {problem}")]
    Twin {
        /// The endpoint.
        url: String,
        /// What went wrong.
        problem: String,
    },
}

/// The GPU calls dynamollm makes. Indices are the device's GPU indices.
pub trait GpuDevice: Send + Sync {
    /// What this device is (for logs and reports).
    fn describe(&self) -> String;
    /// Number of GPUs.
    fn count(&self) -> Result<u32, GpuError>;
    /// Energy counter since the driver loaded, in millijoules.
    fn energy_mj(&self, index: u32) -> Result<u64, GpuError>;
    /// Instantaneous board power.
    fn power_w(&self, index: u32) -> Result<f64, GpuError>;
    /// Current SM clock.
    fn sm_clock_mhz(&self, index: u32) -> Result<u32, GpuError>;
    /// SM clocks the GPU supports, ascending.
    fn supported_sm_clocks_mhz(&self, index: u32) -> Result<Vec<u32>, GpuError>;
    /// Lock the SM clock into `[min_mhz, max_mhz]`.
    fn set_locked_clocks(&self, index: u32, min_mhz: u32, max_mhz: u32) -> Result<(), GpuError>;
    /// Undo [`GpuDevice::set_locked_clocks`].
    fn reset_locked_clocks(&self, index: u32) -> Result<(), GpuError>;
    /// The GPU's power limit (W), when the device knows it: no reading may exceed it.
    fn power_limit_w(&self, _index: u32) -> Result<Option<f64>, GpuError> {
        Ok(None)
    }
    /// The device's seconds per wall second: 1 for real hardware; a sped-up
    /// twin's counters run this much faster than the wall clock.
    fn time_scale(&self) -> Result<f64, GpuError> {
        Ok(1.0)
    }
    /// GPU utilisation over the driver's last sample period, 0–1.
    fn util(&self, index: u32) -> Result<f64, GpuError> {
        Err(GpuError::NotSupported { index, what: "utilisation".into() })
    }
    /// GPU core temperature.
    fn temperature_c(&self, index: u32) -> Result<f64, GpuError> {
        Err(GpuError::NotSupported { index, what: "temperature".into() })
    }
    /// Clock throttle reasons, NVML's bit mask (`nvmlClocksThrottleReason*`).
    fn throttle_reasons(&self, index: u32) -> Result<u64, GpuError> {
        Err(GpuError::NotSupported { index, what: "throttle reasons".into() })
    }
}

/// Check a clock against the supported list of a GPU.
pub fn check_clock(index: u32, clock_mhz: u32, supported: &[u32]) -> Result<(), GpuError> {
    let (min_mhz, max_mhz) = match (supported.iter().min(), supported.iter().max()) {
        (Some(&lo), Some(&hi)) => (lo, hi),
        _ => return Err(GpuError::NotSupported { index, what: "clock listing".into() }),
    };
    if clock_mhz < min_mhz || clock_mhz > max_mhz {
        return Err(GpuError::ClockOutOfRange { index, clock_mhz, min_mhz, max_mhz });
    }
    Ok(())
}

/// Real GPUs through NVML. One handle per process: build it once and share it.
pub struct NvmlDevice {
    nvml: Nvml,
}

impl NvmlDevice {
    /// Load NVML (tries `libnvidia-ml.so.1` when the unversioned name is missing).
    pub fn init() -> Result<NvmlDevice, GpuError> {
        let nvml = match Nvml::init() {
            Err(NvmlError::LibloadingError(_)) => {
                Nvml::builder().lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1")).init()
            }
            other => other,
        };
        match nvml {
            Ok(nvml) => Ok(NvmlDevice { nvml }),
            Err(
                e @ (NvmlError::LibloadingError(_) | NvmlError::DriverNotLoaded | NvmlError::FailedToLoadSymbol(_)),
            ) => Err(GpuError::DriverMissing(e.to_string())),
            Err(e) => Err(GpuError::DriverMissing(e.to_string())),
        }
    }

    fn map(index: u32, what: &'static str, e: NvmlError) -> GpuError {
        match e {
            NvmlError::NoPermission => GpuError::NoPermission { index, what: what.into() },
            NvmlError::NotSupported => GpuError::NotSupported { index, what: what.into() },
            source => GpuError::Nvml { index, what, source },
        }
    }
}

impl GpuDevice for NvmlDevice {
    fn describe(&self) -> String {
        let name = self.nvml.device_by_index(0).and_then(|d| d.name()).unwrap_or_else(|_| "unknown".into());
        let driver = self.nvml.sys_driver_version().unwrap_or_else(|_| "unknown".into());
        format!("NVML: {name}, driver {driver}")
    }

    fn count(&self) -> Result<u32, GpuError> {
        self.nvml.device_count().map_err(|e| NvmlDevice::map(0, "device count", e))
    }

    fn energy_mj(&self, index: u32) -> Result<u64, GpuError> {
        let d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        d.total_energy_consumption().map_err(|e| NvmlDevice::map(index, "energy counter", e))
    }

    fn power_w(&self, index: u32) -> Result<f64, GpuError> {
        let d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        d.power_usage().map(|mw| f64::from(mw) / 1000.0).map_err(|e| NvmlDevice::map(index, "power", e))
    }

    fn sm_clock_mhz(&self, index: u32) -> Result<u32, GpuError> {
        let d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        d.clock_info(Clock::SM).map_err(|e| NvmlDevice::map(index, "SM clock", e))
    }

    fn power_limit_w(&self, index: u32) -> Result<Option<f64>, GpuError> {
        let d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        let mw = d.enforced_power_limit().map_err(|e| NvmlDevice::map(index, "power limit", e))?;
        Ok(Some(f64::from(mw) / 1000.0))
    }

    fn supported_sm_clocks_mhz(&self, index: u32) -> Result<Vec<u32>, GpuError> {
        let d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        let mem = d.supported_memory_clocks().map_err(|e| NvmlDevice::map(index, "memory clocks", e))?;
        let top = mem.into_iter().max().ok_or(GpuError::NotSupported { index, what: "memory clocks".into() })?;
        let mut clocks = d.supported_graphics_clocks(top).map_err(|e| NvmlDevice::map(index, "graphics clocks", e))?;
        clocks.sort_unstable();
        clocks.dedup();
        Ok(clocks)
    }

    fn set_locked_clocks(&self, index: u32, min_mhz: u32, max_mhz: u32) -> Result<(), GpuError> {
        let supported = self.supported_sm_clocks_mhz(index)?;
        check_clock(index, min_mhz, &supported)?;
        check_clock(index, max_mhz, &supported)?;
        let mut d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        d.set_gpu_locked_clocks(GpuLockedClocksSetting::Numeric { min_clock_mhz: min_mhz, max_clock_mhz: max_mhz })
            .map_err(|e| NvmlDevice::map(index, "lock clocks", e))
    }

    fn reset_locked_clocks(&self, index: u32) -> Result<(), GpuError> {
        let mut d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        d.reset_gpu_locked_clocks().map_err(|e| NvmlDevice::map(index, "reset clocks", e))
    }

    fn util(&self, index: u32) -> Result<f64, GpuError> {
        let d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        d.utilization_rates().map(|u| f64::from(u.gpu) / 100.0).map_err(|e| NvmlDevice::map(index, "utilisation", e))
    }

    fn temperature_c(&self, index: u32) -> Result<f64, GpuError> {
        let d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        d.temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
            .map(f64::from)
            .map_err(|e| NvmlDevice::map(index, "temperature", e))
    }

    fn throttle_reasons(&self, index: u32) -> Result<u64, GpuError> {
        let d = self.nvml.device_by_index(index).map_err(|e| NvmlDevice::map(index, "device", e))?;
        d.current_throttle_reasons().map(|r| r.bits()).map_err(|e| NvmlDevice::map(index, "throttle reasons", e))
    }
}

/// Per-GPU metric names `twin serve` exposes for the fake device.
pub mod twin_metrics {
    /// Energy counter per GPU (J), label `gpu`.
    pub const ENERGY_J: &str = "dynamollm_twin_gpu_energy_joules_total";
    /// Power per GPU (W), label `gpu`.
    pub const POWER_W: &str = "dynamollm_twin_gpu_power_watts";
    /// SM clock per GPU (MHz), label `gpu`.
    pub const SM_CLOCK_MHZ: &str = "dynamollm_twin_gpu_sm_clock_mhz";
}

/// The twin's clock admin answer (`GET /admin/clock`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct TwinClockState {
    /// GPUs of the instance.
    pub gpus: u32,
    /// Locked clock now.
    pub clock_mhz: u32,
    /// Clocks the twin's physics supports.
    pub supported_clocks_mhz: Vec<u32>,
    /// The clock a reset returns to.
    pub default_clock_mhz: u32,
    /// Twin seconds per wall second (1: real time).
    #[serde(default)]
    pub speed: Option<f64>,
    /// Each GPU's power limit (W).
    #[serde(default)]
    pub power_limit_w: Option<f64>,
}

/// The fake GPU device: the GPUs of one `dynamollm twin serve` instance, read
/// from its `/metrics` page and clock-locked through its `/admin/clock`.
pub struct TwinDevice {
    base_url: String,
    client: reqwest::blocking::Client,
}

impl TwinDevice {
    /// A device over the twin at `base_url` (e.g. `http://127.0.0.1:8000`).
    pub fn new(base_url: &str) -> Result<TwinDevice, GpuError> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| GpuError::Twin { url: base_url.into(), problem: e.to_string() })?;
        Ok(TwinDevice { base_url: base_url.trim_end_matches('/').to_string(), client })
    }

    fn err(&self, problem: impl std::fmt::Display) -> GpuError {
        GpuError::Twin { url: self.base_url.clone(), problem: problem.to_string() }
    }

    fn clock_state(&self) -> Result<TwinClockState, GpuError> {
        let url = format!("{}/admin/clock", self.base_url);
        let resp = self.client.get(&url).send().map_err(|e| self.err(e))?;
        if !resp.status().is_success() {
            return Err(self.err(format!("GET /admin/clock answered {}", resp.status())));
        }
        resp.json().map_err(|e| self.err(format!("GET /admin/clock: {e}")))
    }

    fn gauge(&self, name: &str, index: u32) -> Result<f64, GpuError> {
        let url = format!("{}/metrics", self.base_url);
        let resp = self.client.get(&url).send().map_err(|e| self.err(e))?;
        let text = resp.text().map_err(|e| self.err(e))?;
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).map_err(|e| self.err(format!("/metrics: {e}")))?;
        let gpu = index.to_string();
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("gpu") == Some(gpu.as_str()))
            .and_then(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => Some(v),
                prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .ok_or_else(|| self.err(format!("/metrics has no {name}{{gpu=\"{index}\"}}")))
    }

    fn post_clock(&self, body: serde_json::Value) -> Result<(), GpuError> {
        let url = format!("{}/admin/clock", self.base_url);
        let resp = self.client.post(&url).json(&body).send().map_err(|e| self.err(e))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().unwrap_or_default();
            return Err(self.err(format!("POST /admin/clock answered {status}: {text}")));
        }
        Ok(())
    }

    fn check_index(&self, index: u32) -> Result<(), GpuError> {
        let count = self.count()?;
        if index >= count {
            return Err(GpuError::NoSuchGpu { index, count });
        }
        Ok(())
    }
}

impl GpuDevice for TwinDevice {
    fn describe(&self) -> String {
        format!("twin GPUs at {}", self.base_url)
    }

    fn count(&self) -> Result<u32, GpuError> {
        Ok(self.clock_state()?.gpus)
    }

    fn energy_mj(&self, index: u32) -> Result<u64, GpuError> {
        Ok((self.gauge(twin_metrics::ENERGY_J, index)? * 1000.0).round() as u64)
    }

    fn power_w(&self, index: u32) -> Result<f64, GpuError> {
        self.gauge(twin_metrics::POWER_W, index)
    }

    fn sm_clock_mhz(&self, index: u32) -> Result<u32, GpuError> {
        Ok(self.gauge(twin_metrics::SM_CLOCK_MHZ, index)?.round() as u32)
    }

    fn supported_sm_clocks_mhz(&self, index: u32) -> Result<Vec<u32>, GpuError> {
        self.check_index(index)?;
        Ok(self.clock_state()?.supported_clocks_mhz)
    }

    fn power_limit_w(&self, index: u32) -> Result<Option<f64>, GpuError> {
        self.check_index(index)?;
        Ok(self.clock_state()?.power_limit_w)
    }

    fn time_scale(&self) -> Result<f64, GpuError> {
        Ok(self.clock_state()?.speed.unwrap_or(1.0))
    }

    fn set_locked_clocks(&self, index: u32, min_mhz: u32, max_mhz: u32) -> Result<(), GpuError> {
        let state = self.clock_state()?;
        if index >= state.gpus {
            return Err(GpuError::NoSuchGpu { index, count: state.gpus });
        }
        check_clock(index, min_mhz, &state.supported_clocks_mhz)?;
        check_clock(index, max_mhz, &state.supported_clocks_mhz)?;
        // The twin locks all GPUs of its instance together, at the upper bound.
        self.post_clock(serde_json::json!({ "clock_mhz": max_mhz }))
    }

    fn reset_locked_clocks(&self, index: u32) -> Result<(), GpuError> {
        self.check_index(index)?;
        self.post_clock(serde_json::json!({ "reset": true }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_checks_name_the_range() {
        let supported = [800, 1000, 1980];
        assert!(check_clock(0, 1000, &supported).is_ok());
        let e = check_clock(3, 2100, &supported).unwrap_err();
        assert_eq!(e.to_string(), "GPU 3: clock 2100 MHz is outside the supported 800–1980 MHz");
        assert!(matches!(check_clock(0, 100, &[]), Err(GpuError::NotSupported { .. })));
    }

    #[test]
    fn missing_driver_is_a_clear_error() {
        // CI machines have no NVIDIA driver; where one exists, init succeeds.
        match NvmlDevice::init() {
            Ok(d) => assert!(d.count().is_ok()),
            Err(e) => {
                assert!(matches!(e, GpuError::DriverMissing(_)));
                assert!(e.to_string().contains("NVIDIA driver"), "{e}");
            }
        }
    }
}
