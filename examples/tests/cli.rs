//! The `devvm` command line, run as a program against the reference backends (the lab
//! versions of these flows run in scripts/test through the demo and the web test).

use std::path::Path;
use std::process::{Command, Output};

fn config(dir: &Path) -> std::path::PathBuf {
    let text = r#"
state_dir = "state"
[defaults]
template = "debian-12"
[users]
backend = "memory"
accounts = [{ name = "alice" }, { name = "mallory", may_own_vms = false }]
[placement]
backend = "memory"
state_file = "placement.json"
hosts = [{ id = "h1", vcpus = 8, memory_mib = 20480, disk_gib = 200 }]
[ip]
backend = "memory"
subnet = "10.20.0.0/28"
state_file = "ip.json"
[dns]
backend = "memory"
zone = "lab.example"
state_file = "dns.json"
[images]
backend = "memory"
templates = ["debian-12"]
state_file = "disks.json"
[hypervisor]
backend = "memory"
state_file = "domains.json"
[bootstrap]
backend = "memory"
state_file = "bootstrap.json"
"#;
    let p = dir.join("devvm.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

fn devvm(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devvm"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run devvm")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[test]
fn provision_list_deprovision_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let out = devvm(
        &c,
        &["--json", "provision", "--user", "alice", "--name", "web-1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(
        lines.first().map(|l| l["type"].clone()),
        Some("run_started".into())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "step_finished" && l["step"] == "dns")
    );
    let last = lines.last().expect("no output");
    assert_eq!(last["vm"]["fqdn"], "web-1.lab.example");

    let out = devvm(&c, &["--json", "list"]);
    let vms = json_lines(&out);
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["name"], "web-1");

    let out = devvm(&c, &["deprovision", "web-1"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "web-1 removed");
    let out = devvm(&c, &["list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no vms");
}

#[test]
fn errors_are_one_line_with_an_exit_code_per_kind() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    for (args, code, needle) in [
        (vec!["provision", "--user", "nobody"], 3, "no user nobody"),
        (vec!["provision", "--user", "mallory"], 7, "may not own vms"),
        (vec!["provision", "--user", "x*"], 5, "user name"),
        (vec!["deprovision", "ghost"], 3, "no vm named ghost"),
    ] {
        let out = devvm(&c, &args);
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("devvm: ") && last.contains(needle),
            "{args:?}: {err}"
        );
    }
    let out = devvm(Path::new("/nonexistent/devvm.toml"), &["list"]);
    assert_eq!(out.status.code(), Some(3));
    let out = devvm(&c, &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn recover_and_images_sync_report() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let out = devvm(&c, &["recover"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "completed 0, rolled back 0, removed 0"
    );
    let out = devvm(&c, &["--json", "images", "sync"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_lines(&out)[0]["template"], "debian-12");
}
