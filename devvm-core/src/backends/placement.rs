//! [`Placement`] over a list of libvirt hosts, by free slots.
//!
//! Each host has a capacity in vCPUs, memory and disk (by default the seed's: room for 11
//! guests of 2 vCPUs, 5 GB and 40 GB). What is used is read from the host itself: every
//! domain there that carries devvm's metadata, running or not. Reservations made but not
//! yet turned into a domain are kept in a small SQLite table in the state directory, so
//! that provisioners running at once (threads or processes) never overfill a host. A VM
//! goes to the host with the most free memory among those with room for it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Deserialize;

use crate::backends::libvirt::DomainInfo;
use crate::error::{BackendError, Error, ErrorKind, Result};
use crate::traits::Placement;
use crate::types::{HostId, HostUsage, RequestId, TemplateName, Undone, VmName, VmSize};

const BACKEND: &str = "libvirt";

pub use super::reservations::{ReservationStore, Slot};

/// What can go wrong in libvirt placement; `?` turns it into the public [`Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlacementError {
    #[error("placement needs at least one host")]
    NoHosts,
    #[error("cannot create {}", .0.display())]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("did not answer within {0}s")]
    HostTimeout(u64),
    #[error("placement task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("{vm} already holds a slot on {host} for {holder}")]
    Held {
        vm: VmName,
        host: String,
        holder: String,
    },
    #[error("no placement host could be read")]
    NoHostReadable,
    #[error("no host has room for {} vCPUs, {} MiB, {} GiB", .0.vcpus, .0.memory_mib, .0.disk_gib)]
    Full(VmSize),
    #[error("placement kept racing with other reservations")]
    Racing,
    #[error("{0} is not a placement host")]
    UnknownHost(HostId),
    #[error("{0} holds no placement slot")]
    NoSlot(VmName),
}

impl BackendError for PlacementError {
    const BACKEND: &'static str = BACKEND;

    fn kind(&self) -> ErrorKind {
        match self {
            PlacementError::NoHosts | PlacementError::CreateDir(..) => ErrorKind::InvalidInput,
            PlacementError::HostTimeout(_) => ErrorKind::Timeout,
            PlacementError::Task(_) => ErrorKind::Backend,
            PlacementError::Held { .. } => ErrorKind::AlreadyExists,
            PlacementError::NoHostReadable | PlacementError::Racing => ErrorKind::Unavailable,
            PlacementError::Full(_) => ErrorKind::Exhausted,
            PlacementError::UnknownHost(_) | PlacementError::NoSlot(_) => ErrorKind::NotFound,
        }
    }
}

/// The capacity of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// vCPUs it may give out.
    pub vcpus: u64,
    /// Memory it may give out, MiB.
    pub memory_mib: u64,
    /// Disk it may give out, GiB.
    pub disk_gib: u64,
}

impl Capacity {
    /// Room for `n` VMs of `size`.
    pub fn slots(n: u64, size: VmSize) -> Self {
        Capacity {
            vcpus: n * u64::from(size.vcpus),
            memory_mib: n * size.memory_mib,
            disk_gib: n * size.disk_gib,
        }
    }

    fn fits(&self, used: &Capacity, size: &VmSize) -> bool {
        used.vcpus + u64::from(size.vcpus) <= self.vcpus
            && used.memory_mib + size.memory_mib <= self.memory_mib
            && used.disk_gib + size.disk_gib <= self.disk_gib
    }
}

/// One host in the `[placement]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Its libvirt URI.
    pub uri: HostId,
    /// Its capacity; 11 standard slots when absent.
    #[serde(default)]
    pub capacity: Option<Capacity>,
}

/// The `[placement]` section for `backend = "libvirt"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    /// The hosts to choose from.
    pub hosts: Vec<HostConfig>,
    /// The reservation database; default `placement.sqlite3` in the state directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Keep the reservations in this PostgreSQL database instead of `path` (shared by
    /// provisioners on several machines; feature `postgres`).
    #[cfg(feature = "postgres")]
    #[serde(default)]
    pub database: Option<crate::backends::postgres::PostgresDatabase>,
    /// The storage pool where the image store keeps each host's templates (its `pool`):
    /// among the hosts with room, one that already holds the requested template there is
    /// preferred. None: templates do not sway the choice.
    #[serde(default)]
    pub template_pool: Option<String>,
}

/// The seed's host: room for 11 guests of 2 vCPUs, 5 GB, 40 GB.
pub fn default_capacity() -> Capacity {
    Capacity::slots(11, VmSize::default())
}

/// Picks, among the hosts with room for `size`, one in `preferred` (those that hold the
/// template) if any, and of those the one with the most free memory, given each host's
/// capacity and usage. Pure: the I/O is done by the caller.
pub fn choose_host(
    hosts: &[(HostId, Capacity)],
    used: &BTreeMap<HostId, Capacity>,
    size: &VmSize,
    preferred: &BTreeSet<HostId>,
) -> Option<HostId> {
    let zero = Capacity {
        vcpus: 0,
        memory_mib: 0,
        disk_gib: 0,
    };
    hosts
        .iter()
        .filter(|(h, cap)| cap.fits(used.get(h).unwrap_or(&zero), size))
        .max_by_key(|(h, cap)| {
            let u = used.get(h).unwrap_or(&zero);
            (preferred.contains(h), cap.memory_mib - u.memory_mib)
        })
        .map(|(h, _)| h.clone())
}

/// Per host: what is used, which hosts answered, and the VMs on each.
type HostsNow = (
    BTreeMap<HostId, Capacity>,
    BTreeSet<HostId>,
    BTreeMap<HostId, Vec<VmName>>,
);

/// Places VMs on libvirt hosts.
#[derive(Clone)]
pub struct LibvirtPlacement {
    hosts: Arc<Vec<(HostId, Capacity)>>,
    template_pool: Option<Arc<str>>,
    reader: Arc<dyn DomainLister>,
    store: Arc<dyn ReservationStore>,
}

impl std::fmt::Debug for LibvirtPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtPlacement")
            .field("hosts", &self.hosts)
            .field("store", &self.store.describe())
            .finish()
    }
}

/// Lists the devvm domains of a host: [`LibvirtLister`] asks libvirt; unit tests give
/// fixed lists.
#[async_trait]
pub trait DomainLister: Send + Sync + 'static {
    /// devvm's domains on `host`.
    async fn list(&self, host: &HostId) -> Result<Vec<DomainInfo>>;

    /// The template files `host`'s `pool` holds verified copies of, as the image store's
    /// pool mode leaves them (`<template>-<glance id>.<kind>`). The default: none.
    async fn templates(&self, host: &HostId, pool: &str) -> Vec<String> {
        let _ = (host, pool);
        Vec::new()
    }

    /// Whether `host`'s `pool` holds a verified copy of `template`.
    async fn has_template(&self, host: &HostId, pool: &str, template: &TemplateName) -> bool {
        let prefix = format!("{template}-");
        self.templates(host, pool)
            .await
            .iter()
            .any(|t| t.starts_with(&prefix))
    }
}

/// Reads usage from libvirt itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct LibvirtLister;

#[async_trait]
impl DomainLister for LibvirtLister {
    async fn list(&self, host: &HostId) -> Result<Vec<DomainInfo>> {
        crate::backends::libvirt::inventory(host).await
    }

    /// The volumes `devvm-template-*.verified` in the pool, without prefix and suffix.
    async fn templates(&self, host: &HostId, pool: &str) -> Vec<String> {
        let (host, pool) = (host.clone(), pool.to_owned());
        let mut names = crate::work::blocking(move || {
            let conn = crate::backends::pool::connect(&host)?;
            Ok(conn
                .lookup_storage_pool_by_name(&pool)
                .and_then(|p| p.list_volumes())
                .unwrap_or_default())
        })
        .await
        .unwrap_or_default();
        names.retain(|n| n.starts_with("devvm-template-") && n.ends_with(".verified"));
        names
            .iter()
            .map(|n| n["devvm-template-".len()..n.len() - ".verified".len()].to_owned())
            .collect()
    }
}

/// How long placement waits for one host's list of domains.
const HOST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error {
    crate::sqlite::err(format!("placement database {}", path.display()), BACKEND)
}

/// The schema, one step per version (SQLite's `user_version`); a step is never edited
/// once released, only appended to.
const SCHEMA: &[&str] = &[
    // 1: one slot per vm.
    "CREATE TABLE IF NOT EXISTS reservations (
         vm TEXT PRIMARY KEY, host TEXT NOT NULL,
         vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, disk_gib INTEGER NOT NULL);",
    // 2: the request that holds each slot (none for slots from before: never released).
    "ALTER TABLE reservations ADD COLUMN owner TEXT;",
];

/// Who holds a slot without an owner, for messages.
const UNOWNED: &str = "no request (reserved before owners were recorded)";

/// Who holds a slot, for messages.
fn holder_of(owner: Option<String>) -> String {
    owner.unwrap_or_else(|| UNOWNED.into())
}

/// Reservations in an SQLite file (the embedded default).
struct SqliteReservations {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl SqliteReservations {
    fn open(path: PathBuf) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::sqlite::private_dir(dir)
                .map_err(|e| PlacementError::CreateDir(dir.to_owned(), e))?;
        }
        let mut conn = crate::sqlite::open(&path, BACKEND)?;
        crate::sqlite::migrate(
            &mut conn,
            SCHEMA,
            format!("placement database {}", path.display()),
            BACKEND,
        )?;
        Ok(SqliteReservations {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (conn, path) = (self.conn.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut conn, &path)
        })
        .await
        .map_err(PlacementError::Task)?
    }
}

#[async_trait]
impl ReservationStore for SqliteReservations {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    async fn all(&self) -> Result<BTreeMap<VmName, (HostId, VmSize)>> {
        self.blocking(|conn, path| {
            let err = db_err(path);
            let mut stmt = conn
                .prepare("SELECT vm, host, vcpus, memory_mib, disk_gib FROM reservations")
                .map_err(&err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, u64>(3)?,
                        r.get::<_, u64>(4)?,
                    ))
                })
                .map_err(&err)?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (vm, host, vcpus, memory_mib, disk_gib) = row.map_err(&err)?;
                if let (Ok(vm), Ok(host)) = (VmName::new(vm), HostId::new(host)) {
                    out.insert(
                        vm,
                        (
                            host,
                            VmSize {
                                vcpus,
                                memory_mib,
                                disk_gib,
                            },
                        ),
                    );
                }
            }
            Ok(out)
        })
        .await
    }

    async fn slot(&self, vm: &VmName) -> Result<Option<Slot>> {
        let vm = vm.clone();
        self.blocking(move |conn, path| {
            conn.query_row(
                "SELECT host, owner, vcpus, memory_mib, disk_gib FROM reservations WHERE vm = ?1",
                params![vm.as_str()],
                |r| {
                    Ok(Slot {
                        host: r.get(0)?,
                        owner: r.get(1)?,
                        size: VmSize {
                            vcpus: r.get(2)?,
                            memory_mib: r.get(3)?,
                            disk_gib: r.get(4)?,
                        },
                    })
                },
            )
            .optional()
            .map_err(db_err(path))
        })
        .await
    }

    async fn insert(
        &self,
        vm: &VmName,
        host: &HostId,
        size: &VmSize,
        owner: &RequestId,
        expected: usize,
    ) -> Result<Option<(String, Option<String>)>> {
        let (vm2, host2, size2, owner2) = (vm.clone(), host.clone(), *size, owner.clone());
        self.blocking(move |conn, path| {
            let err = db_err(path);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            if let Some(existing) = tx
                .query_row(
                    "SELECT host, owner FROM reservations WHERE vm = ?1",
                    params![vm2.as_str()],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
                )
                .optional()
                .map_err(&err)?
            {
                return Ok(Some(existing));
            }
            let now: i64 = tx
                .query_row("SELECT COUNT(*) FROM reservations", [], |r| r.get(0))
                .map_err(&err)?;
            if usize::try_from(now).unwrap_or(usize::MAX) != expected {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO reservations (vm, host, vcpus, memory_mib, disk_gib, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    vm2.as_str(),
                    host2.as_str(),
                    size2.vcpus,
                    size2.memory_mib,
                    size2.disk_gib,
                    owner2.as_str()
                ],
            )
            .map_err(&err)?;
            tx.commit().map_err(&err)?;
            Ok(Some((
                host2.as_str().to_owned(),
                Some(owner2.as_str().to_owned()),
            )))
        })
        .await
    }

    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        let (vm, owner) = (vm.clone(), owner.clone());
        self.blocking(move |conn, path| {
            crate::sqlite::release_owned(
                conn,
                "reservations",
                vm.as_str(),
                owner.as_str(),
                UNOWNED,
                &db_err(path),
            )
        })
        .await
    }

    async fn move_slot(&self, vm: &VmName, to: &HostId, owner: &RequestId) -> Result<bool> {
        let (vm, to, owner) = (vm.clone(), to.clone(), owner.clone());
        self.blocking(move |conn, path| {
            let n = conn
                .execute(
                    "UPDATE reservations SET host = ?2 WHERE vm = ?1 AND owner = ?3",
                    params![vm.as_str(), to.as_str(), owner.as_str()],
                )
                .map_err(db_err(path))?;
            Ok(n > 0)
        })
        .await
    }
}

impl LibvirtPlacement {
    /// Placement over `hosts`, reading usage through `reader`, reservations in `path`.
    pub fn open(
        hosts: Vec<(HostId, Capacity)>,
        reader: Arc<dyn DomainLister>,
        path: impl Into<PathBuf>,
    ) -> Result<Self> {
        if hosts.is_empty() {
            return Err(PlacementError::NoHosts.into());
        }
        let store = SqliteReservations::open(path.into())?;
        Self::with_store(hosts, reader, Arc::new(store))
    }

    /// Placement over `hosts`, reading usage through `reader`, reservations in `store`
    /// (for example a database shared by provisioners on several machines).
    pub fn with_store(
        hosts: Vec<(HostId, Capacity)>,
        reader: Arc<dyn DomainLister>,
        store: Arc<dyn ReservationStore>,
    ) -> Result<Self> {
        if hosts.is_empty() {
            return Err(PlacementError::NoHosts.into());
        }
        Ok(LibvirtPlacement {
            hosts: Arc::new(hosts),
            template_pool: None,
            reader,
            store,
        })
    }

    /// Placement from its config section; usage is read from libvirt.
    pub fn from_config(c: &PlacementConfig, base_dir: &Path, state_dir: &Path) -> Result<Self> {
        let hosts = c
            .hosts
            .iter()
            .map(|h| (h.uri.clone(), h.capacity.unwrap_or_else(default_capacity)))
            .collect();
        #[cfg(feature = "postgres")]
        if let Some(db) = &c.database {
            let store =
                crate::backends::postgres::reservations::PostgresReservations::new(db, base_dir)?;
            let mut p = Self::with_store(hosts, Arc::new(LibvirtLister), Arc::new(store))?;
            p.template_pool = c.template_pool.as_deref().map(Arc::from);
            return Ok(p);
        }
        let path = match &c.path {
            Some(p) => base_dir.join(p),
            None => state_dir.join("placement.sqlite3"),
        };
        let mut p = Self::open(hosts, Arc::new(LibvirtLister), path)?;
        p.template_pool = c.template_pool.as_deref().map(Arc::from);
        Ok(p)
    }

    /// Prefers, for later reservations, hosts whose `pool` holds the requested template.
    pub fn prefer_templates_in(mut self, pool: &str) -> Self {
        self.template_pool = Some(Arc::from(pool));
        self
    }

    /// The hosts among `hosts` that hold `template` (asked concurrently, each within the
    /// host time limit); none without a template pool.
    async fn holding(&self, hosts: &[HostId], template: Option<&TemplateName>) -> BTreeSet<HostId> {
        let (Some(pool), Some(template)) = (&self.template_pool, template) else {
            return BTreeSet::new();
        };
        let mut asks = tokio::task::JoinSet::new();
        for h in hosts {
            let (reader, h, pool, t) = (
                self.reader.clone(),
                h.clone(),
                pool.clone(),
                template.clone(),
            );
            asks.spawn(async move {
                let has = tokio::time::timeout(HOST_TIMEOUT, reader.has_template(&h, &pool, &t))
                    .await
                    .unwrap_or(false);
                (h, has)
            });
        }
        let mut out = BTreeSet::new();
        while let Some(Ok((h, has))) = asks.join_next().await {
            if has {
                out.insert(h);
            }
        }
        out
    }

    /// What each host has in use now: its devvm domains plus reservations not yet a
    /// domain there. Hosts that cannot be read are left out (and logged).
    async fn read_usage(&self) -> Result<HostsNow> {
        self.read_usage_except(None).await
    }

    /// [`read_usage`](Self::read_usage) without `except`'s own domain and reservation:
    /// the use a move of `except` must fit beside, wherever its guest runs now.
    async fn read_usage_except(&self, except: Option<&VmName>) -> Result<HostsNow> {
        let mut used = BTreeMap::new();
        let mut reachable = BTreeSet::new();
        let mut domains: BTreeMap<HostId, Vec<DomainInfo>> = BTreeMap::new();
        // Every host at once, each with its own time limit: one hung host costs at most
        // HOST_TIMEOUT and is skipped, it does not stall the others.
        let mut asks = tokio::task::JoinSet::new();
        for (host, _) in self.hosts.iter() {
            let (reader, host) = (self.reader.clone(), host.clone());
            asks.spawn(async move {
                let r = match tokio::time::timeout(HOST_TIMEOUT, reader.list(&host)).await {
                    Ok(r) => r,
                    Err(_) => Err(PlacementError::HostTimeout(HOST_TIMEOUT.as_secs()).into()),
                };
                (host, r)
            });
        }
        while let Some(joined) = asks.join_next().await {
            let Ok((host, r)) = joined else { continue };
            match r {
                Ok(d) => {
                    reachable.insert(host.clone());
                    domains.insert(host, d);
                }
                Err(e) => tracing::warn!(%host, error = %e, "placement: host unreadable; skipped"),
            }
        }
        let reservations = self.reservations().await?;
        let mut names: BTreeMap<HostId, Vec<VmName>> = BTreeMap::new();
        for (host, doms) in &domains {
            let mut u = Capacity {
                vcpus: 0,
                memory_mib: 0,
                disk_gib: 0,
            };
            let mut counted = BTreeSet::new();
            for d in doms {
                if Some(&d.name) == except {
                    continue;
                }
                counted.insert(d.name.clone());
                names.entry(host.clone()).or_default().push(d.name.clone());
                u.vcpus += u64::from(d.vcpus);
                u.memory_mib += d.memory_mib;
                u.disk_gib += d.disk_gib;
            }
            for (vm, (h, size)) in &reservations {
                if h == host && !counted.contains(vm) && Some(vm) != except {
                    names.entry(host.clone()).or_default().push(vm.clone());
                    u.vcpus += u64::from(size.vcpus);
                    u.memory_mib += size.memory_mib;
                    u.disk_gib += size.disk_gib;
                }
            }
            used.insert(host.clone(), u);
        }
        Ok((used, reachable, names))
    }

    async fn reservations(&self) -> Result<BTreeMap<VmName, (HostId, VmSize)>> {
        self.store.all().await
    }

    /// The slot of `vm`: its host and owner.
    async fn slot(&self, vm: &VmName) -> Result<Option<(String, Option<String>)>> {
        Ok(self.store.slot(vm).await?.map(|s| (s.host, s.owner)))
    }
}

impl LibvirtPlacement {
    /// Reserves for `vm`, preferring hosts that hold `template` when a template pool is set.
    async fn reserve_in(
        &self,
        vm: &VmName,
        size: &VmSize,
        owner: &RequestId,
        template: Option<&TemplateName>,
    ) -> Result<HostId> {
        let held = |host: String, holder: Option<String>| -> Result<HostId> {
            match holder {
                Some(o) if o == owner.as_str() => HostId::new(host),
                other => Err(PlacementError::Held {
                    vm: vm.clone(),
                    host,
                    holder: holder_of(other),
                }
                .into()),
            }
        };
        if let Some((host, holder)) = self.slot(vm).await? {
            return held(host, holder);
        }
        // Usage is read outside the transaction (it talks to every host); the choice is
        // then recorded atomically, re-checked against reservations made meanwhile.
        for _attempt in 0..5 {
            let (used, reachable, _) = self.read_usage().await?;
            if reachable.is_empty() {
                return Err(PlacementError::NoHostReadable.into());
            }
            let candidates: Vec<(HostId, Capacity)> = self
                .hosts
                .iter()
                .filter(|(h, _)| reachable.contains(h))
                .cloned()
                .collect();
            let names: Vec<HostId> = candidates.iter().map(|(h, _)| h.clone()).collect();
            let preferred = self.holding(&names, template).await;
            let Some(host) = choose_host(&candidates, &used, size, &preferred) else {
                return Err(PlacementError::Full(*size).into());
            };
            let before: usize = self.reservations().await?.len();
            let placed = self.store.insert(vm, &host, size, owner, before).await?;
            if let Some((h, holder)) = placed {
                return held(h, holder);
            }
        }
        Err(PlacementError::Racing.into())
    }
}

#[async_trait]
impl Placement for LibvirtPlacement {
    fn backend(&self) -> &str {
        BACKEND
    }

    async fn reserve(&self, vm: &VmName, size: &VmSize, owner: &RequestId) -> Result<HostId> {
        self.reserve_in(vm, size, owner, None).await
    }

    async fn reserve_for(
        &self,
        vm: &VmName,
        size: &VmSize,
        owner: &RequestId,
        template: &TemplateName,
    ) -> Result<HostId> {
        self.reserve_in(vm, size, owner, Some(template)).await
    }

    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        self.store.release(vm, owner).await
    }

    async fn hosts(&self) -> Result<Vec<HostId>> {
        Ok(self.hosts.iter().map(|(h, _)| h.clone()).collect())
    }

    async fn usage(&self) -> Result<Vec<HostUsage>> {
        let (used, reachable, mut names) = self.read_usage().await?;
        let mut templates = BTreeMap::new();
        if let Some(pool) = &self.template_pool {
            for (h, _) in self.hosts.iter().filter(|(h, _)| reachable.contains(h)) {
                let t = tokio::time::timeout(HOST_TIMEOUT, self.reader.templates(h, pool))
                    .await
                    .unwrap_or_default();
                templates.insert(h.clone(), t);
            }
        }
        let size = |c: &Capacity| VmSize {
            vcpus: u32::try_from(c.vcpus).unwrap_or(u32::MAX),
            memory_mib: c.memory_mib,
            disk_gib: c.disk_gib,
        };
        Ok(self
            .hosts
            .iter()
            .map(|(h, cap)| HostUsage {
                host: h.clone(),
                reachable: reachable.contains(h),
                capacity: size(cap),
                used: used.get(h).map(size).unwrap_or(VmSize {
                    vcpus: 0,
                    memory_mib: 0,
                    disk_gib: 0,
                }),
                vms: names.remove(h).unwrap_or_default(),
                templates: templates.remove(h).unwrap_or_default(),
            })
            .collect())
    }

    /// Checks `to`'s room with usage read live from `to` (its devvm domains and the
    /// reservations not yet a domain there), then moves the row.
    async fn relocate(&self, vm: &VmName, to: &HostId, owner: &RequestId) -> Result<()> {
        let Some(cap) = self.hosts.iter().find(|(h, _)| h == to).map(|(_, c)| *c) else {
            return Err(PlacementError::UnknownHost(to.clone()).into());
        };
        let owner2 = owner.clone();
        let row = self
            .store
            .slot(vm)
            .await?
            .map(|s| (s.host, s.owner, s.size));
        let Some((host, holder, size)) = row else {
            return Err(PlacementError::NoSlot(vm.clone()).into());
        };
        if holder.as_deref() != Some(owner2.as_str()) {
            return Err(PlacementError::Held {
                vm: vm.clone(),
                host,
                holder: holder_of(holder),
            }
            .into());
        }
        if host == to.as_str() {
            return Ok(());
        }
        // Without the vm itself: moving its slot back to the host its guest still runs on
        // (the undo of a move off a full host) must not count it twice.
        let (used, reachable, _) = self.read_usage_except(Some(vm)).await?;
        if !reachable.contains(to) {
            return Err(PlacementError::NoHostReadable.into());
        }
        let zero = Capacity {
            vcpus: 0,
            memory_mib: 0,
            disk_gib: 0,
        };
        if !cap.fits(used.get(to).unwrap_or(&zero), &size) {
            return Err(PlacementError::Full(size).into());
        }
        if !self.store.move_slot(vm, to, owner).await? {
            return Err(PlacementError::NoSlot(vm.clone()).into());
        }
        Ok(())
    }

    async fn reservation(&self, vm: &VmName) -> Result<Option<HostId>> {
        self.store
            .slot(vm)
            .await?
            .map(|s| HostId::new(s.host))
            .transpose()
    }
}

/// What [`import_reservations`] found and moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReservationImport {
    /// The slots the SQLite placement database holds.
    pub slots: usize,
    /// How many were added (the others were there already, held by the same request).
    pub added: usize,
    /// Slots from before owners were recorded: no request can be proven to hold them,
    /// so they are not moved (the VM's domain still counts on its host).
    pub unowned: usize,
}

/// Copies the placement slots of the SQLite placement database at `from` (each with its
/// host, size and owning request) into `to` (a shared store, PostgreSQL say). Every slot
/// is checked first: when `to` holds one of the same VM for another request or host,
/// nothing is added (`Conflict`); run again, it adds nothing. `from` does not change.
pub async fn import_reservations(
    from: &Path,
    to: &dyn ReservationStore,
) -> Result<ReservationImport> {
    if !from.is_file() {
        return Err(Error::not_found(format!(
            "no SQLite placement database at {}",
            from.display()
        )));
    }
    let lite = SqliteReservations::open(from.to_owned())?;
    let all = lite.all().await?;
    let mut moving = Vec::new();
    let mut unowned = 0;
    for (vm, (host, size)) in &all {
        let owner = match lite.slot(vm).await?.and_then(|s| s.owner) {
            Some(o) => RequestId::new(o)?,
            None => {
                unowned += 1;
                continue;
            }
        };
        match to.slot(vm).await? {
            Some(s) if s.host == host.as_str() && s.owner.as_deref() == Some(owner.as_str()) => {}
            Some(s) => {
                return Err(Error::conflict(format!(
                    "{} already holds a slot of vm {vm} on {} for {}; nothing was imported",
                    to.describe(),
                    s.host,
                    holder_of(s.owner)
                )));
            }
            None => moving.push((vm.clone(), host.clone(), *size, owner)),
        }
    }
    let mut added = 0;
    for (vm, host, size, owner) in moving {
        loop {
            let expected = to.all().await?.len();
            match to.insert(&vm, &host, &size, &owner, expected).await? {
                // The count moved, or the slot appeared meanwhile: the next insert says
                // whose it is.
                None => continue,
                Some((h, o)) if h == host.as_str() && o.as_deref() == Some(owner.as_str()) => {
                    added += 1;
                    break;
                }
                Some((h, o)) => {
                    return Err(Error::conflict(format!(
                        "vm {vm} was given a slot on {h} for {} meanwhile",
                        holder_of(o)
                    )));
                }
            }
        }
    }
    Ok(ReservationImport {
        slots: all.len(),
        added,
        unowned,
    })
}

/// Registers this backend as `libvirt` in the `[placement]` section.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    r.register_placement("libvirt", |ctx| {
        let o: PlacementConfig = ctx.options()?;
        Ok(std::sync::Arc::new(LibvirtPlacement::from_config(
            &o,
            ctx.base_dir,
            ctx.state_dir,
        )?))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::testkit::conformance::{PlacementFixture, placement};

    struct Fixed(BTreeMap<HostId, Vec<DomainInfo>>);

    #[async_trait]
    impl DomainLister for Fixed {
        async fn list(&self, host: &HostId) -> Result<Vec<DomainInfo>> {
            self.0
                .get(host)
                .cloned()
                .ok_or_else(|| Error::unavailable("host down"))
        }
    }

    fn host(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }

    /// A host that never answers.
    struct Hung(Fixed);

    #[async_trait]
    impl DomainLister for Hung {
        async fn list(&self, h: &HostId) -> Result<Vec<DomainInfo>> {
            if *h == host("hung") {
                std::future::pending::<()>().await;
            }
            self.0.list(h).await
        }
    }

    /// A host that hangs is skipped after its time limit (virtual time: no waiting), and
    /// placement goes on with the hosts that answer.
    #[tokio::test(start_paused = true)]
    async fn a_hung_host_is_skipped_after_its_time_limit() {
        let dir = tempfile::tempdir().unwrap();
        let size = VmSize::default();
        let p = LibvirtPlacement::open(
            vec![
                (host("hung"), Capacity::slots(5, size)),
                (host("a"), Capacity::slots(1, size)),
            ],
            Arc::new(Hung(Fixed(BTreeMap::from([(host("a"), vec![])])))),
            dir.path().join("p.sqlite3"),
        )
        .unwrap();
        let vm = VmName::new("n1").unwrap();
        let started = tokio::time::Instant::now();
        let got = p.reserve(&vm, &size, &RequestId::random()).await.unwrap();
        assert_eq!(got, host("a"), "the host that answered");
        assert!(
            started.elapsed() >= HOST_TIMEOUT,
            "it waited for the hung host's limit (virtual time)"
        );
    }

    fn domain(name: &str) -> DomainInfo {
        DomainInfo {
            name: VmName::new(name).unwrap(),
            uuid: String::new(),
            active: true,
            owner: None,
            request_id: None,
            vcpus: 2,
            memory_mib: 5120,
            disk_gib: 40,
        }
    }

    #[test]
    fn the_host_with_most_free_memory_that_fits_wins() {
        let size = VmSize::default();
        let hosts = vec![
            (host("a"), Capacity::slots(2, size)),
            (host("b"), Capacity::slots(3, size)),
        ];
        let none = BTreeSet::new();
        let mut used = BTreeMap::new();
        assert_eq!(choose_host(&hosts, &used, &size, &none), Some(host("b")));
        // A host that holds the template wins over more free memory, if it has room.
        let a_has_it = BTreeSet::from([host("a")]);
        assert_eq!(
            choose_host(&hosts, &used, &size, &a_has_it),
            Some(host("a"))
        );
        used.insert(host("b"), Capacity::slots(2, size));
        assert_eq!(choose_host(&hosts, &used, &size, &none), Some(host("a")));
        used.insert(host("a"), Capacity::slots(2, size));
        assert_eq!(
            choose_host(&hosts, &used, &size, &a_has_it),
            Some(host("b")),
            "but never one without room"
        );
        used.insert(host("b"), Capacity::slots(3, size));
        assert_eq!(choose_host(&hosts, &used, &size, &none), None);
        let big = VmSize { vcpus: 64, ..size };
        assert_eq!(choose_host(&hosts, &BTreeMap::new(), &big, &none), None);
    }

    /// A lister whose hosts hold the templates named per host.
    struct WithTemplates(Fixed, BTreeMap<HostId, Vec<&'static str>>);

    #[async_trait]
    impl DomainLister for WithTemplates {
        async fn list(&self, host: &HostId) -> Result<Vec<DomainInfo>> {
            self.0.list(host).await
        }
        async fn templates(&self, host: &HostId, pool: &str) -> Vec<String> {
            if pool != "p" {
                return Vec::new();
            }
            let ts = self.1.get(host).cloned().unwrap_or_default();
            ts.iter().map(|t| format!("{t}-id.qcow2")).collect()
        }
    }

    #[tokio::test]
    async fn a_host_that_holds_the_template_is_preferred() {
        let dir = tempfile::tempdir().unwrap();
        let size = VmSize::default();
        let lister = WithTemplates(
            Fixed(BTreeMap::from([(host("a"), vec![]), (host("b"), vec![])])),
            BTreeMap::from([(host("a"), vec!["debian"])]),
        );
        let hosts = vec![
            (host("a"), Capacity::slots(1, size)),
            (host("b"), Capacity::slots(3, size)),
        ];
        let p = LibvirtPlacement::open(hosts.clone(), Arc::new(lister), dir.path().join("p"))
            .unwrap()
            .prefer_templates_in("p");
        let (vm, me) = (|s: &str| VmName::new(s).unwrap(), RequestId::random());
        let debian = TemplateName::new("debian").unwrap();
        let other = TemplateName::new("other").unwrap();
        assert_eq!(
            p.reserve_for(&vm("t1"), &size, &me, &debian).await.unwrap(),
            host("a")
        );
        // a is full now: the template does not override room.
        assert_eq!(
            p.reserve_for(&vm("t2"), &size, &me, &debian).await.unwrap(),
            host("b")
        );
        assert_eq!(
            p.reserve_for(&vm("t3"), &size, &me, &other).await.unwrap(),
            host("b")
        );
    }

    #[tokio::test]
    async fn usage_comes_from_the_hosts_domains_and_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let size = VmSize::default();
        let lister = Fixed(BTreeMap::from([
            (host("a"), vec![domain("old-1")]),
            (host("b"), vec![]),
        ]));
        let p = LibvirtPlacement::open(
            vec![
                (host("a"), Capacity::slots(2, size)),
                (host("b"), Capacity::slots(1, size)),
                (host("down"), Capacity::slots(5, size)),
            ],
            Arc::new(lister),
            dir.path().join("p.sqlite3"),
        )
        .unwrap();
        let vm = |s: &str| VmName::new(s).unwrap();
        let me = RequestId::random();
        // a has 1 of 2 used by an existing domain, b 0 of 1: equal free memory → either.
        let first = p.reserve(&vm("n1"), &size, &me).await.unwrap();
        let second = p.reserve(&vm("n2"), &size, &me).await.unwrap();
        assert_ne!(first, second, "one slot left on each");
        assert!(
            first != host("down") && second != host("down"),
            "an unreadable host is never chosen"
        );
        let e = p.reserve(&vm("n3"), &size, &me).await.expect_err("full");
        assert_eq!(e.kind(), ErrorKind::Exhausted);
        assert!(matches!(e.detail(), Some(PlacementError::Full(_))), "{e}");
        p.release(&vm("n1"), &me).await.unwrap();
        assert_eq!(p.reserve(&vm("n3"), &size, &me).await.ok(), Some(first));
    }

    /// The undo of a move off a full host: the slot goes back to the host the guest still
    /// runs on, which counts that guest's domain once, not twice.
    #[tokio::test]
    async fn a_slot_moves_back_to_the_full_host_its_guest_runs_on() {
        let dir = tempfile::tempdir().unwrap();
        let size = VmSize::default();
        let lister = Fixed(BTreeMap::from([
            (host("a"), vec![domain("m1"), domain("m2")]),
            (host("b"), vec![]),
        ]));
        let p = LibvirtPlacement::open(
            vec![
                (host("a"), Capacity::slots(2, size)),
                (host("b"), Capacity::slots(2, size)),
            ],
            Arc::new(lister),
            dir.path().join("p.sqlite3"),
        )
        .unwrap();
        let (m1, me) = (VmName::new("m1").unwrap(), RequestId::random());
        // a is full with the domains of m1 and m2, so m1's reservation lands on b; moving
        // it to a, where m1's guest runs, fits.
        let first = p.reserve(&m1, &size, &me).await.unwrap();
        assert_eq!(first, host("b"), "a is full");
        p.relocate(&m1, &host("a"), &me).await.unwrap();
        assert_eq!(p.reservation(&m1).await.unwrap(), Some(host("a")));
        p.relocate(&m1, &host("b"), &me).await.unwrap();
        p.relocate(&m1, &host("a"), &me)
            .await
            .expect("back to a, where m1's guest runs: counted once");
        // Another vm does not fit on a.
        let other = VmName::new("m3").unwrap();
        p.reserve(&other, &size, &me).await.unwrap();
        let e = p
            .relocate(&other, &host("a"), &me)
            .await
            .expect_err("a is full for a vm not running there");
        assert_eq!(e.kind(), ErrorKind::Exhausted);
    }

    #[tokio::test]
    async fn libvirt_placement_conforms_with_a_stub_host() {
        let dir = tempfile::tempdir().unwrap();
        let size = VmSize::default();
        let lister = Fixed(BTreeMap::from([(host("a"), vec![]), (host("b"), vec![])]));
        let p = LibvirtPlacement::open(
            vec![
                (host("a"), Capacity::slots(2, size)),
                (host("b"), Capacity::slots(1, size)),
            ],
            Arc::new(lister),
            dir.path().join("p.sqlite3"),
        )
        .unwrap();
        placement(
            Arc::new(p),
            PlacementFixture {
                capacity: Some(3),
                size,
            },
        )
        .await;
    }
}
