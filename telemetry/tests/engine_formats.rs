//! The engine and GPU pages of real deployments, one fixture per format
//! (sources in `tests/fixtures/README.md`): vLLM V1 before 0.10, vLLM 0.10
//! with both gap families, SGLang with per-rank labels, two models on one
//! page, and NVIDIA's DCGM exporter. Each is read as the engine meant it:
//! no family counted twice, no rank counted per rank, no model's queue lost.

use telemetry::dcgm::{parse_dcgm_page, parse_gpu_page, TWIN};
use telemetry::sample::Tags;
use telemetry::scrape::{parse_engine_page, EngineKind, EngineTracker};

const V1: &str = include_str!("fixtures/vllm_v1.txt");
const V010: &str = include_str!("fixtures/vllm_010.txt");
const TWO: &str = include_str!("fixtures/vllm_two_models.txt");
const SGLANG_TP: &str = include_str!("fixtures/sglang_tp.txt");
const DCGM: &str = include_str!("fixtures/dcgm.txt");
const M70: &str = "meta-llama/Llama-3.1-70B-Instruct";

/// The fixtures' histograms: 48 first tokens (sum 2.31 s), 6,326 gaps (sum 131.7 s).
const TTFT_N: f64 = 48.0;
const GAPS_N: f64 = 6326.0;

#[test]
fn vllm_v1_reads_its_older_names() {
    let p = parse_engine_page(V1, "vllm_v1.txt").unwrap();
    assert_eq!(p.kind, EngineKind::Vllm);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let m = &p.models[M70];
    assert_eq!((m.running, m.waiting, m.kv_usage), (Some(21.0), Some(4.0), Some(0.37)));
    assert_eq!(m.ttft.as_ref().unwrap().count, TTFT_N);
    let tbt = m.tbt.as_ref().unwrap();
    assert_eq!(tbt.count, GAPS_N);
    assert!((tbt.sum_s - 131.7).abs() < 1e-9);
}

/// vLLM 0.10 observes every gap twice, as `inter_token_latency_seconds` and
/// the deprecated `time_per_output_token_seconds`: read once, from the new name.
#[test]
fn vllm_010_counts_each_gap_once() {
    assert!(V010.contains("vllm:time_per_output_token_seconds_bucket"));
    assert!(V010.contains("vllm:inter_token_latency_seconds_bucket"));
    let p = parse_engine_page(V010, "vllm_010.txt").unwrap();
    let tbt = p.models[M70].tbt.as_ref().unwrap();
    assert_eq!(tbt.count, GAPS_N, "both gap families were summed");
    assert!((tbt.sum_s - 131.7).abs() < 1e-9);
    let inf = tbt.buckets.last().unwrap();
    assert_eq!((inf.le_s, inf.cumulative), (f64::INFINITY, GAPS_N));
}

/// Every tensor-parallel rank of an SGLang replica reports the replica's
/// requests: counted once per replica (two data-parallel replicas of TP 2
/// here), not once per rank.
#[test]
fn sglang_ranks_are_counted_once_per_replica() {
    let p = parse_engine_page(SGLANG_TP, "sglang_tp.txt").unwrap();
    assert_eq!(p.kind, EngineKind::Sglang);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let m = &p.models[M70];
    assert_eq!(m.running, Some(81.0 + 77.0), "ranks summed: {:?}", m.running);
    assert_eq!(m.waiting, Some(6.0 + 3.0));
    assert_eq!(m.kv_usage, Some(0.52));
    assert_eq!(m.ttft.as_ref().unwrap().count, TTFT_N);
    assert_eq!(m.tbt.as_ref().unwrap().count, GAPS_N);
}

/// Two models on one page keep a queue each, and the tracker gives a sample
/// per model, tagged with it.
#[test]
fn two_models_on_one_page_each_keep_their_queue() {
    let p = parse_engine_page(TWO, "vllm_two_models.txt").unwrap();
    assert_eq!(p.models.len(), 2);
    let small = &p.models["meta-llama/Llama-3.1-8B-Instruct"];
    let big = &p.models[M70];
    assert_eq!((small.running, small.waiting), (Some(5.0), Some(1.0)));
    assert_eq!((big.running, big.waiting), (Some(21.0), Some(4.0)));
    let samples = EngineTracker::new().observe(&p, 0, &Tags::node("dc1", "n1"));
    let by_model: Vec<(Option<String>, Option<f64>)> =
        samples.iter().map(|s| (s.tags.model.clone(), s.running)).collect();
    assert_eq!(
        by_model,
        vec![
            (Some("meta-llama/Llama-3.1-70B-Instruct".into()), Some(21.0)),
            (Some("meta-llama/Llama-3.1-8B-Instruct".into()), Some(5.0))
        ]
    );
}

/// The DCGM exporter's eight GPUs: power in W, the energy counter from mJ to
/// J, SM clock, utilisation from %, the node from `Hostname`; the MIG
/// instance's line is not the board's power.
#[test]
fn dcgm_exporter_gives_each_gpu_its_power_energy_and_clock() {
    let p = parse_dcgm_page(DCGM, "dcgm.txt").unwrap();
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.gpus.len(), 8);
    let g0 = &p.gpus[&0];
    assert_eq!(g0.power_w, Some(612.35), "the MIG line (61.5 W) replaced the board's");
    assert_eq!(g0.energy_j, Some(812_345_678.901));
    assert_eq!((g0.sm_clock_mhz, g0.util, g0.temperature_c), (Some(1980), Some(0.97), Some(48.0)));
    assert_eq!(g0.uuid.as_deref(), Some("GPU-5d1e7c2a-3f4b-4a11-9c70-0a1b2c3d4e00"));
    assert_eq!(p.gpus[&3].sm_clock_mhz, Some(1410));
    let samples = p.samples(5, &Tags::default());
    assert_eq!(samples.len(), 8);
    assert!(samples.iter().all(|s| s.tags.node.as_deref() == Some("dgx-h100-07")));
    assert_eq!(samples.iter().map(|s| s.tags.gpu.unwrap()).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
    // A configured node name wins over the page's Hostname.
    let named = p.samples(5, &Tags::node("dc1", "node7"));
    assert_eq!((named[0].tags.site.as_deref(), named[0].tags.node.as_deref()), (Some("dc1"), Some("node7")));
}

/// An implausible reading is an error naming the line, and the other GPUs
/// are still read; a page with no GPU at all is refused.
#[test]
fn bad_gpu_readings_are_named_and_the_rest_kept() {
    let bad =
        DCGM.replace("} 612.35", "} 9e9").replace("DCGM_FI_DEV_GPU_TEMP{gpu=\"1\"", "DCGM_FI_DEV_GPU_TEMP{gpu=\"x\"");
    let p = parse_dcgm_page(&bad, "bad.txt").unwrap();
    assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
    assert!(p.errors.iter().any(|e| e.to_string().contains("bad.txt line") && e.to_string().contains("9000000000")));
    assert_eq!(p.gpus[&0].power_w, None);
    assert_eq!(p.gpus[&1].power_w, Some(598.1));
    assert!(parse_dcgm_page("# nothing\nfoo 1\n", "empty.txt").is_err());
    // The twin's engine page names its fake GPUs its own way; a DCGM page has none of them.
    assert!(parse_gpu_page(DCGM, "dcgm.txt", &TWIN).is_err());
}
