//! The Glance v2 API: image metadata (pure parts), the HTTP client and its errors.

use super::*;

// ---------------------------------------------------------------------------------------
// Glance metadata (pure parts)

/// The fields of a Glance v2 image this backend reads. Custom properties (`kernel_id`,
/// `ramdisk_id`, `os_command_line`) are top-level strings in v2.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct ImageMeta {
    pub(super) id: String,
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) status: Option<String>,
    #[serde(default)]
    pub(super) tags: Vec<String>,
    #[serde(default)]
    pub(super) created_at: Option<String>,
    #[serde(default)]
    pub(super) disk_format: Option<String>,
    #[serde(default)]
    pub(super) size: Option<u64>,
    #[serde(default)]
    pub(super) checksum: Option<String>,
    #[serde(default)]
    pub(super) os_hash_algo: Option<String>,
    #[serde(default)]
    pub(super) os_hash_value: Option<String>,
    #[serde(default)]
    pub(super) kernel_id: Option<String>,
    #[serde(default)]
    pub(super) ramdisk_id: Option<String>,
    #[serde(default)]
    pub(super) os_command_line: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ImageList {
    pub(super) images: Vec<ImageMeta>,
}

/// Picks the newest `active` image named `name` (carrying `tag`, if given) from a Glance
/// `GET /v2/images` response body. The filters are applied again here, so a server that
/// ignores a query parameter cannot hand us the wrong image. Ties in `created_at` keep
/// the server's order.
pub(super) fn newest_image(
    listing: &[u8],
    name: &str,
    tag: Option<&str>,
) -> Result<Option<ImageMeta>> {
    let list: ImageList = serde_json::from_slice(listing).map_err(GlanceError::BadList)?;
    let created = |m: &ImageMeta| {
        m.created_at.as_deref().and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
    };
    let mut best: Option<(Option<time::OffsetDateTime>, ImageMeta)> = None;
    for m in list.images {
        if m.status.as_deref() != Some("active")
            || m.name.as_deref() != Some(name)
            || tag.is_some_and(|t| !m.tags.iter().any(|x| x == t))
        {
            continue;
        }
        let c = created(&m);
        if best.as_ref().is_none_or(|(bc, _)| c > *bc) {
            best = Some((c, m));
        }
    }
    Ok(best.map(|(_, m)| m))
}

/// A Glance image id as used in URLs and file names: 1–64 ASCII letters, digits and `-`.
pub(super) fn check_image_id(id: &str) -> Result<&str> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(GlanceError::BadImageId(id.chars().take(70).collect()).into());
    }
    Ok(id)
}

// ---------------------------------------------------------------------------------------
// HTTP

pub(super) fn transport_error(source: ureq::Error, what: &str, url: &str) -> Error {
    let (url, what) = (url.to_owned(), what.to_owned());
    match &source {
        ureq::Error::Timeout(_) => GlanceError::HttpTimeout { url, what, source },
        ureq::Error::Io(_) | ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => {
            GlanceError::Unreachable { url, what, source }
        }
        ureq::Error::BadUri(_) | ureq::Error::InvalidProxyUrl => {
            GlanceError::BadUrl { url, source }
        }
        _ => GlanceError::Http { url, what, source },
    }
    .into()
}

pub(super) fn status_error(status: u16, what: &str) -> Option<Error> {
    let what = what.to_owned();
    let e = match status {
        200..=299 => return None,
        401 | 403 => GlanceError::Refused { what, status },
        404 => GlanceError::Missing { what },
        408 | 429 | 500..=599 => GlanceError::Overloaded { what, status },
        _ => GlanceError::Status { what, status },
    };
    Some(e.into())
}

/// Reports download progress at most every 5 % (or every 64 MiB when the size is not
/// known).
pub(super) struct Reporter<'a> {
    pub(super) progress: &'a Progress,
    pub(super) label: String,
    pub(super) total: Option<u64>,
    pub(super) next: u64,
}

impl<'a> Reporter<'a> {
    const UNKNOWN_STEP: u64 = 64 << 20;

    pub(super) fn new(progress: &'a Progress, label: String, total: Option<u64>) -> Self {
        let total = total.filter(|t| *t > 0);
        let mut r = Reporter {
            progress,
            label,
            total,
            next: 0,
        };
        r.next = r.step();
        r
    }
    pub(super) fn step(&self) -> u64 {
        self.total.map_or(Self::UNKNOWN_STEP, |t| (t / 20).max(1))
    }
    pub(super) fn update(&mut self, done: u64) {
        if done < self.next {
            return;
        }
        while self.next <= done {
            self.next += self.step();
        }
        let mib = done as f64 / MIB;
        match self.total {
            Some(t) => self.progress.fraction(
                format!(
                    "downloading {}: {mib:.1} of {:.1} MiB",
                    self.label,
                    t as f64 / MIB
                ),
                done as f64 / t as f64,
            ),
            None => self
                .progress
                .message(format!("downloading {}: {mib:.1} MiB", self.label)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// qemu-img and cp

impl Inner {
    pub(super) fn request(
        &self,
        agent: &ureq::Agent,
        url: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let r = agent.get(url);
        match &self.token {
            Some(t) => match ureq::http::HeaderValue::from_str(t.expose_secret()) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    r.header("X-Auth-Token", v)
                }
                Err(_) => r,
            },
            None => r,
        }
    }

    /// `GET url` with `query`, the body as bytes (at most 16 MiB).
    pub(super) fn get_json(
        &self,
        url: &str,
        query: &[(&str, &str)],
        what: &str,
    ) -> Result<Vec<u8>> {
        let mut req = self
            .request(&self.meta_agent, url)
            .header("Accept", "application/json");
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        let mut resp = req
            .call()
            .map_err(|e| transport_error(e, what, &self.url))?;
        if let Some(e) = status_error(resp.status().as_u16(), what) {
            return Err(e);
        }
        resp.body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_vec()
            .map_err(|e| transport_error(e, what, &self.url))
    }

    /// The newest active image named `name` (with the configured tag), if any.
    pub(super) fn find_image(&self, name: &TemplateName) -> Result<Option<ImageMeta>> {
        let mut query = vec![
            ("name", name.as_str()),
            ("status", "active"),
            ("sort_key", "created_at"),
            ("sort_dir", "desc"),
            ("limit", "25"),
        ];
        if let Some(t) = &self.tag {
            query.push(("tag", t));
        }
        let body = self.get_json(
            &format!("{}/v2/images", self.url),
            &query,
            &format!("the image list for {name}"),
        )?;
        newest_image(&body, name.as_str(), self.tag.as_deref())
    }

    /// The image `id`, which `of` refers to as its kernel or ramdisk; it must be active.
    pub(super) fn referenced_image(
        &self,
        of: &ImageMeta,
        role: &str,
        id: &str,
    ) -> Result<ImageMeta> {
        check_image_id(id)?;
        let what = format!("image {id} ({role} of image {})", of.id);
        let body = self
            .get_json(&format!("{}/v2/images/{id}", self.url), &[], &what)
            .map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    GlanceError::DanglingRef {
                        of: of.id.clone(),
                        role: role.to_owned(),
                        id: id.to_owned(),
                    }
                    .into()
                } else {
                    e
                }
            })?;
        let m: ImageMeta = serde_json::from_slice(&body)
            .map_err(|source| GlanceError::Unreadable { what, source })?;
        if m.id != id || m.status.as_deref() != Some("active") {
            return Err(GlanceError::InactiveRef {
                of: of.id.clone(),
                role: role.to_owned(),
                id: id.to_owned(),
            }
            .into());
        }
        Ok(m)
    }
}
