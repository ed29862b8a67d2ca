//! The pipeline: runs the steps of a provision, rolls back on failure, deprovisions, and
//! recovers runs that a crash left unfinished.
//!
//! Split by seam: [`settings`] (defaults, time limits, retries), [`builder`], [`handle`]
//! (cancel tokens and background runs), `run` (the steps of one provision), `undo`
//! (rollback and deprovision), `recovery` (what a crash left).

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result, UndoFailure};
use crate::events::{EventBus, EventKind, Only, Operation, Progress, RunEvents, Subscription};
use crate::journal::{
    Begin, Journal, OwnerGuard, RunRecord, RunState, StepRecord, StepState, UndoKey, Unreadable,
};
use crate::traits::{
    Bootstrapper, DnsUpdater, Hypervisor, ImageStore, IpAllocator, Placement, UserDirectory,
};
use crate::types::{
    BootstrapReport, BootstrapSettings, BootstrapTarget, Disk, DnsRecord, DomainSpec, HostId,
    Lease, ProvisionRequest, RequestId, ResolvedRequest, Step, Template, TemplateName, Undone,
    User, Vm, VmName, VmSize,
};

mod builder;
mod fleet;
mod handle;
mod migrate;
mod record;
mod recovery;
mod run;
mod settings;
mod undo;

pub use builder::ProvisionerBuilder;
pub use handle::{CancelToken, RunHandle};
pub use recovery::RecoveryReport;
pub use run::WAITING_FOR_BLOCKING_WORK;
pub use settings::{Defaults, Retries, Timeouts};

use record::Recorder;
use recovery::finished_vm;
use run::{Run, guarded, with_retries};
use undo::{resource, undo_steps};

/// The backend of every step.
#[derive(Clone)]
pub struct Backends {
    /// Step `user`.
    pub users: Arc<dyn UserDirectory>,
    /// Step `placement`.
    pub placement: Arc<dyn Placement>,
    /// Step `ip`.
    pub ip: Arc<dyn IpAllocator>,
    /// Step `dns`.
    pub dns: Arc<dyn DnsUpdater>,
    /// Steps `image` and `disk`.
    pub images: Arc<dyn ImageStore>,
    /// Step `domain`.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Step `bootstrap`.
    pub bootstrap: Arc<dyn Bootstrapper>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("users", &self.users.backend())
            .field("placement", &self.placement.backend())
            .field("ip", &self.ip.backend())
            .field("dns", &self.dns.backend())
            .field("images", &self.images.backend())
            .field("hypervisor", &self.hypervisor.backend())
            .field("bootstrap", &self.bootstrap.backend())
            .finish()
    }
}

impl Backends {
    fn name_of(&self, step: Step) -> &str {
        match step {
            Step::User => self.users.backend(),
            Step::Placement => self.placement.backend(),
            Step::Ip => self.ip.backend(),
            Step::Dns => self.dns.backend(),
            Step::Image | Step::Disk => self.images.backend(),
            Step::Domain => self.hypervisor.backend(),
            Step::Bootstrap => self.bootstrap.backend(),
        }
    }
}

/// Provisions and removes VMs. Cheap to clone; clones share everything.
///
/// Needs a tokio runtime (multi-threaded or current-thread) for its async methods.
#[derive(Clone)]
pub struct Provisioner {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("backends", &self.inner.backends)
            .field("state_dir", &self.inner.state_dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Declared (so dropped) before the journal: it tells the journal this provisioner
    /// is gone while the journal can still say so.
    _owner_lock: OwnerGuard,
    backends: Backends,
    journal: Journal,
    bus: EventBus,
    defaults: Defaults,
    timeouts: Timeouts,
    retries: Retries,
    owner: String,
    /// Runs this provisioner is executing right now.
    running: Mutex<HashSet<RequestId>>,
    state_dir: PathBuf,
    /// Said (as `warning` events) at the start of every run.
    warnings: Vec<String>,
}

impl Inner {
    /// A new run's events: `run_started`, then the provisioner's warnings.
    fn start_run(&self, id: &RequestId, vm: &VmName, operation: Operation) -> RunEvents {
        let events = RunEvents::new(self.bus.clone(), id.clone(), vm.clone());
        events.emit(EventKind::RunStarted { operation });
        for message in &self.warnings {
            events.emit(EventKind::Warning {
                message: message.clone(),
            });
        }
        events
    }
}

impl Inner {
    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<RequestId>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn journal<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Journal) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || f(&journal))
            .await
            .map_err(|e| Error::backend("journal task failed").with_source(e))?
    }
}

/// Marks a request id as executing in this process for as long as it lives.
struct RunningGuard {
    inner: Arc<Inner>,
    id: RequestId,
}

impl RunningGuard {
    fn try_new(inner: &Arc<Inner>, id: &RequestId) -> Option<Self> {
        inner.running().insert(id.clone()).then(|| RunningGuard {
            inner: inner.clone(),
            id: id.clone(),
        })
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.inner.running().remove(&self.id);
    }
}

impl Provisioner {
    /// A builder to assemble a provisioner from backends.
    pub fn builder() -> ProvisionerBuilder {
        ProvisionerBuilder::new()
    }

    /// What an unset field of a request falls back to (the config's `[defaults]`).
    pub fn defaults(&self) -> &Defaults {
        &self.inner.defaults
    }

    /// The backends in use.
    pub fn backends(&self) -> &Backends {
        &self.inner.backends
    }

    /// The directory holding the journal.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Receives every event of every run from now on, through a bounded queue (see
    /// [`Subscription`]: a reader that falls behind is told how many it missed).
    pub fn subscribe(&self) -> Subscription {
        self.inner.bus.subscribe()
    }

    /// Fills the request's unset fields from the defaults and validates it.
    pub fn resolve(&self, req: &ProvisionRequest) -> Result<ResolvedRequest> {
        let d = &self.inner.defaults;
        let template = req
            .template
            .clone()
            .or_else(|| d.template.clone())
            .ok_or_else(|| {
                Error::invalid_input("no template requested and no default template configured")
            })?;
        let size = req.size.or(d.size);
        size.validate()?;
        Ok(ResolvedRequest {
            request_id: req.request_id.clone(),
            user: req.user.clone(),
            name: req
                .name
                .clone()
                .unwrap_or_else(|| VmName::derived(&req.user, &req.request_id)),
            template,
            size,
            bootstrap: req.bootstrap.clone().unwrap_or_else(|| d.bootstrap.clone()),
        })
    }

    /// Provisions a VM: runs every step, and on failure undoes every step that acted, in
    /// reverse order, then returns the original error (with any resource an undo could
    /// not remove named in [`Error::undo_failures`]).
    ///
    /// Provisioning a request id that already produced a VM returns that VM. A VM name in
    /// use is [`ErrorKind::AlreadyExists`]. The run continues to completion (or rollback)
    /// even if the returned future is dropped.
    pub async fn provision(&self, req: ProvisionRequest) -> Result<Vm> {
        self.provision_with(req, CancelToken::new()).await
    }

    /// [`provision`](Self::provision) that `cancel` can stop (the run then rolls back).
    pub async fn provision_with(&self, req: ProvisionRequest, cancel: CancelToken) -> Result<Vm> {
        let resolved = self.resolve(&req)?;
        let this = self.clone();
        tokio::spawn(async move { this.provision_resolved(resolved, cancel).await })
            .await
            .map_err(|e| Error::backend("provisioning task failed").with_source(e))?
    }

    async fn provision_resolved(&self, req: ResolvedRequest, cancel: CancelToken) -> Result<Vm> {
        let inner = &self.inner;
        let Some(_guard) = RunningGuard::try_new(inner, &req.request_id) else {
            return Err(in_progress(&req.request_id));
        };
        let events = inner.start_run(&req.request_id, &req.name, Operation::Provision);
        let rec = Recorder::new(inner.clone(), req.request_id.clone(), events);
        let mut recovered_once = false;
        loop {
            let (r, owner) = (req.clone(), inner.owner.clone());
            match inner.journal(move |j| j.begin(&r, &owner)).await {
                Ok(Begin::Started) => break,
                Ok(Begin::Finished(vm)) => {
                    rec.already_done(&vm);
                    return Ok(*vm);
                }
                Ok(Begin::Unfinished { owner })
                    if !recovered_once && self.abandoned(&owner, None) =>
                {
                    // A crashed earlier attempt of this very request: clean it up first.
                    recovered_once = true;
                    let run = inner
                        .journal({
                            let id = req.request_id.clone();
                            move |j| j.run(&id)
                        })
                        .await?;
                    if let Some(run) = run {
                        let mut report = RecoveryReport::default();
                        self.recover_run(run, &mut report).await?;
                        if let Some(first) = report.still_held.first() {
                            let mut e = Error::new(
                                first.kind,
                                "an interrupted earlier attempt could not be cleaned up",
                            );
                            for f in report.still_held {
                                e.push_undo_failure(f);
                            }
                            rec.refused(&e);
                            return Err(e);
                        }
                    }
                }
                Ok(Begin::Unfinished { .. }) => {
                    let e = in_progress(&req.request_id);
                    rec.refused(&e);
                    return Err(e);
                }
                Err(e) => {
                    rec.refused(&e);
                    return Err(e);
                }
            }
        }

        let run = Run {
            inner: inner.clone(),
            req,
            rec,
            cancel,
            halt: AtomicBool::new(false),
            intents: Mutex::new(Vec::new()),
            work: Mutex::new(Vec::new()),
        };
        run.execute().await
    }

    /// Whether the run owned by `owner` has nobody working on it.
    fn abandoned(&self, owner: &str, id: Option<&RequestId>) -> bool {
        if owner == self.inner.owner {
            id.is_some_and(|id| !self.inner.running().contains(id))
        } else {
            !self.inner.journal.owner_alive(owner)
        }
    }

    /// Starts [`provision_with`](Self::provision_with) in the background and returns a
    /// handle that yields this run's events (and no other run's) and then its result: what
    /// a CLI, a binding or a web page needs to show one run live.
    pub fn start_provision(&self, req: ProvisionRequest, cancel: CancelToken) -> RunHandle<Vm> {
        let events = self
            .inner
            .bus
            .subscribe_only(Only::Request(req.request_id.clone()));
        let this = self.clone();
        RunHandle {
            events,
            task: Some(tokio::spawn(async move {
                this.provision_with(req, cancel).await
            })),
            result: None,
        }
    }

    /// Starts [`deprovision`](Self::deprovision) of `name` in the background; the handle
    /// yields the events of runs about that VM, then the result.
    pub fn start_deprovision(&self, name: VmName) -> RunHandle<()> {
        let events = self.inner.bus.subscribe_only(Only::Vm(name.clone()));
        let this = self.clone();
        let vm = name.clone();
        RunHandle {
            events,
            task: Some(tokio::spawn(async move { this.deprovision(&vm).await })),
            result: None,
        }
    }

    /// Starts [`migrate`](Self::migrate) of `name` to `to` in the background; the handle
    /// yields the events of runs about that VM, then the moved VM.
    pub fn start_migrate(&self, name: VmName, to: HostId) -> RunHandle<Vm> {
        let events = self.inner.bus.subscribe_only(Only::Vm(name.clone()));
        let this = self.clone();
        let vm = name.clone();
        RunHandle {
            events,
            task: Some(tokio::spawn(async move { this.migrate(&vm, &to).await })),
            result: None,
        }
    }

    /// Removes the VM `name`: undoes every step of its provision in reverse order.
    ///
    /// An unknown name is [`ErrorKind::NotFound`]. If an undo fails the VM stays listed as
    /// being deprovisioned, the error names what is still held, and calling
    /// `deprovision` (or [`recover`](Self::recover)) again retries.
    pub async fn deprovision(&self, name: &VmName) -> Result<()> {
        let inner = &self.inner;
        let vm = name.clone();
        let run = inner
            .journal(move |j| j.live_run_of(&vm))
            .await?
            .ok_or_else(|| Error::not_found(format!("no vm named {name}")))?;
        let id = run.request.request_id.clone();
        let Some(_guard) = RunningGuard::try_new(inner, &id) else {
            return Err(in_progress(&id));
        };
        match run.state {
            RunState::Active => {}
            RunState::Deprovisioning | RunState::RollingBack
                if self.abandoned(&run.owner, Some(&id)) => {}
            _ => return Err(in_progress(&id)),
        }
        let (from, to) = (run.owner.clone(), inner.owner.clone());
        let claim_id = id.clone();
        if !inner
            .journal(move |j| j.claim(&claim_id, &from, &to, RunState::Deprovisioning))
            .await?
        {
            return Err(in_progress(&id));
        }
        let events = inner.start_run(&id, name, Operation::Deprovision);
        let rec = Recorder::new(inner.clone(), id.clone(), events);
        let failures = self.undo_recorded(&id, &rec).await?;
        Self::finish_undo(&rec, failures, RunState::Removed, RunState::Deprovisioning).await
    }

    /// Reads the journal's steps of `id` and undoes them.
    async fn undo_recorded(&self, id: &RequestId, rec: &Recorder) -> Result<Vec<UndoFailure>> {
        let rid = id.clone();
        let steps = self.inner.journal(move |j| j.steps(&rid)).await?;
        let todo: Vec<(Step, UndoKey)> = steps
            .into_iter()
            .filter(|s| s.state != StepState::Undone)
            .map(|s| (s.step, s.key))
            .collect();
        Ok(undo_steps(&self.inner, id, rec, todo).await)
    }

    /// Records the end of an undo run: `clean` when nothing is held any more, else `dirty`
    /// with the failures.
    async fn finish_undo(
        rec: &Recorder,
        failures: Vec<UndoFailure>,
        clean: RunState,
        dirty: RunState,
    ) -> Result<()> {
        if failures.is_empty() {
            rec.removed(clean).await
        } else {
            let mut e = Error::new(failures[0].kind, "some resources could not be removed");
            for f in failures {
                e.push_undo_failure(f);
            }
            rec.failed(dirty, &e).await;
            Err(e)
        }
    }

    /// Every VM that exists, oldest first. A VM whose journal row cannot be read is left
    /// out (and logged); [`unreadable`](Self::unreadable) names it.
    pub async fn list(&self) -> Result<Vec<Vm>> {
        let (vms, bad) = self.inner.journal(|j| j.active_vms()).await?;
        for b in bad {
            tracing::warn!(run = %b, "journal row cannot be read; left out of the list");
        }
        Ok(vms)
    }

    /// The journal rows of VMs and unfinished runs that cannot be read (corrupted, or
    /// written by another devvm version). They are left exactly as they are: never rolled
    /// back, never rewritten; every other run keeps working.
    pub async fn unreadable(&self) -> Result<Vec<Unreadable>> {
        let (_, mut bad) = self.inner.journal(|j| j.active_vms()).await?;
        let (_, more) = self.inner.journal(|j| j.unfinished()).await?;
        bad.extend(more);
        Ok(bad)
    }

    /// The VM named `name`, if it exists.
    pub async fn get(&self, name: &VmName) -> Result<Option<Vm>> {
        let vm = name.clone();
        let run = self.inner.journal(move |j| j.live_run_of(&vm)).await?;
        Ok(run
            .filter(|r| r.state == RunState::Active)
            .and_then(|r| r.vm))
    }
}

fn in_progress(id: &RequestId) -> Error {
    Error::conflict(format!("request {id} is being worked on by another run")).with_retryable(true)
}
