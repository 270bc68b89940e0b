//! The NVML backend: locks an instance's GPUs to a clock through a
//! [`GpuDevice`] (real NVML, or the twin's fake device). Carries out
//! `set-clock` only.
//!
//! **Snapping.** A requested clock is first clamped into the configured
//! `[min_clock_mhz, max_clock_mhz]`; then, per GPU, the clock locked is the
//! highest clock that GPU supports that is ≤ the clamped request and inside
//! the bounds. When the GPU supports no clock that low inside the bounds,
//! the lowest supported clock inside the bounds is used (never one above the
//! upper bound). When the GPU supports no clock inside the bounds at all,
//! the command fails (not retryable) naming the bounds and the GPU's range.
//! The lock is `[clock, clock]` (a fixed clock).

use crate::{Action, ActionId, Actuator, Command, Outcome};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use telemetry::gpu::{GpuDevice, GpuError};

/// Applied ids remembered (then forgotten all at once; re-applying is harmless).
const MAX_REMEMBERED_IDS: usize = 10_000;

/// Pick the clock to lock (see the module documentation): the highest
/// supported clock ≤ `requested_mhz` clamped into `[min_mhz, max_mhz]`, else
/// the lowest supported clock within the bounds. `supported_mhz` need not be
/// sorted. An error names the bounds and the supported range.
pub fn snap_clock(requested_mhz: u32, min_mhz: u32, max_mhz: u32, supported_mhz: &[u32]) -> Result<u32, String> {
    if min_mhz > max_mhz {
        return Err(format!("clock bounds are inverted: min {min_mhz} MHz > max {max_mhz} MHz"));
    }
    let target = requested_mhz.clamp(min_mhz, max_mhz);
    let inside: Vec<u32> = supported_mhz.iter().copied().filter(|c| (min_mhz..=max_mhz).contains(c)).collect();
    if let Some(c) = inside.iter().copied().filter(|&c| c <= target).max() {
        return Ok(c);
    }
    if let Some(c) = inside.iter().copied().min() {
        return Ok(c);
    }
    match (supported_mhz.iter().min(), supported_mhz.iter().max()) {
        (Some(lo), Some(hi)) => Err(format!(
            "no supported clock within the configured {min_mhz}–{max_mhz} MHz (the GPU supports {lo}–{hi} MHz)"
        )),
        _ => Err("the GPU lists no supported clocks".to_string()),
    }
}

/// The NVML backend (see the module documentation).
pub struct NvmlActuator {
    device: Arc<dyn GpuDevice>,
    min_clock_mhz: u32,
    max_clock_mhz: u32,
    locked: Arc<Mutex<BTreeSet<u32>>>,
    applied: Mutex<HashMap<ActionId, Outcome>>,
}

impl std::fmt::Debug for NvmlActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlActuator")
            .field("device", &self.device.describe())
            .field("min_clock_mhz", &self.min_clock_mhz)
            .field("max_clock_mhz", &self.max_clock_mhz)
            .finish()
    }
}

fn retryable(e: &GpuError) -> bool {
    !matches!(
        e,
        GpuError::NoPermission { .. }
            | GpuError::NotSupported { .. }
            | GpuError::ClockOutOfRange { .. }
            | GpuError::NoSuchGpu { .. }
            | GpuError::DriverMissing(_)
    )
}

impl NvmlActuator {
    /// A backend over `device` that locks clocks only within
    /// `[min_clock_mhz, max_clock_mhz]`.
    pub fn new(device: Arc<dyn GpuDevice>, min_clock_mhz: u32, max_clock_mhz: u32) -> NvmlActuator {
        NvmlActuator {
            device,
            min_clock_mhz,
            max_clock_mhz,
            locked: Arc::new(Mutex::new(BTreeSet::new())),
            applied: Mutex::new(HashMap::new()),
        }
    }

    /// GPUs this backend has locked and not yet reset.
    pub fn locked_gpus(&self) -> Vec<u32> {
        self.locked.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }
}

#[async_trait::async_trait]
impl Actuator for NvmlActuator {
    fn name(&self) -> &str {
        "nvml"
    }

    fn supports(&self, action: &Action) -> bool {
        matches!(action, Action::SetClock { .. })
    }

    async fn apply(&self, cmd: &Command) -> Outcome {
        let Action::SetClock { instance, clock_mhz } = &cmd.action else {
            return Outcome::Failed {
                reason: format!("nvml carries out set-clock only, not {}", cmd.action.kind()),
                retryable: false,
            };
        };
        if let Some(done) = self.applied.lock().unwrap_or_else(|p| p.into_inner()).get(&cmd.id) {
            return done.clone();
        }
        let (instance, requested) = (*instance, *clock_mhz);
        let gpus: Vec<u32> = cmd.placement.as_ref().map(|p| p.gpus.clone()).unwrap_or_default();
        let (device, locked) = (self.device.clone(), self.locked.clone());
        let (min, max) = (self.min_clock_mhz, self.max_clock_mhz);
        let result = tokio::task::spawn_blocking(move || -> Result<(Vec<u32>, Vec<u32>), (String, bool)> {
            let gpus = if gpus.is_empty() {
                let n = device.count().map_err(|e| (e.to_string(), retryable(&e)))?;
                (0..n).collect()
            } else {
                gpus
            };
            let mut clocks = Vec::with_capacity(gpus.len());
            for &g in &gpus {
                let supported = device.supported_sm_clocks_mhz(g).map_err(|e| (e.to_string(), retryable(&e)))?;
                let c = snap_clock(requested, min, max, &supported).map_err(|e| (format!("GPU {g}: {e}"), false))?;
                device.set_locked_clocks(g, c, c).map_err(|e| (e.to_string(), retryable(&e)))?;
                locked.lock().unwrap_or_else(|p| p.into_inner()).insert(g);
                clocks.push(c);
            }
            Ok((gpus, clocks))
        })
        .await;
        let outcome = match result {
            Ok(Ok((gpus, clocks))) => {
                let uniq: BTreeSet<u32> = clocks.iter().copied().collect();
                let at = uniq.iter().map(|c| format!("{c} MHz")).collect::<Vec<_>>().join("/");
                tracing::info!(id = %cmd.id, instance = instance.0, ?gpus, requested_mhz = requested, locked_mhz = ?clocks, "clocks locked");
                Outcome::Applied {
                    placement: None,
                    detail: format!("instance {}: GPUs {gpus:?} locked at {at} (asked {requested} MHz)", instance.0),
                }
            }
            Ok(Err((reason, retryable))) => Outcome::Failed { reason, retryable },
            Err(e) => Outcome::Failed { reason: format!("GPU task failed: {e}"), retryable: true },
        };
        if outcome.is_applied() {
            let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded: forgetting ids is safe, re-locking the same clock is harmless.
            if applied.len() >= MAX_REMEMBERED_IDS {
                applied.clear();
            }
            applied.insert(cmd.id.clone(), outcome.clone());
        }
        outcome
    }

    async fn reset(&self) -> Result<(), String> {
        let gpus = self.locked_gpus();
        let (device, locked) = (self.device.clone(), self.locked.clone());
        let errors = tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            for g in gpus {
                match device.reset_locked_clocks(g) {
                    Ok(()) => {
                        locked.lock().unwrap_or_else(|p| p.into_inner()).remove(&g);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        })
        .await
        .map_err(|e| format!("GPU reset task failed: {e}"))?;
        // After a reset the locks are gone: the same id may lock again.
        self.applied.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if errors.is_empty() {
            tracing::info!("GPU clocks reset");
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::snap_clock;

    #[test]
    fn snapping_picks_the_highest_supported_clock_not_above_the_request() {
        let s = [800, 1000, 1200, 1400, 1600, 1980];
        assert_eq!(snap_clock(1300, 0, 2000, &s), Ok(1200));
        assert_eq!(snap_clock(1400, 0, 2000, &s), Ok(1400));
        assert_eq!(snap_clock(5000, 0, 1500, &s), Ok(1400));
        assert_eq!(snap_clock(100, 1000, 2000, &s), Ok(1000));
        assert_eq!(snap_clock(100, 900, 2000, &s), Ok(1000));
        assert!(snap_clock(1000, 1700, 1900, &s).unwrap_err().contains("1700–1900"));
        assert!(snap_clock(1000, 2000, 1000, &s).is_err());
        assert!(snap_clock(1000, 0, 2000, &[]).is_err());
    }
}
