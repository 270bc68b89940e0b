//! Calibration: every anchor of TWIN-PHYSICS.md measured in the twin.
//!
//! A3.a and A3.b do not hold and are listed as known deviations (see
//! docs/twin.md for the measurements and why): the twin's energy per request
//! at a fixed load falls monotonically as the clock falls, and the strict
//! per-gap TBT SLO (5× an isolated TP8 step) rules out TP2 under chunked
//! prefill. Everything else must pass; a deviation that starts passing fails
//! this test too, so the list stays true.

use dynamollm::workload::conversation_lengths;
use sim::Physics;

const KNOWN_DEVIATIONS: &[&str] = &["A3.a", "A3.b"];

#[test]
fn every_anchor_but_the_known_deviations_holds() {
    let anchors = sim::anchors::measure_all(&Physics::default_h100_llama70b(), &conversation_lengths());
    let ids: Vec<&str> = anchors.iter().map(|a| a.id.as_str()).collect();
    for want in [
        "A1.a", "A1.b", "A1.c", "A1.d", "A2.a", "A2.b", "A3.a", "A3.b", "A3.c", "A3.d", "A4.a", "A4.b", "A5.a", "A5.f",
        "A6.a", "A6.b",
    ] {
        assert!(ids.contains(&want), "anchor {want} is not measured");
    }
    for a in &anchors {
        if KNOWN_DEVIATIONS.contains(&a.id.as_str()) {
            assert!(!a.pass, "{} now passes ({}): take it off KNOWN_DEVIATIONS", a.id, a.measured);
        } else {
            assert!(a.pass, "{} {}: measured {} expected {}", a.id, a.name, a.measured, a.expected);
        }
    }
}
