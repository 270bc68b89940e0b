//! Request traces and the arrival streams made from them.
//!
//! Two sources, both streamed so that a week of arrivals never sits in memory:
//! - an Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`),
//!   replayed at its own timestamps ([`AzureTrace`]);
//! - a rate curve (`minute,rate_lo,rate_mid,rate_hi`) turned into Poisson
//!   arrivals whose token lengths are drawn from a trace ([`PoissonArrivals`]).
//!
//! [`Scaled`] multiplies the load of either (thinning below 1, seeded copies
//! above 1) and [`Limited`] cuts it to a span. Every parse error names the file
//! and the line.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Triangular};
use rand_pcg::Pcg64Mcg;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One inference request: when it arrives and how long it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// Arrival time in seconds since the start of the trace.
    pub arrival_s: f64,
    /// Prompt length in tokens.
    pub input_tokens: u32,
    /// Output length in tokens.
    pub output_tokens: u32,
}

/// A trace or rate file could not be read; names the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number in the file.
        line: u64,
        /// What is wrong and what was expected.
        message: String,
    },
}

impl TraceError {
    fn line(path: &Path, line: u64, message: impl Into<String>) -> TraceError {
        TraceError::Line { path: path.to_path_buf(), line, message: message.into() }
    }
}

/// File line numbers of records after a header line. The csv crate does not
/// count the header's line end when it is CRLF, so its record lines come out
/// one short; a data record can never be on line 1, which tells the two apart.
#[derive(Debug, Default, Clone, Copy)]
struct LineFix(Option<u64>);

impl LineFix {
    fn line(&mut self, pos: Option<&csv::Position>) -> u64 {
        let raw = pos.map(|p| p.line()).unwrap_or(0);
        let fix = *self.0.get_or_insert(u64::from(raw <= 1));
        raw + fix
    }
}

fn open(path: &Path) -> Result<File, TraceError> {
    File::open(path).map_err(|source| TraceError::Io { path: path.to_path_buf(), source })
}

/// Column positions found in a header line.
fn header_indices(path: &Path, headers: &csv::StringRecord, names: &[&str]) -> Result<Vec<usize>, TraceError> {
    names
        .iter()
        .map(|name| {
            headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name)).ok_or_else(|| {
                TraceError::line(
                    path,
                    1,
                    format!(
                        "header lacks column `{name}` (found: {}); expected {}",
                        headers.iter().collect::<Vec<_>>().join(","),
                        names.join(",")
                    ),
                )
            })
        })
        .collect()
}

fn parse_field<T: std::str::FromStr>(
    path: &Path,
    line: u64,
    record: &csv::StringRecord,
    idx: usize,
    name: &str,
) -> Result<T, TraceError> {
    let raw = record.get(idx).ok_or_else(|| {
        TraceError::line(path, line, format!("missing column `{name}` (line has {} fields)", record.len()))
    })?;
    raw.trim()
        .parse::<T>()
        .map_err(|_| TraceError::line(path, line, format!("`{name}` is not a valid number: `{raw}`")))
}

fn parse_tokens(path: &Path, line: u64, record: &csv::StringRecord, idx: usize, name: &str) -> Result<u32, TraceError> {
    let raw = record.get(idx).ok_or_else(|| {
        TraceError::line(path, line, format!("missing column `{name}` (line has {} fields)", record.len()))
    })?;
    let v: i64 = raw
        .trim()
        .parse()
        .map_err(|_| TraceError::line(path, line, format!("`{name}` is not a whole number of tokens: `{raw}`")))?;
    if v < 0 {
        return Err(TraceError::line(path, line, format!("`{name}` is negative: {v}")));
    }
    u32::try_from(v).map_err(|_| TraceError::line(path, line, format!("`{name}` is too large: {v}")))
}

/// Parse an Azure trace timestamp (`2023-11-16 18:17:03.9799600`, optionally
/// with `T` and a `+00:00`/`Z` suffix) to seconds since the Unix epoch.
fn parse_timestamp(raw: &str) -> Option<f64> {
    let s = raw.trim();
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp() as f64 + f64::from(dt.timestamp_subsec_nanos()) * 1e-9);
    }
    let s = s.trim_end_matches('Z');
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f%:z"] {
        if let Ok(dt) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            let utc = dt.and_utc();
            return Some(utc.timestamp() as f64 + f64::from(utc.timestamp_subsec_nanos()) * 1e-9);
        }
    }
    None
}

/// A streaming reader of an Azure LLM inference trace, yielding requests with
/// arrival times relative to the first line.
pub struct AzureTrace<R: Read = File> {
    path: PathBuf,
    records: csv::StringRecordsIntoIter<R>,
    cols: [usize; 3],
    t0: Option<f64>,
    last_s: f64,
    failed: bool,
    lines: LineFix,
}

impl AzureTrace<File> {
    /// Open a trace; checks the header.
    pub fn open(path: &Path) -> Result<AzureTrace<File>, TraceError> {
        AzureTrace::from_reader(path, open(path)?)
    }
}

impl<R: Read> AzureTrace<R> {
    /// Read a trace from any reader; `path` names it in messages.
    pub fn from_reader(path: &Path, input: R) -> Result<AzureTrace<R>, TraceError> {
        let mut reader = csv::ReaderBuilder::new().flexible(true).has_headers(true).from_reader(input);
        let headers =
            reader.headers().map_err(|e| TraceError::line(path, 1, format!("cannot read header: {e}")))?.clone();
        let idx = header_indices(path, &headers, &["TIMESTAMP", "ContextTokens", "GeneratedTokens"])?;
        Ok(AzureTrace {
            path: path.to_path_buf(),
            records: reader.into_records(),
            cols: [idx[0], idx[1], idx[2]],
            t0: None,
            last_s: 0.0,
            failed: false,
            lines: LineFix::default(),
        })
    }

    fn parse(&mut self, record: csv::StringRecord) -> Result<Request, TraceError> {
        let line = self.lines.line(record.position());
        let path = self.path.as_path();
        let raw_ts = record.get(self.cols[0]).ok_or_else(|| {
            TraceError::line(path, line, format!("missing column `TIMESTAMP` (line has {} fields)", record.len()))
        })?;
        let ts = parse_timestamp(raw_ts).ok_or_else(|| {
            TraceError::line(path, line, format!("bad TIMESTAMP `{raw_ts}`: expected `YYYY-MM-DD HH:MM:SS.fffffff`"))
        })?;
        let input_tokens = parse_tokens(path, line, &record, self.cols[1], "ContextTokens")?;
        let output_tokens = parse_tokens(path, line, &record, self.cols[2], "GeneratedTokens")?;
        if input_tokens == 0 {
            return Err(TraceError::line(path, line, "`ContextTokens` is 0: a request needs a prompt"));
        }
        let t0 = *self.t0.get_or_insert(ts);
        let arrival_s = ts - t0;
        if arrival_s < self.last_s {
            return Err(TraceError::line(
                path,
                line,
                format!(
                    "TIMESTAMP `{raw_ts}` goes back in time ({:.3} s before the previous line)",
                    self.last_s - arrival_s
                ),
            ));
        }
        self.last_s = arrival_s;
        Ok(Request { arrival_s, input_tokens, output_tokens })
    }
}

impl<R: Read> Iterator for AzureTrace<R> {
    type Item = Result<Request, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let record = match self.records.next()? {
            Ok(r) => r,
            Err(e) => {
                let line = self.lines.line(e.position());
                // An I/O error ends the stream; a CSV error is per line.
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    self.failed = true;
                }
                return Some(Err(TraceError::line(&self.path, line, format!("unreadable line: {e}"))));
            }
        };
        // Skip blank lines (a trailing newline, say).
        if record.iter().all(|f| f.trim().is_empty()) {
            return self.next();
        }
        Some(self.parse(record))
    }
}

/// The (prompt, output) lengths of a trace, to draw request lengths from.
#[derive(Debug, Clone)]
pub struct LengthSamples {
    /// The source file, for messages.
    pub source: PathBuf,
    pairs: Vec<(u32, u32)>,
}

impl LengthSamples {
    /// Read every (prompt, output) pair of an Azure trace. Malformed lines are errors.
    pub fn from_azure_trace(path: &Path) -> Result<LengthSamples, TraceError> {
        Self::from_requests(path, AzureTrace::open(path)?)
    }

    /// Collect the lengths of a request stream; `source` names it.
    pub fn from_requests<I>(source: &Path, requests: I) -> Result<LengthSamples, TraceError>
    where
        I: IntoIterator<Item = Result<Request, TraceError>>,
    {
        let path = source;
        let mut pairs = Vec::new();
        for r in requests {
            let r = r?;
            pairs.push((r.input_tokens, r.output_tokens));
        }
        if pairs.is_empty() {
            return Err(TraceError::line(path, 2, "the trace has no requests to draw lengths from"));
        }
        Ok(LengthSamples { source: path.to_path_buf(), pairs })
    }

    /// Build from pairs directly (tests, synthetic workloads).
    pub fn from_pairs(source: impl Into<PathBuf>, pairs: Vec<(u32, u32)>) -> LengthSamples {
        assert!(!pairs.is_empty(), "LengthSamples needs at least one pair");
        LengthSamples { source: source.into(), pairs }
    }

    /// All pairs.
    pub fn pairs(&self) -> &[(u32, u32)] {
        &self.pairs
    }

    /// Draw one pair uniformly.
    pub fn draw<R: Rng>(&self, rng: &mut R) -> (u32, u32) {
        self.pairs[rng.random_range(0..self.pairs.len())]
    }
}

/// One row of a rate curve: requests per minute around a minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateRow {
    /// Minutes since the start of the curve.
    pub minute: f64,
    /// Lowest per-minute rate seen around that minute (requests/min).
    pub rate_lo: f64,
    /// Middle rate (requests/min).
    pub rate_mid: f64,
    /// Highest rate (requests/min).
    pub rate_hi: f64,
}

/// A rate curve (`minute,rate_lo,rate_mid,rate_hi`), interpolated linearly
/// between rows.
#[derive(Debug, Clone)]
pub struct RateCurve {
    /// The source file, for messages.
    pub source: PathBuf,
    rows: Vec<RateRow>,
}

impl RateCurve {
    /// Read and validate a rate curve.
    pub fn load(path: &Path) -> Result<RateCurve, TraceError> {
        let mut reader = csv::ReaderBuilder::new().flexible(true).has_headers(true).from_reader(open(path)?);
        let headers =
            reader.headers().map_err(|e| TraceError::line(path, 1, format!("cannot read header: {e}")))?.clone();
        let idx = header_indices(path, &headers, &["minute", "rate_lo", "rate_mid", "rate_hi"])?;
        let mut rows: Vec<RateRow> = Vec::new();
        let mut lines = LineFix::default();
        for record in reader.records() {
            let record = record
                .map_err(|e| TraceError::line(path, lines.line(e.position()), format!("unreadable line: {e}")))?;
            if record.iter().all(|f| f.trim().is_empty()) {
                continue;
            }
            let line = lines.line(record.position());
            let row = RateRow {
                minute: parse_field(path, line, &record, idx[0], "minute")?,
                rate_lo: parse_field(path, line, &record, idx[1], "rate_lo")?,
                rate_mid: parse_field(path, line, &record, idx[2], "rate_mid")?,
                rate_hi: parse_field(path, line, &record, idx[3], "rate_hi")?,
            };
            let vals = [row.minute, row.rate_lo, row.rate_mid, row.rate_hi];
            if vals.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(TraceError::line(path, line, "values must be finite and not negative"));
            }
            if !(row.rate_lo <= row.rate_mid && row.rate_mid <= row.rate_hi) {
                return Err(TraceError::line(
                    path,
                    line,
                    format!(
                        "need rate_lo ≤ rate_mid ≤ rate_hi, got {} / {} / {}",
                        row.rate_lo, row.rate_mid, row.rate_hi
                    ),
                ));
            }
            if let Some(prev) = rows.last() {
                if row.minute <= prev.minute {
                    return Err(TraceError::line(
                        path,
                        line,
                        format!("minute {} does not increase (previous row: {})", row.minute, prev.minute),
                    ));
                }
            }
            rows.push(row);
        }
        if rows.is_empty() {
            return Err(TraceError::line(path, 2, "the rate curve has no rows"));
        }
        Ok(RateCurve { source: path.to_path_buf(), rows })
    }

    /// Build from rows (tests, synthetic curves). Rows must increase in minute.
    pub fn from_rows(source: impl Into<PathBuf>, rows: Vec<RateRow>) -> RateCurve {
        assert!(!rows.is_empty());
        RateCurve { source: source.into(), rows }
    }

    /// The rows as read.
    pub fn rows(&self) -> &[RateRow] {
        &self.rows
    }

    /// Length of the curve in minutes (the last row's minute, rounded up).
    pub fn span_minutes(&self) -> u64 {
        self.rows.last().map(|r| r.minute.ceil() as u64).unwrap_or(0)
    }

    /// The (lo, mid, hi) rate at a minute, interpolated; held flat outside the rows.
    pub fn at(&self, minute: f64) -> (f64, f64, f64) {
        let rows = &self.rows;
        let i = rows.partition_point(|r| r.minute <= minute);
        if i == 0 {
            let r = rows[0];
            return (r.rate_lo, r.rate_mid, r.rate_hi);
        }
        if i == rows.len() {
            let r = rows[rows.len() - 1];
            return (r.rate_lo, r.rate_mid, r.rate_hi);
        }
        let (a, b) = (rows[i - 1], rows[i]);
        let w = (minute - a.minute) / (b.minute - a.minute);
        let lerp = |x: f64, y: f64| x + (y - x) * w;
        (lerp(a.rate_lo, b.rate_lo), lerp(a.rate_mid, b.rate_mid), lerp(a.rate_hi, b.rate_hi))
    }
}

/// Poisson arrivals from a rate curve: each minute draws a rate from a
/// triangular distribution on (lo, hi) with mode mid, then arrivals at that
/// rate; each request's lengths are drawn from a trace.
pub struct PoissonArrivals {
    curve: RateCurve,
    lengths: LengthSamples,
    rng: Pcg64Mcg,
    minutes: u64,
    minute: u64,
    rate_per_s: f64,
    t_s: f64,
    scale: f64,
}

impl PoissonArrivals {
    /// Arrivals over the whole curve, seeded.
    pub fn new(curve: RateCurve, lengths: LengthSamples, seed: u64) -> PoissonArrivals {
        Self::with_scale(curve, lengths, seed, 1.0)
    }

    /// Arrivals with every rate multiplied by `scale`.
    pub fn with_scale(curve: RateCurve, lengths: LengthSamples, seed: u64, scale: f64) -> PoissonArrivals {
        let minutes = curve.span_minutes();
        let mut p = PoissonArrivals {
            curve,
            lengths,
            rng: Pcg64Mcg::seed_from_u64(seed ^ 0x5eed_a771),
            minutes,
            minute: 0,
            rate_per_s: 0.0,
            t_s: 0.0,
            scale,
        };
        p.enter_minute(0);
        p
    }

    fn enter_minute(&mut self, minute: u64) {
        self.minute = minute;
        self.t_s = minute as f64 * 60.0;
        let (lo, mid, hi) = self.curve.at(minute as f64 + 0.5);
        let per_min = if hi - lo < 1e-9 {
            mid
        } else {
            Triangular::new(lo, hi, mid.clamp(lo, hi)).map(|d| d.sample(&mut self.rng)).unwrap_or(mid)
        };
        self.rate_per_s = per_min * self.scale / 60.0;
    }
}

impl Iterator for PoissonArrivals {
    type Item = Result<Request, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.minute >= self.minutes {
                return None;
            }
            let end = (self.minute + 1) as f64 * 60.0;
            if self.rate_per_s > 0.0 {
                let gap: f64 = Exp::new(self.rate_per_s).expect("positive rate").sample(&mut self.rng);
                if self.t_s + gap < end {
                    self.t_s += gap;
                    let (input_tokens, output_tokens) = self.lengths.draw(&mut self.rng);
                    return Some(Ok(Request { arrival_s: self.t_s, input_tokens, output_tokens }));
                }
            }
            // Memoryless: the rest of the gap is redrawn at the next minute's rate.
            let next = self.minute + 1;
            self.enter_minute(next);
        }
    }
}

/// An entry of the reorder buffer, ordered by arrival (earliest first).
struct Pending(Request, u64);

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.arrival_s.total_cmp(&self.0.arrival_s).then(o.1.cmp(&self.1))
    }
}

/// Multiplies the load of a request stream by `scale`: below 1 each request is
/// kept with probability `scale`; above 1 each is repeated ⌊scale⌋ times (plus
/// one more with the fractional probability), the copies spread uniformly over
/// the following `spread_s` seconds. Output stays in time order.
pub struct Scaled<I> {
    inner: I,
    scale: f64,
    spread_s: f64,
    rng: Pcg64Mcg,
    buffer: BinaryHeap<Pending>,
    seq: u64,
    inner_done: bool,
    last_in_s: f64,
}

impl<I: Iterator<Item = Result<Request, TraceError>>> Scaled<I> {
    /// Wrap a stream. `spread_s` is how far copies may trail the original.
    pub fn new(inner: I, scale: f64, spread_s: f64, seed: u64) -> Scaled<I> {
        Scaled {
            inner,
            scale,
            spread_s,
            rng: Pcg64Mcg::seed_from_u64(seed ^ 0x5ca1_e000),
            buffer: BinaryHeap::new(),
            seq: 0,
            inner_done: false,
            last_in_s: f64::NEG_INFINITY,
        }
    }
}

impl<I: Iterator<Item = Result<Request, TraceError>>> Iterator for Scaled<I> {
    type Item = Result<Request, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            // Release the earliest buffered request once nothing earlier can come.
            if let Some(head) = self.buffer.peek() {
                if self.inner_done || head.0.arrival_s <= self.last_in_s {
                    return self.buffer.pop().map(|p| Ok(p.0));
                }
            } else if self.inner_done {
                return None;
            }
            match self.inner.next() {
                None => self.inner_done = true,
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(r)) => {
                    self.last_in_s = r.arrival_s;
                    let whole = self.scale.floor();
                    let frac = self.scale - whole;
                    let mut copies = whole as u64;
                    if frac > 0.0 && self.rng.random::<f64>() < frac {
                        copies += 1;
                    }
                    for k in 0..copies {
                        let mut c = r;
                        if k > 0 {
                            c.arrival_s += self.rng.random::<f64>() * self.spread_s;
                        }
                        self.seq += 1;
                        self.buffer.push(Pending(c, self.seq));
                    }
                }
            }
        }
    }
}

/// Ends a request stream at `limit_s` seconds.
pub struct Limited<I> {
    inner: I,
    limit_s: f64,
}

impl<I> Limited<I> {
    /// Wrap a stream.
    pub fn new(inner: I, limit_s: f64) -> Limited<I> {
        Limited { inner, limit_s }
    }
}

impl<I: Iterator<Item = Result<Request, TraceError>>> Iterator for Limited<I> {
    type Item = Result<Request, TraceError>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.inner.next()? {
            Ok(r) if r.arrival_s >= self.limit_s => None,
            other => Some(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read a whole stream into memory (tests and small traces only).
    fn collect_all<I: Iterator<Item = Result<Request, TraceError>>>(it: I) -> Result<Vec<Request>, TraceError> {
        it.collect()
    }

    use std::io::Write;

    fn write(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    #[test]
    fn azure_trace_reads_crlf_and_lf_with_relative_times() {
        for nl in ["\n", "\r\n"] {
            let text = [
                "TIMESTAMP,ContextTokens,GeneratedTokens",
                "2023-11-16 18:15:46.6805900,374,44",
                "2023-11-16 18:15:50.9951690,396,109",
                "",
            ]
            .join(nl);
            let f = write(&text);
            let reqs = collect_all(AzureTrace::open(f.path()).unwrap()).unwrap();
            assert_eq!(reqs.len(), 2);
            assert_eq!(reqs[0].arrival_s, 0.0);
            assert!((reqs[1].arrival_s - 4.314579).abs() < 1e-5, "{}", reqs[1].arrival_s);
            assert_eq!((reqs[1].input_tokens, reqs[1].output_tokens), (396, 109));
        }
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let cases = [
            ("2023-11-16 99:00:00.0,1,2", "bad TIMESTAMP"),
            ("2023-11-16 18:15:47.0,-5,2", "negative"),
            ("2023-11-16 18:15:47.0,abc,2", "not a whole number"),
            ("2023-11-16 18:15:47.0,10", "missing column `GeneratedTokens`"),
        ];
        for (bad, what) in cases {
            let text = format!("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,1,1\n{bad}\n");
            let f = write(&text);
            let err = collect_all(AzureTrace::open(f.path()).unwrap()).unwrap_err().to_string();
            let where_ = format!("{}:3:", f.path().display());
            assert!(err.starts_with(&where_), "{err} should start with {where_}");
            assert!(err.contains(what), "{err} should say {what}");
        }
    }

    #[test]
    fn crlf_line_numbers_are_right() {
        let f = write("TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.0,1,1\r\n2023-11-16 18:15:46.5,1,1\r\n2023-11-16 18:15:47.0,x,1\r\n");
        let err = collect_all(AzureTrace::open(f.path()).unwrap()).unwrap_err().to_string();
        assert!(err.contains(":4:"), "{err}");
    }

    #[test]
    fn good_lines_around_a_bad_one_are_still_delivered() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,1,1\n2023-11-16 18:15:47.0,x,1\n2023-11-16 18:15:48.0,3,3\n";
        let f = write(text);
        let all: Vec<_> = AzureTrace::open(f.path()).unwrap().collect();
        assert_eq!(all.len(), 3);
        assert!(all[0].is_ok() && all[1].is_err() && all[2].is_ok());
        assert_eq!(all[2].as_ref().unwrap().input_tokens, 3);
    }

    #[test]
    fn header_without_required_column_is_an_error() {
        let f = write("time,ContextTokens,GeneratedTokens\n");
        let err = AzureTrace::open(f.path()).err().unwrap().to_string();
        assert!(err.contains(":1:") && err.contains("TIMESTAMP"), "{err}");
    }

    fn flat_curve(rate_per_min: f64, minutes: f64) -> RateCurve {
        RateCurve::from_rows(
            "flat",
            vec![
                RateRow { minute: 0.0, rate_lo: rate_per_min, rate_mid: rate_per_min, rate_hi: rate_per_min },
                RateRow { minute: minutes, rate_lo: rate_per_min, rate_mid: rate_per_min, rate_hi: rate_per_min },
            ],
        )
    }

    #[test]
    fn poisson_arrivals_match_the_rate_and_are_reproducible() {
        let lengths = LengthSamples::from_pairs("x", vec![(100, 10), (2000, 500)]);
        let a = collect_all(PoissonArrivals::new(flat_curve(600.0, 60.0), lengths.clone(), 7)).unwrap();
        let b = collect_all(PoissonArrivals::new(flat_curve(600.0, 60.0), lengths.clone(), 7)).unwrap();
        let c = collect_all(PoissonArrivals::new(flat_curve(600.0, 60.0), lengths, 8)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // 60 minutes at 600/min: 36,000 expected, sd 190.
        assert!((a.len() as f64 - 36_000.0).abs() < 1_000.0, "{}", a.len());
        assert!(a.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
        assert!(a.last().unwrap().arrival_s < 3600.0);
    }

    #[test]
    fn rate_curve_interpolates_between_rows() {
        let c = RateCurve::from_rows(
            "c",
            vec![
                RateRow { minute: 0.0, rate_lo: 0.0, rate_mid: 10.0, rate_hi: 20.0 },
                RateRow { minute: 10.0, rate_lo: 10.0, rate_mid: 20.0, rate_hi: 40.0 },
            ],
        );
        assert_eq!(c.at(5.0), (5.0, 15.0, 30.0));
        assert_eq!(c.at(-1.0), (0.0, 10.0, 20.0));
        assert_eq!(c.at(99.0), (10.0, 20.0, 40.0));
    }

    #[test]
    fn rate_curve_rejects_unordered_rows_naming_the_line() {
        let f = write("minute,rate_lo,rate_mid,rate_hi\n1,1,2,3\n0.5,1,2,3\n");
        let err = RateCurve::load(f.path()).unwrap_err().to_string();
        assert!(err.contains(":3:") && err.contains("does not increase"), "{err}");
        let f = write("minute,rate_lo,rate_mid,rate_hi\n1,5,2,3\n");
        assert!(RateCurve::load(f.path()).unwrap_err().to_string().contains("rate_lo ≤ rate_mid"));
    }

    #[test]
    fn scaling_multiplies_load_and_keeps_order() {
        let lengths = LengthSamples::from_pairs("x", vec![(100, 10)]);
        let base = collect_all(PoissonArrivals::new(flat_curve(600.0, 30.0), lengths.clone(), 1)).unwrap();
        for scale in [0.5, 2.5] {
            let scaled = collect_all(Scaled::new(
                PoissonArrivals::new(flat_curve(600.0, 30.0), lengths.clone(), 1),
                scale,
                1.0,
                3,
            ))
            .unwrap();
            let ratio = scaled.len() as f64 / base.len() as f64;
            assert!((ratio - scale).abs() < 0.05 * scale, "scale {scale}: ratio {ratio}");
            assert!(scaled.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
        }
        let limited =
            collect_all(Limited::new(PoissonArrivals::new(flat_curve(600.0, 30.0), lengths, 1), 600.0)).unwrap();
        assert!(limited.iter().all(|r| r.arrival_s < 600.0));
        assert!((limited.len() as f64 - 6000.0).abs() < 400.0);
    }
}
