//! The verified template cache: hashing, contained paths, atomic files, the sidecar.

use super::*;

/// A hash algorithm this backend can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum HashAlgo {
    Sha512,
    Sha384,
    Sha256,
    Md5,
}

impl HashAlgo {
    pub(super) fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha512 => "sha512",
            HashAlgo::Sha384 => "sha384",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Md5 => "md5",
        }
    }
    pub(super) fn hex_len(self) -> usize {
        match self {
            HashAlgo::Sha512 => 128,
            HashAlgo::Sha384 => 96,
            HashAlgo::Sha256 => 64,
            HashAlgo::Md5 => 32,
        }
    }
    pub(super) fn from_glance(s: &str) -> Option<Self> {
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
pub(super) struct Checksum {
    pub(super) algo: HashAlgo,
    pub(super) hex: String,
}

impl Checksum {
    pub(super) fn new(algo: HashAlgo, hex: &str) -> Option<Self> {
        let hex = hex.trim().to_ascii_lowercase();
        (hex.len() == algo.hex_len() && hex.chars().all(|c| c.is_ascii_hexdigit()))
            .then_some(Checksum { algo, hex })
    }

    /// `algorithm:hex`, as [`Template::digest`].
    pub(super) fn digest(&self) -> String {
        format!("{}:{}", self.algo.name(), self.hex)
    }

    /// The checksum to verify `m` against: its multihash (`os_hash_algo` +
    /// `os_hash_value`) when we support the algorithm, else its md5 `checksum`. An image
    /// with neither cannot be verified and is refused.
    pub(super) fn of(m: &ImageMeta) -> Result<Self> {
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
            .ok_or_else(|| GlanceError::Unverifiable(m.id.clone()).into())
    }
}

pub(super) enum Hasher {
    Sha512(sha2::Sha512),
    Sha384(sha2::Sha384),
    Sha256(sha2::Sha256),
    Md5(md5::Md5),
}

impl Hasher {
    pub(super) fn new(algo: HashAlgo) -> Self {
        match algo {
            HashAlgo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
            HashAlgo::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            HashAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Md5 => Hasher::Md5(md5::Md5::new()),
        }
    }
    pub(super) fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha512(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Md5(h) => h.update(data),
        }
    }
    pub(super) fn hex(self) -> String {
        let enc = |b: &[u8]| data_encoding::HEXLOWER.encode(b);
        match self {
            Hasher::Sha512(h) => enc(&h.finalize()),
            Hasher::Sha384(h) => enc(&h.finalize()),
            Hasher::Sha256(h) => enc(&h.finalize()),
            Hasher::Md5(h) => enc(&h.finalize()),
        }
    }
}

pub(super) fn hash_file(path: &Path, algo: HashAlgo) -> Result<String> {
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
pub(super) enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub(super) fn from_glance(m: &ImageMeta) -> Result<Self> {
        match m.disk_format.as_deref() {
            Some("qcow2") => Ok(ImageFormat::Qcow2),
            Some("raw") => Ok(ImageFormat::Raw),
            other => Err(GlanceError::Format {
                id: m.id.clone(),
                format: other.unwrap_or("(none)").to_owned(),
            }
            .into()),
        }
    }
    pub(super) fn from_path(p: &Path) -> Option<Self> {
        match p.extension()?.to_str()? {
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            _ => None,
        }
    }
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Files

pub(super) fn io_err(what: &'static str, path: &Path, source: io::Error) -> Error {
    GlanceError::Io {
        what,
        path: path.to_owned(),
        source,
    }
    .into()
}

/// `root/name`, where `name` must be one plain path component and the result, with any
/// symbolic link resolved, must be exactly `root/name` (`root` is canonical). A path that
/// would leave `root` is [`ErrorKind::InvalidInput`].
pub(super) fn contained(root: &Path, name: &str) -> Result<PathBuf> {
    let escape = || -> Error {
        GlanceError::Escapes {
            name: name.chars().take(140).collect(),
            root: root.to_owned(),
        }
        .into()
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

pub(super) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot sync", dir, e))
}

/// Removes a temporary file when dropped, unless disarmed.
pub(super) struct TempFile(pub(super) Option<PathBuf>);

impl TempFile {
    pub(super) fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
    pub(super) fn disarm(mut self) {
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
pub(super) fn temp_name(dir: &Path, final_name: &str) -> TempFile {
    TempFile(Some(dir.join(format!(
        ".{final_name}.{}{PART_SUFFIX}",
        uuid::Uuid::new_v4().simple()
    ))))
}

/// The request id an owner record holds; `None` when there is no record.
pub(super) fn read_owner(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", path, e)),
    }
}

pub(super) fn foreign_disk(vm: &VmName, holder: Option<String>) -> Error {
    GlanceError::ForeignDisk {
        vm: vm.to_string(),
        holder: holder.unwrap_or_else(|| "someone else (no owner record)".into()),
    }
    .into()
}

/// Removes the temporary files `.<prefix>*.part` in `dir`.
pub(super) fn remove_parts(dir: &Path, prefix: &str) -> Result<()> {
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
pub(super) struct Stamp {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) mtime: (i64, i64),
    pub(super) ctime: (i64, i64),
}

impl Stamp {
    pub(super) fn of(path: &Path) -> io::Result<Self> {
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
pub(super) fn store_verified(
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
                return Err(GlanceError::BrokeOff {
                    id: image_id.to_owned(),
                    bytes: total,
                    source: e,
                }
                .into());
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
        return Err(GlanceError::SizeMismatch {
            id: image_id.to_owned(),
            expected: size,
            got: total,
        }
        .into());
    }
    let got = hasher.hex();
    if got != checksum.hex {
        return Err(GlanceError::ChecksumMismatch {
            id: image_id.to_owned(),
            algo: checksum.algo.name(),
            expected: checksum.hex[..16].to_owned(),
            got: got[..16.min(got.len())].to_owned(),
        }
        .into());
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
pub(super) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
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
pub(super) struct Lock(pub(super) File);

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

pub(super) fn lock(path: &Path) -> Result<Lock> {
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
pub(super) struct CachedFile {
    /// The Glance image id.
    pub(super) id: String,
    /// The file name inside the template's directory.
    pub(super) file: String,
    pub(super) checksum: Checksum,
    pub(super) stamp: Stamp,
}

/// `cache_dir/<template>/template.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Sidecar {
    pub(super) version: u32,
    pub(super) name: String,
    pub(super) image: CachedFile,
    #[serde(default)]
    pub(super) kernel: Option<CachedFile>,
    #[serde(default)]
    pub(super) initrd: Option<CachedFile>,
    #[serde(default)]
    pub(super) cmdline: Option<String>,
}

impl Sidecar {
    pub(super) fn files(&self) -> impl Iterator<Item = &CachedFile> {
        std::iter::once(&self.image)
            .chain(self.kernel.as_ref())
            .chain(self.initrd.as_ref())
    }
}

impl Inner {
    pub(super) fn template_dir(&self, name: &TemplateName, create: bool) -> Result<PathBuf> {
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
                return Err(GlanceError::NotADirectory(dir).into());
            }
        }
        Ok(dir)
    }

    pub(super) fn read_sidecar(&self, dir: &Path, name: &TemplateName) -> Option<Sidecar> {
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

    pub(super) fn template_of(&self, name: &TemplateName, dir: &Path, s: &Sidecar) -> Template {
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
    pub(super) fn still_valid(
        &self,
        dir: &Path,
        f: &CachedFile,
        rehash: bool,
    ) -> Result<Option<Stamp>> {
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
    pub(super) fn cached_template(&self, name: &TemplateName) -> Result<Option<Template>> {
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
    pub(super) fn ensure_file(
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
            return Err(GlanceError::NoData(id.to_owned()).into());
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
    pub(super) fn prepare(&self, name: &TemplateName, progress: &Progress) -> Result<Template> {
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

    pub(super) fn sync(&self, name: &TemplateName, progress: &Progress) -> Result<Template> {
        let image = self
            .find_image(name)?
            .ok_or_else(|| GlanceError::NoTemplate {
                name: name.to_string(),
                tag: self.tag.clone(),
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
            |p| check_template_file(p, format, &image_id, self.process_timeout),
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
            let bytes = serde_json::to_vec_pretty(&sidecar).map_err(GlanceError::Sidecar)?;
            write_atomic(&dir, SIDECAR, &bytes)?;
        }
        progress.message(format!("template {name} is image {image_id}"));
        Ok(self.template_of(name, &dir, &sidecar))
    }

    pub(super) fn templates(&self) -> Result<Vec<Template>> {
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
    pub(super) fn template_file(&self, t: &Template) -> Result<(PathBuf, ImageFormat)> {
        let not_cached = || -> Error {
            GlanceError::NotCached {
                name: t.name.to_string(),
                path: t.path.clone(),
            }
            .into()
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
}
