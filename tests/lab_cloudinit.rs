//! The cloud-init bootstrapper against the lab: the cloud-config travels in the NoCloud
//! seed, which the guest reads at first boot; no SSH step runs. Proven by logging in
//! with a key that exists nowhere but in that cloud-config.

use std::process::Command;
use std::sync::Arc;

use devvm_core::ProvisionRequest;
use devvm_core::backends::cloudinit::{CloudInitBootstrapper, CloudInitConfig};
use devvm_core::config::Config;
use devvm_core::testkit::unique_vm_name;
use devvm_examples::lab::LabEnv;
use devvm_tests::Lab;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_alone_configures_the_guest() {
    let Some(lab) = Lab::get("the_seed_alone_configures_the_guest") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("seed_only_key");
    let kg = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "seed-only", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(kg.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();

    let config = Config::load(&lab.write_config(dir.path())).unwrap();
    let ci: CloudInitConfig = toml::from_str(&format!(
        "cloud_config = {{ ssh_authorized_keys = [{:?}] }}",
        public.trim()
    ))
    .unwrap();
    let p = config
        .builder()
        .unwrap()
        .bootstrap(Arc::new(
            CloudInitBootstrapper::from_config(&ci, dir.path()).unwrap(),
        ))
        .build()
        .unwrap();
    let name = unique_vm_name("ci");
    let user = lab.member();
    let vm = p
        .provision(ProvisionRequest::new(user).with_name(name.clone()))
        .await
        .unwrap();
    assert!(vm.bootstrapped);

    let out = devvm_tests::ssh(&key, vm.ip, "hostname; ls /dev/vd*")
        .output()
        .expect("ssh");
    assert!(
        out.status.success(),
        "login with the seed-only key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.split_whitespace();
    assert_eq!(lines.next(), Some(name.as_str()));
    // The seed (the guest's private host key) was consumed, then detached and deleted:
    // the guest has only its root disk left, and the seed file is gone from the host.
    assert_eq!(lines.collect::<Vec<_>>(), vec!["/dev/vda"], "{stdout}");
    let seeds = env.seed_files(name.as_str());
    assert!(seeds.is_empty(), "{seeds:?} deleted");

    p.deprovision(&vm.name).await.unwrap();
    let left = env.leftovers(name.as_str(), &vm.fqdn, Some(vm.ip));
    assert!(left.is_empty(), "leaked: {left:?}");
}
