//! The journal in PostgreSQL (`[journal] database = { url, password }`), shared by
//! provisioners on any number of machines.
//!
//! An owner's liveness is a heartbeat row, not a local lock file: each provisioner holds
//! a row in `devvm_journal_owners` whose `expires` it pushes forward every third of its
//! time to live; a provisioner whose row expired (killed, partitioned, paused) is dead to
//! every other one, on any machine, and `recover()` may claim its runs. Every claim moves
//! the run to its new owner and bumps the run's `generation`; every write about a run
//! first locks the run's row (`FOR UPDATE`) and checks that it still names the writer, so
//! an old owner that wakes up after its runs were claimed writes nothing into them. Times
//! are the database's clock (`now()`), never a machine's.
//!
//! The calls are synchronous (the journal's contract): each runs on a small runtime of the
//! journal's own, so they work from a blocking thread, an async task, or no runtime at all.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;

use super::*;
use crate::backends::postgres::{PgError, PostgresDatabase, db, migrate_part};

/// The journal's schema, one step per version; a step is never edited once released.
const SCHEMA: &[&str] = &[
    "
CREATE TABLE devvm_journal_runs (
    request_id   TEXT PRIMARY KEY,
    vm           TEXT NOT NULL,
    request      TEXT NOT NULL,
    state        TEXT NOT NULL,
    owner        TEXT NOT NULL,
    generation   BIGINT NOT NULL DEFAULT 1,
    vm_record    TEXT,
    error        TEXT,
    json_version BIGINT NOT NULL,
    created      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX devvm_journal_runs_live_vm ON devvm_journal_runs (vm)
    WHERE state IN ('running', 'rolling_back', 'active', 'deprovisioning', 'migrating');
CREATE TABLE devvm_journal_steps (
    request_id TEXT NOT NULL REFERENCES devvm_journal_runs (request_id) ON DELETE CASCADE,
    step       TEXT NOT NULL,
    state      TEXT NOT NULL,
    undo_key   TEXT NOT NULL,
    output     TEXT,
    error      TEXT,
    updated    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, step)
);
CREATE TABLE devvm_journal_migrations (
    request_id TEXT PRIMARY KEY REFERENCES devvm_journal_runs (request_id) ON DELETE CASCADE,
    from_host  TEXT NOT NULL,
    to_host    TEXT NOT NULL,
    phase      TEXT NOT NULL,
    updated    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE devvm_journal_owners (
    owner      TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    pid        BIGINT NOT NULL,
    registered TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires    TIMESTAMPTZ NOT NULL
);
",
    "
-- 2: what recover() and list() scan, indexed (a fleet's journal keeps every run).
CREATE INDEX devvm_journal_runs_state ON devvm_journal_runs (state);
CREATE INDEX devvm_journal_owners_expires ON devvm_journal_owners (expires);
",
];

/// The journal of one provisioner in PostgreSQL.
pub(crate) struct PgJournal {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    owner: Arc<str>,
    ttl: Duration,
}

impl PgJournal {
    /// Opens the journal in the database `section` describes (`url`, `password`, ...),
    /// migrating its schema; `ttl` is how long this owner's heartbeat row stays valid.
    pub(crate) fn open(
        section: &toml::Table,
        owner: &str,
        ttl: Duration,
        base_dir: &Path,
    ) -> Result<PgJournal> {
        let database: PostgresDatabase =
            toml::Value::Table(section.clone())
                .try_into()
                .map_err(|e: toml::de::Error| {
                    Error::invalid_input(format!("[journal] database: {}", e.message().trim()))
                })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("devvm-journal")
            .enable_all()
            .build()
            .map_err(|e| journal_err("cannot start the journal's runtime").with_source(e))?;
        let pool = {
            let _enter = rt.enter();
            database.pool(base_dir)
        };
        let pool = match pool {
            Ok(p) => p,
            Err(e) => {
                // A runtime may not be dropped inside another one's task.
                rt.shutdown_background();
                return Err(e);
            }
        };
        let j = PgJournal {
            rt: Some(rt),
            pool,
            owner: owner.into(),
            ttl,
        };
        let pool = j.pool.clone();
        j.run(async move {
            let mut client = pool.get().await.map_err(PgError::Connect)?;
            let tx = client.transaction().await.map_err(db("begin"))?;
            migrate_part(&tx, "journal", SCHEMA).await?;
            tx.commit().await.map_err(db("commit the schema"))?;
            Ok(())
        })?;
        Ok(j)
    }

    /// Runs `fut` on the journal's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let Some(rt) = &self.rt else {
            return Err(Error::unavailable("the journal is closed").with_backend("journal"));
        };
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| {
            Error::unavailable("the journal's runtime stopped").with_backend("journal")
        })?
    }

    /// Runs `write` in a transaction that first locks the run's row and checks that it
    /// names this owner: the fence of every write about a run.
    fn fenced<T: Send + 'static>(
        &self,
        request_id: &RequestId,
        write: impl for<'a> FnOnce(
            &'a deadpool_postgres::Transaction<'a>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>,
        > + Send
        + 'static,
    ) -> Result<T> {
        let (pool, owner, id) = (self.pool.clone(), self.owner.clone(), request_id.clone());
        self.run(async move {
            let mut client = pool.get().await.map_err(PgError::Connect)?;
            let tx = client.transaction().await.map_err(db("begin"))?;
            let holder: Option<String> = tx
                .query_opt(
                    "SELECT owner FROM devvm_journal_runs WHERE request_id = $1 FOR UPDATE",
                    &[&id.as_str()],
                )
                .await
                .map_err(db("lock a run"))?
                .map(|r| r.get(0));
            if holder.as_deref() != Some(&*owner) {
                return Err(fenced(&id));
            }
            let out = write(&tx).await?;
            tx.commit().await.map_err(db("commit"))?;
            Ok(out)
        })
    }
}

impl Drop for PgJournal {
    fn drop(&mut self) {
        // A runtime may not be dropped inside another one's task: let it go in the
        // background (nothing is pending once every call has returned).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// This owner's heartbeat: while it lives, a task renews the owner's row; dropped, the
/// row is deleted.
struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    pool: Pool,
    owner: Arc<str>,
    handle: tokio::runtime::Handle,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
        let (pool, owner) = (self.pool.clone(), self.owner.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            if let Ok(c) = pool.get().await {
                let _ = c
                    .execute(
                        "DELETE FROM devvm_journal_owners WHERE owner = $1",
                        &[&&*owner],
                    )
                    .await;
            }
            let _ = tx.send(());
        });
        // Bounded: a database that is gone must not hold up the provisioner's end (the
        // row then simply expires).
        let _ = rx.recv_timeout(Duration::from_secs(5));
    }
}

fn state_list(states: &[RunState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl JournalStore for PgJournal {
    fn register_owner(&self) -> Result<OwnerGuard> {
        let Some(rt) = &self.rt else {
            return Err(Error::unavailable("the journal is closed").with_backend("journal"));
        };
        let (pool, owner, ttl) = (self.pool.clone(), self.owner.clone(), self.ttl);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let pid = i64::from(std::process::id());
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let (p, o, host_hb) = (pool.clone(), owner.clone(), host.clone());
        self.run(async move {
            let c = p.get().await.map_err(PgError::Connect)?;
            c.execute(
                "INSERT INTO devvm_journal_owners (owner, host, pid, expires)
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4::BIGINT / 1000.0))",
                &[&&*o, &host, &pid, &ttl_ms],
            )
            .await
            .map_err(db("register the owner"))?;
            Ok(())
        })?;
        let (p, o) = (pool.clone(), owner.clone());
        let task = rt.spawn(async move {
            let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // An upsert: a provisioner that was taken for dead (its row expired and was
                // forgotten, its runs claimed) is alive again for its new runs; the claimed
                // ones stay fenced against it.
                let renewed = match p.get().await {
                    Ok(c) => c
                        .query_one(
                            "INSERT INTO devvm_journal_owners (owner, host, pid, expires)
                             VALUES ($1, $3, $4, now() + make_interval(secs => $2::BIGINT / 1000.0))
                             ON CONFLICT (owner) DO UPDATE SET expires = excluded.expires
                             RETURNING (xmax = 0)",
                            &[&&*o, &ttl_ms, &host_hb, &pid],
                        )
                        .await
                        .map(|r| r.get::<_, bool>(0))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match renewed {
                    Ok(false) => {}
                    Ok(true) => tracing::error!(
                        owner = %o,
                        "journal: this provisioner's heartbeat row was gone (it was taken for dead, its runs may have been claimed, and its writes to those are refused); registered again"
                    ),
                    Err(e) => {
                        tracing::warn!(owner = %o, error = %e, "journal: cannot renew the heartbeat")
                    }
                }
            }
        });
        Ok(Box::new(Heartbeat {
            task,
            pool,
            owner,
            handle: rt.handle().clone(),
        }))
    }

    fn owner_alive(&self, owner: &str) -> bool {
        let (pool, o) = (self.pool.clone(), owner.to_owned());
        self.run(async move {
            let c = pool.get().await.map_err(PgError::Connect)?;
            let row = c
                .query_opt(
                    "SELECT expires > now() FROM devvm_journal_owners WHERE owner = $1",
                    &[&o],
                )
                .await
                .map_err(db("read an owner"))?;
            Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
        })
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the owner's heartbeat; assuming alive");
            true
        })
    }

    fn forget_owner(&self, owner: &str) {
        let (pool, o) = (self.pool.clone(), owner.to_owned());
        let _ = self.run(async move {
            let c = pool.get().await.map_err(PgError::Connect)?;
            // Only an expired row: an owner that came back is not forgotten.
            c.execute(
                "DELETE FROM devvm_journal_owners WHERE owner = $1 AND expires <= now()",
                &[&o],
            )
            .await
            .map_err(db("forget an owner"))?;
            Ok(())
        });
    }

    fn begin(&self, req: &ResolvedRequest, owner: &str) -> Result<Begin> {
        let request_json = serde_json::to_string(req).map_err(json_err("encode request"))?;
        let (pool, req, owner) = (self.pool.clone(), req.clone(), owner.to_owned());
        self.run(async move {
            // Two begins of one new request id race on its primary key: the loser reads
            // the winner's row on its second pass.
            for _ in 0..2 {
                let mut client = pool.get().await.map_err(PgError::Connect)?;
                let tx = client.transaction().await.map_err(db("begin"))?;
                let id = req.request_id.as_str();
                let existing = tx
                    .query_opt(
                        "SELECT request, state, owner, vm_record FROM devvm_journal_runs
                         WHERE request_id = $1 FOR UPDATE",
                        &[&id],
                    )
                    .await
                    .map_err(db("read a run"))?;
                if let Some(row) = existing {
                    let (stored, state, old_owner, vm_record): (
                        String,
                        String,
                        String,
                        Option<String>,
                    ) = (row.get(0), row.get(1), row.get(2), row.get(3));
                    let stored: ResolvedRequest =
                        serde_json::from_str(&stored).map_err(json_err("decode request"))?;
                    if stored != req {
                        return Err(Error::conflict(format!(
                            "request id {} was used before with other parameters",
                            req.request_id
                        )));
                    }
                    match RunState::parse(&state)? {
                        RunState::Active | RunState::Migrating => {
                            let vm: Vm =
                                serde_json::from_str(vm_record.as_deref().unwrap_or("null"))
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
                                "DELETE FROM devvm_journal_steps WHERE request_id = $1",
                                &[&id],
                            )
                            .await
                            .map_err(db("clear steps"))?;
                            if let Err(e) = tx
                                .execute(
                                    "UPDATE devvm_journal_runs
                                     SET state = 'running', owner = $2, generation = generation + 1,
                                         error = NULL, updated = now()
                                     WHERE request_id = $1",
                                    &[&id, &owner],
                                )
                                .await
                            {
                                return Err(name_taken(e, &req.name));
                            }
                        }
                    }
                } else if let Err(e) = tx
                    .execute(
                        "INSERT INTO devvm_journal_runs
                         (request_id, vm, request, state, owner, json_version)
                         VALUES ($1, $2, $3, 'running', $4, $5)",
                        &[
                            &id,
                            &req.name.as_str(),
                            &request_json,
                            &owner,
                            &JSON_VERSION,
                        ],
                    )
                    .await
                {
                    if e.as_db_error()
                        .is_some_and(|d| d.constraint() == Some("devvm_journal_runs_pkey"))
                    {
                        continue;
                    }
                    return Err(name_taken(e, &req.name));
                }
                tx.commit().await.map_err(|e| name_taken(e, &req.name))?;
                return Ok(Begin::Started);
            }
            Err(Error::conflict(format!(
                "request id {} is being started by another provisioner",
                req.request_id
            ))
            .with_backend("journal"))
        })
    }

    fn claim(&self, request_id: &RequestId, from: &str, to: &str, state: RunState) -> Result<bool> {
        let (pool, id, from, to) = (
            self.pool.clone(),
            request_id.clone(),
            from.to_owned(),
            to.to_owned(),
        );
        let live = state_list(&[
            RunState::Running,
            RunState::RollingBack,
            RunState::Deprovisioning,
            RunState::Active,
            RunState::Migrating,
        ]);
        self.run(async move {
            let c = pool.get().await.map_err(PgError::Connect)?;
            let n = c
                .execute(
                    &format!(
                        "UPDATE devvm_journal_runs
                         SET owner = $3, state = $4, generation = generation + 1, updated = now()
                         WHERE request_id = $1 AND owner = $2 AND state IN ({live})"
                    ),
                    &[&id.as_str(), &from, &to, &state.as_str()],
                )
                .await
                .map_err(db("claim a run"))?;
            Ok(n == 1)
        })
    }

    fn intent(&self, request_id: &RequestId, step: Step, key: &UndoKey) -> Result<()> {
        let key = serde_json::to_string(key).map_err(json_err("encode undo key"))?;
        let id = request_id.clone();
        self.fenced(request_id, move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO devvm_journal_steps (request_id, step, state, undo_key)
                     VALUES ($1, $2, 'intent', $3)
                     ON CONFLICT (request_id, step) DO UPDATE
                     SET state = 'intent', undo_key = excluded.undo_key, output = NULL,
                         error = NULL, updated = now()",
                    &[&id.as_str(), &step.as_str(), &key],
                )
                .await
                .map_err(db("record an intent"))?;
                Ok(())
            })
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
        let id = request_id.clone();
        self.fenced(request_id, move |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE devvm_journal_steps
                         SET state = $3, output = COALESCE($4, output), error = $5, updated = now()
                         WHERE request_id = $1 AND step = $2",
                        &[
                            &id.as_str(),
                            &step.as_str(),
                            &state.as_str(),
                            &output,
                            &error,
                        ],
                    )
                    .await
                    .map_err(db("record a step"))?;
                if n == 0 {
                    return Err(fenced(&id));
                }
                Ok(())
            })
        })
    }

    fn set_run(
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
        let id = request_id.clone();
        self.fenced(request_id, move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE devvm_journal_runs
                     SET state = $2, vm_record = COALESCE($3, vm_record), error = $4, updated = now()
                     WHERE request_id = $1",
                    &[&id.as_str(), &state.as_str(), &vm, &error],
                )
                .await
                .map_err(db("record a run"))?;
                Ok(())
            })
        })
    }

    fn steps(&self, request_id: &RequestId) -> Result<Vec<StepRecord>> {
        let (pool, id) = (self.pool.clone(), request_id.clone());
        self.run(async move {
            let c = pool.get().await.map_err(PgError::Connect)?;
            let rows = c
                .query(
                    "SELECT step, state, undo_key, output FROM devvm_journal_steps
                     WHERE request_id = $1",
                    &[&id.as_str()],
                )
                .await
                .map_err(db("read steps"))?;
            let mut out = Vec::new();
            for r in rows {
                let (step, state, key, output): (String, String, String, Option<String>) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
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

    fn runs(
        &self,
        filter: RunFilter<'_>,
    ) -> Result<Vec<std::result::Result<RunRecord, Unreadable>>> {
        let (condition, arg) = match filter {
            RunFilter::Unfinished => (
                format!(
                    "state IN ({})",
                    state_list(&[
                        RunState::Running,
                        RunState::RollingBack,
                        RunState::Deprovisioning,
                        RunState::Migrating
                    ])
                ),
                None,
            ),
            RunFilter::Active => ("state = 'active'".to_owned(), None),
            RunFilter::LiveVm(vm) => (
                format!(
                    "vm = $1 AND state IN ({})",
                    state_list(&[
                        RunState::Running,
                        RunState::RollingBack,
                        RunState::Active,
                        RunState::Deprovisioning
                    ])
                ),
                Some(vm.to_string()),
            ),
            RunFilter::Id(id) => ("request_id = $1".to_owned(), Some(id.to_string())),
        };
        let pool = self.pool.clone();
        self.run(async move {
            let c = pool.get().await.map_err(PgError::Connect)?;
            let sql = format!(
                "SELECT request_id, vm, request, state, owner, vm_record, json_version
                 FROM devvm_journal_runs WHERE {condition} ORDER BY created, request_id"
            );
            let rows = match &arg {
                Some(a) => c.query(&sql, &[a]).await,
                None => c.query(&sql, &[]).await,
            }
            .map_err(db("read runs"))?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    let (id, vm, request, state, owner, vm_record, version): (
                        String,
                        String,
                        String,
                        String,
                        String,
                        Option<String>,
                        i64,
                    ) = (
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                    );
                    decode_run(request, &state, owner, vm_record, version).map_err(|e| Unreadable {
                        request_id: id,
                        vm,
                        error: e.to_string(),
                    })
                })
                .collect())
        })
    }

    fn begin_migration(&self, request_id: &RequestId, from: &HostId, to: &HostId) -> Result<()> {
        let (id, from, to) = (request_id.clone(), from.clone(), to.clone());
        self.fenced(request_id, move |tx| {
            Box::pin(async move {
                let migrating = tx
                    .query_one(
                        "SELECT state FROM devvm_journal_runs WHERE request_id = $1",
                        &[&id.as_str()],
                    )
                    .await
                    .map_err(db("begin a migration"))?
                    .get::<_, String>(0)
                    == RunState::Migrating.as_str();
                if !migrating {
                    return Err(fenced(&id));
                }
                tx.execute(
                    "INSERT INTO devvm_journal_migrations (request_id, from_host, to_host, phase)
                     VALUES ($1, $2, $3, 'started')
                     ON CONFLICT (request_id) DO UPDATE
                     SET from_host = $2, to_host = $3, phase = 'started', updated = now()",
                    &[&id.as_str(), &from.as_str(), &to.as_str()],
                )
                .await
                .map_err(db("begin a migration"))?;
                Ok(())
            })
        })
    }

    fn migration_phase(&self, request_id: &RequestId, phase: MigrationPhase) -> Result<()> {
        let id = request_id.clone();
        self.fenced(request_id, move |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE devvm_journal_migrations SET phase = $2, updated = now()
                         WHERE request_id = $1",
                        &[&id.as_str(), &phase.as_str()],
                    )
                    .await
                    .map_err(db("record a migration"))?;
                if n == 0 {
                    return Err(fenced(&id));
                }
                Ok(())
            })
        })
    }

    fn end_migration(
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
        let (id, host) = (request_id.clone(), vm.host.clone());
        self.fenced(request_id, move |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE devvm_journal_runs
                         SET state = 'active', vm_record = $2, error = $3, updated = now()
                         WHERE request_id = $1 AND state = 'migrating'",
                        &[&id.as_str(), &record, &error],
                    )
                    .await
                    .map_err(db("end a migration"))?;
                if n == 0 {
                    return Err(fenced(&id));
                }
                let keys = tx
                    .query(
                        "SELECT step, undo_key FROM devvm_journal_steps WHERE request_id = $1",
                        &[&id.as_str()],
                    )
                    .await
                    .map_err(db("end a migration"))?;
                for r in keys {
                    let (step, key): (String, String) = (r.get(0), r.get(1));
                    let mut key: UndoKey =
                        serde_json::from_str(&key).map_err(json_err("decode undo key"))?;
                    if key.host.is_none() || key.host.as_ref() == Some(&host) {
                        continue;
                    }
                    key.host = Some(host.clone());
                    let key = serde_json::to_string(&key).map_err(json_err("encode undo key"))?;
                    tx.execute(
                        "UPDATE devvm_journal_steps SET undo_key = $3, updated = now()
                         WHERE request_id = $1 AND step = $2",
                        &[&id.as_str(), &step, &key],
                    )
                    .await
                    .map_err(db("end a migration"))?;
                }
                tx.execute(
                    "DELETE FROM devvm_journal_migrations WHERE request_id = $1",
                    &[&id.as_str()],
                )
                .await
                .map_err(db("end a migration"))?;
                Ok(())
            })
        })
    }

    fn migration(&self, request_id: &RequestId) -> Result<Option<MigrationRecord>> {
        let (pool, id) = (self.pool.clone(), request_id.clone());
        self.run(async move {
            let c = pool.get().await.map_err(PgError::Connect)?;
            let row = c
                .query_opt(
                    "SELECT from_host, to_host, phase FROM devvm_journal_migrations
                     WHERE request_id = $1",
                    &[&id.as_str()],
                )
                .await
                .map_err(db("read a migration"))?;
            row.map(|r| {
                let (from, to, phase): (String, String, String) = (r.get(0), r.get(1), r.get(2));
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

impl PgJournal {
    /// Adds the finished VMs `runs` (each with its steps, from another journal) that this
    /// journal lacks, in one transaction, recorded under the owner `imported` (never
    /// alive; a finished run is never recovered, and whoever removes it takes it over).
    /// A request id already here is skipped; a VM name held by another live run here is
    /// `AlreadyExists` and adds nothing. Returns how many were added.
    pub(crate) fn import(&self, runs: Vec<(RunRecord, Vec<StepRecord>)>) -> Result<usize> {
        let pool = self.pool.clone();
        self.run(async move {
            let mut client = pool.get().await.map_err(PgError::Connect)?;
            let tx = client.transaction().await.map_err(db("begin"))?;
            let mut added = 0;
            for (run, steps) in runs {
                let id = run.request.request_id.as_str().to_owned();
                let exists = tx
                    .query_opt(
                        "SELECT 1 FROM devvm_journal_runs WHERE request_id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(db("read a run"))?
                    .is_some();
                if exists {
                    continue;
                }
                let request =
                    serde_json::to_string(&run.request).map_err(json_err("encode request"))?;
                let vm = run
                    .vm
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(json_err("encode vm"))?;
                tx.execute(
                    "INSERT INTO devvm_journal_runs
                     (request_id, vm, request, state, owner, vm_record, json_version)
                     VALUES ($1, $2, $3, $4, 'imported', $5, $6)",
                    &[
                        &id,
                        &run.request.name.as_str(),
                        &request,
                        &run.state.as_str(),
                        &vm,
                        &JSON_VERSION,
                    ],
                )
                .await
                .map_err(|e| name_taken(e, &run.request.name))?;
                for s in steps {
                    let key = serde_json::to_string(&s.key).map_err(json_err("encode undo key"))?;
                    let output = s.output.as_ref().map(serde_json::Value::to_string);
                    tx.execute(
                        "INSERT INTO devvm_journal_steps (request_id, step, state, undo_key, output)
                         VALUES ($1, $2, $3, $4, $5)",
                        &[&id, &s.step.as_str(), &s.state.as_str(), &key, &output],
                    )
                    .await
                    .map_err(db("record a step"))?;
                }
                added += 1;
            }
            tx.commit().await.map_err(db("commit the import"))?;
            Ok(added)
        })
    }
}

/// A run's row, decoded; another JSON version is refused, never guessed at.
fn decode_run(
    request: String,
    state: &str,
    owner: String,
    vm_record: Option<String>,
    version: i64,
) -> Result<RunRecord> {
    if version != JSON_VERSION {
        return Err(journal_err(format!(
            "written in journal format {version}, this devvm reads {JSON_VERSION}"
        )));
    }
    Ok(RunRecord {
        request: serde_json::from_str(&request).map_err(json_err("decode request"))?,
        state: RunState::parse(state)?,
        owner,
        vm: vm_record
            .map(|v| serde_json::from_str(&v))
            .transpose()
            .map_err(json_err("decode vm"))?,
    })
}

/// A unique violation of the live-name index: the name is held by another live run.
fn name_taken(e: tokio_postgres::Error, vm: &VmName) -> Error {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        Error::already_exists(format!("vm name {vm} is in use"))
    } else {
        PgError::Db {
            what: "record a run",
            source: e,
        }
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::conformance::lab_database;

    /// A database of its own in the lab's PostgreSQL, dropped at the end: the `[journal]
    /// database` table naming it, and a client on the lab's own database to make and
    /// drop it.
    struct Scratch {
        db: toml::Table,
        admin: PgJournal,
        name: String,
    }

    impl Scratch {
        fn new(lab: &toml::Table) -> Scratch {
            let lab_db = lab["database"].as_table().unwrap().clone();
            let admin = PgJournal::open(
                &lab_db,
                "scratch-admin",
                Duration::from_secs(30),
                Path::new("/"),
            )
            .unwrap();
            let name = format!("devvm_scratch_{}", &RequestId::random().to_string()[..8]);
            let pool = admin.pool.clone();
            let n = name.clone();
            admin
                .run(async move {
                    let c = pool.get().await.map_err(PgError::Connect)?;
                    c.batch_execute(&format!("CREATE DATABASE {n}"))
                        .await
                        .map_err(db("create a database"))?;
                    Ok(())
                })
                .unwrap();
            let mut db = lab_db;
            let url = db["url"].as_str().unwrap().to_owned();
            let base = url.rsplit_once('/').unwrap().0;
            db.insert("url".into(), format!("{base}/{name}").into());
            Scratch { db, admin, name }
        }

        fn sql(&self, j: &PgJournal, sql: &str) -> Vec<String> {
            let (pool, sql) = (j.pool.clone(), sql.to_owned());
            j.run(async move {
                let c = pool.get().await.map_err(PgError::Connect)?;
                let rows = c.simple_query(&sql).await.map_err(db("query"))?;
                Ok(rows
                    .into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    })
                    .collect())
            })
            .unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let (pool, n) = (self.admin.pool.clone(), self.name.clone());
            let _ = self.admin.run(async move {
                let c = pool.get().await.map_err(PgError::Connect)?;
                c.batch_execute(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
                    .await
                    .map_err(db("drop a database"))?;
                Ok(())
            });
        }
    }

    /// The lease store's schema from version 1 (leases and blocked addresses, no free
    /// list) to this one: the free list is every address of the subnet's plan that is
    /// neither leased nor blocked, the lease stays its vm's, and allocations go on to
    /// exactly the free addresses, then `Exhausted`.
    #[test]
    fn the_lease_schema_migrates_from_version_1_keeping_its_leases() {
        use crate::IpAllocator;
        use crate::backends::postgres::{PostgresIpAllocator, PostgresIpConfig, SCHEMA as IP};
        let Some(lab) = lab_database() else {
            return;
        };
        let scratch = Scratch::new(&lab);
        let (subnet, gw) = ("10.77.0.0/28", "10.77.0.1");
        let mut config: PostgresIpConfig = toml::Value::Table(scratch.db.clone())
            .try_into()
            .map(|d: PostgresDatabase| PostgresIpConfig {
                url: d.url,
                password: d.password,
                subnet: subnet.parse().unwrap(),
                gateway: Some(gw.parse().unwrap()),
                reserved: vec!["10.77.0.2-10.77.0.4".into()],
                max_connections: 2,
                timeout_secs: 10,
            })
            .unwrap();
        let admin = &scratch.admin;
        let database: PostgresDatabase = toml::Value::Table(scratch.db.clone()).try_into().unwrap();
        let pool = {
            let _e = admin.rt.as_ref().unwrap().enter();
            database.pool(Path::new("/")).unwrap()
        };
        // Version 1 with its plan: the gateway and .2-.4 blocked, .5 leased to "old".
        let fingerprint = {
            let _e = admin.rt.as_ref().unwrap().enter();
            PostgresIpAllocator::from_config(&config, Path::new("/"))
                .unwrap()
                .plan()
                .fingerprint()
        };
        let ip = |last: i64| {
            i64::from(u32::from(
                "10.77.0.0".parse::<std::net::Ipv4Addr>().unwrap(),
            )) + last
        };
        admin
            .run(async move {
                let mut c = pool.get().await.map_err(PgError::Connect)?;
                let tx = c.transaction().await.map_err(db("begin"))?;
                migrate_part(&tx, "ip", &IP[..1]).await?;
                tx.execute(
                    "INSERT INTO devvm_ip_plans (subnet, plan) VALUES ($1, $2)",
                    &[&subnet, &fingerprint],
                )
                .await
                .map_err(db("plan"))?;
                for blocked in [1, 2, 3, 4] {
                    tx.execute(
                        "INSERT INTO devvm_ip_addresses (subnet, ip) VALUES ($1, $2)",
                        &[&subnet, &ip(blocked)],
                    )
                    .await
                    .map_err(db("block"))?;
                }
                tx.execute(
                    "INSERT INTO devvm_ip_addresses (subnet, ip, vm, owner) VALUES ($1, $2, 'old', 'old-run')",
                    &[&subnet, &ip(5)],
                )
                .await
                .map_err(db("lease"))?;
                tx.commit().await.map_err(db("commit"))?;
                Ok(())
            })
            .unwrap();
        config.max_connections = 4;
        let rt = admin.rt.as_ref().unwrap();
        let store = {
            let _e = rt.enter();
            PostgresIpAllocator::from_config(&config, Path::new("/")).unwrap()
        };
        let leased = admin
            .run(async move {
                store.migrate().await?;
                let old = store.lease(&VmName::new("old")?).await?.map(|l| l.ip);
                let mut got = Vec::new();
                for i in 0..9 {
                    let vm = VmName::new(format!("new-{i}"))?;
                    got.push(store.allocate(&vm, &RequestId::random()).await?.ip);
                }
                let full = store
                    .allocate(&VmName::new("too-many")?, &RequestId::random())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind());
                Ok((old, got, full))
            })
            .unwrap();
        let (old, mut got, full) = leased;
        assert_eq!(
            old,
            Some("10.77.0.5".parse().unwrap()),
            "the old lease stays"
        );
        got.sort();
        let want: Vec<std::net::IpAddr> = (6..=14)
            .map(|n| format!("10.77.0.{n}").parse().unwrap())
            .collect();
        assert_eq!(got, want, "exactly the addresses that were free");
        assert_eq!(full, Err(crate::ErrorKind::Exhausted));
    }

    /// The journal's schema from an empty database, and from the previous version with a
    /// run in it (which survives, readable); a database whose schema is newer than this
    /// devvm knows is refused and left as it is.
    #[test]
    fn the_schema_migrates_from_empty_and_from_the_previous_version() {
        let Some(lab) = lab_database() else {
            return;
        };
        let ttl = Duration::from_secs(30);
        let open = |db: &toml::Table| PgJournal::open(db, "migrator", ttl, Path::new("/"));

        // Empty: every version at once.
        let empty = Scratch::new(&lab);
        let j = open(&empty.db).unwrap();
        assert_eq!(
            empty.sql(
                &j,
                "SELECT version FROM devvm_schema WHERE part = 'journal'"
            ),
            vec![SCHEMA.len().to_string()]
        );
        drop(j);

        // The previous version, holding a run: brought forward, the run intact.
        let prev = Scratch::new(&lab);
        let v1 = SCHEMA.len() - 1;
        {
            // A journal of the previous version: its steps only, applied by the migrator.
            let database: PostgresDatabase =
                toml::Value::Table(prev.db.clone()).try_into().unwrap();
            let admin = &prev.admin;
            let pool = {
                let _e = admin.rt.as_ref().unwrap().enter();
                database.pool(Path::new("/")).unwrap()
            };
            admin
                .run(async move {
                    let mut c = pool.get().await.map_err(PgError::Connect)?;
                    let tx = c.transaction().await.map_err(db("begin"))?;
                    migrate_part(&tx, "journal", &SCHEMA[..v1]).await?;
                    tx.execute(
                        "INSERT INTO devvm_journal_runs
                         (request_id, vm, request, state, owner, json_version)
                         VALUES ('old-run', 'old-vm', '{}', 'failed', 'someone', 1)",
                        &[],
                    )
                    .await
                    .map_err(db("insert a run"))?;
                    tx.commit().await.map_err(db("commit"))?;
                    Ok(())
                })
                .unwrap();
        }
        let j = open(&prev.db).unwrap();
        assert_eq!(
            prev.sql(
                &j,
                "SELECT version FROM devvm_schema WHERE part = 'journal'"
            ),
            vec![SCHEMA.len().to_string()],
            "from version {v1}"
        );
        assert_eq!(
            prev.sql(
                &j,
                "SELECT owner FROM devvm_journal_runs WHERE request_id = 'old-run'"
            ),
            vec!["someone".to_owned()],
            "the run survives"
        );
        assert_eq!(
            prev.sql(
                &j,
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'devvm_journal_runs_state'"
            ),
            vec!["1".to_owned()],
            "the new version's index is there"
        );

        // Newer than this devvm: refused, nothing changed.
        prev.sql(
            &j,
            "UPDATE devvm_schema SET version = 99 WHERE part = 'journal'",
        );
        drop(j);
        let e = open(&prev.db).map(|_| ()).expect_err("a newer schema");
        assert!(matches!(e.detail(), Some(PgError::NewerSchema(99))), "{e}");
    }
}
