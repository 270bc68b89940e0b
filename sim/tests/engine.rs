//! The engine's closed-form phases agree with the physics step by step.

use sim::measure::unloaded;
use sim::{ClassSlo, Cluster, ClusterSpec, InstanceSpec, Physics, PoolSpec, StepShape};
use telemetry::{ClassBoundaries, Request, RequestClass, CLASS_COUNT};

fn one(tp: u32, clock_mhz: u32) -> ClusterSpec {
    ClusterSpec {
        pools: vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }],
        instances: vec![InstanceSpec { pool: 0, tp, clock_mhz }],
    }
}

const NO_SLO: [ClassSlo; CLASS_COUNT] = [ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY }; CLASS_COUNT];

#[test]
fn a_lone_request_takes_exactly_its_steps() {
    let p = Physics::default_h100_llama70b();
    let (input, output) = (1000u32, 50u32);
    // By hand: prefill in budget-sized chunks, then output − 1 decode steps whose KV grows.
    let mut t = 0.0;
    let mut e = 0.0;
    let mut done = 0u32;
    while done < input {
        let c = (input - done).min(p.step_token_budget(8));
        let shape = StepShape {
            prefill_tokens: c,
            prefill_context_tokens: f64::from(done) + f64::from(c) / 2.0,
            ..Default::default()
        };
        let cost = p.step(8, 1980, &shape);
        t += cost.time_s;
        e += cost.energy_j;
        done += c;
    }
    let ttft = t + p.perf.request_overhead_s;
    for k in 0..output - 1 {
        let shape = StepShape { decode_seqs: 1, decode_context_tokens: f64::from(input + 1 + k), ..Default::default() };
        let cost = p.step(8, 1980, &shape);
        t += cost.time_s;
        e += cost.energy_j;
    }
    let u = unloaded(&p, 8, 1980, input, output);
    // The TTFT histogram keeps 3 significant digits.
    assert!((u.ttft_s - ttft).abs() < 1e-3 * ttft, "ttft {} vs {}", u.ttft_s, ttft);
    assert!((u.e2e_s - t).abs() < 1e-9, "e2e {} vs {}", u.e2e_s, t);

    let mut c = Cluster::new(&p, &one(8, 1980), ClassBoundaries::default(), NO_SLO);
    c.arrive(&Request { arrival_s: 0.0, input_tokens: input, output_tokens: output });
    c.drain();
    let totals = c.finish(0.0);
    // Busy energy of 8 GPUs, computed step by step, equals the closed form.
    assert!((totals.energy_j - 8.0 * e).abs() < 1e-6 * totals.energy_j, "{} vs {}", totals.energy_j, 8.0 * e);
}

#[test]
fn every_request_finishes_and_idle_time_costs_idle_power() {
    let p = Physics::default_h100_llama70b();
    let mut c = Cluster::new(&p, &one(4, 1400), ClassBoundaries::default(), NO_SLO);
    let mut n = 0;
    for k in 0..200u32 {
        c.arrive(&Request {
            arrival_s: f64::from(k) * 0.05,
            input_tokens: 100 + 37 * (k % 40),
            output_tokens: 1 + (k * 13) % 300,
        });
        n += 1;
    }
    c.drain();
    let busy_end = c.now_s();
    let before: f64 = c.instances.iter().map(|i| i.energy_j).sum();
    let done: u64 = c.stats.classes.iter().map(|s| s.completed).sum();
    assert_eq!(done, n);
    // Ten idle seconds at 1400 MHz on 4 GPUs.
    let totals = c.finish(busy_end + 10.0);
    let idle_j = totals.energy_j - before;
    let expect = 10.0 * 4.0 * p.idle_power_w(1400.0);
    assert!((idle_j - expect).abs() < 1e-6 * expect, "{idle_j} vs {expect}");
    assert!((totals.gpu_seconds - 4.0 * (busy_end + 10.0)).abs() < 1e-6);
}

#[test]
fn a_full_kv_cache_makes_requests_wait_not_vanish() {
    let p = Physics::default_h100_llama70b();
    let cap = p.kv_capacity_tokens(2);
    let mut c = Cluster::new(&p, &one(2, 1980), ClassBoundaries::default(), NO_SLO);
    // Each takes a third of the cache: at most three run at once.
    let each = (cap / 3) as u32;
    for k in 0..6 {
        c.arrive(&Request { arrival_s: f64::from(k) * 1e-3, input_tokens: each - 100, output_tokens: 100 });
    }
    // Admission happens at step boundaries.
    c.advance_to(0.5);
    assert_eq!(c.instances[0].running(), 3);
    assert_eq!(c.instances[0].waiting(), 3);
    c.drain();
    assert_eq!(c.stats.classes.iter().map(|s| s.completed).sum::<u64>(), 6);
    // A request larger than the whole cache is turned away, not queued forever.
    c.arrive(&Request { arrival_s: c.now_s(), input_tokens: cap as u32 + 1, output_tokens: 10 });
    assert_eq!(c.stats.classes.iter().map(|s| s.rejected).sum::<u64>(), 1);
}

/// The same clock asked for again while a clock change pauses the engine
/// keeps the pause's end as the next event: the running request finishes
/// (an engine driven by its own next-event answer, as `twin serve` is, used
/// to stall here).
#[test]
fn a_repeated_clock_during_the_pause_keeps_the_wake_up() {
    use sim::engine::{EngineRequest, Instance, Lifecycle, Next};
    let physics = sim::Physics::default_h100_llama70b();
    let mut stats = sim::Stats::new([sim::ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY }; 9]);
    let mut inst = Instance::new(&physics, 2, 1980, 0, Lifecycle::Serving, 0.0);
    let req = EngineRequest { arrival_s: 0.0, input_tokens: 100, output_tokens: 50, class: 0, id: 1 };
    let mut next = inst.enqueue(&physics, req, 0.0);
    // Drive it by its own answers, as `twin serve` does; change the clock after the first event.
    let mut changed = false;
    let mut events = 0;
    while let Next::At(t) = next {
        events += 1;
        assert!(events < 10_000, "runaway");
        next = inst.on_event(&physics, &mut stats, t);
        if !changed {
            changed = true;
            // The change applies after the running step; at that event the engine pauses.
            let n = inst.set_clock(&physics, 1000, t);
            let Next::At(end) = n else { panic!("a clock change with work in hand must schedule") };
            let paused = inst.on_event(&physics, &mut stats, end);
            assert!(matches!(paused, Next::At(_)), "paused with a request in hand: {paused:?}");
            // Paused now, request in hand: the same clock again must not lose the wake-up.
            let again = inst.set_clock(&physics, 1000, end);
            assert!(matches!(again, Next::At(_)), "the same clock during the pause returned {again:?}");
            next = again;
        }
    }
    assert_eq!(inst.running(), 0, "the request never finished");
    assert_eq!(stats.classes[0].completed, 1);
}
