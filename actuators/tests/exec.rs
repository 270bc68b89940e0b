//! The exec backend with real processes: placement JSON on stdout, failures
//! with stderr, timeouts that kill the process group, and the command on
//! stdin and in the environment.

use actuators::exec::{CommandLine, ExecActuator, ExecTemplates};
use actuators::{Action, Actuator, Command, InstanceId, Outcome, Placement, PoolId, SpawnFrom};
use std::path::Path;
use std::time::{Duration, Instant};

fn spawn_cmd(id: &str) -> Command {
    Command::new(
        id,
        Action::Spawn { instance: InstanceId(7), pool: PoolId(2), tp: 4, clock_mhz: 1410, from: SpawnFrom::Cold },
        None,
    )
}

fn exec(templates: ExecTemplates, timeout: Duration) -> ExecActuator {
    ExecActuator::new(templates, timeout, 200)
}

fn shell(s: &str) -> Option<CommandLine> {
    Some(CommandLine::Shell(s.to_string()))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test]
async fn spawn_reports_placement_and_gets_the_command_on_stdin_and_in_env() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let script = format!(
        "cat > {d}/stdin.json; env | grep '^DYNAMOLLM_' | sort > {d}/env.txt; \
         echo 'starting engine…'; \
         echo '{{\"placement\": {{\"node\": \"gpu-node-3\", \"gpus\": [4, 5, 6, 7], \"endpoint\": \"http://gpu-node-3:8000\"}}}}'"
    );
    let a = exec(ExecTemplates { spawn: shell(&script), ..Default::default() }, Duration::from_secs(10));
    let cmd = spawn_cmd("act-1");
    let out = a.apply(&cmd).await;
    let Outcome::Applied { placement: Some(p), .. } = &out else { panic!("expected applied with placement: {out:?}") };
    assert_eq!(
        p,
        &Placement {
            node: "gpu-node-3".into(),
            gpus: vec![4, 5, 6, 7],
            endpoint: Some("http://gpu-node-3:8000".into())
        }
    );
    let stdin: Command = serde_json::from_str(&read(&dir.path().join("stdin.json"))).unwrap();
    assert_eq!(stdin, cmd);
    let env = read(&dir.path().join("env.txt"));
    for line in [
        "DYNAMOLLM_ACTION_ID=act-1",
        "DYNAMOLLM_ACTION_KIND=spawn",
        "DYNAMOLLM_INSTANCE=7",
        "DYNAMOLLM_POOL=2",
        "DYNAMOLLM_TP=4",
        "DYNAMOLLM_CLOCK_MHZ=1410",
        "DYNAMOLLM_FROM=cold",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing from\n{env}");
    }
    assert!(!env.contains("DYNAMOLLM_NODE"), "a spawn has no placement:\n{env}");
}

#[tokio::test]
async fn placement_goes_to_the_environment_and_argv_lists_run_without_a_shell() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("env.txt");
    let argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        "env | grep '^DYNAMOLLM_' > \"$1\"".to_string(),
        "sh".to_string(),
        out_file.display().to_string(),
    ];
    let a =
        exec(ExecTemplates { set_clock: Some(CommandLine::Argv(argv)), ..Default::default() }, Duration::from_secs(10));
    assert!(!a.supports(&Action::Retire { instance: InstanceId(1) }));
    let cmd = Command::new(
        "clk-1",
        Action::SetClock { instance: InstanceId(3), clock_mhz: 1200 },
        Some(Placement { node: "site1/n2".into(), gpus: vec![0, 1], endpoint: Some("http://n2:8000".into()) }),
    );
    let out = a.apply(&cmd).await;
    assert!(out.is_applied(), "{out:?}");
    let env = read(&out_file);
    for line in [
        "DYNAMOLLM_ACTION_KIND=set-clock",
        "DYNAMOLLM_INSTANCE=3",
        "DYNAMOLLM_CLOCK_MHZ=1200",
        "DYNAMOLLM_NODE=site1/n2",
        "DYNAMOLLM_GPUS=0,1",
        "DYNAMOLLM_ENDPOINT=http://n2:8000",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing from\n{env}");
    }
    assert!(!env.contains("DYNAMOLLM_POOL"), "{env}");
}

#[tokio::test]
async fn non_zero_exit_is_failed_with_the_stderr_tail() {
    let a = exec(
        ExecTemplates {
            retire: shell("echo 'some noise'; echo 'cannot reach node-9: connection refused' >&2; exit 1"),
            reshard: shell("echo 'busy, try later' >&2; exit 75"),
            ..Default::default()
        },
        Duration::from_secs(10),
    );
    let out = a.apply(&Command::new("r-1", Action::Retire { instance: InstanceId(9) }, None)).await;
    match out {
        Outcome::Failed { reason, retryable } => {
            assert!(reason.contains("exit status 1"), "{reason}");
            assert!(reason.contains("cannot reach node-9: connection refused"), "{reason}");
            assert!(!retryable);
        }
        other => panic!("expected failed: {other:?}"),
    }
    let out = a
        .apply(&Command::new(
            "r-2",
            Action::Reshard { instance: InstanceId(9), tp: 2, path: actuators::ReshardPath::Restart },
            None,
        ))
        .await;
    assert!(matches!(out, Outcome::Failed { retryable: true, ref reason } if reason.contains("busy")), "{out:?}");
}

#[tokio::test]
async fn malformed_spawn_stdout_is_a_failure_naming_the_problem() {
    let a = exec(
        ExecTemplates { spawn: shell("echo '{\"placement\": 42}'"), ..Default::default() },
        Duration::from_secs(10),
    );
    match a.apply(&spawn_cmd("bad-1")).await {
        Outcome::Failed { reason, retryable: false } => {
            assert!(reason.contains("stdout is not the JSON reply"), "{reason}");
            assert!(reason.contains("42"), "{reason}");
        }
        other => panic!("expected failed: {other:?}"),
    }
    // A spawn that prints nothing is applied without a placement.
    let a = exec(ExecTemplates { spawn: shell("true"), ..Default::default() }, Duration::from_secs(10));
    assert!(matches!(a.apply(&spawn_cmd("ok-1")).await, Outcome::Applied { placement: None, .. }));
}

#[tokio::test]
async fn a_hung_command_times_out_and_its_process_group_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("child.pid");
    // The shell starts a grandchild that would outlive a plain kill of the shell.
    let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
    let a = exec(ExecTemplates { retire: shell(&script), ..Default::default() }, Duration::from_millis(300));
    let start = Instant::now();
    let out = a.apply(&Command::new("slow-1", Action::Retire { instance: InstanceId(1) }, None)).await;
    let took = start.elapsed();
    match out {
        Outcome::TimedOut { after_ms } => assert!((290..2000).contains(&after_ms), "{after_ms}"),
        other => panic!("expected timed out: {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "{took:?}");
    let pid = read(&pid_file).trim().to_string();
    // The grandchild is gone (give the kernel a moment to reap it).
    let mut alive = true;
    for _ in 0..50 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its (killed) parent's reaper.
        if st.is_empty() || st.split_whitespace().nth(2) == Some("Z") {
            alive = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive, "the grandchild sleep {pid} survived the timeout");
}
