//! Which way of keeping address allocation atomic in PostgreSQL is fastest under
//! contention, measured side by side in one run against the lab's PostgreSQL, with 1, 4
//! and 16 concurrent allocators (each its own connection, as separate processes would
//! have), each allocating `PER` addresses of one /22 one after the other:
//!
//! * `advisory`: what devvm's store did first: a transaction-scoped advisory lock on
//!   the subnet, then next-fit from the subnet's cursor;
//! * `row lock`: the same, serialized by `SELECT … FOR UPDATE` of the subnet's plan row;
//! * `unique+retry`: no lock; next-fit from the cursor as read, the insert relying on the
//!   primary key, retried after a conflict;
//! * `skip locked`: a row per address made beforehand; each allocation takes the first
//!   free one with `FOR UPDATE SKIP LOCKED` (what the store does now, having measured
//!   this).
//!
//! ```text
//! scripts/lab exec cargo run --release --example lock_bench
//! ```
//! Prints allocations per second (median of 3 rounds, the strategies taking turns) and
//! each strategy's ratio to `advisory`; writes `target/bench/locking.json`. Its tables
//! (`devvm_bench_*`) are its own and dropped at the end.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a terminal program

use std::time::Instant;

use tokio_postgres::{Client, NoTls};

const PER: i64 = 40;
const ROUNDS: usize = 3;
const CONCURRENCY: [i64; 3] = [1, 4, 16];
const STRATEGIES: [&str; 4] = ["advisory", "row lock", "unique+retry", "skip locked"];
/// Addresses of the /22 that can be handed out (.1 to .1022).
const LO: i64 = 1;
const HI: i64 = 1022;

type R<T> = Result<T, String>;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

async fn connect() -> R<Client> {
    let url = std::env::var("DEVVM_LAB_PG_URL").map_err(|_| "run inside `scripts/lab exec`")?;
    let pw_file = std::env::var("DEVVM_LAB_PG_PASSWORD_FILE").map_err(e)?;
    let mut cfg: tokio_postgres::Config = url.parse().map_err(e)?;
    cfg.password(std::fs::read_to_string(pw_file).map_err(e)?.trim());
    let (client, conn) = cfg.connect(NoTls).await.map_err(e)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn setup(c: &Client) -> R<()> {
    c.batch_execute(
        "DROP TABLE IF EXISTS devvm_bench_leases, devvm_bench_plans, devvm_bench_pool;
         CREATE TABLE devvm_bench_plans (subnet INT PRIMARY KEY, cursor BIGINT);
         CREATE TABLE devvm_bench_leases (subnet INT, ip BIGINT, vm TEXT,
             PRIMARY KEY (subnet, ip), UNIQUE (subnet, vm));
         CREATE TABLE devvm_bench_pool (subnet INT, ip BIGINT, vm TEXT, PRIMARY KEY (subnet, ip));",
    )
    .await
    .map_err(e)
}

/// The first free address at or after `from` (then from the start), as devvm's store finds it.
const FIRST_FREE: &str = "SELECT s.ip FROM generate_series($2::BIGINT, $3::BIGINT) s(ip)
    WHERE NOT EXISTS (SELECT 1 FROM devvm_bench_leases l WHERE l.subnet = $1 AND l.ip = s.ip)
    ORDER BY s.ip LIMIT 1";

async fn next_fit(
    c: &impl tokio_postgres::GenericClient,
    subnet: i32,
    cursor: Option<i64>,
) -> R<i64> {
    let start = cursor.map_or(LO, |c| if c >= HI { LO } else { c + 1 });
    for (a, b) in [(start, HI), (LO, start - 1)] {
        if let Some(r) = c
            .query_opt(FIRST_FREE, &[&subnet, &a, &b])
            .await
            .map_err(e)?
        {
            return Ok(r.get(0));
        }
    }
    Err("exhausted".into())
}

/// One allocation of `vm` in `subnet` with `strategy`.
async fn allocate(c: &mut Client, strategy: &str, subnet: i32, vm: &str) -> R<()> {
    match strategy {
        "advisory" | "row lock" => {
            let tx = c.transaction().await.map_err(e)?;
            let cursor: Option<i64> = if strategy == "advisory" {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&i64::from(subnet)])
                    .await
                    .map_err(e)?;
                tx.query_one(
                    "SELECT cursor FROM devvm_bench_plans WHERE subnet = $1",
                    &[&subnet],
                )
                .await
                .map_err(e)?
                .get(0)
            } else {
                tx.query_one(
                    "SELECT cursor FROM devvm_bench_plans WHERE subnet = $1 FOR UPDATE",
                    &[&subnet],
                )
                .await
                .map_err(e)?
                .get(0)
            };
            let ip = next_fit(&tx, subnet, cursor).await?;
            tx.execute(
                "INSERT INTO devvm_bench_leases (subnet, ip, vm) VALUES ($1, $2, $3)",
                &[&subnet, &ip, &vm],
            )
            .await
            .map_err(e)?;
            tx.execute(
                "UPDATE devvm_bench_plans SET cursor = $2 WHERE subnet = $1",
                &[&subnet, &ip],
            )
            .await
            .map_err(e)?;
            tx.commit().await.map_err(e)
        }
        "unique+retry" => loop {
            let cursor: Option<i64> = c
                .query_one(
                    "SELECT cursor FROM devvm_bench_plans WHERE subnet = $1",
                    &[&subnet],
                )
                .await
                .map_err(e)?
                .get(0);
            let ip = next_fit(c, subnet, cursor).await?;
            let n = c
                .execute(
                    "INSERT INTO devvm_bench_leases (subnet, ip, vm) VALUES ($1, $2, $3)
                     ON CONFLICT (subnet, ip) DO NOTHING",
                    &[&subnet, &ip, &vm],
                )
                .await
                .map_err(e)?;
            if n == 1 {
                c.execute(
                    "UPDATE devvm_bench_plans SET cursor = GREATEST(cursor, $2) WHERE subnet = $1",
                    &[&subnet, &ip],
                )
                .await
                .map_err(e)?;
                return Ok(());
            }
        },
        _ => {
            let row = c
                .query_opt(
                    "UPDATE devvm_bench_pool SET vm = $2 WHERE (subnet, ip) = (
                         SELECT subnet, ip FROM devvm_bench_pool
                         WHERE subnet = $1 AND vm IS NULL ORDER BY ip LIMIT 1
                         FOR UPDATE SKIP LOCKED)
                     RETURNING ip",
                    &[&subnet, &vm],
                )
                .await
                .map_err(e)?;
            row.map(|_| ()).ok_or_else(|| "exhausted".into())
        }
    }
}

/// Allocations per second of `n` allocators × PER addresses with `strategy`, in a fresh
/// subnet (numbered `subnet`), checked for duplicates afterwards.
async fn round(admin: &Client, strategy: &str, n: i64, subnet: i32) -> R<f64> {
    admin
        .execute(
            "INSERT INTO devvm_bench_plans (subnet, cursor) VALUES ($1, NULL)",
            &[&subnet],
        )
        .await
        .map_err(e)?;
    if strategy == "skip locked" {
        admin
            .execute(
                "INSERT INTO devvm_bench_pool (subnet, ip) SELECT $1, s FROM generate_series($2::BIGINT, $3::BIGINT) s",
                &[&subnet, &LO, &HI],
            )
            .await
            .map_err(e)?;
    }
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(connect().await?);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let strategy = strategy.to_owned();
        tasks.spawn(async move {
            for j in 0..PER {
                allocate(&mut c, &strategy, subnet, &format!("vm-{i}-{j}")).await?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(e)??;
    }
    let rate = (n * PER) as f64 / start.elapsed().as_secs_f64();
    let table = if strategy == "skip locked" {
        "devvm_bench_pool WHERE vm IS NOT NULL AND"
    } else {
        "devvm_bench_leases WHERE"
    };
    let got: i64 = admin
        .query_one(
            &format!("SELECT count(DISTINCT ip) FROM {table} subnet = $1"),
            &[&subnet],
        )
        .await
        .map_err(e)?
        .get(0);
    if got != n * PER {
        return Err(format!(
            "{strategy}: {got} distinct addresses for {} allocations",
            n * PER
        ));
    }
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run() -> R<()> {
    let admin = connect().await?;
    setup(&admin).await?;
    println!(
        "allocations per second ({PER} per allocator, median of {ROUNDS}, strategies taking turns)"
    );
    print!("{:>10}", "allocators");
    for s in STRATEGIES {
        print!(" {s:>13}");
    }
    println!("   (ratio to advisory)");
    let (mut rows, mut subnet) = (Vec::new(), 0);
    for n in CONCURRENCY {
        let mut rates = vec![Vec::new(); STRATEGIES.len()];
        for _ in 0..ROUNDS {
            for (k, s) in STRATEGIES.iter().enumerate() {
                subnet += 1;
                rates[k].push(round(&admin, s, n, subnet).await?);
            }
        }
        let medians: Vec<f64> = rates.into_iter().map(median).collect();
        print!("{n:>10}");
        for m in &medians {
            print!(" {m:>13.0}");
        }
        let ratios: Vec<String> = medians
            .iter()
            .map(|m| format!("{:.2}", m / medians[0]))
            .collect();
        println!("   ({})", ratios.join(" "));
        let mut row = serde_json::Map::new();
        row.insert("allocators".into(), n.into());
        for (s, m) in STRATEGIES.iter().zip(&medians) {
            row.insert((*s).into(), (*m).into());
        }
        rows.push(serde_json::Value::Object(row));
    }
    admin
        .batch_execute("DROP TABLE devvm_bench_leases, devvm_bench_plans, devvm_bench_pool")
        .await
        .map_err(e)?;
    let result = serde_json::json!({ "per_allocator": PER, "rounds": ROUNDS, "rows": rows });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).map_err(e)?;
    std::fs::write(out.join("locking.json"), result.to_string()).map_err(e)?;
    println!("{result}");
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lock_bench: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
