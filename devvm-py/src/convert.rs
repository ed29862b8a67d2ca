//! Conversions between devvm's values and Python objects: JSON-shaped values both ways,
//! and the classes `Vm`, `Event` and `RecoveryReport`, whose `to_dict()` is the serde
//! JSON form of the Rust value.

use devvm_core::{Event, RecoveryReport, Vm};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};

/// A JSON value as plain Python objects (dict, list, str, int, float, bool, None).
pub(crate) fn json_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let list = PyList::empty(py);
            for item in a {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(o) => {
            let dict = PyDict::new(py);
            for (k, item) in o {
                dict.set_item(k, json_to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// A Python value as JSON: dicts (string keys), lists, tuples, str, int, float, bool and
/// None map directly; anything else (an `ipaddress` object, a `Path`) becomes its `str()`.
pub(crate) fn py_to_json(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        Ok(Value::Null)
    } else if let Ok(b) = obj.cast::<PyBool>() {
        Ok(Value::Bool(b.is_true()))
    } else if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            Ok(Value::from(i))
        } else {
            Ok(Value::from(obj.extract::<u64>()?))
        }
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        serde_json::Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| PyValueError::new_err("a float that is not finite cannot be converted"))
    } else if let Ok(s) = obj.cast::<PyString>() {
        Ok(Value::String(s.to_cow()?.into_owned()))
    } else if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter() {
            let key = k
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err("dict keys must be str"))?
                .to_cow()?
                .into_owned();
            map.insert(key, py_to_json(&v)?);
        }
        Ok(Value::Object(map))
    } else if let Ok(l) = obj.cast::<PyList>() {
        l.iter().map(|v| py_to_json(&v)).collect()
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        t.iter().map(|v| py_to_json(&v)).collect()
    } else {
        Ok(Value::String(obj.str()?.to_cow()?.into_owned()))
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A UTC `datetime.datetime` for an instant.
fn datetime<'py>(py: Python<'py>, at: time::OffsetDateTime) -> PyResult<Bound<'py, PyAny>> {
    let dt = py.import("datetime")?;
    let utc = dt.getattr("timezone")?.getattr("utc")?;
    let micros = at.unix_timestamp_nanos() / 1000;
    let secs = micros.div_euclid(1_000_000) as i64;
    let us = micros.rem_euclid(1_000_000) as i64;
    // fromtimestamp(secs) + timedelta(microseconds=us) keeps full precision.
    let base = dt
        .getattr("datetime")?
        .call_method1("fromtimestamp", (secs, utc))?;
    let delta = dt.getattr("timedelta")?.call1((0, 0, us))?;
    base.call_method1("__add__", (delta,))
}

/// A provisioned VM (`devvm.Vm`).
#[pyclass(module = "devvm", name = "Vm", frozen, eq)]
#[derive(PartialEq)]
pub(crate) struct PyVm {
    pub(crate) vm: Vm,
}

#[pymethods]
impl PyVm {
    /// The VM name (a DNS label).
    #[getter]
    fn name(&self) -> &str {
        self.vm.name.as_str()
    }
    /// Its fully qualified name, published in DNS.
    #[getter]
    fn fqdn(&self) -> &str {
        &self.vm.fqdn
    }
    /// Its address, as a string.
    #[getter]
    fn ip(&self) -> String {
        self.vm.ip.to_string()
    }
    /// The host it runs on.
    #[getter]
    fn host(&self) -> &str {
        self.vm.host.as_str()
    }
    /// Its disk file.
    #[getter]
    fn disk(&self) -> String {
        self.vm.disk.display().to_string()
    }
    /// The owner's user name.
    #[getter]
    fn owner(&self) -> &str {
        self.vm.owner.as_str()
    }
    /// The template it was made from.
    #[getter]
    fn template(&self) -> &str {
        self.vm.template.as_str()
    }
    /// When provisioning finished (a UTC `datetime`).
    #[getter]
    fn created<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        datetime(py, self.vm.created)
    }
    /// The request id (idempotency key) that made it.
    #[getter]
    fn request_id(&self) -> &str {
        self.vm.request_id.as_str()
    }
    /// Whether configuration management ran on it.
    #[getter]
    fn bootstrapped(&self) -> bool {
        self.vm.bootstrapped
    }
    /// The serde JSON form of the Rust `Vm`, as a dict (`created` is an RFC 3339 string).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &to_value(&self.vm))
    }
    fn __repr__(&self) -> String {
        format!(
            "Vm(name={:?}, fqdn={:?}, ip={:?}, host={:?}, owner={:?})",
            self.vm.name.as_str(),
            self.vm.fqdn,
            self.vm.ip.to_string(),
            self.vm.host.as_str(),
            self.vm.owner.as_str()
        )
    }
}

/// One progress event (`devvm.Event`).
#[pyclass(module = "devvm", name = "Event", frozen)]
pub(crate) struct PyEvent {
    pub(crate) event: Event,
    json: Value,
}

impl PyEvent {
    pub(crate) fn new(event: Event) -> Self {
        let json = to_value(&event);
        PyEvent { event, json }
    }

    fn field<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, self.json.get(key).unwrap_or(&Value::Null))
    }
}

#[pymethods]
impl PyEvent {
    /// What happened: `run_started`, `step_started`, `step_progress`, `step_finished`,
    /// `step_failed`, `step_undone`, `undo_failed`, `run_finished`, `run_failed`.
    #[getter]
    #[pyo3(name = "type")]
    fn kind_name<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "type")
    }
    /// The run's request id.
    #[getter]
    fn request_id(&self) -> &str {
        self.event.request_id.as_str()
    }
    /// The name of the VM the run is about.
    #[getter]
    fn vm(&self) -> &str {
        self.event.vm.as_str()
    }
    /// Position of the event in its run, from 0.
    #[getter]
    fn seq(&self) -> u64 {
        self.event.seq
    }
    /// When it happened (a UTC `datetime`).
    #[getter]
    fn at<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        datetime(py, self.event.at)
    }
    /// The step it is about, or None.
    #[getter]
    fn step(&self) -> Option<&'static str> {
        self.event.kind.step().map(devvm_core::Step::as_str)
    }
    /// `provision`, `deprovision` or `recover` for `run_started`; else None.
    #[getter]
    fn operation<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "operation")
    }
    /// The progress line of `step_progress`; else None.
    #[getter]
    fn message<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "message")
    }
    /// Fraction done of `step_progress`, when known; else None.
    #[getter]
    fn fraction<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "fraction")
    }
    /// The one-line result of `step_finished`; else None.
    #[getter]
    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "summary")
    }
    /// The JSON result of `step_finished`; else None.
    #[getter]
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "result")
    }
    /// The error dict (`kind`, `message`, `retryable`, ...) of `step_failed` / `run_failed`.
    #[getter]
    fn error<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "error")
    }
    /// The undo failure dict of `undo_failed`; else None.
    #[getter]
    fn failure<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "failure")
    }
    /// The VM made, for the `run_finished` event of a provision; else None.
    #[getter]
    fn provisioned(&self) -> Option<PyVm> {
        match &self.event.kind {
            devvm_core::EventKind::RunFinished {
                provisioned: Some(vm),
            } => Some(PyVm {
                vm: vm.as_ref().clone(),
            }),
            _ => None,
        }
    }
    /// Whether the event ends its run (`run_finished` or `run_failed`).
    #[getter]
    fn is_terminal(&self) -> bool {
        self.event.kind.is_terminal()
    }
    /// The serde JSON form of the Rust `Event`, as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.json)
    }
    /// The serde JSON form of the Rust `Event`, as a string.
    fn to_json(&self) -> String {
        serde_json::to_string(&self.event).unwrap_or_default()
    }
    fn __repr__(&self) -> String {
        let kind = self.json.get("type").and_then(Value::as_str).unwrap_or("?");
        let step = self
            .step()
            .map(|s| format!(", step={s:?}"))
            .unwrap_or_default();
        format!(
            "Event(type={kind:?}{step}, vm={:?}, seq={})",
            self.event.vm.as_str(),
            self.event.seq
        )
    }
}

/// What `Provisioner.recover()` did (`devvm.RecoveryReport`).
#[pyclass(module = "devvm", name = "RecoveryReport", frozen)]
pub(crate) struct PyRecoveryReport {
    pub(crate) report: RecoveryReport,
}

#[pymethods]
impl PyRecoveryReport {
    /// Runs whose every step had finished, now recorded as VMs.
    #[getter]
    fn completed(&self) -> Vec<PyVm> {
        self.report
            .completed
            .iter()
            .map(|vm| PyVm { vm: vm.clone() })
            .collect()
    }
    /// Request ids of provisions that were rolled back.
    #[getter]
    fn rolled_back(&self) -> Vec<String> {
        self.report
            .rolled_back
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect()
    }
    /// Names of VMs whose interrupted deprovision was finished.
    #[getter]
    fn removed(&self) -> Vec<String> {
        self.report
            .removed
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect()
    }
    /// Resources that still could not be removed (dicts `{step, resource, error, kind}`);
    /// a later `recover()` tries again.
    #[getter]
    fn still_held<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &to_value(&self.report.still_held))
    }
    /// Runs whose journal rows cannot be read (dicts `{request_id, vm, error}`): left
    /// exactly as they are.
    #[getter]
    fn unreadable<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &to_value(&self.report.unreadable))
    }
    /// Whether recovery found nothing to do.
    #[getter]
    fn is_empty(&self) -> bool {
        self.report == RecoveryReport::default()
    }
    /// A dict with the five lists (VMs as their `to_dict()` form).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let r = &self.report;
        let v = serde_json::json!({
            "completed": to_value(&r.completed),
            "rolled_back": to_value(&r.rolled_back),
            "removed": to_value(&r.removed),
            "still_held": to_value(&r.still_held),
            "unreadable": to_value(&r.unreadable),
        });
        json_to_py(py, &v)
    }
    fn __repr__(&self) -> String {
        let r = &self.report;
        format!(
            "RecoveryReport(completed={}, rolled_back={}, removed={}, still_held={}, unreadable={})",
            r.completed.len(),
            r.rolled_back.len(),
            r.removed.len(),
            r.still_held.len(),
            r.unreadable.len()
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyVm>()?;
    m.add_class::<PyEvent>()?;
    m.add_class::<PyRecoveryReport>()?;
    Ok(())
}
