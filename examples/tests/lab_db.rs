//! `devvm db import --from sqlite`, as a program, against the lab's PostgreSQL: the leases
//! of an SQLite lease database arrive with their owners, a second import adds nothing,
//! and a config whose `[ip]` is not `postgres` is refused.
//!
//! Needs the lab (run inside `scripts/lab exec`, as scripts/test does); skips otherwise,
//! and fails instead of skipping when `DEVVM_REQUIRE_LAB=1`.

use std::process::Command;

use devvm_core::backends::sqlite_ip::{SqliteIpAllocator, SubnetPlan};
use devvm_core::{IpAllocator, RequestId, VmName};

fn var(k: &str) -> Option<String> {
    let v = std::env::var(format!("DEVVM_LAB_{k}")).ok();
    if v.is_none() {
        assert!(
            std::env::var("DEVVM_REQUIRE_LAB").as_deref() != Ok("1"),
            "the lab is required but its environment is missing"
        );
        eprintln!("SKIPPED: the lab is not up (run inside scripts/lab exec)");
    }
    v
}

#[tokio::test]
async fn db_import_moves_sqlite_leases_into_postgres() {
    let (Some(url), Some(pw)) = (var("PG_URL"), var("PG_PASSWORD_FILE")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A /28 of its own.
    let r = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    let b = r.as_bytes();
    let subnet = format!("10.{}.{}.{}/28", 128 + b[0] % 100, b[1], (b[2] % 16) * 16);
    let lite = SqliteIpAllocator::open(
        dir.path().join("leases.sqlite3"),
        SubnetPlan::new(subnet.parse().unwrap(), None).unwrap(),
    )
    .unwrap();
    lite.allocate(
        &VmName::new("imported").unwrap(),
        &RequestId::new("old-run").unwrap(),
    )
    .await
    .unwrap();
    let config = dir.path().join("devvm.toml");
    let reference = devvm_core::testkit::REFERENCE_CONFIG;
    let memory_ip = "[ip]\nbackend = \"memory\"\nsubnet = \"10.20.0.0/28\"\ngateway = \"10.20.0.1\"\nstate_file = \"ip.json\"";
    assert!(
        reference.contains(memory_ip),
        "the reference [ip] section changed"
    );
    std::fs::write(
        &config,
        reference.replace(
            memory_ip,
            &format!("[ip]\nbackend = \"postgres\"\nurl = \"{url}\"\npassword = {{ file = \"{pw}\" }}\nsubnet = \"{subnet}\""),
        ),
    )
    .unwrap();
    let import = || {
        Command::new(env!("CARGO_BIN_EXE_devvm"))
            .arg("--config")
            .arg(&config)
            .args(["--json", "db", "import", "--from", "sqlite"])
            .arg(dir.path().join("leases.sqlite3"))
            .output()
            .expect("run devvm")
    };
    let out = import();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"added":1,"leases":1}"#
    );
    let out = import();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"added":0,"leases":1}"#
    );

    // The reference config keeps [ip] in memory: refused, with the reason.
    let memory = dir.path().join("memory.toml");
    std::fs::write(&memory, reference).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_devvm"))
        .arg("--config")
        .arg(&memory)
        .args(["db", "import", "--from", "sqlite"])
        .arg(dir.path().join("leases.sqlite3"))
        .output()
        .expect("run devvm");
    assert_eq!(out.status.code(), Some(5), "invalid input");
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres"));

    // Clean up this subnet's rows (with psql, not devvm).
    let pwd = std::fs::read_to_string(&pw).unwrap();
    let sql = format!(
        "DELETE FROM devvm_ip_addresses WHERE subnet = '{subnet}'; DELETE FROM devvm_ip_plans WHERE subnet = '{subnet}';"
    );
    let out = Command::new("/usr/lib/postgresql/15/bin/psql")
        .env("PGPASSWORD", pwd.trim())
        .args(["-qAt", "-d", &url, "-c", &sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
