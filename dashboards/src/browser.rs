//! Check a page in headless Chromium: console messages and uncaught errors,
//! the DOM after its scripts ran, and a screenshot.
//!
//! Chromium runs twice per check in a fresh profile, offline-friendly
//! (`--disable-background-networking`, no sync, no component updates): once
//! with `--dump-dom` and `--enable-logging=stderr` (console messages and
//! uncaught exceptions are logged as `CONSOLE` lines), once with
//! `--screenshot`. Both use `--virtual-time-budget`, so timers and fetches run
//! before the DOM is taken. Chromium's log line does not carry the console
//! level, so every console message other than a failed resource load counts
//! as an error: pages under test log nothing.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable naming the Chromium binary for tests.
pub const CHROMIUM_ENV: &str = "DYNAMOLLM_TEST_CHROMIUM";

/// What a page did in the browser.
#[derive(Debug, Clone, PartialEq)]
pub struct PageCheck {
    /// Console messages and uncaught exceptions (`Uncaught TypeError: …`).
    pub console_errors: Vec<String>,
    /// Failed resource loads (`Failed to load resource: … 401 …`).
    pub network_errors: Vec<String>,
    /// The serialised DOM after scripts ran.
    pub dom: String,
}

/// The Chromium binary from [`CHROMIUM_ENV`]; panics, naming the variable, when it is unset
/// (browser tests fail rather than skip; `scripts/test` sets it).
pub fn chromium_from_env() -> PathBuf {
    match std::env::var_os(CHROMIUM_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "{CHROMIUM_ENV} is not set: the browser tests need headless Chromium (run scripts/test, which installs \
             Debian's chromium and sets it, or export {CHROMIUM_ENV}=/usr/bin/chromium)"
        ),
    }
}

fn base_args(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// Run a command with a deadline; returns (stdout, stderr).
fn run(mut cmd: Command, limit: Duration) -> Result<(String, String)> {
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (o, e) = (t_out.join().unwrap_or_default(), t_err.join().unwrap_or_default());
    if !status.success() {
        bail!("{program} exited with {status}: {}", e.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
    }
    Ok((o, e))
}

/// The console messages in Chromium's stderr log: `(message, is_network)`.
pub fn parse_console(stderr: &str) -> Vec<(String, bool)> {
    stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(|l| {
            let msg = l.split_once("] ").map(|x| x.1).unwrap_or(l);
            let msg = msg.strip_prefix('"').unwrap_or(msg);
            let msg = msg.rsplit_once("\", source:").map(|x| x.0).unwrap_or(msg).to_string();
            let net = msg.starts_with("Failed to load resource");
            (msg, net)
        })
        .collect()
}

/// Load `url` in headless Chromium: console errors, the DOM after scripts ran,
/// and a 1400×2400 screenshot written to `out_png`.
pub fn check_page(chromium: &Path, url: &str, out_png: &Path) -> Result<PageCheck> {
    let limit = Duration::from_secs(90);
    let profile = tempfile::tempdir().context("a temporary Chromium profile")?;
    let mut cmd = Command::new(chromium);
    cmd.args(base_args(profile.path())).args(["--enable-logging=stderr", "--v=0", "--dump-dom", url]);
    let (dom, stderr) = run(cmd, limit).with_context(|| format!("loading {url}"))?;
    let mut console_errors = Vec::new();
    let mut network_errors = Vec::new();
    for (m, net) in parse_console(&stderr) {
        if net {
            network_errors.push(m)
        } else {
            console_errors.push(m)
        }
    }
    let profile2 = tempfile::tempdir().context("a temporary Chromium profile")?;
    let mut cmd = Command::new(chromium);
    cmd.args(base_args(profile2.path())).args([
        "--window-size=1400,2400".to_string(),
        format!("--screenshot={}", out_png.display()),
        url.to_string(),
    ]);
    run(cmd, limit).with_context(|| format!("screenshot of {url}"))?;
    if !out_png.exists() {
        bail!("Chromium wrote no screenshot to {}", out_png.display());
    }
    Ok(PageCheck { console_errors, network_errors, dom })
}

/// Distinct colours in a PNG (up to `cap`): 1 means blank.
pub fn png_colours(path: &Path, cap: usize) -> Result<usize> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(f));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().with_context(|| format!("{} is not a PNG", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).with_context(|| format!("{}: bad PNG data", path.display()))?;
    let px = info.color_type.samples() * if info.bit_depth == png::BitDepth::Sixteen { 2 } else { 1 };
    let mut seen = std::collections::HashSet::new();
    for p in buf[..info.buffer_size()].chunks(px) {
        seen.insert(p.to_vec());
        if seen.len() >= cap {
            break;
        }
    }
    Ok(seen.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_are_parsed() {
        let log = "[1:1:1125/114815.237825:INFO:CONSOLE:1] \"my error\", source: file:///t.html (1)\n\
                   [1:1:1125/1:INFO:CONSOLE:0] \"Failed to load resource: the server responded with a status of 401 (Unauthorized)\", source: http://x/api (0)\n\
                   [1:1:1125/1:ERROR:dbus/bus.cc:405] Failed to connect to the bus\n";
        let c = parse_console(log);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], ("my error".to_string(), false));
        assert!(c[1].1 && c[1].0.contains("401"));
    }
}
