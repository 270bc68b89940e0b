//! Embedded store benchmarks: batched ingest (target ≥ 1,000,000 samples/s on
//! one core) and a range query over one week of 1-minute data (target ≤ 5 ms).
//!
//! `cargo bench -p telemetry --bench store`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use telemetry::sample::{Point, SeriesKey};
use telemetry::store::{Resolution, Retention, Store};

const SERIES: u32 = 100;
const BATCH: usize = 100_000;

fn keys() -> Vec<SeriesKey> {
    (0..SERIES)
        .map(|i| {
            SeriesKey::new(
                "gpu",
                "power_w",
                &[("site", "s1"), ("node", &format!("n{}", i / 8)), ("gpu", &(i % 8).to_string())],
            )
        })
        .collect()
}

fn retention() -> Retention {
    let long = Duration::from_secs(100 * 365 * 86_400);
    Retention { raw: long, minute: long, hour: long }
}

fn ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_ingest");
    g.sample_size(10).measurement_time(Duration::from_secs(10)).throughput(Throughput::Elements(BATCH as u64));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), retention()).unwrap();
    let ids: Vec<u32> = keys().iter().map(|k| store.series_id(k).unwrap()).collect();
    let mut t: i64 = 1_700_000_000_000;
    g.bench_function(BenchmarkId::new("write_ids", BATCH), |b| {
        b.iter(|| {
            // One durable commit of BATCH points: 100 series × 1000 timestamps.
            let mut batch = Vec::with_capacity(BATCH);
            for _ in 0..BATCH / SERIES as usize {
                t += 10;
                for &id in &ids {
                    batch.push((id, t, 300.0 + (t % 97) as f64));
                }
            }
            store.write_ids(&batch).unwrap();
        })
    });
    let ks = keys();
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::open(dir2.path(), retention()).unwrap();
    let mut t2: i64 = 1_700_000_000_000;
    g.bench_function(BenchmarkId::new("write_points", BATCH), |b| {
        b.iter_batched(
            || {
                let mut batch = Vec::with_capacity(BATCH);
                for _ in 0..BATCH / SERIES as usize {
                    t2 += 10;
                    for k in &ks {
                        batch.push(Point { series: k.clone(), ts_ms: t2, value: 1.0 });
                    }
                }
                batch
            },
            |batch| store2.write(&batch).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn range_query(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), retention()).unwrap();
    let ks = keys();
    let ids: Vec<u32> = ks.iter().map(|k| store.series_id(k).unwrap()).collect();
    let week_min = 7 * 24 * 60;
    let t0: i64 = 1_700_006_400_000; // an hour boundary
                                     // One week of 1-minute data for 100 series, rolled up into the minute table.
    for day in 0..7 {
        let mut batch = Vec::new();
        for m in day * 1440..(day + 1) * 1440 {
            for &id in &ids {
                batch.push((id, t0 + m as i64 * 60_000 + 1_000, m as f64));
            }
        }
        store.write_ids(&batch).unwrap();
    }
    store.maintain(t0 + week_min as i64 * 60_000 + 3_600_000).unwrap();
    let key = &ks[42];
    let end = t0 + week_min as i64 * 60_000;
    assert_eq!(store.range_agg(key, Resolution::Minute, t0, end).unwrap().len(), week_min);
    let mut g = c.benchmark_group("store_range_week");
    g.sample_size(20);
    g.bench_function("minute_rollups", |b| b.iter(|| store.range_agg(key, Resolution::Minute, t0, end).unwrap()));
    g.bench_function("raw_points", |b| b.iter(|| store.range(key, t0, end).unwrap()));
    g.finish();
}

criterion_group!(benches, ingest, range_query);
criterion_main!(benches);
