//! The engine's closed-form phases agree with the physics step by step.

use sim::measure::unloaded;
use sim::{ClassSlo, Cluster, ClusterSpec, InstanceSpec, Physics, PoolSpec, StepShape};
use telemetry_core::{ClassBoundaries, Request, RequestClass, CLASS_COUNT};

/// One pool serving every class, with these instances.
fn all_classes(instances: Vec<InstanceSpec>) -> ClusterSpec {
    ClusterSpec { pools: vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }], instances }
}

fn one(tp: u32, clock_mhz: u32) -> ClusterSpec {
    all_classes(vec![InstanceSpec { pool: 0, tp, clock_mhz }])
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

fn two_instances(tp: u32) -> ClusterSpec {
    ClusterSpec {
        pools: vec![
            PoolSpec { name: "a".into(), classes: RequestClass::ALL.to_vec() },
            PoolSpec { name: "b".into(), classes: vec![] },
        ],
        instances: vec![InstanceSpec { pool: 0, tp, clock_mhz: 1980 }, InstanceSpec { pool: 1, tp, clock_mhz: 1980 }],
    }
}

/// The backlog guard's move: requests waiting for KV room on one instance
/// go to another, finish there, and keep their arrival time (their TTFT
/// includes the time they queued before the move).
#[test]
fn unstarted_requests_move_to_another_pool_and_keep_their_arrival() {
    let p = Physics::default_h100_llama70b();
    let cap = p.kv_capacity_tokens(2);
    let each = (cap / 3) as u32;
    let mut c = Cluster::new(&p, &two_instances(2), ClassBoundaries::default(), NO_SLO);
    c.set_route(RequestClass::from_index(8), Some(0));
    for k in 0..6 {
        c.arrive(&Request { arrival_s: f64::from(k) * 1e-3, input_tokens: each - 400, output_tokens: 400 });
    }
    c.advance_to(0.5);
    assert_eq!((c.instances[0].running(), c.instances[0].waiting()), (3, 3));
    // Nothing moves to a pool without a serving instance other than the source.
    assert_eq!(c.move_unstarted(0, 0, 10), 0);
    assert_eq!(c.instances[0].waiting(), 3);
    // Two of the three waiting requests move to pool b's instance.
    assert_eq!(c.move_unstarted(0, 1, 2), 2);
    assert_eq!(c.instances[0].waiting(), 1);
    c.advance_to(1.0);
    assert_eq!(c.instances[1].running(), 2, "the moved requests run on the other instance");
    c.drain();
    let s = &c.stats.classes[8];
    assert_eq!((s.completed, s.rejected), (6, 0));
    // Their TTFT counts from the first arrival: the moved ones waited 0.5 s first.
    let ttft_max_s = s.ttft.max() as f64 / 1e6;
    assert!(ttft_max_s > 0.5, "the longest TTFT is {ttft_max_s} s: moved requests lost their arrival time");
}

/// A prompt already admitted but not started can move too; the KV cache it
/// reserved is free again on the source.
#[test]
fn taking_unstarted_prompts_frees_their_kv_and_keeps_the_running_ones() {
    let p = Physics::default_h100_llama70b();
    let mut c = Cluster::new(&p, &one(8, 1980), ClassBoundaries::default(), NO_SLO);
    for _ in 0..6 {
        c.arrive(&Request { arrival_s: 0.0, input_tokens: 4000, output_tokens: 10 });
    }
    // After the first step boundary all six are admitted; the first is in prefill.
    c.advance_to(0.1);
    assert_eq!((c.instances[0].running(), c.instances[0].waiting()), (6, 0));
    let kv_before = c.instances[0].kv_usage();
    let now = c.now_s();
    let (taken, _) = c.instances[0].take_unstarted(10, now);
    // The head and the one after it may be in the running phase's chunks: they stay.
    assert_eq!(taken.len(), 4);
    let ids: Vec<u64> = taken.iter().map(|r| r.id).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    assert_eq!(c.instances[0].running(), 2);
    let kv_after = c.instances[0].kv_usage();
    assert!((kv_after - kv_before / 3.0).abs() < 1e-9, "KV usage {kv_after} of {kv_before} after taking 4 of 6");
}

/// A request whose client went away is dropped, as vLLM aborts it: one
/// waiting for admission at once, an admitted one (in prefill or decoding)
/// at the end of the step in progress; its KV is free again and the
/// instance carries on with the rest.
#[test]
fn aborting_a_request_drops_it_at_the_step_boundary_and_the_rest_finish() {
    let p = Physics::default_h100_llama70b();
    let mut c = Cluster::new(&p, &one(8, 1980), ClassBoundaries::default(), NO_SLO);
    c.instances[0].events = Some(Vec::new());
    for _ in 0..6 {
        c.arrive(&Request { arrival_s: 0.0, input_tokens: 4000, output_tokens: 40 });
    }
    c.advance_to(0.1);
    let now = c.now_s();
    let kv_before = c.instances[0].kv_usage();
    assert_eq!(c.instances[0].running(), 6);
    // The ids, read from a copy: the four not started, and the two the running phase chunks.
    let mut probe = c.instances[0].clone();
    let mut ids: Vec<u64> = probe.take_unstarted(10, now).0.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    let head = ids[0] - 2;
    assert!(c.abort(0, head), "the prompt in prefill was not aborted");
    assert!(c.abort(0, ids[1]), "an admitted prompt was not aborted");
    assert!(!c.abort(0, ids[1]), "aborted twice");
    assert!(!c.abort(0, 9_999), "an unknown id was aborted");
    // Both still hold their KV until the step in progress ends.
    assert_eq!(c.instances[0].running(), 6);
    let boundary = c.instances[0].next_step_end_s(now).expect("a step is running");
    c.advance_to(boundary);
    assert_eq!(c.instances[0].running(), 4);
    let kv_after = c.instances[0].kv_usage();
    assert!((kv_after - kv_before * 4.0 / 6.0).abs() < 1e-9, "KV usage {kv_after} of {kv_before} after 2 of 6 left");
    // Run until one is decoding, abort it mid-stream, and the other three still finish.
    let mut t = boundary;
    let decoding = loop {
        t += 0.05;
        c.advance_to(t);
        let log = std::mem::take(c.instances[0].events.as_mut().expect("events are on"));
        let first = log.into_iter().find_map(|e| match e {
            sim::engine::EngineEvent::FirstToken { id, .. } => Some(id),
            _ => None,
        });
        if let Some(id) = first {
            break id;
        }
        assert!(t < 30.0, "no first token in 30 s");
    };
    assert!(c.abort(0, decoding), "a decoding request was not aborted");
    c.advance_to(t + 120.0);
    assert_eq!(c.instances[0].completed, 3, "the three left did not all finish");
    assert!(c.instances[0].is_empty(), "the aborted requests left something behind");
    assert_eq!(c.instances[0].kv_usage(), 0.0);
}

/// Each turned-away request is counted with its reason.
#[test]
fn rejections_are_counted_per_class_with_their_reason() {
    use sim::RejectReason;
    let p = Physics::default_h100_llama70b();
    let spec = all_classes(vec![]);
    let mut c = Cluster::new(&p, &spec, ClassBoundaries::default(), NO_SLO);
    let ss = Request { arrival_s: 0.0, input_tokens: 100, output_tokens: 50 };
    // A pool with no instance at all.
    c.arrive(&ss);
    // A class routed nowhere.
    c.set_route(RequestClass::from_index(0), None);
    c.arrive(&ss);
    // Too large for the one serving instance's KV cache.
    let i = c.add_instance(0, 2, 1980, sim::Lifecycle::Serving);
    let huge = p.kv_capacity_tokens(c.instances[i].tp) as u32 + 1;
    c.arrive(&Request { arrival_s: 0.1, input_tokens: huge, output_tokens: 10 });
    let by = |class: usize, why: RejectReason| c.stats.classes[class].rejected_for(why);
    assert_eq!(by(0, RejectReason::NoServingInstance), 1);
    assert_eq!(by(0, RejectReason::NoPool), 1);
    assert_eq!(by(6, RejectReason::TooLarge), 1);
    assert_eq!(c.stats.classes.iter().map(|s| s.rejected).sum::<u64>(), 3);
}

/// The router's balance: by request count a short prompt joins the instance
/// holding one long prompt (it has fewer requests); by prompt tokens it goes
/// to the one holding two short prompts, whose queue of prompt tokens is short.
#[test]
fn prompt_token_balance_keeps_short_prompts_from_queueing_behind_long_ones() {
    let placement = |balance: sim::Balance| {
        let mut p = Physics::default_h100_llama70b();
        p.router.balance = balance;
        let spec = all_classes(vec![InstanceSpec { pool: 0, tp: 8, clock_mhz: 1980 }; 2]);
        let mut c = Cluster::new(&p, &spec, ClassBoundaries::default(), NO_SLO);
        // Instance 0 gets two short prompts, instance 1 one long one, under either balance.
        c.arrive(&Request { arrival_s: 0.0, input_tokens: 100, output_tokens: 200 });
        c.arrive(&Request { arrival_s: 0.0, input_tokens: 7000, output_tokens: 10 });
        c.arrive(&Request { arrival_s: 0.0, input_tokens: 100, output_tokens: 200 });
        let before: Vec<usize> = c.instances.iter().map(|i| i.outstanding()).collect();
        assert_eq!(before, vec![2, 1], "{balance:?}");
        assert_eq!(c.instances[1].queued_prompt_tokens(), 7000);
        // The next short prompt is the test.
        c.arrive(&Request { arrival_s: 0.001, input_tokens: 100, output_tokens: 10 });
        let after: Vec<usize> = c.instances.iter().map(|i| i.outstanding()).collect();
        c.advance_to(30.0);
        assert_eq!(c.stats.classes.iter().map(|k| k.completed).sum::<u64>(), 4, "{balance:?}");
        after
    };
    assert_eq!(placement(sim::Balance::Requests), vec![2, 2], "by request count it joins the long prompt");
    assert_eq!(placement(sim::Balance::PromptTokens), vec![3, 1], "by prompt tokens it avoids the long prompt");
}

/// An instance resharding in place keeps its API server up: a request that
/// arrives meanwhile waits in its queue, is served at the new degree once the
/// weights have moved, and its TTFT counts the wait. A restart reshard takes
/// the server down: with no other instance the request is turned away.
#[test]
fn a_request_during_an_in_place_reshard_waits_for_it_and_one_during_a_restart_is_turned_away() {
    use sim::{Lifecycle, RejectReason};
    let p = Physics::default_h100_llama70b();
    let spec = all_classes(vec![]);
    let (input, output) = (500u32, 20u32);
    let arrival_s = 0.01;
    for in_place in [true, false] {
        let mut c = Cluster::new(&p, &spec, ClassBoundaries::default(), NO_SLO);
        let i = c.add_instance(0, 4, 1980, Lifecycle::Serving);
        c.reshard(i, 8, in_place);
        c.arrive(&Request { arrival_s, input_tokens: input, output_tokens: output });
        c.drain();
        let class = ClassBoundaries::default().classify(input, output).index();
        let s = &c.stats.classes[class];
        if in_place {
            assert_eq!((s.rejected, s.completed), (0, 1), "in place: the request must wait and finish");
            assert_eq!(c.instances[i].tp, 8);
            // Served from the reshard's end at TP8: the wait plus TP8's TTFT alone.
            let wait_s = p.lifecycle.reshard_in_place_s - arrival_s;
            let ttft_s = s.ttft.max() as f64 / 1e6;
            let alone_s = unloaded(&p, 8, 1980, input, output).ttft_s;
            assert!((ttft_s - (wait_s + alone_s)).abs() < 2e-3 * (wait_s + alone_s), "TTFT {ttft_s} s");
        } else {
            assert_eq!(s.rejected_for(RejectReason::NoServingInstance), 1, "a restart reshard serves nothing");
            assert_eq!(s.completed, 0);
        }
    }
}
