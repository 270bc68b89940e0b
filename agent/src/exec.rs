//! `[agent.exec]`: the agent carries out spawn, retire, reshard and route
//! by running a command per action kind, for nodes whose engines a local
//! script manages (systemd units, containers).
//!
//! ```toml
//! [agent.exec]
//! spawn = ["/usr/local/bin/llm-spawn", "--instance", "{instance}", "--tp", "{tp}"]
//! retire = ["/usr/local/bin/llm-retire", "{instance}"]
//! timeout_s = 300
//! ```
//!
//! Each element of the argv has its placeholders replaced: `{id}`,
//! `{instance}`, `{pool}`, `{tp}`, `{clock_mhz}`, `{from}` (`cold` or
//! `warm-standby`), `{path}` (`restart` or `in-place`), `{class}`: each only
//! where its action has it. The program runs without a shell (write
//! `sh -c` yourself if you need one, and mind that ids then reach the
//! shell). The whole [`Command`] JSON is on its stdin. Exit 0 is `Applied`:
//! when the last line of stdout is a JSON object with a `placement`
//! (`{"placement": {"node": …, "gpus": […], "endpoint": …}}`) that is the
//! new instance's placement, otherwise stdout's last line is the detail.
//! A non-zero exit is `Failed` (retryable) with the status and the end of
//! stderr; no exit within `timeout_s` kills its whole process group and is
//! `Failed` (retryable). The agent runs these beside its telemetry: a long
//! spawn never holds up a reading.

use actuators::{Action, Command, Outcome, Placement};
use serde::Deserialize;
use std::process::Stdio;
use std::time::Duration;

/// The `[agent.exec]` table: an argv template per action kind.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Run for a spawn.
    #[serde(default)]
    pub spawn: Option<Vec<String>>,
    /// Run for a retire.
    #[serde(default)]
    pub retire: Option<Vec<String>>,
    /// Run for a reshard.
    #[serde(default)]
    pub reshard: Option<Vec<String>>,
    /// Run for a route.
    #[serde(default)]
    pub route: Option<Vec<String>>,
    /// Longest a command may run.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

fn default_timeout_s() -> f64 {
    300.0
}

const PLACEHOLDERS: [(&str, &[&str]); 4] = [
    ("spawn", &["id", "instance", "pool", "tp", "clock_mhz", "from"]),
    ("retire", &["id", "instance"]),
    ("reshard", &["id", "instance", "tp", "path"]),
    ("route", &["id", "class", "pool"]),
];

impl ExecConfig {
    fn template(&self, kind: &str) -> Option<&Vec<String>> {
        match kind {
            "spawn" => self.spawn.as_ref(),
            "retire" => self.retire.as_ref(),
            "reshard" => self.reshard.as_ref(),
            "route" => self.route.as_ref(),
            _ => None,
        }
    }

    /// Check the templates: a program, and only the placeholders each kind
    /// has. The error is `(key, problem)`, the key under `[agent]`.
    pub fn check(&self) -> Result<(), (String, String)> {
        // A millisecond to a day (a spawn may download weights); NaN is in no range.
        let t = self.timeout_s;
        if !(0.001..=86_400.0).contains(&t) {
            let shown = if t != 0.0 && (t.abs() >= 1e9 || t.abs() < 1e-4) { format!("{t:e}") } else { format!("{t}") };
            return Err((
                "exec.timeout_s".into(),
                format!("must be a number of seconds in [0.001, 86400], got {shown}"),
            ));
        }
        for (kind, allowed) in PLACEHOLDERS {
            let Some(argv) = self.template(kind) else { continue };
            let key = format!("exec.{kind}");
            if argv.first().is_none_or(|p| p.trim().is_empty()) {
                return Err((key, "must start with the program to run".into()));
            }
            for arg in argv {
                let mut rest = arg.as_str();
                while let Some(open) = rest.find('{') {
                    let after = &rest[open + 1..];
                    let Some(close) = after.find('}') else { break };
                    let name = &after[..close];
                    let is_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if is_name && !allowed.contains(&name) {
                        return Err((key, format!("{{{name}}} is not a placeholder of {kind} (it has {allowed:?})")));
                    }
                    rest = &after[close + 1..];
                }
            }
        }
        Ok(())
    }

    /// The argv for a command, or `None` when its kind has no template.
    pub fn argv(&self, cmd: &Command) -> Option<Vec<String>> {
        let (kind, values): (&str, Vec<(&str, String)>) = match &cmd.action {
            Action::Spawn { instance, pool, tp, clock_mhz, from } => (
                "spawn",
                vec![
                    ("instance", instance.0.to_string()),
                    ("pool", pool.0.to_string()),
                    ("tp", tp.to_string()),
                    ("clock_mhz", clock_mhz.to_string()),
                    ("from", enum_name(from)),
                ],
            ),
            Action::Retire { instance } => ("retire", vec![("instance", instance.0.to_string())]),
            Action::Reshard { instance, tp, path } => (
                "reshard",
                vec![("instance", instance.0.to_string()), ("tp", tp.to_string()), ("path", enum_name(path))],
            ),
            Action::Route { class, pool } => ("route", vec![("class", class.clone()), ("pool", pool.0.to_string())]),
            Action::MoveQueued { instance, pool, max_requests } => (
                "move-queued",
                vec![
                    ("instance", instance.0.to_string()),
                    ("pool", pool.0.to_string()),
                    ("max_requests", max_requests.to_string()),
                ],
            ),
            Action::SetClock { .. } => return None,
        };
        let template = self.template(kind)?;
        Some(
            template
                .iter()
                .map(|arg| {
                    let mut a = arg.replace("{id}", &cmd.id.0);
                    for (k, v) in &values {
                        a = a.replace(&format!("{{{k}}}"), v);
                    }
                    a
                })
                .collect(),
        )
    }

    /// Run the command's template. Its process group is killed when it runs
    /// past `timeout_s` (a shell's children included) and when the future is
    /// dropped.
    pub async fn run(&self, cmd: &Command, argv: &[String]) -> Outcome {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let failed = |reason: String, retryable: bool| Outcome::Failed { reason, retryable };
        let program = &argv[0];
        let input = match serde_json::to_vec(cmd) {
            Ok(b) => b,
            Err(e) => return failed(format!("cannot encode the command: {e}"), false),
        };
        let mut child = match tokio::process::Command::new(program)
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => return failed(format!("exec {program}: cannot start: {e}"), false),
        };
        let pid = child.id();
        // Readers of their own, so a chatty program never blocks on a full pipe.
        let reader = |r: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf).await;
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = reader(child.stdout.take().map(|s| Box::new(s) as _));
        let err = reader(child.stderr.take().map(|s| Box::new(s) as _));
        if let Some(mut stdin) = child.stdin.take() {
            // A program that does not read its stdin is fine.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
        let status = match tokio::time::timeout(Duration::from_secs_f64(self.timeout_s), child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return failed(format!("exec {program}: {e}"), true),
            Err(_) => {
                if let Some(pid) = pid {
                    actuators::exec::kill_group(pid);
                }
                let _ = child.wait().await;
                return failed(
                    format!("exec {program}: no exit within {} s; its process group was killed", self.timeout_s),
                    true,
                );
            }
        };
        // A daemon the program started may hold its pipes open: read what
        // came, do not wait for their end.
        let grace = Duration::from_secs(2);
        let stdout = tokio::time::timeout(grace, out).await.ok().and_then(Result::ok).unwrap_or_default();
        let stderr = tokio::time::timeout(grace, err).await.ok().and_then(Result::ok).unwrap_or_default();
        if !status.success() {
            return failed(format!("exec {program}: {status}: {}", actuators::tail(&stderr, 400)), true);
        }
        let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        #[derive(Deserialize)]
        struct Answer {
            placement: Placement,
        }
        match serde_json::from_str::<Answer>(last) {
            Ok(a) => Outcome::Applied { placement: Some(a.placement), detail: format!("exec {program}: done") },
            Err(_) => {
                Outcome::Applied { placement: None, detail: format!("exec {program}: {}", actuators::tail(last, 200)) }
            }
        }
    }
}

fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actuators::{ActionId, InstanceId, PoolId, SpawnFrom};

    fn spawn_cmd() -> Command {
        Command {
            id: ActionId("a-1".into()),
            action: Action::Spawn {
                instance: InstanceId(3),
                pool: PoolId(1),
                tp: 4,
                clock_mhz: 1980,
                from: SpawnFrom::WarmStandby,
            },
            placement: None,
            issued_at_ms: 5,
        }
    }

    #[test]
    fn templates_fill_placeholders_and_reject_foreign_ones() {
        let cfg = ExecConfig {
            spawn: Some(vec!["spawn".into(), "--id={id}".into(), "{instance}:{tp}:{from}".into()]),
            retire: None,
            reshard: None,
            route: None,
            timeout_s: 1.0,
        };
        cfg.check().unwrap();
        assert_eq!(cfg.argv(&spawn_cmd()).unwrap(), vec!["spawn", "--id=a-1", "3:4:warm-standby"]);
        let bad = ExecConfig { retire: Some(vec!["retire".into(), "{tp}".into()]), ..cfg.clone() };
        let (key, problem) = bad.check().unwrap_err();
        assert_eq!(key, "exec.retire");
        assert!(problem.contains("{tp} is not a placeholder of retire"), "{problem}");
        let empty = ExecConfig { route: Some(vec![]), ..cfg };
        assert_eq!(empty.check().unwrap_err().0, "exec.route");
    }

    #[tokio::test]
    async fn exit_status_stdout_and_timeout_become_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("stdin.json");
        let sh = |script: &str| vec!["sh".to_string(), "-c".into(), script.into(), seen.display().to_string()];
        let cfg = ExecConfig { spawn: None, retire: None, reshard: None, route: None, timeout_s: 0.5 };
        let ok = cfg
            .run(
                &spawn_cmd(),
                &sh("cat > \"$0\"; echo starting; echo '{\"placement\": {\"node\": \"e/n\", \"gpus\": [2, 3]}}'"),
            )
            .await;
        match ok {
            Outcome::Applied { placement: Some(p), .. } => assert_eq!((p.node.as_str(), p.gpus), ("e/n", vec![2, 3])),
            other => panic!("{other:?}"),
        }
        let stdin: Command = serde_json::from_slice(&std::fs::read(&seen).unwrap()).unwrap();
        assert_eq!(stdin, spawn_cmd());
        match cfg.run(&spawn_cmd(), &sh("echo no GPUs free >&2; exit 3")).await {
            Outcome::Failed { reason, retryable: true } => {
                assert!(reason.contains("exit status: 3") && reason.ends_with("no GPUs free"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // A shell whose child outlives it: the whole group goes at the timeout.
        let child_pid = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", child_pid.display());
        match cfg.run(&spawn_cmd(), &sh(&script)).await {
            Outcome::Failed { reason, retryable: true } => assert!(reason.contains("no exit within 0.5 s"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let pid = std::fs::read_to_string(&child_pid).unwrap().trim().to_string();
        let mut gone = false;
        for _ in 0..100 {
            // `kill -0` fails once the process is gone (a zombie reaped by init counts as gone).
            let alive = std::process::Command::new("kill").args(["-0", &pid]).status().unwrap().success();
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "));
            if !alive || zombie {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "the timed-out command's child {pid} survived");
        match cfg.run(&spawn_cmd(), &["/nonexistent/prog".to_string()]).await {
            Outcome::Failed { reason, retryable: false } => assert!(reason.contains("cannot start"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
