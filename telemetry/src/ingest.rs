//! The async side of the embedded store: a task that buffers points and
//! commits them once per flush interval (so a crash loses at most one
//! interval), and runs the store's rollup and retention pass periodically.
//! Commits run on tokio's blocking pool, off the async workers.

use crate::sample::{now_ms, Point};
use crate::stats::CollectorStats;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

enum Msg {
    Points(Vec<Point>),
    Flush(oneshot::Sender<Result<(), String>>),
}

/// Handle of the store writer task. Dropping every handle flushes and stops it.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<Msg>,
    /// Points committed (`samples`) and failed commits or maintenance passes (`errors`).
    pub stats: Arc<CollectorStats>,
}

impl StoreWriter {
    /// Start the writer on the current tokio runtime.
    pub fn spawn(store: Arc<Store>, flush_interval: Duration, maintenance_interval: Duration) -> StoreWriter {
        let (tx, mut rx) = mpsc::channel::<Msg>(1024);
        let stats = CollectorStats::new("store");
        let st = stats.clone();
        tokio::spawn(async move {
            let mut buf: Vec<Point> = Vec::new();
            let mut flush = tokio::time::interval(flush_interval);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut maint = tokio::time::interval(maintenance_interval);
            maint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(Msg::Points(p)) => buf.extend(p),
                        Some(Msg::Flush(done)) => {
                            let r = commit(&store, &mut buf, &st).await;
                            let _ = done.send(r);
                        }
                        None => {
                            let _ = commit(&store, &mut buf, &st).await;
                            return;
                        }
                    },
                    _ = flush.tick() => { let _ = commit(&store, &mut buf, &st).await; }
                    _ = maint.tick() => {
                        let s = store.clone();
                        match tokio::task::spawn_blocking(move || s.maintain(now_ms())).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => st.record_error(&e),
                            Err(e) => st.record_error(&e),
                        }
                    }
                }
            }
        });
        StoreWriter { tx, stats }
    }

    /// Queue points; they are committed at the next flush.
    pub async fn write(&self, points: Vec<Point>) {
        let _ = self.tx.send(Msg::Points(points)).await;
    }

    /// Commit what is queued now; `Ok` means it is durable.
    pub async fn flush(&self) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Msg::Flush(done)).await.map_err(|_| "store writer stopped".to_string())?;
        wait.await.map_err(|_| "store writer stopped".to_string())?
    }
}

async fn commit(store: &Arc<Store>, buf: &mut Vec<Point>, st: &CollectorStats) -> Result<(), String> {
    if buf.is_empty() {
        return Ok(());
    }
    let batch = std::mem::take(buf);
    let s = store.clone();
    let (batch, r) = tokio::task::spawn_blocking(move || {
        let r = s.write(&batch);
        (batch, r)
    })
    .await
    .map_err(|e| e.to_string())?;
    match r {
        Ok(()) => {
            st.add_samples(batch.len());
            Ok(())
        }
        Err(e) => {
            // Keep the points for the next try.
            st.record_error(&e);
            *buf = batch;
            Err(e.to_string())
        }
    }
}
