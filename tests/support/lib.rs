//! Helpers shared by the integration tests: reference backends wired to state files in a
//! test directory, and a config file describing the same backends.

// A test-only crate (devvm-tests, unpublished), built without cfg(test), so clippy.toml's
// allow-unwrap-in-tests does not reach it; its helpers panic on any failure by design.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devvm_core::memory::{
    HostCapacity, MemoryBackends, MemoryBootstrapper, MemoryDns, MemoryHypervisor, MemoryImages,
    MemoryIpAllocator, MemoryPlacement, MemoryUsers,
};
use devvm_core::{HostId, TemplateName, User, UserName, VmSize};

/// The zone of the reference DNS backend.
pub const ZONE: &str = "lab.example";
/// The template every test uses.
pub const TEMPLATE: &str = "debian-12";

/// Parses a name that the test knows is valid.
pub fn user(name: &str) -> UserName {
    UserName::new(name).unwrap()
}

/// Reference backends; with `dir`, their state lives in JSON files there (shared with the
/// config written by [`write_config`], so another process sees the same state).
///
/// Users: `alice` and `bob` may own VMs, `mallory` may not. Two hosts with room for
/// 2 + 1 standard VMs. Subnet 10.20.0.0/28 with gateway .1 (13 leasable addresses).
pub fn reference_backends(dir: Option<&Path>) -> MemoryBackends {
    let size = VmSize::default();
    let hosts = vec![
        HostCapacity::slots(HostId::new("host-a").unwrap(), 2, size),
        HostCapacity::slots(HostId::new("host-b").unwrap(), 1, size),
    ];
    let template = TemplateName::new(TEMPLATE).unwrap();
    let subnet = "10.20.0.0/28".parse().unwrap();
    let users = MemoryUsers::new()
        .with_user(account("alice"), true)
        .with_user(account("bob"), true)
        .with_user(account("mallory"), false);
    let mut ip = MemoryIpAllocator::new(subnet, Some([10, 20, 0, 1].into()));
    let mut dns = MemoryDns::new(ZONE);
    let mut images = MemoryImages::new([template]);
    let mut hv = MemoryHypervisor::new();
    let mut bs = MemoryBootstrapper::new();
    let placement = match dir {
        Some(d) => {
            ip = ip.with_state_file(d.join("ip.json"));
            dns = dns.with_state_file(d.join("dns.json"));
            images = images.with_state_file(d.join("disks.json"));
            hv = hv.with_state_file(d.join("domains.json"));
            bs = bs.with_state_file(d.join("bootstrap.json"));
            MemoryPlacement::with_state_file(hosts, d.join("placement.json"))
        }
        None => MemoryPlacement::new(hosts),
    };
    MemoryBackends {
        users: Arc::new(users),
        placement: Arc::new(placement),
        ip: Arc::new(ip),
        dns: Arc::new(dns),
        images: Arc::new(images),
        hypervisor: Arc::new(hv),
        bootstrap: Arc::new(bs),
    }
}

fn account(name: &str) -> User {
    User {
        name: user(name),
        display_name: Some(format!("{name} (test)")),
        mail: Some(format!("{name}@{ZONE}")),
        ssh_keys: vec![format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITEST {name}")],
    }
}

/// The reference-backend config every test suite shares (Rust here; Python's
/// `conftest.py` and the C test read the same file).
pub use devvm_core::testkit::REFERENCE_CONFIG;

/// Writes a config selecting the same reference backends as
/// `reference_backends(Some(dir))`, and returns its path.
pub fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("devvm.toml");
    std::fs::write(&path, REFERENCE_CONFIG).expect("write config");
    path
}

/// The lab's environment, as printed by `scripts/lab env`.
#[derive(Debug, Clone)]
pub struct Lab {
    /// Every `DEVVM_LAB_*` variable, without the prefix, lower-cased (`dns_server`, ...).
    vars: std::collections::BTreeMap<String, String>,
}

impl Lab {
    /// The lab, if its environment is present (`scripts/lab exec ...` sets it).
    ///
    /// When it is absent the test should return early: this prints why. When
    /// `DEVVM_REQUIRE_LAB=1` (as `scripts/test` sets), an absent lab is a failure instead,
    /// so that CI never silently skips a backend test.
    pub fn get(test: &str) -> Option<Lab> {
        if std::env::var("DEVVM_LAB").as_deref() == Ok("1") {
            let vars = std::env::vars()
                .filter_map(|(k, v)| {
                    k.strip_prefix("DEVVM_LAB_")
                        .map(|k| (k.to_ascii_lowercase(), v))
                })
                .collect();
            return Some(Lab { vars });
        }
        if std::env::var("DEVVM_REQUIRE_LAB").as_deref() == Ok("1") {
            panic!(
                "{test}: the lab is required but its environment is missing; run inside `scripts/lab exec`"
            );
        }
        eprintln!(
            "SKIPPED {test}: the lab is not up (run `scripts/lab up`, then the test inside `scripts/lab exec`; scripts/test does both)"
        );
        None
    }

    /// A lab variable (`var("dns_server")` reads `DEVVM_LAB_DNS_SERVER`); panics naming it
    /// when missing.
    pub fn var(&self, name: &str) -> &str {
        self.vars.get(name).map(String::as_str).unwrap_or_else(|| {
            panic!(
                "lab variable DEVVM_LAB_{} is not set",
                name.to_ascii_uppercase()
            )
        })
    }

    /// A user of the lab's directory who may own VMs (the first of `DEVVM_LAB_LDAP_USERS`).
    pub fn member(&self) -> UserName {
        user(
            self.var("ldap_users")
                .split_whitespace()
                .next()
                .unwrap_or("alice"),
        )
    }

    /// Writes the lab's devvm config (from `scripts/lab-config`) into `dir`, with its
    /// journal in `dir/state`, and returns its path.
    pub fn write_config(&self, dir: &Path) -> PathBuf {
        devvm_examples::lab::LabEnv::from_env()
            .expect("lab environment")
            .write_config(dir)
            .unwrap()
    }
}

/// The address and fqdn a run had leased and published, from its events (to check the
/// services for leftovers after a failed run).
pub fn run_addresses(events: &[devvm_core::Event]) -> (Option<IpAddr>, Option<String>) {
    let mut ip = None;
    let mut fqdn = None;
    for e in events {
        if let devvm_core::EventKind::StepFinished { step, result, .. } = &e.kind {
            match step {
                devvm_core::Step::Ip => ip = result["ip"].as_str().and_then(|s| s.parse().ok()),
                devvm_core::Step::Dns => fqdn = result["fqdn"].as_str().map(str::to_owned),
                _ => {}
            }
        }
    }
    (ip, fqdn)
}

/// Whether `step` finished in `events`.
pub fn finished(events: &[devvm_core::Event], step: devvm_core::Step) -> bool {
    events.iter().any(
        |e| matches!(&e.kind, devvm_core::EventKind::StepFinished { step: s, .. } if *s == step),
    )
}

/// A builder from `config` whose backend of `plan.step` fails as planned.
pub fn with_fault(
    config: &devvm_core::config::Config,
    plan: devvm_core::testkit::faults::FaultPlan,
) -> devvm_core::ProvisionerBuilder {
    let builder = config.builder().unwrap();
    let clean = builder
        .current_backends()
        .expect("the config leaves a backend unset");
    builder.backends(devvm_core::testkit::faults::inject(clean, plan))
}

/// Plants a neighbouring VM (`neighbour`) that another tool holds in the same hosts,
/// leases, zone and pool as `mem` (owner `another-tool`): a slot, a lease, a disk and an A
/// and PTR record. No rollback, deprovision or recovery may touch it. Returns how many
/// resources `mem` then holds.
pub async fn plant_neighbour(mem: &MemoryBackends) -> usize {
    use devvm_core::{DnsUpdater, ImageStore, IpAllocator, Placement, Progress, RequestId, VmName};
    let vm = VmName::new("neighbour").unwrap();
    let other = RequestId::new("another-tool").unwrap();
    let host = mem
        .placement
        .reserve(&vm, &VmSize::default(), &other)
        .await
        .unwrap();
    mem.ip.allocate(&vm, &other).await.unwrap();
    let p = Progress::discard();
    let template = TemplateName::new(TEMPLATE).unwrap();
    let t = mem.images.prepare(&template, &host, &p).await.unwrap();
    mem.images
        .create_disk(&vm, &host, &t, 40, &other, &p)
        .await
        .unwrap();
    mem.dns
        .insert_foreign(&mem.dns.fqdn(&vm), [10, 20, 0, 13].into())
        .unwrap();
    mem.held_total().unwrap()
}

/// Runs `program` with `args` and returns its stdout; panics, with its stderr, when it
/// cannot run or fails.
pub fn run_ok(program: &str, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn parse_json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// Images uploaded by a test; deleted when dropped.
pub struct Uploads {
    url: String,
    ids: Vec<String>,
}

impl Uploads {
    /// No uploads yet, to the lab's Glance.
    pub fn new(lab: &Lab) -> Self {
        Uploads {
            url: lab.var("glance_url").to_owned(),
            ids: Vec::new(),
        }
    }

    /// Uploads a qcow2 of `virtual_size` (for example `"3G"`) as `name` with `tags`.
    pub fn qcow2(&mut self, name: &str, virtual_size: &str, tags: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("img.qcow2");
        let f = file.to_string_lossy();
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &f, virtual_size],
        );
        let body = serde_json::json!({
            "name": name, "disk_format": "qcow2", "container_format": "bare",
            "visibility": "public", "tags": tags,
        })
        .to_string();
        let created = parse_json(&run_ok(
            "curl",
            &[
                "-sSf",
                "-m",
                "30",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body,
                &format!("{}/v2/images", self.url),
            ],
        ));
        let id = created["id"].as_str().unwrap_or_default().to_owned();
        assert!(!id.is_empty(), "{created}");
        self.ids.push(id.clone());
        run_ok(
            "curl",
            &[
                "-sSf",
                "-m",
                "60",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "-T",
                &f,
                &format!("{}/v2/images/{id}/file", self.url),
            ],
        );
        id
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = std::process::Command::new("curl")
                .args(["-sS", "-m", "30", "-X", "DELETE"])
                .arg(format!("{}/v2/images/{id}", self.url))
                .output();
        }
    }
}

/// An `ssh` as root to the guest at `ip` with the private key `key`, running `command`:
/// host keys not checked (a test guest), no prompts, a 10 s connect limit.
pub fn ssh(
    key: impl AsRef<std::ffi::OsStr>,
    ip: impl std::fmt::Display,
    command: &str,
) -> std::process::Command {
    let mut c = std::process::Command::new("ssh");
    c.arg("-i").arg(key).args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=5",
    ]);
    c.arg(format!("root@{ip}")).arg(command);
    c
}

/// Strings that would change a hand-written YAML document's structure, or read back as
/// something else, if any of them escaped their quoting (the cloud-config writer's
/// tests, and the real guest's cloud-init in `lab_debian`).
pub fn hostile_strings() -> Vec<String> {
    let mut v: Vec<String> = [
        "\r",
        "a\rb",
        "a\r\nruncmd: [x]",
        "a\nruncmd: [x]",
        "a\nruncmd: [x]\n",
        "\"\n- injected: true",
        "x\u{85}bootcmd: y",
        "x\u{2028}bootcmd: y",
        "x\u{2029}bootcmd: y",
        "\u{85}",
        "\u{2028}",
        "\u{2029}",
        "\u{7f}",
        "\u{feff}",
        "\u{feff}#cloud-config",
        "\u{fffe}\u{ffff}",
        "  - evil",
        "  leading",
        "trailing  ",
        "- evil",
        "-",
        "#!/bin/sh",
        "#cloud-config",
        "# comment",
        "a #b",
        "key: value",
        "key:",
        ": ",
        ":",
        "\"",
        "'",
        "\\",
        "\\\"",
        "\\n",
        "\\x41\\u0041\\N",
        "''",
        "{",
        "{a: b}",
        "[",
        "[x, y]",
        "&anchor x",
        "*alias",
        "!!python/object/apply:os.system [\"id\"]",
        "!tag",
        "|",
        "|-\n  x",
        ">",
        ">-\n  x",
        "%YAML 1.1",
        "%TAG ! tag:x:",
        "@at",
        "`id`",
        "---",
        "--- !x\ny",
        "...",
        "a\n...\nb",
        "a\n---\nb",
        "",
        " ",
        "\t",
        "\t-\tx",
        "\n",
        "\n\n",
        "line\n",
        "a\nb",
        "a\n\nb\n",
        "a\n   \nb\n",
        "  indented\nblock\n",
        "-----BEGIN X-----\nAAAA\n-----END X-----\n",
        "#!/bin/sh\necho hi\n\nexit 0\n",
        "? x",
        "?",
        "<<",
        "=",
        "~",
        "null",
        "Null",
        "yes",
        "No",
        "on",
        "OFF",
        "y",
        "true",
        "1",
        "-1",
        "0x10",
        "012",
        "0o12",
        "1e3",
        "1.5",
        ".inf",
        ".nan",
        "1:20",
        "2001-12-14",
        "\u{a0}",
        "caf\u{e9}",
        "\u{1f600}\u{1d11e}\u{10ffff}",
        "a\u{0}b",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    // Every C0 and C1 control, alone and together.
    let controls: Vec<char> = (0u32..0x20)
        .chain(0x7f..0xa0)
        .filter_map(char::from_u32)
        .collect();
    v.extend(controls.iter().map(char::to_string));
    v.push(controls.iter().collect());
    // Very long strings, with an injection at their end.
    v.push(format!("{}\nruncmd: [x]", "a".repeat(100_000)));
    v.push(format!("{}\u{2028}- x", "\u{e9}".repeat(70_000)));
    v.push("k".repeat(1023));
    v.push("k".repeat(1024));
    v.push("\"".repeat(2000));
    v
}
