//! The durable journal: an SQLite database under the state directory.
//!
//! Before a step acts, its intent (with what is needed to undo it) is committed; after it
//! acts, its result. Every change is one SQLite transaction in WAL mode with
//! `synchronous=FULL`, so a crash leaves either the old or the new state, never half of
//! one. The journal is also the inventory of finished VMs and the idempotency store of
//! request ids. Several processes may share one journal.

use std::fs::{File, OpenOptions, TryLockError};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, ErrorInfo, Result};
use crate::types::{HostId, RequestId, ResolvedRequest, Step, Vm, VmName};

/// What undoing a step needs, recorded with its intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UndoKey {
    pub(crate) vm: VmName,
    #[serde(default)]
    pub(crate) host: Option<HostId>,
    #[serde(default)]
    pub(crate) ip: Option<IpAddr>,
}

/// The state of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    /// A provision is under way (or crashed while under way).
    Running,
    /// A failed provision is being (or could not be completely) undone.
    RollingBack,
    /// The VM exists.
    Active,
    /// The VM is being (or could not be completely) removed.
    Deprovisioning,
    /// The provision failed and everything was undone.
    Failed,
    /// The VM was deprovisioned.
    Removed,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::RollingBack => "rolling_back",
            RunState::Active => "active",
            RunState::Deprovisioning => "deprovisioning",
            RunState::Failed => "failed",
            RunState::Removed => "removed",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "running" => RunState::Running,
            "rolling_back" => RunState::RollingBack,
            "active" => RunState::Active,
            "deprovisioning" => RunState::Deprovisioning,
            "failed" => RunState::Failed,
            "removed" => RunState::Removed,
            other => return Err(journal_err(format!("unknown run state {other:?}"))),
        })
    }
}

/// The state of one step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepState {
    Intent,
    Done,
    Undone,
    UndoFailed,
}

impl StepState {
    fn as_str(self) -> &'static str {
        match self {
            StepState::Intent => "intent",
            StepState::Done => "done",
            StepState::Undone => "undone",
            StepState::UndoFailed => "undo_failed",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "intent" => StepState::Intent,
            "done" => StepState::Done,
            "undone" => StepState::Undone,
            "undo_failed" => StepState::UndoFailed,
            other => return Err(journal_err(format!("unknown step state {other:?}"))),
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct StepRecord {
    pub(crate) step: Step,
    pub(crate) state: StepState,
    pub(crate) key: UndoKey,
    pub(crate) output: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub(crate) struct RunRecord {
    pub(crate) request: ResolvedRequest,
    pub(crate) state: RunState,
    pub(crate) owner: String,
    pub(crate) vm: Option<Vm>,
}

/// What `begin` found.
#[derive(Debug)]
pub(crate) enum Begin {
    /// A new run was recorded; go ahead.
    Started,
    /// The request already produced this VM.
    Finished(Box<Vm>),
    /// The request is recorded in an unfinished state under `owner`.
    Unfinished { owner: String },
}

fn journal_err(message: impl Into<String>) -> Error {
    Error::backend(message).with_backend("journal")
}

fn sql_err(context: &str) -> impl Fn(rusqlite::Error) -> Error {
    crate::sqlite::err(format!("journal: {context}"), "journal")
}

fn json_err(context: &str) -> impl FnOnce(serde_json::Error) -> Error + '_ {
    move |e| journal_err(format!("journal: {context}")).with_source(e)
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    request_id TEXT PRIMARY KEY,
    vm         TEXT NOT NULL,
    request    TEXT NOT NULL,
    state      TEXT NOT NULL,
    owner      TEXT NOT NULL,
    vm_record  TEXT,
    error      TEXT,
    created    TEXT NOT NULL,
    updated    TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS runs_live_vm ON runs(vm)
    WHERE state IN ('running', 'rolling_back', 'active', 'deprovisioning');
CREATE TABLE IF NOT EXISTS steps (
    request_id TEXT NOT NULL REFERENCES runs(request_id) ON DELETE CASCADE,
    step       TEXT NOT NULL,
    state      TEXT NOT NULL,
    undo_key   TEXT NOT NULL,
    output     TEXT,
    error      TEXT,
    updated    TEXT NOT NULL,
    PRIMARY KEY (request_id, step)
);
";

/// A handle on the journal database. Cheap to clone; calls block (use `spawn_blocking`).
#[derive(Debug, Clone)]
pub(crate) struct Journal {
    conn: Arc<Mutex<Connection>>,
    owners_dir: PathBuf,
}

impl Journal {
    /// Opens (creating if needed) the journal in `state_dir`.
    pub(crate) fn open(state_dir: &Path) -> Result<Journal> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            Error::invalid_input(format!(
                "cannot create state directory {}",
                state_dir.display()
            ))
            .with_source(e)
        })?;
        let owners_dir = state_dir.join("owners");
        std::fs::create_dir_all(&owners_dir).map_err(|e| {
            journal_err(format!("cannot create {}", owners_dir.display())).with_source(e)
        })?;
        let conn = crate::sqlite::open(&state_dir.join("journal.sqlite3"), "journal")?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql_err("cannot enable foreign keys"))?;
        conn.execute_batch(SCHEMA)
            .map_err(sql_err("cannot create the schema"))?;
        Ok(Journal {
            conn: Arc::new(Mutex::new(conn)),
            owners_dir,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut conn)
    }

    /// Registers a live owner and returns the lock that proves it is alive.
    pub(crate) fn register_owner(&self, owner: &str) -> Result<OwnerLock> {
        let path = self.owners_dir.join(format!("{owner}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| journal_err("cannot create owner lock").with_source(e))?;
        file.lock()
            .map_err(|e| journal_err("cannot lock owner lock").with_source(e))?;
        Ok(OwnerLock { path, file })
    }

    /// Whether the process that registered `owner` is still alive.
    pub(crate) fn owner_alive(&self, owner: &str) -> bool {
        let path = self.owners_dir.join(format!("{owner}.lock"));
        match File::open(&path) {
            Err(_) => false,
            Ok(file) => match file.try_lock() {
                Ok(()) => false,
                Err(TryLockError::WouldBlock) => true,
                Err(TryLockError::Error(e)) => {
                    tracing::warn!(error = %e, "cannot check owner lock; assuming alive");
                    true
                }
            },
        }
    }

    /// Removes the lock file of a dead owner (after its runs were claimed).
    pub(crate) fn forget_owner(&self, owner: &str) {
        let _ = std::fs::remove_file(self.owners_dir.join(format!("{owner}.lock")));
    }

    /// Records the start of a provision, or says why it cannot start.
    ///
    /// A request id seen before with other parameters, or one whose VM was removed, is a
    /// conflict. A VM name held by another live run is `AlreadyExists`.
    pub(crate) fn begin(&self, req: &ResolvedRequest, owner: &str) -> Result<Begin> {
        let request_json = serde_json::to_string(req).map_err(json_err("encode request"))?;
        self.with(|conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(sql_err("begin"))?;
            let existing: Option<(String, String, String, Option<String>)> = tx
                .query_row(
                    "SELECT request, state, owner, vm_record FROM runs WHERE request_id = ?1",
                    params![req.request_id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()
                .map_err(sql_err("read run"))?;
            if let Some((stored, state, old_owner, vm_record)) = existing {
                let stored: ResolvedRequest =
                    serde_json::from_str(&stored).map_err(json_err("decode request"))?;
                if &stored != req {
                    return Err(Error::conflict(format!(
                        "request id {} was used before with other parameters",
                        req.request_id
                    )));
                }
                match RunState::parse(&state)? {
                    RunState::Active => {
                        let vm: Vm = serde_json::from_str(vm_record.as_deref().unwrap_or("null"))
                            .map_err(json_err("decode vm"))?;
                        return Ok(Begin::Finished(Box::new(vm)));
                    }
                    RunState::Removed | RunState::Deprovisioning => {
                        return Err(Error::conflict(format!(
                            "request {} made vm {}, which has been deprovisioned",
                            req.request_id, req.name
                        )));
                    }
                    RunState::Running | RunState::RollingBack => {
                        return Ok(Begin::Unfinished { owner: old_owner });
                    }
                    RunState::Failed => {
                        tx.execute(
                            "DELETE FROM steps WHERE request_id = ?1",
                            params![req.request_id.as_str()],
                        )
                        .map_err(sql_err("clear steps"))?;
                        let n = tx
                            .execute(
                                "UPDATE runs SET state = 'running', owner = ?2, error = NULL, updated = ?3
                                 WHERE request_id = ?1",
                                params![req.request_id.as_str(), owner, now()],
                            )
                            .map_err(|e| name_taken(e, &req.name))?;
                        debug_assert_eq!(n, 1);
                    }
                }
            } else {
                let t = now();
                tx.execute(
                    "INSERT INTO runs (request_id, vm, request, state, owner, created, updated)
                     VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?5)",
                    params![req.request_id.as_str(), req.name.as_str(), request_json, owner, t],
                )
                .map_err(|e| name_taken(e, &req.name))?;
            }
            tx.commit().map_err(sql_err("commit"))?;
            Ok(Begin::Started)
        })
    }

    /// Atomically takes over a run from `from` (a dead owner) and sets its state.
    /// Returns false when someone else took it first.
    pub(crate) fn claim(
        &self,
        request_id: &RequestId,
        from: &str,
        to: &str,
        state: RunState,
    ) -> Result<bool> {
        self.with(|conn| {
            let n = conn
                .execute(
                    "UPDATE runs SET owner = ?3, state = ?4, updated = ?5
                     WHERE request_id = ?1 AND owner = ?2
                       AND state IN ('running', 'rolling_back', 'deprovisioning', 'active')",
                    params![request_id.as_str(), from, to, state.as_str(), now()],
                )
                .map_err(sql_err("claim run"))?;
            Ok(n == 1)
        })
    }

    /// Records that `step` is about to act.
    pub(crate) fn intent(&self, request_id: &RequestId, step: Step, key: &UndoKey) -> Result<()> {
        let key = serde_json::to_string(key).map_err(json_err("encode undo key"))?;
        self.with(|conn| {
            conn.execute(
                "INSERT INTO steps (request_id, step, state, undo_key, updated)
                 VALUES (?1, ?2, 'intent', ?3, ?4)
                 ON CONFLICT (request_id, step) DO UPDATE
                 SET state = 'intent', undo_key = excluded.undo_key, output = NULL,
                     error = NULL, updated = excluded.updated",
                params![request_id.as_str(), step.as_str(), key, now()],
            )
            .map_err(sql_err("record intent"))?;
            Ok(())
        })
    }

    /// Records that `step` acted, with its result.
    pub(crate) fn done(
        &self,
        request_id: &RequestId,
        step: Step,
        output: &serde_json::Value,
    ) -> Result<()> {
        self.set_step(request_id, step, StepState::Done, Some(output), None)
    }

    /// Records that `step` was undone, or that undoing it failed.
    pub(crate) fn undone(
        &self,
        request_id: &RequestId,
        step: Step,
        failure: Option<&ErrorInfo>,
    ) -> Result<()> {
        match failure {
            None => self.set_step(request_id, step, StepState::Undone, None, None),
            Some(e) => self.set_step(request_id, step, StepState::UndoFailed, None, Some(e)),
        }
    }

    fn set_step(
        &self,
        request_id: &RequestId,
        step: Step,
        state: StepState,
        output: Option<&serde_json::Value>,
        error: Option<&ErrorInfo>,
    ) -> Result<()> {
        let output = output.map(serde_json::Value::to_string);
        let error = error
            .map(serde_json::to_string)
            .transpose()
            .map_err(json_err("encode error"))?;
        self.with(|conn| {
            conn.execute(
                "UPDATE steps SET state = ?3, output = COALESCE(?4, output), error = ?5, updated = ?6
                 WHERE request_id = ?1 AND step = ?2",
                params![request_id.as_str(), step.as_str(), state.as_str(), output, error, now()],
            )
            .map_err(sql_err("record step"))?;
            Ok(())
        })
    }

    /// Sets the state of a run, with the VM record (for `Active`) or the error.
    pub(crate) fn set_run(
        &self,
        request_id: &RequestId,
        state: RunState,
        vm: Option<&Vm>,
        error: Option<&ErrorInfo>,
    ) -> Result<()> {
        let vm = vm
            .map(serde_json::to_string)
            .transpose()
            .map_err(json_err("encode vm"))?;
        let error = error
            .map(serde_json::to_string)
            .transpose()
            .map_err(json_err("encode error"))?;
        self.with(|conn| {
            conn.execute(
                "UPDATE runs SET state = ?2, vm_record = COALESCE(?3, vm_record), error = ?4, updated = ?5
                 WHERE request_id = ?1",
                params![request_id.as_str(), state.as_str(), vm, error, now()],
            )
            .map_err(sql_err("record run"))?;
            Ok(())
        })
    }

    /// The steps of a run, in pipeline order.
    pub(crate) fn steps(&self, request_id: &RequestId) -> Result<Vec<StepRecord>> {
        self.with(|conn| {
            let mut stmt = conn
                .prepare("SELECT step, state, undo_key, output FROM steps WHERE request_id = ?1")
                .map_err(sql_err("read steps"))?;
            let rows = stmt
                .query_map(params![request_id.as_str()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                })
                .map_err(sql_err("read steps"))?;
            let mut out = Vec::new();
            for row in rows {
                let (step, state, key, output) = row.map_err(sql_err("read step"))?;
                out.push(StepRecord {
                    step: step.parse()?,
                    state: StepState::parse(&state)?,
                    key: serde_json::from_str(&key).map_err(json_err("decode undo key"))?,
                    output: output
                        .map(|o| serde_json::from_str(&o))
                        .transpose()
                        .map_err(json_err("decode output"))?,
                });
            }
            out.sort_by_key(|s| s.step);
            Ok(out)
        })
    }

    fn runs_where(&self, condition: &str, arg: Option<&str>) -> Result<Vec<RunRecord>> {
        self.with(|conn| {
            let sql = format!(
                "SELECT request, state, owner, vm_record FROM runs WHERE {condition} ORDER BY created, request_id"
            );
            let mut stmt = conn.prepare(&sql).map_err(sql_err("read runs"))?;
            let map = |r: &rusqlite::Row<'_>| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            };
            let rows: Vec<_> = match arg {
                Some(a) => stmt.query_map(params![a], map),
                None => stmt.query_map([], map),
            }
            .map_err(sql_err("read runs"))?
            .collect::<std::result::Result<_, _>>()
            .map_err(sql_err("read run"))?;
            rows.into_iter()
                .map(|(request, state, owner, vm)| {
                    Ok(RunRecord {
                        request: serde_json::from_str(&request)
                            .map_err(json_err("decode request"))?,
                        state: RunState::parse(&state)?,
                        owner,
                        vm: vm
                            .map(|v| serde_json::from_str(&v))
                            .transpose()
                            .map_err(json_err("decode vm"))?,
                    })
                })
                .collect()
        })
    }

    /// Runs that are not in a final state (running, rolling back, deprovisioning).
    pub(crate) fn unfinished(&self) -> Result<Vec<RunRecord>> {
        self.runs_where(
            "state IN ('running', 'rolling_back', 'deprovisioning')",
            None,
        )
    }

    /// The run that currently holds the VM name, if any.
    pub(crate) fn live_run_of(&self, vm: &VmName) -> Result<Option<RunRecord>> {
        Ok(self
            .runs_where(
                "vm = ?1 AND state IN ('running', 'rolling_back', 'active', 'deprovisioning')",
                Some(vm.as_str()),
            )?
            .into_iter()
            .next())
    }

    /// The run of a request id, if any.
    pub(crate) fn run(&self, request_id: &RequestId) -> Result<Option<RunRecord>> {
        Ok(self
            .runs_where("request_id = ?1", Some(request_id.as_str()))?
            .into_iter()
            .next())
    }

    /// Every VM that exists.
    pub(crate) fn active_vms(&self) -> Result<Vec<Vm>> {
        Ok(self
            .runs_where("state = 'active'", None)?
            .into_iter()
            .filter_map(|r| r.vm)
            .collect())
    }
}

fn name_taken(e: rusqlite::Error, vm: &VmName) -> Error {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
        Error::already_exists(format!("vm name {vm} is in use"))
    } else {
        sql_err("record run")(e)
    }
}

/// Held for as long as a provisioner lives; proves to other processes that its runs are
/// not abandoned. The OS releases it when the process dies, even on SIGKILL.
#[derive(Debug)]
pub(crate) struct OwnerLock {
    path: PathBuf,
    file: File,
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock, then release it.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}
