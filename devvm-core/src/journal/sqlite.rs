//! The journal in SQLite under the state directory, the embedded default. Every change
//! is one SQLite transaction in WAL mode with `synchronous=FULL`, so a crash leaves
//! either the old or the new state, never half of one. The processes of one machine may
//! share it; an owner is alive while it holds an OS lock on its file in `owners/`.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::*;

fn sql_err(context: &str) -> impl Fn(rusqlite::Error) -> Error {
    crate::sqlite::err(format!("journal: {context}"), "journal")
}

/// The schema, one step per version (SQLite's `user_version`, migrated forward with
/// `rusqlite_migration`); a step is never edited once released, only appended to.
const SCHEMA: &[&str] = &[
    // 1: runs and their steps.
    "
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
",
    // 2: the version of the JSON a run's row holds (request, vm record, undo keys and
    // outputs), and who each provisioner (owner) is, so that one whose lock file was
    // deleted is not declared dead while it lives.
    "
ALTER TABLE runs ADD COLUMN json_version INTEGER NOT NULL DEFAULT 1;
CREATE TABLE IF NOT EXISTS owners (
    owner      TEXT PRIMARY KEY,
    pid        INTEGER NOT NULL,
    started    TEXT NOT NULL,
    boot_id    TEXT NOT NULL,
    registered TEXT NOT NULL
);
",
    // 3: live migrations. A migrating VM keeps its name (the live-name index includes
    // the new state); its move is one row, whose phase is recorded before each act.
    "
DROP INDEX IF EXISTS runs_live_vm;
CREATE UNIQUE INDEX runs_live_vm ON runs(vm)
    WHERE state IN ('running', 'rolling_back', 'active', 'deprovisioning', 'migrating');
CREATE TABLE IF NOT EXISTS migrations (
    request_id TEXT PRIMARY KEY REFERENCES runs(request_id) ON DELETE CASCADE,
    from_host  TEXT NOT NULL,
    to_host    TEXT NOT NULL,
    phase      TEXT NOT NULL,
    updated    TEXT NOT NULL
);
",
];

/// A handle on the journal database for one provisioner (`owner`). Cheap to clone;
/// calls block (use `spawn_blocking`).
///
/// Every write about a run is fenced: it only happens while the run's row names this
/// owner, so a process that was paused while `recover()` elsewhere claimed its run cannot
/// write into it afterwards.
#[derive(Debug, Clone)]
pub(crate) struct SqliteJournal {
    conn: Arc<Mutex<Connection>>,
    owners_dir: PathBuf,
    owner: Arc<str>,
}

/// Creates `dir` (and its parents) with mode 0700 if missing; an existing one is left as
/// it is, with a warning when others can enter it.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::sqlite::private_dir(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "state directory is open to other users");
    }
    Ok(())
}

/// The fields of `/proc/<pid>/stat` after the command name.
fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// When process `pid` started (clock ticks since boot), if it runs.
fn process_start(pid: u32) -> Option<String> {
    // After ")": state is field 3, starttime field 22, so index 19 here.
    proc_stat(pid).and_then(|f| f.get(19).cloned())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `state_dir` for the provisioner
    /// `owner`. The directory is created 0700, the database files 0600.
    pub(crate) fn open(state_dir: &Path, owner: &str) -> Result<SqliteJournal> {
        private_dir(state_dir).map_err(|e| {
            Error::invalid_input(format!(
                "cannot create state directory {}",
                state_dir.display()
            ))
            .with_source(e)
        })?;
        let owners_dir = state_dir.join("owners");
        private_dir(&owners_dir).map_err(|e| {
            journal_err(format!("cannot create {}", owners_dir.display())).with_source(e)
        })?;
        let path = state_dir.join("journal.sqlite3");
        let mut conn = crate::sqlite::open(&path, "journal")?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql_err("cannot enable foreign keys"))?;
        crate::sqlite::migrate(
            &mut conn,
            SCHEMA,
            format!("the journal {}", path.display()),
            "journal",
        )?;
        Ok(SqliteJournal {
            conn: Arc::new(Mutex::new(conn)),
            owners_dir,
            owner: owner.into(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut conn)
    }

    /// Registers this journal's owner as live and returns the lock that proves it (a
    /// 0600 file in the 0700 `owners/` directory), recording the process in the journal
    /// too.
    pub(crate) fn register_owner(&self) -> Result<OwnerLock> {
        use std::os::unix::fs::OpenOptionsExt;
        let owner = &*self.owner;
        let path = self.owners_dir.join(format!("{owner}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| journal_err("cannot create owner lock").with_source(e))?;
        file.lock()
            .map_err(|e| journal_err("cannot lock owner lock").with_source(e))?;
        let pid = std::process::id();
        let started = process_start(pid).unwrap_or_default();
        self.with(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO owners (owner, pid, started, boot_id, registered)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![owner, pid, started, boot_id(), now()],
            )
            .map_err(sql_err("register owner"))
        })?;
        Ok(OwnerLock {
            path,
            file,
            conn: self.conn.clone(),
            owner: self.owner.clone(),
        })
    }

    /// Whether the process that registered `owner` is still alive: its lock file is
    /// locked, or (if the file was deleted) the process it recorded still runs, with the
    /// same start time, since the same boot.
    pub(crate) fn owner_alive(&self, owner: &str) -> bool {
        let path = self.owners_dir.join(format!("{owner}.lock"));
        match File::open(&path) {
            Err(_) => self.recorded_process_alive(owner),
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

    fn recorded_process_alive(&self, owner: &str) -> bool {
        let recorded: Option<(u32, String, String)> = self
            .with(|conn| {
                conn.query_row(
                    "SELECT pid, started, boot_id FROM owners WHERE owner = ?1",
                    params![owner],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(sql_err("read owner"))
            })
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the owner record; assuming alive");
                Some((std::process::id(), String::new(), boot_id()))
            });
        match recorded {
            None => false,
            Some((pid, started, boot)) => {
                boot == boot_id()
                    && process_start(pid).is_some_and(|s| started.is_empty() || s == started)
            }
        }
    }

    /// Removes the lock file and record of a dead owner (after its runs were claimed).
    pub(crate) fn forget_owner(&self, owner: &str) {
        let _ = std::fs::remove_file(self.owners_dir.join(format!("{owner}.lock")));
        let _ = self.with(|conn| {
            conn.execute("DELETE FROM owners WHERE owner = ?1", params![owner])
                .map_err(sql_err("forget owner"))
        });
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
                    // The VM exists (a migration moves it, it does not remove it).
                    RunState::Active | RunState::Migrating => {
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
                    "INSERT INTO runs (request_id, vm, request, state, owner, created, updated, json_version)
                     VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?5, ?6)",
                    params![req.request_id.as_str(), req.name.as_str(), request_json, owner, t, JSON_VERSION],
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
                       AND state IN ('running', 'rolling_back', 'deprovisioning', 'active', 'migrating')",
                    params![request_id.as_str(), from, to, state.as_str(), now()],
                )
                .map_err(sql_err("claim run"))?;
            Ok(n == 1)
        })
    }

    /// Records that `step` is about to act (fenced: only while this owner holds the run).
    pub(crate) fn intent(&self, request_id: &RequestId, step: Step, key: &UndoKey) -> Result<()> {
        let key = serde_json::to_string(key).map_err(json_err("encode undo key"))?;
        self.with(|conn| {
            let n = conn
                .execute(
                    "INSERT INTO steps (request_id, step, state, undo_key, updated)
                     SELECT ?1, ?2, 'intent', ?3, ?4
                     WHERE EXISTS (SELECT 1 FROM runs WHERE request_id = ?1 AND owner = ?5)
                     ON CONFLICT (request_id, step) DO UPDATE
                     SET state = 'intent', undo_key = excluded.undo_key, output = NULL,
                         error = NULL, updated = excluded.updated",
                    params![request_id.as_str(), step.as_str(), key, now(), &*self.owner],
                )
                .map_err(sql_err("record intent"))?;
            if n == 0 {
                return Err(fenced(request_id));
            }
            Ok(())
        })
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
            let n = conn
                .execute(
                    "UPDATE steps SET state = ?3, output = COALESCE(?4, output), error = ?5, updated = ?6
                     WHERE request_id = ?1 AND step = ?2
                       AND EXISTS (SELECT 1 FROM runs WHERE request_id = ?1 AND owner = ?7)",
                    params![
                        request_id.as_str(),
                        step.as_str(),
                        state.as_str(),
                        output,
                        error,
                        now(),
                        &*self.owner
                    ],
                )
                .map_err(sql_err("record step"))?;
            if n == 0 {
                return Err(fenced(request_id));
            }
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
            let n = conn
                .execute(
                    "UPDATE runs SET state = ?2, vm_record = COALESCE(?3, vm_record), error = ?4, updated = ?5
                     WHERE request_id = ?1 AND owner = ?6",
                    params![request_id.as_str(), state.as_str(), vm, error, now(), &*self.owner],
                )
                .map_err(sql_err("record run"))?;
            if n == 0 {
                return Err(fenced(request_id));
            }
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

    /// The runs matching `condition`; a row that cannot be decoded is returned as
    /// [`Unreadable`] in its place, so one bad row never hides the others.
    fn runs(
        &self,
        filter: RunFilter<'_>,
    ) -> Result<Vec<std::result::Result<RunRecord, Unreadable>>> {
        let (condition, arg) = match filter {
            RunFilter::Unfinished => (
                "state IN ('running', 'rolling_back', 'deprovisioning', 'migrating')",
                None,
            ),
            RunFilter::Active => ("state = 'active'", None),
            RunFilter::LiveVm(vm) => (
                "vm = ?1 AND state IN ('running', 'rolling_back', 'active', 'deprovisioning')",
                Some(vm.as_str()),
            ),
            RunFilter::Id(id) => ("request_id = ?1", Some(id.as_str())),
        };
        self.with(|conn| {
            let sql = format!(
                "SELECT request_id, vm, request, state, owner, vm_record, json_version
                 FROM runs WHERE {condition} ORDER BY created, request_id"
            );
            let mut stmt = conn.prepare(&sql).map_err(sql_err("read runs"))?;
            let map = |r: &rusqlite::Row<'_>| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            };
            let rows: Vec<_> = match arg {
                Some(a) => stmt.query_map(params![a], map),
                None => stmt.query_map([], map),
            }
            .map_err(sql_err("read runs"))?
            .collect::<std::result::Result<_, _>>()
            .map_err(sql_err("read run"))?;
            Ok(rows
                .into_iter()
                .map(|(id, vm, request, state, owner, vm_record, version)| {
                    let decode = || -> Result<RunRecord> {
                        if version != JSON_VERSION {
                            return Err(journal_err(format!(
                                "written in journal format {version}, this devvm reads {JSON_VERSION}"
                            )));
                        }
                        Ok(RunRecord {
                            request: serde_json::from_str(&request)
                                .map_err(json_err("decode request"))?,
                            state: RunState::parse(&state)?,
                            owner,
                            vm: vm_record
                                .map(|v| serde_json::from_str(&v))
                                .transpose()
                                .map_err(json_err("decode vm"))?,
                        })
                    };
                    decode().map_err(|e| Unreadable {
                        request_id: id,
                        vm,
                        error: e.to_string(),
                    })
                })
                .collect())
        })
    }

    /// Records the start of a migration of the run `request_id` (which this owner holds,
    /// in state `migrating`) from `from` to `to`, replacing any earlier one's row.
    pub(crate) fn begin_migration(
        &self,
        request_id: &RequestId,
        from: &HostId,
        to: &HostId,
    ) -> Result<()> {
        self.with(|conn| {
            let tx = conn.transaction().map_err(sql_err("begin migration"))?;
            let mine: bool = tx
                .query_row(
                    "SELECT COUNT(*) FROM runs WHERE request_id = ?1 AND owner = ?2 AND state = 'migrating'",
                    params![request_id.as_str(), &*self.owner],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(sql_err("begin migration"))?
                == 1;
            if !mine {
                return Err(fenced(request_id));
            }
            tx.execute(
                "INSERT INTO migrations (request_id, from_host, to_host, phase, updated)
                 VALUES (?1, ?2, ?3, 'started', ?4)
                 ON CONFLICT (request_id) DO UPDATE
                 SET from_host = ?2, to_host = ?3, phase = 'started', updated = ?4",
                params![request_id.as_str(), from.as_str(), to.as_str(), now()],
            )
            .map_err(sql_err("begin migration"))?;
            tx.commit().map_err(sql_err("begin migration"))
        })
    }

    /// Records that the migration of `request_id` enters `phase` (fenced).
    pub(crate) fn migration_phase(
        &self,
        request_id: &RequestId,
        phase: MigrationPhase,
    ) -> Result<()> {
        self.with(|conn| {
            let n = conn
                .execute(
                    "UPDATE migrations SET phase = ?2, updated = ?3
                     WHERE request_id = ?1
                       AND EXISTS (SELECT 1 FROM runs WHERE request_id = ?1 AND owner = ?4)",
                    params![request_id.as_str(), phase.as_str(), now(), &*self.owner],
                )
                .map_err(sql_err("record migration"))?;
            if n == 0 {
                return Err(fenced(request_id));
            }
            Ok(())
        })
    }

    /// Ends the migration of `request_id` in one transaction (fenced): the run is active
    /// again with `vm` (on its new host), and its steps' undo keys name the host the VM
    /// is on now, so that a deprovision removes what is there. With `error`, the move was
    /// undone and the VM stays where it was (`vm` unchanged).
    pub(crate) fn end_migration(
        &self,
        request_id: &RequestId,
        vm: &Vm,
        error: Option<&ErrorInfo>,
    ) -> Result<()> {
        let record = serde_json::to_string(vm).map_err(json_err("encode vm"))?;
        let error = error
            .map(serde_json::to_string)
            .transpose()
            .map_err(json_err("encode error"))?;
        self.with(|conn| {
            let tx = conn.transaction().map_err(sql_err("end migration"))?;
            let n = tx
                .execute(
                    "UPDATE runs SET state = 'active', vm_record = ?2, error = ?3, updated = ?4
                     WHERE request_id = ?1 AND owner = ?5 AND state = 'migrating'",
                    params![request_id.as_str(), record, error, now(), &*self.owner],
                )
                .map_err(sql_err("end migration"))?;
            if n == 0 {
                return Err(fenced(request_id));
            }
            let keys: Vec<(String, String)> = {
                let mut stmt = tx
                    .prepare("SELECT step, undo_key FROM steps WHERE request_id = ?1")
                    .map_err(sql_err("end migration"))?;
                let rows = stmt
                    .query_map(params![request_id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(sql_err("end migration"))?;
                rows.collect::<std::result::Result<_, _>>()
                    .map_err(sql_err("end migration"))?
            };
            for (step, key) in keys {
                let mut key: UndoKey =
                    serde_json::from_str(&key).map_err(json_err("decode undo key"))?;
                if key.host.is_none() || key.host.as_ref() == Some(&vm.host) {
                    continue;
                }
                key.host = Some(vm.host.clone());
                let key = serde_json::to_string(&key).map_err(json_err("encode undo key"))?;
                tx.execute(
                    "UPDATE steps SET undo_key = ?3, updated = ?4 WHERE request_id = ?1 AND step = ?2",
                    params![request_id.as_str(), step, key, now()],
                )
                .map_err(sql_err("end migration"))?;
            }
            tx.execute(
                "DELETE FROM migrations WHERE request_id = ?1",
                params![request_id.as_str()],
            )
            .map_err(sql_err("end migration"))?;
            tx.commit().map_err(sql_err("end migration"))
        })
    }

    /// The migration row of `request_id`, if any.
    pub(crate) fn migration(&self, request_id: &RequestId) -> Result<Option<MigrationRecord>> {
        self.with(|conn| {
            let row = conn
                .query_row(
                    "SELECT from_host, to_host, phase FROM migrations WHERE request_id = ?1",
                    params![request_id.as_str()],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    },
                )
                .optional()
                .map_err(sql_err("read migration"))?;
            row.map(|(from, to, phase)| {
                Ok(MigrationRecord {
                    from: HostId::new(from)?,
                    to: HostId::new(to)?,
                    phase: MigrationPhase::parse(&phase)?,
                })
            })
            .transpose()
        })
    }
}

impl JournalStore for SqliteJournal {
    fn register_owner(&self) -> Result<OwnerGuard> {
        Ok(Box::new(SqliteJournal::register_owner(self)?))
    }
    fn owner_alive(&self, owner: &str) -> bool {
        SqliteJournal::owner_alive(self, owner)
    }
    fn forget_owner(&self, owner: &str) {
        SqliteJournal::forget_owner(self, owner)
    }
    fn begin(&self, req: &ResolvedRequest, owner: &str) -> Result<Begin> {
        SqliteJournal::begin(self, req, owner)
    }
    fn claim(&self, request_id: &RequestId, from: &str, to: &str, state: RunState) -> Result<bool> {
        SqliteJournal::claim(self, request_id, from, to, state)
    }
    fn intent(&self, request_id: &RequestId, step: Step, key: &UndoKey) -> Result<()> {
        SqliteJournal::intent(self, request_id, step, key)
    }
    fn set_step(
        &self,
        request_id: &RequestId,
        step: Step,
        state: StepState,
        output: Option<&serde_json::Value>,
        error: Option<&ErrorInfo>,
    ) -> Result<()> {
        SqliteJournal::set_step(self, request_id, step, state, output, error)
    }
    fn set_run(
        &self,
        request_id: &RequestId,
        state: RunState,
        vm: Option<&Vm>,
        error: Option<&ErrorInfo>,
    ) -> Result<()> {
        SqliteJournal::set_run(self, request_id, state, vm, error)
    }
    fn steps(&self, request_id: &RequestId) -> Result<Vec<StepRecord>> {
        SqliteJournal::steps(self, request_id)
    }
    fn runs(
        &self,
        filter: RunFilter<'_>,
    ) -> Result<Vec<std::result::Result<RunRecord, Unreadable>>> {
        SqliteJournal::runs(self, filter)
    }
    fn begin_migration(&self, request_id: &RequestId, from: &HostId, to: &HostId) -> Result<()> {
        SqliteJournal::begin_migration(self, request_id, from, to)
    }
    fn migration_phase(&self, request_id: &RequestId, phase: MigrationPhase) -> Result<()> {
        SqliteJournal::migration_phase(self, request_id, phase)
    }
    fn end_migration(
        &self,
        request_id: &RequestId,
        vm: &Vm,
        error: Option<&ErrorInfo>,
    ) -> Result<()> {
        SqliteJournal::end_migration(self, request_id, vm, error)
    }
    fn migration(&self, request_id: &RequestId) -> Result<Option<MigrationRecord>> {
        SqliteJournal::migration(self, request_id)
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
pub(crate) struct OwnerLock {
    path: PathBuf,
    file: File,
    conn: Arc<Mutex<Connection>>,
    owner: Arc<str>,
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        // The owner's record goes first (so its still-running process does not keep it
        // alive), then the file, while still holding the lock; then the lock.
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = conn.execute("DELETE FROM owners WHERE owner = ?1", params![&*self.owner]);
        drop(conn);
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::types::{BootstrapSettings, TemplateName, UserName, VmSize};

    fn request(vm: &str) -> ResolvedRequest {
        ResolvedRequest {
            request_id: RequestId::random(),
            user: UserName::new("alice").unwrap(),
            name: VmName::new(vm).unwrap(),
            template: TemplateName::new("t").unwrap(),
            size: VmSize::default(),
            bootstrap: BootstrapSettings::default(),
        }
    }

    fn key(vm: &str) -> UndoKey {
        UndoKey {
            vm: VmName::new(vm).unwrap(),
            host: None,
            ip: None,
        }
    }

    /// Once another provisioner claimed a run, every write of the old owner is refused.
    #[test]
    fn a_claimed_run_refuses_the_old_owners_writes() {
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteJournal::open(dir.path(), "owner-a").unwrap();
        let b = SqliteJournal::open(dir.path(), "owner-b").unwrap();
        let req = request("fenced");
        let id = req.request_id.clone();
        assert!(matches!(a.begin(&req, "owner-a"), Ok(Begin::Started)));
        a.intent(&id, Step::User, &key("fenced")).unwrap();
        assert!(
            b.claim(&id, "owner-a", "owner-b", RunState::RollingBack)
                .unwrap(),
            "b takes the run over"
        );
        // a was only paused: each of its late writes is refused, none interleaves.
        let late = [
            a.done(&id, Step::User, &serde_json::json!({"late": true})),
            a.intent(&id, Step::Placement, &key("fenced")),
            a.undone(&id, Step::User, None),
            a.set_run(&id, RunState::Active, None, None),
        ];
        for r in late {
            let e = r.expect_err("fenced");
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
        let steps = b.steps(&id).unwrap();
        assert_eq!(steps.len(), 1, "no step was added by the old owner");
        assert_eq!(steps[0].state, StepState::Intent);
        assert_eq!(
            steps[0].output, None,
            "no output was written by the old owner"
        );
        // The new owner writes as usual.
        b.undone(&id, Step::User, None).unwrap();
        b.set_run(&id, RunState::Failed, None, None).unwrap();
    }

    /// A lock file that was deleted does not make a live owner look dead; a recorded
    /// process that is gone does.
    #[test]
    fn a_deleted_lock_file_does_not_kill_a_live_owner() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let a = SqliteJournal::open(&state, "owner-a").unwrap();
        let lock = a.register_owner().unwrap();
        let b = SqliteJournal::open(&state, "owner-b").unwrap();
        let mode = |p: &Path| {
            std::fs::metadata(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(&state), 0o700, "state directory");
        assert_eq!(mode(&state.join("owners")), 0o700, "owners directory");
        assert_eq!(mode(&lock.path), 0o600, "owner lock file");
        assert_eq!(mode(&state.join("journal.sqlite3")), 0o600, "journal");
        assert!(b.owner_alive("owner-a"), "locked: alive");
        std::fs::remove_file(&lock.path).unwrap();
        assert!(
            b.owner_alive("owner-a"),
            "its lock file is gone, but the process it recorded still runs"
        );
        // An owner whose recorded process is gone (a pid that cannot exist) is dead.
        b.with(|c| {
            c.execute(
                "INSERT INTO owners (owner, pid, started, boot_id, registered)
                 VALUES ('owner-gone', 2147483646, '1', ?1, 'then')",
                params![boot_id()],
            )
            .map_err(sql_err("test"))
        })
        .unwrap();
        assert!(!b.owner_alive("owner-gone"));
        assert!(!b.owner_alive("owner-never-registered"));
        drop(lock);
    }
}
