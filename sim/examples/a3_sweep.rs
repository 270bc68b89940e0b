//! Prints the A3 sweep (every TP degree and clock) for SS and LL at 2,000
//! tokens/s: `cargo run --release -p sim --example a3_sweep [physics.toml]`.

use sim::anchors::a3_sweep;
use sim::Physics;
use std::path::Path;
use telemetry_core::trace::AzureTrace;
use telemetry_core::{LengthSamples, RequestClass};

fn main() {
    let physics = match std::env::args().nth(1) {
        Some(p) => Physics::load(Path::new(&p)).expect("physics file"),
        None => Physics::default_h100_llama70b(),
    };
    let trace = Path::new("data/azure-llm-2023-conv.csv");
    let lengths =
        LengthSamples::from_requests(trace, AzureTrace::open(trace).expect("bundled trace")).expect("valid trace");
    let slos = sim::measure::class_slos(
        &physics,
        lengths.pairs(),
        &telemetry_core::ClassBoundaries::default(),
        sim::measure::SloRule::Multiplier(5.0),
    );
    for class in ["SS", "LL"] {
        let slo = slos[RequestClass::parse(class).expect("class").index()];
        println!("{class}: TTFT SLO {:.3} s, TBT SLO {:.4} s", slo.ttft_s, slo.tbt_s);
        for p in a3_sweep(&physics, &lengths, RequestClass::parse(class).expect("class"), 2000.0, 600.0) {
            println!(
                "{} TP{} {:>4} MHz  {:>8.1} J/req  att {:.4}  ttft_p99 {:.3}  tbt_p99 {:.4}",
                p.class, p.tp, p.clock_mhz, p.energy_per_req_j, p.slo_attainment, p.ttft_p99_s, p.tbt_p99_s
            );
        }
    }
}
