//! A `twin serve` engine (OpenAI API and vLLM's `/metrics`) on a loopback
//! port, in the test's runtime: shared by the tests that need a real engine
//! endpoint without starting a process.

use dynamollm::twin_serve::{router, ServeConfig};

/// Serve a twin instance of `tp` GPUs at 1980 MHz and `speed`× real time;
/// returns its base URL.
pub async fn start(tp: u32, speed: f64, model: &str) -> String {
    let cfg = ServeConfig {
        physics: sim::Physics::default_h100_llama70b(),
        tp,
        clock_mhz: 1980,
        speed,
        model: model.into(),
        slo: None,
    };
    let app = router(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// A cluster manager behind the service's webhook backend: a `spawn` starts
/// a twin engine (at `speed`× real time) and answers with its placement
/// (`dc1/node<instance>`, the engine's endpoint); other commands are
/// acknowledged. Returns the webhook URL.
#[allow(dead_code)] // not every test crate that shares this module places engines
pub async fn cluster_manager(speed: f64) -> String {
    use axum::routing::post;
    use axum::Json;
    let app = axum::Router::new().route(
        "/actions",
        post(move |Json(cmd): Json<serde_json::Value>| async move {
            let a = &cmd["action"];
            match a["kind"].as_str() {
                Some("spawn") => {
                    let url = start(a["tp"].as_u64().unwrap() as u32, speed, "llama2-70b").await;
                    Json(serde_json::json!({"placement": {"node": format!("dc1/node{}", a["instance"]), "endpoint": url}}))
                }
                _ => Json(serde_json::json!({})),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/actions", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}
