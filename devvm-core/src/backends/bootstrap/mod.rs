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
//! `delete_validation` does: the node has its own client key now). All of that is one
//! script sent on one command's input ([`GuestScript`]), as knife
//! sends its bootstrap script: one round trip to the guest after logging in (an
//! `install_command` is a command of its own before it). A failure names the part that
//! failed (writing the files, `chef-client`, `delete_validation`). The node name (and
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

use crate::error::{Error, Result};
use crate::events::Progress;
use crate::secret::SecretSpec;
use crate::seed::GuestSetup;
use crate::traits::Bootstrapper;
use crate::types::{BootstrapReport, BootstrapTarget, RequestId, Undone, VmName};

use super::ssh::{
    GuestScript, HostKeyCheck, OutputStream, SshOptions, SshSession, authorized_key_line,
    load_private_key, sh_quote,
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
            return Err(BootstrapError::ZeroConnectTimeout.into());
        }
        if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(BootstrapError::BadUser(user.to_owned()).into());
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
            None => Err(BootstrapError::UnknownHostKey(target.vm.clone()).into()),
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
///
/// [`ErrorKind::Backend`]: crate::ErrorKind::Backend
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
    Err(BootstrapError::StepFailed {
        what: what.to_owned(),
        ended: outcome.describe(),
        line: outcome.error_line().map(|l| redactor.clean(l).into_owned()),
    }
    .into())
}

mod chef;
mod error;
mod server;
mod shell;

use chef::*;
pub use chef::{
    ChefBootstrapper, ChefConfig, ChefServerAdminConfig, client_rb, first_boot_json, ruby_string,
};
use error::{BootstrapError, ChefError, ShellError};
pub use server::{ChefServerClient, canonical_path, canonical_request_v13, content_hash};
pub use shell::{ShellBootstrapper, ShellConfig};

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
    use crate::error::ErrorKind;

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
        let e = ChefServerClient::new("ftp://x", None).expect_err("ftp");
        assert!(
            matches!(e.detail(), Some(ChefError::AdminUrlScheme(u)) if u == "ftp://x"),
            "{e}"
        );
        assert_eq!(e.backend_name(), Some("chef"));
        let bad = SecretString::from(
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----".to_owned(),
        );
        let e = ChefServerClient::new("http://x", Some(("admin", &bad))).expect_err("bad key");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(matches!(e.detail(), Some(ChefError::ClientKey)), "{e}");
        assert!(!e.to_string().contains("AAAA"));
    }

    #[test]
    fn chef_server_statuses_map_to_kinds() {
        for (status, kind, retryable) in [
            (401, ErrorKind::Unauthorized, false),
            (503, ErrorKind::Unavailable, true),
            (418, ErrorKind::Backend, false),
        ] {
            let e = server::status_error("DELETE", "/nodes/web-1", status);
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(e.is_retryable(), retryable, "{e}");
            assert_eq!(e.backend_name(), Some("chef"));
            assert!(e.message().contains("DELETE /nodes/web-1"), "{e}");
        }
        let e = server::status_error("GET", "/nodes/web-1", 403);
        assert!(
            matches!(e.detail(), Some(ChefError::Refused { method: "GET", path, status: 403 }) if path == "/nodes/web-1"),
            "{e}"
        );
    }

    #[test]
    fn shared_ssh_settings_name_no_backend() {
        // Shared by chef and shell: the pipeline names the bootstrapper that failed.
        let e = SshAccess::new(Path::new("k"), Path::new("/"), 22, "root", 0, false)
            .expect_err("zero timeout");
        assert!(
            matches!(e.detail(), Some(BootstrapError::ZeroConnectTimeout)),
            "{e}"
        );
        assert_eq!(e.backend_name(), None);
        let e = SshAccess::new(Path::new("k"), Path::new("/"), 22, "ro ot", 60, false)
            .expect_err("bad user");
        assert!(
            matches!(e.detail(), Some(BootstrapError::BadUser(u)) if u == "ro ot"),
            "{e}"
        );
    }

    #[test]
    fn shell_settings_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = crate::seed::HostKey::generate().expect("key");
        std::fs::write(dir.path().join("k"), key.private.expose_secret()).expect("write");
        std::fs::set_permissions(
            dir.path().join("k"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        let c: ShellConfig = toml::from_str("ssh_key = \"k\"").expect("config");
        let e = ShellBootstrapper::from_config(&c, dir.path()).expect_err("no script");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(matches!(e.detail(), Some(ShellError::ScriptChoice)), "{e}");
        assert_eq!(e.backend_name(), Some("shell"));
        let c: ShellConfig =
            toml::from_str("ssh_key = \"k\"\nscript_file = \"nope.sh\"").expect("config");
        let e = ShellBootstrapper::from_config(&c, dir.path()).expect_err("no script file");
        assert!(
            matches!(e.detail(), Some(ShellError::ScriptFile { path, .. }) if path == &dir.path().join("nope.sh")),
            "{e}"
        );
        // Without a readable key nothing else is looked at.
        let c: ShellConfig = toml::from_str("ssh_key = \"missing\"").expect("config");
        let e = ShellBootstrapper::from_config(&c, dir.path()).expect_err("no key");
        assert!(
            matches!(
                e.detail(),
                Some(crate::backends::ssh::SshError::KeyRead { .. })
            ),
            "{e}"
        );
    }
}
