//! [`Bootstrapper`]s that log into the guest over SSH: [`ChefBootstrapper`] does what
//! `knife bootstrap` does (Chef's `chef-full` template), [`ShellBootstrapper`] runs a
//! script.
//!
//! Both verify the guest's SSH host key against the one the provisioner generated for it
//! ([`BootstrapTarget::host_key`]) and refuse any other with
//! [`Unauthorized`](crate::ErrorKind::Unauthorized); both ask the pipeline
//! (through [`Bootstrapper::guest_setup`]) to install that host key and the public half
//! of their own private key in the guest. Every line of output becomes a progress event;
//! a non-zero exit fails the step, and the run is rolled back.
//!
//! What Chef's bootstrap leaves on the node, and so what [`ChefBootstrapper`] writes:
//!
//! | file | mode | content |
//! |---|---|---|
//! | `/etc/chef/validation.pem` | 0600 | the validation client's key (sent on stdin, never on a command line) |
//! | `/etc/chef/client.rb` | 0644 | `chef_server_url`, `validation_client_name`, `validation_key`, `node_name`, `log_level`, `log_location` (Ruby literals, escaped) |
//! | `/etc/chef/first-boot.json` | 0600 | `run_list`, `policy_name`/`policy_group` when set, the request's attributes, and `devvm.request_id` (the run's ownership record, saved on the node) |
//!
//! then `chef-client -j /etc/chef/first-boot.json [-E ENVIRONMENT]`, and once it
//! converged, `rm -f /etc/chef/validation.pem` (what the chef-client cookbook's
//! `delete_validation` does: the node has its own client key now). The node name (and
//! the API client name a first run registers) is the **VM name**;
//! [`unregister`](Bootstrapper::unregister) reads the node and deletes it and its client
//! only when its `devvm.request_id` attribute names the run: `DELETE /nodes/NAME` and
//! `DELETE /clients/NAME` on the Chef server (404 counts as done), signed with Chef's v1.3 protocol (RSA, SHA-256) when an
//! admin client and key are configured, unsigned otherwise (for servers without
//! authentication such as the lab's goiardi).
//!
//! Secrets (the validation key, the admin key, the SSH private key) never appear in
//! `Debug`, logs, events or errors; an output line that contains a line of the validation
//! key is withheld.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use russh::keys::PrivateKey;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Digest as _;

use crate::error::{Error, ErrorKind, Result};
use crate::events::Progress;
use crate::secret::SecretSpec;
use crate::seed::GuestSetup;
use crate::traits::Bootstrapper;
use crate::types::{BootstrapReport, BootstrapTarget, RequestId, Undone, VmName};

use super::ssh::{
    HostKeyCheck, OutputStream, SshOptions, SshSession, authorized_key_line, load_private_key,
    sh_quote,
};

/// The comment on the bootstrapper's key in the guest's `authorized_keys`.
const KEY_COMMENT: &str = "devvm-bootstrap";

fn default_port() -> u16 {
    22
}
fn default_user() -> String {
    "root".into()
}
fn default_connect_timeout() -> u64 {
    60
}
fn default_log_level() -> String {
    "info".into()
}
fn default_log_location() -> String {
    "STDOUT".into()
}
fn default_http_timeout() -> u64 {
    15
}

// ---------------------------------------------------------------------------------------
// SSH access shared by both bootstrappers

/// How a bootstrapper reaches the guest.
#[derive(Clone)]
struct SshAccess {
    key: Arc<PrivateKey>,
    public_line: String,
    port: u16,
    user: String,
    connect_timeout: Duration,
    accept_unknown_host_key: bool,
}

impl fmt::Debug for SshAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshAccess")
            .field("key", &super::ssh::fingerprint(self.key.public_key()))
            .field("port", &self.port)
            .field("user", &self.user)
            .field("connect_timeout", &self.connect_timeout)
            .field("accept_unknown_host_key", &self.accept_unknown_host_key)
            .finish()
    }
}

impl SshAccess {
    fn new(
        key_file: &Path,
        base_dir: &Path,
        port: u16,
        user: &str,
        connect_timeout_secs: u64,
        accept_unknown_host_key: bool,
    ) -> Result<Self> {
        if connect_timeout_secs == 0 {
            return Err(Error::invalid_input(
                "connect_timeout_secs must be at least 1",
            ));
        }
        if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid_input(format!(
                "ssh_user {user:?} is not a user name"
            )));
        }
        let key = load_private_key(&base_dir.join(key_file))?;
        let public_line = authorized_key_line(&key, KEY_COMMENT)?;
        Ok(SshAccess {
            key: Arc::new(key),
            public_line,
            port,
            user: user.to_owned(),
            connect_timeout: Duration::from_secs(connect_timeout_secs),
            accept_unknown_host_key,
        })
    }

    fn guest_setup(&self) -> GuestSetup {
        GuestSetup {
            host_key: true,
            authorized_keys: vec![self.public_line.clone()],
            ..Default::default()
        }
    }

    /// The host key check for `target`: its generated key, or (when the config allows it
    /// explicitly) any key.
    fn host_key_check(&self, target: &BootstrapTarget) -> Result<HostKeyCheck> {
        match &target.host_key {
            Some(line) => HostKeyCheck::expect_line(line),
            None if self.accept_unknown_host_key => {
                tracing::warn!(vm = %target.vm, "accepting any ssh host key (accept_unknown_host_key = true)");
                Ok(HostKeyCheck::AcceptAnyUnsafe)
            }
            None => Err(Error::unauthorized(format!(
                "the ssh host key of vm {} is unknown; refusing to connect \
                 (accept_unknown_host_key = true would trust any key: unsafe)",
                target.vm
            ))),
        }
    }

    /// SSH options for `target` (retrying for up to `connect_timeout` in total while the
    /// guest's SSH server comes up).
    fn options(&self, target: &BootstrapTarget) -> Result<SshOptions> {
        let check = self.host_key_check(target)?;
        let mut o = SshOptions::new(
            SocketAddr::new(target.ip, self.port),
            self.user.clone(),
            self.key.clone(),
            check,
        );
        let per_try = Duration::from_secs(15).min(self.connect_timeout);
        o.connect_timeout = per_try;
        o.retry_delay = Duration::from_secs(2);
        o.attempts = (self.connect_timeout.as_secs() / (per_try.as_secs() + 2)).max(1) as u32;
        Ok(o)
    }

    async fn connect(&self, target: &BootstrapTarget, progress: &Progress) -> Result<SshSession> {
        let opts = self.options(target)?;
        let s = SshSession::connect(&opts).await?;
        progress.message(format!(
            "ssh: logged in as {}@{} ({})",
            self.user,
            opts.addr,
            match &opts.host_key {
                HostKeyCheck::Expect(k) =>
                    format!("host key {} verified", super::ssh::fingerprint(k)),
                HostKeyCheck::AcceptAnyUnsafe => "host key NOT verified".to_owned(),
            }
        ));
        Ok(s)
    }
}

/// Withholds output lines that contain secret material.
struct Redactor {
    needles: Vec<String>,
}

impl Redactor {
    fn new(secrets: &[&str]) -> Self {
        let needles = secrets
            .iter()
            .flat_map(|s| s.lines())
            .map(str::trim)
            .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
            .map(str::to_owned)
            .collect();
        Redactor { needles }
    }

    fn clean<'a>(&self, line: &'a str) -> std::borrow::Cow<'a, str> {
        if self.needles.iter().any(|n| line.contains(n.as_str())) {
            "[output line withheld: it contains secret key material]".into()
        } else {
            line.into()
        }
    }
}

/// Runs `command` and turns each output line into a progress message; a non-zero exit is
/// [`ErrorKind::Backend`] naming `what`, the exit and the last output line.
async fn run_step(
    session: &SshSession,
    what: &str,
    command: &str,
    stdin: Option<&[u8]>,
    progress: &Progress,
    redactor: &Redactor,
) -> Result<()> {
    let outcome = session
        .run(command, stdin, &mut |_stream: OutputStream, line: &str| {
            progress.message(redactor.clean(line).into_owned());
        })
        .await?;
    if outcome.success() {
        return Ok(());
    }
    let last = outcome
        .error_line()
        .map(|l| format!(": {}", redactor.clean(l)))
        .unwrap_or_default();
    Err(Error::backend(format!(
        "{what} failed with {}{last}",
        outcome.describe()
    )))
}

// ---------------------------------------------------------------------------------------
// Chef

/// Chef server API access for cleaning up (`[bootstrap.server_admin]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChefServerAdminConfig {
    /// The server (with `/organizations/NAME` for Chef Infra Server); default: the
    /// bootstrap's `chef_server_url`.
    #[serde(default)]
    pub url: Option<String>,
    /// The API client (or user) that signs the requests; requests are unsigned when
    /// absent (only for servers without authentication, such as goiardi with
    /// `use-auth = false`).
    #[serde(default)]
    pub client_name: Option<String>,
    /// Its RSA private key (PEM), a secret: `{ file = ".." }` or `{ env = ".." }`.
    #[serde(default)]
    pub client_key: Option<SecretSpec>,
    /// Delete the API client as well as the node (default true).
    #[serde(default = "yes")]
    pub delete_client: bool,
    /// Time limit of one request in seconds (default 15).
    #[serde(default = "default_http_timeout")]
    pub timeout_secs: u64,
}

fn yes() -> bool {
    true
}

/// The `[bootstrap]` section for `backend = "chef"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChefConfig {
    /// The provisioner's SSH private key (unencrypted OpenSSH format); its public half is
    /// authorized in every guest.
    pub ssh_key: PathBuf,
    /// SSH port (default 22).
    #[serde(default = "default_port")]
    pub ssh_port: u16,
    /// SSH user (default `root`).
    #[serde(default = "default_user")]
    pub ssh_user: String,
    /// How long to keep trying to log in while the guest's SSH server comes up, in
    /// seconds (default 60).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// **Unsafe.** Accept any SSH host key when the provisioner did not generate the
    /// guest's (default false: such a guest is refused).
    #[serde(default)]
    pub accept_unknown_host_key: bool,
    /// `chef_server_url` in `client.rb`.
    pub chef_server_url: String,
    /// `validation_client_name` in `client.rb` (e.g. `acme-validator`).
    pub validation_client_name: String,
    /// The validation client's private key, a secret: `{ file = ".." }` or `{ env = ".." }`.
    pub validation_key: SecretSpec,
    /// Chef environment when the request names none (`-E`); none by default.
    #[serde(default)]
    pub environment: Option<String>,
    /// A command run first on the guest (e.g. the omnibus installer); skipped when absent.
    #[serde(default)]
    pub install_command: Option<String>,
    /// Run list when the request's is empty.
    #[serde(default)]
    pub run_list: Vec<String>,
    /// Policyfile name (`policy_name` in first-boot.json).
    #[serde(default)]
    pub policy_name: Option<String>,
    /// Policy group (`policy_group` in first-boot.json).
    #[serde(default)]
    pub policy_group: Option<String>,
    /// `log_level` in `client.rb`: `auto`, `trace`, `debug`, `info` (default), `warn`,
    /// `error` or `fatal`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// `log_location` in `client.rb`: `STDOUT` (default), `STDERR` or a file path.
    #[serde(default = "default_log_location")]
    pub log_location: String,
    /// Where to delete the node and client on undo; nothing is deleted when absent.
    #[serde(default)]
    pub server_admin: Option<ChefServerAdminConfig>,
}

/// Quotes `s` as a single-quoted Ruby string literal (`\` and `'` escaped).
pub fn ruby_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The `client.rb` Chef's bootstrap writes. `log_level` must be a known level (checked
/// when the bootstrapper is made); `STDOUT`/`STDERR` stay constants, any other
/// `log_location` is a string.
pub fn client_rb(
    chef_server_url: &str,
    validation_client_name: &str,
    node_name: &str,
    log_level: &str,
    log_location: &str,
) -> String {
    let location = match log_location {
        "STDOUT" | "STDERR" => log_location.to_owned(),
        other => ruby_string(other),
    };
    format!(
        "# written by devvm (knife bootstrap's chef-full layout)\n\
         chef_server_url {}\n\
         validation_client_name {}\n\
         validation_key {}\n\
         node_name {}\n\
         log_level :{}\n\
         log_location {}\n",
        ruby_string(chef_server_url),
        ruby_string(validation_client_name),
        ruby_string(VALIDATION_PEM),
        ruby_string(node_name),
        log_level,
        location,
    )
}

/// `/etc/chef/first-boot.json`: the attributes, then `run_list` and the policy (which
/// win over attributes of the same name).
pub fn first_boot_json(
    run_list: &[String],
    policy: Option<(&str, &str)>,
    attributes: &Map<String, Value>,
) -> Value {
    let mut doc = attributes.clone();
    doc.insert(
        "run_list".into(),
        Value::Array(run_list.iter().cloned().map(Value::String).collect()),
    );
    if let Some((name, group)) = policy {
        doc.insert("policy_name".into(), Value::String(name.to_owned()));
        doc.insert("policy_group".into(), Value::String(group.to_owned()));
    }
    Value::Object(doc)
}

const CHEF_DIR: &str = "/etc/chef";
const VALIDATION_PEM: &str = "/etc/chef/validation.pem";
const CLIENT_RB: &str = "/etc/chef/client.rb";
const FIRST_BOOT: &str = "/etc/chef/first-boot.json";

fn check_chef_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(Error::invalid_input(format!(
            "{what} {s:?} must be letters, digits, '_', '-' or '.'"
        )));
    }
    Ok(())
}

/// Bootstraps Chef on the guest over SSH, like `knife bootstrap`.
pub struct ChefBootstrapper {
    ssh: SshAccess,
    chef_server_url: String,
    validation_client_name: String,
    validation_key: SecretString,
    environment: Option<String>,
    install_command: Option<String>,
    run_list: Vec<String>,
    policy: Option<(String, String)>,
    log_level: String,
    log_location: String,
    server: Option<ChefServerClient>,
}

impl fmt::Debug for ChefBootstrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChefBootstrapper")
            .field("ssh", &self.ssh)
            .field("chef_server_url", &self.chef_server_url)
            .field("validation_client_name", &self.validation_client_name)
            .field("validation_key", &"[redacted]")
            .field("environment", &self.environment)
            .field("run_list", &self.run_list)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl ChefBootstrapper {
    /// A bootstrapper from its config section; relative paths are resolved against
    /// `base_dir`. An unreadable key, a bad URL or name is [`ErrorKind::InvalidInput`].
    pub fn from_config(c: &ChefConfig, base_dir: &Path) -> Result<Self> {
        let ssh = SshAccess::new(
            &c.ssh_key,
            base_dir,
            c.ssh_port,
            &c.ssh_user,
            c.connect_timeout_secs,
            c.accept_unknown_host_key,
        )?;
        let url = c.chef_server_url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::invalid_input(format!(
                "chef_server_url {url:?} must start with http:// or https://"
            )));
        }
        check_chef_name("validation_client_name", &c.validation_client_name)?;
        if let Some(env) = &c.environment {
            check_chef_name("environment", env)?;
        }
        let levels = ["auto", "trace", "debug", "info", "warn", "error", "fatal"];
        if !levels.contains(&c.log_level.as_str()) {
            return Err(Error::invalid_input(format!(
                "log_level {:?} must be one of {}",
                c.log_level,
                levels.join(", ")
            )));
        }
        if c.log_location.is_empty() || c.log_location.contains(['\n', '\r']) {
            return Err(Error::invalid_input("log_location must be one line"));
        }
        let policy = match (&c.policy_name, &c.policy_group) {
            (Some(n), Some(g)) => Some((n.clone(), g.clone())),
            (None, None) => None,
            _ => {
                return Err(Error::invalid_input(
                    "policy_name and policy_group go together",
                ));
            }
        };
        let validation_key = c.validation_key.resolve(base_dir)?;
        if !validation_key.expose_secret().contains("PRIVATE KEY") {
            return Err(Error::invalid_input(
                "validation_key is not a PEM private key",
            ));
        }
        let server = match &c.server_admin {
            Some(a) => Some(ChefServerClient::from_config(a, url, base_dir)?),
            None => None,
        };
        Ok(ChefBootstrapper {
            ssh,
            chef_server_url: url.to_owned(),
            validation_client_name: c.validation_client_name.clone(),
            validation_key,
            environment: c.environment.clone(),
            install_command: c.install_command.clone(),
            run_list: c.run_list.clone(),
            policy,
            log_level: c.log_level.clone(),
            log_location: c.log_location.clone(),
            server,
        })
    }

    /// The Chef node (and API client) name of `vm`: the VM name.
    pub fn node_name(vm: &VmName) -> String {
        vm.to_string()
    }

    /// The Chef server client used for cleaning up, when configured.
    pub fn server(&self) -> Option<&ChefServerClient> {
        self.server.as_ref()
    }
}

#[async_trait]
impl Bootstrapper for ChefBootstrapper {
    fn backend(&self) -> &str {
        "chef"
    }

    async fn guest_setup(&self, _target: &BootstrapTarget) -> Result<GuestSetup> {
        Ok(self.ssh.guest_setup())
    }

    async fn bootstrap(
        &self,
        target: &BootstrapTarget,
        progress: &Progress,
    ) -> Result<BootstrapReport> {
        let node = Self::node_name(&target.vm);
        let run_list = if target.settings.run_list.is_empty() {
            self.run_list.clone()
        } else {
            target.settings.run_list.clone()
        };
        let environment = target
            .settings
            .environment
            .clone()
            .or_else(|| self.environment.clone());
        if let Some(env) = &environment {
            check_chef_name("environment", env)?;
        }
        let redactor = Redactor::new(&[self.validation_key.expose_secret()]);
        let session = self.ssh.connect(target, progress).await?;
        let result = async {
            if let Some(cmd) = &self.install_command {
                progress.message("running the install command");
                run_step(&session, "install_command", cmd, None, progress, &redactor).await?;
            }
            let mkdir = format!(
                "mkdir -p {} && chmod 0755 {}",
                sh_quote(CHEF_DIR),
                sh_quote(CHEF_DIR)
            );
            run_step(
                &session,
                "creating /etc/chef",
                &mkdir,
                None,
                progress,
                &redactor,
            )
            .await?;
            let mut pem = self.validation_key.expose_secret().as_bytes().to_vec();
            if !pem.ends_with(b"\n") {
                pem.push(b'\n');
            }
            session.upload(VALIDATION_PEM, 0o600, &pem).await?;
            progress.message(format!("wrote {VALIDATION_PEM} (mode 0600)"));
            let rb = client_rb(
                &self.chef_server_url,
                &self.validation_client_name,
                &node,
                &self.log_level,
                &self.log_location,
            );
            session.upload(CLIENT_RB, 0o644, rb.as_bytes()).await?;
            progress.message(format!("wrote {CLIENT_RB} (node_name {node})"));
            let policy = self.policy.as_ref().map(|(n, g)| (n.as_str(), g.as_str()));
            let mut json = first_boot_json(&run_list, policy, &target.settings.attributes);
            // The node's ownership record (a normal attribute chef-client saves on the
            // node), which `unregister` checks before it deletes anything.
            if let Value::Object(doc) = &mut json {
                let devvm = doc
                    .entry("devvm")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !devvm.is_object() {
                    *devvm = Value::Object(Map::new());
                }
                if let Value::Object(d) = devvm {
                    d.insert(
                        "request_id".into(),
                        Value::String(target.request_id.as_str().to_owned()),
                    );
                }
            }
            let mut body = serde_json::to_vec_pretty(&json)
                .map_err(|e| Error::backend("cannot encode first-boot.json").with_source(e))?;
            body.push(b'\n');
            session.upload(FIRST_BOOT, 0o600, &body).await?;
            progress.message(format!(
                "wrote {FIRST_BOOT} (run list [{}])",
                run_list.join(", ")
            ));
            let mut cmd = format!("chef-client -j {}", sh_quote(FIRST_BOOT));
            if let Some(env) = &environment {
                cmd.push_str(&format!(" -E {}", sh_quote(env)));
            }
            progress.message(format!("running {cmd}"));
            run_step(&session, "chef-client", &cmd, None, progress, &redactor).await?;
            // The node has its own client key now: the validator key leaves the guest
            // (what the chef-client cookbook's delete_validation does).
            let rm = format!("rm -f {}", sh_quote(VALIDATION_PEM));
            run_step(
                &session,
                "delete_validation",
                &rm,
                None,
                progress,
                &redactor,
            )
            .await?;
            progress.message(format!("removed {VALIDATION_PEM} (delete_validation)"));
            Ok::<(), Error>(())
        }
        .await;
        session.close().await;
        result?;
        Ok(BootstrapReport {
            bootstrapped: true,
            summary: format!(
                "chef-client converged node {node} (run list [{}]{})",
                run_list.join(", "),
                environment
                    .map(|e| format!(", environment {e}"))
                    .unwrap_or_default()
            ),
        })
    }

    /// Deletes the node (and its API client) only if the node's normal attribute
    /// `devvm.request_id` names `owner`. A node of another request, or one without that
    /// attribute, is left alone with its client. No node is `Absent`: a client without
    /// a node cannot be proven to be this run's, so it is left alone too.
    async fn unregister(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        let Some(server) = self.server.clone() else {
            return Ok(Undone::Absent);
        };
        let name = Self::node_name(vm);
        let delete_client = server.delete_client;
        let owner = owner.clone();
        tokio::task::spawn_blocking(move || {
            let Some(node) = server.get_json(&format!("/nodes/{name}"))? else {
                return Ok(Undone::Absent);
            };
            match node
                .pointer("/normal/devvm/request_id")
                .and_then(Value::as_str)
            {
                Some(r) if r == owner.as_str() => {}
                Some(r) => return Ok(Undone::foreign(r)),
                None => {
                    return Ok(Undone::foreign(
                        "a node without devvm's request id (not bootstrapped by devvm)",
                    ));
                }
            }
            server.delete(&format!("/nodes/{name}"))?;
            if delete_client {
                server.delete(&format!("/clients/{name}"))?;
            }
            Ok(Undone::Removed)
        })
        .await
        .map_err(|e| Error::backend("chef server worker failed").with_source(e))?
        .map_err(|e: Error| e.with_backend("chef"))
    }
}

// ---------------------------------------------------------------------------------------
// Chef server API (just enough to clean up), with v1.3 request signing

/// A minimal Chef server API client: signed (X-Ops-Sign version 1.3, RSA with SHA-256)
/// when it has a client name and key, unsigned otherwise. Blocking; call it from
/// `spawn_blocking`.
#[derive(Clone)]
pub struct ChefServerClient {
    /// `scheme://host[:port]`.
    origin: String,
    /// The URL's path (`/organizations/acme`), without a trailing slash.
    prefix: String,
    signer: Option<Arc<(String, ring::signature::RsaKeyPair)>>,
    agent: ureq::Agent,
    delete_client: bool,
}

impl fmt::Debug for ChefServerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChefServerClient")
            .field("url", &format!("{}{}", self.origin, self.prefix))
            .field("client_name", &self.signer.as_ref().map(|s| s.0.as_str()))
            .finish_non_exhaustive()
    }
}

/// Decodes a PEM RSA private key (PKCS#1 `RSA PRIVATE KEY` or PKCS#8 `PRIVATE KEY`).
fn rsa_key_from_pem(pem: &str) -> Result<ring::signature::RsaKeyPair> {
    let bad = || Error::invalid_input("the chef client key is not a PEM RSA private key");
    let pkcs1 = pem.contains("BEGIN RSA PRIVATE KEY");
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----") && !l.contains(':'))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|_| bad())?;
    let key = if pkcs1 {
        ring::signature::RsaKeyPair::from_der(&der)
    } else {
        ring::signature::RsaKeyPair::from_pkcs8(&der)
    };
    key.map_err(|_| bad())
}

/// The canonical path Chef signs: repeated slashes squeezed, no trailing slash.
pub fn canonical_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    if out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Base64 of the SHA-256 of `body` (`X-Ops-Content-Hash`).
pub fn content_hash(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body))
}

/// The string a v1.3 request signature covers.
pub fn canonical_request_v13(
    method: &str,
    path: &str,
    content_hash: &str,
    timestamp: &str,
    user_id: &str,
    server_api_version: &str,
) -> String {
    format!(
        "Method:{}\nPath:{}\nX-Ops-Content-Hash:{content_hash}\nX-Ops-Sign:version=1.3\n\
         X-Ops-Timestamp:{timestamp}\nX-Ops-UserId:{user_id}\nX-Ops-Server-API-Version:{server_api_version}",
        method.to_ascii_uppercase(),
        canonical_path(path),
    )
}

const SERVER_API_VERSION: &str = "1";

impl ChefServerClient {
    fn from_config(c: &ChefServerAdminConfig, default_url: &str, base_dir: &Path) -> Result<Self> {
        let url = c
            .url
            .as_deref()
            .unwrap_or(default_url)
            .trim_end_matches('/');
        let Some(rest) = url
            .strip_prefix("http://")
            .map(|r| ("http://", r))
            .or_else(|| url.strip_prefix("https://").map(|r| ("https://", r)))
        else {
            return Err(Error::invalid_input(format!(
                "chef server url {url:?} must start with http:// or https://"
            )));
        };
        let (scheme, rest) = rest;
        let (host, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(Error::invalid_input(format!(
                "chef server url {url:?} has no host"
            )));
        }
        let signer = match (&c.client_name, &c.client_key) {
            (Some(name), Some(key)) => {
                check_chef_name("server_admin.client_name", name)?;
                let pem = key.resolve(base_dir)?;
                Some(Arc::new((
                    name.clone(),
                    rsa_key_from_pem(pem.expose_secret())?,
                )))
            }
            (None, None) => None,
            _ => {
                return Err(Error::invalid_input(
                    "server_admin.client_name and client_key go together",
                ));
            }
        };
        if c.timeout_secs == 0 {
            return Err(Error::invalid_input(
                "server_admin.timeout_secs must be at least 1",
            ));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent("devvm")
            .timeout_global(Some(Duration::from_secs(c.timeout_secs)))
            .build()
            .into();
        Ok(ChefServerClient {
            origin: format!("{scheme}{host}"),
            prefix: canonical_path(prefix).trim_end_matches('/').to_owned(),
            signer,
            agent,
            delete_client: c.delete_client,
        })
    }

    /// A client for `url` (unsigned when `signer` is None: `(client name, PEM key)`).
    pub fn new(url: &str, signer: Option<(&str, &SecretString)>) -> Result<Self> {
        let c = ChefServerAdminConfig {
            url: Some(url.to_owned()),
            client_name: signer.map(|(n, _)| n.to_owned()),
            client_key: signer.map(|(_, k)| SecretSpec::Inline(k.expose_secret().to_owned())),
            delete_client: true,
            timeout_secs: default_http_timeout(),
        };
        Self::from_config(&c, url, Path::new("."))
    }

    /// Whether requests are signed.
    pub fn signs(&self) -> bool {
        self.signer.is_some()
    }

    /// The signing headers of a request (empty when unsigned).
    fn auth_headers(&self, method: &str, path: &str, body: &[u8]) -> Result<Vec<(String, String)>> {
        let Some(signer) = &self.signer else {
            return Ok(Vec::new());
        };
        let (user, key) = (&signer.0, &signer.1);
        let now = time::OffsetDateTime::now_utc();
        let timestamp = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let hash = content_hash(body);
        let canonical =
            canonical_request_v13(method, path, &hash, &timestamp, user, SERVER_API_VERSION);
        let mut sig = vec![0u8; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            canonical.as_bytes(),
            &mut sig,
        )
        .map_err(|_| Error::backend("cannot sign a chef server request"))?;
        let sig = base64::engine::general_purpose::STANDARD.encode(sig);
        let mut headers = vec![
            (
                "X-Ops-Sign".to_owned(),
                "algorithm=sha256;version=1.3".to_owned(),
            ),
            ("X-Ops-Userid".to_owned(), user.clone()),
            ("X-Ops-Timestamp".to_owned(), timestamp),
            ("X-Ops-Content-Hash".to_owned(), hash),
        ];
        for (i, chunk) in sig.as_bytes().chunks(60).enumerate() {
            headers.push((
                format!("X-Ops-Authorization-{}", i + 1),
                String::from_utf8_lossy(chunk).into_owned(),
            ));
        }
        Ok(headers)
    }

    /// Sends `method path` (relative to the server URL, e.g. `/nodes/web-1`) with an
    /// optional JSON body; returns the status and the body. Transport failures are
    /// [`ErrorKind::Unavailable`]; HTTP statuses are returned, not mapped.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Vec<u8>)> {
        let full_path = format!("{}{}", self.prefix, path);
        let url = format!("{}{}", self.origin, full_path);
        let body_bytes = body.unwrap_or(b"");
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Accept", "application/json")
            .header("X-Chef-Version", "12.0.0")
            .header("X-Ops-Server-API-Version", SERVER_API_VERSION);
        if body.is_some() {
            req = req.header("Content-Type", "application/json");
        }
        for (k, v) in self.auth_headers(method, &full_path, body_bytes)? {
            req = req.header(k, v);
        }
        let req = req.body(body_bytes.to_vec()).map_err(|e| {
            Error::invalid_input(format!("bad chef server request {method} {url}")).with_source(e)
        })?;
        let mut resp = self.agent.run(req).map_err(|e| {
            let kind = match e {
                ureq::Error::Timeout(_) => ErrorKind::Timeout,
                _ => ErrorKind::Unavailable,
            };
            Error::new(
                kind,
                format!("cannot reach the chef server at {}", self.origin),
            )
            .with_source(e)
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .unwrap_or_default();
        Ok((status, text))
    }

    /// `GET path` as JSON; `None` when the server answers 404.
    pub fn get_json(&self, path: &str) -> Result<Option<Value>> {
        let (status, body) = self.request("GET", path, None)?;
        match status {
            200..=299 => serde_json::from_slice(&body).map(Some).map_err(|e| {
                Error::backend(format!(
                    "the chef server's answer to GET {path} is not JSON"
                ))
                .with_source(e)
            }),
            404 => Ok(None),
            401 | 403 => Err(Error::unauthorized(format!(
                "the chef server refused GET {path} (HTTP {status})"
            ))),
            408 | 429 | 500..=599 => Err(Error::unavailable(format!(
                "the chef server could not answer GET {path} (HTTP {status})"
            ))),
            _ => Err(Error::backend(format!(
                "the chef server answered GET {path} with HTTP {status}"
            ))),
        }
    }

    /// `DELETE path`; returns whether something was deleted (404 is success: it is gone).
    pub fn delete(&self, path: &str) -> Result<bool> {
        let (status, _) = self.request("DELETE", path, None)?;
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            401 | 403 => Err(Error::unauthorized(format!(
                "the chef server refused DELETE {path} (HTTP {status})"
            ))),
            408 | 429 | 500..=599 => Err(Error::unavailable(format!(
                "the chef server could not DELETE {path} (HTTP {status})"
            ))),
            _ => Err(Error::backend(format!(
                "the chef server answered DELETE {path} with HTTP {status}"
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shell

/// The `[bootstrap]` section for `backend = "shell"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellConfig {
    /// The provisioner's SSH private key (unencrypted OpenSSH format).
    pub ssh_key: PathBuf,
    /// SSH port (default 22).
    #[serde(default = "default_port")]
    pub ssh_port: u16,
    /// SSH user (default `root`).
    #[serde(default = "default_user")]
    pub ssh_user: String,
    /// How long to keep trying to log in, in seconds (default 60).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// **Unsafe.** Accept any SSH host key when the provisioner did not generate the
    /// guest's (default false).
    #[serde(default)]
    pub accept_unknown_host_key: bool,
    /// The script, inline. Exactly one of `script` and `script_file`.
    #[serde(default)]
    pub script: Option<String>,
    /// A file holding the script (read when the bootstrapper is made).
    #[serde(default)]
    pub script_file: Option<PathBuf>,
}

/// Runs a shell script on the guest over SSH (`sh -s`, the script on stdin, with
/// `DEVVM_VM`, `DEVVM_FQDN`, `DEVVM_IP`, `DEVVM_OWNER`, `DEVVM_RUN_LIST` and
/// `DEVVM_ENVIRONMENT` set). Unregistering does nothing.
pub struct ShellBootstrapper {
    ssh: SshAccess,
    script: Vec<u8>,
}

impl fmt::Debug for ShellBootstrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShellBootstrapper")
            .field("ssh", &self.ssh)
            .field("script_bytes", &self.script.len())
            .finish()
    }
}

impl ShellBootstrapper {
    /// A bootstrapper from its config section; relative paths are resolved against
    /// `base_dir`.
    pub fn from_config(c: &ShellConfig, base_dir: &Path) -> Result<Self> {
        let ssh = SshAccess::new(
            &c.ssh_key,
            base_dir,
            c.ssh_port,
            &c.ssh_user,
            c.connect_timeout_secs,
            c.accept_unknown_host_key,
        )?;
        let script = match (&c.script, &c.script_file) {
            (Some(s), None) => s.clone().into_bytes(),
            (None, Some(f)) => {
                let path = base_dir.join(f);
                std::fs::read(&path).map_err(|e| {
                    Error::invalid_input(format!("cannot read script_file {}", path.display()))
                        .with_source(e)
                })?
            }
            _ => {
                return Err(Error::invalid_input(
                    "set exactly one of script and script_file",
                ));
            }
        };
        Ok(ShellBootstrapper { ssh, script })
    }
}

#[async_trait]
impl Bootstrapper for ShellBootstrapper {
    fn backend(&self) -> &str {
        "shell"
    }

    async fn guest_setup(&self, _target: &BootstrapTarget) -> Result<GuestSetup> {
        Ok(self.ssh.guest_setup())
    }

    async fn bootstrap(
        &self,
        target: &BootstrapTarget,
        progress: &Progress,
    ) -> Result<BootstrapReport> {
        let session = self.ssh.connect(target, progress).await?;
        let vars = [
            ("DEVVM_VM", target.vm.to_string()),
            ("DEVVM_FQDN", target.fqdn.clone()),
            ("DEVVM_IP", target.ip.to_string()),
            ("DEVVM_OWNER", target.owner.name.to_string()),
            ("DEVVM_RUN_LIST", target.settings.run_list.join(",")),
            (
                "DEVVM_ENVIRONMENT",
                target.settings.environment.clone().unwrap_or_default(),
            ),
        ];
        let mut cmd = String::new();
        for (k, v) in vars {
            cmd.push_str(&format!("{k}={} ", sh_quote(&v)));
        }
        cmd.push_str("sh -s");
        let redactor = Redactor::new(&[]);
        let result = run_step(
            &session,
            "the bootstrap script",
            &cmd,
            Some(&self.script),
            progress,
            &redactor,
        )
        .await;
        session.close().await;
        result?;
        Ok(BootstrapReport {
            bootstrapped: true,
            summary: format!("bootstrap script ran on {}", target.vm),
        })
    }

    async fn unregister(&self, _vm: &VmName, _owner: &RequestId) -> Result<Undone> {
        Ok(Undone::Absent)
    }
}

/// Registers the `chef` and `shell` bootstrappers in the `[bootstrap]` section.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    r.register_bootstrap("chef", |ctx| {
        let o: ChefConfig = ctx.options()?;
        Ok(std::sync::Arc::new(ChefBootstrapper::from_config(
            &o,
            ctx.base_dir,
        )?))
    });
    r.register_bootstrap("shell", |ctx| {
        let o: ShellConfig = ctx.options()?;
        Ok(std::sync::Arc::new(ShellBootstrapper::from_config(
            &o,
            ctx.base_dir,
        )?))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruby_strings_escape_backslashes_and_quotes() {
        assert_eq!(ruby_string("plain"), "'plain'");
        assert_eq!(ruby_string("it's"), r"'it\'s'");
        assert_eq!(ruby_string(r"C:\chef\"), r"'C:\\chef\\'");
        assert_eq!(ruby_string(r"\'"), r"'\\\''");
        assert_eq!(ruby_string(""), "''");
    }

    #[test]
    fn client_rb_has_the_bootstrap_lines() {
        let rb = client_rb(
            "https://chef.example/organizations/acme",
            "acme-validator",
            "web-1",
            "info",
            "STDOUT",
        );
        assert!(
            rb.contains("chef_server_url 'https://chef.example/organizations/acme'\n"),
            "{rb}"
        );
        assert!(rb.contains("validation_client_name 'acme-validator'\n"));
        assert!(rb.contains("validation_key '/etc/chef/validation.pem'\n"));
        assert!(rb.contains("node_name 'web-1'\n"));
        assert!(rb.contains("log_level :info\nlog_location STDOUT\n"));
        let rb = client_rb("http://x", "v", "n", "warn", "/var/log/chef client's.log");
        assert!(
            rb.contains(r"log_location '/var/log/chef client\'s.log'"),
            "{rb}"
        );
    }

    #[test]
    fn first_boot_json_merges_attributes_under_the_run_list() {
        let mut attrs = Map::new();
        attrs.insert("run_list".into(), Value::String("ignored".into()));
        attrs.insert("app".into(), serde_json::json!({"port": 8080}));
        let doc = first_boot_json(&["role[web]".into()], Some(("web", "dev")), &attrs);
        assert_eq!(
            doc,
            serde_json::json!({"app": {"port": 8080}, "run_list": ["role[web]"], "policy_name": "web", "policy_group": "dev"})
        );
        assert_eq!(
            first_boot_json(&[], None, &Map::new()),
            serde_json::json!({"run_list": []})
        );
    }

    #[test]
    fn chef_v13_canonical_request() {
        assert_eq!(
            canonical_path("//organizations//acme/nodes/"),
            "/organizations/acme/nodes"
        );
        assert_eq!(canonical_path(""), "/");
        assert_eq!(
            content_hash(b""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        let c = canonical_request_v13(
            "delete",
            "/nodes/web-1/",
            "HASH",
            "2024-01-02T03:04:05Z",
            "admin",
            "1",
        );
        assert_eq!(
            c,
            "Method:DELETE\nPath:/nodes/web-1\nX-Ops-Content-Hash:HASH\nX-Ops-Sign:version=1.3\n\
             X-Ops-Timestamp:2024-01-02T03:04:05Z\nX-Ops-UserId:admin\nX-Ops-Server-API-Version:1"
        );
    }

    #[test]
    fn redactor_withholds_key_lines() {
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAzGmH2wK6example0123456789\nshort\n-----END RSA PRIVATE KEY-----\n";
        let r = Redactor::new(&[key]);
        assert_eq!(r.clean("hello"), "hello");
        assert!(
            r.clean("x MIIEowIBAAKCAQEAzGmH2wK6example0123456789 y")
                .contains("withheld")
        );
        assert_eq!(r.clean("short"), "short");
        assert_eq!(
            r.clean("-----BEGIN RSA PRIVATE KEY-----"),
            "-----BEGIN RSA PRIVATE KEY-----"
        );
    }

    #[test]
    fn unsigned_and_bad_server_configs() {
        let c =
            ChefServerClient::new("http://127.0.0.1:4545/organizations/acme/", None).expect("ok");
        assert!(!c.signs());
        assert_eq!(c.origin, "http://127.0.0.1:4545");
        assert_eq!(c.prefix, "/organizations/acme");
        assert!(ChefServerClient::new("ftp://x", None).is_err());
        let bad = SecretString::from(
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----".to_owned(),
        );
        let e = ChefServerClient::new("http://x", Some(("admin", &bad))).expect_err("bad key");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(!e.to_string().contains("AAAA"));
    }
}
