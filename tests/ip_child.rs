//! One process of the multi-process allocation test: opens the lease database once per
//! thread (one SQLite connection each), waits until the parent closes its stdin, then
//! every thread allocates at once. Prints `vm ip` per lease.
//!
//! Usage: `devvm-ip-child DB SUBNET GATEWAY THREADS PER_THREAD PREFIX`

#![allow(clippy::print_stdout)] // the leases on stdout are this program's output

use std::io::Read;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};

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
    let [_, db, subnet, gateway, threads, per_thread, prefix] = args.as_slice() else {
        return Err("usage: devvm-ip-child DB SUBNET GATEWAY THREADS PER_THREAD PREFIX".into());
    };
    let subnet = subnet.parse().map_err(|e| format!("subnet: {e}"))?;
    let gateway = gateway.parse().map_err(|e| format!("gateway: {e}"))?;
    let threads: usize = threads.parse().map_err(|e| format!("threads: {e}"))?;
    let per_thread: usize = per_thread.parse().map_err(|e| format!("per thread: {e}"))?;
    let plan = SubnetPlan::new(subnet, Some(gateway)).map_err(|e| e.to_string())?;
    let allocators = (0..threads)
        .map(|_| SqliteIpAllocator::open(db, plan.clone()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    // Ready: wait for the parent's go (it closes our stdin once every child is ready).
    println!("ready");
    let mut sink = Vec::new();
    std::io::stdin()
        .read_to_end(&mut sink)
        .map_err(|e| e.to_string())?;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = allocators
        .into_iter()
        .enumerate()
        .map(|(t, a)| {
            let (barrier, prefix) = (barrier.clone(), prefix.clone());
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
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
