//! devvm's own cost per provision, outside every service: the pipeline on the in-memory
//! reference backends, with its SQLite journal (WAL, `synchronous=FULL`) on this disk and
//! on a RAM file system, side by side in one run (interleaved rounds, so machine noise hits
//! both alike).
//!
//! `cargo bench -p devvm-tests --bench pipeline` prints the median milliseconds of one
//! provision and one deprovision with each journal, and the disk/RAM ratio: the part of a
//! provision that is the journal's fsyncs. Compare it with the seconds of a real one
//! (`scripts/bench e2e`) to see whether the journal is worth moving off the hot path.

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devvm_core::{BootstrapSettings, ProvisionRequest, Provisioner, VmSize};
use devvm_tests::{TEMPLATE, reference_backends, user};

const ROUNDS: usize = 9;
const PER_ROUND: usize = 20;

fn provisioner(state: &Path) -> Provisioner {
    Provisioner::builder()
        .state_dir(state)
        .backends(reference_backends(None).backends())
        .defaults(devvm_core::Defaults {
            template: Some(devvm_core::TemplateName::new(TEMPLATE).unwrap()),
            size: VmSize::default(),
            bootstrap: BootstrapSettings::default(),
        })
        .build()
        .expect("provisioner")
}

fn median(mut xs: Vec<Duration>) -> f64 {
    xs.sort();
    xs[xs.len() / 2].as_secs_f64() * 1000.0
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too, briefly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (rounds, per_round) = if quick { (1, 2) } else { (ROUNDS, PER_ROUND) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let disk_root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let ram_root = PathBuf::from("/dev/shm");
    if !ram_root.is_dir() {
        println!("pipeline bench: no /dev/shm here; nothing to compare");
        return;
    }
    let disk_dir = tempfile::tempdir_in(&disk_root).unwrap();
    let ram_dir = tempfile::tempdir_in(&ram_root).unwrap();
    let contenders = [
        ("disk", provisioner(&disk_dir.path().join("state"))),
        ("ram", provisioner(&ram_dir.path().join("state"))),
    ];
    let mut up = [Vec::new(), Vec::new()];
    let mut down = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..2 {
            let i = (round + k) % 2;
            let p = &contenders[i].1;
            rt.block_on(async {
                for _ in 0..per_round {
                    let t = Instant::now();
                    let vm = p
                        .provision(ProvisionRequest::new(user("alice")))
                        .await
                        .expect("provision");
                    up[i].push(t.elapsed());
                    let t = Instant::now();
                    p.deprovision(&vm.name).await.expect("deprovision");
                    down[i].push(t.elapsed());
                }
            });
        }
    }
    let [up_disk, up_ram] = up.map(median);
    let [down_disk, down_ram] = down.map(median);
    println!(
        "pipeline on the reference backends ({rounds} rounds x {per_round}, journal in SQLite):"
    );
    println!(
        "  provision:   journal on disk {up_disk:7.2} ms, in RAM {up_ram:7.2} ms, disk/RAM {:.2}x",
        up_disk / up_ram
    );
    println!(
        "  deprovision: journal on disk {down_disk:7.2} ms, in RAM {down_ram:7.2} ms, disk/RAM {:.2}x",
        down_disk / down_ram
    );
    println!(
        "  the journal's fsyncs cost about {:.1} ms of a provision here",
        (up_disk - up_ram).max(0.0)
    );
}
