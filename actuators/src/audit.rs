//! The audit log: every command dispatched and what became of it, in redb.
//!
//! The crash-safety contract: [`AuditLog::begin`] is committed durably
//! *before* a backend is called, [`AuditLog::finish`] after it answers. After
//! a crash (even `kill -9`) the log therefore knows every command that may
//! have reached the cluster: those still `issued` are listed by
//! [`AuditLog::in_flight`] and are re-sent with the same id (backends are
//! idempotent by id); those `applied` are never sent again.
//!
//! Tables (in the telemetry store's `telemetry.redb` when opened with
//! [`AuditLog::in_store`], or in their own file with [`AuditLog::open`]):
//! `actuator_audit` (id → record JSON), `actuator_audit_by_time`
//! ((issued_at_ms, id) → ()) and `actuator_audit_open` (ids not finished).

use crate::{Action, ActionId, Command, Outcome, Placement};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const RECORDS: TableDefinition<&str, &str> = TableDefinition::new("actuator_audit");
const BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("actuator_audit_by_time");
const OPEN: TableDefinition<&str, ()> = TableDefinition::new("actuator_audit_open");

/// The file name [`AuditLog::open_in_dir`] uses.
pub const FILE_NAME: &str = "actuators-audit.redb";

/// The audit log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// redb failed.
    #[error("audit log {path}: {what}: {problem}")]
    Storage {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// redb's error.
        problem: String,
    },
    /// A stored record does not parse (a newer or damaged file).
    #[error("audit log {path}: record {id}: {problem}")]
    Record {
        /// The database file.
        path: PathBuf,
        /// The record's id.
        id: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `finish` for an id that was never begun.
    #[error("audit log {path}: no command {id} was begun")]
    Unknown {
        /// The database file.
        path: PathBuf,
        /// The id.
        id: String,
    },
}

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditState {
    /// Sent (or about to be), no outcome yet. After a crash: in flight.
    Issued,
    /// The backend applied it.
    Applied,
    /// The backend failed or refused it.
    Failed,
    /// No answer within the timeout.
    TimedOut,
}

impl AuditState {
    /// The state an outcome leads to.
    pub fn of(outcome: &Outcome) -> AuditState {
        match outcome {
            Outcome::Applied { .. } => AuditState::Applied,
            Outcome::Failed { .. } => AuditState::Failed,
            Outcome::TimedOut { .. } => AuditState::TimedOut,
        }
    }
}

/// One command in the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The command's id.
    pub id: ActionId,
    /// The action.
    pub action: Action,
    /// Where the instance lives: the command's placement, replaced by the
    /// one an applied outcome reports (a spawn's new instance).
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Where it stands.
    pub state: AuditState,
    /// Times it was sent to a backend (re-sends after a crash or a failure
    /// count too).
    pub attempts: u32,
    /// Times a backend reported it applied (1 for an idempotent action done
    /// once; the dispatcher never sends an applied id again).
    #[serde(default)]
    pub applied: u32,
    /// The backend that carries it out.
    #[serde(default)]
    pub backend: String,
    /// When the command was issued (its `issued_at_ms`).
    pub issued_at_ms: u64,
    /// When the last outcome arrived.
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// A human-readable note: the outcome's detail or reason.
    #[serde(default)]
    pub detail: String,
    /// The last outcome.
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// The command as sent (its own placement kept here).
    pub command: Command,
}

enum Db {
    Own(Database),
    Shared(Arc<telemetry::store::Store>),
}

/// The audit log (see the module documentation). Its methods block on disk
/// I/O (a commit is an fsync); async code calls them through
/// `spawn_blocking`, as the [`crate::Dispatcher`] does.
pub struct AuditLog {
    db: Db,
    path: PathBuf,
    write_lock: std::sync::Mutex<()>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("path", &self.path).finish()
    }
}

impl AuditLog {
    /// Open (or create) an audit log in its own redb file.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| AuditError::Storage {
                path: path.into(),
                what: "create the directory",
                problem: e.to_string(),
            })?;
        }
        let db = Database::create(path).map_err(|e| AuditError::Storage {
            path: path.into(),
            what: "open",
            problem: e.to_string(),
        })?;
        let log = AuditLog { db: Db::Own(db), path: path.into(), write_lock: std::sync::Mutex::new(()) };
        log.create_tables()?;
        Ok(log)
    }

    /// Open (or create) the audit log as `actuators-audit.redb` in `dir`.
    pub fn open_in_dir(dir: &Path) -> Result<AuditLog, AuditError> {
        AuditLog::open(&dir.join(FILE_NAME))
    }

    /// The audit log's tables inside the telemetry store's database file.
    pub fn in_store(store: Arc<telemetry::store::Store>) -> Result<AuditLog, AuditError> {
        let path = store.path().to_path_buf();
        let log = AuditLog { db: Db::Shared(store), path, write_lock: std::sync::Mutex::new(()) };
        log.create_tables()?;
        Ok(log)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> &Database {
        match &self.db {
            Db::Own(db) => db,
            Db::Shared(store) => store.database(),
        }
    }

    fn err(&self, what: &'static str, e: impl std::fmt::Display) -> AuditError {
        AuditError::Storage { path: self.path.clone(), what, problem: e.to_string() }
    }

    fn create_tables(&self) -> Result<(), AuditError> {
        let w = self.db().begin_write().map_err(|e| self.err("create tables", e))?;
        {
            w.open_table(RECORDS).map_err(|e| self.err("create tables", e))?;
            w.open_table(BY_TIME).map_err(|e| self.err("create tables", e))?;
            w.open_table(OPEN).map_err(|e| self.err("create tables", e))?;
        }
        w.commit().map_err(|e| self.err("create tables", e))
    }

    fn parse(&self, id: &str, json: &str) -> Result<AuditRecord, AuditError> {
        serde_json::from_str(json).map_err(|e| AuditError::Record {
            path: self.path.clone(),
            id: id.to_string(),
            problem: e.to_string(),
        })
    }

    /// The record of a command, if any.
    pub fn get(&self, id: &ActionId) -> Result<Option<AuditRecord>, AuditError> {
        let r = self.db().begin_read().map_err(|e| self.err("read", e))?;
        let t = r.open_table(RECORDS).map_err(|e| self.err("read", e))?;
        let v = t.get(id.0.as_str()).map_err(|e| self.err("read", e))?;
        match v {
            Some(json) => Ok(Some(self.parse(&id.0, json.value())?)),
            None => Ok(None),
        }
    }

    /// Record that `cmd` is about to be sent to `backend`, durably (the
    /// commit returns after the fsync). A command seen before keeps its
    /// first `issued_at_ms`; its `attempts` grow by one.
    pub fn begin(&self, cmd: &Command, backend: &str) -> Result<AuditRecord, AuditError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let w = self.db().begin_write().map_err(|e| self.err("begin", e))?;
        let rec = {
            let mut t = w.open_table(RECORDS).map_err(|e| self.err("begin", e))?;
            let prev = match t.get(cmd.id.0.as_str()).map_err(|e| self.err("begin", e))? {
                Some(json) => Some(self.parse(&cmd.id.0, json.value())?),
                None => None,
            };
            let rec = match prev {
                Some(mut r) => {
                    r.attempts += 1;
                    r.state = AuditState::Issued;
                    r.backend = backend.to_string();
                    r.finished_at_ms = None;
                    r.detail = format!("re-sent (attempt {})", r.attempts);
                    r
                }
                None => AuditRecord {
                    id: cmd.id.clone(),
                    action: cmd.action.clone(),
                    placement: cmd.placement.clone(),
                    state: AuditState::Issued,
                    attempts: 1,
                    applied: 0,
                    backend: backend.to_string(),
                    issued_at_ms: cmd.issued_at_ms,
                    finished_at_ms: None,
                    detail: String::new(),
                    outcome: None,
                    command: cmd.clone(),
                },
            };
            let json = serde_json::to_string(&rec).map_err(|e| self.err("encode", e))?;
            t.insert(cmd.id.0.as_str(), json.as_str()).map_err(|e| self.err("begin", e))?;
            let mut by_time = w.open_table(BY_TIME).map_err(|e| self.err("begin", e))?;
            by_time.insert((rec.issued_at_ms, cmd.id.0.as_str()), ()).map_err(|e| self.err("begin", e))?;
            let mut open = w.open_table(OPEN).map_err(|e| self.err("begin", e))?;
            open.insert(cmd.id.0.as_str(), ()).map_err(|e| self.err("begin", e))?;
            rec
        };
        w.commit().map_err(|e| self.err("begin (commit)", e))?;
        Ok(rec)
    }

    /// Record what became of a begun command, durably.
    pub fn finish(&self, id: &ActionId, outcome: &Outcome) -> Result<AuditRecord, AuditError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let w = self.db().begin_write().map_err(|e| self.err("finish", e))?;
        let rec = {
            let mut t = w.open_table(RECORDS).map_err(|e| self.err("finish", e))?;
            let mut rec = match t.get(id.0.as_str()).map_err(|e| self.err("finish", e))? {
                Some(json) => self.parse(&id.0, json.value())?,
                None => return Err(AuditError::Unknown { path: self.path.clone(), id: id.0.clone() }),
            };
            rec.state = AuditState::of(outcome);
            rec.finished_at_ms = Some(crate::now_ms());
            rec.detail = match outcome {
                Outcome::Applied { detail, .. } => detail.clone(),
                Outcome::Failed { reason, .. } => reason.clone(),
                Outcome::TimedOut { after_ms } => format!("no answer within {after_ms} ms"),
            };
            if let Outcome::Applied { placement: Some(p), .. } = outcome {
                rec.placement = Some(p.clone());
            }
            if outcome.is_applied() {
                rec.applied += 1;
            }
            rec.outcome = Some(outcome.clone());
            let json = serde_json::to_string(&rec).map_err(|e| self.err("encode", e))?;
            t.insert(id.0.as_str(), json.as_str()).map_err(|e| self.err("finish", e))?;
            let mut open = w.open_table(OPEN).map_err(|e| self.err("finish", e))?;
            open.remove(id.0.as_str()).map_err(|e| self.err("finish", e))?;
            rec
        };
        w.commit().map_err(|e| self.err("finish (commit)", e))?;
        Ok(rec)
    }

    /// Commands begun and not finished: after a crash, those that may or may
    /// not have reached the cluster. Oldest first.
    pub fn in_flight(&self) -> Result<Vec<AuditRecord>, AuditError> {
        let r = self.db().begin_read().map_err(|e| self.err("read in-flight", e))?;
        let open = r.open_table(OPEN).map_err(|e| self.err("read in-flight", e))?;
        let t = r.open_table(RECORDS).map_err(|e| self.err("read in-flight", e))?;
        let mut out = Vec::new();
        for entry in open.iter().map_err(|e| self.err("read in-flight", e))? {
            let (id, _) = entry.map_err(|e| self.err("read in-flight", e))?;
            if let Some(json) = t.get(id.value()).map_err(|e| self.err("read in-flight", e))? {
                out.push(self.parse(id.value(), json.value())?);
            }
        }
        out.sort_by(|a, b| (a.issued_at_ms, &a.id).cmp(&(b.issued_at_ms, &b.id)));
        Ok(out)
    }

    /// Up to `limit` records issued at or after `since_ms`, oldest first.
    pub fn list(&self, since_ms: u64, limit: usize) -> Result<Vec<AuditRecord>, AuditError> {
        let r = self.db().begin_read().map_err(|e| self.err("list", e))?;
        let by_time = r.open_table(BY_TIME).map_err(|e| self.err("list", e))?;
        let t = r.open_table(RECORDS).map_err(|e| self.err("list", e))?;
        let mut out = Vec::new();
        for entry in by_time.range((since_ms, "")..).map_err(|e| self.err("list", e))? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry.map_err(|e| self.err("list", e))?;
            let (_, id) = key.value();
            if let Some(json) = t.get(id).map_err(|e| self.err("list", e))? {
                out.push(self.parse(id, json.value())?);
            }
        }
        Ok(out)
    }

    /// How many times a backend reported this id applied (0 when unknown).
    pub fn applied_count(&self, id: &ActionId) -> Result<u32, AuditError> {
        Ok(self.get(id)?.map(|r| r.applied).unwrap_or(0))
    }
}
