//! `devvm db import --from sqlite`, as a program, against the lab's PostgreSQL: the leases
//! of an SQLite lease database arrive with their owners, a second import adds nothing,
//! and a config whose `[ip]` is not `postgres` is refused; a real VM's journal and
//! placement slot move too, and a provisioner sharing PostgreSQL then removes it.
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
        "DELETE FROM devvm_ip_addresses WHERE subnet = '{subnet}'; DELETE FROM devvm_ip_free WHERE subnet = '{subnet}'; DELETE FROM devvm_ip_plans WHERE subnet = '{subnet}';"
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

/// A team grows without re-provisioning: a real VM made with the embedded state (SQLite
/// journal and placement database) moves into PostgreSQL with `devvm db import --journal
/// DIR --placement FILE`; a provisioner with a state directory of its own and everything
/// shared in PostgreSQL then lists it and removes it without a trace. Importing again
/// adds nothing; a journal with an unfinished run is refused.
#[test]
fn db_import_moves_a_real_vm_with_its_journal_and_slot() {
    let Some(env) = devvm_examples::lab::LabEnv::from_env() else {
        assert!(
            std::env::var("DEVVM_REQUIRE_LAB").as_deref() != Ok("1"),
            "the lab is required but its environment is missing"
        );
        eprintln!("SKIPPED: the lab is not up (run inside scripts/lab exec)");
        return;
    };
    let (Some(url), Some(pw)) = (var("PG_URL"), var("PG_PASSWORD_FILE")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lab_config = std::fs::read_to_string(env.write_config(dir.path()).unwrap()).unwrap();
    let shared_placement = format!(
        "path = \"{}\"",
        env.dir.join("devvm-shared/placement.sqlite3").display()
    );
    assert!(
        lab_config.contains(&shared_placement),
        "lab-config's placement path changed"
    );
    let db = format!("{{ url = \"{url}\", password = {{ file = \"{pw}\" }} }}");
    let old_placement = dir.path().join("old-placement.sqlite3");
    let old = dir.path().join("old.toml");
    std::fs::write(
        &old,
        lab_config.replace(
            &shared_placement,
            &format!("path = \"{}\"", old_placement.display()),
        ),
    )
    .unwrap();
    let new = dir.path().join("new.toml");
    let new_state = dir.path().join("new-state");
    std::fs::write(
        &new,
        lab_config
            .replace(&shared_placement, &format!("database = {db}"))
            .replace(
                &format!("state_dir = \"{}\"", dir.path().join("state").display()),
                &format!("state_dir = \"{}\"", new_state.display()),
            )
            + &format!("\n[journal]\ndatabase = {db}\n"),
    )
    .unwrap();
    let devvm = |config: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_devvm"))
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .expect("run devvm")
    };
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let name = format!("imported-{}", std::process::id());
    let made = ok(&devvm(
        &old,
        &["--json", "provision", "--user", "alice", "--name", &name],
    ));
    let vm: serde_json::Value = made
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| match v.get("type") {
            None if v.get("fqdn").is_some() => Some(v),
            Some(t) if t == "run_finished" => v.get("provisioned").cloned(),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no vm in {made}"));
    let (fqdn, ip) = (
        vm["fqdn"].as_str().unwrap().to_owned(),
        vm["ip"].as_str().unwrap().parse().unwrap(),
    );

    let import = |extra: &[&str]| {
        let journal = dir.path().join("state");
        let mut args = vec!["--json", "db", "import", "--from", "sqlite", "--journal"];
        args.push(journal.to_str().unwrap());
        args.extend(["--placement", old_placement.to_str().unwrap()]);
        args.extend(extra);
        devvm(&new, &args)
    };
    let first: serde_json::Value = serde_json::from_str(&ok(&import(&[]))).unwrap();
    assert_eq!(
        first["journal"],
        serde_json::json!({"vms": 1, "added": 1}),
        "{first}"
    );
    assert_eq!(first["placement"]["added"], 1, "{first}");
    let again: serde_json::Value = serde_json::from_str(&ok(&import(&[]))).unwrap();
    assert_eq!(again["journal"]["added"], 0, "{again}");
    assert_eq!(again["placement"]["added"], 0, "{again}");

    // The new provisioner (its own, empty local state) knows the VM from PostgreSQL.
    let listed = ok(&devvm(&new, &["--json", "list"]));
    assert!(listed.contains(&name), "{listed}");
    assert!(
        !new_state.join("journal.sqlite3").exists(),
        "no local journal is used"
    );
    ok(&devvm(&new, &["deprovision", &name]));
    let left = env.leftovers(&name, &fqdn, Some(ip));
    assert!(left.is_empty(), "leaked: {left:?}");
    let listed = ok(&devvm(&new, &["--json", "list"]));
    assert!(!listed.contains(&name), "{listed}");

    // A journal with an unfinished run is refused, and nothing is imported from it.
    let out = Command::new("sqlite3")
        .arg(dir.path().join("state/journal.sqlite3"))
        .arg("UPDATE runs SET state = 'running'")
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = import(&[]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "a conflict: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("recover"));
}

/// Two provisioner processes (the CLI, each with a local state directory of its own)
/// sharing leases, placement slots and the journal in PostgreSQL provision into the lab's
/// hosts at the same time: distinct addresses, both answer, each lists both, and each
/// removes the other's VM without a trace.
#[test]
fn two_cli_processes_share_one_postgres() {
    let Some(env) = devvm_examples::lab::LabEnv::from_env() else {
        assert!(
            std::env::var("DEVVM_REQUIRE_LAB").as_deref() != Ok("1"),
            "the lab is required but its environment is missing"
        );
        eprintln!("SKIPPED: the lab is not up (run inside scripts/lab exec)");
        return;
    };
    let (Some(url), Some(pw)) = (var("PG_URL"), var("PG_PASSWORD_FILE")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lab_config = std::fs::read_to_string(env.write_config(dir.path()).unwrap()).unwrap();
    let db = format!("{{ url = \"{url}\", password = {{ file = \"{pw}\" }} }}");
    let sqlite_ip = format!(
        "backend = \"sqlite\"\npath = \"{}\"\n",
        env.dir.join("devvm-shared/leases.sqlite3").display()
    );
    let shared_placement = format!(
        "path = \"{}\"",
        env.dir.join("devvm-shared/placement.sqlite3").display()
    );
    assert!(lab_config.contains(&sqlite_ip) && lab_config.contains(&shared_placement));
    // Only .50-.59 of the lab's subnet in PostgreSQL (the lab's SQLite leases reserve
    // .2-.99, so the two stores never collide; the same plan as the library's test).
    let shared = lab_config
        .replace(
            &sqlite_ip,
            &format!("backend = \"postgres\"\nurl = \"{url}\"\npassword = {{ file = \"{pw}\" }}\n"),
        )
        .replace(
            "reserved = [\"10.99.0.2-10.99.0.99\", \"10.99.0.200-10.99.0.254\"]",
            "reserved = [\"10.99.0.2-10.99.0.49\", \"10.99.0.60-10.99.0.254\"]",
        )
        .replace(&shared_placement, &format!("database = {db}"))
        + &format!("\n[journal]\ndatabase = {db}\n");
    let state = format!("state_dir = \"{}\"", dir.path().join("state").display());
    assert!(shared.contains(&state));
    let configs: Vec<std::path::PathBuf> = ["machine-a", "machine-b"]
        .iter()
        .map(|m| {
            let path = dir.path().join(format!("{m}.toml"));
            let text = shared.replace(
                &state,
                &format!("state_dir = \"{}\"", dir.path().join(m).display()),
            );
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect();
    let names: Vec<String> = ["a", "b"]
        .iter()
        .map(|m| format!("two-{m}-{}", std::process::id()))
        .collect();
    let children: Vec<_> = configs
        .iter()
        .zip(&names)
        .map(|(c, n)| {
            Command::new(env!("CARGO_BIN_EXE_devvm"))
                .arg("--config")
                .arg(c)
                .args(["--json", "provision", "--user", "alice", "--name", n])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn devvm")
        })
        .collect();
    let vms: Vec<serde_json::Value> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find_map(|v| match v.get("type") {
                    None if v.get("fqdn").is_some() => Some(v),
                    Some(t) if t == "run_finished" => v.get("provisioned").cloned(),
                    _ => None,
                })
                .expect("the vm")
        })
        .collect();
    assert_ne!(vms[0]["ip"], vms[1]["ip"], "distinct addresses");
    for v in &vms {
        let ip: std::net::IpAddr = v["ip"].as_str().unwrap().parse().unwrap();
        assert!(
            devvm_examples::lab::ssh_answers(ip, std::time::Duration::from_secs(60)),
            "ssh on {ip}"
        );
    }
    let devvm = |config: &std::path::Path, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_devvm"))
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .expect("run devvm");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for c in &configs {
        let listed = devvm(c, &["--json", "list"]);
        for n in &names {
            assert!(listed.contains(n.as_str()), "{listed}");
        }
    }
    // Each removes the other's.
    devvm(&configs[1], &["deprovision", &names[0]]);
    devvm(&configs[0], &["deprovision", &names[1]]);
    for v in &vms {
        let ip = v["ip"].as_str().unwrap().parse().ok();
        let left = env.leftovers(v["name"].as_str().unwrap(), v["fqdn"].as_str().unwrap(), ip);
        assert!(left.is_empty(), "leaked: {left:?}");
    }
}
