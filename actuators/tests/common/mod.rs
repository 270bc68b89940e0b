//! Helpers shared by the actuators' integration tests.
#![allow(dead_code)]

use actuators::reshard::Readiness;
use actuators::{Action, Actuator, Command, Outcome, Placement};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An environment variable `scripts/test` sets; a clear failure without it.
pub fn require_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test (it installs and starts the test services)")
    })
}

/// A name unique to this test run.
pub fn unique(tag: &str) -> String {
    format!("t{}-{}-{tag}", std::process::id(), actuators::now_ms())
}

/// A fake backend that records every command it gets (in a log shared
/// with other fakes) and answers from a rule.
pub struct Recorder {
    pub calls: Arc<Mutex<Vec<Command>>>,
    pub events: Arc<Mutex<Vec<String>>>,
    pub delay: Duration,
    pub answer: Box<dyn Fn(&Command) -> Outcome + Send + Sync>,
}

impl Recorder {
    pub fn applied(events: Arc<Mutex<Vec<String>>>) -> Recorder {
        Recorder::with(events, |c| Outcome::Applied {
            placement: match c.action {
                Action::Spawn { instance, .. } => Some(Placement {
                    node: format!("node-{}", instance.0),
                    gpus: vec![0, 1],
                    endpoint: Some(format!("http://node-{}:8000", instance.0)),
                }),
                _ => None,
            },
            detail: "ok".into(),
        })
    }

    pub fn with(
        events: Arc<Mutex<Vec<String>>>,
        answer: impl Fn(&Command) -> Outcome + Send + Sync + 'static,
    ) -> Recorder {
        Recorder { calls: Default::default(), events, delay: Duration::ZERO, answer: Box::new(answer) }
    }

    pub fn ids(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(|c| c.id.0.clone()).collect()
    }
}

/// `spawn:7`, `retire:3`, `route:SS`, `set-clock:1`.
pub fn event(a: &Action) -> String {
    match a {
        Action::Route { class, .. } => format!("route:{class}"),
        other => format!("{}:{}", other.kind(), other.instance().map(|i| i.0).unwrap_or(0)),
    }
}

#[async_trait::async_trait]
impl Actuator for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn supports(&self, _: &Action) -> bool {
        true
    }
    async fn apply(&self, cmd: &Command) -> Outcome {
        self.calls.lock().unwrap().push(cmd.clone());
        self.events.lock().unwrap().push(event(&cmd.action));
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        (self.answer)(cmd)
    }
}

/// Readiness that answers true from the `after`-th poll on (never when
/// `None`), and logs each poll as `ready?`.
pub struct FakeReadiness {
    pub after: Option<usize>,
    pub polls: Mutex<usize>,
    pub events: Arc<Mutex<Vec<String>>>,
    pub seen: Mutex<Vec<Placement>>,
}

impl FakeReadiness {
    pub fn new(after: Option<usize>, events: Arc<Mutex<Vec<String>>>) -> FakeReadiness {
        FakeReadiness { after, polls: Mutex::new(0), events, seen: Mutex::new(Vec::new()) }
    }
}

#[async_trait::async_trait]
impl Readiness for FakeReadiness {
    async fn is_ready(&self, placement: &Placement) -> bool {
        let mut n = self.polls.lock().unwrap();
        *n += 1;
        self.seen.lock().unwrap().push(placement.clone());
        let ready = self.after.is_some_and(|a| *n >= a);
        let mut ev = self.events.lock().unwrap();
        if ev.last().map(String::as_str) != Some("ready?") {
            ev.push("ready?".into());
        }
        ready
    }
}
