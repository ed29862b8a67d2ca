//! The pipeline's logic, against the reference backends: ordering, events, rollback,
//! idempotency, concurrency, cancellation and faults at every step.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use devvm_core::memory::MemoryBackends;
use devvm_core::testkit::faults::{self, Fault, FaultPlan};
use devvm_core::{
    BootstrapSettings, CancelToken, ErrorKind, EventKind, IpAllocator, Lease, Placement,
    ProvisionRequest, Provisioner, RequestId, Retries, Step, Timeouts, Undone, VmName, VmSize,
    async_trait,
};
use devvm_tests::{reference_backends, user};

fn name(s: &str) -> VmName {
    VmName::new(s).expect("a valid vm name")
}

struct Fixture {
    _dir: tempfile::TempDir,
    mem: MemoryBackends,
    p: Provisioner,
}

fn fixture_with(
    mem: MemoryBackends,
    backends: devvm_core::Backends,
    timeouts: Timeouts,
) -> Fixture {
    fixture_retrying(mem, backends, timeouts, Retries::default())
}

fn fixture_retrying(
    mem: MemoryBackends,
    backends: devvm_core::Backends,
    timeouts: Timeouts,
    retries: Retries,
) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = Provisioner::builder()
        .state_dir(dir.path().join("state"))
        .backends(backends)
        .defaults(devvm_core::Defaults {
            template: Some(
                devvm_core::TemplateName::new(devvm_tests::TEMPLATE)
                    .expect("a valid template name"),
            ),
            size: VmSize::default(),
            bootstrap: BootstrapSettings {
                run_list: vec!["recipe[base]".into()],
                ..Default::default()
            },
        })
        .timeouts(timeouts)
        .retries(retries)
        .build()
        .expect("build");
    Fixture { _dir: dir, mem, p }
}

fn fixture() -> Fixture {
    let mem = reference_backends(None);
    let b = mem.backends();
    fixture_with(mem, b, Timeouts::default())
}

fn held(f: &Fixture) -> usize {
    f.mem.held_total().expect("count the held resources")
}

#[tokio::test]
async fn provision_runs_every_step_and_deprovision_undoes_them() {
    let f = fixture();
    let mut sub = f.p.subscribe();
    let req = ProvisionRequest::new(user("alice")).with_name(name("web-1"));
    let vm = f.p.provision(req.clone()).await.unwrap();

    assert_eq!(vm.name.as_str(), "web-1");
    assert_eq!(vm.fqdn, "web-1.lab.example");
    assert_eq!(vm.owner.as_str(), "alice");
    assert_eq!(vm.template.as_str(), "debian-12");
    assert_eq!(vm.request_id, req.request_id);
    assert!(vm.bootstrapped);
    assert_eq!(
        vm.ip,
        IpAddr::from([10, 20, 0, 2]),
        "lowest free address after the gateway"
    );
    assert_eq!(f.p.list().await.unwrap(), vec![vm.clone()]);
    assert_eq!(f.p.get(&vm.name).await.unwrap(), Some(vm.clone()));
    let held_per_step = f.mem.held().unwrap();
    assert_eq!(held_per_step.get("dns"), Some(&2), "A and PTR");
    for step in ["placement", "ip", "disk", "domain", "bootstrap"] {
        assert_eq!(held_per_step.get(step), Some(&1), "{step}");
    }

    let events = sub.drain();
    assert!(matches!(
        events.first().map(|e| &e.kind),
        Some(EventKind::RunStarted { .. })
    ));
    assert!(matches!(
        events.last().map(|e| &e.kind),
        Some(EventKind::RunFinished {
            provisioned: Some(_)
        })
    ));
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64, "events are numbered in delivery order");
        assert_eq!(e.request_id, req.request_id);
    }
    let finished: BTreeSet<Step> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::StepFinished { step, .. } => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(
        finished,
        Step::ALL.into_iter().collect(),
        "every step finished"
    );
    for step in Step::ALL {
        let started = events
            .iter()
            .position(|e| e.kind == EventKind::StepStarted { step });
        let done = events
            .iter()
            .position(|e| matches!(e.kind, EventKind::StepFinished { step: s, .. } if s == step));
        assert!(started < done, "{step} starts before it finishes");
    }
    let pos = |step: Step| {
        events
            .iter()
            .position(|e| e.kind == EventKind::StepStarted { step })
            .unwrap_or(usize::MAX)
    };
    let done = |step: Step| {
        events
            .iter()
            .position(|e| matches!(e.kind, EventKind::StepFinished { step: s, .. } if s == step))
            .unwrap_or(0)
    };
    assert!(done(Step::User) < pos(Step::Placement) && done(Step::User) < pos(Step::Ip));
    assert!(done(Step::Ip) < pos(Step::Dns));
    assert!(done(Step::Placement) < pos(Step::Disk) && done(Step::Image) < pos(Step::Disk));
    assert!(done(Step::Dns) < pos(Step::Domain) && done(Step::Disk) < pos(Step::Domain));
    assert!(done(Step::Domain) < pos(Step::Bootstrap));
    // Events are serializable, with a stable tag.
    let json = serde_json::to_value(&events[1]).unwrap();
    assert_eq!(json["type"], "step_started");
    assert_eq!(json["step"], "user");

    f.p.deprovision(&vm.name).await.unwrap();
    assert_eq!(held(&f), 0, "deprovision releases everything");
    assert!(f.p.list().await.unwrap().is_empty());
    let undone: Vec<Step> = sub
        .drain()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::StepUndone { step } => Some(step),
            _ => None,
        })
        .collect();
    let mut reversed = Step::ALL.to_vec();
    reversed.reverse();
    assert_eq!(undone, reversed, "deprovision undoes in reverse order");

    let again = f.p.deprovision(&vm.name).await.expect_err("already gone");
    assert_eq!(again.kind(), ErrorKind::NotFound);
    // The name is free again.
    f.p.provision(ProvisionRequest::new(user("bob")).with_name(name("web-1")))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_same_request_id_gives_the_same_vm() {
    let f = fixture();
    let req = ProvisionRequest::new(user("alice"));
    let a = f.p.provision(req.clone()).await.unwrap();
    let held_once = held(&f);
    let b = f.p.provision(req.clone()).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(held(&f), held_once, "no second vm");
    assert_eq!(f.p.list().await.unwrap().len(), 1);
    assert!(
        a.name.as_str().starts_with("alice-"),
        "derived name {}",
        a.name
    );

    let changed = req.clone().with_size(VmSize {
        vcpus: 1,
        ..VmSize::default()
    });
    let e =
        f.p.provision(changed)
            .await
            .expect_err("same id, other parameters");
    assert_eq!(e.kind(), ErrorKind::Conflict);

    f.p.deprovision(&a.name).await.unwrap();
    let e = f.p.provision(req).await.expect_err("its vm was removed");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(held(&f), 0);
}

#[tokio::test]
async fn a_name_in_use_is_refused_and_nothing_changes() {
    let f = fixture();
    let vm =
        f.p.provision(ProvisionRequest::new(user("alice")).with_name(name("db")))
            .await
            .unwrap();
    let before = f.mem.held().unwrap();
    let e =
        f.p.provision(ProvisionRequest::new(user("bob")).with_name(name("db")))
            .await
            .expect_err("name in use");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(f.mem.held().unwrap(), before);
    assert_eq!(f.p.list().await.unwrap(), vec![vm]);
}

#[tokio::test]
async fn bad_users_fail_at_the_first_step_and_hold_nothing() {
    let f = fixture();
    let e =
        f.p.provision(ProvisionRequest::new(user("nobody")))
            .await
            .expect_err("unknown user");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.step(), Some(Step::User));
    assert_eq!(e.backend_name(), Some("memory"));
    assert!(!e.is_retryable());
    let e =
        f.p.provision(ProvisionRequest::new(user("mallory")))
            .await
            .expect_err("not an owner");
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert_eq!(held(&f), 0);
    assert!(f.p.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unknown_template_or_bad_size_is_refused() {
    let f = fixture();
    let e =
        f.p.provision(
            ProvisionRequest::new(user("alice"))
                .with_template(devvm_core::TemplateName::new("nope").unwrap()),
        )
        .await
        .expect_err("unknown template");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.step(), Some(Step::Image));
    assert_eq!(
        held(&f),
        0,
        "placement, ip and dns ran concurrently and were undone"
    );

    let e =
        f.p.provision(ProvisionRequest::new(user("alice")).with_size(VmSize {
            vcpus: 0,
            ..VmSize::default()
        }))
        .await
        .expect_err("zero vcpus");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(held(&f), 0);
}

#[tokio::test]
async fn host_capacity_runs_out_cleanly() {
    let f = fixture();
    // The two hosts hold 2 + 1 standard VMs.
    for i in 0..3 {
        f.p.provision(ProvisionRequest::new(user("alice")).with_name(name(&format!("vm{i}"))))
            .await
            .unwrap();
    }
    let before = held(&f);
    let e =
        f.p.provision(ProvisionRequest::new(user("alice")).with_name(name("vm3")))
            .await
            .expect_err("full");
    assert_eq!(e.kind(), ErrorKind::Exhausted);
    assert_eq!(e.step(), Some(Step::Placement));
    assert_eq!(held(&f), before, "the failed run left nothing");
}

#[tokio::test]
async fn an_exhausted_subnet_rolls_back() {
    // A subnet of one address: the second VM cannot get one.
    let mut mem = reference_backends(None);
    mem.ip = Arc::new(devvm_core::memory::MemoryIpAllocator::new(
        "10.30.0.0/30".parse().unwrap(),
        Some([10, 30, 0, 1].into()),
    ));
    let b = mem.backends();
    let f = fixture_with(mem, b, Timeouts::default());
    f.p.provision(ProvisionRequest::new(user("alice")).with_name(name("one")))
        .await
        .unwrap();
    let before = held(&f);
    let e =
        f.p.provision(ProvisionRequest::new(user("alice")).with_name(name("two")))
            .await
            .expect_err("no address left");
    assert_eq!(e.kind(), ErrorKind::Exhausted);
    assert_eq!(e.step(), Some(Step::Ip));
    assert_eq!(held(&f), before);
}

/// A fault of every kind at every step leaves zero resources held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_any_step_leaves_nothing_behind() {
    for step in Step::ALL {
        for (fault, kind) in [
            (Fault::Error(ErrorKind::Unavailable), ErrorKind::Unavailable),
            (Fault::Error(ErrorKind::Conflict), ErrorKind::Conflict),
            (Fault::Hang, ErrorKind::Timeout),
            (Fault::Panic, ErrorKind::Backend),
        ] {
            let mem = reference_backends(None);
            let backends = faults::inject(mem.backends(), FaultPlan::new(step, fault));
            // Only the hang needs a short step timeout. Every other fault keeps the default
            // (a minute), so its own outcome never races the clock: under load a panic's
            // backtrace capture alone can take longer than a short timeout.
            let mut timeouts = Timeouts::default();
            if fault == Fault::Hang {
                timeouts.set(step, Duration::from_millis(200));
            }
            // One fault, no retry: the run fails at that step (retries are tested apart).
            let f = fixture_retrying(mem, backends, timeouts, Retries::none());
            let foreign = devvm_tests::plant_neighbour(&f.mem).await;
            let mut sub = f.p.subscribe();
            let e =
                f.p.provision(ProvisionRequest::new(user("alice")))
                    .await
                    .expect_err("the fault fails the run");
            let ctx = format!("{fault:?} at {step}: {e}");
            assert_eq!(e.kind(), kind, "{ctx}");
            assert_eq!(e.step(), Some(step), "{ctx}");
            assert!(e.undo_failures().is_empty(), "{ctx}");
            assert_eq!(
                e.is_retryable(),
                kind == ErrorKind::Unavailable || kind == ErrorKind::Timeout,
                "{ctx}"
            );
            assert_eq!(
                held(&f),
                foreign,
                "{ctx}: nothing but the neighbour's: {:?}",
                f.mem.held()
            );
            assert!(f.p.list().await.unwrap().is_empty(), "{ctx}");
            let events = sub.drain();
            assert!(
                events.iter().any(
                    |e| matches!(&e.kind, EventKind::StepFailed { step: s, .. } if *s == step)
                ),
                "{ctx}: a step_failed event"
            );
            assert!(
                matches!(
                    events.last().map(|e| &e.kind),
                    Some(EventKind::RunFailed { .. })
                ),
                "{ctx}: ends with run_failed"
            );
            // The failed step itself is undone too: it may have acted before failing.
            assert!(
                events
                    .iter()
                    .any(|e| e.kind == EventKind::StepUndone { step }),
                "{ctx}: the failed step is undone"
            );
            // A fault that did not act leaves the name free for a retry.
            f.p.provision(ProvisionRequest::new(user("alice")))
                .await
                .unwrap_or_else(|e| panic!("{ctx}: retry: {e}"));
        }
    }
}

/// An undo that fails is reported, names the resource, and `recover()` finishes it.
#[tokio::test]
async fn a_failed_undo_is_named_and_recovered() {
    let mem = reference_backends(None);
    let b = faults::inject(
        mem.backends(),
        FaultPlan::new(Step::Domain, Fault::Error(ErrorKind::Backend)),
    );
    let b = faults::inject(
        b,
        FaultPlan::new(Step::Ip, Fault::Error(ErrorKind::Unavailable)).on_undo(),
    );
    // No retry: the one failing undo stays failed (a retried one is tested apart).
    let f = fixture_retrying(mem, b, Timeouts::default(), Retries::none());
    let e =
        f.p.provision(ProvisionRequest::new(user("alice")).with_name(name("leaky")))
            .await
            .expect_err("domain fails");
    assert_eq!(
        e.step(),
        Some(Step::Domain),
        "the original error is returned: {e}"
    );
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert_eq!(e.undo_failures().len(), 1, "{e}");
    let failure = &e.undo_failures()[0];
    assert_eq!(failure.step, Step::Ip);
    assert_eq!(failure.resource, "ip lease of vm leaky");
    assert!(e.to_string().contains("ip lease of vm leaky"), "{e}");
    let held_now = f.mem.held().unwrap();
    assert_eq!(
        held_now.get("ip"),
        Some(&1),
        "the lease is really still held"
    );
    assert_eq!(held(&f), 1, "everything else was undone");

    // The name stays taken until the lease is released.
    let e =
        f.p.provision(ProvisionRequest::new(user("bob")).with_name(name("leaky")))
            .await
            .expect_err("name still held");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);

    let report = f.p.recover().await.unwrap();
    assert_eq!(report.rolled_back.len(), 1, "{report:?}");
    assert!(report.still_held.is_empty());
    assert_eq!(held(&f), 0);
    // Recovering again finds nothing to do.
    let report = f.p.recover().await.unwrap();
    assert_eq!(report, devvm_core::RecoveryReport::default());
}

/// Placement and the IP lease run at the same time: each waits for the other at a
/// barrier, which only a concurrent pipeline can pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_steps_run_concurrently() {
    struct Meet<T: ?Sized>(Arc<T>, Arc<tokio::sync::Barrier>);
    #[async_trait]
    impl Placement for Meet<dyn Placement> {
        fn backend(&self) -> &str {
            "meet"
        }
        async fn reserve(
            &self,
            vm: &VmName,
            size: &VmSize,
            owner: &RequestId,
        ) -> devvm_core::Result<devvm_core::HostId> {
            self.1.wait().await;
            self.0.reserve(vm, size, owner).await
        }
        async fn release(&self, vm: &VmName, owner: &RequestId) -> devvm_core::Result<Undone> {
            self.0.release(vm, owner).await
        }
        async fn reservation(&self, vm: &VmName) -> devvm_core::Result<Option<devvm_core::HostId>> {
            self.0.reservation(vm).await
        }
    }
    #[async_trait]
    impl IpAllocator for Meet<dyn IpAllocator> {
        fn backend(&self) -> &str {
            "meet"
        }
        async fn allocate(&self, vm: &VmName, owner: &RequestId) -> devvm_core::Result<Lease> {
            self.1.wait().await;
            self.0.allocate(vm, owner).await
        }
        async fn release(&self, vm: &VmName, owner: &RequestId) -> devvm_core::Result<Undone> {
            self.0.release(vm, owner).await
        }
        async fn lease(&self, vm: &VmName) -> devvm_core::Result<Option<Lease>> {
            self.0.lease(vm).await
        }
    }
    let mem = reference_backends(None);
    let mut b = mem.backends();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    b.placement = Arc::new(Meet(b.placement, barrier.clone()));
    b.ip = Arc::new(Meet(b.ip, barrier));
    let mut timeouts = Timeouts::default();
    timeouts.set(Step::Placement, Duration::from_secs(10));
    timeouts.set(Step::Ip, Duration::from_secs(10));
    let f = fixture_with(mem, b, timeouts);
    f.p.provision(ProvisionRequest::new(user("alice")))
        .await
        .expect("a sequential pipeline would time out here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_provisions_get_distinct_addresses() {
    let f = fixture();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let p = f.p.clone();
        tasks.push(tokio::spawn(async move {
            p.provision(ProvisionRequest::new(user("alice")).with_name(name(&format!("c{i}"))))
                .await
        }));
    }
    let mut ips = BTreeSet::new();
    for t in tasks {
        let vm = t.await.unwrap().unwrap();
        ips.insert(vm.ip);
    }
    assert_eq!(ips.len(), 3);
}

#[tokio::test]
async fn every_subscriber_sees_every_event() {
    let f = fixture();
    let mut a = f.p.subscribe();
    let mut b = f.p.subscribe();
    let dropped = f.p.subscribe();
    drop(dropped);
    f.p.provision(ProvisionRequest::new(user("alice")))
        .await
        .unwrap();
    let ea = a.drain();
    let eb = b.drain();
    assert!(
        ea.len() >= 18,
        "run started, 8 x started/finished, run finished"
    );
    assert_eq!(ea, eb);
}

/// A subscriber that never reads while 20 runs stream holds at most its buffer; when it
/// reads at last it is told how many it missed, then gets the newest events, the last of
/// which ends a run. A run's own handle is not crowded out by the other runs' events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_holds_a_bounded_queue() {
    const BUFFER: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let mem = reference_backends(None);
    let p = Provisioner::builder()
        .state_dir(dir.path().join("state"))
        .backends(mem.backends())
        .defaults(devvm_core::Defaults {
            template: Some(devvm_core::TemplateName::new(devvm_tests::TEMPLATE).unwrap()),
            ..Default::default()
        })
        .event_buffer(BUFFER)
        .build()
        .unwrap();
    let mut never = p.subscribe();
    // One run whose handle is read only after every run ended.
    let mut late = p.start_provision(
        ProvisionRequest::new(user("alice")).with_name(name("late")),
        CancelToken::new(),
    );
    let mut handles = Vec::new();
    for i in 0..20 {
        let p = p.clone();
        handles.push(tokio::spawn(async move {
            // 3 slots in the reference hosts: most runs fail and roll back, streaming too.
            let mut run = p.start_provision(
                ProvisionRequest::new(user("bob")).with_name(name(&format!("s{i}"))),
                CancelToken::new(),
            );
            let mut seen = 0u64;
            while let Some(e) = run.next_event().await {
                assert!(
                    !matches!(e.kind, EventKind::Lagged { .. }),
                    "a reader that keeps up never lags"
                );
                seen += 1;
            }
            let _ = run.finish().await;
            seen
        }));
        assert!(never.len() <= BUFFER);
    }
    let mut streamed = 0;
    for h in handles {
        streamed += h.await.unwrap();
    }
    let mut late_events = Vec::new();
    while let Some(e) = late.next_event().await {
        late_events.push(e);
    }
    assert!(
        late_events
            .iter()
            .all(|e| !matches!(e.kind, EventKind::Lagged { .. })),
        "the late handle holds its own run's events only, and they fit"
    );
    assert!(late_events.last().unwrap().kind.is_terminal());
    let total = streamed + late_events.len() as u64;
    assert!(
        total > 2 * BUFFER as u64,
        "{total} events: enough to overflow the buffer"
    );

    assert_eq!(never.len(), BUFFER);
    let got = never.drain();
    let EventKind::Lagged { missed } = got[0].kind else {
        panic!(
            "the first read after falling behind is Lagged, got {:?}",
            got[0].kind
        );
    };
    assert_eq!(got.len(), BUFFER + 1);
    assert_eq!(
        missed + BUFFER as u64,
        total,
        "every event is either missed or kept"
    );
    assert!(
        got.iter()
            .skip(1)
            .all(|e| !matches!(e.kind, EventKind::Lagged { .. }))
    );
    assert!(
        got.last().unwrap().kind.is_terminal(),
        "the newest event is kept"
    );
    assert!(never.is_empty());
    drop(p);
    assert_eq!(
        never.recv().await,
        None,
        "closed once the provisioner is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_rolls_it_back() {
    let mem = reference_backends(None);
    // The domain step hangs; the caller cancels while it waits.
    let b = faults::inject(mem.backends(), FaultPlan::new(Step::Domain, Fault::Hang));
    let f = fixture_with(mem, b, Timeouts::default());
    let mut sub = f.p.subscribe();
    let cancel = CancelToken::new();
    let run = tokio::spawn({
        let (p, c) = (f.p.clone(), cancel.clone());
        async move {
            p.provision_with(ProvisionRequest::new(user("alice")), c)
                .await
        }
    });
    // Cancel once the domain step has started (read from the event stream, not a sleep).
    while let Some(e) = sub.recv().await {
        if e.kind == (EventKind::StepStarted { step: Step::Domain }) {
            break;
        }
    }
    cancel.cancel();
    let e = run.await.unwrap().expect_err("cancelled");
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    assert_eq!(held(&f), 0);
}

#[tokio::test]
async fn a_failing_bootstrap_rolls_the_whole_vm_back() {
    let f = fixture();
    let e =
        f.p.provision(
            ProvisionRequest::new(user("alice")).with_bootstrap(BootstrapSettings {
                run_list: vec!["recipe[base]".into(), "recipe[fail]".into()],
                ..Default::default()
            }),
        )
        .await
        .expect_err("bootstrap fails");
    assert_eq!(e.step(), Some(Step::Bootstrap));
    assert_eq!(held(&f), 0);
}

#[tokio::test]
async fn from_config_builds_a_working_provisioner() {
    let dir = tempfile::tempdir().unwrap();
    let config = devvm_tests::write_config(dir.path());
    let p = Provisioner::from_config(&config).unwrap();
    let vm = p
        .provision(
            ProvisionRequest::new(user("bob"))
                .with_request_id(RequestId::new("ticket-42").unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(vm.fqdn, format!("{}.lab.example", vm.name));
    assert!(dir.path().join("state/journal.sqlite3").exists());
    // A second provisioner on the same state sees the VM.
    let p2 = Provisioner::from_config(&config).unwrap();
    assert_eq!(p2.list().await.unwrap(), vec![vm.clone()]);
    p2.deprovision(&vm.name).await.unwrap();
    assert_eq!(
        reference_backends(Some(dir.path())).held_total().unwrap(),
        0
    );

    let missing = Provisioner::from_config(dir.path().join("nope.toml")).expect_err("no file");
    assert_eq!(missing.kind(), ErrorKind::NotFound);
}

/// What a foreign resource of the VM's name is, for [`a_foreign_resource_of_the_name_is_refused_and_left_alone`].
#[derive(Debug, Clone, Copy)]
enum Foreign {
    Slot,
    Lease,
    Record,
    Disk,
    Domain,
}

/// Another tool (or another provisioner sharing the hosts, pool, lease and DNS data) holds
/// a resource of the name a run asks for: the run fails with `AlreadyExists` (`Conflict`
/// for DNS), the foreign resource survives the rollback untouched, the rollback reports it
/// as left alone (not as an undo failure), and nothing of the run's own is left behind.
#[tokio::test]
async fn a_foreign_resource_of_the_name_is_refused_and_left_alone() {
    use devvm_core::{DnsUpdater, Hypervisor, ImageStore, Progress};
    let host = devvm_core::HostId::new("host-a").unwrap();
    for foreign in [
        Foreign::Slot,
        Foreign::Lease,
        Foreign::Record,
        Foreign::Disk,
        Foreign::Domain,
    ] {
        let f = fixture();
        let (vm, other) = (name("taken"), RequestId::random());
        let size = VmSize::default();
        let p = Progress::discard();
        let (expect, step) = match foreign {
            Foreign::Slot => {
                let h = f.mem.placement.reserve(&vm, &size, &other).await;
                h.unwrap();
                (ErrorKind::AlreadyExists, Step::Placement)
            }
            Foreign::Lease => {
                let l = f.mem.ip.allocate(&vm, &other).await;
                l.unwrap();
                (ErrorKind::AlreadyExists, Step::Ip)
            }
            Foreign::Record => {
                let fqdn = f.mem.dns.fqdn(&vm);
                f.mem
                    .dns
                    .insert_foreign(&fqdn, [192, 0, 2, 7].into())
                    .unwrap();
                (ErrorKind::Conflict, Step::Dns)
            }
            Foreign::Disk | Foreign::Domain => {
                let template = devvm_core::TemplateName::new(devvm_tests::TEMPLATE).unwrap();
                let t = f.mem.images.prepare(&template, &host, &p).await;
                let t = t.unwrap();
                let disk = f
                    .mem
                    .images
                    .create_disk(&vm, &host, &t, size.disk_gib, &other, &p)
                    .await
                    .unwrap();
                if matches!(foreign, Foreign::Disk) {
                    (ErrorKind::AlreadyExists, Step::Disk)
                } else {
                    // Only a domain of that name is foreign here: the disk made to build
                    // its spec goes again.
                    f.mem.images.delete_disk(&vm, &host, &other).await.unwrap();
                    let spec = devvm_core::DomainSpec {
                        name: vm.clone(),
                        host: host.clone(),
                        size,
                        disk,
                        template: t,
                        lease: devvm_core::Lease {
                            vm: vm.clone(),
                            ip: [192, 0, 2, 8].into(),
                            prefix_len: 24,
                            gateway: None,
                        },
                        fqdn: "elsewhere.example".into(),
                        owner: user("bob"),
                        request_id: other.clone(),
                        ssh_keys: Vec::new(),
                        seed: None,
                    };
                    let d = f.mem.hypervisor.create(&spec, &p).await;
                    d.unwrap();
                    (ErrorKind::AlreadyExists, Step::Domain)
                }
            }
        };
        let before = f.mem.held().unwrap();
        let mut sub = f.p.subscribe();
        let e =
            f.p.provision(ProvisionRequest::new(user("alice")).with_name(vm.clone()))
                .await
                .expect_err("the name is taken");
        let ctx = format!("{foreign:?}: {e}");
        assert_eq!(e.kind(), expect, "{ctx}");
        assert_eq!(e.step(), Some(step), "{ctx}");
        assert!(
            e.undo_failures().is_empty(),
            "{ctx}: {:?}",
            e.undo_failures()
        );
        assert_eq!(
            f.mem.held().unwrap(),
            before,
            "{ctx}: exactly the foreign resource is held, nothing of the run's"
        );
        let left_alone: Vec<Step> = sub
            .drain()
            .into_iter()
            .filter_map(|ev| match ev.kind {
                EventKind::LeftAlone { step, .. } => Some(step),
                _ => None,
            })
            .collect();
        assert!(
            left_alone.contains(&step),
            "{ctx}: the rollback reports the foreign resource left alone: {left_alone:?}"
        );
        // Still the foreign owner's: it can remove it, the run could not.
        match foreign {
            Foreign::Slot => assert_eq!(
                f.mem.placement.release(&vm, &other).await.ok(),
                Some(Undone::Removed)
            ),
            Foreign::Lease => assert_eq!(
                f.mem.ip.release(&vm, &other).await.ok(),
                Some(Undone::Removed)
            ),
            Foreign::Record => assert_eq!(
                f.mem.dns.resolve(&vm).await.ok(),
                Some(vec![[192, 0, 2, 7].into()])
            ),
            Foreign::Disk => assert_eq!(
                f.mem.images.delete_disk(&vm, &host, &other).await.ok(),
                Some(Undone::Removed)
            ),
            Foreign::Domain => assert_eq!(
                f.mem.hypervisor.destroy(&vm, &host, &other).await.ok(),
                Some(Undone::Removed)
            ),
        }
    }
}

/// A hypervisor whose define runs on a blocking thread and goes ahead only when the test
/// releases it: the test releases it after the step was given up, so the define lands
/// after the rollback has begun, as a slow libvirt call would.
struct LateDefine {
    inner: Arc<devvm_core::memory::MemoryHypervisor>,
    started: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    defined: Arc<std::sync::atomic::AtomicBool>,
}

impl LateDefine {
    fn release(&self) {
        let (open, cv) = &*self.gate;
        *open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        cv.notify_all();
    }
}

#[async_trait]
impl devvm_core::Hypervisor for LateDefine {
    fn backend(&self) -> &str {
        "late-define"
    }
    async fn create(
        &self,
        spec: &devvm_core::DomainSpec,
        _progress: &devvm_core::Progress,
    ) -> devvm_core::Result<devvm_core::Domain> {
        let started = self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let (inner, spec, gate, defined) = (
            self.inner.clone(),
            spec.clone(),
            self.gate.clone(),
            self.defined.clone(),
        );
        let rt = tokio::runtime::Handle::current();
        devvm_core::work::blocking(move || {
            if let Some(s) = started {
                let _ = s.send(());
            }
            let (open, cv) = &*gate;
            let mut g = open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while !*g {
                g = cv
                    .wait(g)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            drop(g);
            // Commits regardless of the step being abandoned (it does not ask
            // `work::abandoned()`): the rollback must wait for it and undo it.
            let d = rt.block_on(inner.create(&spec, &devvm_core::Progress::discard()));
            defined.store(true, std::sync::atomic::Ordering::SeqCst);
            d
        })
        .await
    }
    async fn destroy(
        &self,
        vm: &VmName,
        host: &devvm_core::HostId,
        owner: &RequestId,
    ) -> devvm_core::Result<Undone> {
        self.inner.destroy(vm, host, owner).await
    }
    async fn domain(
        &self,
        vm: &VmName,
        host: &devvm_core::HostId,
    ) -> devvm_core::Result<Option<devvm_core::Domain>> {
        self.inner.domain(vm, host).await
    }
}

/// A step cancelled, or timed out, while its blocking work is under way cannot orphan what
/// that work makes: the rollback waits for it to end, then undoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_work_that_ends_after_cancel_or_timeout_is_undone_too() {
    for timeout in [false, true] {
        let mem = reference_backends(None);
        let (tx, started) = tokio::sync::oneshot::channel();
        let late = Arc::new(LateDefine {
            inner: mem.hypervisor.clone(),
            started: std::sync::Mutex::new(Some(tx)),
            gate: Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new())),
            defined: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        });
        let mut b = mem.backends();
        b.hypervisor = late.clone();
        let mut timeouts = Timeouts::default();
        if timeout {
            // The define is held back until the step has failed, so this limit is always
            // reached; it only has to leave time for `create` to start (if it does not,
            // the run times out before any blocking work, which is checked below too).
            timeouts.set(Step::Domain, std::time::Duration::from_secs(5));
        }
        let f = fixture_with(mem, b, timeouts);
        let mut sub = f.p.subscribe();
        let cancel = CancelToken::new();
        let run = tokio::spawn({
            let (p, c) = (f.p.clone(), cancel.clone());
            async move {
                p.provision_with(ProvisionRequest::new(user("alice")), c)
                    .await
            }
        });
        let mut run = run;
        tokio::select! {
            s = started => s.unwrap(),
            r = &mut run => {
                // Timed out before `create` even began: nothing ran late, nothing is held.
                let e = r.unwrap().expect_err("timed out");
                assert!(timeout && e.kind() == ErrorKind::Timeout, "{e}");
                assert_eq!(held(&f), 0);
                continue;
            }
        }
        if !timeout {
            cancel.cancel();
        }
        // The define may go on once the rollback has reached the domain step: either it
        // says it waits for the step's blocking work (right), or it has already undone
        // the step (wrong: the late define would then be orphaned). Read from the event
        // stream, so the order is the pipeline's, not the clock's.
        while let Some(e) = sub.recv().await {
            match e.kind {
                EventKind::StepProgress {
                    step: Step::Domain,
                    ref message,
                    ..
                } if message == devvm_core::WAITING_FOR_BLOCKING_WORK => break,
                EventKind::StepUndone { step: Step::Domain } => break,
                _ => {}
            }
        }
        late.release();
        let e = run.await.unwrap().expect_err("given up");
        let ctx = format!("timeout={timeout}: {e}");
        let want = if timeout {
            ErrorKind::Timeout
        } else {
            ErrorKind::Cancelled
        };
        assert_eq!(e.kind(), want, "{ctx}");
        assert!(
            late.defined.load(std::sync::atomic::Ordering::SeqCst),
            "{ctx}: the late define happened before the run returned"
        );
        assert!(
            e.undo_failures().is_empty(),
            "{ctx}: {:?}",
            e.undo_failures()
        );
        assert_eq!(held(&f), 0, "{ctx}: {:?}", f.mem.held());
    }
}

/// A request that sets only some size fields gets the rest from the config's
/// `[defaults]`, not from built-in values.
#[tokio::test]
async fn a_partial_size_takes_the_rest_from_the_defaults() {
    let mem = reference_backends(None);
    let b = mem.backends();
    let dir = tempfile::tempdir().unwrap();
    let defaults = VmSize {
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 7,
    };
    let p = Provisioner::builder()
        .state_dir(dir.path().join("state"))
        .backends(b)
        .defaults(devvm_core::Defaults {
            template: Some(devvm_core::TemplateName::new(devvm_tests::TEMPLATE).unwrap()),
            size: defaults,
            bootstrap: BootstrapSettings::default(),
        })
        .build()
        .unwrap();
    let resolved = |r: ProvisionRequest| p.resolve(&r).unwrap().size;
    let req = || ProvisionRequest::new(user("alice"));
    assert_eq!(resolved(req()), defaults);
    assert_eq!(
        resolved(req().with_vcpus(2)),
        VmSize {
            vcpus: 2,
            ..defaults
        }
    );
    assert_eq!(
        resolved(req().with_memory_mib(1024).with_disk_gib(9)),
        VmSize {
            memory_mib: 1024,
            disk_gib: 9,
            ..defaults
        }
    );
    // And the pipeline makes what was resolved: the disk has the configured size.
    let mut sub = p.subscribe();
    let vm = p.provision(req().with_vcpus(2)).await.unwrap();
    let disk = sub
        .drain()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::StepFinished {
                step: Step::Disk,
                result,
                ..
            } => Some(result),
            _ => None,
        })
        .expect("no disk step");
    assert_eq!(disk["size_gib"], 7, "{disk}");
    p.deprovision(&vm.name).await.unwrap();
}

/// A run started in the background yields its own events, in order, ending with its
/// terminal event, and none of a run going on beside it; then its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_handle_streams_only_its_own_run() {
    let f = fixture();
    let a = ProvisionRequest::new(user("alice")).with_name(name("run-a"));
    let b = ProvisionRequest::new(user("bob")).with_name(name("run-b"));
    let (ida, idb) = (a.request_id.clone(), b.request_id.clone());
    let mut ra = f.p.start_provision(a, CancelToken::new());
    let mut rb = f.p.start_provision(b, CancelToken::new());
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    while let Some(e) = ra.next_event().await {
        ea.push(e);
    }
    while let Some(e) = rb.next_event().await {
        eb.push(e);
    }
    for (events, id) in [(&ea, &ida), (&eb, &idb)] {
        assert!(
            events.iter().all(|e| e.request_id == *id),
            "only its own run"
        );
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (0..events.len() as u64).collect::<Vec<_>>(),
            "all, in order"
        );
        assert!(
            matches!(
                events.last().map(|e| &e.kind),
                Some(EventKind::RunFinished { .. })
            ),
            "ends with its terminal event"
        );
    }
    let vm = ra.finish().await.unwrap();
    assert_eq!(vm.name.as_str(), "run-a");
    rb.finish().await.unwrap();
    let mut rd = f.p.start_deprovision(name("run-a"));
    let mut kinds = Vec::new();
    while let Some(e) = rd.next_event().await {
        assert_eq!(e.vm.as_str(), "run-a");
        kinds.push(e.kind);
    }
    assert!(matches!(kinds.last(), Some(EventKind::RunFinished { .. })));
    rd.finish().await.unwrap();
    let e =
        f.p.start_deprovision(name("no-such-vm"))
            .finish()
            .await
            .expect_err("unknown");
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// A transient failure (a service briefly down) is retried with backoff, each retry a
/// progress event, and the run succeeds; a service that stays down fails the run once the
/// attempts are used up.
#[tokio::test]
async fn transient_failures_are_retried_with_backoff() {
    let retries = {
        let mut r = Retries::default();
        r.initial = Duration::from_millis(1);
        r.max = Duration::from_millis(5);
        r
    };
    for step in [Step::User, Step::Ip, Step::Dns, Step::Disk, Step::Domain] {
        for persistent in [false, true] {
            let mem = reference_backends(None);
            let mut plan = FaultPlan::new(step, Fault::Error(ErrorKind::Unavailable));
            if persistent {
                plan = plan.persistent();
            }
            let b = faults::inject(mem.backends(), plan);
            let f = fixture_retrying(mem, b, Timeouts::default(), retries.clone());
            let mut sub = f.p.subscribe();
            let r = f.p.provision(ProvisionRequest::new(user("alice"))).await;
            let retried = sub
                .drain()
                .into_iter()
                .filter(|e| {
                    matches!(&e.kind, EventKind::StepProgress { step: s, message, .. }
                        if *s == step && message.starts_with("retrying"))
                })
                .count();
            let ctx = format!("{step}, persistent={persistent}");
            if persistent {
                let e = r.expect_err("stays down");
                assert_eq!(e.kind(), ErrorKind::Unavailable, "{ctx}");
                assert_eq!(retried, 2, "{ctx}: 3 attempts, 2 retries");
                assert_eq!(held(&f), 0, "{ctx}");
            } else {
                r.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert_eq!(retried, 1, "{ctx}: one retry");
            }
        }
    }
}

/// An undo that fails once with a transient error is retried, so the rollback is
/// complete and nothing is left for recover().
#[tokio::test]
async fn a_transient_undo_failure_is_retried() {
    let mem = reference_backends(None);
    let b = faults::inject(
        mem.backends(),
        FaultPlan::new(Step::Domain, Fault::Error(ErrorKind::Backend)),
    );
    let b = faults::inject(
        b,
        FaultPlan::new(Step::Ip, Fault::Error(ErrorKind::Unavailable)).on_undo(),
    );
    let mut retries = Retries::default();
    retries.initial = Duration::from_millis(1);
    retries.max = Duration::from_millis(5);
    let f = fixture_retrying(mem, b, Timeouts::default(), retries);
    let mut sub = f.p.subscribe();
    let e =
        f.p.provision(ProvisionRequest::new(user("alice")))
            .await
            .expect_err("domain fails");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(
        e.undo_failures().is_empty(),
        "the retried undo succeeded: {e}"
    );
    assert_eq!(held(&f), 0);
    assert!(
        sub.drain().iter().any(|ev| matches!(&ev.kind,
            EventKind::StepProgress { step: Step::Ip, message, .. } if message.starts_with("retrying"))),
        "the retry is reported"
    );
}
