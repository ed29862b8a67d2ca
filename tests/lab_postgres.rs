//! The PostgreSQL lease store against the lab's PostgreSQL: the allocator conformance
//! suite (the foreign-lease cases included), 4 allocators (each its own connection pool,
//! as separate processes would be) × 8 tasks racing for a subnet that fits them exactly,
//! a wrong password and a database that is down, a plan that changed, and the store
//! selected by a config in the real pipeline. With the journal there too: two
//! provisioners with local state of their own share leases, slots and runs while they
//! provision into the lab's hosts, and a provisioner SIGKILLed mid-run is recovered by
//! another process.
//!
//! Each test works in a subnet of its own (random), so tests and runs never share rows;
//! the rows are deleted afterwards with psql.

use std::path::Path;
use std::sync::Arc;

use devvm_core::backends::postgres::{PostgresIpAllocator, PostgresIpConfig};
use devvm_core::testkit::conformance::{IpAllocatorFixture, ip_allocator};
use devvm_core::{ErrorKind, IpAllocator, Provisioner, RequestId, VmName};
use devvm_tests::Lab;

/// A random /`prefix` subnet of 10.128.0.0/9 no other test run uses.
fn random_subnet(prefix: u8) -> String {
    let r = u32::from_le_bytes(*uuid_bytes().first_chunk::<4>().expect("4 bytes"));
    let base = 0x0a80_0000u32 | (r & 0x007f_ffff);
    let mask = u32::MAX << (32 - prefix);
    format!("{}/{prefix}", std::net::Ipv4Addr::from(base & mask))
}

fn uuid_bytes() -> Vec<u8> {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("a random uuid")
        .bytes()
        .collect()
}

fn config(lab: &Lab, subnet: &str, extra: &str) -> PostgresIpConfig {
    toml::from_str(&format!(
        "url = \"{}\"\npassword = {{ file = \"{}\" }}\nsubnet = \"{subnet}\"\n{extra}",
        lab.var("pg_url"),
        lab.var("pg_password_file"),
    ))
    .expect("postgres config")
}

async fn store(c: &PostgresIpConfig) -> PostgresIpAllocator {
    let s = PostgresIpAllocator::from_config(c, Path::new("/")).expect("store");
    s.migrate().await.expect("migrate");
    s
}

/// Runs `sql` with psql (not the store) and returns its output.
fn psql(lab: &Lab, sql: &str) -> String {
    let pw = std::fs::read_to_string(lab.var("pg_password_file")).expect("password");
    let out = std::process::Command::new("/usr/lib/postgresql/15/bin/psql")
        .env("PGPASSWORD", pw.trim())
        .args(["-qAt", "-d", lab.var("pg_url"), "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Deletes what a test left of `subnet`.
fn forget(lab: &Lab, subnet: &str) {
    psql(
        lab,
        &format!(
            "DELETE FROM devvm_ip_addresses WHERE subnet = '{subnet}'; DELETE FROM devvm_ip_free WHERE subnet = '{subnet}'; DELETE FROM devvm_ip_plans WHERE subnet = '{subnet}';"
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_postgres_allocator_conforms() {
    let Some(lab) = Lab::get("the_postgres_allocator_conforms") else {
        return;
    };
    let subnet = random_subnet(28);
    // A /28: 14 hosts, minus the gateway (the first) and two reserved: 11.
    let first = |n: u32| {
        let net: ipnet::Ipv4Net = subnet.parse().expect("subnet");
        std::net::Ipv4Addr::from(u32::from(net.network()) + n)
    };
    let c = config(
        &lab,
        &subnet,
        &format!(
            "gateway = \"{}\"\nreserved = [\"{}-{}\"]\n",
            first(1),
            first(2),
            first(3)
        ),
    );
    let s = store(&c).await;
    ip_allocator(
        Arc::new(s.clone()),
        IpAllocatorFixture {
            capacity: Some(11),
            concurrency: 8,
        },
    )
    .await;
    forget(&lab, &subnet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_allocators_times_eight_tasks_fill_the_subnet_exactly() {
    let Some(lab) = Lab::get("four_allocators_times_eight_tasks_fill_the_subnet_exactly") else {
        return;
    };
    let subnet = random_subnet(26);
    let net: ipnet::Ipv4Net = subnet.parse().unwrap();
    let in_net = |ip: std::net::IpAddr| matches!(ip, std::net::IpAddr::V4(v4) if net.contains(&v4));
    let at = |n: u32| std::net::Ipv4Addr::from(u32::from(net.network()) + n);
    // 62 hosts, minus the gateway and 29 reserved: exactly 32.
    let c = config(
        &lab,
        &subnet,
        &format!(
            "gateway = \"{}\"\nreserved = [\"{}-{}\"]\n",
            at(1),
            at(2),
            at(30)
        ),
    );
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(store(&c).await);
    }
    let owner = RequestId::new("race").unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in stores.iter().enumerate() {
        for j in 0..8 {
            let (s, owner) = (s.clone(), owner.clone());
            tasks.spawn(async move {
                let vm = VmName::new(format!("race-{i}-{j}")).unwrap();
                s.allocate(&vm, &owner).await
            });
        }
    }
    let mut ips = std::collections::BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        let lease = r.unwrap().expect("every one of the 32 gets an address");
        assert!(in_net(lease.ip), "{lease:?}");
        assert!(ips.insert(lease.ip), "{} handed out twice", lease.ip);
    }
    assert_eq!(ips.len(), 32);
    assert_eq!(stores[0].count().await.unwrap(), 32);
    let e = stores[1]
        .allocate(&VmName::new("race-one-more").unwrap(), &owner)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    forget(&lab, &subnet);
}

#[tokio::test]
async fn bad_credentials_a_database_down_and_a_changed_plan_are_clear_errors() {
    let Some(lab) = Lab::get("bad_credentials_a_database_down_and_a_changed_plan_are_clear_errors")
    else {
        return;
    };
    let subnet = random_subnet(28);
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let mut c = config(&lab, &subnet, "");
    c.password = Some(devvm_core::config::SecretSpec::File(wrong));
    let s = PostgresIpAllocator::from_config(&c, Path::new("/")).unwrap();
    let e = s.migrate().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(!format!("{e:?}").contains("not-the-password"));

    let mut down = config(&lab, &subnet, "timeout_secs = 2\n");
    down.url = lab.var("pg_url").replace(":5433/", ":1/");
    let s = PostgresIpAllocator::from_config(&down, Path::new("/")).unwrap();
    let e = s.migrate().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());

    let mut inline = config(&lab, &subnet, "");
    inline.url = lab.var("pg_url").replace("devvm@", "devvm:secret@");
    let e = PostgresIpAllocator::from_config(&inline, Path::new("/")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");

    // The same subnet with another plan is refused, and the first plan's leases stay.
    let s = store(&config(&lab, &subnet, "")).await;
    let vm = VmName::new("planned").unwrap();
    let owner = RequestId::new("plan-test").unwrap();
    s.allocate(&vm, &owner).await.unwrap();
    let net: ipnet::Ipv4Net = subnet.parse().unwrap();
    let gw = std::net::Ipv4Addr::from(u32::from(net.network()) + 1);
    let other = PostgresIpAllocator::from_config(
        &config(&lab, &subnet, &format!("gateway = \"{gw}\"\n")),
        Path::new("/"),
    )
    .unwrap();
    let e = other.migrate().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(s.lease(&vm).await.unwrap().is_some());
    forget(&lab, &subnet);
}

/// A statement that waits on a lock another session holds (and never gives back: an
/// uncommitted lease of the same vm) is ended by the store's statement time limit: a
/// retryable timeout, and the lease it was making is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_stuck_on_a_lock_times_out_and_changes_nothing() {
    use std::io::{BufRead, BufReader, Write};
    let Some(lab) = Lab::get("a_statement_stuck_on_a_lock_times_out_and_changes_nothing") else {
        return;
    };
    let subnet = random_subnet(28);
    let s = store(&config(&lab, &subnet, "timeout_secs = 1\n")).await;
    let owner = RequestId::new("stuck-test").unwrap();
    s.allocate(&VmName::new("first").unwrap(), &owner)
        .await
        .unwrap();
    // Another session is recording a lease of the same vm and holds it, uncommitted,
    // until it is ended: our lease of that vm must wait for it (a unique key).
    let pw = std::fs::read_to_string(lab.var("pg_password_file")).expect("password");
    let mut holder = std::process::Command::new("/usr/lib/postgresql/15/bin/psql")
        .env("PGPASSWORD", pw.trim())
        .args(["-qAt", "-d", lab.var("pg_url")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    let mut input = holder.stdin.take().expect("stdin");
    writeln!(
        input,
        "BEGIN; INSERT INTO devvm_ip_addresses (subnet, ip, vm, owner) \
         VALUES ('{subnet}', network('{subnet}'::cidr) - '0.0.0.0'::inet, 'second', 'holder'); \
         SELECT 'locked';"
    )
    .unwrap();
    input.flush().unwrap();
    let mut lines = BufReader::new(holder.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("psql answers").unwrap(), "locked");

    let second = VmName::new("second").unwrap();
    let e = s
        .allocate(&second, &owner)
        .await
        .expect_err("stuck on the lock");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.is_retryable());
    // Ended by pid; its transaction is rolled back with it.
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(s.lease(&second).await.unwrap(), None, "nothing was leased");
    assert!(
        s.allocate(&second, &owner).await.is_ok(),
        "and it works again"
    );
    forget(&lab, &subnet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_selects_it_in_the_pipeline() {
    let Some(lab) = Lab::get("a_config_selects_it_in_the_pipeline") else {
        return;
    };
    let subnet = random_subnet(28);
    let dir = tempfile::tempdir().unwrap();
    let text = devvm_tests::REFERENCE_CONFIG.replace(
        "[ip]\nbackend = \"memory\"\nsubnet = \"10.20.0.0/28\"\ngateway = \"10.20.0.1\"\nstate_file = \"ip.json\"",
        &format!(
            "[ip]\nbackend = \"postgres\"\nurl = \"{}\"\npassword = {{ file = \"{}\" }}\nsubnet = \"{subnet}\"",
            lab.var("pg_url"),
            lab.var("pg_password_file")
        ),
    );
    assert!(
        text.contains("backend = \"postgres\""),
        "the reference [ip] section changed"
    );
    let path = dir.path().join("devvm.toml");
    std::fs::write(&path, text).unwrap();
    let p = devvm_core::Provisioner::from_config(&path).unwrap();
    assert_eq!(p.backends().ip.backend(), "postgres");
    let vm = p
        .provision(devvm_core::ProvisionRequest::new(devvm_tests::user(
            "alice",
        )))
        .await
        .unwrap();
    let net: ipnet::Ipv4Net = subnet.parse().unwrap();
    assert!(
        matches!(vm.ip, std::net::IpAddr::V4(v4) if net.contains(&v4)),
        "{vm:?}"
    );
    let held = psql(
        &lab,
        &format!("SELECT vm FROM devvm_ip_addresses WHERE subnet = '{subnet}' AND vm IS NOT NULL"),
    );
    assert_eq!(held, vm.name.as_str(), "asked of PostgreSQL");
    p.deprovision(&vm.name).await.unwrap();
    let held = psql(
        &lab,
        &format!(
            "SELECT count(*) FROM devvm_ip_addresses WHERE subnet = '{subnet}' AND vm IS NOT NULL"
        ),
    );
    assert_eq!(held, "0", "the lease is released");
    forget(&lab, &subnet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_leases_move_to_postgres_with_their_owners_all_or_nothing() {
    use devvm_core::backends::sqlite_ip::{SqliteIpAllocator, SubnetPlan};
    let Some(lab) = Lab::get("sqlite_leases_move_to_postgres_with_their_owners_all_or_nothing")
    else {
        return;
    };
    let subnet = random_subnet(28);
    let dir = tempfile::tempdir().unwrap();
    let plan = SubnetPlan::new(subnet.parse().unwrap(), None).unwrap();
    let lite = SqliteIpAllocator::open(dir.path().join("leases.sqlite3"), plan).unwrap();
    let (a, b) = (
        VmName::new("moved-a").unwrap(),
        VmName::new("moved-b").unwrap(),
    );
    let (ra, rb) = (
        RequestId::new("run-a").unwrap(),
        RequestId::new("run-b").unwrap(),
    );
    let la = lite.allocate(&a, &ra).await.unwrap();
    let lb = lite.allocate(&b, &rb).await.unwrap();
    let leases = lite.leases().await.unwrap();
    assert_eq!(leases.len(), 2);

    let pg = store(&config(&lab, &subnet, "")).await;
    // Someone else holds b's address in PostgreSQL already: nothing is imported.
    let squatter = VmName::new("squatter").unwrap();
    let std::net::IpAddr::V4(b_ip) = lb.ip else {
        panic!("an IPv4 lease")
    };
    let clash = vec![(squatter.clone(), b_ip, None)];
    assert_eq!(pg.import(&clash).await.unwrap(), 1);
    let e = pg.import(&leases).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(pg.lease(&a).await.unwrap().is_none(), "all or nothing");
    let them = RequestId::new("someone").unwrap();
    assert!(matches!(
        pg.release(&squatter, &them).await.unwrap(),
        devvm_core::Undone::Foreign { .. }
    ));
    forget(&lab, &subnet);

    let pg = store(&config(&lab, &subnet, "")).await;
    assert_eq!(pg.import(&leases).await.unwrap(), 2);
    assert_eq!(
        pg.import(&leases).await.unwrap(),
        0,
        "importing again changes nothing"
    );
    assert_eq!(pg.lease(&a).await.unwrap().map(|l| l.ip), Some(la.ip));
    // The owners came along: only the run that made a lease releases it.
    assert!(matches!(
        pg.release(&a, &rb).await.unwrap(),
        devvm_core::Undone::Foreign { .. }
    ));
    assert_eq!(
        pg.release(&a, &ra).await.unwrap(),
        devvm_core::Undone::Removed
    );
    // A new allocation does not reuse an imported address.
    let c = pg
        .allocate(&VmName::new("moved-c").unwrap(), &ra)
        .await
        .unwrap();
    assert_ne!(c.ip, lb.ip);
    forget(&lab, &subnet);
}

/// Placement reservations in PostgreSQL: the placement conformance suite (a slot of
/// another owner survives, and so on), over the lab's hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_reservations_in_postgres_conform() {
    use devvm_core::backends::placement::{Capacity, LibvirtLister, LibvirtPlacement};
    use devvm_core::backends::postgres::PostgresDatabase;
    use devvm_core::backends::postgres::reservations::PostgresReservations;
    use devvm_core::testkit::conformance::{PlacementFixture, placement};
    let Some(lab) = Lab::get("placement_reservations_in_postgres_conform") else {
        return;
    };
    let db = PostgresDatabase {
        url: lab.var("pg_url").to_owned(),
        password: Some(devvm_core::config::SecretSpec::File(
            lab.var("pg_password_file").into(),
        )),
        max_connections: 4,
        timeout_secs: 10,
    };
    let size = devvm_core::VmSize {
        vcpus: 1,
        memory_mib: 64,
        disk_gib: 1,
    };
    let hosts = lab
        .var("host_uris")
        .split_whitespace()
        .map(|u| {
            (
                devvm_core::HostId::new(u).unwrap(),
                Capacity::slots(500, size),
            )
        })
        .collect();
    let store = PostgresReservations::new(&db, Path::new("/")).unwrap();
    let p = LibvirtPlacement::with_store(hosts, Arc::new(LibvirtLister), Arc::new(store)).unwrap();
    placement(
        Arc::new(p),
        PlacementFixture {
            capacity: None,
            size,
        },
    )
    .await;
}

/// Two provisioners with state directories of their own share leases and placement in
/// PostgreSQL and provision into the lab's hosts at the same time: distinct addresses,
/// both VMs answer, and both are removed without a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_provisioners_share_one_postgres() {
    use devvm_examples::lab::{LabEnv, ssh_answers};
    let Some(lab) = Lab::get("two_provisioners_share_one_postgres") else {
        return;
    };
    let env = LabEnv::from_env().expect("lab env");
    let url = lab.var("pg_url");
    let pw = lab.var("pg_password_file");
    let mut provisioners = Vec::new();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for dir in &dirs {
        let config = lab.write_config(dir.path());
        let mut table: toml::Table =
            toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        // Leases of the lab's subnet and placement slots in the lab's PostgreSQL.
        let ip = table["ip"].as_table_mut().unwrap();
        ip.insert("backend".into(), "postgres".into());
        ip.remove("path");
        // Only .50-.59 of the lab's subnet: no other test (nor the lab's SQLite leases,
        // which reserve .2-.99) hands those out, so the two stores never collide.
        ip.insert(
            "reserved".into(),
            toml::Value::Array(vec![
                "10.99.0.2-10.99.0.49".into(),
                "10.99.0.60-10.99.0.254".into(),
            ]),
        );
        ip.insert("url".into(), url.into());
        let password: toml::Table = toml::from_str(&format!("file = \"{pw}\"")).unwrap();
        ip.insert("password".into(), toml::Value::Table(password.clone()));
        let placement = table["placement"].as_table_mut().unwrap();
        placement.remove("path");
        let mut database = toml::Table::new();
        database.insert("url".into(), url.into());
        database.insert("password".into(), toml::Value::Table(password));
        placement.insert("database".into(), toml::Value::Table(database.clone()));
        // And one journal: each sees the other's runs; only their local state differs.
        let mut journal = toml::Table::new();
        journal.insert("database".into(), toml::Value::Table(database));
        table.insert("journal".into(), toml::Value::Table(journal));
        let path = dir.path().join("shared.toml");
        std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
        provisioners.push(devvm_core::Provisioner::from_config(&path).unwrap());
    }
    let (a, b) = (provisioners[0].clone(), provisioners[1].clone());
    let (na, nb) = (
        devvm_core::testkit::unique_vm_name("shared-a"),
        devvm_core::testkit::unique_vm_name("shared-b"),
    );
    let (ra, rb) = tokio::join!(
        a.provision(devvm_core::ProvisionRequest::new(lab.member()).with_name(na.clone())),
        b.provision(devvm_core::ProvisionRequest::new(lab.member()).with_name(nb.clone())),
    );
    let (va, vb) = (ra.expect("provision a"), rb.expect("provision b"));
    assert_ne!(
        va.ip, vb.ip,
        "one subnet, two provisioners, distinct addresses"
    );
    for v in [&va, &vb] {
        assert!(
            ssh_answers(v.ip, std::time::Duration::from_secs(60)),
            "ssh on {}",
            v.ip
        );
        assert_eq!(env.dns_a(&v.fqdn), vec![v.ip.to_string()]);
    }
    // One journal: each lists the other's VM, and a name held by one is refused by the
    // other.
    assert_eq!(a.get(&nb).await.unwrap().map(|v| v.ip), Some(vb.ip));
    assert_eq!(b.get(&na).await.unwrap().map(|v| v.ip), Some(va.ip));
    let e = b
        .provision(devvm_core::ProvisionRequest::new(lab.member()).with_name(na.clone()))
        .await
        .expect_err("the name is a's");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let held = psql(
        &lab,
        &format!("SELECT count(*) FROM devvm_placement WHERE vm IN ('{na}', '{nb}')"),
    );
    assert_eq!(held, "2", "both slots in PostgreSQL");
    // Either may remove either VM: b removes a's.
    b.deprovision(&na).await.unwrap();
    a.deprovision(&nb).await.unwrap();
    for v in [&va, &vb] {
        let left: Vec<String> = env
            .leftovers(v.name.as_str(), &v.fqdn, None)
            .into_iter()
            .collect();
        assert!(left.is_empty(), "{} leaked: {left:?}", v.name);
    }
    let held = psql(
        &lab,
        &format!("SELECT count(*) FROM devvm_placement WHERE vm IN ('{na}', '{nb}')"),
    );
    assert_eq!(held, "0");
}

/// A provisioner process SIGKILLed at every step boundary of a provision, its journal in
/// the lab's PostgreSQL, is recovered by *another* process with a local state directory
/// of its own: once the dead one's heartbeat row expires (its time to live is 1 s here),
/// recover() claims the run and rolls it back, or completes it if every step had
/// finished; nothing is left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioner_killed_mid_run_is_recovered_by_another_process() {
    use std::os::unix::process::ExitStatusExt;
    let Some(lab) = Lab::get("a_provisioner_killed_mid_run_is_recovered_by_another_process") else {
        return;
    };
    let journal = format!(
        "\n[journal]\nowner_ttl_secs = 1\ndatabase = {{ url = \"{}\", password = {{ file = \"{}\" }} }}\n",
        lab.var("pg_url"),
        lab.var("pg_password_file")
    );
    for step in devvm_core::Step::ALL {
        for when in ["before", "after"] {
            let ctx = format!("killed {when} {step}");
            let dir = tempfile::tempdir().unwrap();
            // One set of (reference) backends, two machines' worth of local state.
            let base = std::fs::read_to_string(devvm_tests::write_config(dir.path())).unwrap();
            assert!(
                base.contains("state_dir = \"state\""),
                "the reference config changed"
            );
            let config_for = |state: &str| {
                let path = dir.path().join(format!("{state}.toml"));
                let text =
                    base.replace("state_dir = \"state\"", &format!("state_dir = \"{state}\""));
                std::fs::write(&path, text + &journal).unwrap();
                path
            };
            let (child_config, other_config) = (config_for("machine-a"), config_for("machine-b"));
            let run = uuid_bytes()[..8]
                .iter()
                .map(|b| char::from(*b))
                .collect::<String>();
            let status = std::process::Command::new(env!("CARGO_BIN_EXE_devvm-crash-child"))
                .env("DEVVM_CRASH_RUN", &run)
                .args([
                    child_config.as_os_str(),
                    "provision".as_ref(),
                    step.as_str().as_ref(),
                    when.as_ref(),
                ])
                .status()
                .expect("spawn child");
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{ctx}: {status}");

            let p = Provisioner::from_config(&other_config).unwrap();
            // The dead process's run is left alone until its heartbeat expires.
            let settle = async {
                loop {
                    let r = p.recover().await.unwrap();
                    assert!(
                        r.still_held.is_empty() && r.unreadable.is_empty(),
                        "{ctx}: {r:?}"
                    );
                    // This run's recovery (the shared journal may hold others').
                    let mine = r
                        .rolled_back
                        .iter()
                        .any(|id| id.as_str() == format!("crash-run-{run}"))
                        || r.completed
                            .iter()
                            .any(|v| v.name.as_str() == format!("crashy-{run}"));
                    if mine {
                        return r;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            };
            let report = tokio::time::timeout(std::time::Duration::from_secs(120), settle)
                .await
                .unwrap_or_else(|_| panic!("{ctx}: never recovered"));
            let held = || {
                devvm_tests::reference_backends(Some(dir.path()))
                    .held_total()
                    .unwrap()
            };
            // This run's VM only: the shared journal lists every test's.
            let vm = p
                .get(&VmName::new(format!("crashy-{run}")).unwrap())
                .await
                .unwrap();
            if !report
                .completed
                .iter()
                .any(|v| v.name.as_str() == format!("crashy-{run}"))
            {
                assert!(vm.is_none(), "{ctx}: {report:?}");
                assert_eq!(held(), 0, "{ctx}: rolled back: nothing held");
            } else {
                let vm = vm.unwrap_or_else(|| panic!("{ctx}: {report:?}"));
                assert_eq!(held(), 7, "{ctx}: one complete vm");
                p.deprovision(&vm.name).await.unwrap();
                assert_eq!(held(), 0, "{ctx}: removed");
            }
        }
    }
}

/// 4 processes × 8 tasks (each task its own connection pool) race for the addresses of
/// a /24 whose plan leaves exactly 32 of them: every task gets one, no address twice,
/// never the gateway, and the next allocation is `Exhausted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_times_eight_tasks_fill_a_24_exactly() {
    use std::io::{BufRead, BufReader};
    let Some(lab) = Lab::get("four_processes_times_eight_tasks_fill_a_24_exactly") else {
        return;
    };
    let subnet = random_subnet(24);
    let net: ipnet::Ipv4Net = subnet.parse().unwrap();
    let at = |n: u32| std::net::Ipv4Addr::from(u32::from(net.network()) + n);
    // The gateway is .1; .2-.33 (32 addresses) are leasable; the rest is reserved.
    let reserved = format!("{}-{}", at(34), at(254));
    let mut children = Vec::new();
    for p in 0..4 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_devvm-ip-child"))
            .env("DEVVM_LAB_PG_PASSWORD_FILE", lab.var("pg_password_file"))
            .args([
                lab.var("pg_url"),
                &subnet,
                &at(1).to_string(),
                "8",
                "1",
                &format!("p{p}"),
                &reserved,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "child {p} did not start");
        children.push((child, out));
    }
    // Go: every child's stdin closes at once.
    for (child, _) in &mut children {
        drop(child.stdin.take());
    }
    let mut leases = std::collections::BTreeMap::new();
    for (mut child, out) in children {
        for line in out.lines() {
            let line = line.unwrap();
            let (vm, ip) = line.split_once(' ').expect("vm ip");
            assert!(
                leases.insert(vm.to_owned(), ip.to_owned()).is_none(),
                "{vm} twice"
            );
        }
        assert!(child.wait().unwrap().success(), "a child failed");
    }
    assert_eq!(leases.len(), 32);
    let distinct: std::collections::BTreeSet<&String> = leases.values().collect();
    assert_eq!(distinct.len(), 32, "no address twice");
    assert!(!distinct.contains(&at(1).to_string()), "never the gateway");
    let s = store(&config(
        &lab,
        &subnet,
        &format!("gateway = \"{}\"\nreserved = [\"{reserved}\"]\n", at(1)),
    ))
    .await;
    assert_eq!(s.count().await.unwrap(), 32, "the database agrees");
    let e = s
        .allocate(&VmName::new("one-too-many").unwrap(), &RequestId::random())
        .await
        .expect_err("full");
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    forget(&lab, &subnet);
}
