//! Templates and disks as volumes of a libvirt storage pool on each host (`pool = "..."`
//! instead of `disk_dir`): nothing assumes this process shares a file system with a host.
//!
//! * A template's files (image, kernel, initrd) are uploaded into the host's pool as
//!   `devvm-template-<template>-<file>` through libvirt's volume stream, read back and
//!   compared (sha256 of both sides), and only then marked done with the record
//!   `devvm-template-<template>-<file>.verified`. File names carry the Glance image id,
//!   so a host that has the marker has the current file. An upload first claims the name
//!   with the record `….devvm`, so an unfinished upload of devvm's (or one whose marker
//!   is gone) is recognized and made again; a volume of that name without that record is
//!   not devvm's and is left alone ([`ErrorKind::AlreadyExists`]). Uploads of one file to
//!   one host from this machine are serialized by a lock file in the cache.
//! * A disk is the qcow2 overlay `<vm>.qcow2` on the host's template volume, made by
//!   libvirt (`<backingStore>`), with the record `<vm>.qcow2.owner` holding the request id
//!   of the run that made it. The record is made first and exclusively; a disk is never
//!   adopted and a disk whose record names another run (or that has none) is left alone.

use super::*;
use crate::backends::pool::{Backing, Pool};

const TEMPLATE_PREFIX: &str = "devvm-template-";
const VERIFIED: &str = ".verified";
/// The record that says a template volume is devvm's upload.
const OURS: &str = ".devvm";
const OWNER: &str = ".owner";
/// A request id is far shorter; a larger record is not devvm's.
const MAX_RECORD: u64 = 4096;

impl Inner {
    /// `t` (local cache paths) as it is on `host`: its files uploaded and verified there
    /// unless they are already.
    pub(super) fn host_template(
        &self,
        t: &Template,
        host: &HostId,
        pool: &str,
        progress: &Progress,
    ) -> Result<Template> {
        let p = Pool::open(host, pool)?;
        let mut out = t.clone();
        let prefix = volume_prefix(&t.name);
        out.path = self.host_file(&p, host, &prefix, &t.path, progress)?.into();
        if let Some(k) = &t.boot.kernel {
            out.boot.kernel = Some(self.host_file(&p, host, &prefix, k, progress)?.into());
        }
        if let Some(i) = &t.boot.initrd {
            out.boot.initrd = Some(self.host_file(&p, host, &prefix, i, progress)?.into());
        }
        Ok(out)
    }

    /// The host path of the cached file `local`, uploading it first when the host lacks it.
    fn host_file(
        &self,
        p: &Pool,
        host: &HostId,
        prefix: &str,
        local: &Path,
        progress: &Progress,
    ) -> Result<String> {
        let file = local
            .file_name()
            .and_then(|f| f.to_str())
            .filter(|f| !f.starts_with('.'))
            .ok_or_else(|| GlanceError::NotCached {
                name: local.display().to_string(),
                path: local.to_owned(),
            })?;
        let vol_name = format!("{prefix}{file}");
        let marker = format!("{vol_name}{VERIFIED}");
        // One uploader per host and file on this machine.
        let lock_name = format!(
            ".upload-{}.lock",
            short_hash(&format!("{host}\n{vol_name}"))
        );
        let _lock = lock(&contained(&self.cache_dir, &lock_name)?)?;
        let claim = format!("{vol_name}{OURS}");
        match (p.volume(&marker)?, p.volume(&vol_name)?) {
            (Some(_), Some(vol)) => return p.path_of(&vol),
            // No marker but our record: ours, unfinished or no longer trusted; start over.
            (None, Some(_)) if p.volume(&claim)?.is_some() => {
                p.delete(&vol_name)?;
            }
            // Neither: not devvm's upload. It stays, and is reported.
            (None, Some(_)) => {
                return Err(GlanceError::ForeignTemplate {
                    volume: vol_name,
                    host: host.to_string(),
                }
                .into());
            }
            (_, None) => {}
        }
        // The record says the volume about to appear is devvm's (it stays with it).
        p.create_record(&claim, b"devvm upload\n")?;
        progress.message(format!("uploading {file} to {host}"));
        let size = fs::metadata(local).map(|m| m.len()).unwrap_or(0);
        let mut reporter = Reporter::new(progress, format!("{file} to {host}"), Some(size));
        let (vol, sha) = p
            .upload_file(local, &vol_name, |n| reporter.update(n))?
            .ok_or_else(|| GlanceError::HostBusy {
                host: host.to_string(),
                volume: vol_name.clone(),
            })?;
        p.create_record(&marker, format!("sha256:{sha}\n").as_bytes())?;
        progress.message(format!(
            "{file} is on {host}, verified (sha256 {})",
            &sha[..16]
        ));
        p.path_of(&vol)
    }

    /// The cached file behind the host template `t` and its format.
    fn local_of(&self, t: &Template) -> Result<(PathBuf, ImageFormat)> {
        let file = t
            .path
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix(&volume_prefix(&t.name)))
            .unwrap_or_default();
        let dir = self.template_dir(&t.name, false)?;
        self.template_file(&Template {
            path: dir.join(file),
            ..t.clone()
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_pool_disk(
        &self,
        vm: &VmName,
        host: &HostId,
        pool: &str,
        template: &Template,
        size_gib: u64,
        owner: &RequestId,
        progress: &Progress,
    ) -> Result<Disk> {
        if size_gib == 0 {
            return Err(GlanceError::DiskEmpty.into());
        }
        let bytes = size_gib
            .checked_mul(GIB)
            .ok_or(GlanceError::DiskTooLarge(size_gib))?;
        let p = Pool::open(host, pool)?;
        let name = Self::disk_name(vm);
        let record = format!("{name}{OWNER}");
        if !p.create_record(&record, owner.as_str().as_bytes())? {
            // Never adopted: only the run whose record says it made this disk gets it.
            return match read_owner_record(&p, &record)? {
                Some(o) if o == owner.as_str() => match p.volume(&name)? {
                    Some(_) => describe(&p, vm, &name)?.ok_or_else(|| foreign_disk(vm, None)),
                    None => self.make_overlay(&p, vm, &record, template, bytes, progress),
                },
                holder => Err(foreign_disk(vm, holder)),
            };
        }
        // Checked once our record stands, so that the undo of a refused size removes it.
        let (local, format) = self.local_of(template)?;
        let tinfo = parse_info(
            &run_blocking("qemu-img", info_args(&local, format), self.process_timeout)?,
            &local,
        )?;
        if bytes < tinfo.virtual_size {
            p.delete(&record)?;
            return Err(GlanceError::SmallerThanTemplate {
                size_gib,
                template: template.name.to_string(),
                virtual_gib: tinfo.virtual_size as f64 / GIB as f64,
            }
            .into());
        }
        self.make_overlay(&p, vm, &record, template, bytes, progress)
    }

    fn make_overlay(
        &self,
        p: &Pool,
        vm: &VmName,
        record: &str,
        template: &Template,
        bytes: u64,
        progress: &Progress,
    ) -> Result<Disk> {
        let name = Self::disk_name(vm);
        let (_, format) = self.local_of(template)?;
        let backing = template
            .path
            .to_str()
            .ok_or_else(|| GlanceError::NotCached {
                name: template.name.to_string(),
                path: template.path.clone(),
            })?;
        progress.message(format!("creating overlay {name} on {backing}"));
        let made = p.create_overlay(
            &name,
            bytes,
            &Backing {
                path: backing,
                format: format.as_str(),
            },
        )?;
        if made.is_none() {
            // Someone else's volume of that name appeared: it stays, and our claim goes.
            p.delete(record)?;
            return Err(foreign_disk(vm, None));
        }
        let disk = describe(p, vm, &name)?.ok_or_else(|| foreign_disk(vm, None))?;
        progress.message(format!("disk {} ready", disk.path.display()));
        Ok(disk)
    }

    pub(super) fn delete_pool_disk(
        &self,
        vm: &VmName,
        host: &HostId,
        pool: &str,
        owner: &RequestId,
    ) -> Result<Undone> {
        let p = Pool::open(host, pool)?;
        let name = Self::disk_name(vm);
        let record = format!("{name}{OWNER}");
        match read_owner_record(&p, &record)? {
            Some(o) if o == owner.as_str() => {}
            Some(o) => return Ok(Undone::foreign(o)),
            None if p.volume(&name)?.is_some() => {
                return Ok(Undone::foreign("no owner record (not made by devvm)"));
            }
            None => return Ok(Undone::Absent),
        }
        p.delete(&name)?;
        p.delete(&record)?;
        Ok(Undone::Removed)
    }

    pub(super) fn pool_disk(&self, vm: &VmName, host: &HostId, pool: &str) -> Result<Option<Disk>> {
        let p = Pool::open(host, pool)?;
        describe(&p, vm, &Self::disk_name(vm))
    }
}

fn read_owner_record(p: &Pool, record: &str) -> Result<Option<String>> {
    Ok(p.read_record(record, MAX_RECORD)?
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned()))
}

fn describe(p: &Pool, vm: &VmName, name: &str) -> Result<Option<Disk>> {
    let Some(vol) = p.volume(name)? else {
        return Ok(None);
    };
    let capacity = p.capacity(&vol, name)?;
    Ok(Some(Disk {
        vm: vm.clone(),
        path: p.path_of(&vol)?.into(),
        format: DiskFormat::Qcow2,
        size_gib: capacity.div_ceil(GIB),
    }))
}

/// What the names of `template`'s volumes start with.
fn volume_prefix(template: &TemplateName) -> String {
    format!("{TEMPLATE_PREFIX}{template}-")
}

/// A short stable name for a lock file.
fn short_hash(s: &str) -> String {
    let d = sha2::Sha256::digest(s.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}
