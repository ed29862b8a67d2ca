//! Where placement keeps its reservations: the trait every store implements (the
//! embedded SQLite file, PostgreSQL, or an embedder's own), apart from both so that
//! neither depends on the other.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::error::Result;
use crate::types::{HostId, RequestId, Undone, VmName, VmSize};

/// One VM's placement slot, as a reservation store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The host (its id as text).
    pub host: String,
    /// The request that holds it (none for slots from before owners were recorded).
    pub owner: Option<String>,
    /// The room it takes.
    pub size: VmSize,
}

/// Where placement keeps its reservations: one slot per VM name, with its owner. The
/// embedded default is an SQLite file; a database shared by provisioners on several
/// machines (PostgreSQL, feature `postgres`) is another.
#[async_trait]
pub trait ReservationStore: Send + Sync + 'static {
    /// Where it is, for `Debug` (never a secret).
    fn describe(&self) -> String;
    /// Every slot, by VM name.
    async fn all(&self) -> Result<BTreeMap<VmName, (HostId, VmSize)>>;
    /// The slot of `vm`.
    async fn slot(&self, vm: &VmName) -> Result<Option<Slot>>;
    /// Records `owner`'s slot for `vm` on `host` atomically, unless `vm` holds one (that
    /// one's host and owner are returned) or the number of slots is no longer
    /// `expected` (someone reserved meanwhile: `None`, the caller chooses again).
    async fn insert(
        &self,
        vm: &VmName,
        host: &HostId,
        size: &VmSize,
        owner: &RequestId,
        expected: usize,
    ) -> Result<Option<(String, Option<String>)>>;
    /// Removes the slot of `vm` if `owner` holds it; another's is left alone.
    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone>;
    /// Moves `owner`'s slot of `vm` to `to`; false when `owner` holds none.
    async fn move_slot(&self, vm: &VmName, to: &HostId, owner: &RequestId) -> Result<bool>;
}
