//! The SQLite lease database is atomic across processes and threads: several processes
//! with several threads each allocate at once, and no address is handed out twice.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use devvm_core::backends::sqlite_ip::{SqliteIpAllocator, SubnetPlan};
use devvm_core::{IpAllocator, VmName};

const PROCESSES: usize = 4;
const THREADS: usize = 4;
const PER_THREAD: usize = 12;

#[tokio::test]
async fn processes_and_threads_allocating_at_once_never_share_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("leases.sqlite3");
    let mut children = Vec::new();
    for p in 0..PROCESSES {
        let mut child = Command::new(env!("CARGO_BIN_EXE_devvm-ip-child"))
            .args([
                db.to_str().expect("utf-8 path"),
                "10.40.0.0/24",
                "10.40.0.1",
                &THREADS.to_string(),
                &PER_THREAD.to_string(),
                &format!("p{p}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        // Wait until the child has opened its connections.
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
    let mut leases: BTreeMap<String, String> = BTreeMap::new();
    for (mut child, out) in children {
        for line in out.lines() {
            let line = line.unwrap();
            let (vm, ip) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            assert!(
                leases.insert(vm.to_owned(), ip.to_owned()).is_none(),
                "{vm} twice"
            );
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
    }
    let total = PROCESSES * THREADS * PER_THREAD;
    assert_eq!(leases.len(), total);
    let distinct: BTreeSet<&String> = leases.values().collect();
    assert_eq!(distinct.len(), total, "zero duplicate addresses");
    assert!(
        !distinct.contains(&"10.40.0.1".to_owned()),
        "the gateway is never leased"
    );

    // The database agrees with what the processes were told.
    let plan =
        SubnetPlan::new("10.40.0.0/24".parse().unwrap(), Some([10, 40, 0, 1].into())).unwrap();
    let a = SqliteIpAllocator::open(&db, plan).unwrap();
    assert_eq!(a.count().await.unwrap(), total);
    for (vm, ip) in &leases {
        let vm = VmName::new(vm).unwrap();
        let lease = a.lease(&vm).await.unwrap();
        assert_eq!(lease.map(|l| l.ip.to_string()).as_ref(), Some(ip));
    }
}
