//! The shell bootstrapper: a script run over SSH.

use super::*;

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
    pub(super) ssh: SshAccess,
    pub(super) script: Vec<u8>,
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
                std::fs::read(&path).map_err(|source| ShellError::ScriptFile { path, source })?
            }
            _ => {
                return Err(ShellError::ScriptChoice.into());
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
