//! The embedded store: durable time series in one file under a data
//! directory, no server. Built on [redb](https://docs.rs/redb) (a pure-Rust
//! copy-on-write B-tree with ACID transactions; a commit is fsynced, so a
//! kill -9 loses only what was not yet committed and never corrupts what was).
//!
//! Layout (`<data_dir>/telemetry.redb`):
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `series` | series id (`u32`) | the [`SeriesKey`] as JSON |
//! | `raw_blocks` | series id ‖ time of the block's first point (12 bytes, big-endian) | a block: up to 512 points of one series within one hour, each time (`i64` ms) and value (`f64`), little-endian |
//! | `minute` | series id ‖ minute start | count, sum, min, max, last |
//! | `hour` | series id ‖ hour start | count, sum, min, max, last |
//! | `meta` | name | rollup watermarks (ms) |
//!
//! Keys put one series' points next to each other in time order, so a range
//! query is one B-tree range scan. Raw points go in blocks because a B-tree
//! insert costs about a microsecond whatever its size: one key per point caps
//! ingest near 600,000 points/s, one key per block of a batch's points of one
//! series lifts it far past 1,000,000/s. A block spans at most one hour, so a
//! query for `[from, to)` starts its scan one hour before `from`. Times are Unix milliseconds with the sign
//! bit flipped so that byte order is time order. [`Store::maintain`] rolls raw
//! points of completed minutes into `minute` and completed hours into `hour`,
//! and drops each table's data past its retention; a point that arrives after
//! its minute was rolled up is merged into the rollups as it is written.

use crate::class::{RequestClass, CLASS_COUNT};
use crate::sample::{measurement, Point, SeriesKey};
use crate::series::ClassSeries;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

const SERIES: TableDefinition<u32, &str> = TableDefinition::new("series");
const RAW: TableDefinition<&[u8; 12], &[u8]> = TableDefinition::new("raw_blocks");
const MINUTE: TableDefinition<&[u8; 12], AggTuple> = TableDefinition::new("minute");
const HOUR: TableDefinition<&[u8; 12], AggTuple> = TableDefinition::new("hour");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const MINUTE_WATERMARK: &str = "minute_watermark_ms";
const HOUR_WATERMARK: &str = "hour_watermark_ms";
const RAW_POINTS: &str = "raw_points";
/// Most points in one raw block.
const BLOCK_POINTS: usize = 512;
/// Longest time between a block's first and last points.
const BLOCK_SPAN_MS: i64 = 3_600_000;

fn encode_block(pts: &[(i64, f64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pts.len() * 16);
    for &(t, v) in pts {
        out.extend_from_slice(&t.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode_block(b: &[u8]) -> impl Iterator<Item = (i64, f64)> + '_ {
    b.chunks_exact(16).map(|c| {
        let (t, v) = c.split_at(8);
        (i64::from_le_bytes(t.try_into().expect("8 bytes")), f64::from_le_bytes(v.try_into().expect("8 bytes")))
    })
}

fn block_last_ts(b: &[u8]) -> i64 {
    decode_block(b).map(|(t, _)| t).max().unwrap_or(i64::MIN)
}

type AggTuple = (u64, f64, f64, f64, f64);

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
/// Minutes are rolled up this long after they end (late points still merge).
const ROLLUP_GRACE_MS: i64 = 5_000;

/// The file name of the store in its data directory.
pub const FILE_NAME: &str = "telemetry.redb";

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (I/O, a corrupt file, …).
    #[error("store {path}: {what}: {source}")]
    Storage {
        /// The store file.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// redb's error.
        source: Box<redb::Error>,
    },
    /// The data directory could not be created.
    #[error("store {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A series table entry could not be read.
    #[error("store {path}: series {id}: {problem}")]
    Series {
        /// The store file.
        path: PathBuf,
        /// The series id.
        id: u32,
        /// What is wrong.
        problem: String,
    },
    /// More series than ids.
    #[error("store {path}: more than 2^32 series")]
    TooManySeries {
        /// The store file.
        path: PathBuf,
    },
}

/// How long each resolution is kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Raw points.
    pub raw: Duration,
    /// 1-minute rollups.
    pub minute: Duration,
    /// 1-hour rollups.
    pub hour: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        crate::config::StoreConfig::default().retention()
    }
}

/// A rollup resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// 1 minute.
    Minute,
    /// 1 hour.
    Hour,
}

impl Resolution {
    /// The step.
    pub fn step_ms(self) -> i64 {
        match self {
            Resolution::Minute => MINUTE_MS,
            Resolution::Hour => HOUR_MS,
        }
    }
}

/// The values of one series in one rollup interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregate {
    /// Start of the interval, Unix ms.
    pub ts_ms: i64,
    /// Points.
    pub count: u64,
    /// Sum of the values.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Value of the latest point.
    pub last: f64,
}

impl Aggregate {
    fn one(ts_ms: i64, v: f64) -> Aggregate {
        Aggregate { ts_ms, count: 1, sum: v, min: v, max: v, last: v }
    }

    fn merge(&mut self, o: &Aggregate) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.last = o.last;
    }

    /// Mean of the values.
    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }

    fn tuple(&self) -> AggTuple {
        (self.count, self.sum, self.min, self.max, self.last)
    }

    fn from_tuple(ts_ms: i64, t: AggTuple) -> Aggregate {
        Aggregate { ts_ms, count: t.0, sum: t.1, min: t.2, max: t.3, last: t.4 }
    }
}

/// A series id, interned in the `series` table.
pub type SeriesId = u32;

/// What a [`Store::maintain`] pass did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MaintenanceReport {
    /// Minute rollups written.
    pub minutes_rolled: u64,
    /// Hour rollups written.
    pub hours_rolled: u64,
    /// Raw points dropped by retention.
    pub raw_dropped: u64,
    /// Minute rollups dropped by retention.
    pub minutes_dropped: u64,
    /// Hour rollups dropped by retention.
    pub hours_dropped: u64,
}

#[derive(Default)]
struct Interner {
    ids: HashMap<SeriesKey, SeriesId>,
    keys: Vec<SeriesKey>,
}

/// The embedded store. Share it as `Arc<Store>`: queries run concurrently,
/// writes are serialised. Calls block (disk I/O): from async code run them
/// with `spawn_blocking`, or use [`crate::ingest::StoreWriter`].
pub struct Store {
    db: Database,
    path: PathBuf,
    retention: Retention,
    interner: RwLock<Interner>,
    write_lock: Mutex<()>,
}

/// Encode a series id and time as a 12-byte big-endian key.
pub fn encode_key(id: SeriesId, ts_ms: i64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(&((ts_ms as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// Decode a key made by [`encode_key`].
pub fn decode_key(k: &[u8; 12]) -> (SeriesId, i64) {
    let id = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&k[4..]);
    (id, (u64::from_be_bytes(t) ^ (1 << 63)) as i64)
}

fn floor_to(ts: i64, step: i64) -> i64 {
    ts.div_euclid(step) * step
}

impl Store {
    /// Open (or create) the store in `data_dir`. After a crash, redb repairs
    /// the file to its last committed state.
    pub fn open(data_dir: &Path, retention: Retention) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io { path: data_dir.into(), source })?;
        let path = data_dir.join(FILE_NAME);
        let err =
            |what: &'static str, e: redb::Error| StoreError::Storage { path: path.clone(), what, source: Box::new(e) };
        let db = Database::create(&path).map_err(|e| err("open", e.into()))?;
        // Create the tables, and read the series.
        let w = db.begin_write().map_err(|e| err("open", e.into()))?;
        {
            w.open_table(SERIES).map_err(|e| err("open", e.into()))?;
            w.open_table(RAW).map_err(|e| err("open", e.into()))?;
            w.open_table(MINUTE).map_err(|e| err("open", e.into()))?;
            w.open_table(HOUR).map_err(|e| err("open", e.into()))?;
            w.open_table(META).map_err(|e| err("open", e.into()))?;
        }
        w.commit().map_err(|e| err("open", e.into()))?;
        let mut interner = Interner::default();
        {
            let r = db.begin_read().map_err(|e| err("open", e.into()))?;
            let t = r.open_table(SERIES).map_err(|e| err("open", e.into()))?;
            for entry in t.iter().map_err(|e| err("read series", e.into()))? {
                let (id, json) = entry.map_err(|e| err("read series", e.into()))?;
                let id = id.value();
                let key: SeriesKey = serde_json::from_str(json.value()).map_err(|e| StoreError::Series {
                    path: path.clone(),
                    id,
                    problem: e.to_string(),
                })?;
                if id as usize != interner.keys.len() {
                    return Err(StoreError::Series {
                        path: path.clone(),
                        id,
                        problem: format!("ids are not dense (expected {})", interner.keys.len()),
                    });
                }
                interner.ids.insert(key.clone(), id);
                interner.keys.push(key);
            }
        }
        Ok(Store { db, path, retention, interner: RwLock::new(interner), write_lock: Mutex::new(()) })
    }

    /// The redb database itself, so that other components (the actuators'
    /// audit log) keep their own tables in the same file. Use table names
    /// that do not clash with the store's (`series`, `raw_blocks`, `minute`,
    /// `hour`, `meta`).
    pub fn database(&self) -> &Database {
        &self.db
    }

    fn err(&self, what: &'static str, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Storage { path: self.path.clone(), what, source: Box::new(e.into()) }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All series, by id.
    pub fn series(&self) -> Vec<SeriesKey> {
        self.interner.read().map(|i| i.keys.clone()).unwrap_or_default()
    }

    /// The id of a series, if it has been written.
    pub fn lookup(&self, key: &SeriesKey) -> Option<SeriesId> {
        self.interner.read().ok().and_then(|i| i.ids.get(key).copied())
    }

    /// The id of a series, interning it (durably) when new.
    pub fn series_id(&self, key: &SeriesKey) -> Result<SeriesId, StoreError> {
        if let Some(id) = self.lookup(key) {
            return Ok(id);
        }
        self.write_inner(std::slice::from_ref(key), &[])?;
        Ok(self.lookup(key).expect("interned by the write"))
    }

    /// Write points in one durable transaction; new series are interned in
    /// the same transaction. When this returns `Ok`, the points survive a crash.
    pub fn write(&self, points: &[Point]) -> Result<(), StoreError> {
        let mut new_keys: Vec<SeriesKey> = Vec::new();
        {
            let i = self.interner.read().expect("interner lock");
            for p in points {
                if !i.ids.contains_key(&p.series) && !new_keys.contains(&p.series) {
                    new_keys.push(p.series.clone());
                }
            }
        }
        if !new_keys.is_empty() {
            self.write_inner(&new_keys, &[])?;
        }
        let batch: Vec<(SeriesId, i64, f64)> = {
            let i = self.interner.read().expect("interner lock");
            points.iter().map(|p| (i.ids[&p.series], p.ts_ms, p.value)).collect()
        };
        self.write_ids(&batch)
    }

    /// Write `(series id, time ms, value)` points of interned series in one
    /// durable transaction (the fast path: ids from [`Store::series_id`]).
    pub fn write_ids(&self, batch: &[(SeriesId, i64, f64)]) -> Result<(), StoreError> {
        self.write_inner(&[], batch)
    }

    fn write_inner(&self, new_keys: &[SeriesKey], batch: &[(SeriesId, i64, f64)]) -> Result<(), StoreError> {
        let _w = self.write_lock.lock().expect("write lock");
        let tx = self.db.begin_write().map_err(|e| self.err("begin write", e))?;
        let mut added = Vec::new();
        {
            let next = self.interner.read().expect("interner lock").keys.len();
            if !new_keys.is_empty() {
                let mut t = tx.open_table(SERIES).map_err(|e| self.err("write series", e))?;
                let i = self.interner.read().expect("interner lock");
                for k in new_keys {
                    if i.ids.contains_key(k) || added.contains(k) {
                        continue;
                    }
                    let id = u32::try_from(next + added.len())
                        .map_err(|_| StoreError::TooManySeries { path: self.path.clone() })?;
                    let json = serde_json::to_string(k).expect("series keys serialise");
                    t.insert(id, json.as_str()).map_err(|e| self.err("write series", e))?;
                    added.push(k.clone());
                }
            }
            if !batch.is_empty() {
                let known = next as u64;
                let meta = tx.open_table(META).map_err(|e| self.err("write", e))?;
                let wm_min = meta.get(MINUTE_WATERMARK).map_err(|e| self.err("write", e))?.map(|v| v.value());
                let wm_hour = meta.get(HOUR_WATERMARK).map_err(|e| self.err("write", e))?.map(|v| v.value());
                drop(meta);
                let mut raw = tx.open_table(RAW).map_err(|e| self.err("write", e))?;
                let mut late = Vec::new();
                let mut sorted: Vec<(SeriesId, i64, f64)> = batch.to_vec();
                sorted.sort_by_key(|&(id, ts, _)| (id, ts));
                let mut i = 0;
                while i < sorted.len() {
                    // One block: points of one series, at most BLOCK_POINTS, within BLOCK_SPAN_MS.
                    let (id, first, _) = sorted[i];
                    if u64::from(id) >= known {
                        return Err(StoreError::Series { path: self.path.clone(), id, problem: "not interned".into() });
                    }
                    let mut j = i;
                    while j < sorted.len()
                        && j - i < BLOCK_POINTS
                        && sorted[j].0 == id
                        && sorted[j].1 - first < BLOCK_SPAN_MS
                    {
                        if wm_min.is_some_and(|w| sorted[j].1 < w) {
                            late.push(sorted[j]);
                        }
                        j += 1;
                    }
                    let mut pts: Vec<(i64, f64)> = sorted[i..j].iter().map(|&(_, t, v)| (t, v)).collect();
                    let key = encode_key(id, first);
                    let old = raw.get(&key).map_err(|e| self.err("write", e))?.map(|o| o.value().to_vec());
                    if let Some(old) = old {
                        // Another block starts at the same time: keep both blocks' points.
                        let mut merged: Vec<(i64, f64)> = decode_block(&old).collect();
                        merged.extend(pts);
                        merged.sort_by_key(|&(t, _)| t);
                        pts = merged;
                    }
                    raw.insert(&key, encode_block(&pts).as_slice()).map_err(|e| self.err("write", e))?;
                    i = j;
                }
                drop(raw);
                let mut meta = tx.open_table(META).map_err(|e| self.err("write", e))?;
                let n = meta.get(RAW_POINTS).map_err(|e| self.err("write", e))?.map(|v| v.value()).unwrap_or(0);
                meta.insert(RAW_POINTS, n + batch.len() as i64).map_err(|e| self.err("write", e))?;
                drop(meta);
                if !late.is_empty() {
                    let mut minute = tx.open_table(MINUTE).map_err(|e| self.err("write", e))?;
                    let mut hour = tx.open_table(HOUR).map_err(|e| self.err("write", e))?;
                    for (id, ts, v) in late {
                        merge_into(&mut minute, id, floor_to(ts, MINUTE_MS), &Aggregate::one(0, v))
                            .map_err(|e| self.err("write", e))?;
                        if wm_hour.is_some_and(|w| ts < w) {
                            merge_into(&mut hour, id, floor_to(ts, HOUR_MS), &Aggregate::one(0, v))
                                .map_err(|e| self.err("write", e))?;
                        }
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err("commit", e))?;
        if !added.is_empty() {
            let mut i = self.interner.write().expect("interner lock");
            for k in added {
                let id = i.keys.len() as u32;
                i.ids.insert(k.clone(), id);
                i.keys.push(k);
            }
        }
        Ok(())
    }

    /// Raw points of one series with `from_ms <= t < to_ms`, in time order.
    pub fn range(&self, key: &SeriesKey, from_ms: i64, to_ms: i64) -> Result<Vec<(i64, f64)>, StoreError> {
        let Some(id) = self.lookup(key) else { return Ok(Vec::new()) };
        self.range_id(id, from_ms, to_ms)
    }

    /// Raw points of one series id with `from_ms <= t < to_ms`, in time order.
    pub fn range_id(&self, id: SeriesId, from_ms: i64, to_ms: i64) -> Result<Vec<(i64, f64)>, StoreError> {
        if to_ms <= from_ms {
            return Ok(Vec::new());
        }
        let r = self.db.begin_read().map_err(|e| self.err("read", e))?;
        let t = r.open_table(RAW).map_err(|e| self.err("read", e))?;
        scan_raw(&t, id, from_ms, to_ms).map_err(|e| self.err("read", e))
    }

    /// Rollups of one series over `[from_ms, to_ms)` at a resolution, one per
    /// interval with data. Intervals not yet rolled up are computed from the
    /// raw points (and, for hours, from minutes), so the answer is current.
    pub fn range_agg(
        &self,
        key: &SeriesKey,
        res: Resolution,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Aggregate>, StoreError> {
        let Some(id) = self.lookup(key) else { return Ok(Vec::new()) };
        let r = self.db.begin_read().map_err(|e| self.err("read", e))?;
        let meta = r.open_table(META).map_err(|e| self.err("read", e))?;
        let wm = |name: &str| -> Result<i64, StoreError> {
            Ok(meta.get(name).map_err(|e| self.err("read", e))?.map(|v| v.value()).unwrap_or(i64::MIN))
        };
        let (wm_min, wm_hour) = (wm(MINUTE_WATERMARK)?, wm(HOUR_WATERMARK)?);
        let from = floor_to(from_ms, res.step_ms());
        let minutes = |from: i64, to: i64| -> Result<Vec<Aggregate>, StoreError> {
            let mut out = read_aggs(&r, MINUTE, id, from, to.min(wm_min)).map_err(|e| self.err("read", *e))?;
            let raw_from = from.max(wm_min);
            if raw_from < to {
                let t = r.open_table(RAW).map_err(|e| self.err("read", e))?;
                for (ts, v) in scan_raw(&t, id, raw_from, to).map_err(|e| self.err("read", e))? {
                    push_agg(&mut out, &Aggregate::one(floor_to(ts, MINUTE_MS), v));
                }
            }
            Ok(out)
        };
        match res {
            Resolution::Minute => minutes(from, to_ms),
            Resolution::Hour => {
                let mut out = read_aggs(&r, HOUR, id, from, to_ms.min(wm_hour)).map_err(|e| self.err("read", *e))?;
                let rest = from.max(wm_hour);
                if rest < to_ms {
                    for m in minutes(rest, to_ms)? {
                        push_agg(&mut out, &Aggregate { ts_ms: floor_to(m.ts_ms, HOUR_MS), ..m });
                    }
                }
                Ok(out)
            }
        }
    }

    /// Per-class per-minute arrivals over `[from_ms, to_ms)` (minute-aligned
    /// from `from_ms`), summed over sites and nodes: the forecaster's input.
    pub fn class_minute_series(&self, from_ms: i64, to_ms: i64) -> Result<ClassSeries, StoreError> {
        let from = floor_to(from_ms, MINUTE_MS);
        let n = ((to_ms - from).max(0) + MINUTE_MS - 1) / MINUTE_MS;
        let mut out = ClassSeries {
            step_s: 60.0,
            requests: std::array::from_fn(|_| vec![0.0; n as usize]),
            tokens: std::array::from_fn(|_| vec![0.0; n as usize]),
        };
        for key in self.series() {
            if key.measurement != measurement::ARRIVALS {
                continue;
            }
            let Some(class) = key.tag("class").and_then(|c| RequestClass::parse(c).ok()) else { continue };
            let target = match key.field.as_str() {
                "requests" => &mut out.requests[class.index()],
                "tokens" => &mut out.tokens[class.index()],
                _ => continue,
            };
            for a in self.range_agg(&key, Resolution::Minute, from, to_ms)? {
                let bin = ((a.ts_ms - from) / MINUTE_MS) as usize;
                if bin < target.len() {
                    target[bin] += a.sum;
                }
            }
        }
        debug_assert_eq!(out.requests.len(), CLASS_COUNT);
        Ok(out)
    }

    /// Roll completed minutes and hours up and apply retention, as of `now_ms`.
    pub fn maintain(&self, now_ms: i64) -> Result<MaintenanceReport, StoreError> {
        let _w = self.write_lock.lock().expect("write lock");
        let mut report = MaintenanceReport::default();
        let ids = self.interner.read().expect("interner lock").keys.len() as u32;
        let tx = self.db.begin_write().map_err(|e| self.err("maintain", e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| self.err("maintain", e))?;
            let old_min = meta.get(MINUTE_WATERMARK).map_err(|e| self.err("maintain", e))?.map(|v| v.value());
            let old_hour = meta.get(HOUR_WATERMARK).map_err(|e| self.err("maintain", e))?.map(|v| v.value());
            let new_min = floor_to(now_ms - ROLLUP_GRACE_MS, MINUTE_MS).max(old_min.unwrap_or(i64::MIN));
            let new_hour = floor_to(new_min, HOUR_MS).max(old_hour.unwrap_or(i64::MIN));
            let raw = tx.open_table(RAW).map_err(|e| self.err("maintain", e))?;
            let mut minute = tx.open_table(MINUTE).map_err(|e| self.err("maintain", e))?;
            let mut hour = tx.open_table(HOUR).map_err(|e| self.err("maintain", e))?;
            for id in 0..ids {
                // Raw → minutes.
                let mut rolled: Vec<Aggregate> = Vec::new();
                let pts =
                    scan_raw(&raw, id, old_min.unwrap_or(i64::MIN), new_min).map_err(|e| self.err("maintain", e))?;
                for (ts, v) in pts {
                    push_agg(&mut rolled, &Aggregate::one(floor_to(ts, MINUTE_MS), v));
                }
                for a in &rolled {
                    merge_into(&mut minute, id, a.ts_ms, a).map_err(|e| self.err("maintain", e))?;
                }
                report.minutes_rolled += rolled.len() as u64;
                // Minutes → hours.
                let from = old_hour.unwrap_or(i64::MIN);
                let mut hours: Vec<Aggregate> = Vec::new();
                for m in read_aggs_table(&minute, id, from, new_hour).map_err(|e| self.err("maintain", e))? {
                    push_agg(&mut hours, &Aggregate { ts_ms: floor_to(m.ts_ms, HOUR_MS), ..m });
                }
                for a in &hours {
                    merge_into(&mut hour, id, a.ts_ms, a).map_err(|e| self.err("maintain", e))?;
                }
                report.hours_rolled += hours.len() as u64;
            }
            drop(raw);
            let mut raw = tx.open_table(RAW).map_err(|e| self.err("maintain", e))?;
            let cut = |d: Duration| now_ms.saturating_sub(d.as_millis().min(i64::MAX as u128) as i64);
            let before = (minute.len(), hour.len());
            let before =
                (before.0.map_err(|e| self.err("maintain", e))?, before.1.map_err(|e| self.err("maintain", e))?);
            let mut raw_dropped = 0u64;
            for id in 0..ids {
                let lo = encode_key(id, i64::MIN);
                // Whole blocks go once their newest point is past retention.
                let raw_cut = cut(self.retention.raw);
                raw.retain_in::<&[u8; 12], _>(&lo..&encode_key(id, raw_cut), |_, b| {
                    let keep = block_last_ts(b) >= raw_cut;
                    if !keep {
                        raw_dropped += (b.len() / 16) as u64;
                    }
                    keep
                })
                .map_err(|e| self.err("maintain", e))?;
                minute
                    .retain_in::<&[u8; 12], _>(&lo..&encode_key(id, cut(self.retention.minute)), |_, _| false)
                    .map_err(|e| self.err("maintain", e))?;
                hour.retain_in::<&[u8; 12], _>(&lo..&encode_key(id, cut(self.retention.hour)), |_, _| false)
                    .map_err(|e| self.err("maintain", e))?;
            }
            report.raw_dropped = raw_dropped;
            report.minutes_dropped = before.0 - minute.len().map_err(|e| self.err("maintain", e))?;
            report.hours_dropped = before.1 - hour.len().map_err(|e| self.err("maintain", e))?;
            let n = meta.get(RAW_POINTS).map_err(|e| self.err("maintain", e))?.map(|v| v.value()).unwrap_or(0);
            meta.insert(RAW_POINTS, n - raw_dropped as i64).map_err(|e| self.err("maintain", e))?;
            meta.insert(MINUTE_WATERMARK, new_min).map_err(|e| self.err("maintain", e))?;
            meta.insert(HOUR_WATERMARK, new_hour).map_err(|e| self.err("maintain", e))?;
        }
        tx.commit().map_err(|e| self.err("maintain", e))?;
        Ok(report)
    }

    /// Check the file's checksums and structure (redb's integrity check).
    /// Needs exclusive access.
    pub fn check_integrity(&mut self) -> Result<bool, StoreError> {
        self.db.check_integrity().map_err(|e| self.err("integrity check", e))
    }

    /// Number of raw points stored.
    pub fn raw_len(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(|e| self.err("read", e))?;
        let t = r.open_table(META).map_err(|e| self.err("read", e))?;
        Ok(t.get(RAW_POINTS).map_err(|e| self.err("read", e))?.map(|v| v.value().max(0) as u64).unwrap_or(0))
    }
}

/// Raw points of one series with `from <= t < to`, in time order.
fn scan_raw(
    t: &impl ReadableTable<&'static [u8; 12], &'static [u8]>,
    id: SeriesId,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, f64)>, redb::StorageError> {
    let mut out: Vec<(i64, f64)> = Vec::new();
    if to <= from {
        return Ok(out);
    }
    let lo = encode_key(id, from.saturating_sub(BLOCK_SPAN_MS - 1));
    let mut sorted = true;
    for e in t.range::<&[u8; 12]>(&lo..&encode_key(id, to))? {
        let (_, b) = e?;
        for (ts, v) in decode_block(b.value()) {
            if ts >= from && ts < to {
                sorted &= out.last().is_none_or(|&(l, _)| l <= ts);
                out.push((ts, v));
            }
        }
    }
    if !sorted {
        out.sort_by_key(|&(t, _)| t);
    }
    Ok(out)
}

fn push_agg(out: &mut Vec<Aggregate>, a: &Aggregate) {
    match out.last_mut() {
        Some(l) if l.ts_ms == a.ts_ms => l.merge(a),
        _ => out.push(*a),
    }
}

fn merge_into(
    t: &mut redb::Table<&[u8; 12], AggTuple>,
    id: SeriesId,
    ts_ms: i64,
    a: &Aggregate,
) -> Result<(), redb::StorageError> {
    let k = encode_key(id, ts_ms);
    let merged = match t.get(&k)? {
        Some(old) => {
            let mut m = Aggregate::from_tuple(ts_ms, old.value());
            m.merge(a);
            m
        }
        None => Aggregate { ts_ms, ..*a },
    };
    t.insert(&k, merged.tuple())?;
    Ok(())
}

fn read_aggs(
    r: &redb::ReadTransaction,
    def: TableDefinition<&[u8; 12], AggTuple>,
    id: SeriesId,
    from: i64,
    to: i64,
) -> Result<Vec<Aggregate>, Box<redb::Error>> {
    let t = r.open_table(def).map_err(|e| Box::new(e.into()))?;
    read_aggs_table(&t, id, from, to).map_err(|e| Box::new(e.into()))
}

fn read_aggs_table(
    t: &impl ReadableTable<&'static [u8; 12], AggTuple>,
    id: SeriesId,
    from: i64,
    to: i64,
) -> Result<Vec<Aggregate>, redb::StorageError> {
    let mut out = Vec::new();
    if to <= from {
        return Ok(out);
    }
    for e in t.range::<&[u8; 12]>(&encode_key(id, from)..&encode_key(id, to))? {
        let (k, v) = e?;
        out.push(Aggregate::from_tuple(decode_key(k.value()).1, v.value()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_series_then_time_including_negative_times() {
        let ks = [encode_key(1, -5), encode_key(1, 0), encode_key(1, 7), encode_key(2, i64::MIN)];
        assert!(ks.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(decode_key(&encode_key(9, -123)), (9, -123));
    }
}
