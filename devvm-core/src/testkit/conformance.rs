//! Conformance suites: the contract of each step trait, as executable checks.
//!
//! Each suite takes the backend under test plus whatever fixture only the tester can
//! know (which user exists, which addresses the DNS zone covers, how many addresses the
//! subnet has). Suites use fresh VM names from [`super::unique_vm_name`]
//! and undo what they create, so they can run against a shared real service.
//!
//! ```text
//! #[tokio::test]
//! async fn my_ipam_conforms() {
//!     let ipam = Arc::new(MyIpam::connect(...).await.unwrap());
//!     devvm_core::testkit::conformance::ip_allocator(ipam, IpAllocatorFixture { capacity: Some(5) }).await;
//! }
//! ```

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::error::ErrorKind;
use crate::events::Progress;
use crate::traits::{
    Bootstrapper, DnsUpdater, Hypervisor, ImageStore, IpAllocator, Placement, UserDirectory,
};
use crate::types::{
    BootstrapSettings, BootstrapTarget, DomainSpec, HostId, RequestId, TemplateName, Undone, User,
    UserName, VmName, VmSize,
};

use super::unique_vm_name;

fn expect_kind<T: std::fmt::Debug>(r: crate::Result<T>, kind: ErrorKind, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected a {kind} error, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: wrong error kind: {e}"),
    }
}

fn ok<T>(r: crate::Result<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error: {e} ({e:?})"),
    }
}

/// What the tester knows about the directory under test.
#[derive(Debug, Clone)]
pub struct UserDirectoryFixture {
    /// A user who exists and may own VMs.
    pub member: UserName,
    /// A user who exists but may not own VMs, if the directory has such a rule.
    pub outsider: Option<UserName>,
}

/// Checks a [`UserDirectory`]: a member is found (with the name asked for), an unknown
/// user is `NotFound`, an outsider is `Unauthorized`, and lookups are repeatable.
pub async fn user_directory(dir: Arc<dyn UserDirectory>, fixture: UserDirectoryFixture) {
    let user = ok(dir.find_user(&fixture.member).await, "find a member");
    assert_eq!(
        user.name, fixture.member,
        "find_user returns the user asked for"
    );
    let again = ok(dir.find_user(&fixture.member).await, "find a member again");
    assert_eq!(user, again, "find_user is repeatable");
    for key in &user.ssh_keys {
        assert!(
            !key.contains('\n'),
            "an ssh key is one authorized_keys line"
        );
    }

    let unknown = UserName::new(format!("nobody-{}", unique_vm_name("u"))).unwrap_or_else(|e| {
        panic!("cannot build an unknown user name: {e}");
    });
    expect_kind(
        dir.find_user(&unknown).await,
        ErrorKind::NotFound,
        "unknown user",
    );

    if let Some(outsider) = &fixture.outsider {
        expect_kind(
            dir.find_user(outsider).await,
            ErrorKind::Unauthorized,
            "user outside the owners",
        );
    }
}

/// A fresh owner token (request id) for a suite's own resources.
fn owner() -> RequestId {
    RequestId::random()
}

fn expect_undone(r: crate::Result<Undone>, want: &Undone, what: &str) {
    let got = ok(r, what);
    assert_eq!(&got, want, "{what}");
}

fn expect_foreign(r: crate::Result<Undone>, what: &str) {
    match ok(r, what) {
        Undone::Foreign { .. } => {}
        other => panic!("{what}: expected Foreign (left alone), got {other:?}"),
    }
}

/// What the tester knows about the placement under test.
#[derive(Debug, Clone)]
pub struct PlacementFixture {
    /// How many VMs of `size` fit in total, if small enough to fill in a test.
    pub capacity: Option<usize>,
    /// The VM size to reserve.
    pub size: VmSize,
}

/// Checks a [`Placement`]: reserving is idempotent per owner, a slot of another owner is
/// `AlreadyExists` and survives that owner's neighbours' releases, release is
/// idempotent, releasing an unknown VM is `Absent`, and a full set of hosts is
/// `Exhausted` without changing anything.
pub async fn placement(p: Arc<dyn Placement>, fixture: PlacementFixture) {
    let (me, them) = (owner(), owner());
    let vm = unique_vm_name("place");
    let host = ok(p.reserve(&vm, &fixture.size, &me).await, "reserve");
    let again = ok(p.reserve(&vm, &fixture.size, &me).await, "reserve again");
    assert_eq!(
        host, again,
        "reserving again for the same vm returns the same host"
    );
    assert_eq!(
        ok(p.reservation(&vm).await, "reservation"),
        Some(host.clone())
    );
    // Another owner's view of the same name: refused, and cannot release it.
    expect_kind(
        p.reserve(&vm, &fixture.size, &them).await,
        ErrorKind::AlreadyExists,
        "reserving a vm name another owner holds",
    );
    expect_foreign(
        p.release(&vm, &them).await,
        "releasing another owner's slot",
    );
    assert_eq!(
        ok(p.reservation(&vm).await, "the foreign slot survives"),
        Some(host.clone())
    );
    expect_undone(p.release(&vm, &me).await, &Undone::Removed, "release");
    assert_eq!(
        ok(p.reservation(&vm).await, "reservation after release"),
        None
    );
    expect_undone(p.release(&vm, &me).await, &Undone::Absent, "release again");
    expect_undone(
        p.release(&unique_vm_name("never"), &me).await,
        &Undone::Absent,
        "release of an unknown vm",
    );

    if let Some(capacity) = fixture.capacity {
        let vms: Vec<VmName> = (0..capacity).map(|_| unique_vm_name("fill")).collect();
        for vm in &vms {
            ok(
                p.reserve(vm, &fixture.size, &me).await,
                "reserve within capacity",
            );
        }
        // Reserving again for a VM that holds a slot must not need a new slot.
        ok(
            p.reserve(&vms[0], &fixture.size, &me).await,
            "re-reserve when full",
        );
        let extra = unique_vm_name("extra");
        expect_kind(
            p.reserve(&extra, &fixture.size, &me).await,
            ErrorKind::Exhausted,
            "reserve beyond capacity",
        );
        assert_eq!(
            ok(p.reservation(&extra).await, "no slot after failure"),
            None
        );
        ok(p.release(&vms[0], &me).await, "release one");
        ok(
            p.reserve(&extra, &fixture.size, &me).await,
            "reserve the freed slot",
        );
        ok(p.release(&extra, &me).await, "cleanup");
        for vm in &vms {
            ok(p.release(vm, &me).await, "cleanup");
        }
    }
}

/// What the tester knows about the allocator under test.
#[derive(Debug, Clone)]
pub struct IpAllocatorFixture {
    /// How many addresses the subnet hands out, if small enough to fill in a test.
    pub capacity: Option<usize>,
    /// How many concurrent allocations to race.
    pub concurrency: usize,
}

/// Checks an [`IpAllocator`]: allocating is idempotent per VM and owner, a lease of
/// another owner is `AlreadyExists` and cannot be released by anyone else, different
/// VMs get different addresses (also when racing), release is idempotent, and a full
/// subnet is `Exhausted` without changing anything.
pub async fn ip_allocator(a: Arc<dyn IpAllocator>, fixture: IpAllocatorFixture) {
    let (me, them) = (owner(), owner());
    let vm = unique_vm_name("ip");
    let lease = ok(a.allocate(&vm, &me).await, "allocate");
    assert_eq!(lease.vm, vm, "the lease names its vm");
    let again = ok(a.allocate(&vm, &me).await, "allocate again");
    assert_eq!(
        lease, again,
        "allocating again for the same vm returns the same lease"
    );
    assert_eq!(ok(a.lease(&vm).await, "lease"), Some(lease.clone()));
    expect_kind(
        a.allocate(&vm, &them).await,
        ErrorKind::AlreadyExists,
        "allocating for a vm name another owner holds",
    );
    expect_foreign(
        a.release(&vm, &them).await,
        "releasing another owner's lease",
    );
    assert_eq!(
        ok(a.lease(&vm).await, "the foreign lease survives"),
        Some(lease.clone())
    );
    let other = unique_vm_name("ip");
    let other_lease = ok(a.allocate(&other, &me).await, "allocate another");
    assert_ne!(lease.ip, other_lease.ip, "two vms never share an address");
    if let Some(gw) = lease.gateway {
        assert_ne!(lease.ip, gw, "the gateway is never leased");
    }
    expect_undone(a.release(&vm, &me).await, &Undone::Removed, "release");
    assert_eq!(ok(a.lease(&vm).await, "lease after release"), None);
    expect_undone(a.release(&vm, &me).await, &Undone::Absent, "release again");
    expect_undone(
        a.release(&unique_vm_name("never"), &me).await,
        &Undone::Absent,
        "release unknown",
    );
    ok(a.release(&other, &me).await, "cleanup");

    // Racing allocations: no duplicates, and racing the same VM gives one lease.
    let vms: Vec<VmName> = (0..fixture.concurrency)
        .map(|_| unique_vm_name("race"))
        .collect();
    let mut tasks = Vec::new();
    for vm in vms.iter().cloned().chain(vms.iter().take(2).cloned()) {
        let (a, me) = (a.clone(), me.clone());
        tasks.push(tokio::spawn(async move { a.allocate(&vm, &me).await }));
    }
    let mut by_vm = std::collections::HashMap::new();
    for t in tasks {
        let l = ok(
            t.await.unwrap_or_else(|e| panic!("allocation task: {e}")),
            "racing allocate",
        );
        if let Some(prev) = by_vm.insert(l.vm.clone(), l.ip) {
            assert_eq!(
                prev, l.ip,
                "racing allocations of one vm return one address"
            );
        }
    }
    let distinct: HashSet<IpAddr> = by_vm.values().copied().collect();
    assert_eq!(
        distinct.len(),
        vms.len(),
        "racing allocations never share an address"
    );
    for vm in &vms {
        ok(a.release(vm, &me).await, "cleanup");
    }

    if let Some(capacity) = fixture.capacity {
        let vms: Vec<VmName> = (0..capacity).map(|_| unique_vm_name("fill")).collect();
        for vm in &vms {
            ok(a.allocate(vm, &me).await, "allocate within capacity");
        }
        ok(a.allocate(&vms[0], &me).await, "re-allocate when full");
        let extra = unique_vm_name("extra");
        expect_kind(
            a.allocate(&extra, &me).await,
            ErrorKind::Exhausted,
            "allocate beyond capacity",
        );
        assert_eq!(ok(a.lease(&extra).await, "no lease after failure"), None);
        let freed = ok(a.lease(&vms[0]).await, "lease").map(|l| l.ip);
        ok(a.release(&vms[0], &me).await, "release one");
        let reused = ok(a.allocate(&extra, &me).await, "allocate the freed address");
        assert_eq!(
            Some(reused.ip),
            freed,
            "a released address is handed out again"
        );
        ok(a.release(&extra, &me).await, "cleanup");
        for vm in &vms {
            ok(a.release(vm, &me).await, "cleanup");
        }
    }
}

/// What the tester knows about the DNS zone under test.
#[derive(Debug, Clone)]
pub struct DnsUpdaterFixture {
    /// Two addresses inside the reverse zone, not used by anything else during the test.
    pub addresses: [IpAddr; 2],
}

/// Checks a [`DnsUpdater`]: publish makes A and PTR resolvable, publishing again is a
/// no-op, a name or PTR pointing elsewhere is `Conflict` and stays untouched, removal is
/// idempotent and never removes another VM's records (those are `Foreign`).
pub async fn dns_updater(dns: Arc<dyn DnsUpdater>, fixture: DnsUpdaterFixture) {
    let [ip1, ip2] = fixture.addresses;
    let a = unique_vm_name("dns");
    let b = unique_vm_name("dns");
    let fqdn_a = dns.fqdn(&a);
    assert!(
        fqdn_a.starts_with(&format!("{a}.")) && !fqdn_a.ends_with('.'),
        "fqdn is the vm label in the zone, without trailing dot: {fqdn_a}"
    );

    let rec = ok(dns.publish(&a, ip1).await, "publish");
    assert_eq!(rec.fqdn, fqdn_a);
    assert_eq!(rec.ip, ip1);
    assert_eq!(ok(dns.resolve(&a).await, "resolve"), vec![ip1]);
    assert_eq!(ok(dns.reverse(ip1).await, "reverse"), vec![fqdn_a.clone()]);
    let again = ok(dns.publish(&a, ip1).await, "publish again");
    assert_eq!(
        again, rec,
        "publishing the same name and address again succeeds"
    );
    assert_eq!(
        ok(dns.resolve(&a).await, "resolve after republish"),
        vec![ip1]
    );

    expect_kind(
        dns.publish(&a, ip2).await,
        ErrorKind::Conflict,
        "publishing a name that points elsewhere",
    );
    assert_eq!(ok(dns.resolve(&a).await, "name untouched"), vec![ip1]);
    assert!(ok(dns.reverse(ip2).await, "no ptr made").is_empty());

    expect_kind(
        dns.publish(&b, ip1).await,
        ErrorKind::Conflict,
        "publishing an address whose PTR names another vm",
    );
    assert!(ok(dns.resolve(&b).await, "no A made").is_empty());
    assert_eq!(
        ok(dns.reverse(ip1).await, "ptr untouched"),
        vec![fqdn_a.clone()]
    );

    expect_undone(
        dns.remove(&b, ip1).await,
        &Undone::Absent,
        "removing a name that has no records",
    );
    assert_eq!(ok(dns.resolve(&a).await, "a survives"), vec![ip1]);
    assert_eq!(
        ok(dns.reverse(ip1).await, "ptr survives"),
        vec![fqdn_a.clone()]
    );
    expect_foreign(
        dns.remove(&a, ip2).await,
        "removing a name whose record points at another address",
    );
    assert_eq!(ok(dns.resolve(&a).await, "a survives"), vec![ip1]);

    expect_undone(dns.remove(&a, ip1).await, &Undone::Removed, "remove");
    assert!(ok(dns.resolve(&a).await, "A gone").is_empty());
    assert!(ok(dns.reverse(ip1).await, "PTR gone").is_empty());
    expect_undone(dns.remove(&a, ip1).await, &Undone::Absent, "remove again");

    // The address is free again for another VM.
    ok(dns.publish(&b, ip1).await, "publish the freed address");
    ok(dns.remove(&b, ip1).await, "cleanup");
}

/// What the tester knows about the image store under test.
#[derive(Debug, Clone)]
pub struct ImageStoreFixture {
    /// A template the store can prepare.
    pub template: TemplateName,
    /// The host to make disks on.
    pub host: HostId,
    /// Disk size to ask for.
    pub size_gib: u64,
}

/// Checks an [`ImageStore`]: prepare is idempotent, an unknown template is `NotFound`,
/// disk creation is idempotent per VM and owner, a disk of another owner is never
/// adopted (`AlreadyExists`) nor deleted (`Foreign`), deletion is idempotent.
pub async fn image_store(store: Arc<dyn ImageStore>, fixture: ImageStoreFixture) {
    let p = Progress::discard();
    let (me, them) = (owner(), owner());
    let t = ok(
        store.prepare(&fixture.template, &fixture.host, &p).await,
        "prepare",
    );
    assert_eq!(t.name, fixture.template);
    let t2 = ok(
        store.prepare(&fixture.template, &fixture.host, &p).await,
        "prepare again",
    );
    assert_eq!(t.path, t2.path, "prepare is idempotent");
    let listed = ok(store.templates().await, "templates");
    assert!(
        listed.iter().any(|l| l.name == fixture.template),
        "a prepared template is listed"
    );
    let unknown = TemplateName::new(format!("no-such-template-{}", unique_vm_name("t")))
        .unwrap_or_else(|e| panic!("{e}"));
    expect_kind(
        store.prepare(&unknown, &fixture.host, &p).await,
        ErrorKind::NotFound,
        "unknown template",
    );

    let (vm, host, gib) = (unique_vm_name("disk"), &fixture.host, fixture.size_gib);
    let d = ok(
        store.create_disk(&vm, host, &t, gib, &me, &p).await,
        "create disk",
    );
    assert_eq!(d.vm, vm);
    assert_eq!(d.size_gib, fixture.size_gib);
    let d2 = ok(
        store.create_disk(&vm, host, &t, gib, &me, &p).await,
        "create disk again",
    );
    assert_eq!(d, d2, "creating the same vm's disk again returns it");
    assert_eq!(ok(store.disk(&vm, host).await, "disk"), Some(d.clone()));
    expect_kind(
        store.create_disk(&vm, host, &t, gib, &them, &p).await,
        ErrorKind::AlreadyExists,
        "creating a disk another owner made (never adopted)",
    );
    expect_foreign(
        store.delete_disk(&vm, host, &them).await,
        "deleting another owner's disk",
    );
    assert_eq!(
        ok(store.disk(&vm, host).await, "the foreign disk survives"),
        Some(d)
    );
    expect_undone(
        store.delete_disk(&vm, host, &me).await,
        &Undone::Removed,
        "delete",
    );
    assert_eq!(ok(store.disk(&vm, host).await, "disk after delete"), None);
    expect_undone(
        store.delete_disk(&vm, host, &me).await,
        &Undone::Absent,
        "delete again",
    );
}

/// Checks a [`Hypervisor`] with a spec the tester built (its disk must exist for real
/// hypervisors): create is idempotent for the same request, a clash with another request
/// is `AlreadyExists` and leaves the domain alone, another request's destroy leaves it
/// alone (`Foreign`), destroy is idempotent.
pub async fn hypervisor(hv: Arc<dyn Hypervisor>, spec: DomainSpec) {
    let p = Progress::discard();
    let d = ok(hv.create(&spec, &p).await, "create");
    assert_eq!(d.name, spec.name);
    assert_eq!(d.host, spec.host);
    let d2 = ok(hv.create(&spec, &p).await, "create again");
    assert_eq!(d.name, d2.name, "create again returns the same domain");
    assert_eq!(d.uuid, d2.uuid, "create again returns the same domain");
    let mut clash = spec.clone();
    clash.request_id = RequestId::random();
    expect_kind(
        hv.create(&clash, &p).await,
        ErrorKind::AlreadyExists,
        "a domain of that name belonging to another request",
    );
    assert!(ok(hv.domain(&spec.name, &spec.host).await, "domain").is_some());
    expect_foreign(
        hv.destroy(&spec.name, &spec.host, &clash.request_id).await,
        "destroying another request's domain",
    );
    assert_eq!(
        ok(
            hv.domain(&spec.name, &spec.host).await,
            "the foreign domain survives"
        )
        .and_then(|d| d.uuid),
        d.uuid
    );
    expect_undone(
        hv.destroy(&spec.name, &spec.host, &spec.request_id).await,
        &Undone::Removed,
        "destroy",
    );
    assert!(
        ok(
            hv.domain(&spec.name, &spec.host).await,
            "domain after destroy"
        )
        .is_none()
    );
    expect_undone(
        hv.destroy(&spec.name, &spec.host, &spec.request_id).await,
        &Undone::Absent,
        "destroy again",
    );
}

/// Checks a [`Bootstrapper`] against a target the tester prepared: bootstrap succeeds,
/// another request's unregister leaves the registration alone (a bootstrapper that
/// registers nothing says `Absent`), unregister is idempotent, unregistering a VM never
/// bootstrapped is `Absent`.
pub async fn bootstrapper(bs: Arc<dyn Bootstrapper>, target: BootstrapTarget) {
    let p = Progress::discard();
    let me = target.request_id.clone();
    ok(bs.bootstrap(&target, &p).await, "bootstrap");
    let theirs = ok(
        bs.unregister(&target.vm, &owner()).await,
        "unregister by another",
    );
    assert!(
        matches!(theirs, Undone::Foreign { .. } | Undone::Absent),
        "another request's unregister leaves the registration alone: {theirs:?}"
    );
    let first = ok(bs.unregister(&target.vm, &me).await, "unregister");
    assert!(
        matches!(first, Undone::Removed | Undone::Absent),
        "unregister: {first:?}"
    );
    assert!(
        theirs == Undone::Absent || first == Undone::Removed,
        "a registration another request could not remove is removed by its own"
    );
    expect_undone(
        bs.unregister(&target.vm, &me).await,
        &Undone::Absent,
        "unregister again",
    );
    expect_undone(
        bs.unregister(&unique_vm_name("never"), &me).await,
        &Undone::Absent,
        "unregister unknown",
    );
}

/// A bootstrap target for a VM that need not exist (for bootstrappers that do not
/// contact the guest).
pub fn detached_target(owner: UserName) -> BootstrapTarget {
    let vm = unique_vm_name("boot");
    BootstrapTarget {
        fqdn: format!("{vm}.test"),
        vm,
        request_id: RequestId::random(),
        ip: IpAddr::from([192, 0, 2, 10]),
        owner: User {
            name: owner,
            display_name: None,
            mail: None,
            ssh_keys: Vec::new(),
        },
        settings: BootstrapSettings {
            run_list: vec!["recipe[base]".into()],
            ..Default::default()
        },
        host_key: None,
    }
}

#[cfg(test)]
mod tests {
    //! Every suite against its reference implementation.
    use super::*;
    use crate::memory::*;
    use crate::types::{Disk, DiskFormat, Lease, Template};

    fn name(s: &str) -> UserName {
        UserName::new(s).unwrap()
    }

    #[tokio::test]
    async fn memory_users_conform() {
        let dir = MemoryUsers::new()
            .with_user(
                User {
                    name: name("alice"),
                    display_name: Some("Alice".into()),
                    mail: None,
                    ssh_keys: vec!["ssh-ed25519 AAAA alice".into()],
                },
                true,
            )
            .with_user(
                User {
                    name: name("mallory"),
                    display_name: None,
                    mail: None,
                    ssh_keys: vec![],
                },
                false,
            );
        user_directory(
            Arc::new(dir),
            UserDirectoryFixture {
                member: name("alice"),
                outsider: Some(name("mallory")),
            },
        )
        .await;
    }

    #[tokio::test]
    async fn memory_placement_conforms() {
        let size = VmSize::default();
        let hosts = vec![
            HostCapacity::slots(HostId::new("h1").unwrap(), 2, size),
            HostCapacity::slots(HostId::new("h2").unwrap(), 1, size),
        ];
        placement(
            Arc::new(MemoryPlacement::new(hosts)),
            PlacementFixture {
                capacity: Some(3),
                size,
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn memory_ip_allocator_conforms() {
        // A /28 holds 14 hosts; minus the gateway and 2 reserved leaves 11.
        let a = MemoryIpAllocator::new("10.9.0.0/28".parse().unwrap(), Some([10, 9, 0, 1].into()))
            .with_reserved([10, 9, 0, 2].into(), [10, 9, 0, 3].into());
        ip_allocator(
            Arc::new(a),
            IpAllocatorFixture {
                capacity: Some(11),
                concurrency: 8,
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn file_backed_ip_allocator_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let a = MemoryIpAllocator::new("10.9.0.0/29".parse().unwrap(), None)
            .with_state_file(dir.path().join("leases.json"));
        ip_allocator(
            Arc::new(a),
            IpAllocatorFixture {
                capacity: Some(6),
                concurrency: 5,
            },
        )
        .await;
    }

    #[tokio::test]
    async fn memory_dns_conforms() {
        dns_updater(
            Arc::new(MemoryDns::new("lab.example.")),
            DnsUpdaterFixture {
                addresses: [[10, 9, 0, 5].into(), [10, 9, 0, 6].into()],
            },
        )
        .await;
    }

    #[tokio::test]
    async fn memory_images_conform() {
        let t = TemplateName::new("debian-12").unwrap();
        image_store(
            Arc::new(MemoryImages::new([t.clone()])),
            ImageStoreFixture {
                template: t,
                host: HostId::new("h1").unwrap(),
                size_gib: 10,
            },
        )
        .await;
    }

    #[tokio::test]
    async fn memory_hypervisor_conforms() {
        let vm = unique_vm_name("hv");
        let t = TemplateName::new("debian-12").unwrap();
        let spec = DomainSpec {
            name: vm.clone(),
            host: HostId::new("h1").unwrap(),
            size: VmSize::default(),
            disk: Disk {
                vm: vm.clone(),
                path: "/nonexistent".into(),
                format: DiskFormat::Qcow2,
                size_gib: 40,
            },
            template: Template {
                name: t,
                path: "/nonexistent".into(),
                digest: None,
                boot: Default::default(),
            },
            lease: Lease {
                vm: vm.clone(),
                ip: [10, 9, 0, 5].into(),
                prefix_len: 24,
                gateway: None,
            },
            fqdn: format!("{vm}.lab.example"),
            owner: name("alice"),
            request_id: RequestId::random(),
            ssh_keys: vec![],
            seed: None,
        };
        hypervisor(Arc::new(MemoryHypervisor::new()), spec).await;
    }

    #[tokio::test]
    async fn memory_bootstrapper_conforms() {
        bootstrapper(
            Arc::new(MemoryBootstrapper::new()),
            detached_target(name("alice")),
        )
        .await;
    }

    #[tokio::test]
    async fn noop_bootstrapper_conforms() {
        bootstrapper(
            Arc::new(crate::backends::NoopBootstrapper),
            detached_target(name("alice")),
        )
        .await;
    }

    /// The suites must be able to fail: a broken allocator that hands out one address to
    /// everyone is caught.
    #[tokio::test]
    #[should_panic(expected = "two vms never share an address")]
    async fn the_ip_suite_catches_a_duplicate_address() {
        /// Keeps owners right, but hands out one address to everyone.
        #[derive(Default)]
        struct Broken(std::sync::Mutex<std::collections::HashMap<VmName, RequestId>>);
        impl Broken {
            fn lease_of(vm: &VmName) -> Lease {
                Lease {
                    vm: vm.clone(),
                    ip: [10, 0, 0, 5].into(),
                    prefix_len: 24,
                    gateway: None,
                }
            }
            fn held(
                &self,
            ) -> std::sync::MutexGuard<'_, std::collections::HashMap<VmName, RequestId>>
            {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            }
        }
        #[async_trait::async_trait]
        impl IpAllocator for Broken {
            fn backend(&self) -> &str {
                "broken"
            }
            async fn allocate(&self, vm: &VmName, owner: &RequestId) -> crate::Result<Lease> {
                let mut held = self.held();
                match held.get(vm) {
                    Some(o) if o != owner => Err(crate::Error::already_exists("taken")),
                    _ => {
                        held.insert(vm.clone(), owner.clone());
                        Ok(Self::lease_of(vm))
                    }
                }
            }
            async fn release(&self, vm: &VmName, owner: &RequestId) -> crate::Result<Undone> {
                let mut held = self.held();
                Ok(match held.get(vm) {
                    None => Undone::Absent,
                    Some(o) if o != owner => Undone::foreign(o.as_str()),
                    Some(_) => {
                        held.remove(vm);
                        Undone::Removed
                    }
                })
            }
            async fn lease(&self, vm: &VmName) -> crate::Result<Option<Lease>> {
                Ok(self.held().contains_key(vm).then(|| Self::lease_of(vm)))
            }
        }
        ip_allocator(
            Arc::new(Broken::default()),
            IpAllocatorFixture {
                capacity: None,
                concurrency: 2,
            },
        )
        .await;
    }

    /// A DNS updater that overwrites is caught.
    #[tokio::test]
    #[should_panic(expected = "publishing a name that points elsewhere")]
    async fn the_dns_suite_catches_an_overwrite() {
        struct Overwriting(MemoryDns);
        #[async_trait::async_trait]
        impl DnsUpdater for Overwriting {
            fn backend(&self) -> &str {
                "overwriting"
            }
            fn fqdn(&self, vm: &VmName) -> String {
                self.0.fqdn(vm)
            }
            async fn publish(&self, vm: &VmName, ip: IpAddr) -> crate::Result<crate::DnsRecord> {
                for old in self.0.resolve(vm).await? {
                    self.0.remove(vm, old).await?;
                }
                self.0.publish(vm, ip).await
            }
            async fn remove(&self, vm: &VmName, ip: IpAddr) -> crate::Result<Undone> {
                self.0.remove(vm, ip).await
            }
            async fn resolve(&self, vm: &VmName) -> crate::Result<Vec<IpAddr>> {
                self.0.resolve(vm).await
            }
            async fn reverse(&self, ip: IpAddr) -> crate::Result<Vec<String>> {
                self.0.reverse(ip).await
            }
        }
        dns_updater(
            Arc::new(Overwriting(MemoryDns::new("lab.example"))),
            DnsUpdaterFixture {
                addresses: [[10, 9, 0, 5].into(), [10, 9, 0, 6].into()],
            },
        )
        .await;
    }
}
