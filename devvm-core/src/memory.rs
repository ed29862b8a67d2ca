//! In-memory reference implementations of every step trait.
//!
//! They exist to test the pipeline's logic and to check the conformance suites
//! themselves. They are never the default of anything: a config must name
//! `backend = "memory"` explicitly, and nothing they "create" exists outside this process
//! (or, with a state file, outside that file).
//!
//! Each can keep its state in a JSON file instead of memory, so that a test can kill a
//! process and recover in another. Updates of such a file are serialized across processes
//! with a lock file and replace the file atomically (write, fsync, rename).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use ipnet::Ipv4Net;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::events::Progress;
use crate::provisioner::Backends;
use crate::traits::{
    Bootstrapper, DnsUpdater, Hypervisor, ImageStore, IpAllocator, Placement, UserDirectory,
};
use crate::types::{
    BootSpec, BootstrapReport, BootstrapTarget, Disk, DiskFormat, DnsRecord, Domain, DomainSpec,
    HostId, Lease, RequestId, Template, TemplateName, Undone, User, UserName, VmName, VmSize,
};

/// State kept in memory or in a JSON file.
#[derive(Debug)]
struct Store<S> {
    path: Option<PathBuf>,
    mem: Mutex<S>,
}

impl<S: Default + Clone + Serialize + DeserializeOwned> Store<S> {
    fn memory() -> Self {
        Store {
            path: None,
            mem: Mutex::new(S::default()),
        }
    }

    fn file(path: impl Into<PathBuf>) -> Self {
        Store {
            path: Some(path.into()),
            mem: Mutex::new(S::default()),
        }
    }

    /// Applies `f` to the state; the change is kept only if `f` succeeds.
    fn update<R>(&self, f: impl FnOnce(&mut S) -> Result<R>) -> Result<R> {
        let mut guard = self
            .mem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &self.path {
            None => {
                let mut s = guard.clone();
                let r = f(&mut s)?;
                *guard = s;
                Ok(r)
            }
            Some(path) => {
                let _lock = lock_file(path)?;
                let mut s = read_state(path)?;
                let r = f(&mut s)?;
                write_state(path, &s)?;
                Ok(r)
            }
        }
    }

    fn read<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R> {
        let guard = self
            .mem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &self.path {
            None => Ok(f(&guard)),
            Some(path) => {
                let _lock = lock_file(path)?;
                Ok(f(&read_state(path)?))
            }
        }
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::backend(format!("{what} {}", path.display())).with_source(e)
}

struct FileLock(File);

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn lock_file(path: &Path) -> Result<FileLock> {
    let lock_path = path.with_extension("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_err("cannot open", &lock_path, e))?;
    f.lock().map_err(|e| io_err("cannot lock", &lock_path, e))?;
    Ok(FileLock(f))
}

fn read_state<S: Default + DeserializeOwned>(path: &Path) -> Result<S> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            Error::backend(format!("corrupt state file {}", path.display())).with_source(e)
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(S::default()),
        Err(e) => Err(io_err("cannot read", path, e)),
    }
}

fn write_state<S: Serialize>(path: &Path, s: &S) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(s)
        .map_err(|e| Error::backend("cannot encode state").with_source(e))?;
    let mut f = File::create(&tmp).map_err(|e| io_err("cannot create", &tmp, e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("cannot replace", path, e))
}

/// A user entry of [`MemoryUsers`].
#[derive(Debug, Clone)]
struct UserEntry {
    user: User,
    may_own_vms: bool,
}

/// Reference [`UserDirectory`]: a fixed list of users.
#[derive(Debug, Default)]
pub struct MemoryUsers {
    users: BTreeMap<UserName, UserEntry>,
}

impl MemoryUsers {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a user; `may_own_vms = false` makes lookups fail as unauthorized.
    pub fn with_user(mut self, user: User, may_own_vms: bool) -> Self {
        self.users
            .insert(user.name.clone(), UserEntry { user, may_own_vms });
        self
    }
}

#[async_trait]
impl UserDirectory for MemoryUsers {
    fn backend(&self) -> &str {
        "memory"
    }

    async fn find_user(&self, user: &UserName) -> Result<User> {
        match self.users.get(user) {
            None => Err(Error::not_found(format!("no user {user}"))),
            Some(e) if !e.may_own_vms => {
                Err(Error::unauthorized(format!("user {user} may not own vms")))
            }
            Some(e) => Ok(e.user.clone()),
        }
    }
}

/// The capacity of one host, for [`MemoryPlacement`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCapacity {
    /// The host.
    pub id: HostId,
    /// vCPUs it can give out.
    pub vcpus: u32,
    /// Memory it can give out, MiB.
    pub memory_mib: u64,
    /// Disk it can give out, GiB.
    pub disk_gib: u64,
}

impl HostCapacity {
    /// Room for `n` VMs of `size`.
    pub fn slots(id: HostId, n: u32, size: VmSize) -> Self {
        HostCapacity {
            id,
            vcpus: size.vcpus * n,
            memory_mib: size.memory_mib * u64::from(n),
            disk_gib: size.disk_gib * u64::from(n),
        }
    }
}

type Reservations = BTreeMap<VmName, (HostId, VmSize, RequestId)>;

/// The same name held by another owner: what an acting method refuses.
fn taken(what: &str, holder: &RequestId) -> Error {
    Error::already_exists(format!("{what} is held by request {holder}"))
}

/// Removes `key` from `map` if `owner` holds it.
fn release_owned<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: &K,
    owner: &RequestId,
    owner_of: impl Fn(&V) -> &RequestId,
) -> Undone {
    match map.get(key).map(&owner_of) {
        None => Undone::Absent,
        Some(o) if o == owner => {
            map.remove(key);
            Undone::Removed
        }
        Some(o) => Undone::foreign(o.as_str()),
    }
}

/// Reference [`Placement`]: fixed host capacities, reservations in memory or a file.
#[derive(Debug)]
pub struct MemoryPlacement {
    hosts: Vec<HostCapacity>,
    store: Store<Reservations>,
}

impl MemoryPlacement {
    /// Placement over `hosts`, state in memory.
    pub fn new(hosts: Vec<HostCapacity>) -> Self {
        MemoryPlacement {
            hosts,
            store: Store::memory(),
        }
    }
    /// Placement over `hosts`, state in the JSON file `path`.
    pub fn with_state_file(hosts: Vec<HostCapacity>, path: impl Into<PathBuf>) -> Self {
        MemoryPlacement {
            hosts,
            store: Store::file(path),
        }
    }
    /// How many reservations are held.
    pub fn held(&self) -> Result<usize> {
        self.store.read(BTreeMap::len)
    }
}

#[async_trait]
impl Placement for MemoryPlacement {
    fn backend(&self) -> &str {
        "memory"
    }

    async fn reserve(&self, vm: &VmName, size: &VmSize, owner: &RequestId) -> Result<HostId> {
        self.store.update(|res| {
            if let Some((host, _, holder)) = res.get(vm) {
                if holder != owner {
                    return Err(taken(&format!("the slot of {vm}"), holder));
                }
                return Ok(host.clone());
            }
            let free = |h: &HostCapacity| {
                let used = res.values().filter(|(id, _, _)| *id == h.id);
                let (mut c, mut m, mut d) = (0u64, 0u64, 0u64);
                for (_, s, _) in used {
                    c += u64::from(s.vcpus);
                    m += s.memory_mib;
                    d += s.disk_gib;
                }
                (
                    u64::from(h.vcpus).saturating_sub(c),
                    h.memory_mib.saturating_sub(m),
                    h.disk_gib.saturating_sub(d),
                )
            };
            let host = self
                .hosts
                .iter()
                .map(|h| (h, free(h)))
                .filter(|(_, (c, m, d))| {
                    *c >= u64::from(size.vcpus) && *m >= size.memory_mib && *d >= size.disk_gib
                })
                .max_by_key(|(_, (_, m, _))| *m)
                .map(|(h, _)| h.id.clone())
                .ok_or_else(|| Error::exhausted("no host has room for this vm"))?;
            res.insert(vm.clone(), (host.clone(), *size, owner.clone()));
            Ok(host)
        })
    }

    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        self.store
            .update(|res| Ok(release_owned(res, vm, owner, |(_, _, o)| o)))
    }

    async fn reservation(&self, vm: &VmName) -> Result<Option<HostId>> {
        self.store
            .read(|res| res.get(vm).map(|(h, _, _)| h.clone()))
    }

    async fn hosts(&self) -> Result<Vec<HostId>> {
        Ok(self.hosts.iter().map(|h| h.id.clone()).collect())
    }

    async fn usage(&self) -> Result<Vec<crate::types::HostUsage>> {
        self.store.read(|res| {
            self.hosts
                .iter()
                .map(|h| {
                    let mine: Vec<_> = res.iter().filter(|(_, (id, _, _))| *id == h.id).collect();
                    crate::types::HostUsage {
                        host: h.id.clone(),
                        reachable: true,
                        capacity: VmSize {
                            vcpus: h.vcpus,
                            memory_mib: h.memory_mib,
                            disk_gib: h.disk_gib,
                        },
                        used: VmSize {
                            vcpus: mine.iter().map(|(_, (_, s, _))| s.vcpus).sum(),
                            memory_mib: mine.iter().map(|(_, (_, s, _))| s.memory_mib).sum(),
                            disk_gib: mine.iter().map(|(_, (_, s, _))| s.disk_gib).sum(),
                        },
                        vms: mine.iter().map(|(vm, _)| (*vm).clone()).collect(),
                        templates: Vec::new(),
                    }
                })
                .collect()
        })
    }

    async fn relocate(&self, vm: &VmName, to: &HostId, owner: &RequestId) -> Result<()> {
        self.store.update(|res| {
            let Some((host, size, holder)) = res.get(vm).cloned() else {
                return Err(Error::not_found(format!("{vm} holds no slot")));
            };
            if &holder != owner {
                return Err(taken(&format!("the slot of {vm}"), &holder));
            }
            if &host == to {
                return Ok(());
            }
            let cap = self
                .hosts
                .iter()
                .find(|h| &h.id == to)
                .ok_or_else(|| Error::not_found(format!("no host {to}")))?;
            let (mut c, mut m, mut d) = (u64::from(size.vcpus), size.memory_mib, size.disk_gib);
            for (_, s, _) in res.values().filter(|(h, _, _)| h == to) {
                c += u64::from(s.vcpus);
                m += s.memory_mib;
                d += s.disk_gib;
            }
            if c > u64::from(cap.vcpus) || m > cap.memory_mib || d > cap.disk_gib {
                return Err(Error::exhausted(format!("{to} has no room for {vm}")));
            }
            res.insert(vm.clone(), (to.clone(), size, holder));
            Ok(())
        })
    }
}

/// Reference [`IpAllocator`] over an IPv4 subnet.
///
/// The network and broadcast addresses, the gateway and the reserved ranges are never
/// handed out; the lowest free address is.
#[derive(Debug)]
pub struct MemoryIpAllocator {
    subnet: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    reserved: Vec<(Ipv4Addr, Ipv4Addr)>,
    store: Store<BTreeMap<VmName, (Ipv4Addr, RequestId)>>,
}

impl MemoryIpAllocator {
    /// An allocator over `subnet`, state in memory.
    pub fn new(subnet: Ipv4Net, gateway: Option<Ipv4Addr>) -> Self {
        MemoryIpAllocator {
            subnet: subnet.trunc(),
            gateway,
            reserved: Vec::new(),
            store: Store::memory(),
        }
    }
    /// Keeps its leases in the JSON file `path`.
    pub fn with_state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Store::file(path);
        self
    }
    /// Never hands out `first..=last`.
    pub fn with_reserved(mut self, first: Ipv4Addr, last: Ipv4Addr) -> Self {
        self.reserved.push((first, last));
        self
    }
    /// How many leases are held.
    pub fn held(&self) -> Result<usize> {
        self.store.read(BTreeMap::len)
    }

    fn usable(&self, ip: Ipv4Addr) -> bool {
        let p = self.subnet.prefix_len();
        if p < 31 && (ip == self.subnet.network() || ip == self.subnet.broadcast()) {
            return false;
        }
        Some(ip) != self.gateway && !self.reserved.iter().any(|(a, b)| *a <= ip && ip <= *b)
    }

    fn lease_of(&self, vm: &VmName, ip: Ipv4Addr) -> Lease {
        Lease {
            vm: vm.clone(),
            ip: IpAddr::V4(ip),
            prefix_len: self.subnet.prefix_len(),
            gateway: self.gateway.map(IpAddr::V4),
        }
    }
}

#[async_trait]
impl IpAllocator for MemoryIpAllocator {
    fn backend(&self) -> &str {
        "memory"
    }

    async fn allocate(&self, vm: &VmName, owner: &RequestId) -> Result<Lease> {
        let ip = self.store.update(|leases| {
            if let Some((ip, holder)) = leases.get(vm) {
                if holder != owner {
                    return Err(taken(&format!("the lease of {vm}"), holder));
                }
                return Ok(*ip);
            }
            let taken: BTreeSet<Ipv4Addr> = leases.values().map(|(ip, _)| *ip).collect();
            let ip = self
                .subnet
                .hosts()
                .find(|ip| self.usable(*ip) && !taken.contains(ip))
                .ok_or_else(|| Error::exhausted(format!("no free address in {}", self.subnet)))?;
            leases.insert(vm.clone(), (ip, owner.clone()));
            Ok(ip)
        })?;
        Ok(self.lease_of(vm, ip))
    }

    async fn release(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        self.store
            .update(|leases| Ok(release_owned(leases, vm, owner, |(_, o)| o)))
    }

    async fn lease(&self, vm: &VmName) -> Result<Option<Lease>> {
        Ok(self
            .store
            .read(|leases| leases.get(vm).map(|(ip, _)| *ip))?
            .map(|ip| self.lease_of(vm, ip)))
    }
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
struct Zone {
    a: BTreeMap<String, IpAddr>,
    ptr: BTreeMap<IpAddr, String>,
}

/// Reference [`DnsUpdater`]: one forward zone and its PTRs.
#[derive(Debug)]
pub struct MemoryDns {
    zone: String,
    store: Store<Zone>,
}

impl MemoryDns {
    /// A zone named `zone` (for example `lab.example`), state in memory.
    pub fn new(zone: impl Into<String>) -> Self {
        MemoryDns {
            zone: zone.into().trim_end_matches('.').to_owned(),
            store: Store::memory(),
        }
    }
    /// Keeps its records in the JSON file `path`.
    pub fn with_state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Store::file(path);
        self
    }
    /// Adds `fqdn -> ip` and its PTR without any check: a record someone else owns.
    pub fn insert_foreign(&self, fqdn: &str, ip: IpAddr) -> Result<()> {
        self.store.update(|z| {
            z.a.insert(fqdn.to_owned(), ip);
            z.ptr.insert(ip, fqdn.to_owned());
            Ok(())
        })
    }
    /// How many records (A plus PTR) are held.
    pub fn held(&self) -> Result<usize> {
        self.store.read(|z| z.a.len() + z.ptr.len())
    }
}

#[async_trait]
impl DnsUpdater for MemoryDns {
    fn backend(&self) -> &str {
        "memory"
    }

    fn fqdn(&self, vm: &VmName) -> String {
        format!("{vm}.{}", self.zone)
    }

    async fn publish(&self, vm: &VmName, ip: IpAddr) -> Result<DnsRecord> {
        let fqdn = self.fqdn(vm);
        self.store.update(|z| {
            if let Some(other) = z.a.get(&fqdn).filter(|a| **a != ip) {
                return Err(Error::conflict(format!("{fqdn} already points to {other}")));
            }
            if let Some(other) = z.ptr.get(&ip).filter(|n| **n != fqdn) {
                return Err(Error::conflict(format!("{ip} already points to {other}")));
            }
            z.a.insert(fqdn.clone(), ip);
            z.ptr.insert(ip, fqdn.clone());
            Ok(())
        })?;
        Ok(DnsRecord { fqdn, ip })
    }

    async fn remove(&self, vm: &VmName, ip: IpAddr) -> Result<Undone> {
        let fqdn = self.fqdn(vm);
        self.store.update(|z| {
            let mut removed = false;
            if z.a.get(&fqdn) == Some(&ip) {
                z.a.remove(&fqdn);
                removed = true;
            }
            if z.ptr.get(&ip) == Some(&fqdn) {
                z.ptr.remove(&ip);
                removed = true;
            }
            Ok(if removed {
                Undone::Removed
            } else if let Some(other) = z.a.get(&fqdn) {
                Undone::foreign(format!("the owner of {fqdn} -> {other}"))
            } else {
                Undone::Absent
            })
        })
    }

    async fn resolve(&self, vm: &VmName) -> Result<Vec<IpAddr>> {
        let fqdn = self.fqdn(vm);
        self.store
            .read(|z| z.a.get(&fqdn).copied().into_iter().collect())
    }

    async fn reverse(&self, ip: IpAddr) -> Result<Vec<String>> {
        self.store
            .read(|z| z.ptr.get(&ip).cloned().into_iter().collect())
    }
}

fn host_key(vm: &VmName, host: &HostId) -> String {
    format!("{host}|{vm}")
}

/// Reference [`ImageStore`]: a fixed set of templates; disks are records, not files.
#[derive(Debug)]
pub struct MemoryImages {
    templates: BTreeSet<TemplateName>,
    store: Store<BTreeMap<String, (Disk, RequestId)>>,
}

impl MemoryImages {
    /// A store that knows `templates`, state in memory.
    pub fn new(templates: impl IntoIterator<Item = TemplateName>) -> Self {
        MemoryImages {
            templates: templates.into_iter().collect(),
            store: Store::memory(),
        }
    }
    /// Keeps its disks in the JSON file `path`.
    pub fn with_state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Store::file(path);
        self
    }
    /// How many disks exist.
    pub fn held(&self) -> Result<usize> {
        self.store.read(BTreeMap::len)
    }

    fn template(&self, name: &TemplateName) -> Result<Template> {
        if !self.templates.contains(name) {
            return Err(Error::not_found(format!("no template {name}")));
        }
        Ok(Template {
            name: name.clone(),
            path: PathBuf::from(format!("memory://templates/{name}")),
            digest: None,
            boot: BootSpec::default(),
        })
    }
}

#[async_trait]
impl ImageStore for MemoryImages {
    fn backend(&self) -> &str {
        "memory"
    }

    async fn prepare(
        &self,
        template: &TemplateName,
        _host: &HostId,
        progress: &Progress,
    ) -> Result<Template> {
        let t = self.template(template)?;
        progress.message(format!("template {template} is cached"));
        Ok(t)
    }

    async fn templates(&self) -> Result<Vec<Template>> {
        self.templates.iter().map(|t| self.template(t)).collect()
    }

    async fn create_disk(
        &self,
        vm: &VmName,
        host: &HostId,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        _progress: &Progress,
    ) -> Result<Disk> {
        self.template(&template.name)?;
        if size_gib == 0 {
            return Err(Error::invalid_input("disk size must be at least 1 GiB"));
        }
        self.store.update(|disks| {
            let key = host_key(vm, host);
            if let Some((d, holder)) = disks.get(&key) {
                if holder != owner {
                    return Err(taken(&format!("the disk of {vm}"), holder));
                }
                return Ok(d.clone());
            }
            let disk = Disk {
                vm: vm.clone(),
                path: PathBuf::from(format!("memory://disks/{vm}.qcow2")),
                format: DiskFormat::Qcow2,
                size_gib,
            };
            disks.insert(key, (disk.clone(), owner.clone()));
            Ok(disk)
        })
    }

    async fn delete_disk(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone> {
        self.store
            .update(|disks| Ok(release_owned(disks, &host_key(vm, host), owner, |(_, o)| o)))
    }

    async fn disk(&self, vm: &VmName, host: &HostId) -> Result<Option<Disk>> {
        self.store
            .read(|disks| disks.get(&host_key(vm, host)).map(|(d, _)| d.clone()))
    }

    fn disks_per_host(&self) -> bool {
        true
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct DomainRecord {
    domain: Domain,
    request_id: crate::types::RequestId,
}

/// Reference [`Hypervisor`]: domains are records.
#[derive(Debug)]
pub struct MemoryHypervisor {
    store: Store<BTreeMap<String, DomainRecord>>,
}

impl Default for MemoryHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryHypervisor {
    /// State in memory.
    pub fn new() -> Self {
        MemoryHypervisor {
            store: Store::memory(),
        }
    }
    /// Keeps its domains in the JSON file `path`.
    pub fn with_state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Store::file(path);
        self
    }
    /// How many domains are defined.
    pub fn held(&self) -> Result<usize> {
        self.store.read(BTreeMap::len)
    }
}

#[async_trait]
impl Hypervisor for MemoryHypervisor {
    fn backend(&self) -> &str {
        "memory"
    }

    async fn create(&self, spec: &DomainSpec, progress: &Progress) -> Result<Domain> {
        let d = self.store.update(|doms| {
            let key = host_key(&spec.name, &spec.host);
            if let Some(rec) = doms.get(&key) {
                if rec.request_id != spec.request_id {
                    return Err(Error::already_exists(format!(
                        "domain {} exists and belongs to another request",
                        spec.name
                    )));
                }
                return Ok(rec.domain.clone());
            }
            let domain = Domain {
                name: spec.name.clone(),
                host: spec.host.clone(),
                uuid: Some(uuid::Uuid::new_v4().to_string()),
            };
            doms.insert(
                key,
                DomainRecord {
                    domain: domain.clone(),
                    request_id: spec.request_id.clone(),
                },
            );
            Ok(domain)
        })?;
        progress.message(format!("domain {} running", d.name));
        Ok(d)
    }

    async fn destroy(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone> {
        self.store.update(|doms| {
            Ok(release_owned(doms, &host_key(vm, host), owner, |r| {
                &r.request_id
            }))
        })
    }

    async fn domain(&self, vm: &VmName, host: &HostId) -> Result<Option<Domain>> {
        self.store
            .read(|doms| doms.get(&host_key(vm, host)).map(|r| r.domain.clone()))
    }

    async fn migrate(
        &self,
        vm: &VmName,
        from: &HostId,
        to: &HostId,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<crate::types::MigrationReport> {
        self.store.update(|doms| {
            let Some(rec) = doms.get(&host_key(vm, from)).cloned() else {
                return Err(Error::not_found(format!("no domain {vm} on {from}")));
            };
            if &rec.request_id != owner {
                return Err(taken(&format!("domain {vm}"), &rec.request_id));
            }
            if doms.contains_key(&host_key(vm, to)) {
                return Err(Error::already_exists(format!("domain {vm} exists on {to}")));
            }
            doms.remove(&host_key(vm, from));
            let mut moved = rec;
            moved.domain.host = to.clone();
            doms.insert(host_key(vm, to), moved);
            Ok(())
        })?;
        progress.message(format!("domain {vm} moved to {to}"));
        Ok(crate::types::MigrationReport::default())
    }
}

/// Reference [`Bootstrapper`]: records a registration per VM; a run list holding
/// `recipe[fail]` fails, like a failing Chef run.
#[derive(Debug)]
pub struct MemoryBootstrapper {
    store: Store<BTreeMap<VmName, RequestId>>,
}

impl Default for MemoryBootstrapper {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBootstrapper {
    /// The run-list entry that makes a bootstrap fail.
    pub const FAILING_RECIPE: &'static str = "recipe[fail]";

    /// State in memory.
    pub fn new() -> Self {
        MemoryBootstrapper {
            store: Store::memory(),
        }
    }
    /// Keeps its registrations in the JSON file `path`.
    pub fn with_state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Store::file(path);
        self
    }
    /// How many VMs are registered.
    pub fn held(&self) -> Result<usize> {
        self.store.read(BTreeMap::len)
    }
}

#[async_trait]
impl Bootstrapper for MemoryBootstrapper {
    fn backend(&self) -> &str {
        "memory"
    }

    async fn bootstrap(
        &self,
        target: &BootstrapTarget,
        progress: &Progress,
    ) -> Result<BootstrapReport> {
        // Register first, as a Chef client does before converging.
        self.store.update(|reg| match reg.get(&target.vm) {
            Some(holder) if *holder != target.request_id => {
                Err(taken(&format!("the registration of {}", target.vm), holder))
            }
            _ => {
                reg.insert(target.vm.clone(), target.request_id.clone());
                Ok(())
            }
        })?;
        for item in &target.settings.run_list {
            progress.message(format!("applying {item}"));
            if item == Self::FAILING_RECIPE {
                return Err(Error::backend(format!("{item} failed")));
            }
        }
        Ok(BootstrapReport {
            bootstrapped: true,
            summary: format!(
                "{} run-list item(s) applied",
                target.settings.run_list.len()
            ),
        })
    }

    async fn unregister(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        self.store
            .update(|reg| Ok(release_owned(reg, vm, owner, |o| o)))
    }
}

/// Every reference backend, wired together, with a leak count.
#[derive(Debug, Clone)]
pub struct MemoryBackends {
    /// Users.
    pub users: std::sync::Arc<MemoryUsers>,
    /// Placement.
    pub placement: std::sync::Arc<MemoryPlacement>,
    /// Addresses.
    pub ip: std::sync::Arc<MemoryIpAllocator>,
    /// DNS.
    pub dns: std::sync::Arc<MemoryDns>,
    /// Images and disks.
    pub images: std::sync::Arc<MemoryImages>,
    /// Domains.
    pub hypervisor: std::sync::Arc<MemoryHypervisor>,
    /// Bootstrap registrations.
    pub bootstrap: std::sync::Arc<MemoryBootstrapper>,
}

impl MemoryBackends {
    /// As trait objects, for [`ProvisionerBuilder::backends`](crate::ProvisionerBuilder::backends).
    pub fn backends(&self) -> Backends {
        Backends {
            users: self.users.clone(),
            placement: self.placement.clone(),
            ip: self.ip.clone(),
            dns: self.dns.clone(),
            images: self.images.clone(),
            hypervisor: self.hypervisor.clone(),
            bootstrap: self.bootstrap.clone(),
        }
    }

    /// Resources held by each backend, by step name; all zero means nothing leaked.
    pub fn held(&self) -> Result<BTreeMap<&'static str, usize>> {
        Ok(BTreeMap::from([
            ("placement", self.placement.held()?),
            ("ip", self.ip.held()?),
            ("dns", self.dns.held()?),
            ("disk", self.images.held()?),
            ("domain", self.hypervisor.held()?),
            ("bootstrap", self.bootstrap.held()?),
        ]))
    }

    /// Total resources held.
    pub fn held_total(&self) -> Result<usize> {
        Ok(self.held()?.values().sum())
    }
}
