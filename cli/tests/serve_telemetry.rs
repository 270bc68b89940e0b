//! How the service's core attributes telemetry to instances: by the
//! instance a sample names, else by node and GPU, never by node alone when a
//! node holds several engines; and an engine serving two models holds the
//! requests of both.

use actuators::Placement;
use controller::control::{ControllerConfig, InstanceState, Loops};
use dynamollm::profile::ProfileTable;
use service::core::{CoreConfig, InstanceRecord, ServiceCore};
use std::collections::BTreeMap;
use telemetry::sample::{EngineSample, GpuSample, Sample, Tags};

/// A core that knows two TP4 instances on node `dc1/n1`, GPUs 0–3 and 4–7,
/// both starting.
fn two_on_one_node() -> ServiceCore {
    let mut profile = ProfileTable::bundled();
    profile.set_slo_multiplier(5.0);
    let cfg = CoreConfig {
        controller: ControllerConfig::new(Loops { scale: true, shard: true, clock: true, pools: true }, 1980),
        stale_after_s: 5.0,
        pool_names: (0..9).map(|p| format!("p{p}")).collect(),
        retire_ack_means_stopped: true,
        declared_gpus: None,
    };
    let mut saved = ServiceCore::new(cfg.clone(), profile.clone(), 0.0).save(0.0);
    let record = |id: u32, gpus: Vec<u32>| InstanceRecord {
        id: actuators::InstanceId(id),
        pool: 4,
        tp: 4,
        clock_mhz: 1980,
        state: InstanceState::Starting,
        placement: Some(Placement { node: "dc1/n1".into(), gpus, endpoint: Some(format!("http://e{id}")) }),
        outstanding: 0,
        waiting: 0,
        power_w: 0.0,
        energy_j: 0.0,
        spawned_at_s: 0.0,
        last_report_s: None,
        last_gpu_s: None,
        last_engine_s: None,
        gpus: BTreeMap::new(),
        queues: BTreeMap::new(),
    };
    saved.instances = vec![record(1, vec![0, 1, 2, 3]), record(2, vec![4, 5, 6, 7])];
    ServiceCore::restore(cfg, profile, saved, 0.0).unwrap()
}

fn engine(tags: Tags, running: f64, waiting: f64) -> Sample {
    Sample::Engine(EngineSample {
        ts_ms: 0,
        tags,
        running: Some(running),
        waiting: Some(waiting),
        ..Default::default()
    })
}

fn gpu(tags: Tags, power_w: f64, energy_j: f64) -> Sample {
    Sample::Gpu(GpuSample {
        ts_ms: 0,
        tags,
        power_w,
        energy_j: Some(energy_j),
        sm_clock_mhz: Some(1410),
        util: None,
        temperature_c: None,
        throttle_reasons: None,
    })
}

fn rec(core: &ServiceCore, id: u32) -> InstanceRecord {
    core.instances().find(|r| r.id.0 == id).unwrap().clone()
}

#[test]
fn engines_sharing_a_node_are_told_apart_by_instance_and_gpu() {
    let mut core = two_on_one_node();
    let node = Tags::node("dc1", "n1");
    // Engine pages name their instance (the scrape tags them, as agents do).
    core.observe_sample(1.0, &engine(Tags { instance: Some("i1".into()), ..node.clone() }, 3.0, 1.0));
    core.observe_sample(1.0, &engine(Tags { instance: Some("i2".into()), ..node.clone() }, 7.0, 2.0));
    // GPUs by index: 0–3 are instance 1's, 4–7 instance 2's (as DCGM or NVML on the node number them).
    for g in 0..8u32 {
        let p = if g < 4 { 300.0 } else { 500.0 };
        core.observe_sample(1.0, &gpu(Tags { gpu: Some(g), ..node.clone() }, p, 1000.0 + f64::from(g)));
    }
    let (a, b) = (rec(&core, 1), rec(&core, 2));
    assert_eq!((a.state, b.state), (InstanceState::Serving, InstanceState::Serving));
    assert_eq!((a.outstanding, a.waiting), (4, 1));
    assert_eq!((b.outstanding, b.waiting), (9, 2));
    assert_eq!((a.power_w, b.power_w), (1200.0, 2000.0));
    assert_eq!(a.energy_j, 1000.0 + 1001.0 + 1002.0 + 1003.0);
    assert_eq!(b.energy_j, 1004.0 + 1005.0 + 1006.0 + 1007.0);
    assert_eq!(core.counters.unmatched_samples, 0);
    // A sample naming neither instance nor GPU on a node of two engines matches neither.
    core.observe_sample(2.0, &engine(node.clone(), 99.0, 99.0));
    assert_eq!(core.counters.unmatched_samples, 1);
    assert_eq!((rec(&core, 1).outstanding, rec(&core, 2).outstanding), (4, 9));
}

#[test]
fn an_engine_serving_two_models_holds_the_requests_of_both() {
    let mut core = two_on_one_node();
    let i1 = Tags { instance: Some("i1".into()), ..Tags::node("dc1", "n1") };
    core.observe_sample(1.0, &engine(Tags { model: Some("small".into()), ..i1.clone() }, 5.0, 1.0));
    core.observe_sample(1.0, &engine(Tags { model: Some("big".into()), ..i1.clone() }, 21.0, 4.0));
    let r = rec(&core, 1);
    assert_eq!((r.outstanding, r.waiting), (31, 5));
    // A later page updates each model's queue on its own.
    core.observe_sample(2.0, &engine(Tags { model: Some("small".into()), ..i1 }, 0.0, 0.0));
    assert_eq!(rec(&core, 1).outstanding, 25);
}

/// Without the router's measurement, an engine's histogram deltas judged at
/// its pool's SLO are the attainment the controller sees; with the router's,
/// the engines' are not used.
#[test]
fn engine_histograms_are_the_attainment_when_the_router_does_not_measure() {
    use telemetry::scrape::{Bucket, Histogram};
    let hist = |buckets: &[(f64, f64)]| Histogram {
        buckets: buckets.iter().map(|&(le_s, cumulative)| Bucket { le_s, cumulative }).collect(),
        count: buckets.last().unwrap().1,
        sum_s: 1.0,
    };
    let mut core = two_on_one_node();
    let slo = core.class_slos()[4]; // MM: pool 4 serves it in the split layout
                                    // 100 first tokens: 90 well within the TTFT SLO, 10 far over it; 1,000 gaps, 1 over.
    let ttft = hist(&[(slo.ttft_s * 0.5, 90.0), (slo.ttft_s * 10.0, 100.0), (f64::INFINITY, 100.0)]);
    let tbt = hist(&[(slo.tbt_s * 0.5, 999.0), (slo.tbt_s * 10.0, 1000.0), (f64::INFINITY, 1000.0)]);
    core.observe_engine_latency(actuators::InstanceId(1), Some(&ttft), Some(&tbt));
    assert_eq!(core.class_attainment()[4].1, None, "the router measures by default: engines not used");
    core.set_attainment_from_engines(true);
    core.observe_arrivals(1.0, &[0, 0, 0, 0, 3, 0, 0, 0, 0]);
    core.observe_engine_latency(actuators::InstanceId(1), Some(&ttft), Some(&tbt));
    let att = core.class_attainment();
    // Within (0.5 × SLO, 10 × SLO] the SLO sits 1/19 of the way: 90 + 10/19 ≈ 90.5 of 100,
    // counted as 91 (the counters are whole); the gaps hold 999 of 1,000.
    let mm = att[4].1.unwrap();
    assert!((mm - 0.91).abs() < 1e-9, "{mm}");
    assert!(att.iter().enumerate().all(|(c, a)| c == 4 || a.1.is_none()), "{att:?}");
}

/// One hostile arrivals message (`requests: 1e12`, or not a number) is
/// refused and counted, never planned for: the next tick spawns nothing
/// beyond what the real load asks.
#[test]
fn an_arrivals_message_beyond_the_ceiling_is_refused_and_counted() {
    let mut core = two_on_one_node();
    let ceiling = core.max_class_rps();
    assert!(ceiling.is_finite() && ceiling > 100.0, "{ceiling}");
    let arrivals = |requests: f64| {
        Sample::Arrivals(telemetry::sample::ArrivalSample {
            ts_ms: 0,
            tags: Tags { class: Some(telemetry::RequestClass::from_index(8)), ..Tags::node("dc1", "n1") },
            requests,
            tokens: 0.0,
        })
    };
    for bad in [1e12, f64::NAN, -5.0, f64::INFINITY] {
        core.observe_sample(1.0, &arrivals(bad));
    }
    assert_eq!(core.counters.rejected_arrivals, 4);
    core.observe_sample(1.0, &arrivals(3.0));
    assert_eq!(core.counters.rejected_arrivals, 4, "a believable count is taken");
    let cmds = core.tick(5.0, 0);
    let spawns = cmds.iter().filter(|c| matches!(c.action, actuators::Action::Spawn { .. })).count();
    assert!(spawns <= 4, "{spawns} spawns after a refused 1e12: {cmds:?}");
}
