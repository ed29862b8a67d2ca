//! Real backends of the step traits.

pub mod bootstrap;
pub mod cloudinit;
pub mod glance;
pub mod ldap;
pub mod libvirt;
pub mod placement;
pub mod rfc2136;
pub mod sqlite_ip;
pub mod ssh;

use async_trait::async_trait;

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
