//! The `devvm` command line, run as a program against the reference backends (the lab
//! versions of these flows run in scripts/test through the demo and the web test).

use std::path::Path;
use std::process::{Command, Output};

/// The reference backends' config every test suite shares, in `dir`.
fn config(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("devvm.toml");
    std::fs::write(&p, devvm_core::testkit::REFERENCE_CONFIG).expect("write config");
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

#[test]
fn hosts_migrate_drain_and_rebalance() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let out = devvm(&c, &["provision", "--user", "alice", "--name", "mover"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = devvm(&c, &["--json", "hosts"]);
    let hosts = json_lines(&out);
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    let free: u64 = hosts
        .iter()
        .map(|h| h["free_slots"].as_u64().unwrap())
        .sum();
    assert_eq!(free, 2, "3 slots of the default size, one taken: {hosts:?}");
    let from = hosts
        .iter()
        .find(|h| h["vms"] == serde_json::json!(["mover"]))
        .expect("a host holds it")["host"]
        .as_str()
        .unwrap()
        .to_owned();
    let to = if from == "host-a" { "host-b" } else { "host-a" };

    let out = devvm(&c, &["--json", "migrate", "mover", "--to", to]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.last().unwrap()["host"], to);
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "run_started" && l["operation"] == "migrate"),
        "{lines:?}"
    );

    let out = devvm(&c, &["drain", to, "--dry-run"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("would move mover from {to} to {from}")
    );
    let out = devvm(&c, &["rebalance", "--dry-run"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "nothing to move"
    );
    let out = devvm(&c, &["drain", to]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = devvm(&c, &["--json", "list"]);
    assert_eq!(json_lines(&out)[0]["host"], from.as_str());

    let out = devvm(&c, &["migrate", "nope", "--to", to]);
    assert_eq!(out.status.code(), Some(3), "not found");
}
