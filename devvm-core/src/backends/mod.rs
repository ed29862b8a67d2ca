//! Real backends of the step traits, each behind its cargo feature (all on by default):
//! `ldap`, `rfc2136`, `glance`, `libvirt` (hypervisor and placement), `ssh` (chef and shell
//! bootstrap), `cloud-init`, `sqlite` (leases). With `default-features = false` only the
//! pipeline, the traits, the reference backends and the testkit are built.

#[cfg(feature = "ssh")]
pub mod bootstrap;
#[cfg(feature = "cloud-init")]
pub mod cloudinit;
#[cfg(feature = "glance")]
pub mod glance;
#[cfg(feature = "ldap")]
pub mod ldap;
#[cfg(feature = "libvirt")]
pub mod libvirt;
#[cfg(feature = "libvirt")]
pub mod placement;
#[cfg(feature = "libvirt")]
pub(crate) mod pool;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "libvirt")]
pub mod reservations;
#[cfg(feature = "rfc2136")]
pub mod rfc2136;
#[cfg(feature = "sqlite")]
pub mod sqlite_ip;
#[cfg(feature = "ssh")]
pub mod ssh;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod subnet;

use async_trait::async_trait;

/// Registers every real backend this build has (by cargo feature).
pub(crate) fn register(r: &mut crate::registry::Registry) {
    let _ = &r;
    #[cfg(feature = "ldap")]
    ldap::register(r);
    #[cfg(feature = "sqlite")]
    sqlite_ip::register(r);
    #[cfg(feature = "postgres")]
    postgres::register(r);
    #[cfg(feature = "rfc2136")]
    rfc2136::register(r);
    #[cfg(feature = "libvirt")]
    {
        placement::register(r);
        libvirt::register(r);
    }
    #[cfg(feature = "glance")]
    glance::register(r);
    #[cfg(feature = "cloud-init")]
    cloudinit::register(r);
    #[cfg(feature = "ssh")]
    bootstrap::register(r);
}

use crate::error::Result;
use crate::events::Progress;
use crate::traits::Bootstrapper;
use crate::types::{BootstrapReport, BootstrapTarget, RequestId, Undone, VmName};

/// A [`Bootstrapper`] that does nothing: for VMs that need no configuration management.
/// Its reports say `bootstrapped: false`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopBootstrapper;

#[async_trait]
impl Bootstrapper for NoopBootstrapper {
    fn backend(&self) -> &str {
        "none"
    }

    async fn bootstrap(
        &self,
        _target: &BootstrapTarget,
        _progress: &Progress,
    ) -> Result<BootstrapReport> {
        Ok(BootstrapReport {
            bootstrapped: false,
            summary: "no bootstrap configured".to_owned(),
        })
    }

    async fn unregister(&self, _vm: &VmName, _owner: &RequestId) -> Result<Undone> {
        Ok(Undone::Absent)
    }
}
