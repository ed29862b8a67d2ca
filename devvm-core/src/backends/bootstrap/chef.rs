//! The Chef bootstrapper: what `knife bootstrap` leaves on the node (rendered sans-I/O),
//! over SSH, and the node's ownership record.

use super::*;

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

pub(super) fn yes() -> bool {
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

pub(super) const CHEF_DIR: &str = "/etc/chef";
pub(super) const VALIDATION_PEM: &str = "/etc/chef/validation.pem";
pub(super) const CLIENT_RB: &str = "/etc/chef/client.rb";
pub(super) const FIRST_BOOT: &str = "/etc/chef/first-boot.json";
/// The line the bootstrap script prints once the files in /etc/chef are written.
pub(super) const CHEF_FILES_WRITTEN: &str = "devvm: /etc/chef written; running chef-client";
/// The line the bootstrap script prints between a successful chef-client and the
/// removal of the validation key.
pub(super) const CHEF_SUCCEEDED: &str = "devvm: chef-client succeeded; removing the validation key";

pub(super) fn check_chef_name(what: &'static str, s: &str) -> Result<()> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(ChefError::BadName {
            what,
            name: s.to_owned(),
        }
        .into());
    }
    Ok(())
}

/// Bootstraps Chef on the guest over SSH, like `knife bootstrap`.
pub struct ChefBootstrapper {
    pub(super) ssh: SshAccess,
    pub(super) chef_server_url: String,
    pub(super) validation_client_name: String,
    pub(super) validation_key: SecretString,
    pub(super) environment: Option<String>,
    pub(super) install_command: Option<String>,
    pub(super) run_list: Vec<String>,
    pub(super) policy: Option<(String, String)>,
    pub(super) log_level: String,
    pub(super) log_location: String,
    pub(super) server: Option<ChefServerClient>,
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
    ///
    /// [`ErrorKind::InvalidInput`]: crate::ErrorKind::InvalidInput
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
            return Err(ChefError::ServerUrlScheme(url.to_owned()).into());
        }
        check_chef_name("validation_client_name", &c.validation_client_name)?;
        if let Some(env) = &c.environment {
            check_chef_name("environment", env)?;
        }
        let levels: &'static [&'static str] =
            &["auto", "trace", "debug", "info", "warn", "error", "fatal"];
        if !levels.contains(&c.log_level.as_str()) {
            return Err(ChefError::LogLevel {
                level: c.log_level.clone(),
                levels,
            }
            .into());
        }
        if c.log_location.is_empty() || c.log_location.contains(['\n', '\r']) {
            return Err(ChefError::LogLocation.into());
        }
        let policy = match (&c.policy_name, &c.policy_group) {
            (Some(n), Some(g)) => Some((n.clone(), g.clone())),
            (None, None) => None,
            _ => {
                return Err(ChefError::PolicyHalf.into());
            }
        };
        let validation_key = c.validation_key.resolve(base_dir)?;
        if !validation_key.expose_secret().contains("PRIVATE KEY") {
            return Err(ChefError::ValidationKeyNotPem.into());
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
            let mut pem = self.validation_key.expose_secret().as_bytes().to_vec();
            if !pem.ends_with(b"\n") {
                pem.push(b'\n');
            }
            let rb = client_rb(
                &self.chef_server_url,
                &self.validation_client_name,
                &node,
                &self.log_level,
                &self.log_location,
            );
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
            let mut body = serde_json::to_vec_pretty(&json).map_err(ChefError::FirstBootJson)?;
            body.push(b'\n');
            let mut cmd = format!("chef-client -j {}", sh_quote(FIRST_BOOT));
            if let Some(env) = &environment {
                cmd.push_str(&format!(" -E {}", sh_quote(env)));
            }
            // One script, one round trip, as knife's bootstrap script: /etc/chef and the
            // three files (the validation key on the command's input only), chef-client,
            // and once it has succeeded (the node has its own client key now) the
            // validator key leaves the guest (what the chef-client cookbook's
            // delete_validation does). The markers between them tell how far it got.
            let mut script = GuestScript::new();
            script
                .command(&mkdir)
                .file(VALIDATION_PEM, 0o600, &pem)?
                .file(CLIENT_RB, 0o644, rb.as_bytes())?
                .file(FIRST_BOOT, 0o600, &body)?
                .marker(CHEF_FILES_WRITTEN)
                .command(&cmd)
                .marker(CHEF_SUCCEEDED)
                .command(&format!("rm -f {}", sh_quote(VALIDATION_PEM)));
            let mut reached = "writing the files in /etc/chef";
            let outcome = session
                .run_script(
                    &script,
                    &mut |stream: OutputStream, line: &str| match (stream, line) {
                        // A marker may follow output that did not end its line.
                        (OutputStream::Stdout, l) if l.ends_with(CHEF_FILES_WRITTEN) => {
                            progress.message(format!("wrote {VALIDATION_PEM} (mode 0600)"));
                            progress.message(format!("wrote {CLIENT_RB} (node_name {node})"));
                            progress.message(format!(
                                "wrote {FIRST_BOOT} (run list [{}])",
                                run_list.join(", ")
                            ));
                            progress.message(format!("running {cmd}"));
                            reached = "chef-client";
                        }
                        (OutputStream::Stdout, l) if l.ends_with(CHEF_SUCCEEDED) => {
                            reached = "delete_validation"
                        }
                        _ => progress.message(redactor.clean(line).into_owned()),
                    },
                )
                .await?;
            if !outcome.success() {
                return Err(BootstrapError::StepFailed {
                    what: reached.to_owned(),
                    ended: outcome.describe(),
                    line: outcome.error_line().map(|l| redactor.clean(l).into_owned()),
                }
                .into());
            }
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
        .map_err(ChefError::Worker)?
    }
}
