//! Calibration: measures in the twin each calibration anchor of docs/twin.md
//! (A1–A7) and says whether it holds. These are independent public
//! measurements; the physics file is tuned to them, never to the controller.

use crate::cluster::{Cluster, ClusterSpec, InstanceSpec, PoolSpec};
use crate::engine::Lifecycle;
use crate::measure::{class_slos, load_point, unloaded, SloRule};
use crate::physics::{Physics, StepShape};
use crate::stats::ClassSlo;
use serde::Serialize;
use telemetry_core::{ClassBoundaries, LengthSamples, Request, RequestClass, CLASS_COUNT};

/// One checked anchor.
#[derive(Debug, Clone, Serialize)]
pub struct Anchor {
    /// `A1.a`, `A2`, …
    pub id: String,
    /// What is measured.
    pub name: String,
    /// The figure measured (a number, or a configuration name).
    pub measured: serde_json::Value,
    /// The range or value it must fall in.
    pub expected: String,
    /// Whether it holds.
    pub pass: bool,
}

fn num(id: &str, name: &str, v: f64, lo: f64, hi: f64, unit: &str) -> Anchor {
    Anchor {
        id: id.into(),
        name: format!("{name} ({unit})"),
        measured: serde_json::json!((v * 1e4).round() / 1e4),
        expected: format!("{lo}–{hi}"),
        pass: v >= lo && v <= hi,
    }
}

fn decode_shape(batch: u32, context: f64) -> StepShape {
    StepShape { decode_seqs: batch, decode_context_tokens: f64::from(batch) * context, ..StepShape::default() }
}

/// Per-GPU power and tokens/s of a steady decode step of `batch` sequences
/// at a clock (768-token contexts), from the step the engine runs.
fn decode_power_w(physics: &Physics, tp: u32, clock_mhz: u32, batch: u32) -> (f64, f64) {
    let c = physics.step(tp, clock_mhz, &decode_shape(batch, 768.0));
    (c.power_w(), f64::from(batch) / c.time_s)
}

/// A configuration's outcome at the A3 load.
#[derive(Debug, Clone, Serialize)]
pub struct A3Point {
    /// Class.
    pub class: String,
    /// TP degree.
    pub tp: u32,
    /// Clock.
    pub clock_mhz: u32,
    /// Energy per request (J).
    pub energy_per_req_j: f64,
    /// SLO attainment.
    pub slo_attainment: f64,
    /// P99 TTFT (s).
    pub ttft_p99_s: f64,
    /// P99 TBT (s).
    pub tbt_p99_s: f64,
}

impl A3Point {
    fn meets(&self) -> bool {
        self.slo_attainment >= 0.99
    }
    fn label(&self) -> String {
        format!("TP{} @ {} MHz", self.tp, self.clock_mhz)
    }
}

/// Sweep every TP degree and clock for one class at `load_tok_s`.
pub fn a3_sweep(
    physics: &Physics,
    workload: &LengthSamples,
    class: RequestClass,
    load_tok_s: f64,
    duration_s: f64,
) -> Vec<A3Point> {
    let b = ClassBoundaries::default();
    let pairs: Vec<(u32, u32)> =
        workload.pairs().iter().copied().filter(|&(i, o)| b.classify(i, o.max(1)) == class).collect();
    if pairs.is_empty() {
        return Vec::new();
    }
    let slo = class_slos(physics, workload.pairs(), &b, SloRule::Multiplier(5.0))[class.index()];
    let lengths = LengthSamples::from_pairs(workload.source.clone(), pairs);
    let mut out = Vec::new();
    for tp in [2, 4, 8] {
        for &clock in &physics.gpu.clocks_mhz {
            let p = load_point(physics, &lengths, tp, clock, load_tok_s, duration_s, 11, slo);
            out.push(A3Point {
                class: class.name(),
                tp,
                clock_mhz: clock,
                energy_per_req_j: p.energy_per_req_j,
                slo_attainment: p.latency.slo_attainment,
                ttft_p99_s: p.latency.ttft_p99_s,
                tbt_p99_s: p.latency.tbt_p99_s,
            });
        }
    }
    out
}

fn best(points: &[A3Point]) -> Option<&A3Point> {
    points.iter().filter(|p| p.meets()).min_by(|a, b| a.energy_per_req_j.total_cmp(&b.energy_per_req_j))
}

/// Measure every anchor. `workload` gives the request lengths for the
/// class-level anchors (the Conversation trace).
pub fn measure_all(physics: &Physics, workload: &LengthSamples) -> Vec<Anchor> {
    let f_max = physics.gpu.clock_max_mhz;
    let mut out = Vec::new();

    // A1: per-GPU power at max clock.
    let idle = physics.idle_power_w(f64::from(f_max));
    out.push(num("A1.a", "TP8 engine loaded but idle, per-GPU power", idle, 80.0, 110.0, "W"));
    let (p1, _) = decode_power_w(physics, 8, f_max, 1);
    out.push(num("A1.b", "TP8 decode at batch 1, per-GPU power", p1, 240.0, 360.0, "W"));
    let (p128, _) = decode_power_w(physics, 8, f_max, 128);
    out.push(num("A1.c", "TP8 decode at batch 128, per-GPU power", p128, 480.0, 720.0, "W"));
    // Prefill-heavy: a stream of 2k-token prompts with one output token, saturating the instance.
    let prefill = LengthSamples::from_pairs("prefill-heavy", vec![(2048, 1)]);
    let pp = load_point(
        physics,
        &prefill,
        8,
        f_max,
        60_000.0,
        60.0,
        3,
        ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY },
    );
    out.push(num(
        "A1.d",
        "TP8 prefill-heavy load, per-GPU power (near but ≤ TDP)",
        pp.power_per_gpu_w,
        0.85 * physics.gpu.tdp_w,
        physics.gpu.tdp_w,
        "W",
    ));

    // A2: 1600 vs 1980 MHz, decode batches 16–128.
    let mut worst_thr: f64 = f64::INFINITY;
    let mut worst_energy: f64 = 0.0;
    for batch in [16, 32, 64, 128] {
        let (p_hi, t_hi) = decode_power_w(physics, 8, f_max, batch);
        let (p_lo, t_lo) = decode_power_w(physics, 8, 1600, batch);
        worst_thr = worst_thr.min(t_lo / t_hi);
        worst_energy = worst_energy.max((p_lo / t_lo) / (p_hi / t_hi));
    }
    out.push(num(
        "A2.a",
        "1600 vs 1980 MHz, decode batch 16–128: worst throughput ratio",
        worst_thr,
        0.90,
        1.0,
        "ratio",
    ));
    out.push(num(
        "A2.b",
        "1600 vs 1980 MHz, decode batch 16–128: worst energy-per-token ratio",
        worst_energy,
        0.0,
        0.80,
        "ratio",
    ));

    // A3: least-energy SLO-meeting configuration at 2,000 tokens/s.
    let ss = a3_sweep(physics, workload, RequestClass::parse("SS").expect("valid"), 2000.0, 600.0);
    let ll = a3_sweep(physics, workload, RequestClass::parse("LL").expect("valid"), 2000.0, 600.0);
    let ss_best = best(&ss);
    out.push(Anchor {
        id: "A3.a".into(),
        name: "SS at 2,000 tok/s: least-energy SLO-meeting configuration".into(),
        measured: serde_json::json!(ss_best.map(A3Point::label).unwrap_or_else(|| "none meets the SLO".into())),
        expected: format!("TP2 below {f_max} MHz (paper: TP2 @ 1200 MHz)"),
        pass: ss_best.is_some_and(|p| p.tp == 2 && p.clock_mhz < f_max),
    });
    let ll_best = best(&ll);
    out.push(Anchor {
        id: "A3.b".into(),
        name: "LL at 2,000 tok/s: least-energy SLO-meeting configuration".into(),
        measured: serde_json::json!(ll_best.map(A3Point::label).unwrap_or_else(|| "none meets the SLO".into())),
        expected: "TP8 @ 1600 MHz".into(),
        pass: ll_best.is_some_and(|p| p.tp == 8 && p.clock_mhz == 1600),
    });
    let ll_tp2_meets = ll.iter().any(|p| p.tp == 2 && p.meets());
    out.push(Anchor {
        id: "A3.c".into(),
        name: "LL at 2,000 tok/s misses its SLO at TP2 (every clock)".into(),
        measured: serde_json::json!(if ll_tp2_meets { "some TP2 clock meets it" } else { "misses at every clock" }),
        expected: "misses at every clock".into(),
        pass: !ll_tp2_meets && !ll.is_empty(),
    });
    // Spread of energy per request across classes and SLO-meeting configurations.
    let mut lo = f64::INFINITY;
    let mut hi: f64 = 0.0;
    for c in RequestClass::ALL {
        let pts = if c.name() == "SS" {
            ss.clone()
        } else if c.name() == "LL" {
            ll.clone()
        } else {
            a3_sweep(physics, workload, c, 2000.0, 300.0)
        };
        for p in pts.iter().filter(|p| p.meets()) {
            lo = lo.min(p.energy_per_req_j);
            hi = hi.max(p.energy_per_req_j);
        }
    }
    let spread = if lo.is_finite() && lo > 0.0 { hi / lo } else { 0.0 };
    out.push(num(
        "A3.d",
        "energy per request, max/min across classes and SLO-meeting configurations",
        spread,
        10.0,
        f64::INFINITY,
        "ratio",
    ));

    // A4: unloaded single request at TP8, max clock.
    let u = unloaded(physics, 8, f_max, 2048, 64);
    out.push(num("A4.a", "TP8 unloaded TBT", u.tbt_p50_s * 1e3, 8.0, 15.0, "ms"));
    let prefill_s = u.ttft_s - physics.perf.request_overhead_s;
    out.push(num("A4.b", "TP8 prefill of a 2k-token prompt", prefill_s * 1e3, 50.0, 150.0, "ms"));

    // A5: reconfiguration delays, measured by driving the lifecycle.
    let (cold, warm, restart, in_place, wake) = lifecycle_delays(physics);
    out.push(num("A5.a", "new instance on a cold VM", cold / 60.0, 6.0, 8.0, "min"));
    out.push(num("A5.b", "new instance from warm standby", warm, 1.0, 120.0, "s"));
    out.push(num("A5.c", "vLLM sleep-mode wake", wake, 0.1, 0.4, "s"));
    out.push(num("A5.d", "reshard by restart", restart, 60.0, 120.0, "s"));
    out.push(num("A5.e", "reshard in place over NVLink", in_place, 0.05, 0.1, "s"));
    let (pause, dip) = clock_change_dip(physics);
    out.push(num("A5.f", "clock change: time with no engine step", pause * 1e3, 50.0, 80.0, "ms"));
    out.push(num("A5.g", "clock change: throughput over the second it happens, vs steady", dip, 0.5, 0.99, "ratio"));

    // A6: TP8 at max clock never loses to TP2 on per-request latency; TP2 has far less KV room.
    let mut tp8_wins = true;
    let mut worst = f64::INFINITY;
    for (i, o) in [(64, 16), (256, 128), (1024, 256), (4096, 512), (8000, 64)] {
        let a = unloaded(physics, 8, f_max, i, o);
        let b = unloaded(physics, 2, f_max, i, o);
        tp8_wins &= a.ttft_s <= b.ttft_s && a.e2e_s <= b.e2e_s && a.tbt_p50_s <= b.tbt_p50_s;
        worst = worst.min(b.e2e_s / a.e2e_s);
    }
    out.push(Anchor {
        id: "A6.a".into(),
        name: "TP8 @ max clock never slower than TP2 (TTFT, TBT, end-to-end), 5 request sizes".into(),
        measured: serde_json::json!(format!("TP8 faster in all; smallest TP2/TP8 end-to-end ratio {worst:.2}")),
        expected: "TP8 faster in all".into(),
        pass: tp8_wins,
    });
    let kv_ratio = physics.kv_capacity_tokens(8) as f64 / physics.kv_capacity_tokens(2).max(1) as f64;
    out.push(num("A6.b", "KV room TP8 / TP2", kv_ratio, 10.0, f64::INFINITY, "ratio"));
    out.push(num("A6.c", "weights per GPU at TP2", physics.model.weight_bytes / 2.0 / 1e9, 60.0, 80.0, "GB"));

    // A7: moving a 2k-token prompt's KV cache from a prefill instance to a decode instance.
    let prompt = 2048;
    let kv_gb = prompt as f64 * physics.model.kv_bytes_per_token / 1e9;
    out.push(num("A7.a", "KV cache of a 2k-token prompt", kv_gb, 0.6, 0.7, "GB"));
    let intra = physics.kv_transfer_s(prompt, 4, 4, true);
    out.push(num("A7.b", "2k-token KV, TP4 to TP4 inside a server (NVLink)", intra * 1e3, 0.3, 1.0, "ms"));
    let inter = physics.kv_transfer_s(prompt, 8, 8, false);
    out.push(num("A7.c", "2k-token KV, TP8 to TP8 between servers (8 × 400 Gbps)", inter * 1e3, 2.5, 5.0, "ms"));
    let ttft = u.ttft_s + inter;
    out.push(num(
        "A7.d",
        "that transfer's share of the 2k-token prompt's TTFT at TP8",
        100.0 * inter / ttft,
        1.0,
        10.0,
        "%",
    ));
    out
}

fn lifecycle_delays(physics: &Physics) -> (f64, f64, f64, f64, f64) {
    let spec = ClusterSpec {
        pools: vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }],
        instances: vec![],
    };
    let slo = [ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY }; CLASS_COUNT];
    let serving_after = |warm: Option<bool>, in_place: bool| -> f64 {
        let mut c = Cluster::new(physics, &spec, ClassBoundaries::default(), slo);
        let i = match warm {
            Some(w) => c.spawn(0, 8, physics.gpu.clock_max_mhz, w),
            None => {
                let i = c.add_instance(0, 8, physics.gpu.clock_max_mhz, Lifecycle::Serving);
                c.reshard(i, 4, in_place);
                i
            }
        };
        while c.instances[i].state != Lifecycle::Serving {
            match c.next_event_s() {
                Some(t) => c.advance_to(t),
                None => return f64::NAN,
            }
        }
        c.now_s()
    };
    let wake = {
        let mut c = Cluster::new(physics, &spec, ClassBoundaries::default(), slo);
        let i = c.add_instance(0, 8, physics.gpu.clock_max_mhz, Lifecycle::Standby);
        c.wake(i);
        while c.instances[i].state != Lifecycle::Serving {
            match c.next_event_s() {
                Some(t) => c.advance_to(t),
                None => break,
            }
        }
        c.now_s()
    };
    (
        serving_after(Some(false), false),
        serving_after(Some(true), false),
        serving_after(None, false),
        serving_after(None, true),
        wake,
    )
}

/// Run a steady decode load, lock a lower clock mid-way, and measure how long
/// the engine stops stepping (tokens lost against a steady run at the new
/// clock) and the throughput of the second in which the change happens.
fn clock_change_dip(physics: &Physics) -> (f64, f64) {
    let slo = [ClassSlo { ttft_s: f64::INFINITY, tbt_s: f64::INFINITY }; CLASS_COUNT];
    let tokens_in_second = |start_mhz: u32, change_to: Option<u32>| -> f64 {
        let spec = ClusterSpec {
            pools: vec![PoolSpec { name: "all".into(), classes: RequestClass::ALL.to_vec() }],
            instances: vec![InstanceSpec { pool: 0, tp: 8, clock_mhz: start_mhz }],
        };
        let mut c = Cluster::new(physics, &spec, ClassBoundaries::default(), slo);
        for k in 0..32 {
            c.arrive(&Request { arrival_s: f64::from(k) * 1e-3, input_tokens: 128, output_tokens: 100_000 });
        }
        c.advance_to(10.0);
        let before = c.instances[0].tokens_out_at(10.0);
        if let Some(mhz) = change_to {
            c.set_clock(0, mhz);
        }
        c.advance_to(11.0);
        (c.instances[0].tokens_out_at(11.0) - before) as f64
    };
    let f_max = physics.gpu.clock_max_mhz;
    let steady_max = tokens_in_second(f_max, None);
    let steady_new = tokens_in_second(1800, None);
    let dipped = tokens_in_second(f_max, Some(1800));
    // Tokens a steady run at the new clock would have made in the lost time.
    let pause_s = ((steady_new.min(steady_max) - dipped) / steady_new).max(0.0);
    (pause_s, dipped / steady_max)
}
