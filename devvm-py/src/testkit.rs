//! `devvm.testkit`: devvm-core's conformance suites, run against a Python backend.
//!
//! Each `check_*` wraps the Python object exactly as `Provisioner.from_config` does and
//! runs the Rust suite of that trait on the module's runtime (GIL released). A broken
//! contract (the suite panics) raises `AssertionError` with the suite's message. The
//! suites call the object from several threads at once: it must be thread-safe.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use devvm_core::testkit::conformance::{
    self, DnsUpdaterFixture, IpAllocatorFixture, PlacementFixture, UserDirectoryFixture,
};
use devvm_core::{UserName, VmSize};
use pyo3::exceptions::{PyAssertionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::custom::{PyDns, PyIpAllocator, PyPlacement, PyUsers};
use crate::errors::to_py_err;
use crate::runtime;

/// Runs a suite to its end; its panic becomes an AssertionError.
fn run_suite(
    py: Python<'_>,
    suite: impl Future<Output = ()> + Send + 'static,
    name: &str,
) -> PyResult<()> {
    use std::sync::mpsc::RecvTimeoutError;
    let rt = runtime()?;
    let (tx, mut rx) = std::sync::mpsc::channel();
    let task = rt.spawn(suite);
    let abort = task.abort_handle();
    rt.spawn(async move {
        let _ = tx.send(task.await);
    });
    loop {
        let (got, back) =
            crate::detached(py, move || (rx.recv_timeout(Duration::from_millis(50)), rx));
        rx = back;
        match got {
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    abort.abort();
                    return Err(e);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err(format!(
                    "{name} conformance did not finish: the runtime shut down"
                )));
            }
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if e.is_panic() => {
                let panic = e.into_panic();
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "the suite panicked".to_owned());
                return Err(PyAssertionError::new_err(format!(
                    "{name} conformance: {msg}"
                )));
            }
            Ok(Err(e)) => {
                return Err(PyRuntimeError::new_err(format!(
                    "{name} conformance did not finish: {e}"
                )));
            }
        }
    }
}

/// Runs the `IpAllocator` conformance suite against `allocator`.
///
/// `capacity`: how many addresses it hands out, when small enough to fill (then
/// exhaustion is checked too). `concurrency`: how many allocations to race.
#[pyfunction]
#[pyo3(signature = (allocator, capacity=None, concurrency=4))]
fn check_ip_allocator(
    py: Python<'_>,
    allocator: &Bound<'_, PyAny>,
    capacity: Option<usize>,
    concurrency: usize,
) -> PyResult<()> {
    let a = Arc::new(PyIpAllocator::new(allocator)?);
    let fixture = IpAllocatorFixture {
        capacity,
        concurrency,
    };
    run_suite(py, conformance::ip_allocator(a, fixture), "IpAllocator")
}

/// Runs the `DnsUpdater` conformance suite against `dns`; `addresses` are two addresses
/// (str) of its reverse zone that nothing else uses during the test.
#[pyfunction]
fn check_dns_updater(
    py: Python<'_>,
    dns: &Bound<'_, PyAny>,
    addresses: (String, String),
) -> PyResult<()> {
    let parse = |s: &str| {
        s.parse::<IpAddr>()
            .map_err(|e| PyValueError::new_err(format!("address {s:?}: {e}")))
    };
    let fixture = DnsUpdaterFixture {
        addresses: [parse(&addresses.0)?, parse(&addresses.1)?],
    };
    let d = Arc::new(PyDns::new(dns)?);
    run_suite(py, conformance::dns_updater(d, fixture), "DnsUpdater")
}

/// Runs the `UserDirectory` conformance suite against `directory`: `member` exists and
/// may own VMs; `outsider`, if given, exists but may not.
#[pyfunction]
#[pyo3(signature = (directory, member, outsider=None))]
fn check_user_directory(
    py: Python<'_>,
    directory: &Bound<'_, PyAny>,
    member: &str,
    outsider: Option<&str>,
) -> PyResult<()> {
    let name = |s: &str| UserName::new(s).map_err(|e| to_py_err(py, &e));
    let fixture = UserDirectoryFixture {
        member: name(member)?,
        outsider: outsider.map(name).transpose()?,
    };
    let d = Arc::new(PyUsers::new(directory)?);
    run_suite(py, conformance::user_directory(d, fixture), "UserDirectory")
}

/// Runs the `Placement` conformance suite against `placement`, reserving VMs of the
/// given size; `capacity` is how many such VMs fit in total, when small enough to fill.
#[pyfunction]
#[pyo3(signature = (placement, capacity=None, vcpus=2, memory_mib=5120, disk_gib=40))]
fn check_placement(
    py: Python<'_>,
    placement: &Bound<'_, PyAny>,
    capacity: Option<usize>,
    vcpus: u32,
    memory_mib: u64,
    disk_gib: u64,
) -> PyResult<()> {
    let fixture = PlacementFixture {
        capacity,
        size: VmSize {
            vcpus,
            memory_mib,
            disk_gib,
        },
    };
    let p = Arc::new(PyPlacement::new(placement)?);
    run_suite(py, conformance::placement(p, fixture), "Placement")
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(check_ip_allocator, m)?)?;
    m.add_function(wrap_pyfunction!(check_dns_updater, m)?)?;
    m.add_function(wrap_pyfunction!(check_user_directory, m)?)?;
    m.add_function(wrap_pyfunction!(check_placement, m)?)?;
    Ok(())
}
