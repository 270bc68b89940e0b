//! Property tests of the three parsers of outside input — the metrics page,
//! the MQTT payload, the spooled line — with a bounded number of cases so CI
//! time stays small. Each asserts that nothing panics and that the good input
//! around a corrupted piece survives.

use proptest::prelude::*;
use std::path::Path;
use telemetry::mqtt::parse_payload;
use telemetry::sample::Sample;
use telemetry::scrape::parse_engine_page;
use telemetry::sink::check_lines;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn metrics_page_keeps_good_lines_around_garbage(
        values in prop::collection::vec(0u32..100_000, 1..20),
        garbage in "[ -~]{0,60}",
        at in 0usize..20,
    ) {
        let mut lines: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("vllm:num_requests_running{{model_name=\"m{i}\"}} {v}"))
            .collect();
        // Garbage that does not mention the metric (so it cannot pose as one of the good lines).
        let garbage = garbage.replace("vllm", "xxxx");
        lines.insert(at.min(lines.len()), garbage);
        let page = parse_engine_page(&lines.join("\n"), "fuzz").unwrap();
        for (i, v) in values.iter().enumerate() {
            prop_assert_eq!(page.models[&format!("m{i}")].running, Some(f64::from(*v)));
        }
        prop_assert!(page.errors.len() <= 1);
    }

    #[test]
    fn metrics_page_of_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_engine_page(&text, "fuzz");
        let _ = telemetry::scrape::parse_line(&text);
    }

    #[test]
    fn mqtt_payload_keeps_good_entries_around_a_corrupt_one(
        powers in prop::collection::vec(0.0f64..1000.0, 1..10),
        junk in "[ -~]{0,30}",
        at in 0usize..10,
    ) {
        let mut entries: Vec<String> =
            powers.iter().enumerate().map(|(i, p)| format!("{{\"gpu\": {i}, \"power_w\": {p}}}")).collect();
        // The corrupt entry is a JSON string (always valid JSON, never a GPU entry).
        entries.insert(at.min(entries.len()), serde_json::to_string(&junk).unwrap());
        let body = format!("{{\"ts_ms\": 7, \"gpus\": [{}]}}", entries.join(","));
        let (samples, errors) = parse_payload("t", "s", "n", body.as_bytes());
        prop_assert_eq!(errors.len(), 1);
        prop_assert_eq!(samples.len(), powers.len());
        for (i, s) in samples.iter().enumerate() {
            let Sample::Gpu(g) = s else { panic!("gpu samples only") };
            prop_assert_eq!(g.tags.gpu, Some(i as u32));
            prop_assert_eq!(g.power_w, powers[i]);
        }
    }

    #[test]
    fn mqtt_payload_of_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let (samples, errors) = parse_payload("t", "s", "n", &bytes);
        prop_assert!(samples.is_empty() || errors.len() <= samples.len() + 1000);
    }

    #[test]
    fn spool_keeps_good_lines_around_a_corrupt_one(
        values in prop::collection::vec(-1.0e9f64..1.0e9, 1..30),
        junk in "[ -~]{1,40}",
        at in 0usize..30,
    ) {
        let good: Vec<String> = values.iter().enumerate().map(|(i, v)| format!("m,t=a f={v:?} {i}")).collect();
        let mut lines = good.clone();
        // Unbalanced quote: never valid line protocol.
        lines.insert(at.min(lines.len()), format!("m f=\"{}", junk.replace('"', "")));
        let (kept, n, errors) = check_lines(&lines.join("\n"), Path::new("spool/1.lp"));
        prop_assert_eq!(n, good.len());
        prop_assert_eq!(errors.len(), 1);
        prop_assert_eq!(kept, good.iter().map(|l| format!("{l}\n")).collect::<String>());
        let line = at.min(good.len()) + 1;
        let prefix = format!("spool file spool/1.lp line {line}: ");
        prop_assert!(errors[0].to_string().starts_with(&prefix));
    }

    #[test]
    fn spool_of_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let (kept, n, errors) = check_lines(&String::from_utf8_lossy(&bytes), Path::new("f"));
        prop_assert_eq!(kept.lines().count(), n);
        prop_assert!(n + errors.len() <= bytes.len() + 1);
    }
}
