//! Domain types: what a caller asks for, what each step hands to the next, and the VM
//! that comes out. Names are validated once, at construction; a value of these types is
//! always valid, so the backends never see a name that is not a DNS label or a template
//! name that could climb out of a directory.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use crate::error::{Error, Result};

pub use crate::step::Step;

impl FromStr for Step {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Step::ALL
            .into_iter()
            .find(|step| step.as_str() == s)
            .ok_or_else(|| Error::invalid_input(format!("unknown step {s:?}")))
    }
}

macro_rules! validated_string {
    ($(#[$meta:meta])* $name:ident, $check:path) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`; an invalid value is an [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) error.
            pub fn new(value: impl AsRef<str>) -> Result<Self> {
                $check(value.as_ref()).map($name)
            }

            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Describes a string for an error message without echoing control characters.
fn shown(value: &str) -> String {
    let mut s: String = value.chars().take(40).collect();
    if value.chars().count() > 40 {
        s.push('…');
    }
    format!("{s:?}")
}

fn check_vm_name(value: &str) -> Result<String> {
    let bad = |why: &str| {
        Err(Error::invalid_input(format!(
            "vm name {}: {why}",
            shown(value)
        )))
    };
    if value.is_empty() {
        return bad("is empty");
    }
    if value.len() > 63 {
        return bad("is longer than 63 characters (a DNS label)");
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return bad(&format!(
            "holds {c:?}; a DNS label has only letters, digits and '-'"
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return bad("starts or ends with '-'");
    }
    Ok(value.to_ascii_lowercase())
}

fn check_user_name(value: &str) -> Result<String> {
    let bad = |why: &str| {
        Err(Error::invalid_input(format!(
            "user name {}: {why}",
            shown(value)
        )))
    };
    if value.is_empty() {
        return bad("is empty");
    }
    if value.len() > 64 {
        return bad("is longer than 64 characters");
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "holds {c:?}; allowed are ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        return bad("must start with a letter, a digit or '_'");
    }
    Ok(value.to_owned())
}

fn check_template_name(value: &str) -> Result<String> {
    let bad = |why: &str| {
        Err(Error::invalid_input(format!(
            "template name {}: {why}",
            shown(value)
        )))
    };
    if value.is_empty() {
        return bad("is empty");
    }
    if value.len() > 128 {
        return bad("is longer than 128 characters");
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "holds {c:?}; allowed are ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    if value.starts_with('.') {
        return bad("starts with '.'");
    }
    Ok(value.to_owned())
}

fn check_request_id(value: &str) -> Result<String> {
    let bad = |why: &str| {
        Err(Error::invalid_input(format!(
            "request id {}: {why}",
            shown(value)
        )))
    };
    if value.is_empty() {
        return bad("is empty");
    }
    if value.len() > 128 {
        return bad("is longer than 128 characters");
    }
    if value
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return bad("allowed are ASCII letters, digits, '.', '_', '-' and ':'");
    }
    Ok(value.to_owned())
}

fn check_host_id(value: &str) -> Result<String> {
    if value.is_empty() || value.len() > 1024 || value.chars().any(char::is_control) {
        return Err(Error::invalid_input(format!(
            "host id {}: must be 1 to 1024 printable characters",
            shown(value)
        )));
    }
    Ok(value.to_owned())
}

validated_string!(
    /// A VM name: a single DNS label (1–63 ASCII letters, digits and `-`, not at either
    /// end), stored in lower case. The VM's fqdn is this label in the DNS backend's zone.
    VmName,
    check_vm_name
);

validated_string!(
    /// A user name as looked up in the directory: 1–64 ASCII letters, digits, `.`, `_`,
    /// `-`, starting with a letter, digit or `_`. LDAP filter metacharacters can never
    /// appear in it (the LDAP backend escapes the value anyway).
    UserName,
    check_user_name
);

validated_string!(
    /// A template name: 1–128 ASCII letters, digits, `.`, `_`, `-`, not starting with `.`.
    /// It holds no path separator, so it can never name anything outside an image directory.
    TemplateName,
    check_template_name
);

validated_string!(
    /// The idempotency key of a provision: provisioning twice with one id yields one VM.
    /// 1–128 ASCII letters, digits, `.`, `_`, `-`, `:`. [`RequestId::random`] makes a UUID.
    RequestId,
    check_request_id
);

validated_string!(
    /// Identifies a hypervisor host (for libvirt, its connection URI).
    HostId,
    check_host_id
);

impl RequestId {
    /// A fresh random id (a UUID v4).
    pub fn random() -> Self {
        RequestId(uuid::Uuid::new_v4().to_string())
    }
}

impl VmName {
    /// The default name for a VM of `user` when the request names none: the user name
    /// made into a label, plus a suffix derived from the request id, so that retrying
    /// the same request gives the same name.
    pub fn derived(user: &UserName, request: &RequestId) -> VmName {
        let mut base: String = user
            .as_str()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        base.truncate(48);
        let base = base.trim_matches('-');
        let base = if base.is_empty() { "vm" } else { base };
        // FNV-1a over the request id: stable across releases and platforms.
        let mut hash: u32 = 0x811c_9dc5;
        for b in request.as_str().bytes() {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        VmName(format!("{base}-{:06x}", hash & 0xff_ffff))
    }
}

/// The size of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk size in GiB.
    pub disk_gib: u64,
}

impl Default for VmSize {
    /// The seed's standard VM: 2 vCPUs, 5 GB of memory, 40 GB of disk.
    fn default() -> Self {
        VmSize {
            vcpus: 2,
            memory_mib: 5 * 1024,
            disk_gib: 40,
        }
    }
}

impl VmSize {
    /// Checks that every dimension is positive and within sane bounds.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > 256 {
            return Err(Error::invalid_input(format!(
                "vcpus {} is not within 1..=256",
                self.vcpus
            )));
        }
        if self.memory_mib < 64 || self.memory_mib > 4 * 1024 * 1024 {
            return Err(Error::invalid_input(format!(
                "memory {} MiB is not within 64 MiB..=4 TiB",
                self.memory_mib
            )));
        }
        if self.disk_gib == 0 || self.disk_gib > 64 * 1024 {
            return Err(Error::invalid_input(format!(
                "disk {} GiB is not within 1 GiB..=64 TiB",
                self.disk_gib
            )));
        }
        Ok(())
    }
}

/// What the bootstrap step should converge the VM to. Which fields matter depends on the
/// bootstrapper (Chef uses all three; a shell step may use none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapSettings {
    /// Chef run list (for example `["role[web]", "recipe[php]"]`).
    #[serde(default)]
    pub run_list: Vec<String>,
    /// Chef environment or equivalent.
    #[serde(default)]
    pub environment: Option<String>,
    /// Extra first-boot attributes, a JSON object.
    #[serde(default)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// The size a request asks for: any field left `None` comes from the config's
/// `[defaults]` (not from built-in values), so `vcpus = 4` alone keeps the configured
/// memory and disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeRequest {
    /// vCPUs.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Disk in GiB.
    #[serde(default)]
    pub disk_gib: Option<u64>,
}

impl SizeRequest {
    /// This request's size, with every unset field taken from `defaults`.
    pub fn or(self, defaults: VmSize) -> VmSize {
        VmSize {
            vcpus: self.vcpus.unwrap_or(defaults.vcpus),
            memory_mib: self.memory_mib.unwrap_or(defaults.memory_mib),
            disk_gib: self.disk_gib.unwrap_or(defaults.disk_gib),
        }
    }
}

/// A request to provision one VM.
///
/// Build it with [`ProvisionRequest::new`] and the `with_*` methods; the provisioner
/// fills unset fields (template, size) from its config defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisionRequest {
    /// Idempotency key. Provisioning the same id twice returns the same VM.
    pub request_id: RequestId,
    /// The owner, checked in the user directory.
    pub user: UserName,
    /// The VM name; derived from the user and request id when absent.
    pub name: Option<VmName>,
    /// The template; the config's default when absent.
    pub template: Option<TemplateName>,
    /// vCPUs, memory, disk: each one unset comes from the config's `[defaults]`.
    #[serde(default)]
    pub size: SizeRequest,
    /// Bootstrap settings; the config's defaults when absent.
    pub bootstrap: Option<BootstrapSettings>,
}

impl ProvisionRequest {
    /// A request for a VM owned by `user`, with a fresh random request id.
    pub fn new(user: UserName) -> Self {
        ProvisionRequest {
            request_id: RequestId::random(),
            user,
            name: None,
            template: None,
            size: SizeRequest::default(),
            bootstrap: None,
        }
    }

    /// Sets the request id (the idempotency key).
    pub fn with_request_id(mut self, id: RequestId) -> Self {
        self.request_id = id;
        self
    }
    /// Sets the VM name.
    pub fn with_name(mut self, name: VmName) -> Self {
        self.name = Some(name);
        self
    }
    /// Sets the template.
    pub fn with_template(mut self, template: TemplateName) -> Self {
        self.template = Some(template);
        self
    }
    /// Sets the whole size.
    pub fn with_size(mut self, size: VmSize) -> Self {
        self.size = SizeRequest {
            vcpus: Some(size.vcpus),
            memory_mib: Some(size.memory_mib),
            disk_gib: Some(size.disk_gib),
        };
        self
    }
    /// Sets the vCPUs; memory and disk stay the config's unless set too.
    pub fn with_vcpus(mut self, vcpus: u32) -> Self {
        self.size.vcpus = Some(vcpus);
        self
    }
    /// Sets the memory in MiB; the rest stays the config's unless set too.
    pub fn with_memory_mib(mut self, memory_mib: u64) -> Self {
        self.size.memory_mib = Some(memory_mib);
        self
    }
    /// Sets the disk size in GiB; the rest stays the config's unless set too.
    pub fn with_disk_gib(mut self, disk_gib: u64) -> Self {
        self.size.disk_gib = Some(disk_gib);
        self
    }
    /// Sets the bootstrap settings.
    pub fn with_bootstrap(mut self, settings: BootstrapSettings) -> Self {
        self.bootstrap = Some(settings);
        self
    }
}

/// A request with every default filled in: what the pipeline actually runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedRequest {
    /// Idempotency key.
    pub request_id: RequestId,
    /// Owner.
    pub user: UserName,
    /// VM name.
    pub name: VmName,
    /// Template.
    pub template: TemplateName,
    /// Size.
    pub size: VmSize,
    /// Bootstrap settings.
    pub bootstrap: BootstrapSettings,
}

/// A user as found in the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user name looked up.
    pub name: UserName,
    /// Display name, if the directory has one.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Mail address, if the directory has one.
    #[serde(default)]
    pub mail: Option<String>,
    /// SSH public keys (`authorized_keys` lines) to install in the user's VMs.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
}

/// An IP lease, bound to a VM name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The VM holding the lease.
    pub vm: VmName,
    /// The leased address.
    pub ip: IpAddr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The subnet's gateway, if any.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
}

/// The DNS records published for a VM: `fqdn A ip` and the matching PTR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    /// The VM's fully qualified name, without the trailing dot.
    pub fqdn: String,
    /// The address it resolves to.
    pub ip: IpAddr,
}

/// How a template boots.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BootSpec {
    /// Kernel image for direct kernel boot; `None` boots from the disk.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initrd for direct kernel boot.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct kernel boot.
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// A template available in the local cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Its name.
    pub name: TemplateName,
    /// Where the image file is.
    pub path: PathBuf,
    /// The image's content digest (`algorithm:hex`), when known.
    #[serde(default)]
    pub digest: Option<String>,
    /// How it boots.
    #[serde(default)]
    pub boot: BootSpec,
}

/// The on-disk format of a VM disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    /// A qcow2 file, usually an overlay on the template.
    Qcow2,
    /// A raw file.
    Raw,
}

/// A VM's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The VM it belongs to.
    pub vm: VmName,
    /// Where the file is.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Its virtual size in GiB.
    pub size_gib: u64,
}

/// Everything the hypervisor needs to define and start a VM.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// Domain name (the VM name).
    pub name: VmName,
    /// Host to run on.
    pub host: HostId,
    /// Size.
    pub size: VmSize,
    /// The VM's disk.
    pub disk: Disk,
    /// The template the disk came from (its boot spec matters).
    pub template: Template,
    /// The VM's address.
    pub lease: Lease,
    /// The VM's fqdn.
    pub fqdn: String,
    /// Owner, stored in the domain's metadata.
    pub owner: UserName,
    /// Request id, stored in the domain's metadata.
    pub request_id: RequestId,
    /// SSH public keys to authorize in the guest.
    pub ssh_keys: Vec<String>,
    /// The first-boot seed (NoCloud `cidata`), when the bootstrap step needs one. A
    /// hypervisor attaches it as a disk and removes it with the domain.
    pub seed: Option<crate::seed::GuestSeed>,
}

impl DomainSpec {
    /// The first-boot seed's NoCloud files for this VM's address, with `nameservers` for
    /// the guest's resolver; none when the VM has no seed.
    pub fn nocloud_files(&self, nameservers: &[IpAddr]) -> Option<crate::seed::NoCloudFiles> {
        let seed = self.seed.as_ref()?;
        let l = &self.lease;
        Some(crate::seed::NoCloudFiles {
            meta_data: seed.meta_data(),
            user_data: seed.user_data(),
            network_config: crate::seed::network_config(l.ip, l.prefix_len, l.gateway, nameservers),
        })
    }
}

/// A defined and running domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    /// Its name.
    pub name: VmName,
    /// The host it runs on.
    pub host: HostId,
    /// The hypervisor's id for it (libvirt's UUID), when it has one.
    #[serde(default)]
    pub uuid: Option<String>,
}

/// What an undo found and did. Every undo method of the step traits returns one.
///
/// An undo acts only on a resource it can prove belongs to the run it is given (domain
/// metadata, a disk's owner record, an owner column, a record that points at this VM's
/// address). Anything else of the same name is left alone and reported as
/// [`Undone::Foreign`], which is not an error: the pipeline emits an event for it and
/// carries on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Undone {
    /// The run's resource existed and is gone now.
    Removed,
    /// Nothing of that name was held: there was nothing to do.
    Absent,
    /// A resource of that name exists but belongs to someone else; it was left alone.
    Foreign {
        /// Who holds it, as far as the backend can tell (a request id, "unknown", "no
        /// devvm metadata").
        holder: String,
    },
}

impl Undone {
    /// A foreign resource held by `holder`.
    pub fn foreign(holder: impl Into<String>) -> Self {
        Undone::Foreign {
            holder: holder.into(),
        }
    }
}

/// Everything the bootstrapper needs to reach and configure the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapTarget {
    /// VM name (also the node name).
    pub vm: VmName,
    /// The run that made the VM: what the bootstrapper records with whatever it
    /// registers outside the guest, so that [`Bootstrapper::unregister`] can tell its own
    /// registration from another's.
    ///
    /// [`Bootstrapper::unregister`]: crate::Bootstrapper::unregister
    pub request_id: RequestId,
    /// Its fqdn.
    pub fqdn: String,
    /// Its address.
    pub ip: IpAddr,
    /// Its owner.
    pub owner: User,
    /// What to converge to.
    pub settings: BootstrapSettings,
    /// The guest's SSH host key (an OpenSSH public key line), when the provisioner
    /// generated it; an SSH bootstrapper must accept no other.
    #[serde(default)]
    pub host_key: Option<String>,
}

/// What one placement host has and gives out, as the placement backend sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUsage {
    /// The host.
    pub host: HostId,
    /// Whether it answered (an unreachable host is skipped by placement).
    pub reachable: bool,
    /// What it can give out in total.
    pub capacity: VmSize,
    /// What its VMs (and reservations not yet a VM) use.
    pub used: VmSize,
    /// The VMs placed on it.
    pub vms: Vec<VmName>,
    /// The template files it holds verified copies of (`<template>-<glance id>.<kind>`),
    /// when the placement backend can see them; empty otherwise.
    #[serde(default)]
    pub templates: Vec<String>,
}

impl HostUsage {
    /// Whether a VM of `size` fits in what is left.
    pub fn fits(&self, size: &VmSize) -> bool {
        self.used.vcpus + size.vcpus <= self.capacity.vcpus
            && self.used.memory_mib + size.memory_mib <= self.capacity.memory_mib
            && self.used.disk_gib + size.disk_gib <= self.capacity.disk_gib
    }

    /// How many more VMs of `size` fit in what is left (the host's free slots of that
    /// size); a size of all zeros fits `u64::MAX` times.
    pub fn free_slots(&self, size: &VmSize) -> u64 {
        let left = |cap: u64, used: u64, each: u64| {
            cap.saturating_sub(used)
                .checked_div(each)
                .unwrap_or(u64::MAX)
        };
        left(
            u64::from(self.capacity.vcpus),
            u64::from(self.used.vcpus),
            u64::from(size.vcpus),
        )
        .min(left(
            self.capacity.memory_mib,
            self.used.memory_mib,
            size.memory_mib,
        ))
        .min(left(
            self.capacity.disk_gib,
            self.used.disk_gib,
            size.disk_gib,
        ))
    }
}

/// One planned live migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The VM to move.
    pub vm: VmName,
    /// Where it runs.
    pub from: HostId,
    /// Where it goes.
    pub to: HostId,
}

/// What a live migration measured.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    /// How long the move took, in milliseconds.
    pub elapsed_ms: u64,
    /// How long the guest was paused at the switch-over, in milliseconds, when known.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Bytes sent (memory and disk), when known.
    #[serde(default)]
    pub bytes: Option<u64>,
}

/// What a bootstrap did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BootstrapReport {
    /// Whether anything was run (false for a bootstrapper that does nothing).
    pub bootstrapped: bool,
    /// A one-line summary.
    #[serde(default)]
    pub summary: String,
}

/// A provisioned VM, as recorded in the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    /// VM name.
    pub name: VmName,
    /// Fully qualified name, published in DNS.
    pub fqdn: String,
    /// Address.
    pub ip: IpAddr,
    /// Host it runs on.
    pub host: HostId,
    /// Its disk file.
    pub disk: PathBuf,
    /// Owner.
    pub owner: UserName,
    /// Template it was made from.
    pub template: TemplateName,
    /// When provisioning finished.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// The request that made it.
    pub request_id: RequestId,
    /// Whether configuration management ran on it.
    pub bootstrapped: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_follow_dns_label_rules() {
        assert_eq!(
            VmName::new("Web-01").map(|n| n.to_string()).ok(),
            Some("web-01".into())
        );
        let long = "a".repeat(63);
        assert!(VmName::new(&long).is_ok());
        for bad in [
            "", "-a", "a-", "a.b", "a_b", "a b", "a*", "a(", "a)", "a\\", "a\0", "é", "<x>", "a/b",
            "..",
        ] {
            let e = VmName::new(bad).expect_err(bad);
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(VmName::new("a".repeat(64)).is_err());
    }

    #[test]
    fn user_and_template_names_reject_metacharacters() {
        for bad in ["", "*", "a*", "(uid=*)", "a\\", "a\0b", "ü", "a/b", "-x"] {
            assert!(UserName::new(bad).is_err(), "{bad:?}");
        }
        assert!(UserName::new("jdoe.ext_2").is_ok());
        for bad in ["", "../etc", "a/b", ".hidden", "a\\b", "x\0"] {
            assert!(TemplateName::new(bad).is_err(), "{bad:?}");
        }
        assert!(TemplateName::new("debian-12.qcow2").is_ok());
    }

    #[test]
    fn derived_names_are_labels_and_stable() {
        let user = UserName::new("j.doe_X").expect("valid");
        let id = RequestId::new("req-1").expect("valid");
        let a = VmName::derived(&user, &id);
        assert_eq!(a, VmName::derived(&user, &id));
        assert!(VmName::new(a.as_str()).is_ok());
        assert!(a.as_str().starts_with("j-doe-x-"));
        let other = VmName::derived(&user, &RequestId::new("req-2").expect("valid"));
        assert_ne!(a, other);
    }

    #[test]
    fn invalid_names_fail_deserialization() {
        let r: std::result::Result<VmName, _> = serde_json::from_str("\"bad name\"");
        assert!(r.is_err());
    }
}
