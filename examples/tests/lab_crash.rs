//! A real provisioner process killed with SIGKILL in the middle of a real run (the guest
//! defined and booting), then `devvm recover`: nothing is left in libvirt, the pool, the
//! seed directory, BIND, the lease database or the Chef server.
//!
//! Needs the lab (run inside `scripts/lab exec`, as scripts/test does); skips otherwise,
//! and fails instead of skipping when `DEVVM_REQUIRE_LAB=1`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use devvm_examples::lab::LabEnv;

fn lab() -> Option<LabEnv> {
    let env = LabEnv::from_env();
    if env.is_none() {
        assert!(
            std::env::var("DEVVM_REQUIRE_LAB").as_deref() != Ok("1"),
            "the lab is required but its environment is missing"
        );
        eprintln!("SKIPPED: the lab is not up (run inside scripts/lab exec)");
    }
    env
}

#[test]
fn a_provisioner_killed_mid_run_is_recovered_without_leaks() {
    let Some(env) = lab() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = env.write_config(dir.path()).unwrap();
    let name = format!("crash-{}", std::process::id());

    let mut child = Command::new(env!("CARGO_BIN_EXE_devvm"))
        .arg("--config")
        .arg(&config)
        .args(["--json", "provision", "--user", "alice", "--name", &name])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn devvm");
    // Read its events until the guest is defined and booting, then kill it outright.
    let stdout = child.stdout.take().expect("stdout");
    let mut ip = None;
    let mut killed = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let e: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        if e["type"] == "step_finished" && e["step"] == "ip" {
            ip = e["result"]["ip"].as_str().and_then(|s| s.parse().ok());
        }
        if e["type"] == "step_progress"
            && e["step"] == "domain"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("started domain"))
        {
            child.kill().expect("kill");
            killed = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(killed, "the run reached the domain step ({status})");
    assert!(
        env.domain_exists(&name),
        "the kill left a running domain to clean up"
    );
    let fqdn = format!(
        "{name}.{}",
        std::env::var("DEVVM_LAB_DNS_ZONE").unwrap_or_default()
    );
    assert!(
        !env.leftovers(&name, &fqdn, ip).is_empty(),
        "the kill left resources behind"
    );

    let rec = Command::new(env!("CARGO_BIN_EXE_devvm"))
        .arg("--config")
        .arg(&config)
        .args(["--json", "recover"])
        .output()
        .expect("devvm recover");
    assert!(
        rec.status.success(),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&rec.stdout).unwrap();
    assert_eq!(
        report["rolled_back"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let left = env.leftovers(&name, &fqdn, ip);
    assert!(left.is_empty(), "leaked after recover: {left:?}");
}
