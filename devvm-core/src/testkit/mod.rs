//! Tools for testing backends and the pipeline (feature `testkit`).
//!
//! * [`conformance`]: one suite per step trait. Any implementation — the reference ones,
//!   the real ones, or a backend another team wrote — runs the same checks. A suite
//!   panics (like `assert!`) at the first broken contract, naming it.
//! * [`faults`]: wraps any backend so that it fails at a chosen call: with an error, by
//!   hanging (to trip the step's time limit), by panicking, or by killing the process
//!   (for crash-recovery tests).

pub mod conformance;
pub mod faults;

/// A config of the reference (in-memory) backends, each keeping its state in a file under
/// `state_dir`: users alice and bob (who may own VMs) and mallory (who may not), hosts
/// `host-a` and `host-b`, the subnet 10.20.0.0/28, the zone `lab.example` and the
/// template `debian-12`. devvm's own Rust, Python and C tests all start from this one text
/// (the file `devvm-core/src/testkit/reference.toml`); a test of one backend can swap
/// that backend's section for its own. Not for production: the reference backends are
/// for tests only.
pub const REFERENCE_CONFIG: &str = include_str!("reference.toml");

/// A VM name unique to this process and call, for tests that share a real service.
pub fn unique_vm_name(prefix: &str) -> crate::VmName {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("{prefix}-{:x}{:x}-{n}", std::process::id(), nanos & 0xfff);
    match crate::VmName::new(&name) {
        Ok(v) => v,
        Err(e) => panic!("test prefix {prefix:?} does not make a valid vm name: {e}"),
    }
}
