//! The TOML config: one file selects and configures the backend of each step.
//!
//! ```toml
//! state_dir = "/var/lib/devvm"          # the journal; relative paths are relative to this file
//!
//! [defaults]
//! template = "debian-12"
//! vcpus = 2
//! memory_mib = 5120
//! disk_gib = 40
//! run_list = ["role[dev]"]
//!
//! [timeouts]                             # seconds, per step
//! bootstrap = 900
//!
//! [users]
//! backend = "memory"                     # one section per step, each with `backend`
//! accounts = [{ name = "alice", ssh_keys = ["ssh-ed25519 AAAA..."] }]
//!
//! [dns]
//! backend = "custom"                     # supplied by the program through the builder
//! ```
//!
//! Every section and key is checked: an unknown key is an error that names it. A secret
//! (a password, a key) is never written inline where it can be avoided: any secret field
//! takes `{ file = "path" }` or `{ env = "VARIABLE" }` as well as a plain string, and its
//! value never appears in `Debug` output, logs or errors.
//!
//! The `memory` backends are the in-memory reference implementations, for tests only;
//! every step must name its backend, so nothing defaults to them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::backends::NoopBootstrapper;
use crate::error::{Error, Result};
use crate::memory::{
    HostCapacity, MemoryBootstrapper, MemoryDns, MemoryHypervisor, MemoryImages, MemoryIpAllocator,
    MemoryPlacement, MemoryUsers,
};
use crate::provisioner::{Defaults, ProvisionerBuilder, Timeouts};
use crate::types::{BootstrapSettings, Step, TemplateName, User, UserName, VmSize};

/// A parsed config file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (relative paths inside are relative to its directory).
    pub path: PathBuf,
    /// Where the journal lives.
    pub state_dir: PathBuf,
    /// Defaults for unset request fields.
    pub defaults: Defaults,
    /// Step time limits.
    pub timeouts: Timeouts,
    sections: BTreeMap<Step, BackendSection>,
}

/// The section of one step: its backend name and the rest of its keys.
///
/// Its `Debug` shows the keys but no values: a value may be an inline secret.
#[derive(Clone)]
pub struct BackendSection {
    /// The `backend` key.
    pub backend: String,
    /// Every other key.
    pub options: toml::Table,
}

impl fmt::Debug for BackendSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendSection")
            .field("backend", &self.backend)
            .field("keys", &self.options.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    timeouts: RawTimeouts,
    users: toml::Table,
    placement: toml::Table,
    ip: toml::Table,
    dns: toml::Table,
    images: toml::Table,
    hypervisor: toml::Table,
    bootstrap: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    template: Option<TemplateName>,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    disk_gib: Option<u64>,
    #[serde(default)]
    run_list: Vec<String>,
    environment: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    user: Option<u64>,
    placement: Option<u64>,
    ip: Option<u64>,
    dns: Option<u64>,
    image: Option<u64>,
    disk: Option<u64>,
    domain: Option<u64>,
    bootstrap: Option<u64>,
}

fn config_err(path: &Path, message: impl fmt::Display) -> Error {
    Error::invalid_input(format!("config {}: {message}", path.display()))
}

/// Makes a toml error one line: its message, and its line when it has one.
fn toml_message(e: &toml::de::Error, source: Option<&str>) -> String {
    let msg = e.message().trim().to_owned();
    match (e.span(), source) {
        (Some(span), Some(text)) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        _ => msg,
    }
}

impl Config {
    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                crate::ErrorKind::NotFound
            } else {
                crate::ErrorKind::InvalidInput
            };
            Error::new(kind, format!("cannot read config {}", path.display())).with_source(e)
        })?;
        Self::parse(&text, path)
    }

    /// Parses config `text`, as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| config_err(path, toml_message(&e, Some(text))))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let d = raw.defaults;
        let std_size = VmSize::default();
        let size = VmSize {
            vcpus: d.vcpus.unwrap_or(std_size.vcpus),
            memory_mib: d.memory_mib.unwrap_or(std_size.memory_mib),
            disk_gib: d.disk_gib.unwrap_or(std_size.disk_gib),
        };
        size.validate()
            .map_err(|e| config_err(path, format_args!("[defaults] {}", e.message())))?;
        let defaults = Defaults {
            template: d.template,
            size,
            bootstrap: BootstrapSettings {
                run_list: d.run_list,
                environment: d.environment,
                attributes: Default::default(),
            },
        };
        let mut timeouts = Timeouts::default();
        let t = raw.timeouts;
        for (step, secs) in [
            (Step::User, t.user),
            (Step::Placement, t.placement),
            (Step::Ip, t.ip),
            (Step::Dns, t.dns),
            (Step::Image, t.image),
            (Step::Disk, t.disk),
            (Step::Domain, t.domain),
            (Step::Bootstrap, t.bootstrap),
        ] {
            if let Some(secs) = secs {
                if secs == 0 {
                    return Err(config_err(
                        path,
                        format_args!("[timeouts] {step} must be at least 1 second"),
                    ));
                }
                timeouts.set(step, Duration::from_secs(secs));
            }
        }
        let mut sections = BTreeMap::new();
        for (step, mut table) in [
            (Step::User, raw.users),
            (Step::Placement, raw.placement),
            (Step::Ip, raw.ip),
            (Step::Dns, raw.dns),
            (Step::Image, raw.images),
            (Step::Domain, raw.hypervisor),
            (Step::Bootstrap, raw.bootstrap),
        ] {
            let section = section_name(step);
            let backend = match table.remove("backend") {
                Some(toml::Value::String(s)) => s,
                Some(_) => {
                    return Err(config_err(
                        path,
                        format_args!("[{section}] backend must be a string"),
                    ));
                }
                None => {
                    return Err(config_err(
                        path,
                        format_args!("[{section}] has no `backend` key"),
                    ));
                }
            };
            sections.insert(
                step,
                BackendSection {
                    backend,
                    options: table,
                },
            );
        }
        Ok(Config {
            path: path.to_path_buf(),
            state_dir: base.join(raw.state_dir),
            defaults,
            timeouts,
            sections,
        })
    }

    /// The section configuring `step` (steps `image` and `disk` share `[images]`).
    pub fn section(&self, step: Step) -> Option<&BackendSection> {
        let step = if step == Step::Disk {
            Step::Image
        } else {
            step
        };
        self.sections.get(&step)
    }

    fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Resolves a path from the config relative to the config file's directory.
    pub fn resolve_path(&self, p: impl AsRef<Path>) -> PathBuf {
        self.base_dir().join(p)
    }

    /// Decodes the options of `step` into `T`; unknown keys are errors naming the key.
    pub fn options<T: DeserializeOwned>(&self, step: Step) -> Result<T> {
        let section = self
            .section(step)
            .ok_or_else(|| config_err(&self.path, format_args!("no section for {step}")))?;
        toml::Value::Table(section.options.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                config_err(
                    &self.path,
                    format_args!(
                        "[{}] (backend {:?}): {}",
                        section_name(step),
                        section.backend,
                        toml_message(&e, None)
                    ),
                )
            })
    }

    /// A builder with every built-in backend the config names already set.
    ///
    /// A step whose backend is `"custom"` is left unset: the program supplies it through
    /// the builder (its options are in [`Config::section`]). Any other unknown backend
    /// name is an error.
    pub fn builder(&self) -> Result<ProvisionerBuilder> {
        let mut b = ProvisionerBuilder::new()
            .state_dir(&self.state_dir)
            .defaults(self.defaults.clone())
            .timeouts(self.timeouts.clone());
        for step in [
            Step::User,
            Step::Placement,
            Step::Ip,
            Step::Dns,
            Step::Image,
            Step::Domain,
            Step::Bootstrap,
        ] {
            let section = self
                .section(step)
                .ok_or_else(|| config_err(&self.path, format_args!("no section for {step}")))?;
            let name = section.backend.as_str();
            if name == "custom" {
                continue;
            }
            let unknown = || {
                config_err(
                    &self.path,
                    format_args!(
                        "[{}] unknown backend {name:?}; known: {}",
                        section_name(step),
                        known_backends(step).join(", ")
                    ),
                )
            };
            b = match (step, name) {
                (Step::User, "memory") => {
                    let o: MemoryUsersConfig = self.options(step)?;
                    let mut users = MemoryUsers::new();
                    for a in o.accounts {
                        users = users.with_user(
                            User {
                                name: a.name,
                                display_name: a.display_name,
                                mail: a.mail,
                                ssh_keys: a.ssh_keys,
                            },
                            a.may_own_vms,
                        );
                    }
                    b.users(Arc::new(users))
                }
                #[cfg(feature = "ldap")]
                (Step::User, "ldap") => {
                    let o: crate::backends::ldap::LdapConfig = self.options(step)?;
                    b.users(Arc::new(crate::backends::ldap::LdapDirectory::from_config(
                        &o,
                        self.base_dir(),
                    )?))
                }
                (Step::Placement, "memory") => {
                    let o: MemoryPlacementConfig = self.options(step)?;
                    let p = match o.state_file {
                        Some(f) => MemoryPlacement::with_state_file(o.hosts, self.resolve_path(f)),
                        None => MemoryPlacement::new(o.hosts),
                    };
                    b.placement(Arc::new(p))
                }
                (Step::Ip, "memory") => {
                    let o: MemoryIpConfig = self.options(step)?;
                    let mut ip = MemoryIpAllocator::new(o.subnet, o.gateway);
                    for r in &o.reserved {
                        let (a, z) = parse_range(r).map_err(|m| {
                            config_err(&self.path, format_args!("[ip] reserved {r:?}: {m}"))
                        })?;
                        ip = ip.with_reserved(a, z);
                    }
                    if let Some(f) = o.state_file {
                        ip = ip.with_state_file(self.resolve_path(f));
                    }
                    b.ip(Arc::new(ip))
                }
                #[cfg(feature = "sqlite")]
                (Step::Ip, "sqlite") => {
                    let o: crate::backends::sqlite_ip::SqliteIpConfig = self.options(step)?;
                    b.ip(Arc::new(
                        crate::backends::sqlite_ip::SqliteIpAllocator::from_config(
                            &o,
                            self.base_dir(),
                            &self.state_dir,
                        )?,
                    ))
                }
                #[cfg(feature = "rfc2136")]
                (Step::Dns, "rfc2136") => {
                    let o: crate::backends::rfc2136::Rfc2136Config = self.options(step)?;
                    b.dns(Arc::new(crate::backends::rfc2136::Rfc2136Dns::from_config(
                        &o,
                        self.base_dir(),
                    )?))
                }
                #[cfg(feature = "libvirt")]
                (Step::Placement, "libvirt") => {
                    let o: crate::backends::placement::PlacementConfig = self.options(step)?;
                    b.placement(Arc::new(
                        crate::backends::placement::LibvirtPlacement::from_config(
                            &o,
                            self.base_dir(),
                            &self.state_dir,
                        )?,
                    ))
                }
                (Step::Dns, "memory") => {
                    let o: MemoryDnsConfig = self.options(step)?;
                    let mut dns = MemoryDns::new(o.zone);
                    if let Some(f) = o.state_file {
                        dns = dns.with_state_file(self.resolve_path(f));
                    }
                    b.dns(Arc::new(dns))
                }
                (Step::Image, "memory") => {
                    let o: MemoryImagesConfig = self.options(step)?;
                    let mut images = MemoryImages::new(o.templates);
                    if let Some(f) = o.state_file {
                        images = images.with_state_file(self.resolve_path(f));
                    }
                    b.images(Arc::new(images))
                }
                #[cfg(feature = "glance")]
                (Step::Image, "glance") => {
                    let o: crate::backends::glance::GlanceConfig = self.options(step)?;
                    b.images(Arc::new(
                        crate::backends::glance::GlanceImageStore::from_config(
                            &o,
                            self.base_dir(),
                        )?,
                    ))
                }
                (Step::Domain, "memory") => {
                    let o: StateFileOnly = self.options(step)?;
                    let mut hv = MemoryHypervisor::new();
                    if let Some(f) = o.state_file {
                        hv = hv.with_state_file(self.resolve_path(f));
                    }
                    b.hypervisor(Arc::new(hv))
                }
                #[cfg(feature = "libvirt")]
                (Step::Domain, "libvirt") => {
                    let o: crate::backends::libvirt::LibvirtConfig = self.options(step)?;
                    b.hypervisor(Arc::new(
                        crate::backends::libvirt::LibvirtHypervisor::from_config(
                            &o,
                            self.base_dir(),
                        )?,
                    ))
                }
                (Step::Bootstrap, "memory") => {
                    let o: StateFileOnly = self.options(step)?;
                    let mut bs = MemoryBootstrapper::new();
                    if let Some(f) = o.state_file {
                        bs = bs.with_state_file(self.resolve_path(f));
                    }
                    b.bootstrap(Arc::new(bs))
                }
                #[cfg(feature = "cloud-init")]
                (Step::Bootstrap, "cloud-init") => {
                    let o: crate::backends::cloudinit::CloudInitConfig = self.options(step)?;
                    b.bootstrap(Arc::new(
                        crate::backends::cloudinit::CloudInitBootstrapper::from_config(
                            &o,
                            self.base_dir(),
                        )?,
                    ))
                }
                #[cfg(feature = "ssh")]
                (Step::Bootstrap, "chef") => {
                    let o: crate::backends::bootstrap::ChefConfig = self.options(step)?;
                    b.bootstrap(Arc::new(
                        crate::backends::bootstrap::ChefBootstrapper::from_config(
                            &o,
                            self.base_dir(),
                        )?,
                    ))
                }
                #[cfg(feature = "ssh")]
                (Step::Bootstrap, "shell") => {
                    let o: crate::backends::bootstrap::ShellConfig = self.options(step)?;
                    b.bootstrap(Arc::new(
                        crate::backends::bootstrap::ShellBootstrapper::from_config(
                            &o,
                            self.base_dir(),
                        )?,
                    ))
                }
                (Step::Bootstrap, "none") => {
                    let _: Empty = self.options(step)?;
                    b.bootstrap(Arc::new(NoopBootstrapper))
                }
                (_, other) => {
                    return Err(match feature_of(step, other) {
                        Some(feature) => config_err(
                            &self.path,
                            format_args!(
                                "[{}] backend {other:?} is not built into this devvm: it needs devvm-core's `{feature}` feature",
                                section_name(step)
                            ),
                        ),
                        None => unknown(),
                    });
                }
            };
            if name == "memory" {
                tracing::warn!(step = %step, "using the in-memory reference backend (for tests only)");
            }
        }
        Ok(b)
    }
}

/// The config section that configures `step`.
pub fn section_name(step: Step) -> &'static str {
    match step {
        Step::User => "users",
        Step::Placement => "placement",
        Step::Ip => "ip",
        Step::Dns => "dns",
        Step::Image | Step::Disk => "images",
        Step::Domain => "hypervisor",
        Step::Bootstrap => "bootstrap",
    }
}

fn known_backends(step: Step) -> Vec<&'static str> {
    match step {
        Step::Bootstrap => vec!["chef", "shell", "cloud-init", "none", "memory", "custom"],
        Step::Ip => vec!["sqlite", "memory", "custom"],
        Step::User => vec!["ldap", "memory", "custom"],
        Step::Domain => vec!["libvirt", "memory", "custom"],
        Step::Placement => vec!["libvirt", "memory", "custom"],
        Step::Dns => vec!["rfc2136", "memory", "custom"],
        Step::Image | Step::Disk => vec!["glance", "memory", "custom"],
    }
}

fn parse_range(s: &str) -> std::result::Result<(Ipv4Addr, Ipv4Addr), String> {
    let parse = |a: &str| {
        a.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))
    };
    match s.split_once('-') {
        Some((a, z)) => {
            let (a, z) = (parse(a)?, parse(z)?);
            if a > z {
                return Err("the range ends before it starts".into());
            }
            Ok((a, z))
        }
        None => {
            let a = parse(s)?;
            Ok((a, a))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFileOnly {
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryAccount {
    name: UserName,
    display_name: Option<String>,
    mail: Option<String>,
    #[serde(default)]
    ssh_keys: Vec<String>,
    #[serde(default = "yes")]
    may_own_vms: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryUsersConfig {
    #[serde(default)]
    accounts: Vec<MemoryAccount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryPlacementConfig {
    hosts: Vec<HostCapacity>,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryIpConfig {
    subnet: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    #[serde(default)]
    reserved: Vec<String>,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryDnsConfig {
    zone: String,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryImagesConfig {
    templates: Vec<TemplateName>,
    state_file: Option<PathBuf>,
}

/// The cargo feature a real backend is built with, if `name` is one.
fn feature_of(step: Step, name: &str) -> Option<&'static str> {
    Some(match (step, name) {
        (Step::User, "ldap") => "ldap",
        (Step::Ip, "sqlite") => "sqlite",
        (Step::Dns, "rfc2136") => "rfc2136",
        (Step::Placement | Step::Domain, "libvirt") => "libvirt",
        (Step::Image | Step::Disk, "glance") => "glance",
        (Step::Bootstrap, "cloud-init") => "cloud-init",
        (Step::Bootstrap, "chef" | "shell") => "ssh",
        _ => return None,
    })
}

/// A secret in the config: a plain string, `{ file = "path" }` or `{ env = "NAME" }`.
///
/// Its `Debug` shows where the secret comes from, never its value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSpec {
    /// Written inline (discouraged).
    Inline(String),
    /// Read from a file (trailing newlines are stripped).
    File(PathBuf),
    /// Read from an environment variable.
    Env(String),
}

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSpec::Inline(_) => f.write_str("SecretSpec::Inline([redacted])"),
            SecretSpec::File(p) => write!(f, "SecretSpec::File({})", p.display()),
            SecretSpec::Env(v) => write!(f, "SecretSpec::Env({v})"),
        }
    }
}

impl<'de> Deserialize<'de> for SecretSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            file: Option<PathBuf>,
            env: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Inline(String),
            Table(Table),
        }
        const EXPECTED: &str =
            "a secret must be a string, { file = \"path\" } or { env = \"VARIABLE\" }";
        match Raw::deserialize(d).map_err(|_| D::Error::custom(EXPECTED))? {
            Raw::Inline(s) => Ok(SecretSpec::Inline(s)),
            Raw::Table(Table {
                file: Some(f),
                env: None,
            }) => Ok(SecretSpec::File(f)),
            Raw::Table(Table {
                file: None,
                env: Some(v),
            }) => Ok(SecretSpec::Env(v)),
            Raw::Table(_) => Err(D::Error::custom(EXPECTED)),
        }
    }
}

impl SecretSpec {
    /// Reads the secret; a relative file path is resolved against `base_dir`. A missing
    /// file or variable is an error that names the file or variable, never the value.
    pub fn resolve(&self, base_dir: &Path) -> Result<SecretString> {
        match self {
            SecretSpec::Inline(s) => Ok(SecretString::from(s.clone())),
            SecretSpec::File(p) => {
                let path = base_dir.join(p);
                let s = read_secret_file(&path).map_err(|e| {
                    Error::invalid_input(format!("cannot read secret file {}", path.display()))
                        .with_source(e)
                })?;
                Ok(SecretString::from(
                    s.trim_end_matches(['\n', '\r']).to_owned(),
                ))
            }
            SecretSpec::Env(v) => std::env::var(v).map(SecretString::from).map_err(|_| {
                Error::invalid_input(format!("secret environment variable {v} is not set"))
            }),
        }
    }
}

/// Warnings about secret files that others may read, not yet handed to a provisioner.
static SECRET_WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Reads a secret file (a TSIG key, a password, a private key). A file that its group or
/// other users may read or write still works, but is warned about, as ssh does for keys:
/// logged now, and a `warning` event at the start of every run of the provisioner built
/// next (see [`take_secret_warnings`]).
pub fn read_secret_file(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let warning = format!(
            "secret file {} is accessible to other users (mode {mode:o}); chmod 600 it",
            path.display()
        );
        tracing::warn!("{warning}");
        let mut all = SECRET_WARNINGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !all.contains(&warning) {
            all.push(warning);
        }
    }
    Ok(text)
}

/// The warnings [`read_secret_file`] recorded since the last call (a provisioner takes
/// them when it is built).
pub fn take_secret_warnings() -> Vec<String> {
    std::mem::take(
        &mut *SECRET_WARNINGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const BASE: &str = r#"
state_dir = "state"
[defaults]
template = "debian-12"
[users]
backend = "memory"
accounts = [{ name = "alice" }]
[placement]
backend = "memory"
hosts = [{ id = "h1", vcpus = 4, memory_mib = 8192, disk_gib = 100 }]
[ip]
backend = "memory"
subnet = "10.0.0.0/29"
gateway = "10.0.0.1"
reserved = ["10.0.0.2-10.0.0.3"]
[dns]
backend = "memory"
zone = "lab.example"
[images]
backend = "memory"
templates = ["debian-12"]
[hypervisor]
backend = "memory"
[bootstrap]
backend = "none"
"#;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/devvm/devvm.toml"))
    }

    #[test]
    fn a_full_config_parses_and_builds() {
        let c = parse(BASE).expect("parses");
        assert_eq!(c.state_dir, Path::new("/etc/devvm/state"));
        assert_eq!(
            c.defaults.template.as_ref().map(|t| t.as_str()),
            Some("debian-12")
        );
        let b = c.builder().expect("builds");
        let backends = b.current_backends().expect("all set");
        assert_eq!(backends.bootstrap.backend(), "none");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse(&BASE.replace("zone = ", "zonee = ")).expect("parses");
        let err = e.builder().expect_err("unknown key");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("zonee"), "{err}");
        assert!(err.to_string().contains("[dns]"), "{err}");

        let err = parse(&format!("colour = 1\n{BASE}")).expect_err("unknown top key");
        assert!(err.to_string().contains("colour"), "{err}");

        let err = parse(&BASE.replace("[defaults]\n", "[defaults]\nvcpu = 3\n"))
            .expect_err("unknown default");
        assert!(err.to_string().contains("vcpu"), "{err}");
    }

    #[test]
    fn the_config_never_prints_a_value() {
        let c = parse(&BASE.replace(
            "zone = \"lab.example\"",
            "zone = \"lab.example\"\nsecret = \"inline-hunter2\"",
        ))
        .expect("parses");
        let shown = format!("{c:?}");
        assert!(!shown.contains("inline-hunter2"), "{shown}");
        assert!(shown.contains("secret"), "keys are shown: {shown}");
    }

    #[test]
    fn unknown_backends_and_missing_sections_are_errors() {
        let c =
            parse(&BASE.replace("backend = \"none\"", "backend = \"chef-solo\"")).expect("parses");
        let err = c.builder().expect_err("unknown backend");
        assert!(err.to_string().contains("chef-solo"), "{err}");
        let err =
            parse(&BASE.replace("[hypervisor]\nbackend = \"memory\"\n", "")).expect_err("missing");
        assert!(err.to_string().contains("hypervisor"), "{err}");
    }

    /// Built without a backend's feature, a config naming it says which feature it needs.
    #[cfg(not(feature = "ssh"))]
    #[test]
    fn a_backend_that_is_not_built_in_names_its_feature() {
        let c = parse(&BASE.replace("backend = \"none\"", "backend = \"chef\"")).expect("parses");
        let err = c.builder().expect_err("not built in");
        assert!(
            err.to_string().contains("needs devvm-core's `ssh` feature"),
            "{err}"
        );
    }

    #[test]
    fn custom_backends_are_left_to_the_program() {
        let c = parse(
            &BASE
                .replace("zone = \"lab.example\"", "endpoint = \"https://ipam\"")
                .replace("[dns]\nbackend = \"memory\"", "[dns]\nbackend = \"custom\""),
        )
        .expect("parses");
        let b = c.builder().expect("builds");
        assert!(b.current_backends().is_none(), "dns must be supplied");
        assert_eq!(
            c.section(Step::Dns)
                .and_then(|s| s.options.get("endpoint"))
                .and_then(|v| v.as_str()),
            Some("https://ipam")
        );
        let err = b.build().expect_err("dns missing");
        assert!(err.to_string().contains("dns"), "{err}");
    }

    #[test]
    fn secrets_come_from_files_or_the_environment_and_never_show() {
        #[derive(Debug, Deserialize)]
        struct S {
            password: SecretSpec,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pw"), "hunter2\n").expect("write");
        let s: S = toml::from_str(r#"password = { file = "pw" }"#).expect("file form");
        assert_eq!(
            s.password
                .resolve(dir.path())
                .expect("reads")
                .expose_secret(),
            "hunter2"
        );

        let s: S = toml::from_str(r#"password = "inline-secret""#).expect("inline form");
        assert!(!format!("{s:?}").contains("inline-secret"));
        let resolved = s.password.resolve(dir.path()).expect("inline");
        assert!(!format!("{resolved:?}").contains("inline-secret"));

        let s: S = toml::from_str(r#"password = { env = "DEVVM_TEST_SURELY_UNSET_VAR" }"#)
            .expect("env form");
        let err = s.password.resolve(dir.path()).expect_err("unset");
        assert!(err.to_string().contains("DEVVM_TEST_SURELY_UNSET_VAR"));
        // PATH is always set; reading it proves the env form reads the environment.
        let s: S = toml::from_str(r#"password = { env = "PATH" }"#).expect("env form");
        assert_eq!(
            s.password.resolve(dir.path()).expect("set").expose_secret(),
            std::env::var("PATH").expect("PATH")
        );

        let bad: std::result::Result<S, _> = toml::from_str(r#"password = { path = "x" }"#);
        assert!(bad.is_err());
    }
}
