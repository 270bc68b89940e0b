//! Sending a tick's commands to the backends: one lane per instance, each
//! command only while the mode it was decided in holds, every outcome counted.

use crate::Shared;
use actuators::{ActionId, Command, Outcome};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Hand one command to the backends unless the mode it was decided in has
/// changed since (then it is cancelled, and `None` comes back).
pub(crate) async fn dispatch_if_allowed(shared: &Shared, cmd: &Command, epoch: u64) -> Option<Outcome> {
    {
        let mut core = shared.core.lock().ok()?;
        if !core.may_send(epoch) {
            let reason = format!("the mode changed to {} before it left", core.mode().name());
            core.cancel(&cmd.id, &reason);
            return None;
        }
    }
    Some(dispatch(shared, cmd).await)
}

/// Hand one command to the backends (through the audit log) and count its outcome.
pub(crate) async fn dispatch(shared: &Shared, cmd: &Command) -> Outcome {
    let outcome = match shared.actuators.dispatch(cmd).await {
        Ok(o) => o,
        Err(e) => Outcome::Failed { reason: format!("audit log: {e}"), retryable: true },
    };
    shared.metrics.observe_action(cmd.action.kind(), &outcome);
    if !outcome.is_applied() {
        tracing::warn!(id = %cmd.id, ?outcome, "action not applied");
    }
    outcome
}

/// Send one tick's commands, each only while the mode of `epoch` holds, in the lanes of
/// [`lanes`]: the fleet's changes one after another (a storm of spawns stays behind the one
/// running, and a switch to dry-run cancels what has not left), every other instance's
/// clock and queue commands beside them.
pub(crate) fn send(
    shared: &Arc<Shared>,
    cmds: Vec<Command>,
    epoch: u64,
    out: &mpsc::UnboundedSender<(ActionId, Outcome)>,
) {
    for lane in lanes(cmds) {
        let shared = shared.clone();
        let out = out.clone();
        tokio::spawn(async move {
            for cmd in lane {
                if let Some(outcome) = dispatch_if_allowed(&shared, &cmd, epoch).await {
                    let _ = out.send((cmd.id.clone(), outcome));
                }
            }
        });
    }
}

/// A tick's commands in lanes, each lane in the tick's order, the lanes in the order of
/// their first command: one lane for the changes to the fleet (spawns, retires, reshards)
/// and every other command of an instance they touch (a spawn before its own clock); one
/// lane per other instance (a clock raised for a rising load never waits behind a spawn
/// or a draining retire, which take minutes on a real cluster); one for routes.
pub fn lanes(cmds: Vec<Command>) -> Vec<Vec<Command>> {
    #[derive(PartialEq)]
    enum Lane {
        Fleet,
        Instance(actuators::InstanceId),
        Routes,
    }
    let changes = |a: &actuators::Action| {
        matches!(
            a,
            actuators::Action::Spawn { .. } | actuators::Action::Retire { .. } | actuators::Action::Reshard { .. }
        )
    };
    let touched: std::collections::BTreeSet<actuators::InstanceId> =
        cmds.iter().filter(|c| changes(&c.action)).filter_map(|c| c.action.instance()).collect();
    let mut lanes: Vec<(Lane, Vec<Command>)> = Vec::new();
    for cmd in cmds {
        let key = match cmd.action.instance() {
            Some(i) if touched.contains(&i) => Lane::Fleet,
            Some(i) => Lane::Instance(i),
            None => Lane::Routes,
        };
        match lanes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, lane)) => lane.push(cmd),
            None => lanes.push((key, vec![cmd])),
        }
    }
    lanes.into_iter().map(|(_, lane)| lane).collect()
}
