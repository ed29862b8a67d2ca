//! End to end against the lab: a real VM for an LDAP user, booted from an overlay on the
//! Glance-synced template, its name in BIND, answering on SSH; then deprovisioned with
//! nothing left. And a fault at every step of this real pipeline leaves nothing behind.
//!
//! Every check asks the service itself (dig, virsh, the pool directory, the lease
//! database), never the library.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use devvm_core::config::Config;
use devvm_core::testkit::faults::{Fault, FaultPlan};
use devvm_core::testkit::unique_vm_name;
use devvm_core::{ErrorKind, EventKind, Placement, ProvisionRequest, Provisioner, Step};
use devvm_examples::lab::{LabEnv, ssh_answers};
use devvm_tests::{Lab, finished, run_addresses, with_fault};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_vm_is_provisioned_and_removed_without_trace() {
    let Some(lab) = Lab::get("a_real_vm_is_provisioned_and_removed_without_trace") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let p = Provisioner::from_config(lab.write_config(dir.path())).unwrap();
    let mut events = p.subscribe();
    let name = unique_vm_name("e2e");
    let vm = p
        .provision(ProvisionRequest::new(lab.member()).with_name(name.clone()))
        .await
        .expect("provision");

    assert_eq!(vm.fqdn, format!("{name}.{}", lab.var("dns_zone")));
    assert!(
        env.host_uris.iter().any(|h| h == vm.host.as_str()),
        "{} is a lab host",
        vm.host
    );
    assert_eq!(env.domain_hosts(name.as_str()), vec![vm.host.to_string()]);
    assert!(
        matches!(vm.ip, IpAddr::V4(v4) if v4.octets()[..3] == [10, 99, 0] && (100..200).contains(&v4.octets()[3])),
        "{vm:?}"
    );
    // DNS: asked of BIND with dig.
    assert_eq!(env.dns_a(&vm.fqdn), vec![vm.ip.to_string()]);
    assert_eq!(env.dns_ptr(vm.ip), vec![vm.fqdn.clone()]);
    // The guest answers on SSH, and its disk is an overlay on the synced template.
    assert!(
        ssh_answers(vm.ip, Duration::from_secs(60)),
        "ssh on {}",
        vm.ip
    );
    assert!(env.domain_exists(name.as_str()));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(env.local_path(vm.host.as_str(), &vm.disk))
        .output()
        .expect("qemu-img");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert!(
        info["backing-filename"]
            .as_str()
            .is_some_and(|b| b.contains(lab.var("template"))),
        "overlay on the template: {info}"
    );
    assert_eq!(
        env.lease(name.as_str()),
        Some(vm.ip),
        "the lease database holds it"
    );

    // Placement reads usage from libvirt itself: a host with room for exactly one VM of
    // this size, already running ours, has no room for another.
    let one_slot = devvm_core::backends::placement::LibvirtPlacement::open(
        vec![(
            vm.host.clone(),
            devvm_core::backends::placement::Capacity {
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 1,
            },
        )],
        Arc::new(devvm_core::backends::placement::LibvirtLister),
        dir.path().join("placement-check.sqlite3"),
    )
    .unwrap();
    let e = one_slot
        .reserve(
            &unique_vm_name("extra"),
            &devvm_core::VmSize {
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 1,
            },
            &devvm_core::RequestId::random(),
        )
        .await
        .expect_err("the running vm fills the host");
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");

    let mut steps_done = Vec::new();
    while let Some(e) = events.try_recv() {
        if let EventKind::StepFinished { step, .. } = e.kind {
            steps_done.push(step);
        }
    }
    assert_eq!(steps_done.len(), Step::ALL.len(), "{steps_done:?}");

    p.deprovision(&vm.name).await.expect("deprovision");
    let left = env.leftovers(name.as_str(), &vm.fqdn, Some(vm.ip));
    assert!(left.is_empty(), "leaked: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_any_real_step_leaves_nothing_behind() {
    let Some(lab) = Lab::get("a_fault_at_any_real_step_leaves_nothing_behind") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let config = Config::load(&lab.write_config(dir.path())).unwrap();
    for step in Step::ALL {
        let p = with_fault(
            &config,
            FaultPlan::new(step, Fault::Error(ErrorKind::Unavailable)).persistent(),
        )
        .state_dir(dir.path().join(format!("state-{step}")))
        .build()
        .unwrap();
        let mut events = p.subscribe();
        let name = unique_vm_name("fault");
        let e = p
            .provision(ProvisionRequest::new(lab.member()).with_name(name.clone()))
            .await
            .expect_err("the injected fault fails the run");
        assert_eq!(e.step(), Some(step), "{e}");
        assert!(e.undo_failures().is_empty(), "{e}");
        // The address the run had leased, if it got that far.
        let (ip, _) = run_addresses(&events.drain());
        let fqdn = format!("{name}.{}", lab.var("dns_zone"));
        let left = env.leftovers(name.as_str(), &fqdn, ip);
        assert!(left.is_empty(), "fault at {step} leaked: {left:?}");
    }
}

/// A bootstrap that fails after the guest is up destroys the running guest too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_boot_destroys_the_running_guest() {
    let Some(lab) = Lab::get("a_failure_after_boot_destroys_the_running_guest") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let config = Config::load(&lab.write_config(dir.path())).unwrap();
    let p = with_fault(&config, FaultPlan::new(Step::Bootstrap, Fault::Panic))
        .build()
        .unwrap();
    let mut events = p.subscribe();
    let name = unique_vm_name("late");
    let e = p
        .provision(ProvisionRequest::new(lab.member()).with_name(name.clone()))
        .await
        .expect_err("bootstrap panics");
    assert_eq!(e.step(), Some(Step::Bootstrap));
    let all = events.drain();
    let (ip, _) = run_addresses(&all);
    let booted = finished(&all, Step::Domain);
    assert!(booted, "the guest had booted before the failure");
    let fqdn = format!("{name}.{}", lab.var("dns_zone"));
    let left = env.leftovers(name.as_str(), &fqdn, ip);
    assert!(left.is_empty(), "leaked: {left:?}");
}

/// A libvirt domain of the VM's name that devvm did not make (defined by hand, no devvm
/// metadata): the real pipeline refuses the name with `AlreadyExists`, the rollback leaves
/// that domain defined (asked of virsh) and reports it left alone, and nothing of the run
/// is left in the pool, BIND or the lease database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_made_domain_of_the_name_is_refused_and_left_alone() {
    let Some(lab) = Lab::get("a_hand_made_domain_of_the_name_is_refused_and_left_alone") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let name = unique_vm_name("foreign");
    let xml = dir.path().join("foreign.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
             <os><type arch='x86_64'>hvm</type></os></domain>"
        ),
    )
    .unwrap();
    let virsh = |uri: &str, args: &[&str]| {
        std::process::Command::new("virsh")
            .args(["-q", "-c", uri])
            .args(args)
            .output()
            .expect("virsh")
    };
    // On every host of the lab, so that wherever placement puts the VM the name is taken.
    for uri in &env.host_uris {
        let defined = virsh(uri, &["define", xml.to_str().unwrap_or_default()]);
        assert!(
            defined.status.success(),
            "{}",
            String::from_utf8_lossy(&defined.stderr)
        );
    }
    let uuids = || -> Vec<String> {
        env.host_uris
            .iter()
            .map(|uri| {
                String::from_utf8_lossy(&virsh(uri, &["domuuid", name.as_str()]).stdout)
                    .into_owned()
            })
            .collect()
    };
    let before = uuids();

    let p = Provisioner::from_config(lab.write_config(dir.path())).unwrap();
    let mut events = p.subscribe();
    let e = p
        .provision(ProvisionRequest::new(lab.member()).with_name(name.clone()))
        .await
        .expect_err("the name is taken by a hand-made domain");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(e.step(), Some(Step::Domain), "{e}");
    assert!(e.undo_failures().is_empty(), "{:?}", e.undo_failures());
    assert_eq!(
        env.domain_hosts(name.as_str()),
        env.host_uris,
        "the foreign domain is still defined on every host"
    );
    assert_eq!(uuids(), before, "and it is the same domain");
    assert!(
        events.drain().iter().any(|ev| matches!(
            &ev.kind,
            EventKind::LeftAlone {
                step: Step::Domain,
                ..
            }
        )),
        "the rollback reports the domain left alone"
    );
    let fqdn = format!("{name}.{}", lab.var("dns_zone"));
    let left: Vec<String> = env
        .leftovers(name.as_str(), &fqdn, None)
        .into_iter()
        .filter(|l| *l != format!("libvirt domain {name}"))
        .collect();
    assert!(left.is_empty(), "the run leaked: {left:?}");
    for uri in &env.host_uris {
        let gone = virsh(uri, &["undefine", name.as_str()]);
        assert!(
            gone.status.success(),
            "{}",
            String::from_utf8_lossy(&gone.stderr)
        );
    }
}

/// An IP lease or a DNS name of the VM's name that someone else holds (another owner's
/// lease in the shared lease database; an A record another tool published in BIND): the
/// real pipeline refuses the name (`AlreadyExists` / `Conflict`), the foreign lease and
/// record are untouched (asked of the lease database and of dig), and nothing of the run
/// is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_lease_or_dns_name_is_refused_and_left_alone() {
    let Some(lab) = Lab::get("a_foreign_lease_or_dns_name_is_refused_and_left_alone") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let p = Provisioner::from_config(lab.write_config(dir.path())).unwrap();
    let other = devvm_core::RequestId::random();
    for dns in [false, true] {
        let name = unique_vm_name(if dns { "fdns" } else { "flease" });
        let fqdn = format!("{name}.{}", lab.var("dns_zone"));
        let foreign_ip: IpAddr = [10, 99, 0, 250].into();
        if dns {
            p.backends().dns.publish(&name, foreign_ip).await.unwrap();
        } else {
            p.backends().ip.allocate(&name, &other).await.unwrap();
        }
        let lease_before = env.lease(name.as_str());
        let e = p
            .provision(ProvisionRequest::new(lab.member()).with_name(name.clone()))
            .await
            .expect_err("the name is taken");
        let ctx = format!("dns={dns}: {e}");
        let (kind, step) = if dns {
            (ErrorKind::Conflict, Step::Dns)
        } else {
            (ErrorKind::AlreadyExists, Step::Ip)
        };
        assert_eq!((e.kind(), e.step()), (kind, Some(step)), "{ctx}");
        assert!(e.undo_failures().is_empty(), "{ctx}");
        if dns {
            assert_eq!(env.dns_a(&fqdn), vec![foreign_ip.to_string()], "{ctx}: dig");
            assert_eq!(
                env.lease(name.as_str()),
                None,
                "{ctx}: the run's lease released"
            );
            let left = env.leftovers(name.as_str(), &fqdn, None);
            assert_eq!(
                left,
                vec![format!("dns A {fqdn} -> {foreign_ip}")],
                "{ctx}: only the foreign record"
            );
            p.backends().dns.remove(&name, foreign_ip).await.unwrap();
        } else {
            assert!(lease_before.is_some(), "{ctx}");
            assert_eq!(
                env.lease(name.as_str()),
                lease_before,
                "{ctx}: lease database"
            );
            assert!(env.dns_a(&fqdn).is_empty(), "{ctx}: no record published");
            let left = env.leftovers(name.as_str(), &fqdn, None);
            assert_eq!(left.len(), 1, "{ctx}: only the foreign lease: {left:?}");
            assert_eq!(
                p.backends().ip.release(&name, &other).await.unwrap(),
                devvm_core::Undone::Removed
            );
        }
        assert!(
            env.leftovers(name.as_str(), &fqdn, None).is_empty(),
            "{ctx}"
        );
    }
}
