//! `devvm.Provisioner` and `devvm.Events`: the sync Python face of
//! [`devvm_core::Provisioner`]. Each call runs on the module's runtime while the calling
//! thread waits with the GIL released, waking every few milliseconds to deliver events to
//! the callback and to run Python's signal handlers (so Ctrl-C works).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devvm_core::config::Config;
use devvm_core::registry::StepBackend;
use devvm_core::{
    CancelToken, Event, ProvisionRequest, Provisioner, RequestId, Step, Subscription, TemplateName,
    UserName, VmName,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio::runtime::Handle;

use crate::convert::{PyEvent, PyRecoveryReport, PyVm};
use crate::custom::{
    PyBootstrapper, PyDns, PyHypervisor, PyImages, PyIpAllocator, PyPlacement, PyUsers,
};
use crate::errors::to_py_err;
use crate::runtime;

/// How often a waiting call wakes up to run signal handlers.
const TICK: Duration = Duration::from_millis(50);
/// How often `Events` looks for a new event.
const POLL: Duration = Duration::from_millis(5);

fn core<T>(py: Python<'_>, r: devvm_core::Result<T>) -> PyResult<T> {
    r.map_err(|e| to_py_err(py, &e))
}

/// The feature that the built-in backend `name` of `step` needs, when this wheel was built
/// without it (a wheel built without `libvirt` has no `libvirt` hypervisor or placement).
fn missing_feature(step: Step, name: &str) -> Option<&'static str> {
    let feature = devvm_core::registry::feature_of(step, name)?;
    crate::BACKEND_FEATURES
        .iter()
        .any(|&(f, built)| f == feature && !built)
        .then_some(feature)
}

/// What the forwarding task tells the waiting Python thread.
enum Wake<T> {
    Done(Result<devvm_core::Result<T>, tokio::task::JoinError>),
    Event(Event),
}

/// What a waiting call runs: plain work, or a run whose events are delivered.
enum Work<T> {
    Future(std::pin::Pin<Box<dyn Future<Output = devvm_core::Result<T>> + Send>>),
    Run(Box<dyn FnOnce() -> devvm_core::RunHandle<T> + Send>),
}

/// What a waiting call does while its task runs.
struct Watch<'py> {
    /// The run to cancel on Ctrl-C or when the callback raises.
    cancel: Option<CancelToken>,
    /// Gets the run's events (`on_event`).
    callback: Option<Bound<'py, PyAny>>,
}

/// Runs `work` on the runtime and forwards its events and its result to a std channel.
///
/// The Python thread waits on that channel (with a timeout, to run signal handlers), never
/// on a tokio timer: once the runtime shuts down the channel just disconnects.
fn forward<T: Send + 'static>(rt: &Handle, work: Work<T>) -> std::sync::mpsc::Receiver<Wake<T>> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        match work {
            // The work runs in its own task: it goes on to the end even if nobody waits.
            Work::Future(fut) => {
                let _ = tx.send(Wake::Done(tokio::spawn(fut).await));
            }
            Work::Run(start) => {
                let mut run = start();
                while let Some(e) = run.next_event().await {
                    let _ = tx.send(Wake::Event(e));
                }
                let _ = tx.send(Wake::Done(Ok(run.finish().await)));
            }
        }
    });
    rx
}

/// Runs `fut` on the runtime and waits for it with the GIL released. Delivers the run's
/// events to the callback on this thread. A pending signal (KeyboardInterrupt) or an
/// exception from the callback cancels the run (when it can be cancelled), waits for its
/// rollback to finish, then raises that exception.
fn wait<T: Send + 'static>(py: Python<'_>, work: Work<T>, watch: Watch<'_>) -> PyResult<T> {
    use std::sync::mpsc::RecvTimeoutError;
    let rt = runtime()?;
    let Watch {
        cancel,
        callback: cb,
    } = watch;
    let mut rx = forward(&rt, work);
    let mut pending: Option<PyErr> = None;
    // The callback keeps getting the events of the rollback after Ctrl-C, but no more
    // once it raised itself.
    let mut callback_failed = false;
    let interrupt = |err: PyErr, pending: &mut Option<PyErr>| {
        if let Some(c) = &cancel {
            c.cancel();
        }
        if pending.is_none() {
            *pending = Some(err);
        }
    };
    let result = loop {
        // The receiver is not Sync: hand it to the detached closure and take it back.
        let (got, back) = crate::detached(py, move || (rx.recv_timeout(TICK), rx));
        rx = back;
        match got {
            Ok(Wake::Done(r)) => break r,
            Ok(Wake::Event(e)) => {
                if let Some(cb) = &cb
                    && !callback_failed
                    && let Err(err) = cb.call1((PyEvent::new(e),))
                {
                    callback_failed = true;
                    interrupt(err, &mut pending);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if pending.is_none()
                    && let Err(err) = py.check_signals()
                {
                    interrupt(err, &mut pending);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err(
                    "devvm: the runtime shut down while the call ran",
                ));
            }
        }
    };
    if let Some(err) = pending {
        return Err(err);
    }
    match result {
        Ok(r) => core(py, r),
        Err(e) => Err(PyRuntimeError::new_err(format!("devvm: task failed: {e}"))),
    }
}

/// Runs `fut` on the runtime and waits for it (see [`wait`]), not cancellable.
fn run<T, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    T: Send + 'static,
    F: Future<Output = devvm_core::Result<T>> + Send + 'static,
{
    wait(
        py,
        Work::Future(Box::pin(fut)),
        Watch {
            cancel: None,
            callback: None,
        },
    )
}

/// Provisions and removes developer VMs (`devvm.Provisioner`).
///
/// Every method blocks the calling thread with the GIL released. Ctrl-C
/// (KeyboardInterrupt) during `provision` cancels the run and rolls it back before the
/// exception propagates; during other calls the call finishes first.
#[pyclass(module = "devvm", name = "Provisioner", frozen)]
pub(crate) struct PyProvisioner {
    inner: Mutex<Option<Provisioner>>,
}

impl PyProvisioner {
    fn is_closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    fn get(&self) -> PyResult<Provisioner> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| PyRuntimeError::new_err("devvm: the provisioner is closed"))
    }
}

/// Parses a validated name, raising `devvm.InvalidInput`.
fn parse<T: std::str::FromStr<Err = devvm_core::Error>>(py: Python<'_>, s: &str) -> PyResult<T> {
    core(py, s.parse())
}

#[pymethods]
impl PyProvisioner {
    /// Builds the provisioner that the TOML config at `path` describes.
    ///
    /// Steps whose section says `backend = "custom"` take a Python object passed by
    /// keyword: `users`, `placement`, `ip`, `dns`, `images`, `hypervisor` or `bootstrap`
    /// (see `devvm.backends`
    /// for each protocol). A keyword for a step with a built-in backend replaces it.
    #[staticmethod]
    #[pyo3(signature = (path, **custom_backends))]
    fn from_config(
        py: Python<'_>,
        path: PathBuf,
        custom_backends: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let mut custom: Vec<StepBackend> = Vec::new();
        if let Some(kw) = custom_backends {
            for (k, v) in kw.iter() {
                let key: String = k.extract()?;
                custom.push(match key.as_str() {
                    "users" => StepBackend::Users(Arc::new(PyUsers::new(&v)?)),
                    "placement" => StepBackend::Placement(Arc::new(PyPlacement::new(&v)?)),
                    "ip" => StepBackend::Ip(Arc::new(PyIpAllocator::new(&v)?)),
                    "dns" => StepBackend::Dns(Arc::new(PyDns::new(&v)?)),
                    "images" => StepBackend::Images(Arc::new(PyImages::new(&v)?)),
                    "hypervisor" => StepBackend::Hypervisor(Arc::new(PyHypervisor::new(&v)?)),
                    "bootstrap" => StepBackend::Bootstrap(Arc::new(PyBootstrapper::new(&v)?)),
                    other => {
                        return Err(PyTypeError::new_err(format!(
                            "unknown custom backend {other:?}; known: users, placement, ip, dns, images, hypervisor, bootstrap"
                        )));
                    }
                });
            }
        }
        let rt = runtime()?;
        let built = py.detach(move || {
            let _enter = rt.enter();
            let config = Config::load(&path)?;
            // A built-in backend this wheel lacks: say so in terms of the wheel (devvm-core
            // would name its own cargo feature). A section a Python backend serves is not
            // one of them.
            let served: Vec<&str> = custom
                .iter()
                .map(|c| devvm_core::registry::section_name(c.step()))
                .collect();
            let registry = devvm_core::registry::Registry::builtin();
            for &step in Step::ALL.iter() {
                let Some(section) = config.section(step) else {
                    continue;
                };
                let name = section.backend.as_str();
                if served.contains(&devvm_core::registry::section_name(step))
                    || registry.names(step).iter().any(|n| n == name) {
                    continue;
                }
                if let Some(feature) = missing_feature(step, name) {
                    return Err(devvm_core::Error::invalid_input(format!(
                        "config {}: [{}] backend {name:?} is not in this devvm wheel: it was built without the `{feature}` feature; the default wheel (`pip install ./devvm-py`) has every backend{}",
                        path.display(),
                        devvm_core::registry::section_name(step),
                        if feature == "libvirt" {
                            " and links the system's libvirt"
                        } else {
                            ""
                        },
                    )));
                }
            }
            // A Python backend serves its section under the name the section gives it
            // (`backend = "my-dns"`), or directly for `backend = "custom"`.
            config
                .builder_with_backends(registry, custom)?
                .build()
        });
        Ok(PyProvisioner {
            inner: Mutex::new(Some(core(py, built)?)),
        })
    }

    /// Provisions a VM for `user` and returns it (a `devvm.Vm`).
    ///
    /// Unset fields come from the config's `[defaults]`, each size field on its own
    /// (`vcpus=4` alone keeps the configured memory and disk). `memory_mb` and `disk_gb`
    /// are the old names of `memory_mib` and `disk_gib`. `on_event(event)` is called on this thread for every event of the run, in
    /// order, before this returns; if it raises, the run is cancelled and rolled back and
    /// the exception propagates. `request_id` is the idempotency key (random if absent):
    /// provisioning the same id again returns the same VM.
    #[pyo3(signature = (user, name=None, template=None, vcpus=None, memory_mib=None, disk_gib=None, on_event=None, request_id=None, memory_mb=None, disk_gb=None))]
    #[allow(clippy::too_many_arguments)]
    fn provision(
        &self,
        py: Python<'_>,
        user: &str,
        name: Option<&str>,
        template: Option<&str>,
        vcpus: Option<u32>,
        memory_mib: Option<u64>,
        disk_gib: Option<u64>,
        on_event: Option<Bound<'_, PyAny>>,
        request_id: Option<&str>,
        memory_mb: Option<u64>,
        disk_gb: Option<u64>,
    ) -> PyResult<PyVm> {
        let either = |new: Option<u64>, old: Option<u64>, name: &str| match (new, old) {
            (Some(_), Some(_)) => Err(PyTypeError::new_err(format!(
                "give {name} once (the old name is an alias)"
            ))),
            (n, o) => Ok(n.or(o)),
        };
        let memory_mib = either(memory_mib, memory_mb, "memory_mib")?;
        let disk_gib = either(disk_gib, disk_gb, "disk_gib")?;
        let p = self.get()?;
        let mut req = ProvisionRequest::new(parse::<UserName>(py, user)?);
        if let Some(id) = request_id {
            req = req.with_request_id(parse::<RequestId>(py, id)?);
        }
        if let Some(name) = name {
            req = req.with_name(parse::<VmName>(py, name)?);
        }
        if let Some(t) = template {
            req = req.with_template(parse::<TemplateName>(py, t)?);
        }
        req.size = devvm_core::SizeRequest {
            vcpus,
            memory_mib,
            disk_gib,
        };
        if let Some(cb) = &on_event
            && !cb.is_callable()
        {
            return Err(PyTypeError::new_err("on_event must be callable"));
        }
        let cancel = CancelToken::new();
        let token = cancel.clone();
        let vm = wait(
            py,
            Work::Run(Box::new(move || p.start_provision(req, token))),
            Watch {
                cancel: Some(cancel),
                callback: on_event,
            },
        )?;
        Ok(PyVm { vm })
    }

    /// Removes the VM `name` (undoes every step in reverse order). Unknown name:
    /// `devvm.NotFound`.
    fn deprovision(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let p = self.get()?;
        let name = parse::<VmName>(py, name)?;
        run(py, async move { p.deprovision(&name).await })
    }

    /// Moves the running VM `name` to host `to` while it runs (live migration; its
    /// address and name stay) and returns it (a `devvm.Vm` naming its new host).
    /// `on_event(event)` sees the move's events as `provision`'s does. Unknown name:
    /// `devvm.NotFound`; no room on `to`: `devvm.Exhausted`; on failure the VM still runs
    /// where it was.
    #[pyo3(signature = (name, to, on_event=None))]
    fn migrate(
        &self,
        py: Python<'_>,
        name: &str,
        to: &str,
        on_event: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyVm> {
        let p = self.get()?;
        let name = parse::<VmName>(py, name)?;
        let to = parse::<devvm_core::HostId>(py, to)?;
        if let Some(cb) = &on_event
            && !cb.is_callable()
        {
            return Err(PyTypeError::new_err("on_event must be callable"));
        }
        let vm = wait(
            py,
            Work::Run(Box::new(move || p.start_migrate(name, to))),
            Watch {
                cancel: None,
                callback: on_event,
            },
        )?;
        Ok(PyVm { vm })
    }

    /// Each placement host as a dict: `host`, `reachable`, `capacity` and `used`
    /// (`vcpus`, `memory_mib`, `disk_gib`) and `vms` (names).
    fn hosts<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let p = self.get()?;
        let hosts = run(py, async move { p.hosts().await })?;
        to_dicts(py, &hosts)
    }

    /// Moves every VM of this provisioner's off `host`, one live migration at a time,
    /// and returns the moves (dicts `vm`, `from`, `to`); with `dry_run=True` only plans
    /// them. When some VM fits nowhere else nothing moves (`devvm.Exhausted`).
    #[pyo3(signature = (host, dry_run=false))]
    fn drain<'py>(
        &self,
        py: Python<'py>,
        host: &str,
        dry_run: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let p = self.get()?;
        let host = parse::<devvm_core::HostId>(py, host)?;
        let moves = run(py, async move { p.drain(&host, dry_run).await })?;
        to_dicts(py, &moves)
    }

    /// Moves VMs so that no host is above capacity and the hosts are evenly used; returns
    /// the moves (dicts `vm`, `from`, `to`); with `dry_run=True` only plans them.
    #[pyo3(signature = (dry_run=false))]
    fn rebalance<'py>(&self, py: Python<'py>, dry_run: bool) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let p = self.get()?;
        let moves = run(py, async move { p.rebalance(dry_run).await })?;
        to_dicts(py, &moves)
    }

    /// Every VM that exists, oldest first.
    fn list(&self, py: Python<'_>) -> PyResult<Vec<PyVm>> {
        let p = self.get()?;
        let vms = run(py, async move { p.list().await })?;
        Ok(vms.into_iter().map(|vm| PyVm { vm }).collect())
    }

    /// The VM named `name`, or None.
    fn get_vm(&self, py: Python<'_>, name: &str) -> PyResult<Option<PyVm>> {
        let p = self.get()?;
        let name = parse::<VmName>(py, name)?;
        let vm = run(py, async move { p.get(&name).await })?;
        Ok(vm.map(|vm| PyVm { vm }))
    }

    /// Finishes or rolls back runs a crashed provisioner left unfinished; returns a
    /// `devvm.RecoveryReport`. Never touches a live run; safe to call any time.
    fn recover(&self, py: Python<'_>) -> PyResult<PyRecoveryReport> {
        let p = self.get()?;
        let report = run(py, async move { p.recover().await })?;
        Ok(PyRecoveryReport { report })
    }

    /// A `devvm.Events` iterator over the events of every run that starts after this call
    /// (from any thread using this provisioner). Iteration blocks (GIL released) until
    /// the next event and ends when the iterator is closed or the provisioner is closed
    /// and every queued event was read.
    fn events(slf: &Bound<'_, Self>) -> PyResult<PyEvents> {
        Ok(PyEvents {
            sub: Mutex::new(Some(slf.get().get()?.subscribe())),
            closed: AtomicBool::new(false),
            owner: slf.clone().unbind(),
        })
    }

    /// The directory holding the journal.
    #[getter]
    fn state_dir(&self) -> PyResult<PathBuf> {
        Ok(self.get()?.state_dir().to_path_buf())
    }

    /// The backend name of each step (`{"user": "ldap", "ip": "python:MyIpam", ...}`).
    #[getter]
    fn backends(&self) -> PyResult<std::collections::BTreeMap<&'static str, String>> {
        let p = self.get()?;
        let b = p.backends();
        Ok(Step::ALL
            .iter()
            .map(|step| {
                let name = match step {
                    Step::User => b.users.backend(),
                    Step::Placement => b.placement.backend(),
                    Step::Ip => b.ip.backend(),
                    Step::Dns => b.dns.backend(),
                    Step::Image | Step::Disk => b.images.backend(),
                    Step::Domain => b.hypervisor.backend(),
                    _ => b.bootstrap.backend(),
                };
                (step.as_str(), name.to_owned())
            })
            .collect())
    }

    /// Releases the provisioner (its journal and owner lock). Later calls raise
    /// `RuntimeError`; `Events` iterators end.
    fn close(&self, py: Python<'_>) {
        let p = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        py.detach(move || drop(p));
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        match self.get() {
            Ok(p) => format!("Provisioner(state_dir={:?})", p.state_dir()),
            Err(_) => "Provisioner(closed)".to_owned(),
        }
    }
}

/// An iterator over progress events (`devvm.Events`), from `Provisioner.events()`.
#[pyclass(module = "devvm", name = "Events", frozen)]
pub(crate) struct PyEvents {
    sub: Mutex<Option<Subscription>>,
    closed: AtomicBool,
    /// The provisioner: the iteration ends when it is closed.
    owner: Py<PyProvisioner>,
}

impl PyEvents {
    /// The next event, waiting at most `timeout` (forever when None). None when closed or
    /// timed out.
    fn next_event(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<Option<PyEvent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.closed.load(Ordering::SeqCst) || crate::is_shut_down() {
                return Ok(None);
            }
            // Polls (GIL released) for up to one tick; needs no runtime, so it also works
            // while the interpreter exits.
            let got = crate::detached(py, || {
                let until = Instant::now() + TICK;
                loop {
                    {
                        let mut guard = self.sub.lock().unwrap_or_else(PoisonError::into_inner);
                        let Some(sub) = guard.as_mut() else {
                            return Some(None);
                        };
                        if let Some(e) = sub.try_recv() {
                            return Some(Some(e));
                        }
                        if self.owner.get().is_closed() {
                            return Some(None);
                        }
                    }
                    // Returning at once on shutdown lets a thread still iterating leave
                    // Rust code while `atexit` runs, before the interpreter finalizes.
                    if Instant::now() >= until
                        || self.closed.load(Ordering::SeqCst)
                        || crate::is_shut_down()
                    {
                        return None;
                    }
                    std::thread::sleep(POLL);
                }
            });
            match got {
                Some(Some(e)) => return Ok(Some(PyEvent::new(e))),
                Some(None) => {
                    self.closed.store(true, Ordering::SeqCst);
                    return Ok(None);
                }
                None => {
                    py.check_signals()?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

#[pymethods]
impl PyEvents {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyEvent>> {
        self.next_event(py, None)
    }

    /// The next event, waiting at most `timeout` seconds (forever when None); None if
    /// none came or the iterator is closed.
    #[pyo3(signature = (timeout=None))]
    fn get(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<PyEvent>> {
        let timeout = match timeout {
            Some(t) if t.is_finite() && t >= 0.0 => Some(Duration::from_secs_f64(t)),
            Some(_) => return Err(PyTypeError::new_err("timeout must be a number >= 0")),
            None => None,
        };
        self.next_event(py, timeout)
    }

    /// Ends the iteration (also from another thread); queued events are dropped.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut g) = self.sub.try_lock() {
            g.take();
        }
    }

    /// Whether `close()` was called or the provisioner is gone.
    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.close();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProvisioner>()?;
    m.add_class::<PyEvents>()?;
    m.add_class::<crate::custom::PyProgress>()?;
    Ok(())
}

/// Each item's serde form as a Python dict.
fn to_dicts<'py, T: serde::Serialize>(
    py: Python<'py>,
    items: &[T],
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    items
        .iter()
        .map(|i| {
            let v = serde_json::to_value(i)
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
            crate::convert::json_to_py(py, &v)
        })
        .collect()
}
