//! The static-pool search behind `dynamollm bound`: the fewest instances that
//! hold the attainment, the least energy over TP degrees and clocks, and the
//! early ends where more instances cannot help.

use sim::bound::{best_static, fewest_instances, measure_pool, search_fewest, SearchSpec, StaticPool};
use sim::measure::{class_slos, SloRule};
use sim::Physics;
use std::path::Path;
use telemetry_core::{ClassBoundaries, LengthSamples, RequestClass};

/// The Conversation hour's requests of one class, and that class's SLO spec.
fn class(name: &str, attainment: f64) -> (Physics, LengthSamples, SearchSpec) {
    let physics = Physics::default_h100_llama70b();
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/azure-llm-2023-conv.csv");
    let all = LengthSamples::from_azure_trace(&trace).expect("bundled trace");
    let b = ClassBoundaries::default();
    let slo = class_slos(&physics, all.pairs(), &b, SloRule::Multiplier(5.0));
    let c = RequestClass::parse(name).unwrap();
    let pairs: Vec<(u32, u32)> = all.pairs().iter().copied().filter(|&(i, o)| b.classify(i, o.max(1)) == c).collect();
    let spec = SearchSpec { slo, attainment, max_gpus: 256, seed: 3 };
    (physics, LengthSamples::from_pairs("conv", pairs), spec)
}

#[test]
fn the_pool_found_is_the_fewest_instances_that_hold_the_attainment() {
    let (physics, lengths, spec) = class("MS", 0.995);
    let rate = 12.0;
    let p = fewest_instances(&physics, &lengths, &spec, rate, 2, 1400).expect("TP2 pools carry MS");
    assert!(p.instances >= 2, "one TP2 instance at 1400 MHz cannot carry 12 req/s of MS: {p:?}");
    assert!(p.attainment >= spec.attainment, "{p:?}");
    assert_eq!(p.gpus, 2 * p.instances);
    let fewer = measure_pool(&physics, &lengths, &spec, rate, 2, 1400, p.instances - 1);
    assert!(fewer.attainment < spec.attainment, "{} instances already hold: {fewer:?}", p.instances - 1);
    // The measurement is the search's own (same seed): re-measuring gives the same pool.
    assert_eq!(measure_pool(&physics, &lengths, &spec, rate, 2, 1400, p.instances), p);
}

#[test]
fn the_best_pool_spends_no_more_than_any_other_candidate_and_a_stricter_target_costs_no_less() {
    let (physics, lengths, spec) = class("LL", 0.99);
    let rate = 2.0;
    let clocks = [1200, 1600, 1980];
    let best = best_static(&physics, &lengths, &spec, rate, &[4, 8], &clocks).expect("LL is servable");
    for tp in [4, 8] {
        for f in clocks {
            if let Some(p) = fewest_instances(&physics, &lengths, &spec, rate, tp, f) {
                assert!(best.energy_per_req_j <= p.energy_per_req_j, "{best:?} vs {p:?}");
            }
        }
    }
    let strict = SearchSpec { attainment: 0.999, ..spec };
    let b2 = best_static(&physics, &lengths, &strict, rate, &[4, 8], &clocks).expect("LL is servable at 99.9%");
    assert!(b2.energy_per_req_j >= best.energy_per_req_j - 1e-9, "{b2:?} vs {best:?}");
    assert!(b2.attainment >= 0.999);
}

#[test]
fn a_tp_degree_whose_memory_cannot_hold_the_model_ends_the_search_at_once() {
    let (physics, lengths, spec) = class("SS", 0.99);
    // Llama-2-70B's weights do not fit one 80 GB GPU: every request is too large for TP1.
    assert_eq!(fewest_instances(&physics, &lengths, &spec, 1.0, 1, 1980), None);
    assert_eq!(best_static(&physics, &lengths, &spec, 1.0, &[1], &[1980]), None);
}

#[test]
fn a_clock_whose_idle_latency_misses_the_slo_is_given_up_before_the_gpu_limit() {
    // At 800 MHz LL's long prompts miss the TTFT SLO even alone on an instance: no pool holds 99.9%.
    let (physics, lengths, spec) = class("LL", 0.999);
    let lone = measure_pool(&physics, &lengths, &spec, 0.05, 4, 800, 4);
    assert!(lone.attainment < 0.999, "the premise: 800 MHz misses even nearly idle: {lone:?}");
    // Without the plateau rule the doubling would go on to 25,000 instances (16 pools measured,
    // the largest for hours); with it the search stops after a few small ones.
    let spec = SearchSpec { max_gpus: 100_000, ..spec };
    let mut sizes = Vec::new();
    let found = search_fewest(spec.max_gpus / 4, spec.attainment, |n| {
        assert!(sizes.len() < 8 && n <= 64, "the search goes on past a plateau: {sizes:?}, now {n}");
        sizes.push(n);
        measure_pool(&physics, &lengths, &spec, 0.05, 4, 800, n)
    });
    assert_eq!(found, None, "pools measured: {sizes:?}");
    assert_eq!(fewest_instances(&physics, &lengths, &spec, 0.05, 4, 800), None);
}

/// The search itself, on a made-up attainment curve: doubling to the first pool that holds, then
/// bisection to the fewest; `None` where even the limit does not hold.
#[test]
fn the_search_doubles_then_bisects_to_the_fewest_instances() {
    let pool = |n: u32, attainment: f64| StaticPool {
        tp: 8,
        clock_mhz: 1980,
        instances: n,
        gpus: 8 * n,
        energy_per_req_j: 1.0,
        power_w: 1.0,
        attainment,
        too_large_share: 0.0,
    };
    // Holds from 13 instances on; below that it rises steadily (no plateau).
    let curve = |n: u32| pool(n, if n >= 13 { 0.995 } else { 0.5 + 0.03 * f64::from(n) });
    let mut sizes = Vec::new();
    let got = search_fewest(100, 0.99, |n| {
        sizes.push(n);
        curve(n)
    });
    assert_eq!(got.map(|p| p.instances), Some(13));
    assert_eq!(sizes, vec![1, 2, 4, 8, 16, 12, 14, 13], "doubling to 16, then bisection");
    assert_eq!(search_fewest(10, 0.99, curve), None, "10 instances at most: none holds");
    assert_eq!(search_fewest(13, 0.99, curve).map(|p| p.instances), Some(13), "the limit itself holds");
}

/// A pool serving two classes is judged by each class with enough requests in the replay, not only
/// by its total: a minority class missing every request fails the pool though the total holds 90%.
#[test]
fn a_shared_pool_holds_only_when_each_class_with_enough_requests_holds() {
    let physics = Physics::default_h100_llama70b();
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/azure-llm-2023-conv.csv");
    let all = LengthSamples::from_azure_trace(&trace).expect("bundled trace");
    let b = ClassBoundaries::default();
    let mut slo = class_slos(&physics, all.pairs(), &b, SloRule::Multiplier(5.0));
    let (ss, ll) = (RequestClass::parse("SS").unwrap(), RequestClass::parse("LL").unwrap());
    // LL's first token within 1 ms: no instance makes it.
    slo[ll.index()].ttft_s = 1e-3;
    let of = |c: RequestClass| -> Vec<(u32, u32)> {
        all.pairs().iter().copied().filter(|&(i, o)| b.classify(i, o.max(1)) == c).collect()
    };
    let mix = |ll_per_100: usize| {
        let mut pairs: Vec<(u32, u32)> = of(ss).into_iter().cycle().take(100 - ll_per_100).collect();
        pairs.extend(of(ll).into_iter().cycle().take(ll_per_100));
        LengthSamples::from_pairs("SS+LL", pairs)
    };
    let spec = SearchSpec { slo, attainment: 0.99, max_gpus: 64, seed: 5 };
    // 1 req/s for 5,000 s: about 500 LL requests at 10 in 100, about 100 at 2 in 100.
    let many = measure_pool(&physics, &mix(10), &spec, 1.0, 8, 1980, 4);
    assert!(many.attainment < 0.05, "LL misses every request and has ≥ 200 of them: {many:?}");
    let few = measure_pool(&physics, &mix(2), &spec, 1.0, 8, 1980, 4);
    assert!(
        few.attainment > 0.95 && few.attainment < 0.995,
        "about 100 LL requests: judged within the total only (about 98% on time): {few:?}"
    );
}
