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
    BootstrapSettings, BootstrapTarget, DomainSpec, HostId, RequestId, TemplateName, User,
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

/// What the tester knows about the placement under test.
#[derive(Debug, Clone)]
pub struct PlacementFixture {
    /// How many VMs of `size` fit in total, if small enough to fill in a test.
    pub capacity: Option<usize>,
    /// The VM size to reserve.
    pub size: VmSize,
}

/// Checks a [`Placement`]: reserving is idempotent, release is idempotent, releasing an
/// unknown VM succeeds, and a full set of hosts is `Exhausted` without changing anything.
pub async fn placement(p: Arc<dyn Placement>, fixture: PlacementFixture) {
    let vm = unique_vm_name("place");
    let host = ok(p.reserve(&vm, &fixture.size).await, "reserve");
    let again = ok(p.reserve(&vm, &fixture.size).await, "reserve again");
    assert_eq!(
        host, again,
        "reserving again for the same vm returns the same host"
    );
    assert_eq!(
        ok(p.reservation(&vm).await, "reservation"),
        Some(host.clone())
    );
    ok(p.release(&vm).await, "release");
    assert_eq!(
        ok(p.reservation(&vm).await, "reservation after release"),
        None
    );
    ok(p.release(&vm).await, "release again");
    ok(
        p.release(&unique_vm_name("never")).await,
        "release of an unknown vm",
    );

    if let Some(capacity) = fixture.capacity {
        let vms: Vec<VmName> = (0..capacity).map(|_| unique_vm_name("fill")).collect();
        for vm in &vms {
            ok(
                p.reserve(vm, &fixture.size).await,
                "reserve within capacity",
            );
        }
        // Reserving again for a VM that holds a slot must not need a new slot.
        ok(
            p.reserve(&vms[0], &fixture.size).await,
            "re-reserve when full",
        );
        let extra = unique_vm_name("extra");
        expect_kind(
            p.reserve(&extra, &fixture.size).await,
            ErrorKind::Exhausted,
            "reserve beyond capacity",
        );
        assert_eq!(
            ok(p.reservation(&extra).await, "no slot after failure"),
            None
        );
        ok(p.release(&vms[0]).await, "release one");
        ok(
            p.reserve(&extra, &fixture.size).await,
            "reserve the freed slot",
        );
        ok(p.release(&extra).await, "cleanup");
        for vm in &vms {
            ok(p.release(vm).await, "cleanup");
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

/// Checks an [`IpAllocator`]: allocating is idempotent per VM, different VMs get
/// different addresses (also when racing), release is idempotent, and a full subnet is
/// `Exhausted` without changing anything.
pub async fn ip_allocator(a: Arc<dyn IpAllocator>, fixture: IpAllocatorFixture) {
    let vm = unique_vm_name("ip");
    let lease = ok(a.allocate(&vm).await, "allocate");
    assert_eq!(lease.vm, vm, "the lease names its vm");
    let again = ok(a.allocate(&vm).await, "allocate again");
    assert_eq!(
        lease, again,
        "allocating again for the same vm returns the same lease"
    );
    assert_eq!(ok(a.lease(&vm).await, "lease"), Some(lease.clone()));
    let other = unique_vm_name("ip");
    let other_lease = ok(a.allocate(&other).await, "allocate another");
    assert_ne!(lease.ip, other_lease.ip, "two vms never share an address");
    if let Some(gw) = lease.gateway {
        assert_ne!(lease.ip, gw, "the gateway is never leased");
    }
    ok(a.release(&vm).await, "release");
    assert_eq!(ok(a.lease(&vm).await, "lease after release"), None);
    ok(a.release(&vm).await, "release again");
    ok(a.release(&unique_vm_name("never")).await, "release unknown");
    ok(a.release(&other).await, "cleanup");

    // Racing allocations: no duplicates, and racing the same VM gives one lease.
    let vms: Vec<VmName> = (0..fixture.concurrency)
        .map(|_| unique_vm_name("race"))
        .collect();
    let mut tasks = Vec::new();
    for vm in vms.iter().cloned().chain(vms.iter().take(2).cloned()) {
        let a = a.clone();
        tasks.push(tokio::spawn(async move { a.allocate(&vm).await }));
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
        ok(a.release(vm).await, "cleanup");
    }

    if let Some(capacity) = fixture.capacity {
        let vms: Vec<VmName> = (0..capacity).map(|_| unique_vm_name("fill")).collect();
        for vm in &vms {
            ok(a.allocate(vm).await, "allocate within capacity");
        }
        ok(a.allocate(&vms[0]).await, "re-allocate when full");
        let extra = unique_vm_name("extra");
        expect_kind(
            a.allocate(&extra).await,
            ErrorKind::Exhausted,
            "allocate beyond capacity",
        );
        assert_eq!(ok(a.lease(&extra).await, "no lease after failure"), None);
        let freed = ok(a.lease(&vms[0]).await, "lease").map(|l| l.ip);
        ok(a.release(&vms[0]).await, "release one");
        let reused = ok(a.allocate(&extra).await, "allocate the freed address");
        assert_eq!(
            Some(reused.ip),
            freed,
            "a released address is handed out again"
        );
        ok(a.release(&extra).await, "cleanup");
        for vm in &vms {
            ok(a.release(vm).await, "cleanup");
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
/// idempotent and never removes another VM's records.
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

    ok(dns.remove(&b, ip1).await, "removing another vm's address");
    assert_eq!(ok(dns.resolve(&a).await, "a survives"), vec![ip1]);
    assert_eq!(
        ok(dns.reverse(ip1).await, "ptr survives"),
        vec![fqdn_a.clone()]
    );
    ok(dns.remove(&a, ip2).await, "removing with the wrong address");
    assert_eq!(ok(dns.resolve(&a).await, "a survives"), vec![ip1]);

    ok(dns.remove(&a, ip1).await, "remove");
    assert!(ok(dns.resolve(&a).await, "A gone").is_empty());
    assert!(ok(dns.reverse(ip1).await, "PTR gone").is_empty());
    ok(dns.remove(&a, ip1).await, "remove again");

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
/// disk creation is idempotent per VM, deletion is idempotent.
pub async fn image_store(store: Arc<dyn ImageStore>, fixture: ImageStoreFixture) {
    let p = Progress::discard();
    let t = ok(store.prepare(&fixture.template, &p).await, "prepare");
    assert_eq!(t.name, fixture.template);
    let t2 = ok(store.prepare(&fixture.template, &p).await, "prepare again");
    assert_eq!(t.path, t2.path, "prepare is idempotent");
    let listed = ok(store.templates().await, "templates");
    assert!(
        listed.iter().any(|l| l.name == fixture.template),
        "a prepared template is listed"
    );
    let unknown = TemplateName::new(format!("no-such-template-{}", unique_vm_name("t")))
        .unwrap_or_else(|e| panic!("{e}"));
    expect_kind(
        store.prepare(&unknown, &p).await,
        ErrorKind::NotFound,
        "unknown template",
    );

    let vm = unique_vm_name("disk");
    let d = ok(
        store
            .create_disk(&vm, &fixture.host, &t, fixture.size_gib, &p)
            .await,
        "create disk",
    );
    assert_eq!(d.vm, vm);
    assert_eq!(d.size_gib, fixture.size_gib);
    let d2 = ok(
        store
            .create_disk(&vm, &fixture.host, &t, fixture.size_gib, &p)
            .await,
        "create disk again",
    );
    assert_eq!(d, d2, "creating the same vm's disk again returns it");
    assert_eq!(ok(store.disk(&vm, &fixture.host).await, "disk"), Some(d));
    ok(store.delete_disk(&vm, &fixture.host).await, "delete");
    assert_eq!(
        ok(store.disk(&vm, &fixture.host).await, "disk after delete"),
        None
    );
    ok(store.delete_disk(&vm, &fixture.host).await, "delete again");
}

/// Checks a [`Hypervisor`] with a spec the tester built (its disk must exist for real
/// hypervisors): create is idempotent for the same request, a clash with another request
/// is `AlreadyExists` and leaves the domain alone, destroy is idempotent.
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
    ok(hv.destroy(&spec.name, &spec.host).await, "destroy");
    assert!(
        ok(
            hv.domain(&spec.name, &spec.host).await,
            "domain after destroy"
        )
        .is_none()
    );
    ok(hv.destroy(&spec.name, &spec.host).await, "destroy again");
}

/// Checks a [`Bootstrapper`] against a target the tester prepared: bootstrap succeeds,
/// unregister is idempotent, unregistering a VM never bootstrapped succeeds.
pub async fn bootstrapper(bs: Arc<dyn Bootstrapper>, target: BootstrapTarget) {
    let p = Progress::discard();
    ok(bs.bootstrap(&target, &p).await, "bootstrap");
    ok(bs.unregister(&target.vm).await, "unregister");
    ok(bs.unregister(&target.vm).await, "unregister again");
    ok(
        bs.unregister(&unique_vm_name("never")).await,
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
        UserName::new(s).unwrap_or_else(|e| panic!("{e}"))
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
            HostCapacity::slots(HostId::new("h1").unwrap_or_else(|e| panic!("{e}")), 2, size),
            HostCapacity::slots(HostId::new("h2").unwrap_or_else(|e| panic!("{e}")), 1, size),
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
        let a = MemoryIpAllocator::new(
            "10.9.0.0/28".parse().unwrap_or_else(|e| panic!("{e}")),
            Some([10, 9, 0, 1].into()),
        )
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
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = MemoryIpAllocator::new(
            "10.9.0.0/29".parse().unwrap_or_else(|e| panic!("{e}")),
            None,
        )
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
        let t = TemplateName::new("debian-12").unwrap_or_else(|e| panic!("{e}"));
        image_store(
            Arc::new(MemoryImages::new([t.clone()])),
            ImageStoreFixture {
                template: t,
                host: HostId::new("h1").unwrap_or_else(|e| panic!("{e}")),
                size_gib: 10,
            },
        )
        .await;
    }

    #[tokio::test]
    async fn memory_hypervisor_conforms() {
        let vm = unique_vm_name("hv");
        let t = TemplateName::new("debian-12").unwrap_or_else(|e| panic!("{e}"));
        let spec = DomainSpec {
            name: vm.clone(),
            host: HostId::new("h1").unwrap_or_else(|e| panic!("{e}")),
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
        struct Broken;
        #[async_trait::async_trait]
        impl IpAllocator for Broken {
            fn backend(&self) -> &str {
                "broken"
            }
            async fn allocate(&self, vm: &VmName) -> crate::Result<Lease> {
                Ok(Lease {
                    vm: vm.clone(),
                    ip: [10, 0, 0, 5].into(),
                    prefix_len: 24,
                    gateway: None,
                })
            }
            async fn release(&self, _vm: &VmName) -> crate::Result<()> {
                Ok(())
            }
            async fn lease(&self, vm: &VmName) -> crate::Result<Option<Lease>> {
                Ok(Some(self.allocate(vm).await?))
            }
        }
        ip_allocator(
            Arc::new(Broken),
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
            async fn remove(&self, vm: &VmName, ip: IpAddr) -> crate::Result<()> {
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
