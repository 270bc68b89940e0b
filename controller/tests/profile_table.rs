//! The profile table: the validating loader (errors and warnings that name
//! file and line, good rows kept around bad ones), the monotone interpolator
//! across load and clock, the SLO queries, and the shipped profile.

use controller::profile::table::MONOTONE_TOLERANCE;
use controller::profile::{ProfileError, ProfileIssue, ProfileTable, Severity};
use proptest::prelude::*;
use std::path::Path;
use telemetry_core::ClassSlo;
use telemetry_core::{InstanceRole, RequestClass, CLASS_COUNT};

const HEADER: &str = "model,gpu,class,tp,clock_mhz,load_rps,load_tok_s,energy_per_req_j,power_per_gpu_w,\
ttft_p50_s,ttft_p99_s,tbt_p50_s,tbt_p99_s,requests,window_s";

/// Metadata lines of the test profiles (each class that has rows gets its unloaded latencies).
const META: [&str; 4] = [
    "# dynamollm-profile: 1",
    "# model: m",
    "# unloaded.SS: ttft_s=0.02 tbt_s=0.01",
    "# unloaded.SM: ttft_s=0.03 tbt_s=0.01",
];

/// One profile row's measured figures.
#[derive(Debug, Clone, Copy, PartialEq)]
struct R {
    class: &'static str,
    clock: u32,
    load: f64,
    energy: f64,
    power: f64,
    t50: f64,
    t99: f64,
    b50: f64,
    b99: f64,
}

impl R {
    fn csv(&self) -> String {
        format!(
            "m,g,{},8,{},{},{},{},{},{},{},{},{},100,60",
            self.class,
            self.clock,
            self.load,
            self.load * 500.0,
            self.energy,
            self.power,
            self.t50,
            self.t99,
            self.b50,
            self.b99
        )
    }
}

/// An SS row: `[energy, power, ttft p50, ttft p99, tbt p50, tbt p99]`.
fn ss(clock: u32, load: f64, v: [f64; 6]) -> R {
    let [energy, power, t50, t99, b50, b99] = v;
    R { class: "SS", clock, load, energy, power, t50, t99, b50, b99 }
}

/// SS on TP8 at 1980 MHz: four loads, everything rising.
fn top_curve() -> Vec<R> {
    vec![
        ss(1980, 1.0, [1000.0, 300.0, 0.030, 0.050, 0.010, 0.020]),
        ss(1980, 2.0, [600.0, 350.0, 0.035, 0.070, 0.011, 0.025]),
        ss(1980, 3.0, [500.0, 420.0, 0.040, 0.120, 0.013, 0.030]),
        ss(1980, 4.0, [480.0, 500.0, 0.060, 0.300, 0.020, 0.060]),
    ]
}

/// SS on TP8 at 1400 MHz: slower and cooler.
fn low_curve() -> Vec<R> {
    vec![
        ss(1400, 1.0, [900.0, 250.0, 0.040, 0.060, 0.014, 0.028]),
        ss(1400, 2.0, [520.0, 290.0, 0.046, 0.090, 0.015, 0.033]),
        ss(1400, 3.0, [430.0, 340.0, 0.055, 0.200, 0.019, 0.045]),
        ss(1400, 4.0, [410.0, 400.0, 0.090, 0.500, 0.030, 0.090]),
    ]
}

/// Profile text: `meta`, the header, then `body`; returns it with the file line of each body line.
fn doc(meta: &[&str], body: &[String]) -> (String, Vec<u64>) {
    let mut text: String = meta.iter().map(|l| format!("{l}\n")).collect();
    text.push_str(HEADER);
    text.push('\n');
    let first = meta.len() as u64 + 2;
    for l in body {
        text.push_str(l);
        text.push('\n');
    }
    (text, (0..body.len() as u64).map(|i| first + i).collect())
}

fn parse(text: &str) -> ProfileTable {
    ProfileTable::parse(text, Path::new("test.csv")).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(t: &ProfileTable) -> Vec<&ProfileIssue> {
    t.issues_of(Severity::Error).collect()
}

fn warnings(t: &ProfileTable) -> Vec<&ProfileIssue> {
    t.issues_of(Severity::Warning).collect()
}

const SS: RequestClass = RequestClass::ALL[0];

fn class(s: &str) -> RequestClass {
    RequestClass::parse(s).unwrap()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-300)
}

#[track_caller]
fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    assert!(close(got, want, rel), "{what}: got {got}, want {want} (rel {rel})");
}

/// The estimate at a row's own load and clock gives the row back.
#[track_caller]
fn assert_reproduces(t: &ProfileTable, r: &R) {
    let e = t.estimate(class(r.class), 8, r.clock, r.load).unwrap();
    let at = format!("{} {} MHz {} rps", r.class, r.clock, r.load);
    assert_close(&format!("{at} energy"), e.energy_per_req_j, r.energy, 1e-12);
    assert_close(&format!("{at} power"), e.power_per_gpu_w, r.power, 1e-12);
    assert_close(&format!("{at} ttft p50"), e.ttft_p50_s, r.t50, 1e-12);
    assert_close(&format!("{at} ttft p99"), e.ttft_p99_s, r.t99, 1e-12);
    assert_close(&format!("{at} tbt p50"), e.tbt_p50_s, r.b50, 1e-12);
    assert_close(&format!("{at} tbt p99"), e.tbt_p99_s, r.b99, 1e-12);
    assert!(!e.beyond_profile, "{at}");
}

#[test]
fn a_malformed_row_is_an_error_naming_file_and_line_and_keeps_the_rows_around_it() {
    let good = top_curve();
    let bad_rows: [(&str, String, &str); 6] = [
        ("non-numeric", good[1].csv().replace(",600,", ",six hundred,"), "`energy_per_req_j` is not a number"),
        ("negative", good[1].csv().replace(",350,", ",-350,"), "`power_per_gpu_w` must be a finite number ≥ 0"),
        ("unknown class", good[1].csv().replace(",SS,", ",XX,"), "unknown request class `XX`"),
        ("P99 < P50", ss(1980, 2.5, [550.0, 380.0, 0.05, 0.04, 0.012, 0.027]).csv(), "a P99 is below its P50"),
        ("too few columns", good[1].csv().rsplit_once(',').unwrap().0.to_string(), "unreadable row"),
        ("too many columns", format!("{},7", good[1].csv()), "unreadable row"),
    ];
    for (what, bad, says) in bad_rows {
        // Bad row in the middle, with good rows before and after it.
        let body = vec![good[0].csv(), good[2].csv(), bad, good[1].csv(), good[3].csv()];
        let (text, lines) = doc(&META, &body);
        let t = parse(&text);
        let errs = errors(&t);
        assert_eq!(errs.len(), 1, "{what}: {errs:?}");
        assert_eq!(errs[0].line, Some(lines[2]), "{what}: {}", errs[0]);
        let shown = errs[0].to_string();
        let prefix = format!("test.csv:{}: error: ", lines[2]);
        assert!(shown.starts_with(&prefix), "{what}: `{shown}` should start with `{prefix}`");
        assert!(shown.contains(says), "{what}: `{shown}` should say `{says}`");
        assert_eq!(t.rows.len(), 4, "{what}: the four good rows are kept");
        for r in &good {
            assert_reproduces(&t, r);
        }
    }
}

#[test]
fn line_numbers_count_comment_and_blank_lines_between_rows() {
    let good = top_curve();
    let bad = good[1].csv().replace(",SS,", ",XX,");
    let body = vec![good[0].csv(), "# a note in the middle".into(), String::new(), bad, good[1].csv()];
    let (text, lines) = doc(&META, &body);
    let t = parse(&text);
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].line, Some(lines[3]), "{}", errs[0]);
    assert_eq!(t.rows.len(), 2);
}

#[test]
fn a_stray_quote_does_not_swallow_the_rows_after_it() {
    let good = top_curve();
    let body = vec![good[0].csv(), "\"oops, a stray quote".into(), good[1].csv(), good[2].csv(), good[3].csv()];
    let (text, lines) = doc(&META, &body);
    let t = parse(&text);
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].line, Some(lines[1]), "{}", errs[0]);
    assert_eq!(t.rows.len(), 4);
    for r in &good {
        assert_reproduces(&t, r);
    }
}

#[test]
fn a_header_without_a_column_names_it_and_the_header_line() {
    let header = HEADER.replace(",tbt_p99_s", "");
    let text = format!("{}\n{}\n{}\n", META.join("\n"), header, top_curve()[0].csv());
    match ProfileTable::parse(&text, Path::new("test.csv")) {
        Err(e @ ProfileError::MissingColumn { .. }) => {
            let ProfileError::MissingColumn { line, ref column, .. } = e else { unreachable!() };
            assert_eq!(column, "tbt_p99_s");
            assert_eq!(line, META.len() as u64 + 1);
            let shown = e.to_string();
            assert!(shown.starts_with(&format!("test.csv:{}: header has no column `tbt_p99_s`", line)), "{shown}");
        }
        other => panic!("expected MissingColumn, got {other:?}"),
    }
}

#[test]
fn a_file_of_only_bad_rows_is_empty_and_says_why() {
    let good = top_curve();
    let body = vec![good[0].csv().replace(",SS,", ",QQ,"), good[1].csv().replace(",600,", ",x,")];
    let (text, lines) = doc(&META, &body);
    match ProfileTable::parse(&text, Path::new("test.csv")) {
        Err(e @ ProfileError::Empty { .. }) => {
            let ProfileError::Empty { errors, ref first, .. } = e else { unreachable!() };
            assert_eq!(errors, 2);
            assert!(first.starts_with(&format!("test.csv:{}: error: ", lines[0])), "{first}");
            assert!(e.to_string().contains("no usable rows"), "{e}");
        }
        other => panic!("expected Empty, got {other:?}"),
    }
    let (text, _) = doc(&META, &[]);
    assert!(matches!(ProfileTable::parse(&text, Path::new("test.csv")), Err(ProfileError::Empty { errors: 0, .. })));
}

#[test]
fn missing_classes_and_missing_unloaded_metadata_are_warnings() {
    let mut body: Vec<String> = top_curve().iter().map(R::csv).collect();
    // LL has rows but no `unloaded.LL` metadata.
    body.push(R { class: "LL", ..top_curve()[0] }.csv());
    body.push(R { class: "LL", ..top_curve()[1] }.csv());
    let meta = [META[0], META[1], META[2]];
    let (text, _) = doc(&meta, &body);
    let t = parse(&text);
    assert!(errors(&t).is_empty(), "{:?}", errors(&t));
    let warns: Vec<String> = warnings(&t).iter().map(|w| w.to_string()).collect();
    for c in RequestClass::ALL {
        let name = c.to_string();
        let missing = warns.iter().any(|w| w.contains(&format!("no rows for class {name};")));
        assert_eq!(missing, name != "SS" && name != "LL", "class {name}: {warns:#?}");
    }
    let ll = warns.iter().filter(|w| w.contains("`unloaded.LL`")).count();
    assert_eq!(ll, 1, "{warns:#?}");
    assert!(warns.iter().all(|w| w.starts_with("test.csv: warning: ")), "{warns:#?}");
    assert!(!warns.iter().any(|w| w.contains("unloaded.SS")), "{warns:#?}");
    // LL's SLO falls back to its lowest-load TP8 top-clock point.
    let u = t.unloaded(class("LL")).unwrap();
    assert_eq!((u.ttft_s, u.tbt_s), (top_curve()[0].t50, top_curve()[0].b50));
}

#[test]
fn non_monotone_data_warns_at_the_falling_row_and_the_interpolator_holds_the_running_max() {
    let mut rows = top_curve();
    // Power falls 10% at load 3 (beyond the tolerance); TTFT P99 falls 20% there too.
    rows[2].power = rows[1].power * 0.9;
    rows[2].t99 = rows[1].t99 * 0.8;
    // TBT P99 falls by less than the tolerance at load 3: no warning, still held.
    rows[2].b99 = rows[1].b99 * (1.0 - MONOTONE_TOLERANCE / 2.0);
    let body: Vec<String> = rows.iter().map(R::csv).collect();
    let (text, lines) = doc(&META, &body);
    let t = parse(&text);
    assert!(errors(&t).is_empty());
    let falls: Vec<&ProfileIssue> = warnings(&t).into_iter().filter(|w| w.line.is_some()).collect();
    assert_eq!(falls.len(), 2, "{falls:#?}");
    for (w, name) in falls.iter().zip(["power_per_gpu_w", "ttft_p99_s"]) {
        assert_eq!(w.line, Some(lines[2]));
        let shown = w.to_string();
        assert!(shown.starts_with(&format!("test.csv:{}: warning: {name} falls as load rises", lines[2])), "{shown}");
    }
    let e = t.estimate(SS, 8, 1980, 3.0).unwrap();
    assert_eq!(e.power_per_gpu_w, rows[1].power);
    assert_eq!(e.ttft_p99_s, rows[1].t99);
    assert_eq!(e.tbt_p99_s, rows[1].b99);
    // The row itself is kept as measured.
    assert_eq!(t.rows.len(), 4);
    assert!(t.rows.iter().any(|r| r.load_rps == 3.0 && r.power_per_gpu_w == rows[2].power));
    // Between the held point and the next, latencies rise from the held value.
    let mid = t.estimate(SS, 8, 1980, 3.5).unwrap();
    assert_close("held ttft p99 mid", mid.ttft_p99_s, (rows[1].t99 + rows[3].t99) / 2.0, 1e-12);
}

#[test]
fn a_duplicate_point_is_an_error_naming_both_lines() {
    let rows = top_curve();
    let dup = R { energy: 999.0, ..rows[1] };
    let body = vec![rows[0].csv(), rows[1].csv(), rows[2].csv(), dup.csv(), rows[3].csv()];
    let (text, lines) = doc(&META, &body);
    let t = parse(&text);
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let shown = errs[0].to_string();
    assert!(shown.starts_with(&format!("test.csv:{}: error: duplicate point", lines[3])), "{shown}");
    assert!(shown.contains(&format!("line {}", lines[1])), "{shown}");
    assert_eq!(t.rows.len(), 4);
    // The first one counts.
    assert_reproduces(&t, &rows[1]);
}

fn two_clock_table() -> (ProfileTable, Vec<R>) {
    let rows: Vec<R> = top_curve().into_iter().chain(low_curve()).collect();
    let body: Vec<String> = rows.iter().map(R::csv).collect();
    let (text, _) = doc(&META, &body);
    (parse(&text), rows)
}

#[test]
fn estimates_reproduce_rows_and_interpolate_linearly_in_load_and_clock() {
    let (t, rows) = two_clock_table();
    assert!(errors(&t).is_empty());
    for r in &rows {
        assert_reproduces(&t, r);
    }
    let (top, low) = (top_curve(), low_curve());
    // Between two loads: latencies and power linear, energy × load linear.
    for w in top.windows(2) {
        let (a, b) = (w[0], w[1]);
        let x = a.load + 0.3 * (b.load - a.load);
        let e = t.estimate(SS, 8, 1980, x).unwrap();
        let lin = |ya: f64, yb: f64| ya + 0.3 * (yb - ya);
        assert_close("ttft p50", e.ttft_p50_s, lin(a.t50, b.t50), 1e-12);
        assert_close("ttft p99", e.ttft_p99_s, lin(a.t99, b.t99), 1e-12);
        assert_close("tbt p50", e.tbt_p50_s, lin(a.b50, b.b50), 1e-12);
        assert_close("tbt p99", e.tbt_p99_s, lin(a.b99, b.b99), 1e-12);
        assert_close("power", e.power_per_gpu_w, lin(a.power, b.power), 1e-12);
        assert_close("power_w", e.power_w, 8.0 * lin(a.power, b.power), 1e-12);
        assert_close("energy rate", e.energy_per_req_j * x, lin(a.energy * a.load, b.energy * b.load), 1e-12);
    }
    // Between two profiled clocks: the linear mix of the two clocks' estimates.
    let clock = 1600;
    let w1 = (1600.0 - 1400.0) / (1980.0 - 1400.0);
    for load in [1.0, 2.5, 3.75] {
        let e = t.estimate(SS, 8, clock, load).unwrap();
        let lo = t.estimate(SS, 8, 1400, load).unwrap();
        let hi = t.estimate(SS, 8, 1980, load).unwrap();
        let mix = |a: f64, b: f64| (1.0 - w1) * a + w1 * b;
        assert_close("mix energy", e.energy_per_req_j, mix(lo.energy_per_req_j, hi.energy_per_req_j), 1e-12);
        assert_close("mix power", e.power_per_gpu_w, mix(lo.power_per_gpu_w, hi.power_per_gpu_w), 1e-12);
        assert_close("mix ttft p99", e.ttft_p99_s, mix(lo.ttft_p99_s, hi.ttft_p99_s), 1e-12);
        assert_close("mix tbt p99", e.tbt_p99_s, mix(lo.tbt_p99_s, hi.tbt_p99_s), 1e-12);
        assert_close("mix ttft p50", e.ttft_p50_s, mix(lo.ttft_p50_s, hi.ttft_p50_s), 1e-12);
    }
    // At a clock between the profiled ones on a profiled load, the mix of the two rows.
    let e = t.estimate(SS, 8, clock, 2.0).unwrap();
    assert_close("mix of rows", e.ttft_p99_s, (1.0 - w1) * low[1].t99 + w1 * top[1].t99, 1e-12);
    // Beyond the last load: flagged, never meets the SLO, figures of the last point.
    let last = top[3];
    let e = t.estimate(SS, 8, 1980, last.load * 1.5).unwrap();
    assert!(e.beyond_profile && !e.meets_slo, "{e:?}");
    assert_eq!(e.ttft_p99_s, last.t99);
    // Power goes on rising with the work (a pool may carry more per instance than one instance
    // alone): the curve's mean marginal power from its first to its last point, not the last power.
    let slope = (last.power - top[0].power) / (last.load - top[0].load);
    assert_close("power beyond", e.power_per_gpu_w, last.power + slope * 0.5 * last.load, 1e-12);
    assert_close("energy beyond", e.energy_per_req_j, 8.0 * e.power_per_gpu_w / (1.5 * last.load), 1e-12);
    assert!(e.energy_per_req_j < 8.0 * last.power / last.load, "more work shares the idle power: {e:?}");
    let mut generous = t.clone();
    generous.set_slos([ClassSlo { ttft_s: 100.0, tbt_s: 100.0 }; CLASS_COUNT]);
    let at_last = generous.estimate(SS, 8, 1980, last.load).unwrap();
    assert!(!at_last.beyond_profile && at_last.meets_slo, "{at_last:?}");
    let beyond = generous.estimate(SS, 8, 1980, last.load * 1.01).unwrap();
    assert!(beyond.beyond_profile && !beyond.meets_slo, "{beyond:?}");
    let mixed = generous.estimate(SS, 8, 1600, last.load * 1.01).unwrap();
    assert!(mixed.beyond_profile && !mixed.meets_slo, "{mixed:?}");
    // A configuration that was never profiled is an error naming it.
    let err = t.estimate(SS, 4, 1980, 1.0).unwrap_err();
    assert!(matches!(err, ProfileError::NotProfiled { tp: 4, .. }), "{err}");
    assert_eq!(err.to_string(), "the profile has no data for class SS at TP4");
}

#[test]
fn max_load_meeting_slo_finds_the_crossing() {
    let (mut t, _) = two_clock_table();
    let top = top_curve();
    let set = |t: &mut ProfileTable, ttft_s: f64, tbt_s: f64| t.set_slos([ClassSlo { ttft_s, tbt_s }; CLASS_COUNT]);
    // TTFT P99 crosses 0.1 between loads 2 and 3; TBT is loose.
    set(&mut t, 0.1, 1.0);
    let m = t.max_load_meeting_slo(SS, 8, 1980).unwrap();
    assert!(m > top[1].load && m < top[2].load, "{m}");
    let e = t.estimate(SS, 8, 1980, m).unwrap();
    assert_close("ttft p99 at the max load", e.ttft_p99_s, 0.1, 1e-9);
    assert!(t.estimate(SS, 8, 1980, m * 0.999).unwrap().meets_slo);
    assert!(!t.estimate(SS, 8, 1980, m * 1.001).unwrap().meets_slo);
    // TBT P99 crosses first: its bound is met exactly, TTFT stays inside.
    set(&mut t, 0.1, 0.027);
    let m2 = t.max_load_meeting_slo(SS, 8, 1980).unwrap();
    assert!(m2 < m, "{m2} < {m}");
    let e = t.estimate(SS, 8, 1980, m2).unwrap();
    assert_close("tbt p99 at the max load", e.tbt_p99_s, 0.027, 1e-9);
    assert!(e.ttft_p99_s < 0.1);
    // The first point already fails: 0.
    set(&mut t, top[0].t99 * 0.99, 1.0);
    assert_eq!(t.max_load_meeting_slo(SS, 8, 1980).unwrap(), 0.0);
    // Nothing fails: the last profiled load.
    set(&mut t, 10.0, 10.0);
    assert_eq!(t.max_load_meeting_slo(SS, 8, 1980).unwrap(), top[3].load);
    // A slower clock carries less under the same SLO.
    set(&mut t, 0.1, 1.0);
    assert!(t.max_load_meeting_slo(SS, 8, 1400).unwrap() < m);
}

/// A random curve: loads rising, each metric a walk that mostly rises but may fall.
fn curve_strategy() -> impl Strategy<Value = Vec<(f64, [f64; 6])>> {
    prop::collection::vec((0.05f64..2.0, prop::array::uniform6(-0.1f64..0.6)), 2..9).prop_map(|steps| {
        let mut load = 0.0;
        let mut v = [800.0, 250.0, 0.03, 0.05, 0.01, 0.02];
        steps
            .into_iter()
            .map(|(dl, dv)| {
                load += dl;
                for k in 0..6 {
                    v[k] *= 1.0 + dv[k];
                }
                // Keep P99 ≥ P50 as the loader demands.
                v[3] = v[3].max(v[2]);
                v[5] = v[5].max(v[4]);
                (round6(load), v.map(round6))
            })
            .collect()
    })
}

fn round6(x: f64) -> f64 {
    format!("{x:.6e}").parse().unwrap()
}

fn curve_rows(clock: u32, c: &[(f64, [f64; 6])]) -> Vec<R> {
    c.iter().map(|&(load, v)| ss(clock, load, v)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(20251125), ..ProptestConfig::default() })]

    #[test]
    fn estimates_never_fall_as_load_rises(hi in curve_strategy(), lo in curve_strategy()) {
        let rows: Vec<R> = curve_rows(1980, &hi).into_iter().chain(curve_rows(1400, &lo)).collect();
        let body: Vec<String> = rows.iter().map(R::csv).collect();
        let (text, _) = doc(&META, &body);
        let t = parse(&text);
        prop_assert!(errors(&t).is_empty(), "{:?}", errors(&t));
        let max = hi.last().unwrap().0.max(lo.last().unwrap().0) * 1.3;
        for clock in [1400, 1700, 1980] {
            let mut prev = t.estimate(SS, 8, clock, 0.0).unwrap();
            for k in 1..=200 {
                let e = t.estimate(SS, 8, clock, max * f64::from(k) / 200.0).unwrap();
                let figures = [
                    ("power", prev.power_per_gpu_w, e.power_per_gpu_w),
                    ("ttft p50", prev.ttft_p50_s, e.ttft_p50_s),
                    ("ttft p99", prev.ttft_p99_s, e.ttft_p99_s),
                    ("tbt p50", prev.tbt_p50_s, e.tbt_p50_s),
                    ("tbt p99", prev.tbt_p99_s, e.tbt_p99_s),
                ];
                for (name, before, now) in figures {
                    prop_assert!(now >= before * (1.0 - 1e-12), "{clock} MHz step {k}: {name} fell {before} → {now}");
                }
                prev = e;
            }
        }
    }

    #[test]
    fn garbage_lines_never_panic_nor_drop_good_rows(
        hi in curve_strategy(),
        garbage in prop::collection::vec((0usize..20, prop_oneof!["[^\r\n]{0,60}", "[0-9a-zA-Z,.\"# -]{0,60}"]), 1..8),
    ) {
        let rows = curve_rows(1980, &hi);
        let mut body: Vec<String> = rows.iter().map(R::csv).collect();
        for (at, g) in &garbage {
            let at = at % (body.len() + 1);
            body.insert(at, g.clone());
        }
        let (text, lines) = doc(&META, &body);
        let t = parse(&text);
        prop_assert_eq!(t.rows.len(), rows.len(), "{:#?}", t.issues);
        // Every error names the line of a garbage line.
        let garbage_lines: Vec<u64> =
            body.iter().zip(&lines).filter(|(l, _)| !rows.iter().any(|r| r.csv() == **l)).map(|(_, n)| *n).collect();
        for e in errors(&t) {
            prop_assert!(e.line.is_some_and(|l| garbage_lines.contains(&l)), "{} is not on a garbage line", e);
        }
        for r in &rows {
            prop_assert!(
                t.rows.iter().any(|x| x.load_rps == r.load && x.energy_per_req_j == r.energy && x.tbt_p99_s == r.b99),
                "row at {} lost: {:#?}", r.load, t.issues
            );
        }
    }
}

#[test]
fn the_shipped_profile_is_clean_complete_and_reproduced_by_its_estimates() {
    let t = ProfileTable::bundled();
    let errs = errors(&t);
    assert!(errs.is_empty(), "{errs:#?}");
    assert_eq!(t.classes(), RequestClass::ALL.to_vec());
    let clocks = vec![800, 1000, 1200, 1400, 1600, 1800, 1980];
    for c in RequestClass::ALL {
        assert_eq!(t.tps(c), vec![2, 4, 8], "{c}");
        for tp in [2, 4, 8] {
            assert_eq!(t.clocks(c, tp), clocks, "{c} TP{tp}");
            let fast = t.max_load_meeting_slo(c, tp, 1980).unwrap();
            let slow = t.max_load_meeting_slo(c, tp, 800).unwrap();
            assert!(fast >= slow, "{c} TP{tp}: {fast} req/s at 1980 MHz < {slow} at 800 MHz");
        }
        assert!(t.unloaded(c).is_some(), "{c}");
    }
    // Every row: energy exactly; latencies and power exactly where the data
    // rises, else the running maximum (the monotone envelope).
    let mut rows = t.rows.clone();
    rows.sort_by(|a, b| {
        (a.class.index(), a.tp, a.clock_mhz)
            .cmp(&(b.class.index(), b.tp, b.clock_mhz))
            .then(a.load_rps.total_cmp(&b.load_rps))
    });
    let mut held = 0;
    let mut run = [0.0f64; 5];
    for (k, r) in rows.iter().enumerate() {
        let first = k == 0 || {
            let p = &rows[k - 1];
            (p.class, p.tp, p.clock_mhz) != (r.class, r.tp, r.clock_mhz)
        };
        let v = [r.power_per_gpu_w, r.ttft_p50_s, r.ttft_p99_s, r.tbt_p50_s, r.tbt_p99_s];
        for i in 0..5 {
            run[i] = if first { v[i] } else { run[i].max(v[i]) };
        }
        if run != v {
            held += 1;
        }
        let e = t.estimate(r.class, r.tp, r.clock_mhz, r.load_rps).unwrap();
        let at = format!("{} TP{} {} MHz {} rps", r.class, r.tp, r.clock_mhz, r.load_rps);
        assert_close(&format!("{at} energy"), e.energy_per_req_j, r.energy_per_req_j, 1e-12);
        assert_close(&format!("{at} power"), e.power_per_gpu_w, run[0], 1e-12);
        assert_close(&format!("{at} ttft p50"), e.ttft_p50_s, run[1], 1e-12);
        assert_close(&format!("{at} ttft p99"), e.ttft_p99_s, run[2], 1e-12);
        assert_close(&format!("{at} tbt p50"), e.tbt_p50_s, run[3], 1e-12);
        assert_close(&format!("{at} tbt p99"), e.tbt_p99_s, run[4], 1e-12);
    }
    eprintln!("shipped profile: {} rows; {held} hold an earlier (higher) latency or power", rows.len());
}

/// A table may say which role each measured instance served (an optional `role` column, last or
/// anywhere): colocated rows are what the planner interpolates, exactly as in a table without the
/// column; prefill- and decode-role rows are kept aside; an unknown role is an error naming its
/// line, and the rows around it stay.
#[test]
fn a_role_column_keeps_phase_rows_aside_and_names_a_bad_role() {
    let good = top_curve();
    let plain = parse(&doc(&META, &good.iter().map(R::csv).collect::<Vec<_>>()).0);
    let mut text: String = META.iter().map(|l| format!("{l}\n")).collect();
    text.push_str(&format!("{HEADER},role\n"));
    let first = META.len() as u64 + 2;
    let mut body: Vec<String> = good.iter().map(|r| format!("{},colocated", r.csv())).collect();
    body.insert(1, format!("{},prefill", ss(1980, 2.0, [300.0, 650.0, 0.02, 0.04, 0.0, 0.0]).csv()));
    body.insert(3, format!("{},decode", ss(1980, 2.0, [400.0, 250.0, 0.0, 0.0, 0.011, 0.02]).csv()));
    body.insert(5, format!("{},Prefill", good[1].csv()));
    for l in &body {
        text.push_str(l);
        text.push('\n');
    }
    let t = parse(&text);
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].line, Some(first + 5));
    assert!(errs[0].to_string().contains("`role`: unknown role `Prefill`"), "{}", errs[0]);
    assert_eq!(t.rows, plain.rows, "the colocated rows are the table without the column");
    for r in &good {
        assert_reproduces(&t, r);
    }
    let roles: Vec<InstanceRole> = t.role_rows.iter().map(|r| r.role).collect();
    assert_eq!(roles, [InstanceRole::Prefill, InstanceRole::Decode]);
    assert!(plain.role_rows.is_empty() && plain.rows.iter().all(|r| r.role == InstanceRole::Colocated));
    // Phase rows alone give the planner nothing to plan with.
    let only: String = format!(
        "{}{HEADER},role\n{},decode\n",
        META.iter().map(|l| format!("{l}\n")).collect::<String>(),
        good[0].csv()
    );
    match ProfileTable::parse(&only, Path::new("test.csv")) {
        Err(e @ ProfileError::Empty { .. }) => assert!(e.to_string().contains("no colocated ones"), "{e}"),
        other => panic!("expected an empty-table error, got {:?}", other.map(|t| t.rows.len())),
    }
}
