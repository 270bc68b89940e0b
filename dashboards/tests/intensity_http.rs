//! The Electricity Maps and WattTime clients against recorded-shape response
//! fixtures served on loopback: credentials are sent as each API wants, values
//! parse and convert, and a malformed answer is an error naming source and field.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use dashboards::config::{ElectricityMapsConfig, WattTimeConfig};
use dashboards::intensity::{ElectricityMaps, Signal, WattTime, G_PER_LB};
use std::sync::{Arc, Mutex};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIX}/{name}")).unwrap()
}

/// Serve `route → fixture` on loopback; returns the base URL and what requests came.
fn serve(routes: &[(&'static str, &'static str)]) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let mut app = Router::new();
    for &(path, file) in routes {
        let body = fixture(file);
        app = app.route(
            path,
            get(move |State(seen): State<Seen>, headers: HeaderMap, uri: axum::http::Uri| {
                let body = body.clone();
                async move {
                    seen.lock().unwrap().push((uri.to_string(), headers.clone()));
                    // The APIs refuse calls without credentials.
                    let ok = headers.contains_key("auth-token") || headers.contains_key("authorization");
                    if ok {
                        (StatusCode::OK, [("content-type", "application/json")], body)
                    } else {
                        (StatusCode::UNAUTHORIZED, [("content-type", "application/json")], "{}".to_string())
                    }
                }
            }),
        );
    }
    let app = app.with_state(seen.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    (format!("http://{}", rx.recv().unwrap()), seen)
}

#[test]
fn electricity_maps_latest_history_forecast_with_the_auth_token_header() {
    let (url, seen) = serve(&[
        ("/v3/carbon-intensity/latest", "em-latest.json"),
        ("/v3/carbon-intensity/history", "em-history.json"),
        ("/v3/carbon-intensity/forecast", "em-forecast.json"),
        ("/bad/v3/carbon-intensity/forecast", "em-malformed.json"),
    ]);
    let em = ElectricityMaps::new(ElectricityMapsConfig {
        url: url.clone(),
        zone: "US-CAL-CISO".into(),
        token: "k3y".into(),
    });
    let (t, v) = em.latest().unwrap();
    assert_eq!(v, 218.0);
    assert_eq!(t, 1_715_626_800.0); // 2024-05-13T19:00Z
    let h = em.history(0.0, 0.0).unwrap();
    assert_eq!(h.points.iter().map(|p| p.1).collect::<Vec<_>>(), [262.0, 241.0, 198.0]);
    assert_eq!(h.signal, Signal::Average);
    let f = em.forecast().unwrap();
    assert_eq!(f.points.len(), 3);
    assert_eq!(f.at(1_715_626_800.0 + 3600.0 + 60.0), 150.0);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        for (uri, h) in seen.iter() {
            assert_eq!(h["auth-token"], "k3y", "{uri}");
            assert!(uri.contains("zone=US-CAL-CISO"), "{uri}");
        }
    }
    let bad =
        ElectricityMaps::new(ElectricityMapsConfig { url: format!("{url}/bad"), zone: "Z".into(), token: "k".into() });
    let e = bad.forecast().unwrap_err().to_string();
    assert!(e.contains("electricity-maps") && e.contains("forecast[1].carbonIntensity"), "{e}");
    // Wrong path: an HTTP error naming the source and URL.
    let e = bad.latest().unwrap_err().to_string();
    assert!(e.contains("electricity-maps") && e.contains("404"), "{e}");
}

#[test]
fn watttime_logs_in_with_basic_auth_then_uses_the_bearer_token() {
    let (url, seen) = serve(&[
        ("/login", "wt-login.json"),
        ("/v3/signal-index", "wt-signal-index.json"),
        ("/v3/forecast", "wt-forecast.json"),
        ("/bad/login", "wt-login.json"),
        ("/bad/v3/forecast", "wt-malformed.json"),
    ]);
    let cfg = WattTimeConfig {
        url: url.clone(),
        region: "CAISO_NORTH".into(),
        username: "ann".into(),
        password: "pw".into(),
    };
    let wt = WattTime::new(cfg.clone());
    let (_, pct) = wt.signal_index().unwrap();
    assert_eq!(pct, 37.0);
    let f = wt.forecast().unwrap();
    assert_eq!(f.signal, Signal::Marginal);
    // 1000 lbs/MWh = 453.59237 g/kWh.
    assert!((f.points[2].1 - 1000.0 * G_PER_LB / 1000.0).abs() < 1e-9);
    assert!((f.points[0].1 - 850.0 * 0.45359237).abs() < 1e-9);
    {
        let seen = seen.lock().unwrap();
        // One login, then two data calls.
        assert_eq!(seen.len(), 3, "{:?}", seen.iter().map(|s| &s.0).collect::<Vec<_>>());
        // Basic ann:pw.
        assert_eq!(seen[0].1["authorization"], "Basic YW5uOnB3");
        for (uri, h) in &seen[1..] {
            assert_eq!(h["authorization"], "Bearer eyJhbGciOiJIUzI1NiJ9.fixture-token", "{uri}");
            assert!(uri.contains("region=CAISO_NORTH") && uri.contains("signal_type=co2_moer"), "{uri}");
        }
    }
    let bad = WattTime::new(WattTimeConfig { url: format!("{url}/bad"), ..cfg });
    let e = bad.forecast().unwrap_err().to_string();
    assert!(e.contains("watttime") && e.contains("data[0].value"), "{e}");
}
