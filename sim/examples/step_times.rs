//! Step times and per-GPU power of a few step shapes at each TP degree and
//! clock: `cargo run --release -p sim --example step_times [physics.toml]`.

use sim::{Physics, StepShape};
use std::path::Path;

fn main() {
    let physics = match std::env::args().nth(1) {
        Some(p) => Physics::load(Path::new(&p)).expect("physics file"),
        None => Physics::default_h100_llama70b(),
    };
    for tp in [2, 4, 8] {
        for clock in [1200, 1600, 1980] {
            let mut line = format!("TP{tp} {clock:>4} MHz:");
            for (decode, prefill) in [(1, 0), (12, 0), (12, 64), (12, 128), (12, 256), (12, 512), (64, 0), (128, 0)] {
                let shape = StepShape {
                    decode_seqs: decode,
                    decode_context_tokens: f64::from(decode) * 200.0,
                    prefill_tokens: prefill,
                    prefill_context_tokens: f64::from(prefill) / 2.0,
                };
                let c = physics.step(tp, clock, &shape);
                line += &format!("  {decode}+{prefill}: {:.1} ms {:.0} W", c.time_s * 1e3, c.power_w());
            }
            println!("{line}");
        }
    }
}
