//! The embedded store: round trips, rollups, retention, late points, the
//! forecaster's per-class minute series, the async writer, and crash safety
//! under kill -9.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::class::RequestClass;
use telemetry::ingest::StoreWriter;
use telemetry::sample::{ArrivalSample, Point, Sample, SeriesKey, Tags};
use telemetry::store::{Resolution, Retention, Store};

const H: Duration = Duration::from_secs(3600);
const T0: i64 = 1_700_006_400_000; // an hour boundary

fn long() -> Retention {
    Retention { raw: 1000 * H, minute: 1000 * H, hour: 1000 * H }
}

fn key(node: &str) -> SeriesKey {
    SeriesKey::new("gpu", "power_w", &[("node", node), ("site", "s")])
}

#[test]
fn points_round_trip_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), long()).unwrap();
        let pts: Vec<Point> = (0..100)
            .map(|i| Point { series: key(if i % 2 == 0 { "a" } else { "b" }), ts_ms: T0 + i, value: i as f64 })
            .collect();
        s.write(&pts).unwrap();
    }
    let s = Store::open(dir.path(), long()).unwrap();
    assert_eq!(s.series().len(), 2);
    let a = s.range(&key("a"), T0, T0 + 100).unwrap();
    assert_eq!(a.len(), 50);
    assert_eq!(a[0], (T0, 0.0));
    assert_eq!(a[49], (T0 + 98, 98.0));
    // Half-open ranges.
    assert_eq!(s.range(&key("b"), T0 + 1, T0 + 3).unwrap(), vec![(T0 + 1, 1.0)]);
    assert!(s.range(&key("zzz"), T0, T0 + 100).unwrap().is_empty());
    assert_eq!(s.raw_len().unwrap(), 100);
}

#[test]
fn rollups_match_the_raw_points_and_retention_drops_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let ret = Retention { raw: H, minute: 3 * H, hour: 1000 * H };
    let s = Store::open(dir.path(), ret).unwrap();
    let k = key("a");
    // Four hours, one point every 10 s, value = minute index.
    let pts: Vec<Point> =
        (0..4 * 360).map(|i| Point { series: k.clone(), ts_ms: T0 + i * 10_000, value: (i / 6) as f64 }).collect();
    s.write(&pts).unwrap();
    // Before any maintenance, rollups are computed from raw points.
    let m = s.range_agg(&k, Resolution::Minute, T0, T0 + 4 * 3_600_000).unwrap();
    assert_eq!(m.len(), 240);
    assert_eq!((m[7].ts_ms, m[7].count, m[7].sum, m[7].min, m[7].max), (T0 + 7 * 60_000, 6, 42.0, 7.0, 7.0));
    let now = T0 + 4 * 3_600_000 + 10_000;
    let r = s.maintain(now).unwrap();
    assert_eq!(r.minutes_rolled, 240);
    assert_eq!(r.hours_rolled, 4);
    // Minutes kept three hours: those before now − 3 h (T0 + 1 h + 10 s) go.
    assert_eq!(r.minutes_dropped, 61);
    // Raw kept one hour, dropped by whole blocks (a batch's points of one series
    // within an hour): the first three hours are gone…
    assert_eq!(r.raw_dropped, 3 * 360);
    assert_eq!(s.range(&k, T0, now).unwrap().len(), 360);
    assert_eq!(s.raw_len().unwrap(), 360);
    // …but their minutes and hours remain, equal to what the raw points said.
    let after = s.range_agg(&k, Resolution::Minute, T0 + 3 * 3_600_000 - 600_000, now).unwrap();
    assert_eq!(after.len(), 70);
    assert_eq!(after, m[170..240].to_vec());
    let hours = s.range_agg(&k, Resolution::Hour, T0, now).unwrap();
    assert_eq!(hours.len(), 4);
    for (h, a) in hours.iter().enumerate() {
        let minutes = &m[h * 60..(h + 1) * 60];
        assert_eq!(a.count, 360);
        assert_eq!(a.sum, minutes.iter().map(|m| m.sum).sum::<f64>());
        assert_eq!(a.max, (h * 60 + 59) as f64);
    }
    // An hour later the next hour's minutes go; the hours stay.
    let r = s.maintain(now + 3_600_000).unwrap();
    assert_eq!(r.minutes_dropped, 60);
    assert_eq!(s.range_agg(&k, Resolution::Hour, T0, now).unwrap(), hours);
}

#[test]
fn a_late_point_merges_into_rolled_up_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), long()).unwrap();
    let k = key("a");
    s.write(&[Point { series: k.clone(), ts_ms: T0 + 1_000, value: 2.0 }]).unwrap();
    s.maintain(T0 + 7_200_000).unwrap();
    s.write(&[Point { series: k.clone(), ts_ms: T0 + 2_000, value: 5.0 }]).unwrap();
    let m = s.range_agg(&k, Resolution::Minute, T0, T0 + 60_000).unwrap();
    assert_eq!((m.len(), m[0].count, m[0].sum, m[0].max), (1, 2, 7.0, 5.0));
    let h = s.range_agg(&k, Resolution::Hour, T0, T0 + 3_600_000).unwrap();
    assert_eq!((h[0].count, h[0].sum), (2, 7.0));
}

#[test]
fn class_minute_series_sums_arrivals_over_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), long()).unwrap();
    let ss = RequestClass::parse("SS").unwrap();
    let ll = RequestClass::parse("LL").unwrap();
    let mut pts = Vec::new();
    for (node, class, minute, req) in [("n1", ss, 0, 3.0), ("n2", ss, 0, 4.0), ("n1", ss, 2, 1.0), ("n2", ll, 1, 9.0)] {
        let a = ArrivalSample {
            ts_ms: T0 + minute * 60_000 + 500,
            tags: Tags { class: Some(class), ..Tags::node("s", node) },
            requests: req,
            tokens: req * 100.0,
        };
        pts.extend(Sample::Arrivals(a).points());
    }
    s.write(&pts).unwrap();
    s.maintain(T0 + 90_000).unwrap(); // minute 0 rolled up, minutes 1–2 still raw
    let c = s.class_minute_series(T0, T0 + 3 * 60_000).unwrap();
    assert_eq!(c.len(), 3);
    assert_eq!(c.class_requests(ss), &[7.0, 0.0, 1.0]);
    assert_eq!(c.class_requests(ll), &[0.0, 9.0, 0.0]);
    assert_eq!(c.tokens[ll.index()], vec![0.0, 900.0, 0.0]);
}

#[tokio::test]
async fn the_writer_commits_on_flush() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Store::open(dir.path(), long()).unwrap());
    let w = StoreWriter::spawn(s.clone(), Duration::from_secs(3600), Duration::from_secs(3600));
    w.write((0..10).map(|i| Point { series: key("a"), ts_ms: T0 + i, value: 1.0 }).collect()).await;
    w.flush().await.unwrap();
    assert_eq!(s.raw_len().unwrap(), 10);
    assert_eq!(w.stats.samples(), 10);
}

const CHILD: &str = "DYNAMOLLM_STORE_CRASH_CHILD";
const BATCH: i64 = 2000;

/// Kill -9 a process writing to the store, several times over; after each,
/// every batch it reported committed is there, whole, and no batch is there in
/// part (each write is one transaction), and redb's integrity check passes.
#[test]
fn kill_9_loses_nothing_committed_and_corrupts_nothing() {
    if let Ok(dir) = std::env::var(CHILD) {
        // The child: write batches forever, reporting each commit.
        let first: i64 = std::env::var("DYNAMOLLM_STORE_CRASH_FIRST").unwrap().parse().unwrap();
        let s = Store::open(std::path::Path::new(&dir), long()).unwrap();
        for b in first.. {
            let pts: Vec<Point> = (0..BATCH)
                .map(|i| Point { series: key(&format!("n{}", b % 5)), ts_ms: b * BATCH + i, value: b as f64 })
                .collect();
            s.write(&pts).unwrap();
            println!("ACK {b}");
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<i64> = Vec::new();
    // Seeded kill delays, different phases of the write loop.
    let delays_ms = [150u64, 420, 275, 610];
    let mut next = 0i64;
    for delay in delays_ms {
        let mut child = Command::new(&exe)
            .args(["kill_9_loses_nothing_committed_and_corrupts_nothing", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, dir.path())
            .env("DYNAMOLLM_STORE_CRASH_FIRST", next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Some(b) = line.strip_prefix("ACK ") {
                    let _ = tx.send(b.parse::<i64>().unwrap());
                }
            }
        });
        // Let it commit at least one batch, then a bit more, then kill -9.
        let first_ack = rx.recv_timeout(Duration::from_secs(30)).expect("the child committed nothing");
        acked.push(first_ack);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(delay) {
            if let Ok(b) = rx.recv_timeout(Duration::from_millis(5)) {
                acked.push(b);
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());
        next = acked.iter().max().unwrap() + 2; // the batch after the last ack may be in the file: skip past it
        let mut s = Store::open(dir.path(), long()).unwrap();
        assert!(s.check_integrity().unwrap(), "integrity check failed after kill -9");
        for &b in &acked {
            let pts = s.range(&key(&format!("n{}", b % 5)), b * BATCH, (b + 1) * BATCH).unwrap();
            assert_eq!(pts.len() as i64, BATCH, "acknowledged batch {b} incomplete after kill -9");
            assert!(pts.iter().all(|&(_, v)| v == b as f64));
        }
        // Unacknowledged batches are there whole or not at all.
        let total = s.raw_len().unwrap() as i64;
        assert_eq!(total % BATCH, 0, "a partial batch is visible");
        assert!(total >= acked.len() as i64 * BATCH);
    }
    assert!(acked.len() >= 8, "only {} batches acknowledged", acked.len());
}
