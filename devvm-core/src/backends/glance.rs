//! [`ImageStore`] on a local template cache synced from OpenStack Glance (image API v2),
//! with VM disks made by `qemu-img`.
//!
//! # The template cache
//!
//! Each template has a directory `cache_dir/<template>/` holding
//!
//! * `<image-id>.qcow2` (or `.raw`): the template image, named after its Glance image id,
//! * `<kernel-id>.kernel` and `<ramdisk-id>.initrd` when the Glance image carries the
//!   `kernel_id` / `ramdisk_id` properties (direct kernel boot; `os_command_line` becomes
//!   the kernel command line),
//! * `template.json`: the sidecar naming which files are current, with their Glance ids,
//!   checksums, and the file identity (device, inode, size, mtime, ctime) recorded when
//!   they were verified.
//!
//! [`prepare`](ImageStore::prepare) asks Glance for the newest `active` image of that name
//! (and, if configured, carrying the configured tag). A cached file is reused when the
//! sidecar names the same image id and checksum and the file's identity is unchanged since
//! it was verified; when the identity changed (the file was written to, replaced, or
//! `chown`ed), the file is hashed again and downloaded again only if it no longer matches.
//! With `verify_cached = true` every prepare hashes the cached files. Otherwise the file
//! is streamed to a hidden temporary file in the template's directory, hashed on the way
//! (`os_hash_value` with `os_hash_algo` sha512/sha384/sha256, else the md5 `checksum`; an
//! image with neither is refused), fsynced, checked (a qcow2 template must not name a
//! backing or external data file), and only then renamed into place. The sidecar is
//! replaced atomically last. A partial or corrupt download is therefore never visible as a
//! template, and the temporary file is removed on every failure.
//!
//! Because file names carry the image id, a newer Glance image never overwrites the file
//! that existing overlays use as their backing file. Older versions stay in the cache
//! (they may back existing disks); remove them by hand when no disk uses them.
//!
//! When Glance cannot be reached and a verified copy is cached, `prepare` uses the cached
//! copy and says so in a progress message (`offline_fallback`, on by default).
//!
//! # Disks
//!
//! Disks are `disk_dir/<vm>.qcow2`: by default a qcow2 overlay whose backing file is the
//! cached template (`qemu-img create -f qcow2 -F <fmt> -b <template>`), or with
//! `mode = "copy"` a standalone qcow2 (a reflinked, sparse `cp` of a qcow2 template — instant on
//! btrfs/XFS — or `qemu-img convert` of a raw one, then `qemu-img resize`). A disk is made
//! under a hidden temporary name and linked into place without replacing anything, so a
//! half-made disk is never mistaken for a finished one. A requested size smaller than the
//! template's virtual size is refused ([`ErrorKind::InvalidInput`]) rather than silently
//! grown or truncated.
//!
//! This backend manages local files and accepts any [`HostId`]: `disk_dir` must be the
//! storage the hypervisor hosts see at the same path (a local directory for a single-host
//! setup, or a shared file system).
//!
//! Every path built from a name is checked to stay inside `cache_dir` or `disk_dir`, with
//! symbolic links resolved (defense in depth: template and VM names can hold no `/`).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::{Error, ErrorKind, Result};
use crate::events::Progress;
use crate::secret::SecretSpec;
use crate::traits::ImageStore;
use crate::types::{
    BootSpec, Disk, DiskFormat, HostId, RequestId, Template, TemplateName, Undone, VmName,
};

const BACKEND: &str = "glance";
const GIB: u64 = 1 << 30;
const MIB: f64 = (1u64 << 20) as f64;
const SIDECAR: &str = "template.json";
const LOCK_FILE: &str = ".lock";
const PART_SUFFIX: &str = ".part";
const SIDECAR_VERSION: u32 = 1;

/// How [`GlanceImageStore::create_disk`](ImageStore::create_disk) makes a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskMode {
    /// A qcow2 overlay whose backing file is the cached template (fast, small; the
    /// template must stay in the cache as long as the disk exists).
    #[default]
    Overlay,
    /// A standalone qcow2 copy of the template.
    Copy,
}

/// The `[images]` section for `backend = "glance"`.
///
/// ```toml
/// [images]
/// backend = "glance"
/// url = "https://glance.example:9292"   # the Glance endpoint (without /v2)
/// cache_dir = "templates"               # relative to the config file
/// disk_dir = "/var/lib/libvirt/images"  # where <vm>.qcow2 disks are made
/// tag = "devvm"                         # optional: only images with this tag
/// mode = "overlay"                      # or "copy"
/// timeout_secs = 30                     # metadata calls; downloads: per read
/// token = { file = "glance.token" }     # optional: sent as X-Auth-Token
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlanceConfig {
    /// The Glance endpoint, `http://` or `https://`, without the `/v2` suffix.
    pub url: String,
    /// The local template cache; relative to the config file. Created if missing.
    pub cache_dir: PathBuf,
    /// Where VM disks are made; relative to the config file. Created if missing. It must
    /// be the hypervisor host's storage (local for one host, shared for several).
    pub disk_dir: PathBuf,
    /// Only images carrying this tag are considered (default: any).
    #[serde(default)]
    pub tag: Option<String>,
    /// `overlay` (default) or `copy`.
    #[serde(default)]
    pub mode: DiskMode,
    /// Time limit in seconds for metadata calls, and for each read of a download (a
    /// download may take as long as it needs while it makes progress). Default 30.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// A Keystone token sent as `X-Auth-Token` (`{ file = ".." }` or `{ env = ".." }`);
    /// none for a noauth Glance.
    #[serde(default)]
    pub token: Option<SecretSpec>,
    /// Hash the cached files on every prepare, not only when their identity changed
    /// (default false).
    #[serde(default)]
    pub verify_cached: bool,
    /// Use a verified cached copy when Glance cannot be reached (default true).
    #[serde(default = "default_true")]
    pub offline_fallback: bool,
}

fn default_timeout() -> u64 {
    30
}
fn default_true() -> bool {
    true
}

/// Templates cached from Glance, disks made with `qemu-img`. Cheap to clone.
#[derive(Clone)]
pub struct GlanceImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    tag: Option<String>,
    token: Option<SecretString>,
    cache_dir: PathBuf,
    disk_dir: PathBuf,
    mode: DiskMode,
    verify_cached: bool,
    offline_fallback: bool,
    meta_agent: ureq::Agent,
    download_agent: ureq::Agent,
    downloads: AtomicU64,
}

impl std::fmt::Debug for GlanceImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("GlanceImageStore")
            .field("url", &i.url)
            .field("tag", &i.tag)
            .field("token", &i.token.as_ref().map(|_| "[redacted]"))
            .field("cache_dir", &i.cache_dir)
            .field("disk_dir", &i.disk_dir)
            .field("mode", &i.mode)
            .finish_non_exhaustive()
    }
}

fn prepare_dir(what: &str, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)
        .and_then(|()| fs::canonicalize(dir))
        .map_err(|e| {
            Error::invalid_input(format!("cannot create {what} {}", dir.display()))
                .with_backend(BACKEND)
                .with_source(e)
        })
}

impl GlanceImageStore {
    /// A store from its config section. Relative `cache_dir`, `disk_dir` and token file
    /// are resolved against `base_dir`; both directories are created if missing. A
    /// malformed URL, a zero timeout, an empty tag or an unreadable token is
    /// [`ErrorKind::InvalidInput`]. Nothing is contacted yet.
    pub fn from_config(c: &GlanceConfig, base_dir: &Path) -> Result<Self> {
        let url = c.url.trim_end_matches('/');
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
            return Err(Error::invalid_input(format!(
                "glance url {:?} must start with http:// or https:// and name a host",
                c.url
            )));
        }
        if url.contains(['?', '#']) || url.ends_with("/v2") {
            return Err(Error::invalid_input(format!(
                "glance url {:?} must be the endpoint without /v2, query or fragment",
                c.url
            )));
        }
        if c.timeout_secs == 0 {
            return Err(Error::invalid_input("timeout_secs must be at least 1"));
        }
        if c.tag.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(Error::invalid_input("tag must not be empty"));
        }
        let token = c.token.as_ref().map(|t| t.resolve(base_dir)).transpose()?;
        if let Some(t) = &token
            && ureq::http::HeaderValue::from_str(t.expose_secret()).is_err()
        {
            return Err(Error::invalid_input(
                "the glance token holds characters not allowed in an HTTP header",
            ));
        }
        let cache_dir = prepare_dir("cache_dir", &base_dir.join(&c.cache_dir))?;
        let disk_dir = prepare_dir("disk_dir", &base_dir.join(&c.disk_dir))?;
        let timeout = Duration::from_secs(c.timeout_secs);
        let meta_agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent("devvm")
            .timeout_global(Some(timeout))
            .build()
            .into();
        let download_agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent("devvm")
            .timeout_connect(Some(timeout))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(timeout))
            .build()
            .into();
        Ok(GlanceImageStore {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                tag: c.tag.clone(),
                token,
                cache_dir,
                disk_dir,
                mode: c.mode,
                verify_cached: c.verify_cached,
                offline_fallback: c.offline_fallback,
                meta_agent,
                download_agent,
                downloads: AtomicU64::new(0),
            }),
        })
    }

    /// The template cache directory (canonical).
    pub fn cache_dir(&self) -> &Path {
        &self.inner.cache_dir
    }

    /// The disk directory (canonical).
    pub fn disk_dir(&self) -> &Path {
        &self.inner.disk_dir
    }

    /// How many files (images, kernels, initrds) this store has downloaded and verified
    /// since it was made.
    pub fn downloads(&self) -> u64 {
        self.inner.downloads.load(Ordering::Relaxed)
    }

    /// Brings `template` up to date with Glance, downloading only what changed; the same
    /// as [`ImageStore::prepare`]. For a CLI `images sync`.
    pub async fn sync(&self, template: &TemplateName, progress: &Progress) -> Result<Template> {
        let inner = self.inner.clone();
        let name = template.clone();
        let progress = progress.clone();
        blocking(move || inner.prepare(&name, &progress)).await
    }

    /// Syncs every template present in the cache (see [`sync`](Self::sync)) and returns
    /// them. Stops at the first failure.
    pub async fn sync_all(&self, progress: &Progress) -> Result<Vec<Template>> {
        let local = self.templates().await?;
        let mut out = Vec::with_capacity(local.len());
        for t in local {
            out.push(self.sync(&t.name, progress).await?);
        }
        Ok(out)
    }
}

/// Runs file work on the blocking pool, tracked by the pipeline step (see
/// [`crate::work`]).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    crate::work::blocking(f)
        .await
        .map_err(|e| e.or_backend(BACKEND))
}

// ---------------------------------------------------------------------------------------
// Glance metadata (pure parts)

/// The fields of a Glance v2 image this backend reads. Custom properties (`kernel_id`,
/// `ramdisk_id`, `os_command_line`) are top-level strings in v2.
#[derive(Debug, Clone, Deserialize)]
struct ImageMeta {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    disk_format: Option<String>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    checksum: Option<String>,
    #[serde(default)]
    os_hash_algo: Option<String>,
    #[serde(default)]
    os_hash_value: Option<String>,
    #[serde(default)]
    kernel_id: Option<String>,
    #[serde(default)]
    ramdisk_id: Option<String>,
    #[serde(default)]
    os_command_line: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ImageList {
    images: Vec<ImageMeta>,
}

/// Picks the newest `active` image named `name` (carrying `tag`, if given) from a Glance
/// `GET /v2/images` response body. The filters are applied again here, so a server that
/// ignores a query parameter cannot hand us the wrong image. Ties in `created_at` keep
/// the server's order.
fn newest_image(listing: &[u8], name: &str, tag: Option<&str>) -> Result<Option<ImageMeta>> {
    let list: ImageList = serde_json::from_slice(listing)
        .map_err(|e| Error::backend("glance sent an image list that is not one").with_source(e))?;
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
fn check_image_id(id: &str) -> Result<&str> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Error::backend(format!(
            "glance image id {:?} is not a plain id",
            id.chars().take(70).collect::<String>()
        )));
    }
    Ok(id)
}

/// A hash algorithm this backend can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HashAlgo {
    Sha512,
    Sha384,
    Sha256,
    Md5,
}

impl HashAlgo {
    fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha512 => "sha512",
            HashAlgo::Sha384 => "sha384",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Md5 => "md5",
        }
    }
    fn hex_len(self) -> usize {
        match self {
            HashAlgo::Sha512 => 128,
            HashAlgo::Sha384 => 96,
            HashAlgo::Sha256 => 64,
            HashAlgo::Md5 => 32,
        }
    }
    fn from_glance(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sha512" => Some(HashAlgo::Sha512),
            "sha384" => Some(HashAlgo::Sha384),
            "sha256" => Some(HashAlgo::Sha256),
            _ => None,
        }
    }
}

/// An expected content checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checksum {
    algo: HashAlgo,
    hex: String,
}

impl Checksum {
    fn new(algo: HashAlgo, hex: &str) -> Option<Self> {
        let hex = hex.trim().to_ascii_lowercase();
        (hex.len() == algo.hex_len() && hex.chars().all(|c| c.is_ascii_hexdigit()))
            .then_some(Checksum { algo, hex })
    }

    /// `algorithm:hex`, as [`Template::digest`].
    fn digest(&self) -> String {
        format!("{}:{}", self.algo.name(), self.hex)
    }

    /// The checksum to verify `m` against: its multihash (`os_hash_algo` +
    /// `os_hash_value`) when we support the algorithm, else its md5 `checksum`. An image
    /// with neither cannot be verified and is refused.
    fn of(m: &ImageMeta) -> Result<Self> {
        let multihash = match (&m.os_hash_algo, &m.os_hash_value) {
            (Some(a), Some(v)) => HashAlgo::from_glance(a).and_then(|a| Checksum::new(a, v)),
            _ => None,
        };
        multihash
            .or_else(|| {
                m.checksum
                    .as_deref()
                    .and_then(|v| Checksum::new(HashAlgo::Md5, v))
            })
            .ok_or_else(|| {
                Error::backend(format!(
                    "image {} has no sha512/sha384/sha256 os_hash_value and no md5 checksum; \
                     refusing to use an image that cannot be verified",
                    m.id
                ))
            })
    }
}

enum Hasher {
    Sha512(sha2::Sha512),
    Sha384(sha2::Sha384),
    Sha256(sha2::Sha256),
    Md5(md5::Md5),
}

impl Hasher {
    fn new(algo: HashAlgo) -> Self {
        match algo {
            HashAlgo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
            HashAlgo::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            HashAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Md5 => Hasher::Md5(md5::Md5::new()),
        }
    }
    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha512(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Md5(h) => h.update(data),
        }
    }
    fn hex(self) -> String {
        let enc = |b: &[u8]| data_encoding::HEXLOWER.encode(b);
        match self {
            Hasher::Sha512(h) => enc(&h.finalize()),
            Hasher::Sha384(h) => enc(&h.finalize()),
            Hasher::Sha256(h) => enc(&h.finalize()),
            Hasher::Md5(h) => enc(&h.finalize()),
        }
    }
}

fn hash_file(path: &Path, algo: HashAlgo) -> Result<String> {
    let mut f = File::open(path).map_err(|e| io_err("cannot read", path, e))?;
    let mut h = Hasher::new(algo);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("cannot read", path, e)),
        }
    }
    Ok(h.hex())
}

/// The template image formats this backend can make disks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    fn from_glance(m: &ImageMeta) -> Result<Self> {
        match m.disk_format.as_deref() {
            Some("qcow2") => Ok(ImageFormat::Qcow2),
            Some("raw") => Ok(ImageFormat::Raw),
            other => Err(Error::backend(format!(
                "image {} has disk_format {}; only qcow2 and raw templates are supported",
                m.id,
                other.unwrap_or("(none)")
            ))),
        }
    }
    fn from_path(p: &Path) -> Option<Self> {
        match p.extension()?.to_str()? {
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            _ => None,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Files

fn io_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::backend(format!("{what} {}", path.display())).with_source(e)
}

/// `root/name`, where `name` must be one plain path component and the result, with any
/// symbolic link resolved, must be exactly `root/name` (`root` is canonical). A path that
/// would leave `root` is [`ErrorKind::InvalidInput`].
fn contained(root: &Path, name: &str) -> Result<PathBuf> {
    let escape = || {
        Error::invalid_input(format!(
            "{:?} would leave {}",
            name.chars().take(140).collect::<String>(),
            root.display()
        ))
    };
    let mut comps = Path::new(name).components();
    match (comps.next(), comps.next()) {
        (Some(Component::Normal(c)), None) if c == name => {}
        _ => return Err(escape()),
    }
    let path = root.join(name);
    match fs::canonicalize(&path) {
        Ok(real) if real == path => Ok(path),
        Ok(_) => Err(escape()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling symbolic link is still a link: refuse it too.
            match fs::symlink_metadata(&path) {
                Ok(_) => Err(escape()),
                Err(_) => Ok(path),
            }
        }
        Err(e) => Err(io_err("cannot resolve", &path, e)),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot sync", dir, e))
}

/// Removes a temporary file when dropped, unless disarmed.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// A hidden temporary name for `final_name` in `dir`: `.<final_name>.<uuid>.part`.
fn temp_name(dir: &Path, final_name: &str) -> TempFile {
    TempFile(Some(dir.join(format!(
        ".{final_name}.{}{PART_SUFFIX}",
        uuid::Uuid::new_v4().simple()
    ))))
}

/// The request id an owner record holds; `None` when there is no record.
fn read_owner(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", path, e)),
    }
}

fn foreign_disk(vm: &VmName, holder: Option<String>) -> Error {
    Error::already_exists(format!(
        "a disk for {vm} exists and belongs to {}",
        holder.unwrap_or_else(|| "someone else (no owner record)".into())
    ))
}

/// Removes the temporary files `.<prefix>*.part` in `dir`.
fn remove_parts(dir: &Path, prefix: &str) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot list", dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(&format!(".{prefix}")) && name.ends_with(PART_SUFFIX) {
            match fs::remove_file(entry.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot remove", &entry.path(), e)),
            }
        }
    }
    Ok(())
}

/// A file's identity when it was verified. Any write, replacement, `chmod` or `chown`
/// changes its ctime, which userland cannot set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> io::Result<Self> {
        let m = fs::metadata(path)?;
        Ok(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Streams `reader` into a temporary file in `dir`, hashing on the way; when the content
/// has `expected_size` bytes (if given) and matches `checksum`, fsyncs it, runs `check`
/// on it, renames it to `dir/final_name` and fsyncs `dir`. On any failure the temporary
/// file is removed and `dir/final_name` is untouched. `on_bytes` sees the running total.
#[allow(clippy::too_many_arguments)]
fn store_verified(
    mut reader: impl Read,
    dir: &Path,
    final_name: &str,
    image_id: &str,
    checksum: &Checksum,
    expected_size: Option<u64>,
    mut on_bytes: impl FnMut(u64),
    check: impl FnOnce(&Path) -> Result<()>,
) -> Result<Stamp> {
    let final_path = contained(dir, final_name)?;
    let tmp = temp_name(dir, final_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp.path())
        .map_err(|e| io_err("cannot create", tmp.path(), e))?;
    let mut hasher = Hasher::new(checksum.algo);
    let mut buf = vec![0u8; 1 << 20];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::unavailable(format!(
                    "download of image {image_id} broke off after {total} bytes"
                ))
                .with_source(e));
            }
        };
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n])
            .map_err(|e| io_err("cannot write", tmp.path(), e))?;
        total += n as u64;
        on_bytes(total);
    }
    if let Some(size) = expected_size
        && size != total
    {
        return Err(Error::backend(format!(
            "size mismatch: image {image_id} has {size} bytes in glance, the download {total}"
        )));
    }
    let got = hasher.hex();
    if got != checksum.hex {
        return Err(Error::backend(format!(
            "checksum mismatch: image {image_id} should have {} {}…, the download has {}…",
            checksum.algo.name(),
            &checksum.hex[..16],
            &got[..16.min(got.len())]
        )));
    }
    f.sync_all()
        .map_err(|e| io_err("cannot sync", tmp.path(), e))?;
    drop(f);
    check(tmp.path())?;
    fs::rename(tmp.path(), &final_path)
        .map_err(|e| io_err("cannot rename into", &final_path, e))?;
    tmp.disarm();
    fsync_dir(dir)?;
    Stamp::of(&final_path).map_err(|e| io_err("cannot stat", &final_path, e))
}

/// Writes `bytes` to `dir/name` atomically (temporary file, fsync, rename, fsync dir).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = contained(dir, name)?;
    let tmp = temp_name(dir, name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp.path())
        .map_err(|e| io_err("cannot create", tmp.path(), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err("cannot write", tmp.path(), e))?;
    drop(f);
    fs::rename(tmp.path(), &path).map_err(|e| io_err("cannot rename into", &path, e))?;
    tmp.disarm();
    fsync_dir(dir)
}

/// An exclusive lock on a file, released when dropped.
struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn lock(path: &Path) -> Result<Lock> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io_err("cannot open", path, e))?;
    f.lock().map_err(|e| io_err("cannot lock", path, e))?;
    Ok(Lock(f))
}

// ---------------------------------------------------------------------------------------
// The sidecar

/// One verified file of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CachedFile {
    /// The Glance image id.
    id: String,
    /// The file name inside the template's directory.
    file: String,
    checksum: Checksum,
    stamp: Stamp,
}

/// `cache_dir/<template>/template.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    version: u32,
    name: String,
    image: CachedFile,
    #[serde(default)]
    kernel: Option<CachedFile>,
    #[serde(default)]
    initrd: Option<CachedFile>,
    #[serde(default)]
    cmdline: Option<String>,
}

impl Sidecar {
    fn files(&self) -> impl Iterator<Item = &CachedFile> {
        std::iter::once(&self.image)
            .chain(self.kernel.as_ref())
            .chain(self.initrd.as_ref())
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

fn transport_error(e: ureq::Error, what: &str, url: &str) -> Error {
    let err = match &e {
        ureq::Error::Timeout(_) => {
            Error::unavailable(format!("glance at {url} did not answer {what} in time"))
        }
        ureq::Error::Io(_) | ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => {
            Error::unavailable(format!("cannot reach glance at {url} ({what})"))
        }
        ureq::Error::BadUri(_) | ureq::Error::InvalidProxyUrl => {
            Error::invalid_input(format!("bad glance url {url}"))
        }
        _ => Error::backend(format!("glance at {url}: {what} failed")),
    };
    err.with_backend(BACKEND).with_source(e)
}

fn status_error(status: u16, what: &str) -> Option<Error> {
    let e = match status {
        200..=299 => return None,
        401 | 403 => Error::unauthorized(format!("glance refused {what} (HTTP {status})")),
        404 => Error::not_found(format!("glance has no {what} (HTTP 404)")),
        408 | 429 | 500..=599 => {
            Error::unavailable(format!("glance could not serve {what} (HTTP {status})"))
        }
        _ => Error::backend(format!("glance answered {what} with HTTP {status}")),
    };
    Some(e.with_backend(BACKEND))
}

/// Reports download progress at most every 5 % (or every 64 MiB when the size is not
/// known).
struct Reporter<'a> {
    progress: &'a Progress,
    label: String,
    total: Option<u64>,
    next: u64,
}

impl<'a> Reporter<'a> {
    const UNKNOWN_STEP: u64 = 64 << 20;

    fn new(progress: &'a Progress, label: String, total: Option<u64>) -> Self {
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
    fn step(&self) -> u64 {
        self.total.map_or(Self::UNKNOWN_STEP, |t| (t / 20).max(1))
    }
    fn update(&mut self, done: u64) {
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

fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)")
        .chars()
        .take(300)
        .collect()
}

fn command_result(program: &str, sub: &str, out: std::process::Output) -> Result<Vec<u8>> {
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(Error::backend(format!(
            "{program} {sub} failed: {}",
            last_line(&out.stderr)
        )))
    }
}

async fn run(program: &str, args: Vec<OsString>) -> Result<Vec<u8>> {
    let sub = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = tokio::process::Command::new(program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::backend(format!("cannot run {program}")).with_source(e))?;
    command_result(program, &sub, out)
}

fn run_blocking(program: &str, args: Vec<OsString>) -> Result<Vec<u8>> {
    let sub = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = std::process::Command::new(program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::backend(format!("cannot run {program}")).with_source(e))?;
    command_result(program, &sub, out)
}

/// What `qemu-img info --output=json` says about an image.
#[derive(Debug, Deserialize)]
struct QemuInfo {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<serde_json::Value>,
}

fn info_args(path: &Path, format: ImageFormat) -> Vec<OsString> {
    vec![
        "info".into(),
        "-U".into(),
        "-f".into(),
        format.as_str().into(),
        "--output=json".into(),
        path.into(),
    ]
}

fn parse_info(out: &[u8], path: &Path) -> Result<QemuInfo> {
    serde_json::from_slice(out).map_err(|e| {
        Error::backend(format!("cannot read qemu-img info of {}", path.display())).with_source(e)
    })
}

/// Refuses a qcow2 template that names a backing file or an external data file: those
/// would make a VM read arbitrary files of the host.
fn check_template_file(path: &Path, format: ImageFormat, image_id: &str) -> Result<()> {
    if format != ImageFormat::Qcow2 {
        return Ok(());
    }
    let info = run_blocking("qemu-img", info_args(path, format)).map_err(|e| {
        Error::backend(format!(
            "image {image_id} is not a usable qcow2: {}",
            e.message()
        ))
    })?;
    let info = parse_info(&info, path)?;
    let data_file = info
        .format_specific
        .as_ref()
        .and_then(|v| v.pointer("/data/data-file"))
        .is_some();
    if info.backing_filename.is_some() || data_file {
        return Err(Error::backend(format!(
            "image {image_id} is a qcow2 with a backing or data file; refused"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The store

impl Inner {
    fn request(
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
    fn get_json(&self, url: &str, query: &[(&str, &str)], what: &str) -> Result<Vec<u8>> {
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
    fn find_image(&self, name: &TemplateName) -> Result<Option<ImageMeta>> {
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
    fn referenced_image(&self, of: &ImageMeta, role: &str, id: &str) -> Result<ImageMeta> {
        check_image_id(id)?;
        let what = format!("image {id} ({role} of image {})", of.id);
        let body = self
            .get_json(&format!("{}/v2/images/{id}", self.url), &[], &what)
            .map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Error::backend(format!(
                        "image {} names {role} {id}, which glance does not have",
                        of.id
                    ))
                    .with_backend(BACKEND)
                } else {
                    e
                }
            })?;
        let m: ImageMeta = serde_json::from_slice(&body).map_err(|e| {
            Error::backend(format!("glance sent {what} we cannot read")).with_source(e)
        })?;
        if m.id != id || m.status.as_deref() != Some("active") {
            return Err(Error::backend(format!(
                "image {} names {role} {id}, which is not active in glance",
                of.id
            )));
        }
        Ok(m)
    }

    fn template_dir(&self, name: &TemplateName, create: bool) -> Result<PathBuf> {
        let dir = contained(&self.cache_dir, name.as_str())?;
        if create {
            match fs::create_dir(&dir) {
                Ok(()) => fsync_dir(&self.cache_dir)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("cannot create", &dir, e)),
            }
            // Created or not, it must be a real directory right there.
            contained(&self.cache_dir, name.as_str())?;
            if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                return Err(Error::backend(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
        }
        Ok(dir)
    }

    fn read_sidecar(&self, dir: &Path, name: &TemplateName) -> Option<Sidecar> {
        let path = contained(dir, SIDECAR).ok()?;
        let bytes = fs::read(path).ok()?;
        let s: Sidecar = serde_json::from_slice(&bytes).ok()?;
        let sane = s.version == SIDECAR_VERSION
            && s.name == name.as_str()
            && s.files().all(|f| {
                check_image_id(&f.id).is_ok()
                    && contained(dir, &f.file).is_ok()
                    && f.file.starts_with(&f.id)
            })
            && ImageFormat::from_path(Path::new(&s.image.file)).is_some();
        sane.then_some(s)
    }

    fn template_of(&self, name: &TemplateName, dir: &Path, s: &Sidecar) -> Template {
        let kernel = s.kernel.as_ref().map(|k| dir.join(&k.file));
        Template {
            name: name.clone(),
            path: dir.join(&s.image.file),
            digest: Some(s.image.checksum.digest()),
            boot: BootSpec {
                cmdline: kernel.as_ref().and(s.cmdline.clone()),
                kernel,
                initrd: s.initrd.as_ref().map(|i| dir.join(&i.file)),
            },
        }
    }

    /// Whether the cached `f` is still what was verified: same identity (or, when that
    /// changed or `rehash` is set, the same content). Returns its current stamp.
    fn still_valid(&self, dir: &Path, f: &CachedFile, rehash: bool) -> Result<Option<Stamp>> {
        let path = contained(dir, &f.file)?;
        let Ok(stamp) = Stamp::of(&path) else {
            return Ok(None);
        };
        if stamp == f.stamp && !rehash {
            return Ok(Some(stamp));
        }
        Ok((hash_file(&path, f.checksum.algo)? == f.checksum.hex).then_some(stamp))
    }

    /// The cached template, if its sidecar is valid and its files are intact.
    fn cached_template(&self, name: &TemplateName) -> Result<Option<Template>> {
        let dir = self.template_dir(name, false)?;
        let Some(s) = self.read_sidecar(&dir, name) else {
            return Ok(None);
        };
        for f in s.files() {
            if self.still_valid(&dir, f, self.verify_cached)?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(self.template_of(name, &dir, &s)))
    }

    /// Makes sure `dir` holds the verified content of Glance image `m` as `file`,
    /// reusing `previous` or an existing file when they still match.
    #[allow(clippy::too_many_arguments)]
    fn ensure_file(
        &self,
        dir: &Path,
        m: &ImageMeta,
        file: &str,
        previous: Option<&CachedFile>,
        label: &str,
        check: impl FnOnce(&Path) -> Result<()>,
        progress: &Progress,
    ) -> Result<CachedFile> {
        let checksum = Checksum::of(m)?;
        let path = contained(dir, file)?;
        let wanted = |stamp| CachedFile {
            id: m.id.clone(),
            file: file.to_owned(),
            checksum: checksum.clone(),
            stamp,
        };
        if let Some(prev) =
            previous.filter(|p| p.id == m.id && p.file == file && p.checksum == checksum)
        {
            if let Some(stamp) = self.still_valid(dir, prev, self.verify_cached)? {
                return Ok(wanted(stamp));
            }
            if path.exists() {
                progress.message(format!("cached {label} is damaged; downloading it again"));
            }
        } else if let Ok(stamp) = Stamp::of(&path) {
            // Verified before it was renamed into place, but no sidecar vouches for it:
            // hash it again before trusting it.
            if hash_file(&path, checksum.algo)? == checksum.hex {
                return Ok(wanted(stamp));
            }
            progress.message(format!("cached {label} is damaged; downloading it again"));
        }

        let id = check_image_id(&m.id)?;
        let what = format!("the data of image {id}");
        let url = format!("{}/v2/images/{id}/file", self.url);
        let resp = self
            .request(&self.download_agent, &url)
            .header("Accept", "application/octet-stream")
            .call()
            .map_err(|e| transport_error(e, &what, &self.url))?;
        let status = resp.status().as_u16();
        if status == 204 {
            return Err(Error::backend(format!("image {id} has no data in glance")));
        }
        if let Some(e) = status_error(status, &what) {
            return Err(e);
        }
        let total = m.size.or_else(|| resp.body().content_length());
        let mut reporter = Reporter::new(progress, label.to_owned(), total);
        progress.message(format!("downloading {label}"));
        let reader = resp.into_body().into_reader();
        let stamp = store_verified(
            reader,
            dir,
            file,
            id,
            &checksum,
            m.size,
            |n| reporter.update(n),
            check,
        )?;
        self.downloads.fetch_add(1, Ordering::Relaxed);
        progress.message(format!(
            "{label} downloaded and verified ({})",
            checksum.algo.name()
        ));
        Ok(wanted(stamp))
    }

    /// Syncs from Glance; when Glance cannot be reached (or breaks off a download) and
    /// `offline_fallback` is on, uses a cached copy that is still intact.
    fn prepare(&self, name: &TemplateName, progress: &Progress) -> Result<Template> {
        match self.sync(name, progress) {
            Err(e) if e.kind() == ErrorKind::Unavailable && self.offline_fallback => {
                match self.cached_template(name) {
                    Ok(Some(t)) => {
                        progress
                            .message(format!("{}; using the cached template {name}", e.message()));
                        Ok(t)
                    }
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    fn sync(&self, name: &TemplateName, progress: &Progress) -> Result<Template> {
        let image = self.find_image(name)?.ok_or_else(|| {
            Error::not_found(match &self.tag {
                Some(t) => format!("glance has no active image {name} tagged {t}"),
                None => format!("glance has no active image {name}"),
            })
        })?;
        let image_id = check_image_id(&image.id)?.to_owned();
        let format = ImageFormat::from_glance(&image)?;
        Checksum::of(&image)?;
        let kernel = image
            .kernel_id
            .as_deref()
            .filter(|k| !k.is_empty())
            .map(|k| self.referenced_image(&image, "kernel_id", k))
            .transpose()?;
        let initrd = image
            .ramdisk_id
            .as_deref()
            .filter(|r| !r.is_empty())
            .map(|r| self.referenced_image(&image, "ramdisk_id", r))
            .transpose()?;

        let dir = self.template_dir(name, true)?;
        let _lock = lock(&contained(&dir, LOCK_FILE)?)?;
        // We hold the template's lock: no one else is downloading into it.
        remove_parts(&dir, "")?;
        let old = self.read_sidecar(&dir, name);

        let image_file = format!("{image_id}.{}", format.as_str());
        let image_cached = self.ensure_file(
            &dir,
            &image,
            &image_file,
            old.as_ref().map(|s| &s.image),
            &format!("image {name} ({image_id})"),
            |p| check_template_file(p, format, &image_id),
            progress,
        )?;
        let kernel_cached = kernel
            .map(|k| {
                let file = format!("{}.kernel", check_image_id(&k.id)?);
                self.ensure_file(
                    &dir,
                    &k,
                    &file,
                    old.as_ref().and_then(|s| s.kernel.as_ref()),
                    &format!("kernel of {name} ({})", k.id),
                    |_| Ok(()),
                    progress,
                )
            })
            .transpose()?;
        let initrd_cached = initrd
            .map(|r| {
                let file = format!("{}.initrd", check_image_id(&r.id)?);
                self.ensure_file(
                    &dir,
                    &r,
                    &file,
                    old.as_ref().and_then(|s| s.initrd.as_ref()),
                    &format!("initrd of {name} ({})", r.id),
                    |_| Ok(()),
                    progress,
                )
            })
            .transpose()?;
        let sidecar = Sidecar {
            version: SIDECAR_VERSION,
            name: name.as_str().to_owned(),
            image: image_cached,
            cmdline: kernel_cached
                .as_ref()
                .and(image.os_command_line.clone())
                .filter(|c| !c.is_empty()),
            kernel: kernel_cached,
            initrd: initrd_cached,
        };
        if old.as_ref() != Some(&sidecar) {
            let bytes = serde_json::to_vec_pretty(&sidecar)
                .map_err(|e| Error::backend("cannot encode the template sidecar").with_source(e))?;
            write_atomic(&dir, SIDECAR, &bytes)?;
        }
        progress.message(format!("template {name} is image {image_id}"));
        Ok(self.template_of(name, &dir, &sidecar))
    }

    fn templates(&self) -> Result<Vec<Template>> {
        let entries =
            fs::read_dir(&self.cache_dir).map_err(|e| io_err("cannot list", &self.cache_dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| TemplateName::new(n).ok())
            else {
                continue;
            };
            let Ok(dir) = self.template_dir(&name, false) else {
                continue;
            };
            if let Some(s) = self.read_sidecar(&dir, &name)
                && s.files().all(|f| dir.join(&f.file).is_file())
            {
                out.push(self.template_of(&name, &dir, &s));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The cached file of `t` and its format. It must be a file inside
    /// `cache_dir/<t.name>/` (any version, not only the newest), else `NotFound`.
    fn template_file(&self, t: &Template) -> Result<(PathBuf, ImageFormat)> {
        let not_cached = || {
            Error::not_found(format!(
                "template {} is not in the cache at {}; prepare it first",
                t.name,
                t.path.display()
            ))
        };
        let dir = self.template_dir(&t.name, false)?;
        let file = t
            .path
            .file_name()
            .and_then(|f| f.to_str())
            .ok_or_else(not_cached)?;
        if t.path.parent() != Some(dir.as_path()) || file.starts_with('.') {
            return Err(not_cached());
        }
        let path = contained(&dir, file)?;
        let format = ImageFormat::from_path(&path).ok_or_else(not_cached)?;
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            return Err(not_cached());
        }
        Ok((path, format))
    }

    fn disk_name(vm: &VmName) -> String {
        format!("{vm}.qcow2")
    }

    async fn describe_disk(&self, vm: &VmName, path: &Path) -> Result<Disk> {
        let out = run("qemu-img", info_args(path, ImageFormat::Qcow2)).await?;
        let info = parse_info(&out, path)?;
        Ok(Disk {
            vm: vm.clone(),
            path: path.to_owned(),
            format: DiskFormat::Qcow2,
            size_gib: info.virtual_size.div_ceil(GIB),
        })
    }

    /// The owner record of `vm`'s disk: `.<vm>.qcow2.owner` beside it, holding the request
    /// id of the run that made it (a dot file, so a libvirt dir pool does not list it).
    fn owner_file(&self, vm: &VmName) -> Result<PathBuf> {
        contained(&self.disk_dir, &format!(".{}.owner", Self::disk_name(vm)))
    }

    /// Who made `vm`'s disk, if anyone recorded it.
    fn disk_owner(&self, vm: &VmName) -> Result<Option<String>> {
        read_owner(&self.owner_file(vm)?)
    }

    /// Claims `vm`'s disk name for `owner` by creating its owner record exclusively.
    /// Claiming again for the same owner succeeds (a retry after a crash); a record of
    /// another owner is `AlreadyExists`.
    fn claim_disk(&self, vm: &VmName, owner: &RequestId) -> Result<()> {
        let path = self.owner_file(vm)?;
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(owner.as_str().as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io_err("cannot write", &path, e))?;
                fsync_dir(&self.disk_dir)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match self.disk_owner(vm)? {
                Some(o) if o == owner.as_str() => Ok(()),
                holder => Err(foreign_disk(vm, holder)),
            },
            Err(e) => Err(io_err("cannot create", &path, e)),
        }
    }

    async fn create_disk(
        &self,
        vm: &VmName,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<Disk> {
        let name = Self::disk_name(vm);
        let path = contained(&self.disk_dir, &name)?;
        if fs::symlink_metadata(&path).is_ok() {
            // Never adopted: only the run whose record says it made this disk gets it.
            return match self.disk_owner(vm)? {
                Some(o) if o == owner.as_str() => self.describe_disk(vm, &path).await,
                holder => Err(foreign_disk(vm, holder)),
            };
        }
        if size_gib == 0 {
            return Err(Error::invalid_input("disk size must be at least 1 GiB"));
        }
        let bytes = size_gib.checked_mul(GIB).ok_or_else(|| {
            Error::invalid_input(format!("disk size {size_gib} GiB is too large"))
        })?;
        let (tpath, format) = self.template_file(template)?;
        let tinfo = parse_info(&run("qemu-img", info_args(&tpath, format)).await?, &tpath)?;
        if bytes < tinfo.virtual_size {
            return Err(Error::invalid_input(format!(
                "disk size {size_gib} GiB is smaller than template {}'s {:.1} GiB",
                template.name,
                tinfo.virtual_size as f64 / GIB as f64
            )));
        }
        self.claim_disk(vm, owner)?;
        let tmp = temp_name(&self.disk_dir, &name);
        let size = format!("{size_gib}G");
        match self.mode {
            DiskMode::Overlay => {
                progress.message(format!(
                    "creating overlay {} on {}",
                    path.display(),
                    tpath.display()
                ));
                run(
                    "qemu-img",
                    vec![
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        "qcow2".into(),
                        "-F".into(),
                        format.as_str().into(),
                        "-b".into(),
                        tpath.clone().into(),
                        tmp.path().into(),
                        size.into(),
                    ],
                )
                .await?;
            }
            DiskMode::Copy => {
                progress.message(format!("copying {} to {}", tpath.display(), path.display()));
                match format {
                    // The template is already a standalone qcow2: a reflink (instant on
                    // btrfs/XFS) or sparse copy of it is the disk.
                    ImageFormat::Qcow2 => {
                        run(
                            "cp",
                            vec![
                                "--reflink=auto".into(),
                                "--sparse=always".into(),
                                "--".into(),
                                tpath.clone().into(),
                                tmp.path().into(),
                            ],
                        )
                        .await?;
                    }
                    ImageFormat::Raw => {
                        run(
                            "qemu-img",
                            vec![
                                "convert".into(),
                                "-q".into(),
                                "-f".into(),
                                "raw".into(),
                                "-O".into(),
                                "qcow2".into(),
                                tpath.clone().into(),
                                tmp.path().into(),
                            ],
                        )
                        .await?;
                    }
                }
                run(
                    "qemu-img",
                    vec![
                        "resize".into(),
                        "-q".into(),
                        "-f".into(),
                        "qcow2".into(),
                        tmp.path().into(),
                        size.into(),
                    ],
                )
                .await?;
            }
        }
        let tmp_path = tmp.path().to_owned();
        let final_path = path.clone();
        let dir = self.disk_dir.clone();
        let (record, vm2, owner2) = (self.owner_file(vm)?, vm.clone(), owner.clone());
        blocking(move || {
            File::open(&tmp_path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("cannot sync", &tmp_path, e))?;
            if crate::work::abandoned() {
                return Err(crate::work::cancelled_before_commit(
                    "linking the disk into place",
                ));
            }
            // Link, never replace. A file that appeared meanwhile is ours only if our
            // record still stands (a concurrent retry of this run); otherwise someone made
            // it by hand: it stays, and so does nothing of ours.
            match fs::hard_link(&tmp_path, &final_path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if read_owner(&record)?.as_deref() != Some(owner2.as_str()) {
                        return Err(foreign_disk(&vm2, None));
                    }
                }
                Err(e) => return Err(io_err("cannot link", &final_path, e)),
            }
            fsync_dir(&dir)
        })
        .await?;
        drop(tmp);
        progress.message(format!("disk {} ready", path.display()));
        self.describe_disk(vm, &path).await
    }

    /// Deletes `vm`'s disk, what a killed `create_disk` of it left behind, and its owner
    /// record, if that record names `owner`; anything else is left alone.
    fn delete_disk(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        let name = Self::disk_name(vm);
        let path = contained(&self.disk_dir, &name)?;
        let exists = fs::symlink_metadata(&path).is_ok();
        match self.disk_owner(vm)? {
            Some(o) if o == owner.as_str() => {}
            Some(o) => return Ok(Undone::foreign(o)),
            None if exists => {
                return Ok(Undone::foreign("no owner record (not made by devvm)"));
            }
            None => return Ok(Undone::Absent),
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot remove", &path, e)),
        }
        remove_parts(&self.disk_dir, &format!("{name}."))?;
        let record = self.owner_file(vm)?;
        match fs::remove_file(&record) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot remove", &record, e)),
        }
        fsync_dir(&self.disk_dir)?;
        Ok(Undone::Removed)
    }
}

#[async_trait]
impl ImageStore for GlanceImageStore {
    fn backend(&self) -> &str {
        BACKEND
    }

    /// Syncs `template` from Glance as described in the [module docs](self).
    async fn prepare(&self, template: &TemplateName, progress: &Progress) -> Result<Template> {
        self.sync(template, progress).await
    }

    /// The templates with a valid sidecar whose files exist (not hashed again).
    async fn templates(&self) -> Result<Vec<Template>> {
        let inner = self.inner.clone();
        blocking(move || inner.templates()).await
    }

    /// Makes `disk_dir/<vm>.qcow2` (an overlay or a copy, per `mode`); any `host` is
    /// accepted. A size below the template's virtual size is `InvalidInput`; a template
    /// not in the cache is `NotFound`.
    async fn create_disk(
        &self,
        vm: &VmName,
        _host: &HostId,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<Disk> {
        self.inner
            .create_disk(vm, template, size_gib, owner, progress)
            .await
            .map_err(|e| e.or_backend(BACKEND))
    }

    async fn delete_disk(&self, vm: &VmName, _host: &HostId, owner: &RequestId) -> Result<Undone> {
        let inner = self.inner.clone();
        let (vm, owner) = (vm.clone(), owner.clone());
        blocking(move || inner.delete_disk(&vm, &owner)).await
    }

    async fn disk(&self, vm: &VmName, _host: &HostId) -> Result<Option<Disk>> {
        let path = contained(&self.inner.disk_dir, &Inner::disk_name(vm))
            .map_err(|e| e.or_backend(BACKEND))?;
        if fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        self.inner
            .describe_disk(vm, &path)
            .await
            .map(Some)
            .map_err(|e| e.or_backend(BACKEND))
    }
}

/// Registers this backend as `glance` in the `[images]` section.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    r.register_images("glance", |ctx| {
        let o: GlanceConfig = ctx.options()?;
        Ok(std::sync::Arc::new(GlanceImageStore::from_config(
            &o,
            ctx.base_dir,
        )?))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = fs::canonicalize(d.path()).unwrap_or_else(|e| panic!("{e}"));
        (d, p)
    }

    fn listing(images: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "images": images, "first": "/v2/images" }))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn img(id: &str, name: &str, status: &str, created: &str, tags: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "id": id, "name": name, "status": status, "created_at": created, "tags": tags,
            "disk_format": "qcow2", "size": 3, "os_hash_algo": "sha512",
            "os_hash_value": null, "checksum": null, "custom_prop": "x"
        })
    }

    #[test]
    fn the_newest_active_image_of_that_name_and_tag_wins() {
        let body = listing(&[
            img("a", "t", "active", "2024-01-01T00:00:00Z", &["devvm"]),
            img("b", "t", "queued", "2024-06-01T00:00:00Z", &["devvm"]),
            img("c", "t", "active", "2024-03-01T00:00:00Z", &["devvm"]),
            img(
                "d",
                "t-kernel",
                "active",
                "2024-09-01T00:00:00Z",
                &["devvm"],
            ),
            img("e", "t", "active", "2024-05-01T00:00:00Z", &[]),
            img("f", "t", "active", "2024-03-01T00:00:00Z", &["devvm"]),
        ]);
        let pick = |tag| {
            newest_image(&body, "t", tag)
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|m| m.id)
        };
        assert_eq!(
            pick(Some("devvm")).as_deref(),
            Some("c"),
            "ties keep server order"
        );
        assert_eq!(pick(None).as_deref(), Some("e"));
        assert_eq!(pick(Some("other")), None);
        assert!(
            newest_image(&body, "nope", None)
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none()
        );
        assert!(newest_image(b"<html>", "t", None).is_err());
    }

    #[test]
    fn checksums_prefer_the_multihash_and_fall_back_to_md5() {
        let mut m: ImageMeta = serde_json::from_value(img("a", "t", "active", "x", &[]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(Checksum::of(&m).is_err(), "nothing to verify against");
        m.checksum = Some("0123456789ABCDEF0123456789abcdef".into());
        let c = Checksum::of(&m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.algo, HashAlgo::Md5);
        assert_eq!(c.hex, "0123456789abcdef0123456789abcdef");
        m.os_hash_value = Some("ab".repeat(64));
        assert_eq!(
            Checksum::of(&m).map(|c| c.algo).ok(),
            Some(HashAlgo::Sha512)
        );
        m.os_hash_algo = Some("blake2b".into());
        assert_eq!(Checksum::of(&m).map(|c| c.algo).ok(), Some(HashAlgo::Md5));
    }

    #[test]
    fn image_ids_are_plain() {
        assert!(check_image_id("b60ac485-7d1d-47e6-93c2-dbed985279d5").is_ok());
        for bad in ["", "../x", "a/b", "a b", ".x", &"a".repeat(65)] {
            assert!(check_image_id(bad).is_err(), "{bad:?}");
        }
    }

    fn sha512_of(data: &[u8]) -> Checksum {
        let mut h = Hasher::new(HashAlgo::Sha512);
        h.update(data);
        Checksum {
            algo: HashAlgo::Sha512,
            hex: h.hex(),
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()
            .unwrap_or_else(|e| panic!("{e}"));
        v.sort();
        v
    }

    #[test]
    fn a_verified_download_is_renamed_into_place() {
        let (_d, dir) = tmpdir();
        let data = b"template bytes".repeat(1000);
        let mut seen = 0;
        let stamp = store_verified(
            &data[..],
            &dir,
            "img.qcow2",
            "img",
            &sha512_of(&data),
            Some(data.len() as u64),
            |n| seen = n,
            |p| {
                assert!(
                    p.file_name()
                        .is_some_and(|f| f.to_string_lossy().starts_with('.'))
                );
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seen, data.len() as u64);
        assert_eq!(stamp.size, data.len() as u64);
        assert_eq!(entries(&dir), vec!["img.qcow2".to_owned()]);
        assert_eq!(fs::read(dir.join("img.qcow2")).ok(), Some(data));
    }

    #[test]
    fn a_wrong_or_broken_download_leaves_nothing_visible() {
        let (_d, dir) = tmpdir();
        let good = b"the real image".to_vec();
        let bad = b"the evil image".to_vec();
        let e = store_verified(
            &bad[..],
            &dir,
            "img.qcow2",
            "img-1",
            &sha512_of(&good),
            None,
            |_| {},
            |_| Ok(()),
        )
        .err()
        .unwrap_or_else(|| panic!("wrong content accepted"));
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(e.message().contains("checksum mismatch"), "{e}");
        assert!(e.message().contains("img-1"), "{e}");
        assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));

        // A short download.
        let e = store_verified(
            &good[..4],
            &dir,
            "img.qcow2",
            "img-1",
            &sha512_of(&good),
            Some(good.len() as u64),
            |_| {},
            |_| Ok(()),
        )
        .err()
        .unwrap_or_else(|| panic!("short content accepted"));
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(entries(&dir).is_empty());

        // A connection that breaks off mid-way is retryable and leaves nothing.
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
                }
                self.0 -= 1;
                buf[0] = b'x';
                Ok(1)
            }
        }
        let e = store_verified(
            Broken(10),
            &dir,
            "img.qcow2",
            "img-1",
            &sha512_of(&good),
            None,
            |_| {},
            |_| Ok(()),
        )
        .err()
        .unwrap_or_else(|| panic!("broken download accepted"));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        assert!(entries(&dir).is_empty());

        // A failed check after the hash leaves nothing either, and an existing file
        // stays as it was.
        fs::write(dir.join("img.qcow2"), b"old").unwrap_or_else(|e| panic!("{e}"));
        let e = store_verified(
            &good[..],
            &dir,
            "img.qcow2",
            "img-1",
            &sha512_of(&good),
            None,
            |_| {},
            |_| Err(Error::backend("has a backing file")),
        )
        .err()
        .unwrap_or_else(|| panic!("failed check accepted"));
        assert!(e.message().contains("backing"));
        assert_eq!(entries(&dir), vec!["img.qcow2".to_owned()]);
        assert_eq!(fs::read(dir.join("img.qcow2")).ok(), Some(b"old".to_vec()));
    }

    #[test]
    fn paths_cannot_leave_their_directory() {
        let (_d, root) = tmpdir();
        let (_o, outside) = tmpdir();
        assert_eq!(
            contained(&root, "debian-12").ok(),
            Some(root.join("debian-12"))
        );
        for bad in ["..", ".", "../x", "a/b", "/etc", "a/../../x", "", "x/"] {
            let e = contained(&root, bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            contained(&root, "evil").is_err(),
            "a symlink out is refused"
        );
        std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            contained(&root, "dangling").is_err(),
            "a dangling symlink is refused"
        );
        // A file named with dots that is not a traversal is fine.
        assert!(contained(&root, "..hidden-ish").is_ok());
    }

    #[test]
    fn http_statuses_map_to_error_kinds() {
        let kind = |s| status_error(s, "x").map(|e| e.kind());
        assert_eq!(kind(200), None);
        assert_eq!(kind(401), Some(ErrorKind::Unauthorized));
        assert_eq!(kind(403), Some(ErrorKind::Unauthorized));
        assert_eq!(kind(404), Some(ErrorKind::NotFound));
        assert_eq!(kind(503), Some(ErrorKind::Unavailable));
        assert_eq!(kind(302), Some(ErrorKind::Backend));
        assert!(status_error(503, "x").is_some_and(|e| e.is_retryable()));
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable_and_touches_nothing() {
        let (_d, base) = tmpdir();
        let c: GlanceConfig = toml::from_str(
            "url = \"http://127.0.0.1:1\"\ncache_dir = \"c\"\ndisk_dir = \"d\"\ntimeout_secs = 2\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = GlanceImageStore::from_config(&c, &base).unwrap_or_else(|e| panic!("{e}"));
        let t = TemplateName::new("debian-12").unwrap_or_else(|e| panic!("{e}"));
        let e = s
            .prepare(&t, &Progress::discard())
            .await
            .err()
            .unwrap_or_else(|| panic!("prepare succeeded"));
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
        assert!(e.is_retryable());
        assert_eq!(e.backend_name(), Some(BACKEND));
        assert!(entries(&base.join("c")).is_empty());
    }

    #[test]
    fn the_reporter_reports_at_most_every_five_percent() {
        let p = Progress::discard();
        let mut r = Reporter::new(&p, "x".into(), Some(1000));
        let mut reports = 0;
        for done in 0..=1000u64 {
            let before = r.next;
            r.update(done);
            if r.next != before {
                reports += 1;
            }
        }
        assert!(reports <= 21, "{reports}");
        assert!(reports >= 19, "{reports}");
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_keys() {
        let c: GlanceConfig = toml::from_str(
            "url = \"http://127.0.0.1:9292\"\ncache_dir = \"c\"\ndisk_dir = \"d\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.mode, DiskMode::Overlay);
        assert_eq!(c.timeout_secs, 30);
        assert!(c.offline_fallback && !c.verify_cached && c.tag.is_none() && c.token.is_none());
        let bad: std::result::Result<GlanceConfig, _> =
            toml::from_str("url = \"http://x\"\ncache_dir = \"c\"\ndisk_dir = \"d\"\ncahce = 1\n");
        assert!(bad.is_err());
        let (_d, base) = tmpdir();
        let with = |url: &str| GlanceConfig {
            url: url.into(),
            ..c.clone()
        };
        assert!(GlanceImageStore::from_config(&with("ftp://x"), &base).is_err());
        assert!(GlanceImageStore::from_config(&with("http://"), &base).is_err());
        assert!(GlanceImageStore::from_config(&with("http://x/v2"), &base).is_err());
        let mut secret = with("http://x:9292/");
        secret.token = Some(SecretSpec::Inline("s3cret-token".into()));
        let s = GlanceImageStore::from_config(&secret, &base).unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{s:?}").contains("s3cret"));
        assert!(base.join("c").is_dir() && base.join("d").is_dir());
    }
}
