//! The service's own readers of a cluster without agents: every placed
//! engine's `/metrics` page (vLLM or SGLang names; a `twin serve` engine's
//! page also carries its GPUs) and each node's NVIDIA DCGM exporter, or the
//! same series from a Prometheus-compatible query API that scrapes them
//! (`[telemetry.prometheus]`), turned into the samples an agent would
//! publish, tagged so the core matches them to instances (by instance, else
//! node and GPU). Bad pages, lines and series are logged with their source
//! and skipped.

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
                if !send_gpus(&tx, &gpus, &tags).await {
                    return;
                }
            }
            if !send_engine_page(&shared, &tx, trackers.entry(id).or_default(), id, &page, &tags).await {
                return;
            }
        }
    }
}

/// One engine page of instance `id` (read from the engine, or rebuilt from a
/// query's answer) into samples, through the instance's tracker: its TTFT
/// and TBT deltas to the core's attainment, its samples on `tx`. False once
/// the loop is gone.
async fn send_engine_page(
    shared: &Shared,
    tx: &mpsc::Sender<telemetry::sample::Sample>,
    tracker: &mut telemetry::scrape::EngineTracker,
    id: u32,
    page: &telemetry::scrape::EnginePage,
    tags: &Tags,
) -> bool {
    let samples = tracker.observe(page, telemetry::sample::now_ms(), tags);
    if let Ok(mut core) = shared.core.lock() {
        for (_, ttft, tbt) in &tracker.last_deltas {
            core.observe_engine_latency(actuators::InstanceId(id), ttft.as_ref(), tbt.as_ref());
        }
    }
    for s in samples {
        if tx.send(telemetry::sample::Sample::Engine(s)).await.is_err() {
            return false;
        }
    }
    true
}

/// A GPU page's samples, with the `base` tags, on `tx`. False once the loop is gone.
async fn send_gpus(tx: &mpsc::Sender<telemetry::sample::Sample>, page: &telemetry::dcgm::GpuPage, base: &Tags) -> bool {
    for s in page.samples(telemetry::sample::now_ms(), base) {
        if tx.send(telemetry::sample::Sample::Gpu(s)).await.is_err() {
            return false;
        }
    }
    true
}

/// Warns of each distinct problem once every five minutes (a bad series, or
/// an engine the server does not scrape, would otherwise warn every interval).
#[derive(Default)]
struct Warned(std::collections::HashMap<String, std::time::Instant>);

impl Warned {
    const EVERY: Duration = Duration::from_secs(300);

    fn warn(&mut self, msg: String) {
        let now = std::time::Instant::now();
        if self.0.get(&msg).is_some_and(|t| now.duration_since(*t) < Self::EVERY) {
            tracing::debug!("{msg}");
            return;
        }
        tracing::warn!("{msg}");
        if self.0.len() >= 10_000 {
            self.0.retain(|_, t| now.duration_since(*t) < Self::EVERY);
        }
        self.0.insert(msg, now);
    }
}

/// Read every placed instance's engine and GPU telemetry from a
/// Prometheus-compatible query API (`[telemetry.prometheus]`) every
/// `src.interval`, and pass it on as the engine scrape and the DCGM reader
/// would have (the answer is turned back into the same pages, read by the
/// same code). An engine series (and a twin engine's GPU series) belongs to
/// the placed instance whose endpoint's `host:port` equals its instance
/// label; a DCGM series to the instance placed on the node its node label
/// names (`dc1/node7` ↔ `node7`) that holds its `gpu`. Series of engines and
/// nodes the service placed nothing on are passed over; an instance label
/// two placements share places nothing. A failed query or a bad series is
/// logged, naming the URL and the series, and costs only itself.
pub async fn prometheus(
    shared: Arc<Shared>,
    tx: mpsc::Sender<telemetry::sample::Sample>,
    src: telemetry::prom_query::PromSource,
) {
    use telemetry::prom_query::{endpoint_keys, node_host};
    let mut trackers: std::collections::HashMap<u32, telemetry::scrape::EngineTracker> = Default::default();
    let mut warned = Warned::default();
    let mut tick = tokio::time::interval(src.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let placed: Vec<(u32, Option<String>, String)> = match shared.core.lock() {
            Ok(c) => c
                .instances()
                .filter_map(|r| {
                    let p = r.placement.as_ref()?;
                    Some((r.id.0, p.endpoint.clone(), p.node.clone()))
                })
                .collect(),
            Err(_) => return,
        };
        trackers.retain(|id, _| placed.iter().any(|t| t.0 == *id));
        let pages = match src.read().await {
            Ok(p) => p,
            Err(e) => {
                warned.warn(e.to_string());
                continue;
            }
        };
        for e in &pages.errors {
            warned.warn(e.to_string());
        }
        // Each placed endpoint under the instance labels that may name it.
        let mut owners: std::collections::HashMap<String, Vec<u32>> = Default::default();
        for (id, endpoint, _) in &placed {
            for k in endpoint.as_deref().map(endpoint_keys).unwrap_or_default() {
                owners.entry(k).or_default().push(*id);
            }
        }
        let owner = |key: &str, warned: &mut Warned| -> Option<u32> {
            match owners.get(key).map(Vec::as_slice) {
                Some([one]) => Some(*one),
                Some(many) if many.len() > 1 => {
                    warned.warn(format!(
                        "{}: instance label {key:?} names the endpoints of instances {many:?}; its series place none",
                        src.url
                    ));
                    None
                }
                _ => None,
            }
        };
        let tags_of = |id: u32| {
            let node = placed.iter().find(|p| p.0 == id).map_or("", |p| p.2.as_str());
            Tags { instance: Some(format!("i{id}")), ..node_tags(node) }
        };
        let mut seen: std::collections::HashSet<u32> = Default::default();
        for (key, gpus) in &pages.engine_gpus {
            if let Some(id) = owner(key, &mut warned) {
                if !send_gpus(&tx, gpus, &tags_of(id)).await {
                    return;
                }
            }
        }
        for (key, page) in &pages.engines {
            let Some(id) = owner(key, &mut warned) else { continue };
            seen.insert(id);
            if !send_engine_page(&shared, &tx, trackers.entry(id).or_default(), id, page, &tags_of(id)).await {
                return;
            }
        }
        for (id, endpoint, _) in &placed {
            if let (Some(e), false) = (endpoint, seen.contains(id)) {
                warned.warn(format!(
                    "{}: no engine series of instance i{id} (endpoint {e}, instance label {:?}) yet: does the server scrape it?",
                    src.url,
                    endpoint_keys(e).first().map_or("?", String::as_str)
                ));
            }
        }
        // A node's DCGM GPUs, on each placement node of that name: the core matches them by node and GPU.
        for (host, gpus) in &pages.node_gpus {
            let mut nodes: Vec<&str> =
                placed.iter().filter(|p| node_host(&p.2) == *host).map(|p| p.2.as_str()).collect();
            nodes.sort_unstable();
            nodes.dedup();
            for node in nodes {
                if !send_gpus(&tx, gpus, &node_tags(node)).await {
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
