//! The exec backend: an operator-supplied command per action kind (start a
//! VM, launch an engine, call a cluster manager's CLI).
//!
//! Each command gets the [`Command`] as JSON on stdin and these environment
//! variables (where the action has the field): `DYNAMOLLM_ACTION_ID`,
//! `DYNAMOLLM_ACTION_KIND` (`spawn`, `retire`, `reshard`, `route`, `move-queued`,
//! `set-clock`), `DYNAMOLLM_INSTANCE`, `DYNAMOLLM_POOL`, `DYNAMOLLM_TP`,
//! `DYNAMOLLM_CLOCK_MHZ`, `DYNAMOLLM_CLASS` (route), `DYNAMOLLM_MAX_REQUESTS` (move-queued), `DYNAMOLLM_FROM`
//! (spawn: `cold`/`warm-standby`), `DYNAMOLLM_RESHARD_PATH` (reshard:
//! `restart`/`in-place`), and from the placement `DYNAMOLLM_NODE`,
//! `DYNAMOLLM_GPUS` (comma-separated) and `DYNAMOLLM_ENDPOINT`.
//!
//! Result: exit 0 → applied. For a spawn, a non-empty stdout must be JSON
//! `{"placement": {"node": …, "gpus": […], "endpoint": …}, "detail": "…"}`
//! (the whole of stdout, or its last non-empty line, so log lines may come
//! first); anything else is a failure naming the problem. Non-zero exit →
//! failed with the tail of stderr; exit 75 (`EX_TEMPFAIL`) or death by a
//! signal is marked retryable. Past the timeout the whole process group is
//! killed (`SIGKILL`) and the outcome is timed out.

use crate::{Action, Actuator, Command, Outcome, Placement};
use serde::Deserialize;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How to run one command: a shell line (`sh -c`) or an argv list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    /// Run with `sh -c "<line>"`.
    Shell(String),
    /// Run the program `argv[0]` with the rest as arguments (no shell).
    Argv(Vec<String>),
}

/// The commands per action kind; a kind without one is not carried out by
/// this backend (the dispatcher tries the next).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecTemplates {
    /// For `spawn`.
    #[serde(default)]
    pub spawn: Option<CommandLine>,
    /// For `retire`.
    #[serde(default)]
    pub retire: Option<CommandLine>,
    /// For `reshard`.
    #[serde(default)]
    pub reshard: Option<CommandLine>,
    /// For `set-clock`.
    #[serde(default)]
    pub set_clock: Option<CommandLine>,
    /// For `route`.
    #[serde(default)]
    pub route: Option<CommandLine>,
    /// For `move-queued`.
    #[serde(default)]
    pub move_queued: Option<CommandLine>,
}

impl ExecTemplates {
    /// The command for an action, if configured.
    pub fn for_action(&self, action: &Action) -> Option<&CommandLine> {
        match action {
            Action::Spawn { .. } => self.spawn.as_ref(),
            Action::Retire { .. } => self.retire.as_ref(),
            Action::Reshard { .. } => self.reshard.as_ref(),
            Action::SetClock { .. } => self.set_clock.as_ref(),
            Action::Route { .. } => self.route.as_ref(),
            Action::MoveQueued { .. } => self.move_queued.as_ref(),
        }
    }
}

/// The exec backend (see the module documentation).
#[derive(Debug, Clone)]
pub struct ExecActuator {
    templates: ExecTemplates,
    timeout: Duration,
    stderr_tail_chars: usize,
}

/// What a spawn command may print on stdout.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(default)]
    placement: Option<Placement>,
    #[serde(default)]
    detail: Option<String>,
}

/// The environment variables a command gets (see the module documentation).
pub fn command_env(cmd: &Command) -> Vec<(&'static str, String)> {
    let mut env = vec![("DYNAMOLLM_ACTION_ID", cmd.id.0.clone()), ("DYNAMOLLM_ACTION_KIND", cmd.action.kind().into())];
    if let Some(i) = cmd.action.instance() {
        env.push(("DYNAMOLLM_INSTANCE", i.0.to_string()));
    }
    if let Some(p) = cmd.action.pool() {
        env.push(("DYNAMOLLM_POOL", p.0.to_string()));
    }
    match &cmd.action {
        Action::Spawn { tp, clock_mhz, from, .. } => {
            env.push(("DYNAMOLLM_TP", tp.to_string()));
            env.push(("DYNAMOLLM_CLOCK_MHZ", clock_mhz.to_string()));
            env.push(("DYNAMOLLM_FROM", json_tag(from)));
        }
        Action::Reshard { tp, path, .. } => {
            env.push(("DYNAMOLLM_TP", tp.to_string()));
            env.push(("DYNAMOLLM_RESHARD_PATH", json_tag(path)));
        }
        Action::SetClock { clock_mhz, .. } => env.push(("DYNAMOLLM_CLOCK_MHZ", clock_mhz.to_string())),
        Action::Route { class, .. } => env.push(("DYNAMOLLM_CLASS", class.clone())),
        Action::MoveQueued { max_requests, .. } => env.push(("DYNAMOLLM_MAX_REQUESTS", max_requests.to_string())),
        Action::Retire { .. } => {}
    }
    if let Some(p) = &cmd.placement {
        env.push(("DYNAMOLLM_NODE", p.node.clone()));
        env.push(("DYNAMOLLM_GPUS", p.gpus.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(",")));
        if let Some(e) = &p.endpoint {
            env.push(("DYNAMOLLM_ENDPOINT", e.clone()));
        }
    }
    env
}

fn json_tag<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn parse_reply(stdout: &str) -> Result<Option<Reply>, String> {
    let trimmed = stdout.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<Reply>(trimmed) {
        Ok(r) => Ok(Some(r)),
        Err(whole) => {
            let last = trimmed.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            serde_json::from_str::<Reply>(last.trim()).map(Some).map_err(|_| {
                format!(
                    "stdout is not the JSON reply {{\"placement\": {{…}}}}: {whole} (stdout: {})",
                    crate::tail(stdout, 200)
                )
            })
        }
    }
}

/// Kill a whole process group (the shell and everything it started).
pub fn kill_group(pgid: u32) {
    // `kill -KILL -- -PGID`: no unsafe code, no extra dependency.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl ExecActuator {
    /// A backend running `templates`, each command bounded by `timeout`;
    /// failures quote the last `stderr_tail_chars` characters of stderr.
    pub fn new(templates: ExecTemplates, timeout: Duration, stderr_tail_chars: usize) -> ExecActuator {
        ExecActuator { templates, timeout, stderr_tail_chars }
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[async_trait::async_trait]
impl Actuator for ExecActuator {
    fn name(&self) -> &str {
        "exec"
    }

    fn supports(&self, action: &Action) -> bool {
        self.templates.for_action(action).is_some()
    }

    async fn apply(&self, cmd: &Command) -> Outcome {
        let Some(line) = self.templates.for_action(&cmd.action) else {
            return Outcome::Failed {
                reason: format!("exec: no command configured for {} actions", cmd.action.kind()),
                retryable: false,
            };
        };
        let mut proc = match line {
            CommandLine::Shell(s) => {
                let mut c = tokio::process::Command::new("sh");
                c.arg("-c").arg(s);
                c
            }
            CommandLine::Argv(argv) => {
                let Some((prog, args)) = argv.split_first() else {
                    return Outcome::Failed { reason: "exec: the argv list is empty".into(), retryable: false };
                };
                let mut c = tokio::process::Command::new(prog);
                c.args(args);
                c
            }
        };
        proc.envs(command_env(cmd))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let body = match serde_json::to_vec(cmd) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Failed { reason: format!("exec: cannot encode the command: {e}"), retryable: false }
            }
        };
        let started = Instant::now();
        let mut child = match proc.spawn() {
            Ok(c) => c,
            Err(e) => return Outcome::Failed { reason: format!("exec: cannot start {line:?}: {e}"), retryable: false },
        };
        let pid = child.id();
        let mut stdin = child.stdin.take();
        let run = async move {
            if let Some(mut s) = stdin.take() {
                // A command that does not read stdin closes the pipe: fine.
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            }
            child.wait_with_output().await
        };
        let output = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Outcome::Failed { reason: format!("exec: waiting for {line:?}: {e}"), retryable: true }
            }
            Err(_) => {
                if let Some(pid) = pid {
                    kill_group(pid);
                }
                tracing::warn!(id = %cmd.id, timeout = ?self.timeout, "exec command timed out; process group killed");
                return Outcome::TimedOut { after_ms: started.elapsed().as_millis() as u64 };
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let (what, retryable) = match output.status.code() {
                Some(code) => (format!("exit status {code}"), code == 75),
                None => ("killed by a signal".to_string(), true),
            };
            return Outcome::Failed {
                reason: format!("exec {}: {what}: {}", cmd.action.kind(), crate::tail(&stderr, self.stderr_tail_chars)),
                retryable,
            };
        }
        if matches!(cmd.action, Action::Spawn { .. }) {
            match parse_reply(&stdout) {
                Ok(Some(r)) => Outcome::Applied {
                    placement: r.placement,
                    detail: r
                        .detail
                        .unwrap_or_else(|| format!("exec spawn done in {} ms", started.elapsed().as_millis())),
                },
                Ok(None) => {
                    Outcome::Applied { placement: None, detail: "exec spawn done (no placement reported)".into() }
                }
                Err(problem) => Outcome::Failed { reason: format!("exec spawn: {problem}"), retryable: false },
            }
        } else {
            Outcome::Applied {
                placement: None,
                detail: format!("exec {} done in {} ms", cmd.action.kind(), started.elapsed().as_millis()),
            }
        }
    }
}
