//! A `twin serve` engine (OpenAI API and vLLM's `/metrics`) on a loopback
//! port, in the test's runtime: shared by the tests that need a real engine
//! endpoint without starting a process.

use dynamollm::twin_serve::{router, ServeConfig};

/// Serve a twin instance of `tp` GPUs at 1980 MHz and `speed`× real time;
/// returns its base URL.
#[allow(dead_code)] // not every test crate that shares this module starts engines itself
pub async fn start(tp: u32, speed: f64, model: &str) -> String {
    start_with_key(tp, speed, model, None).await
}

/// As [`start`], requiring `key` from clients when given.
pub async fn start_with_key(tp: u32, speed: f64, model: &str, key: Option<&str>) -> String {
    let cfg = ServeConfig {
        physics: sim::Physics::default_h100_llama70b(),
        tp,
        clock_mhz: 1980,
        speed,
        model: model.into(),
        slo: None,
        api_key: key.map(str::to_string),
    };
    let app = router(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // As `twin serve` does: each token's small write goes out at once (no Nagle).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// A cluster manager behind the service's webhook backend: a `spawn` starts
/// a twin engine (at `speed`× real time) and answers with its placement
/// (`dc1/node<instance>`, the engine's endpoint); other commands are
/// acknowledged. Returns the webhook URL.
#[allow(dead_code)] // not every test crate that shares this module places engines
pub async fn cluster_manager(speed: f64) -> String {
    cluster_manager_with(speed, 1, None).await
}

/// As [`cluster_manager`], placing `per_node` engines on each 8-GPU node
/// (`dc1/node<k>`, each engine on its own GPUs: TP4 in slots 0–3 and 4–7),
/// each engine requiring `key` when given.
#[allow(dead_code)]
pub async fn cluster_manager_with(speed: f64, per_node: u32, key: Option<&str>) -> String {
    use axum::routing::post;
    use axum::Json;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let placed = Arc::new(AtomicU32::new(0));
    let key: Option<Arc<str>> = key.map(Arc::from);
    let app = axum::Router::new().route(
        "/actions",
        post(move |Json(cmd): Json<serde_json::Value>| {
            let (placed, key) = (placed.clone(), key.clone());
            async move {
                let a = &cmd["action"];
                match a["kind"].as_str() {
                    Some("spawn") => {
                        let tp = a["tp"].as_u64().unwrap() as u32;
                        let url = start_with_key(tp, speed, "llama2-70b", key.as_deref()).await;
                        let k = placed.fetch_add(1, Ordering::SeqCst);
                        let (node, slot) = (k / per_node.max(1), k % per_node.max(1));
                        let gpus: Vec<u32> = (slot * tp..slot * tp + tp).collect();
                        Json(serde_json::json!({"placement": {"node": format!("dc1/node{node}"), "gpus": gpus, "endpoint": url}}))
                    }
                    _ => Json(serde_json::json!({})),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/actions", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// The config of a service (10× service time, state in `dir`) managing an
/// external cluster of twin engines behind the cluster manager at `cm`, its
/// engine pages read every 0.1 s, its router on loopback with `router` keys
/// added, its first fleet planned for `rates` (`MM = 1.0, LL = 0.5`), and
/// `extra` tables appended.
#[allow(dead_code)]
pub fn external_config(
    cm: &str,
    dir: &std::path::Path,
    rates: &str,
    router: &str,
    extra: &str,
) -> service::config::ServiceConfig {
    let text = format!(
        r#"
[service]
listen = "127.0.0.1:0"
token = "t"
state_dir = "{}"
speed = 10.0
stale_after_s = 30.0
initial_class_rps = {{ {rates} }}

[cluster]
kind = "external"
gpus = 1024
scrape_interval_s = 0.1

[router]
listen = "127.0.0.1:0"
{router}

[actuators.webhook]
url = "{cm}"

{extra}
"#,
        dir.display()
    );
    service::config::ServiceConfig::parse(&text, "external.toml").unwrap()
}
