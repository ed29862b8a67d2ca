//! devvm: provision a developer VM with one call.
//!
//! A [`Provisioner`] runs the pipeline of the seed's "deploy on day one" button: check the
//! user in the directory, pick a host, lease an IP address, publish DNS A and PTR records,
//! make the VM's disk from a cached template, define and start the VM, and bootstrap
//! configuration management on it. Every step streams [`Event`]s; a failure undoes every
//! step that acted, in reverse order; a durable journal lets [`Provisioner::recover`]
//! clean up after a provisioner that was killed mid-way.
//!
//! Each step is a trait ([`UserDirectory`], [`Placement`], [`IpAllocator`], [`DnsUpdater`],
//! [`ImageStore`], [`Hypervisor`], [`Bootstrapper`]); swap any one for your own backend
//! with [`ProvisionerBuilder`]. The `testkit` feature has a conformance suite per trait
//! that a custom backend can run.
//!
//! ```no_run
//! # async fn demo() -> devvm_core::Result<()> {
//! use devvm_core::{Provisioner, ProvisionRequest, UserName};
//! let provisioner = Provisioner::from_config("/etc/devvm/devvm.toml")?;
//! let vm = provisioner
//!     .provision(ProvisionRequest::new(UserName::new("alice")?))
//!     .await?;
//! println!("{} is at {}", vm.fqdn, vm.ip);
//! provisioner.deprovision(&vm.name).await?;
//! # Ok(()) }
//! ```

pub mod backends;
mod builtin;
pub mod config;
mod error;
mod events;
mod journal;
pub mod memory;
mod memory_config;
mod provisioner;
pub mod registry;
pub mod secret;
pub mod seed;
mod sqlite;
mod step;
mod traits;
mod types;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod work;

pub use error::{Error, ErrorInfo, ErrorKind, Result, UndoFailure};
pub use events::{DEFAULT_EVENT_BUFFER, Event, EventKind, Operation, Progress, Subscription};
pub use journal::Unreadable;
#[cfg(feature = "postgres")]
pub use journal::{JournalImport, import_sqlite_journal};
pub use provisioner::{
    Backends, CancelToken, Defaults, Provisioner, ProvisionerBuilder, RecoveryReport, Retries,
    RunHandle, Timeouts, WAITING_FOR_BLOCKING_WORK,
};
pub use traits::{
    Bootstrapper, DnsUpdater, Hypervisor, ImageStore, IpAllocator, Placement, UserDirectory,
};
pub use types::{
    BootSpec, BootstrapReport, BootstrapSettings, BootstrapTarget, Disk, DiskFormat, DnsRecord,
    Domain, DomainSpec, HostId, HostUsage, Lease, MigrationReport, Move, ProvisionRequest,
    RequestId, ResolvedRequest, SizeRequest, Step, Template, TemplateName, Undone, User, UserName,
    Vm, VmName, VmSize,
};

/// Re-exported so that implementors need not depend on `async-trait` themselves.
pub use async_trait::async_trait;
/// The secret string type of passwords passed in ([`UserDirectory::authenticate`]) and
/// secrets read from config; its `Debug` never shows the value.
pub use secrecy::{ExposeSecret, SecretString};
