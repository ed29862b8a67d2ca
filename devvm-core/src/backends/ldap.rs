//! [`UserDirectory`] on LDAP (OpenLDAP, 389-ds, Active Directory), through `ldap3`.
//!
//! Each lookup opens a connection (`ldap://`, `ldap://` with StartTLS, or `ldaps://`),
//! binds (simple bind with a service account, or anonymously), searches the user by
//! uid with the value escaped for the filter, optionally checks membership of a group,
//! and unbinds. The bind password is a secret: it never appears in `Debug`, errors or logs.
//!
//! TLS (ldaps or StartTLS) verifies the server's certificate and name (an IP address in the
//! URL must be in the certificate's IP SANs). It trusts the platform's roots, or with
//! `ca_file` exactly the CA certificates in that PEM file and nothing else. A certificate
//! that is not trusted is [`ErrorKind::Unavailable`], not retryable: trying again unchanged
//! cannot help.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ldap3::{LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry, ldap_escape};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::secret::SecretSpec;
use crate::traits::UserDirectory;
use crate::types::{User, UserName};

const BACKEND: &str = "ldap";

/// How group membership is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MembershipKind {
    /// `groupOfNames`/`groupOfUniqueNames`: the group's `member` holds user DNs.
    #[default]
    Dn,
    /// `posixGroup`: the group's `memberUid` holds user names.
    Uid,
}

/// The `[users]` section for `backend = "ldap"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host:389` or `ldaps://host:636`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS (default false).
    #[serde(default)]
    pub starttls: bool,
    /// A PEM file of CA certificates (relative to the config file): TLS then trusts
    /// exactly these instead of the platform's roots. Needs `ldaps://` or `starttls`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Where users live (searched with subtree scope).
    pub base_dn: String,
    /// The service account; anonymous bind when absent.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// The service account's password (`{ file = ".." }` or `{ env = ".." }`).
    #[serde(default)]
    pub bind_password: Option<SecretSpec>,
    /// The attribute holding the user name (default `uid`).
    #[serde(default = "default_uid")]
    pub uid_attribute: String,
    /// An extra filter users must match (default `(objectClass=posixAccount)`).
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    /// The group whose members may own VMs; every user found may when absent.
    #[serde(default)]
    pub required_group: Option<String>,
    /// How the group lists its members (default `dn`: the `member` attribute).
    #[serde(default)]
    pub membership: MembershipKind,
    /// The attribute holding SSH public keys (default `sshPublicKey`).
    #[serde(default = "default_ssh_attr")]
    pub ssh_key_attribute: String,
    /// Connect and per-operation time limit in seconds (default 5).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_uid() -> String {
    "uid".into()
}
fn default_user_filter() -> String {
    "(objectClass=posixAccount)".into()
}
fn default_ssh_attr() -> String {
    "sshPublicKey".into()
}
fn default_timeout() -> u64 {
    5
}

/// Looks users up in LDAP.
pub struct LdapDirectory {
    url: String,
    starttls: bool,
    /// The CA file and the TLS config trusting only it; platform roots when absent.
    tls: Option<(PathBuf, Arc<rustls::ClientConfig>)>,
    base_dn: String,
    bind: Option<(String, SecretString)>,
    uid_attribute: String,
    user_filter: String,
    required_group: Option<String>,
    membership: MembershipKind,
    ssh_key_attribute: String,
    timeout: Duration,
}

impl std::fmt::Debug for LdapDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapDirectory")
            .field("url", &self.url)
            .field("starttls", &self.starttls)
            .field("ca_file", &self.tls.as_ref().map(|(path, _)| path))
            .field("base_dn", &self.base_dn)
            .field("bind_dn", &self.bind.as_ref().map(|(dn, _)| dn))
            .field("required_group", &self.required_group)
            .finish_non_exhaustive()
    }
}

/// A rustls client config that trusts exactly the CA certificates in the PEM file `path`.
/// An unreadable file, one without a certificate, or a certificate that is not a usable
/// trust anchor is [`ErrorKind::InvalidInput`] naming the file.
fn tls_config_trusting(path: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let bad = |why: String| Error::invalid_input(format!("ldap ca_file {}: {why}", path.display()));
    let pem =
        std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")).with_source(e))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("bad PEM: {e}")).with_source(e))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")).with_source(e))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Backend, format!("rustls: {e}")).with_source(e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The rustls error inside an I/O error: tokio-rustls reports a failed handshake (an
/// untrusted certificate, a name mismatch) as `InvalidData` wrapping it.
fn tls_error(e: &LdapError) -> Option<&rustls::Error> {
    match e {
        LdapError::Rustls { source } => Some(source),
        LdapError::Io { source } => source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    }
}

fn is_valid_filter(f: &str) -> bool {
    f.starts_with('(') && f.ends_with(')') && f.matches('(').count() == f.matches(')').count()
}

impl LdapDirectory {
    /// A directory from its config section; a relative password file is resolved against
    /// `base_dir`. A malformed URL or filter, or an unreadable password, is
    /// [`ErrorKind::InvalidInput`].
    pub fn from_config(c: &LdapConfig, base_dir: &Path) -> Result<Self> {
        if !(c.url.starts_with("ldap://") || c.url.starts_with("ldaps://")) {
            return Err(Error::invalid_input(format!(
                "ldap url {:?} must start with ldap:// or ldaps://",
                c.url
            )));
        }
        if c.starttls && c.url.starts_with("ldaps://") {
            return Err(Error::invalid_input(
                "starttls applies to ldap:// urls, not ldaps://",
            ));
        }
        let tls = match &c.ca_file {
            None => None,
            Some(_) if !(c.starttls || c.url.starts_with("ldaps://")) => {
                return Err(Error::invalid_input(
                    "ca_file needs TLS: an ldaps:// url or starttls = true",
                ));
            }
            Some(file) => {
                let path = base_dir.join(file);
                let config = tls_config_trusting(&path)?;
                Some((path, config))
            }
        };
        if !is_valid_filter(&c.user_filter) {
            return Err(Error::invalid_input(format!(
                "user_filter {:?} is not a parenthesized LDAP filter",
                c.user_filter
            )));
        }
        if c.uid_attribute.is_empty()
            || !c
                .uid_attribute
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
        {
            return Err(Error::invalid_input(format!(
                "uid_attribute {:?} is not an attribute name",
                c.uid_attribute
            )));
        }
        let bind = match (&c.bind_dn, &c.bind_password) {
            (Some(dn), Some(pw)) => Some((dn.clone(), pw.resolve(base_dir)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::invalid_input(
                    "bind_dn is set but bind_password is not",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::invalid_input(
                    "bind_password is set but bind_dn is not",
                ));
            }
        };
        if c.timeout_secs == 0 {
            return Err(Error::invalid_input("timeout_secs must be at least 1"));
        }
        Ok(LdapDirectory {
            url: c.url.clone(),
            starttls: c.starttls,
            tls,
            base_dn: c.base_dn.clone(),
            bind,
            uid_attribute: c.uid_attribute.clone(),
            user_filter: c.user_filter.clone(),
            required_group: c.required_group.clone(),
            membership: c.membership,
            ssh_key_attribute: c.ssh_key_attribute.clone(),
            timeout: Duration::from_secs(c.timeout_secs),
        })
    }

    /// The search filter for `user`: the configured filter and the uid, escaped.
    pub fn user_search_filter(&self, user: &UserName) -> String {
        format!(
            "(&{}({}={}))",
            self.user_filter,
            self.uid_attribute,
            ldap_escape(user.as_str())
        )
    }

    fn map_err(&self, what: &str, e: LdapError) -> Error {
        if let Some(tls) = tls_error(&e) {
            // A certificate the client does not trust, or a name it does not carry, stays
            // so when tried again: unavailable to us, but not retryable.
            let message = format!("{what} at {}: TLS: {tls}", self.url);
            return Error::new(ErrorKind::Unavailable, message)
                .with_retryable(false)
                .with_backend(BACKEND)
                .with_source(e);
        }
        let (kind, retry) = match &e {
            LdapError::Timeout { .. } => (ErrorKind::Timeout, true),
            LdapError::Io { .. } | LdapError::ResultRecv { .. } | LdapError::OpSend { .. } => {
                (ErrorKind::Unavailable, true)
            }
            LdapError::Rustls { .. } | LdapError::DNSName { .. } => (ErrorKind::Unavailable, false),
            LdapError::UrlParsing { .. } | LdapError::UnknownScheme(_) => {
                (ErrorKind::InvalidInput, false)
            }
            LdapError::LdapResult { result } => match result.rc {
                // invalidCredentials, insufficientAccessRights, inappropriateAuthentication
                48..=50 => (ErrorKind::Unauthorized, false),
                // busy, unavailable, unwillingToPerform
                51..=53 => (ErrorKind::Unavailable, true),
                // timeLimitExceeded
                3 => (ErrorKind::Timeout, true),
                // noSuchObject: the base or group DN does not exist
                32 => (ErrorKind::InvalidInput, false),
                _ => (ErrorKind::Backend, false),
            },
            _ => (ErrorKind::Backend, false),
        };
        Error::new(kind, format!("{what} at {}", self.url))
            .with_retryable(retry)
            .with_backend(BACKEND)
            .with_source(e)
    }

    async fn lookup(&self, user: &UserName) -> Result<User> {
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout)
            .set_starttls(self.starttls);
        if let Some((_, config)) = &self.tls {
            settings = settings.set_config(Arc::clone(config));
        }
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &self.url)
            .await
            .map_err(|e| self.map_err("cannot connect to the directory", e))?;
        ldap3::drive!(conn);

        if let Some((dn, pw)) = &self.bind {
            ldap.with_timeout(self.timeout)
                .simple_bind(dn, pw.expose_secret())
                .await
                .and_then(|r| r.success())
                .map_err(|e| self.map_err(&format!("bind as {dn} failed"), e))?;
        }

        let filter = self.user_search_filter(user);
        let attrs = vec![
            self.uid_attribute.as_str(),
            "cn",
            "displayName",
            "mail",
            self.ssh_key_attribute.as_str(),
        ];
        let (entries, _) = ldap
            .with_timeout(self.timeout)
            .search(&self.base_dn, Scope::Subtree, &filter, attrs)
            .await
            .and_then(|r| r.success())
            .map_err(|e| self.map_err("user search failed", e))?;
        let entry = match entries.len() {
            0 => {
                let _ = ldap.unbind().await;
                return Err(Error::not_found(format!("no user {user} in the directory"))
                    .with_backend(BACKEND));
            }
            1 => SearchEntry::construct(
                entries
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| unreachable!("one entry was counted")),
            ),
            n => {
                let _ = ldap.unbind().await;
                return Err(
                    Error::conflict(format!("{n} directory entries match user {user}"))
                        .with_backend(BACKEND),
                );
            }
        };

        if let Some(group) = &self.required_group {
            let member_filter = match self.membership {
                MembershipKind::Dn => format!(
                    "(|(member={v})(uniqueMember={v}))",
                    v = ldap_escape(entry.dn.as_str())
                ),
                MembershipKind::Uid => format!("(memberUid={})", ldap_escape(user.as_str())),
            };
            let (hits, _) = ldap
                .with_timeout(self.timeout)
                .search(group, Scope::Base, &member_filter, vec!["1.1"])
                .await
                .and_then(|r| r.success())
                .map_err(|e| self.map_err(&format!("membership check in {group} failed"), e))?;
            if hits.is_empty() {
                let _ = ldap.unbind().await;
                return Err(
                    Error::unauthorized(format!("user {user} is not a member of {group}"))
                        .with_backend(BACKEND),
                );
            }
        }
        let _ = ldap.unbind().await;
        Ok(self.user_from(user, entry.attrs, entry.bin_attrs))
    }

    fn user_from(
        &self,
        user: &UserName,
        attrs: HashMap<String, Vec<String>>,
        bin_attrs: HashMap<String, Vec<Vec<u8>>>,
    ) -> User {
        // Attribute names are case-insensitive; servers echo their own spelling.
        let get = |name: &str| -> Vec<String> {
            let mut v: Vec<String> = attrs
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .flat_map(|(_, vals)| vals.iter().cloned())
                .collect();
            v.extend(
                bin_attrs
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .flat_map(|(_, vals)| vals.iter())
                    .filter_map(|b| String::from_utf8(b.clone()).ok()),
            );
            v
        };
        let first = |name: &str| get(name).into_iter().next();
        let ssh_keys = get(&self.ssh_key_attribute)
            .into_iter()
            .flat_map(|v| {
                v.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        User {
            name: user.clone(),
            display_name: first("displayName").or_else(|| first("cn")),
            mail: first("mail"),
            ssh_keys,
        }
    }
}

#[async_trait]
impl UserDirectory for LdapDirectory {
    fn backend(&self) -> &str {
        BACKEND
    }

    async fn find_user(&self, user: &UserName) -> Result<User> {
        // The whole lookup, connection included, is bounded by a few operation limits.
        match tokio::time::timeout(self.timeout * 4, self.lookup(user)).await {
            Ok(r) => r,
            Err(_) => Err(
                Error::timeout(format!("directory {} did not answer in time", self.url))
                    .with_backend(BACKEND),
            ),
        }
    }
}

/// Registers this backend as `ldap` in the `[users]` section.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    r.register_users("ldap", |ctx| {
        let o: LdapConfig = ctx.options()?;
        Ok(std::sync::Arc::new(LdapDirectory::from_config(
            &o,
            ctx.base_dir,
        )?))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> LdapConfig {
        toml::from_str(&format!(
            "url = \"ldap://127.0.0.1:389\"\nbase_dn = \"dc=example,dc=test\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn the_filter_value_is_escaped() {
        let d = LdapDirectory::from_config(&config(""), Path::new("/")).unwrap();
        let u = UserName::new("j.doe_1").unwrap();
        assert_eq!(
            d.user_search_filter(&u),
            "(&(objectClass=posixAccount)(uid=j.doe_1))"
        );
        // UserName already refuses metacharacters; the escape is the second wall.
        assert_eq!(ldap_escape("*)(uid=*"), "\\2a\\29\\28uid=\\2a");
    }

    /// A self-signed CA certificate (its key was thrown away): only parsed here.
    const TEST_CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBoTCCAUegAwIBAgIUGHb7JfekR3plApYGb4hQYTJUv6UwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSZGV2dm0gdW5pdC10ZXN0IENBMCAXDTI2MTEyNjEzNDMzMFoY
DzIxMjYxMTAyMTM0MzMwWjAdMRswGQYDVQQDDBJkZXZ2bSB1bml0LXRlc3QgQ0Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARe+yBxeGYMGGg+rYB8YGON2p5IVPaV
lFtP9DrwwcuYtLCLn4kpk2SO91ptBEnpGffy8dSGPbMiZ2fSbdjfUeh3o2MwYTAd
BgNVHQ4EFgQUJuxGOir08T50SOyVJTOsSg8b8wIwHwYDVR0jBBgwFoAUJuxGOir0
8T50SOyVJTOsSg8b8wIwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAgQw
CgYIKoZIzj0EAwIDSAAwRQIgCEyDEbRal+29j9XoNPzrANikppLwBjJ1eMpDZ+IT
zZYCIQCgXaA4CdHhSvnoU0M5XS8aZRc8+OmW+YBbx+ye/3GWgA==
-----END CERTIFICATE-----
";

    #[test]
    fn ca_file_is_read_relative_to_the_config_and_refused_when_unusable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tls")).unwrap();
        std::fs::write(dir.path().join("tls/ca.pem"), TEST_CA_PEM).unwrap();
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        std::fs::write(dir.path().join("notpem.pem"), "just text\n").unwrap();
        std::fs::write(
            dir.path().join("bad.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();

        // Absent by default: the platform roots are used.
        let c = config("");
        assert_eq!(c.ca_file, None);
        let d = LdapDirectory::from_config(&c, dir.path()).unwrap();
        assert!(d.tls.is_none());

        // Relative to the config file's directory, with ldaps:// or with StartTLS.
        for extra in [
            "starttls = true\nca_file = \"tls/ca.pem\"",
            "ca_file = \"tls/ca.pem\"",
        ] {
            let mut c = config(extra);
            assert_eq!(c.ca_file.as_deref(), Some(Path::new("tls/ca.pem")));
            if !c.starttls {
                c.url = "ldaps://127.0.0.1:636".into();
            }
            let d = LdapDirectory::from_config(&c, dir.path()).unwrap();
            let (path, _) = d.tls.as_ref().expect("a TLS config");
            assert_eq!(path, &dir.path().join("tls/ca.pem"));
            assert!(format!("{d:?}").contains("tls/ca.pem"), "{d:?}");
        }
        // An absolute path is taken as it is.
        let abs = dir.path().join("tls/ca.pem");
        let c = config(&format!(
            "starttls = true\nca_file = {:?}",
            abs.display().to_string()
        ));
        let d = LdapDirectory::from_config(&c, Path::new("/nonexistent")).unwrap();
        assert_eq!(d.tls.as_ref().map(|(p, _)| p.clone()), Some(abs));

        // Unreadable, empty, not PEM, or not a certificate: InvalidInput naming the file.
        for file in ["missing.pem", "empty.pem", "notpem.pem", "bad.pem"] {
            let c = config(&format!("starttls = true\nca_file = \"{file}\""));
            let e = LdapDirectory::from_config(&c, dir.path()).expect_err(file);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{file}: {e}");
            assert!(e.to_string().contains(file), "{file}: {e}");
        }
        // Without TLS a CA would be silently unused: refused.
        let e = LdapDirectory::from_config(&config("ca_file = \"tls/ca.pem\""), dir.path())
            .expect_err("ldap:// without starttls");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("ca_file"), "{e}");
        // The field's name is checked like the others.
        let bad: std::result::Result<LdapConfig, _> =
            toml::from_str("url = \"ldaps://x\"\nbase_dn = \"dc=x\"\ncafile = \"ca.pem\"");
        assert!(bad.is_err_and(|e| e.to_string().contains("cafile")));
    }

    #[test]
    fn bad_settings_are_refused_and_the_password_never_shows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cr3t-pw\n").unwrap();
        let d = LdapDirectory::from_config(
            &config("bind_dn = \"cn=admin,dc=example,dc=test\"\nbind_password = { file = \"pw\" }"),
            dir.path(),
        )
        .unwrap();
        assert!(!format!("{d:?}").contains("s3cr3t"));
        let c = config("bind_password = \"inline-pw\"");
        assert!(!format!("{c:?}").contains("inline-pw"));
        let e = LdapDirectory::from_config(&c, dir.path()).expect_err("no bind dn");
        assert!(!e.to_string().contains("inline-pw"));
        for bad in [
            "user_filter = \"objectClass=person\"",
            "uid_attribute = \"uid)(x\"",
            "timeout_secs = 0",
        ] {
            let e = LdapDirectory::from_config(&config(bad), dir.path()).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        }
        let mut c = config("");
        c.url = "http://x".into();
        assert!(LdapDirectory::from_config(&c, dir.path()).is_err());
        let bad: std::result::Result<LdapConfig, _> =
            toml::from_str("url = \"ldap://x\"\nbase_dn = \"dc=x\"\nbindpw = \"x\"");
        assert!(bad.is_err_and(|e| e.to_string().contains("bindpw")));
    }
}
