//! Sink throughput to VictoriaMetrics (target ≥ 200,000 points/s): uses the
//! server at `DYNAMOLLM_TEST_VICTORIA_METRICS`, or starts its own from
//! `DYNAMOLLM_TEST_VICTORIA_METRICS_BIN` or `victoria-metrics` on PATH.
//!
//! `cargo bench -p telemetry --bench sink`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use telemetry::sample::{Point, SeriesKey};
use telemetry::sink::{InfluxSink, SinkOptions};

struct Vm {
    url: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn victoria_metrics() -> Vm {
    if let Ok(url) = std::env::var("DYNAMOLLM_TEST_VICTORIA_METRICS") {
        return Vm { url, child: None, _dir: None };
    }
    let bin = std::env::var("DYNAMOLLM_TEST_VICTORIA_METRICS_BIN").unwrap_or_else(|_| "victoria-metrics".into());
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(&bin)
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg(format!("-storageDataPath={}", dir.path().display()))
        .arg("-retentionPeriod=1d")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {bin}: {e} (set DYNAMOLLM_TEST_VICTORIA_METRICS or run under scripts/test)")
        });
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Vm { url: format!("http://127.0.0.1:{port}"), child: Some(child), _dir: Some(dir) }
}

const POINTS: usize = 200_000;

fn sink_throughput(c: &mut Criterion) {
    let vm = victoria_metrics();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let sink = rt.block_on(async {
        InfluxSink::spawn(SinkOptions {
            url: vm.url.clone(),
            org: "dynamollm".into(),
            bucket: "bench".into(),
            token: String::new(),
            batch_points: 50_000,
            batch_interval: Duration::from_millis(500),
            gzip: true,
            timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            spool_dir: spool.path().into(),
            spool_max_bytes: 1 << 30,
        })
        .unwrap()
    });
    let keys: Vec<SeriesKey> = (0..200)
        .map(|i| {
            SeriesKey::new("sinkbench", "power_w", &[("gpu", &(i % 8).to_string()), ("node", &format!("n{}", i / 8))])
        })
        .collect();
    let mut t = telemetry::sample::now_ms() - 3_600_000;
    let mut g = c.benchmark_group("sink_victoria_metrics");
    g.sample_size(10).measurement_time(Duration::from_secs(15)).throughput(Throughput::Elements(POINTS as u64));
    g.bench_function("send_and_flush_200k", |b| {
        b.iter_batched(
            || {
                let mut v = Vec::with_capacity(POINTS);
                for _ in 0..POINTS / keys.len() {
                    t += 1;
                    for k in &keys {
                        v.push(Point { series: k.clone(), ts_ms: t, value: 300.0 });
                    }
                }
                v
            },
            |points| {
                rt.block_on(async {
                    for chunk in points.chunks(10_000) {
                        sink.send(chunk.to_vec()).await;
                    }
                    sink.flush().await;
                })
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
    assert_eq!(sink.stats.points_dropped.get(), 0);
}

criterion_group!(benches, sink_throughput);
criterion_main!(benches);
