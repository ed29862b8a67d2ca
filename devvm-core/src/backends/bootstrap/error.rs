//! What can go wrong in the bootstrappers, as private enums along their seams; `?` turns
//! each into the public [`Error`] with the [`ErrorKind`] its variant names.
//!
//! * [`ChefError`]: the `chef` bootstrapper's config, what it renders for the node, and the
//!   Chef server API it cleans up through (backend `"chef"`).
//! * [`ShellError`]: the `shell` bootstrapper's config (backend `"shell"`).
//! * [`BootstrapError`]: what both share (SSH access to the guest, a step that fails on
//!   it). It names no backend: the pipeline names the bootstrapper whose step failed.
//!
//! No variant holds a secret: key problems name the setting, never the key, and a failed
//! step carries its last output line only after the redactor has seen it.

use std::io;
use std::path::PathBuf;

use crate::error::{BackendError, Error, ErrorKind};
use crate::types::VmName;

/// A failure shared by the `chef` and `shell` bootstrappers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BootstrapError {
    #[error("connect_timeout_secs must be at least 1")]
    ZeroConnectTimeout,
    #[error("ssh_user {0:?} is not a user name")]
    BadUser(String),
    #[error(
        "the ssh host key of vm {0} is unknown; refusing to connect \
         (accept_unknown_host_key = true would trust any key: unsafe)"
    )]
    UnknownHostKey(VmName),
    /// A command on the guest ended badly: how it ended (`exit status 1`), and its last
    /// line of output (redacted).
    #[error("{what} failed with {ended}{}", line.as_deref().map(|l| format!(": {l}")).unwrap_or_default())]
    StepFailed {
        what: String,
        ended: String,
        line: Option<String>,
    },
}

impl BootstrapError {
    fn kind(&self) -> ErrorKind {
        match self {
            BootstrapError::ZeroConnectTimeout | BootstrapError::BadUser(_) => {
                ErrorKind::InvalidInput
            }
            BootstrapError::UnknownHostKey(_) => ErrorKind::Unauthorized,
            BootstrapError::StepFailed { .. } => ErrorKind::Backend,
        }
    }
}

/// Not a [`BackendError`]: shared by two backends, it sets no backend name (the pipeline
/// sets the failing bootstrapper's, as it did before these errors were typed).
impl From<BootstrapError> for Error {
    fn from(e: BootstrapError) -> Self {
        Error::from_detail(e.kind(), e)
    }
}

/// A failure of the `chef` bootstrapper or of the Chef server API.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChefError {
    #[error("{what} {name:?} must be letters, digits, '_', '-' or '.'")]
    BadName { what: &'static str, name: String },
    #[error("chef_server_url {0:?} must start with http:// or https://")]
    ServerUrlScheme(String),
    #[error("log_level {level:?} must be one of {}", levels.join(", "))]
    LogLevel {
        level: String,
        levels: &'static [&'static str],
    },
    #[error("log_location must be one line")]
    LogLocation,
    #[error("policy_name and policy_group go together")]
    PolicyHalf,
    #[error("validation_key is not a PEM private key")]
    ValidationKeyNotPem,
    #[error("cannot encode first-boot.json")]
    FirstBootJson(#[source] serde_json::Error),
    #[error("chef server worker failed")]
    Worker(#[source] tokio::task::JoinError),

    #[error("the chef client key is not a PEM RSA private key")]
    ClientKey,
    #[error("chef server url {0:?} must start with http:// or https://")]
    AdminUrlScheme(String),
    #[error("chef server url {0:?} has no host")]
    AdminUrlHost(String),
    #[error("server_admin.client_name and client_key go together")]
    AdminHalf,
    #[error("server_admin.timeout_secs must be at least 1")]
    AdminZeroTimeout,
    #[error("cannot sign a chef server request")]
    Sign,
    #[error("bad chef server request {method} {url}")]
    BadRequest {
        method: String,
        url: String,
        #[source]
        source: ureq::http::Error,
    },
    /// Not reached, or not in time ([`ErrorKind::Timeout`] when `source` is a timeout).
    #[error("cannot reach the chef server at {origin}")]
    Unreachable {
        origin: String,
        #[source]
        source: ureq::Error,
    },
    #[error("the chef server's answer to GET {path} is not JSON")]
    NotJson {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the chef server refused {method} {path} (HTTP {status})")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
    },
    #[error("the chef server could not answer {method} {path} (HTTP {status})")]
    Overloaded {
        method: &'static str,
        path: String,
        status: u16,
    },
    #[error("the chef server answered {method} {path} with HTTP {status}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
    },
}

impl BackendError for ChefError {
    const BACKEND: &'static str = "chef";

    fn kind(&self) -> ErrorKind {
        use ChefError::*;
        match self {
            BadName { .. }
            | ServerUrlScheme(_)
            | LogLevel { .. }
            | LogLocation
            | PolicyHalf
            | ValidationKeyNotPem
            | ClientKey
            | AdminUrlScheme(_)
            | AdminUrlHost(_)
            | AdminHalf
            | AdminZeroTimeout
            | BadRequest { .. } => ErrorKind::InvalidInput,
            Unreachable {
                source: ureq::Error::Timeout(_),
                ..
            } => ErrorKind::Timeout,
            Unreachable { .. } | Overloaded { .. } => ErrorKind::Unavailable,
            Refused { .. } => ErrorKind::Unauthorized,
            FirstBootJson(_) | Worker(_) | Sign | NotJson { .. } | Status { .. } => {
                ErrorKind::Backend
            }
        }
    }
}

/// A failure of the `shell` bootstrapper.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ShellError {
    #[error("cannot read script_file {}", path.display())]
    ScriptFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("set exactly one of script and script_file")]
    ScriptChoice,
}

impl BackendError for ShellError {
    const BACKEND: &'static str = "shell";

    fn kind(&self) -> ErrorKind {
        match self {
            ShellError::ScriptFile { .. } | ShellError::ScriptChoice => ErrorKind::InvalidInput,
        }
    }
}
