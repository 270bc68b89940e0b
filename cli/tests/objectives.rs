//! `sim --objective`: the plan minimises cost or carbon in place of energy.
//! The test uses the bundled Conversation hour at eight times its load,
//! `single-pool` at 27 × TP8 (the size replay finds for it), and seed 1. It
//! runs `dynamollm` under each objective and checks four things: the cost
//! objective costs less than the energy objective, the carbon objective emits
//! less, every class holds its P99 SLOs under each, and each decision names
//! the objective that chose it. The report sets the runs side by side and
//! opens clean in headless Chromium.

use dashboards::browser::{check_page, chromium_from_env};
use serde_json::Value;
use std::process::Command;

fn run<'a>(runs: &'a [Value], name: &str) -> &'a Value {
    runs.iter().find(|r| r["policy"] == name).unwrap_or_else(|| panic!("{name} ran"))
}

#[test]
fn each_objective_spends_less_of_what_it_minimises_and_the_report_sets_them_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("runs.json");
    let html = dir.path().join("report.html");
    let decisions = dir.path().join("decisions.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_dynamollm"))
        .args(["sim", "--scale", "8", "--compare", "single-pool,dynamollm", "--instances", "27"])
        .args(["--objective", "energy,cost,carbon", "--quiet", "--json"])
        .arg(&json)
        .arg("--report")
        .arg(&html)
        .arg("--decisions")
        .arg(&decisions)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = j["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["single-pool", "dynamollm (energy)", "dynamollm (cost)", "dynamollm (carbon)"]);
    let (energy, cost, carbon) =
        (run(runs, "dynamollm (energy)"), run(runs, "dynamollm (cost)"), run(runs, "dynamollm (carbon)"));
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap();
    assert!(f(cost, "cost_usd") < f(energy, "cost_usd"), "cost {} vs {}", f(cost, "cost_usd"), f(energy, "cost_usd"));
    assert!(
        f(carbon, "carbon_kg") < f(energy, "carbon_kg"),
        "carbon {} vs {}",
        f(carbon, "carbon_kg"),
        f(energy, "carbon_kg")
    );
    for r in [energy, cost, carbon] {
        for (c, v) in r["classes"].as_object().unwrap() {
            let a = v["slo_attainment"].as_f64().unwrap();
            assert!(a >= 0.99, "{} {c}: {a}", r["policy"]);
        }
    }
    // The decisions say which objective chose the mix, what a GPU weighs and the prices behind it.
    let text = std::fs::read_to_string(&decisions).unwrap();
    let reasons: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(!reasons.iter().any(|r| r.contains("objective energy")), "energy alone names no objective");
    let cost_reason = reasons.iter().find(|r| r.contains("objective cost (")).expect("a decision of the cost run");
    assert!(cost_reason.contains("$2.99/GPU-h") && cost_reason.contains("a GPU weighs"), "{cost_reason}");
    let carbon_reason =
        reasons.iter().find(|r| r.contains("objective carbon (")).expect("a decision of the carbon run");
    assert!(carbon_reason.contains("g/GPU-h") && carbon_reason.contains("g/kWh"), "{carbon_reason}");

    // The report: every run in the side-by-side chart, peak power beside the other figures.
    let c = check_page(&chromium_from_env(), &format!("file://{}", html.display()), &dir.path().join("r.png")).unwrap();
    assert!(
        c.console_errors.is_empty() && c.network_errors.is_empty(),
        "{:?} {:?}",
        c.console_errors,
        c.network_errors
    );
    let chart = &c.dom[c.dom.find("id=\"chart-side-by-side\"").expect("the side-by-side chart")..];
    let chart = &chart[..chart.find("</svg>").unwrap()];
    for name in names.iter().chain(&["energy", "GPU-hours", "carbon", "cost", "peak power", "worst class SLO"]) {
        assert!(chart.contains(name), "{name} in the side-by-side chart");
    }
    for r in runs {
        let id = dashboards::report::id_of(r["policy"].as_str().unwrap());
        let at = c.dom.find(&format!("id=\"peak-kw-{id}\"")).unwrap_or_else(|| panic!("peak kW of {id}"));
        let v: f64 = c.dom[at..].split_once("data-value=\"").unwrap().1.split_once('"').unwrap().0.parse().unwrap();
        assert!((v - f(r, "peak_power_w") / 1e3).abs() < 1e-9, "{id}: page {v} kW, JSON {} W", f(r, "peak_power_w"));
    }
}

#[test]
fn a_bad_objective_is_named() {
    for (args, says) in [
        (vec!["--objective", "speed"], "`speed` is not an objective"),
        (vec!["--objective", "energy_kwh=1,watts=2"], "`watts` is not a weight"),
        (vec!["--objective", "carbon", "--carbon-usd-per-t", "80"], "cost objective only"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dynamollm"))
            .args(["sim", "--policy", "dynamollm", "--hours", "0.05", "--quiet"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--objective") && err.contains(says), "{args:?}: {err}");
    }
}
