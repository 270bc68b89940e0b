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
