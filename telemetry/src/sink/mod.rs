//! The InfluxDB v2 sink: points become line protocol (written by the
//! `influxdb2` crate's `DataPoint`), batched by size and interval, gzipped, and
//! posted to `/api/v2/write` with a timeout and retries with backoff. During
//! an outage, batches spool to disk and are replayed in order when the server
//! answers again; lag and spool size are exported as Prometheus gauges.
//!
//! Why not the `influxdb2` crate's own write call: its gzip compresses at the
//! highest (slowest) level, which caps a sink near the server's speed at a few
//! ten thousand points per second, and its public write calls cannot send an
//! already-compressed body — which is what the spool holds. So the crate
//! writes the line protocol and answers Flux queries ([`InfluxHistory`]), and
//! reqwest posts the gzipped batches (flate2 at its fast level).
//!
//! Spool: one file per batch, `<spool_dir>/<seq>.lp.gz` (`.lp` without gzip),
//! written to a temporary name, fsynced and renamed, so a crash never leaves a
//! half batch. On replay each line is checked with InfluxData's line-protocol
//! parser; a bad line is an error naming the file and line, is counted and
//! dropped, and the good lines of the batch are still sent.

use crate::class::RequestClass;
use crate::sample::{measurement, now_ms, Point};
use crate::series::ClassSeries;
use bytes::Bytes;
use flate2::write::GzEncoder;
use influxdb2::models::{DataPoint, WriteDataPoint};
use prometheus::{IntCounter, IntGauge, Registry};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

mod history;
mod spool;
pub use history::InfluxHistory;
pub use spool::Backoff;
use spool::{gunzip, gzip, Spool};

/// A sink failure.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The configuration cannot work.
    #[error("influx sink: {0}")]
    Config(String),
    /// The spool directory or a spool file.
    #[error("spool {path}: {source}")]
    Spool {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A spooled line that is not valid line protocol.
    #[error("spool file {path} line {line}: {problem}")]
    SpoolLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// A write the server refused or that did not arrive.
    #[error("influx write to {url}: {problem}")]
    Write {
        /// The server.
        url: String,
        /// What happened.
        problem: String,
        /// Whether retrying can help.
        retryable: bool,
    },
    /// A Flux query failed.
    #[error("influx query at {url}: {problem}")]
    Query {
        /// The server.
        url: String,
        /// What happened.
        problem: String,
    },
    /// A point that cannot be written as line protocol (dropped).
    #[error("point {series}: {problem}")]
    Point {
        /// The series.
        series: String,
        /// Why.
        problem: String,
    },
}

/// What the sink needs; [`crate::config::InfluxConfig`] converts into it.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Server base URL.
    pub url: String,
    /// Organisation.
    pub org: String,
    /// Bucket.
    pub bucket: String,
    /// API token (empty: none).
    pub token: String,
    /// Points per batch.
    pub batch_points: usize,
    /// Longest a point waits for its batch to fill.
    pub batch_interval: Duration,
    /// Gzip request bodies.
    pub gzip: bool,
    /// Timeout of one write.
    pub timeout: Duration,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Spool size limit, bytes (oldest batches dropped past it, and counted).
    pub spool_max_bytes: u64,
}

impl SinkOptions {
    /// Options from the `[telemetry.influx]` table; `None` when no URL is set.
    pub fn from_config(c: &crate::config::InfluxConfig) -> Option<SinkOptions> {
        Some(SinkOptions {
            url: c.url.clone()?,
            org: c.org.clone(),
            bucket: c.bucket.clone(),
            token: c.token.clone(),
            batch_points: c.batch_points,
            batch_interval: Duration::from_millis(c.batch_interval_ms),
            gzip: c.gzip,
            timeout: Duration::from_millis(c.timeout_ms),
            retry_initial: Duration::from_millis(c.retry_initial_ms),
            retry_max: Duration::from_millis(c.retry_max_ms),
            spool_dir: c.spool_dir.clone(),
            spool_max_bytes: c.spool_max_mb.saturating_mul(1 << 20),
        })
    }
}

/// The sink's counters and gauges (Prometheus types; register them to export).
#[derive(Debug)]
pub struct SinkStats {
    /// Points accepted.
    pub points_in: IntCounter,
    /// Points the server acknowledged.
    pub points_written: IntCounter,
    /// Failed write attempts.
    pub write_failures: IntCounter,
    /// Points dropped: bad points, bad spooled lines, batches refused as malformed, spool overflow.
    pub points_dropped: IntCounter,
    /// Bytes in the spool.
    pub spool_bytes: IntGauge,
    /// Batches in the spool.
    pub spool_batches: IntGauge,
    /// Age of the oldest batch not yet acknowledged, ms (0 when caught up).
    pub lag_ms: IntGauge,
    last_error: Mutex<Option<String>>,
}

impl SinkStats {
    fn new() -> SinkStats {
        let c = |n: &str, h: &str| IntCounter::new(n, h).expect("valid metric");
        let g = |n: &str, h: &str| IntGauge::new(n, h).expect("valid metric");
        SinkStats {
            points_in: c("dynamollm_influx_points_in_total", "Points accepted by the InfluxDB sink"),
            points_written: c("dynamollm_influx_points_written_total", "Points acknowledged by the server"),
            write_failures: c("dynamollm_influx_write_failures_total", "Failed write attempts"),
            points_dropped: c("dynamollm_influx_points_dropped_total", "Points dropped as malformed or overflow"),
            spool_bytes: g("dynamollm_influx_spool_bytes", "Bytes waiting in the spool"),
            spool_batches: g("dynamollm_influx_spool_batches", "Batches waiting in the spool"),
            lag_ms: g("dynamollm_influx_lag_ms", "Age of the oldest batch not yet written, ms"),
            last_error: Mutex::new(None),
        }
    }

    fn error(&self, e: &SinkError) {
        tracing::warn!("{e}");
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(e.to_string());
        }
    }

    /// The last error's message.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }

    /// Register every metric with a Prometheus registry.
    pub fn register(&self, r: &Registry) -> prometheus::Result<()> {
        for c in [&self.points_in, &self.points_written, &self.write_failures, &self.points_dropped] {
            r.register(Box::new(c.clone()))?;
        }
        for g in [&self.spool_bytes, &self.spool_batches, &self.lag_ms] {
            r.register(Box::new(g.clone()))?;
        }
        Ok(())
    }
}

/// Append one point as a line of line protocol (ms precision). Non-finite
/// values and points without a field name cannot be written.
pub fn encode_point(p: &Point, out: &mut Vec<u8>) -> Result<(), SinkError> {
    let bad = |problem: &str| SinkError::Point { series: p.series.to_string(), problem: problem.into() };
    if !p.value.is_finite() {
        return Err(bad("value is not finite"));
    }
    if p.series.measurement.is_empty() || p.series.field.is_empty() {
        return Err(bad("empty measurement or field name"));
    }
    let mut b = DataPoint::builder(p.series.measurement.as_str());
    for (k, v) in &p.series.tags {
        if !k.is_empty() && !v.is_empty() {
            b = b.tag(k.as_str(), v.as_str());
        }
    }
    let dp = b.field(p.series.field.as_str(), p.value).timestamp(p.ts_ms).build().map_err(|e| bad(&e.to_string()))?;
    dp.write_data_point_to(&mut *out).map_err(|e| bad(&e.to_string()))
}

/// Check each line of a line-protocol body; returns the good lines (joined,
/// newline-terminated), their count, and one error per bad line.
pub fn check_lines(text: &str, path: &Path) -> (String, usize, Vec<SinkError>) {
    let mut good = String::with_capacity(text.len());
    let mut n_good = 0;
    let mut errors = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let problem = match influxdb_line_protocol::parse_lines(line).next() {
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(e.to_string()),
            None => Some("not a line-protocol line".to_string()),
        };
        match problem {
            None => {
                good.push_str(line);
                good.push('\n');
                n_good += 1;
            }
            Some(problem) => errors.push(SinkError::SpoolLine { path: path.into(), line: i + 1, problem }),
        }
    }
    (good, n_good, errors)
}

struct Batch {
    seq: u64,
    body: Bytes,
    points: u64,
    sealed_ms: i64,
}

enum Msg {
    Points(Vec<Point>),
    Flush(oneshot::Sender<()>),
}

enum ShipMsg {
    Batch(Batch),
    Flush(oneshot::Sender<()>),
}

/// The InfluxDB v2 sink. Cheap to clone; the tasks stop when every clone is
/// dropped (after sending or spooling what they hold).
#[derive(Clone)]
pub struct InfluxSink {
    tx: mpsc::Sender<Msg>,
    /// Counters and gauges.
    pub stats: Arc<SinkStats>,
}

impl InfluxSink {
    /// Start the sink on the current tokio runtime. Batches left in the spool
    /// by an earlier run are sent first.
    pub fn spawn(opts: SinkOptions) -> Result<InfluxSink, SinkError> {
        let base = reqwest::Url::parse(&opts.url).map_err(|e| SinkError::Config(format!("url {:?}: {e}", opts.url)))?;
        if opts.batch_points == 0 {
            return Err(SinkError::Config("batch_points must be at least 1".into()));
        }
        let mut write_url = base.join("/api/v2/write").map_err(|e| SinkError::Config(e.to_string()))?;
        write_url
            .query_pairs_mut()
            .append_pair("org", &opts.org)
            .append_pair("bucket", &opts.bucket)
            .append_pair("precision", "ms");
        let client = reqwest::Client::builder()
            .timeout(opts.timeout)
            .build()
            .map_err(|e| SinkError::Config(format!("HTTP client: {e}")))?;
        let spool = Spool::open(&opts.spool_dir, opts.gzip, opts.spool_max_bytes)?;
        let stats = Arc::new(SinkStats::new());
        stats.spool_bytes.set(spool.bytes as i64);
        stats.spool_batches.set(spool.files.len() as i64);
        let (tx, rx) = mpsc::channel(64);
        let (ship_tx, ship_rx) = mpsc::channel(8);
        let next_seq = spool.next_seq();
        tokio::spawn(batcher(opts.clone(), rx, ship_tx, stats.clone(), next_seq));
        let shipper = Shipper { opts, client, write_url: write_url.to_string(), spool, stats: stats.clone() };
        tokio::spawn(shipper.run(ship_rx));
        Ok(InfluxSink { tx, stats })
    }

    /// Queue points (waits when the sink is this far behind its queue bound).
    pub async fn send(&self, points: Vec<Point>) {
        let _ = self.tx.send(Msg::Points(points)).await;
    }

    /// Queue points without waiting: when the sink's queue is full (its
    /// batcher far behind) they are dropped and counted in `points_dropped`.
    pub fn try_send(&self, points: Vec<Point>) -> bool {
        let n = points.len() as u64;
        match self.tx.try_send(Msg::Points(points)) {
            Ok(()) => true,
            Err(_) => {
                self.stats.points_dropped.inc_by(n);
                false
            }
        }
    }

    /// Seal the current batch and wait until everything queued so far has been
    /// acknowledged by the server (through the spool if there is an outage).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn batcher(
    opts: SinkOptions,
    mut rx: mpsc::Receiver<Msg>,
    out: mpsc::Sender<ShipMsg>,
    stats: Arc<SinkStats>,
    mut seq: u64,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(opts.batch_points * 100);
    let mut n: u64 = 0;
    let mut deadline: Option<tokio::time::Instant> = None;
    let seal = |buf: &mut Vec<u8>, n: &mut u64, seq: &mut u64| -> Batch {
        let raw = std::mem::replace(buf, Vec::with_capacity(opts.batch_points * 100));
        let body = if opts.gzip { gzip(&raw) } else { raw };
        let b = Batch { seq: *seq, body: Bytes::from(body), points: *n, sealed_ms: now_ms() };
        *seq += 1;
        *n = 0;
        b
    };
    loop {
        let msg = match deadline {
            Some(d) => tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep_until(d) => {
                    deadline = None;
                    if n > 0 && out.send(ShipMsg::Batch(seal(&mut buf, &mut n, &mut seq))).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match msg {
            Some(Msg::Points(points)) => {
                stats.points_in.inc_by(points.len() as u64);
                for p in &points {
                    let before = buf.len();
                    match encode_point(p, &mut buf) {
                        Ok(()) => n += 1,
                        Err(e) => {
                            buf.truncate(before);
                            stats.points_dropped.inc();
                            stats.error(&e);
                        }
                    }
                    if n as usize >= opts.batch_points {
                        deadline = None;
                        if out.send(ShipMsg::Batch(seal(&mut buf, &mut n, &mut seq))).await.is_err() {
                            return;
                        }
                    }
                }
                if n > 0 && deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + opts.batch_interval);
                }
            }
            Some(Msg::Flush(done)) => {
                deadline = None;
                if n > 0 && out.send(ShipMsg::Batch(seal(&mut buf, &mut n, &mut seq))).await.is_err() {
                    return;
                }
                if out.send(ShipMsg::Flush(done)).await.is_err() {
                    return;
                }
            }
            None => {
                if n > 0 {
                    let _ = out.send(ShipMsg::Batch(seal(&mut buf, &mut n, &mut seq))).await;
                }
                return;
            }
        }
    }
}

struct Shipper {
    opts: SinkOptions,
    client: reqwest::Client,
    write_url: String,
    spool: Spool,
    stats: Arc<SinkStats>,
}

impl Shipper {
    async fn run(mut self, mut rx: mpsc::Receiver<ShipMsg>) {
        let mut backoff = Backoff::new(self.opts.retry_initial, self.opts.retry_max);
        let mut waiting_flushes: Vec<oneshot::Sender<()>> = Vec::new();
        let mut open = true;
        loop {
            self.update_gauges();
            if self.spool.files.is_empty() {
                for f in waiting_flushes.drain(..) {
                    let _ = f.send(());
                }
                if !open {
                    return;
                }
                match rx.recv().await {
                    Some(ShipMsg::Batch(b)) => {
                        self.stats.lag_ms.set((now_ms() - b.sealed_ms).max(0));
                        match self.post(b.body.clone()).await {
                            Ok(()) => {
                                backoff.reset();
                                self.stats.points_written.inc_by(b.points);
                            }
                            Err(e) => self.failed(e, Some(&b)),
                        }
                    }
                    Some(ShipMsg::Flush(done)) => waiting_flushes.push(done),
                    None => open = false,
                }
                continue;
            }
            // Replay the oldest spooled batch; on failure wait, spooling what comes meanwhile.
            let (&seq, _) = self.spool.files.first_key_value().expect("not empty");
            match self.replay(seq).await {
                Ok(()) => {
                    backoff.reset();
                    continue;
                }
                Err(e) => {
                    self.failed(e, None);
                    let sleep = tokio::time::sleep(backoff.next_delay());
                    tokio::pin!(sleep);
                    loop {
                        if !open {
                            sleep.as_mut().await;
                            break;
                        }
                        tokio::select! {
                            _ = &mut sleep => break,
                            m = rx.recv() => match m {
                                Some(ShipMsg::Batch(b)) => self.spool_batch(&b),
                                Some(ShipMsg::Flush(done)) => waiting_flushes.push(done),
                                None => open = false,
                            },
                        }
                        self.update_gauges();
                    }
                }
            }
        }
    }

    fn update_gauges(&self) {
        self.stats.spool_bytes.set(self.spool.bytes as i64);
        self.stats.spool_batches.set(self.spool.files.len() as i64);
        let lag = self.spool.files.values().next().map(|f| (now_ms() - f.sealed_ms).max(0)).unwrap_or(0);
        self.stats.lag_ms.set(lag);
    }

    fn failed(&mut self, e: SinkError, batch: Option<&Batch>) {
        self.stats.write_failures.inc();
        self.stats.error(&e);
        let retryable = matches!(e, SinkError::Write { retryable: true, .. });
        if let Some(b) = batch {
            if retryable {
                self.spool_batch(b);
            } else {
                self.stats.points_dropped.inc_by(b.points);
            }
        }
    }

    fn spool_batch(&mut self, b: &Batch) {
        match self.spool.push(b) {
            Ok(dropped) => {
                if dropped > 0 {
                    self.stats.points_dropped.inc_by(dropped);
                    self.stats.error(&SinkError::Config(format!(
                        "spool over {} bytes: oldest batches dropped ({dropped} points)",
                        self.spool.max_bytes
                    )));
                }
            }
            Err(e) => {
                // The disk refused: the batch is lost; say so.
                self.stats.points_dropped.inc_by(b.points);
                self.stats.error(&e);
            }
        }
    }

    async fn replay(&mut self, seq: u64) -> Result<(), SinkError> {
        let f = &self.spool.files[&seq];
        let path = f.path.clone();
        let known_points = f.points;
        let gz = path.extension().is_some_and(|e| e == "gz");
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, Vec<u8>)> {
                let body = std::fs::read(&path)?;
                let text = if gz { gunzip(&body)? } else { body.clone() };
                Ok((body, text))
            })
            .await
        };
        let (body, text) = match read {
            Ok(Ok(x)) => x,
            Ok(Err(source)) => {
                // Unreadable (e.g. a corrupt gzip stream): count it and move on.
                self.stats.error(&SinkError::Spool { path, source });
                self.stats.points_dropped.inc_by(known_points.max(1));
                self.spool.remove(seq);
                return Ok(());
            }
            Err(e) => return Err(SinkError::Config(e.to_string())),
        };
        let text = String::from_utf8_lossy(&text);
        let (good, n_good, errors) = check_lines(&text, &path);
        for e in &errors {
            self.stats.error(e);
        }
        self.stats.points_dropped.inc_by(errors.len() as u64);
        let body = if errors.is_empty() {
            Bytes::from(body)
        } else if gz {
            Bytes::from(gzip(good.as_bytes()))
        } else {
            Bytes::from(good.into_bytes())
        };
        if n_good > 0 {
            match self.post(body).await {
                Ok(()) => {}
                Err(e @ SinkError::Write { retryable: false, .. }) => {
                    self.stats.points_dropped.inc_by(n_good as u64);
                    self.stats.error(&e);
                    self.spool.remove(seq);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        self.stats.points_written.inc_by(n_good as u64);
        self.spool.remove(seq);
        Ok(())
    }

    async fn post(&self, body: Bytes) -> Result<(), SinkError> {
        let mut req = self
            .client
            .post(&self.write_url)
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body);
        if self.opts.gzip {
            req = req.header(reqwest::header::CONTENT_ENCODING, "gzip");
        }
        if !self.opts.token.is_empty() {
            req = req.header(reqwest::header::AUTHORIZATION, format!("Token {}", self.opts.token));
        }
        let err =
            |problem: String, retryable: bool| SinkError::Write { url: self.opts.url.clone(), problem, retryable };
        let resp = req.send().await.map_err(|e| err(e.to_string(), true))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        let text: String = text.chars().take(300).collect();
        // 400/413/422: the batch itself is refused; retrying cannot help. Anything
        // else (5xx, 429, auth or bucket errors an operator can fix) is retried.
        let permanent = matches!(status.as_u16(), 400 | 413 | 422);
        Err(err(format!("HTTP {status}: {text}"), !permanent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::SeriesKey;

    #[test]
    fn points_encode_as_line_protocol_and_bad_ones_are_refused() {
        let p =
            Point { series: SeriesKey::new("gpu", "power_w", &[("node", "n 1"), ("gpu", "0")]), ts_ms: 5, value: 2.5 };
        let mut out = Vec::new();
        encode_point(&p, &mut out).unwrap();
        assert_eq!(String::from_utf8(out.clone()).unwrap(), "gpu,gpu=0,node=n\\ 1 power_w=2.5 5\n");
        let nan = Point { value: f64::NAN, ..p };
        let e = encode_point(&nan, &mut out).unwrap_err();
        assert!(e.to_string().contains("not finite"), "{e}");
    }

    #[test]
    fn bad_spool_lines_are_named_and_the_good_ones_kept() {
        let text = "a,t=1 v=1 1\nthis is not line protocol\na,t=1 v=2 2\n";
        let (good, n, errors) = check_lines(text, Path::new("/s/1.lp"));
        assert_eq!(n, 2);
        assert_eq!(good, "a,t=1 v=1 1\na,t=1 v=2 2\n");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().starts_with("spool file /s/1.lp line 2: "), "{}", errors[0]);
    }

    fn opts(batch_points: usize) -> SinkOptions {
        SinkOptions {
            url: "http://127.0.0.1:1".into(),
            org: "o".into(),
            bucket: "b".into(),
            token: String::new(),
            batch_points,
            batch_interval: Duration::from_secs(1),
            gzip: false,
            timeout: Duration::from_secs(1),
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(2),
            spool_dir: PathBuf::from("/nonexistent"),
            spool_max_bytes: 1 << 20,
        }
    }

    fn pts(n: usize) -> Vec<Point> {
        (0..n).map(|i| Point { series: SeriesKey::new("m", "f", &[]), ts_ms: i as i64, value: 1.0 }).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn batches_seal_by_size_and_by_interval() {
        let (tx, rx) = mpsc::channel(8);
        let (stx, mut srx) = mpsc::channel(8);
        tokio::spawn(batcher(opts(3), rx, stx, Arc::new(SinkStats::new()), 5));
        tx.send(Msg::Points(pts(2))).await.ok().unwrap();
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert!(srx.try_recv().is_err(), "sealed before the interval");
        tokio::time::sleep(Duration::from_millis(2)).await;
        let Some(ShipMsg::Batch(b)) = srx.recv().await else { panic!("a batch") };
        assert_eq!((b.seq, b.points), (5, 2));
        assert_eq!(std::str::from_utf8(&b.body).unwrap().lines().count(), 2);
        // A full batch goes at once; the rest waits for the interval.
        tx.send(Msg::Points(pts(4))).await.ok().unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let Ok(ShipMsg::Batch(b)) = srx.try_recv() else { panic!("a full batch at once") };
        assert_eq!((b.seq, b.points), (6, 3));
        assert!(srx.try_recv().is_err());
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let Ok(ShipMsg::Batch(b)) = srx.try_recv() else { panic!("the rest after the interval") };
        assert_eq!((b.seq, b.points), (7, 1));
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn flux_query_names_bucket_range_and_fields() {
        let h = InfluxHistory::new("http://127.0.0.1:1", "o", "", "tele").unwrap();
        let q = h.class_minute_query(0, 120_000);
        assert!(q.starts_with("from(bucket: \"tele\")"), "{q}");
        assert!(q.contains("range(start: 1970-01-01T00:00:00.000Z, stop: 1970-01-01T00:02:00.000Z)"), "{q}");
        assert!(q.contains("r._measurement == \"arrivals\""), "{q}");
        assert!(InfluxHistory::new("not a url", "o", "", "b").is_err());
    }
}
