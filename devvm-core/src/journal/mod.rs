//! The durable journal: every run's intent and result, step by step, the inventory of
//! finished VMs and the idempotency store of request ids.
//!
//! Before a step acts, its intent (with what is needed to undo it) is committed; after it
//! acts, its result. Two stores keep it: SQLite under the state directory (the embedded
//! default, [`sqlite`]), shared by the processes of one machine, and PostgreSQL
//! (`[journal] database = { .. }`, feature `postgres`), shared by provisioners on any
//! number of machines. Both implement [`JournalStore`], whose contract the tests in
//! [`conformance`] check on each.
//!
//! Every write about a run is fenced: it only happens while the run's row names the
//! writer as its owner, so a provisioner that was paused while `recover()` elsewhere
//! claimed its run cannot write into it afterwards.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, ErrorInfo, Result};
use crate::types::{HostId, RequestId, ResolvedRequest, Step, Vm, VmName};

#[cfg(test)]
mod conformance;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

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
    /// The VM is being (or crashed while being) moved to another host; its migration row
    /// says how far that got.
    Migrating,
}

impl RunState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::RollingBack => "rolling_back",
            RunState::Active => "active",
            RunState::Deprovisioning => "deprovisioning",
            RunState::Failed => "failed",
            RunState::Removed => "removed",
            RunState::Migrating => "migrating",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "running" => RunState::Running,
            "rolling_back" => RunState::RollingBack,
            "active" => RunState::Active,
            "deprovisioning" => RunState::Deprovisioning,
            "failed" => RunState::Failed,
            "removed" => RunState::Removed,
            "migrating" => RunState::Migrating,
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
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StepState::Intent => "intent",
            StepState::Done => "done",
            StepState::Undone => "undone",
            StepState::UndoFailed => "undo_failed",
        }
    }
    pub(crate) fn parse(s: &str) -> Result<Self> {
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

/// How far a live migration got; each phase is recorded before its act starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MigrationPhase {
    /// Recorded; nothing done yet.
    Started,
    /// Moving the placement slot to the target.
    Placing,
    /// Making the template and the disk on the target.
    Preparing,
    /// The hypervisor is moving the running guest.
    Migrating,
    /// The guest runs on the target; the source's disk is being removed.
    Finishing,
}

impl MigrationPhase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Started => "started",
            MigrationPhase::Placing => "placing",
            MigrationPhase::Preparing => "preparing",
            MigrationPhase::Migrating => "migrating",
            MigrationPhase::Finishing => "finishing",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "started" => MigrationPhase::Started,
            "placing" => MigrationPhase::Placing,
            "preparing" => MigrationPhase::Preparing,
            "migrating" => MigrationPhase::Migrating,
            "finishing" => MigrationPhase::Finishing,
            other => return Err(journal_err(format!("unknown migration phase {other:?}"))),
        })
    }
}

/// A run's migration as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MigrationRecord {
    pub(crate) from: HostId,
    pub(crate) to: HostId,
    pub(crate) phase: MigrationPhase,
}

/// The version of the JSON this build writes into a run's row; a row with another
/// version is reported as unreadable, never guessed at.
pub(crate) const JSON_VERSION: i64 = 1;

/// A journal row that cannot be decoded (corrupted, or written by another devvm version).
/// It is reported and left as it is: never rolled back, never rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreadable {
    /// The run's request id, as stored.
    pub request_id: String,
    /// The VM name, as stored.
    pub vm: String,
    /// Why it cannot be read.
    pub error: String,
}

impl Unreadable {
    pub(crate) fn into_error(self) -> Error {
        journal_err(format!(
            "the journal row of run {} (vm {}) cannot be read: {}",
            self.request_id, self.vm, self.error
        ))
    }
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} (vm {}): {}",
            self.request_id, self.vm, self.error
        )
    }
}

pub(crate) fn split<T, E>(rows: Vec<std::result::Result<T, E>>) -> (Vec<T>, Vec<E>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for r in rows {
        match r {
            Ok(t) => good.push(t),
            Err(e) => bad.push(e),
        }
    }
    (good, bad)
}

pub(crate) fn journal_err(message: impl Into<String>) -> Error {
    Error::backend(message).with_backend("journal")
}

/// The error of a fenced write: the run belongs to another owner now.
pub(crate) fn fenced(request_id: &RequestId) -> Error {
    Error::conflict(format!(
        "run {request_id} was taken over by another provisioner (recover()); this one no longer writes to it"
    ))
    .with_backend("journal")
}

pub(crate) fn json_err(context: &str) -> impl FnOnce(serde_json::Error) -> Error + '_ {
    move |e| journal_err(format!("journal: {context}")).with_source(e)
}

pub(crate) fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Which runs [`JournalStore::runs`] reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RunFilter<'a> {
    /// Not in a final state: running, rolling back, deprovisioning, migrating.
    Unfinished,
    /// The VM exists.
    Active,
    /// The run that holds this VM name (running, rolling back, active, deprovisioning).
    LiveVm(&'a VmName),
    /// The run of this request id.
    Id(&'a RequestId),
}

/// Proof, for as long as it lives, that a provisioner is alive (an OS file lock, a
/// heartbeat row); dropping it says the provisioner is gone.
pub(crate) type OwnerGuard = Box<dyn std::any::Any + Send + Sync>;

/// A journal store for one provisioner (its `owner` id, fixed when it was opened). Calls
/// block (the pipeline makes them from `spawn_blocking`) and may come from any thread.
///
/// The contract, checked for each store by [`conformance`]: a run's name is held by at
/// most one live run (`begin` of another is `AlreadyExists`); `claim` is atomic (of two
/// claims of one run, one wins); every write about a run is refused with `Conflict` once
/// the run names another owner; `owner_alive` is true while the owner's guard lives, and
/// false once it was dropped or its process died; rows another version wrote come back as
/// [`Unreadable`], never guessed at.
pub(crate) trait JournalStore: Send + Sync + 'static {
    /// Registers this store's owner as live; the guard proves it while it lives.
    fn register_owner(&self) -> Result<OwnerGuard>;
    /// Whether the provisioner `owner` is alive.
    fn owner_alive(&self, owner: &str) -> bool;
    /// Forgets a dead owner (after its runs were claimed).
    fn forget_owner(&self, owner: &str);
    /// Records the start of a provision, or says why it cannot start: a request id seen
    /// before with other parameters, or whose VM was removed, is a conflict; a VM name
    /// held by another live run is `AlreadyExists`.
    fn begin(&self, req: &ResolvedRequest, owner: &str) -> Result<Begin>;
    /// Atomically takes over a run from `from` and sets its state. False when someone
    /// else took it first.
    fn claim(&self, request_id: &RequestId, from: &str, to: &str, state: RunState) -> Result<bool>;
    /// Records that `step` is about to act (fenced).
    fn intent(&self, request_id: &RequestId, step: Step, key: &UndoKey) -> Result<()>;
    /// Sets a step's state, with its output or error (fenced).
    fn set_step(
        &self,
        request_id: &RequestId,
        step: Step,
        state: StepState,
        output: Option<&serde_json::Value>,
        error: Option<&ErrorInfo>,
    ) -> Result<()>;
    /// Sets the state of a run, with the VM record (for `Active`) or the error (fenced).
    fn set_run(
        &self,
        request_id: &RequestId,
        state: RunState,
        vm: Option<&Vm>,
        error: Option<&ErrorInfo>,
    ) -> Result<()>;
    /// The steps of a run, in pipeline order.
    fn steps(&self, request_id: &RequestId) -> Result<Vec<StepRecord>>;
    /// The runs `filter` selects, oldest first; an undecodable row in its place.
    fn runs(
        &self,
        filter: RunFilter<'_>,
    ) -> Result<Vec<std::result::Result<RunRecord, Unreadable>>>;
    /// Records the start of a migration of `request_id` (held by this owner, state
    /// `migrating`) from `from` to `to`, replacing an earlier one's row (fenced).
    fn begin_migration(&self, request_id: &RequestId, from: &HostId, to: &HostId) -> Result<()>;
    /// Records that the migration of `request_id` enters `phase` (fenced).
    fn migration_phase(&self, request_id: &RequestId, phase: MigrationPhase) -> Result<()>;
    /// Ends the migration of `request_id` in one transaction (fenced): the run is active
    /// with `vm`, its steps' undo keys name the VM's host now; the migration row goes.
    fn end_migration(
        &self,
        request_id: &RequestId,
        vm: &Vm,
        error: Option<&ErrorInfo>,
    ) -> Result<()>;
    /// The migration row of `request_id`, if any.
    fn migration(&self, request_id: &RequestId) -> Result<Option<MigrationRecord>>;

    /// Records that `step` acted, with its result.
    fn done(&self, request_id: &RequestId, step: Step, output: &serde_json::Value) -> Result<()> {
        self.set_step(request_id, step, StepState::Done, Some(output), None)
    }

    /// Records that `step` was undone, or that undoing it failed.
    fn undone(
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

    /// Unfinished runs, and the rows of such runs that cannot be read.
    fn unfinished(&self) -> Result<(Vec<RunRecord>, Vec<Unreadable>)> {
        Ok(split(self.runs(RunFilter::Unfinished)?))
    }

    /// The run that currently holds the VM name, if any; an unreadable row is an error.
    fn live_run_of(&self, vm: &VmName) -> Result<Option<RunRecord>> {
        self.runs(RunFilter::LiveVm(vm))?
            .into_iter()
            .next()
            .map(|r| r.map_err(Unreadable::into_error))
            .transpose()
    }

    /// The run of a request id, if any; an unreadable row is an error.
    fn run(&self, request_id: &RequestId) -> Result<Option<RunRecord>> {
        self.runs(RunFilter::Id(request_id))?
            .into_iter()
            .next()
            .map(|r| r.map_err(Unreadable::into_error))
            .transpose()
    }

    /// The size of every VM that exists (readable rows only).
    fn active_sizes(&self) -> Result<std::collections::BTreeMap<VmName, crate::types::VmSize>> {
        let (runs, _) = split(self.runs(RunFilter::Active)?);
        Ok(runs
            .into_iter()
            .map(|r| (r.request.name, r.request.size))
            .collect())
    }

    /// Every VM that exists, and the rows of VMs that cannot be read.
    fn active_vms(&self) -> Result<(Vec<Vm>, Vec<Unreadable>)> {
        let (runs, bad) = split(self.runs(RunFilter::Active)?);
        Ok((runs.into_iter().filter_map(|r| r.vm).collect(), bad))
    }
}

/// The journal of one provisioner: a shared handle on its store. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Journal(Arc<dyn JournalStore>);

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Journal")
    }
}

impl std::ops::Deref for Journal {
    type Target = dyn JournalStore;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// Where the journal lives: the `[journal]` section of the config (none: SQLite in the
/// state directory).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JournalOptions {
    /// A PostgreSQL database (`{ url, password }`) shared by provisioners on several
    /// machines (feature `postgres`).
    #[serde(default)]
    database: Option<toml::Table>,
    /// Seconds a provisioner's heartbeat row stays valid without renewal (PostgreSQL
    /// only; default 30): a provisioner not heard from for this long is dead.
    #[serde(default)]
    owner_ttl_secs: Option<u64>,
}

impl Journal {
    /// Opens the journal of the provisioner `owner`: in PostgreSQL when `options` names a
    /// database, else SQLite in `state_dir` (created 0700, its files 0600). Relative
    /// secret files are resolved against `base_dir`.
    pub(crate) fn open(
        state_dir: &Path,
        owner: &str,
        options: Option<&toml::Table>,
        base_dir: &Path,
    ) -> Result<Journal> {
        let options: JournalOptions = match options {
            None => JournalOptions::default(),
            Some(t) => toml::Value::Table(t.clone())
                .try_into()
                .map_err(|e: toml::de::Error| {
                    Error::invalid_input(format!("[journal]: {}", e.message().trim()))
                })?,
        };
        match options.database {
            None => Ok(Journal(Arc::new(sqlite::SqliteJournal::open(
                state_dir, owner,
            )?))),
            #[cfg(feature = "postgres")]
            Some(db) => Ok(Journal(Arc::new(postgres::PgJournal::open(
                &db,
                owner,
                std::time::Duration::from_secs(options.owner_ttl_secs.unwrap_or(30).max(1)),
                base_dir,
            )?))),
            #[cfg(not(feature = "postgres"))]
            Some(_) => {
                let _ = (base_dir, options.owner_ttl_secs);
                Err(Error::invalid_input(
                    "[journal] database: a journal in PostgreSQL needs devvm-core's `postgres` feature",
                ))
            }
        }
    }

    /// The SQLite journal in `state_dir` (tests).
    #[cfg(test)]
    pub(crate) fn sqlite(state_dir: &Path, owner: &str) -> Result<Journal> {
        Self::open(state_dir, owner, None, state_dir)
    }
}

/// What [`import_sqlite_journal`] found and moved.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct JournalImport {
    /// The VMs the SQLite journal holds (its runs in state active).
    pub vms: usize,
    /// How many of them were added (the others were there already).
    pub added: usize,
}

/// Copies the VMs of the SQLite journal in `state_dir` (every run whose VM exists, with
/// its steps, so that a deprovision undoes them as usual) into the PostgreSQL journal
/// that the `[journal]` `section` names, all or nothing; run again, it adds nothing. A
/// journal with unfinished runs is refused (`recover()` them first), as is one with rows
/// this devvm cannot read, and a VM name held there by another live run
/// (`AlreadyExists`). Nothing in the SQLite journal changes.
#[cfg(feature = "postgres")]
pub fn import_sqlite_journal(
    state_dir: &Path,
    section: &toml::Table,
    base_dir: &Path,
) -> Result<JournalImport> {
    if !state_dir.join("journal.sqlite3").is_file() {
        return Err(Error::not_found(format!(
            "no SQLite journal in {}",
            state_dir.display()
        )));
    }
    let owner = format!("importer-{}", RequestId::random());
    let lite = sqlite::SqliteJournal::open(state_dir, &owner)?;
    let (unfinished, bad) = JournalStore::unfinished(&lite)?;
    if let Some(r) = unfinished.first() {
        return Err(Error::conflict(format!(
            "the SQLite journal has {} unfinished run(s) (vm {} first): run `devvm recover` with it first",
            unfinished.len(),
            r.request.name
        )));
    }
    let (active, more_bad) = split(lite.runs(RunFilter::Active)?);
    if let Some(u) = bad.iter().chain(&more_bad).next() {
        return Err(Error::invalid_input(format!(
            "the SQLite journal has rows this devvm cannot read ({u}); nothing was imported"
        )));
    }
    let mut runs = Vec::new();
    for r in active {
        let steps = lite.steps(&r.request.request_id)?;
        runs.push((r, steps));
    }
    let vms = runs.len();
    let section = match section.get("database") {
        Some(toml::Value::Table(db)) => db.clone(),
        _ => {
            return Err(Error::invalid_input(
                "[journal] has no `database = { url, password }` to import into",
            ));
        }
    };
    let pg = postgres::PgJournal::open(
        &section,
        &owner,
        std::time::Duration::from_secs(30),
        base_dir,
    )?;
    let added = pg.import(runs)?;
    Ok(JournalImport { vms, added })
}
