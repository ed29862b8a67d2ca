//! [`Hypervisor`] on libvirt, through the `virt` crate (what `virt-install` does).
//!
//! The domain XML is written with an XML writer from a [`DomainSpec`] by the pure function
//! [`domain_xml`]; nothing is pasted into XML as a string. The VM's owner and request id
//! are kept in the domain's `<metadata>`, so the inventory can be rebuilt from libvirt
//! alone ([`LibvirtHypervisor::inventory`]).
//!
//! `virt` is blocking FFI: every call runs in `spawn_blocking`, one connection per
//! operation, to the host's libvirt URI (the [`HostId`]).
//!
//! After starting the domain, [`Hypervisor::create`] waits until the guest answers on its
//! SSH port with an SSH banner, reporting progress while it waits, and fails (leaving the
//! cleanup to the pipeline's rollback) if the domain stops or the time limit passes.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use quick_xml::Writer;
use quick_xml::events::{BytesText, Event};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use virt::connect::Connect;
use virt::domain::Domain as VirtDomain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use crate::error::{BackendError, Error, ErrorKind, Result};
use crate::events::Progress;
use crate::traits::Hypervisor;
use crate::types::{
    Domain, DomainSpec, HostId, MigrationReport, RequestId, Undone, UserName, VmName,
};

const BACKEND: &str = "libvirt";

/// What can go wrong in the libvirt backends; `?` turns it into the public [`Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum LibvirtError {
    #[error("{what} on {host}")]
    Virt {
        what: &'static str,
        host: HostId,
        #[source]
        source: virt::error::Error,
    },
    #[error("domain {vm} exists on {host} and belongs to another request")]
    ForeignDomain { vm: VmName, host: HostId },
    #[error(
        "the kernel command line for {vm} would be {len} bytes (max {MAX_CMDLINE}); too many ssh keys"
    )]
    CmdlineTooLong { vm: VmName, len: usize },
    #[error("path {} is not UTF-8", .0.display())]
    PathNotUtf8(PathBuf),
    #[error("cannot write {0}")]
    Xml(&'static str, #[source] std::io::Error),
    #[error("{0} is not UTF-8")]
    XmlNotUtf8(&'static str, #[source] std::string::FromUtf8Error),
    #[error("cannot remove seed {}", .0.display())]
    RemoveSeed(PathBuf, #[source] std::io::Error),
    #[error("cannot read authorized key file {}", .0.display())]
    KeyFile(PathBuf, #[source] std::io::Error),
    #[error("bridge {0:?} is not an interface name")]
    Bridge(String),
    #[error("cannot create directory {}", .0.display())]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("{vm} did not answer on {addr} within {secs}s (console: {})", console.display())]
    NoSsh {
        vm: VmName,
        addr: SocketAddr,
        secs: u64,
        console: PathBuf,
    },
    #[error("{vm} stopped while booting (console: {})", console.display())]
    Stopped { vm: VmName, console: PathBuf },
    #[error("the guest did not release its first-boot seed within {0}s")]
    SeedHeld(u64),
    #[error("no domain {vm} on {host}")]
    NotHere { vm: VmName, host: HostId },
    #[error("seed volume {name} appeared on {host} while this run uploaded it")]
    SeedExists { name: String, host: HostId },
}

impl BackendError for LibvirtError {
    const BACKEND: &'static str = BACKEND;

    fn kind(&self) -> ErrorKind {
        match self {
            LibvirtError::Virt { source, .. } => super::pool::virt_kind(source),
            LibvirtError::ForeignDomain { .. } | LibvirtError::SeedExists { .. } => {
                ErrorKind::AlreadyExists
            }
            LibvirtError::NotHere { .. } => ErrorKind::NotFound,
            LibvirtError::CmdlineTooLong { .. }
            | LibvirtError::PathNotUtf8(_)
            | LibvirtError::KeyFile(..)
            | LibvirtError::Bridge(_) => ErrorKind::InvalidInput,
            LibvirtError::NoSsh { .. } | LibvirtError::SeedHeld(_) => ErrorKind::Timeout,
            LibvirtError::Xml(..)
            | LibvirtError::XmlNotUtf8(..)
            | LibvirtError::RemoveSeed(..)
            | LibvirtError::CreateDir(..)
            | LibvirtError::Stopped { .. } => ErrorKind::Backend,
        }
    }
}

/// The XML namespace of devvm's domain metadata.
pub const METADATA_NS: &str = "https://devvm.invalid/xmlns/domain/1";

/// How long the wait for a guest's SSH pauses between probes.
const SSH_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The longest kernel command line x86 Linux accepts.
const MAX_CMDLINE: usize = 2047;

/// The accelerator a domain runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization (`<domain type='kvm'>`).
    #[default]
    Kvm,
    /// QEMU's software emulation (`<domain type='qemu'>`): slow, but needs no `/dev/kvm`.
    Tcg,
}

/// The `[hypervisor]` section for `backend = "libvirt"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// `kvm` (default) or `tcg`.
    #[serde(default)]
    pub accel: Accel,
    /// The bridge the VMs' NIC joins.
    pub bridge: String,
    /// Where each guest's serial console is logged (`<dir>/<vm>.log`).
    pub console_dir: PathBuf,
    /// DNS servers handed to the guest.
    #[serde(default)]
    pub dns_servers: Vec<IpAddr>,
    /// How long to wait for the guest's SSH port, in seconds (default 300).
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_secs: u64,
    /// The guest's SSH port (default 22).
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u16,
    /// Where each guest's first-boot seed image (`<vm>-<request id>-cidata.img`, mode
    /// 0600) is kept until the guest consumed it; default: `console_dir`.
    #[serde(default)]
    pub seed_dir: Option<PathBuf>,
    /// Instead of `seed_dir`: the libvirt storage pool (on every host) that holds each
    /// first-boot seed as the volume `<vm>-<request id>-cidata.img`, uploaded through
    /// libvirt, so the host need not share a file system with this process.
    #[serde(default)]
    pub seed_pool: Option<String>,
    /// Files of extra `authorized_keys` lines for every guest (for example the
    /// provisioner's own key, which the bootstrap step uses).
    #[serde(default)]
    pub authorized_key_files: Vec<PathBuf>,
}

fn default_boot_timeout() -> u64 {
    300
}
fn default_ssh_port() -> u16 {
    22
}

/// Settings of [`domain_xml`] that come from the config rather than the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSettings {
    /// Accelerator.
    pub accel: Accel,
    /// Bridge for the NIC.
    pub bridge: String,
    /// Serial console log file.
    pub console_log: PathBuf,
    /// DNS servers for the guest.
    pub dns_servers: Vec<IpAddr>,
    /// Extra authorized keys.
    pub extra_keys: Vec<String>,
    /// The seed image to attach as a second disk, if any.
    pub seed_image: Option<PathBuf>,
}

/// A domain as libvirt reports it, with devvm's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Its name.
    pub name: VmName,
    /// libvirt's UUID.
    pub uuid: String,
    /// Whether it is running.
    pub active: bool,
    /// The owner recorded in its metadata.
    pub owner: Option<UserName>,
    /// The request id recorded in its metadata.
    pub request_id: Option<RequestId>,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Its memory in MiB.
    pub memory_mib: u64,
    /// Its disk size in GiB, from the metadata.
    pub disk_gib: u64,
}

/// A deterministic locally administered MAC for a VM (QEMU's `52:54:00` prefix).
pub fn mac_for(vm: &VmName) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for b in vm.as_str().bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = hash.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}

/// The kernel command line for direct kernel boot: the template's own, then what the
/// lab's guest init reads (`devvm.ip`, `devvm.gw`, `devvm.hostname`, `devvm.dns`,
/// `devvm.authorized_key` as base64, once per key).
pub fn kernel_cmdline(spec: &DomainSpec, settings: &DomainSettings) -> Result<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts: Vec<String> = Vec::new();
    if let Some(base) = &spec.template.boot.cmdline {
        parts.push(base.trim().to_owned());
    }
    parts.push(format!(
        "devvm.ip={}/{}",
        spec.lease.ip, spec.lease.prefix_len
    ));
    if let Some(gw) = spec.lease.gateway {
        parts.push(format!("devvm.gw={gw}"));
    }
    parts.push(format!("devvm.hostname={}", spec.name));
    if !settings.dns_servers.is_empty() {
        let dns: Vec<String> = settings
            .dns_servers
            .iter()
            .map(ToString::to_string)
            .collect();
        parts.push(format!("devvm.dns={}", dns.join(",")));
    }
    for key in spec.ssh_keys.iter().chain(&settings.extra_keys) {
        parts.push(format!("devvm.authorized_key={}", b64.encode(key.trim())));
    }
    let line = parts.join(" ");
    if line.len() > MAX_CMDLINE {
        return Err(LibvirtError::CmdlineTooLong {
            vm: spec.name.clone(),
            len: line.len(),
        }
        .into());
    }
    Ok(line)
}

fn xml_err(e: std::io::Error) -> Error {
    LibvirtError::Xml("domain xml", e).into()
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| LibvirtError::PathNotUtf8(p.to_owned()).into())
}

/// The first-boot seed's `<disk>` element: a read-only raw virtio disk `vdb`.
fn write_seed_disk<W: std::io::Write>(w: &mut Writer<W>, seed: &str) -> std::io::Result<()> {
    w.create_element("disk")
        .with_attribute(("type", "file"))
        .with_attribute(("device", "disk"))
        .write_inner_content(|w| {
            w.create_element("driver")
                .with_attribute(("name", "qemu"))
                .with_attribute(("type", "raw"))
                .write_empty()?;
            w.create_element("source")
                .with_attribute(("file", seed))
                .write_empty()?;
            w.create_element("target")
                .with_attribute(("dev", SEED_TARGET))
                .with_attribute(("bus", "virtio"))
                .write_empty()?;
            w.create_element("readonly").write_empty()?;
            Ok(())
        })?;
    Ok(())
}

/// The guest device of the first-boot seed.
const SEED_TARGET: &str = "vdb";

/// The device XML that detaches the first-boot seed at `seed` (sans-I/O).
pub fn seed_disk_xml(seed: &Path) -> Result<String> {
    let mut w = Writer::new(Vec::new());
    write_seed_disk(&mut w, path_str(seed)?).map_err(xml_err)?;
    String::from_utf8(w.into_inner())
        .map_err(|e| LibvirtError::XmlNotUtf8("the seed disk XML", e).into())
}

/// Writes the libvirt domain XML for `spec`. Every value is escaped by the XML writer.
pub fn domain_xml(spec: &DomainSpec, settings: &DomainSettings) -> Result<String> {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let domain_type = match settings.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
    };
    let memory = spec.size.memory_mib.to_string();
    let vcpus = spec.size.vcpus.to_string();
    let disk = path_str(&spec.disk.path)?;
    let disk_format = match spec.disk.format {
        crate::types::DiskFormat::Qcow2 => "qcow2",
        crate::types::DiskFormat::Raw => "raw",
    };
    let console = path_str(&settings.console_log)?;
    let seed = settings.seed_image.as_deref().map(path_str).transpose()?;
    let boot = &spec.template.boot;
    let kernel = boot.kernel.as_deref().map(path_str).transpose()?;
    let initrd = boot.initrd.as_deref().map(path_str).transpose()?;
    let cmdline = match kernel {
        Some(_) => Some(kernel_cmdline(spec, settings)?),
        None => None,
    };
    let mac = mac_for(&spec.name);
    let ip = spec.lease.ip.to_string();
    let disk_gib = spec.size.disk_gib.to_string();

    w.create_element("domain")
        .with_attribute(("type", domain_type))
        .write_inner_content(|w| {
            w.create_element("name")
                .write_text_content(BytesText::new(spec.name.as_str()))?;
            w.create_element("title")
                .write_text_content(BytesText::new(&spec.fqdn))?;
            w.create_element("metadata").write_inner_content(|w| {
                w.create_element("devvm:instance")
                    .with_attribute(("xmlns:devvm", METADATA_NS))
                    .write_inner_content(|w| {
                        for (k, v) in [
                            ("devvm:owner", spec.owner.as_str()),
                            ("devvm:request", spec.request_id.as_str()),
                            ("devvm:fqdn", spec.fqdn.as_str()),
                            ("devvm:ip", ip.as_str()),
                            ("devvm:template", spec.template.name.as_str()),
                            ("devvm:disk_gib", disk_gib.as_str()),
                        ] {
                            w.create_element(k).write_text_content(BytesText::new(v))?;
                        }
                        Ok(())
                    })?;
                Ok(())
            })?;
            w.create_element("memory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&memory))?;
            w.create_element("vcpu")
                .write_text_content(BytesText::new(&vcpus))?;
            w.create_element("os").write_inner_content(|w| {
                w.create_element("type")
                    .with_attribute(("arch", "x86_64"))
                    .write_text_content(BytesText::new("hvm"))?;
                if let Some(k) = kernel {
                    w.create_element("kernel")
                        .write_text_content(BytesText::new(k))?;
                }
                if let Some(i) = initrd {
                    w.create_element("initrd")
                        .write_text_content(BytesText::new(i))?;
                }
                if let Some(c) = &cmdline {
                    w.create_element("cmdline")
                        .write_text_content(BytesText::new(c))?;
                }
                if kernel.is_none() {
                    w.create_element("boot")
                        .with_attribute(("dev", "hd"))
                        .write_empty()?;
                }
                Ok(())
            })?;
            // ACPI: the guest sees a hot-unplug request (the first-boot seed is detached
            // once consumed) and a power button.
            w.create_element("features").write_inner_content(|w| {
                w.create_element("acpi").write_empty()?;
                w.create_element("apic").write_empty()?;
                Ok(())
            })?;
            w.create_element("on_poweroff")
                .write_text_content(BytesText::new("destroy"))?;
            w.create_element("on_crash")
                .write_text_content(BytesText::new("destroy"))?;
            w.create_element("devices").write_inner_content(|w| {
                w.create_element("disk")
                    .with_attribute(("type", "file"))
                    .with_attribute(("device", "disk"))
                    .write_inner_content(|w| {
                        w.create_element("driver")
                            .with_attribute(("name", "qemu"))
                            .with_attribute(("type", disk_format))
                            .write_empty()?;
                        w.create_element("source")
                            .with_attribute(("file", disk))
                            .write_empty()?;
                        w.create_element("target")
                            .with_attribute(("dev", "vda"))
                            .with_attribute(("bus", "virtio"))
                            .write_empty()?;
                        Ok(())
                    })?;
                if let Some(seed) = &seed {
                    write_seed_disk(w, seed)?;
                }
                w.create_element("interface")
                    .with_attribute(("type", "bridge"))
                    .write_inner_content(|w| {
                        w.create_element("mac")
                            .with_attribute(("address", mac.as_str()))
                            .write_empty()?;
                        w.create_element("source")
                            .with_attribute(("bridge", settings.bridge.as_str()))
                            .write_empty()?;
                        w.create_element("model")
                            .with_attribute(("type", "virtio"))
                            .write_empty()?;
                        Ok(())
                    })?;
                w.create_element("serial")
                    .with_attribute(("type", "file"))
                    .write_inner_content(|w| {
                        w.create_element("source")
                            .with_attribute(("path", console))
                            .with_attribute(("append", "on"))
                            .write_empty()?;
                        w.create_element("target")
                            .with_attribute(("port", "0"))
                            .write_empty()?;
                        Ok(())
                    })?;
                // An entropy source: without one a guest's kernel can take seconds to
                // seed its random number generator under emulation, and whatever needs
                // randomness early (sshd's host key handling, cloud-init) waits for it.
                w.create_element("rng")
                    .with_attribute(("model", "virtio"))
                    .write_inner_content(|w| {
                        w.create_element("backend")
                            .with_attribute(("model", "random"))
                            .write_text_content(BytesText::new("/dev/urandom"))?;
                        Ok(())
                    })?;
                w.create_element("memballoon")
                    .with_attribute(("model", "none"))
                    .write_empty()?;
                Ok(())
            })?;
            Ok(())
        })
        .map_err(xml_err)?;
    String::from_utf8(w.into_inner()).map_err(|e| LibvirtError::XmlNotUtf8("domain xml", e).into())
}

/// devvm's metadata of a domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The VM's owner.
    pub owner: Option<UserName>,
    /// The request that made it.
    pub request_id: Option<RequestId>,
    /// Its disk size in GiB.
    pub disk_gib: Option<u64>,
}

/// Reads devvm's metadata element (as returned by `virDomainGetMetadata`, or inside a
/// whole domain XML).
pub fn parse_metadata(xml: &str) -> Metadata {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut m = Metadata::default();
    let mut current: Option<String> = None;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                let local = e.local_name();
                current = std::str::from_utf8(local.as_ref()).ok().map(str::to_owned);
            }
            Ok(Event::Text(t)) => {
                let text = t.decode().map(|s| s.into_owned()).unwrap_or_default();
                let text = text.trim();
                match current.as_deref() {
                    Some("owner") => m.owner = UserName::new(text).ok(),
                    Some("request") => m.request_id = RequestId::new(text).ok(),
                    Some("disk_gib") => m.disk_gib = text.parse().ok(),
                    _ => {}
                }
            }
            Ok(Event::End(_)) => current = None,
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    m
}

/// Every domain on `host` that carries devvm's metadata (running or not).
pub async fn inventory(host: &HostId) -> Result<Vec<DomainInfo>> {
    let host = host.clone();
    blocking(move || {
        let conn = connect(&host)?;
        let doms = conn
            .list_all_domains(0)
            .map_err(|e| virt_err("cannot list domains", &host, e))?;
        let mut out = Vec::new();
        for d in doms {
            let meta = metadata_of(&d);
            if meta.request_id.is_none() {
                continue;
            }
            let info = d.info().ok();
            let Some(name) = d.name().ok().and_then(|n| VmName::new(n).ok()) else {
                continue;
            };
            out.push(DomainInfo {
                name,
                uuid: d.uuid_string().unwrap_or_default(),
                active: d.is_active().unwrap_or(false),
                owner: meta.owner,
                request_id: meta.request_id,
                vcpus: info.as_ref().map_or(0, |i| i.nr_virt_cpu),
                memory_mib: info.as_ref().map_or(0, |i| i.max_mem / 1024),
                disk_gib: meta.disk_gib.unwrap_or(0),
            });
        }
        Ok(out)
    })
    .await
}

/// Defines and runs VMs through libvirt.
#[derive(Debug, Clone)]
pub struct LibvirtHypervisor {
    config: LibvirtConfig,
    extra_keys: Vec<String>,
}

fn virt_err(what: &'static str, host: &HostId, source: virt::error::Error) -> Error {
    LibvirtError::Virt {
        what,
        host: host.clone(),
        source,
    }
    .into()
}

fn foreign_domain(vm: &VmName, host: &HostId) -> Error {
    LibvirtError::ForeignDomain {
        vm: vm.clone(),
        host: host.clone(),
    }
    .into()
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    matches!(e.code(), Enum::Known(ErrorNumber::NoDomain))
}

use super::pool::connect;

fn lookup(conn: &Connect, host: &HostId, vm: &VmName) -> Result<Option<VirtDomain>> {
    match conn.lookup_domain_by_name(vm.as_str()) {
        Ok(d) => Ok(Some(d)),
        Err(e) if is_no_domain(&e) => Ok(None),
        Err(e) => Err(virt_err("cannot look up the domain", host, e)),
    }
}

fn metadata_of(d: &VirtDomain) -> Metadata {
    d.metadata(
        virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(METADATA_NS),
        0,
    )
    .map(|xml| parse_metadata(&xml))
    .unwrap_or_default()
}

/// Runs a libvirt call on the blocking pool, tracked by the pipeline step (see
/// [`crate::work`]).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    crate::work::blocking(f)
        .await
        .map_err(|e| e.or_backend(BACKEND))
}

/// The counters `keys` of `dom`'s job statistics (`flags` 0: the running job;
/// `VIR_DOMAIN_JOB_STATS_COMPLETED`: the last finished one), `None` where libvirt has none.
/// (virt 0.5's `Domain::job_stats` makes a `Vec` from a null pointer when no job runs, so
/// this asks libvirt directly and frees what libvirt allocated.)
fn job_counters(dom: &VirtDomain, flags: u32, keys: &[&std::ffi::CStr]) -> Vec<Option<u64>> {
    let mut kind: std::os::raw::c_int = 0;
    let mut params: virt::sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut n: std::os::raw::c_int = 0;
    // SAFETY: `dom` is a live domain handle for the whole call; libvirt either fails, or
    // sets `params` to `n` parameters it allocated (or to null when there are none).
    let rc = unsafe {
        virt::sys::virDomainGetJobStats(dom.as_ptr(), &mut kind, &mut params, &mut n, flags)
    };
    if rc < 0 || params.is_null() {
        return vec![None; keys.len()];
    }
    let out = keys
        .iter()
        .map(|k| {
            let mut v: std::os::raw::c_ulonglong = 0;
            // SAFETY: `params` holds `n` valid parameters; `k` is NUL-terminated.
            let found =
                unsafe { virt::sys::virTypedParamsGetULLong(params, n, k.as_ptr(), &mut v) };
            (found == 1).then_some(v)
        })
        .collect();
    // SAFETY: `params` and `n` are exactly what libvirt allocated above; not used after.
    unsafe { virt::sys::virTypedParamsFree(params, n) };
    out
}

/// Removes a seed image; an absent one is fine.
fn remove_seed(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LibvirtError::RemoveSeed(path.to_owned(), e).into()),
    }
}

/// Whether `addr` answers with an SSH banner within `limit`.
async fn ssh_banner(addr: SocketAddr, limit: Duration) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.ok()?;
        (&buf == b"SSH-").then_some(())
    };
    matches!(tokio::time::timeout(limit, attempt).await, Ok(Some(())))
}

impl LibvirtHypervisor {
    /// A hypervisor from its config section; relative key files are resolved against
    /// `base_dir`. Unreadable key files are [`ErrorKind::InvalidInput`].
    pub fn from_config(config: &LibvirtConfig, base_dir: &Path) -> Result<Self> {
        let mut extra_keys = Vec::new();
        for f in &config.authorized_key_files {
            let path = base_dir.join(f);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| LibvirtError::KeyFile(path.clone(), e))?;
            extra_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        if config.bridge.is_empty()
            || !config
                .bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(LibvirtError::Bridge(config.bridge.clone()).into());
        }
        let mut config = config.clone();
        config.console_dir = base_dir.join(&config.console_dir);
        config.seed_dir = config.seed_dir.as_ref().map(|d| base_dir.join(d));
        Ok(LibvirtHypervisor { config, extra_keys })
    }

    fn settings(&self, vm: &VmName, seed_image: Option<PathBuf>) -> DomainSettings {
        DomainSettings {
            accel: self.config.accel,
            bridge: self.config.bridge.clone(),
            console_log: self.console_log(vm),
            dns_servers: self.config.dns_servers.clone(),
            extra_keys: self.extra_keys.clone(),
            seed_image,
        }
    }

    /// The name of the seed volume of `vm` made by the run `owner` (with `seed_pool`).
    fn seed_volume(vm: &VmName, owner: &RequestId) -> String {
        format!("{vm}-{owner}-cidata.img")
    }

    /// Writes (or with `seed_pool` uploads) the first-boot seed `files` of `spec` and
    /// returns its path as the host sees it.
    async fn put_seed(
        &self,
        spec: &DomainSpec,
        files: Vec<(&'static str, Vec<u8>)>,
    ) -> Result<PathBuf> {
        let Some(pool) = self.config.seed_pool.clone() else {
            let path = self.seed_image(&spec.name, &spec.request_id);
            let f: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            crate::seed::write_cidata(&path, &f).map_err(|e| e.with_backend(BACKEND))?;
            return Ok(path);
        };
        let (host, name) = (
            spec.host.clone(),
            Self::seed_volume(&spec.name, &spec.request_id),
        );
        // Made locally first (mode 0600, in seed_dir or console_dir), uploaded, then removed
        // here: it holds the guest's private host key.
        let local = self.seed_image(&spec.name, &spec.request_id);
        blocking(move || {
            let f: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            crate::seed::write_cidata(&local, &f).map_err(|e| e.with_backend(BACKEND))?;
            let uploaded = (|| {
                let p = super::pool::Pool::open(&host, &pool)?;
                // The name carries this run's request id: a volume of that name is this
                // run's own, from an attempt that did not finish.
                p.delete(&name)?;
                let (vol, _) = p.upload_file(&local, &name, |_| {})?.ok_or_else(|| {
                    LibvirtError::SeedExists {
                        name: name.clone(),
                        host: host.clone(),
                    }
                })?;
                Ok(PathBuf::from(p.path_of(&vol)?))
            })();
            remove_seed(&local)?;
            uploaded
        })
        .await
    }

    /// Removes the seed of `vm` made by `owner`; an absent one is fine.
    async fn drop_seed(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<()> {
        let Some(pool) = self.config.seed_pool.clone() else {
            return remove_seed(&self.seed_image(vm, owner));
        };
        let (host, name) = (host.clone(), Self::seed_volume(vm, owner));
        blocking(move || {
            super::pool::Pool::open(&host, &pool)?
                .delete(&name)
                .map(drop)
        })
        .await
    }

    /// The host's path of the seed of `vm` made by `owner` (`None` with `seed_pool` when
    /// that volume is gone).
    async fn seed_path(
        &self,
        vm: &VmName,
        host: &HostId,
        owner: &RequestId,
    ) -> Result<Option<PathBuf>> {
        let Some(pool) = self.config.seed_pool.clone() else {
            return Ok(Some(self.seed_image(vm, owner)));
        };
        let (host, name) = (host.clone(), Self::seed_volume(vm, owner));
        blocking(move || {
            let p = super::pool::Pool::open(&host, &pool)?;
            match p.volume(&name)? {
                Some(v) => Ok(Some(PathBuf::from(p.path_of(&v)?))),
                None => Ok(None),
            }
        })
        .await
    }

    /// The first-boot seed image of `vm` made by the run `owner`. The request id is in
    /// the name, so no path ever names another run's seed of the same VM name.
    pub fn seed_image(&self, vm: &VmName, owner: &RequestId) -> PathBuf {
        self.config
            .seed_dir
            .as_ref()
            .unwrap_or(&self.config.console_dir)
            .join(format!("{vm}-{owner}-cidata.img"))
    }

    /// The serial console log of `vm`.
    pub fn console_log(&self, vm: &VmName) -> PathBuf {
        self.config.console_dir.join(format!("{vm}.log"))
    }

    /// Every domain on `host` that carries devvm's metadata.
    pub async fn inventory(&self, host: &HostId) -> Result<Vec<DomainInfo>> {
        inventory(host).await
    }

    async fn wait_for_ssh(&self, spec: &DomainSpec, progress: &Progress) -> Result<()> {
        let addr = SocketAddr::new(spec.lease.ip, self.config.ssh_port);
        let limit = Duration::from_secs(self.config.boot_timeout_secs);
        let start = Instant::now();
        let mut next_report = Duration::ZERO;
        let mut next_liveness = Duration::ZERO;
        progress.message(format!("waiting for ssh on {addr}"));
        loop {
            if ssh_banner(addr, Duration::from_secs(2)).await {
                progress.message(format!(
                    "ssh answers on {addr} after {:.1}s",
                    start.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            let elapsed = start.elapsed();
            if elapsed >= limit {
                return Err(LibvirtError::NoSsh {
                    vm: spec.name.clone(),
                    addr,
                    secs: limit.as_secs(),
                    console: self.console_log(&spec.name),
                }
                .into());
            }
            // A guest that powered off or crashed will never answer (asked of libvirt
            // once a second, not on every probe).
            if elapsed >= next_liveness {
                let (host, vm) = (spec.host.clone(), spec.name.clone());
                let active = blocking(move || {
                    let conn = connect(&host)?;
                    Ok(lookup(&conn, &host, &vm)?.map(|d| d.is_active().unwrap_or(false)))
                })
                .await?;
                if active != Some(true) {
                    return Err(LibvirtError::Stopped {
                        vm: spec.name.clone(),
                        console: self.console_log(&spec.name),
                    }
                    .into());
                }
                next_liveness = start.elapsed() + Duration::from_secs(1);
            }
            if elapsed >= next_report {
                progress.fraction(
                    format!("booting, {}s", elapsed.as_secs()),
                    elapsed.as_secs_f64() / limit.as_secs_f64(),
                );
                next_report = elapsed + Duration::from_secs(5);
            }
            // Probe again soon: a refused probe (the guest is up, sshd not yet) costs a
            // round trip on the lab bridge, and every 100 ms saved here is a guest ready
            // sooner. The deadline above bounds the wait.
            tokio::time::sleep(SSH_PROBE_INTERVAL).await;
        }
    }
}

#[async_trait]
impl Hypervisor for LibvirtHypervisor {
    fn backend(&self) -> &str {
        BACKEND
    }

    async fn create(&self, spec: &DomainSpec, progress: &Progress) -> Result<Domain> {
        for dir in [
            Some(&self.config.console_dir),
            self.config.seed_dir.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            std::fs::create_dir_all(dir).map_err(|e| LibvirtError::CreateDir(dir.clone(), e))?;
        }
        // A domain of this name that another request made is refused before anything is
        // written for this one (the seed file of that name may be the other VM's).
        {
            let s = spec.clone();
            blocking(
                move || match lookup(&connect(&s.host)?, &s.host, &s.name)? {
                    Some(existing)
                        if metadata_of(&existing).request_id.as_ref() != Some(&s.request_id) =>
                    {
                        Err(foreign_domain(&s.name, &s.host))
                    }
                    _ => Ok(()),
                },
            )
            .await?;
        }
        let mut seed_image = None;
        if let Some(f) = spec.nocloud_files(&self.config.dns_servers) {
            let files = vec![
                ("meta-data", f.meta_data.into_bytes()),
                (
                    "user-data",
                    secrecy::ExposeSecret::expose_secret(&f.user_data)
                        .as_bytes()
                        .to_vec(),
                ),
                ("network-config", f.network_config.into_bytes()),
            ];
            seed_image = Some(self.put_seed(spec, files).await?);
            progress.message("first-boot seed written (cidata)");
        }
        let xml = domain_xml(spec, &self.settings(&spec.name, seed_image))?;
        let s = spec.clone();
        let p = progress.clone();
        let domain = blocking(move || {
            let conn = connect(&s.host)?;
            let dom = match lookup(&conn, &s.host, &s.name)? {
                Some(existing) => {
                    let meta = metadata_of(&existing);
                    if meta.request_id.as_ref() != Some(&s.request_id) {
                        return Err(foreign_domain(&s.name, &s.host));
                    }
                    p.message(format!("domain {} is already defined", s.name));
                    existing
                }
                None => {
                    if crate::work::abandoned() {
                        return Err(crate::work::cancelled_before_commit("defining the domain"));
                    }
                    let d = conn
                        .define_domain_xml(&xml)
                        .map_err(|e| virt_err("cannot define the domain", &s.host, e))?;
                    p.message(format!("defined domain {}", s.name));
                    d
                }
            };
            if !dom
                .is_active()
                .map_err(|e| virt_err("cannot read domain state", &s.host, e))?
            {
                if crate::work::abandoned() {
                    return Err(crate::work::cancelled_before_commit("starting the domain"));
                }
                p.message(format!("starting domain {}", s.name));
                dom.create()
                    .map_err(|e| virt_err("cannot start the domain", &s.host, e))?;
                p.message(format!("started domain {}", s.name));
            }
            Ok(Domain {
                name: s.name.clone(),
                host: s.host.clone(),
                uuid: dom.uuid_string().ok(),
            })
        })
        .await?;
        self.wait_for_ssh(spec, progress).await?;
        Ok(domain)
    }

    /// Destroys and undefines the domain only if its metadata names `owner` as its
    /// request; then removes its seed disk. A domain without devvm's metadata, or of
    /// another request, is left alone with its seed.
    async fn destroy(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone> {
        let (vm0, host0, owner0) = (vm.clone(), host.clone(), owner.clone());
        let (vm, host, owner) = (vm.clone(), host.clone(), owner.clone());
        let outcome = blocking(move || {
            let conn = connect(&host)?;
            let Some(dom) = lookup(&conn, &host, &vm)? else {
                return Ok(Undone::Absent);
            };
            match metadata_of(&dom).request_id {
                Some(r) if r == owner => {}
                Some(r) => return Ok(Undone::foreign(r.as_str())),
                None => return Ok(Undone::foreign("no devvm metadata (not made by devvm)")),
            }
            if dom.is_active().unwrap_or(false)
                && let Err(e) = dom.destroy()
                && !is_no_domain(&e)
            {
                // It may have stopped on its own meanwhile; only fail if it still runs.
                if dom.is_active().unwrap_or(true) {
                    return Err(virt_err("cannot stop the domain", &host, e));
                }
            }
            let flags = virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM;
            match dom.undefine_flags(flags) {
                Ok(()) => Ok(Undone::Removed),
                Err(e) if is_no_domain(&e) => Ok(Undone::Removed),
                Err(e) => Err(virt_err("cannot undefine the domain", &host, e)),
            }
        })
        .await?;
        match outcome {
            Undone::Foreign { .. } => {}
            // Absent: a create that failed after writing the seed but before defining. The
            // name carries this run's request, so it is this run's seed or nothing.
            _ => self.drop_seed(&vm0, &host0, &owner0).await?,
        }
        Ok(outcome)
    }

    /// Detaches the seed disk from the running domain and its persistent definition
    /// (ACPI hot-unplug; the domain XML enables ACPI), waits until the guest let it go,
    /// then deletes the seed file.
    async fn discard_seed(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<()> {
        let Some(seed) = self.seed_path(vm, host, owner).await? else {
            return Ok(());
        };
        let xml = seed_disk_xml(&seed)?;
        let source = format!("file='{}'", quick_xml::escape::escape(path_str(&seed)?));
        let (vm2, host2, owner2) = (vm.clone(), host.clone(), owner.clone());
        let limit = Duration::from_secs(self.config.boot_timeout_secs.max(30));
        blocking(move || {
            let conn = connect(&host2)?;
            let Some(dom) = lookup(&conn, &host2, &vm2)? else {
                return Ok(());
            };
            if metadata_of(&dom).request_id.as_ref() != Some(&owner2) {
                return Err(foreign_domain(&vm2, &host2));
            }
            let live = |d: &VirtDomain| -> Result<bool> {
                Ok(d.xml_desc(0)
                    .map_err(|e| virt_err("cannot read the domain", &host2, e))?
                    .contains(&source))
            };
            let persistent = dom
                .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
                .map_err(|e| virt_err("cannot read the domain", &host2, e))?
                .contains(&source);
            let running = dom.is_active().unwrap_or(false) && live(&dom)?;
            let mut flags = 0;
            if running {
                flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
            }
            if persistent {
                flags |= virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
            }
            if flags == 0 {
                return Ok(());
            }
            dom.detach_device_flags(&xml, flags)
                .map_err(|e| virt_err("cannot detach the first-boot seed", &host2, e))?;
            // The guest acknowledges the unplug asynchronously.
            let deadline = std::time::Instant::now() + limit;
            while running && live(&dom)? {
                if std::time::Instant::now() >= deadline {
                    return Err(LibvirtError::SeedHeld(limit.as_secs()).into());
                }
                // Polled often: the run waits on this (the bootstrap runs beside it).
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
        .await?;
        self.drop_seed(vm, host, owner).await
    }

    /// Live migration without shared storage: `VIR_MIGRATE_LIVE | NON_SHARED_INC |
    /// PERSIST_DEST | UNDEFINE_SOURCE`, copying only `vda` (the overlay; its template is on
    /// the target already, and so is an empty overlay of the same path and size). The
    /// source reports bytes copied about every second; the target's completed job gives
    /// the downtime. The target's `migration_host` (qemu.conf) says where data is sent.
    async fn migrate(
        &self,
        vm: &VmName,
        from: &HostId,
        to: &HostId,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<MigrationReport> {
        let (vm, from, to, owner, p) = (
            vm.clone(),
            from.clone(),
            to.clone(),
            owner.clone(),
            progress.clone(),
        );
        blocking(move || {
            let src = connect(&from)?;
            let Some(dom) = lookup(&src, &from, &vm)? else {
                return Err(LibvirtError::NotHere {
                    vm: vm.clone(),
                    host: from.clone(),
                }
                .into());
            };
            if metadata_of(&dom).request_id.as_ref() != Some(&owner) {
                return Err(foreign_domain(&vm, &from));
            }
            let dst = connect(&to)?;
            if crate::work::abandoned() {
                return Err(crate::work::cancelled_before_commit("migrating the domain"));
            }
            let flags = virt::sys::VIR_MIGRATE_LIVE
                | virt::sys::VIR_MIGRATE_NON_SHARED_INC
                | virt::sys::VIR_MIGRATE_PERSIST_DEST
                | virt::sys::VIR_MIGRATE_UNDEFINE_SOURCE;
            let params = virt::domain::MigrateParameters {
                migrate_disks: vec!["vda".to_owned()],
                ..Default::default()
            };
            let start = Instant::now();
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let step = crate::work::current();
            // Progress while the copy runs, and the abort of a given-up move, from a
            // thread of its own that migrate3's return never waits for (an abort or a
            // statistics call can be held up by libvirt's job lock).
            let watcher = {
                let (done, dom, p, vm) = (done.clone(), dom.clone(), p.clone(), vm.clone());
                move || {
                    // Tries of the abort left (libvirt refuses one between a job's phases).
                    let mut aborts = 20;
                    while !done.load(std::sync::atomic::Ordering::SeqCst) {
                        if aborts > 0 && step.as_ref().is_some_and(|w| w.is_abandoned()) {
                            // The act was given up (timed out): abort the job, so the
                            // guest stays on the source and migrate3 returns.
                            if aborts == 20 {
                                p.message("the migration was given up: aborting its job");
                            }
                            aborts -= 1;
                            // SAFETY: `dom` is this thread's own reference to a live
                            // domain; aborting a job from another thread is what libvirt's
                            // API is for (`Domain` is Send + Sync).
                            let rc = unsafe { virt::sys::virDomainAbortJob(dom.as_ptr()) };
                            if rc == 0 {
                                aborts = 0;
                            } else if aborts == 0 {
                                tracing::warn!(%vm, "cannot abort the migration job");
                            }
                        }
                        if let [Some(done_b), Some(total)] = job_counters(
                            &dom,
                            0,
                            &[
                                virt::sys::VIR_DOMAIN_JOB_DATA_PROCESSED,
                                virt::sys::VIR_DOMAIN_JOB_DATA_TOTAL,
                            ],
                        )[..]
                            && total > 0
                            && !done.load(std::sync::atomic::Ordering::SeqCst)
                        {
                            p.fraction(
                                format!("migrating: {} of {} MiB", done_b >> 20, total >> 20),
                                done_b as f64 / total as f64,
                            );
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            };
            if let Err(e) = std::thread::Builder::new()
                .name("devvm-migrate-watch".into())
                .spawn(watcher)
            {
                tracing::warn!(%vm, error = %e, "no progress for this migration: cannot start its watcher");
            }
            let moved = dom.migrate3(&dst, params, flags);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            let moved = moved
            .map_err(|e| virt_err("cannot migrate the domain", &from, e))?;
            let stats = job_counters(
                &moved,
                virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED,
                &[
                    virt::sys::VIR_DOMAIN_JOB_DOWNTIME,
                    virt::sys::VIR_DOMAIN_JOB_DATA_TOTAL,
                ],
            );
            let report = MigrationReport {
                elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                downtime_ms: stats.first().copied().flatten(),
                bytes: stats.get(1).copied().flatten(),
            };
            p.message(format!(
                "{vm} runs on {to}: moved in {:.1}s, downtime {}",
                report.elapsed_ms as f64 / 1000.0,
                report
                    .downtime_ms
                    .map(|d| format!("{d} ms"))
                    .unwrap_or_else(|| "unknown".into())
            ));
            Ok(report)
        })
        .await
    }

    async fn domain(&self, vm: &VmName, host: &HostId) -> Result<Option<Domain>> {
        let (vm, host) = (vm.clone(), host.clone());
        blocking(move || {
            let conn = connect(&host)?;
            Ok(lookup(&conn, &host, &vm)?.map(|d| Domain {
                name: vm.clone(),
                host: host.clone(),
                uuid: d.uuid_string().ok(),
            }))
        })
        .await
    }
}

/// Registers this backend as `libvirt` in the `[hypervisor]` section.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    r.register_hypervisor("libvirt", |ctx| {
        let o: LibvirtConfig = ctx.options()?;
        Ok(std::sync::Arc::new(LibvirtHypervisor::from_config(
            &o,
            ctx.base_dir,
        )?))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{BootSpec, Disk, DiskFormat, Lease, Template, TemplateName, VmSize};

    fn spec() -> DomainSpec {
        let vm = VmName::new("web-1").unwrap();
        DomainSpec {
            name: vm.clone(),
            host: HostId::new("qemu:///system").unwrap(),
            size: VmSize {
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 2,
            },
            disk: Disk {
                vm: vm.clone(),
                path: "/pool/web-1 & <co>.qcow2".into(),
                format: DiskFormat::Qcow2,
                size_gib: 2,
            },
            template: Template {
                name: TemplateName::new("debian-12").unwrap(),
                path: "/cache/debian-12.qcow2".into(),
                digest: None,
                boot: BootSpec {
                    kernel: Some("/cache/vmlinuz".into()),
                    initrd: Some("/cache/initrd".into()),
                    cmdline: Some("root=/dev/vda rw console=ttyS0".into()),
                },
            },
            lease: Lease {
                vm,
                ip: [10, 99, 0, 7].into(),
                prefix_len: 24,
                gateway: Some([10, 99, 0, 1].into()),
            },
            fqdn: "web-1.lab.example".into(),
            owner: UserName::new("alice").unwrap(),
            request_id: RequestId::new("req-1").unwrap(),
            ssh_keys: vec!["ssh-ed25519 AAAA alice@laptop".into()],
            seed: None,
        }
    }

    fn settings() -> DomainSettings {
        DomainSettings {
            accel: Accel::Tcg,
            bridge: "devbr0".into(),
            console_log: "/consoles/web-1.log".into(),
            dns_servers: vec![[10, 99, 0, 1].into()],
            extra_keys: vec![],
            seed_image: Some("/seeds/web-1-cidata.img".into()),
        }
    }

    #[test]
    fn the_domain_xml_holds_the_spec_escaped() {
        let xml = domain_xml(&spec(), &settings()).unwrap();
        assert!(xml.starts_with("<domain type=\"qemu\">"), "{xml}");
        // The hostile characters in the disk path are escaped, not pasted.
        assert!(xml.contains("web-1 &amp; &lt;co&gt;.qcow2"), "{xml}");
        let mut r = quick_xml::Reader::from_str(&xml);
        let mut seen_source_file = None;
        loop {
            match r.read_event().unwrap() {
                Event::Empty(e) if e.name().as_ref() == b"source" => {
                    if seen_source_file.is_none()
                        && let Some(a) = e.try_get_attribute("file").unwrap()
                    {
                        seen_source_file =
                            Some(a.unescape_value().unwrap_or_default().into_owned());
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(
            seen_source_file.as_deref(),
            Some("/pool/web-1 & <co>.qcow2")
        );
        for needle in [
            "<name>web-1</name>",
            "<memory unit=\"MiB\">256</memory>",
            "<vcpu>1</vcpu>",
            "<kernel>/cache/vmlinuz</kernel>",
            "<source bridge=\"devbr0\"/>",
            "<devvm:owner>alice</devvm:owner>",
            "<devvm:request>req-1</devvm:request>",
            &format!("<mac address=\"{}\"/>", mac_for(&spec().name)),
            "<source path=\"/consoles/web-1.log\" append=\"on\"/>",
            "<source file=\"/seeds/web-1-cidata.img\"/>",
            "<target dev=\"vdb\" bus=\"virtio\"/>",
            // an entropy source, so the guest does not wait seconds to seed its RNG
            "<rng model=\"virtio\">",
            "<backend model=\"random\">/dev/urandom</backend>",
        ] {
            assert!(xml.contains(needle), "missing {needle} in\n{xml}");
        }
        assert_eq!(
            parse_metadata(&xml)
                .request_id
                .map(|r| r.to_string())
                .as_deref(),
            Some("req-1")
        );
    }

    #[test]
    fn the_cmdline_carries_network_and_keys() {
        let c = kernel_cmdline(&spec(), &settings()).unwrap();
        assert!(c.starts_with("root=/dev/vda rw console=ttyS0 devvm.ip=10.99.0.7/24 devvm.gw=10.99.0.1 devvm.hostname=web-1 devvm.dns=10.99.0.1 devvm.authorized_key="));
        let key_b64 = c.rsplit("devvm.authorized_key=").next().unwrap_or_default();
        let key = base64::engine::general_purpose::STANDARD
            .decode(key_b64)
            .unwrap();
        assert_eq!(key, b"ssh-ed25519 AAAA alice@laptop");
        let mut many = spec();
        many.ssh_keys = vec!["ssh-ed25519 ".to_owned() + &"A".repeat(300); 10];
        let e = kernel_cmdline(&many, &settings()).expect_err("too long");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(
            matches!(e.detail(), Some(LibvirtError::CmdlineTooLong { len, .. }) if *len > MAX_CMDLINE),
            "{e}"
        );
    }

    #[test]
    fn macs_are_stable_and_local() {
        let a = mac_for(&VmName::new("a").unwrap());
        assert_eq!(a, mac_for(&VmName::new("a").unwrap()));
        assert!(a.starts_with("52:54:00:"));
        assert_ne!(a, mac_for(&VmName::new("b").unwrap()));
    }
}
