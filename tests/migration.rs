//! Live migration's saga on the reference backends: a VM moves with its slot and disk and
//! keeps its address and name; a fault at any act of the move leaves it running on its
//! host with nothing made elsewhere; a full target is refused; and a deprovision after a
//! move removes what is on the new host.

use std::time::Duration;

use devvm_core::testkit::faults::{self, Fault, FaultPlan};
use devvm_core::{
    ErrorKind, EventKind, HostId, Hypervisor, ImageStore, Operation, Placement, ProvisionRequest,
    Provisioner, Retries, Step, Timeouts, VmName, VmSize,
};
use devvm_tests::{reference_backends, user};

struct Fixture {
    _dir: tempfile::TempDir,
    mem: devvm_core::memory::MemoryBackends,
    p: Provisioner,
}

fn fixture(plan: Option<FaultPlan>) -> Fixture {
    let mem = reference_backends(None);
    let backends = match plan {
        Some(plan) => faults::inject(mem.backends(), plan),
        None => mem.backends(),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut timeouts = Timeouts::default();
    if plan.is_some_and(|p| p.fault == Fault::Hang) {
        timeouts.set(
            plan.map(|p| p.step).unwrap_or(Step::Domain),
            Duration::from_millis(200),
        );
    }
    let p = Provisioner::builder()
        .state_dir(dir.path().join("state"))
        .backends(backends)
        .defaults(devvm_core::Defaults {
            template: Some(devvm_core::TemplateName::new(devvm_tests::TEMPLATE).expect("name")),
            size: VmSize::default(),
            ..Default::default()
        })
        .timeouts(timeouts)
        .retries(Retries::none())
        .build()
        .expect("provisioner");
    Fixture { _dir: dir, mem, p }
}

fn host(s: &str) -> HostId {
    HostId::new(s).expect("host id")
}

/// The other reference host.
fn other(h: &HostId) -> HostId {
    if h.as_str() == "host-a" {
        host("host-b")
    } else {
        host("host-a")
    }
}

/// Where the VM's domain, disk and slot are, asked of the backends.
async fn whereabouts(f: &Fixture, vm: &VmName) -> (Vec<HostId>, Vec<HostId>, Option<HostId>) {
    let mut domains = Vec::new();
    let mut disks = Vec::new();
    for h in [host("host-a"), host("host-b")] {
        if f.mem
            .hypervisor
            .domain(vm, &h)
            .await
            .expect("domain")
            .is_some()
        {
            domains.push(h.clone());
        }
        if f.mem.images.disk(vm, &h).await.expect("disk").is_some() {
            disks.push(h);
        }
    }
    (
        domains,
        disks,
        f.mem.placement.reservation(vm).await.expect("reservation"),
    )
}

#[tokio::test]
async fn a_vm_moves_with_its_slot_and_disk_and_keeps_its_address() {
    let f = fixture(None);
    let vm =
        f.p.provision(ProvisionRequest::new(user("alice")))
            .await
            .unwrap();
    let from = vm.host.clone();
    let to = other(&from);
    let mut sub = f.p.subscribe();

    let moved = f.p.migrate(&vm.name, &to).await.unwrap();
    assert_eq!(moved.host, to);
    assert_eq!(
        (moved.ip, &moved.fqdn),
        (vm.ip, &vm.fqdn),
        "address and name stay"
    );
    assert_eq!(
        whereabouts(&f, &vm.name).await,
        (vec![to.clone()], vec![to.clone()], Some(to.clone())),
        "domain, disk and slot are on the target only"
    );
    assert_eq!(f.p.get(&vm.name).await.unwrap(), Some(moved.clone()));
    let events = sub.drain();
    assert!(matches!(
        events.first().map(|e| &e.kind),
        Some(EventKind::RunStarted {
            operation: Operation::Migrate
        })
    ));
    for step in [Step::Placement, Step::Image, Step::Disk, Step::Domain] {
        assert!(
            events
                .iter()
                .any(|e| e.kind == EventKind::StepStarted { step }),
            "{step} started"
        );
    }
    assert!(matches!(
        events.last().map(|e| &e.kind),
        Some(EventKind::RunFinished { provisioned: Some(v) }) if v.host == to
    ));

    // Already there: nothing happens.
    assert_eq!(f.p.migrate(&vm.name, &to).await.unwrap(), moved);
    // And back again.
    assert_eq!(f.p.migrate(&vm.name, &from).await.unwrap().host, from);
    assert_eq!(f.p.migrate(&vm.name, &to).await.unwrap().host, to);

    // A deprovision after the moves removes what is on the host the VM is on now.
    f.p.deprovision(&vm.name).await.unwrap();
    assert_eq!(f.mem.held_total().unwrap(), 0, "{:?}", f.mem.held());
}

#[tokio::test]
async fn an_unknown_vm_or_a_full_target_is_refused_and_nothing_moves() {
    let f = fixture(None);
    let e =
        f.p.migrate(&VmName::new("nope").unwrap(), &host("host-b"))
            .await
            .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // host-b has room for one VM: fill it, then try to move another one there.
    let mut vms = Vec::new();
    for _ in 0..3 {
        vms.push(
            f.p.provision(ProvisionRequest::new(user("alice")))
                .await
                .unwrap(),
        );
    }
    let on_a = vms.iter().find(|v| v.host.as_str() == "host-a").unwrap();
    let e = f.p.migrate(&on_a.name, &host("host-b")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    assert_eq!(
        whereabouts(&f, &on_a.name).await,
        (
            vec![host("host-a")],
            vec![host("host-a")],
            Some(host("host-a"))
        ),
        "it stays where it was"
    );
    assert_eq!(
        f.p.get(&on_a.name).await.unwrap().map(|v| v.host),
        Some(host("host-a"))
    );
    for v in &vms {
        f.p.deprovision(&v.name).await.unwrap();
    }
    assert_eq!(f.mem.held_total().unwrap(), 0, "{:?}", f.mem.held());
}

#[tokio::test]
async fn a_fault_at_any_act_of_a_move_leaves_the_vm_where_it_was() {
    // Each step's backend was called once by the provision; the move's call is the next.
    for step in [Step::Placement, Step::Image, Step::Disk, Step::Domain] {
        for fault in [
            Fault::Error(ErrorKind::Unavailable),
            Fault::Hang,
            Fault::Panic,
        ] {
            let f = fixture(Some(FaultPlan::new(step, fault).after(1)));
            let vm =
                f.p.provision(ProvisionRequest::new(user("alice")))
                    .await
                    .unwrap();
            let from = vm.host.clone();
            let held = f.mem.held_total().unwrap();
            let e = f.p.migrate(&vm.name, &other(&from)).await.unwrap_err();
            let ctx = format!("{fault:?} at {step}: {e}");
            assert_eq!(e.step(), Some(step), "{ctx}");
            assert!(e.undo_failures().is_empty(), "{ctx}");
            assert_eq!(
                whereabouts(&f, &vm.name).await,
                (vec![from.clone()], vec![from.clone()], Some(from.clone())),
                "{ctx}: running where it was, with its disk and slot"
            );
            assert_eq!(
                f.mem.held_total().unwrap(),
                held,
                "{ctx}: nothing made elsewhere"
            );
            let listed = f.p.get(&vm.name).await.unwrap().unwrap();
            assert_eq!(listed.host, from, "{ctx}");
            // The VM is active again: it can move (the fault fired once) and be removed.
            let moved = f.p.migrate(&vm.name, &other(&from)).await.unwrap();
            assert_eq!(moved.host, other(&from), "{ctx}");
            f.p.deprovision(&vm.name).await.unwrap();
            assert_eq!(f.mem.held_total().unwrap(), 0, "{ctx}: {:?}", f.mem.held());
        }
    }
}

#[tokio::test]
async fn drain_moves_every_vm_off_a_host_or_nothing_and_dry_run_only_plans() {
    let f = fixture(None);
    let vm =
        f.p.provision(ProvisionRequest::new(user("alice")))
            .await
            .unwrap();
    let from = vm.host.clone();
    let hosts = f.p.hosts().await.unwrap();
    assert_eq!(hosts.len(), 2);
    assert!(
        hosts
            .iter()
            .any(|h| h.host == from && h.vms == vec![vm.name.clone()])
    );

    let planned = f.p.drain(&from, true).await.unwrap();
    assert_eq!(planned.len(), 1);
    assert_eq!(planned[0].to, other(&from));
    assert_eq!(
        f.p.get(&vm.name).await.unwrap().map(|v| v.host),
        Some(from.clone()),
        "a dry run moves nothing"
    );
    let done = f.p.drain(&from, false).await.unwrap();
    assert_eq!(done, planned);
    assert_eq!(
        whereabouts(&f, &vm.name).await,
        (vec![other(&from)], vec![other(&from)], Some(other(&from)))
    );

    // host-b has room for one VM: with two on host-a, draining host-a plans nothing.
    let f = fixture(None);
    let mut on_a = Vec::new();
    while on_a.len() < 2 {
        let v =
            f.p.provision(ProvisionRequest::new(user("alice")))
                .await
                .unwrap();
        if v.host.as_str() == "host-a" {
            on_a.push(v);
        }
    }
    let e = f.p.drain(&host("host-a"), false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    for v in &on_a {
        assert_eq!(
            f.p.get(&v.name).await.unwrap().map(|v| v.host),
            Some(host("host-a")),
            "nothing moved"
        );
    }
}

/// A hypervisor whose live migration lands late: its blocking work goes on after the
/// move's act was given up (as libvirt's migrate3 can, past its point of no return),
/// and moves the guest only when `release` says so.
struct LateMove {
    inner: std::sync::Arc<devvm_core::memory::MemoryHypervisor>,
    /// The move waits for a message here; a closed channel lets it go at once.
    release: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

#[devvm_core::async_trait]
impl Hypervisor for LateMove {
    fn backend(&self) -> &str {
        "late-move"
    }
    async fn create(
        &self,
        spec: &devvm_core::DomainSpec,
        p: &devvm_core::Progress,
    ) -> devvm_core::Result<devvm_core::Domain> {
        self.inner.create(spec, p).await
    }
    async fn destroy(
        &self,
        vm: &VmName,
        host: &HostId,
        owner: &devvm_core::RequestId,
    ) -> devvm_core::Result<devvm_core::Undone> {
        self.inner.destroy(vm, host, owner).await
    }
    async fn domain(
        &self,
        vm: &VmName,
        host: &HostId,
    ) -> devvm_core::Result<Option<devvm_core::Domain>> {
        self.inner.domain(vm, host).await
    }
    async fn migrate(
        &self,
        vm: &VmName,
        from: &HostId,
        to: &HostId,
        owner: &devvm_core::RequestId,
        p: &devvm_core::Progress,
    ) -> devvm_core::Result<devvm_core::MigrationReport> {
        let release = self
            .release
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let (inner, vm, from, to, owner, p) = (
            self.inner.clone(),
            vm.clone(),
            from.clone(),
            to.clone(),
            owner.clone(),
            p.clone(),
        );
        let rt = tokio::runtime::Handle::current();
        devvm_core::work::blocking(move || {
            // Past the point of no return: wait until the act is given up (its time limit
            // passed), then for the test's word, and move the guest all the same. (If
            // the pipeline never says so, the move lands after 60 s anyway, and the test
            // fails on what the rollback did meanwhile instead of hanging.)
            let give_up = std::time::Instant::now() + Duration::from_secs(60);
            while !devvm_core::work::abandoned() && std::time::Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Some(r) = release {
                let _ = r.recv();
            }
            rt.block_on(inner.migrate(&vm, &from, &to, &owner, &p))
        })
        .await
    }
}

fn late_move_fixture(
    release: Option<std::sync::mpsc::Receiver<()>>,
) -> (Fixture, std::sync::Arc<LateMove>) {
    let mem = reference_backends(None);
    let late = std::sync::Arc::new(LateMove {
        inner: mem.hypervisor.clone(),
        release: std::sync::Mutex::new(release),
    });
    let mut backends = mem.backends();
    backends.hypervisor = late.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut timeouts = Timeouts::default();
    timeouts.set(Step::Domain, Duration::from_millis(200));
    let p = Provisioner::builder()
        .state_dir(dir.path().join("state"))
        .backends(backends)
        .defaults(devvm_core::Defaults {
            template: Some(devvm_core::TemplateName::new(devvm_tests::TEMPLATE).expect("name")),
            size: VmSize::default(),
            ..Default::default()
        })
        .timeouts(timeouts)
        .retries(Retries::none())
        .build()
        .expect("provisioner");
    (Fixture { _dir: dir, mem, p }, late)
}

/// A move whose act times out but whose blocking work still lands the guest on the
/// target: the rollback waits for that work, sees the guest on the target, and finishes
/// the move (returning the moved VM) instead of deleting the disk the guest now runs from.
#[tokio::test]
async fn a_move_that_lands_after_its_time_limit_is_finished_not_undone() {
    let (tx, rx) = std::sync::mpsc::channel();
    drop(tx); // the move goes on as soon as the act is given up
    let (f, _late) = late_move_fixture(Some(rx));
    let vm =
        f.p.provision(ProvisionRequest::new(user("alice")))
            .await
            .unwrap();
    let to = other(&vm.host);
    let moved = f.p.migrate(&vm.name, &to).await.expect("the move stands");
    assert_eq!(moved.host, to);
    assert_eq!(
        whereabouts(&f, &vm.name).await,
        (vec![to.clone()], vec![to.clone()], Some(to.clone())),
        "the guest landed on the target with its disk and slot"
    );
    assert_eq!(
        f.p.get(&vm.name).await.unwrap().map(|v| v.host),
        Some(to.clone())
    );
    f.p.deprovision(&vm.name).await.unwrap();
    assert_eq!(f.mem.held_total().unwrap(), 0, "{:?}", f.mem.held());
}

/// A move whose blocking work is still running after the rollback's wait: nothing is
/// undone (the target disk stays, the guest still runs on the source), the error says
/// what is held, and once the work has ended recover() finishes the move.
#[tokio::test]
async fn a_move_still_running_after_its_wait_is_left_for_recover() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (f, _late) = late_move_fixture(Some(rx));
    let vm =
        f.p.provision(ProvisionRequest::new(user("alice")))
            .await
            .unwrap();
    let (from, to) = (vm.host.clone(), other(&vm.host));
    let e = f.p.migrate(&vm.name, &to).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert_eq!(e.undo_failures().len(), 1, "{e}");
    assert_eq!(e.undo_failures()[0].step, Step::Domain, "{e}");
    assert_eq!(
        whereabouts(&f, &vm.name).await,
        (
            vec![from.clone()],
            vec![from.clone(), to.clone()],
            Some(to.clone())
        ),
        "nothing was undone while the move could still land"
    );
    // While that work runs, the run stays this provisioner's: recover() leaves it alone.
    let early = f.p.recover().await.unwrap();
    assert!(
        early.completed.is_empty() && early.rolled_back.is_empty(),
        "{early:?}"
    );
    // The move lands now; once its work has ended, recover() sees the guest on the
    // target and finishes the move.
    tx.send(()).unwrap();
    let settled = async {
        loop {
            let r = f.p.recover().await.unwrap();
            if !r.completed.is_empty() || !r.rolled_back.is_empty() {
                return r;
            }
            tokio::task::yield_now().await;
        }
    };
    let report = tokio::time::timeout(Duration::from_secs(120), settled)
        .await
        .expect("the late move settled");
    assert_eq!(
        report.completed.iter().map(|v| &v.host).collect::<Vec<_>>(),
        vec![&to],
        "{report:?}"
    );
    assert_eq!(
        whereabouts(&f, &vm.name).await,
        (vec![to.clone()], vec![to.clone()], Some(to.clone()))
    );
    f.p.deprovision(&vm.name).await.unwrap();
    assert_eq!(f.mem.held_total().unwrap(), 0, "{:?}", f.mem.held());
}

/// The last act of a move, removing the source's overlay, fails once: the guest runs on
/// the target, so the move is finished (the removal tried again), not undone, and the
/// moved VM is returned. When the removal keeps failing, the error says so, and the
/// guest still runs on the target with its slot; only the source's overlay is left.
#[tokio::test]
async fn a_move_whose_source_disk_removal_fails_stands() {
    for persistent in [false, true] {
        let mut plan = FaultPlan::new(Step::Disk, Fault::Error(ErrorKind::Unavailable)).on_undo();
        if persistent {
            plan = plan.persistent();
        }
        let f = fixture(Some(plan));
        let vm =
            f.p.provision(ProvisionRequest::new(user("alice")))
                .await
                .unwrap();
        let (from, to) = (vm.host.clone(), other(&vm.host));
        let got = f.p.migrate(&vm.name, &to).await;
        if persistent {
            let e = got.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            assert_eq!(e.step(), Some(Step::Disk), "{e}");
            assert_eq!(
                whereabouts(&f, &vm.name).await,
                (
                    vec![to.clone()],
                    vec![from.clone(), to.clone()],
                    Some(to.clone())
                ),
                "the guest runs on the target; only the source's overlay is left"
            );
        } else {
            assert_eq!(got.unwrap().host, to, "the move stands");
            assert_eq!(
                whereabouts(&f, &vm.name).await,
                (vec![to.clone()], vec![to.clone()], Some(to.clone()))
            );
            f.p.deprovision(&vm.name).await.unwrap();
            assert_eq!(f.mem.held_total().unwrap(), 0, "{:?}", f.mem.held());
        }
    }
}
