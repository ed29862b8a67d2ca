//! The exception hierarchy: `devvm.Error` and one subclass per [`ErrorKind`], and the
//! conversions between them and [`devvm_core::Error`] in both directions.
//!
//! Every exception instance raised by the binding carries `kind` (the snake_case kind),
//! `step` (the failed step or `None`), `retryable`, `backend`, `message` (without the
//! step), `cause` (the source's message, if any) and `undo_failures` (a list of dicts
//! `{step, resource, error, kind}`). The classes carry the same attributes as defaults, so
//! a Python backend that raises `devvm.Conflict("...")` is mapped back to `conflict`.

use devvm_core::{Error as CoreError, ErrorKind, Step};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple, PyType};

use crate::convert::json_to_py;

create_exception!(
    devvm,
    Error,
    PyException,
    "Base class of every devvm error. Attributes: kind, step, retryable, backend, message, cause, undo_failures."
);
create_exception!(
    devvm,
    NotFound,
    Error,
    "The thing asked for does not exist (kind `not_found`)."
);
create_exception!(
    devvm,
    UserNotFound,
    NotFound,
    "The user is not in the directory (kind `not_found` at step `user`)."
);
create_exception!(
    devvm,
    AlreadyExists,
    Error,
    "The thing to create exists already (kind `already_exists`)."
);
create_exception!(
    devvm,
    InvalidInput,
    Error,
    "Malformed input or config (kind `invalid_input`)."
);
create_exception!(
    devvm,
    Exhausted,
    Error,
    "A finite resource ran out (kind `exhausted`)."
);
create_exception!(
    devvm,
    SubnetExhausted,
    Exhausted,
    "No free address in the subnet (kind `exhausted` at step `ip`)."
);
create_exception!(
    devvm,
    Unauthorized,
    Error,
    "Not allowed (kind `unauthorized`)."
);
create_exception!(
    devvm,
    Conflict,
    Error,
    "The request clashes with existing state (kind `conflict`)."
);
create_exception!(
    devvm,
    Unavailable,
    Error,
    "A service could not be reached (kind `unavailable`, retryable)."
);
create_exception!(
    devvm,
    Timeout,
    Error,
    "A step or service did not answer in time (kind `timeout`, retryable)."
);
create_exception!(
    devvm,
    Cancelled,
    Error,
    "The run was cancelled (kind `cancelled`)."
);
create_exception!(
    devvm,
    BackendError,
    Error,
    "Any other failure inside a backend (kind `backend`)."
);

/// Every kind, for the class attributes.
const KINDS: [ErrorKind; 10] = [
    ErrorKind::NotFound,
    ErrorKind::AlreadyExists,
    ErrorKind::InvalidInput,
    ErrorKind::Exhausted,
    ErrorKind::Unauthorized,
    ErrorKind::Conflict,
    ErrorKind::Unavailable,
    ErrorKind::Timeout,
    ErrorKind::Cancelled,
    ErrorKind::Backend,
];

/// The class an error of `kind` at `step` is raised as.
fn class_of<'py>(py: Python<'py>, kind: ErrorKind, step: Option<Step>) -> Bound<'py, PyType> {
    match (kind, step) {
        (ErrorKind::NotFound, Some(Step::User)) => py.get_type::<UserNotFound>(),
        (ErrorKind::NotFound, _) => py.get_type::<NotFound>(),
        (ErrorKind::AlreadyExists, _) => py.get_type::<AlreadyExists>(),
        (ErrorKind::InvalidInput, _) => py.get_type::<InvalidInput>(),
        (ErrorKind::Exhausted, Some(Step::Ip)) => py.get_type::<SubnetExhausted>(),
        (ErrorKind::Exhausted, _) => py.get_type::<Exhausted>(),
        (ErrorKind::Unauthorized, _) => py.get_type::<Unauthorized>(),
        (ErrorKind::Conflict, _) => py.get_type::<Conflict>(),
        (ErrorKind::Unavailable, _) => py.get_type::<Unavailable>(),
        (ErrorKind::Timeout, _) => py.get_type::<Timeout>(),
        (ErrorKind::Cancelled, _) => py.get_type::<Cancelled>(),
        (ErrorKind::Backend, _) => py.get_type::<BackendError>(),
        _ => py.get_type::<Error>(),
    }
}

fn set_class_defaults(cls: &Bound<'_, PyType>, kind: ErrorKind) -> PyResult<()> {
    cls.setattr("kind", kind.as_str())?;
    cls.setattr("retryable", kind.default_retryable())?;
    cls.setattr("step", None::<&str>)?;
    cls.setattr("backend", None::<&str>)?;
    cls.setattr("message", None::<&str>)?;
    cls.setattr("cause", None::<&str>)?;
    cls.setattr("undo_failures", PyTuple::empty(cls.py()))?;
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    set_class_defaults(&py.get_type::<Error>(), ErrorKind::Backend)?;
    m.add("Error", py.get_type::<Error>())?;
    for kind in KINDS {
        let cls = class_of(py, kind, None);
        set_class_defaults(&cls, kind)?;
        m.add(cls.name()?.to_string().as_str(), &cls)?;
    }
    for (kind, step) in [
        (ErrorKind::NotFound, Step::User),
        (ErrorKind::Exhausted, Step::Ip),
    ] {
        let cls = class_of(py, kind, Some(step));
        set_class_defaults(&cls, kind)?;
        m.add(cls.name()?.to_string().as_str(), &cls)?;
    }
    Ok(())
}

/// The Python exception for a devvm error.
pub(crate) fn to_py_err(py: Python<'_>, e: &CoreError) -> PyErr {
    match build(py, e) {
        Ok(err) => err,
        Err(err) => err,
    }
}

fn build(py: Python<'_>, e: &CoreError) -> PyResult<PyErr> {
    let cls = class_of(py, e.kind(), e.step());
    let inst = cls.call1((e.to_string(),))?;
    inst.setattr("kind", e.kind().as_str())?;
    inst.setattr("step", e.step().map(Step::as_str))?;
    inst.setattr("retryable", e.is_retryable())?;
    inst.setattr("backend", e.backend_name())?;
    inst.setattr("message", e.message())?;
    inst.setattr("cause", std::error::Error::source(e).map(|s| s.to_string()))?;
    let failures = PyList::empty(py);
    for f in e.undo_failures() {
        let v = serde_json::to_value(f).unwrap_or(serde_json::Value::Null);
        failures.append(json_to_py(py, &v)?)?;
    }
    inst.setattr("undo_failures", failures)?;
    Ok(PyErr::from_value(inst))
}

/// The devvm error for an exception raised by Python code (a custom backend): a
/// `devvm.Error` keeps its kind, message and retryability; anything else is `backend`
/// with the exception's type and message.
pub(crate) fn from_py_err(py: Python<'_>, err: &PyErr) -> CoreError {
    let value = err.value(py);
    if value.is_instance_of::<Error>() {
        let kind = value
            .getattr("kind")
            .ok()
            .and_then(|k| k.extract::<String>().ok())
            .and_then(|k| serde_json::from_value::<ErrorKind>(serde_json::Value::String(k)).ok())
            .unwrap_or(ErrorKind::Backend);
        let message = value
            .getattr("message")
            .ok()
            .and_then(|m| m.extract::<String>().ok())
            .unwrap_or_else(|| value.to_string());
        let mut e = CoreError::new(kind, message);
        if let Some(retryable) = value
            .getattr("retryable")
            .ok()
            .and_then(|r| r.extract::<bool>().ok())
        {
            e = e.with_retryable(retryable);
        }
        e
    } else {
        let ty = value
            .get_type()
            .qualname()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "Exception".to_owned());
        let msg = value.to_string();
        if msg.is_empty() {
            CoreError::backend(ty)
        } else {
            CoreError::backend(format!("{ty}: {msg}"))
        }
    }
}
