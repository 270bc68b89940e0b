//! Every Grafana query names only measurements, fields, tags and metric names
//! the telemetry sink really writes. The written vocabulary is derived from
//! the code: samples with every field and tag set, flattened by
//! `Sample::points` (what the sink encodes as line protocol).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use telemetry_core::sample::{ArrivalSample, EngineSample, GpuSample, LatencySummary, Sample, Tags};
use telemetry_core::RequestClass;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana");

struct Written {
    fields: BTreeMap<String, BTreeSet<String>>,
    tags: BTreeSet<String>,
    metrics: BTreeSet<String>,
}

fn written() -> Written {
    let tags = Tags {
        site: Some("s".into()),
        node: Some("n".into()),
        gpu: Some(0),
        instance: Some("i".into()),
        pool: Some("p".into()),
        class: Some(RequestClass::ALL[0]),
        model: Some("m".into()),
    };
    let l = LatencySummary { count: 1.0, sum_s: 1.0, p50_s: 1.0, p90_s: 1.0, p99_s: 1.0 };
    let samples = [
        Sample::Gpu(GpuSample {
            ts_ms: 0,
            tags: tags.clone(),
            power_w: 1.0,
            energy_j: Some(1.0),
            sm_clock_mhz: Some(1),
            util: Some(1.0),
            temperature_c: Some(1.0),
            throttle_reasons: Some(1),
        }),
        Sample::Engine(EngineSample {
            ts_ms: 0,
            tags: tags.clone(),
            ttft: Some(l),
            tbt: Some(l),
            running: Some(1.0),
            waiting: Some(1.0),
            kv_usage: Some(1.0),
            prompt_tokens_total: Some(1.0),
            generation_tokens_total: Some(1.0),
        }),
        Sample::Arrivals(ArrivalSample { ts_ms: 0, tags, requests: 1.0, tokens: 1.0 }),
    ];
    let mut w = Written { fields: BTreeMap::new(), tags: BTreeSet::new(), metrics: BTreeSet::new() };
    for s in samples {
        for p in s.points() {
            w.fields.entry(p.series.measurement.clone()).or_default().insert(p.series.field.clone());
            w.metrics.insert(p.series.name());
            w.tags.extend(p.series.tags.iter().map(|(k, _)| k.clone()));
        }
    }
    w
}

/// Strings in `text` after each `prefix`, up to `end`.
fn after<'a>(text: &'a str, prefix: &str, end: char) -> Vec<&'a str> {
    text.match_indices(prefix).filter_map(|(i, _)| text[i + prefix.len()..].split(end).next()).collect()
}

/// Problems of one Flux query.
fn check_flux(q: &str, w: &Written) -> Vec<String> {
    let mut bad = Vec::new();
    let ms = after(q, "r._measurement == \"", '"');
    if ms.is_empty() {
        bad.push("names no measurement".into());
    }
    let fields = after(q, "r._field == \"", '"');
    if fields.is_empty() {
        bad.push("names no field".into());
    }
    for m in &ms {
        match w.fields.get(*m) {
            None => bad.push(format!("measurement `{m}` is not written")),
            Some(fs) => {
                for f in &fields {
                    if !fs.contains(*f) {
                        bad.push(format!("field `{m}.{f}` is not written"));
                    }
                }
            }
        }
    }
    // Tags: r.<tag> and group(columns: [...]).
    for (i, _) in q.match_indices("r.") {
        let name: String = q[i + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.starts_with('_') && !name.is_empty() && !w.tags.contains(&name) {
            bad.push(format!("tag `{name}` is not written"));
        }
    }
    for cols in after(q, "columns: [", ']') {
        for c in cols.split(',').map(|c| c.trim().trim_matches('"')) {
            if !c.starts_with('_') && !w.tags.contains(c) {
                bad.push(format!("group column `{c}` is not a written tag"));
            }
        }
    }
    for t in after(q, "tag: \"", '"') {
        if !w.tags.contains(t) {
            bad.push(format!("tag `{t}` is not written"));
        }
    }
    bad
}

/// Problems of one PromQL query.
fn check_promql(q: &str, w: &Written) -> Vec<String> {
    let mut bad = Vec::new();
    let b = q.as_bytes();
    let mut names = 0;
    for (i, _) in q.match_indices('{') {
        let start = q[..i].rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).map_or(0, |p| p + 1);
        let name = &q[start..i];
        if name.is_empty() || (start > 0 && b[start - 1] == b'$') {
            continue;
        }
        names += 1;
        if !w.metrics.contains(name) {
            bad.push(format!("metric `{name}` is not written"));
        }
        let matchers = q[i + 1..].split('}').next().unwrap_or("");
        for m in matchers.split(',').filter(|m| !m.trim().is_empty()) {
            let label: String = m.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !w.tags.contains(&label) {
                bad.push(format!("label `{label}` is not written"));
            }
        }
    }
    if names == 0 {
        bad.push("names no metric".into());
    }
    for labels in after(q, "by (", ')') {
        for l in labels.split(',').map(str::trim) {
            if !w.tags.contains(l) {
                bad.push(format!("grouping label `{l}` is not written"));
            }
        }
    }
    for args in after(q, "label_values(", ')') {
        let mut it = args.split(',').map(str::trim);
        if let (Some(m), Some(l)) = (it.next(), it.next()) {
            if !w.metrics.contains(m) {
                bad.push(format!("metric `{m}` is not written"));
            }
            if !w.tags.contains(l) {
                bad.push(format!("label `{l}` is not written"));
            }
        }
    }
    bad
}

fn load(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/{name}")).unwrap()).unwrap()
}

#[test]
fn influx_flux_dashboard_queries_name_what_the_sink_writes() {
    let w = written();
    let d = load("influxdb-flux.json");
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut measurements = BTreeSet::new();
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let q = t["query"].as_str().unwrap();
            let bad = check_flux(q, &w);
            assert!(bad.is_empty(), "panel `{}`: {bad:?}\n{q}", p["title"]);
            measurements.extend(after(q, "r._measurement == \"", '"').into_iter().map(String::from));
        }
    }
    // Every measurement the sink writes is charted.
    assert_eq!(measurements, w.fields.keys().cloned().collect::<BTreeSet<_>>());
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str() {
            for t in after(q, "tag: \"", '"') {
                assert!(w.tags.contains(t), "variable {}: tag {t}", v["name"]);
            }
        }
    }
}

#[test]
fn victoriametrics_promql_dashboard_queries_name_what_the_sink_writes() {
    let w = written();
    let d = load("victoriametrics-promql.json");
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let q = t["expr"].as_str().unwrap();
            let bad = check_promql(q, &w);
            assert!(bad.is_empty(), "panel `{}`: {bad:?}\n{q}", p["title"]);
            for l in after(t["legendFormat"].as_str().unwrap_or(""), "{{", '}') {
                assert!(w.tags.contains(l), "legend label {l}");
            }
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        let q = v["definition"].as_str().unwrap();
        assert!(check_promql(q, &w).iter().all(|e| e == "names no metric"), "{q}");
    }
}

#[test]
fn the_checks_catch_names_the_sink_does_not_write() {
    let w = written();
    assert!(!check_flux("r._measurement == \"gpu\" and r._field == \"power_watts\"", &w).is_empty());
    assert!(!check_flux("r._measurement == \"gpus\" and r._field == \"power_w\"", &w).is_empty());
    assert!(!check_flux(
        "r._measurement == \"gpu\" and r._field == \"power_w\" |> filter(fn: (r) => r.rack == \"x\")",
        &w
    )
    .is_empty());
    assert!(check_flux("r._measurement == \"gpu\" and r._field == \"power_w\"", &w).is_empty());
    assert!(!check_promql("sum by (pool) (gpu_power_watts{site=~\"$site\"})", &w).is_empty());
    assert!(!check_promql("sum by (rack) (gpu_power_w{site=~\"$site\"})", &w).is_empty());
    assert!(check_promql("sum by (pool) (gpu_power_w{site=~\"$site\"})", &w).is_empty());
}

#[test]
fn provisioning_files_point_at_the_dashboards_datasources() {
    let ds = std::fs::read_to_string(format!("{DIR}/provisioning/datasources/dynamollm.yaml")).unwrap();
    for uid in ["uid: dynamollm-influx", "uid: dynamollm-vm", "version: Flux", "type: prometheus"] {
        assert!(ds.contains(uid), "{uid}");
    }
    let prov = std::fs::read_to_string(format!("{DIR}/provisioning/dashboards/dynamollm.yaml")).unwrap();
    assert!(prov.contains("type: file") && prov.contains("path:"));
    for (file, uid) in [("influxdb-flux.json", "dynamollm-influx"), ("victoriametrics-promql.json", "dynamollm-vm")] {
        let d = load(file);
        for p in d["panels"].as_array().unwrap() {
            assert_eq!(p["datasource"]["uid"], uid, "{file}");
        }
    }
}
