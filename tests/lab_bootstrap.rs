//! The SSH bootstrappers against the lab: real VMs (libvirt/QEMU TCG), reached over SSH
//! with the provisioner-generated host key, and goiardi as the Chef server.
//!
//! The guest's `chef-client` is the lab's **stand-in** shell script (lab/guest/chef-client),
//! not Chef: a real chef-client cannot be installed in the lab. Like a real first run, it
//! checks what the bootstrap left, registers its client and node with the Chef server
//! named in client.rb (goiardi, without authentication), and fails on `recipe[fail]`.
//! Every check below asks the service itself: the guest over SSH, goiardi with curl,
//! libvirt/BIND/the lease database through `LabEnv::leftovers`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use devvm_core::backends::bootstrap::{
    ChefBootstrapper, ChefConfig, ChefServerClient, ShellBootstrapper, ShellConfig,
};
use devvm_core::backends::ssh::{
    GuestScript, HostKeyCheck, SshOptions, SshSession, load_private_key,
};
use devvm_core::config::Config;
use devvm_core::testkit::unique_vm_name;
use devvm_core::{
    BootstrapSettings, Bootstrapper, ErrorKind, Event, EventKind, ProvisionRequest, Provisioner,
    Step, Undone,
};
use devvm_examples::lab::LabEnv;
use devvm_tests::{Lab, run_addresses};

fn provisioner(lab: &Lab, dir: &Path, b: Arc<dyn Bootstrapper>) -> Provisioner {
    Config::load(&lab.write_config(dir))
        .and_then(|c| c.builder())
        .and_then(|b2| b2.bootstrap(b).build())
        .expect("provisioner")
}

fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn chef_config(lab: &Lab, extra: &str) -> ChefConfig {
    let text = format!(
        "ssh_key = {}\nchef_server_url = {}\nvalidation_client_name = {}\n\
         validation_key = {{ file = {} }}\nconnect_timeout_secs = 60\n{extra}",
        toml_str(lab.var("ssh_key")),
        toml_str(lab.var("chef_url")),
        toml_str(lab.var("chef_validation_client")),
        toml_str(lab.var("chef_validation_key")),
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("chef config: {e}\n{text}"))
}

fn chef(lab: &Lab) -> ChefBootstrapper {
    let c = chef_config(
        lab,
        &format!(
            "run_list = [\"recipe[devvm-default]\"]\n[server_admin]\nurl = {}\n",
            toml_str(lab.var("chef_url"))
        ),
    );
    ChefBootstrapper::from_config(&c, Path::new("/")).expect("chef bootstrapper from the config")
}

fn shell(lab: &Lab, script: &str) -> ShellBootstrapper {
    let text = format!(
        "ssh_key = {}\nscript = {}\n",
        toml_str(lab.var("ssh_key")),
        toml_str(script)
    );
    let c: ShellConfig = toml::from_str(&text).expect("shell config");
    ShellBootstrapper::from_config(&c, Path::new("/")).expect("shell bootstrapper from the config")
}

fn bootstrap_lines(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepProgress {
                step: Step::Bootstrap,
                message,
                ..
            } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

/// HTTP status of `GET url` on goiardi, asked with curl (not the library).
fn http_status(url: &str) -> u16 {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}"])
        .args(["-H", "Accept: application/json", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn node_status(lab: &Lab, what: &str, name: &str) -> u16 {
    http_status(&format!("{}/{what}/{name}", lab.var("chef_url")))
}

/// The host key the guest printed on its console (between the cloud-init style markers).
fn console_host_key(lab: &Lab, vm: &str) -> String {
    let path = Path::new(lab.var("console_dir")).join(format!("{vm}.log"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .skip_while(|l| !l.contains("BEGIN SSH HOST KEY KEYS"))
        .nth(1)
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| panic!("no host key on the console of {vm}"))
}

fn ssh_options(lab: &Lab, ip: IpAddr, check: HostKeyCheck) -> SshOptions {
    let key = load_private_key(Path::new(lab.var("ssh_key"))).expect("load DEVVM_LAB_SSH_KEY");
    let mut o = SshOptions::new(SocketAddr::new(ip, 22), "root", Arc::new(key), check);
    o.attempts = 2;
    o
}

async fn guest_output(s: &SshSession, cmd: &str) -> String {
    let mut out = String::new();
    let r = s
        .run(cmd, None, &mut |_, l| {
            out.push_str(l);
            out.push('\n');
        })
        .await
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(r.success(), "{cmd}: {r:?}: {out}");
    out
}

/// Asserts that no event carries any line of the secret files' contents.
fn assert_no_secret(events: &[Event], files: &[&str]) {
    let all: Vec<String> = events
        .iter()
        .map(|e| serde_json::to_string(e).expect("an event as JSON"))
        .collect();
    for f in files {
        let secret = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        let needles: Vec<&str> = secret
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
            .collect();
        assert!(!needles.is_empty(), "{f} has key material");
        for e in &all {
            for n in &needles {
                assert!(!e.contains(n), "an event carries key material of {f}: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chef_bootstrap_with_the_stand_in_chef_client_registers_the_node_and_deprovision_removes_it()
 {
    let Some(lab) = Lab::get(
        "chef_bootstrap_with_the_stand_in_chef_client_registers_the_node_and_deprovision_removes_it",
    ) else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let p = provisioner(&lab, dir.path(), Arc::new(chef(&lab)));
    let mut events = p.subscribe();
    let name = unique_vm_name("chef");
    let settings = BootstrapSettings {
        run_list: vec!["role[dev]".into(), "recipe[php::fpm]".into()],
        environment: Some("devvm_lab".into()),
        attributes: serde_json::json!({"devvm": {"owner": "test"}})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    };
    let vm = p
        .provision(
            ProvisionRequest::new(lab.member())
                .with_name(name.clone())
                .with_bootstrap(settings),
        )
        .await
        .expect("provision");
    assert!(vm.bootstrapped, "{vm:?}");
    let all = events.drain();
    let lines = bootstrap_lines(&all);
    for want in [
        "Starting Chef Client (devvm lab stand-in), version 0.0.0-devvm-lab",
        "INFO: Run List is [role[dev], recipe[php::fpm]]",
        "INFO: Registered client and node",
        "Chef Client finished, 2/2 resources updated in 0 seconds",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(want)),
            "no progress line with {want:?}: {lines:#?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("host key SHA256:") && l.contains("verified")),
        "{lines:#?}"
    );

    // The files knife bootstrap leaves, read over SSH with the host key the guest printed.
    let host_key = console_host_key(&lab, name.as_str());
    let check = HostKeyCheck::expect_line(&host_key).unwrap();
    let s = SshSession::connect(&ssh_options(&lab, vm.ip, check))
        .await
        .expect("ssh");
    let rb = guest_output(&s, "cat /etc/chef/client.rb").await;
    assert!(rb.contains(&format!("node_name '{name}'")), "{rb}");
    assert!(
        rb.contains(&format!("chef_server_url '{}'", lab.var("chef_url"))),
        "{rb}"
    );
    assert!(
        rb.contains("validation_key '/etc/chef/validation.pem'"),
        "{rb}"
    );
    // The validation key was there with mode 0600 (the stand-in refuses to run
    // otherwise, and it registered), and left the guest once chef-client converged.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("removed /etc/chef/validation.pem (delete_validation)")),
        "{lines:#?}"
    );
    let gone = guest_output(
        &s,
        "test -e /etc/chef/validation.pem && echo present || echo gone",
    )
    .await;
    assert_eq!(gone.trim(), "gone", "delete_validation");
    // The first-boot seed (the guest's private host key) is detached and deleted: the
    // guest sees only its root disk, libvirt lists only vda, the seed file is gone.
    let disks = guest_output(&s, "ls /dev/vd*").await;
    assert_eq!(
        disks.split_whitespace().collect::<Vec<_>>(),
        vec!["/dev/vda"],
        "{disks}"
    );
    let listed = Command::new("virsh")
        .args(["-q", "-c", vm.host.as_str(), "domblklist", name.as_str()])
        .output()
        .expect("virsh");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains("vda") && !listed.contains("vdb") && !listed.contains("cidata"),
        "{listed}"
    );
    let seeds = env.seed_files(name.as_str());
    assert!(seeds.is_empty(), "{seeds:?} deleted");
    let json = guest_output(&s, "cat /etc/chef/first-boot.json").await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "devvm": {"owner": "test", "request_id": vm.request_id.as_str()},
            "run_list": ["role[dev]", "recipe[php::fpm]"]
        }),
        "the request's attributes, and the run's ownership record beside them"
    );
    let last = guest_output(&s, "cat /var/chef/devvm-last-run").await;
    assert!(
        last.contains("status=success") && last.contains("environment=devvm_lab"),
        "{last}"
    );
    s.close().await;

    // Registered on goiardi (asked with curl), the node carrying the run's request id.
    assert_eq!(node_status(&lab, "nodes", name.as_str()), 200);
    assert_eq!(node_status(&lab, "clients", name.as_str()), 200);
    let server = ChefServerClient::new(lab.var("chef_url"), None).unwrap();
    let path = format!("/nodes/{name}");
    let node = tokio::task::spawn_blocking(move || server.get_json(&path))
        .await
        .unwrap()
        .unwrap()
        .expect("no chef node for the vm");
    assert_eq!(
        node.pointer("/normal/devvm/request_id")
            .and_then(|v| v.as_str()),
        Some(vm.request_id.as_str()),
        "{node}"
    );
    assert_no_secret(&all, &[lab.var("chef_validation_key"), lab.var("ssh_key")]);

    p.deprovision(&vm.name).await.expect("deprovision");
    assert_eq!(
        node_status(&lab, "nodes", name.as_str()),
        404,
        "node removed"
    );
    assert_eq!(
        node_status(&lab, "clients", name.as_str()),
        404,
        "client removed"
    );
    let left = env.leftovers(name.as_str(), &vm.fqdn, Some(vm.ip));
    assert!(left.is_empty(), "leaked: {left:?}");
    assert_no_secret(&events.drain(), &[lab.var("chef_validation_key")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stand_in_chef_run_rolls_the_vm_back_and_leaves_no_node() {
    let Some(lab) = Lab::get("a_failing_stand_in_chef_run_rolls_the_vm_back_and_leaves_no_node")
    else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let p = provisioner(&lab, dir.path(), Arc::new(chef(&lab)));
    let mut events = p.subscribe();
    let name = unique_vm_name("chef-fail");
    let settings = BootstrapSettings {
        run_list: vec!["recipe[ok]".into(), "recipe[fail]".into()],
        ..Default::default()
    };
    let e = p
        .provision(
            ProvisionRequest::new(lab.member())
                .with_name(name.clone())
                .with_bootstrap(settings),
        )
        .await
        .expect_err("recipe[fail] fails the run");
    assert_eq!(e.step(), Some(Step::Bootstrap), "{e}");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(
        e.message()
            .contains("chef-client failed with exit status 1"),
        "{e}"
    );
    assert!(
        e.message().contains("FATAL:") && e.message().contains("recipe[fail]"),
        "the last line of stderr: {e}"
    );
    assert!(e.undo_failures().is_empty(), "{e}");
    let all = events.drain();
    let lines = bootstrap_lines(&all);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Registered client and node")),
        "the stand-in registered before failing: {lines:#?}"
    );
    assert!(
        all.iter().any(|ev| matches!(
            ev.kind,
            EventKind::StepUndone {
                step: Step::Bootstrap
            }
        )),
        "bootstrap undone"
    );
    assert_eq!(
        node_status(&lab, "nodes", name.as_str()),
        404,
        "node removed"
    );
    assert_eq!(
        node_status(&lab, "clients", name.as_str()),
        404,
        "client removed"
    );
    let (ip, fqdn) = run_addresses(&all);
    let fqdn = fqdn.unwrap_or_else(|| format!("{name}.{}", lab.var("dns_zone")));
    let left = env.leftovers(name.as_str(), &fqdn, ip);
    assert!(left.is_empty(), "leaked: {left:?}");
    assert_no_secret(&all, &[lab.var("chef_validation_key"), lab.var("ssh_key")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_script_exiting_1_rolls_the_vm_back() {
    let Some(lab) = Lab::get("a_shell_script_exiting_1_rolls_the_vm_back") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let script = "echo \"hello from $DEVVM_VM\"\necho 'about to fail' >&2\nexit 1\n";
    let p = provisioner(&lab, dir.path(), Arc::new(shell(&lab, script)));
    let mut events = p.subscribe();
    let name = unique_vm_name("shell-fail");
    let e = p
        .provision(ProvisionRequest::new(lab.member()).with_name(name.clone()))
        .await
        .expect_err("exit 1 fails the run");
    assert_eq!(e.step(), Some(Step::Bootstrap), "{e}");
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(
        e.message().contains("exit status 1") && e.message().contains("about to fail"),
        "{e}"
    );
    let all = events.drain();
    let lines = bootstrap_lines(&all);
    assert!(
        lines.iter().any(|l| l == &format!("hello from {name}")),
        "{lines:#?}"
    );
    let (ip, fqdn) = run_addresses(&all);
    let fqdn = fqdn.unwrap_or_else(|| format!("{name}.{}", lab.var("dns_zone")));
    let left = env.leftovers(name.as_str(), &fqdn, ip);
    assert!(left.is_empty(), "leaked: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_bootstrap_runs_and_a_wrong_host_key_is_refused_before_anything_runs() {
    let Some(lab) =
        Lab::get("a_shell_bootstrap_runs_and_a_wrong_host_key_is_refused_before_anything_runs")
    else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let dir = tempfile::tempdir().unwrap();
    let script = "set -e\necho \"configuring $DEVVM_FQDN\"\necho ok > /root/devvm-shell-ran\n";
    let p = provisioner(&lab, dir.path(), Arc::new(shell(&lab, script)));
    let mut events = p.subscribe();
    let name = unique_vm_name("shell");
    let vm = p
        .provision(ProvisionRequest::new(lab.member()).with_name(name.clone()))
        .await
        .expect("provision");
    assert!(vm.bootstrapped);
    let lines = bootstrap_lines(&events.drain());
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("configuring {}", vm.fqdn)),
        "{lines:#?}"
    );

    // Another key than the guest's: refused with Unauthorized, nothing runs.
    let wrong = devvm_core::seed::HostKey::generate().unwrap();
    let check = HostKeyCheck::expect_line(&wrong.public).unwrap();
    let err = SshSession::connect(&ssh_options(&lab, vm.ip, check))
        .await
        .expect_err("a wrong host key is refused");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(err.to_string().contains("host key mismatch"), "{err}");

    // The bootstrapper itself refuses a guest whose host key is not the expected one,
    // and one whose host key is unknown, before it runs anything.
    let b = shell(&lab, "echo should-not-run > /root/devvm-must-not-exist\n");
    let mut target = devvm_core::BootstrapTarget {
        vm: vm.name.clone(),
        request_id: vm.request_id.clone(),
        fqdn: vm.fqdn.clone(),
        ip: vm.ip,
        owner: devvm_core::User {
            name: lab.member(),
            display_name: None,
            mail: None,
            ssh_keys: Vec::new(),
        },
        settings: BootstrapSettings::default(),
        host_key: Some(wrong.public.clone()),
    };
    let progress = devvm_core::Progress::discard();
    let err = b
        .bootstrap(&target, &progress)
        .await
        .expect_err("wrong host key");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    target.host_key = None;
    let err = b
        .bootstrap(&target, &progress)
        .await
        .expect_err("unknown host key");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");

    // The right key (printed on the guest's console) works, and shows what ran.
    let check = HostKeyCheck::expect_line(&console_host_key(&lab, name.as_str())).unwrap();
    let s = SshSession::connect(&ssh_options(&lab, vm.ip, check))
        .await
        .expect("ssh");
    assert_eq!(
        guest_output(&s, "cat /root/devvm-shell-ran").await.trim(),
        "ok"
    );
    let absent = guest_output(
        &s,
        "test -e /root/devvm-must-not-exist && echo present || echo absent",
    )
    .await;
    assert_eq!(absent.trim(), "absent");
    // Uploads land with their mode, the contents passing on stdin.
    s.upload("/root/uploaded", 0o640, b"it's \"quoted\"\n")
        .await
        .expect("upload");
    assert_eq!(
        guest_output(&s, "stat -c %a /root/uploaded").await.trim(),
        "640"
    );
    assert_eq!(
        guest_output(&s, "cat /root/uploaded").await,
        "it's \"quoted\"\n"
    );
    // The domain gave the guest an entropy source, and the guest's kernel uses it.
    assert!(
        guest_output(&s, "cat /sys/devices/virtual/misc/hw_random/rng_current")
            .await
            .starts_with("virtio_rng"),
        "no virtio-rng in the guest"
    );
    // A script writes several files in one command, any bytes exactly (the guest's
    // busybox sh and base64), prints its markers, and stops at the first failure.
    let binary: Vec<u8> = (0..=255u8).chain(*b"\0\nend").collect();
    let mut script = GuestScript::new();
    script
        .file("/root/script-text", 0o600, b"one line\n")
        .unwrap()
        .file("/root/script-binary", 0o644, &binary)
        .unwrap()
        .marker("written")
        .command("false")
        .marker("not reached")
        .command("touch /root/script-not-reached");
    let mut lines = Vec::new();
    let outcome = s
        .run_script(&script, &mut |_, l| lines.push(l.to_owned()))
        .await
        .expect("script");
    assert_eq!(outcome.exit_status, Some(1), "{outcome:?}");
    assert_eq!(lines, ["written"]);
    let bytes: Vec<u8> = guest_output(&s, "od -An -v -tx1 /root/script-binary")
        .await
        .split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).expect("hex byte"))
        .collect();
    assert_eq!(bytes, binary);
    assert_eq!(
        guest_output(&s, "stat -c %a /root/script-binary /root/script-text").await,
        "644\n600\n"
    );
    assert_eq!(
        guest_output(&s, "cat /root/script-text").await,
        "one line\n"
    );
    let absent = guest_output(
        &s,
        "test -e /root/script-not-reached && echo present || echo absent",
    )
    .await;
    assert_eq!(absent.trim(), "absent");
    s.close().await;

    // A command that never ends is given up at the session's command time limit (it
    // never ends, so any limit is reached), and a new session works as before.
    let check = HostKeyCheck::expect_line(&console_host_key(&lab, name.as_str())).unwrap();
    let mut o = ssh_options(&lab, vm.ip, check.clone());
    o.command_timeout = std::time::Duration::from_secs(1);
    let s = SshSession::connect(&o).await.expect("ssh");
    let e = s
        .run("while true; do sleep 1; done", None, &mut |_, _| {})
        .await
        .expect_err("a command that never ends");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        !e.is_retryable(),
        "it may still run: never run it twice at once"
    );
    s.close().await;
    let s = SshSession::connect(&ssh_options(&lab, vm.ip, check))
        .await
        .expect("ssh");
    assert_eq!(guest_output(&s, "echo ok").await.trim(), "ok");
    s.close().await;

    p.deprovision(&vm.name).await.expect("deprovision");
    let left = env.leftovers(name.as_str(), &vm.fqdn, Some(vm.ip));
    assert!(left.is_empty(), "leaked: {left:?}");
}

/// A goiardi with authentication on, started (and stopped, by pid) by the test on
/// loopback, to check Chef's v1.3 request signing.
struct AuthGoiardi {
    child: std::process::Child,
    url: String,
    conf: tempfile::TempDir,
}

impl AuthGoiardi {
    fn start() -> AuthGoiardi {
        let conf = tempfile::tempdir().expect("temp dir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            l.local_addr().map(|a| a.port()).unwrap_or(0)
        };
        let child = std::process::Command::new("goiardi")
            .args(["-A", "-I", "127.0.0.1", "-H", "127.0.0.1", "-P"])
            .arg(port.to_string())
            .arg(format!("--conf-root={}", conf.path().display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("goiardi");
        let url = format!("http://127.0.0.1:{port}");
        let g = AuthGoiardi { child, url, conf };
        // Poll until it answers; a generous limit only bounds a goiardi that never starts.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            if http_status(&format!("{}/nodes", g.url)) == 401
                && g.conf.path().join("admin.pem").exists()
            {
                return g;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("goiardi with auth did not start on {}", g.url);
    }
}

impl Drop for AuthGoiardi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregister_signs_chef_requests_v1_3_for_servers_with_auth() {
    let Some(lab) = Lab::get("unregister_signs_chef_requests_v1_3_for_servers_with_auth") else {
        return;
    };
    let g = AuthGoiardi::start();
    let admin_pem = g.conf.path().join("admin.pem");
    let c = chef_config(
        &lab,
        &format!(
            "[server_admin]\nurl = {}\nclient_name = \"admin\"\nclient_key = {{ file = {} }}\n",
            toml_str(&g.url),
            toml_str(&admin_pem.display().to_string())
        ),
    );
    let b = ChefBootstrapper::from_config(&c, Path::new("/")).unwrap();
    let debug = format!("{b:?}");
    let admin_key = std::fs::read_to_string(&admin_pem).unwrap_or_default();
    assert!(
        !debug.contains(admin_key.lines().nth(1).unwrap_or("-")),
        "{debug}"
    );
    let server = b.server().cloned().expect("server_admin set");
    assert!(server.signs());
    let vm = unique_vm_name("signed");
    let rid = devvm_core::RequestId::random();
    let node = serde_json::json!({
        "name": vm.as_str(), "json_class": "Chef::Node", "chef_type": "node",
        "chef_environment": "_default", "run_list": [],
        "normal": {"devvm": {"request_id": rid.as_str()}}, "default": {}, "override": {}, "automatic": {}
    })
    .to_string();
    let client = serde_json::json!({"name": vm.as_str(), "admin": false}).to_string();
    let s2 = server.clone();
    let (vm2, node2, client2) = (vm.clone(), node.clone(), client.clone());
    let created = tokio::task::spawn_blocking(move || {
        let n = s2.request("POST", "/nodes", Some(node2.as_bytes()))?;
        let c = s2.request("POST", "/clients", Some(client2.as_bytes()))?;
        let get = s2.request("GET", &format!("/nodes/{vm2}"), None)?;
        Ok::<_, devvm_core::Error>((n.0, c.0, get.0))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(created, (201, 201, 200), "signed requests are accepted");

    // Unsigned requests are refused by this server: the signature is what counts.
    let unsigned = ChefServerClient::new(&g.url, None).unwrap();
    let path = format!("/nodes/{vm}");
    let refused = tokio::task::spawn_blocking(move || unsigned.delete(&path))
        .await
        .unwrap()
        .expect_err("unsigned delete refused");
    assert_eq!(refused.kind(), ErrorKind::Unauthorized, "{refused}");

    // Another request's unregister leaves the node (and its client) alone.
    let other = devvm_core::RequestId::random();
    let theirs = b
        .unregister(&vm, &other)
        .await
        .expect("unregister by another request");
    assert_eq!(theirs, Undone::foreign(rid.as_str()), "left alone");
    assert_eq!(
        b.unregister(&vm, &rid).await.expect("unregister"),
        Undone::Removed
    );
    assert_eq!(
        b.unregister(&vm, &rid)
            .await
            .expect("unregister again (404 is success)"),
        Undone::Absent
    );
    let s3 = server.clone();
    let vm3 = vm.clone();
    let after = tokio::task::spawn_blocking(move || {
        Ok::<_, devvm_core::Error>((
            s3.request("GET", &format!("/nodes/{vm3}"), None)?.0,
            s3.request("GET", &format!("/clients/{vm3}"), None)?.0,
        ))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(after, (404, 404), "node and client deleted");

    // A key the server does not know for that client name: Unauthorized.
    let wrong = chef_config(
        &lab,
        &format!(
            "[server_admin]\nurl = {}\nclient_name = \"admin\"\nclient_key = {{ file = {} }}\n",
            toml_str(&g.url),
            toml_str(lab.var("chef_validation_key"))
        ),
    );
    let wrong = ChefBootstrapper::from_config(&wrong, Path::new("/")).unwrap();
    let e = wrong.unregister(&vm, &rid).await.expect_err("wrong key");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
}
