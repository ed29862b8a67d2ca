//! VM disks: qcow2 overlays or copies made with `qemu-img`, each with its owner record.

use super::*;

pub(super) fn last_line(stderr: &[u8]) -> String {
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

/// The first argument: the sub-command named in errors (`qemu-img create`).
fn sub_of(args: &[OsString]) -> String {
    args.first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn spawn_error(program: &str) -> impl FnOnce(io::Error) -> GlanceError {
    move |source| GlanceError::Spawn {
        program: program.to_owned(),
        source,
    }
}

fn timed_out(program: &str, sub: String, limit: Duration) -> Error {
    GlanceError::ProcessTimeout {
        program: program.to_owned(),
        sub,
        limit,
    }
    .into()
}

pub(super) fn command_result(
    program: &str,
    sub: String,
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: &[u8],
) -> Result<Vec<u8>> {
    if status.success() {
        Ok(stdout)
    } else {
        Err(GlanceError::Process {
            program: program.to_owned(),
            sub,
            stderr: last_line(stderr),
        }
        .into())
    }
}

/// Runs `program` with `args` (no stdin) and returns its stdout; a failure carries the last
/// line of its stderr. A run longer than `limit` is killed ([`GlanceError::ProcessTimeout`]),
/// and so is one whose future is dropped.
pub(super) async fn run(program: &str, args: Vec<OsString>, limit: Duration) -> Result<Vec<u8>> {
    let sub = sub_of(&args);
    let child = tokio::process::Command::new(program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error(program))?;
    // On timeout the child is dropped, which kills it (kill_on_drop) and reaps it.
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.map_err(spawn_error(program))?;
            command_result(program, sub, out.status, out.stdout, &out.stderr)
        }
        Err(_) => Err(timed_out(program, sub, limit)),
    }
}

/// [`run`] for a thread that may block (the blocking pool), without a runtime.
pub(super) fn run_blocking(program: &str, args: Vec<OsString>, limit: Duration) -> Result<Vec<u8>> {
    use std::process::Stdio;
    let sub = sub_of(&args);
    let mut child = std::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error(program))?;
    // Both pipes are drained on their own threads, so a chatty child never stalls on a full
    // pipe while we wait for it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_error(program))? {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            // Our own child, not yet reaped: its pid cannot have been reused.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => command_result(program, sub, status, stdout, &stderr),
        None => Err(timed_out(program, sub, limit)),
    }
}

/// What `qemu-img info --output=json` says about an image.
#[derive(Debug, Deserialize)]
pub(super) struct QemuInfo {
    #[serde(rename = "virtual-size")]
    pub(super) virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub(super) backing_filename: Option<String>,
    #[serde(rename = "format-specific", default)]
    pub(super) format_specific: Option<serde_json::Value>,
}

pub(super) fn info_args(path: &Path, format: ImageFormat) -> Vec<OsString> {
    vec![
        "info".into(),
        "-U".into(),
        "-f".into(),
        format.as_str().into(),
        "--output=json".into(),
        path.into(),
    ]
}

pub(super) fn parse_info(out: &[u8], path: &Path) -> Result<QemuInfo> {
    serde_json::from_slice(out).map_err(|source| {
        GlanceError::Info {
            path: path.to_owned(),
            source,
        }
        .into()
    })
}

/// Refuses a qcow2 template that names a backing file or an external data file: those
/// would make a VM read arbitrary files of the host.
pub(super) fn check_template_file(
    path: &Path,
    format: ImageFormat,
    image_id: &str,
    limit: Duration,
) -> Result<()> {
    if format != ImageFormat::Qcow2 {
        return Ok(());
    }
    let info = run_blocking("qemu-img", info_args(path, format), limit).map_err(|e| {
        if e.kind() == ErrorKind::Timeout {
            return e;
        }
        GlanceError::NotQcow2 {
            id: image_id.to_owned(),
            reason: e.message().to_owned(),
        }
        .into()
    })?;
    let info = parse_info(&info, path)?;
    let data_file = info
        .format_specific
        .as_ref()
        .and_then(|v| v.pointer("/data/data-file"))
        .is_some();
    if info.backing_filename.is_some() || data_file {
        return Err(GlanceError::Backed(image_id.to_owned()).into());
    }
    Ok(())
}

impl Inner {
    /// `disk_dir`; only called when disks are local files.
    pub(super) fn dir(&self) -> Result<&Path> {
        self.disk_dir
            .as_deref()
            .ok_or_else(|| GlanceError::Storage.into())
    }

    pub(super) fn disk_name(vm: &VmName) -> String {
        format!("{vm}.qcow2")
    }

    pub(super) async fn describe_disk(&self, vm: &VmName, path: &Path) -> Result<Disk> {
        let out = run(
            "qemu-img",
            info_args(path, ImageFormat::Qcow2),
            self.process_timeout,
        )
        .await?;
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
    pub(super) fn owner_file(&self, vm: &VmName) -> Result<PathBuf> {
        contained(self.dir()?, &format!(".{}.owner", Self::disk_name(vm)))
    }

    /// Who made `vm`'s disk, if anyone recorded it.
    pub(super) fn disk_owner(&self, vm: &VmName) -> Result<Option<String>> {
        read_owner(&self.owner_file(vm)?)
    }

    /// Claims `vm`'s disk name for `owner` by creating its owner record exclusively.
    /// Claiming again for the same owner succeeds (a retry after a crash); a record of
    /// another owner is `AlreadyExists`.
    pub(super) fn claim_disk(&self, vm: &VmName, owner: &RequestId) -> Result<()> {
        let path = self.owner_file(vm)?;
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(owner.as_str().as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io_err("cannot write", &path, e))?;
                fsync_dir(self.dir()?)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match self.disk_owner(vm)? {
                Some(o) if o == owner.as_str() => Ok(()),
                holder => Err(foreign_disk(vm, holder)),
            },
            Err(e) => Err(io_err("cannot create", &path, e)),
        }
    }

    pub(super) async fn create_disk(
        &self,
        vm: &VmName,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<Disk> {
        let name = Self::disk_name(vm);
        let path = contained(self.dir()?, &name)?;
        if fs::symlink_metadata(&path).is_ok() {
            // Never adopted: only the run whose record says it made this disk gets it.
            return match self.disk_owner(vm)? {
                Some(o) if o == owner.as_str() => self.describe_disk(vm, &path).await,
                holder => Err(foreign_disk(vm, holder)),
            };
        }
        if size_gib == 0 {
            return Err(GlanceError::DiskEmpty.into());
        }
        let bytes = size_gib
            .checked_mul(GIB)
            .ok_or(GlanceError::DiskTooLarge(size_gib))?;
        let (tpath, format) = self.template_file(template)?;
        let limit = self.process_timeout;
        let tinfo = parse_info(
            &run("qemu-img", info_args(&tpath, format), limit).await?,
            &tpath,
        )?;
        if bytes < tinfo.virtual_size {
            return Err(GlanceError::SmallerThanTemplate {
                size_gib,
                template: template.name.to_string(),
                virtual_gib: tinfo.virtual_size as f64 / GIB as f64,
            }
            .into());
        }
        self.claim_disk(vm, owner)?;
        let tmp = temp_name(self.dir()?, &name);
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
                    limit,
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
                            limit,
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
                            limit,
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
                    limit,
                )
                .await?;
            }
        }
        let tmp_path = tmp.path().to_owned();
        let final_path = path.clone();
        let dir = self.dir()?.to_owned();
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
    pub(super) fn delete_disk(&self, vm: &VmName, owner: &RequestId) -> Result<Undone> {
        let name = Self::disk_name(vm);
        let path = contained(self.dir()?, &name)?;
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
        remove_parts(self.dir()?, &format!("{name}."))?;
        let record = self.owner_file(vm)?;
        match fs::remove_file(&record) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot remove", &record, e)),
        }
        fsync_dir(self.dir()?)?;
        Ok(Undone::Removed)
    }
}
