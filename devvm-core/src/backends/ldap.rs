//! [`UserDirectory`] on LDAP (OpenLDAP, 389-ds, Active Directory), through `ldap3`.
//!
//! Each lookup opens a connection (`ldap://`, `ldap://` with StartTLS, or `ldaps://`),
//! binds (simple bind with a service account, or anonymously), searches the user by
//! uid with the value escaped for the filter, optionally checks membership of a group,
//! and unbinds. Signing in ([`UserDirectory::authenticate`]) also binds as the user's own
//! entry with the password given, on a connection of its own; the password is only
//! passed to that bind. The bind password is a secret: it never appears in `Debug`, errors or logs.
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
use ldap3::{
    LdapConnAsync, LdapConnSettings, LdapError as Ldap3Error, Scope, SearchEntry, ldap_escape,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::error::{BackendError, Error, ErrorKind, Result};
use crate::secret::SecretSpec;
use crate::traits::UserDirectory;
use crate::types::{User, UserName};

const BACKEND: &str = "ldap";

/// A failure of the LDAP directory. No variant holds the bind password.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LdapError {
    #[error("ldap ca_file {}: cannot read it: {source}", path.display())]
    CaFileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ldap ca_file {}: bad PEM: {source}", path.display())]
    CaFilePem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("ldap ca_file {}: not a usable CA certificate: {source}", path.display())]
    CaFileCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("ldap ca_file {}: holds no PEM certificate", .0.display())]
    CaFileEmpty(PathBuf),
    #[error("rustls: {0}")]
    Rustls(#[source] rustls::Error),
    #[error("ldap url {0:?} must start with ldap:// or ldaps://")]
    UrlScheme(String),
    #[error("starttls applies to ldap:// urls, not ldaps://")]
    StartTlsOnLdaps,
    #[error("ca_file needs TLS: an ldaps:// url or starttls = true")]
    CaFileWithoutTls,
    #[error("user_filter {0:?} is not a parenthesized LDAP filter")]
    UserFilter(String),
    #[error("uid_attribute {0:?} is not an attribute name")]
    UidAttribute(String),
    #[error("bind_dn is set but bind_password is not")]
    BindDnWithoutPassword,
    #[error("bind_password is set but bind_dn is not")]
    BindPasswordWithoutDn,
    #[error("timeout_secs must be at least 1")]
    ZeroTimeout,
    #[error("{what} at {url}: TLS: {tls}")]
    Tls {
        what: String,
        url: String,
        tls: rustls::Error,
        #[source]
        source: Ldap3Error,
    },
    #[error("{what} at {url}")]
    Directory {
        what: String,
        url: String,
        #[source]
        source: Ldap3Error,
    },
    #[error("no user {0} in the directory")]
    NoSuchUser(UserName),
    #[error("{count} directory entries match user {user}")]
    Ambiguous { user: UserName, count: usize },
    #[error("user {user} is not a member of {group}")]
    NotMember { user: UserName, group: String },
    #[error("directory {0} did not answer in time")]
    DirectoryTimeout(String),
    #[error("wrong user name or password")]
    BadCredentials,
    #[error("a password is required")]
    EmptyPassword,
}

impl BackendError for LdapError {
    const BACKEND: &'static str = BACKEND;

    fn kind(&self) -> ErrorKind {
        use LdapError::*;
        match self {
            CaFileRead { .. }
            | CaFilePem { .. }
            | CaFileCert { .. }
            | CaFileEmpty(_)
            | UrlScheme(_)
            | StartTlsOnLdaps
            | CaFileWithoutTls
            | UserFilter(_)
            | UidAttribute(_)
            | BindDnWithoutPassword
            | BindPasswordWithoutDn
            | ZeroTimeout => ErrorKind::InvalidInput,
            Rustls(_) => ErrorKind::Backend,
            Tls { .. } => ErrorKind::Unavailable,
            Directory { source, .. } => classify(source).0,
            NoSuchUser(_) => ErrorKind::NotFound,
            Ambiguous { .. } => ErrorKind::Conflict,
            NotMember { .. } => ErrorKind::Unauthorized,
            DirectoryTimeout(_) => ErrorKind::Timeout,
            BadCredentials | EmptyPassword => ErrorKind::Unauthorized,
        }
    }

    fn retryable(&self) -> Option<bool> {
        match self {
            // A certificate the client does not trust, or a name it does not carry, stays
            // so when tried again: unavailable to us, but not retryable.
            LdapError::Tls { .. } => Some(false),
            LdapError::Directory { source, .. } => Some(classify(source).1),
            _ => None,
        }
    }
}

/// What a failure of the LDAP client means for the caller, and whether retrying may help.
fn classify(e: &Ldap3Error) -> (ErrorKind, bool) {
    match e {
        Ldap3Error::Timeout { .. } => (ErrorKind::Timeout, true),
        Ldap3Error::Io { .. } | Ldap3Error::ResultRecv { .. } | Ldap3Error::OpSend { .. } => {
            (ErrorKind::Unavailable, true)
        }
        Ldap3Error::Rustls { .. } | Ldap3Error::DNSName { .. } => (ErrorKind::Unavailable, false),
        Ldap3Error::UrlParsing { .. } | Ldap3Error::UnknownScheme(_) => {
            (ErrorKind::InvalidInput, false)
        }
        Ldap3Error::LdapResult { result } => match result.rc {
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
    }
}

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
    let pem = std::fs::read(path).map_err(|source| LdapError::CaFileRead {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| LdapError::CaFilePem {
            path: path.to_owned(),
            source,
        })?;
        roots.add(cert).map_err(|source| LdapError::CaFileCert {
            path: path.to_owned(),
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(LdapError::CaFileEmpty(path.to_owned()).into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(LdapError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The rustls error inside an I/O error: tokio-rustls reports a failed handshake (an
/// untrusted certificate, a name mismatch) as `InvalidData` wrapping it.
fn tls_error(e: &Ldap3Error) -> Option<&rustls::Error> {
    match e {
        Ldap3Error::Rustls { source } => Some(source),
        Ldap3Error::Io { source } => source
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
            return Err(LdapError::UrlScheme(c.url.clone()).into());
        }
        if c.starttls && c.url.starts_with("ldaps://") {
            return Err(LdapError::StartTlsOnLdaps.into());
        }
        let tls = match &c.ca_file {
            None => None,
            Some(_) if !(c.starttls || c.url.starts_with("ldaps://")) => {
                return Err(LdapError::CaFileWithoutTls.into());
            }
            Some(file) => {
                let path = base_dir.join(file);
                let config = tls_config_trusting(&path)?;
                Some((path, config))
            }
        };
        if !is_valid_filter(&c.user_filter) {
            return Err(LdapError::UserFilter(c.user_filter.clone()).into());
        }
        if c.uid_attribute.is_empty()
            || !c
                .uid_attribute
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
        {
            return Err(LdapError::UidAttribute(c.uid_attribute.clone()).into());
        }
        let bind = match (&c.bind_dn, &c.bind_password) {
            (Some(dn), Some(pw)) => Some((dn.clone(), pw.resolve(base_dir)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(LdapError::BindDnWithoutPassword.into());
            }
            (None, Some(_)) => {
                return Err(LdapError::BindPasswordWithoutDn.into());
            }
        };
        if c.timeout_secs == 0 {
            return Err(LdapError::ZeroTimeout.into());
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

    fn map_err(&self, what: &str, source: Ldap3Error) -> Error {
        let (what, url) = (what.to_owned(), self.url.clone());
        match tls_error(&source).cloned() {
            Some(tls) => LdapError::Tls {
                what,
                url,
                tls,
                source,
            },
            None => LdapError::Directory { what, url, source },
        }
        .into()
    }

    /// A connection, bound as the service account (or anonymous), or as `as_user`.
    async fn connect(&self, as_user: Option<(&str, &SecretString)>) -> Result<ldap3::Ldap> {
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
        match as_user {
            Some((dn, pw)) => {
                ldap.with_timeout(self.timeout)
                    .simple_bind(dn, pw.expose_secret())
                    .await
                    .and_then(|r| r.success())
                    .map_err(|e| match &e {
                        Ldap3Error::LdapResult { result } if result.rc == 49 => {
                            Error::from(LdapError::BadCredentials)
                        }
                        _ => self.map_err("bind as the user failed", e),
                    })?;
            }
            None => {
                if let Some((dn, pw)) = &self.bind {
                    ldap.with_timeout(self.timeout)
                        .simple_bind(dn, pw.expose_secret())
                        .await
                        .and_then(|r| r.success())
                        .map_err(|e| self.map_err(&format!("bind as {dn} failed"), e))?;
                }
            }
        }
        Ok(ldap)
    }

    /// The one entry of `user`.
    async fn find_entry(&self, ldap: &mut ldap3::Ldap, user: &UserName) -> Result<SearchEntry> {
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
        let count = entries.len();
        let mut entries = entries.into_iter();
        match (entries.next(), count) {
            (None, _) => Err(LdapError::NoSuchUser(user.clone()).into()),
            (Some(entry), 1) => Ok(SearchEntry::construct(entry)),
            (Some(_), n) => Err(LdapError::Ambiguous {
                user: user.clone(),
                count: n,
            }
            .into()),
        }
    }

    /// Whether the user of `entry` is a member of `group` (a DN).
    async fn in_group(
        &self,
        ldap: &mut ldap3::Ldap,
        entry: &SearchEntry,
        user: &UserName,
        group: &str,
    ) -> Result<bool> {
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
        Ok(!hits.is_empty())
    }

    /// Finds the user's entry and checks the required group; with `password`, also binds
    /// as the user with it (on a connection of its own).
    async fn lookup(&self, user: &UserName, password: Option<&SecretString>) -> Result<User> {
        let mut ldap = self.connect(None).await?;
        let found = async {
            let entry = self.find_entry(&mut ldap, user).await?;
            let member = match &self.required_group {
                Some(group) => Some(self.in_group(&mut ldap, &entry, user, group).await?),
                None => None,
            };
            Ok::<_, Error>((entry, member))
        }
        .await;
        let _ = ldap.unbind().await;
        let (entry, member) = match (found, password) {
            // At sign-in an unknown user and a wrong password look alike.
            (Err(e), Some(_)) if e.kind() == ErrorKind::NotFound => {
                return Err(LdapError::BadCredentials.into());
            }
            (found, _) => found?,
        };
        if let Some(password) = password {
            let mut as_user = self.connect(Some((&entry.dn, password))).await?;
            let _ = as_user.unbind().await;
        }
        if let (Some(false), Some(group)) = (member, &self.required_group) {
            return Err(LdapError::NotMember {
                user: user.clone(),
                group: group.clone(),
            }
            .into());
        }
        Ok(self.user_from(user, entry.attrs, entry.bin_attrs))
    }

    /// `work`, bounded by a few operation limits (the connection included).
    async fn bounded<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout * 4, work).await {
            Ok(r) => r,
            Err(_) => Err(LdapError::DirectoryTimeout(self.url.clone()).into()),
        }
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
        // The directory matches the uid without regard to case: the name that owns VMs
        // is the directory's own spelling, so ALICE and alice are one user.
        let name = get(&self.uid_attribute)
            .into_iter()
            .find(|v| v.eq_ignore_ascii_case(user.as_str()))
            .and_then(|v| UserName::new(v).ok())
            .unwrap_or_else(|| user.clone());
        User {
            name,
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
        self.bounded(self.lookup(user, None)).await
    }

    /// Binds as the user's own entry with `password`. An empty password is refused before
    /// anything is sent (LDAP would take it for an anonymous bind and succeed).
    async fn authenticate(&self, user: &UserName, password: &SecretString) -> Result<User> {
        if password.expose_secret().is_empty() {
            return Err(LdapError::EmptyPassword.into());
        }
        self.bounded(self.lookup(user, Some(password))).await
    }

    async fn is_member(&self, user: &UserName, group: &str) -> Result<bool> {
        self.bounded(async {
            let mut ldap = self.connect(None).await?;
            let r = async {
                let entry = self.find_entry(&mut ldap, user).await?;
                self.in_group(&mut ldap, &entry, user, group).await
            }
            .await;
            let _ = ldap.unbind().await;
            r
        })
        .await
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

    /// Whether an error is the expected variant.
    type Is = fn(&LdapError) -> bool;

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

    #[test]
    fn client_errors_keep_their_kind_and_retryability() {
        let d = LdapDirectory::from_config(&config(""), Path::new("/")).unwrap();
        let result = |rc| Ldap3Error::LdapResult {
            result: ldap3::LdapResult {
                rc,
                matched: String::new(),
                text: String::new(),
                refs: Vec::new(),
                ctrls: Vec::new(),
            },
        };
        for (rc, kind, retryable) in [
            (49, ErrorKind::Unauthorized, false),
            (51, ErrorKind::Unavailable, true),
            (3, ErrorKind::Timeout, true),
            (32, ErrorKind::InvalidInput, false),
            (80, ErrorKind::Backend, false),
        ] {
            let e = d.map_err("user search failed", result(rc));
            assert_eq!(e.kind(), kind, "{rc}: {e}");
            assert_eq!(e.is_retryable(), retryable, "{rc}: {e}");
            assert_eq!(e.backend_name(), Some("ldap"));
            assert_eq!(e.message(), "user search failed at ldap://127.0.0.1:389");
            assert!(
                matches!(e.detail(), Some(LdapError::Directory { source: Ldap3Error::LdapResult { result }, .. }) if result.rc == rc),
                "{rc}: {e}"
            );
        }
        // A refused certificate arrives as an I/O error wrapping rustls's: never retried.
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = d.map_err("cannot connect to the directory", Ldap3Error::from(io));
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(!e.is_retryable(), "{e}");
        assert!(
            matches!(
                e.detail(),
                Some(LdapError::Tls {
                    tls: rustls::Error::InvalidCertificate(_),
                    ..
                })
            ),
            "{e}"
        );
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
        let cases: [(&str, Is); 4] = [
            ("missing.pem", |e| matches!(e, LdapError::CaFileRead { .. })),
            ("empty.pem", |e| matches!(e, LdapError::CaFileEmpty(_))),
            ("notpem.pem", |e| matches!(e, LdapError::CaFileEmpty(_))),
            ("bad.pem", |e| matches!(e, LdapError::CaFileCert { .. })),
        ];
        for (file, expected) in cases {
            let c = config(&format!("starttls = true\nca_file = \"{file}\""));
            let e = LdapDirectory::from_config(&c, dir.path()).expect_err(file);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{file}: {e}");
            assert!(e.detail().is_some_and(expected), "{file}: {e}");
            assert!(e.to_string().contains(file), "{file}: {e}");
        }
        // Without TLS a CA would be silently unused: refused.
        let e = LdapDirectory::from_config(&config("ca_file = \"tls/ca.pem\""), dir.path())
            .expect_err("ldap:// without starttls");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(
            matches!(e.detail(), Some(LdapError::CaFileWithoutTls)),
            "{e}"
        );
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
        assert!(
            matches!(e.detail(), Some(LdapError::BindPasswordWithoutDn)),
            "{e}"
        );
        assert!(!e.to_string().contains("inline-pw"));
        assert!(!format!("{:?}", e.detail::<LdapError>()).contains("inline-pw"));
        let cases: [(&str, Is); 3] = [
            (
                "user_filter = \"objectClass=person\"",
                |e| matches!(e, LdapError::UserFilter(f) if f == "objectClass=person"),
            ),
            ("uid_attribute = \"uid)(x\"", |e| {
                matches!(e, LdapError::UidAttribute(_))
            }),
            ("timeout_secs = 0", |e| matches!(e, LdapError::ZeroTimeout)),
        ];
        for (bad, expected) in cases {
            let e = LdapDirectory::from_config(&config(bad), dir.path()).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(e.detail().is_some_and(expected), "{bad}: {e}");
            assert_eq!(e.backend_name(), Some("ldap"), "{bad}");
        }
        let mut c = config("");
        c.url = "http://x".into();
        let e = LdapDirectory::from_config(&c, dir.path()).expect_err("http://");
        assert!(
            matches!(e.detail(), Some(LdapError::UrlScheme(u)) if u == "http://x"),
            "{e}"
        );
        let bad: std::result::Result<LdapConfig, _> =
            toml::from_str("url = \"ldap://x\"\nbase_dn = \"dc=x\"\nbindpw = \"x\"");
        assert!(bad.is_err_and(|e| e.to_string().contains("bindpw")));
    }
}
