//! The fleet in the lab: two libvirt hosts (`scripts/lab up --hosts 2`) that share no
//! storage. Templates reach each host's pool through libvirt, once and verified; disks are
//! overlays libvirt makes in the chosen host's pool; volumes devvm did not make are left
//! alone; and provisions land on both hosts.
//!
//! Every check asks the hosts themselves (virsh, the pool directories behind them).

use std::path::{Path, PathBuf};
use std::process::Command;

use devvm_core::backends::glance::{GlanceConfig, GlanceImageStore};
use devvm_core::backends::placement::DomainLister;
use devvm_core::testkit::unique_vm_name;
use devvm_core::{
    ErrorKind, HostId, ImageStore, Progress, ProvisionRequest, Provisioner, RequestId,
    TemplateName, Undone,
};
use devvm_examples::lab::{LabEnv, ssh_answers};
use devvm_tests::{Lab, Uploads, run_ok};

/// The lab with at least two hosts, or `None` (a failure under `DEVVM_REQUIRE_LAB=1`).
fn fleet(test: &str) -> Option<(Lab, LabEnv)> {
    let lab = Lab::get(test)?;
    let env = LabEnv::from_env().expect("lab env");
    if env.host_uris.len() < 2 {
        assert!(
            std::env::var("DEVVM_REQUIRE_LAB").as_deref() != Ok("1"),
            "{test}: needs two lab hosts; run `scripts/lab up --hosts 2`"
        );
        eprintln!("SKIPPED {test}: one lab host; run `scripts/lab up --hosts 2`");
        return None;
    }
    Some((lab, env))
}

fn store(lab: &Lab, dir: &Path) -> GlanceImageStore {
    let config: GlanceConfig = toml::from_str(&format!(
        "url = \"{}\"\ncache_dir = \"cache\"\npool = \"{}\"\n",
        lab.var("glance_url"),
        lab.var("pool")
    ))
    .expect("glance config");
    GlanceImageStore::from_config(&config, dir).expect("glance store with a pool")
}

fn host(uri: &str) -> HostId {
    HostId::new(uri).expect("a lab host uri is a host id")
}

fn virsh(uri: &str, args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("virsh")
}

/// The file behind `host`'s volume at `path`, with its birth time (a new upload makes a
/// new file; an inode number can be reused at once, a birth time to the nanosecond not).
fn on_host(env: &LabEnv, host: &HostId, path: &Path) -> (PathBuf, std::time::SystemTime) {
    let local = env.local_path(host.as_str(), path);
    let born = std::fs::metadata(&local)
        .and_then(|m| m.created())
        .unwrap_or_else(|e| panic!("{}: {e}", local.display()));
    (local, born)
}

/// Deletes `volumes` from every host's pool (whatever the test left).
fn delete_volumes(env: &LabEnv, pool: &str, volumes: &[String]) {
    for uri in &env.host_uris {
        for v in volumes {
            let _ = virsh(uri, &["vol-delete", "--pool", pool, v]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_reaches_each_host_once_verified() {
    let Some((lab, env)) = fleet("a_template_reaches_each_host_once_verified") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = store(&lab, dir.path());
    // A template of its own, so that no host has it yet.
    let name = format!("fleet-tpl-{}", unique_vm_name("t"));
    let mut uploads = Uploads::new(&lab);
    let id = uploads.qcow2(&name, "64M", &[]);
    let t = TemplateName::new(&name).unwrap();
    let mut made = Vec::new();
    let lister = devvm_core::backends::placement::LibvirtLister;
    for uri in &env.host_uris {
        let h = host(uri);
        assert!(
            !lister.has_template(&h, lab.var("pool"), &t).await,
            "placement sees no copy on {h} yet"
        );
        let on = s.prepare(&t, &h, &Progress::discard()).await.unwrap();
        assert!(
            lister.has_template(&h, lab.var("pool"), &t).await,
            "placement sees the verified copy on {h}"
        );
        assert!(
            on.path.starts_with(&env.pool_dir),
            "the template is in the host's pool: {}",
            on.path.display()
        );
        let vol = on.path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(vol, format!("devvm-template-{name}-{id}.qcow2"));
        made.push(vol.clone());
        made.push(format!("{vol}.verified"));
        made.push(format!("{vol}.devvm"));
        let (local, born) = on_host(&env, &h, &on.path);
        let cached = s.sync(&t, &Progress::discard()).await.unwrap();
        assert_eq!(
            std::fs::read(&local).unwrap(),
            std::fs::read(&cached.path).unwrap(),
            "the host's copy is the verified download"
        );
        let marker =
            std::fs::read_to_string(local.with_file_name(format!("{vol}.verified"))).unwrap();
        assert!(marker.starts_with("sha256:"), "{marker}");

        // Present and marked: not uploaded again.
        let again = s.prepare(&t, &h, &Progress::discard()).await.unwrap();
        assert_eq!(again.path, on.path);
        assert_eq!(on_host(&env, &h, &again.path).1, born, "not uploaded again");

        // Without its marker the copy is not trusted: uploaded again.
        let gone = virsh(
            uri,
            &[
                "vol-delete",
                "--pool",
                lab.var("pool"),
                &format!("{vol}.verified"),
            ],
        );
        assert!(gone.status.success());
        let fresh = s.prepare(&t, &h, &Progress::discard()).await.unwrap();
        let (local, reborn) = on_host(&env, &h, &fresh.path);
        assert_ne!(reborn, born, "uploaded again");
        assert!(
            local.with_file_name(format!("{vol}.verified")).is_file(),
            "and verified again"
        );
    }
    // Each host has its own copy: the pools share nothing.
    let copies: Vec<PathBuf> = env
        .host_uris
        .iter()
        .map(|uri| env.local_path(uri, &env.pool_dir.join(&made[0])))
        .collect();
    assert_ne!(copies[0], copies[1]);
    assert!(copies.iter().all(|c| c.is_file()), "{copies:?}");
    made.dedup();
    delete_volumes(&env, lab.var("pool"), &made);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_is_an_overlay_in_its_hosts_pool_and_foreign_volumes_stay() {
    let Some((lab, env)) = fleet("a_disk_is_an_overlay_in_its_hosts_pool_and_foreign_volumes_stay")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = store(&lab, dir.path());
    let uri = env.host_uris[1].clone();
    let h = host(&uri);
    let pool = lab.var("pool");
    let t = TemplateName::new(lab.var("template")).unwrap();
    let on = s.prepare(&t, &h, &Progress::discard()).await.unwrap();
    let (me, them) = (
        RequestId::new("fleet-test-me").unwrap(),
        RequestId::new("fleet-test-them").unwrap(),
    );
    let vm = unique_vm_name("fleet-disk");
    let p = Progress::discard();

    let disk = s.create_disk(&vm, &h, &on, 2, &me, &p).await.unwrap();
    assert_eq!(disk.size_gib, 2);
    let (local, _) = on_host(&env, &h, &disk.path);
    assert!(
        local.starts_with(&env.host_pool_dirs[1]),
        "made in host 2's own pool: {}",
        local.display()
    );
    let info: serde_json::Value = serde_json::from_slice(&run_ok(
        "qemu-img",
        &["info", "-U", "--output=json", &local.to_string_lossy()],
    ))
    .unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 2u64 << 30);
    assert_eq!(
        info["backing-filename"].as_str(),
        on.path.to_str(),
        "an overlay on the host's template volume"
    );
    assert_eq!(
        std::fs::read_to_string(local.with_file_name(format!("{vm}.qcow2.owner"))).unwrap(),
        me.as_str(),
        "the owner record names this run"
    );
    assert!(
        !env.host_pool_dirs[0].join(format!("{vm}.qcow2")).exists(),
        "nothing on host 1"
    );

    // Idempotent for its owner; never adopted by, nor deleted for, another.
    assert_eq!(s.create_disk(&vm, &h, &on, 2, &me, &p).await.unwrap(), disk);
    let e = s.create_disk(&vm, &h, &on, 2, &them, &p).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(matches!(
        s.delete_disk(&vm, &h, &them).await.unwrap(),
        Undone::Foreign { .. }
    ));
    assert_eq!(s.disk(&vm, &h).await.unwrap(), Some(disk.clone()));
    assert_eq!(s.delete_disk(&vm, &h, &me).await.unwrap(), Undone::Removed);
    assert_eq!(s.delete_disk(&vm, &h, &me).await.unwrap(), Undone::Absent);
    assert!(!local.exists() && !local.with_file_name(format!("{vm}.qcow2.owner")).exists());

    // A volume of that name made by hand (no owner record): refused, and it stays, without
    // a claim of ours beside it.
    let hand = unique_vm_name("fleet-hand");
    let made = virsh(
        &uri,
        &[
            "vol-create-as",
            pool,
            &format!("{hand}.qcow2"),
            "1M",
            "--format",
            "qcow2",
        ],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let e = s.create_disk(&hand, &h, &on, 2, &me, &p).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let hand_file = env.host_pool_dirs[1].join(format!("{hand}.qcow2"));
    assert!(hand_file.is_file(), "the hand-made volume stays");
    assert!(
        !env.host_pool_dirs[1]
            .join(format!("{hand}.qcow2.owner"))
            .exists(),
        "no claim of ours is left beside it"
    );
    assert!(matches!(
        s.delete_disk(&hand, &h, &me).await.unwrap(),
        Undone::Foreign { .. }
    ));
    assert!(hand_file.is_file(), "and it survives a delete");
    delete_volumes(&env, pool, &[format!("{hand}.qcow2")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_land_on_both_hosts_and_leave_nothing_on_either() {
    let Some((lab, env)) = fleet("provisions_land_on_both_hosts_and_leave_nothing_on_either")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = lab.write_config(dir.path());
    let p = Provisioner::from_config(&config).unwrap();
    let a = p
        .provision(ProvisionRequest::new(lab.member()).with_name(unique_vm_name("fleet-a")))
        .await
        .expect("provision on any host");
    // The second one on the other host: the same config, its placement limited to it
    // (other tests share the lab's hosts, so free room alone cannot force the choice).
    let mut table: toml::Table =
        toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let placement = table["placement"].as_table_mut().unwrap();
    let hosts = placement["hosts"].as_array_mut().unwrap();
    hosts.retain(|h| h["uri"].as_str() != Some(a.host.as_str()));
    assert_eq!(hosts.len(), env.host_uris.len() - 1);
    let pinned = dir.path().join("pinned.toml");
    std::fs::write(&pinned, toml::to_string(&table).unwrap()).unwrap();
    let q = Provisioner::from_config(&pinned).unwrap();
    let b = q
        .provision(ProvisionRequest::new(lab.member()).with_name(unique_vm_name("fleet-b")))
        .await
        .expect("provision on the other host");
    assert_ne!(a.host, b.host, "one VM on each host");
    for (vm, prov) in [(&a, &p), (&b, &q)] {
        assert_eq!(
            env.domain_hosts(vm.name.as_str()),
            vec![vm.host.to_string()]
        );
        assert!(
            env.local_path(vm.host.as_str(), &vm.disk).is_file(),
            "{}: its disk is in its host's pool",
            vm.name
        );
        assert!(
            ssh_answers(vm.ip, std::time::Duration::from_secs(60)),
            "ssh on {}",
            vm.ip
        );
        assert_eq!(env.dns_a(&vm.fqdn), vec![vm.ip.to_string()]);
        prov.deprovision(&vm.name).await.expect("deprovision");
        let left = env.leftovers(vm.name.as_str(), &vm.fqdn, Some(vm.ip));
        assert!(left.is_empty(), "{} leaked: {left:?}", vm.name);
    }
}

/// An `ssh` to the guest at `ip` as root with the lab's key, running `command`.
fn ssh(lab: &Lab, ip: std::net::IpAddr, command: &str) -> Command {
    devvm_tests::ssh(lab.var("ssh_key"), ip, command)
}

/// The guest's uptime in seconds, asked over SSH.
fn uptime(lab: &Lab, ip: std::net::IpAddr) -> f64 {
    let out = ssh(lab, ip, "cat /proc/uptime").output().expect("ssh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("an uptime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_moves_to_the_other_host_and_keeps_its_session() {
    use std::io::{BufRead, BufReader};
    let Some((lab, env)) = fleet("a_running_vm_moves_to_the_other_host_and_keeps_its_session")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = Provisioner::from_config(lab.write_config(dir.path())).unwrap();
    let name = unique_vm_name("move");
    let vm = p
        .provision(ProvisionRequest::new(lab.member()).with_name(name.clone()))
        .await
        .expect("provision");
    let from = vm.host.clone();
    let to = host(
        env.host_uris
            .iter()
            .find(|u| u.as_str() != from.as_str())
            .expect("another host"),
    );
    let before = uptime(&lab, vm.ip);

    // An SSH session that counts, one line a second, across the move.
    let mut session = ssh(
        &lab,
        vm.ip,
        "i=0; while true; do i=$((i+1)); echo $i; sleep 1; done",
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("ssh session");
    // Ended by pid when the test ends, passed or not.
    struct Session(std::process::Child);
    impl Drop for Session {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut lines = BufReader::new(session.stdout.take().expect("stdout")).lines();
    let session = Session(session);
    let first: u64 = lines
        .next()
        .expect("a first count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let mut events = p.subscribe();
    let moved = p.migrate(&name, &to).await.expect("migrate");
    assert_eq!(moved.host, to);
    assert_eq!((moved.ip, &moved.fqdn), (vm.ip, &vm.fqdn));

    // The same session goes on counting: read a few more lines after the move.
    let mut last = first;
    for _ in 0..3 {
        let n: u64 = lines
            .next()
            .expect("the session still counts after the move")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(n, last + 1, "no count lost or repeated");
        last = n;
    }
    drop(session);

    // The guest did not reboot; it runs on the target only; the source's overlay is gone.
    assert!(uptime(&lab, vm.ip) > before, "uptime goes on");
    assert_eq!(env.domain_hosts(name.as_str()), vec![to.to_string()]);
    assert!(
        !env.local_path(from.as_str(), &vm.disk).exists(),
        "the source's overlay is deleted"
    );
    assert!(env.local_path(to.as_str(), &moved.disk).is_file());
    assert_eq!(env.dns_a(&vm.fqdn), vec![vm.ip.to_string()]);
    assert_eq!(env.dns_ptr(vm.ip), vec![vm.fqdn.clone()]);
    let report = events.drain().into_iter().find_map(|e| match e.kind {
        devvm_core::EventKind::StepFinished {
            step: devvm_core::Step::Domain,
            result,
            ..
        } => Some(result),
        _ => None,
    });
    let report = report.expect("the move's domain step reports");
    assert!(
        report["elapsed_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{report}"
    );

    p.deprovision(&name).await.expect("deprovision");
    let left = env.leftovers(name.as_str(), &vm.fqdn, Some(vm.ip));
    assert!(left.is_empty(), "leaked: {left:?}");
}

/// The lab's config in `dir` with each host's capacity set by `cap(host index)`.
fn config_with_capacity(lab: &Lab, dir: &Path, cap: impl Fn(usize) -> toml::Table) -> PathBuf {
    let config = lab.write_config(dir);
    let mut table: toml::Table =
        toml::from_str(&std::fs::read_to_string(&config).expect("config")).expect("toml");
    let hosts = table["placement"]["hosts"].clone();
    let hosts: Vec<toml::Value> = hosts
        .as_array()
        .expect("hosts")
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut h = h.as_table().expect("host").clone();
            h.insert("capacity".into(), toml::Value::Table(cap(i)));
            toml::Value::Table(h)
        })
        .collect();
    table["placement"]
        .as_table_mut()
        .expect("placement")
        .insert("hosts".into(), toml::Value::Array(hosts));
    let path = dir.join("capacity.toml");
    std::fs::write(&path, toml::to_string(&table).expect("toml")).expect("write");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_host_is_skipped() {
    let Some((lab, env)) = fleet("a_full_host_is_skipped") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Host 1 has no room at all; host 2 plenty.
    let config = config_with_capacity(&lab, dir.path(), |i| {
        let n = if i == 0 { 0 } else { 64 };
        toml::toml! { vcpus = n memory_mib = 65536 disk_gib = 640 }
    });
    let p = Provisioner::from_config(&config).unwrap();
    let vm = p
        .provision(ProvisionRequest::new(lab.member()).with_name(unique_vm_name("full")))
        .await
        .expect("provision");
    assert_eq!(vm.host.as_str(), env.host_uris[1], "host 1 is full");
    p.deprovision(&vm.name).await.unwrap();
    assert!(
        env.leftovers(vm.name.as_str(), &vm.fqdn, Some(vm.ip))
            .is_empty()
    );
}

/// Drain in the lab: two VMs on host 1 (host 2 full while they are made), then, with
/// room on host 2, a dry run plans both moves and moves nothing, and the drain moves both
/// live: host 1 holds no domain and no overlay of theirs, and both answer from host 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_empties_a_real_host() {
    let Some((lab, env)) = fleet("drain_empties_a_real_host") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2) = (host(&env.host_uris[0]), host(&env.host_uris[1]));
    let roomy = || toml::toml! { vcpus = 64 memory_mib = 65536 disk_gib = 640 };
    let only_first = config_with_capacity(&lab, dir.path(), |i| {
        if i == 0 {
            roomy()
        } else {
            toml::toml! { vcpus = 0 memory_mib = 0 disk_gib = 0 }
        }
    });
    let p = Provisioner::from_config(&only_first).unwrap();
    let mut vms = Vec::new();
    for _ in 0..2 {
        vms.push(
            p.provision(ProvisionRequest::new(lab.member()).with_name(unique_vm_name("drain")))
                .await
                .expect("provision on host 1"),
        );
    }
    drop(p);
    for vm in &vms {
        assert_eq!(vm.host, h1, "{}: host 2 had no room", vm.name);
    }
    // The same journal and placement, now with room on every host.
    let both = config_with_capacity(&lab, dir.path(), |_| roomy());
    let p = Provisioner::from_config(&both).unwrap();

    let plan = p.drain(&h1, true).await.expect("dry run");
    let mut planned: Vec<_> = plan.iter().map(|m| (m.vm.clone(), m.to.clone())).collect();
    planned.sort();
    let mut want: Vec<_> = vms.iter().map(|v| (v.name.clone(), h2.clone())).collect();
    want.sort();
    assert_eq!(planned, want, "both vms would move to host 2");
    for vm in &vms {
        assert_eq!(
            env.domain_hosts(vm.name.as_str()),
            vec![h1.to_string()],
            "a dry run moves nothing"
        );
    }

    let moved = p.drain(&h1, false).await.expect("drain");
    assert_eq!(moved.len(), 2);
    for vm in &vms {
        assert_eq!(env.domain_hosts(vm.name.as_str()), vec![h2.to_string()]);
        assert!(
            !env.local_path(h1.as_str(), &vm.disk).exists(),
            "{}: no overlay left on host 1",
            vm.name
        );
        assert_eq!(
            p.get(&vm.name).await.unwrap().map(|v| v.host),
            Some(h2.clone())
        );
        assert!(
            ssh_answers(vm.ip, std::time::Duration::from_secs(60)),
            "{} answers after the move",
            vm.name
        );
    }
    assert!(
        p.drain(&h1, false).await.expect("drained").is_empty(),
        "nothing of this provisioner's is left on host 1"
    );
    for vm in &vms {
        p.deprovision(&vm.name).await.expect("deprovision");
        let left = env.leftovers(vm.name.as_str(), &vm.fqdn, Some(vm.ip));
        assert!(left.is_empty(), "{} leaked: {left:?}", vm.name);
    }
}

/// A fault at each act of a real live migration (the slot, the template, the target's
/// disk, the move itself): the VM runs on its host with its disk, nothing of it is left
/// on the other host, and it can then move and be removed without a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_each_act_of_a_real_move_leaves_the_vm_on_its_host() {
    use devvm_core::testkit::faults::{Fault, FaultPlan};
    use devvm_core::{ErrorKind, Step};
    let Some((lab, env)) = fleet("a_fault_at_each_act_of_a_real_move_leaves_the_vm_on_its_host")
    else {
        return;
    };
    for step in [Step::Placement, Step::Image, Step::Disk, Step::Domain] {
        let dir = tempfile::tempdir().unwrap();
        let path = lab.write_config(dir.path());
        let config = devvm_core::config::Config::load(&path).unwrap();
        let p = config.builder().unwrap().build().unwrap();
        let vm = p
            .provision(ProvisionRequest::new(lab.member()).with_name(unique_vm_name("mvfault")))
            .await
            .expect("provision");
        let from = vm.host.clone();
        let to = host(
            env.host_uris
                .iter()
                .find(|u| u.as_str() != from.as_str())
                .unwrap(),
        );
        drop(p);
        // Another provisioner on the same journal whose first call of `step` fails.
        let plan = FaultPlan::new(step, Fault::Error(ErrorKind::Unavailable)).persistent();
        let faulty = devvm_tests::with_fault(&config, plan).build().unwrap();
        let e = faulty
            .migrate(&vm.name, &to)
            .await
            .expect_err("the fault fails the move");
        let ctx = format!("fault at {step}: {e}");
        assert_eq!(e.step(), Some(step), "{ctx}");
        assert!(e.undo_failures().is_empty(), "{ctx}");
        assert_eq!(
            env.domain_hosts(vm.name.as_str()),
            vec![from.to_string()],
            "{ctx}"
        );
        assert!(
            env.local_path(from.as_str(), &vm.disk).is_file(),
            "{ctx}: its disk stays"
        );
        assert!(
            !env.local_path(to.as_str(), &vm.disk).exists(),
            "{ctx}: nothing of it on the other host"
        );
        assert!(
            ssh_answers(vm.ip, std::time::Duration::from_secs(60)),
            "{ctx}: still answering"
        );
        drop(faulty);
        let p = config.builder().unwrap().build().unwrap();
        assert_eq!(
            p.get(&vm.name).await.unwrap().map(|v| v.host),
            Some(from.clone()),
            "{ctx}"
        );
        p.deprovision(&vm.name).await.expect("deprovision");
        let left = env.leftovers(vm.name.as_str(), &vm.fqdn, Some(vm.ip));
        assert!(left.is_empty(), "{ctx}: leaked {left:?}");
    }
}

/// A real move given up part-way (its domain act has one second, the copy takes longer
/// on a loaded machine, or not): whichever way it ends, the VM runs on exactly one host
/// with its disk, nothing of it is left on the other, and it answers. When the act is
/// given up mid-copy, libvirt's migration job is aborted and the guest stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_given_up_part_way_leaves_the_vm_on_one_host() {
    let Some((lab, env)) = fleet("a_move_given_up_part_way_leaves_the_vm_on_one_host") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = lab.write_config(dir.path());
    let config = devvm_core::config::Config::load(&path).unwrap();
    let p = config.builder().unwrap().build().unwrap();
    let vm = p
        .provision(ProvisionRequest::new(lab.member()).with_name(unique_vm_name("mvcut")))
        .await
        .expect("provision");
    drop(p);
    let from = vm.host.clone();
    let to = host(
        env.host_uris
            .iter()
            .find(|u| u.as_str() != from.as_str())
            .unwrap(),
    );
    // The same journal; the move's domain act (the copy) has one second.
    let mut t = config.timeouts.clone();
    t.set(devvm_core::Step::Domain, std::time::Duration::from_secs(1));
    let q = config.builder().unwrap().timeouts(t).build().unwrap();
    let mut events = q.subscribe();
    let outcome = q.migrate(&vm.name, &to).await;
    let mut report = None;
    if let Err(e) = &outcome
        && !e.undo_failures().is_empty()
    {
        // Its work was still running after the wait: recover() settles it once it ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let r = q.recover().await.expect("recover");
            if !r.completed.is_empty() || !r.rolled_back.is_empty() {
                report = Some(r);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the move never settled"
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    let now = q
        .get(&vm.name)
        .await
        .unwrap()
        .map(|v| v.host)
        .expect("the vm is known");
    let aborted = events.drain().iter().any(|e| {
        matches!(&e.kind, devvm_core::EventKind::StepProgress { message, .. }
            if message.contains("aborting its job"))
    });
    eprintln!(
        "outcome: {:?}; on {now}; job aborted: {aborted}; recovery: {report:?}",
        outcome.as_ref().map(|v| &v.host).map_err(|e| e.to_string())
    );
    let (here, there) = if now == to {
        (&to, &from)
    } else {
        (&from, &to)
    };
    match (&outcome, &report) {
        // Settled by recover(): it says which way.
        (Err(_), Some(r)) => assert_eq!(!r.completed.is_empty(), now == to, "{r:?}"),
        _ => assert_eq!(outcome.is_ok(), now == to, "ok exactly when it moved"),
    }
    assert_eq!(env.domain_hosts(vm.name.as_str()), vec![here.to_string()]);
    assert!(
        env.local_path(here.as_str(), &vm.disk).is_file(),
        "its disk"
    );
    assert!(
        !env.local_path(there.as_str(), &vm.disk).exists(),
        "nothing on the other host"
    );
    assert!(
        ssh_answers(vm.ip, std::time::Duration::from_secs(60)),
        "it answers"
    );
    q.deprovision(&vm.name).await.expect("deprovision");
    let left = env.leftovers(vm.name.as_str(), &vm.fqdn, Some(vm.ip));
    assert!(left.is_empty(), "leaked: {left:?}");
}

/// A volume with a template file's name that devvm did not upload (no claim, no verified
/// record) is refused and left as it is; once it is gone, the template goes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_made_volume_of_a_template_name_is_left_alone() {
    let Some((lab, env)) = fleet("a_hand_made_volume_of_a_template_name_is_left_alone") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = store(&lab, dir.path());
    let name = format!("fleet-hand-{}", unique_vm_name("t"));
    let mut uploads = Uploads::new(&lab);
    let id = uploads.qcow2(&name, "64M", &[]);
    let t = TemplateName::new(&name).unwrap();
    let (uri, pool) = (env.host_uris[1].clone(), lab.var("pool"));
    let vol = format!("devvm-template-{name}-{id}.qcow2");
    let made = virsh(
        &uri,
        &["vol-create-as", pool, &vol, "1M", "--format", "raw"],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let file = env.host_pool_dirs[1].join(&vol);
    let before = std::fs::metadata(&file).unwrap().created().unwrap();

    let e = s
        .prepare(&t, &host(&uri), &Progress::discard())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().created().unwrap(),
        before,
        "the hand-made volume is the same file"
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 20);

    let gone = virsh(&uri, &["vol-delete", "--pool", pool, &vol]);
    assert!(gone.status.success());
    let on = s
        .prepare(&t, &host(&uri), &Progress::discard())
        .await
        .unwrap();
    assert!(env.local_path(&uri, &on.path).is_file());
    assert!(
        env.host_pool_dirs[1].join(format!("{vol}.devvm")).is_file(),
        "devvm's upload carries its record"
    );
    delete_volumes(
        &env,
        pool,
        &[
            vol.clone(),
            format!("{vol}.verified"),
            format!("{vol}.devvm"),
        ],
    );
}
