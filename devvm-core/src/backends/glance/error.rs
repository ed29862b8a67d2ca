//! What can go wrong in the Glance image store, as one private enum; `?` turns it into the
//! public [`Error`](crate::Error) with the [`ErrorKind`] each variant names.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{BackendError, ErrorKind};

/// A failure of the Glance image store.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GlanceError {
    #[error("glance url {0:?} must start with http:// or https:// and name a host")]
    UrlScheme(String),
    #[error("glance url {0:?} must be the endpoint without /v2, query or fragment")]
    UrlShape(String),
    #[error("{0} must be at least 1")]
    ZeroTimeout(&'static str),
    #[error("tag must not be empty")]
    EmptyTag,
    #[error("the glance token holds characters not allowed in an HTTP header")]
    TokenNotHeader,
    #[error("cannot create {what} {}", path.display())]
    CreateDir {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("glance sent an image list that is not one")]
    BadList(#[source] serde_json::Error),
    #[error("glance image id {0:?} is not a plain id")]
    BadImageId(String),
    #[error("glance at {url} did not answer {what} in time")]
    HttpTimeout {
        url: String,
        what: String,
        #[source]
        source: ureq::Error,
    },
    #[error("cannot reach glance at {url} ({what})")]
    Unreachable {
        url: String,
        what: String,
        #[source]
        source: ureq::Error,
    },
    #[error("bad glance url {url}")]
    BadUrl {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("glance at {url}: {what} failed")]
    Http {
        url: String,
        what: String,
        #[source]
        source: ureq::Error,
    },
    #[error("glance refused {what} (HTTP {status})")]
    Refused { what: String, status: u16 },
    #[error("glance has no {what} (HTTP 404)")]
    Missing { what: String },
    #[error("glance could not serve {what} (HTTP {status})")]
    Overloaded { what: String, status: u16 },
    #[error("glance answered {what} with HTTP {status}")]
    Status { what: String, status: u16 },
    #[error("glance sent {what} we cannot read")]
    Unreadable {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("image {of} names {role} {id}, which glance does not have")]
    DanglingRef {
        of: String,
        role: String,
        id: String,
    },
    #[error("image {of} names {role} {id}, which is not active in glance")]
    InactiveRef {
        of: String,
        role: String,
        id: String,
    },

    #[error(
        "image {0} has no sha512/sha384/sha256 os_hash_value and no md5 checksum; \
         refusing to use an image that cannot be verified"
    )]
    Unverifiable(String),
    #[error("image {id} has disk_format {format}; only qcow2 and raw templates are supported")]
    Format { id: String, format: String },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name:?} would leave {}", root.display())]
    Escapes { name: String, root: PathBuf },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("a disk for {vm} exists and belongs to {holder}")]
    ForeignDisk { vm: String, holder: String },
    #[error("download of image {id} broke off after {bytes} bytes")]
    BrokeOff {
        id: String,
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("size mismatch: image {id} has {expected} bytes in glance, the download {got}")]
    SizeMismatch { id: String, expected: u64, got: u64 },
    #[error(
        "checksum mismatch: image {id} should have {algo} {expected}…, the download has {got}…"
    )]
    ChecksumMismatch {
        id: String,
        algo: &'static str,
        expected: String,
        got: String,
    },
    #[error("image {0} has no data in glance")]
    NoData(String),
    #[error("glance has no active image {name}{}", tag.as_deref().map(|t| format!(" tagged {t}")).unwrap_or_default())]
    NoTemplate { name: String, tag: Option<String> },
    #[error("cannot encode the template sidecar")]
    Sidecar(#[source] serde_json::Error),
    #[error("template {name} is not in the cache at {}; prepare it first", path.display())]
    NotCached { name: String, path: PathBuf },

    #[cfg(feature = "libvirt")]
    #[error("volume {volume} on {host} is not devvm's upload (no .devvm record); left alone")]
    ForeignTemplate { host: String, volume: String },
    #[cfg(feature = "libvirt")]
    #[error("another upload of {volume} to {host} is under way")]
    HostBusy { host: String, volume: String },
    #[error(
        "[images] needs exactly one of disk_dir (local files) and pool (a libvirt pool on each host)"
    )]
    Storage,
    #[error("pool = {0:?} needs devvm-core's `libvirt` feature")]
    PoolNotBuilt(String),
    #[error("mode = \"copy\" works with disk_dir only; a pool's disks are overlays")]
    PoolCopy,
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} {sub} failed: {stderr}")]
    Process {
        program: String,
        sub: String,
        stderr: String,
    },
    #[error("{program} {sub} did not finish within {} s; stopped", limit.as_secs())]
    ProcessTimeout {
        program: String,
        sub: String,
        limit: Duration,
    },
    #[error("cannot read qemu-img info of {}", path.display())]
    Info {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("image {id} is not a usable qcow2: {reason}")]
    NotQcow2 { id: String, reason: String },
    #[error("image {0} is a qcow2 with a backing or data file; refused")]
    Backed(String),
    #[error("disk size must be at least 1 GiB")]
    DiskEmpty,
    #[error("disk size {0} GiB is too large")]
    DiskTooLarge(u64),
    #[error("disk size {size_gib} GiB is smaller than template {template}'s {:.1} GiB", *virtual_gib)]
    SmallerThanTemplate {
        size_gib: u64,
        template: String,
        virtual_gib: f64,
    },
}

impl BackendError for GlanceError {
    const BACKEND: &'static str = super::BACKEND;

    fn kind(&self) -> ErrorKind {
        use GlanceError::*;
        match self {
            UrlScheme(_)
            | UrlShape(_)
            | ZeroTimeout(_)
            | EmptyTag
            | TokenNotHeader
            | CreateDir { .. }
            | BadUrl { .. }
            | Escapes { .. }
            | DiskEmpty
            | DiskTooLarge(_)
            | SmallerThanTemplate { .. } => ErrorKind::InvalidInput,
            Storage | PoolNotBuilt(_) | PoolCopy => ErrorKind::InvalidInput,
            HttpTimeout { .. } | Unreachable { .. } | Overloaded { .. } | BrokeOff { .. } => {
                ErrorKind::Unavailable
            }
            #[cfg(feature = "libvirt")]
            HostBusy { .. } => ErrorKind::Unavailable,
            #[cfg(feature = "libvirt")]
            ForeignTemplate { .. } => ErrorKind::AlreadyExists,
            ProcessTimeout { .. } => ErrorKind::Timeout,
            Refused { .. } => ErrorKind::Unauthorized,
            Missing { .. } | NoTemplate { .. } | NotCached { .. } => ErrorKind::NotFound,
            ForeignDisk { .. } => ErrorKind::AlreadyExists,
            BadList(_)
            | BadImageId(_)
            | Http { .. }
            | Status { .. }
            | Unreadable { .. }
            | DanglingRef { .. }
            | InactiveRef { .. }
            | Unverifiable(_)
            | Format { .. }
            | Io { .. }
            | NotADirectory(_)
            | SizeMismatch { .. }
            | ChecksumMismatch { .. }
            | NoData(_)
            | Sidecar(_)
            | Spawn { .. }
            | Process { .. }
            | Info { .. }
            | NotQcow2 { .. }
            | Backed(_) => ErrorKind::Backend,
        }
    }

    fn retryable(&self) -> Option<bool> {
        // A process that hung once (a stuck copy) is not tried again for another limit.
        matches!(self, GlanceError::ProcessTimeout { .. }).then_some(false)
    }
}
