//! The libvirt hypervisor against the lab's real libvirtd/QEMU (TCG): a guest boots from
//! a qcow2 overlay on the lab's template, answers on SSH, and is removed without trace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use devvm_core::backends::libvirt::{Accel, LibvirtConfig, LibvirtHypervisor};
use devvm_core::testkit::conformance::hypervisor;
use devvm_core::testkit::unique_vm_name;
use devvm_core::{
    BootSpec, Disk, DiskFormat, DomainSpec, HostId, Hypervisor, Lease, Progress, RequestId,
    Template, TemplateName, UserName, VmName, VmSize,
};
use devvm_tests::Lab;

struct Guest {
    spec: DomainSpec,
    hv: LibvirtHypervisor,
    _dir: tempfile::TempDir,
}

fn overlay(template: &Path, disk: &Path) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(template)
        .arg(disk)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A spec for a real guest at `10.99.0.<host>`, its overlay in a temp dir in the pool.
fn guest(lab: &Lab, host: u8) -> Guest {
    let tdir = PathBuf::from(lab.var("template_dir"));
    let dir = tempfile::tempdir_in(lab.var("pool_dir")).expect("temp dir in DEVVM_LAB_POOL_DIR");
    let vm = unique_vm_name("hv");
    let disk = dir.path().join(format!("{vm}.qcow2"));
    overlay(&tdir.join(format!("{}.qcow2", lab.var("template"))), &disk);
    let pubkey = std::fs::read_to_string(lab.var("ssh_pubkey")).expect("read DEVVM_LAB_SSH_PUBKEY");
    let cmdline =
        std::fs::read_to_string(tdir.join("cmdline")).expect("read the template's cmdline");
    let spec = DomainSpec {
        name: vm.clone(),
        host: HostId::new(lab.var("libvirt_uri")).expect("DEVVM_LAB_LIBVIRT_URI is a host id"),
        size: VmSize {
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
        },
        disk: Disk {
            vm: vm.clone(),
            path: disk,
            format: DiskFormat::Qcow2,
            size_gib: 1,
        },
        template: Template {
            name: TemplateName::new(lab.var("template"))
                .expect("DEVVM_LAB_TEMPLATE is a template name"),
            path: tdir.join(format!("{}.qcow2", lab.var("template"))),
            digest: None,
            boot: BootSpec {
                kernel: Some(tdir.join("vmlinuz")),
                initrd: Some(tdir.join("initrd.img")),
                cmdline: Some(cmdline.trim().to_owned()),
            },
        },
        lease: Lease {
            vm: vm.clone(),
            ip: [10, 99, 0, host].into(),
            prefix_len: 24,
            gateway: Some(
                lab.var("gateway")
                    .parse()
                    .expect("DEVVM_LAB_GATEWAY is an IP address"),
            ),
        },
        fqdn: format!("{vm}.{}", lab.var("dns_zone")),
        owner: UserName::new("alice").expect("a valid user name"),
        request_id: RequestId::random(),
        ssh_keys: vec![pubkey.trim().to_owned()],
        seed: None,
    };
    let hv = LibvirtHypervisor::from_config(
        &LibvirtConfig {
            accel: Accel::Tcg,
            bridge: lab.var("bridge").to_owned(),
            console_dir: dir.path().to_owned(),
            dns_servers: vec![],
            boot_timeout_secs: 120,
            ssh_port: 22,
            authorized_key_files: vec![],
            seed_dir: None,
            seed_pool: None,
        },
        Path::new("/"),
    )
    .expect("libvirt hypervisor from the config");
    Guest {
        spec,
        hv,
        _dir: dir,
    }
}

fn virsh(lab: &Lab, args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .args(["-c", lab.var("libvirt_uri")])
        .args(args)
        .output()
        .expect("virsh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_hypervisor_conforms() {
    let Some(lab) = Lab::get("libvirt_hypervisor_conforms") else {
        return;
    };
    let g = guest(&lab, 231);
    hypervisor(Arc::new(g.hv.clone()), g.spec.clone()).await;
    let (exists, _) = virsh(&lab, &["dominfo", g.spec.name.as_str()]);
    assert!(
        !exists,
        "the suite's destroy removed the domain from libvirt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_boots_answers_ssh_and_leaves_nothing() {
    let Some(lab) = Lab::get("a_guest_boots_answers_ssh_and_leaves_nothing") else {
        return;
    };
    let g = guest(&lab, 232);
    let vm: &VmName = &g.spec.name;
    g.hv.create(&g.spec, &Progress::discard()).await.unwrap();

    // libvirt has it, running, with our metadata.
    let (ok, state) = virsh(&lab, &["domstate", vm.as_str()]);
    assert!(ok && state.trim() == "running", "{state}");
    let (_, xml) = virsh(&lab, &["dumpxml", vm.as_str()]);
    assert!(
        xml.contains(g.spec.request_id.as_str()),
        "request id in metadata"
    );
    assert!(xml.contains("<title>"), "{xml}");
    let inv = g.hv.inventory(&g.spec.host).await.unwrap();
    let mine = inv.iter().find(|d| &d.name == vm).expect("in inventory");
    assert_eq!(mine.request_id.as_ref(), Some(&g.spec.request_id));
    assert_eq!(mine.owner.as_ref().map(|o| o.as_str()), Some("alice"));
    assert!(mine.active);

    // It really answers: an SSH login with the key handed over on the command line.
    let out = devvm_tests::ssh(lab.var("ssh_key"), "10.99.0.232", "hostname")
        .output()
        .expect("ssh");
    assert!(
        out.status.success(),
        "ssh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), vm.as_str());
    assert!(
        g.hv.console_log(vm).exists(),
        "the serial console is logged"
    );

    g.hv.destroy(vm, &g.spec.host, &g.spec.request_id)
        .await
        .unwrap();
    let (exists, _) = virsh(&lab, &["dominfo", vm.as_str()]);
    assert!(!exists, "destroyed and undefined");
    g.hv.destroy(vm, &g.spec.host, &g.spec.request_id)
        .await
        .expect("destroy again");
}

#[tokio::test]
async fn an_unreachable_libvirt_is_unavailable() {
    let Some(lab) = Lab::get("an_unreachable_libvirt_is_unavailable") else {
        return;
    };
    let g = guest(&lab, 233);
    let host = HostId::new("qemu:///system?socket=/nonexistent/libvirt-sock").unwrap();
    let e =
        g.hv.domain(&g.spec.name, &host)
            .await
            .expect_err("no such socket");
    assert_eq!(e.kind(), devvm_core::ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable() || e.kind() == devvm_core::ErrorKind::Unavailable);
}

/// Seeds are named by their run: undoing a run that never defined its domain removes
/// that run's seed (a create that failed after writing it) and never another run's seed of
/// the same VM name.
#[tokio::test]
async fn another_runs_seed_of_the_same_name_survives_an_undo() {
    use devvm_core::Hypervisor;
    let Some(lab) = Lab::get("another_runs_seed_of_the_same_name_survives_an_undo") else {
        return;
    };
    let g = guest(&lab, 233);
    let (vm, host, me, other) = (
        &g.spec.name,
        &g.spec.host,
        &g.spec.request_id,
        RequestId::random(),
    );
    let (mine, theirs) = (g.hv.seed_image(vm, me), g.hv.seed_image(vm, &other));
    assert_ne!(mine, theirs);
    for seed in [&mine, &theirs] {
        std::fs::write(seed, b"a seed").unwrap();
    }
    let undone = g.hv.destroy(vm, host, me).await.unwrap();
    assert_eq!(undone, devvm_core::Undone::Absent, "no domain was defined");
    assert!(!mine.exists(), "this run's seed is removed");
    assert_eq!(
        std::fs::read(&theirs).unwrap_or_default(),
        b"a seed",
        "the other run's seed is untouched"
    );
}
