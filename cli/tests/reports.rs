//! `dynamollm sim --report` and `dynamollm report`: the HTML report loads in
//! headless Chromium with no console errors, shows its charts, and carries
//! the same key figures as the JSON and CSV reports.

use dashboards::browser::{check_page, chromium_from_env, png_colours};
use dashboards::report::{figure_text, id_of};
use std::process::Command;

fn dynamollm(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamollm")).args(args).output().expect("the binary runs");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The `data-value` and text of the element with this id in a DOM.
fn figure(dom: &str, id: &str) -> Option<(f64, String)> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let v = rest.split_once("data-value=\"")?.1.split_once('"')?.0.parse().ok()?;
    let text = rest.split_once('>')?.1.split_once('<')?.0.to_string();
    Some((v, text))
}

fn check_figures(dom: &str, json: &serde_json::Value, with_ratios: bool) {
    let runs = json["runs"].as_array().unwrap();
    assert!(!runs.is_empty());
    for r in runs {
        let id = id_of(r["policy"].as_str().unwrap());
        let mut keys = vec![
            ("energy-kwh", &r["energy_kwh"]),
            ("carbon-kg", &r["carbon_kg"]),
            ("cost-usd", &r["cost_usd"]),
            ("slo-attainment", &r["slo_attainment"]),
        ];
        if with_ratios {
            keys.push(("energy-ratio", &r["vs_baseline"]["energy_ratio"]));
            keys.push(("carbon-ratio", &r["vs_baseline"]["carbon_ratio"]));
            keys.push(("cost-ratio", &r["vs_baseline"]["cost_ratio"]));
        }
        for (name, want) in keys {
            let want = want.as_f64().unwrap_or_else(|| panic!("{name} of {id} in the JSON"));
            let (v, text) = figure(dom, &format!("{name}-{id}")).unwrap_or_else(|| panic!("#{name}-{id} in the page"));
            assert!((v - want).abs() <= 1e-12 * want.abs().max(1.0), "{name}-{id}: page {v}, JSON {want}");
            assert_eq!(text, figure_text(want), "{name}-{id}");
        }
    }
}

#[test]
fn a_compare_runs_report_loads_clean_and_matches_its_json_and_csv() {
    let chromium = chromium_from_env();
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    let json = dir.path().join("report.json");
    let csv = dir.path().join("report.csv");
    let base =
        ["sim", "--compare", "single-pool,dynamollm", "--hours", "0.15", "--instances", "2", "--quiet", "--report"];
    let sim_json = dir.path().join("sim.json");
    for out in [&html, &json, &csv] {
        let mut a: Vec<&str> = base.to_vec();
        a.push(out.to_str().unwrap());
        a.extend(["--json", sim_json.to_str().unwrap()]);
        let o = dynamollm(&a);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("× single-pool"), "{stdout}");
    }
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("<script src"), "self-contained");
    // The hour-by-hour chart has a line per policy and the 99% line to read them against.
    let hourly = &page[page.find("id=\"chart-slo-hourly\"").expect("the hourly SLO chart")..];
    let hourly = &hourly[..hourly.find("</svg>").unwrap()];
    for name in ["single-pool", "dynamollm", "P99 SLO (99%)"] {
        assert!(hourly.contains(name), "{name} in the hourly chart");
    }
    let png = dir.path().join("report.png");
    let c = check_page(&chromium, &format!("file://{}", html.display()), &png).unwrap();
    assert!(
        c.console_errors.is_empty() && c.network_errors.is_empty(),
        "{:?} {:?}",
        c.console_errors,
        c.network_errors
    );
    for chart in [
        "chart-power",
        "chart-gpus",
        "chart-clocks",
        "chart-savings",
        "chart-class-energy",
        "chart-class-slo",
        "chart-slo-hourly",
        "chart-power-dynamollm",
        "chart-clocks-single-pool",
    ] {
        assert!(c.dom.contains(&format!("id=\"{chart}\"")), "{chart}");
    }
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["baseline"], "single-pool");
    assert_eq!(j["runs"].as_array().unwrap().len(), 2);
    check_figures(&c.dom, &j, true);
    // The timeline adds up to the sim's own totals.
    let sim: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sim_json).unwrap()).unwrap();
    for (r, s) in j["runs"].as_array().unwrap().iter().zip(sim["runs"].as_array().unwrap()) {
        assert_eq!(r["policy"], s["policy"]);
        for (a, b) in [
            ("energy_kwh", "energy_kwh"),
            ("gpu_hours", "gpu_hours"),
            ("requests", "requests_total"),
            ("cost_usd", "cost_usd"),
            ("carbon_kg", "carbon_kg"),
        ] {
            let (x, y) = (r[a].as_f64().unwrap(), s[b].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{a}: report {x}, sim {y}");
        }
    }
    // The CSV's totals rows carry the same figures.
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut rows = csv::Reader::from_reader(text.as_bytes());
    let header = rows.headers().unwrap().clone();
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let mut seen = 0;
    for row in rows.records() {
        let row = row.unwrap();
        if &row[1] != "all" {
            continue;
        }
        let r = j["runs"].as_array().unwrap().iter().find(|r| r["policy"] == row[0]).unwrap();
        for k in ["energy_kwh", "carbon_kg", "cost_usd"] {
            let v: f64 = row[col(k)].parse().unwrap();
            assert!((v - r[k].as_f64().unwrap()).abs() < 1e-12 * v.abs().max(1.0), "{k}");
        }
        let v: f64 = row[col("carbon_ratio")].parse().unwrap();
        assert!((v - r["vs_baseline"]["carbon_ratio"].as_f64().unwrap()).abs() < 1e-12);
        seen += 1;
    }
    assert_eq!(seen, 2);
    // The screenshot shows the page (not one colour: charts in several colours).
    assert!(png_colours(&png, 256).unwrap() > 16, "the screenshot looks blank");
}

#[test]
fn a_baseline_that_did_not_run_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamollm"))
        .args(["sim", "--policy", "dynamollm", "--hours", "0.05", "--baseline", "single-pool", "--report", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--baseline single-pool did not run"), "{err}");
}

#[test]
fn a_report_from_the_store_estimates_single_pool() {
    use telemetry::sample::{ArrivalSample, GpuSample, Sample, Tags};
    use telemetry::store::{Retention, Store};
    let dir = tempfile::tempdir().unwrap();
    let t0_ms: i64 = 1_715_600_000_000 / 60_000 * 60_000; // minute-aligned
    {
        let store = Store::open(dir.path(), Retention::default()).unwrap();
        let mut points = Vec::new();
        // 8 GPUs of pool `SS` at 400 W and 1500 MHz for 10 minutes, a reading every 10 s.
        for g in 0..8u32 {
            for k in 0..60 {
                let s = Sample::Gpu(GpuSample {
                    ts_ms: t0_ms + k * 10_000,
                    tags: Tags { gpu: Some(g), pool: Some("SS".into()), ..Tags::node("s", "n") },
                    power_w: 400.0,
                    energy_j: None,
                    sm_clock_mhz: Some(1500),
                    util: None,
                    temperature_c: None,
                    throttle_reasons: None,
                });
                points.extend(s.points());
            }
        }
        for m in 0..10 {
            let s = Sample::Arrivals(ArrivalSample {
                ts_ms: t0_ms + m * 60_000,
                tags: Tags { class: Some(telemetry::RequestClass::parse("SS").unwrap()), ..Tags::node("s", "n") },
                requests: 60.0,
                tokens: 60.0 * 300.0,
            });
            points.extend(s.points());
        }
        store.write(&points).unwrap();
    }
    let out = dir.path().join("r.json");
    let (from, to) = ((t0_ms / 1000).to_string(), (t0_ms / 1000 + 600).to_string());
    dynamollm(&[
        "report",
        "--store",
        dir.path().to_str().unwrap(),
        "--from",
        &from,
        "--to",
        &to,
        "--baseline",
        "single-pool",
        "--format",
        "json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let obs = &j["runs"][0];
    assert_eq!(obs["policy"], "observed");
    // 8 × 400 W × 600 s = 1.92 MJ = 0.5333 kWh; 8 GPUs × 10 min = 1.3333 GPU-h.
    assert!((obs["energy_kwh"].as_f64().unwrap() - 1.92e6 / 3.6e6).abs() < 1e-9, "{obs}");
    assert!((obs["gpu_hours"].as_f64().unwrap() - 8.0 / 6.0).abs() < 1e-9);
    assert_eq!(obs["requests"], 600.0);
    let base = &j["runs"][1];
    assert_eq!(base["policy"], "single-pool");
    assert!((base["gpu_hours"].as_f64().unwrap() - 8.0 / 6.0).abs() < 1e-9, "one TP8 instance");
    assert!(base["energy_kwh"].as_f64().unwrap() > 0.0);
    assert!(obs["vs_baseline"]["carbon_ratio"].as_f64().unwrap() > 0.0);
    // HTML from the store loads clean too.
    let html = dir.path().join("r.html");
    dynamollm(&[
        "report",
        "--store",
        dir.path().to_str().unwrap(),
        "--from",
        &from,
        "--to",
        &to,
        "--format",
        "html",
        "--out",
        html.to_str().unwrap(),
    ]);
    let c = check_page(&chromium_from_env(), &format!("file://{}", html.display()), &dir.path().join("r.png")).unwrap();
    assert!(c.console_errors.is_empty(), "{:?}", c.console_errors);
    assert!(figure(&c.dom, "energy-kwh-observed").is_some());
    assert!(!c.dom.contains("chart-slo-hourly"), "the store has no SLO attainment to chart");
}

/// A run that holds its SLOs overall but misses one class's P99 SLO is
/// marked in the report's key figures, its worst class beside the overall
/// figure (the overall 99% hid a class at 98%), in the HTML and the JSON;
/// a run that holds every class is not marked.
#[test]
fn a_run_that_misses_a_class_is_marked_beside_its_overall_attainment() {
    let dir = tempfile::tempdir().unwrap();
    for (instances, misses) in [("1", true), ("6", false)] {
        let html = dir.path().join(format!("r{instances}.html"));
        let json = dir.path().join(format!("r{instances}.json"));
        for out in [&html, &json] {
            let a = ["sim", "--instances", instances, "--hours", "0.1", "--quiet", "--report", out.to_str().unwrap()];
            dynamollm(&a);
        }
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let run = &v["runs"][0];
        assert_eq!(run["misses_slo"], misses, "{instances} instances: {run}");
        let (worst_class, worst) = (run["worst_class"][0].as_str().unwrap(), run["worst_class"][1].as_f64().unwrap());
        assert_eq!(worst < 0.99, misses, "{worst_class} at {worst}");
        let page = std::fs::read_to_string(&html).unwrap();
        let row = &page[page.find("id=\"key-figures\"").unwrap()..];
        let row = &row[..row.find("</table>").unwrap()];
        let (v, text) = figure(row, "worst-class-single-pool").expect("a worst-class cell");
        assert!((v - worst).abs() < 1e-12, "{v} vs {worst}");
        assert!(text.starts_with(worst_class), "{text}");
        assert_eq!(text.contains("misses its P99 SLO"), misses, "{text}");
        assert_eq!(row.contains("class=\"misses-slo\""), misses, "{row}");
    }
}

/// `sim --intensity` swaps the carbon intensity series and nothing else: a constant
/// 500 g/kWh series gives 500 g per facility kWh plus the same embodied carbon.
#[test]
fn sim_json_prices_carbon_with_the_intensity_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let series = dir.path().join("flat.csv");
    std::fs::write(&series, "time,g_co2e_per_kwh,signal\n2024-04-01T00:00:00Z,500,average\n").unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let json = dir.path().join("sim.json");
        let mut a = vec!["sim", "--policy", "single-pool", "--hours", "0.1", "--instances", "2", "--quiet"];
        a.extend(extra);
        a.extend(["--json", json.to_str().unwrap()]);
        dynamollm(&a);
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    let bundled = run(&[]);
    let flat = run(&["--intensity", series.to_str().unwrap()]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    assert_eq!(f(&bundled, "energy_kwh"), f(&flat, "energy_kwh"));
    assert_eq!(f(&bundled, "cost_usd"), f(&flat, "cost_usd"));
    assert!(f(&bundled, "peak_power_w") > 0.0 && f(&bundled, "peak_power_w") <= 16.0 * 700.0);
    // Mean power below the peak.
    assert!(f(&bundled, "energy_kwh") * 3.6e6 / f(&bundled, "duration_s") < f(&bundled, "peak_power_w"));
    // The difference of the two runs' carbon is all operational: (500 − the bundled mean) g per kWh.
    let report = dir.path().join("r.json");
    let flat_report: serde_json::Value = {
        dynamollm(&[
            "sim",
            "--policy",
            "single-pool",
            "--hours",
            "0.1",
            "--instances",
            "2",
            "--quiet",
            "--intensity",
            series.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ]);
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
    };
    let r = &flat_report["runs"][0];
    let operational = f(r, "carbon_operational_kg");
    assert!((operational / (f(r, "facility_energy_kwh") * 0.5) - 1.0).abs() < 1e-9, "{operational}");
    assert!((f(r, "carbon_kg") - f(&flat, "carbon_kg")).abs() < 1e-12);
    assert_ne!(f(&bundled, "carbon_kg"), f(&flat, "carbon_kg"));
}
