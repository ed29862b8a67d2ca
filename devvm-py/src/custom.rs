//! Step backends written in Python: each struct implements a devvm-core trait by calling
//! the methods of a Python object, in a blocking thread that takes the GIL.
//!
//! Arguments go to Python as plain values (names and addresses as `str`, structs as
//! dicts of their serde form); results come back as dicts, lists, str or None and are
//! decoded with the serde form of the Rust type. A `devvm.Error` raised by Python keeps
//! its kind; any other exception is a `backend` error with its type and message. The
//! protocol of each step is documented in `devvm/backends.py`.

use std::net::IpAddr;
use std::sync::Arc;

use devvm_core::{
    BootstrapReport, BootstrapTarget, Bootstrapper, Disk, DnsRecord, DnsUpdater, Domain,
    DomainSpec, Error, HostId, Hypervisor, ImageStore, IpAllocator, Lease, Placement, Progress,
    RequestId, Result, Template, TemplateName, Undone, User, UserDirectory, UserName, VmName,
    VmSize, async_trait,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::convert::{json_to_py, py_to_json};
use crate::errors::from_py_err;

/// An argument passed to a Python method.
enum Arg {
    Json(Value),
    Progress(Progress),
}

fn s(v: impl ToString) -> Arg {
    Arg::Json(Value::String(v.to_string()))
}

/// A Python object standing in for a backend.
#[derive(Clone)]
pub(crate) struct PyBackend {
    obj: Arc<Py<PyAny>>,
    name: Arc<str>,
}

impl PyBackend {
    /// Wraps `obj`, checking that it has every method of `methods` (for the step `what`).
    fn new(obj: &Bound<'_, PyAny>, what: &str, methods: &[&str]) -> PyResult<Self> {
        let missing: Vec<&str> = methods
            .iter()
            .copied()
            .filter(|m| !obj.getattr(*m).map(|a| a.is_callable()).unwrap_or(false))
            .collect();
        if !missing.is_empty() {
            return Err(PyTypeError::new_err(format!(
                "a {what} needs the method(s) {}",
                missing.join(", ")
            )));
        }
        let name = match obj.getattr("backend").and_then(|b| b.extract::<String>()) {
            Ok(n) => n,
            Err(_) => format!("python:{}", obj.get_type().qualname()?),
        };
        Ok(PyBackend {
            obj: Arc::new(obj.clone().unbind()),
            name: name.into(),
        })
    }

    /// Calls `method(*args)` in a blocking thread holding the GIL; returns its result as
    /// JSON.
    async fn call(&self, method: &'static str, args: Vec<Arg>) -> Result<Value> {
        let obj = self.obj.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || {
            Python::attach(|py| {
                let run = || -> PyResult<Value> {
                    let mut items = Vec::with_capacity(args.len());
                    for a in args {
                        items.push(match a {
                            Arg::Json(v) => json_to_py(py, &v)?,
                            Arg::Progress(p) => {
                                Bound::new(py, PyProgress { progress: p })?.into_any()
                            }
                        });
                    }
                    let tuple = PyTuple::new(py, items)?;
                    let r = obj.bind(py).call_method1(method, tuple)?;
                    py_to_json(&r)
                };
                run().map_err(|e| from_py_err(py, &e))
            })
        })
        .await
        .map_err(|e| Error::backend(format!("{name}.{method}() did not return")).with_source(e))?
    }

    /// Calls `method` and decodes its result as `T`.
    async fn call_as<T: DeserializeOwned>(
        &self,
        method: &'static str,
        args: Vec<Arg>,
    ) -> Result<T> {
        let v = self.call(method, args).await?;
        self.decode(method, v)
    }

    /// What an undo method returned: `None` (or `"removed"`) when it removed the run's
    /// resource, `"absent"` when there was nothing, and `"foreign"` or
    /// `{"outcome": "foreign", "holder": "..."}` when it left another's resource alone.
    fn undone(&self, method: &str, v: Value) -> Result<Undone> {
        match v {
            Value::Null => Ok(Undone::Removed),
            Value::String(o) if o == "foreign" => Ok(Undone::foreign("unknown")),
            Value::String(o) => self.decode(method, serde_json::json!({ "outcome": o })),
            other => self.decode(method, other),
        }
    }

    fn decode<T: DeserializeOwned>(&self, method: &str, v: Value) -> Result<T> {
        serde_json::from_value(v).map_err(|e| {
            Error::backend(format!(
                "{}.{method}() returned an unexpected value: {e}",
                self.name
            ))
        })
    }
}

/// Adds `key: value` to a JSON object that lacks it.
fn with_default(mut v: Value, key: &str, value: &str) -> Value {
    if let Value::Object(map) = &mut v {
        map.entry(key)
            .or_insert_with(|| Value::String(value.to_owned()));
    }
    v
}

/// The progress handle a Python step receives (`devvm.Progress`).
#[pyclass(module = "devvm", name = "Progress", frozen)]
pub(crate) struct PyProgress {
    progress: Progress,
}

#[pymethods]
impl PyProgress {
    /// Reports a line of progress (a `step_progress` event). Never put a secret in it.
    fn message(&self, message: String) {
        self.progress.message(message);
    }
    /// Reports progress with the fraction done (clamped to 0.0..=1.0).
    fn fraction(&self, message: String, fraction: f64) {
        self.progress.fraction(message, fraction);
    }
}

/// `UserDirectory`: `find_user(user) -> dict`.
pub(crate) struct PyUsers(PyBackend);

impl PyUsers {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        PyBackend::new(obj, "UserDirectory", &["find_user"]).map(PyUsers)
    }
}

#[async_trait]
impl UserDirectory for PyUsers {
    fn backend(&self) -> &str {
        &self.0.name
    }
    async fn find_user(&self, user: &UserName) -> Result<User> {
        let v = self.0.call("find_user", vec![s(user)]).await?;
        self.0
            .decode("find_user", with_default(v, "name", user.as_str()))
    }
}

/// `Placement`: `reserve(vm, size) -> str`, `release(vm)`, `reservation(vm) -> str | None`.
pub(crate) struct PyPlacement(PyBackend);

impl PyPlacement {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        PyBackend::new(obj, "Placement", &["reserve", "release", "reservation"]).map(PyPlacement)
    }
}

#[async_trait]
impl Placement for PyPlacement {
    fn backend(&self) -> &str {
        &self.0.name
    }
    async fn reserve(&self, vm: &VmName, size: &VmSize, owner: &RequestId) -> Result<HostId> {
        let size = serde_json::to_value(size).unwrap_or(Value::Null);
        self.0
            .call_as("reserve", vec![s(vm), Arg::Json(size), s(owner)])
            .await
    }
    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        let v = self.0.call("release", vec![s(vm), s(owner)]).await?;
        self.0.undone("release", v)
    }
    async fn reservation(&self, vm: &VmName) -> Result<Option<HostId>> {
        self.0.call_as("reservation", vec![s(vm)]).await
    }
}

/// `IpAllocator`: `allocate(vm) -> dict`, `release(vm)`, `lease(vm) -> dict | None`.
pub(crate) struct PyIpAllocator(PyBackend);

impl PyIpAllocator {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        PyBackend::new(obj, "IpAllocator", &["allocate", "release", "lease"]).map(PyIpAllocator)
    }
}

#[async_trait]
impl IpAllocator for PyIpAllocator {
    fn backend(&self) -> &str {
        &self.0.name
    }
    async fn allocate(&self, vm: &VmName, owner: &RequestId) -> Result<Lease> {
        let v = self.0.call("allocate", vec![s(vm), s(owner)]).await?;
        self.0
            .decode("allocate", with_default(v, "vm", vm.as_str()))
    }
    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        let v = self.0.call("release", vec![s(vm), s(owner)]).await?;
        self.0.undone("release", v)
    }
    async fn lease(&self, vm: &VmName) -> Result<Option<Lease>> {
        let v = self.0.call("lease", vec![s(vm)]).await?;
        self.0.decode("lease", with_default(v, "vm", vm.as_str()))
    }
}

/// `DnsUpdater`: `fqdn(vm) -> str`, `publish(vm, ip) -> dict`, `remove(vm, ip)`,
/// `resolve(vm) -> list[str]`, `reverse(ip) -> list[str]`.
pub(crate) struct PyDns(PyBackend);

impl PyDns {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        PyBackend::new(
            obj,
            "DnsUpdater",
            &["fqdn", "publish", "remove", "resolve", "reverse"],
        )
        .map(PyDns)
    }
}

#[async_trait]
impl DnsUpdater for PyDns {
    fn backend(&self) -> &str {
        &self.0.name
    }
    fn fqdn(&self, vm: &VmName) -> String {
        // The trait cannot fail here: an exception is reported as unraisable and the bare
        // VM name is used (which the conformance suite then flags).
        Python::attach(|py| {
            let obj = self.0.obj.bind(py);
            match obj
                .call_method1("fqdn", (vm.as_str(),))
                .and_then(|r| r.extract::<String>())
            {
                Ok(fqdn) => fqdn,
                Err(e) => {
                    e.write_unraisable(py, Some(obj));
                    vm.as_str().to_owned()
                }
            }
        })
    }
    async fn publish(&self, vm: &VmName, ip: IpAddr) -> Result<DnsRecord> {
        self.0.call_as("publish", vec![s(vm), s(ip)]).await
    }
    async fn remove(&self, vm: &VmName, ip: IpAddr) -> Result<Undone> {
        let v = self.0.call("remove", vec![s(vm), s(ip)]).await?;
        self.0.undone("remove", v)
    }
    async fn resolve(&self, vm: &VmName) -> Result<Vec<IpAddr>> {
        self.0.call_as("resolve", vec![s(vm)]).await
    }
    async fn reverse(&self, ip: IpAddr) -> Result<Vec<String>> {
        self.0.call_as("reverse", vec![s(ip)]).await
    }
}

/// `Bootstrapper`: `bootstrap(target, progress) -> dict`, `unregister(vm)`.
pub(crate) struct PyBootstrapper(PyBackend);

impl PyBootstrapper {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        PyBackend::new(obj, "Bootstrapper", &["bootstrap", "unregister"]).map(PyBootstrapper)
    }
}

#[async_trait]
impl Bootstrapper for PyBootstrapper {
    fn backend(&self) -> &str {
        &self.0.name
    }
    async fn bootstrap(
        &self,
        target: &BootstrapTarget,
        progress: &Progress,
    ) -> Result<BootstrapReport> {
        let target = serde_json::to_value(target).unwrap_or(Value::Null);
        self.0
            .call_as(
                "bootstrap",
                vec![Arg::Json(target), Arg::Progress(progress.clone())],
            )
            .await
    }
    async fn unregister(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        let v = self.0.call("unregister", vec![s(vm), s(owner)]).await?;
        self.0.undone("unregister", v)
    }
}

/// `ImageStore`: `prepare(template, progress) -> dict`, `templates() -> list[dict]`,
/// `create_disk(vm, host, template, size_gib, progress) -> dict`, `delete_disk(vm, host)`,
/// `disk(vm, host) -> dict | None`.
pub(crate) struct PyImages(PyBackend);

impl PyImages {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        PyBackend::new(
            obj,
            "ImageStore",
            &["prepare", "templates", "create_disk", "delete_disk", "disk"],
        )
        .map(PyImages)
    }
}

#[async_trait]
impl ImageStore for PyImages {
    fn backend(&self) -> &str {
        &self.0.name
    }
    async fn prepare(
        &self,
        template: &TemplateName,
        host: &HostId,
        progress: &Progress,
    ) -> Result<Template> {
        self.0
            .call_as(
                "prepare",
                vec![s(template), s(host), Arg::Progress(progress.clone())],
            )
            .await
    }
    async fn templates(&self) -> Result<Vec<Template>> {
        self.0.call_as("templates", vec![]).await
    }
    async fn create_disk(
        &self,
        vm: &VmName,
        host: &HostId,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<Disk> {
        let template = serde_json::to_value(template).unwrap_or(Value::Null);
        let v = self
            .0
            .call(
                "create_disk",
                vec![
                    s(vm),
                    s(host),
                    Arg::Json(template),
                    Arg::Json(size_gib.into()),
                    s(owner),
                    Arg::Progress(progress.clone()),
                ],
            )
            .await?;
        self.0
            .decode("create_disk", with_default(v, "vm", vm.as_str()))
    }
    async fn delete_disk(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone> {
        let v = self
            .0
            .call("delete_disk", vec![s(vm), s(host), s(owner)])
            .await?;
        self.0.undone("delete_disk", v)
    }
    async fn disk(&self, vm: &VmName, host: &HostId) -> Result<Option<Disk>> {
        let v = self.0.call("disk", vec![s(vm), s(host)]).await?;
        self.0.decode("disk", with_default(v, "vm", vm.as_str()))
    }
}

/// The spec a Python hypervisor receives: every field of the `DomainSpec`, and the
/// first-boot seed's files (`meta_data`, `user_data`, `network_config`) as text. The
/// user-data holds the guest's private host key: the object is the user's own backend.
fn spec_json(spec: &DomainSpec) -> Value {
    // No name servers: a Python hypervisor knows its own network's.
    let seed = spec.nocloud_files(&[]).map(|f| {
        serde_json::json!({
            "meta_data": f.meta_data,
            "user_data": secrecy::ExposeSecret::expose_secret(&f.user_data),
            "network_config": f.network_config,
            "host_key": spec.seed.as_ref().and_then(|s| s.host_key.as_ref()).map(|k| k.public.clone()),
        })
    });
    serde_json::json!({
        "name": spec.name,
        "host": spec.host,
        "size": spec.size,
        "disk": spec.disk,
        "template": spec.template,
        "lease": spec.lease,
        "fqdn": spec.fqdn,
        "owner": spec.owner,
        "request_id": spec.request_id,
        "ssh_keys": spec.ssh_keys,
        "seed": seed,
    })
}

/// `Hypervisor`: `create(spec, progress) -> dict`, `destroy(vm, host)`,
/// `domain(vm, host) -> dict | None`.
pub(crate) struct PyHypervisor(PyBackend);

impl PyHypervisor {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        PyBackend::new(obj, "Hypervisor", &["create", "destroy", "domain"]).map(PyHypervisor)
    }
}

#[async_trait]
impl Hypervisor for PyHypervisor {
    fn backend(&self) -> &str {
        &self.0.name
    }
    async fn create(&self, spec: &DomainSpec, progress: &Progress) -> Result<Domain> {
        let v = self
            .0
            .call(
                "create",
                vec![Arg::Json(spec_json(spec)), Arg::Progress(progress.clone())],
            )
            .await?;
        let v = with_default(v, "name", spec.name.as_str());
        self.0
            .decode("create", with_default(v, "host", spec.host.as_str()))
    }
    async fn destroy(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone> {
        let v = self
            .0
            .call("destroy", vec![s(vm), s(host), s(owner)])
            .await?;
        self.0.undone("destroy", v)
    }
    async fn domain(&self, vm: &VmName, host: &HostId) -> Result<Option<Domain>> {
        let v = self.0.call("domain", vec![s(vm), s(host)]).await?;
        let v = with_default(v, "name", vm.as_str());
        self.0
            .decode("domain", with_default(v, "host", host.as_str()))
    }
}
