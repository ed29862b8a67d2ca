//! Fault injection: make any backend fail at a chosen call.
//!
//! [`inject`] wraps one step's backend in a set of [`Backends`]; the wrapper passes every
//! call through except the chosen one, where it fails in the chosen way.
//!
//! ```text
//! let backends = faults::inject(memory.backends(), FaultPlan::new(Step::Dns, Fault::Error(ErrorKind::Unavailable)));
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::events::Progress;
use crate::provisioner::Backends;
use crate::traits::{
    Bootstrapper, DnsUpdater, Hypervisor, ImageStore, IpAllocator, Placement, UserDirectory,
};
use crate::types::{
    BootstrapReport, BootstrapTarget, Disk, DnsRecord, Domain, DomainSpec, HostId, Lease,
    RequestId, Step, Template, TemplateName, Undone, User, UserName, VmName, VmSize,
};

/// How the chosen call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Returns an error of this kind instead of calling the backend.
    Error(ErrorKind),
    /// Never returns (the step's time limit must catch it).
    Hang,
    /// Panics inside the step.
    Panic,
    /// Kills the whole process with SIGKILL before the backend is called.
    KillBefore,
    /// Calls the backend, then kills the whole process with SIGKILL before returning.
    KillAfter,
}

/// Which call fails, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// The step whose backend fails.
    pub step: Step,
    /// Fail the undo (release, remove, delete, destroy, unregister) instead of the act.
    pub on_undo: bool,
    /// How many matching calls pass before the faulty one (0: the first call fails).
    pub after: usize,
    /// Every matching call from then on fails, not just one (so that retries cannot get
    /// past it).
    pub persistent: bool,
    /// How it fails.
    pub fault: Fault,
}

impl FaultPlan {
    /// The first acting call of `step` fails with `fault`.
    pub fn new(step: Step, fault: Fault) -> Self {
        FaultPlan {
            step,
            on_undo: false,
            after: 0,
            persistent: false,
            fault,
        }
    }
    /// Every matching call fails from then on (a service that stays down).
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }
    /// The first undo of `step` fails with `fault` instead.
    pub fn on_undo(mut self) -> Self {
        self.on_undo = true;
        self
    }
    /// Lets `n` matching calls pass first.
    pub fn after(mut self, n: usize) -> Self {
        self.after = n;
        self
    }
}

#[derive(Debug)]
struct Trigger {
    plan: FaultPlan,
    calls: AtomicUsize,
}

impl Trigger {
    /// Called at the start of a matching call. `Err` ends the call with an error.
    async fn before(&self, undo: bool) -> Result<bool> {
        if undo != self.plan.on_undo {
            return Ok(false);
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.plan.after || (n > self.plan.after && !self.plan.persistent) {
            return Ok(false);
        }
        match self.plan.fault {
            Fault::Error(kind) => Err(Error::new(kind, "injected fault").with_backend("faulty")),
            Fault::Hang => std::future::pending().await,
            Fault::Panic => panic!("injected panic"),
            Fault::KillBefore => kill_self(),
            Fault::KillAfter => Ok(true),
        }
    }

    fn after(&self, fire: bool) {
        if fire {
            kill_self();
        }
    }
}

fn kill_self() -> ! {
    // SAFETY: getpid and kill have no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; this is only reached if kill failed.
    std::process::abort()
}

/// Wraps the backend of `plan.step` in `backends` so that it fails as planned.
pub fn inject(backends: Backends, plan: FaultPlan) -> Backends {
    let t = Arc::new(Trigger {
        plan,
        calls: AtomicUsize::new(0),
    });
    let mut b = backends;
    match plan.step {
        Step::User => b.users = Arc::new(Faulty(b.users, t)),
        Step::Placement => b.placement = Arc::new(Faulty(b.placement, t)),
        Step::Ip => b.ip = Arc::new(Faulty(b.ip, t)),
        Step::Dns => b.dns = Arc::new(Faulty(b.dns, t)),
        Step::Image => {
            b.images = Arc::new(FaultyImages {
                inner: b.images,
                t,
                disk: false,
            })
        }
        Step::Disk => {
            b.images = Arc::new(FaultyImages {
                inner: b.images,
                t,
                disk: true,
            })
        }
        Step::Domain => b.hypervisor = Arc::new(Faulty(b.hypervisor, t)),
        Step::Bootstrap => b.bootstrap = Arc::new(Faulty(b.bootstrap, t)),
    }
    b
}

struct Faulty<T: ?Sized>(Arc<T>, Arc<Trigger>);

macro_rules! guarded_call {
    ($self:ident, $undo:expr, $call:expr) => {{
        let fire = $self.1.before($undo).await?;
        let r = $call.await;
        $self.1.after(fire);
        r
    }};
}

#[async_trait]
impl UserDirectory for Faulty<dyn UserDirectory> {
    fn backend(&self) -> &str {
        self.0.backend()
    }
    async fn find_user(&self, user: &UserName) -> Result<User> {
        guarded_call!(self, false, self.0.find_user(user))
    }
}

#[async_trait]
impl Placement for Faulty<dyn Placement> {
    fn backend(&self) -> &str {
        self.0.backend()
    }
    async fn reserve(&self, vm: &VmName, size: &VmSize, owner: &RequestId) -> Result<HostId> {
        guarded_call!(self, false, self.0.reserve(vm, size, owner))
    }
    async fn reserve_for(
        &self,
        vm: &VmName,
        size: &VmSize,
        owner: &RequestId,
        template: &crate::types::TemplateName,
    ) -> Result<HostId> {
        guarded_call!(self, false, self.0.reserve_for(vm, size, owner, template))
    }
    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        guarded_call!(self, true, self.0.release(vm, owner))
    }
    async fn reservation(&self, vm: &VmName) -> Result<Option<HostId>> {
        self.0.reservation(vm).await
    }
    async fn hosts(&self) -> Result<Vec<HostId>> {
        self.0.hosts().await
    }
    async fn usage(&self) -> Result<Vec<crate::types::HostUsage>> {
        self.0.usage().await
    }
    async fn relocate(&self, vm: &VmName, to: &HostId, owner: &RequestId) -> Result<()> {
        guarded_call!(self, false, self.0.relocate(vm, to, owner))
    }
}

#[async_trait]
impl IpAllocator for Faulty<dyn IpAllocator> {
    fn backend(&self) -> &str {
        self.0.backend()
    }
    async fn allocate(&self, vm: &VmName, owner: &RequestId) -> Result<Lease> {
        guarded_call!(self, false, self.0.allocate(vm, owner))
    }
    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        guarded_call!(self, true, self.0.release(vm, owner))
    }
    async fn lease(&self, vm: &VmName) -> Result<Option<Lease>> {
        self.0.lease(vm).await
    }
}

#[async_trait]
impl DnsUpdater for Faulty<dyn DnsUpdater> {
    fn backend(&self) -> &str {
        self.0.backend()
    }
    fn fqdn(&self, vm: &VmName) -> String {
        self.0.fqdn(vm)
    }
    async fn publish(&self, vm: &VmName, ip: IpAddr) -> Result<DnsRecord> {
        guarded_call!(self, false, self.0.publish(vm, ip))
    }
    async fn remove(&self, vm: &VmName, ip: IpAddr) -> Result<Undone> {
        guarded_call!(self, true, self.0.remove(vm, ip))
    }
    async fn resolve(&self, vm: &VmName) -> Result<Vec<IpAddr>> {
        self.0.resolve(vm).await
    }
    async fn reverse(&self, ip: IpAddr) -> Result<Vec<String>> {
        self.0.reverse(ip).await
    }
}

/// The image store serves two steps; `disk` says which one faults.
struct FaultyImages {
    inner: Arc<dyn ImageStore>,
    t: Arc<Trigger>,
    disk: bool,
}

#[async_trait]
impl ImageStore for FaultyImages {
    fn backend(&self) -> &str {
        self.inner.backend()
    }
    async fn prepare(
        &self,
        template: &TemplateName,
        host: &HostId,
        progress: &Progress,
    ) -> Result<Template> {
        if self.disk {
            return self.inner.prepare(template, host, progress).await;
        }
        let fire = self.t.before(false).await?;
        let r = self.inner.prepare(template, host, progress).await;
        self.t.after(fire);
        r
    }
    async fn templates(&self) -> Result<Vec<Template>> {
        self.inner.templates().await
    }
    async fn create_disk(
        &self,
        vm: &VmName,
        host: &HostId,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<Disk> {
        if !self.disk {
            return self
                .inner
                .create_disk(vm, host, template, size_gib, owner, progress)
                .await;
        }
        let fire = self.t.before(false).await?;
        let r = self
            .inner
            .create_disk(vm, host, template, size_gib, owner, progress)
            .await;
        self.t.after(fire);
        r
    }
    async fn delete_disk(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone> {
        if !self.disk {
            return self.inner.delete_disk(vm, host, owner).await;
        }
        let fire = self.t.before(true).await?;
        let r = self.inner.delete_disk(vm, host, owner).await;
        self.t.after(fire);
        r
    }
    async fn disk(&self, vm: &VmName, host: &HostId) -> Result<Option<Disk>> {
        self.inner.disk(vm, host).await
    }
    fn disks_per_host(&self) -> bool {
        self.inner.disks_per_host()
    }
}

#[async_trait]
impl Hypervisor for Faulty<dyn Hypervisor> {
    fn backend(&self) -> &str {
        self.0.backend()
    }
    async fn create(&self, spec: &DomainSpec, progress: &Progress) -> Result<Domain> {
        guarded_call!(self, false, self.0.create(spec, progress))
    }
    async fn destroy(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone> {
        guarded_call!(self, true, self.0.destroy(vm, host, owner))
    }
    async fn domain(&self, vm: &VmName, host: &HostId) -> Result<Option<Domain>> {
        self.0.domain(vm, host).await
    }
    async fn discard_seed(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<()> {
        self.0.discard_seed(vm, host, owner).await
    }
    async fn migrate(
        &self,
        vm: &VmName,
        from: &HostId,
        to: &HostId,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<crate::types::MigrationReport> {
        guarded_call!(self, false, self.0.migrate(vm, from, to, owner, progress))
    }
}

#[async_trait]
impl Bootstrapper for Faulty<dyn Bootstrapper> {
    fn backend(&self) -> &str {
        self.0.backend()
    }
    async fn bootstrap(
        &self,
        target: &BootstrapTarget,
        progress: &Progress,
    ) -> Result<BootstrapReport> {
        guarded_call!(self, false, self.0.bootstrap(target, progress))
    }
    async fn unregister(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        guarded_call!(self, true, self.0.unregister(vm, owner))
    }
}
