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
//! [retries]                              # transient failures (a service down): tries per call
//! attempts = 3                           # every step (1: no retry); or per step: dns = 5
//! initial_ms = 200                       # backoff from 200 ms, doubling with jitter,
//! max_ms = 3000                          # up to 3 s between tries
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
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::provisioner::{Defaults, ProvisionerBuilder, Retries, Timeouts};
use crate::registry::{BackendContext, Registry};
use crate::types::{BootstrapSettings, Step, TemplateName, VmSize};

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
    /// Retries of transient failures.
    pub retries: Retries,
    /// The `[journal]` section, if any (where the journal lives when not in `state_dir`:
    /// see [`ProvisionerBuilder::journal`]).
    pub journal: Option<toml::Table>,
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
    #[serde(default)]
    retries: RawRetries,
    journal: Option<toml::Table>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    /// Tries per call for every step (1: no retry).
    attempts: Option<u32>,
    initial_ms: Option<u64>,
    max_ms: Option<u64>,
    user: Option<u32>,
    placement: Option<u32>,
    ip: Option<u32>,
    dns: Option<u32>,
    image: Option<u32>,
    disk: Option<u32>,
    domain: Option<u32>,
    bootstrap: Option<u32>,
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
        let mut retries = Retries::default();
        let r = raw.retries;
        if let Some(ms) = r.initial_ms {
            retries.initial = Duration::from_millis(ms);
        }
        if let Some(ms) = r.max_ms {
            retries.max = Duration::from_millis(ms);
        }
        for (step, n) in [
            (Step::User, r.user),
            (Step::Placement, r.placement),
            (Step::Ip, r.ip),
            (Step::Dns, r.dns),
            (Step::Image, r.image),
            (Step::Disk, r.disk),
            (Step::Domain, r.domain),
            (Step::Bootstrap, r.bootstrap),
        ] {
            if let Some(n) = n.or(r.attempts) {
                if n == 0 {
                    return Err(config_err(
                        path,
                        format_args!("[retries] attempts count the first try: at least 1"),
                    ));
                }
                retries.set_attempts(step, n);
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
            retries,
            journal: raw.journal,
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

    /// The directory relative paths in the config are resolved against (the config
    /// file's own).
    pub fn base_dir(&self) -> &Path {
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

    /// A builder with every built-in backend the config names already set (see
    /// [`Registry::builtin`]).
    ///
    /// A step whose backend is `"custom"` is left unset: the program supplies it through
    /// the builder (its options are in [`Config::section`]). Any other unknown backend
    /// name is an error.
    pub fn builder(&self) -> Result<ProvisionerBuilder> {
        self.builder_with(&Registry::builtin())
    }

    /// [`builder_with`](Self::builder_with) `registry` plus backend objects the caller made
    /// (a binding's Python or C backends): each serves its step under the name its section
    /// gives (`[dns] backend = "in-house-dns"`), or is set directly when the section says
    /// `backend = "custom"`. A backend whose step's section names a built-in backend
    /// replaces that one under its name.
    pub fn builder_with_backends(
        &self,
        mut registry: Registry,
        backends: impl IntoIterator<Item = crate::registry::StepBackend>,
    ) -> Result<ProvisionerBuilder> {
        let mut direct = Vec::new();
        for b in backends {
            match self.section(b.step()).map(|s| s.backend.as_str()) {
                Some(name) if name != "custom" => b.register(&mut registry, name),
                _ => direct.push(b),
            }
        }
        let mut builder = self.builder_with(&registry)?;
        for b in direct {
            builder = b.apply(builder);
        }
        Ok(builder)
    }

    /// [`builder`](Self::builder) with the backends of `registry` (the built-in ones plus
    /// the program's own, selected by the names they were registered under).
    pub fn builder_with(&self, registry: &Registry) -> Result<ProvisionerBuilder> {
        let mut b = ProvisionerBuilder::new()
            .state_dir(&self.state_dir)
            .defaults(self.defaults.clone())
            .timeouts(self.timeouts.clone())
            .retries(self.retries.clone());
        if let Some(j) = &self.journal {
            b = b.journal(j.clone(), self.base_dir());
        }
        for step in crate::registry::SECTION_STEPS {
            let section = self
                .section(step)
                .ok_or_else(|| config_err(&self.path, format_args!("no section for {step}")))?;
            let name = section.backend.as_str();
            if name == "custom" {
                continue;
            }
            let ctx = BackendContext {
                step,
                backend: name,
                options: &section.options,
                config_path: &self.path,
                base_dir: self.base_dir(),
                state_dir: &self.state_dir,
            };
            b = match registry.build(&ctx, b)? {
                Some(b) => b,
                None => {
                    return Err(match crate::registry::feature_of(step, name) {
                        Some(feature) => config_err(
                            &self.path,
                            format_args!(
                                "[{}] backend {name:?} is not built into this devvm: it needs devvm-core's `{feature}` feature",
                                section_name(step)
                            ),
                        ),
                        None => {
                            let mut known = registry.names(step);
                            known.push("custom".into());
                            config_err(
                                &self.path,
                                format_args!(
                                    "[{}] unknown backend {name:?}; known: {}",
                                    section_name(step),
                                    known.join(", ")
                                ),
                            )
                        }
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

pub use crate::registry::section_name;

impl crate::Provisioner {
    /// Reads the TOML config at `path` and builds the provisioner it describes, with the
    /// built-in backends ([`Config::builder`]).
    pub fn from_config(path: impl AsRef<Path>) -> Result<crate::Provisioner> {
        Config::load(path.as_ref())?.builder()?.build()
    }
}

pub use crate::secret::{SecretSpec, read_secret_file, take_secret_warnings};

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    /// The one reference config of every test suite, with no bootstrap.
    fn base() -> String {
        let text = crate::testkit::REFERENCE_CONFIG;
        let bootstrap = "[bootstrap]\nbackend = \"memory\"\nstate_file = \"bootstrap.json\"";
        assert!(text.contains(bootstrap), "the reference config changed");
        text.replace(bootstrap, "[bootstrap]\nbackend = \"none\"")
    }

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/devvm/devvm.toml"))
    }

    #[test]
    fn a_full_config_parses_and_builds() {
        let c = parse(&base()).expect("parses");
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
        let e = parse(&base().replace("zone = ", "zonee = ")).expect("parses");
        let err = e.builder().expect_err("unknown key");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("zonee"), "{err}");
        assert!(err.to_string().contains("[dns]"), "{err}");

        let err = parse(&format!("colour = 1\n{}", base())).expect_err("unknown top key");
        assert!(err.to_string().contains("colour"), "{err}");

        let err = parse(&base().replace("[defaults]\n", "[defaults]\nvcpu = 3\n"))
            .expect_err("unknown default");
        assert!(err.to_string().contains("vcpu"), "{err}");
    }

    #[test]
    fn the_config_never_prints_a_value() {
        let c = parse(&base().replace(
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
        let c = parse(&base().replace("backend = \"none\"", "backend = \"chef-solo\""))
            .expect("parses");
        let err = c.builder().expect_err("unknown backend");
        assert!(err.to_string().contains("chef-solo"), "{err}");
        let err = parse(&base().replace(
            "[hypervisor]\nbackend = \"memory\"\nstate_file = \"domains.json\"\n",
            "",
        ))
        .expect_err("missing");
        assert!(err.to_string().contains("hypervisor"), "{err}");
    }

    /// Built without a backend's feature, a config naming it says which feature it needs.
    #[cfg(not(feature = "ssh"))]
    #[test]
    fn a_backend_that_is_not_built_in_names_its_feature() {
        let c = parse(&base().replace("backend = \"none\"", "backend = \"chef\"")).expect("parses");
        let err = c.builder().expect_err("not built in");
        assert!(
            err.to_string().contains("needs devvm-core's `ssh` feature"),
            "{err}"
        );
    }

    #[test]
    fn retries_are_configured_per_step_and_zero_is_refused() {
        let c = parse(&base().replace(
            "state_dir = \"state\"\n",
            "state_dir = \"state\"\n[retries]\nattempts = 2\ndns = 5\ninitial_ms = 50\nmax_ms = 400\n",
        ))
        .expect("parses");
        assert_eq!(c.retries.attempts(Step::User), 2);
        assert_eq!(c.retries.attempts(Step::Dns), 5);
        assert_eq!(c.retries.initial, Duration::from_millis(50));
        assert_eq!(c.retries.max, Duration::from_millis(400));
        let err = parse(&base().replace(
            "state_dir = \"state\"\n",
            "state_dir = \"state\"\n[retries]\nattempts = 0\n",
        ))
        .expect_err("zero attempts");
        assert!(err.to_string().contains("at least 1"), "{err}");
        assert_eq!(parse(&base()).expect("parses").retries, Retries::default());
    }

    /// A backend an embedder registered under a name of their own is selected by that name.
    #[test]
    fn a_registered_backend_is_selected_by_its_name() {
        use crate::registry::Registry;
        let text = base().replace(
            "[dns]\nbackend = \"memory\"\nzone = \"lab.example\"\nstate_file = \"dns.json\"",
            "[dns]\nbackend = \"mydns\"\nzone = \"mine.example\"",
        );
        let c = parse(&text).expect("parses");
        let err = c.builder().expect_err("not registered");
        assert!(
            err.to_string().contains("unknown backend \"mydns\""),
            "{err}"
        );
        assert!(
            err.to_string().contains("memory"),
            "lists the known ones: {err}"
        );
        let mut registry = Registry::builtin();
        registry.register_dns("mydns", |ctx| {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Mine {
                zone: String,
            }
            let o: Mine = ctx.options()?;
            Ok(std::sync::Arc::new(crate::memory::MemoryDns::new(o.zone)))
        });
        let b = c.builder_with(&registry).expect("builds");
        let dns = b.current_backends().expect("every backend set").dns;
        let vm = crate::VmName::new("web-1").expect("name");
        assert_eq!(dns.fqdn(&vm), "web-1.mine.example");
        assert!(registry.names(Step::Dns).contains(&"mydns".to_owned()));
    }

    /// Backend objects a binding made: one serves its section by the name the section
    /// gives, another a `custom` section directly.
    #[test]
    fn backend_objects_serve_by_the_sections_name_or_as_custom() {
        use crate::registry::{Registry, StepBackend};
        let named = base().replace(
            "[dns]\nbackend = \"memory\"\nzone = \"lab.example\"\nstate_file = \"dns.json\"",
            "[dns]\nbackend = \"in-house-dns\"",
        );
        let custom = base().replace(
            "[dns]\nbackend = \"memory\"\nzone = \"lab.example\"\nstate_file = \"dns.json\"",
            "[dns]\nbackend = \"custom\"",
        );
        let vm = crate::VmName::new("web-1").expect("name");
        for text in [named, custom] {
            let c = parse(&text).expect("parses");
            let mine = StepBackend::Dns(std::sync::Arc::new(crate::memory::MemoryDns::new(
                "mine.example",
            )));
            let b = c
                .builder_with_backends(Registry::builtin(), [mine])
                .expect("builds");
            let dns = b.current_backends().expect("every backend set").dns;
            assert_eq!(dns.fqdn(&vm), "web-1.mine.example", "{text}");
        }
        assert_eq!(
            crate::registry::feature_of(Step::Ip, "postgres"),
            Some("postgres")
        );
        assert_eq!(crate::registry::feature_of(Step::Ip, "mine"), None);
    }

    #[test]
    fn custom_backends_are_left_to_the_program() {
        let c = parse(
            &base()
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
