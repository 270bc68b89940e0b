//! The per-minute timeline adds up to the run's totals.

use sim::{ClassSlo, Cluster, ClusterSpec, InstanceSpec, Physics, PoolSpec};
use telemetry_core::{ClassBoundaries, Request, RequestClass, CLASS_COUNT};

const NO_SLO: [ClassSlo; CLASS_COUNT] = [ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY }; CLASS_COUNT];

#[test]
fn timeline_sums_to_the_totals_across_spawns_and_retirements() {
    let p = Physics::default_h100_llama70b();
    let spec = ClusterSpec {
        pools: vec![
            PoolSpec { name: "short".into(), classes: RequestClass::ALL[..3].to_vec() },
            PoolSpec { name: "rest".into(), classes: RequestClass::ALL[3..].to_vec() },
        ],
        instances: vec![
            InstanceSpec { pool: 0, tp: 4, clock_mhz: 1980 },
            InstanceSpec { pool: 1, tp: 8, clock_mhz: 1400 },
        ],
    };
    let mut c = Cluster::new(&p, &spec, ClassBoundaries::default(), NO_SLO);
    let mut arrivals = 0;
    for k in 0..600 {
        let t = k as f64 * 0.5;
        c.arrive(&Request { arrival_s: t, input_tokens: 100 + (k % 7) * 400, output_tokens: 20 + (k % 5) * 60 });
        arrivals += 1;
        if k == 200 {
            c.spawn(1, 2, 1200, true);
        }
        if k == 400 {
            c.retire(0);
        }
    }
    c.drain();
    let totals = c.finish(400.0);
    let tl = &totals.timeline;
    assert_eq!(tl.pool_names, ["short", "rest"]);
    assert!(
        (tl.energy_j() - totals.energy_j).abs() < 1e-6 * totals.energy_j,
        "{} vs {}",
        tl.energy_j(),
        totals.energy_j
    );
    assert!((tl.gpu_seconds() - totals.gpu_seconds).abs() < 1e-6 * totals.gpu_seconds);
    let requests: u64 = tl.points.iter().flat_map(|p| p.requests_by_class).sum();
    assert_eq!(requests, arrivals);
    // Minute intervals, the last one ending at the close.
    assert_eq!(tl.points.len(), 7);
    assert!(tl.points[..6].iter().all(|p| (p.duration_s - 60.0).abs() < 1e-9));
    let last = tl.points.last().unwrap();
    assert!((last.start_s + last.duration_s - 400.0).abs() < 1e-9);
    // Pool 0 was retired: no GPUs at the end; its tokens only came before.
    assert_eq!(last.pools[0].gpus, 0);
    assert!(tl.points[0].pools[0].clock_mhz == 1980.0 && tl.points[0].pools[1].clock_mhz == 1400.0);
    let tokens: f64 = tl.points.iter().flat_map(|p| p.pools.iter()).flat_map(|p| p.tokens_by_class).sum();
    assert!(tokens > 0.0);
}

#[test]
fn peak_power_is_the_highest_one_second_mean_of_the_cluster() {
    let p = Physics::default_h100_llama70b();
    let spec = ClusterSpec {
        pools: vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }],
        instances: vec![
            InstanceSpec { pool: 0, tp: 8, clock_mhz: 1980 },
            InstanceSpec { pool: 0, tp: 8, clock_mhz: 1980 },
        ],
    };
    let idle_w = 16.0 * p.idle_power_w(1980.0);
    // Idle all along: the peak is the idle power.
    let idle = Cluster::new(&p, &spec, ClassBoundaries::default(), NO_SLO).finish(120.0);
    assert!((idle.peak_power_w / idle_w - 1.0).abs() < 1e-9, "{} vs {idle_w}", idle.peak_power_w);
    // Idle for a minute, then a burst: the peak is above the idle power and the run's mean
    // power, and within the GPUs' power limit.
    let mut c = Cluster::new(&p, &spec, ClassBoundaries::default(), NO_SLO);
    for k in 0..400 {
        c.arrive(&Request { arrival_s: 60.0 + k as f64 * 0.05, input_tokens: 2000, output_tokens: 200 });
    }
    c.drain();
    let t = c.finish(240.0);
    let mean_w = t.energy_j / t.duration_s;
    assert!(t.peak_power_w > mean_w && mean_w > idle_w, "peak {} mean {mean_w} idle {idle_w}", t.peak_power_w);
    assert!(t.peak_power_w <= 16.0 * p.gpu.tdp_w + 1e-6, "peak {} over the power limit", t.peak_power_w);
}
