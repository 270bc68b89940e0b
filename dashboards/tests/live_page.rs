//! The live page in headless Chromium against a loopback server that serves
//! it at `/` and a fixed status at `/api/v1/status`: no console errors, the
//! status's figures in the DOM, and a 401 shown as a visible message.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use dashboards::browser::{check_page, chromium_from_env, png_colours};
use dashboards::live::{check_live, PAGE_HTML};

const STATUS: &str = r#"{"mode":"auto","time_s":86400.0,"telemetry_lag_s":1.5,
"pools":[{"id":0,"name":"SS","classes":["SS","SM"],"instances":2,"gpus":6,"power_w":2345.6,"planned_rps":3.25,
          "capacity_scale":1.4775,"clock_margin":1.1025},
         {"id":1,"name":"LL","classes":["LL"],"instances":1,"gpus":8,"power_w":4100.0,"planned_rps":0.75}],
"instances":[{"id":11,"pool":0,"tp":2,"clock_mhz":1410,"state":"serving","power_w":800.0},
             {"id":12,"pool":0,"tp":4,"clock_mhz":1755,"state":"starting","power_w":1545.6},
             {"id":13,"pool":1,"tp":8,"clock_mhz":1980,"state":"draining","power_w":4100.0},
             {"id":14,"pool":1,"tp":8,"clock_mhz":1980,"state":"serving","power_w":900.0}],
"classes":[{"class":"SS","pool":0,"routed_pool":0,"actual_rps":2.5,"forecast_rps":2.75,"attainment":0.9987},
           {"class":"LL","pool":0,"routed_pool":1,"actual_rps":0.5,"forecast_rps":0.625,"attainment":null}],
"held_retires":[{"instance":14,"since_s":86085.0,"reason":"pool LL serves no class any more (merged)"}],
"totals":{"energy_j":36000000.0,"baseline_energy_j":72000000.0,"power_w":6445.6,"gpus":14,"savings_ratio":0.5},
"history":[{"time_s":86280.0,"power_w":6000.0,"gpus":14,"actual_rps":2.8,"forecast_rps":3.0},
           {"time_s":86340.0,"power_w":6300.0,"gpus":14,"actual_rps":3.0,"forecast_rps":3.1},
           {"time_s":86400.0,"power_w":6445.6,"gpus":14,"actual_rps":3.0,"forecast_rps":3.375}]}"#;

fn serve() -> String {
    let app = Router::new().route("/", get(|| async { Html(PAGE_HTML) })).route(
        "/api/v1/status",
        get(|h: HeaderMap| async move {
            if h.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer s3cret") {
                (StatusCode::OK, [("content-type", "application/json")], STATUS).into_response()
            } else {
                (StatusCode::UNAUTHORIZED, "unauthorised").into_response()
            }
        }),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("#{id}"));
    dom[at..].split_once('>').unwrap().1.split_once('<').unwrap().0
}

#[test]
fn the_live_page_renders_the_status_without_errors() {
    assert!(!PAGE_HTML.contains("<script src") && !PAGE_HTML.contains("<link rel=\"stylesheet\""));
    assert!(!PAGE_HTML.contains("https://"), "no external resources");
    let chromium = chromium_from_env();
    let url = serve();
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("live.png");
    let c = check_page(&chromium, &format!("{url}/?token=s3cret"), &png).unwrap();
    assert!(
        c.console_errors.is_empty() && c.network_errors.is_empty(),
        "{:?} {:?}",
        c.console_errors,
        c.network_errors
    );
    let d = &c.dom;
    assert_eq!(text_of(d, "mode"), "auto");
    assert_eq!(text_of(d, "total-power-w"), "6446 W");
    assert_eq!(text_of(d, "total-gpus"), "14");
    assert_eq!(text_of(d, "energy-kwh"), "10.00 kWh");
    assert_eq!(text_of(d, "baseline-energy-kwh"), "20.00 kWh");
    assert_eq!(text_of(d, "savings-pct"), "50.0%");
    assert_eq!(text_of(d, "telemetry-lag-s"), "1.5");
    assert_eq!(text_of(d, "held-retires"), "1 (oldest 315 s)");
    for cell in [
        "<td>SS SM</td>",
        "<td>2346</td>",
        "<td>3.25</td>",
        "<td>1755</td>",
        "<td>starting</td>",
        "<td>draining</td>",
        "<td>2.75</td>",
        "<td>99.87%</td>",
        "<td>0.63</td>",
        "<td>serving, retire held</td>",
        "<td>1.48</td>",
        "<td>1.103</td>",
        "<td>LL (not yet moved)</td>",
    ] {
        assert!(d.contains(cell), "{cell} in the DOM");
    }
    assert!(d.contains("<polyline"), "sparklines drawn");
    assert!(!d.contains("class=\"error\""), "no error banner");
    assert!(png_colours(&png, 64).unwrap() > 4);
    let live = check_live(&chromium, &url, Some("s3cret"), &png).unwrap();
    assert_eq!((live.mode.as_str(), live.gpus.as_str(), live.savings.as_str()), ("auto", "14", "50.0%"));
    assert!(live.message.is_empty() && live.page.console_errors.is_empty());
}

#[test]
fn a_refused_token_shows_unauthorised_not_a_js_error() {
    let chromium = chromium_from_env();
    let url = serve();
    let dir = tempfile::tempdir().unwrap();
    let live = check_live(&chromium, &url, Some("wrong"), &dir.path().join("u.png")).unwrap();
    assert!(live.message.starts_with("unauthorised") && live.power == "–", "{live:?}");
    let c = live.page;
    assert!(c.console_errors.is_empty(), "{:?}", c.console_errors);
    assert!(c.network_errors.iter().all(|e| e.contains("401")), "{:?}", c.network_errors);
    let msg = text_of(&c.dom, "status-message");
    assert!(msg.starts_with("unauthorised"), "{msg}");
    assert!(c.dom.contains("id=\"status-message\" role=\"alert\" class=\"error\""), "visible");
    assert_eq!(text_of(&c.dom, "total-power-w"), "–");
}
