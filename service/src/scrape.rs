//! The service's own readers of a cluster without agents: every placed
//! engine's `/metrics` page (vLLM or SGLang names; a `twin serve` engine's
//! page also carries its GPUs) and each node's NVIDIA DCGM exporter, turned
//! into the samples an agent would publish, tagged so the core matches them
//! to instances (by instance, else node and GPU). Bad pages and lines are
//! logged with their source and skipped.

use crate::Shared;
use std::sync::Arc;
use std::time::Duration;
use telemetry::sample::Tags;
use tokio::sync::mpsc;

/// The tags of a placement's node: `site/node`, or a bare node name.
pub fn node_tags(node: &str) -> Tags {
    match node.split_once('/') {
        Some((site, n)) => Tags::node(site, n),
        None => Tags { node: Some(node.to_string()), ..Tags::default() },
    }
}

/// Read every placed instance's engine page (`<endpoint>/metrics`, vLLM or
/// SGLang names) and pass its samples on, tagged with the instance's node, as
/// an agent would. Bad pages and lines are logged with their source and skipped.
pub async fn engines(shared: Arc<Shared>, tx: mpsc::Sender<telemetry::sample::Sample>, every: Duration) {
    use telemetry::sample::{Sample, Tags};
    let http = reqwest::Client::builder().timeout(every.max(Duration::from_secs(2))).build().unwrap_or_default();
    let mut trackers: std::collections::HashMap<u32, telemetry::scrape::EngineTracker> = Default::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets: Vec<(u32, String, String)> = match shared.core.lock() {
            Ok(c) => c
                .instances()
                .filter_map(|r| {
                    let p = r.placement.as_ref()?;
                    Some((r.id.0, p.endpoint.clone()?, p.node.clone()))
                })
                .collect(),
            Err(_) => return,
        };
        trackers.retain(|id, _| targets.iter().any(|t| t.0 == *id));
        for (id, endpoint, node) in targets {
            let url = format!("{}/metrics", endpoint.trim_end_matches('/'));
            let text = match telemetry::scrape::fetch(&http, &url).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%url, "engine page: {e}");
                    continue;
                }
            };
            let page = match telemetry::scrape::parse_engine_page(&text, &url) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("{e}");
                    continue;
                }
            };
            for e in &page.errors {
                tracing::warn!("{e}");
            }
            let tags = Tags { instance: Some(format!("i{id}")), ..node_tags(&node) };
            // The twin's engine page also carries its fake GPUs (a real engine's come from DCGM or NVML).
            let twin_gpus = text.contains(telemetry::dcgm::TWIN.power_w);
            if let Some(Ok(gpus)) =
                twin_gpus.then(|| telemetry::dcgm::parse_gpu_page(&text, &url, &telemetry::dcgm::TWIN))
            {
                for s in gpus.samples(telemetry::sample::now_ms(), &tags) {
                    if tx.send(Sample::Gpu(s)).await.is_err() {
                        return;
                    }
                }
            }
            let tracker = trackers.entry(id).or_default();
            let samples = tracker.observe(&page, telemetry::sample::now_ms(), &tags);
            if let Ok(mut core) = shared.core.lock() {
                for (_, ttft, tbt) in &tracker.last_deltas {
                    core.observe_engine_latency(actuators::InstanceId(id), ttft.as_ref(), tbt.as_ref());
                }
            }
            for s in samples {
                if tx.send(Sample::Engine(s)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Read one node's DCGM exporter page every `every` and pass its GPUs'
/// samples on, on the configured node (else the page's `Hostname`): the core
/// matches them to instances by node and GPU index.
pub async fn dcgm(d: crate::config::DcgmExporter, tx: mpsc::Sender<telemetry::sample::Sample>, every: Duration) {
    let http = reqwest::Client::builder().timeout(every.max(Duration::from_secs(2))).build().unwrap_or_default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = match telemetry::scrape::fetch(&http, &d.url).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(url = %d.url, "DCGM exporter: {e}");
                continue;
            }
        };
        let page = match telemetry::dcgm::parse_dcgm_page(&text, &d.url) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        for e in &page.errors {
            tracing::warn!("{e}");
        }
        let base = d.node.as_deref().map(node_tags).unwrap_or_default();
        for s in page.samples(telemetry::sample::now_ms(), &base) {
            if tx.send(telemetry::sample::Sample::Gpu(s)).await.is_err() {
                return;
            }
        }
    }
}
