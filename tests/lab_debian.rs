//! The real Debian guest (`DEVVM_LAB_TEMPLATE_DEBIAN`: Debian 12 with systemd, cloud-init
//! and OpenSSH, built by `lab/guest/build-debian.sh`): real cloud-init and real OpenSSH
//! consume what devvm writes. The busybox guest's own YAML reader and dropbear prove the
//! pipeline; these prove the seed and the bootstrap work with the software users run.
//! Each test boots one such guest under TCG (about a minute), so they are few.

use std::sync::Arc;

use base64::Engine as _;
use devvm_core::backends::cloudinit::{CloudInitBootstrapper, CloudInitConfig};
use devvm_core::config::Config;
use devvm_core::testkit::unique_vm_name;
use devvm_core::{EventKind, ProvisionRequest, Provisioner, TemplateName, Vm};
use devvm_examples::lab::LabEnv;
use devvm_tests::Lab;

fn template(lab: &Lab) -> TemplateName {
    TemplateName::new(lab.var("template_debian")).expect("template name")
}

/// Runs `command` as root in the guest (the lab's key, which the lab's hypervisor config
/// puts in every guest): its stdout, or a panic with its stderr.
fn guest(lab: &Lab, vm: &Vm, command: &str) -> String {
    let out = devvm_tests::ssh(lab.var("ssh_key"), vm.ip, command)
        .output()
        .expect("ssh");
    assert!(
        out.status.success(),
        "{command}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn request(lab: &Lab, name: &devvm_core::VmName) -> ProvisionRequest {
    ProvisionRequest::new(lab.member())
        .with_name(name.clone())
        .with_template(template(lab))
        // systemd and cloud-init's Python want more than the busybox guest's 256 MiB
        .with_memory_mib(512)
}

/// What every devvm guest must look like once cloud-init ran: done without errors or
/// warnings, the host name and FQDN, the address, route and resolver, the keys, and
/// exactly the one host key the provisioner generated.
fn check_first_boot(lab: &Lab, vm: &Vm) {
    // The SSH server answers before cloud-init's last stage ends: wait for it.
    let status = guest(lab, vm, "cloud-init status --wait --long");
    assert!(status.contains("status: done"), "{status}");
    assert!(!status.to_lowercase().contains("error:"), "{status}");
    let warnings = guest(
        lab,
        vm,
        // cloud-init logs `util.py[WARNING]: ...`
        "grep -E '\\[(WARNING|ERROR|CRITICAL)\\]' /var/log/cloud-init.log || true",
    );
    assert!(warnings.trim().is_empty(), "cloud-init warned:\n{warnings}");
    assert_eq!(guest(lab, vm, "hostname").trim(), vm.name.as_str());
    assert_eq!(guest(lab, vm, "hostname -f").trim(), vm.fqdn);
    let prefix = lab
        .var("subnet")
        .rsplit('/')
        .next()
        .expect("a prefix")
        .to_owned();
    let addr = guest(lab, vm, "ip -4 -o addr show dev eth0");
    assert!(
        addr.contains(&format!("inet {}/{prefix} ", vm.ip)),
        "{addr}"
    );
    let route = guest(lab, vm, "ip -4 route show default");
    assert!(
        route.contains(&format!("default via {} ", lab.var("gateway"))),
        "{route}"
    );
    let resolv = guest(lab, vm, "cat /etc/resolv.conf");
    assert!(
        resolv.contains(&format!("nameserver {}", lab.var("dns_server"))),
        "{resolv}"
    );
    let keys = guest(lab, vm, "cat /root/.ssh/authorized_keys");
    let lab_key = std::fs::read_to_string(lab.var("ssh_pubkey")).expect("the lab key");
    let lab_key: Vec<&str> = lab_key.split_whitespace().take(2).collect();
    assert!(keys.contains(&lab_key.join(" ")), "{keys}");
    assert!(
        !keys.contains("Please login as"),
        "root's keys are usable: {keys}"
    );
    // Only the host key devvm generated: no other type was made at first boot.
    let host_keys = guest(lab, vm, "ls /etc/ssh/ | grep '^ssh_host_' | sort");
    assert_eq!(
        host_keys, "ssh_host_ed25519_key\nssh_host_ed25519_key.pub\n",
        "{host_keys}"
    );
    // The seed (it held that key's private half) is gone from the guest.
    assert_eq!(guest(lab, vm, "ls /dev/vd*").trim(), "/dev/vda");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cloud_init_applies_the_seed_and_every_hostile_value_exactly() {
    let Some(lab) = Lab::get("real_cloud_init_applies_the_seed_and_every_hostile_value_exactly")
    else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    // The hostile corpus of the cloud-config writer's tests, as files cloud-init writes.
    let values = devvm_tests::hostile_strings();
    let files: Vec<serde_json::Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::json!({
                "path": format!("/root/devvm-corpus/{i}"),
                "content": v,
                "permissions": "0600",
            })
        })
        .collect();
    let mut ci: CloudInitConfig = toml::from_str("").expect("an empty cloud-init section");
    ci.cloud_config.insert(
        "write_files".into(),
        toml::Value::try_from(serde_json::Value::Array(files)).expect("toml"),
    );
    let p: Provisioner = Config::load(&lab.write_config(dir.path()))
        .unwrap()
        .builder()
        .unwrap()
        .bootstrap(Arc::new(
            CloudInitBootstrapper::from_config(&ci, dir.path()).unwrap(),
        ))
        .build()
        .unwrap();
    let name = unique_vm_name("deb-ci");
    let vm = p.provision(request(&lab, &name)).await.expect("provision");
    check_first_boot(&lab, &vm);
    let b64 = base64::engine::general_purpose::STANDARD;
    let listing = guest(
        &lab,
        &vm,
        "cd /root/devvm-corpus && for f in $(ls | sort -n); do printf '%s ' \"$f\"; base64 -w0 \"$f\"; echo; done",
    );
    let got: Vec<(usize, Vec<u8>)> = listing
        .lines()
        .map(|l| {
            let (i, data) = l.split_once(' ').expect("index and data");
            (i.parse().unwrap(), b64.decode(data.trim()).expect("base64"))
        })
        .collect();
    assert_eq!(got.len(), values.len(), "one file per value");
    for (i, data) in got {
        assert!(
            data == values[i].as_bytes(),
            "value {i} {:?} came back as {:?}",
            values[i].chars().take(80).collect::<String>(),
            String::from_utf8_lossy(&data)
                .chars()
                .take(80)
                .collect::<String>()
        );
    }
    p.deprovision(&vm.name).await.expect("deprovision");
    let left = env.leftovers(name.as_str(), &vm.fqdn, Some(vm.ip));
    assert!(left.is_empty(), "leaked: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knife_style_chef_bootstrap_over_real_openssh() {
    let Some(lab) = Lab::get("knife_style_chef_bootstrap_over_real_openssh") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    // The lab's config: the Chef bootstrapper, which refuses any host key but the one
    // the provisioner generated, so a provision that bootstraps proves OpenSSH serves it.
    let p = Config::load(&lab.write_config(dir.path()))
        .unwrap()
        .builder()
        .unwrap()
        .build()
        .unwrap();
    let name = unique_vm_name("deb-chef");
    let mut events = p.subscribe();
    let vm = p.provision(request(&lab, &name)).await.expect("provision");
    assert!(vm.bootstrapped);
    check_first_boot(&lab, &vm);
    // The host key the bootstrapper accepted (the one the provisioner generated) is the
    // one OpenSSH serves from its key file.
    let accepted: Vec<String> = events
        .drain()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::StepProgress { message, .. } if message.starts_with("ssh: logged in") => {
                message
                    .split_whitespace()
                    .find(|w| w.starts_with("SHA256:"))
                    .map(|w| w.trim_end_matches(')').to_owned())
            }
            _ => None,
        })
        .collect();
    let served = guest(
        &lab,
        &vm,
        "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub",
    );
    assert_eq!(accepted.len(), 1, "one login: {accepted:?}");
    assert!(
        served.split_whitespace().nth(1) == Some(accepted[0].as_str()),
        "accepted {accepted:?}, sshd serves {served}"
    );
    let rb = guest(
        &lab,
        &vm,
        "stat -c %a /etc/chef/client.rb; cat /etc/chef/client.rb",
    );
    assert!(rb.starts_with("644\n"), "{rb}");
    assert!(rb.contains(&format!("node_name '{}'", vm.name)), "{rb}");
    assert!(rb.contains("chef_server_url"), "{rb}");
    let fb = guest(
        &lab,
        &vm,
        "stat -c %a /etc/chef/first-boot.json; cat /etc/chef/first-boot.json",
    );
    assert!(fb.starts_with("600\n"), "{fb}");
    assert!(fb.contains("recipe[devvm::base]"), "{fb}");
    assert!(fb.contains(vm.request_id.as_str()), "{fb}");
    assert_eq!(
        guest(
            &lab,
            &vm,
            "test -e /etc/chef/validation.pem && echo present || echo absent"
        )
        .trim(),
        "absent",
        "delete_validation"
    );
    let last = guest(&lab, &vm, "cat /var/chef/devvm-last-run");
    assert!(last.contains("status=success"), "{last}");
    p.deprovision(&vm.name).await.expect("deprovision");
    let left = env.leftovers(name.as_str(), &vm.fqdn, Some(vm.ip));
    assert!(left.is_empty(), "leaked: {left:?}");
}
