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

/// Send one tick's commands, each only while the mode of `epoch` holds: one lane per
/// instance, in the tick's order (a spawn before the clock of the same instance), the
/// lanes side by side, so that no command waits behind another instance's (a real spawn
/// takes minutes, and a clock raised for a rising load must not wait for it).
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

/// A tick's commands by the instance each concerns (routes, which concern none, share a
/// lane), each lane in the tick's order, the lanes in the order of their first command.
pub fn lanes(cmds: Vec<Command>) -> Vec<Vec<Command>> {
    let mut lanes: Vec<(Option<actuators::InstanceId>, Vec<Command>)> = Vec::new();
    for cmd in cmds {
        let key = cmd.action.instance();
        match lanes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, lane)) => lane.push(cmd),
            None => lanes.push((key, vec![cmd])),
        }
    }
    lanes.into_iter().map(|(_, lane)| lane).collect()
}
