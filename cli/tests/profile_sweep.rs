//! `dynamollm profile` on the twin (virtual time) through the real binary:
//! resuming, explicit loads, the adaptive grid, held-out accuracy, and flag
//! errors. Sweeps are tiny (one class, TP8, two clocks, short windows).

use dynamollm::profile::sweep::BASE_GRID;
use dynamollm::profile::ProfileTable;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn dynamollm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynamollm")).args(args).output().expect("the binary runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("profile_sweep").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const SMALL: [&str; 12] = [
    "--target",
    "twin",
    "--classes",
    "SS",
    "--tp",
    "8",
    "--clocks",
    "1400,1980",
    "--min-requests",
    "300",
    "--window-s",
    "30",
];

fn profile(extra: &[&str], out: &Path) -> Output {
    let mut args = vec!["profile"];
    args.extend(SMALL);
    args.extend(extra);
    args.extend(["--quiet", "--out", out.to_str().unwrap()]);
    dynamollm(&args)
}

/// `profile: M points measured, R resumed, N rows in …` → (M, R, N).
fn summary(out: &Output) -> (usize, usize, usize) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profile failed: {err}");
    let line = err.lines().find(|l| l.starts_with("profile: ")).unwrap_or_else(|| panic!("no summary in {err}"));
    let n: Vec<usize> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(n.len() >= 3, "{line}");
    (n[0], n[1], n[2])
}

/// The data rows of a profile file (after the metadata and the header), as text.
fn data_rows(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter(|l| !l.starts_with('#')).skip(1).map(str::to_string).collect()
}

/// The adaptive sweep of SS on TP8 at 1400 and 1980 MHz, made once for the tests that read it.
fn adaptive_sweep() -> &'static (PathBuf, (usize, usize, usize)) {
    static SWEEP: OnceLock<(PathBuf, (usize, usize, usize))> = OnceLock::new();
    SWEEP.get_or_init(|| {
        let out = scratch("adaptive").join("ss.csv");
        let s = summary(&profile(&[], &out));
        (out, s)
    })
}

#[test]
fn a_resumed_sweep_measures_only_what_is_missing_and_ends_with_the_same_rows() {
    let (first, (measured, resumed, rows)) = adaptive_sweep();
    assert_eq!((*measured, *resumed), (*rows, 0));
    let want = data_rows(first);
    assert_eq!(want.len(), *rows);
    // Cut the file after a few rows and leave half of the next one, as a killed run would.
    let keep = 5;
    let text = std::fs::read_to_string(first).unwrap();
    let meta: Vec<&str> = text.lines().take_while(|l| l.starts_with('#')).collect();
    let header = text.lines().find(|l| !l.starts_with('#')).unwrap();
    let mut cut = meta.join("\n") + "\n" + header + "\n";
    for r in &want[..keep] {
        cut.push_str(r);
        cut.push('\n');
    }
    cut.push_str(&want[keep][..want[keep].len() / 2]);
    let out = scratch("resume").join("ss.csv");
    std::fs::write(&out, cut).unwrap();
    let (m2, r2, n2) = summary(&profile(&[], &out));
    assert_eq!(r2, keep, "resumed");
    assert_eq!(m2, want.len() - keep, "measured");
    assert_eq!(n2, want.len());
    // Same seed, same points, same numbers; the half-written line is gone.
    let mut got = data_rows(&out);
    let mut want = want.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(ProfileTable::load(&out).unwrap().issues_of(dynamollm::profile::Severity::Error).next().is_none());
}

#[test]
fn explicit_loads_are_measured_exactly_at_each_clock() {
    let out = scratch("loads").join("ss.csv");
    let (measured, resumed, rows) = summary(&profile(&["--loads", "0.5,1.5,3"], &out));
    assert_eq!((measured, resumed, rows), (6, 0, 6));
    let t = ProfileTable::load(&out).unwrap();
    let mut got: Vec<(u32, f64)> = t.rows.iter().map(|r| (r.clock_mhz, r.load_rps)).collect();
    got.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    assert_eq!(got, vec![(1400, 0.5), (1400, 1.5), (1400, 3.0), (1980, 0.5), (1980, 1.5), (1980, 3.0)]);
    for r in &t.rows {
        assert!(r.requests > 0 && r.energy_per_req_j > 0.0 && r.ttft_p99_s >= r.ttft_p50_s, "{r:?}");
    }
    // Measured again: nothing left to do.
    assert_eq!(summary(&profile(&["--loads", "0.5,1.5,3"], &out)), (0, 6, 6));
}

#[test]
fn the_adaptive_grid_refines_where_interpolation_misses_and_most_where_power_rises_steeply() {
    let (path, _) = adaptive_sweep();
    let t = ProfileTable::load(path).unwrap();
    let ss = t.classes()[0];
    let slo = t.slos()[ss.index()];
    let tol = 0.02; // the default --refine-tolerance
                    // At 1400 MHz every load is a base-grid fraction of the top-clock capacity
                    // or a refinement midpoint (the capacity probe runs at the top clock only).
                    // The lowest is the first fraction.
    let rows: Vec<_> = {
        let mut r: Vec<_> = t.rows.iter().filter(|r| r.clock_mhz == 1400).collect();
        r.sort_by(|a, b| a.load_rps.total_cmp(&b.load_rps));
        r
    };
    let loads: Vec<f64> = rows.iter().map(|r| r.load_rps).collect();
    let cap = loads[0] / BASE_GRID[0];
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-5 * a.abs().max(b.abs());
    let at = |l: f64| rows.iter().find(|r| near(r.load_rps, l)).copied();
    let base: Vec<f64> = loads.iter().copied().filter(|&l| BASE_GRID.iter().any(|f| near(f * cap, l))).collect();
    let refined: Vec<f64> = loads.iter().copied().filter(|l| !base.contains(l)).collect();
    eprintln!("1400 MHz: capacity {cap:.4} req/s, {} base loads, {} refined: {loads:?}", base.len(), refined.len());
    assert!(base.len() >= 3, "{base:?}");
    assert!(!refined.is_empty(), "the refinement added no point: {loads:?}");
    // Every refined load halves an interval between two other loads of the grid.
    for &m in &refined {
        let halves = loads.iter().any(|&a| loads.iter().any(|&b| a < m && m < b && near((a + b) / 2.0, m)));
        assert!(halves, "{m} halves no interval of {loads:?}");
    }
    // The grid stops just past the SLO: its last point misses it.
    let last = rows.last().unwrap();
    assert!(last.ttft_p99_s > slo.ttft_s || last.tbt_p99_s > slo.tbt_s, "{last:?} meets {slo:?}");
    // The refinement rule, interval by interval: a base interval's midpoint is
    // measured; the quarter points are measured exactly when linear
    // interpolation misses the midpoint's power, energy rate or P99s by more
    // than the tolerance.
    let meets = |r: &dynamollm::profile::ProfileRow| r.ttft_p99_s <= slo.ttft_s && r.tbt_p99_s <= slo.tbt_s;
    let mut judged = 0;
    let mut steepest = (0.0f64, 0.0, 0.0);
    for w in base.windows(2) {
        let (a, b) = (at(w[0]).unwrap(), at(w[1]).unwrap());
        if !meets(a) && !meets(b) {
            continue;
        }
        let slope = (b.power_per_gpu_w - a.power_per_gpu_w) / (b.load_rps - a.load_rps);
        if slope > steepest.0 {
            steepest = (slope, a.load_rps, b.load_rps);
        }
        let mid = (a.load_rps + b.load_rps) / 2.0;
        let m = at(mid).unwrap_or_else(|| panic!("midpoint {mid} of [{}, {}] not measured", a.load_rps, b.load_rps));
        let miss = |fa: f64, fb: f64, fm: f64| ((fa + fb) / 2.0 - fm).abs() / fm.abs();
        let worst = [
            miss(a.power_per_gpu_w, b.power_per_gpu_w, m.power_per_gpu_w),
            miss(a.energy_per_req_j * a.load_rps, b.energy_per_req_j * b.load_rps, m.energy_per_req_j * mid),
            miss(a.ttft_p99_s, b.ttft_p99_s, m.ttft_p99_s),
            miss(a.tbt_p99_s, b.tbt_p99_s, m.tbt_p99_s),
        ]
        .into_iter()
        .fold(0.0, f64::max);
        if (worst - tol).abs() < 1e-3 {
            continue; // too close to call from six-digit figures
        }
        // (A half past the SLO at both ends is never refined.)
        let quarters = [(a.load_rps + mid) / 2.0, (mid + b.load_rps) / 2.0].map(|q| at(q).is_some());
        let want = [worst > tol && (meets(a) || meets(m)), worst > tol && (meets(m) || meets(b))];
        assert_eq!(quarters, want, "[{}, {}]: midpoint miss {worst:.4}", a.load_rps, b.load_rps);
        judged += 1;
    }
    assert!(judged >= 3, "{judged}");
    // Power rises most steeply between the first two base loads (batching
    // fills the idle GPUs); that interval is refined to the finest spacing of the grid.
    let (_, lo, hi) = steepest;
    let inside = loads.iter().filter(|&&l| l > lo && l < hi).count();
    let finest = loads.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min);
    eprintln!("steepest power: [{lo}, {hi}] req/s, {inside} points inside; finest gap {finest:.4} req/s");
    assert_eq!(inside, 3, "the steepest interval [{lo}, {hi}] is not refined to depth 2: {loads:?}");
    assert!(near((hi - lo) / 4.0, finest), "finest gap {finest} is not in the steepest interval [{lo}, {hi}]");
}

#[test]
fn held_out_loads_are_predicted_within_ten_percent() {
    let (path, _) = adaptive_sweep();
    let json = scratch("accuracy").join("acc.json");
    let out = dynamollm(&[
        "twin",
        "accuracy",
        "--profile",
        path.to_str().unwrap(),
        "--min-requests",
        "300",
        "--window-s",
        "30",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let all = &v["mape"]["all"];
    let points = all["points"].as_u64().unwrap();
    assert!(points >= 5, "{all}");
    assert_eq!(v["points"].as_array().unwrap().len() as u64, points);
    eprintln!("held-out MAPE over {points} points: {all}");
    for k in ["energy_per_req_pct", "ttft_p99_pct", "tbt_p99_pct"] {
        let m = all[k].as_f64().unwrap();
        assert!(m.is_finite() && m <= 10.0, "{k} = {m}% > 10%: {all}");
    }
}

#[test]
fn bad_flags_exit_2_with_a_clear_message() {
    let dir = scratch("flags");
    let out = dir.join("x.csv");
    let o = out.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 3] = [
        (vec!["--clocks", "800:x:100", "--tp", "8"], "`x` in clock range `800:x:100` is not a number"),
        (vec!["--clocks", "1980", "--tp", "3"], "TP3 is not valid"),
        (vec!["--target", "http://127.0.0.1:1", "--tp", "8", "--clocks", "1980"], "http://127.0.0.1:1/v1/models"),
    ];
    for (args, says) in cases {
        let mut a = vec!["profile", "--classes", "SS", "--quiet", "--out", o];
        a.extend(&args);
        let r = dynamollm(&a);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: `{err}` should say `{says}`");
        assert!(err.starts_with("error: "), "{err}");
    }
    // Nothing was written by the failures.
    assert!(!out.exists());
}
