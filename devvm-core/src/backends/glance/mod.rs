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
/// disk_dir = "/var/lib/libvirt/images"  # where <vm>.qcow2 disks are made (local files),
/// # pool = "default"                    # or: templates and disks in this pool on each host
/// tag = "devvm"                         # optional: only images with this tag
/// mode = "overlay"                      # or "copy"
/// timeout_secs = 30                     # metadata calls; downloads: per read
/// process_timeout_secs = 900            # each qemu-img / cp run
/// token = { file = "glance.token" }     # optional: sent as X-Auth-Token
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlanceConfig {
    /// The Glance endpoint, `http://` or `https://`, without the `/v2` suffix.
    pub url: String,
    /// The local template cache; relative to the config file. Created if missing.
    pub cache_dir: PathBuf,
    /// Where VM disks are made as local files; relative to the config file. Created if
    /// missing. It must be the hypervisor host's storage (local for one host, shared for
    /// several). Give either this or `pool`.
    #[serde(default)]
    pub disk_dir: Option<PathBuf>,
    /// The libvirt storage pool (on every host) that holds the templates and the disks as
    /// volumes, made through libvirt's storage API: hosts may be remote and need share
    /// nothing with this process. Give either this or `disk_dir`. Needs the `libvirt`
    /// feature.
    #[serde(default)]
    pub pool: Option<String>,
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
    /// Time limit in seconds for each `qemu-img` or `cp` this store runs (a full copy of a
    /// large template takes longest). A run over the limit is killed and the step fails
    /// with [`ErrorKind::Timeout`], not retried. Default 900.
    #[serde(default = "default_process_timeout")]
    pub process_timeout_secs: u64,
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
fn default_process_timeout() -> u64 {
    900
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
    disk_dir: Option<PathBuf>,
    pool: Option<String>,
    mode: DiskMode,
    process_timeout: Duration,
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
            .field("pool", &i.pool)
            .field("mode", &i.mode)
            .finish_non_exhaustive()
    }
}

fn prepare_dir(what: &'static str, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)
        .and_then(|()| fs::canonicalize(dir))
        .map_err(|source| {
            GlanceError::CreateDir {
                what,
                path: dir.to_owned(),
                source,
            }
            .into()
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
            return Err(GlanceError::UrlScheme(c.url.clone()).into());
        }
        if url.contains(['?', '#']) || url.ends_with("/v2") {
            return Err(GlanceError::UrlShape(c.url.clone()).into());
        }
        if c.timeout_secs == 0 {
            return Err(GlanceError::ZeroTimeout("timeout_secs").into());
        }
        if c.process_timeout_secs == 0 {
            return Err(GlanceError::ZeroTimeout("process_timeout_secs").into());
        }
        if c.tag.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(GlanceError::EmptyTag.into());
        }
        let token = c.token.as_ref().map(|t| t.resolve(base_dir)).transpose()?;
        if let Some(t) = &token
            && ureq::http::HeaderValue::from_str(t.expose_secret()).is_err()
        {
            return Err(GlanceError::TokenNotHeader.into());
        }
        let cache_dir = prepare_dir("cache_dir", &base_dir.join(&c.cache_dir))?;
        let disk_dir = match (&c.disk_dir, &c.pool) {
            (Some(d), None) => Some(prepare_dir("disk_dir", &base_dir.join(d))?),
            (None, Some(p)) => {
                if !cfg!(feature = "libvirt") {
                    return Err(GlanceError::PoolNotBuilt(p.clone()).into());
                }
                if c.mode == DiskMode::Copy {
                    return Err(GlanceError::PoolCopy.into());
                }
                None
            }
            _ => return Err(GlanceError::Storage.into()),
        };
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
                pool: c.pool.clone(),
                mode: c.mode,
                process_timeout: Duration::from_secs(c.process_timeout_secs),
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

    /// The disk directory (canonical), when disks are local files.
    pub fn disk_dir(&self) -> Option<&Path> {
        self.inner.disk_dir.as_deref()
    }

    /// The libvirt storage pool of every host, when templates and disks are volumes.
    pub fn pool(&self) -> Option<&str> {
        self.inner.pool.as_deref()
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

    /// [`sync`](Self::sync), then, when templates live in each host's pool, makes sure
    /// `host` has the current files (uploaded and verified there only when it lacks
    /// them); the same as [`ImageStore::prepare`]. The template returned has `host`'s
    /// paths.
    pub async fn sync_host(
        &self,
        template: &TemplateName,
        host: &HostId,
        progress: &Progress,
    ) -> Result<Template> {
        let local = self.sync(template, progress).await?;
        self.on_host(local, host, progress).await
    }

    #[cfg(feature = "libvirt")]
    async fn on_host(
        &self,
        local: Template,
        host: &HostId,
        progress: &Progress,
    ) -> Result<Template> {
        let Some(pool) = self.inner.pool.clone() else {
            return Ok(local);
        };
        let (inner, host, progress) = (self.inner.clone(), host.clone(), progress.clone());
        blocking(move || inner.host_template(&local, &host, &pool, &progress)).await
    }

    #[cfg(not(feature = "libvirt"))]
    async fn on_host(&self, local: Template, _host: &HostId, _: &Progress) -> Result<Template> {
        Ok(local)
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

mod api;
mod cache;
mod disk;
mod error;
#[cfg(feature = "libvirt")]
mod pool;

use api::*;
use cache::*;
use disk::*;
use error::GlanceError;

#[async_trait]
impl ImageStore for GlanceImageStore {
    fn backend(&self) -> &str {
        BACKEND
    }

    /// Syncs `template` from Glance as described in the [module docs](self), and with
    /// `pool` into `host`'s pool (see [`sync_host`](GlanceImageStore::sync_host)).
    async fn prepare(
        &self,
        template: &TemplateName,
        host: &HostId,
        progress: &Progress,
    ) -> Result<Template> {
        self.sync_host(template, host, progress).await
    }

    /// The templates with a valid sidecar whose files exist (not hashed again).
    async fn templates(&self) -> Result<Vec<Template>> {
        let inner = self.inner.clone();
        blocking(move || inner.templates()).await
    }

    /// Makes `disk_dir/<vm>.qcow2` (an overlay or a copy, per `mode`; any `host` is
    /// accepted), or with `pool` the overlay volume `<vm>.qcow2` in `host`'s pool. A size
    /// below the template's virtual size is `InvalidInput`; a template not in the cache is
    /// `NotFound`.
    async fn create_disk(
        &self,
        vm: &VmName,
        host: &HostId,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<Disk> {
        #[cfg(feature = "libvirt")]
        if let Some(pool) = self.inner.pool.clone() {
            let inner = self.inner.clone();
            let (vm, host, t, owner, progress) = (
                vm.clone(),
                host.clone(),
                template.clone(),
                owner.clone(),
                progress.clone(),
            );
            return blocking(move || {
                inner.create_pool_disk(&vm, &host, &pool, &t, size_gib, &owner, &progress)
            })
            .await;
        }
        let _ = host;
        self.inner
            .create_disk(vm, template, size_gib, owner, progress)
            .await
            .map_err(|e| e.or_backend(BACKEND))
    }

    async fn delete_disk(&self, vm: &VmName, host: &HostId, owner: &RequestId) -> Result<Undone> {
        let inner = self.inner.clone();
        let (vm, host, owner) = (vm.clone(), host.clone(), owner.clone());
        blocking(move || match inner.pool.clone() {
            #[cfg(feature = "libvirt")]
            Some(pool) => inner.delete_pool_disk(&vm, &host, &pool, &owner),
            _ => {
                let _ = host;
                inner.delete_disk(&vm, &owner)
            }
        })
        .await
    }

    /// With `pool` each host's pool holds its own disks; `disk_dir` is one place for all.
    fn disks_per_host(&self) -> bool {
        self.inner.pool.is_some()
    }

    async fn disk(&self, vm: &VmName, host: &HostId) -> Result<Option<Disk>> {
        #[cfg(feature = "libvirt")]
        if let Some(pool) = self.inner.pool.clone() {
            let (inner, vm, host) = (self.inner.clone(), vm.clone(), host.clone());
            return blocking(move || inner.pool_disk(&vm, &host, &pool)).await;
        }
        let _ = host;
        let path = contained(self.inner.dir()?, &Inner::disk_name(vm))
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
        let d = tempfile::tempdir().unwrap();
        let p = fs::canonicalize(d.path()).unwrap();
        (d, p)
    }

    fn listing(images: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "images": images, "first": "/v2/images" })).unwrap()
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
        let pick = |tag| newest_image(&body, "t", tag).unwrap().map(|m| m.id);
        assert_eq!(
            pick(Some("devvm")).as_deref(),
            Some("c"),
            "ties keep server order"
        );
        assert_eq!(pick(None).as_deref(), Some("e"));
        assert_eq!(pick(Some("other")), None);
        assert!(newest_image(&body, "nope", None).unwrap().is_none());
        assert!(newest_image(b"<html>", "t", None).is_err());
    }

    #[test]
    fn checksums_prefer_the_multihash_and_fall_back_to_md5() {
        let mut m: ImageMeta = serde_json::from_value(img("a", "t", "active", "x", &[])).unwrap();
        assert!(Checksum::of(&m).is_err(), "nothing to verify against");
        m.checksum = Some("0123456789ABCDEF0123456789abcdef".into());
        let c = Checksum::of(&m).unwrap();
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
            .unwrap()
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()
            .unwrap();
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
        .unwrap();
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
        .expect_err("wrong content accepted");
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(
            matches!(e.detail(), Some(GlanceError::ChecksumMismatch { id, .. }) if id == "img-1"),
            "{e}"
        );
        assert_eq!(e.backend_name(), Some("glance"));
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
        .expect_err("short content accepted");
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(
            matches!(
                e.detail(),
                Some(GlanceError::SizeMismatch {
                    expected: 14,
                    got: 4,
                    ..
                })
            ),
            "{e}"
        );
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
        .expect_err("broken download accepted");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        assert!(entries(&dir).is_empty());

        // A failed check after the hash leaves nothing either, and an existing file
        // stays as it was.
        fs::write(dir.join("img.qcow2"), b"old").unwrap();
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
        .expect_err("failed check accepted");
        assert!(e.message().contains("backing"));
        assert_eq!(entries(&dir), vec!["img.qcow2".to_owned()]);
        assert_eq!(fs::read(dir.join("img.qcow2")).ok(), Some(b"old".to_vec()));
    }

    #[tokio::test]
    async fn a_process_over_its_limit_is_stopped_with_a_timeout() {
        let limit = Duration::from_millis(50);
        // `sleep 600` cannot finish on its own before the limit, however loaded the machine.
        let e = run("sleep", vec!["600".into()], limit).await.err();
        let e = e.unwrap_or_else(|| panic!("sleep 600 finished within 50 ms"));
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(!e.is_retryable(), "{e}");
        assert!(
            matches!(e.detail(), Some(GlanceError::ProcessTimeout { .. })),
            "{e}"
        );

        let e = run_blocking("sleep", vec!["600".into()], limit).err();
        let e = e.unwrap_or_else(|| panic!("sleep 600 finished within 50 ms"));
        assert!(
            matches!(e.detail(), Some(GlanceError::ProcessTimeout { .. })),
            "{e}"
        );

        // Within the limit: the output, or the failure with the last line of stderr.
        let out = run_blocking("echo", vec!["hi".into()], Duration::from_secs(600));
        assert_eq!(out.ok().as_deref(), Some(&b"hi\n"[..]));
        let e = run(
            "ls",
            vec!["/surely/not/here".into()],
            Duration::from_secs(600),
        )
        .await
        .err();
        assert!(
            matches!(e.as_ref().and_then(|e| e.detail()), Some(GlanceError::Process { program, .. }) if program == "ls"),
            "{e:?}"
        );
        let e = run_blocking("/surely/not/a/program", vec![], Duration::from_secs(600)).err();
        assert!(
            matches!(
                e.as_ref().and_then(|e| e.detail()),
                Some(GlanceError::Spawn { .. })
            ),
            "{e:?}"
        );
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
            assert!(
                matches!(e.detail(), Some(GlanceError::Escapes { .. })),
                "{e}"
            );
        }
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        assert!(
            contained(&root, "evil").is_err(),
            "a symlink out is refused"
        );
        std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling")).unwrap();
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
        .unwrap();
        let s = GlanceImageStore::from_config(&c, &base).unwrap();
        let t = TemplateName::new("debian-12").unwrap();
        let e = s
            .prepare(&t, &HostId::new("any").unwrap(), &Progress::discard())
            .await
            .expect_err("prepare succeeded");
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
        .unwrap();
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
        let s = GlanceImageStore::from_config(&secret, &base).unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
        assert!(base.join("c").is_dir() && base.join("d").is_dir());
        assert!(!s.disks_per_host(), "disk_dir: one place for every host");

        // Exactly one of disk_dir and pool; a pool's disks are per host, and overlays only.
        let pooled = GlanceConfig {
            disk_dir: None,
            pool: Some("default".into()),
            ..with("http://x:9292")
        };
        let s = GlanceImageStore::from_config(&pooled, &base).unwrap();
        assert!(s.disks_per_host() && s.disk_dir().is_none() && s.pool() == Some("default"));
        for bad in [
            GlanceConfig {
                pool: Some("default".into()),
                ..with("http://x:9292")
            },
            GlanceConfig {
                disk_dir: None,
                ..with("http://x:9292")
            },
            GlanceConfig {
                mode: DiskMode::Copy,
                ..pooled.clone()
            },
        ] {
            let e = GlanceImageStore::from_config(&bad, &base).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        }
    }
}
