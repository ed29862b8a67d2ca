//! [`IpAllocator`] on an embedded SQLite lease database.
//!
//! One database file holds the leases of one IPv4 subnet. Every allocation is one
//! `BEGIN IMMEDIATE` transaction, so allocations are atomic across threads and across
//! processes sharing the file; the database runs in WAL mode with `synchronous=FULL`.
//!
//! Addresses are handed out next-fit: the search for a free address starts after the
//! last one handed out and wraps around, using the primary-key index to jump over runs of
//! taken addresses. Allocation therefore costs about the same in an empty /24 as in a /16
//! holding tens of thousands of leases (see `benches/ip_alloc.rs`), and a just-released
//! address is not handed out again at once (which spares stale ARP and DNS caches).
//!
//! The network and broadcast addresses, the gateway and the configured reserved ranges
//! are never handed out.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ipnet::Ipv4Net;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Deserialize;

use crate::error::{BackendError, Error, ErrorKind, Result};
use crate::traits::IpAllocator;
use crate::types::{Lease, RequestId, Undone, VmName};

const BACKEND: &str = "sqlite";

pub use super::subnet::SubnetPlan;

/// What can go wrong in the SQLite lease store; `?` turns it into the public [`Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum LeaseError {
    #[error("cannot create {}", .0.display())]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("lease database {} was made for {made_for}, not {plan}", path.display())]
    OtherPlan {
        path: PathBuf,
        made_for: String,
        plan: String,
    },
    #[error("lease task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("{ip} is outside the subnet {subnet}")]
    Outside { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("{ip} is reserved in {subnet}")]
    Reserved { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("{0} is already leased")]
    Leased(Ipv4Addr),
    #[error("vm {vm} already holds {ip}")]
    VmHolds { vm: VmName, ip: Ipv4Addr },
    #[error("{vm} already holds {ip} for {holder}")]
    HeldByOther {
        vm: VmName,
        ip: Ipv4Addr,
        holder: String,
    },
    #[error("no free address in {0}")]
    Exhausted(Ipv4Net),
}

impl BackendError for LeaseError {
    const BACKEND: &'static str = BACKEND;

    fn kind(&self) -> ErrorKind {
        match self {
            LeaseError::CreateDir(..)
            | LeaseError::Outside { .. }
            | LeaseError::Reserved { .. } => ErrorKind::InvalidInput,
            LeaseError::OtherPlan { .. } | LeaseError::Leased(_) | LeaseError::VmHolds { .. } => {
                ErrorKind::Conflict
            }
            LeaseError::Task(_) => ErrorKind::Backend,
            LeaseError::HeldByOther { .. } => ErrorKind::AlreadyExists,
            LeaseError::Exhausted(_) => ErrorKind::Exhausted,
        }
    }
}

/// The `[ip]` section for `backend = "sqlite"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteIpConfig {
    /// The lease database; relative to the config file. Default: `leases.sqlite3` in the
    /// state directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The subnet, in CIDR notation (`10.99.0.0/24`).
    pub subnet: Ipv4Net,
    /// The gateway; never handed out.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Ranges never handed out: `"10.99.0.2-10.99.0.19"` or a single address.
    #[serde(default)]
    pub reserved: Vec<String>,
}

/// Leases in an SQLite file. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct SqliteIpAllocator {
    plan: Arc<SubnetPlan>,
    path: Arc<PathBuf>,
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteIpAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteIpAllocator")
            .field("path", &self.path)
            .field("subnet", &self.plan.subnet())
            .finish()
    }
}

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error {
    crate::sqlite::err(format!("lease database {}", path.display()), BACKEND)
}

/// The schema, one step per version (SQLite's `user_version`); a step is never edited
/// once released, only appended to.
const SCHEMA: &[&str] = &[
    // 1: leases. Blocked addresses (gateway, reserved) are rows without a vm.
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS addresses (
         ip      INTEGER PRIMARY KEY,
         vm      TEXT UNIQUE,
         created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
     );",
    // 2: the request that holds each lease. Leases from before, and imported ones, have
    // none: nothing of devvm's may release them.
    "ALTER TABLE addresses ADD COLUMN owner TEXT;",
];

impl SqliteIpAllocator {
    /// Opens (creating if needed) the lease database at `path` for `plan`.
    ///
    /// A database made for another subnet plan is refused ([`Conflict`](crate::ErrorKind::Conflict));
    /// move or delete it deliberately rather than silently mixing two subnets.
    pub fn open(path: impl Into<PathBuf>, plan: SubnetPlan) -> Result<Self> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::sqlite::private_dir(dir)
                .map_err(|e| LeaseError::CreateDir(dir.to_owned(), e))?;
        }
        let err = db_err(&path);
        let mut conn = crate::sqlite::open(&path, BACKEND)?;
        crate::sqlite::migrate(
            &mut conn,
            SCHEMA,
            format!("lease database {}", path.display()),
            BACKEND,
        )?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let fingerprint = plan.fingerprint();
        let stored: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'plan'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(&err)?;
        match stored {
            Some(s) if s == fingerprint => {}
            Some(s) => {
                return Err(LeaseError::OtherPlan {
                    path: path.clone(),
                    made_for: s,
                    plan: fingerprint,
                }
                .into());
            }
            None => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('plan', ?1)",
                    params![fingerprint],
                )
                .map_err(&err)?;
                let mut ins = tx
                    .prepare("INSERT OR IGNORE INTO addresses (ip, vm) VALUES (?1, NULL)")
                    .map_err(&err)?;
                for (a, b) in plan.blocked() {
                    for ip in a..=b {
                        ins.execute(params![ip]).map_err(&err)?;
                    }
                }
            }
        }
        tx.commit().map_err(&err)?;
        drop(err);
        Ok(SqliteIpAllocator {
            plan: Arc::new(plan),
            path: Arc::new(path),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Opens the allocator a config section describes; `state_dir` holds the default file.
    pub fn from_config(c: &SqliteIpConfig, base_dir: &Path, state_dir: &Path) -> Result<Self> {
        let mut plan = SubnetPlan::new(c.subnet, c.gateway)?;
        for r in &c.reserved {
            plan = plan.reserve_str(r)?;
        }
        let path = match &c.path {
            Some(p) => base_dir.join(p),
            None => state_dir.join("leases.sqlite3"),
        };
        Self::open(path, plan)
    }

    /// The subnet plan.
    pub fn plan(&self) -> &SubnetPlan {
        &self.plan
    }

    fn lease_of(&self, vm: &VmName, ip: u32) -> Lease {
        Lease {
            vm: vm.clone(),
            ip: IpAddr::V4(Ipv4Addr::from(ip)),
            prefix_len: self.plan.subnet().prefix_len(),
            gateway: self.plan.gateway().map(IpAddr::V4),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &SubnetPlan, &Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = this
                .conn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut conn, &this.plan, &this.path)
        })
        .await
        .map_err(LeaseError::Task)?
    }

    /// Every lease in the database: the VM, its address and the request that holds it
    /// (none for imported leases and ones from before owners were recorded).
    pub async fn leases(&self) -> Result<Vec<(VmName, Ipv4Addr, Option<RequestId>)>> {
        self.blocking(|conn, _, path| {
            let err = db_err(path);
            let mut stmt = conn
                .prepare("SELECT vm, ip, owner FROM addresses WHERE vm IS NOT NULL ORDER BY ip")
                .map_err(&err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(&err)?;
            let mut out = Vec::new();
            for row in rows {
                let (vm, ip, owner) = row.map_err(&err)?;
                out.push((
                    VmName::new(vm)?,
                    Ipv4Addr::from(ip),
                    owner.map(RequestId::new).transpose()?,
                ));
            }
            Ok(out)
        })
        .await
    }

    /// Records existing leases (for example, imported from another IPAM) in one
    /// transaction: all or none. An address outside the subnet, a blocked one, or one
    /// already leased to another VM is refused with [`InvalidInput`](crate::ErrorKind::InvalidInput) or
    /// [`Conflict`](crate::ErrorKind::Conflict); re-importing an identical lease changes nothing.
    pub async fn import(&self, leases: Vec<(VmName, Ipv4Addr)>) -> Result<()> {
        self.blocking(move |conn, plan, path| {
            let err = db_err(path);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&err)?;
            {
                let mut find = tx
                    .prepare("SELECT vm FROM addresses WHERE ip = ?1")
                    .map_err(&err)?;
                let mut by_vm = tx
                    .prepare("SELECT ip FROM addresses WHERE vm = ?1")
                    .map_err(&err)?;
                let mut ins = tx
                    .prepare("INSERT INTO addresses (ip, vm) VALUES (?1, ?2)")
                    .map_err(&err)?;
                for (vm, ip) in &leases {
                    if !plan.subnet().contains(ip) {
                        return Err(LeaseError::Outside {
                            ip: *ip,
                            subnet: plan.subnet(),
                        }
                        .into());
                    }
                    if !plan.leasable(*ip) {
                        return Err(LeaseError::Reserved {
                            ip: *ip,
                            subnet: plan.subnet(),
                        }
                        .into());
                    }
                    let n = u32::from(*ip);
                    let holder: Option<Option<String>> = find
                        .query_row(params![n], |r| r.get(0))
                        .optional()
                        .map_err(&err)?;
                    let existing: Option<u32> = by_vm
                        .query_row(params![vm.as_str()], |r| r.get(0))
                        .optional()
                        .map_err(&err)?;
                    match (holder, existing) {
                        (Some(Some(h)), _) if h == vm.as_str() => continue,
                        (Some(_), _) => {
                            return Err(LeaseError::Leased(*ip).into());
                        }
                        (None, Some(other)) => {
                            return Err(LeaseError::VmHolds {
                                vm: vm.clone(),
                                ip: Ipv4Addr::from(other),
                            }
                            .into());
                        }
                        (None, None) => {
                            ins.execute(params![n, vm.as_str()]).map_err(&err)?;
                        }
                    }
                }
                // Continue handing out after the highest imported address, as if it had
                // been allocated last, unless allocation already started.
                if let Some(max) = leases.iter().map(|(_, ip)| u32::from(*ip)).max() {
                    tx.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('cursor', ?1)",
                        params![max.to_string()],
                    )
                    .map_err(&err)?;
                }
            }
            tx.commit().map_err(&err)
        })
        .await
        .map_err(|e| e.or_backend(BACKEND))
    }

    /// How many addresses are leased.
    pub async fn count(&self) -> Result<usize> {
        self.blocking(|conn, _, path| {
            conn.query_row(
                "SELECT COUNT(*) FROM addresses WHERE vm IS NOT NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| usize::try_from(n).unwrap_or(0))
            .map_err(db_err(path))
        })
        .await
    }
}

/// Who holds a lease, for messages: its request id, or what a lease without one is.
fn holder_of(owner: Option<String>) -> String {
    owner.unwrap_or_else(|| UNOWNED.into())
}

/// Who holds a lease without an owner, for messages.
const UNOWNED: &str = "no request (imported, or leased before owners were recorded)";

/// The first free address in `from..=hi`, jumping over runs of taken ones.
fn first_free(tx: &rusqlite::Transaction<'_>, from: u32, hi: u32) -> rusqlite::Result<Option<u32>> {
    let mut candidate = from;
    while candidate <= hi {
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM addresses WHERE ip = ?1)",
            params![candidate],
            |r| r.get(0),
        )?;
        if !taken {
            return Ok(Some(candidate));
        }
        // The end of the run of taken addresses that starts at `candidate`: the first
        // taken address whose successor is free.
        let end: Option<u32> = tx
            .query_row(
                "SELECT a.ip FROM addresses a
                 WHERE a.ip >= ?1 AND NOT EXISTS (SELECT 1 FROM addresses b WHERE b.ip = a.ip + 1)
                 ORDER BY a.ip LIMIT 1",
                params![candidate],
                |r| r.get(0),
            )
            .optional()?;
        match end {
            Some(e) if e < hi => candidate = e + 1,
            _ => return Ok(None),
        }
    }
    Ok(None)
}

#[async_trait]
impl IpAllocator for SqliteIpAllocator {
    fn backend(&self) -> &str {
        BACKEND
    }

    async fn allocate(&self, vm: &VmName, owner: &RequestId) -> Result<Lease> {
        let (name, owner) = (vm.clone(), owner.clone());
        let ip = self
            .blocking(move |conn, plan, path| {
                let err = db_err(path);
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(&err)?;
                let existing: Option<(u32, Option<String>)> = tx
                    .query_row(
                        "SELECT ip, owner FROM addresses WHERE vm = ?1",
                        params![name.as_str()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(&err)?;
                match existing {
                    Some((ip, Some(o))) if o == owner.as_str() => return Ok(ip),
                    Some((ip, holder)) => {
                        return Err(LeaseError::HeldByOther {
                            vm: name.clone(),
                            ip: Ipv4Addr::from(ip),
                            holder: holder_of(holder),
                        }
                        .into());
                    }
                    None => {}
                }
                let (lo, hi) = plan.bounds();
                let cursor: Option<u32> = tx
                    .query_row("SELECT value FROM meta WHERE key = 'cursor'", [], |r| {
                        r.get::<_, String>(0)
                    })
                    .optional()
                    .map_err(&err)?
                    .and_then(|s| s.parse().ok())
                    .filter(|c| (lo..=hi).contains(c));
                let start = cursor.map_or(lo, |c| if c >= hi { lo } else { c + 1 });
                let found = match first_free(&tx, start, hi).map_err(&err)? {
                    Some(ip) => Some(ip),
                    None if start > lo => first_free(&tx, lo, start - 1).map_err(&err)?,
                    None => None,
                };
                let Some(ip) = found else {
                    return Err(LeaseError::Exhausted(plan.subnet()).into());
                };
                tx.execute(
                    "INSERT INTO addresses (ip, vm, owner) VALUES (?1, ?2, ?3)",
                    params![ip, name.as_str(), owner.as_str()],
                )
                .map_err(&err)?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('cursor', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![ip.to_string()],
                )
                .map_err(&err)?;
                tx.commit().map_err(&err)?;
                Ok(ip)
            })
            .await
            .map_err(|e| e.or_backend(BACKEND))?;
        Ok(self.lease_of(vm, ip))
    }

    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        let (name, owner) = (vm.clone(), owner.clone());
        self.blocking(move |conn, _, path| {
            crate::sqlite::release_owned(
                conn,
                "addresses",
                name.as_str(),
                owner.as_str(),
                UNOWNED,
                &db_err(path),
            )
        })
        .await
    }

    async fn lease(&self, vm: &VmName) -> Result<Option<Lease>> {
        let name = vm.clone();
        let ip = self
            .blocking(move |conn, _, path| {
                conn.query_row(
                    "SELECT ip FROM addresses WHERE vm = ?1",
                    params![name.as_str()],
                    |r| r.get::<_, u32>(0),
                )
                .optional()
                .map_err(db_err(path))
            })
            .await?;
        Ok(ip.map(|ip| self.lease_of(vm, ip)))
    }
}

/// Registers this backend as `sqlite` in the `[ip]` section.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    r.register_ip("sqlite", |ctx| {
        let o: SqliteIpConfig = ctx.options()?;
        Ok(std::sync::Arc::new(SqliteIpAllocator::from_config(
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

    /// The one owner of every lease these tests make.
    fn own() -> RequestId {
        RequestId::new("test-owner").unwrap()
    }
    use crate::testkit::conformance::{IpAllocatorFixture, ip_allocator};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_allocator_conforms() {
        let dir = tempfile::tempdir().unwrap();
        // A /28: 14 hosts, minus gateway and two reserved = 11.
        let plan = SubnetPlan::new(net("10.9.0.0/28"), Some([10, 9, 0, 1].into()))
            .and_then(|p| p.reserve_str("10.9.0.2-10.9.0.3"))
            .unwrap();
        let a = SqliteIpAllocator::open(dir.path().join("leases.sqlite3"), plan).unwrap();
        ip_allocator(
            Arc::new(a),
            IpAllocatorFixture {
                capacity: Some(11),
                concurrency: 8,
            },
        )
        .await;
    }

    #[tokio::test]
    async fn never_leases_network_broadcast_gateway_or_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let plan = SubnetPlan::new(net("10.9.0.0/29"), Some([10, 9, 0, 6].into()))
            .and_then(|p| p.reserve_str("10.9.0.1"))
            .unwrap();
        let a = SqliteIpAllocator::open(dir.path().join("l.db"), plan).unwrap();
        let mut got = Vec::new();
        for i in 0..4 {
            let vm = VmName::new(format!("v{i}")).unwrap();
            got.push(a.allocate(&vm, &own()).await.unwrap().ip);
        }
        let want: Vec<IpAddr> = [2, 3, 4, 5]
            .iter()
            .map(|h| IpAddr::from([10, 9, 0, *h]))
            .collect();
        assert_eq!(got, want);
        let e = a
            .allocate(&VmName::new("v9").unwrap(), &own())
            .await
            .expect_err("full");
        assert_eq!(e.kind(), ErrorKind::Exhausted);
        assert!(matches!(e.detail(), Some(LeaseError::Exhausted(_))), "{e}");
    }

    #[tokio::test]
    async fn import_refuses_foreign_and_reserved_addresses_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let plan = SubnetPlan::new(net("10.9.0.0/24"), Some([10, 9, 0, 1].into())).unwrap();
        let a = SqliteIpAllocator::open(dir.path().join("l.db"), plan).unwrap();
        let vm = |s: &str| VmName::new(s).unwrap();
        let e = a
            .import(vec![
                (vm("a"), [10, 9, 0, 7].into()),
                (vm("b"), [10, 10, 0, 7].into()),
            ])
            .await
            .expect_err("outside");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(e.detail(), Some(LeaseError::Outside { .. })),
            "{e}"
        );
        assert_eq!(a.count().await.unwrap(), 0, "all or nothing");
        let e = a
            .import(vec![(vm("g"), [10, 9, 0, 1].into())])
            .await
            .expect_err("gateway");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(e.detail(), Some(LeaseError::Reserved { .. })),
            "{e}"
        );
        a.import(vec![(vm("a"), [10, 9, 0, 7].into())])
            .await
            .unwrap();
        a.import(vec![(vm("a"), [10, 9, 0, 7].into())])
            .await
            .expect("idempotent");
        let e = a
            .import(vec![(vm("b"), [10, 9, 0, 7].into())])
            .await
            .expect_err("taken");
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(matches!(e.detail(), Some(LeaseError::Leased(_))), "{e}");
        let l = a.lease(&vm("a")).await.unwrap();
        assert_eq!(l.map(|l| l.ip), Some(IpAddr::from([10, 9, 0, 7])));
    }

    #[tokio::test]
    async fn a_database_for_another_subnet_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let p1 = SubnetPlan::new(net("10.9.0.0/24"), None).unwrap();
        drop(SqliteIpAllocator::open(&path, p1.clone()).unwrap());
        SqliteIpAllocator::open(&path, p1).expect("same plan reopens");
        let p2 = SubnetPlan::new(net("10.9.1.0/24"), None).unwrap();
        let e = SqliteIpAllocator::open(&path, p2).expect_err("other subnet");
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(
            matches!(e.detail(), Some(LeaseError::OtherPlan { .. })),
            "{e}"
        );
        let e = SubnetPlan::new(net("10.9.0.0/24"), Some([10, 8, 0, 1].into()))
            .expect_err("gw outside");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(
                e.detail(),
                Some(super::super::subnet::SubnetError::GatewayOutside { .. })
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn next_fit_wraps_around_and_skips_runs() {
        let dir = tempfile::tempdir().unwrap();
        let plan = SubnetPlan::new(net("10.9.0.0/28"), None).unwrap();
        let a = SqliteIpAllocator::open(dir.path().join("l.db"), plan).unwrap();
        let vm = |i: u32| VmName::new(format!("v{i}")).unwrap();
        for i in 1..=14 {
            a.allocate(&vm(i), &own()).await.unwrap();
        }
        // Free .3 and .4; the cursor is at .14, so the next search wraps and skips .1-.2.
        a.release(&vm(3), &own()).await.unwrap();
        a.release(&vm(4), &own()).await.unwrap();
        let l = a.allocate(&vm(20), &own()).await.unwrap();
        assert_eq!(l.ip, IpAddr::from([10, 9, 0, 3]));
        let l = a.allocate(&vm(21), &own()).await.unwrap();
        assert_eq!(l.ip, IpAddr::from([10, 9, 0, 4]));
    }
}
