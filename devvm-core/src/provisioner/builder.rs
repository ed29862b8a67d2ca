//! Assembling a provisioner from backends.

use super::*;

/// Builds a [`Provisioner`] from backends, by hand or from a config file.
#[derive(Default)]
pub struct ProvisionerBuilder {
    state_dir: Option<PathBuf>,
    journal: Option<(toml::Table, PathBuf)>,
    users: Option<Arc<dyn UserDirectory>>,
    placement: Option<Arc<dyn Placement>>,
    ip: Option<Arc<dyn IpAllocator>>,
    dns: Option<Arc<dyn DnsUpdater>>,
    images: Option<Arc<dyn ImageStore>>,
    hypervisor: Option<Arc<dyn Hypervisor>>,
    bootstrap: Option<Arc<dyn Bootstrapper>>,
    defaults: Defaults,
    timeouts: Timeouts,
    retries: Retries,
    event_buffer: Option<usize>,
}

impl std::fmt::Debug for ProvisionerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisionerBuilder")
            .field("state_dir", &self.state_dir)
            .field("defaults", &self.defaults)
            .field("timeouts", &self.timeouts)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl ProvisionerBuilder {
    /// An empty builder: every backend and the state directory must be set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The provisioner's local state directory, and where the journal lives unless
    /// [`journal`](Self::journal) puts it elsewhere.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }
    /// Where the journal lives, as the config's `[journal]` section says:
    /// `database = { url = "postgres://...", password = { file = "..." } }` puts it in
    /// PostgreSQL (feature `postgres`), shared by provisioners on several machines, with
    /// `owner_ttl_secs` (default 30) for how long a silent provisioner counts as alive.
    /// Relative secret files are relative to `base_dir`. Without it: SQLite in the state
    /// directory.
    pub fn journal(mut self, section: toml::Table, base_dir: impl Into<PathBuf>) -> Self {
        self.journal = Some((section, base_dir.into()));
        self
    }
    /// How many unread events each subscription and each [`RunHandle`] holds before it
    /// drops the oldest (default [`DEFAULT_EVENT_BUFFER`](crate::events::DEFAULT_EVENT_BUFFER);
    /// at least 1).
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = Some(events);
        self
    }
    /// The user directory.
    pub fn users(mut self, b: Arc<dyn UserDirectory>) -> Self {
        self.users = Some(b);
        self
    }
    /// The placement backend.
    pub fn placement(mut self, b: Arc<dyn Placement>) -> Self {
        self.placement = Some(b);
        self
    }
    /// The IP allocator.
    pub fn ip(mut self, b: Arc<dyn IpAllocator>) -> Self {
        self.ip = Some(b);
        self
    }
    /// The DNS updater.
    pub fn dns(mut self, b: Arc<dyn DnsUpdater>) -> Self {
        self.dns = Some(b);
        self
    }
    /// The image store.
    pub fn images(mut self, b: Arc<dyn ImageStore>) -> Self {
        self.images = Some(b);
        self
    }
    /// The hypervisor.
    pub fn hypervisor(mut self, b: Arc<dyn Hypervisor>) -> Self {
        self.hypervisor = Some(b);
        self
    }
    /// The bootstrapper.
    pub fn bootstrap(mut self, b: Arc<dyn Bootstrapper>) -> Self {
        self.bootstrap = Some(b);
        self
    }
    /// Every backend at once.
    pub fn backends(self, b: Backends) -> Self {
        self.users(b.users)
            .placement(b.placement)
            .ip(b.ip)
            .dns(b.dns)
            .images(b.images)
            .hypervisor(b.hypervisor)
            .bootstrap(b.bootstrap)
    }
    /// Defaults for unset request fields.
    pub fn defaults(mut self, defaults: Defaults) -> Self {
        self.defaults = defaults;
        self
    }
    /// How often transient failures are retried.
    pub fn retries(mut self, retries: Retries) -> Self {
        self.retries = retries;
        self
    }
    /// Step time limits.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The backends set so far, for wrapping one (for example in a fault injector).
    pub fn current_backends(&self) -> Option<Backends> {
        Some(Backends {
            users: self.users.clone()?,
            placement: self.placement.clone()?,
            ip: self.ip.clone()?,
            dns: self.dns.clone()?,
            images: self.images.clone()?,
            hypervisor: self.hypervisor.clone()?,
            bootstrap: self.bootstrap.clone()?,
        })
    }

    /// Opens the journal and makes the provisioner. A missing backend or state directory
    /// is an [`ErrorKind::InvalidInput`] error naming it.
    pub fn build(self) -> Result<Provisioner> {
        fn need<T>(v: Option<T>, what: &str) -> Result<T> {
            v.ok_or_else(|| Error::invalid_input(format!("no {what} configured")))
        }
        let backends = Backends {
            users: need(self.users, "user directory")?,
            placement: need(self.placement, "placement backend")?,
            ip: need(self.ip, "ip allocator")?,
            dns: need(self.dns, "dns updater")?,
            images: need(self.images, "image store")?,
            hypervisor: need(self.hypervisor, "hypervisor")?,
            bootstrap: need(self.bootstrap, "bootstrapper")?,
        };
        let state_dir = need(self.state_dir, "state directory")?;
        let warnings = crate::secret::take_secret_warnings();
        let owner = uuid::Uuid::new_v4().to_string();
        let journal = match &self.journal {
            Some((section, base)) => Journal::open(&state_dir, &owner, Some(section), base)?,
            None => Journal::open(&state_dir, &owner, None, &state_dir)?,
        };
        let owner_lock = journal.register_owner()?;
        Ok(Provisioner {
            inner: Arc::new(Inner {
                backends,
                journal,
                bus: EventBus::with_capacity(
                    self.event_buffer
                        .unwrap_or(crate::events::DEFAULT_EVENT_BUFFER),
                ),
                defaults: self.defaults,
                timeouts: self.timeouts,
                retries: self.retries,
                owner,
                _owner_lock: owner_lock,
                running: Mutex::new(HashSet::new()),
                state_dir,
                warnings,
            }),
        })
    }
}
