//! One process of the multi-process allocation tests: opens the lease store once per
//! thread (one SQLite connection, or one PostgreSQL pool, each), waits until the parent
//! closes its stdin, then every thread allocates at once. Prints `vm ip` per lease.
//!
//! Usage: `devvm-ip-child DB SUBNET GATEWAY THREADS PER_THREAD PREFIX [RESERVED]`, where
//! DB is an SQLite file or a `postgres://` URL (the password then comes from the file
//! `$DEVVM_LAB_PG_PASSWORD_FILE`; RESERVED is a range the store never hands out).

#![allow(clippy::print_stdout)] // the leases on stdout are this program's output

use std::io::Read;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};

use devvm_core::backends::postgres::{PostgresIpAllocator, PostgresIpConfig};
use devvm_core::backends::sqlite_ip::{SqliteIpAllocator, SubnetPlan};
use devvm_core::{IpAllocator, VmName};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devvm-ip-child: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let (db, subnet, gateway, threads, per_thread, prefix, reserved) = match args.as_slice() {
        [_, db, subnet, gateway, threads, per_thread, prefix] => {
            (db, subnet, gateway, threads, per_thread, prefix, None)
        }
        [
            _,
            db,
            subnet,
            gateway,
            threads,
            per_thread,
            prefix,
            reserved,
        ] => (
            db,
            subnet,
            gateway,
            threads,
            per_thread,
            prefix,
            Some(reserved.clone()),
        ),
        _ => {
            return Err(
                "usage: devvm-ip-child DB SUBNET GATEWAY THREADS PER_THREAD PREFIX [RESERVED]"
                    .into(),
            );
        }
    };
    let subnet = subnet.parse().map_err(|e| format!("subnet: {e}"))?;
    let gateway = gateway.parse().map_err(|e| format!("gateway: {e}"))?;
    let threads: usize = threads.parse().map_err(|e| format!("threads: {e}"))?;
    let per_thread: usize = per_thread.parse().map_err(|e| format!("per thread: {e}"))?;
    // Each thread's own runtime (a PostgreSQL pool belongs to the runtime it was made in).
    let runtimes = (0..threads)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let allocators: Vec<Box<dyn IpAllocator>> = if db.starts_with("postgres://") {
        let password = std::env::var("DEVVM_LAB_PG_PASSWORD_FILE")
            .map_err(|_| "DEVVM_LAB_PG_PASSWORD_FILE is not set".to_owned())?;
        let config = PostgresIpConfig {
            url: db.clone(),
            password: Some(devvm_core::config::SecretSpec::File(password.into())),
            subnet,
            gateway: Some(gateway),
            reserved: reserved.into_iter().collect(),
            max_connections: 1,
            timeout_secs: 30,
        };
        runtimes
            .iter()
            .map(|rt| {
                let _enter = rt.enter();
                let a = PostgresIpAllocator::from_config(&config, std::path::Path::new("/"))
                    .map_err(|e| e.to_string())?;
                rt.block_on(a.migrate()).map_err(|e| e.to_string())?;
                Ok(Box::new(a) as Box<dyn IpAllocator>)
            })
            .collect::<Result<Vec<_>, String>>()?
    } else {
        let plan = SubnetPlan::new(subnet, Some(gateway)).map_err(|e| e.to_string())?;
        (0..threads)
            .map(|_| {
                SqliteIpAllocator::open(db, plan.clone())
                    .map(|a| Box::new(a) as Box<dyn IpAllocator>)
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    // Ready: wait for the parent's go (it closes our stdin once every child is ready).
    println!("ready");
    let mut sink = Vec::new();
    std::io::stdin()
        .read_to_end(&mut sink)
        .map_err(|e| e.to_string())?;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = allocators
        .into_iter()
        .zip(runtimes)
        .enumerate()
        .map(|(t, (a, rt))| {
            let (barrier, prefix) = (barrier.clone(), prefix.clone());
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                barrier.wait();
                let mut out = Vec::new();
                for i in 0..per_thread {
                    let vm =
                        VmName::new(format!("{prefix}-t{t}-{i}")).map_err(|e| e.to_string())?;
                    let owner = devvm_core::RequestId::new(format!("{vm}-owner"))
                        .map_err(|e| e.to_string())?;
                    let lease = rt
                        .block_on(a.allocate(&vm, &owner))
                        .map_err(|e| e.to_string())?;
                    out.push(format!("{vm} {}", lease.ip));
                }
                Ok(out)
            })
        })
        .collect();
    for h in handles {
        for line in h.join().map_err(|_| "thread panicked".to_owned())?? {
            println!("{line}");
        }
    }
    Ok(())
}
