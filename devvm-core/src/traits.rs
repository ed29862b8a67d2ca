//! One trait per pipeline step.
//!
//! The pipeline holds each backend as `Arc<dyn Trait>`, so every trait is object-safe and
//! uses `async_trait`. Required methods are few; each method's doc states its contract,
//! including what happens when it is called twice. Implementations must be `Send + Sync`
//! and may be called concurrently for different VMs.
//!
//! Two rules every implementation follows, and which the conformance suites in
//! [`testkit`](crate::testkit) check:
//!
//! * **Acting is idempotent per VM.** Calling an acting method again for the same VM
//!   returns the same result instead of acquiring a second resource. This is what lets a
//!   crashed run be recovered.
//! * **Undoing is idempotent and total.** Undoing something absent succeeds
//!   ([`Undone::Absent`]).
//! * **Ownership first.** Every acting method is given the run's request id (`owner`) and
//!   records it with what it makes, wherever the backend can hold it (domain metadata, a
//!   disk's owner record, an owner column). Acting over a resource of the same name that
//!   another owner holds fails with [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists)
//!   and changes nothing. Every undo method is given the same `owner` and acts only on a
//!   resource that it can prove is that owner's; anything else of that name is left alone
//!   and reported as [`Undone::Foreign`], which is not an error.

use std::net::IpAddr;

use async_trait::async_trait;
use secrecy::SecretString;

use crate::error::Result;
use crate::events::Progress;
use crate::seed::GuestSetup;
use crate::types::{
    BootstrapReport, BootstrapTarget, Disk, DnsRecord, Domain, DomainSpec, HostId, Lease,
    RequestId, Template, TemplateName, Undone, User, UserName, VmName, VmSize,
};

/// Finds users and says whether they may own VMs.
#[async_trait]
pub trait UserDirectory: Send + Sync + 'static {
    /// A short name for this backend, used in errors and logs (`"ldap"`).
    fn backend(&self) -> &str;

    /// Looks up `user`.
    ///
    /// * An unknown user is [`ErrorKind::NotFound`](crate::ErrorKind::NotFound).
    /// * A user who exists but may not own VMs is
    ///   [`ErrorKind::Unauthorized`](crate::ErrorKind::Unauthorized).
    /// * A directory that cannot be reached is
    ///   [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) (retryable).
    ///
    /// It changes nothing, so calling it any number of times is safe.
    async fn find_user(&self, user: &UserName) -> Result<User>;

    /// Checks that `password` is `user`'s own (for LDAP: a bind as the user's entry) and
    /// returns the user as [`find_user`](Self::find_user) would, group check included.
    ///
    /// * A wrong password, an empty one, or an unknown user is
    ///   [`ErrorKind::Unauthorized`](crate::ErrorKind::Unauthorized), with one message for
    ///   all three, so it does not tell who exists.
    /// * A right password of a user who may not own VMs is `Unauthorized` naming why.
    ///
    /// The password is used for the check only: never stored, logged or put in an error.
    /// The default says the directory cannot check passwords (`Unauthorized`).
    async fn authenticate(&self, user: &UserName, password: &SecretString) -> Result<User> {
        let _ = (user, password);
        Err(crate::Error::unauthorized(format!(
            "the {} user directory cannot check passwords",
            self.backend()
        )))
    }

    /// Whether `user` is a member of `group` (for LDAP, the group's DN). An unknown user is
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound). The default says the directory
    /// has no groups (`Unauthorized`).
    async fn is_member(&self, user: &UserName, group: &str) -> Result<bool> {
        let _ = (user, group);
        Err(crate::Error::unauthorized(format!(
            "the {} user directory has no groups",
            self.backend()
        )))
    }
}

/// Picks the host a VM runs on and holds a slot there.
#[async_trait]
pub trait Placement: Send + Sync + 'static {
    /// A short name for this backend.
    fn backend(&self) -> &str;

    /// Reserves room for a VM of `size` on some host for `owner` and returns the host.
    ///
    /// Reserving again for the same `vm` and `owner` returns the same host and holds one
    /// slot, not two. A slot of that `vm` held by another owner is
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists). No host with room is
    /// [`ErrorKind::Exhausted`](crate::ErrorKind::Exhausted).
    async fn reserve(&self, vm: &VmName, size: &VmSize, owner: &RequestId) -> Result<HostId>;

    /// [`reserve`](Self::reserve), preferring among the hosts with room one that already
    /// holds `template` (so no copy of it has to be made). The default ignores `template`.
    async fn reserve_for(
        &self,
        vm: &VmName,
        size: &VmSize,
        owner: &RequestId,
        template: &crate::types::TemplateName,
    ) -> Result<HostId> {
        let _ = template;
        self.reserve(vm, size, owner).await
    }

    /// Releases the slot `owner` holds for `vm`. No slot is [`Undone::Absent`]; a slot of
    /// that `vm` held by another owner is left alone ([`Undone::Foreign`]).
    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone>;

    /// The host holding a slot for `vm`, if any.
    async fn reservation(&self, vm: &VmName) -> Result<Option<HostId>>;

    /// The hosts this placement chooses from, in its order (what `images sync` brings
    /// templates to). The default is none: a placement that cannot list its hosts.
    async fn hosts(&self) -> Result<Vec<HostId>> {
        Ok(Vec::new())
    }

    /// Each host's capacity, use and VMs, read now (for `hosts`, `drain` and
    /// `rebalance`). The default is none: a placement that cannot say.
    async fn usage(&self) -> Result<Vec<crate::types::HostUsage>> {
        Ok(Vec::new())
    }

    /// Moves the slot `owner` holds for `vm` to host `to` (for a live migration), if `to`
    /// has room for it; the old host's room is given back. Moving it where it is changes
    /// nothing. No slot of `vm` is [`ErrorKind::NotFound`](crate::ErrorKind::NotFound), one
    /// of another owner [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists) (and
    /// it is left alone); no room on `to` is
    /// [`ErrorKind::Exhausted`](crate::ErrorKind::Exhausted). The default says this
    /// placement cannot move VMs.
    async fn relocate(&self, vm: &VmName, to: &HostId, owner: &RequestId) -> Result<()> {
        let _ = (vm, to, owner);
        Err(crate::Error::invalid_input(format!(
            "placement backend {} cannot move a vm to another host",
            self.backend()
        )))
    }
}

/// Hands out IP addresses from a subnet.
#[async_trait]
pub trait IpAllocator: Send + Sync + 'static {
    /// A short name for this backend.
    fn backend(&self) -> &str;

    /// Leases a free address to `vm`, recording `owner` with the lease.
    ///
    /// Allocating again for the same `vm` and `owner` returns the same lease. A lease of
    /// that `vm` held by another owner is
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists) and changes nothing.
    /// No two VMs ever hold the same address, even when many threads and processes
    /// allocate at once. A subnet with no free address is
    /// [`ErrorKind::Exhausted`](crate::ErrorKind::Exhausted).
    async fn allocate(&self, vm: &VmName, owner: &RequestId) -> Result<Lease>;

    /// Releases the lease `owner` holds for `vm`. No lease is [`Undone::Absent`]; a lease
    /// of that `vm` held by another owner is left alone ([`Undone::Foreign`]).
    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone>;

    /// The lease `vm` holds, if any.
    async fn lease(&self, vm: &VmName) -> Result<Option<Lease>>;
}

/// Publishes and removes a VM's DNS records (forward A/AAAA and reverse PTR).
#[async_trait]
pub trait DnsUpdater: Send + Sync + 'static {
    /// A short name for this backend.
    fn backend(&self) -> &str;

    /// The fqdn that `vm` gets in this backend's zone, without the trailing dot.
    fn fqdn(&self, vm: &VmName) -> String;

    /// Publishes `fqdn(vm) -> ip` and the PTR `ip -> fqdn(vm)`, both or neither.
    ///
    /// Publishing the same name and address again succeeds and changes nothing. A name
    /// that already points to another address, or an address whose PTR names another
    /// host, is never overwritten: that is [`ErrorKind::Conflict`](crate::ErrorKind::Conflict)
    /// and nothing changes.
    async fn publish(&self, vm: &VmName, ip: IpAddr) -> Result<DnsRecord>;

    /// Removes the records `fqdn(vm) -> ip` and `ip -> fqdn(vm)`: the address is the proof
    /// of ownership (it was leased to this VM alone). Records that point elsewhere belong
    /// to someone else and are left alone ([`Undone::Foreign`]); no record at all is
    /// [`Undone::Absent`].
    async fn remove(&self, vm: &VmName, ip: IpAddr) -> Result<Undone>;

    /// What the server says now: the addresses `fqdn(vm)` resolves to.
    async fn resolve(&self, vm: &VmName) -> Result<Vec<IpAddr>>;

    /// What the server says now: the names the PTR of `ip` holds (without trailing dots).
    async fn reverse(&self, ip: IpAddr) -> Result<Vec<String>>;
}

/// Keeps templates and makes VM disks from them.
#[async_trait]
pub trait ImageStore: Send + Sync + 'static {
    /// A short name for this backend.
    fn backend(&self) -> &str;

    /// Makes `template` available on `host` (syncing it from a registry when the copy
    /// there is missing or stale) and returns it as `host` sees it: its paths are the
    /// host's. Idempotent; an unknown template is
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound). A partial download or upload
    /// is never visible as a template. A store whose templates are not per host may
    /// ignore `host`.
    async fn prepare(
        &self,
        template: &TemplateName,
        host: &HostId,
        progress: &Progress,
    ) -> Result<Template>;

    /// Templates available locally.
    async fn templates(&self) -> Result<Vec<Template>>;

    /// Creates the disk of `vm` on `host` from `template`, `size_gib` large, recording
    /// `owner` with it. The disk is created exclusively: it is never adopted.
    ///
    /// Calling it again for the same `vm` and `owner` returns the existing disk. A disk of
    /// that name that `owner` did not make (another run's, or one made by hand) is
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists) and is left alone.
    async fn create_disk(
        &self,
        vm: &VmName,
        host: &HostId,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<Disk>;

    /// Deletes the disk of `vm` on `host` if `owner` made it. No disk is
    /// [`Undone::Absent`]; a disk `owner` did not make is left alone
    /// ([`Undone::Foreign`]).
    async fn delete_disk(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone>;

    /// The disk of `vm` on `host`, if it exists.
    async fn disk(&self, vm: &VmName, host: &HostId) -> Result<Option<Disk>>;

    /// Whether each host has its own disks (a disk made on one host is a different one
    /// from a disk of the same VM made on another), which live migration without shared
    /// storage needs. The default is false: such a store's VMs are not migrated.
    fn disks_per_host(&self) -> bool {
        false
    }
}

/// Defines, starts and removes VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// A short name for this backend.
    fn backend(&self) -> &str;

    /// Defines the domain described by `spec` and starts it; returns once the guest is up
    /// (for real backends: answering on its SSH port), reporting progress while waiting.
    ///
    /// Calling it again for a domain of the same name and request id returns the running
    /// domain (starting it if it is stopped). A domain of that name that belongs to
    /// another request is [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists)
    /// and is left alone.
    async fn create(&self, spec: &DomainSpec, progress: &Progress) -> Result<Domain>;

    /// Stops and removes the domain `vm` on `host` (destroy + undefine), and whatever
    /// `create` made for it (a seed disk), if the domain records `owner` as its request.
    /// No domain is [`Undone::Absent`]; a domain of another request, or without devvm's
    /// metadata, is left alone ([`Undone::Foreign`]).
    async fn destroy(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone>;

    /// The domain `vm` on `host`, if it is defined.
    async fn domain(&self, vm: &VmName, host: &HostId) -> Result<Option<Domain>>;

    /// Called once the guest has consumed its first-boot seed (the bootstrap step
    /// succeeded): the seed carried the guest's private host key and maybe bootstrap
    /// secrets (a Chef validator), so it is detached from `owner`'s domain and deleted.
    /// Doing it again, or for a domain without a seed, succeeds. A domain of another
    /// request is [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists) and is left
    /// alone. The default does nothing, for a hypervisor that keeps no seed.
    async fn discard_seed(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<()> {
        let _ = (vm, host, owner);
        Ok(())
    }

    /// Moves the running domain `vm` that `owner` made from host `from` to host `to` while
    /// it runs, copying what only its own disk holds (the template and an empty disk of the
    /// same path and size are on `to` already). On success it runs, and is defined, only
    /// on `to`; on failure it still runs on `from`. A domain of another request is
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists) and is not touched.
    /// Reports progress while it copies. The default says this hypervisor cannot migrate.
    async fn migrate(
        &self,
        vm: &VmName,
        from: &HostId,
        to: &HostId,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<crate::types::MigrationReport> {
        let _ = (vm, from, to, owner, progress);
        Err(crate::Error::invalid_input(format!(
            "hypervisor backend {} cannot migrate a running vm",
            self.backend()
        )))
    }
}

/// Runs configuration management on a freshly started guest.
#[async_trait]
pub trait Bootstrapper: Send + Sync + 'static {
    /// A short name for this backend.
    fn backend(&self) -> &str;

    /// Bootstraps the guest. Each line of output should become a progress message. A
    /// failure fails the run, which is then rolled back. Running it again on the same
    /// guest must be safe (configuration management converges).
    async fn bootstrap(
        &self,
        target: &BootstrapTarget,
        progress: &Progress,
    ) -> Result<BootstrapReport>;

    /// What the guest must be given at first boot for [`bootstrap`](Self::bootstrap) to
    /// work: a provisioner-generated host key (whose public half then arrives in
    /// [`BootstrapTarget::host_key`]), extra authorized keys, extra cloud-config. Called
    /// before the domain is created; must not change anything. The default needs nothing.
    async fn guest_setup(&self, target: &BootstrapTarget) -> Result<GuestSetup> {
        let _ = target;
        Ok(GuestSetup::default())
    }

    /// Undoes what bootstrapping `owner`'s VM registered outside the guest (for Chef: the
    /// node and client on the Chef server). A VM that was never bootstrapped is
    /// [`Undone::Absent`]; a registration of that name made for another request (or one
    /// that does not say) is left alone ([`Undone::Foreign`]).
    async fn unregister(&self, vm: &VmName, owner: &RequestId) -> Result<Undone>;
}
