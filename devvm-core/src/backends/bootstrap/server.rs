//! The Chef server API, just enough to clean up, with v1.3 request signing.

use super::*;

// ---------------------------------------------------------------------------------------
// Chef server API (just enough to clean up), with v1.3 request signing

/// A minimal Chef server API client: signed (X-Ops-Sign version 1.3, RSA with SHA-256)
/// when it has a client name and key, unsigned otherwise. Blocking; call it from
/// `spawn_blocking`.
#[derive(Clone)]
pub struct ChefServerClient {
    /// `scheme://host[:port]`.
    pub(super) origin: String,
    /// The URL's path (`/organizations/acme`), without a trailing slash.
    pub(super) prefix: String,
    pub(super) signer: Option<Arc<(String, ring::signature::RsaKeyPair)>>,
    pub(super) agent: ureq::Agent,
    pub(super) delete_client: bool,
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
pub(super) fn rsa_key_from_pem(pem: &str) -> Result<ring::signature::RsaKeyPair> {
    let pkcs1 = pem.contains("BEGIN RSA PRIVATE KEY");
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----") && !l.contains(':'))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|_| ChefError::ClientKey)?;
    let key = if pkcs1 {
        ring::signature::RsaKeyPair::from_der(&der)
    } else {
        ring::signature::RsaKeyPair::from_pkcs8(&der)
    };
    key.map_err(|_| ChefError::ClientKey.into())
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

pub(super) const SERVER_API_VERSION: &str = "1";

impl ChefServerClient {
    pub(super) fn from_config(
        c: &ChefServerAdminConfig,
        default_url: &str,
        base_dir: &Path,
    ) -> Result<Self> {
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
            return Err(ChefError::AdminUrlScheme(url.to_owned()).into());
        };
        let (scheme, rest) = rest;
        let (host, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(ChefError::AdminUrlHost(url.to_owned()).into());
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
                return Err(ChefError::AdminHalf.into());
            }
        };
        if c.timeout_secs == 0 {
            return Err(ChefError::AdminZeroTimeout.into());
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
    pub(super) fn auth_headers(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Vec<(String, String)>> {
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
        .map_err(|_| ChefError::Sign)?;
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
    ///
    /// [`ErrorKind::Unavailable`]: crate::ErrorKind::Unavailable
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
        let req = req
            .body(body_bytes.to_vec())
            .map_err(|source| ChefError::BadRequest {
                method: method.to_owned(),
                url,
                source,
            })?;
        let mut resp = self
            .agent
            .run(req)
            .map_err(|source| ChefError::Unreachable {
                origin: self.origin.clone(),
                source,
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
            200..=299 => serde_json::from_slice(&body).map(Some).map_err(|source| {
                ChefError::NotJson {
                    path: path.to_owned(),
                    source,
                }
                .into()
            }),
            404 => Ok(None),
            _ => Err(status_error("GET", path, status)),
        }
    }

    /// `DELETE path`; returns whether something was deleted (404 is success: it is gone).
    pub fn delete(&self, path: &str) -> Result<bool> {
        let (status, _) = self.request("DELETE", path, None)?;
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(status_error("DELETE", path, status)),
        }
    }
}

/// The error of an answer with `status` (not 2xx or 404) to `method path`.
pub(super) fn status_error(method: &'static str, path: &str, status: u16) -> Error {
    let path = path.to_owned();
    match status {
        401 | 403 => ChefError::Refused {
            method,
            path,
            status,
        },
        408 | 429 | 500..=599 => ChefError::Overloaded {
            method,
            path,
            status,
        },
        _ => ChefError::Status {
            method,
            path,
            status,
        },
    }
    .into()
}
