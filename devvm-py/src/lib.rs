//! Python binding of devvm: the module `devvm`. The binding only converts; the pipeline
//! lives in `devvm-core`.
//!
//! The native part is `devvm._devvm`; the `devvm` package (`devvm-py/python/devvm`)
//! re-exports it and adds type stubs. Every blocking call releases the GIL. Async work
//! runs on one tokio runtime owned by this module, created on first use and shut down
//! by `_shutdown()`, which the package registers with `atexit` so that no runtime thread
//! outlives the interpreter.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::{Handle, Runtime};

mod convert;
mod custom;
pub mod errors;
mod provisioner;
mod testkit;

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
static SHUT_DOWN: AtomicBool = AtomicBool::new(false);
/// Threads that are waiting in [`detached`] right now.
static WAITERS: AtomicUsize = AtomicUsize::new(0);

/// devvm-core's backend features (devvm-py's cargo features of the same names) and
/// whether this build has each; `devvm.FEATURES` lists those it has. The default wheel has
/// all of them; the portable one is built without `libvirt`.
pub(crate) const BACKEND_FEATURES: [(&str, bool); 8] = [
    ("ldap", cfg!(feature = "ldap")),
    ("rfc2136", cfg!(feature = "rfc2136")),
    ("glance", cfg!(feature = "glance")),
    ("libvirt", cfg!(feature = "libvirt")),
    ("ssh", cfg!(feature = "ssh")),
    ("cloud-init", cfg!(feature = "cloud-init")),
    ("sqlite", cfg!(feature = "sqlite")),
    ("postgres", cfg!(feature = "postgres")),
];

/// How long `_shutdown()` waits for work still running (a Python backend's call that has
/// not returned yet) before abandoning it.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// How long `_shutdown()` waits for threads blocked in a call to return to Python.
const WAITERS_WAIT: Duration = Duration::from_secs(2);

/// Whether `_shutdown()` ran (the interpreter is exiting).
pub(crate) fn is_shut_down() -> bool {
    SHUT_DOWN.load(Ordering::SeqCst)
}

/// Runs `f` with the GIL released, counted in `WAITERS` until this thread holds the GIL
/// again. Every wait of the binding goes through here, so that `_shutdown()` can let such
/// threads (daemon threads still blocked in a call) get back to Python code before the
/// interpreter finalizes: a thread that tries to take the GIL after that is ended by
/// `pthread_exit`, which must not unwind through Rust frames.
pub(crate) fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    struct Waiting;
    impl Drop for Waiting {
        fn drop(&mut self) {
            WAITERS.fetch_sub(1, Ordering::SeqCst);
        }
    }
    WAITERS.fetch_add(1, Ordering::SeqCst);
    let _waiting = Waiting;
    py.detach(f)
}

/// The module's runtime, created on first use.
pub(crate) fn runtime() -> PyResult<Handle> {
    let mut rt = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if SHUT_DOWN.load(Ordering::SeqCst) {
        return Err(PyRuntimeError::new_err(
            "devvm: the runtime is shut down (the interpreter is exiting)",
        ));
    }
    if let Some(rt) = rt.as_ref() {
        return Ok(rt.handle().clone());
    }
    let new = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("devvm-rt")
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("devvm: cannot start a runtime: {e}")))?;
    let handle = new.handle().clone();
    *rt = Some(new);
    Ok(handle)
}

/// Stops the module's runtime (the package calls it from `atexit`). Waits, with the GIL
/// released, for work still running; afterwards every call raises `RuntimeError`.
#[pyfunction]
fn _shutdown(py: Python<'_>) {
    py.detach(|| {
        let rt = {
            let mut guard = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
            SHUT_DOWN.store(true, Ordering::SeqCst);
            guard.take()
        };
        if let Some(rt) = rt {
            rt.shutdown_timeout(SHUTDOWN_WAIT);
        }
        // Waiting threads notice the shutdown within a few milliseconds (their channel
        // disconnects, or they see the flag) and need the GIL, which is free here.
        let deadline = std::time::Instant::now() + WAITERS_WAIT;
        while WAITERS.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// The native part of the `devvm` Python package (`devvm._devvm`).
#[pymodule]
fn _devvm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let features: Vec<&str> = BACKEND_FEATURES
        .iter()
        .filter(|(_, built)| *built)
        .map(|(name, _)| *name)
        .collect();
    m.add("FEATURES", pyo3::types::PyTuple::new(m.py(), features)?)?;
    m.add_function(wrap_pyfunction!(_shutdown, m)?)?;
    errors::register(m)?;
    convert::register(m)?;
    provisioner::register(m)?;
    testkit::register(m)?;
    Ok(())
}
