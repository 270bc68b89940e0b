//! A real Prometheus' answer to the service's query (`/api/v1/query`,
//! recorded from Debian's Prometheus 2.42 scraping two `twin serve` engines
//! in `cli/tests/serve_prometheus.rs`; see `tests/fixtures/README.md`) turned
//! back into pages: the same engine page, GPUs and samples as engine A's own
//! `/metrics` page read at the same time, and a bad series costs only itself.

use telemetry::dcgm::parse_gpu_page;
use telemetry::prom_query::{pages, parse_answer, LabelMap, Series};
use telemetry::sample::Tags;
use telemetry::scrape::{parse_engine_page, EngineKind, EngineTracker, ScrapeError};

const ANSWER: &str = include_str!("fixtures/prometheus_query.json");
const PAGE: &str = include_str!("fixtures/prometheus_engine_page.txt");
const URL: &str = "http://127.0.0.1:9090/api/v1/query";
const MODEL: &str = "llama2-70b";

/// Engine A's instance label (the page fixture's first line says it).
fn engine_a() -> String {
    PAGE.lines().next().unwrap().strip_prefix("# instance ").unwrap().to_string()
}

#[test]
fn the_answer_reads_as_the_pages_it_was_scraped_from() {
    let answer = parse_answer(ANSWER, URL).unwrap();
    assert!(answer.errors.is_empty(), "{:?}", answer.errors);
    assert_eq!(answer.series.len(), 200, "100 series of each engine");
    let p = pages(&answer, URL, &LabelMap::default());
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.engines.len(), 2);
    assert_eq!(p.engine_gpus.len(), 2);
    assert!(p.node_gpus.is_empty(), "no DCGM exporter here");
    let a = engine_a();

    // The engine page rebuilt from the answer is the page the engine serves
    // (idle by then: every counter and gauge is where it stopped).
    let from_query = &p.engines[&a];
    let from_page = parse_engine_page(PAGE, "engine A").unwrap();
    assert_eq!(from_query.kind, EngineKind::Vllm);
    assert_eq!(from_query.models, from_page.models);
    let m = &from_query.models[MODEL];
    assert_eq!((m.running, m.waiting, m.kv_usage), (Some(0.0), Some(0.0), Some(0.0)));
    assert_eq!((m.prompt_tokens_total, m.generation_tokens_total), (Some(40209.0), Some(6560.0)));
    // 7 long streams and 24 short requests; every token after a first is a gap.
    let (ttft, tbt) = (m.ttft.as_ref().unwrap(), m.tbt.as_ref().unwrap());
    assert_eq!((ttft.count, tbt.count), (31.0, 6529.0));
    assert_eq!(ttft.buckets.len(), 23, "vLLM's 22 TTFT bounds and +Inf");

    // The same samples through the same tracker.
    let tags = Tags { instance: Some("i0".into()), ..Tags::default() };
    let (mut t1, mut t2) = (EngineTracker::new(), EngineTracker::new());
    assert_eq!(t1.observe(from_query, 1, &tags), t2.observe(&from_page, 1, &tags));

    // Its GPUs: the twin's own, eight at the same power and clock; the
    // energy counter read a little later on the page.
    let gq = &p.engine_gpus[&a];
    let gp = parse_gpu_page(PAGE, "engine A", &telemetry::dcgm::TWIN).unwrap();
    assert_eq!(gq.gpus.len(), 8);
    for (i, g) in &gq.gpus {
        let h = &gp.gpus[i];
        assert_eq!((g.power_w, g.sm_clock_mhz), (h.power_w, h.sm_clock_mhz));
        let (e1, e2) = (g.energy_j.unwrap(), h.energy_j.unwrap());
        assert!(e1 > 0.0 && e1 <= e2 && e2 - e1 < 90.0 * 5.0, "GPU {i}: {e1} J then {e2} J");
    }
    let samples = gq.samples(5, &tags);
    assert_eq!(samples.len(), 8);
    assert!(samples.iter().all(|s| s.power_w == 90.0 && s.tags.instance.as_deref() == Some("i0")));
}

#[test]
fn a_bad_series_costs_only_itself_and_is_named() {
    let a = engine_a();
    let running = format!(
        r#"{{"metric":{{"__name__":"vllm:num_requests_running","instance":"{a}","job":"engines","model_name":"llama2-70b"}},"value":["#
    );
    let at = ANSWER.find(&running).expect("engine A's running gauge");
    let value_start = at + running.len();
    let close = value_start + ANSWER[value_start..].find(']').unwrap();
    let broken = format!("{}1.5,\"-3\"{}", &ANSWER[..value_start], &ANSWER[close..]);
    let answer = parse_answer(&broken, URL).unwrap();
    let p = pages(&answer, URL, &LabelMap::default());
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    match &p.errors[0] {
        ScrapeError::Series { url, series, problem } => {
            assert_eq!(url, URL);
            assert!(series.starts_with("vllm:num_requests_running{") && series.contains(&a), "{series}");
            assert!(problem.contains("negative"), "{problem}");
        }
        other => panic!("{other}"),
    }
    let m = &p.engines[&a].models[MODEL];
    assert_eq!((m.running, m.waiting), (None, Some(0.0)), "only the bad gauge is gone");
    assert_eq!(m.ttft.as_ref().unwrap().count, 31.0);
    assert_eq!(p.engines.len(), 2);

    // A value that is not a number is refused as it is read, named the same way.
    let broken = broken.replacen("\"-3\"", "\"lots\"", 1);
    let answer = parse_answer(&broken, URL).unwrap();
    assert_eq!(answer.series.len(), 199);
    let e = answer.errors[0].to_string();
    assert!(e.starts_with(&format!("query {URL} series vllm:num_requests_running{{")), "{e}");
    assert!(e.ends_with("value \"lots\" is not a number"), "{e}");
}

#[test]
fn dcgm_series_are_placed_by_node_and_gpu() {
    let s = |name: &str, labels: &[(&str, &str)], value: f64| Series {
        name: name.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        value,
    };
    let answer = telemetry::prom_query::Answer {
        series: vec![
            s("DCGM_FI_DEV_POWER_USAGE", &[("gpu", "0"), ("Hostname", "Node7"), ("instance", "node7:9400")], 410.5),
            s("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", &[("gpu", "0"), ("Hostname", "node7")], 5_000_000.0),
            s("DCGM_FI_DEV_SM_CLOCK", &[("gpu", "0"), ("Hostname", "node7")], 1755.0),
            // No Hostname: the exporter's instance label's host places it.
            s("DCGM_FI_DEV_POWER_USAGE", &[("gpu", "1"), ("instance", "node8:9400")], 300.0),
            // A MIG slice is not the board; a GPU without an index cannot be placed.
            s("DCGM_FI_DEV_POWER_USAGE", &[("gpu", "2"), ("GPU_I_ID", "1"), ("Hostname", "node7")], 50.0),
            s("DCGM_FI_DEV_POWER_USAGE", &[("Hostname", "node7")], 50.0),
            s("DCGM_FI_DEV_POWER_USAGE", &[("gpu", "3"), ("Hostname", "node7")], 1e9),
            s("DCGM_FI_DEV_POWER_USAGE", &[("gpu", "4")], 300.0),
            s("node_load1", &[("instance", "node7:9100")], 3.0),
        ],
        errors: vec![],
    };
    let p = pages(&answer, URL, &LabelMap::default());
    assert_eq!(p.node_gpus.keys().collect::<Vec<_>>(), ["node7", "node8"]);
    let g = &p.node_gpus["node7"].gpus[&0];
    assert_eq!((g.power_w, g.energy_j, g.sm_clock_mhz), (Some(410.5), Some(5000.0), Some(1755)));
    assert_eq!(p.node_gpus["node7"].gpus.len(), 1);
    assert_eq!(p.node_gpus["node8"].gpus[&1].power_w, Some(300.0));
    let errors: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors.iter().any(|e| e.contains("has no numeric gpu label")), "{errors:#?}");
    assert!(errors.iter().any(|e| e.contains("{gpu=\"3\",Hostname=\"node7\"}") && e.contains("outside")));
    assert!(errors.iter().any(|e| e.contains("has no Hostname label")), "{errors:#?}");
    // A node label by another name.
    let other = LabelMap { node: "host".into(), ..LabelMap::default() };
    let answer = telemetry::prom_query::Answer {
        series: vec![s("DCGM_FI_DEV_POWER_USAGE", &[("gpu", "0"), ("host", "n9")], 200.0)],
        errors: vec![],
    };
    assert_eq!(pages(&answer, URL, &other).node_gpus["n9"].gpus[&0].power_w, Some(200.0));
}
