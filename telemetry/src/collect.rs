//! The GPU collector: reads every GPU of a [`GpuDevice`] (NVML, or the twin's
//! fake device) at its interval on tokio's blocking pool, and sends
//! [`Sample::Gpu`]s. Power comes from the energy counter's delta when the
//! device has one (exact over the interval, where a power reading is one
//! instant); otherwise from the power reading.

use crate::gpu::{GpuDevice, GpuError};
use crate::sample::{now_ms, GpuSample, Sample, Tags};
use crate::scrape::CollectorHandle;
use crate::stats::CollectorStats;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Reads GPUs and keeps each one's previous energy reading.
#[derive(Debug, Default)]
pub struct GpuReader {
    prev: HashMap<u32, (i64, u64)>,
}

impl GpuReader {
    /// A reader with no history.
    pub fn new() -> GpuReader {
        GpuReader::default()
    }

    /// Read all GPUs at `ts_ms`. A GPU whose power can be had neither way is
    /// an error (and no sample); unsupported extras (util, temperature,
    /// throttle reasons) are simply absent.
    pub fn read(&mut self, dev: &dyn GpuDevice, ts_ms: i64, tags: &Tags) -> (Vec<GpuSample>, Vec<GpuError>) {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        let count = match dev.count() {
            Ok(c) => c,
            Err(e) => return (out, vec![e]),
        };
        let extra = |r: Result<f64, GpuError>, errors: &mut Vec<GpuError>| match r {
            Ok(v) => Some(v),
            Err(GpuError::NotSupported { .. }) => None,
            Err(e) => {
                errors.push(e);
                None
            }
        };
        for i in 0..count {
            let energy = match dev.energy_mj(i) {
                Ok(mj) => Some(mj),
                Err(GpuError::NotSupported { .. }) => None,
                Err(e) => {
                    errors.push(e);
                    None
                }
            };
            let from_energy = match (energy, self.prev.get(&i)) {
                (Some(mj), Some(&(t0, mj0))) if ts_ms > t0 && mj >= mj0 => {
                    Some((mj - mj0) as f64 / (ts_ms - t0) as f64) // mJ/ms = W
                }
                _ => None,
            };
            if let Some(mj) = energy {
                self.prev.insert(i, (ts_ms, mj));
            }
            let power_w = match from_energy {
                Some(p) => p,
                None => match dev.power_w(i) {
                    Ok(p) => p,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                },
            };
            let sm_clock_mhz = extra(dev.sm_clock_mhz(i).map(f64::from), &mut errors).map(|c| c as u32);
            out.push(GpuSample {
                ts_ms,
                tags: Tags { gpu: Some(i), ..tags.clone() },
                power_w,
                energy_j: energy.map(|mj| mj as f64 / 1000.0),
                sm_clock_mhz,
                util: extra(dev.util(i), &mut errors),
                temperature_c: extra(dev.temperature_c(i), &mut errors),
                throttle_reasons: extra(dev.throttle_reasons(i).map(|b| b as f64), &mut errors).map(|b| b as u64),
            });
        }
        (out, errors)
    }
}

/// The GPU collector task.
pub struct GpuCollector;

impl GpuCollector {
    /// Start reading `device` every `interval` on the current tokio runtime.
    /// Errors are counted in the handle's stats (named `gpu`); the task ends
    /// when `out` is closed.
    pub fn spawn(
        device: Arc<dyn GpuDevice>,
        interval: Duration,
        tags: Tags,
        out: mpsc::Sender<Sample>,
    ) -> CollectorHandle {
        let stats = CollectorStats::new("gpu");
        let st = stats.clone();
        let task = tokio::spawn(async move {
            let mut reader = Some(GpuReader::new());
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (dev, tags, mut r) = (device.clone(), tags.clone(), reader.take().unwrap_or_default());
                let joined = tokio::task::spawn_blocking(move || {
                    let (s, e) = r.read(dev.as_ref(), now_ms(), &tags);
                    (r, s, e)
                })
                .await;
                let (r, samples, errors) = match joined {
                    Ok(x) => x,
                    Err(e) => {
                        st.record_error(&e);
                        continue;
                    }
                };
                reader = Some(r);
                for e in &errors {
                    st.record_error(e);
                }
                st.add_samples(samples.len());
                for s in samples {
                    if out.send(Sample::Gpu(s)).await.is_err() {
                        return;
                    }
                }
            }
        });
        CollectorHandle::new(stats, task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A scripted device: GPU 0 has an energy counter, GPU 1 only power.
    struct Fake {
        energy_mj: Mutex<u64>,
    }

    impl GpuDevice for Fake {
        fn describe(&self) -> String {
            "fake".into()
        }
        fn count(&self) -> Result<u32, GpuError> {
            Ok(2)
        }
        fn energy_mj(&self, index: u32) -> Result<u64, GpuError> {
            if index == 1 {
                return Err(GpuError::NotSupported { index, what: "energy counter".into() });
            }
            let mut e = self.energy_mj.lock().unwrap();
            *e += 500_000; // 500 J per read
            Ok(*e)
        }
        fn power_w(&self, index: u32) -> Result<f64, GpuError> {
            Ok(100.0 + f64::from(index))
        }
        fn sm_clock_mhz(&self, _: u32) -> Result<u32, GpuError> {
            Ok(1980)
        }
        fn supported_sm_clocks_mhz(&self, _: u32) -> Result<Vec<u32>, GpuError> {
            Ok(vec![1980])
        }
        fn set_locked_clocks(&self, _: u32, _: u32, _: u32) -> Result<(), GpuError> {
            Ok(())
        }
        fn reset_locked_clocks(&self, _: u32) -> Result<(), GpuError> {
            Ok(())
        }
        fn temperature_c(&self, index: u32) -> Result<f64, GpuError> {
            Err(GpuError::Twin { url: "fake".into(), problem: format!("sensor {index} broken") })
        }
    }

    #[test]
    fn power_comes_from_the_energy_counter_when_there_is_one() {
        let dev = Fake { energy_mj: Mutex::new(0) };
        let mut r = GpuReader::new();
        let tags = Tags::node("s", "n");
        let (first, errors) = r.read(&dev, 1_000, &tags);
        // No previous energy reading yet: GPU 0 falls back to the power reading.
        assert_eq!(first[0].power_w, 100.0);
        assert_eq!(first[0].energy_j, Some(500.0));
        // A broken sensor is an error per GPU, not a lost sample; unsupported extras are just absent.
        assert_eq!(errors.len(), 2);
        assert_eq!(first[0].util, None);
        let (second, _) = r.read(&dev, 3_000, &tags);
        // 500 J over 2 s.
        assert_eq!(second[0].power_w, 250.0);
        assert_eq!(second[1].power_w, 101.0);
        assert_eq!(second[1].energy_j, None);
        assert_eq!(second[1].tags.gpu, Some(1));
        assert_eq!(second[0].sm_clock_mhz, Some(1980));
    }

    #[tokio::test]
    async fn collector_task_sends_samples_and_counts_errors() {
        let dev: Arc<dyn GpuDevice> = Arc::new(Fake { energy_mj: Mutex::new(0) });
        let (tx, mut rx) = mpsc::channel(16);
        let h = GpuCollector::spawn(dev, Duration::from_millis(10), Tags::node("s", "n"), tx);
        let mut got = Vec::new();
        while got.len() < 4 {
            got.push(rx.recv().await.unwrap());
        }
        assert!(got.iter().all(|s| matches!(s, Sample::Gpu(_))));
        assert!(h.stats.samples() >= 4);
        assert!(h.stats.errors() >= 2);
        assert!(h.stats.last_error().unwrap().contains("broken"));
    }
}
