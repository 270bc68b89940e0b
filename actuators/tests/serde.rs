//! Wire shapes: Command, Outcome and Ack survive a JSON round trip, and the
//! documented shapes parse.

use actuators::{Ack, Action, ActionId, Command, InstanceId, Outcome, Placement, PoolId, ReshardPath, SpawnFrom};
use proptest::prelude::*;

fn placement() -> impl Strategy<Value = Placement> {
    (
        "[a-z0-9/-]{0,12}",
        proptest::collection::vec(0u32..16, 0..8),
        proptest::option::of("http://[a-z]{1,8}:[0-9]{2,5}"),
    )
        .prop_map(|(node, gpus, endpoint)| Placement { node, gpus, endpoint })
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (any::<u32>(), any::<u32>(), 1u32..9, 0u32..3000, any::<bool>()).prop_map(|(i, p, tp, c, warm)| {
            Action::Spawn {
                instance: InstanceId(i),
                pool: PoolId(p),
                tp,
                clock_mhz: c,
                from: if warm { SpawnFrom::WarmStandby } else { SpawnFrom::Cold },
            }
        }),
        any::<u32>().prop_map(|i| Action::Retire { instance: InstanceId(i) }),
        (any::<u32>(), 1u32..9, any::<bool>()).prop_map(|(i, tp, inplace)| Action::Reshard {
            instance: InstanceId(i),
            tp,
            path: if inplace { ReshardPath::InPlace } else { ReshardPath::Restart },
        }),
        ("[A-Z]{2}", any::<u32>()).prop_map(|(class, p)| Action::Route { class, pool: PoolId(p) }),
        (any::<u32>(), 0u32..3000).prop_map(|(i, c)| Action::SetClock { instance: InstanceId(i), clock_mhz: c }),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(i, p, n)| Action::MoveQueued {
            instance: InstanceId(i),
            pool: PoolId(p),
            max_requests: n,
        }),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        (proptest::option::of(placement()), ".{0,20}")
            .prop_map(|(placement, detail)| Outcome::Applied { placement, detail }),
        (".{0,20}", any::<bool>()).prop_map(|(reason, retryable)| Outcome::Failed { reason, retryable }),
        any::<u64>().prop_map(|after_ms| Outcome::TimedOut { after_ms }),
    ]
}

proptest! {
    #[test]
    fn commands_round_trip(id in "[a-z0-9/-]{1,20}", action in action(), placement in proptest::option::of(placement()), t in any::<u64>()) {
        let c = Command { id: ActionId(id), action, placement, issued_at_ms: t };
        let json = serde_json::to_string(&c).unwrap();
        prop_assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), c);
    }

    #[test]
    fn outcomes_and_acks_round_trip(id in "[a-z0-9/-]{1,20}", outcome in outcome()) {
        let json = serde_json::to_string(&outcome).unwrap();
        prop_assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), outcome.clone());
        let ack = Ack { id: ActionId(id), outcome };
        let json = serde_json::to_string(&ack).unwrap();
        prop_assert_eq!(serde_json::from_str::<Ack>(&json).unwrap(), ack);
    }
}

#[test]
fn documented_shapes_parse() {
    let ack: Ack = serde_json::from_str(r#"{"id": "a-1", "outcome": "applied"}"#).unwrap();
    assert_eq!(ack.outcome, Outcome::Applied { placement: None, detail: String::new() });
    let ack: Ack = serde_json::from_str(r#"{"id": "a-2", "outcome": "timed-out", "after_ms": 5000}"#).unwrap();
    assert_eq!(ack.outcome, Outcome::TimedOut { after_ms: 5000 });
    let c: Command = serde_json::from_str(
        r#"{"id": "c", "action": {"kind": "set-clock", "instance": 3, "clock_mhz": 1410}, "issued_at_ms": 1}"#,
    )
    .unwrap();
    assert_eq!(c.action.kind(), "set-clock");
    assert_eq!(c.placement, None);
    let o = Outcome::Failed { reason: "x".into(), retryable: false };
    assert_eq!(o.label(), "failed");
}
