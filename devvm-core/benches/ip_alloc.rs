//! Allocation cost in a /16 holding 60,000 leases against an empty /24, measured side by
//! side in one run (interleaved rounds, so machine noise hits both alike).
//!
//! `cargo bench -p devvm-core --bench ip_alloc` prints the median cost of one allocation
//! in each and their ratio. The goal: the ratio stays below 2.
//!
//! The 60,000 leases are scattered pseudo-randomly over the /16 (not packed at its
//! start), so free addresses are scattered too, as in a long-lived subnet.

#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use devvm_core::IpAllocator;
use devvm_core::VmName;
use devvm_core::backends::sqlite_ip::{SqliteIpAllocator, SubnetPlan};

const LEASES: usize = 60_000;
const ROUNDS: usize = 15;
const PER_ROUND: usize = 40;

fn scattered(n: usize) -> Vec<(VmName, Ipv4Addr)> {
    // xorshift32 picks; rejection keeps them unique and inside 10.60.0.1..10.60.255.254.
    let mut x: u32 = 0x2545_f491;
    let mut taken = std::collections::BTreeSet::new();
    while taken.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let host = x % 65_534 + 1;
        taken.insert(host);
    }
    taken
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            (
                VmName::new(format!("old{i}")).unwrap(),
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 60, 0, 0)) + h),
            )
        })
        .collect()
}

async fn round(a: &SqliteIpAllocator, tag: &str, r: usize) -> Duration {
    let vms: Vec<VmName> = (0..PER_ROUND)
        .map(|i| VmName::new(format!("{tag}-{r}-{i}")).unwrap())
        .collect();
    let owner = devvm_core::RequestId::new(format!("bench-{tag}-{r}")).unwrap();
    let start = Instant::now();
    for vm in &vms {
        a.allocate(vm, &owner).await.unwrap();
    }
    let t = start.elapsed();
    for vm in &vms {
        a.release(vm, &owner).await.unwrap();
    }
    t / PER_ROUND as u32
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn measure(dir: &Path, label: &str) {
    let small = SqliteIpAllocator::open(
        dir.join("small.sqlite3"),
        SubnetPlan::new(
            "10.50.0.0/24".parse().unwrap(),
            Some(Ipv4Addr::new(10, 50, 0, 1)),
        )
        .unwrap(),
    )
    .unwrap();
    let big = SqliteIpAllocator::open(
        dir.join("big.sqlite3"),
        SubnetPlan::new("10.60.0.0/16".parse().unwrap(), None).unwrap(),
    )
    .unwrap();
    big.import(scattered(LEASES)).await.unwrap();
    assert_eq!(big.count().await.unwrap(), LEASES);

    let (mut ts, mut tb) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        ts.push(round(&small, "s", r).await);
        tb.push(round(&big, "b", r).await);
    }
    let (s, b) = (median(ts), median(tb));
    println!(
        "{label}: empty /24 {:>8.1} µs/alloc   /16 with {LEASES} leases {:>8.1} µs/alloc   ratio {:.2} (goal < 2)",
        s.as_secs_f64() * 1e6,
        b.as_secs_f64() * 1e6,
        b.as_secs_f64() / s.as_secs_f64()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // On disk, with the durability the allocator always uses (fsync per allocation).
    let disk = tempfile::tempdir().unwrap();
    measure(disk.path(), "disk (fsync)").await;
    // In memory-backed /dev/shm, where fsync is free: the allocator's own cost.
    if Path::new("/dev/shm").is_dir() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        measure(shm.path(), "tmpfs       ").await;
    }
}
