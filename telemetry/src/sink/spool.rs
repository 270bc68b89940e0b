//! The sink's spool: one file per batch, written to a temporary name, fsynced
//! and renamed, replayed in order; and the gzip and backoff it uses.

use super::*;

pub(super) fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::with_capacity(raw.len() / 6 + 64), flate2::Compression::fast());
    e.write_all(raw).expect("writing to a Vec cannot fail");
    e.finish().expect("writing to a Vec cannot fail")
}

pub(super) fn gunzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() * 6);
    flate2::read::GzDecoder::new(body).read_to_end(&mut out)?;
    Ok(out)
}

/// The exponential backoff of retries: doubles from `initial` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max, next: initial }
    }

    /// The delay before the next try; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

pub(super) struct SpoolFile {
    pub(super) path: PathBuf,
    pub(super) bytes: u64,
    pub(super) points: u64,
    pub(super) sealed_ms: i64,
}

pub(super) struct Spool {
    pub(super) dir: PathBuf,
    pub(super) gzip: bool,
    pub(super) max_bytes: u64,
    pub(super) files: BTreeMap<u64, SpoolFile>,
    pub(super) bytes: u64,
}

impl Spool {
    pub(super) fn open(dir: &Path, gzip: bool, max_bytes: u64) -> Result<Spool, SinkError> {
        let io = |source| SinkError::Spool { path: dir.into(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut files = BTreeMap::new();
        let mut bytes = 0;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(seq) = name.split('.').next().and_then(|s| s.parse::<u64>().ok()) else { continue };
            if !(name.ends_with(".lp.gz") || name.ends_with(".lp")) {
                // A temporary file left by a crash mid-write: never acknowledged, never renamed.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            bytes += len;
            files.insert(seq, SpoolFile { path, bytes: len, points: 0, sealed_ms: now_ms() });
        }
        Ok(Spool { dir: dir.into(), gzip, max_bytes, files, bytes })
    }

    pub(super) fn next_seq(&self) -> u64 {
        self.files.keys().next_back().map(|s| s + 1).unwrap_or(0)
    }

    /// Write a batch durably; returns the batches dropped to stay under the limit (points).
    pub(super) fn push(&mut self, b: &Batch) -> Result<u64, SinkError> {
        let ext = if self.gzip { "lp.gz" } else { "lp" };
        let path = self.dir.join(format!("{:020}.{ext}", b.seq));
        let tmp = self.dir.join(format!("{:020}.tmp", b.seq));
        let io = |source| SinkError::Spool { path: path.clone(), source };
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&b.body).map_err(io)?;
            f.sync_data().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        let len = b.body.len() as u64;
        self.bytes += len;
        self.files.insert(b.seq, SpoolFile { path, bytes: len, points: b.points, sealed_ms: b.sealed_ms });
        let mut dropped = 0;
        while self.bytes > self.max_bytes && self.files.len() > 1 {
            let (_, f) = self.files.pop_first().expect("not empty");
            let _ = std::fs::remove_file(&f.path);
            self.bytes -= f.bytes;
            dropped += f.points.max(1);
        }
        Ok(dropped)
    }

    pub(super) fn remove(&mut self, seq: u64) {
        if let Some(f) = self.files.remove(&seq) {
            let _ = std::fs::remove_file(&f.path);
            self.bytes -= f.bytes;
        }
    }
}
