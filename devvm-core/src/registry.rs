//! The backend registry: which `backend = "NAME"` of a config section builds what.
//!
//! Each backend module registers its name and a constructor from its config section
//! ([`Registry::builtin`] holds every backend this build has, by cargo feature); the
//! config knows no backend, and no backend knows the config. An embedder adds their own
//! under a name of their choosing and selects it in TOML like a built-in one:
//!
//! ```
//! # use std::sync::Arc;
//! # use devvm_core::registry::Registry;
//! # use devvm_core::memory::MemoryDns;
//! let mut registry = Registry::builtin();
//! registry.register_dns("mydns", |ctx| {
//!     #[derive(serde::Deserialize)]
//!     struct MyDns { zone: String }
//!     let o: MyDns = ctx.options()?;
//!     Ok(Arc::new(MemoryDns::new(o.zone)))
//! });
//! // [dns]
//! // backend = "mydns"
//! // zone = "lab.example"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::provisioner::ProvisionerBuilder;
use crate::traits::{
    Bootstrapper, DnsUpdater, Hypervisor, ImageStore, IpAllocator, Placement, UserDirectory,
};
use crate::types::Step;

/// What a backend constructor gets: its section's keys and where relative paths start.
#[derive(Debug, Clone, Copy)]
pub struct BackendContext<'a> {
    /// The step whose section this is.
    pub step: Step,
    /// The section's `backend` name.
    pub backend: &'a str,
    /// The section's keys other than `backend`.
    pub options: &'a toml::Table,
    /// The config file (for error messages).
    pub config_path: &'a Path,
    /// The directory relative paths in the config are relative to.
    pub base_dir: &'a Path,
    /// The provisioner's state directory (for a backend's own default files).
    pub state_dir: &'a Path,
}

impl BackendContext<'_> {
    /// Decodes the section's keys into `T`; an unknown or malformed key is an
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) error naming the section and key.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T> {
        toml::Value::Table(self.options.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                Error::invalid_input(format!(
                    "config {}: [{}] (backend {:?}): {}",
                    self.config_path.display(),
                    section_name(self.step),
                    self.backend,
                    e.message().trim()
                ))
            })
    }

    /// A path from the config, relative to the config file's directory.
    pub fn resolve_path(&self, p: impl AsRef<Path>) -> PathBuf {
        self.base_dir.join(p)
    }
}

type Ctor<T> = Arc<dyn Fn(&BackendContext<'_>) -> Result<Arc<T>> + Send + Sync>;

/// Backend constructors by step and name. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    users: BTreeMap<String, Ctor<dyn UserDirectory>>,
    placement: BTreeMap<String, Ctor<dyn Placement>>,
    ip: BTreeMap<String, Ctor<dyn IpAllocator>>,
    dns: BTreeMap<String, Ctor<dyn DnsUpdater>>,
    images: BTreeMap<String, Ctor<dyn ImageStore>>,
    hypervisor: BTreeMap<String, Ctor<dyn Hypervisor>>,
    bootstrap: BTreeMap<String, Ctor<dyn Bootstrapper>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Registry");
        for step in SECTION_STEPS {
            d.field(section_name(step), &self.names(step));
        }
        d.finish()
    }
}

/// The steps that have a config section (image and disk share `[images]`).
pub(crate) const SECTION_STEPS: [Step; 7] = [
    Step::User,
    Step::Placement,
    Step::Ip,
    Step::Dns,
    Step::Image,
    Step::Domain,
    Step::Bootstrap,
];

macro_rules! register_fn {
    ($(#[$doc:meta])* $name:ident, $field:ident, $trait:ident) => {
        $(#[$doc])*
        pub fn $name(
            &mut self,
            name: impl Into<String>,
            ctor: impl Fn(&BackendContext<'_>) -> Result<Arc<dyn $trait>> + Send + Sync + 'static,
        ) -> &mut Self {
            self.$field.insert(name.into(), Arc::new(ctor));
            self
        }
    };
}

impl Registry {
    /// A registry with no backend at all.
    pub fn empty() -> Self {
        Self::default()
    }

    register_fn!(
        /// Registers a [`UserDirectory`] under `name` (`[users] backend = "name"`).
        register_users, users, UserDirectory
    );
    register_fn!(
        /// Registers a [`Placement`] under `name` (`[placement] backend = "name"`).
        register_placement, placement, Placement
    );
    register_fn!(
        /// Registers an [`IpAllocator`] under `name` (`[ip] backend = "name"`).
        register_ip, ip, IpAllocator
    );
    register_fn!(
        /// Registers a [`DnsUpdater`] under `name` (`[dns] backend = "name"`).
        register_dns, dns, DnsUpdater
    );
    register_fn!(
        /// Registers an [`ImageStore`] under `name` (`[images] backend = "name"`).
        register_images, images, ImageStore
    );
    register_fn!(
        /// Registers a [`Hypervisor`] under `name` (`[hypervisor] backend = "name"`).
        register_hypervisor, hypervisor, Hypervisor
    );
    register_fn!(
        /// Registers a [`Bootstrapper`] under `name` (`[bootstrap] backend = "name"`).
        register_bootstrap, bootstrap, Bootstrapper
    );

    /// The backend names registered for `step`, sorted.
    pub fn names(&self, step: Step) -> Vec<String> {
        fn keys<T: ?Sized>(m: &BTreeMap<String, Ctor<T>>) -> Vec<String> {
            m.keys().cloned().collect()
        }
        match step {
            Step::User => keys(&self.users),
            Step::Placement => keys(&self.placement),
            Step::Ip => keys(&self.ip),
            Step::Dns => keys(&self.dns),
            Step::Image | Step::Disk => keys(&self.images),
            Step::Domain => keys(&self.hypervisor),
            Step::Bootstrap => keys(&self.bootstrap),
        }
    }

    /// Builds the backend `ctx.backend` of `ctx.step` and sets it on `b`. `Ok(None)` when
    /// no backend of that name is registered.
    pub(crate) fn build(
        &self,
        ctx: &BackendContext<'_>,
        b: ProvisionerBuilder,
    ) -> Result<Option<ProvisionerBuilder>> {
        fn get<T: ?Sized>(
            m: &BTreeMap<String, Ctor<T>>,
            ctx: &BackendContext<'_>,
        ) -> Result<Option<Arc<T>>> {
            m.get(ctx.backend).map(|c| c(ctx)).transpose()
        }
        Ok(match ctx.step {
            Step::User => get(&self.users, ctx)?.map(|x| b.users(x)),
            Step::Placement => get(&self.placement, ctx)?.map(|x| b.placement(x)),
            Step::Ip => get(&self.ip, ctx)?.map(|x| b.ip(x)),
            Step::Dns => get(&self.dns, ctx)?.map(|x| b.dns(x)),
            Step::Image | Step::Disk => get(&self.images, ctx)?.map(|x| b.images(x)),
            Step::Domain => get(&self.hypervisor, ctx)?.map(|x| b.hypervisor(x)),
            Step::Bootstrap => get(&self.bootstrap, ctx)?.map(|x| b.bootstrap(x)),
        })
    }
}

/// One step's backend object, made by the caller (a binding's Python or C backend, a
/// program's own): `Config::builder_with_backends` (in the config module) selects it by
/// the name its section gives, or sets it for a `backend = "custom"` section.
#[derive(Clone)]
#[non_exhaustive]
pub enum StepBackend {
    /// For `[users]`.
    Users(Arc<dyn UserDirectory>),
    /// For `[placement]`.
    Placement(Arc<dyn Placement>),
    /// For `[ip]`.
    Ip(Arc<dyn IpAllocator>),
    /// For `[dns]`.
    Dns(Arc<dyn DnsUpdater>),
    /// For `[images]`.
    Images(Arc<dyn ImageStore>),
    /// For `[hypervisor]`.
    Hypervisor(Arc<dyn Hypervisor>),
    /// For `[bootstrap]`.
    Bootstrap(Arc<dyn Bootstrapper>),
}

impl fmt::Debug for StepBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            StepBackend::Users(b) => b.backend(),
            StepBackend::Placement(b) => b.backend(),
            StepBackend::Ip(b) => b.backend(),
            StepBackend::Dns(b) => b.backend(),
            StepBackend::Images(b) => b.backend(),
            StepBackend::Hypervisor(b) => b.backend(),
            StepBackend::Bootstrap(b) => b.backend(),
        };
        write!(f, "StepBackend([{}] {name})", section_name(self.step()))
    }
}

impl StepBackend {
    /// The step (the section) this backend serves.
    pub fn step(&self) -> Step {
        match self {
            StepBackend::Users(_) => Step::User,
            StepBackend::Placement(_) => Step::Placement,
            StepBackend::Ip(_) => Step::Ip,
            StepBackend::Dns(_) => Step::Dns,
            StepBackend::Images(_) => Step::Image,
            StepBackend::Hypervisor(_) => Step::Domain,
            StepBackend::Bootstrap(_) => Step::Bootstrap,
        }
    }

    /// Registers it in `r` under `name` for its step.
    pub fn register(self, r: &mut Registry, name: impl Into<String>) {
        match self {
            StepBackend::Users(b) => r.register_users(name, move |_| Ok(b.clone())),
            StepBackend::Placement(b) => r.register_placement(name, move |_| Ok(b.clone())),
            StepBackend::Ip(b) => r.register_ip(name, move |_| Ok(b.clone())),
            StepBackend::Dns(b) => r.register_dns(name, move |_| Ok(b.clone())),
            StepBackend::Images(b) => r.register_images(name, move |_| Ok(b.clone())),
            StepBackend::Hypervisor(b) => r.register_hypervisor(name, move |_| Ok(b.clone())),
            StepBackend::Bootstrap(b) => r.register_bootstrap(name, move |_| Ok(b.clone())),
        };
    }

    /// Sets it on `b` for its step.
    pub fn apply(self, b: ProvisionerBuilder) -> ProvisionerBuilder {
        match self {
            StepBackend::Users(x) => b.users(x),
            StepBackend::Placement(x) => b.placement(x),
            StepBackend::Ip(x) => b.ip(x),
            StepBackend::Dns(x) => b.dns(x),
            StepBackend::Images(x) => b.images(x),
            StepBackend::Hypervisor(x) => b.hypervisor(x),
            StepBackend::Bootstrap(x) => b.bootstrap(x),
        }
    }
}

/// The cargo feature of `devvm-core` that the built-in backend `name` of `step` needs, if
/// `name` is one (`("libvirt")` for `[hypervisor] backend = "libvirt"`), whether or not
/// this build has it. A binding uses it to say which of its builds has a backend.
pub fn feature_of(step: Step, name: &str) -> Option<&'static str> {
    Some(match (step, name) {
        (Step::User, "ldap") => "ldap",
        (Step::Ip, "sqlite") => "sqlite",
        (Step::Ip, "postgres") => "postgres",
        (Step::Dns, "rfc2136") => "rfc2136",
        (Step::Placement | Step::Domain, "libvirt") => "libvirt",
        (Step::Image | Step::Disk, "glance") => "glance",
        (Step::Bootstrap, "cloud-init") => "cloud-init",
        (Step::Bootstrap, "chef" | "shell") => "ssh",
        _ => return None,
    })
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
