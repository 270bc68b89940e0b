//! The live page of `dynamollm demo` in headless Chromium (Debian's
//! `chromium`, from `DYNAMOLLM_TEST_CHROMIUM`): it loads from the running
//! service with no console errors, shows the service's figures, and its
//! screenshot is not blank; without the token it shows "unauthorised"
//! instead of failing.

use clap::Parser;
use dynamollm::cmd::demo::{service_config, DemoArgs};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    demo: DemoArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_live_page_loads_and_shows_the_service() {
    let chromium = dashboards::browser::chromium_from_env();
    let args = Wrap::parse_from(["demo", "--listen", "127.0.0.1:0", "--speed", "20", "--hours", "0.25"]).demo;
    let dir = tempfile::tempdir().unwrap();
    let token = "live-page-token";
    let svc = service::start(service_config(&args, token, dir.path())).await.unwrap();
    let base = format!("http://{}", svc.addr);
    // Let the fleet come up and report.
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let s: serde_json::Value =
            http.get(format!("{base}/api/v1/status")).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        if s["totals"]["power_w"].as_f64().unwrap_or(0.0) > 0.0 && s["history"].as_array().is_some_and(|h| h.len() > 3)
        {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the service never reported power: {s}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let png = dir.path().join("live.png");
    let (c, b, p) = (chromium.clone(), base.clone(), png.clone());
    let live = tokio::task::spawn_blocking(move || dashboards::live::check_live(&c, &b, Some(token), &p))
        .await
        .unwrap()
        .unwrap();
    assert!(live.page.console_errors.is_empty(), "console errors: {:?}", live.page.console_errors);
    assert!(live.page.network_errors.is_empty(), "network errors: {:?}", live.page.network_errors);
    assert!(live.message.is_empty(), "the page says: {}", live.message);
    assert_eq!(live.mode, "auto");
    let gpus: u32 = live.gpus.trim().parse().unwrap_or_else(|_| panic!("GPUs shown as {:?}", live.gpus));
    assert!(gpus > 0 && gpus % 2 == 0, "GPUs shown: {gpus}; status had {}", status["totals"]["gpus"]);
    let watts: f64 = live
        .power
        .trim_end_matches('W')
        .trim()
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("power shown as {:?}", live.power));
    assert!(watts > 0.0, "power shown: {}", live.power);
    assert!(live.savings.ends_with('%'), "savings shown as {:?}", live.savings);
    for pool in status["pools"].as_array().unwrap().iter().filter(|p| p["instances"].as_u64().unwrap_or(0) > 0) {
        let name = pool["name"].as_str().unwrap();
        assert!(live.page.dom.contains(name), "pool {name} is not on the page");
    }
    let colours = dashboards::browser::png_colours(&png, 64).unwrap();
    assert!(colours > 16, "the screenshot has {colours} colours: blank?");

    // Without the token.
    let (c, b, p) = (chromium, base, dir.path().join("nologin.png"));
    let denied = tokio::task::spawn_blocking(move || dashboards::live::check_live(&c, &b, None, &p)).await.unwrap();
    // The page itself needs the token too: a 401 body, nothing of the service shown.
    let d = denied.unwrap();
    assert!(d.page.dom.contains("missing or wrong bearer token"), "{}", d.page.dom);
    assert!(!d.page.dom.contains("total-power-w"), "the live page leaked without a token");
    if std::env::var_os("DYNAMOLLM_KEEP_SCREENSHOT").is_some() {
        std::fs::copy(&png, "/tmp/demo-live.png").unwrap();
    }
    svc.stop().await.unwrap();
}
