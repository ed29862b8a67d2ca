//! The one public error type of devvm.
//!
//! Every fallible call returns [`Error`]. Callers branch on [`Error::kind`] and
//! [`Error::is_retryable`]; the message is meant for people. Backends keep their own
//! private error types and convert them with [`Error::new`] plus the builder methods.
//!
//! `Display` is one short line (`"<step>: <message>"`) and never repeats the source,
//! which is available through [`std::error::Error::source`]. Nothing secret is ever put
//! into an error: backends must not pass key material or passwords as messages.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::step::Step;

/// What went wrong, in terms a caller can act on.
///
/// New kinds may be added in minor releases; match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The thing asked for does not exist (an unknown user, VM or template).
    NotFound,
    /// The thing to create exists already (a VM name in use).
    AlreadyExists,
    /// The input is malformed: not a DNS label, a bad path, a bad config value.
    InvalidInput,
    /// A finite resource ran out: no free address in the subnet, no host with a free slot.
    Exhausted,
    /// The caller or the user may not do this (not in the owners' group, a wrong TSIG key).
    Unauthorized,
    /// The request clashes with existing state (a DNS name that points elsewhere).
    Conflict,
    /// A service could not be reached or refused to serve right now.
    Unavailable,
    /// A step or a service did not answer in time.
    Timeout,
    /// The run was cancelled by its caller.
    Cancelled,
    /// Any other failure inside a backend (including a panic inside a step).
    Backend,
}

impl ErrorKind {
    /// Whether an operation that failed with this kind may succeed if tried again unchanged.
    pub fn default_retryable(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Timeout)
    }

    /// A stable snake_case name, as used in events and by the bindings.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Exhausted => "exhausted",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Backend => "backend",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A resource that a rollback or a deprovision could not remove.
///
/// It is never dropped silently: it is attached to the error the run returns, emitted as
/// an event, and kept in the journal, so `recover()` tries it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoFailure {
    /// The step whose undo failed.
    pub step: Step,
    /// What is still held, in words a person can act on (for example `lease 10.0.0.7 of vm web-1`).
    pub resource: String,
    /// Why the undo failed (the Display of the undo's error).
    pub error: String,
    /// The kind of the undo's error.
    pub kind: ErrorKind,
}

impl fmt::Display for UndoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} still held ({})", self.resource, self.error)
    }
}

/// The error of every devvm operation.
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    step: Option<Step>,
    backend: Option<String>,
    undo_failures: Vec<UndoFailure>,
    source: Option<Source>,
    detail: Option<Source>,
}

impl Error {
    /// A new error of `kind` with a short message. Retryability defaults from the kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: kind.default_retryable(),
            step: None,
            backend: None,
            undo_failures: Vec::new(),
            source: None,
            detail: None,
        }
    }

    /// An error made from a backend's own error type `detail`: the message is its
    /// `Display`, [`Error::detail`] gives it back (so a caller can match its variants), and
    /// [`std::error::Error::source`] continues with `detail`'s own source, not with
    /// `detail` itself (whose text is already the message).
    pub fn from_detail(
        kind: ErrorKind,
        detail: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let mut e = Self::new(kind, detail.to_string());
        e.detail = Some(Box::new(detail));
        e
    }

    /// The backend's own error this error was made from with [`Error::from_detail`], if it
    /// is a `T`.
    pub fn detail<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.detail.as_deref().and_then(|d| d.downcast_ref::<T>())
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// Shorthand for [`ErrorKind::AlreadyExists`].
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }
    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    /// Shorthand for [`ErrorKind::Exhausted`].
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Exhausted, message)
    }
    /// Shorthand for [`ErrorKind::Unauthorized`].
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, message)
    }
    /// Shorthand for [`ErrorKind::Conflict`].
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    /// Shorthand for [`ErrorKind::Unavailable`] (retryable).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    /// Shorthand for [`ErrorKind::Timeout`] (retryable).
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
    /// Shorthand for [`ErrorKind::Backend`].
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Backend, message)
    }

    /// Attaches the underlying cause. It is reachable through `source()`, not `Display`.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Records which step failed. The pipeline sets this; backends need not.
    pub fn with_step(mut self, step: Step) -> Self {
        self.step = Some(step);
        self
    }

    /// Records which backend failed (for example `"ldap"`, `"rfc2136"`).
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.backend = Some(backend.into());
        self
    }

    /// Overrides whether retrying may help.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Sets the step only if none is set yet.
    pub(crate) fn or_step(mut self, step: Step) -> Self {
        if self.step.is_none() {
            self.step = Some(step);
        }
        self
    }

    /// Sets the backend only if none is set yet.
    pub(crate) fn or_backend(mut self, backend: &str) -> Self {
        if self.backend.is_none() {
            self.backend = Some(backend.to_owned());
        }
        self
    }

    pub(crate) fn push_undo_failure(&mut self, failure: UndoFailure) {
        self.undo_failures.push(failure);
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether trying the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The step that failed, when the error came out of the pipeline.
    pub fn step(&self) -> Option<Step> {
        self.step
    }

    /// The backend that failed, when known.
    pub fn backend_name(&self) -> Option<&str> {
        self.backend.as_deref()
    }

    /// The short message, without step or source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Resources that the rollback after this error could not remove. Empty when the
    /// rollback was complete. `recover()` retries them.
    pub fn undo_failures(&self) -> &[UndoFailure] {
        &self.undo_failures
    }

    /// A serializable summary, as carried by events and the journal.
    pub fn info(&self) -> ErrorInfo {
        ErrorInfo {
            kind: self.kind,
            message: self.message.clone(),
            retryable: self.retryable,
            step: self.step,
            backend: self.backend.clone(),
            undo_failures: self.undo_failures.clone(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(step) = self.step {
            write!(f, "{step}: ")?;
        }
        f.write_str(&self.message)?;
        match self.undo_failures.len() {
            0 => Ok(()),
            n => {
                write!(f, "; rollback left {n} resource(s): ")?;
                for (i, u) in self.undo_failures.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{u}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("message", &self.message)
            .field("retryable", &self.retryable);
        if let Some(step) = self.step {
            d.field("step", &step);
        }
        if let Some(backend) = &self.backend {
            d.field("backend", backend);
        }
        if !self.undo_failures.is_empty() {
            d.field("undo_failures", &self.undo_failures);
        }
        if let Some(source) = &self.source {
            d.field("source", &source.to_string());
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if let Some(s) = &self.source {
            return Some(s.as_ref() as &(dyn std::error::Error + 'static));
        }
        self.detail.as_deref().and_then(|d| d.source())
    }
}

/// A backend's private error type (a `thiserror` enum): each variant says which
/// [`ErrorKind`] it is, and `?` turns it into the public [`Error`] through
/// [`Error::from_detail`], so tests can match the variant with [`Error::detail`].
pub(crate) trait BackendError: std::error::Error + Send + Sync + Sized + 'static {
    /// The backend's name, as in the config (`"glance"`); see [`Error::backend_name`].
    const BACKEND: &'static str;
    /// What the caller can do about it.
    fn kind(&self) -> ErrorKind;
    /// Whether retrying may help, when that differs from the kind's default.
    fn retryable(&self) -> Option<bool> {
        None
    }
}

impl<E: BackendError> From<E> for Error {
    fn from(e: E) -> Self {
        let kind = e.kind();
        let retryable = e.retryable();
        let err = Error::from_detail(kind, e).with_backend(E::BACKEND);
        match retryable {
            Some(r) => err.with_retryable(r),
            None => err,
        }
    }
}

/// The serializable form of an [`Error`], as carried by events and kept in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// See [`Error::kind`].
    pub kind: ErrorKind,
    /// See [`Error::message`].
    pub message: String,
    /// See [`Error::is_retryable`].
    pub retryable: bool,
    /// See [`Error::step`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    /// See [`Error::backend_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// See [`Error::undo_failures`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undo_failures: Vec<UndoFailure>,
}

impl From<ErrorInfo> for Error {
    fn from(info: ErrorInfo) -> Self {
        Error {
            kind: info.kind,
            message: info.message,
            retryable: info.retryable,
            step: info.step,
            backend: info.backend,
            undo_failures: info.undo_failures,
            source: None,
            detail: None,
        }
    }
}

/// `Result` with devvm's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum ToyError {
        #[error("toy {0} is broken")]
        Broken(&'static str, #[source] std::io::Error),
        #[error("toy is slow")]
        Slow,
    }

    impl BackendError for ToyError {
        const BACKEND: &'static str = "toy";
        fn kind(&self) -> ErrorKind {
            match self {
                ToyError::Broken(..) => ErrorKind::Backend,
                ToyError::Slow => ErrorKind::Timeout,
            }
        }
        fn retryable(&self) -> Option<bool> {
            matches!(self, ToyError::Slow).then_some(false)
        }
    }

    #[test]
    fn a_backend_error_keeps_its_variant_and_its_cause_once() {
        let io = std::io::Error::other("spring snapped");
        let e: Error = ToyError::Broken("car", io).into();
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert_eq!(e.message(), "toy car is broken");
        assert_eq!(e.backend_name(), Some("toy"));
        assert!(matches!(e.detail(), Some(ToyError::Broken("car", _))));
        assert!(e.detail::<std::io::Error>().is_none());
        // The chain goes on with the variant's cause, not with the variant's own text.
        assert_eq!(
            std::error::Error::source(&e).map(ToString::to_string),
            Some("spring snapped".to_owned())
        );
        let slow: Error = ToyError::Slow.into();
        assert_eq!(slow.kind(), ErrorKind::Timeout);
        assert!(
            !slow.is_retryable(),
            "the variant overrides the kind's default"
        );
        assert!(std::error::Error::source(&slow).is_none());
    }

    #[test]
    fn display_is_short_and_does_not_repeat_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused by peer");
        let e = Error::unavailable("ldap server down")
            .with_source(io)
            .with_step(Step::User);
        assert_eq!(e.to_string(), "user: ldap server down");
        assert!(e.is_retryable());
        assert_eq!(
            std::error::Error::source(&e).map(ToString::to_string),
            Some("refused by peer".to_owned())
        );
    }

    #[test]
    fn undo_failures_are_named_in_display() {
        let mut e = Error::conflict("name taken").with_step(Step::Dns);
        e.push_undo_failure(UndoFailure {
            step: Step::Ip,
            resource: "lease 10.0.0.7 of vm web".into(),
            error: "db locked".into(),
            kind: ErrorKind::Unavailable,
        });
        let s = e.to_string();
        assert!(s.starts_with("dns: name taken; rollback left 1 resource(s): "));
        assert!(s.contains("lease 10.0.0.7 of vm web still held (db locked)"));
        assert!(!e.is_retryable());
    }
}
