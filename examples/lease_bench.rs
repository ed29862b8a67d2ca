//! Lease allocations per second of the two shared lease stores, side by side in one run:
//! SQLite (a file on this machine) and PostgreSQL (the lab's), with 1, 4 and 16 concurrent
//! allocators. Each allocator is a store of its own (its own connection, as a separate
//! process would have) and allocates `PER` leases one after the other; then every lease
//! is released. The stores take turns, three rounds each; the median counts.
//!
//! ```text
//! scripts/lab exec cargo run --release --example lease_bench
//! ```
//! Prints a table with the PostgreSQL/SQLite ratio per concurrency, and writes
//! `target/bench/leases.json`.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a terminal program

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use devvm_core::backends::postgres::{PostgresIpAllocator, PostgresIpConfig};
use devvm_core::backends::sqlite_ip::{SqliteIpAllocator, SubnetPlan};
use devvm_core::{IpAllocator, RequestId, VmName};

const PER: usize = 40;
const ROUNDS: usize = 3;
const CONCURRENCY: [usize; 3] = [1, 4, 16];

fn env(k: &str) -> Result<String, String> {
    std::env::var(k).map_err(|_| format!("{k} is not set: run inside `scripts/lab exec`"))
}

async fn stores(
    kind: &str,
    n: usize,
    subnet: &str,
    dir: &Path,
) -> Result<Vec<Arc<dyn IpAllocator>>, String> {
    let mut out: Vec<Arc<dyn IpAllocator>> = Vec::new();
    for _ in 0..n {
        match kind {
            "sqlite" => {
                let plan = SubnetPlan::new(subnet.parse().map_err(|e| format!("{e}"))?, None)
                    .map_err(|e| e.to_string())?;
                out.push(Arc::new(
                    SqliteIpAllocator::open(dir.join("leases.sqlite3"), plan)
                        .map_err(|e| e.to_string())?,
                ));
            }
            _ => {
                let c = PostgresIpConfig {
                    url: env("DEVVM_LAB_PG_URL")?,
                    password: Some(devvm_core::config::SecretSpec::File(
                        env("DEVVM_LAB_PG_PASSWORD_FILE")?.into(),
                    )),
                    subnet: subnet.parse().map_err(|e| format!("{e}"))?,
                    gateway: None,
                    reserved: Vec::new(),
                    max_connections: 1,
                    timeout_secs: 10,
                };
                let s = PostgresIpAllocator::from_config(&c, Path::new("/"))
                    .map_err(|e| e.to_string())?;
                s.migrate().await.map_err(|e| e.to_string())?;
                out.push(Arc::new(s));
            }
        }
    }
    Ok(out)
}

/// Allocations per second of `n` allocators × PER leases, all released afterwards.
async fn round(kind: &str, n: usize, subnet: &str, dir: &Path) -> Result<f64, String> {
    let stores = stores(kind, n, subnet, dir).await?;
    let owner = RequestId::new("lease-bench").map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in stores.iter().enumerate() {
        let (s, owner) = (s.clone(), owner.clone());
        tasks.spawn(async move {
            for j in 0..PER {
                let vm = VmName::new(format!("bench-{i}-{j}")).map_err(|e| e.to_string())?;
                s.allocate(&vm, &owner).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let rate = (n * PER) as f64 / start.elapsed().as_secs_f64();
    for (i, _) in stores.iter().enumerate() {
        for j in 0..PER {
            let vm = VmName::new(format!("bench-{i}-{j}")).map_err(|e| e.to_string())?;
            stores[0]
                .release(&vm, &owner)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // A /22 of its own (1022 addresses, enough for 16 × 40), never the lab's subnet.
    let r = std::fs::read_to_string("/proc/sys/kernel/random/uuid").map_err(|e| e.to_string())?;
    let b = r.as_bytes();
    let subnet = format!("10.{}.{}.0/22", 128 + b[0] % 100, (b[1] % 63) * 4);
    let mut rows = Vec::new();
    println!(
        "lease allocations per second ({PER} per allocator, median of {ROUNDS}; subnet {subnet})"
    );
    println!(
        "{:>12} {:>12} {:>12} {:>10}",
        "allocators", "sqlite", "postgres", "pg/sqlite"
    );
    for n in CONCURRENCY {
        let (mut lite, mut pg) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            // Side by side: the two stores take turns.
            lite.push(round("sqlite", n, &subnet, dir.path()).await?);
            pg.push(round("postgres", n, &subnet, dir.path()).await?);
        }
        let (l, p) = (median(lite), median(pg));
        println!("{n:>12} {l:>12.0} {p:>12.0} {:>10.2}", p / l);
        rows.push(
            serde_json::json!({ "allocators": n, "sqlite": l, "postgres": p, "ratio": p / l }),
        );
    }
    let result = serde_json::json!({ "per_allocator": PER, "rounds": ROUNDS, "rows": rows });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("leases.json"), result.to_string()).map_err(|e| e.to_string())?;
    println!("{result}");
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lease_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
