//! The cost of the per-minute timeline: the same replay with it and with only
//! the closing interval, alternated. `cargo run --release -p sim --example timeline_overhead`

use sim::{ClassSlo, Cluster, ClusterSpec, InstanceSpec, Physics, PoolSpec};
use std::time::Instant;
use telemetry_core::{ClassBoundaries, Request, RequestClass, CLASS_COUNT};

fn run(p: &Physics, step_s: f64) -> (f64, usize) {
    let spec = ClusterSpec {
        pools: RequestClass::ALL.iter().map(|c| PoolSpec { name: c.name(), classes: vec![*c] }).collect(),
        instances: (0..CLASS_COUNT)
            .flat_map(|pool| (0..3).map(move |_| InstanceSpec { pool, tp: 8, clock_mhz: 1980 }))
            .collect(),
    };
    let slo = [ClassSlo { ttft_s: 1.0, tbt_s: 0.1 }; CLASS_COUNT];
    let mut c = Cluster::new(p, &spec, ClassBoundaries::default(), slo);
    c.set_timeline_step(step_s);
    let start = Instant::now();
    // 12 requests/s for 24 hours, lengths cycling over every class.
    let n = 12 * 24 * 3600;
    for k in 0..n {
        let input = [200, 1500, 6000][k % 3];
        let output = [30, 200, 600][(k / 3) % 3];
        c.arrive(&Request { arrival_s: k as f64 / 12.0, input_tokens: input, output_tokens: output });
    }
    c.drain();
    let t = c.finish(24.0 * 3600.0);
    (start.elapsed().as_secs_f64(), t.timeline.points.len())
}

fn main() {
    let p = Physics::default_h100_llama70b();
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (a, na) = run(&p, 60.0);
        let (b, nb) = run(&p, f64::INFINITY);
        println!("per-minute timeline: {a:.3} s ({na} points)   closing interval only: {b:.3} s ({nb} point)");
        with.push(a);
        without.push(b);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (med(&mut with), med(&mut without));
    println!("median: {a:.3} s vs {b:.3} s: {:+.1}%", (a / b - 1.0) * 100.0);
}
