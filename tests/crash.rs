//! Crash recovery: a provisioner process killed with SIGKILL at every step boundary, then
//! `recover()` in a new process, leaves zero resources held.
//!
//! The child (`devvm-crash-child`) uses the reference backends with their state in files,
//! so the resources it "created" outlive it, as real ones would.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use devvm_core::{Provisioner, Step, VmName};
use devvm_tests::{reference_backends, write_config};

fn run_child(config: &Path, mode: &str, step: Step, when: &str) {
    let status = Command::new(env!("CARGO_BIN_EXE_devvm-crash-child"))
        .args([
            config.as_os_str(),
            mode.as_ref(),
            step.as_str().as_ref(),
            when.as_ref(),
        ])
        .status()
        .expect("spawn child");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{mode} {when} {step}: the child must die by SIGKILL, got {status}"
    );
}

fn held(dir: &Path) -> usize {
    reference_backends(Some(dir))
        .held_total()
        .expect("count the held resources")
}

async fn recover_and_check(dir: &Path, config: &Path, ctx: &str, foreign: usize) {
    let p = Provisioner::from_config(config).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let report = p
        .recover()
        .await
        .unwrap_or_else(|e| panic!("{ctx}: recover: {e}"));
    assert!(report.still_held.is_empty(), "{ctx}: {report:?}");
    let vms = p.list().await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
    if vms.is_empty() {
        assert_eq!(
            held(dir),
            foreign,
            "{ctx}: rolled back, so nothing but the neighbour's may be held ({report:?})"
        );
    } else {
        // Every step had finished: the run was completed, and the VM holds exactly one
        // of everything (two DNS records). Deprovisioning it releases all of it.
        assert_eq!(report.completed.len(), 1, "{ctx}: {report:?}");
        assert_eq!(held(dir), 7 + foreign, "{ctx}: one complete vm");
        p.deprovision(&vms[0].name)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(
            held(dir),
            foreign,
            "{ctx}: the neighbour's resources survive"
        );
    }
    // The name and the request can be used again.
    let again = p.recover().await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
    assert_eq!(
        again,
        devvm_core::RecoveryReport::default(),
        "{ctx}: recover is idempotent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_step_boundary_then_recovered_leaks_nothing() {
    for step in Step::ALL {
        for when in ["before", "after"] {
            let dir = tempfile::tempdir().unwrap();
            let config = write_config(dir.path());
            let foreign = devvm_tests::plant_neighbour(&reference_backends(Some(dir.path()))).await;
            run_child(&config, "provision", step, when);
            let ctx = format!("provision killed {when} {step}");
            recover_and_check(dir.path(), &config, &ctx, foreign).await;
        }
    }
}

/// A provisioner killed before or after each act of a live migration: `recover()` in
/// another process leaves the VM running on exactly one host, with its disk and slot
/// there and nothing on the other host; it can then be removed without a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_a_migration_then_recovered_leaves_the_vm_on_one_host() {
    use devvm_core::{HostId, Hypervisor, ImageStore, Placement};
    for step in [Step::Placement, Step::Image, Step::Disk, Step::Domain] {
        for when in ["before", "after"] {
            let dir = tempfile::tempdir().unwrap();
            let config = write_config(dir.path());
            let foreign = devvm_tests::plant_neighbour(&reference_backends(Some(dir.path()))).await;
            run_child(&config, "migrate", step, when);
            let ctx = format!("migration killed {when} {step}");
            let p = Provisioner::from_config(&config).unwrap();
            let report = p.recover().await.unwrap();
            assert!(report.still_held.is_empty(), "{ctx}: {report:?}");
            let vms = p.list().await.unwrap();
            assert_eq!(vms.len(), 1, "{ctx}: the vm is still there: {report:?}");
            let vm = &vms[0];
            let mem = reference_backends(Some(dir.path()));
            for h in ["host-a", "host-b"] {
                let h = HostId::new(h).unwrap();
                let here = h == vm.host;
                assert_eq!(
                    mem.hypervisor.domain(&vm.name, &h).await.unwrap().is_some(),
                    here,
                    "{ctx}: domain on {h}"
                );
                assert_eq!(
                    mem.images.disk(&vm.name, &h).await.unwrap().is_some(),
                    here,
                    "{ctx}: disk on {h}"
                );
            }
            assert_eq!(
                mem.placement.reservation(&vm.name).await.unwrap(),
                Some(vm.host.clone()),
                "{ctx}: the slot is where the vm runs"
            );
            assert_eq!(held(dir.path()), 7 + foreign, "{ctx}: one complete vm");
            p.deprovision(&vm.name).await.unwrap();
            assert_eq!(
                held(dir.path()),
                foreign,
                "{ctx}: nothing left but the neighbour's"
            );
            assert_eq!(
                p.recover().await.unwrap(),
                devvm_core::RecoveryReport::default(),
                "{ctx}: recover is idempotent"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_deprovision_then_recovered_leaks_nothing() {
    // Steps that undo something real (user and image hold nothing to undo).
    for step in [
        Step::Placement,
        Step::Ip,
        Step::Dns,
        Step::Disk,
        Step::Domain,
        Step::Bootstrap,
    ] {
        for when in ["before", "after"] {
            let dir = tempfile::tempdir().unwrap();
            let config = write_config(dir.path());
            run_child(&config, "deprovision", step, when);
            let ctx = format!("deprovision killed {when} undoing {step}");
            let p = Provisioner::from_config(&config).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let report = p.recover().await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(
                report.removed,
                vec![VmName::new("crashy").unwrap()],
                "{ctx}: {report:?}"
            );
            assert_eq!(held(dir.path()), 0, "{ctx}");
            assert!(p.list().await.unwrap().is_empty(), "{ctx}");
        }
    }
}

/// A provision retried with the same request id after a crash cleans up the crashed
/// attempt first and then succeeds, without `recover()` being called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_crashed_request_cleans_up_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    run_child(&config, "provision", Step::Domain, "after");
    assert!(held(dir.path()) > 0, "the crash left resources behind");
    let p = Provisioner::from_config(&config).unwrap();
    let req = devvm_core::ProvisionRequest::new(devvm_tests::user("alice"))
        .with_name(VmName::new("crashy").unwrap())
        .with_request_id(devvm_core::RequestId::new("crash-run").unwrap());
    let vm = p.provision(req).await.unwrap();
    assert_eq!(held(dir.path()), 7, "exactly one vm's resources");
    p.deprovision(&vm.name).await.unwrap();
    assert_eq!(held(dir.path()), 0);
}

/// A live provisioner's run is never recovered from under it by another process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_leaves_live_runs_alone() {
    use devvm_core::testkit::faults::{Fault, FaultPlan};
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let cfg = devvm_core::config::Config::load(&config).unwrap();
    let live = devvm_tests::with_fault(&cfg, FaultPlan::new(Step::Domain, Fault::Hang))
        .build()
        .unwrap();
    let mut sub = live.subscribe();
    let run = tokio::spawn({
        let live = live.clone();
        async move {
            live.provision(devvm_core::ProvisionRequest::new(devvm_tests::user(
                "alice",
            )))
            .await
        }
    });
    while let Some(e) = sub.recv().await {
        if e.kind == (devvm_core::EventKind::StepStarted { step: Step::Domain }) {
            break;
        }
    }
    let other = Provisioner::from_config(&config).unwrap();
    let report = other.recover().await.unwrap();
    assert_eq!(
        report,
        devvm_core::RecoveryReport::default(),
        "the live run is not touched"
    );
    assert!(held(dir.path()) > 0);
    run.abort();
}
