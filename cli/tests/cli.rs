//! The `dynamollm` binary's contract: errors that name file and line, the
//! policy list, the JSON fields, and reproducibility by seed.

use std::io::Write;
use std::path::Path;
use std::process::Command;

fn dynamollm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dynamollm")).args(args).output().expect("the binary runs")
}

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data").join(name).display().to_string()
}

#[test]
fn malformed_trace_lines_name_file_and_line() {
    let cases = [
        ("2023-11-16 18:15:47.x,10,10", "bad TIMESTAMP"),
        ("2023-11-16 18:15:47.0,-3,10", "negative"),
        ("2023-11-16 18:15:47.0,ten,10", "not a whole number"),
        ("2023-11-16 18:15:47.0,10", "missing column"),
    ];
    for (bad, what) in cases {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, "TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.0,100,10\r\n2023-11-16 18:15:46.5,100,10\r\n{bad}\r\n").unwrap();
        let path = f.path().display().to_string();
        let out = dynamollm(&["sim", "--trace", &path, "--instances", "1", "--quiet"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{path}:4:")), "{err}");
        assert!(err.contains(what), "{err} should say {what}");
    }
}

#[test]
fn an_unknown_policy_lists_the_valid_ones() {
    let out = dynamollm(&["sim", "--policy", "greedy", "--quiet"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown policy `greedy`") && err.contains("single-pool") && err.contains("multi-pool"),
        "{err}"
    );
}

#[test]
fn bad_controller_settings_are_refused_with_their_flag_named() {
    // `sim --policy dynamollm FLAG=VALUE` exits 2 with an error naming the flag and the value.
    let refused = |flag: &str, value: &str| {
        let out = dynamollm(&["sim", "--policy", "dynamollm", &format!("{flag}={value}"), "--quiet"]);
        assert_eq!(out.status.code(), Some(2), "{flag}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains(value), "{err}");
    };
    refused("--retire-min-age-s", "-5");
    refused("--clock-margin-floor", "1.2");
    refused("--attainment-comfort", "0.99");
    refused("--attainment-comfort", "1.5");
    refused("--clock-down-sigmas", "-2");
    refused("--mix-hysteresis", "1.5");
}

const FIELDS: [&str; 23] = [
    "policy",
    "trace",
    "seed",
    "duration_s",
    "requests_total",
    "requests_rejected",
    "energy_kwh",
    "gpu_hours",
    "avg_gpus",
    "peak_gpus",
    "peak_power_w",
    "cost_usd",
    "carbon_kg",
    "ttft_p50_s",
    "ttft_p99_s",
    "tbt_p50_s",
    "tbt_p99_s",
    "ttft_attainment",
    "tbt_attainment",
    "slo_attainment",
    "classes",
    "wall_s",
    "sim_requests_per_s",
];

fn run_json(seed: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out = dynamollm(&[
        "sim",
        "--policy",
        "single-pool",
        "--rates",
        &data("azure-llm-2024-week-coding-rate.csv"),
        "--lengths",
        &data("azure-llm-2023-code.csv"),
        "--hours",
        "0.5",
        "--scale",
        "0.5",
        "--instances",
        "6",
        "--seed",
        seed,
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn the_same_seed_gives_the_same_json_and_the_fields_are_exactly_the_contract() {
    let mut a = run_json("7");
    let mut b = run_json("7");
    let c = run_json("8");
    let keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = FIELDS.to_vec();
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want);
    let ss = &a["classes"]["LS"];
    for k in [
        "requests",
        "ttft_p50_s",
        "ttft_p99_s",
        "tbt_p50_s",
        "tbt_p99_s",
        "ttft_attainment",
        "tbt_attainment",
        "slo_attainment",
    ] {
        assert!(ss.get(k).is_some(), "class field {k} missing");
    }
    assert!(a["requests_total"].as_u64().unwrap() > 10_000);
    assert_ne!(a["requests_total"], c["requests_total"], "another seed draws other arrivals");
    for v in [&mut a, &mut b] {
        let o = v.as_object_mut().unwrap();
        o.remove("wall_s");
        o.remove("sim_requests_per_s");
    }
    assert_eq!(a, b);
}

#[test]
fn single_pool_sizing_is_the_smallest_count_that_holds_every_class() {
    let dir = tempfile::tempdir().unwrap();
    let run = |instances: Option<&str>| -> serde_json::Value {
        let json = dir.path().join("r.json");
        let mut args = vec!["sim", "--policy", "single-pool", "--quiet", "--json", json.to_str().unwrap()];
        if let Some(n) = instances {
            args.extend(["--instances", n]);
        }
        let out = dynamollm(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    let holds = |v: &serde_json::Value| {
        v["classes"].as_object().unwrap().values().all(|c| c["slo_attainment"].as_f64().unwrap() >= 0.99)
    };
    let sized = run(None);
    assert!(holds(&sized));
    let n = sized["peak_gpus"].as_u64().unwrap() / 8;
    let fewer = run(Some(&(n - 1).to_string()));
    assert!(!holds(&fewer), "{} instances would also hold: sizing is not minimal", n - 1);
}

/// `sim --compare LIST ARGS… --quiet --json F`: the runs of F.
fn compare_runs(dir: &std::path::Path, list_and_args: &[&str]) -> Vec<serde_json::Value> {
    let json = dir.join("cmp.json");
    let mut args = vec!["sim", "--compare"];
    args.extend_from_slice(list_and_args);
    args.extend(["--quiet", "--json", json.to_str().unwrap()]);
    let out = dynamollm(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    v["runs"].as_array().unwrap().clone()
}

/// `scale-inst` turns the static cluster's instances on and off: it never
/// holds more GPUs than `single-pool` (here an undersized 6 instances, which
/// the load would have it outgrow) and uses less energy on the same trace.
#[test]
fn scale_inst_stays_within_the_static_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let runs = compare_runs(dir.path(), &["scale-inst", "--hours", "0.5", "--scale", "2.25", "--instances", "6"]);
    let by = |p: &str| runs.iter().find(|r| r["policy"] == p).unwrap_or_else(|| panic!("no {p} run"));
    let (single, inst) = (by("single-pool"), by("scale-inst"));
    assert_eq!(single["peak_gpus"], 48);
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    assert!(f(inst, "peak_gpus") <= 48.0, "scale-inst outgrew the cluster: {}", inst["peak_gpus"]);
    assert!(f(inst, "avg_gpus") < 48.0 && f(inst, "energy_kwh") < f(single, "energy_kwh"), "{inst}");
    // Alone, it runs within the cluster single-pool sizing finds.
    let alone = |policy: &str| -> serde_json::Value {
        let json = dir.path().join(format!("{policy}.json"));
        let args = ["sim", "--policy", policy, "--hours", "0.5", "--scale", "2.25", "--quiet", "--json"];
        let out = dynamollm(&[&args[..], &[json.to_str().unwrap()]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
    };
    let (single, inst) = (alone("single-pool"), alone("scale-inst"));
    assert!(
        f(&inst, "peak_gpus") <= f(&single, "peak_gpus"),
        "scale-inst alone outgrew single-pool's cluster: {} GPUs, single-pool {}",
        inst["peak_gpus"],
        single["peak_gpus"]
    );
}

/// One `--instances` number gives every multi-pool pool that many (9 pools ×
/// N): the run says so beside multi-pool's table, and not when the counts are per class.
#[test]
fn one_instances_number_for_multi_pool_is_pointed_out() {
    let run = |instances: &str| {
        let how = if instances.contains('=') { "--policy" } else { "--compare" };
        let out = dynamollm(&["sim", how, "multi-pool", "--hours", "0.1", "--instances", instances, "--quiet"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let one = run("2");
    assert!(one.contains("instances: SS=2 SM=2"), "{one}");
    assert!(one.contains("one --instances number gives every pool that many"), "{one}");
    let per_class = run("SS=1,SM=1,SL=1,MS=1,MM=1,ML=1,LS=2,LM=1,LL=1");
    assert!(per_class.contains("instances: SS=1 SM=1") && !per_class.contains("one --instances"), "{per_class}");
}

/// `--compare` with the oracle: every run carries `oracle_gap` (its energy
/// over the oracle's, minus one), and the oracle, knowing the future and
/// reconfiguring for free, uses less energy than `dynamollm` on the same
/// trace and seed while holding every class's P99 SLOs.
#[test]
fn the_oracle_is_below_dynamollm_and_every_run_reports_its_gap() {
    let dir = tempfile::tempdir().unwrap();
    let runs = compare_runs(dir.path(), &["dynamollm,oracle", "--hours", "0.25", "--scale", "2", "--instances", "4"]);
    let by = |p: &str| runs.iter().find(|r| r["policy"] == p).unwrap_or_else(|| panic!("no {p} run"));
    let (dyn_kwh, oracle_kwh) =
        (by("dynamollm")["energy_kwh"].as_f64().unwrap(), by("oracle")["energy_kwh"].as_f64().unwrap());
    assert!(oracle_kwh < dyn_kwh, "oracle {oracle_kwh} kWh, dynamollm {dyn_kwh} kWh");
    for r in &runs {
        let gap = r["oracle_gap"].as_f64().unwrap();
        let want = r["energy_kwh"].as_f64().unwrap() / oracle_kwh - 1.0;
        assert!((gap - want).abs() < 1e-9, "{}: oracle_gap {gap}, energy says {want}", r["policy"]);
    }
    for (class, c) in by("oracle")["classes"].as_object().unwrap() {
        if c["requests"].as_u64().unwrap() > 0 {
            assert!(c["slo_attainment"].as_f64().unwrap() >= 0.99, "oracle misses {class}: {c}");
        }
    }
}

#[test]
fn bound_holds_every_class_in_its_window_and_its_totals_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bound.json");
    let args = ["bound", "--hours", "0.5", "--tp", "8", "--min-clock-mhz", "1800", "--baseline-kwh", "10", "--quiet"];
    let out = dynamollm(&[&args[..], &["--json", json.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("vs the baseline's energy"));
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let classes = b["classes"].as_object().unwrap();
    assert!(classes.len() >= 6, "the Conversation half hour has most classes: {classes:?}");
    let (mut energy_kwh, mut requests) = (0.0, 0);
    for (name, c) in classes {
        // One 30-minute window: one rate searched, the window's own.
        let points = c["points"].as_array().unwrap();
        assert_eq!(points.len(), 1, "{name}");
        let n = c["requests"].as_u64().unwrap();
        assert!((points[0]["rate_rps"].as_f64().unwrap() - n as f64 / 1800.0).abs() < 1e-9, "{name}");
        let pool = &points[0]["pool"];
        assert!(pool["attainment"].as_f64().unwrap() >= 0.995, "{name}: {pool}");
        assert_eq!(pool["tp"], 8, "{name}");
        assert!(pool["clock_mhz"].as_u64().unwrap() >= 1800, "{name}: {pool}");
        let e = c["energy_kwh"].as_f64().unwrap();
        let want = n as f64 * pool["energy_per_req_j"].as_f64().unwrap() / 3.6e6;
        assert!((e - want).abs() <= 1e-9 * want.max(1.0), "{name}: {e} vs {want}");
        energy_kwh += e;
        requests += n;
    }
    assert!((b["energy_kwh"].as_f64().unwrap() - energy_kwh).abs() < 1e-9);
    assert_eq!(b["requests"].as_u64().unwrap(), requests);
    assert!((b["ratio_to_baseline"].as_f64().unwrap() - energy_kwh / 10.0).abs() < 1e-12);
    assert_eq!(b["min_clock_mhz"], 1800);
}

#[test]
fn bound_by_band_gives_each_prompt_band_one_pool_for_all_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("band.svg");
    let run = |pool_by: &str| -> serde_json::Value {
        let json = dir.path().join(format!("{pool_by}.json"));
        let args = ["bound", "--hours", "0.5", "--tp", "8", "--min-clock-mhz", "1800", "--quiet", "--pool-by", pool_by];
        let out = dynamollm(&[&args[..], &["--json", json.to_str().unwrap(), "--svg", svg.to_str().unwrap()]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
    };
    let (by_class, by_band) = (run("class"), run("band"));
    // The chart (of the band run, the last): a line per pool, every point labelled with its pool.
    let chart = std::fs::read_to_string(&svg).unwrap();
    let pools = by_band["classes"].as_object().unwrap();
    let wide = chart.lines().filter(|l| l.starts_with("<polyline") && l.contains(r#"stroke-width="2""#)).count();
    assert_eq!(wide, 2 * pools.len(), "a line per pool and its legend mark: {chart}");
    for (name, pool) in pools {
        assert!(chart.lines().any(|l| l.trim() == name), "{name} in the legend");
        for p in pool["points"].as_array().unwrap() {
            let q = &p["pool"];
            let label = format!("{} ({}×TP{})", q["clock_mhz"], q["instances"], q["tp"]);
            assert!(chart.contains(&label), "{name}: {label} not on the chart");
        }
    }
    assert_eq!(by_band["pool_by"], "band");
    assert_eq!(by_class["pool_by"], "class");
    assert_eq!(by_band["requests"], by_class["requests"]);
    let classes = by_class["classes"].as_object().unwrap();
    let bands = by_band["classes"].as_object().unwrap();
    assert!(bands.len() >= 2, "{bands:?}");
    for (name, pool) in bands {
        let letter = name.strip_suffix('*').unwrap_or_else(|| panic!("a band pool's name: {name}"));
        let mut serves: Vec<&str> = pool["serves"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert!(!serves.is_empty() && serves.iter().all(|c| c.starts_with(letter)), "{name}: {serves:?}");
        // Exactly the band's classes with requests, and all of their requests.
        serves.sort_unstable();
        let want: Vec<&str> = classes.keys().map(String::as_str).filter(|c| c.starts_with(letter)).collect();
        assert_eq!(serves, want, "{name}");
        let n: u64 = serves.iter().map(|c| classes[*c]["requests"].as_u64().unwrap()).sum();
        assert_eq!(pool["requests"].as_u64().unwrap(), n, "{name}");
        let p = &pool["points"][0]["pool"];
        assert!(p["attainment"].as_f64().unwrap() >= 0.995, "{name}: {p}");
        let e = pool["energy_kwh"].as_f64().unwrap();
        let want = n as f64 * p["energy_per_req_j"].as_f64().unwrap() / 3.6e6;
        assert!((e - want).abs() <= 1e-9 * want.max(1.0), "{name}: {e} vs {want}");
    }
}

#[test]
fn bound_sets_a_sim_report_beside_its_pools_and_refuses_another_workload() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    for report in ["week.csv", "week.json"] {
        let out = dynamollm(&[
            "sim",
            "--hours",
            "0.5",
            "--compare",
            "single-pool,dynamollm",
            "--quiet",
            "--report",
            &path(report),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let bound = |report: &str| -> (serde_json::Value, String) {
        let json = path(&format!("{report}.bound.json"));
        let args = ["bound", "--hours", "0.5", "--tp", "8", "--min-clock-mhz", "1800", "--pool-by", "band", "--quiet"];
        let out = dynamollm(&[&args[..], &["--against", &path(report), "--json", &json]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (
            serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap(),
            String::from_utf8_lossy(&out.stdout).into(),
        )
    };
    let (b, stdout) = bound("week.csv");
    assert!(stdout.contains("beside the reference") && stdout.contains("dynamollm"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path("week.json")).unwrap()).unwrap();
    let against = b["against"].as_array().unwrap();
    assert_eq!(against.len(), 2);
    for (p, run) in against.iter().zip(report["runs"].as_array().unwrap()) {
        assert_eq!(p["policy"], run["policy"]);
        // The pools' energies add up to the policy's, which is the report's.
        let e = p["energy_kwh"].as_f64().unwrap();
        let sum: f64 = p["pools"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - e).abs() <= 1e-9 * e && (e - run["energy_kwh"].as_f64().unwrap()).abs() <= 1e-6 * e, "{p}");
        let l_band: f64 = ["LS", "LM", "LL"]
            .iter()
            .filter_map(|c| run["classes"].get(*c))
            .map(|c| c["energy_kwh"].as_f64().unwrap())
            .sum();
        assert!((p["pools"]["L*"].as_f64().unwrap() - l_band).abs() <= 1e-9 * l_band, "{p}");
        let ratio = p["ratio_to_bound"].as_f64().unwrap();
        assert!((ratio - e / b["energy_kwh"].as_f64().unwrap()).abs() < 1e-12, "{p}");
    }
    assert_eq!(bound("week.json").0["against"], b["against"], "the JSON report gives what the CSV gives");

    // A report of another span: refused, naming the file, the policy and the class.
    let out =
        dynamollm(&["sim", "--hours", "0.25", "--policy", "single-pool", "--quiet", "--report", &path("short.csv")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = dynamollm(&["bound", "--hours", "0.5", "--quiet", "--against", &path("short.csv")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("short.csv") && err.contains("not the same workload"), "{err}");
    // A malformed row: its line named.
    std::fs::write(path("bad.csv"), "policy,class,requests,energy_kwh\nx,SS,12,1.5\nx,SM,7,zz\n").unwrap();
    let out = dynamollm(&["bound", "--hours", "0.5", "--quiet", "--against", &path("bad.csv")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.csv line 3"), "{err}");
}

#[test]
fn bound_names_the_flag_of_a_bad_option() {
    for (flag, value) in
        [("--attainment", "1.5"), ("--tp", "3"), ("--grid-ratio", "1"), ("--window-min", "0"), ("--pool-by", "bands")]
    {
        let out = dynamollm(&["bound", "--hours", "0.1", flag, value, "--quiet"]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains(value), "{flag} {value}: {err}");
    }
}

/// The robustness suite, cut short: its table and JSON agree with a `sim`
/// of the same scenario (one computation), and an unknown scenario is named.
#[test]
fn the_robustness_suite_reports_what_sim_measures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rows.json");
    let out = dynamollm(&[
        "robustness",
        "--only",
        "conv-hour-x2",
        "--seeds",
        "3",
        "--hours",
        "0.1",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("conv-hour-x2") && stdout.contains("dynamollm holds in"), "{stdout}");
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let row = &rows[0];
    assert_eq!(
        (row["scenario"].as_str(), row["seed"].as_u64(), row["scale"].as_f64()),
        (Some("conv-hour-x2"), Some(3), Some(2.0))
    );
    assert_eq!(out.status.success(), row["holds"].as_bool().unwrap(), "exit status follows `holds`");
    let sim_json = dir.path().join("sim.json");
    let sim = dynamollm(&[
        "sim",
        "--compare",
        "single-pool,dynamollm",
        "--scale",
        "2",
        "--seed",
        "3",
        "--hours",
        "0.1",
        "--quiet",
        "--json",
        sim_json.to_str().unwrap(),
    ]);
    assert!(sim.status.success(), "{}", String::from_utf8_lossy(&sim.stderr));
    let sim: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sim_json).unwrap()).unwrap();
    let energy = |policy: &str| {
        sim["runs"].as_array().unwrap().iter().find(|r| r["policy"] == policy).unwrap()["energy_kwh"].as_f64().unwrap()
    };
    let d = &row["dynamollm"];
    assert!((d["energy_kwh"].as_f64().unwrap() - energy("dynamollm")).abs() < 1e-9, "{row}\n{sim}");
    assert!((row["single_pool"]["energy_kwh"].as_f64().unwrap() - energy("single-pool")).abs() < 1e-9);
    assert!((d["energy_ratio"].as_f64().unwrap() - energy("dynamollm") / energy("single-pool")).abs() < 1e-12);
    let bad = dynamollm(&["robustness", "--only", "nope", "--quiet"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no scenario \"nope\""));
}

#[test]
fn assess_names_what_it_cannot_read() {
    // Nothing listens on port 9: the URL is named.
    let out = dynamollm(&["assess", "--prometheus", "http://127.0.0.1:9", "--from", "1000", "--to", "4600"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http://127.0.0.1:9/api/v1/query"), "{err}");
    for (from, to, says) in [("4600", "1000", "--to must be after --from"), ("yesterday", "1000", "--from")] {
        let out = dynamollm(&["assess", "--prometheus", "http://127.0.0.1:9", "--from", from, "--to", to]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err} should say {says}");
    }
    let out = dynamollm(&["assess", "--prometheus", "not a url", "--from", "1000", "--to", "4600"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prometheus \"not a url\""));
}
