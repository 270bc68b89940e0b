//! Calibration: every anchor of docs/twin.md measured in the twin, and
//! every one must hold (docs/twin.md says how A3 holds and where the twin's
//! reasons differ from the paper's).

use sim::workload::conversation_lengths;
use sim::Physics;

#[test]
fn every_anchor_holds() {
    let anchors = sim::anchors::measure_all(&Physics::default_h100_llama70b(), &conversation_lengths());
    let ids: Vec<&str> = anchors.iter().map(|a| a.id.as_str()).collect();
    for want in [
        "A1.a", "A1.b", "A1.c", "A1.d", "A2.a", "A2.b", "A3.a", "A3.b", "A3.c", "A3.d", "A4.a", "A4.b", "A5.a", "A5.b",
        "A5.c", "A5.d", "A5.e", "A5.f", "A5.g", "A6.a", "A6.b", "A6.c", "A7.a", "A7.b", "A7.c", "A7.d",
    ] {
        assert!(ids.contains(&want), "anchor {want} is not measured");
    }
    let failing: Vec<String> = anchors
        .iter()
        .filter(|a| !a.pass)
        .map(|a| format!("{} {}: measured {} expected {}", a.id, a.name, a.measured, a.expected))
        .collect();
    assert!(failing.is_empty(), "anchors that do not hold:\n{}", failing.join("\n"));
}
