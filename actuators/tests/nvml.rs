//! The NVML backend over a fake GpuDevice: clock bounds and snapping, GPU
//! selection from the placement, idempotency, reset.

use actuators::nvml::NvmlActuator;
use actuators::{Action, Actuator, Command, InstanceId, Outcome, Placement};
use std::sync::{Arc, Mutex};
use telemetry::gpu::{GpuDevice, GpuError};

#[derive(Default)]
struct FakeGpus {
    count: u32,
    supported: Vec<u32>,
    /// GPUs that refuse to lock (no permission).
    refuse: Vec<u32>,
    calls: Mutex<Vec<String>>,
}

impl GpuDevice for FakeGpus {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn count(&self) -> Result<u32, GpuError> {
        Ok(self.count)
    }
    fn energy_mj(&self, _: u32) -> Result<u64, GpuError> {
        Ok(0)
    }
    fn power_w(&self, _: u32) -> Result<f64, GpuError> {
        Ok(0.0)
    }
    fn sm_clock_mhz(&self, _: u32) -> Result<u32, GpuError> {
        Ok(0)
    }
    fn supported_sm_clocks_mhz(&self, index: u32) -> Result<Vec<u32>, GpuError> {
        if index >= self.count {
            return Err(GpuError::NoSuchGpu { index, count: self.count });
        }
        Ok(self.supported.clone())
    }
    fn set_locked_clocks(&self, index: u32, min_mhz: u32, max_mhz: u32) -> Result<(), GpuError> {
        if self.refuse.contains(&index) {
            return Err(GpuError::NoPermission { index, what: "lock clocks".into() });
        }
        telemetry::gpu::check_clock(index, min_mhz, &self.supported)?;
        self.calls.lock().unwrap().push(format!("lock {index} {min_mhz}-{max_mhz}"));
        Ok(())
    }
    fn reset_locked_clocks(&self, index: u32) -> Result<(), GpuError> {
        self.calls.lock().unwrap().push(format!("reset {index}"));
        Ok(())
    }
}

fn gpus(count: u32) -> Arc<FakeGpus> {
    Arc::new(FakeGpus { count, supported: vec![1980, 800, 1000, 1200, 1400, 1600], ..Default::default() })
}

fn set_clock(id: &str, clock_mhz: u32, on: &[u32]) -> Command {
    Command::new(
        id,
        Action::SetClock { instance: InstanceId(1), clock_mhz },
        Some(Placement { node: "n1".into(), gpus: on.to_vec(), endpoint: None }),
    )
}

fn calls(g: &FakeGpus) -> Vec<String> {
    std::mem::take(&mut *g.calls.lock().unwrap())
}

#[tokio::test]
async fn clocks_snap_down_to_a_supported_clock_within_the_bounds() {
    let g = gpus(4);
    let a = NvmlActuator::new(g.clone(), 900, 1500);
    assert!(a.supports(&Action::SetClock { instance: InstanceId(1), clock_mhz: 1000 }));
    assert!(!a.supports(&Action::Retire { instance: InstanceId(1) }));

    // 1300 → 1200 (the nearest supported below), on the placement's GPUs only.
    let out = a.apply(&set_clock("c1", 1300, &[1, 2])).await;
    let Outcome::Applied { detail, .. } = &out else { panic!("{out:?}") };
    assert!(detail.contains("1200 MHz") && detail.contains("asked 1300"), "{detail}");
    assert_eq!(calls(&g), ["lock 1 1200-1200", "lock 2 1200-1200"]);

    // Above the bound → the highest supported within it (1400, not 1600).
    assert!(a.apply(&set_clock("c2", 1980, &[1])).await.is_applied());
    assert_eq!(calls(&g), ["lock 1 1400-1400"]);

    // Below the bound → the lowest supported within it (1000, not 800).
    assert!(a.apply(&set_clock("c3", 300, &[3])).await.is_applied());
    assert_eq!(calls(&g), ["lock 3 1000-1000"]);

    // No placement GPUs → every GPU.
    let all = Command::new("c4", Action::SetClock { instance: InstanceId(1), clock_mhz: 1000 }, None);
    assert!(a.apply(&all).await.is_applied());
    assert_eq!(calls(&g), ["lock 0 1000-1000", "lock 1 1000-1000", "lock 2 1000-1000", "lock 3 1000-1000"]);
    assert_eq!(a.locked_gpus(), vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn the_same_id_is_applied_once_and_reset_undoes_every_lock() {
    let g = gpus(8);
    let a = NvmlActuator::new(g.clone(), 0, u32::MAX);
    let cmd = set_clock("same", 1600, &[5]);
    assert!(a.apply(&cmd).await.is_applied());
    assert!(a.apply(&cmd).await.is_applied());
    assert_eq!(calls(&g), ["lock 5 1600-1600"], "a repeated id does nothing");
    assert!(a.apply(&set_clock("other", 800, &[6, 7])).await.is_applied());
    calls(&g);

    a.reset().await.unwrap();
    let mut c = calls(&g);
    c.sort();
    assert_eq!(c, ["reset 5", "reset 6", "reset 7"], "only the GPUs it locked");
    assert!(a.locked_gpus().is_empty());
    a.reset().await.unwrap();
    assert!(calls(&g).is_empty(), "nothing left to reset");
}

#[tokio::test]
async fn gpu_errors_are_failures_naming_the_gpu() {
    let g = Arc::new(FakeGpus { count: 2, supported: vec![800, 1000], refuse: vec![1], ..Default::default() });
    let a = NvmlActuator::new(g.clone(), 0, u32::MAX);
    match a.apply(&set_clock("e1", 1000, &[0, 1])).await {
        Outcome::Failed { reason, retryable: false } => assert!(reason.contains("GPU 1: not permitted"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // GPU 0 was locked before GPU 1 refused: reset still undoes it.
    assert_eq!(a.locked_gpus(), vec![0]);
    match a.apply(&set_clock("e2", 1000, &[9])).await {
        Outcome::Failed { reason, retryable: false } => assert!(reason.contains("no GPU 9"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Bounds the GPU cannot meet.
    let a = NvmlActuator::new(g, 1200, 1500);
    match a.apply(&set_clock("e3", 1300, &[0])).await {
        Outcome::Failed { reason, retryable: false } => {
            assert!(reason.contains("1200–1500") && reason.contains("800–1000"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}
