//! What the controller learns of a pool's capacity converges from a wrong
//! start. The twin serves six hours of a steady load of one class (LS: the
//! Azure Conversation trace's long-prompt, short-answer requests, 8 req/s)
//! three times: the controller starts with its learnt capacity scale at 1
//! (the reference), at 0.5 and at 2. Where the reference's scale settles
//! (its mean over the last two hours) is the pool's capacity as the
//! controller can know it; from each wrong start the scale must come within
//! 25% of it and stay there: from 2× within an hour, from 0.5× within three
//! (a scale grows 5% an attainment window at most, and only while the pool
//! carries enough of what it is credited with to test it).

use controller::control::Controller;
use controller::policy::Policy;
use controller::profile::ProfileTable;
use dynamollm::cmd::sim::{run_controlled_policy, ControlledRun};
use sim::{Physics, Workload};
use std::path::Path;
use telemetry::{ClassBoundaries, RequestClass};

const HOURS: f64 = 6.0;
const RATE_PER_MIN: f64 = 480.0;
const LS: RequestClass = RequestClass::ALL[6];

/// Each attainment window's (time, LS pool's learnt capacity scale), and LS's SLO attainment.
fn learn(start_scale: f64, dir: &Path) -> (Vec<(f64, f64)>, f64) {
    let rates = dir.join("flat.csv");
    std::fs::write(
        &rates,
        format!(
            "minute,rate_lo,rate_mid,rate_hi\n0,{r},{r},{r}\n{m},{r},{r},{r}\n",
            r = RATE_PER_MIN,
            m = HOURS * 60.0
        ),
    )
    .unwrap();
    // The Conversation trace's LS requests, as they are.
    let conv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/azure-llm-2023-conv.csv");
    let conv = std::fs::read_to_string(conv).unwrap();
    let mut text = String::from("TIMESTAMP,ContextTokens,GeneratedTokens\n");
    for line in conv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if ClassBoundaries::default().classify(f[1].parse().unwrap(), f[2].parse().unwrap()) == LS {
            text.push_str(line);
            text.push('\n');
        }
    }
    let lengths = dir.join("ls.csv");
    std::fs::write(&lengths, text).unwrap();
    let workload = Workload::from_options(None, Some(&rates), Some(&lengths), 1.0, None, 1).unwrap();
    let physics = Physics::default_h100_llama70b();
    let profile = ProfileTable::bundled();
    let pool = LS.index();
    let mut seen = Vec::new();
    let mut hook = |ctl: &mut Controller, now: f64| {
        if now == 0.0 {
            // A wrong start: a state saved with every pool's scale at `start_scale`.
            let mut st = ctl.snapshot();
            st.util_scale.iter_mut().for_each(|s| *s = start_scale);
            *ctl = Controller::restore(ctl.config().clone(), ctl.profile().clone(), st).unwrap();
        }
        if now % 300.0 == 0.0 {
            seen.push((now, ctl.learnt(pool).unwrap().0));
        }
    };
    let run = ControlledRun { on_step: Some(&mut hook), ..ControlledRun::new(&profile) };
    let (report, _) = run_controlled_policy(&physics, Policy::DynamoLlm, &workload, 5.0, run, true).unwrap();
    (seen, report.classes[&LS.to_string()].latency.slo_attainment)
}

#[test]
fn the_learnt_capacity_converges_from_half_and_from_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, att) = learn(1.0, dir.path());
    assert!(att >= 0.99, "the reference run held LS at {att}");
    let last: Vec<f64> = reference.iter().filter(|(t, _)| *t >= (HOURS - 2.0) * 3600.0).map(|x| x.1).collect();
    let level = last.iter().sum::<f64>() / last.len() as f64;
    let (lo, hi) = last.iter().fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
    // Settled: not drifting, and below the ceiling (a scale pinned at the ceiling knows nothing).
    assert!(hi / lo <= 1.3, "the reference's scale ranged {lo:.2}–{hi:.2} over its last two hours");
    assert!(hi < controller::control::MAX_CAPACITY_SCALE, "the reference's scale reached the ceiling");
    for (start, within_h) in [(0.5, 3.0), (2.0, 1.0)] {
        let (seen, att) = learn(start, dir.path());
        assert!(att >= 0.99, "from {start}× LS held {att}");
        // The first window from which every later one lies within 25% of the reference's level.
        let off = |s: f64| (s / level - 1.0).abs() > 0.25;
        let settled_s =
            seen.iter().rposition(|x| off(x.1)).map_or(0.0, |k| seen.get(k + 1).map_or(f64::INFINITY, |x| x.0));
        eprintln!("from {start}×: within 25% of {level:.2} from {:.1} h", settled_s / 3600.0);
        assert!(
            settled_s <= within_h * 3600.0,
            "from {start}× the scale came within 25% of {level:.2} only at {:.1} h: {seen:?}",
            settled_s / 3600.0
        );
    }
}
