//! The example configs under deploy/ stay true: every table parses with the
//! parser that reads it in the service.

use service::config::ServiceConfig;
use std::path::Path;

fn deploy(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy").join(name)
}

/// The example service config with one `key = default` line set to `key = value`.
fn example_with(key: &str, default: &str, value: &str) -> anyhow::Result<ServiceConfig> {
    let text = std::fs::read_to_string(deploy("dynamollm.toml"))
        .unwrap()
        .replace(&format!("{key} = {default}"), &format!("{key} = {value}"));
    ServiceConfig::parse(&text, "deploy/dynamollm.toml")
}

/// The commented-out `[budget]` example of the service config (its first lines).
const BUDGET_EXAMPLE: &str =
    "# [budget]                        # a site power budget (default: none)\n# power_w = 60000.0";
/// The commented-out `[objective]` example of the service config (its first lines).
const OBJECTIVE_EXAMPLE: &str =
    "# [objective]                     # what the plan minimises (default: energy alone)\n# kind = \"cost\"";

/// The example service config with `commented` (lines it holds) replaced by `with`.
fn example_replacing(commented: &str, with: &str) -> String {
    let text = std::fs::read_to_string(deploy("dynamollm.toml")).unwrap();
    assert!(text.contains(commented), "deploy/dynamollm.toml holds {commented:?}");
    text.replace(commented, with)
}

#[test]
fn the_example_service_config_parses() {
    let cfg = ServiceConfig::load(&deploy("dynamollm.toml")).unwrap();
    assert_eq!(cfg.cluster.kind, "external");
    assert_eq!(cfg.service.mode, "dry-run");
    // Loopback by default: the router authenticates no client.
    assert_eq!(cfg.router.listen.as_deref(), Some("127.0.0.1:8000"));
    let t = cfg.telemetry_config().unwrap();
    assert_eq!(t.mqtt.port, 8883);
    let a = cfg.actuators_config().unwrap();
    assert!(a.exec.is_some() && a.mqtt.is_some() && a.webhook.is_none() && a.nvml.is_none());
    let text = std::fs::read_to_string(deploy("dynamollm.toml")).unwrap();
    let acc = dashboards::config::AccountingConfig::from_toml_str(&text, "deploy/dynamollm.toml").unwrap();
    assert!((acc.carbon.pue - 1.2).abs() < 1e-12);
}

#[test]
fn a_misspelt_key_is_named() {
    let text = std::fs::read_to_string(deploy("dynamollm.toml")).unwrap().replace("stale_after_s", "stale_afer_s");
    let e = ServiceConfig::parse(&text, "deploy/dynamollm.toml").unwrap_err().to_string();
    assert!(e.contains("deploy/dynamollm.toml") && e.contains("stale_afer_s"), "{e}");
    let text = std::fs::read_to_string(deploy("dynamollm.toml")).unwrap().replace("ack_timeout_ms", "ack_timeout");
    let e = ServiceConfig::parse(&text, "deploy/dynamollm.toml").unwrap_err().to_string();
    assert!(e.contains("ack_timeout"), "{e}");
    let e = ServiceConfig::parse("[service]\nmode = \"sideways\"\n", "x.toml").unwrap_err().to_string();
    assert!(e.contains("x.toml") && e.contains("service.mode") && e.contains("dry-run"), "{e}");
    let e = example_with("retire_min_age_s", "0.0", "-60.0").unwrap_err().to_string();
    assert!(
        e.contains("deploy/dynamollm.toml") && e.contains("controller.retire_min_age_s") && e.contains("-60"),
        "{e}"
    );
    let cfg = example_with("retire_min_age_s", "0.0", "600.0").unwrap();
    let profile = dynamollm::profile::ProfileTable::bundled();
    assert_eq!(service::controller_config(&cfg, &profile).unwrap().retire_min_age_s, 600.0);
    let with_floor = |v: &str| example_with("clock_margin_floor", "0.85", v);
    for bad in ["1.5", "0.0"] {
        let e = with_floor(bad).unwrap_err().to_string();
        assert!(e.contains("controller.clock_margin_floor") && e.contains(bad.trim_end_matches(".0")), "{e}");
    }
    let cfg = with_floor("1.0").unwrap();
    assert_eq!(service::controller_config(&cfg, &profile).unwrap().clock_margin_floor, 1.0);
    let with_comfort = |v: &str| example_with("attainment_comfort", "0.996", v);
    for bad in ["0.99", "1.01", "0.5"] {
        let e = with_comfort(bad).unwrap_err().to_string();
        assert!(e.contains("controller.attainment_comfort") && e.contains(bad), "{e}");
    }
    let cfg = with_comfort("0.998").unwrap();
    assert_eq!(service::controller_config(&cfg, &profile).unwrap().attainment_comfort, 0.998);
    let with_sigmas = |v: &str| example_with("clock_down_sigmas", "1.0", v);
    for bad in ["-1.5", "nan"] {
        let e = with_sigmas(bad).unwrap_err().to_string();
        assert!(e.contains("controller.clock_down_sigmas") && e.to_lowercase().contains(bad), "{e}");
    }
    let cfg = with_sigmas("0.0").unwrap();
    assert_eq!(service::controller_config(&cfg, &profile).unwrap().clock_down_sigmas, 0.0);
    for bad in ["1.0", "-0.1"] {
        let e = example_with("mix_hysteresis", "0.04", bad).unwrap_err().to_string();
        assert!(e.contains("controller.mix_hysteresis") && e.contains(bad.trim_end_matches(".0")), "{e}");
    }
    let cfg = example_with("mix_hysteresis", "0.04", "0.1").unwrap();
    assert_eq!(service::controller_config(&cfg, &profile).unwrap().mix_hysteresis, 0.1);
}

#[test]
fn the_budget_section_reaches_the_controller() {
    let profile = dynamollm::profile::ProfileTable::bundled();
    let text = example_replacing(BUDGET_EXAMPLE, "[budget]\npower_w = 60000.0");
    let text = text.replace("# priority = [\"SS\", \"SM\", \"MS\"]", "priority = [\"LL\", \"SS\"]");
    let cfg = ServiceConfig::parse(&text, "deploy/dynamollm.toml").unwrap();
    let c = service::controller_config(&cfg, &profile).unwrap();
    assert_eq!(c.power_budget_w, Some(60000.0));
    // LL first, SS second, the rest in the default order after them.
    assert_eq!(c.class_priority, [1, 2, 3, 4, 5, 6, 7, 8, 0]);
    // Without the section: no budget.
    let none = ServiceConfig::load(&deploy("dynamollm.toml")).unwrap();
    assert_eq!(service::controller_config(&none, &profile).unwrap().power_budget_w, None);
    for (bad, says) in
        [("priority = [\"LL\", \"XL\"]", "\"XL\" is not a class"), ("priority = [\"LL\", \"LL\"]", "twice")]
    {
        let t = text.replace("priority = [\"LL\", \"SS\"]", bad);
        let e = ServiceConfig::parse(&t, "deploy/dynamollm.toml").unwrap_err().to_string();
        assert!(e.contains("budget.priority") && e.contains(says), "{e}");
    }
    let e = ServiceConfig::parse(&text.replace("power_w = 60000.0", "power_w = -5.0"), "deploy/dynamollm.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("budget.power_w") && e.contains("-5"), "{e}");
}

#[tokio::test]
async fn the_objective_section_reaches_the_controller() {
    let text = example_replacing(OBJECTIVE_EXAMPLE, "[objective]\nkind = \"cost\"");
    let cfg = ServiceConfig::parse(&text, "deploy/dynamollm.toml").unwrap();
    let o = service::objective_of(&cfg, 0.0).await.unwrap();
    assert_eq!(o.name, "cost");
    // $2.99 per GPU-hour against $0.09-0.20 per kWh × PUE 1.2: a GPU weighs 12-28 kW.
    assert!(o.gpu_w.iter().all(|&w| (12_000.0..28_000.0).contains(&w)), "{:?}", &o.gpu_w[..4]);
    assert!(o.terms.contains("$2.99/GPU-h"), "{}", o.terms);
    // Without the section: energy alone.
    let none = ServiceConfig::load(&deploy("dynamollm.toml")).unwrap();
    assert!(!service::objective_of(&none, 0.0).await.unwrap().weighs_gpus());
    for (bad, says) in [
        ("kind = \"speed\"", "objective.kind: `speed` is not an objective"),
        ("kind = \"cost\"\ngpu_hours = 1.0", "go with kind = \"weights\""),
        ("kind = \"weights\"\nenergy_kwh = -1.0", "objective.energy_kwh must be in [0"),
    ] {
        let t = text.replace("kind = \"cost\"", bad);
        let e = ServiceConfig::parse(&t, "deploy/dynamollm.toml").unwrap_err().to_string();
        assert!(e.contains("deploy/dynamollm.toml") && e.contains(says), "{e}");
    }
}

#[test]
fn a_budget_schedule_reaches_the_controller_and_bad_hours_are_named() {
    let profile = dynamollm::profile::ProfileTable::bundled();
    let base = example_replacing(
        BUDGET_EXAMPLE,
        "[budget]\npower_w = 60000.0\nutc_offset_h = -7.0\nschedule = [{ from_h = 16, to_h = 21, power_w = 40000.0 }]",
    );
    let cfg = ServiceConfig::parse(&base, "deploy/dynamollm.toml").unwrap();
    let c = service::controller_config(&cfg, &profile).unwrap();
    assert_eq!(c.power_budget_periods, [controller::control::BudgetPeriod { from_h: 16, to_h: 21, power_w: 40000.0 }]);
    assert_eq!(c.power_budget_at(17.0 * 3600.0), Some(40000.0));
    assert_eq!(c.power_budget_at(12.0 * 3600.0), Some(60000.0));
    for (bad, says) in [
        ("from_h = 16, to_h = 25", "budget.schedule[0]: hours 16-25"),
        ("from_h = 16, to_h = 16", "not the same"),
        ("from_h = 16, to_h = 21, power_w = 0.0", "budget.schedule[0].power_w must be in [1, 1e9]"),
    ] {
        let t = base.replace("from_h = 16, to_h = 21", bad);
        let t = if bad.contains("power_w") { t.replace(", power_w = 40000.0", "") } else { t };
        let e = ServiceConfig::parse(&t, "deploy/dynamollm.toml").unwrap_err().to_string();
        assert!(e.contains("deploy/dynamollm.toml") && e.contains(says), "{bad}: {e}");
    }
    let e = ServiceConfig::parse(&base.replace("utc_offset_h = -7.0", "utc_offset_h = 30.0"), "x").unwrap_err();
    assert!(e.to_string().contains("budget.utc_offset_h"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_carbon_objective_plans_with_the_forecast_of_an_intensity_api() {
    // Electricity Maps on loopback, answering its forecast endpoint with a recorded-shape body
    // (dashboards/tests/fixtures/em-forecast.json: 150, 121 and 108 gCO2e/kWh).
    let body =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards/tests/fixtures/em-forecast.json"))
            .unwrap();
    let app = axum::Router::new().route(
        "/v3/carbon-intensity/forecast",
        axum::routing::get(move || {
            let b = body.clone();
            async move { ([("content-type", "application/json")], b) }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let em = format!("electricity_maps = {{ url = \"{url}\", zone = \"US-CAL-CISO\", token = \"k\" }}");
    let text = example_replacing(OBJECTIVE_EXAMPLE, "[objective]\nkind = \"carbon\"")
        .replace("source = \"csv\"", &format!("source = \"electricity-maps\"\n{em}"));
    let cfg = ServiceConfig::parse(&text, "deploy/dynamollm.toml").unwrap();
    assert!(service::objective_is_live(&cfg), "an API source is read again while the service runs");
    assert!(!service::objective_is_live(&ServiceConfig::load(&deploy("dynamollm.toml")).unwrap()));
    let o = service::objective_of(&cfg, 0.0).await.unwrap();
    assert_eq!(o.name, "carbon");
    assert!(o.terms.contains("108–150 g/kWh"), "{}", o.terms);
    // Each hour's weight is the embodied grams of a GPU-hour over the grams of a watt-hour at that
    // hour's forecast intensity (PUE 1.2).
    let acc = dashboards::config::AccountingConfig::default();
    let embodied = dashboards::accounting::embodied_g(&acc, 3600.0);
    let mut seen: Vec<i64> = o.gpu_w.iter().map(|w| (w * 1000.0).round() as i64).collect();
    seen.sort_unstable();
    seen.dedup();
    let want: Vec<i64> =
        [150.0, 121.0, 108.0].iter().map(|g| (embodied / (g * 1.2 / 1000.0) * 1000.0).round() as i64).collect();
    assert_eq!(seen, want);
}
