//! The InfluxDB v2 sink against VictoriaMetrics (which implements
//! `/api/v2/write`): a million samples through a 10-second outage, spool
//! replay with corrupted lines, and the Flux history path against a fake
//! InfluxDB query endpoint.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};
use telemetry::class::RequestClass;
use telemetry::sample::{Point, SeriesKey};
use telemetry::sink::{InfluxHistory, InfluxSink, SinkOptions};

fn options(url: &str, spool: &std::path::Path) -> SinkOptions {
    SinkOptions {
        url: url.into(),
        org: "dynamollm".into(),
        bucket: "telemetry".into(),
        token: String::new(),
        batch_points: 50_000,
        batch_interval: Duration::from_millis(200),
        gzip: true,
        timeout: Duration::from_secs(5),
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
        spool_dir: spool.into(),
        spool_max_bytes: 1 << 30,
    }
}

fn unique() -> String {
    format!("{}{}", std::process::id(), telemetry::sample::now_ms())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_samples_survive_a_ten_second_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = common::victoria_metrics(&dir.path().join("vm"));
    let url = format!("http://127.0.0.1:{}", vm.port);
    let sink = InfluxSink::spawn(options(&url, &dir.path().join("spool"))).unwrap();
    const SERIES: usize = 100;
    const PER_SERIES: usize = 10_000;
    let t0 = telemetry::sample::now_ms() - 3_600_000;
    let keys: Vec<SeriesKey> =
        (0..SERIES).map(|s| SeriesKey::new("outage", "v", &[("series", &s.to_string()), ("site", "s1")])).collect();
    // Chunk c holds timestamps [c×100, c×100+100) of every series: 10,000 points.
    let chunk = |c: usize| -> Vec<Point> {
        let mut v = Vec::with_capacity(SERIES * 100);
        for i in c * 100..(c + 1) * 100 {
            for k in &keys {
                v.push(Point { series: k.clone(), ts_ms: t0 + i as i64, value: i as f64 });
            }
        }
        v
    };
    let chunks = PER_SERIES / 100; // 100 chunks
    let start = Instant::now();
    for c in 0..30 {
        sink.send(chunk(c)).await;
    }
    // Outage: the server stops for 10 s while 40 % of the samples stream in.
    tokio::task::block_in_place(|| vm.stop());
    let down = Instant::now();
    let mut max_spooled = 0;
    for c in 30..70 {
        sink.send(chunk(c)).await;
        tokio::time::sleep(Duration::from_millis(240)).await;
        max_spooled = max_spooled.max(sink.stats.spool_batches.get());
    }
    let remaining = Duration::from_secs(10).saturating_sub(down.elapsed());
    tokio::time::sleep(remaining).await;
    max_spooled = max_spooled.max(sink.stats.spool_batches.get());
    tokio::task::block_in_place(|| vm.start());
    for c in 70..chunks {
        sink.send(chunk(c)).await;
    }
    tokio::time::timeout(Duration::from_secs(60), sink.flush()).await.expect("the sink did not catch up in 60 s");
    let elapsed = start.elapsed();
    assert!(max_spooled > 0, "nothing was spooled during the outage");
    assert!(sink.stats.write_failures.get() > 0);
    assert_eq!(sink.stats.points_written.get(), (SERIES * PER_SERIES) as u64);
    assert_eq!(sink.stats.points_dropped.get(), 0);
    assert_eq!(sink.stats.spool_batches.get(), 0);
    assert_eq!(sink.stats.lag_ms.get(), 0);
    // Every sample is in VictoriaMetrics, with its value.
    let vm_url = url.clone();
    let exported = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let e = common::vm_export(&vm_url, "outage_v");
            let n: usize = e.iter().map(|(_, ts, _)| ts.iter().collect::<BTreeSet<_>>().len()).sum();
            if n >= SERIES * PER_SERIES || Instant::now() > deadline {
                return e;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await
    .unwrap();
    assert_eq!(exported.len(), SERIES);
    for (labels, ts, vals) in &exported {
        assert_eq!(labels.get("site").map(String::as_str), Some("s1"));
        let got: BTreeMap<i64, f64> = ts.iter().copied().zip(vals.iter().copied()).collect();
        assert_eq!(got.len(), PER_SERIES, "series {:?}", labels.get("series"));
        for (i, (t, v)) in got.iter().enumerate() {
            assert_eq!((*t, *v), (t0 + i as i64, i as f64));
        }
    }
    eprintln!("1,000,000 samples with a 10 s outage delivered in {elapsed:?}");
}

#[tokio::test]
async fn corrupt_spooled_lines_are_counted_and_the_good_ones_replayed() {
    let url = common::require_env("DYNAMOLLM_TEST_VICTORIA_METRICS");
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let run = unique();
    let t = telemetry::sample::now_ms() - 60_000;
    // A batch left by an earlier run, with one corrupt line between good ones,
    // and a temporary file a crash left half-written.
    let text = format!(
        "spooltest,run={run} v=1 {t}\nspooltest,run={run} v=\"unterminated {}\nspooltest,run={run} v=3 {}\n",
        t + 1,
        t + 2
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    std::fs::write(spool.join("00000000000000000007.lp.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(spool.join("00000000000000000008.tmp"), b"half a bat").unwrap();
    let sink = InfluxSink::spawn(options(&url, &spool)).unwrap();
    // New points queue behind the spooled batch.
    sink.send(vec![Point { series: SeriesKey::new("spooltest", "v", &[("run", &run)]), ts_ms: t + 3, value: 4.0 }])
        .await;
    tokio::time::timeout(Duration::from_secs(30), sink.flush()).await.unwrap();
    assert_eq!(sink.stats.points_dropped.get(), 1);
    assert_eq!(sink.stats.points_written.get(), 3);
    let err = sink.stats.last_error().unwrap();
    assert!(err.contains("00000000000000000007.lp.gz line 2: "), "{err}");
    assert!(std::fs::read_dir(&spool).unwrap().next().is_none(), "the spool is empty afterwards");
    let e = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let e = common::vm_export(&url, "spooltest_v");
            let mine: Vec<_> = e.into_iter().filter(|(l, _, _)| l.get("run") == Some(&run)).collect();
            if mine.first().is_some_and(|(_, ts, _)| ts.len() >= 3) || Instant::now() > deadline {
                return mine;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
    .await
    .unwrap();
    assert_eq!(e.len(), 1);
    // In order: the spooled good lines, then the new point.
    assert_eq!(e[0].1, vec![t, t + 2, t + 3]);
    assert_eq!(e[0].2, vec![1.0, 3.0, 4.0]);
}

#[tokio::test]
async fn flux_history_reads_per_class_minutes() {
    use axum::routing::post;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let s = seen.clone();
    let csv = "#datatype,string,long,dateTime:RFC3339,double,string,string\n\
               #group,false,false,false,false,true,true\n\
               #default,_result,,,,,\n\
               ,result,table,_time,_value,_field,class\n\
               ,,0,2023-11-15T00:00:00Z,7,requests,SS\n\
               ,,0,2023-11-15T00:02:00Z,1,requests,SS\n\
               ,,1,2023-11-15T00:01:00Z,900,tokens,LL\n\
               ,,1,2023-11-15T00:01:00Z,9,requests,LL\n\n";
    let app = axum::Router::new().route(
        "/api/v2/query",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            s.lock().unwrap().push((auth, body));
            async move { csv }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let h = InfluxHistory::new(&format!("http://{addr}"), "org", "tok", "telemetry").unwrap();
    let t0 = 1_700_006_400_000; // 2023-11-15T00:00:00Z
    let c = h.class_minute_series(t0, t0 + 3 * 60_000).await.unwrap();
    let ss = RequestClass::parse("SS").unwrap();
    let ll = RequestClass::parse("LL").unwrap();
    assert_eq!(c.class_requests(ss), &[7.0, 0.0, 1.0]);
    assert_eq!(c.class_requests(ll), &[0.0, 9.0, 0.0]);
    assert_eq!(c.tokens[ll.index()], vec![0.0, 900.0, 0.0]);
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].0, "Token tok");
    assert!(seen[0].1.contains("from(bucket: \\\"telemetry\\\")"), "{}", seen[0].1);
}
