//! [`Bootstrapper`] through cloud-init: everything goes into the guest's NoCloud `cidata`
//! seed (meta-data, user-data, network-config v2) before it boots, and no SSH step runs.
//!
//! The cloud-config entries come from the config (`cloud_config`, any cloud-config keys)
//! and, when `chef` is configured, cloud-init's own `chef` module is filled in with the
//! request's run list and environment — cloud-init then does what `knife bootstrap` does,
//! from inside the guest. The seed is mode 0600 and, because the Chef validation key
//! travels in it, detached from the domain and deleted as soon as the bootstrap step
//! finished ([`Hypervisor::discard_seed`](crate::Hypervisor::discard_seed)): cloud-init
//! reads and caches its datasource at boot, before the guest answers on SSH.
//!
//! `bootstrap` reports `bootstrapped: true` once the seed was delivered (the domain step
//! only finishes after the guest booted with it); whether cloud-init's modules succeeded
//! is the guest's business, as with any cloud-init image.

use std::path::Path;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::Result;
use crate::events::Progress;
use crate::secret::SecretSpec;
use crate::seed::GuestSetup;
use crate::traits::Bootstrapper;
use crate::types::{BootstrapReport, BootstrapTarget, RequestId, Undone, VmName};

const BACKEND: &str = "cloud-init";

/// What can go wrong in the cloud-init bootstrapper's config; `?` turns it into the
/// public [`Error`](crate::Error).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloudInitError {
    #[error("cloud_config must be a table")]
    NotATable,
    #[error("cloud_config may not set {0}: devvm sets it for every guest")]
    Reserved(&'static str),
}

impl crate::error::BackendError for CloudInitError {
    const BACKEND: &'static str = BACKEND;

    fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::InvalidInput
    }
}

/// cloud-init's `chef` module settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitChef {
    /// `server_url`.
    pub server_url: String,
    /// `validation_name`.
    pub validation_name: String,
    /// `validation_cert`: the validation key (a secret).
    pub validation_key: SecretSpec,
    /// Default environment when the request names none.
    #[serde(default)]
    pub environment: Option<String>,
    /// Default run list when the request gives none.
    #[serde(default)]
    pub run_list: Vec<String>,
}

/// The `[bootstrap]` section for `backend = "cloud-init"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitConfig {
    /// Extra top-level cloud-config entries (`packages`, `runcmd`, `write_files`, ...).
    #[serde(default)]
    pub cloud_config: toml::Table,
    /// Fill in cloud-init's `chef` module.
    #[serde(default)]
    pub chef: Option<CloudInitChef>,
}

/// Bootstraps through the first-boot seed only.
pub struct CloudInitBootstrapper {
    entries: Map<String, Value>,
    chef: Option<(CloudInitChef, SecretString)>,
}

impl std::fmt::Debug for CloudInitBootstrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudInitBootstrapper")
            .field("entries", &self.entries.keys().collect::<Vec<_>>())
            .field(
                "chef_server",
                &self.chef.as_ref().map(|(c, _)| &c.server_url),
            )
            .finish()
    }
}

impl CloudInitBootstrapper {
    /// From its config section; a relative validation key file is resolved against
    /// `base_dir`.
    pub fn from_config(c: &CloudInitConfig, base_dir: &Path) -> Result<Self> {
        let entries = match serde_json::to_value(&c.cloud_config) {
            Ok(Value::Object(m)) => m,
            _ => return Err(CloudInitError::NotATable.into()),
        };
        for reserved in ["ssh_keys", "hostname", "fqdn"] {
            if entries.contains_key(reserved) {
                return Err(CloudInitError::Reserved(reserved).into());
            }
        }
        let chef = match &c.chef {
            Some(chef) => Some((chef.clone(), chef.validation_key.resolve(base_dir)?)),
            None => None,
        };
        Ok(CloudInitBootstrapper { entries, chef })
    }

    /// The cloud-config entries for `target` (pure; the Chef key included).
    pub fn cloud_config(&self, target: &BootstrapTarget) -> Map<String, Value> {
        let mut m = self.entries.clone();
        if let Some((chef, key)) = &self.chef {
            let run_list = if target.settings.run_list.is_empty() {
                chef.run_list.clone()
            } else {
                target.settings.run_list.clone()
            };
            let mut c = Map::new();
            c.insert("install_type".into(), "omnibus".into());
            c.insert("server_url".into(), chef.server_url.clone().into());
            c.insert("node_name".into(), target.fqdn.clone().into());
            c.insert(
                "validation_name".into(),
                chef.validation_name.clone().into(),
            );
            c.insert(
                "validation_cert".into(),
                key.expose_secret().to_owned().into(),
            );
            c.insert(
                "run_list".into(),
                Value::Array(run_list.into_iter().map(Value::String).collect()),
            );
            if let Some(env) = target
                .settings
                .environment
                .clone()
                .or_else(|| chef.environment.clone())
            {
                c.insert("environment".into(), env.into());
            }
            if !target.settings.attributes.is_empty() {
                c.insert(
                    "initial_attributes".into(),
                    Value::Object(target.settings.attributes.clone()),
                );
            }
            m.insert("chef".into(), Value::Object(c));
        }
        m
    }
}

#[async_trait]
impl Bootstrapper for CloudInitBootstrapper {
    fn backend(&self) -> &str {
        BACKEND
    }

    async fn guest_setup(&self, target: &BootstrapTarget) -> Result<GuestSetup> {
        Ok(GuestSetup {
            host_key: false,
            authorized_keys: Vec::new(),
            cloud_config: self.cloud_config(target),
        })
    }

    async fn bootstrap(
        &self,
        target: &BootstrapTarget,
        progress: &Progress,
    ) -> Result<BootstrapReport> {
        let keys: Vec<String> = self.cloud_config(target).keys().cloned().collect();
        progress.message(format!(
            "cloud-config delivered in the first-boot seed of {}: {}",
            target.vm,
            if keys.is_empty() {
                "network, host key and authorized keys only".to_owned()
            } else {
                keys.join(", ")
            }
        ));
        Ok(BootstrapReport {
            bootstrapped: true,
            summary: "cloud-init seed delivered".to_owned(),
        })
    }

    async fn unregister(&self, _vm: &VmName, _owner: &RequestId) -> Result<Undone> {
        Ok(Undone::Absent)
    }
}

/// Registers this backend as `cloud-init` in the `[bootstrap]` section.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    r.register_bootstrap("cloud-init", |ctx| {
        let o: CloudInitConfig = ctx.options()?;
        Ok(std::sync::Arc::new(CloudInitBootstrapper::from_config(
            &o,
            ctx.base_dir,
        )?))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::conformance::{bootstrapper, detached_target};
    use crate::types::UserName;

    fn config(text: &str) -> CloudInitConfig {
        toml::from_str(text).unwrap()
    }

    #[tokio::test]
    async fn it_conforms_and_puts_chef_settings_in_the_seed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("validator.pem"),
            "-----BEGIN RSA PRIVATE KEY-----\nSECRETKEY\n",
        )
        .unwrap();
        let c = config(
            r#"
cloud_config = { packages = ["git"], runcmd = [["touch", "/root/ok"]] }
[chef]
server_url = "https://chef.example/organizations/dev"
validation_name = "dev-validator"
validation_key = { file = "validator.pem" }
environment = "dev"
run_list = ["role[base]"]
"#,
        );
        let b = CloudInitBootstrapper::from_config(&c, dir.path()).unwrap();
        assert!(!format!("{b:?}").contains("SECRETKEY"));
        let owner = UserName::new("alice").unwrap();
        let target = detached_target(owner.clone());
        let setup = b.guest_setup(&target).await.unwrap();
        let chef = &setup.cloud_config["chef"];
        assert_eq!(
            chef["run_list"],
            serde_json::json!(["recipe[base]"]),
            "the request's run list wins"
        );
        assert_eq!(chef["environment"], "dev");
        assert_eq!(chef["node_name"], target.fqdn.as_str());
        assert!(
            chef["validation_cert"]
                .as_str()
                .is_some_and(|k| k.contains("SECRETKEY"))
        );
        assert_eq!(setup.cloud_config["packages"], serde_json::json!(["git"]));
        let p = Progress::discard();
        let report = b.bootstrap(&target, &p).await.unwrap();
        assert!(report.bootstrapped);
        bootstrapper(std::sync::Arc::new(b), detached_target(owner)).await;
    }

    #[test]
    fn reserved_keys_are_refused() {
        let e = CloudInitBootstrapper::from_config(
            &config("cloud_config = { ssh_keys = { rsa_private = \"x\" } }"),
            Path::new("/"),
        )
        .expect_err("ssh_keys is devvm's");
        assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
        assert!(
            matches!(e.detail(), Some(CloudInitError::Reserved("ssh_keys"))),
            "{e}"
        );
    }
}
