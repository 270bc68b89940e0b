//! `move-queued` for engines that cannot hand requests over themselves: the
//! router's streaming requests with no first token yet, per engine endpoint,
//! and the actuator backend that takes them back ([`RouterMover`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The streaming requests the router has sent that have no first token yet,
/// per engine endpoint, oldest first: the ones `move-queued` may take back.
#[derive(Debug, Default)]
pub struct Unstarted {
    inner: Mutex<UnstartedInner>,
}

#[derive(Debug, Default)]
struct UnstartedInner {
    next_id: u64,
    by_endpoint: HashMap<String, Vec<(u64, tokio::sync::oneshot::Sender<u32>)>>,
}

impl Unstarted {
    fn lock(&self) -> std::sync::MutexGuard<'_, UnstartedInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a request just sent to `endpoint`; the receiver yields the pool it is moved to.
    pub(super) fn add(&self, endpoint: &str) -> (u64, tokio::sync::oneshot::Receiver<u32>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut g = self.lock();
        g.next_id += 1;
        let id = g.next_id;
        g.by_endpoint.entry(endpoint.to_string()).or_default().push((id, tx));
        (id, rx)
    }

    /// The request has its first token (or failed): it is no longer movable.
    pub(super) fn remove(&self, endpoint: &str, id: u64) {
        let mut g = self.lock();
        if let Some(v) = g.by_endpoint.get_mut(endpoint) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                g.by_endpoint.remove(endpoint);
            }
        }
    }

    /// How many requests sent to `endpoint` have no first token yet.
    pub fn count(&self, endpoint: &str) -> usize {
        self.lock().by_endpoint.get(endpoint).map_or(0, Vec::len)
    }

    /// Move up to `max` of `endpoint`'s unstarted requests to `pool`, the
    /// most recently sent first (they are at the back of the engine's queue
    /// and would wait longest). Returns how many were moved.
    pub fn move_to(&self, endpoint: &str, pool: u32, max: u32) -> u32 {
        let mut g = self.lock();
        let Some(v) = g.by_endpoint.get_mut(endpoint) else { return 0 };
        let mut moved = 0;
        while moved < max {
            let Some((_, tx)) = v.pop() else { break };
            // A request that finished meanwhile has dropped its receiver: not counted.
            if tx.send(pool).is_ok() {
                moved += 1;
            }
        }
        if v.is_empty() {
            g.by_endpoint.remove(endpoint);
        }
        moved
    }
}

/// The actuator backend of `move-queued` on an external cluster behind the
/// router: it takes unstarted streams back from the instance's engine (by
/// its placement's endpoint) and the router sends them to the target pool.
pub struct RouterMover {
    unstarted: Arc<Unstarted>,
}

impl RouterMover {
    /// A mover over the router's unstarted requests.
    pub fn new(unstarted: Arc<Unstarted>) -> RouterMover {
        RouterMover { unstarted }
    }
}

#[async_trait::async_trait]
impl actuators::Actuator for RouterMover {
    fn name(&self) -> &str {
        "router"
    }

    fn supports(&self, action: &actuators::Action) -> bool {
        matches!(action, actuators::Action::MoveQueued { .. })
    }

    async fn apply(&self, cmd: &actuators::Command) -> actuators::Outcome {
        let actuators::Action::MoveQueued { instance, pool, max_requests } = cmd.action else {
            return actuators::Outcome::Failed {
                reason: format!("the router carries out move-queued only, not {}", cmd.action.kind()),
                retryable: false,
            };
        };
        let Some(endpoint) = cmd.placement.as_ref().and_then(|p| p.endpoint.as_deref()) else {
            return actuators::Outcome::Failed {
                reason: format!("instance {} has no known endpoint: the router cannot tell its requests", instance.0),
                retryable: false,
            };
        };
        let moved = self.unstarted.move_to(endpoint, pool.0, max_requests);
        actuators::Outcome::Applied {
            placement: None,
            detail: format!("{moved} unstarted requests moved to pool {}", pool.0),
        }
    }
}
