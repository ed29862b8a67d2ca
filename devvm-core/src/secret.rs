//! Secrets in the config: where each comes from (inline, a file, an environment
//! variable), read without ever printing them, with a warning for a secret file that
//! other users may read.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use crate::error::{Error, Result};

/// A secret in the config: a plain string, `{ file = "path" }` or `{ env = "NAME" }`.
///
/// Its `Debug` shows where the secret comes from, never its value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSpec {
    /// Written inline (discouraged).
    Inline(String),
    /// Read from a file (trailing newlines are stripped).
    File(PathBuf),
    /// Read from an environment variable.
    Env(String),
}

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSpec::Inline(_) => f.write_str("SecretSpec::Inline([redacted])"),
            SecretSpec::File(p) => write!(f, "SecretSpec::File({})", p.display()),
            SecretSpec::Env(v) => write!(f, "SecretSpec::Env({v})"),
        }
    }
}

impl<'de> Deserialize<'de> for SecretSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            file: Option<PathBuf>,
            env: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Inline(String),
            Table(Table),
        }
        const EXPECTED: &str =
            "a secret must be a string, { file = \"path\" } or { env = \"VARIABLE\" }";
        match Raw::deserialize(d).map_err(|_| D::Error::custom(EXPECTED))? {
            Raw::Inline(s) => Ok(SecretSpec::Inline(s)),
            Raw::Table(Table {
                file: Some(f),
                env: None,
            }) => Ok(SecretSpec::File(f)),
            Raw::Table(Table {
                file: None,
                env: Some(v),
            }) => Ok(SecretSpec::Env(v)),
            Raw::Table(_) => Err(D::Error::custom(EXPECTED)),
        }
    }
}

impl SecretSpec {
    /// Reads the secret; a relative file path is resolved against `base_dir`. A missing
    /// file or variable is an error that names the file or variable, never the value.
    pub fn resolve(&self, base_dir: &Path) -> Result<SecretString> {
        match self {
            SecretSpec::Inline(s) => Ok(SecretString::from(s.clone())),
            SecretSpec::File(p) => {
                let path = base_dir.join(p);
                let s = read_secret_file(&path).map_err(|e| {
                    Error::invalid_input(format!("cannot read secret file {}", path.display()))
                        .with_source(e)
                })?;
                Ok(SecretString::from(
                    s.trim_end_matches(['\n', '\r']).to_owned(),
                ))
            }
            SecretSpec::Env(v) => std::env::var(v).map(SecretString::from).map_err(|_| {
                Error::invalid_input(format!("secret environment variable {v} is not set"))
            }),
        }
    }
}

/// Warnings about secret files that others may read, not yet handed to a provisioner.
static SECRET_WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Reads a secret file (a TSIG key, a password, a private key). A file that its group or
/// other users may read or write still works, but is warned about, as ssh does for keys:
/// logged now, and a `warning` event at the start of every run of the provisioner built
/// next (see [`take_secret_warnings`]).
pub fn read_secret_file(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let warning = format!(
            "secret file {} is accessible to other users (mode {mode:o}); chmod 600 it",
            path.display()
        );
        tracing::warn!("{warning}");
        let mut all = SECRET_WARNINGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !all.contains(&warning) {
            all.push(warning);
        }
    }
    Ok(text)
}

/// The warnings [`read_secret_file`] recorded since the last call (a provisioner takes
/// them when it is built).
pub fn take_secret_warnings() -> Vec<String> {
    std::mem::take(
        &mut *SECRET_WARNINGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}
