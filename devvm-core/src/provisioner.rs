//! The pipeline: runs the steps of a provision, rolls back on failure, deprovisions, and
//! recovers runs that a crash left unfinished.

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
use crate::events::{EventBus, EventKind, Operation, Progress, RunEvents, Subscription};
use crate::journal::{
    Begin, Journal, OwnerLock, RunRecord, RunState, StepRecord, StepState, UndoKey, Unreadable,
};
use crate::traits::{
    Bootstrapper, DnsUpdater, Hypervisor, ImageStore, IpAllocator, Placement, UserDirectory,
};
use crate::types::{
    BootstrapReport, BootstrapSettings, BootstrapTarget, Disk, DnsRecord, DomainSpec, HostId,
    Lease, ProvisionRequest, RequestId, ResolvedRequest, Step, Template, TemplateName, Undone,
    User, Vm, VmName, VmSize,
};

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

/// What a request gets when it leaves a field unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Defaults {
    /// Template when the request names none.
    pub template: Option<TemplateName>,
    /// Size when the request gives none.
    pub size: VmSize,
    /// Bootstrap settings when the request gives none.
    pub bootstrap: BootstrapSettings,
}

/// How long each step (and its undo) may take before it fails with
/// [`ErrorKind::Timeout`]. The undo of a step gets the same limit as the step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    per_step: [Duration; 8],
}

impl Default for Timeouts {
    fn default() -> Self {
        let mut t = Timeouts {
            per_step: [Duration::from_secs(60); 8],
        };
        t.set(Step::Image, Duration::from_secs(1800));
        t.set(Step::Disk, Duration::from_secs(1800));
        t.set(Step::Domain, Duration::from_secs(600));
        t.set(Step::Bootstrap, Duration::from_secs(1800));
        t
    }
}

impl Timeouts {
    /// The limit of `step`.
    pub fn get(&self, step: Step) -> Duration {
        self.per_step[step as usize]
    }
    /// Sets the limit of `step`.
    pub fn set(&mut self, step: Step, limit: Duration) {
        self.per_step[step as usize] = limit;
    }
}

/// How often a step's call is tried again after a transient failure
/// ([`Error::is_retryable`]: a service down or slow), with exponential backoff and jitter.
/// Retrying is safe because acting is idempotent per VM; the step's time limit bounds the
/// whole, and each retry is a progress event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retries {
    attempts: [u32; 8],
    /// The first pause.
    pub initial: Duration,
    /// The longest pause.
    pub max: Duration,
}

impl Default for Retries {
    /// Three attempts per step, pauses from 200 ms up to 3 s.
    fn default() -> Self {
        Retries {
            attempts: [3; 8],
            initial: Duration::from_millis(200),
            max: Duration::from_secs(3),
        }
    }
}

impl Retries {
    /// No retries at all: every call is tried once.
    pub fn none() -> Self {
        Retries {
            attempts: [1; 8],
            ..Retries::default()
        }
    }
    /// How many times `step`'s call is tried in all (at least 1).
    pub fn attempts(&self, step: Step) -> u32 {
        self.attempts[step as usize]
    }
    /// Sets how many times `step`'s call is tried in all (0 counts as 1).
    pub fn set_attempts(&mut self, step: Step, attempts: u32) {
        self.attempts[step as usize] = attempts.max(1);
    }
}

/// Runs `call` until it succeeds, fails for good, or `step`'s attempts are used up,
/// pausing with exponential backoff and jitter between tries; each retry is reported on
/// `progress`.
async fn with_retries<T, F, Fut>(
    retries: &Retries,
    step: Step,
    progress: &Progress,
    mut call: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    use backon::{ExponentialBuilder, Retryable};
    let attempts = retries.attempts(step);
    if attempts <= 1 {
        return call().await;
    }
    let policy = ExponentialBuilder::default()
        .with_min_delay(retries.initial)
        .with_max_delay(retries.max)
        .with_max_times(attempts as usize - 1)
        .with_jitter();
    call.retry(policy)
        .sleep(tokio::time::sleep)
        .when(Error::is_retryable)
        .notify(|e: &Error, pause: Duration| {
            progress.message(format!(
                "retrying in {:.1}s after a transient failure: {e}",
                pause.as_secs_f64()
            ));
        })
        .await
}

/// Cancels a run from another task or thread. Cheap to clone.
///
/// A cancelled run stops at once (the step under way is abandoned), rolls back what it
/// did, and fails with [`ErrorKind::Cancelled`].
#[derive(Debug, Clone)]
pub struct CancelToken {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        CancelToken {
            tx: Arc::new(watch::channel(false).0),
        }
    }
    /// Cancels every run holding this token.
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }
    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        *self.tx.borrow()
    }
    async fn cancelled(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so this only returns once cancelled.
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// Which events a [`RunHandle`] passes on.
#[derive(Debug, Clone)]
enum RunFilter {
    Request(RequestId),
    Vm(VmName),
}

impl RunFilter {
    fn matches(&self, e: &crate::events::Event) -> bool {
        match self {
            RunFilter::Request(id) => e.request_id == *id,
            RunFilter::Vm(vm) => e.vm == *vm,
        }
    }
}

/// A run going on in the background ([`Provisioner::start_provision`],
/// [`Provisioner::start_deprovision`]): its events, in order, then its result.
///
/// The run goes on to its end (or rollback) even if the handle is dropped.
#[derive(Debug)]
pub struct RunHandle<T> {
    events: Subscription,
    only: RunFilter,
    task: Option<tokio::task::JoinHandle<Result<T>>>,
    result: Option<Result<T>>,
}

impl<T: Send + 'static> RunHandle<T> {
    /// The run's next event; `None` once the run has ended and every one of its events
    /// was delivered. Cancel-safe: it can be raced in `tokio::select!`.
    pub async fn next_event(&mut self) -> Option<crate::events::Event> {
        loop {
            let Some(task) = self.task.as_mut() else {
                // Every event of the run was published before its task ended.
                while let Some(e) = self.events.try_recv() {
                    if self.only.matches(&e) {
                        return Some(e);
                    }
                }
                return None;
            };
            tokio::select! {
                biased;
                Some(e) = self.events.recv() => {
                    if self.only.matches(&e) {
                        return Some(e);
                    }
                }
                joined = task => {
                    self.result = Some(joined.unwrap_or_else(|e| {
                        Err(Error::backend("the run's task failed").with_source(e))
                    }));
                    self.task = None;
                }
            }
        }
    }

    /// Waits for the run to end and returns its result; events not yet taken are dropped.
    pub async fn finish(mut self) -> Result<T> {
        while self.next_event().await.is_some() {}
        self.result
            .take()
            .unwrap_or_else(|| Err(Error::backend("the run ended without a result")))
    }
}

/// What [`Provisioner::recover`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    /// Runs whose every step had finished, now recorded as VMs.
    pub completed: Vec<Vm>,
    /// Provisions that were rolled back.
    pub rolled_back: Vec<RequestId>,
    /// Deprovisions that were finished.
    pub removed: Vec<VmName>,
    /// Resources that still could not be removed; a later `recover()` tries again.
    pub still_held: Vec<UndoFailure>,
    /// Runs whose journal rows cannot be read: left exactly as they are.
    pub unreadable: Vec<Unreadable>,
}

/// Builds a [`Provisioner`] from backends, by hand or from a config file.
#[derive(Default)]
pub struct ProvisionerBuilder {
    state_dir: Option<PathBuf>,
    users: Option<Arc<dyn UserDirectory>>,
    placement: Option<Arc<dyn Placement>>,
    ip: Option<Arc<dyn IpAllocator>>,
    dns: Option<Arc<dyn DnsUpdater>>,
    images: Option<Arc<dyn ImageStore>>,
    hypervisor: Option<Arc<dyn Hypervisor>>,
    bootstrap: Option<Arc<dyn Bootstrapper>>,
    defaults: Defaults,
    timeouts: Timeouts,
    retries: Retries,
}

impl std::fmt::Debug for ProvisionerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisionerBuilder")
            .field("state_dir", &self.state_dir)
            .field("defaults", &self.defaults)
            .field("timeouts", &self.timeouts)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl ProvisionerBuilder {
    /// An empty builder: every backend and the state directory must be set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the journal lives.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }
    /// The user directory.
    pub fn users(mut self, b: Arc<dyn UserDirectory>) -> Self {
        self.users = Some(b);
        self
    }
    /// The placement backend.
    pub fn placement(mut self, b: Arc<dyn Placement>) -> Self {
        self.placement = Some(b);
        self
    }
    /// The IP allocator.
    pub fn ip(mut self, b: Arc<dyn IpAllocator>) -> Self {
        self.ip = Some(b);
        self
    }
    /// The DNS updater.
    pub fn dns(mut self, b: Arc<dyn DnsUpdater>) -> Self {
        self.dns = Some(b);
        self
    }
    /// The image store.
    pub fn images(mut self, b: Arc<dyn ImageStore>) -> Self {
        self.images = Some(b);
        self
    }
    /// The hypervisor.
    pub fn hypervisor(mut self, b: Arc<dyn Hypervisor>) -> Self {
        self.hypervisor = Some(b);
        self
    }
    /// The bootstrapper.
    pub fn bootstrap(mut self, b: Arc<dyn Bootstrapper>) -> Self {
        self.bootstrap = Some(b);
        self
    }
    /// Every backend at once.
    pub fn backends(self, b: Backends) -> Self {
        self.users(b.users)
            .placement(b.placement)
            .ip(b.ip)
            .dns(b.dns)
            .images(b.images)
            .hypervisor(b.hypervisor)
            .bootstrap(b.bootstrap)
    }
    /// Defaults for unset request fields.
    pub fn defaults(mut self, defaults: Defaults) -> Self {
        self.defaults = defaults;
        self
    }
    /// How often transient failures are retried.
    pub fn retries(mut self, retries: Retries) -> Self {
        self.retries = retries;
        self
    }
    /// Step time limits.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The backends set so far, for wrapping one (for example in a fault injector).
    pub fn current_backends(&self) -> Option<Backends> {
        Some(Backends {
            users: self.users.clone()?,
            placement: self.placement.clone()?,
            ip: self.ip.clone()?,
            dns: self.dns.clone()?,
            images: self.images.clone()?,
            hypervisor: self.hypervisor.clone()?,
            bootstrap: self.bootstrap.clone()?,
        })
    }

    /// Opens the journal and makes the provisioner. A missing backend or state directory
    /// is an [`ErrorKind::InvalidInput`] error naming it.
    pub fn build(self) -> Result<Provisioner> {
        fn need<T>(v: Option<T>, what: &str) -> Result<T> {
            v.ok_or_else(|| Error::invalid_input(format!("no {what} configured")))
        }
        let backends = Backends {
            users: need(self.users, "user directory")?,
            placement: need(self.placement, "placement backend")?,
            ip: need(self.ip, "ip allocator")?,
            dns: need(self.dns, "dns updater")?,
            images: need(self.images, "image store")?,
            hypervisor: need(self.hypervisor, "hypervisor")?,
            bootstrap: need(self.bootstrap, "bootstrapper")?,
        };
        let state_dir = need(self.state_dir, "state directory")?;
        let warnings = crate::secret::take_secret_warnings();
        let owner = uuid::Uuid::new_v4().to_string();
        let journal = Journal::open(&state_dir, &owner)?;
        let owner_lock = journal.register_owner()?;
        Ok(Provisioner {
            inner: Arc::new(Inner {
                backends,
                journal,
                bus: EventBus::default(),
                defaults: self.defaults,
                timeouts: self.timeouts,
                retries: self.retries,
                owner,
                _owner_lock: owner_lock,
                running: Mutex::new(HashSet::new()),
                state_dir,
                warnings,
            }),
        })
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
    backends: Backends,
    journal: Journal,
    bus: EventBus,
    defaults: Defaults,
    timeouts: Timeouts,
    retries: Retries,
    owner: String,
    _owner_lock: OwnerLock,
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

    /// The backends in use.
    pub fn backends(&self) -> &Backends {
        &self.inner.backends
    }

    /// The directory holding the journal.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Receives every event of every run from now on.
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
        let mut recovered_once = false;
        loop {
            let (r, owner) = (req.clone(), inner.owner.clone());
            match inner.journal(move |j| j.begin(&r, &owner)).await {
                Ok(Begin::Started) => break,
                Ok(Begin::Finished(vm)) => {
                    events.emit(EventKind::RunFinished {
                        provisioned: Some(vm.clone()),
                    });
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
                            events.emit(EventKind::RunFailed { error: e.info() });
                            return Err(e);
                        }
                    }
                }
                Ok(Begin::Unfinished { .. }) => {
                    let e = in_progress(&req.request_id);
                    events.emit(EventKind::RunFailed { error: e.info() });
                    return Err(e);
                }
                Err(e) => {
                    events.emit(EventKind::RunFailed { error: e.info() });
                    return Err(e);
                }
            }
        }

        let run = Run {
            inner: inner.clone(),
            req,
            events,
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
        let events = self.subscribe();
        let id = req.request_id.clone();
        let this = self.clone();
        RunHandle {
            events,
            only: RunFilter::Request(id),
            task: Some(tokio::spawn(async move {
                this.provision_with(req, cancel).await
            })),
            result: None,
        }
    }

    /// Starts [`deprovision`](Self::deprovision) of `name` in the background; the handle
    /// yields the events of runs about that VM, then the result.
    pub fn start_deprovision(&self, name: VmName) -> RunHandle<()> {
        let events = self.subscribe();
        let this = self.clone();
        let vm = name.clone();
        RunHandle {
            events,
            only: RunFilter::Vm(name),
            task: Some(tokio::spawn(async move { this.deprovision(&vm).await })),
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
        let failures = self.undo_recorded(&id, &events).await?;
        self.finish_undo(
            &id,
            &events,
            failures,
            RunState::Removed,
            RunState::Deprovisioning,
        )
        .await
    }

    /// Reads the journal's steps of `id` and undoes them.
    async fn undo_recorded(&self, id: &RequestId, events: &RunEvents) -> Result<Vec<UndoFailure>> {
        let rid = id.clone();
        let steps = self.inner.journal(move |j| j.steps(&rid)).await?;
        let todo: Vec<(Step, UndoKey)> = steps
            .into_iter()
            .filter(|s| s.state != StepState::Undone)
            .map(|s| (s.step, s.key))
            .collect();
        Ok(undo_steps(&self.inner, id, events, todo).await)
    }

    async fn finish_undo(
        &self,
        id: &RequestId,
        events: &RunEvents,
        failures: Vec<UndoFailure>,
        clean: RunState,
        dirty: RunState,
    ) -> Result<()> {
        if failures.is_empty() {
            let rid = id.clone();
            self.inner
                .journal(move |j| j.set_run(&rid, clean, None, None))
                .await?;
            events.emit(EventKind::RunFinished { provisioned: None });
            Ok(())
        } else {
            let mut e = Error::new(failures[0].kind, "some resources could not be removed");
            for f in failures {
                e.push_undo_failure(f);
            }
            let (rid, info) = (id.clone(), e.info());
            let _ = self
                .inner
                .journal(move |j| j.set_run(&rid, dirty, None, Some(&info)))
                .await;
            events.emit(EventKind::RunFailed { error: e.info() });
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

    /// Finds the runs that a crashed or killed provisioner left unfinished and finishes
    /// them: a provision whose every step had completed is recorded as a VM; any other
    /// provision is rolled back; an interrupted deprovision is completed. Runs that a live
    /// provisioner (in this or another process) is working on are left alone.
    ///
    /// Safe to call at any time and any number of times.
    pub async fn recover(&self) -> Result<RecoveryReport> {
        let (runs, unreadable) = self.inner.journal(|j| j.unfinished()).await?;
        let mut report = RecoveryReport {
            unreadable,
            ..RecoveryReport::default()
        };
        let mut dead_owners = HashSet::new();
        for run in runs {
            let id = run.request.request_id.clone();
            if !self.abandoned(&run.owner, Some(&id)) {
                continue;
            }
            let Some(_guard) = RunningGuard::try_new(&self.inner, &id) else {
                continue;
            };
            if run.owner != self.inner.owner {
                dead_owners.insert(run.owner.clone());
            }
            let (rid, vm) = (id.to_string(), run.request.name.to_string());
            if let Err(e) = self.recover_run(run, &mut report).await {
                // One run that cannot be read (its steps) or finished does not stop the
                // others; it stays as it is and is reported.
                tracing::warn!(run = %rid, error = %e, "cannot recover run");
                report.unreadable.push(Unreadable {
                    request_id: rid,
                    vm,
                    error: e.to_string(),
                });
            }
        }
        for owner in dead_owners {
            let o = owner.clone();
            let left = self
                .inner
                .journal(move |j| Ok(j.unfinished()?.0.iter().any(|r| r.owner == o)))
                .await?;
            if !left {
                self.inner.journal.forget_owner(&owner);
            }
        }
        Ok(report)
    }

    async fn recover_run(&self, run: RunRecord, report: &mut RecoveryReport) -> Result<()> {
        let inner = &self.inner;
        let id = run.request.request_id.clone();
        let events = RunEvents::new(inner.bus.clone(), id.clone(), run.request.name.clone());
        let rid = id.clone();
        let steps = inner.journal(move |j| j.steps(&rid)).await?;

        // Every step finished and only the final record is missing: complete the run.
        if run.state == RunState::Running
            && let Some(vm) = vm_from_steps(&run.request, &steps)
        {
            {
                let (from, to, cid) = (run.owner.clone(), inner.owner.clone(), id.clone());
                if !inner
                    .journal(move |j| j.claim(&cid, &from, &to, RunState::Running))
                    .await?
                {
                    return Ok(());
                }
                events.emit(EventKind::RunStarted {
                    operation: Operation::Recover,
                });
                let (rid, v) = (id.clone(), vm.clone());
                inner
                    .journal(move |j| j.set_run(&rid, RunState::Active, Some(&v), None))
                    .await?;
                events.emit(EventKind::RunFinished {
                    provisioned: Some(Box::new(vm.clone())),
                });
                report.completed.push(vm);
                return Ok(());
            }
        }

        let (target, clean, dirty) = match run.state {
            RunState::Deprovisioning => (
                RunState::Deprovisioning,
                RunState::Removed,
                RunState::Deprovisioning,
            ),
            _ => (
                RunState::RollingBack,
                RunState::Failed,
                RunState::RollingBack,
            ),
        };
        let (from, to, cid) = (run.owner.clone(), inner.owner.clone(), id.clone());
        if !inner
            .journal(move |j| j.claim(&cid, &from, &to, target))
            .await?
        {
            return Ok(());
        }
        events.emit(EventKind::RunStarted {
            operation: Operation::Recover,
        });
        let failures = self.undo_recorded(&id, &events).await?;
        report.still_held.extend(failures.iter().cloned());
        let clean_run = failures.is_empty();
        let _ = self.finish_undo(&id, &events, failures, clean, dirty).await;
        if clean_run {
            match clean {
                RunState::Removed => report.removed.push(run.request.name.clone()),
                _ => report.rolled_back.push(id),
            }
        }
        Ok(())
    }
}

fn in_progress(id: &RequestId) -> Error {
    Error::conflict(format!("request {id} is being worked on by another run")).with_retryable(true)
}

fn output<T: DeserializeOwned>(steps: &[StepRecord], step: Step) -> Option<T> {
    steps
        .iter()
        .find(|s| s.step == step && s.state == StepState::Done)
        .and_then(|s| s.output.clone())
        .and_then(|o| serde_json::from_value(o).ok())
}

/// The VM a run produced, if the journal shows every step done.
fn vm_from_steps(req: &ResolvedRequest, steps: &[StepRecord]) -> Option<Vm> {
    if !Step::ALL.iter().all(|st| {
        steps
            .iter()
            .any(|s| s.step == *st && s.state == StepState::Done)
    }) {
        return None;
    }
    let host: HostId = output(steps, Step::Placement)?;
    let lease: Lease = output(steps, Step::Ip)?;
    let record: DnsRecord = output(steps, Step::Dns)?;
    let disk: Disk = output(steps, Step::Disk)?;
    let report: BootstrapReport = output(steps, Step::Bootstrap)?;
    Some(Vm {
        name: req.name.clone(),
        fqdn: record.fqdn,
        ip: lease.ip,
        host,
        disk: disk.path,
        owner: req.user.clone(),
        template: req.template.clone(),
        created: OffsetDateTime::now_utc(),
        request_id: req.request_id.clone(),
        bootstrapped: report.bootstrapped,
    })
}

/// A one-line summary of a step's result, for events.
trait Summary {
    fn summary(&self) -> String;
}

impl Summary for User {
    fn summary(&self) -> String {
        match &self.display_name {
            Some(d) => format!("{} ({d})", self.name),
            None => self.name.to_string(),
        }
    }
}
impl Summary for HostId {
    fn summary(&self) -> String {
        self.to_string()
    }
}
impl Summary for Lease {
    fn summary(&self) -> String {
        format!("{}/{}", self.ip, self.prefix_len)
    }
}
impl Summary for DnsRecord {
    fn summary(&self) -> String {
        format!("{} -> {}", self.fqdn, self.ip)
    }
}
impl Summary for Template {
    fn summary(&self) -> String {
        self.name.to_string()
    }
}
impl Summary for Disk {
    fn summary(&self) -> String {
        self.path.display().to_string()
    }
}
impl Summary for crate::types::Domain {
    fn summary(&self) -> String {
        format!("{} on {}", self.name, self.host)
    }
}
impl Summary for BootstrapReport {
    fn summary(&self) -> String {
        if self.summary.is_empty() {
            if self.bootstrapped {
                "bootstrapped"
            } else {
                "nothing to do"
            }
            .to_owned()
        } else {
            self.summary.clone()
        }
    }
}

/// Why a step did not produce a value.
enum StepError {
    /// It ran and failed.
    Failed(Error),
    /// It did not run because another step failed first.
    Skipped,
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        StepError::Failed(e)
    }
}

/// One provision under way.
struct Run {
    inner: Arc<Inner>,
    req: ResolvedRequest,
    events: RunEvents,
    cancel: CancelToken,
    /// Set once any step failed, so that steps not yet started are skipped.
    halt: AtomicBool,
    /// Steps whose intent was recorded, in the order they started.
    intents: Mutex<Vec<(Step, UndoKey)>>,
    /// The blocking work of every started step, which a rollback waits for.
    work: Mutex<Vec<(Step, crate::work::StepWork)>>,
}

impl Run {
    fn key(&self) -> UndoKey {
        UndoKey {
            vm: self.req.name.clone(),
            host: None,
            ip: None,
        }
    }

    /// Runs one step: journal the intent, emit events, run the backend call in its own
    /// task under the step's time limit, journal the result.
    async fn step<T, Fut>(
        &self,
        step: Step,
        key: UndoKey,
        act: impl FnOnce(Progress) -> Fut,
    ) -> Result<T, StepError>
    where
        T: Serialize + Summary + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        if self.halt.load(Ordering::SeqCst) {
            return Err(StepError::Skipped);
        }
        let backend = self.inner.backends.name_of(step).to_owned();
        let result = async {
            if self.cancel.is_cancelled() {
                return Err(cancelled());
            }
            let (id, k) = (self.req.request_id.clone(), key.clone());
            self.inner.journal(move |j| j.intent(&id, step, &k)).await?;
            self.intents
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((step, key));
            self.events.emit(EventKind::StepStarted { step });
            let work = crate::work::StepWork::default();
            self.work
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((step, work.clone()));
            let fut = work.clone().scope(act(self.events.progress(step)));
            let value = guarded(fut, self.inner.timeouts.get(step), Some(&self.cancel))
                .await
                .inspect_err(|_| work.abandon())?;
            let json = serde_json::to_value(&value)
                .map_err(|e| Error::backend("cannot encode step result").with_source(e))?;
            let (id, j2) = (self.req.request_id.clone(), json.clone());
            self.inner.journal(move |j| j.done(&id, step, &j2)).await?;
            self.events.emit(EventKind::StepFinished {
                step,
                summary: value.summary(),
                result: json,
            });
            Ok(value)
        }
        .await;
        result.map_err(|e: Error| {
            let e = e.or_step(step).or_backend(&backend);
            self.halt.store(true, Ordering::SeqCst);
            self.events.emit(EventKind::StepFailed {
                step,
                error: e.info(),
            });
            StepError::Failed(e)
        })
    }

    async fn execute(self) -> Result<Vm> {
        match self.steps().await {
            Ok(vm) => {
                let (id, v) = (self.req.request_id.clone(), vm.clone());
                match self
                    .inner
                    .journal(move |j| j.set_run(&id, RunState::Active, Some(&v), None))
                    .await
                {
                    Ok(()) => {
                        self.events.emit(EventKind::RunFinished {
                            provisioned: Some(Box::new(vm.clone())),
                        });
                        Ok(vm)
                    }
                    Err(e) => self.fail(e).await,
                }
            }
            Err(e) => self.fail(e).await,
        }
    }

    async fn fail(&self, mut error: Error) -> Result<Vm> {
        let todo = std::mem::take(
            &mut *self
                .intents
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Blocking work of an abandoned step may still be running (a define, a disk's final
        // link): let it end first, so that the undo below also removes what it made.
        let work = std::mem::take(
            &mut *self
                .work
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut unsettled = Vec::new();
        for (step, w) in work {
            w.abandon();
            if w.busy() {
                self.events
                    .progress(step)
                    .message(WAITING_FOR_BLOCKING_WORK);
            }
            let limit = self.inner.timeouts.get(step);
            if !w.settle(limit).await {
                let key = self.key();
                unsettled.push(UndoFailure {
                    step,
                    resource: resource(step, &key),
                    error: format!(
                        "its blocking work was still running {}s after the step was given up; recover() undoes it later",
                        limit.as_secs_f64()
                    ),
                    kind: ErrorKind::Timeout,
                });
            }
        }
        let mut failures = undo_steps(&self.inner, &self.req.request_id, &self.events, todo).await;
        for f in unsettled {
            self.events
                .emit(EventKind::UndoFailed { failure: f.clone() });
            failures.push(f);
        }
        let state = if failures.is_empty() {
            RunState::Failed
        } else {
            RunState::RollingBack
        };
        for f in failures {
            error.push_undo_failure(f);
        }
        let (id, info) = (self.req.request_id.clone(), error.info());
        if let Err(e) = self
            .inner
            .journal(move |j| j.set_run(&id, state, None, Some(&info)))
            .await
        {
            tracing::error!(error = %e, "cannot record the end of a failed run; recover() will finish it");
        }
        self.events.emit(EventKind::RunFailed {
            error: error.info(),
        });
        Err(error)
    }

    async fn steps(&self) -> Result<Vm> {
        let b = self.inner.backends.clone();
        let req = &self.req;

        let retries = &self.inner.retries;
        let users = b.users.clone();
        let (name, r) = (req.user.clone(), retries.clone());
        let user = self
            .step(Step::User, self.key(), move |p| async move {
                with_retries(&r, Step::User, &p, || users.find_user(&name)).await
            })
            .await
            .map_err(first_error(Vec::new()))?;

        // Host, template and disk on one branch; address and DNS on the other.
        let storage = async {
            let placement = b.placement.clone();
            let (vm, size, owner) = (req.name.clone(), req.size, req.request_id.clone());
            let r = retries.clone();
            let host = self.step(Step::Placement, self.key(), move |p| async move {
                with_retries(&r, Step::Placement, &p, || {
                    placement.reserve(&vm, &size, &owner)
                })
                .await
            });
            let images = b.images.clone();
            let (tname, r) = (req.template.clone(), retries.clone());
            let template = self.step(Step::Image, self.key(), move |p| async move {
                with_retries(&r, Step::Image, &p, || images.prepare(&tname, &p)).await
            });
            let (host, template) = tokio::join!(host, template);
            let (host, template) = (host?, template?);
            let images = b.images.clone();
            let (vm, h, t, gib, owner) = (
                req.name.clone(),
                host.clone(),
                template.clone(),
                req.size.disk_gib,
                req.request_id.clone(),
            );
            let key = UndoKey {
                host: Some(host.clone()),
                ..self.key()
            };
            let r = retries.clone();
            let disk = self
                .step(Step::Disk, key, move |p| async move {
                    with_retries(&r, Step::Disk, &p, || {
                        images.create_disk(&vm, &h, &t, gib, &owner, &p)
                    })
                    .await
                })
                .await?;
            Ok::<_, StepError>((host, template, disk))
        };
        let network = async {
            let ip = b.ip.clone();
            let (vm, owner, r) = (req.name.clone(), req.request_id.clone(), retries.clone());
            let lease = self
                .step(Step::Ip, self.key(), move |p| async move {
                    with_retries(&r, Step::Ip, &p, || ip.allocate(&vm, &owner)).await
                })
                .await?;
            let dns = b.dns.clone();
            let (vm, addr, r) = (req.name.clone(), lease.ip, retries.clone());
            let key = UndoKey {
                ip: Some(lease.ip),
                ..self.key()
            };
            let record = self
                .step(Step::Dns, key, move |p| async move {
                    with_retries(&r, Step::Dns, &p, || dns.publish(&vm, addr)).await
                })
                .await?;
            Ok::<_, StepError>((lease, record))
        };
        let (storage, network) = tokio::join!(storage, network);
        let ((host, template, disk), (lease, record)) = match (storage, network) {
            (Ok(s), Ok(n)) => (s, n),
            (s, n) => {
                let errs = [s.err(), n.err()].into_iter().flatten().collect();
                return Err(first_error(errs)(StepError::Skipped));
            }
        };

        // The guest's host key is made here, so the bootstrap step knows it in advance;
        // its private half goes only into the first-boot seed.
        let host_key = crate::seed::HostKey::generate().map_err(|e| e.with_step(Step::Domain))?;
        let mut target = BootstrapTarget {
            vm: req.name.clone(),
            request_id: req.request_id.clone(),
            fqdn: record.fqdn.clone(),
            ip: lease.ip,
            owner: user.clone(),
            settings: req.bootstrap.clone(),
            host_key: Some(host_key.public.clone()),
        };
        let hv = b.hypervisor.clone();
        let mut spec = DomainSpec {
            name: req.name.clone(),
            host: host.clone(),
            size: req.size,
            disk: disk.clone(),
            template,
            lease: lease.clone(),
            fqdn: record.fqdn.clone(),
            owner: req.user.clone(),
            request_id: req.request_id.clone(),
            ssh_keys: user.ssh_keys.clone(),
            seed: None,
        };
        let key = UndoKey {
            host: Some(host.clone()),
            ..self.key()
        };
        let (bs, setup_target, r) = (b.bootstrap.clone(), target.clone(), retries.clone());
        self.step(Step::Domain, key, move |p| async move {
            // What the bootstrapper needs the guest to get at first boot.
            let setup = bs.guest_setup(&setup_target).await?;
            let mut keys = spec.ssh_keys.clone();
            keys.extend(setup.authorized_keys);
            spec.seed = Some(crate::seed::GuestSeed {
                instance_id: spec.request_id.to_string(),
                hostname: spec.name.to_string(),
                fqdn: spec.fqdn.clone(),
                authorized_keys: keys.clone(),
                host_key: Some(host_key),
                cloud_config: setup.cloud_config,
            });
            spec.ssh_keys = keys;
            with_retries(&r, Step::Domain, &p, || hv.create(&spec, &p)).await
        })
        .await
        .map_err(first_error(Vec::new()))?;

        let (bs, hv) = (b.bootstrap.clone(), b.hypervisor.clone());
        target.owner = user;
        let (seed_host, owner, r) = (host.clone(), req.request_id.clone(), retries.clone());
        let report = self
            .step(Step::Bootstrap, self.key(), move |p| async move {
                let report =
                    with_retries(&r, Step::Bootstrap, &p, || bs.bootstrap(&target, &p)).await?;
                // The guest has what it needed from its first-boot seed: the private host
                // key (and any bootstrap secret) in it must not stay attached.
                hv.discard_seed(&target.vm, &seed_host, &owner).await?;
                Ok(report)
            })
            .await
            .map_err(first_error(Vec::new()))?;

        Ok(Vm {
            name: req.name.clone(),
            fqdn: record.fqdn,
            ip: lease.ip,
            host,
            disk: disk.path,
            owner: req.user.clone(),
            template: req.template.clone(),
            created: OffsetDateTime::now_utc(),
            request_id: req.request_id.clone(),
            bootstrapped: report.bootstrapped,
        })
    }
}

/// The progress message of a rollback that waits for a given-up step's blocking work.
pub const WAITING_FOR_BLOCKING_WORK: &str =
    "waiting for its blocking work to end before undoing it";

/// Picks the error to report: the failure of the earliest step.
fn first_error(mut others: Vec<StepError>) -> impl FnOnce(StepError) -> Error {
    move |e| {
        others.push(e);
        others
            .into_iter()
            .filter_map(|e| match e {
                StepError::Failed(e) => Some(e),
                StepError::Skipped => None,
            })
            .min_by_key(|e| e.step())
            .unwrap_or_else(|| Error::backend("a step was skipped without a failure"))
    }
}

fn cancelled() -> Error {
    Error::new(ErrorKind::Cancelled, "cancelled")
}

/// Runs `fut` in its own task with a time limit; a panic inside it becomes an error.
async fn guarded<T: Send + 'static>(
    fut: impl Future<Output = Result<T>> + Send + 'static,
    limit: Duration,
    cancel: Option<&CancelToken>,
) -> Result<T> {
    let mut task = tokio::spawn(fut);
    let cancelled_fut = async {
        match cancel {
            Some(c) => c.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        joined = &mut task => match joined {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(Error::backend(format!("panicked: {msg}")))
            }
            Err(e) => Err(Error::backend("step task was aborted").with_source(e)),
        },
        () = tokio::time::sleep(limit) => {
            task.abort();
            Err(Error::timeout(format!("did not finish within {}s", limit.as_secs_f64())))
        }
        () = cancelled_fut => {
            task.abort();
            Err(cancelled())
        }
    }
}

fn resource(step: Step, key: &UndoKey) -> String {
    let vm = &key.vm;
    let host = key
        .host
        .as_ref()
        .map(|h| format!(" on {h}"))
        .unwrap_or_default();
    match step {
        Step::User => format!("user check of vm {vm}"),
        Step::Placement => format!("placement slot of vm {vm}"),
        Step::Ip => format!("ip lease of vm {vm}"),
        Step::Dns => match key.ip {
            Some(ip) => format!("dns records of vm {vm} ({ip})"),
            None => format!("dns records of vm {vm}"),
        },
        Step::Image => format!("template for vm {vm}"),
        Step::Disk => format!("disk of vm {vm}{host}"),
        Step::Domain => format!("domain {vm}{host}"),
        Step::Bootstrap => format!("bootstrap registration of vm {vm}"),
    }
}

/// Undoes one step of the run `owner`, within the step's own time limit.
async fn undo_one(
    b: &Backends,
    step: Step,
    key: &UndoKey,
    owner: &RequestId,
    limit: Duration,
) -> Result<Undone> {
    let (vm, host, owner) = (key.vm.clone(), key.host.clone(), owner.clone());
    match step {
        // Looking up a user and caching a template hold nothing for the VM.
        Step::User | Step::Image => Ok(Undone::Absent),
        Step::Placement => {
            let p = b.placement.clone();
            guarded(async move { p.release(&vm, &owner).await }, limit, None).await
        }
        Step::Ip => {
            let ip = b.ip.clone();
            guarded(async move { ip.release(&vm, &owner).await }, limit, None).await
        }
        Step::Dns => match key.ip {
            Some(addr) => {
                let dns = b.dns.clone();
                guarded(async move { dns.remove(&vm, addr).await }, limit, None).await
            }
            None => Ok(Undone::Absent),
        },
        Step::Disk => match host {
            Some(h) => {
                let images = b.images.clone();
                guarded(
                    async move { images.delete_disk(&vm, &h, &owner).await },
                    limit,
                    None,
                )
                .await
            }
            None => Ok(Undone::Absent),
        },
        Step::Domain => match host {
            Some(h) => {
                let hv = b.hypervisor.clone();
                guarded(
                    async move { hv.destroy(&vm, &h, &owner).await },
                    limit,
                    None,
                )
                .await
            }
            None => Ok(Undone::Absent),
        },
        Step::Bootstrap => {
            let bs = b.bootstrap.clone();
            guarded(async move { bs.unregister(&vm, &owner).await }, limit, None).await
        }
    }
}

/// Undoes `todo` in reverse pipeline order. Every undo is tried even if an earlier one
/// failed; the failures are returned, journaled and emitted.
async fn undo_steps(
    inner: &Arc<Inner>,
    id: &RequestId,
    events: &RunEvents,
    mut todo: Vec<(Step, UndoKey)>,
) -> Vec<UndoFailure> {
    todo.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut failures = Vec::new();
    for (step, key) in todo {
        let outcome = undo_one(&inner.backends, step, &key, id, inner.timeouts.get(step))
            .await
            .map_err(|e| e.or_step(step).or_backend(inner.backends.name_of(step)));
        if let Ok(Undone::Foreign { holder }) = &outcome {
            let resource = resource(step, &key);
            tracing::warn!(%step, %resource, %holder, "left alone: not this run's");
            events.emit(EventKind::LeftAlone {
                step,
                resource,
                holder: holder.clone(),
            });
        }
        let outcome = outcome.map(drop);
        let info = outcome.as_ref().err().map(Error::info);
        let rid = id.clone();
        let record = inner
            .journal(move |j| j.undone(&rid, step, info.as_ref()))
            .await;
        match (outcome, record) {
            (Ok(()), Ok(())) => events.emit(EventKind::StepUndone { step }),
            (Err(e), _) | (Ok(()), Err(e)) => {
                let failure = UndoFailure {
                    step,
                    resource: resource(step, &key),
                    error: e.to_string(),
                    kind: e.kind(),
                };
                tracing::warn!(%failure, "undo failed");
                events.emit(EventKind::UndoFailed {
                    failure: failure.clone(),
                });
                failures.push(failure);
            }
        }
    }
    failures
}
